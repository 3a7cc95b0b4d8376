"""The fused kernel against metrics.position_metrics (float64 torch): floats within rtol 1e-6, the rest exact."""

import math

import pytest
import torch

from harness import metrics, metrics_fused

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
    assert got.keys() == want.keys()
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
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError):
        metrics_fused.fused_position_metrics(x, x[:, :4], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        metrics_fused.fused_position_metrics(x, x, torch.zeros(2, dtype=torch.long), ks=(9,))


@pytest.mark.parametrize("shift", [0.0, 7.3])
def test_tiny_drift_realistic_rows(shift):
    """LM-shaped rows (hot tokens over a heavy tail), KL ~ 1e-8 nats as quantised models give: divergences within
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


def test_fast_path_and_float64_kernel_agree():
    """The benchmark's rows (quantisation-sized drift): the float32 fast path and the float64 kernel both match the
    reference within 1e-6 relative, and differ from each other (so the fast path did run)."""
    from harness import bench

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
