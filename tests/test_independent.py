"""The numbers `harness compare` writes, against independent computations that share no code with the harness:
every per-position metric of both metric paths (the fused kernel and the torch one) against scipy and float64
numpy on every kind of row, properties of both paths (hypothesis), and the aggregates a run records (per prompt,
by reference confidence, bootstrap intervals over prompts, the all-pairs matrix) recomputed from its files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from harness import aggregate, metrics, metrics_fused, records

KS = (1, 5, 10)
PATHS = {"torch": metrics.position_metrics, "fused": lambda a, b, t, ks: metrics_fused.fused_position_metrics(a, b, t, ks)}


def _path(name):
    if name == "fused" and metrics_fused.available() is not None:
        pytest.skip(f"the fused kernel does not build here: {metrics_fused.available()}")
    return PATHS[name]


def by_hand(ref: np.ndarray, cand: np.ndarray, target: np.ndarray, ks=KS) -> dict[str, np.ndarray]:
    """Every per-position metric in float64 numpy and scipy, from [B, V] log-probs (maybe unnormalised, -inf where
    filtered). Top-k sets: the k largest, among ties the lowest ids (a stable sort), as the harness defines them."""
    out: dict[str, list] = {}
    for a, b, t in zip(ref.astype(np.float64), cand.astype(np.float64), target.tolist(), strict=True):
        lp, lq = a - special.logsumexp(a), b - special.logsumexp(b)
        p, q = np.exp(lp), np.exp(lq)
        order_p, order_q = np.argsort(-lp, kind="stable"), np.argsort(-lq, kind="stable")
        top = order_p[0]
        row = {
            "kl": special.rel_entr(p, q).sum(), "kl_rev": special.rel_entr(q, p).sum(),
            "js": jensenshannon(p, q) ** 2, "tv": 0.5 * np.abs(p - q).sum(),
            "top1_agree": top == order_q[0], "ref_top_rank": int((lq > lq[top]).sum()),
            "delta_p": q[t] - p[t], "delta_p_top": q[top] - p[top], "nll_ref": -lp[t], "nll_cand": -lq[t],
            "entropy_ref": stats.entropy(p), "entropy_cand": stats.entropy(q),
            "p_top_ref": p[top], "margin_ref": p[order_p[0]] - p[order_p[1]],
        }  # fmt: skip
        row |= {f"top{k}_overlap": len(set(order_p[:k]) & set(order_q[:k])) / k for k in ks}
        for key, value in row.items():
            out.setdefault(key, []).append(value)
    return {k: np.array(v) for k, v in out.items()}


def _rows(kind: str, n: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, candidate) float32 log-prob rows of one kind; the candidate a drifted copy of the reference."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, v, generator=g)
    noise = torch.randn(n, v, generator=g)
    if kind == "lm":  # a few likely tokens over a long tail
        ref = 2.5 * base + 6 * (torch.rand(n, v, generator=g) < 0.002)
        cand = ref + 0.05 * noise
    elif kind == "peaked":
        ref = 9 * base
        cand = ref + 0.3 * noise
    elif kind == "near-uniform":
        ref = 1e-3 * base
        cand = ref + 1e-4 * noise
    elif kind == "tied":  # a coarse grid: ties everywhere, across the k-th place too
        ref = torch.randint(0, 4, (n, v), generator=g).float()
        cand = torch.where(torch.rand(n, v, generator=g) < 0.05, ref + 1, ref)
    elif kind == "filtered":  # both filtered alike (top-k/top-p warpers): most entries -inf, KL finite
        ref = 3 * base
        cand = ref + 0.2 * noise
        cut = torch.rand(n, v, generator=g) < 0.9
        cut[:, :3] = False
        ref, cand = ref.masked_fill(cut, -math.inf), cand.masked_fill(cut, -math.inf)
    elif kind == "mixed-support":  # each filtered its own way: q = 0 where p > 0 (KL +inf) and p = 0 where q > 0
        ref, cand = 3 * base, 3 * base + 0.5 * noise
        ref = ref.masked_fill(torch.rand(n, v, generator=g) < 0.5, -math.inf)
        cand = cand.masked_fill(torch.rand(n, v, generator=g) < 0.5, -math.inf)
        ref[:, 0], cand[:, 0] = 0.0, 0.0  # a shared finite entry
    elif kind == "single":  # one finite entry (greedy in effect): the reference's, and the candidate's elsewhere too
        ref = torch.full((n, v), -math.inf)
        cand = torch.full((n, v), -math.inf)
        ref[:, 7] = 0.0
        cand[:, 7] = 0.0
        cand[n // 2 :, 11] = 1.0
    else:
        raise ValueError(kind)
    return torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)


KINDS = ("lm", "peaked", "near-uniform", "tied", "filtered", "mixed-support", "single")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_position_metric_against_scipy_and_float64(kind, path):
    """Within 1e-6 relative (Δp and the margin, differences that may be ~0: 1e-12 absolute), equal where discrete,
    the same +inf where q = 0 and p > 0; never NaN."""
    n, v = 24, 3000
    ref, cand = _rows(kind, n, v, seed=KINDS.index(kind))
    finite = torch.isfinite(ref) & torch.isfinite(cand)
    target = torch.tensor([int(torch.nonzero(row)[-1]) for row in finite])  # the text's token: one both hold
    got = _path(path)(ref, cand, target, KS)
    want = by_hand(ref.numpy(), cand.numpy(), target.numpy())
    assert set(want) <= set(got)
    for key, w in want.items():
        g = got[key].double().numpy() if got[key].dtype != torch.bool else got[key].numpy()
        assert not np.isnan(g).any(), key
        if w.dtype == bool or key == "ref_top_rank" or key.endswith("_overlap"):
            np.testing.assert_array_equal(g, w, err_msg=key)
        else:
            np.testing.assert_array_equal(np.isinf(g), np.isinf(w), err_msg=key)
            ok = np.isfinite(w)
            # differences of probabilities (Δp, the margin) may be ~0: 1e-12 absolute there; the rest 1e-6 relative
            # down to 1e-15 (a near-uniform pair's KL of 5e-9 and JS of 1e-9 are held to 2e-7 and 1e-6 of themselves)
            atol = 1e-12 if key in ("delta_p", "delta_p_top", "margin_ref") else 1e-15
            np.testing.assert_allclose(g[ok], w[ok], rtol=1e-6, atol=atol, err_msg=key)
    if kind == "mixed-support":
        assert np.isinf(want["kl"]).all() and np.isinf(want["kl_rev"]).all()  # the case is what it says


@pytest.mark.parametrize("path", PATHS)
def test_full_width_rows(path):
    """At Qwen1.5's 151646 columns, lm-like rows with a quantization-sized drift (KL ~1e-4)."""
    ref, cand = _rows("lm", 6, 151646, seed=11)
    target = torch.tensor([3, 500, 77_000, 151_645, 0, 42])
    got, want = _path(path)(ref, cand, target, KS), by_hand(ref.numpy(), cand.numpy(), target.numpy())
    for key in ("kl", "kl_rev", "js", "tv", "entropy_ref", "nll_cand", "p_top_ref"):
        np.testing.assert_allclose(got[key].double().numpy(), want[key], rtol=1e-6, err_msg=key)
    for key in ("top1_agree", "ref_top_rank", "top5_overlap", "top10_overlap"):
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)


