"""Shared fixtures: the micro zoo (built once, cached under $HARNESS_HOME), and a throwaway store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def pytest_collection_modifyitems(items):
    """A test that takes the micro zoo, itself or through another fixture (`tokenizer`, a run on the zoo), is `slow`
    whatever its file says: that is what the marker means, so `-m "not slow"` (make test-fast) never builds the zoo."""
    for item in items:
        if "micro_zoo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def micro_zoo():
    """name -> folder of every model of the micro profile (built on first use, then reused)."""
    from harness import zoo

    return zoo.build("micro", log=lambda msg: print(f"[micro zoo] {msg}"))


@pytest.fixture(scope="session")
def tokenizer(micro_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_zoo["qwen-tokenizer"])


@pytest.fixture
def tmp_store(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="session")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    """A page on `path` that records console messages, page errors and every request it makes."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    seen = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: seen["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, seen


def tied_below_a_top(rows: int, width: int, gen, dtype=None):
    """`rows` rows of N(-20, 1) logits ([rows, width], float32 unless `dtype`), each with one clear top at -1 and 299
    more tied at -3 at random columns, and each row's 300 columns, its top first. torch.topk's pick inside such a tie
    strays from the lowest columns on some rows, which is what the tests of the lowest-id rule need."""
    import torch

    x = torch.randn(rows, width, dtype=dtype or torch.float32, generator=gen) - 20
    cols = []
    for r in range(rows):
        cols.append(torch.randperm(width, generator=gen)[:300])
        x[r, cols[-1]] = -3.0
        x[r, cols[-1][0]] = -1.0
    return x, cols

def axe_violations(page) -> list[str]:
    """axe-core's rules (WCAG 2 A and AA, best practices) on the page as it stands: a line per rule it breaks, with the
    first elements. The scroll boxes' edge shadows are painted plain white first, so that the contrast of every cell in
    them is checked (over a gradient axe leaves a cell unchecked)."""
    from axe_playwright_python.sync_playwright import Axe

    page.add_style_tag(content=".wide { background: #fff !important; }")
    found = Axe().run(page, options={"resultTypes": ["violations"]}).response["violations"]
    return [f"{v['impact']} {v['id']}: {v['help']} at {[n['target'] for n in v['nodes'][:3]]}" for v in found]


XSS_PROMPTS = [  # prompt text and ids that a careless report would execute
    {"id": "xss-<img src=x onerror=\"window.__pwned='id'\">",
     "text": "Plain words first, then <script>window.__pwned='text'</script> and <img src=x onerror=\"window.__pwned='img'\"> & more."},
    {"id": "xss-chat", "messages": [{"role": "user", "content": "<script>window.__pwned='chat'</script> hello"}]},
]  # fmt: skip


@pytest.fixture(scope="session")
def micro_run(micro_zoo, tmp_path_factory):
    """One `harness compare` of the default config on the micro zoo, over the small prompt set plus
    two prompts that carry HTML payloads, shared by the CLI and report tests: (run folder, stdout)."""
    import contextlib
    import io
    import json
    from pathlib import Path

    from harness.cli import main

    root = Path(__file__).parents[1]
    tmp = tmp_path_factory.mktemp("micro-run")
    prompts = tmp / "prompts.jsonl"
    small = (Path(__file__).parent / "data" / "prompts-small.jsonl").read_text()
    prompts.write_text(small + "".join(json.dumps(p) + "\n" for p in XSS_PROMPTS))
    overrides = ["zoo_profile=micro", f"prompts={prompts}", f"reports_dir={tmp / 'reports'}", "metrics.bootstrap_resamples=200"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        assert main(["compare", "--config", str(root / "configs" / "default.yaml"), *overrides]) == 0
    return (tmp / "reports" / "latest").resolve(), out.getvalue()
