"""Where the harness keeps what it builds: `$HARNESS_HOME` (default `~/.cache/harness`).

`$HARNESS_HOME/zoo/<profile>/` holds the embedded model family, `$HARNESS_HOME/store/` the
extracted log-probs (or `$HARNESS_STORE`, where set: tests point it at a temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("HARNESS_HOME") or Path.home() / ".cache" / "harness").expanduser()


def zoo_dir(profile: str) -> Path:
    return home() / "zoo" / profile


def store_dir() -> Path:
    return Path(os.environ.get("HARNESS_STORE") or home() / "store").expanduser()