@pytest.mark.parametrize("ratio", [1e-11, 1e-13])
@pytest.mark.parametrize("path", ["torch", "fused", "fused float64 kernel", "fused unnormalised"])
def test_js_where_tokens_are_far_apart(path, ratio):
    """JS where a token's probability is `ratio` of the other side's (and another's the other way round): every
    kernel path keeps 1e-6 relative (1 − u² formed from u once cancelled to 4e-6 at 1e-11 and 4e-4 at 1e-13)."""
    fn = _path("fused" if path.startswith("fused") else "torch")
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(8, 64, generator=g, dtype=torch.float64)
    cand = ref + 0.1 * torch.randn(8, 64, generator=g, dtype=torch.float64)
    ref[:, 0], cand[:, 0] = 6.0, 6.0 + math.log(ratio)  # q/p = ratio at token 0
    ref[:, 1], cand[:, 1] = 6.0 + math.log(ratio), 6.0  # p/q = ratio at token 1
    lp, lq = torch.log_softmax(ref, -1).float(), torch.log_softmax(cand, -1).float()
    target = torch.zeros(8, dtype=torch.long)
    if path == "fused float64 kernel":
        got = metrics_fused.fused_position_metrics(lp, lq, target, KS, float64_only=True)
    elif path == "fused unnormalised":  # rows off their normalisation by 1 nat take the float64 kernel too
        got = fn(lp, lq + 1.0, target, KS)
    else:
        got = fn(lp, lq, target, KS)
    want = by_hand(lp.numpy(), lq.numpy(), target.numpy())
    for key in ("js", "kl", "kl_rev", "tv"):
        np.testing.assert_allclose(got[key].double().numpy(), want[key], rtol=1e-6, atol=0, err_msg=key)


