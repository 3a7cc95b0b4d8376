"""pytest-benchmark suite of the softmax/filter implementations, at small fixed sizes (well under a minute).

    .venv/bin/python -m pytest tests/bench --benchmark-enable --benchmark-json=reports/bench.json
    .venv/bin/python -m pytest tests/bench --benchmark-enable --benchmark-storage=reports/benchmarks --benchmark-compare
        # against the last run `make bench` saved (--benchmark-autosave)

Rows are Qwen1.5-wide (151936) realistic float32 logits, 16 per call (the snippet: 1 per call; on CUDA, 256). With the
project's default --benchmark-disable each function runs once, as a smoke test. Full sweeps, the
memory ceiling and the fraction of it: `python -m harness.bench`.
"""

from __future__ import annotations

import pytest
import torch

from harness import bench
from harness import softmax_filter as sf

BATCH = 16


@pytest.fixture(scope="module")
def logits() -> dict[str, torch.Tensor]:
    raw = bench.realistic_logits(BATCH, bench.VOCAB)
    return {"raw": raw, "warped": bench.warp(raw)}


@pytest.mark.parametrize("inputs", ["raw", "warped"])
def test_snippet(benchmark, logits, inputs):
    scores = list(logits[inputs][:1].split(1))
    benchmark.extra_info.update(rows=1, width=bench.VOCAB)
    out = benchmark(sf.snippet, scores)
    assert len(out) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("inputs, filter", [("raw", "p>0"), ("warped", "p>0"), ("raw", "top-k")])
@pytest.mark.parametrize("impl", ["torch", "compiled", "fused-cpu", "fused-alloc"])
def test_impl(benchmark, logits, impl, inputs, filter, dtype):
    """fused-cpu writes into a Workspace kept between calls; fused-alloc is the same kernel with a new output per call
    (harness.bench.VARIANTS), as torch's paths allocate theirs."""
    why = sf.available(bench.VARIANTS.get(impl, (impl,))[0], "cpu")
    if why:
        pytest.skip(why)
    x = logits[inputs].to(dtype)
    fn = sf.IMPLS[bench.VARIANTS.get(impl, (impl,))[0]]
    kwargs = {"workspace": sf.Workspace()} if impl == "fused-cpu" else {}
    if impl == "compiled":
        fn(x, filter, bench.TOP_K)  # compile outside the timed rounds
    benchmark.extra_info.update(rows=BATCH, width=bench.VOCAB, bytes_read=x.numel() * x.element_size())
    out = benchmark(fn, x, filter, bench.TOP_K, **kwargs)
    assert out.offsets.numel() == BATCH + 1


CUDA_BATCH = 256  # 16 rows are 2 µs of reading on an H200: launches and the sync would be all that is timed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("inputs, filter", [("raw", "p>0"), ("warped", "p>0"), ("raw", "top-k")])
@pytest.mark.parametrize("impl", ["torch", "compiled", "triton"])
def test_impl_cuda(benchmark, impl, inputs, filter, dtype):
    """The same on the GPU, CUDA_BATCH rows a call; each call ends with a synchronize, so the timing holds the work."""
    why = sf.available(impl, "cuda")
    if why:
        pytest.skip(why)
    raw = bench.realistic_logits(CUDA_BATCH, bench.VOCAB)
    x = (raw if inputs == "raw" else bench.warp(raw)).to("cuda", dtype)
    fn = sf.IMPLS[impl]

    def call():
        out = fn(x, filter, bench.TOP_K)
        torch.cuda.synchronize()
        return out

    call()  # compile (torch.compile, Triton) outside the timed rounds
    benchmark.extra_info.update(rows=CUDA_BATCH, width=bench.VOCAB, bytes_read=x.numel() * x.element_size())
    out = benchmark(call)
    assert out.offsets.numel() == CUDA_BATCH + 1
