"""compare() over real on-disk stores: streamed metrics equal a one-shot float64 computation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, rel_entr

from harness import align, compare
from harness.store import Store


def _store(root, logp: torch.Tensor, target: torch.Tensor, prompt: torch.Tensor, cuts: tuple[int, ...] = ()) -> Store:
    """A float16 store of these rows, one shard, or one between each two of `cuts` (row indices)."""
    store = Store(root)
    n = len(logp)
    edges = [0, *cuts, n]
    for shard, (a, b) in enumerate(zip(edges, edges[1:])):
        store.write_shard(shard, {
            "logprobs": logp[a:b].half(), "target": target[a:b], "prompt": prompt[a:b], "position": torch.arange(a, b),
            "pad_mass": torch.zeros(b - a), "warp_finite": torch.full((b - a,), logp.shape[1], dtype=torch.int32),
            "warp_mass": torch.ones(b - a),
        }, {})  # fmt: skip
    return store


def test_compare_streams_blocks_and_counts_infinite_kl(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, v = 70, 3000  # several blocks of compare.BLOCK rows
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    cand = torch.log_softmax(ref + 0.1 * torch.randn(n, v, generator=gen), -1)
    cand[5, ref[5].argmax()] = -torch.inf  # the candidate filtered out the reference's top token
    ref[6, cand[6].argmax()] = -torch.inf  # and the reference the candidate's: an infinite reverse KL
    target = torch.randint(0, v, (n,), generator=gen)
    prompt = torch.arange(n) // 10
    a = _store(tmp_path / "a", ref, target, prompt)
    b = _store(tmp_path / "b", cand, target, prompt)
    result = compare.compare("ref", a, "cand", b, ks=(5,), resamples=100, smoothing_eps=1e-6)
    agg = result.aggregates
    assert agg["positions"] == n and agg["kl_inf"] == 1 and math.isinf(agg["kl_mean"])
    assert agg["kl_rev_inf"] == 1 and math.isinf(result.positions["kl_rev"][6])
    P = np.exp(ref.half().double().numpy())
    P /= P.sum(-1, keepdims=True)
    Q = np.exp(cand.half().double().numpy())
    Q /= Q.sum(-1, keepdims=True)
    exact = rel_entr(P, Q).sum(-1)
    finite = np.isfinite(exact)
    np.testing.assert_allclose(result.positions["kl"][finite], exact[finite], rtol=1e-6)
    assert np.isfinite(result.positions["kl_smoothed"]).all() and agg["kl_smoothed_inf"] == 0
    # the ε-smoothed stand-ins, by hand: KL(p ‖ (1 − ε)q + ε/V) at row 5, KL(q ‖ (1 − ε)p + ε/V) at row 6
    eps = 1e-6
    assert result.positions["kl_smoothed"][5] == pytest.approx(rel_entr(P[5], (1 - eps) * Q[5] + eps / v).sum(), rel=1e-6)
    assert result.positions["kl_rev_smoothed"][6] == pytest.approx(rel_entr(Q[6], (1 - eps) * P[6] + eps / v).sum(), rel=1e-6)
    assert np.isfinite(result.positions["kl_rev_smoothed"]).all() and agg["kl_rev_smoothed_inf"] == 0
    exact_rev = rel_entr(Q, P).sum(-1)
    np.testing.assert_allclose(result.positions["kl_rev"][np.isfinite(exact_rev)], exact_rev[np.isfinite(exact_rev)], rtol=1e-6)
    same = np.isfinite(exact) & np.isfinite(exact_rev)  # elsewhere the smoothed values are the plain ones
    assert (result.positions["kl_smoothed"][same] == result.positions["kl"][same]).all()
    assert (result.positions["kl_rev_smoothed"][same] == result.positions["kl_rev"][same]).all()
    assert len(result.prompts) == 7 and sum(p["positions"] for p in result.prompts) == n


@pytest.mark.parametrize("fused", [True, False])
def test_every_pair_reports_the_same_reference_columns(tmp_path, monkeypatch, fused):
    """The reference-side per-position metrics (and so PPL(base), the reference's entropy and its confidence bins)
    are one set per run, whatever the candidate: here one candidate sends some rows to the fused kernel's float64
    path (a -inf) and the other does not. They equal a float64 computation by hand, to float64's rounding, on the
    fused kernel's path and the torch one."""
    _kernel_on_or_off(monkeypatch, compare.metrics_fused, fused)
    gen = torch.Generator().manual_seed(1)
    n, v = 40, 3000
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    mild = torch.log_softmax(ref + 0.05 * torch.randn(n, v, generator=gen), -1)
    harsh = mild.clone()
    harsh[::3, 7] = -torch.inf
    target = torch.randint(0, v, (n,), generator=gen)
    prompt = torch.arange(n) // 10
    a = _store(tmp_path / "a", ref, target, prompt)
    own = compare.reference_columns(a)
    results = [compare.compare("ref", a, name, _store(tmp_path / name, c, target, prompt), ks=(5,), resamples=10, ref_columns=own)
               for name, c in (("mild", mild), ("harsh", harsh))]  # fmt: skip
    for key in compare.REFERENCE_COLUMNS:
        assert (results[0].positions[key] == results[1].positions[key]).all(), key
    for key in ("ppl_ref", "entropy_ref_mean"):
        assert results[0].aggregates[key] == results[1].aggregates[key], key
    lp = ref.half().double()
    lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    top2 = lp.exp().topk(2, dim=-1).values
    # in float64 (the pairs' fast path is ~1e-9 off)
    np.testing.assert_allclose(own["nll_ref"], -lp.gather(1, target[:, None]).squeeze(1).numpy(), rtol=1e-11)
    np.testing.assert_allclose(own["entropy_ref"], -(lp.exp() * lp).sum(-1).numpy(), rtol=1e-11)
    np.testing.assert_allclose(own["p_top_ref"], top2[:, 0].numpy(), rtol=1e-11)
    np.testing.assert_allclose(own["margin_ref"], (top2[:, 0] - top2[:, 1]).numpy(), rtol=1e-11, atol=1e-15)


def test_a_candidate_that_is_the_reference_has_its_perplexity_exactly(tmp_path):
    """The reference's columns come from its float64 pass, the candidate's NLL from the pair's kernel (~1e-9 off where
    it takes the float32 path): the candidate's NLL is the reference's plus the pair's own difference, so a model
    against itself (a user's first sanity check) gives PPL ratio 1 and ln ratio 0 exactly (it gave 1 + 7e-11), and a
    real pair's NLL still matches a float64 computation by hand."""
    gen = torch.Generator().manual_seed(2)
    n, v = 40, 3000
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    near = torch.log_softmax(ref + 0.05 * torch.randn(n, v, generator=gen), -1)
    target = torch.randint(0, v, (n,), generator=gen)
    prompt = torch.arange(n) // 10
    a = _store(tmp_path / "a", ref, target, prompt)
    own = compare.reference_columns(a)
    same = compare.compare("ref", a, "same", a, ks=(5,), resamples=10, ref_columns=own)
    agg = same.aggregates
    assert (same.positions["nll_cand"] == same.positions["nll_ref"]).all()
    assert (agg["ppl_ratio"], agg["ln_ppl_ratio"], agg["ppl_diff"], agg["kl_mean"]) == (1.0, 0.0, 0.0, 0.0)
    assert agg["ppl_cand"] == agg["ppl_ref"] and agg["top1_agree"] == 1.0
    other = compare.compare("ref", a, "near", _store(tmp_path / "b", near, target, prompt), ks=(5,), resamples=10, ref_columns=own)
    lq = near.half().double()
    lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    np.testing.assert_allclose(other.positions["nll_cand"], -lq.gather(1, target[:, None]).squeeze(1).numpy(), rtol=1e-8)


def test_a_next_token_the_reference_gives_probability_0_keeps_the_candidates_perplexity(tmp_path):
    """Where the reference's row is -inf at the next token (its NLL +inf), the candidate's NLL is its own, not the
    reference's plus the pair's difference (inf − inf = NaN, which made PPL(Q) and the ratio NaN): PPL(Q) equals a
    float64 computation by hand, PPL(base) and ln(PPL ratio) are +inf."""
    gen = torch.Generator().manual_seed(3)
    n, v = 20, 500
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    cand = torch.log_softmax(ref + 0.1 * torch.randn(n, v, generator=gen), -1)
    target = torch.randint(0, v, (n,), generator=gen)
    ref[3, target[3]] = -torch.inf
    prompt = torch.arange(n) // 5
    a = _store(tmp_path / "a", ref, target, prompt)
    got = compare.compare("ref", a, "cand", _store(tmp_path / "b", cand, target, prompt), ks=(5,), resamples=0,
                          ref_columns=compare.reference_columns(a))  # fmt: skip
    lq = cand.half().double()
    nll_q = -(lq - torch.logsumexp(lq, -1, keepdim=True)).gather(1, target[:, None]).squeeze(1).numpy()
    assert not np.isnan(got.positions["nll_cand"]).any()
    np.testing.assert_allclose(got.positions["nll_cand"], nll_q, rtol=1e-8)
    assert got.aggregates["ppl_cand"] == pytest.approx(math.exp(nll_q.mean()), rel=1e-8)
    assert got.aggregates["ppl_ref"] == math.inf and got.aggregates["ln_ppl_ratio"] == -math.inf


def test_misaligned_stores_are_refused(tmp_path):
    logp = torch.log_softmax(torch.randn(4, 10), -1)
    a = _store(tmp_path / "a", logp, torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.long))
    b = _store(tmp_path / "b", logp, torch.tensor([1, 2, 3, 5]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(compare.CompareError, match="stores of 'a' and 'b' do not hold the same token positions"):
        compare.compare("a", a, "b", b)
    with pytest.raises(compare.CompareError, match="stores of 'a' and 'b' do not hold the same token positions"):
        compare.matrix({"a": a, "b": b}, [])


def _kernel_on_or_off(monkeypatch, module, on: bool) -> None:
    """Turns a compiled kernel's module off (compare then takes the torch path), or skips where it does not build."""
    if not on:
        monkeypatch.setattr(module, "available", lambda: "off for this test")
    elif module.available() is not None:
        pytest.skip(f"{module.__name__} kernel: {module.available()}")


@pytest.mark.parametrize("fused", [True, False])
def test_nan_in_a_store_is_a_clear_error(tmp_path, monkeypatch, fused):
    """A store with NaN log-probs (extraction never writes one) stops compare and the all-pairs matrix with an error
    naming the store's folder and the positions, on the fused and the torch path."""
    _kernel_on_or_off(monkeypatch, compare.metrics_fused, fused)
    gen = torch.Generator().manual_seed(4)
    n, v = compare.FUSED_BLOCK + 6, 3000
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    cand = ref.clone()
    cand[compare.FUSED_BLOCK + 2, 17] = math.nan  # in the second block of either path
    target, prompt = torch.zeros(n, dtype=torch.long), torch.arange(n) // 10
    a = _store(tmp_path / "a", ref, target, prompt)
    b = _store(tmp_path / "b", cand, target, prompt)
    row = compare.FUSED_BLOCK + 2
    want = rf"store of 'cand' \({re.escape(str(tmp_path / 'b'))}\) holds NaN or \+inf log-probs at row {row} \(prompt {row // 10}, token {row}\)\. Extraction"
    with pytest.raises(compare.CompareError, match=want):
        compare.compare("ref", a, "cand", b, resamples=0)
    with pytest.raises(compare.CompareError, match=want.replace("cand", "b")):
        compare.matrix({"a": a, "b": b}, [])
    with pytest.raises(compare.CompareError, match=want.replace("cand", "b")):
        compare.matrix({"b": b, "a": a}, [])  # the store with NaN on the pair's reference side


@pytest.mark.parametrize("fused", [True, False])
def test_top_tokens(tmp_path, monkeypatch, fused):
    """Each position's top 5 ids and renormalised probabilities, over several blocks (a short first shard, so that a
    later block is longer than the first), with ties in the float16 store (the lowest id first): equal to a float64
    sort of the stored rows, probabilities within 1e-6 relative."""
    _kernel_on_or_off(monkeypatch, compare.row_stats, fused)
    gen = torch.Generator().manual_seed(3)
    n, v = compare.FUSED_BLOCK + 9, 4000
    logits = torch.randn(n, v, generator=gen) * 4
    logits[:, 100:104] = logits.max(-1, keepdim=True).values + 1.0  # a four-way tie at the top
    logp = torch.log_softmax(logits, -1)
    store = _store(tmp_path / "s", logp, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), cuts=(7,))
    assert [len(b) for b in store.blocks(compare.FUSED_BLOCK, renormalise=False)] == [7, compare.FUSED_BLOCK, 2]
    ids, probs = compare.top_tokens(store)  # the top 5 by default
    assert (ids.dtype, probs.dtype, ids.shape, probs.shape) == (np.int32, np.float32, (n, 5), (n, 5))
    stored = torch.log_softmax(logp.half().double(), -1)
    values, order = torch.sort(stored, dim=-1, descending=True, stable=True)
    if fused:  # torch.topk (the fallback) picks inside a tie group as it likes
        np.testing.assert_array_equal(ids, order[:, :5].numpy())
        assert (ids[:, :4] == np.arange(100, 104)).all()
    np.testing.assert_allclose(probs, values[:, :5].exp().numpy(), rtol=1e-6)


def _logit_store(root, logits, target):
    store = Store(root)
    n, v = logits.shape
    store.write_shard(0, {
        "logprobs": torch.log_softmax(logits, -1).half(), "target": target, "prompt": torch.zeros(n, dtype=torch.long),
        "position": torch.arange(n), "pad_mass": torch.zeros(n), "warp_finite": torch.full((n,), v, dtype=torch.int32),
        "warp_mass": torch.ones(n),
    }, {})  # fmt: skip
    return store


def test_bits_per_byte_and_its_standard_error_over_few_spans(tmp_path):
    """bits_per_byte over 3 spans (so the ratio estimator's n/(n−1) is 1.5, not the ~1.00 of a real run's hundreds,
    which a bootstrap within 20% cannot see): each side's NLL (the stored float16 row's float64 logsumexp − the target's log-prob) summed per
    span, bpb = Σ NLL / Σ bytes / ln 2, and se(bpb_diff) = √(n/(n−1) · Σ (D_s − R·B_s)²) / Σ B / ln 2, R = ΣD/ΣB."""
    gen = torch.Generator().manual_seed(2)
    n, v = 9, 50
    logits = {side: torch.randn(n, v, generator=gen) * 2 for side in ("ref", "cand")}
    target = torch.randint(0, v, (n,), generator=gen)
    stores = {side: _logit_store(tmp_path / side, x, target) for side, x in logits.items()}
    ref_rows, ref_span = np.array([1, 2, 3, 4, 5, 6, 7]), np.array([0, 0, 1, 1, 1, 2, 2])
    cand_rows, cand_span = np.array([1, 3, 4, 6, 8]), np.array([0, 1, 1, 2, 2])
    span_bytes = np.array([5, 11, 7])
    al = align.PairAlignment(torch.tensor([]), torch.tensor([]), None, n, 0, ref_rows, ref_span, cand_rows, cand_span, span_bytes)
    got = compare.bits_per_byte(stores["ref"], stores["cand"], al)
    stored = {side: torch.log_softmax(x, -1).half().double() for side, x in logits.items()}
    nll = {side: (torch.logsumexp(s, -1) - s[torch.arange(n), target]).numpy() for side, s in stored.items()}
    per_span = {side: np.array([sum(nll[side][r] for r, s in zip(rows, spans) if s == k) for k in range(3)])
                for side, rows, spans in (("ref", ref_rows, ref_span), ("cand", cand_rows, cand_span))}  # fmt: skip
    B, D = span_bytes.sum(), per_span["cand"] - per_span["ref"]
    R = D.sum() / B
    assert got["bpb_ref"] == pytest.approx(per_span["ref"].sum() / B / math.log(2), rel=1e-6)
    assert got["bpb_cand"] == pytest.approx(per_span["cand"].sum() / B / math.log(2), rel=1e-6)
    assert got["bpb_diff"] == pytest.approx(R / math.log(2), rel=1e-6)
    assert got["bpb_diff_se"] == pytest.approx(math.sqrt(3 / 2 * ((D - R * span_bytes) ** 2).sum()) / B / math.log(2), rel=1e-6)
    assert (got["bpb_spans"], got["bpb_bytes"]) == (3, 23)
    one = align.PairAlignment(torch.tensor([]), torch.tensor([]), None, n, 0, ref_rows[:2], ref_span[:2], cand_rows[:1], cand_span[:1], span_bytes[:1])
    alone = compare.bits_per_byte(stores["ref"], stores["cand"], one)
    assert alone["bpb_spans"] == 1 and math.isfinite(alone["bpb_diff"]) and math.isnan(alone["bpb_diff_se"])  # one span: no spread (it gave 0)
    two = align.PairAlignment(torch.tensor([]), torch.tensor([]), None, n, 0, ref_rows[:5], ref_span[:5], cand_rows[:3], cand_span[:3], span_bytes[:2])
    assert math.isfinite(compare.bits_per_byte(stores["ref"], stores["cand"], two)["bpb_diff_se"])  # two spans: a spread
    none = align.PairAlignment(torch.tensor([]), torch.tensor([]), None, n, 0, ref_rows[:0], ref_span[:0], cand_rows[:0], cand_span[:0], span_bytes[:0])
    assert compare.bits_per_byte(stores["ref"], stores["cand"], none) == {"bpb_spans": 0, "bpb_bytes": 0}


@pytest.mark.parametrize("fused", [True, False])
def test_matrix_rows_of_compared_pairs_against_float64(tmp_path, monkeypatch, fused):
    """The all-pairs matrix takes a (reference, variant) row from that pair's aggregates: its symmetric KL must be
    KL(a ‖ b) + KL(b ‖ a), as the rows it computes are. Against float64 scipy on the stored rows, for a pair whose
    two directions differ (a peaked candidate), both for the row taken from `known` and for one computed afresh, on
    the fused kernel's symmetric-KL path and the torch one."""
    _kernel_on_or_off(monkeypatch, compare.metrics_fused, fused)
    if not fused:  # nor its symmetric-KL entry point
        monkeypatch.setattr(compare.metrics_fused, "fused_sym_kl_top1", None)
    gen = torch.Generator().manual_seed(11)
    n, v = 70, 400
    base = torch.randn(n, v, generator=gen) * 2
    rows = {"ref": torch.log_softmax(base, -1), "cand": torch.log_softmax(3 * base + torch.randn(n, v, generator=gen), -1),
            "other": torch.log_softmax(base + 0.5 * torch.randn(n, v, generator=gen), -1)}  # fmt: skip
    target, prompt = torch.zeros(n, dtype=torch.long), torch.arange(n) // 7
    stores = {k: _store(tmp_path / k, x, target, prompt) for k, x in rows.items()}
    known = [compare.compare("ref", stores["ref"], c, stores[c], resamples=0) for c in ("cand", "other")]
    grid = {(r["a"], r["b"]): r for r in compare.matrix(stores, known)}

    def want(a, b):
        x, y = (rows[k].half().double().numpy() for k in (a, b))
        p, q = (np.exp(t - logsumexp(t, -1, keepdims=True)) for t in (x, y))
        return (rel_entr(p, q).sum(-1) + rel_entr(q, p).sum(-1)).mean(), (x.argmax(-1) == y.argmax(-1)).mean()

    for pair in (("ref", "cand"), ("ref", "other"), ("cand", "other")):
        sym, agree = want(*pair)
        assert grid[pair]["sym_kl_mean"] == pytest.approx(sym, rel=1e-6), pair
        assert grid[pair]["top1_agree"] == pytest.approx(agree, abs=1e-12), pair
    a = known[0].aggregates
    assert abs(a["kl_mean"] - a["kl_rev_mean"]) > 0.1 * a["kl_mean"]  # the two directions differ: a one-way sum shows


def test_pad_mass_aggregates_are_each_stores_own(tmp_path):
    """pad_mass_ref and pad_mass_cand (run.json): each the mean of its own store's per-row mass on the padding columns
    (over every compared row), not the other store's: two stores whose pad masses differ by 100x."""
    gen = torch.Generator().manual_seed(5)
    n, v = 40, 300
    stores, pads = {}, {}
    for name, scale in (("ref", 1e-6), ("cand", 1e-4)):
        logp = torch.log_softmax(torch.randn(n, v, generator=gen) * 2, -1)
        pads[name] = torch.rand(n, generator=gen) * scale
        stores[name] = Store(tmp_path / name)
        stores[name].write_shard(0, {
            "logprobs": logp.half(), "target": torch.zeros(n, dtype=torch.long), "prompt": torch.arange(n) // 10,
            "position": torch.arange(n), "pad_mass": pads[name], "warp_finite": torch.full((n,), v, dtype=torch.int32),
            "warp_mass": torch.ones(n),
        }, {})  # fmt: skip
    agg = compare.compare("ref", stores["ref"], "cand", stores["cand"], resamples=0).aggregates
    assert agg["pad_mass_ref"] == pytest.approx(float(pads["ref"].double().mean()), rel=1e-6)
    assert agg["pad_mass_cand"] == pytest.approx(float(pads["cand"].double().mean()), rel=1e-6)


def test_store_rounding_kl_is_the_mean_over_evenly_spaced_rows(tmp_path):
    """store_rounding_kl: metrics.rounding_kl's mean over every row of a store (three shards here) where it holds no
    more than `rows`, else over that many rows evenly spaced, its first and last among them."""
    from harness import metrics

    gen = torch.Generator().manual_seed(3)
    n, v = 70, 3000
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    store = _store(tmp_path / "a", ref, torch.zeros(n, dtype=torch.long), torch.arange(n) // 10, cuts=(20, 45))
    by_row = metrics.rounding_kl(ref.half())
    assert compare.store_rounding_kl(store) == pytest.approx(float(by_row.mean()), rel=1e-12)
    assert compare.store_rounding_kl(store, rows=4) == pytest.approx(float(by_row[[0, 23, 46, 69]].mean()), rel=1e-12)
    assert compare.store_rounding_kl(store, rows=4) != pytest.approx(float(by_row.mean()), rel=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_an_aligned_pair_against_float64_by_hand(tmp_path, monkeypatch, fused):
    """A cross_vocab pair's per-position metrics (pair_metrics with an alignment): the reference's rows 0.. against
    other rows of the candidate's store (both stores in several shards, compared rows on their edges, over several
    blocks), in two vocabularies that share 260 tokens under other ids. Against dicts by token in float64: both rows
    conditioned on the shared tokens, and each row's mass outside them; and the pair's row of the all-pairs matrix."""
    _kernel_on_or_off(monkeypatch, compare.metrics_fused, fused)
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    ref_keys = [("byte_level", f"t{i}".encode()) for i in range(300)]
    cand_keys = [ref_keys[i] for i in rng.permutation(300)[:260]] + [("byte_level", f"c{i}".encode()) for i in range(20)]
    cand_keys = [cand_keys[i] for i in rng.permutation(280)]
    vocab = align.VocabMap.build(ref_keys, cand_keys)
    cand_id = {k: i for i, k in enumerate(cand_keys)}
    shared = [i for i, k in enumerate(ref_keys) if k in cand_id]
    n_ref, n_cand, n = 90, 85, 75
    ref = torch.log_softmax(torch.randn(n_ref, 300, generator=gen) * 2, -1)
    cand = torch.log_softmax(torch.randn(n_cand, 280, generator=gen) * 2, -1)
    target = torch.from_numpy(rng.choice(shared, n_ref))
    ref_rows = torch.from_numpy(np.sort(rng.choice(np.setdiff1d(np.arange(n_ref), [7, 50]), n - 2, replace=False)))
    ref_rows = torch.cat([torch.tensor([7, 50]), ref_rows]).sort().values  # the first rows of the 2nd and 3rd shards
    cand_rows = torch.from_numpy(np.sort(rng.choice(np.setdiff1d(np.arange(n_cand), [30]), n - 1, replace=False)))
    cand_rows = torch.cat([torch.tensor([30]), cand_rows]).sort().values
    a = _store(tmp_path / "a", ref, target, torch.zeros(n_ref, dtype=torch.long), cuts=(7, 50))
    b = _store(tmp_path / "b", cand, torch.zeros(n_cand, dtype=torch.long), torch.zeros(n_cand, dtype=torch.long), cuts=(30,))
    empty = np.zeros(0, dtype=np.int64)
    al = align.PairAlignment(ref_rows, cand_rows, vocab, n_ref, n, empty, empty, empty, empty, empty)
    m = compare.pair_metrics(a, b, target[ref_rows], (2,), alignment=al)
    want = {k: [] for k in ("kl", "kl_rev", "nll_ref", "nll_cand", "outside_ref", "outside_cand", "top1_agree")}
    for r, c in zip(ref_rows.tolist(), cand_rows.tolist(), strict=True):
        x, y = np.exp(ref[r].half().double().numpy()), np.exp(cand[c].half().double().numpy())
        p = np.array([x[i] for i in shared])
        q = np.array([y[cand_id[ref_keys[i]]] for i in shared])
        want["outside_ref"].append(1 - p.sum() / x.sum())
        want["outside_cand"].append(1 - q.sum() / y.sum())
        p, q = p / p.sum(), q / q.sum()
        t = shared.index(int(target[r]))
        want["kl"].append(rel_entr(p, q).sum())
        want["kl_rev"].append(rel_entr(q, p).sum())
        want["nll_ref"].append(-np.log(p[t]))
        want["nll_cand"].append(-np.log(q[t]))
        want["top1_agree"].append(np.argmax(p) == np.argmax(q))
    for key, w in want.items():
        np.testing.assert_allclose(m[key], w, rtol=1e-5 if key.startswith("outside") else 1e-6, err_msg=key)
    # the all-pairs matrix's row of such a pair: the means of the same metrics
    grid = compare.matrix({"ref": a, "cand": b}, [], lambda x, y: al if (x, y) == ("ref", "cand") else None)
    assert grid[0]["sym_kl_mean"] == pytest.approx(np.mean(want["kl"]) + np.mean(want["kl_rev"]), rel=1e-6)
    assert grid[0]["top1_agree"] == pytest.approx(np.mean(want["top1_agree"]), abs=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_own_nll_over_several_blocks(tmp_path, monkeypatch, fused):
    """own_nll (bits per byte's NLL of each stored row's own next token) over several blocks of a store in two shards:
    the float16 row's float64 logsumexp minus the target's log-prob, within 1e-7 relative (the row kernel's float32
    logsumexp: ~2e-7 nats of NLLs ~10) or, on the torch path (float64), 1e-12."""
    _kernel_on_or_off(monkeypatch, compare.row_stats, fused)
    gen = torch.Generator().manual_seed(8)
    n, v = 2 * compare.FUSED_BLOCK + 5, 3000
    logp = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    target = torch.randint(0, v, (n,), generator=gen)
    store = _store(tmp_path / "s", logp, target, torch.zeros(n, dtype=torch.long), cuts=(7,))
    got = compare.own_nll(store)
    stored = logp.half().double()
    want = (torch.logsumexp(stored, -1) - stored[torch.arange(n), target]).numpy()
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=1e-7 if fused else 1e-12)


def test_warp_summary_reads_each_column_of_the_store(tmp_path):
    """warp_summary of a store: what the generation-config warpers leave per position, from the store's own
    warp_finite, warp_mass and pad_mass columns (each told apart by its range), by hand."""
    n = 30
    finite = torch.tensor([1, 2, 3] * 10, dtype=torch.int32)
    kept = torch.linspace(0.5, 0.8, n)
    pad = torch.linspace(0, 1e-5, n)
    store = Store(tmp_path / "s")
    store.write_shard(0, {
        "logprobs": torch.log_softmax(torch.zeros(n, 8), -1).half(), "target": torch.zeros(n, dtype=torch.long),
        "prompt": torch.zeros(n, dtype=torch.long), "position": torch.arange(n), "pad_mass": pad, "warp_finite": finite,
        "warp_mass": kept,
    }, {})  # fmt: skip
    got = compare.warp_summary(store)
    assert got["positions"] == n and got["single_finite_rate"] == pytest.approx(1 / 3, abs=1e-12)
    assert (got["finite_mean"], got["finite_min"], got["finite_max"]) == (2.0, 1.0, 3.0)
    assert got["kept_mass_mean"] == pytest.approx(0.65, rel=1e-6)
    assert (got["kept_mass_min"], got["kept_mass_max"]) == pytest.approx((0.5, 0.8), rel=1e-6)
    assert got["pad_mass_max"] == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("order", [("ref", "cand"), ("cand", "ref")])
def test_matrix_takes_a_compared_pair_from_its_aggregates(tmp_path, order):
    """A pair in `known` (either way round) is not computed again: its matrix row is its aggregates' top-1 agreement
    and KL(a ‖ b) + KL(b ‖ a), whatever the stores hold; the other pairs are computed."""
    gen = torch.Generator().manual_seed(9)
    n, v = 20, 50
    target, prompt = torch.zeros(n, dtype=torch.long), torch.arange(n) // 5
    stores = {k: _store(tmp_path / k, torch.log_softmax(torch.randn(n, v, generator=gen), -1), target, prompt)
              for k in ("ref", "cand", "other")}  # fmt: skip
    agg = {"top1_agree": 0.25, "kl_mean": 1.5, "kl_rev_mean": 2.0}  # no pair of these stores gives these
    known = [compare.PairResult(*order, agg, [], {})]
    grid = {(r["a"], r["b"]): r for r in compare.matrix(stores, known)}
    assert (grid[("ref", "cand")]["top1_agree"], grid[("ref", "cand")]["sym_kl_mean"]) == (0.25, 3.5)
    assert 0 < grid[("ref", "other")]["sym_kl_mean"] < 3 and 0 < grid[("cand", "other")]["sym_kl_mean"] < 3


@pytest.mark.parametrize("bad", [5, 6])
@pytest.mark.parametrize("fused", [True, False])
def test_nan_rows_of_an_aligned_pair_name_the_store_rows(tmp_path, monkeypatch, fused, bad):
    """A cross_vocab pair compares the reference's store rows 1.. against the candidate's 0..: NaN in 5 or 6 rows of
    both stores (in the second block of either path) is an error naming each store and its own rows (not the compared
    rows' indices), the first 5 with their prompt and token, and how many more if any."""
    _kernel_on_or_off(monkeypatch, compare.metrics_fused, fused)
    gen = torch.Generator().manual_seed(6)
    n, v = compare.FUSED_BLOCK + 16, 300
    logp = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    first = compare.FUSED_BLOCK + 4  # a store row past the first block of either path
    logp[first : first + bad, 17] = math.nan
    target, prompt = torch.zeros(n, dtype=torch.long), torch.arange(n) // 10
    a, b = _store(tmp_path / "a", logp, target, prompt), _store(tmp_path / "b", logp, target, prompt)
    keys = [("byte_level", f"t{i}".encode()) for i in range(v)]
    empty = np.zeros(0, dtype=np.int64)
    al = align.PairAlignment(torch.arange(1, n), torch.arange(n - 1), align.VocabMap.build(keys, keys), n, n - 1,
                             empty, empty, empty, empty, empty)  # fmt: skip
    rows = ", ".join(f"row {r} \\(prompt {r // 10}, token {r}\\)" for r in range(first, first + 5))
    rows += " and 1 more" if bad == 6 else ""
    want = (rf"store of 'ref' \({re.escape(str(tmp_path / 'a'))}\) holds NaN or \+inf log-probs at {rows}; "
            rf"the store of 'cand' \({re.escape(str(tmp_path / 'b'))}\) holds NaN or \+inf log-probs at {rows}\. Extraction")
    with pytest.raises(compare.CompareError, match=want):
        compare.pair_metrics(a, b, target[al.ref_rows], (2,), names=("ref", "cand"), alignment=al)
    with pytest.raises(compare.CompareError, match=want):  # the all-pairs matrix's row of the pair
        compare.matrix({"ref": a, "cand": b}, [], lambda x, y: al)


def test_the_metrics_path_is_the_fused_kernel_where_it_builds(monkeypatch):
    """position_metrics_fn: the fused kernel and its larger blocks where it builds, else the torch reference."""
    if compare.metrics_fused.available() is None:
        assert compare.position_metrics_fn() == (compare.metrics_fused.fused_position_metrics, compare.FUSED_BLOCK)
    monkeypatch.setattr(compare.metrics_fused, "available", lambda: "off for this test")
    assert compare.position_metrics_fn() == (compare.metrics.position_metrics, compare.BLOCK)