rows = st.tuples(st.integers(2, 80), st.integers(0, 2**31 - 1), st.floats(0.01, 20), st.floats(0.0, 0.95), st.floats(0.0, 0.95))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(case=rows)
def test_properties_of_the_paths_compare_runs(path, case):
    """KL ≥ 0 both ways, KL(p, p) = 0, JS symmetric (1e-6 relative) and in [0, ln 2], TV in [0, 1], entropy in
    [0, ln V], no NaN: on random rows with entries dropped on either side."""
    fn = _path(path)
    v, seed, scale, drop_p, drop_q = case
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, v, generator=g) * scale, torch.randn(4, v, generator=g) * scale
    x = x.masked_fill(torch.rand(4, v, generator=g) < drop_p, -math.inf)
    y = y.masked_fill(torch.rand(4, v, generator=g) < drop_q, -math.inf)
    x[:, 0], y[:, 0] = 0.0, 0.0
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    target = torch.zeros(4, dtype=torch.long)
    ks = (1, min(2, v))
    pq, qp, pp = fn(lp, lq, target, ks), fn(lq, lp, target, ks), fn(lp, lp, target, ks)
    for m in (pq, qp, pp):
        assert not any(torch.isnan(t.double()).any() for t in m.values())
        assert (m["kl"] >= 0).all() and (m["kl_rev"] >= 0).all()
        assert ((m["js"] >= 0) & (m["js"] <= math.log(2) * (1 + 1e-12))).all()
        assert ((m["tv"] >= 0) & (m["tv"] <= 1)).all()
        assert ((m["entropy_ref"] >= 0) & (m["entropy_ref"] <= math.log(v) * (1 + 1e-9))).all()
    assert (pp["kl"] == 0).all() and (pp["kl_rev"] == 0).all() and (pp["tv"] == 0).all() and pp["top1_agree"].all()
    torch.testing.assert_close(pq["js"].double(), qp["js"].double(), rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(pq["kl"].double(), qp["kl_rev"].double(), rtol=1e-6, atol=1e-15)


# ---- the aggregates of a run, from its files ----


def _positions(run_dir: Path, candidate: str) -> dict[str, np.ndarray]:
    with np.load(run_dir / f"positions-{candidate}.npz") as z:
        return {k: z[k] for k in z.files}


def test_per_prompt_aggregates_against_numpy_and_scipy(micro_run):
    """prompts.csv: each (pair, prompt) row recomputed from that pair's per-position file with numpy and scipy."""
    run_dir, _ = micro_run
    rows = list(csv.DictReader((run_dir / "prompts.csv").open()))
    names = [p["id"] for p in json.loads((run_dir / "tokens.json").read_text())["prompts"]]
    assert list(rows[0])[:3] == ["reference", "candidate", "prompt"]
    assert set(aggregate.PROMPT_AGGREGATES) | {"top5_overlap", "top10_overlap"} <= set(rows[0])
    pairs = {p.candidate: _positions(run_dir, p.candidate) for p in records.read(run_dir).pairs}
    assert len(rows) == sum(len(np.unique(m["prompt"])) for m in pairs.values())
    for row in rows:
        m = pairs[row["candidate"]]
        inside = m["prompt"] == names.index(row["prompt"])
        kl, top1 = m["kl"][inside].astype(np.float64), m["top1_agree"][inside]
        nr, nc = m["nll_ref"][inside].astype(np.float64), m["nll_cand"][inside].astype(np.float64)
        n = int(inside.sum())
        want = {
            "positions": n, "kl_mean": kl.mean(), "kl_median": np.median(kl), "kl_p99": np.percentile(kl, 99),
            "kl_max": kl.max(), "kl_rev_mean": m["kl_rev"][inside].mean(), "js_mean": m["js"][inside].mean(),
            "tv_mean": m["tv"][inside].mean(), "top1_agree": top1.mean(), "top5_overlap": m["top5_overlap"][inside].mean(),
            "delta_p_mean": m["delta_p"][inside].mean(), "delta_p_rms": math.sqrt((m["delta_p"][inside] ** 2).mean()),
            "ppl_ref": math.exp(nr.mean()), "ppl_cand": math.exp(nc.mean()), "ppl_ratio": math.exp((nc - nr).mean()),
            "ln_ppl_ratio": (nc - nr).mean(), "ref_top_rank_mean": m["ref_top_rank"][inside].mean(),
        }  # fmt: skip
        if n > 2:
            want |= {"kl_mean_se": stats.sem(kl), "ln_ppl_ratio_se": stats.sem(nc - nr),
                     "top1_agree_se": math.sqrt(top1.mean() * (1 - top1.mean()) / (n - 1)),
                     "nll_correlation": stats.pearsonr(nr, nc).statistic}  # fmt: skip
        for key, w in want.items():
            assert float(row[key]) == pytest.approx(float(w), rel=1e-6, abs=1e-15), (row["candidate"], row["prompt"], key)


def test_confidence_bins_and_bootstrap_intervals_by_hand(micro_run):
    """KL and flip rate by the reference's top-1 probability, by hand. The 95% intervals of the mean KL and the top-1
    agreement: the record holds aggregate.bootstrap_mean's for the run's resamples and seed, and that function is a
    bootstrap over whole prompts: at 20000 resamples it agrees with one written here in numpy (its own random
    stream) within Monte Carlo error, 6% of the interval's width at each end."""
    run_dir, _ = micro_run
    record = records.read(run_dir)
    resamples, rng = record.config["metrics"]["bootstrap_resamples"], np.random.default_rng(123)
    for pair in record.pairs:
        a, m = pair.aggregates, _positions(run_dir, pair.candidate)
        kl, flip, p_top = m["kl"].astype(np.float64), ~m["top1_agree"].astype(bool), m["p_top_ref"]
        edges = aggregate.CONFIDENCE_BINS
        for b, lo, hi in zip(a["by_confidence"], edges[:-1], edges[1:], strict=True):
            inside = (p_top >= lo) & ((p_top < hi) if hi < 1 else (p_top <= hi))
            assert (b["p_top_lo"], b["p_top_hi"], b["positions"]) == (lo, hi, int(inside.sum()))
            if inside.any():
                assert b["kl_mean"] == pytest.approx(kl[inside].mean(), rel=1e-9)
                assert b["flip_rate"] == pytest.approx(flip[inside].mean(), rel=1e-9, abs=1e-15)
        prompts = [m["prompt"] == p for p in np.unique(m["prompt"])]
        for values, key in ((kl, "kl_mean_ci95"), (m["top1_agree"].astype(np.float64), "top1_agree_ci95")):
            assert a[key] == list(aggregate.bootstrap_mean(values, m["prompt"], resamples=resamples, seed=record.seed))
            sums, counts = np.array([values[i].sum() for i in prompts]), np.array([i.sum() for i in prompts])
            picks = rng.integers(0, len(prompts), (20000, len(prompts)))
            lo, hi = np.percentile(sums[picks].sum(1) / counts[picks].sum(1), [2.5, 97.5])
            got = aggregate.bootstrap_mean(values, m["prompt"], resamples=20000, seed=1)
            width = max(hi - lo, 1e-12)
            assert abs(got[0] - lo) < 0.06 * width and abs(got[1] - hi) < 0.06 * width, (pair.candidate, key, got, (lo, hi))


def test_depth_bins_by_hand(micro_run):
    """Each position's context depth and window in its positions file (the run's windows do not overlap: the predicted
    token's index modulo text.context, and a window per prompt and text.context tokens), and the record's KL, flip rate
    and ln PPL ratio by depth recomputed from them, the standard errors clustered by window as a loop over windows."""
    run_dir, _ = micro_run
    record = records.read(run_dir)
    assert record.config["text"]["score"] == "all" and record.config["mode"] == "text"
    context = record.config["text"]["context"]
    for pair in record.pairs:
        m = _positions(run_dir, pair.candidate)
        assert np.array_equal(m["depth"], m["position"] % context)
        starts = sorted({(int(p), int(q) // context) for p, q in zip(m["prompt"], m["position"], strict=True)})
        assert np.array_equal(m["window"], [starts.index((int(p), int(q) // context)) for p, q in zip(m["prompt"], m["position"], strict=True)])
        depth, window, kl = m["depth"], m["window"], m["kl"].astype(np.float64)
        diff = m["nll_cand"].astype(np.float64) - m["nll_ref"].astype(np.float64)
        bins = pair.aggregates["by_depth"]
        assert (bins[0]["depth_lo"], bins[-1]["depth_hi"]) == (depth.min(), depth.max()) and len(bins) >= 5
        assert sum(b["positions"] for b in bins) == len(depth)
        for b in bins:
            inside = (depth >= b["depth_lo"]) & (depth <= b["depth_hi"])
            assert b["positions"] == int(inside.sum()) and b["windows"] == len(np.unique(window[inside]))
            if not b["positions"]:
                continue
            groups = np.unique(window[inside])

            def se(x):
                if len(groups) < 2:  # one window: no standard error
                    return math.nan
                r = [(x[window[inside] == g] - x.mean()).sum() for g in groups]
                return math.sqrt(len(groups) / (len(groups) - 1) * sum(v * v for v in r)) / len(x)

            assert b["kl_mean"] == pytest.approx(kl[inside].mean(), rel=1e-9)
            assert b["kl_mean_se"] == pytest.approx(se(kl[inside]), rel=1e-6, nan_ok=True)
            assert b["flip_rate"] == pytest.approx(1 - m["top1_agree"][inside].mean(), abs=1e-12)
            assert b["ln_ppl_ratio"] == pytest.approx(diff[inside].mean(), rel=1e-6, abs=1e-12)
            assert b["ln_ppl_ratio_se"] == pytest.approx(se(diff[inside]), rel=1e-6, abs=1e-15, nan_ok=True)


def _store_rows(store: str) -> np.ndarray:
    """A store's log-prob rows, in order, from its safetensors shards (read here, not through harness.store)."""
    shards = sorted(Path(store).glob("shard-*.safetensors"), key=lambda f: int(f.stem.split("-")[1]))
    return np.concatenate([load_file(str(f))["logprobs"] for f in shards])


def test_matrix_against_float64_from_the_stores(micro_run):
    """matrix.csv's symmetric KL and top-1 agreement for pairs without the reference, recomputed in float64 from the
    two stores' float16 rows (each renormalised: the harness compares the rows as stored)."""
    run_dir, _ = micro_run
    record = records.read(run_dir)
    matrix = {(r["a"], r["b"]): r for r in csv.DictReader((run_dir / "matrix.csv").open())}
    for a, b in (("s-chat-fp16", "s-chat-gptq-int4"), ("s-chat-gptq-int8", "s-base"), ("s-chat-bf16", "m-chat")):
        x, y = (_store_rows(record.variants[name]["store"]) for name in (a, b))
        sym, agree = [], []
        for s in range(0, len(x), 64):
            lp = x[s : s + 64].astype(np.float64)
            lq = y[s : s + 64].astype(np.float64)
            lp -= special.logsumexp(lp, axis=-1, keepdims=True)
            lq -= special.logsumexp(lq, axis=-1, keepdims=True)
            p, q = np.exp(lp), np.exp(lq)
            sym.append(special.rel_entr(p, q).sum(-1) + special.rel_entr(q, p).sum(-1))
            agree.append(lp.argmax(-1) == lq.argmax(-1))
        row = matrix.get((a, b)) or matrix[(b, a)]
        assert float(row["sym_kl_mean"]) == pytest.approx(np.concatenate(sym).mean(), rel=1e-6), (a, b)
        assert float(row["top1_agree"]) == pytest.approx(np.concatenate(agree).mean(), abs=1e-12), (a, b)


def _linear_percentile(x: np.ndarray, q: float) -> float:
    """The q-th percentile between order statistics, by hand (numpy's default "linear" rule, not numpy's code)."""
    s = sorted(float(v) for v in x)
    h = (len(s) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


@pytest.mark.parametrize("seed", range(6))
def test_every_pair_aggregate_by_hand(seed):
    """The pair aggregates the other tests leave out, from random per-position values: every divergence's mean ± se,
    median, percentiles, min and max, Δp's and the top token's Δp's RMS ± se (delta method) and |Δp| percentiles, both
    PPLs' and their ratio's se (delta method), entropies, flip rate, top-k overlaps, the reference top's rank; and the
    warper summary; the standard errors over prompts. math.fsum, scipy.stats.sem and percentiles written by hand; within 1e-9
    relative."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(50, 3000))
    nll_r = rng.exponential(2, n)
    nll_c = nll_r + rng.normal(0.02, 0.1, n)
    m = {"kl": rng.lognormal(-7, 1.5, n), "kl_rev": rng.lognormal(-7, 1.5, n), "js": rng.lognormal(-8, 1, n),
         "tv": rng.random(n) * 0.1, "top1_agree": rng.random(n) < 0.9, "top5_overlap": rng.integers(0, 6, n) / 5,
         "top10_overlap": rng.integers(0, 11, n) / 10, "ref_top_rank": rng.integers(0, 4, n),
         "delta_p": rng.normal(-0.001, 0.02, n), "delta_p_top": rng.normal(-0.003, 0.03, n), "nll_ref": nll_r,
         "nll_cand": nll_c, "entropy_ref": rng.random(n) * 5, "entropy_cand": rng.random(n) * 5, "p_top_ref": rng.random(n),
         "kl_smoothed": rng.lognormal(-6, 1, n), "kl_rev_smoothed": rng.lognormal(-6, 1, n)}  # fmt: skip
    prompt = np.sort(rng.integers(0, 12, n))
    got = aggregate.pair_aggregates(m, prompt, ks=(5, 10), resamples=0, seed=0)
    want = {"positions": n}
    for name in ("kl", "kl_rev", "js", "tv", "kl_smoothed", "kl_rev_smoothed"):
        x = m[name]
        want |= {f"{name}_mean": math.fsum(x) / n, f"{name}_mean_se": stats.sem(x), f"{name}_median": _linear_percentile(x, 50),
                 f"{name}_min": min(x), f"{name}_max": max(x), f"{name}_inf": 0}  # fmt: skip
        want |= {f"{name}_p{q:g}".replace(".", "_"): _linear_percentile(x, q) for q in (99.9, 99, 95, 90, 10, 5, 1, 0.1)}
    for name in ("delta_p", "delta_p_top"):
        x = m[name]
        rms = math.sqrt(math.fsum(x * x) / n)
        want |= {f"{name}_rms": rms, f"{name}_rms_se": stats.sem(x * x) / (2 * rms)}  # d√u = du / (2√u)
        want |= {f"{name}_abs_p{q}": _linear_percentile(np.abs(x), q) for q in (99, 95, 90)}
    for side, nll in (("ref", nll_r), ("cand", nll_c)):
        want[f"ppl_{side}_se"] = math.exp(math.fsum(nll) / n) * stats.sem(nll)  # d e^u = e^u du
    d = nll_c - nll_r
    want |= {"ppl_ratio": math.exp(math.fsum(d) / n), "ln_ppl_ratio_se": stats.sem(d), "ppl_ratio_se": math.exp(math.fsum(d) / n) * stats.sem(d),
             "entropy_ref_mean": math.fsum(m["entropy_ref"]) / n, "entropy_cand_mean": math.fsum(m["entropy_cand"]) / n,
             "flip_rate": 1 - int(m["top1_agree"].sum()) / n, "top5_overlap": math.fsum(m["top5_overlap"]) / n,
             "top10_overlap": math.fsum(m["top10_overlap"]) / n, "ref_top_rank_mean": int(m["ref_top_rank"].sum()) / n}  # fmt: skip
    # over prompts: √(G/(G−1) Σ_g (Σ_{i in g} (x_i − x̄))²) / n, the prompts' residual sums in math.fsum
    groups = sorted(set(prompt.tolist()))

    def over_prompts(x):
        mean = math.fsum(x) / n
        sums = [math.fsum(float(v) - mean for v in x[prompt == g]) for g in groups]
        return math.sqrt(len(groups) / (len(groups) - 1) * math.fsum(s * s for s in sums)) / n

    for name in ("kl", "kl_rev", "js", "tv", "kl_smoothed", "kl_rev_smoothed", "delta_p"):
        want[f"{name}_mean_se_prompts"] = over_prompts(m[name])
    want |= {"top1_agree_se_prompts": over_prompts(m["top1_agree"].astype(float)), "ln_ppl_ratio_se_prompts": over_prompts(d)}
    for name in ("delta_p", "delta_p_top"):
        want[f"{name}_rms_se_prompts"] = over_prompts(m[name] ** 2) / (2 * want[f"{name}_rms"])
    ppl_r, ppl_c = math.exp(math.fsum(nll_r) / n), math.exp(math.fsum(nll_c) / n)
    want |= {"ppl_ref_se_prompts": ppl_r * over_prompts(nll_r), "ppl_cand_se_prompts": ppl_c * over_prompts(nll_c),
             "ppl_ratio_se_prompts": want["ppl_ratio"] * over_prompts(d), "ppl_diff_se_prompts": over_prompts(ppl_c * nll_c - ppl_r * nll_r)}  # fmt: skip
    assert len(groups) >= aggregate.MIN_PROMPTS  # else each is the larger of this and the per-position one
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=0), key
    finite, kept, pad = rng.integers(1, 50, n), rng.random(n), rng.random(n) * 1e-5
    warp = aggregate.warp_summary(finite, kept, pad)
    want = {"positions": n, "finite_mean": math.fsum(finite) / n, "finite_min": min(finite), "finite_max": max(finite),
            "kept_mass_mean": math.fsum(kept) / n, "kept_mass_min": min(kept), "kept_mass_max": max(kept),
            "single_finite_rate": int((finite == 1).sum()) / n, "pad_mass_max": max(pad)}  # fmt: skip
    want |= {f"{name}_p{q}": _linear_percentile(x, q) for name, x in (("finite", finite), ("kept_mass", kept)) for q in (10, 50, 90)}
    assert set(warp) == set(want)
    for key, value in want.items():
        assert warp[key] == pytest.approx(value, rel=1e-12, abs=0), key
