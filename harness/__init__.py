"""Qwen1.5 comparison harness: how far each variant's next-token distribution drifts from a reference.

    harness compare --config configs/default.yaml
"""

import logging

__version__ = "0.1.0"

# transformers imports torchao at start-up; torchao then warns that its CUDA-only extensions do not
# load on a CPU build, and torch warns about torchao's enum registrations. Neither is actionable.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
