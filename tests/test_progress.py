"""Progress bars: a live tqdm bar on a terminal, plain lines in a log (CI, a pipe, a file)."""

from __future__ import annotations

import io
import time

from harness import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(monkeypatch, stream, steps: int = 50, sleep: float = 0.0, **kw) -> str:
    monkeypatch.setattr("sys.stderr", stream)
    for _ in progress.bar(range(steps), desc="work", unit="step", **kw):
        time.sleep(sleep)
    return stream.getvalue()


def test_log_gets_a_first_and_a_last_line_not_a_redraw_per_step(monkeypatch):
    out = _run(monkeypatch, io.StringIO(), leave=False)  # leave=False is overridden: a log keeps the end line
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("work: 0/50 (0%)") and lines[-1].startswith("work: 50/50 (100%)")
    assert len(lines) == 2 and out.endswith("\n")


def test_log_gets_a_line_every_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    out = _run(monkeypatch, io.StringIO(), steps=20, sleep=0.02)  # 0.4 s or more: at least 8 intervals
    lines = out.splitlines()
    assert 4 <= len(lines) <= 20 + 2, out  # lines in between, never more than one a step (a slow machine adds some)
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[-1] == 20


def test_stacked_bars_in_a_log_leave_no_cursor_moves(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    for _ in progress.bar(range(2), desc="outer", leave=False):
        for _ in progress.bar(range(3), desc="inner", leave=False):
            pass
    out = stream.getvalue()
    assert "\x1b" not in out and "\r" not in out
    assert [line.split(":")[0] for line in out.splitlines()] == ["outer", "inner", "inner", "inner", "inner", "outer"]


def test_terminal_keeps_tqdms_live_bar(monkeypatch):
    out = _run(monkeypatch, Terminal(), leave=False)
    assert "\r" in out and "work:" in out and "\n" not in out.strip("\r ")  # redrawn in place, cleared at the end


def test_a_notebook_keeps_its_widget(monkeypatch):
    import tqdm.notebook

    monkeypatch.setattr("sys.stderr", io.StringIO())  # a notebook's stderr is no terminal
    assert progress.in_log()
    monkeypatch.setattr(progress, "tqdm", tqdm.notebook.tqdm)  # what tqdm.auto gives in a Jupyter kernel
    assert not progress.in_log()
