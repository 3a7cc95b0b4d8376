"""Every softmax/filter implementation against the web snippet; errors on bad rows; the bench's JSON line.

    .venv/bin/python -m pytest tests/test_bench.py -q

Tolerance: same kept tokens, |Δp| <= 1e-6 (float32 and bfloat16 alike: the fused kernels round the
same float32 value to bfloat16 as torch.softmax does, up to ~1e-7 differences before rounding).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import bench
from harness import softmax_filter as sf

CPU_IMPLS = ["torch", "compiled", "fused-cpu"]
WIDTH = 5000  # narrow rows where the width does not matter


def rows(width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    """[6, width]: realistic, random, tied, single finite entry, warped (top-k/top-p), wide-range rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([bench.realistic_logits(2, width, seed), torch.randn(4, width, generator=gen) * 3])
    x[2, 1::2] = x[2, 0]  # half the row tied with its first entry
    x[3, :] = float("-inf")
    x[3, width // 3] = 1.5
    x[4] = bench.warp(x[:1])[0]
    x[5] = torch.linspace(-80, 30, width)  # exp spans ~110 nats: subnormal and zero probabilities
    return x


def exact(x: torch.Tensor) -> torch.Tensor:
    """The rows' float64 softmax, for same(): where one token holds most of a row, torch's float32 softmax (the
    snippet's) is off by up to ~2.3e-6, so an implementation exact to 1e-6 may be off the snippet by more."""
    return torch.softmax(x.double(), -1).cpu()


def usable(impl: str) -> None:
    why = sf.available(impl, "cpu")
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("filter", ["p>0", "top-k"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_snippet(impl, filter, dtype):
    usable(impl)
    x = rows().to(dtype)  # row 5's probabilities span 110 nats: subnormal ones, and ones that round to 0
    got = sf.IMPLS[impl](x, filter, 20)
    assert sf.same(sf.snippet(list(x.split(1))), got, filter, 20, atol=1e-6, exact=exact(x)) is None
    assert got.indices.dtype == torch.int32 and got.values.dtype == dtype and got.offsets[-1] == got.values.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_warped_row_whose_probabilities_underflow(impl, dtype):
    """A warped row (few finite entries, so the fused kernel lists them) spanning 120 nats: the entries more than
    ~104 nats below the top have probability 0 in float32, and p > 0 keeps none of them, as the snippet does."""
    usable(impl)
    x = torch.full((2, WIDTH), float("-inf"))
    x[0, 3::50] = torch.linspace(-120, 0, 100)
    x[1, :100] = torch.linspace(0, -120, 100)
    x = x.to(dtype)
    want = sf.snippet(list(x.split(1)))
    assert 50 < len(want[0]) < 100  # the row does underflow (bfloat16 a little sooner: its subnormals are coarser)
    for filter in ("p>0", "top-k"):
        got = sf.IMPLS[impl](x, filter, 20)
        assert sf.same(want, got, filter, 20, atol=1e-6, exact=exact(x)) is None, filter
        assert bool((got.values > 0).all()), filter


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_top_k_ties_take_the_lowest_ids(impl):
    """Top-k keeps exactly the first k of a stable descending sort (among tied logits the lowest column first, in
    that order), as the Triton kernels do (test_triton_kernel_under_the_interpreter): on rows of small integers
    (ties everywhere), few finite entries, maxima tied across the row, two finite entries, all equal, and logits near 0
    (in bfloat16 many distinct ones share a probability: the rank is by logit)."""
    usable(impl)
    gen = torch.Generator().manual_seed(5)
    ties = torch.randint(-3, 3, (6, 2500), generator=gen).float()
    ties[1, 100:] = float("-inf")
    ties[2, 7::50] = 9.0
    ties[3, 1:2499] = float("-inf")
    ties[4] = 1.0
    ties[5] = torch.randn(2500, generator=gen) * 0.01
    for dtype, k in itertools.product((torch.float32, torch.bfloat16), (1, 7, 20, 64, 128)):
        x = ties.to(dtype)
        got = sf.IMPLS[impl](x, "top-k", k)
        order = torch.sort(x.float(), dim=1, descending=True, stable=True).indices[:, :k]
        for r in range(len(ties)):
            have = got.indices[got.offsets[r] : got.offsets[r + 1]]
            assert len(have) == min(k, int(ties[r].isfinite().sum())) and torch.equal(have, order[r, : len(have)].int()), (dtype, k, r)


def test_the_top_k_check_catches_a_wrong_set():
    """same() for top-k: a set that leaves out a token above the k-th probability differs, however small the k-th
    (on realistic rows it is ~1e-10: a tolerance against it would pass any 20 tokens with p > 0)."""
    x = bench.realistic_logits(2, 5000, seed=2)
    ref = sf.snippet(list(x.split(1)))
    p = torch.softmax(x, -1)
    for pick in (p.topk(20, largest=False).indices, torch.cat([p.topk(19).indices, p.topk(21).indices[:, 20:]], 1)):
        fake = sf._csr(torch.tensor([20, 20]), pick.reshape(-1).int(), p.gather(1, pick).reshape(-1))
        assert "top-k tokens differ" in sf.same(ref, fake, "top-k", 20)
    assert sf.same(ref, sf.torch_filter(x, "top-k", 20), "top-k", 20) is None


def test_the_probability_check_against_the_exact_softmax():
    """same() with exact=: on a row whose top token holds p ~ 0.996, torch's float32 softmax (the snippet's) is ~2.3e-6
    off float64. The float64 values rounded to the output dtype pass; so do the snippet's own; values 3e-6 off the
    exact ones (float32), or one unit in the last place off (bfloat16), fail, with or without exact=. In bfloat16,
    the exact p rounded passes against a snippet whose value is one unit in the last place away (a rounding of
    torch's float32 value that went the other way), only with exact=."""
    x = bench.realistic_logits(2, 5000, seed=0)[1:]  # p_top 0.996
    full = torch.arange(5000, dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref, ex = sf.snippet(list(xd.split(1))), torch.softmax(xd.double(), -1)

        def rows(v):
            return sf._csr(torch.tensor([5000]), full, v.reshape(-1).to(dtype))

        top = int(ex.argmax())
        if dtype == torch.float32:
            assert abs(ex[0, top].item() - ref[0][top]) > 1.5e-6  # the snippet is that far off
        assert sf.same(ref, rows(ex), exact=ex) is None and sf.same(ref, rows(torch.softmax(xd, -1)), exact=ex) is None
        if dtype == torch.float32:
            bad = ex.clone()
            bad[0, top] -= 3e-6
        else:  # one bfloat16 step down from the exact p rounded
            bad = ex.to(dtype).view(torch.int16)
            bad[0, top] -= 1
            bad = bad.view(dtype).double()
        for given in (None, ex):
            assert f"probability of {top} off" in sf.same(ref, rows(bad), exact=given), (dtype, given is None)
        if dtype == torch.bfloat16:  # a snippet that rounded the other way: the exact p rounded still passes
            other = [dict(ref[0])]
            other[0][top] = bad[0, top].item()
            assert sf.same(other, rows(ex), exact=ex) is None and "off" in sf.same(other, rows(ex))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_full_width_batch(dtype):
    """Qwen1.5 width, more rows than threads (the row split and the packing of ragged rows)."""
    usable("fused-cpu")
    x = bench.realistic_logits(5, bench.VOCAB, seed=1)
    x = torch.cat([x, bench.warp(x[:3])]).to(dtype)
    ref = sf.snippet(list(x.split(1)))
    ws = sf.Workspace()
    for filter in ("p>0", "top-k"):
        assert sf.same(ref, sf.fused_cpu_filter(x, filter, 20, ws), filter, 20, atol=1e-6, exact=exact(x)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_fused_cpu_packs_rows_that_drop_entries(dtype, threads, monkeypatch):
    """Rows whose smallest probabilities round to 0 keep fewer than V entries, so every row after them starts lower.
    Each thread writes its part packed; bfloat16 pairs threads, the even one writing its part backwards to end where
    the odd one starts; the blocks after the first (float32: each thread's, bfloat16: each pair's and an unpaired
    last thread's) move down, in one wave or (MOVE_WAVE 777) in many. Short rows sit first, last and at every thread
    boundary, and a warped row drops more than V; the result must be the snippet's, in row order."""
    usable("fused-cpu")
    x = bench.realistic_logits(7, WIDTH, seed=2)
    short = torch.linspace(-120, 30, WIDTH)  # the bottom ~15 nats of it underflow to 0
    warped = bench.warp(x[:1])[0]
    cases = [[0], [6], [2, 3], [1, 4, 5], list(range(7))]
    before, one_wave = torch.get_num_threads(), sf.MOVE_WAVE
    torch.set_num_threads(threads)
    try:
        for places in cases + [[0, 3]]:  # the last: a warped row too, so more than V entries are dropped
            y = x.clone()
            y[places] = short
            if places == [0, 3]:
                y[3] = warped
            y = y.to(dtype)
            for wave in (one_wave, 777):
                monkeypatch.setattr(sf, "MOVE_WAVE", wave)
                got = sf.fused_cpu_filter(y, "p>0")
                assert got.offsets.tolist()[0] == 0 and int(got.offsets[-1]) == got.values.numel() == got.indices.numel()
                assert sf.same(sf.snippet(list(y.split(1))), got, "p>0", atol=1e-6, exact=exact(y)) is None, (places, wave)
    finally:
        torch.set_num_threads(before)


class ShiftedWorkspace(sf.Workspace):
    """A Workspace whose values buffer starts `shift` elements past an allocation's start: the values and the
    indices then sit at different places in their 64-byte lines."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def get(self, name, n, dtype):
        if name != "values":
            return super().get(name, n, dtype)
        return super().get(name, n + self.shift, dtype)[self.shift :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_p_gt_0_at_any_alignment_of_its_outputs(dtype):
    """Dense p > 0 rows go out through a staging register whose whole chunks take non-temporal stores; where the
    values and the indices do not share an alignment that staging is off, and plain stores write them. Both ways,
    with rows that drop entries (so later rows start at every place in a chunk), 1 to 3 threads (bfloat16 pairs
    them, the even one writing backwards), the result is the snippet's."""
    usable("fused-cpu")
    x = bench.realistic_logits(6, WIDTH, seed=3)
    x[[1, 4]] = torch.linspace(-120, 30, WIDTH)  # the bottom ~15 nats underflow to 0
    x[2, ::37] = float("-inf")  # a dense row that drops one entry in every 37
    x = x.to(dtype)
    ref = sf.snippet(list(x.split(1)))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for shift in (0, 1, 3):
                ws = ShiftedWorkspace(shift)
                got = sf.fused_cpu_filter(x, "p>0", workspace=ws)
                assert ws.get("values", 1, dtype).data_ptr() % 64 == shift * x.element_size()
                assert sf.same(ref, got, "p>0", atol=1e-6, exact=exact(x)) is None, (threads, shift)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_late_events_in_a_dense_row(dtype):
    """Past its first block a dense row takes the one-look loop, which only lists the groups of 32 entries with a
    new maximum, a new top-k member, NaN or +inf, and goes through them where the row read so far has doubled and at
    its end: each placed late in a Qwen-wide row, in both filters. A maximum 100 nats above the sums' overflows them
    (they are done again); a rising row lists every group; a row falling from its second block on lists 1024 top-k
    candidates by the first settle, more than a chunk holds; a row finite only in its first block is dense there
    (so its -inf entries go through the one-look loop)."""
    usable("fused-cpu")
    x = bench.realistic_logits(7, bench.VOCAB, seed=3)
    x[0, 140_001] = x[0].max() + 3  # the maximum rises late: the partial sums are rescaled
    x[1, 90_000:90_040] = x[1].max() + torch.linspace(0.5, 4, 40)  # 40 late entries above all: a new top 20
    x[2, 5_000::7_919] = x[2].max() + torch.arange(1, len(range(5_000, bench.VOCAB, 7_919)) + 1.0)  # rising maxima
    x[3, 70_000] = x[3].max() + 100  # e^100 overflows float32: the sums so far are done again from the new max
    x[4] = torch.linspace(-20, 20, bench.VOCAB)  # every entry a new maximum
    x[5] = torch.linspace(20, -20, bench.VOCAB)
    x[5, :1024] = -30.0
    x[6, 1024:] = float("-inf")
    x = x.to(dtype)
    ref = sf.snippet(list(x.split(1)))
    for filter in ("p>0", "top-k"):
        assert sf.same(ref, sf.fused_cpu_filter(x, filter, 20), filter, 20, atol=1e-6, exact=exact(x)) is None
    for value, why in ((float("nan"), "row 1 holds NaN"), (float("inf"), "row 1 holds \\+inf")):
        bad = x.clone()
        bad[1, 150_000] = value
        for filter in ("p>0", "top-k"):
            with pytest.raises(ValueError, match=why):
                sf.fused_cpu_filter(bad, filter, 20)


def test_fused_cpu_rounds_to_bfloat16_as_torch_does():
    """The kernel's roundings of its float32 probabilities to bfloat16 (16 lanes at a time in dense rows, else one by
    one; CPUs with AVX512-BF16 take vcvtneps2bf16 for normal floats) against torch's: floats in [0, 1] at random,
    subnormals included, and halfway cases (ties to even, both ways) in both. On dense bfloat16 rows the output equals
    torch's rounding of the float32 kernel's output."""
    usable("fused-cpu")
    gen = torch.Generator().manual_seed(6)
    bits = torch.cat([torch.randint(0, 0x3F800001, (200_000,), generator=gen, dtype=torch.int64),
                      torch.tensor([0x3F018000, 0x3F008000, 0x3E818000, 0x3E828000, 0x00018000, 0x00008000, 0x007F8000, 0] * 3)])  # fmt: skip
    f = bits.to(torch.int32).view(torch.float32)
    out = torch.empty(len(f), dtype=torch.int16)
    sf._lib().sf_bf16(f.data_ptr(), out.data_ptr(), len(f))
    assert torch.equal(out, f.to(torch.bfloat16).view(torch.int16))
    x = bench.realistic_logits(16, bench.VOCAB, seed=5).to(torch.bfloat16)
    got, exact = sf.fused_cpu_filter(x, "p>0", 20), sf.fused_cpu_filter(x.float(), "p>0", 20)
    rounded = exact.values.to(torch.bfloat16)
    assert torch.equal(got.indices, exact.indices[rounded > 0]) and torch.equal(got.values, rounded[rounded > 0])


def test_fused_cpu_row_sum_exp_is_within_its_stated_error():
    """The exp of the kernel's row sums (exp16s: a 32-entry table of 2^(j/32) and a degree-2 polynomial) against
    float64 on 4 million floats spread over [-87, 0] plus the ends: 2e-7 relative on [-10, 0], where the terms that
    weigh in a row's sum lie, and 4.2e-7 down to -87 (cext.py's comment gives 1.9e-7 and 4.0e-7 from every float);
    -inf gives e^-87 at most, not NaN."""
    usable("fused-cpu")
    gen = torch.Generator().manual_seed(8)
    ends = torch.tensor([0.0, -0.0, -1e-30, -10.0, -87.0, -88.0, -150.0, float("-inf")] * 2)  # one whole vector
    t = torch.cat([ends, torch.rand(2_000_000, generator=gen) * -10, torch.rand(2_000_000, generator=gen) * -87])
    out = torch.empty_like(t)
    sf._lib().sf_exp(t.data_ptr(), out.data_ptr(), len(t))
    rel = (out.double() / t.double().exp().clamp(min=1e-300) - 1).abs()
    assert rel[t >= -10].max() <= 2e-7 and rel[t >= -87].max() <= 4.2e-7
    assert out[:3].eq(1).all() and out[5:8].isfinite().all() and (out[5:8] <= 1.7e-38).all()


def test_fused_cpu_float32_against_float64():
    """Full-width float32 rows, LM-shaped and flat (std 4: the highest entropy, where the row sum's error shows most),
    against a float64 softmax: |Δp| <= 1e-6, and where p > 1e-30 a relative error under 1e-5 (float32's x − max
    alone rounds t = x − max by up to 4e-6 at |t| ~ 60, as torch.softmax's float32 does)."""
    usable("fused-cpu")
    x = torch.cat([bench.realistic_logits(4, bench.VOCAB, seed=11), torch.randn(4, bench.VOCAB, generator=torch.Generator().manual_seed(5)) * 4])
    want = torch.softmax(x.double(), -1)
    for filter in ("p>0", "top-k"):
        got = sf.fused_cpu_filter(x, filter, 20)
        rows = torch.repeat_interleave(torch.arange(len(x)), got.offsets.diff())
        w = want[rows, got.indices.long()]
        assert float((got.values.double() - w).abs().max()) <= 1e-6
        assert float(((got.values.double() - w).abs() / w)[w > 1e-30].max()) <= 1e-5
    assert int(got.offsets[-1]) == 20 * len(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_random_shapes(dtype):
    """Seeded random widths (odd ones included), k, and -inf densities, so that the switch from listing finite
    entries to the one-look loop falls at every kind of place, and the tails of blocks and rows vary."""
    usable("fused-cpu")
    gen = torch.Generator().manual_seed(4)
    for case in range(12):
        width = int(torch.randint(4_100, 12_000, (1,), generator=gen))
        k = int(torch.randint(1, 257, (1,), generator=gen))
        x = bench.realistic_logits(5, width, seed=case)
        dense = torch.rand(5, width, generator=gen) < torch.tensor([0.02, 0.3, 0.45, 0.9, 1.0])[:, None]
        x = x.masked_fill(~dense, float("-inf")).to(dtype)  # 0.02 * width < 4096 finite: a listed row
        x[:, int(torch.randint(width, (1,), generator=gen))] = 25.0  # one sure finite entry per row
        ref = sf.snippet(list(x.split(1)))
        for filter in ("p>0", "top-k"):
            assert sf.same(ref, sf.fused_cpu_filter(x, filter, k), filter, k, atol=1e-6, exact=exact(x)) is None, (case, width, k, filter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_top_k_sizes(dtype):
    """k <= 128 keeps the top k in registers (2, 4 or 8 pairs) and takes a batch of candidates at a time, k > 128
    appends them to a buffer cut back by nth_element: k at and around each side of 32, 64 and 128 up to 256,
    on dense rows, on ties, and on rows with fewer finite entries than k, side by side in one vector (a batch of 12
    where k = 20). float32 rows of small integers (ties everywhere, many at the k-th place): exactly a stable sort's
    first k, the lowest column first among ties."""
    usable("fused-cpu")
    x = rows()
    few = torch.full((2, WIDTH), float("-inf"))
    few[0, 100:112] = torch.linspace(1, 3, 12)  # 12 finite entries, one vector's worth
    few[1, 4000:4040:2] = 2.0  # 20 tied entries
    x = torch.cat([x, few]).to(dtype)
    ref = sf.snippet(list(x.split(1)))
    ties = torch.randint(-40, 8, (3, WIDTH), generator=torch.Generator().manual_seed(9)).float()
    ties[2, 300:] = float("-inf")  # fewer finite entries than the largest k
    order = torch.sort(ties, dim=1, descending=True, stable=True).indices
    for k in (1, 5, 12, 20, 31, 32, 33, 64, 65, 100, 128, 129, 256):
        assert sf.same(ref, sf.fused_cpu_filter(x, "top-k", k), "top-k", k, atol=1e-6, exact=exact(x)) is None, k
        if dtype == torch.float32:
            got = sf.fused_cpu_filter(ties, "top-k", k)
            for r in range(len(ties)):
                have = got.indices[got.offsets[r] : got.offsets[r + 1]]
                assert torch.equal(have, order[r, : min(k, int(ties[r].isfinite().sum()))].int()), (k, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_cpu_reports_the_first_bad_row(dtype):
    """The first bad row is named whichever thread finds it, also where a thread does its rows last to first."""
    usable("fused-cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for bad in ([1, 2], [2, 6], [5, 7], [0, 3, 4]):
            x = bench.realistic_logits(8, WIDTH, seed=6)
            x[bad[0], 11] = float("nan")
            x[bad[1:]] = float("-inf")
            for filter in ("p>0", "top-k"):
                with pytest.raises(ValueError, match=f"row {bad[0]} holds NaN"):
                    sf.fused_cpu_filter(x.to(dtype), filter, 20)
    finally:
        torch.set_num_threads(before)


def test_fused_cpu_non_contiguous_rows():
    usable("fused-cpu")
    x = rows().t().contiguous().t()  # column-major: copied to row-major first
    assert sf.same(sf.snippet(list(x.split(1))), sf.fused_cpu_filter(x), "p>0", exact=exact(x)) is None


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("bad, why", [("nan", "row 3 holds NaN"), ("nan amid ties", "row 3 holds NaN"), ("-inf", "row 3 is all -inf")])
def test_bad_row_is_an_error(impl, bad, why):
    usable(impl)
    x = rows()
    if bad == "nan":
        x[3, 7] = float("nan")
    elif bad == "nan amid ties":  # a tie straddles the k-th place too: the error comes before any tie is resolved
        x[3] = 0.0
        x[3, 7] = float("nan")
    else:
        x[3] = float("-inf")
    for filter in ("p>0", "top-k"):
        with pytest.raises(ValueError, match=why):
            sf.IMPLS[impl](x, filter, 20)


def test_quick_sets_defaults_and_explicit_options_win(monkeypatch, capsys):
    """--quick changes the defaults of --batches, --dtypes, --repeats and --ceiling-gib; an option given beside it
    is what runs (it used to be replaced silently)."""
    class Ran(Exception):
        pass

    def fake_run(*args, **kwargs):  # only the arguments matter
        seen.append(args)
        raise Ran

    seen = []
    monkeypatch.setattr(bench, "run", fake_run)
    for argv, want in ((["--quick"], ([1, 16], ["float32"], 3, 1.0)),
                       (["--quick", "--batches", "64", "--dtypes", "bfloat16", "--repeats", "2"], ([64], ["bfloat16"], 2, 1.0)),
                       ([], ([1, 16, 256, 4096], ["float32", "bfloat16"], 5, 2.0))):  # fmt: skip
        with pytest.raises(Ran):
            bench.main(argv)
        ints, dtypes, repeats, _, _, _, ceiling = seen[-1][:7]
        assert (ints, dtypes, repeats, ceiling) == want, argv


def test_quick_run_json_line(capsys):
    assert bench.main(["--quick", "--impls", "snippet,torch,fused-cpu,fused-alloc", "--ceiling-gib", "0.25", "--width", "20000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert len(record["load_average"]) == 2 and "fused-alloc" in record["notes"]  # what the variant is, said
    # which row loops the kernel ran: said where they are not AVX-512's
    assert record["fused_cpu_isa"] == sf.kernel_isa() and (record["fused_cpu_isa"] == "avx512") == ("fused-cpu isa" not in record["notes"])
    snippet = {(r["dtype"], r["inputs"], r["batch"]): r["rows_per_s"] for r in record["results"] if r["impl"] == "snippet"}
    for key in ("device", "device_name", "read_ceiling_gbps", "copy_ceiling_gbps", "results"):
        assert key in record
    assert record["read_ceiling_gbps"] > 0 and record["copy_ceiling_gbps"] > 0
    assert {r["impl"] for r in record["results"]} >= {"snippet", "torch"}
    assert record["write_ceiling_gbps"] > 0
    for r in record["results"]:
        assert {"impl", "batch", "dtype", "filter", "rows_per_s", "gbps", "fraction_of_ceiling", "speedup_vs_snippet"} <= r.keys()
        assert r["rows_per_s"] > 0 and r["speedup_vs_snippet"] > 0
        assert r["tokens_per_s"] == r["rows_per_s"] * 20000 and 0 < r["kept_per_s"] <= r["tokens_per_s"]
        # over the snippet at the same batch (it ran at both of --quick's; top-k: its p > 0 rows/s on the same inputs)
        assert r["snippet_batch"] == r["batch"] and r["speedup_vs_snippet"] == pytest.approx(r["rows_per_s"] / snippet[(r["dtype"], r["inputs"], r["batch"])])
        assert 0 < r["near_read_gbps"] <= record["read_ceiling_gbps"]
        assert r["fraction_of_ceiling"] == pytest.approx(r["gbps"] / r["near_read_gbps"])
        assert r["fraction_of_run_ceiling"] == pytest.approx(r["gbps"] / record["read_ceiling_gbps"])
        assert r["fraction_of_bound"] == pytest.approx(r["rows_per_s"] / r["bound_rows_per_s"])
        kept = {("raw", "p>0"): 20000, ("warped", "p>0"): None, ("raw", "top-k"): bench.TOP_K}[(r["inputs"], r["filter"])]
        if kept:  # float32 realistic rows keep every token (none 103 nats under the max); warped rows keep a few
            assert r["written_bytes_per_row"] == kept * 8 + 8
        else:
            assert 8 + 8 <= r["written_bytes_per_row"] <= bench.TOP_K * 8 + 8


@pytest.mark.parametrize("args, message", [(["--device", "tpu"], "unknown device 'tpu'"),
                                           (["--dtypes", "float64"], "unknown dtype 'float64'"),
                                           (["--impls", "numba"], "unknown implementation 'numba'")])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_cuda_asked_for_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "sees no CUDA device" in capsys.readouterr().err


def test_memory_bound_of_a_call():
    """Calls/s memory allows: reads alone at the read ceiling, a copy (each byte read and written once) at exactly the
    copy ceiling, writes at what a copy's byte costs beyond its read, and never faster than the write ceiling."""
    R, W, C = 40.0, 30.0, 17.0
    w = 1 / (1 / C - 1 / R)  # 29.6 GB/s: a written byte's cost in a copy
    assert bench.memory_bound(1e9, 0, R, W, C) == pytest.approx(R)
    assert bench.memory_bound(1e9, 1e9, R, W, C) == pytest.approx(C)
    assert bench.memory_bound(0, 1e9, R, W, C) == pytest.approx(min(W, w))
    assert bench.memory_bound(0, 1e9, R, 20.0, C) == pytest.approx(20.0)
    # p > 0 on a raw float32 row of V tokens: V*4 bytes read, V*(4 + 4) + 8 written (probabilities, int32 columns)
    V = 151936
    assert bench.memory_bound(V * 4, V * 8 + 8, R, W, C) == pytest.approx(1e9 / (V * 4 / R + (V * 8 + 8) / w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", "compiled", "triton"])
def test_cuda_matches_snippet(impl):
    why = sf.available(impl, "cuda")
    if why:
        pytest.skip(why)
    for dtype in (torch.float32, torch.bfloat16):
        x = rows(bench.VOCAB).to("cuda", dtype)
        ref = sf.snippet(list(x.split(1)))
        for filter in ("p>0", "top-k"):
            assert sf.same(ref, sf.IMPLS[impl](x, filter, 20), filter, 20, atol=1e-6, exact=exact(x)) is None
        xn = x.clone()
        xn[2, 3] = float("nan")
        with pytest.raises(ValueError, match="row 2 holds NaN"):
            sf.IMPLS[impl](xn, "p>0", 20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_paths():
    """Each of triton_filter's paths on the GPU against the snippet: rows in one part (top-k fused into `stats`) and in
    several, k from 20 to 256 (narrower groups), sparse parts at and past CAP finite logits, other launch settings,
    both ways of choosing the top k and of keeping p > 0's finite logits; bad rows in either filter and path a
    clear error naming the row."""
    if sf.available("triton", "cuda"):
        pytest.skip(sf.available("triton", "cuda"))
    x = sparse_rows(rows(bench.VOCAB)).to("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref = sf.snippet(list(xd.split(1)))
        # each setting compiles its kernels anew (~5-10 s each on the H200's host): few of them
        for parts, k, cfg, filters in ((1, 20, {}, ("p>0", "top-k")), (None, 20, {}, ("p>0", "top-k")), (3, 64, {}, ("p>0", "top-k")),
                                       (1, 256, {"block": 4096, "warps": 4}, ("p>0", "top-k")),
                                       (1, 20, {"select": "bisect"}, ("top-k",)), (3, 64, {"select": "bisect"}, ("top-k",)),
                                       (1, 20, {"fuse": False}, ("top-k",)), (1, 20, {"tile": "contiguous"}, ("top-k",)),
                                       (None, 20, {"capture": "part"}, ("p>0",)), (3, 20, {"capture": "part", "cap": 32}, ("p>0",))):  # fmt: skip
            for filter in filters:
                got = sf.triton_filter(xd, filter, k, parts=parts, **cfg)
                assert got.values.dtype == dtype and got.indices.dtype == torch.int32
                assert sf.same(ref, got, filter, k, atol=1e-6, exact=exact(xd)) is None, (dtype, parts, k, cfg, filter)
        for row, (col, value, why) in enumerate([(7, float("nan"), "holds NaN"), (-1, float("inf"), "holds \\+inf")]):
            bad = xd.clone()
            bad[row + 1, col] = value
            for filter, parts in itertools.product(("p>0", "top-k"), (1, None)):
                with pytest.raises(ValueError, match=f"row {row + 1} {why}"):
                    sf.triton_filter(bad, filter, 20, parts=parts)
        bad = xd.clone()
        bad[4] = float("-inf")
        with pytest.raises(ValueError, match="row 4 is all -inf"):
            sf.triton_filter(bad, "top-k", 20, parts=1)


def sparse_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [6, V] and two rows more, with exactly CR and CR + 1 finite logits (CR: the most a segment of `stats` keeps
    for `write`, at the default settings), all in the first 2048 columns: so in the first segment of a part in one
    part or three (segments of 9728 and 3328 columns at Qwen1.5's width), spread over its steps of G columns."""
    CR = sf.TRITON["cap"] // (sf.TRITON["block"] // sf.TRITON["row"])
    extra = torch.full((2, x.shape[1]), float("-inf"))
    gen = torch.Generator().manual_seed(3)
    for r, n in enumerate((CR, CR + 1)):
        extra[r, torch.randperm(min(x.shape[1], 2048), generator=gen)[:n]] = torch.randn(n, generator=gen) * 4
    return torch.cat([x, extra])


INTERPRETED = """
import itertools
import sys
import torch
sys.path.insert(0, sys.argv[1])  # this folder
from harness import bench, softmax_filter as sf
from test_bench import exact, rows, sparse_rows
# top-k at a smaller width: the interpreter runs tl.topk's network op by op. Rows in 1 part and in several (p > 0:
# 3 parts of 13 tiles of 4096, then 8 parts of 1024; top-k: 2 parts of 2048 and 452 columns, then 3 of 1024).
for dtype, filter, width, ks, parts in ((torch.float32, "p>0", bench.VOCAB, [20], [(1, {}), (3, {}), (3, {"capture": "part"}),
                                                                                   (2, {"capture": "part", "cap": 32})]),
                                        (torch.bfloat16, "p>0", bench.VOCAB, [20], [(1, {}), (8, {"block": 1024}),
                                                                                    (1, {"capture": "part", "cap": 32})]),
                                        (torch.float32, "top-k", 2500, [1, 20, 64], [(1, {}), (2, {}), (2, {"select": "bisect"}),
                                                                                     (1, {"select": "bisect", "fuse": False}),
                                                                                     (3, {"tile": "contiguous", "select": "bisect"})]),
                                        (torch.bfloat16, "top-k", 2500, [20], [(2, {}), (3, {"block": 1024, "group": 64}),
                                                                                (1, {"select": "bisect"}),
                                                                                (1, {"select": "bisect", "tile": "contiguous"})])):
    x = sparse_rows(rows(width)).to(dtype)
    ref = sf.snippet(list(x.split(1)))
    for k in ks:
        for n, cfg in parts:
            got = sf.triton_filter(x, filter, k, parts=n, **cfg)
            assert got.values.dtype == dtype and got.indices.dtype == torch.int32, (got.values.dtype, got.indices.dtype)
            diff = sf.same(ref, got, filter, k, atol=1e-6, exact=exact(x))
            assert diff is None, (dtype, filter, k, n, cfg, diff)
    # in the last part, the first; and NaN amid a warped row's −inf
    # row 4 is warped: its last −inf column with 1024 more before it, in a step of no others
    amid = next(j for j in range(x.shape[1] - 1, 1023, -1) if bool(x[4, j - 1024 : j + 1].isinf().all()))
    bad_entries = ((2, -3, float("nan"), "holds NaN"), (2, 5, float("inf"), "holds +inf"), (4, amid, float("nan"), "holds NaN"))
    for (row, col, value, why), (n, cfg) in itertools.product(bad_entries, (parts[0], parts[-1])):
        bad = x.clone()
        bad[row, col] = value
        try:
            sf.triton_filter(bad, filter, 20, parts=n, **cfg)
        except ValueError as e:
            assert f"row {row} {why}" in str(e), e
        else:
            raise AssertionError(why + " passed")
# Either way of choosing keeps exactly the first k of a stable descending sort (ties: lowest column first), on rows of
# small integers (ties everywhere), few finite entries, maxima tied across groups, two finite entries, and the top
# k each alone in its group (in shuffled order: each of the k groups must be read)
gen = torch.Generator().manual_seed(5)
ties = torch.randint(-3, 3, (5, 2500), generator=gen).float()
ties[1, 100:] = float("-inf")
ties[2, 7::50] = 9.0
ties[3, 1:2499] = float("-inf")
ties[4] = -5.0
ties[4, ::64] = 10.0 + torch.randperm(40, generator=gen).float()
for dtype, k, n, select in itertools.product((torch.float32, torch.bfloat16), (1, 7, 64, 128), (1, 3), ("bisect", "topk")):
    if select == "topk" and k != 7:  # its network runs slowly here; the rows above cover it
        continue
    cfg = {"select": select, **({"block": 1024, "group": 16, "tile": "contiguous"} if n == 3 else {})}
    got = sf.triton_filter(ties.to(dtype), "top-k", k, parts=n, **cfg)
    order = torch.sort(ties, dim=1, descending=True, stable=True).indices[:, :k]
    for r in range(len(ties)):
        have = got.indices[got.offsets[r] : got.offsets[r + 1]]
        assert torch.equal(have, order[r, : len(have)].int()) and len(have) == min(k, int(ties[r].isfinite().sum())), (dtype, k, n, cfg, r)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernel_under_the_interpreter():
    """The CUDA kernels, run by Triton's interpreter on the CPU, rows in one part and in several: same kept tokens
    and probabilities as the snippet on the test rows (p > 0 at Qwen1.5's width, subnormal bfloat16 probabilities
    included, parts at and past CAP finite logits; top-k with k = 1, 20 and 64, ties, a row with a single finite
    entry; both ways of choosing the top k, each exactly a stable sort's first k on rows full of ties; both ways of
    keeping p > 0's finite logits), NaN and +inf a clear error. A subprocess: TRITON_INTERPRET must be set before
    triton is imported. Speed is for `harness bench` and `harness.triton_sweep` on a GPU."""
    run = subprocess.run([sys.executable, "-c", INTERPRETED, os.path.dirname(__file__)], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


TRITON_VARIANTS = {  # the kernels triton_filter launches, with their constexprs at the default settings and V = 151936
    "stats p>0": ("stats", {"R": 16, "G": 256, "CR": 32, "TOPK": False, "FUSED": False, "KP": 32, "NGP": 4096, "SELECT": False,
                            "CONTIG": False}),
    "stats top-k, fused": ("stats", {"R": 32, "G": 64, "CR": 16, "TOPK": True, "FUSED": True, "KP": 32, "NGP": 4096, "SELECT": False,
                                     "CONTIG": False}),
    "stats top-k, fused, bisect, contiguous": ("stats", {"R": 32, "G": 64, "CR": 16, "TOPK": True, "FUSED": True, "KP": 32,
                                                         "NGP": 4096, "SELECT": True, "CONTIG": True}),
    "stats top-k": ("stats", {"R": 32, "G": 64, "CR": 16, "TOPK": True, "FUSED": False, "KP": 32, "NGP": 4096, "SELECT": False,
                              "CONTIG": False}),
    "top": ("top", {"NP": 64, "G": 64, "KP": 32, "NGP": 4096, "SELECT": False}),
    "top, bisect": ("top", {"NP": 64, "G": 64, "KP": 32, "NGP": 4096, "SELECT": True}),
    "write": ("write", {"BLOCK": 4096, "R": 16, "CR": 32, "NP": 64}),
    "stats_part": ("stats_part", {"BLOCK": 4096, "CAP": 512}),
    "write, part": ("write", {"BLOCK": 4096, "R": 1, "CR": 512, "NP": 64}),
    "compact": ("compact", {"BLOCK": 1024}),
}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
def test_triton_kernels_compile_for_hopper(dtype, variant, tmp_path, monkeypatch):
    """Without a GPU: each Triton kernel compiles to a cubin for sm_90 (H100, H200) in each variant triton_filter
    launches, and ptxas (from the triton wheel) spills nothing to local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    name, constexprs = TRITON_VARIANTS[variant]
    fn = dict(zip(("stats", "top", "write", "compact", "stats_part"), sf._triton_kernels()))[name]
    constexprs = {**constexprs, **({"BF16": dtype == "bf16"} if name not in ("compact", "stats_part") else {})}
    out = "*i16" if dtype == "bf16" else "*fp32"
    types = {"x_ptr": f"*{dtype}", "val_ptr": out, "src_val": out, "idx_ptr": "*i32", "cidx_ptr": "*i32", "src_idx": "*i32",
             "cnt_ptr": "*i64", "flag_ptr": "*i64", "dst_ptr": "*i64", "stat_ptr": "*fp32", "gmax_ptr": "*fp32", "cval_ptr": "*fp32",
             "ccnt_ptr": "*i32", "sel_ptr": "*i64"}  # fmt: skip
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": sf.TRITON["warps"]})  # fmt: skip
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    assert "REG:" in usage and "LOCAL:0 " in usage, usage


def test_triton_filter_refuses_unknown_settings():
    """A misspelt launch setting (from a sweep file or a caller) is an error naming it, not silently ignored."""
    with pytest.raises(ValueError, match=r"unknown triton_filter settings \['selec'\]"):
        sf.triton_filter(torch.zeros(2, 8), "top-k", 2, selec="bisect")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_sweep_picks_the_fastest_settings(tmp_path, monkeypatch, capsys):
    """The sweep's logic on the CPU, with fakes of do_bench (a time per setting: fastest at block 2048, 8 warps,
    bisect for top-k, waves 8), of the kernels and of the ceilings: the best per case is the fastest setting, a
    setting that fails is reported and skipped, one whose output is wrong is not timed, --only picks cases, and
    `harness bench` reads the JSON back."""
    import triton.testing

    from harness import triton_sweep

    calls = []

    def fake_filter(x, filter, k, **cfg):
        if cfg.get("group") == 128:
            raise RuntimeError("out of resources: shared memory")
        calls.append((filter, cfg))
        out = sf.torch_filter(x, filter, k)
        return sf.SparseRows(out.offsets, out.indices, out.values * 2) if cfg.get("tile") == "contiguous" else out  # wrong

    def fake_do_bench(fn, warmup, rep, return_mode):
        fn()
        filter, cfg = calls[-1]
        return (1.0 + abs(cfg.get("block", 4096) - 2048) / 1024 + abs(cfg.get("warps", 8) - 8) / 8 - 0.25 * (cfg.get("select") == "bisect")
                - 0.1 * (cfg.get("waves") == 8) + 0.05 * ("maxnreg" in cfg))  # fmt: skip

    monkeypatch.setattr(triton_sweep, "DEVICE", "cpu")
    monkeypatch.setattr(triton_sweep, "ROWS", 128)
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(triton_sweep.sf, "triton_filter", fake_filter)
    monkeypatch.setattr(triton_sweep.bench, "ceilings", lambda *a: bench.Ceilings(100.0, 50.0, 100.0, 90.0, 45.0, 90.0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "fake GPU")
    realistic = bench.realistic_logits
    monkeypatch.setattr(triton_sweep.bench, "realistic_logits", lambda n: realistic(n, 1024))
    out = tmp_path / "sweep.json"
    assert triton_sweep.main(["--json", str(out), "--only", "float32"]) == 0
    text = capsys.readouterr().out
    assert "RuntimeError: out of resources" in text and "bfloat16" not in text.split("best per case")[1]
    assert "raw float32 top-k 4096 {'tile': 'contiguous'}: not timed, its output differs from the snippet's: row 0" in text
    got = json.loads(out.read_text())
    assert set(got["best"]) == {f"{kind} float32 {f} {b}" for kind, f in (("raw", "top-k"), ("warped", "p>0"), ("raw", "p>0"))
                                for b in (4096, 256)}  # fmt: skip
    assert got["best"]["raw float32 top-k 4096"] == {"block": 2048, "warps": 8, "select": "bisect", "ms": 0.75}
    assert got["best"]["raw float32 top-k 256"] == {"block": 2048, "warps": 8, "select": "bisect", "waves": 8, "ms": 0.65}
    assert got["best"]["warped float32 p>0 4096"] == {"block": 2048, "warps": 8, "ms": 1.0}
    assert bench.swept(got["best"], "raw", "float32", "top-k", 16) == {"block": 2048, "warps": 8, "select": "bisect", "waves": 8}
    assert all(r["fraction_of_ceiling"] == r["gbps"] / 100.0 for r in got["results"] if "wrong" not in r)
    assert [r["tile"] for r in got["results"] if "wrong" in r] == ["contiguous"] * 2 and not os.path.exists(f"{out}.tmp")


def test_input_set_outgrows_the_cache():
    """Small batches cycle through at least INPUT_MIB of rows (so each call reads what the cache does not hold)."""
    assert bench.input_rows([1, 16], bench.VOCAB) * bench.VOCAB * 4 >= 512 * 2**20 > 64 * 2**20
    assert bench.input_rows([1, 16], bench.VOCAB) == 884 and bench.input_rows([16, 4096], bench.VOCAB) == 4096


def test_each_case_is_held_against_the_ceilings_measured_around_it(monkeypatch):
    """A case's near ceilings are the better of the probes just before and just after it; the run's are the best of
    every measurement; fractions and the memory bound follow from them."""
    reads = [50.0, 80.0, 40.0, 60.0, 45.0, 47.0, 30.0, 55.0, 52.0, 58.0]  # before case 1, after each of the 9
    it = iter(reads)

    class FakeProbe:
        def __init__(self, device, gib):
            assert gib == bench.NEAR_GIB

        def measure(self, repeats):
            assert repeats == bench.NEAR_REPEATS
            r = next(it)
            return bench.Ceilings(r, r / 2, r / 4, r, r / 2, r / 4)

    monkeypatch.setattr(bench, "Probe", FakeProbe)
    monkeypatch.setattr(bench, "ceilings", lambda *a: bench.Ceilings(70.0, 30.0, 10.0, 65.0, 28.0, 9.0))
    record = bench.run([1, 2, 4], ["float32"], 1, ["torch"], 1024, ceiling_gib=1.0, min_seconds=0, log=lambda m: None)
    got = record["results"]
    assert len(got) == 9 and [r["near_read_gbps"] for r in got] == [max(a, b) for a, b in zip(reads, reads[1:])]
    assert record["read_ceiling_gbps"] == 80.0 and record["copy_ceiling_gbps"] == 40.0 and record["write_ceiling_gbps"] == 20.0
    for r in got:
        near = r["near_read_gbps"]
        assert r["near_copy_gbps"] == near / 2 and r["near_write_gbps"] == near / 4
        assert r["fraction_of_ceiling"] == r["gbps"] / near and r["fraction_of_run_ceiling"] == r["gbps"] / 80.0
        assert r["bound_rows_per_s"] == bench.memory_bound(r["read_bytes_per_row"], r["written_bytes_per_row"], near, near / 4, near / 2)


def test_an_implementation_whose_output_is_wrong_is_not_timed(monkeypatch):
    """Each case's output is held to the snippet before it is timed (bench.output_differs): a wrong one is a note, not
    a row of the table (the sweep's fastest Triton settings may not have run on this device before)."""
    right = sf.IMPLS["torch"]

    def doubled(x, filter, k):  # every probability twice what it is
        out = right(x, filter, k)
        return sf.SparseRows(out.offsets, out.indices, out.values * 2)

    monkeypatch.setitem(sf.IMPLS, "torch", doubled)
    record = bench.run([2, 4], ["float32"], 1, ["torch", "fused-cpu"], 2048, ceiling_gib=0.25, min_seconds=0, log=lambda m: None)
    assert {r["impl"] for r in record["results"]} == {"fused-cpu"}
    why = record["notes"]["torch@2 float32 raw p>0"]
    assert why.startswith("not timed: its output differs from the snippet's: row 0:"), why
    x = bench.realistic_logits(3, 2048)
    assert bench.output_differs(right(x, "top-k", bench.TOP_K), x, "top-k") is None
    assert bench.output_differs(doubled(x, "top-k", bench.TOP_K), x, "top-k").startswith("row 0:")


def test_bench_result_lands_in_a_run_record_and_its_report(tmp_path, capsys):
    from harness import records
    from harness.cli import main

    records.write(tmp_path, records.RunRecord(schema_version=records.SCHEMA_VERSION, status="ok", created_at="2026-01-01T00:00:00Z"))
    args = ["bench", "--batches", "1", "--dtypes", "float32", "--impls", "snippet,torch", "--repeats", "1", "--ceiling-gib", "0.25",
            "--width", "4096", "--into", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON line stays last
    stored = records.read(tmp_path).throughput
    assert stored == last and {r["impl"] for r in stored["results"]} == {"snippet", "torch"}
    page = (tmp_path / "index.html").read_text()
    assert 'id=bench' in page and "Softmax/filter throughput" in page and "of bound" in page and "write ceiling" in page
    assert "<th>spread</th>" in page and "logit tokens per second" in page


def test_a_busy_machine_is_noted():
    """Where the load average says other processes held the cores the timed threads need, the record says so."""
    cores = len(os.sched_getaffinity(0))
    assert bench.busy_note(min(2, cores), [0.1, min(2, cores) + 0.3]) is None  # the run's own threads are not "others"
    assert "the machine was busy: load average" in bench.busy_note(1, [cores + 0.6, 0.2])
    assert "the machine was busy" in bench.busy_note(1, [0.2, cores + 1.6])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "abc"], "--batches 'abc': give comma-separated whole numbers"),
        (["--batches", "0,16"], "must be at least 1"),
        (["--ceiling-gib", "0"], "--ceiling-gib (0.0) and --max-gb (8.0) must be positive"),  # divided by zero after timing
        (["--ceiling-gib", "nan"], "--ceiling-gib (nan) and --max-gb (8.0) must be positive"),
        (["--impls", ""], "--impls is empty"),  # ran every implementation
        (["--into", "no-such-run"], "--into: no-such-run: no run record there"),
        (["--triton-settings", "no-such.json"], "--triton-settings no-such.json: not a"),
    ],
)
def test_bad_options_are_usage_errors_before_any_timing(argv, message, capsys, monkeypatch, tmp_path):
    """Exit 2 with the option named, before the benchmark runs (a bad --into used to fail after it, losing the result)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("k", [0, 257])
def test_fused_cpu_refuses_a_top_k_outside_its_range(k):
    """The kernel keeps at most 256 (its buffers); 0 keeps nothing: both a ValueError before the kernel runs."""
    x = torch.randn(2, 1000)
    with pytest.raises(ValueError, match=r"0 < k <= 256"):
        sf.fused_cpu_filter(x, "top-k", k)


def test_the_exact_softmax_allowance_is_half_a_unit_in_the_last_place():
    """same(..., atol=0, exact=): the exact p rounded to float32 passes (within half a unit in the last place); its
    neighbour on the other side of the exact value (between a half and one unit off) fails. The snippet's value is
    set far off, so that only the exact value decides."""
    x = bench.realistic_logits(1, 3000, seed=3)
    ex = torch.softmax(x.double(), -1)
    ids = torch.arange(3000, dtype=torch.int32)
    top = int(ex.argmax())
    ref = [{i: float(p) * 1.01 for i, p in enumerate(ex[0].tolist())}]  # 1% off everywhere: the exact one decides
    rounded = ex.float()
    assert sf.same(ref, sf._csr(torch.tensor([3000]), ids, rounded.reshape(-1)), atol=0.0, exact=ex) is None
    e, r = ex[0, top].item(), rounded[0, top].item()
    other = float(np.nextafter(np.float32(r), np.float32(-np.inf if r >= e else np.inf)))  # across e: 0.5 to 1 ulp off it
    ulp = float(np.spacing(np.float32(min(r, other))))  # a float32 unit in the last place there
    assert 0.5 * ulp < abs(other - e) <= ulp
    bad = rounded.clone()
    bad[0, top] = other
    got = sf.same(ref, sf._csr(torch.tensor([3000]), ids, bad.reshape(-1)), atol=0.0, exact=ex)
    assert got is not None and f"probability of {top} off" in got
