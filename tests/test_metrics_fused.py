"""The fused kernel against metrics.position_metrics (float64 torch): floats within rtol 1e-6, the rest exact."""

import math

import pytest
import torch
from conftest import tied_below_a_top

from harness import bench, metrics, metrics_fused

pytestmark = pytest.mark.skipif(metrics_fused.available() is not None, reason=f"fused kernel: {metrics_fused.available()}")

WIDE = 151646
EXACT = {"top1_agree", "ref_top_rank"}


def _rows(kind, n, v, seed):
    """[n, v] float32 (ref, cand) log-prob pairs, renormalised in float32 as stored rows are (so slightly off)."""
    gen = torch.Generator().manual_seed(seed)
    scale = {"normal": 2.0, "peaked": 8.0, "near-uniform": 1e-3, "filtered": 3.0}.get(kind, 2.0)
    if kind == "tied":
        ref, cand = (torch.randint(0, 3, (n, v), generator=gen).float() for _ in range(2))
    elif kind == "quantised":  # small drift (the float32 fast path's groups), with a few large jumps (its float64 groups)
        ref = torch.randn(n, v, generator=gen) * scale
        cand = ref + 0.02 * scale * torch.randn(n, v, generator=gen)
        cand[:, 7::997] += 3.0
    else:
        ref = torch.randn(n, v, generator=gen) * scale
        cand = ref + 0.3 * scale * torch.randn(n, v, generator=gen)
    if kind == "filtered":  # what top-k / top-p warpers leave; half the rows share the ref's -inf pattern
        ref[torch.rand(n, v, generator=gen) < 0.9] = -math.inf
        cand[torch.rand(n, v, generator=gen) < 0.9] = -math.inf
        cand[::2] = torch.where(ref[::2].isinf(), -math.inf, cand[::2])
    return torch.log_softmax(ref, -1).half().float(), torch.log_softmax(cand, -1).half().float()


def _stable_overlap(ref, cand, k):
    """top-k overlap with ties broken by lowest id (stable sort), and [B] bool: no tie straddles the k-th place."""
    lp, lq = metrics.normalize(ref), metrics.normalize(cand)
    (vp, a), (vq, b) = (torch.sort(x, dim=-1, descending=True, stable=True) for x in (lp, lq))
    clean = (vp[:, k - 1] != vp[:, k]) & (vq[:, k - 1] != vq[:, k])
    return (a[:, :k, None] == b[:, None, :k]).any(-1).double().mean(-1), clean


def _check(ref, cand, target, ks=(5, 10), atol=1e-12):
    """Every key: floats within rtol 1e-6 (atol for values ~0), ints and bools exact; top-k overlaps equal the
    stable (lowest id first) definition everywhere, and the reference where no tie straddles the k-th place."""
    want = metrics.position_metrics(ref, cand, target, ks)
    got = metrics_fused.fused_position_metrics(ref, cand, target, ks)
    assert list(got) == list(want)  # the same keys, in the same order (the order compare writes its columns in)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, key
        if key in EXACT:
            assert torch.equal(g, w), key
        elif key.endswith("_overlap"):
            stable, clean = _stable_overlap(ref, cand, int(key[3:-8]))
            assert torch.equal(g, stable) and torch.equal(g[clean], w[clean]), key
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=atol, equal_nan=False, msg=lambda m: f"{key}: {m}")
    return got, want


@pytest.mark.parametrize("kind", ["normal", "peaked", "near-uniform", "filtered", "quantised"])
def test_many_rows(kind):
    ref, cand = _rows(kind, 64, 5003, seed=1)
    target = torch.randint(0, 5003, (64,), generator=torch.Generator().manual_seed(2))
    _check(ref, cand, target)


@pytest.mark.parametrize("kind", ["normal", "peaked", "filtered", "quantised"])
def test_full_vocab(kind):
    ref, cand = _rows(kind, 3, WIDE, seed=3)
    target = torch.tensor([0, 17, WIDE - 1])
    _check(ref, cand, target)


def test_ties_lowest_id_wins():
    """Ties: argmax-based metrics are exact; top-k takes the lowest ids of a tie group (torch.topk's pick is unspecified)."""
    ref, cand = _rows("tied", 16, 5000, seed=4)
    target = torch.zeros(16, dtype=torch.long)
    _check(ref, cand, target, ks=(5, 10, 16))


@pytest.mark.parametrize("ks", [(17,), (5, 33, 64), (65, 128), (10, 129, 256)])
@pytest.mark.parametrize("kind", ["tied", "normal", "quantised"])
def test_large_top_k(kind, ks):
    """Lists past 16 (the fast path keeps K = max(ks) in TopK registers up to 128, in Big's key buffer beyond): the
    overlaps equal the stable definition (lowest id first among ties) at every k, top-1 and the rank exactly, on
    rows full of ties and on the fast path's drifts; the float64 kernel's lists agree."""
    ref, cand = _rows(kind, 6, 5000, seed=5)
    target = torch.randint(0, 5000, (6,), generator=torch.Generator().manual_seed(6))
    got, _ = _check(ref, cand, target, ks=ks)
    slow = metrics_fused.fused_position_metrics(ref, cand, target, ks, float64_only=True)
    for key in ("top1_agree", "ref_top_rank", *(f"top{k}_overlap" for k in ks)):
        assert torch.equal(got[key], slow[key]), key


