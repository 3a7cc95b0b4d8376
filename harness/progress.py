"""Progress bars that suit where they are read: tqdm's live bar on a terminal; in a log (CI, a pipe, a file), a
plain line when a bar starts, one every 30 s and one when it ends, instead of a carriage-return redraw per step,
which a log keeps as one endless line.

    python -m harness.progress 2>&1 | cat     # what a log sees
"""

from __future__ import annotations

import re
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between stacked bars


class Lines:
    """A text stream for tqdm that writes each redraw as its own line: carriage returns and cursor moves dropped,
    the blank redraws with which a bar clears itself skipped."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        for line in _CURSOR.sub("", s).replace("\r", "\n").splitlines():
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def in_log() -> bool:
    """Whether bars go to a log: stderr is not a terminal, and tqdm.auto did not pick Jupyter's widget (a notebook's
    stderr is no terminal either)."""
    notebook = sys.modules.get("tqdm.notebook")
    terminal = getattr(sys.stderr, "isatty", lambda: False)()  # a stand-in stream may lack isatty
    return not terminal and not (notebook is not None and issubclass(tqdm, notebook.tqdm_notebook))


def bar(iterable=None, **kw) -> tqdm:
    """tqdm(iterable, **kw) drawing on stderr; in a log, as lines (see the module docstring): every LOG_INTERVAL_S,
    and kept at the end whatever `leave` says, so that a log shows how long each step took."""
    if in_log():
        kw |= {"file": Lines(sys.stderr), "mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, "leave": True}
        if kw.get("total", len(iterable) if hasattr(iterable, "__len__") else None) is not None:
            kw.setdefault("bar_format", LOG_FORMAT)
    return tqdm(iterable, **kw)


if __name__ == "__main__":
    import time

    for _ in bar(range(40), desc="demo", unit="step"):
        time.sleep(0.05)
    with bar(total=3, desc="manual", unit="seq", leave=False) as b:
        for _ in range(3):
            b.update(1)
