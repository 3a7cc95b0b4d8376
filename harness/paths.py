"""Where the harness keeps what it builds: `$HARNESS_HOME` (default `~/.cache/harness`), and file hashes.

`$HARNESS_HOME/zoo/<profile>/` holds the embedded model family, `$HARNESS_HOME/store/` the
extracted log-probs (or `$HARNESS_STORE`, where set: tests point it at a temporary folder).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("HARNESS_HOME") or Path.home() / ".cache" / "harness").expanduser()


def zoo_dir(profile: str) -> Path:
    return home() / "zoo" / profile


def store_dir() -> Path:
    return Path(os.environ.get("HARNESS_STORE") or home() / "store").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