def test_tiny_drift_kl_relative():
    """KL ~ 1e-7 nats: every divergence within 1e-6 relative, no absolute slack."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, WIDE, generator=gen) * 2
    ref = torch.log_softmax(logits, -1)
    cand = torch.log_softmax(logits + 4e-4 * torch.randn(4, WIDE, generator=gen), -1)
    got, want = _check(ref, cand, torch.zeros(4, dtype=torch.long))
    assert 1e-8 < float(want["kl"].min()) and float(want["kl"].max()) < 1e-6
    for key in ("kl", "kl_rev", "js", "tv"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")


def test_identical_rows_and_infinite_kl():
    ref, _ = _rows("normal", 4, 5000, seed=6)
    got, _ = _check(ref, ref.clone(), torch.zeros(4, dtype=torch.long))
    assert torch.equal(got["kl"], torch.zeros(4, dtype=torch.float64)) or float(got["kl"].max()) < 1e-14
    cand = ref.clone()
    cand[0, 10] = -math.inf  # q = 0 where p > 0: KL(p ‖ q) = +inf, KL(q ‖ p) finite
    ref2 = ref.clone()
    ref2[1, 20] = -math.inf
    got, _ = _check(torch.cat([ref[:1], ref2[1:2]]), torch.cat([cand[:1], ref[1:2]]), torch.zeros(2, dtype=torch.long))
    assert got["kl"][0] == math.inf and math.isfinite(got["kl_rev"][0])
    assert got["kl_rev"][1] == math.inf and math.isfinite(got["kl"][1])
    assert not any(bool(v.double().isnan().any()) for v in got.values())


def test_bad_arguments():
    """Arguments the kernel cannot take are a ValueError, raised before it reads them."""
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError):
        metrics_fused.fused_position_metrics(x, x[:, :4], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        metrics_fused.fused_position_metrics(x, x, torch.zeros(2, dtype=torch.long), ks=(9,))
    # each check on its own, every other argument valid (rows wider than the default ks, so that no other check fires
    # first): blocks of two widths, or one not on the CPU (the meta device; no rows, so that a missing check shows as
    # no error rather than as a read through a null pointer), from both entry points; top-k sizes of 0 or past MAX_K
    # (256: the kernel's lists); targets that are not one id per row. Each a ValueError naming what is wrong.
    x, zero = torch.zeros(2, 300), torch.zeros(2, dtype=torch.long)
    on_meta = torch.zeros(0, 300, device="meta")
    cpu = torch.zeros(0, 300)
    for a, b in ((x, x[:, :200]), (on_meta, cpu), (cpu, on_meta)):
        for path in (lambda a, b: metrics_fused.fused_position_metrics(a, b, torch.zeros(len(a), dtype=torch.long)),
                     metrics_fused.fused_sym_kl_top1):  # fmt: skip
            with pytest.raises(ValueError, match=r"takes two \[B, V\] CPU tensors"):
                path(a, b)
    for ks in ((257,), (0, 5), (5, 0)):
        with pytest.raises(ValueError, match=r"top-k sizes must be in \[1, 256\]"):
            metrics_fused.fused_position_metrics(x, x, zero, ks=ks)
    for target in (torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"targets must be \[2\] token ids"):
            metrics_fused.fused_position_metrics(x, x, target)


def test_the_smallest_arguments_allowed():
    """Top-1 lists alone (ks=(1,)), rows of two entries (the kernel's lists hold at least 2: here the whole row), and
    a block of no rows: every key as the float64 reference gives it (empty tensors of its dtypes for no rows), from
    both entry points (fused_sym_kl_top1 with a -inf entry in one narrow row: that row from the full kernel)."""
    ref, cand = _rows("normal", 8, 300, seed=31)
    target = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(32))
    _check(ref, cand, target, ks=(1,))
    ref, cand = _rows("normal", 8, 2, seed=33)
    _check(ref, cand, torch.tensor([0, 1] * 4), ks=(1,))
    cand[3, 1] = -math.inf  # a row for the full kernel (q = 0 where p > 0: inf)
    sym, top1 = metrics_fused.fused_sym_kl_top1(ref, cand)
    want, agree = _sym_exact(ref, cand)
    torch.testing.assert_close(sym, want, rtol=1e-6, atol=1e-12)
    assert torch.equal(top1, agree)
    ref, cand = _rows("normal", 0, 300, seed=34)
    _check(ref, cand, torch.zeros(0, dtype=torch.long))
    sym, top1 = metrics_fused.fused_sym_kl_top1(ref, cand)
    assert sym.shape == top1.shape == (0,) and sym.dtype == torch.float64 and top1.dtype == torch.bool


def test_defaults_are_position_metrics_defaults():
    """Called without ks, the fused path gives the torch reference's keys (top5 and top10 overlaps), in its order,
    with its values."""
    ref, cand = _rows("quantised", 4, 1000, seed=35)
    target = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(36))
    got, want = metrics_fused.fused_position_metrics(ref, cand, target), metrics.position_metrics(ref, cand, target)
    assert list(got) == list(want) and "top5_overlap" in got and "top10_overlap" in got
    for key in ("top5_overlap", "top10_overlap"):
        assert torch.equal(got[key], want[key]), key


def test_mixed_dtype_pairs_and_column_strided_blocks_go_in_as_float32_copies():
    """Pairs the kernel does not read as they are, a float16 reference with a float32 or bfloat16 candidate (the kernel
    reads 16-bit rows only as pairs of one dtype), float64 pairs, and blocks whose entries are not adjacent in memory
    (a transposed [V, B] block, every other column of a wider one, one column broadcast over a row: a uniform row):
    both entry points give, bit for bit, what contiguous float32 copies of the same numbers give."""
    ref, cand = _rows("quantised", 5, 4001, seed=37)
    ref = ref.half()
    target = torch.randint(0, 4001, (5,), generator=torch.Generator().manual_seed(38))
    pairs = [(ref, cand), (ref, cand.bfloat16()), (ref.double(), cand.double()), (ref.float().T.contiguous().T, cand.T.contiguous().T),
             (ref.repeat_interleave(2, 1)[:, ::2], cand.repeat_interleave(2, 1)[:, 1::2]), (ref.float()[:, :1].expand(-1, 4001), cand)]  # fmt: skip
    for a, b in pairs:
        want = metrics_fused.fused_position_metrics(a.float().contiguous(), b.float().contiguous(), target)
        got = metrics_fused.fused_position_metrics(a, b, target)
        assert all(torch.equal(got[k], want[k]) for k in want), (a.dtype, b.dtype, a.stride())
        sym, top1 = metrics_fused.fused_sym_kl_top1(a, b)
        sym_want, top1_want = metrics_fused.fused_sym_kl_top1(a.float().contiguous(), b.float().contiguous())
        assert torch.equal(sym, sym_want) and torch.equal(top1, top1_want), (a.dtype, b.dtype, a.stride())


def test_sym_kl_top1_without_the_avx512_copy_takes_the_full_kernel(monkeypatch):
    """Routing: where the kernel has no AVX-512 copy (pm_native() is 0, as in a portable build), fused_sym_kl_top1
    never calls sym_team (whose portable copy computes nothing) and gives fused_position_metrics' kl + kl_rev and
    top1_agree for every row, bit for bit, float32 and float16 pairs; within 1e-6 relative of float64. pm_team then
    gets float32 rows only (kind 0: the portable copy reads no 16-bit rows), 16-bit pairs converted first. Rows of two
    entries included."""
    lib = metrics_fused._lib()
    monkeypatch.setattr(lib, "pm_native", lambda: 0)

    def no_sym_team(*args):
        raise AssertionError("sym_team called where the kernel has no AVX-512 copy")

    real_pm_team, kinds = lib.pm_team, []

    def pm_team(x, y, kind, *rest):  # the real kernel (it reads 16-bit rows here), recording what it is given
        kinds.append(kind)
        return real_pm_team(x, y, kind, *rest)

    monkeypatch.setattr(lib, "sym_team", no_sym_team)
    monkeypatch.setattr(lib, "pm_team", pm_team)
    ref, cand = _rows("quantised", 5, 4001, seed=39)
    narrow = _rows("normal", 5, 2, seed=40)  # rows of two entries: as wide as the kernel's shortest lists
    for a, b in ((ref, cand), (ref.half(), cand.half()), narrow):
        sym, top1 = metrics_fused.fused_sym_kl_top1(a, b)
        full = metrics_fused.fused_position_metrics(a.float(), b.float(), torch.zeros(5, dtype=torch.int64), (2,))
        assert torch.equal(sym, full["kl"] + full["kl_rev"]) and torch.equal(top1, full["top1_agree"]), a.dtype
        want, agree = _sym_exact(a, b)
        torch.testing.assert_close(sym, want, rtol=1e-6, atol=0)
        assert torch.equal(top1, agree)
    assert len(kinds) == 6 and set(kinds) == {0}


def test_available_says_why_the_kernel_does_not_build(monkeypatch, tmp_path):
    """With no g++ on PATH (an empty folder for PATH), `available()` is the reason, in a line, not None
    (compare.position_metrics_fn reads it to fall back to the torch reference)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    metrics_fused._lib.cache_clear()
    try:
        why = metrics_fused.available()
    finally:
        metrics_fused._lib.cache_clear()  # the next call loads the real build again (the environment restored by then)
    assert why == "RuntimeError: the metrics_fused kernel needs g++ on PATH"


@pytest.mark.parametrize("shift", [0.0, 7.3])
def test_tiny_drift_realistic_rows(shift):
    """LM-shaped rows (hot tokens over a heavy tail), KL ~ 1e-9 nats as quantised models give: divergences within
    1e-6 relative, no absolute slack. shift > 0: unnormalised reference logits, normalisers far apart (float64 kernel)."""
    from harness import bench

    gen = torch.Generator().manual_seed(8)
    logits = bench.realistic_logits(4, WIDE, seed=9)
    ref = torch.log_softmax(logits, -1) if shift == 0 else logits + shift
    cand = torch.log_softmax(ref + 1e-4 * torch.randn(4, WIDE, generator=gen), -1)
    got, want = _check(ref, cand, torch.tensor([0, 1, 2, 3]))
    assert 1e-10 < float(want["kl"].min()) and float(want["kl"].max()) < 1e-7
    for key in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("shift", [0.004, 0.02, 0.3, 0.9])
@pytest.mark.parametrize("part", ["half", "whole"])
def test_unnormalised_rows_about_the_fast_paths_limit(shift, part):
    """Candidate rows left unnormalised (a shift added to half of the row, or to all of it), so the normalisers differ
    by |c| on both sides of the 0.01 up to which the float32 fast path takes a row: every key as the reference gives it."""
    from harness import bench

    gen = torch.Generator().manual_seed(12)
    ref = torch.log_softmax(bench.realistic_logits(4, WIDE, seed=11), -1)
    cand = ref + 1e-3 * torch.randn(ref.shape, generator=gen)
    cand[:, : WIDE // 2 if part == "half" else WIDE] += shift
    _check(ref, cand, torch.tensor([5, 6, 7, 8]), atol=0.0)


def test_fast_path_and_float64_kernel_agree():
    """The benchmark's rows (quantisation-sized drift): the float32 fast path and the float64 kernel both match the
    reference within 1e-6 relative, and differ from each other (so the fast path did run)."""
    from harness import bench

    if not metrics_fused._lib().pm_native():
        pytest.skip("a portable build: one scalar path for every row")

    ref = torch.log_softmax(bench.realistic_logits(8, WIDE, seed=1), -1)
    cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
    target = torch.randint(0, WIDE, (8,), generator=torch.Generator().manual_seed(3))
    want = metrics.position_metrics(ref, cand, target)
    fast = metrics_fused.fused_position_metrics(ref, cand, target)
    slow = metrics_fused.fused_position_metrics(ref, cand, target, float64_only=True)
    for key in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top", "nll_ref", "nll_cand", "entropy_ref", "entropy_cand"):
        for got in (fast, slow):
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(fast["kl"], slow["kl"])
    for key in ("top1_agree", "ref_top_rank"):
        assert torch.equal(fast[key], want[key]) and torch.equal(slow[key], want[key]), key


def test_rank_when_the_reference_top_is_far_down_the_candidate():
    """Near-flat, unrelated rows (fast path: every |x − y| tiny): the reference's top token sits far below the
    candidate's top-k list, so its rank is counted over the row; it must equal the reference's exactly."""
    gen = torch.Generator().manual_seed(11)
    ref = torch.log_softmax(1e-3 * torch.randn(6, 20000, generator=gen), -1)
    cand = torch.log_softmax(1e-3 * torch.randn(6, 20000, generator=gen), -1)
    got, want = _check(ref, cand, torch.arange(6))
    assert int(want["ref_top_rank"].min()) > 10


def _exact(ref, cand, target):
    """The metrics that stress a kernel's normalisers, in float64 from exactly rounded ln Z (math.fsum) and forms
    without cancellation (d = ln p − ln q): KL = Σ p·(expm1(−d) + d), KL_rev = Σ q·(expm1(d) − d),
    TV = ½ Σ p·|expm1(−d)|, JS = ¼ Σ (p + q)·(d·tanh(d/2) − 2·log1p(2 sinh²(d/4))), Δp = p·expm1(−d) at the target,
    NLLs, entropies. metrics.position_metrics (torch's float64 log_softmax, plain Σ p·d) is ~1e-14 off in ln Z and
    loses ~1e-13 in KL: at KL ~ 1e-10 or Δp ~ 1e-8 that is over 1e-6 relative."""

    def normalised(rows):
        x = rows.double()
        m = x.max(-1, keepdim=True).values
        lse = torch.tensor([math.log(math.fsum(row)) for row in (x - m).exp().numpy()], dtype=torch.float64)
        return x - m - lse[:, None]

    lp, lq = normalised(ref), normalised(cand)
    d, p, q = lp - lq, lp.exp(), lq.exp()
    psi = d * torch.tanh(d / 2) - 2 * torch.log1p(2 * torch.sinh(d / 4) ** 2)
    t = target[:, None]
    return {"kl": (p * (torch.expm1(-d) + d)).sum(-1), "kl_rev": (q * (torch.expm1(d) - d)).sum(-1),
            "tv": 0.5 * (p * torch.expm1(-d).abs()).sum(-1), "js": 0.25 * ((p + q) * psi).sum(-1),
            "delta_p": (p.gather(-1, t) * torch.expm1(-d.gather(-1, t)))[:, 0],
            "nll_ref": -lp.gather(-1, t)[:, 0], "nll_cand": -lq.gather(-1, t)[:, 0],
            "entropy_ref": -(p * lp).sum(-1), "entropy_cand": -(q * lq).sum(-1)}  # fmt: skip


@pytest.mark.parametrize("case", ["float64_only", "unnormalised", "-inf in both", "-inf in the reference", "-inf in the candidate", "far apart"])
def test_a_kl_of_1e_12_through_the_float64_kernel(case):
    """KL ~ 1e-13 to 1e-11 nats (float32 rows a few ulp apart) through the float64 kernel, which takes rows with -inf,
    unnormalised ones, and every row with float64_only: KL, KL_rev and JS within 1e-6 relative of _exact, no absolute
    slack. Summed as Σ p·d − (ln Z_p − ln Z_q), an error of 1e-16 in a normaliser moved KL by 1e-16 x 20: 7e-3
    relative at 2.4e-13. A column -inf in both rows: _exact of the rows without it. -inf in the reference's only:
    KL(p ‖ q) = KL(p ‖ q renormalised without it) − ln(1 − q_j), KL_rev +inf; in the candidate's only, the same the
    other way. Far apart: -inf in both and the reference's top 40 columns 1 nat apart (the kernel's |d| > 0.2 form beside the series)."""
    gen = torch.Generator().manual_seed(21)
    ref = torch.log_softmax(bench.realistic_logits(4, WIDE, seed=22), -1)
    cand = ref + 1e-6 * torch.randn(ref.shape, generator=gen)
    if case == "unnormalised":
        ref = ref + 2.5  # the normalisers 2.5 apart: not the fast path's
    target = torch.tensor([3, 4, 5, 6])
    if case == "-inf in both":
        ref[:, 100], cand[:, 100] = -torch.inf, -torch.inf
    if case == "-inf in the reference":
        ref[:, 100], cand[:, 100] = -torch.inf, ref[:, 0] - 30  # q_j ~ e^-30 of the top: KL stays tiny
    if case == "-inf in the candidate":
        ref[:, 100], cand[:, 100] = cand[:, 0] - 30, -torch.inf
    if case == "far apart":
        ref[:, 100], cand[:, 100] = -torch.inf, -torch.inf
        cand.scatter_add_(1, ref.topk(40, dim=-1).indices, torch.ones(4, 40))  # the reference's top 40, where its mass is
    got = metrics_fused.fused_position_metrics(ref, cand, target, float64_only=case == "float64_only")
    keep = torch.arange(WIDE) != 100
    want = _exact(ref[:, keep], cand[:, keep], target) if case.startswith("-inf") or case == "far apart" else _exact(ref, cand, target)
    keys = ("kl", "kl_rev", "js")
    if case == "-inf in the reference":
        lq = cand.double() - torch.logsumexp(cand.double(), -1, keepdim=True)
        want = {"kl": want["kl"] - torch.log1p(-lq[:, 100].exp())}
        keys = ("kl",)
        assert torch.isinf(got["kl_rev"]).all()
    if case == "-inf in the candidate":
        lp = ref.double() - torch.logsumexp(ref.double(), -1, keepdim=True)
        want = {"kl_rev": want["kl_rev"] - torch.log1p(-lp[:, 100].exp()), "kl": want["kl"]}
        keys = ("kl_rev",)
        assert torch.isinf(got["kl"]).all()
    tiny = want["kl_rev" if case == "-inf in the candidate" else "kl"]
    assert (1e-14 < float(tiny.min()) and float(tiny.max()) < 1e-10) if case != "far apart" else float(tiny.min()) > 1e-6
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("kind", ["tail-heavy", "confident"])
def test_float32_partial_sums(kind):
    """Rows that stress the fast path's sums. tail-heavy: every term but one sits just below e^-8 of the maximum (the
    line under which terms go into float32 partial sums), carrying ~97% of Z. confident: the top token holds all but
    ~1e-5 of the mass, so its NLL (~1e-5) and the entropy (~3e-4) show any error in Z's tail, and KL is ~1e-10.
    Everything within 1e-6 relative of _exact, no absolute slack."""
    gen = torch.Generator().manual_seed(12)
    if kind == "tail-heavy":
        logits = -8.2 + 0.1 * torch.rand(4, WIDE, generator=gen)
    else:
        logits = -25.0 + 2.0 * torch.randn(4, WIDE, generator=gen)
    logits[:, 1000] = 0.0
    ref = torch.log_softmax(logits, -1)
    cand = torch.log_softmax(logits + 2e-3 * torch.randn(4, WIDE, generator=gen), -1)
    target = torch.tensor([1000, 1000, 5, WIDE - 1])
    got, want = _check(ref, cand, target)
    if kind == "confident":
        assert float(want["nll_ref"][0]) < 1e-4 and float(want["kl"].max()) < 1e-9
    for key, w in _exact(ref, cand, target).items():
        torch.testing.assert_close(got[key], w, rtol=1e-6, atol=0.0, msg=lambda m: f"{key}: {m}")


def test_entropy_of_values_on_a_coarser_grid_than_the_maximum():
    """Every term of x − m rounding alike once biased ln Z by up to half an ulp of x: here the tail's values (x ~ −21,
    float32 steps of 1.9e-6) sit on a coarser grid than the row's maximum (~−1e-4), so the top token's NLL (~1e-4,
    the tail's share) and the entropies were off by up to 8e-7 relative, differently in each row. With the maximum
    rounded up to an integer, x − m is exact: within 1e-7 of _exact (the rest within 1e-6, and Δp, a difference of two
    probabilities near 1 that is ~1e-10 here, within 4.4e-16 absolute: two float64 ulps of 1, what the normalisers'
    own rounding leaves it; the scalar build, which a CPU without AVX-512 runs, was 2.2e-16 off, 1.2e-6 relative)."""
    gen = torch.Generator().manual_seed(13)
    logits = -22.0 + torch.rand(8, WIDE, generator=gen) + 0.13 * torch.arange(8)[:, None]
    logits[:, 77] = 0.0
    ref = torch.log_softmax(logits, -1)
    cand = torch.log_softmax(logits + 1e-3 * torch.randn(8, WIDE, generator=gen), -1)
    target = torch.full((8,), 77)
    got, _ = _check(ref, cand, target)
    for key, w in _exact(ref, cand, target).items():
        tight = key.startswith(("nll", "entropy"))
        atol = 4.4e-16 if key.startswith("delta_p") else 0.0
        torch.testing.assert_close(got[key], w, rtol=1e-7 if tight else 1e-6, atol=atol, msg=lambda m: f"{key}: {m}")


def test_a_block_of_rows_equals_its_rows_one_at_a_time():
    """The fast path scales each row by its largest entry, which it takes while reading the row before (or from a read
    of its own for a thread's first row, a 16-bit row, or a row after one that left the fast path). LM-shaped rows whose
    maxima differ, one with a -inf entry (the float64 kernel) among them, give bit for bit in one block, in float32 and
    in float16, what each row gives alone; and within 1e-6 of the float64 reference."""
    gen = torch.Generator().manual_seed(21)
    logits = bench.realistic_logits(7, 20011, seed=21) * torch.tensor([1.0, 0.6, 1.4, 1.0, 0.8, 1.2, 0.5])[:, None]
    ref = torch.log_softmax(logits, -1)
    cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=gen), -1)
    ref[3, 5] = -math.inf
    target = torch.randint(0, 20011, (7,), generator=gen)
    for a, b in ((ref, cand), (ref.half(), cand.half())):
        got = metrics_fused.fused_position_metrics(a, b, target)
        for i in range(7):
            one = metrics_fused.fused_position_metrics(a[i : i + 1], b[i : i + 1], target[i : i + 1])
            assert all(torch.equal(got[k][i : i + 1], one[k]) for k in one), i
    _check(ref, cand, target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_rows_as_stored(dtype):
    """float16 / bfloat16 pairs (a store's rows, memory-mapped) go into the kernel as they are: the same numbers, bit
    for bit, as their float32 conversions, over a width that is not a multiple of 16 and a non-contiguous block."""
    ref, cand = _rows("quantised", 9, 5003, seed=14)
    a, b = ref.to(dtype), cand.to(dtype)
    target = torch.randint(0, 5003, (9,), generator=torch.Generator().manual_seed(15))
    got = metrics_fused.fused_position_metrics(a, b, target)
    want = metrics_fused.fused_position_metrics(a.float(), b.float(), target)
    assert all(torch.equal(got[k], want[k]) for k in want)
    wide = torch.cat([a, b], 1)  # rows with a stride of 2 x 5003
    strided = metrics_fused.fused_position_metrics(wide[:, :5003], wide[:, 5003:], target)
    assert all(torch.equal(strided[k], want[k]) for k in want)


def _family(kind, n, v, gen):
    """[n, v] logits of one adversarial shape for the kernel's paths and sums."""
    if kind == "lm":  # a body and a few hot tokens
        x = torch.randn(n, v, generator=gen) * 2.5
        hot = torch.randint(0, v, (n, 5), generator=gen)
        return x.scatter_(1, hot, x.gather(1, hot) + 12)
    x = -20 + torch.randn(n, v, generator=gen)
    if kind == "confident-first":
        x[:, 0] = 0.0
    elif kind == "confident-last":  # the top token in the last, partial group
        x[:, -1] = 0.0
    elif kind == "two-peaks":
        x[:, 3], x[:, v // 2] = 0.0, -0.5
    elif kind == "steps":  # integer logits: ties everywhere, identical entries after float16 rounding
        x = torch.randint(-30, 0, (n, v), generator=gen).float()
    elif kind == "rising":  # the running maximum keeps rising, block after block
        x = torch.linspace(-40, 0, v).repeat(n, 1) + 0.1 * torch.randn(n, v, generator=gen)
    return x


@pytest.mark.parametrize("stored", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("drift", [1e-4, 0.05, 0.5, 3.0])
@pytest.mark.parametrize("kind", ["lm", "confident-first", "confident-last", "two-peaks", "steps", "rising"])
def test_row_families_against_exact(kind, drift, stored):
    """Row shapes that stress the fast path (running maximum, ties, the row's last partial group, peaks in other
    blocks), at widths of 40 and 5003, with drift from quantisation-sized (every |x − y| <= 0.2: the float32 series)
    to far apart (the medium path's exps and the float64 kernel), against _exact: within 1e-6 relative, or 1e-14
    absolute where a value is itself near float64's resolution for sums of terms ~1 (a KL of 1e-17, a Δp of 1e-21)."""
    gen = torch.Generator().manual_seed(16)
    for v in (40, 5003):
        x = _family(kind, 16, v, gen)
        ref = torch.log_softmax(x, -1).to(stored)
        cand = torch.log_softmax(x + drift * torch.randn(16, v, generator=gen), -1).to(stored)
        target = torch.randint(0, v, (16,), generator=gen)
        target[0] = int(ref[0].float().argmax())
        # rows 1-3: the token among the reference's top 20 where p and q are closest (Δp small against q: it shows
        # any error of c, the normalisers' difference, magnified)
        top = ref[1:4].float().topk(min(20, v), dim=-1).indices
        gap = (ref[1:4].float().gather(1, top) - cand[1:4].float().gather(1, top)).abs()
        target[1:4] = top.gather(1, gap.argmin(1, keepdim=True))[:, 0]
        got, _ = _check(ref, cand, target, atol=1e-14)
        for key, w in _exact(ref.float(), cand.float(), target).items():
            torch.testing.assert_close(got[key], w, rtol=1e-6, atol=1e-14, msg=lambda m: f"{key}, width {v}: {m}")


def test_metrics_bench_prints_its_table_and_json_line(capsys):
    """The benchmark's run, small: every implementation timed, fractions against the higher of two ceilings."""
    import json

    from harness import metrics_bench

    assert metrics_bench.main(["--rows", "2", "--repeats", "1", "--ceiling-gib", "0.05"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert out[0].startswith("read ceiling") and len(last["read_ceilings_gbps"]) == 2 and len(last["near_read_gbps"]) == 5
    assert last["read_ceiling_gbps"] == max(last["read_ceilings_gbps"] + last["near_read_gbps"])
    got = {r["impl"]: r for r in last["results"]}
    assert list(got) == ["dict", "position_metrics", "fused", "fused (float16 rows)"]
    for j, r in enumerate(got.values()):  # each against the better of the probes before and after it
        assert r["near_read_gbps"] == max(last["near_read_gbps"][j : j + 2])
        assert r["best_positions_per_s"] >= r["positions_per_s"] > 0
        assert r["fraction_of_ceiling"] == pytest.approx(r["gbps"] / r["near_read_gbps"])
        assert r["fraction_of_run_ceiling"] == pytest.approx(r["gbps"] / last["read_ceiling_gbps"])
        assert r["best_fraction_of_ceiling"] >= r["fraction_of_ceiling"]
    assert got["fused"]["gbps"] == pytest.approx(got["fused"]["positions_per_s"] * 2 * 151646 * 4 / 1e9)


def _sym_exact(ref, cand):
    """KL(ref ‖ cand) + KL(cand ‖ ref) in float64 (both renormalised) and top-1 agreement (torch.argmax: the first
    of tied maxima)."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1), ref.double().argmax(-1) == cand.double().argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [5003, WIDE])
def test_sym_kl_top1_against_float64(dtype, width):
    """The all-pairs matrix's path: symmetric KL within 1e-6 relative of float64 at every drift from none to
    unrelated rows (J from 1e-11 to ~65 nats), and top-1 agreement exact, first of tied maxima included; stored-style
    rows of each dtype, a width with a tail of 11 entries and Qwen's."""
    from harness import bench

    gen = torch.Generator().manual_seed(9)
    base = bench.realistic_logits(6, width, seed=4)
    pairs = [base + s * torch.randn(base.shape, generator=gen) for s in (1e-4, 1e-2, 0.3, 2.0)]
    pairs.append(2 * bench.realistic_logits(6, width, seed=5))  # unrelated rows, twice as sharp
    ref = torch.log_softmax(base.repeat(len(pairs), 1), -1)
    cand = torch.log_softmax(torch.cat(pairs), -1)
    top = ref.max(-1).values
    ref[0, [5, 9]] = top[0]  # tied maxima: argmax 5 against the candidate's 9
    cand[0, 9], cand[0, 5] = cand[0].max() + 1, cand[0].min()
    ref[1, [width - 3, width - 1]] = top[1] + 0.5  # tied in the tail, matched by the candidate
    cand[1, [width - 3, width - 1]] = cand[1].max() + 0.5
    ref, cand = ref.to(dtype), cand.to(dtype)
    sym, top1 = metrics_fused.fused_sym_kl_top1(ref, cand)
    want, agree = _sym_exact(ref, cand)
    assert sym.dtype == torch.float64 and top1.dtype == torch.bool
    torch.testing.assert_close(sym, want, rtol=1e-6, atol=0)
    assert torch.equal(top1, agree) and not top1[0] and top1[1]
    assert float(want.min()) < 1e-7 and float(want.max()) > 50  # the range the rows were built to span
    same, agree = metrics_fused.fused_sym_kl_top1(ref, ref)
    assert torch.equal(same, torch.zeros_like(same)) and bool(agree.all())


def test_sym_kl_top1_non_finite_rows_take_the_full_kernel():
    """-inf, +inf or NaN anywhere in a pair: the full kernel's kl + kl_rev and top1_agree (inf where one side has a
    token the other gives probability 0), the other rows from the symmetric-KL path. (Stores hold no NaN: extraction
    refuses NaN logits.)"""
    ref, cand = _rows("normal", 5, 4000, seed=3)
    cand[1, 7] = -math.inf  # q = 0 where p > 0: KL(ref ‖ cand) = inf
    ref[2, 11] = -math.inf
    cand[2, 11] = -math.inf  # both 0 there: finite
    sym, top1 = metrics_fused.fused_sym_kl_top1(ref, cand)
    full = metrics_fused.fused_position_metrics(ref, cand, torch.zeros(5, dtype=torch.int64), (2,))
    torch.testing.assert_close(sym, full["kl"] + full["kl_rev"], rtol=1e-6, atol=0)
    assert torch.equal(top1, full["top1_agree"])
    assert math.isinf(sym[1]) and math.isfinite(sym[2]) and math.isfinite(sym[0])


def _checking_path(fn: str):
    """One of the three paths that check rows for NaN and +inf, called as path(ref, cand)."""
    return {
        "fused": lambda a, b: metrics_fused.fused_position_metrics(a, b, torch.arange(len(a))),
        "sym": metrics_fused.fused_sym_kl_top1,
        "torch": lambda a, b: metrics.position_metrics(a, b, torch.arange(len(a))),
    }[fn]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", ["fused", "sym", "torch"])
def test_nan_and_plus_inf_rows_raise_naming_them(fn, dtype):
    """NaN or +inf anywhere in a row (first entry, the middle, the last of a ragged width; in rows the fast path would
    take and in one with -inf entries) raises BadRowsError naming each side's rows, from every path and dtype; -inf
    alone does not."""
    ref, cand = _rows("quantised", 9, WIDE, seed=11)
    ref[1, 0] = math.nan
    cand[2, WIDE - 1] = math.nan
    cand[4, 70001] = math.inf
    ref[6, 3] = -math.inf
    ref[7, 9] = math.nan
    ref[7, 10] = -math.inf
    cand[7, 12] = math.inf
    run = _checking_path(fn)
    with pytest.raises(metrics.BadRowsError, match=r"reference rows \[1, 7\] and candidate rows \[2, 4, 7\]") as info:
        run(ref.to(dtype), cand.to(dtype))
    assert (info.value.ref_rows, info.value.cand_rows) == ([1, 7], [2, 4, 7])
    keep = torch.tensor([0, 3, 5, 6, 8])  # the same rows without those: finite results
    out = run(ref[keep].to(dtype), cand[keep].to(dtype))
    kl = out["kl"] if isinstance(out, dict) else out[0]
    assert not kl.isnan().any()


@pytest.mark.parametrize("fn", ["fused", "sym", "torch"])
def test_a_bad_row_on_one_side_only_is_named_on_that_side(fn):
    """NaN in a reference row alone, or +inf in a candidate row alone, is an error naming that side's row and no row of
    the other (a check of one side only would let a corrupt reference store through: KL 1 nat, JS 0, from NaN)."""
    ref = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(2)), -1)
    run = _checking_path(fn)
    bad = ref.clone()
    bad[1, 7] = math.nan
    with pytest.raises(metrics.BadRowsError) as info:
        run(bad, ref.clone())
    assert (info.value.ref_rows, info.value.cand_rows) == ([1], [])
    bad = ref.clone()
    bad[2, 49] = math.inf
    with pytest.raises(metrics.BadRowsError) as info:
        run(ref.clone(), bad)
    assert (info.value.ref_rows, info.value.cand_rows) == ([], [2])


def test_a_long_tie_below_a_clear_top_token_takes_the_lowest_ids():
    """One clear top token, then 299 tied at the next value, at other columns in each of 20 rows: the tie runs past
    the k + 64 values torch.topk fetched, so the top-5 must look at each row whole to take the tie's 4 lowest ids (by
    hand: sorted; topk's own pick among the tied was not those in a quarter of such rows). Both paths give those ids'
    overlap: where half the tie drops a little in the candidate, its top 5 are the other half's lowest."""
    rows = 20
    x, all_cols = tied_below_a_top(rows, 151646, torch.Generator().manual_seed(3), torch.float64)
    cand = x.clone()
    want, overlap = [], []
    for r, cols in enumerate(all_cols):
        cand[r, cols[1:150]] = -3.5
        want.append(sorted([int(cols[0])] + sorted(cols[1:].tolist())[:4]))
        overlap.append(len(set(want[-1]) & {int(cols[0]), *sorted(cols[150:].tolist())[:4]}) / 5)
    lp = metrics.normalize(x)
    assert [sorted(row.tolist()) for row in metrics.top_ids(lp, lp.topk(6), 5)] == want
    target = torch.zeros(rows, dtype=torch.int64)
    fused = metrics_fused.fused_position_metrics(x.float(), cand.float(), target, (5,))
    plain = metrics.position_metrics(x.float(), cand.float(), target, ks=(5,))
    assert fused["top5_overlap"].tolist() == plain["top5_overlap"].tolist() == overlap


def test_sym_kl_top1_unnormalised_rows():
    """Rows are renormalised, so shifting one changes nothing; a candidate entry over 80 nats above the reference's
    maximum (where exp(y − max x) would overflow float32) goes to the full kernel."""
    ref, cand = _rows("normal", 4, 4000, seed=5)
    want, agree = _sym_exact(ref, cand)
    for shift in (-30.0, -100.0):
        sym, top1 = metrics_fused.fused_sym_kl_top1(ref + shift, cand)
        torch.testing.assert_close(sym, want, rtol=1e-6, atol=0)
        assert torch.equal(top1, agree)


@pytest.mark.parametrize("bad", [-1, 300])
def test_a_target_outside_the_row_is_refused_before_the_kernel_reads_it(bad):
    """The kernel reads x[t] and y[t] of each row's target unchecked: a target id outside [0, V) (a store written with
    another vocabulary's ids, say) must be a ValueError, not a read past the row (garbage Δp and NLL, or a crash)."""
    ref = torch.log_softmax(torch.randn(4, 300), -1)
    target = torch.tensor([0, 5, bad, 7])
    with pytest.raises(ValueError, match=r"targets must be \[4\] token ids in \[0, 300\)"):
        metrics_fused.fused_position_metrics(ref, ref, target)
