"""Where the harness keeps what it builds: `$HARNESS_HOME` (default `~/.cache/harness`), and file hashes.

`$HARNESS_HOME/zoo/<profile>/` holds the embedded model family, `$HARNESS_HOME/store/` the
extracted log-probs (or `$HARNESS_STORE`, where set: tests point it at a temporary folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("HARNESS_HOME") or Path.home() / ".cache" / "harness").expanduser()


def zoo_dir(profile: str) -> Path:
    return home() / "zoo" / profile


def store_dir() -> Path:
    return Path(os.environ.get("HARNESS_STORE") or home() / "store").expanduser()


def unwritable(folder: Path) -> str | None:
    """None where `folder` can be made (with its parents) and a file written in it, else why not, in a few words."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return "it is a file, not a folder" if Path(folder).exists() and not Path(folder).is_dir() else str(exc.strerror or exc)
    return None


def store_var() -> str:
    """The variable that placed the store folder, for messages that name it."""
    return "$HARNESS_STORE" if os.environ.get("HARNESS_STORE") else "$HARNESS_HOME/store"


def store_dir_problem() -> str | None:
    """None where the store folder can be made and written, else a one-paragraph error naming it and its variable:
    checked before any model loads, rather than when the first shard is written."""
    if why := unwritable(store_dir()):
        var = store_var()
        return (f"the store folder {store_dir()} ({var}) cannot be written: {why}. Point HARNESS_STORE (or "
                "HARNESS_HOME) at a folder this user can create and write.")
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(path: Path, waiting: str, log=print):
    """Holds an flock on `path` (created if missing) for the with block, across processes; logs `waiting` first if
    another holds it. Yields None, or on a file system without flock (some network mounts: unlocked) its reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            yield exc.strerror or str(exc)
            return
        yield None
