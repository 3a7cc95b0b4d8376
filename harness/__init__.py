"""Qwen1.5 comparison harness: how far each variant's next-token distribution drifts from a reference.

    harness compare --config configs/default.yaml
"""

__version__ = "0.1.0"
