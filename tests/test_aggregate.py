"""Aggregates against numpy/scipy computed independently, and the bootstrap resamples prompts."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from harness import aggregate


def test_distribution_and_proportion():
    rng = np.random.default_rng(0)
    x = rng.lognormal(-6, 2, 5000)
    d = aggregate.distribution(x, "kl")
    assert d["kl_mean"] == pytest.approx(x.mean()) and d["kl_mean_se"] == pytest.approx(stats.sem(x))
    assert d["kl_p99_9"] == pytest.approx(np.percentile(x, 99.9)) and d["kl_p0_1"] == pytest.approx(np.percentile(x, 0.1))
    assert d["kl_median"] == pytest.approx(np.median(x)) and d["kl_max"] == x.max() and d["kl_inf"] == 0
    hits = rng.random(1000) < 0.9
    p = aggregate.proportion(hits, "top1_agree")
    # the 0/1 hits' standard error of the mean (ddof=1), which is llama.cpp's "Same top p" ±: √(p̂(1−p̂)/(n−1))
    assert p["top1_agree_se"] == pytest.approx(stats.sem(hits.astype(np.float64)), rel=1e-9)
    assert p["top1_agree_se"] == pytest.approx(math.sqrt(hits.mean() * (1 - hits.mean()) / 999), rel=1e-9)
    with_inf = aggregate.distribution(np.array([0.1, np.inf, 0.2]), "kl")
    assert with_inf["kl_inf"] == 1 and math.isinf(with_inf["kl_mean"])


def test_bootstrap_resamples_prompts_deterministically():
    rng = np.random.default_rng(1)
    prompt = np.repeat(np.arange(40), rng.integers(5, 50, 40))
    per_prompt_level = rng.lognormal(-5, 1, 40)
    values = per_prompt_level[prompt] * rng.lognormal(0, 0.1, len(prompt))
    lo, hi = aggregate.bootstrap_mean(values, prompt, resamples=2000, seed=3)
    assert lo < values.mean() < hi
    assert (lo, hi) == aggregate.bootstrap_mean(values, prompt, resamples=2000, seed=3)
    # An independent prompt-level percentile bootstrap (the mean of the resampled prompts' positions): the same width
    # within 15% (Monte Carlo noise of 2000 resamples), and about 6x the naive interval over positions (which treats
    # the correlated positions inside a prompt as independent).
    ids = np.unique(prompt)
    picks = np.random.default_rng(11).integers(0, len(ids), (2000, len(ids)))
    sums, counts = np.bincount(prompt, weights=values), np.bincount(prompt).astype(np.float64)
    means = sums[picks].sum(1) / counts[picks].sum(1)
    want_lo, want_hi = np.percentile(means, [2.5, 97.5])
    assert hi - lo == pytest.approx(want_hi - want_lo, rel=0.15)
    assert lo == pytest.approx(want_lo, rel=0.1) and hi == pytest.approx(want_hi, rel=0.1)
    assert (hi - lo) > 4 * 1.96 * stats.sem(values)


def test_pair_aggregates_perplexity_and_bins():
    rng = np.random.default_rng(2)
    n = 3000
    nll_r = rng.exponential(2, n)
    nll_c = nll_r + rng.normal(0.01, 0.05, n)
    m = {
        "kl": rng.lognormal(-7, 1, n), "kl_rev": rng.lognormal(-7, 1, n), "js": rng.lognormal(-8, 1, n),
        "tv": rng.random(n) * 0.1, "top1_agree": rng.random(n) < 0.97, "top5_overlap": rng.random(n),
        "ref_top_rank": rng.integers(0, 3, n), "delta_p": rng.normal(0, 0.01, n), "delta_p_top": rng.normal(0, 0.01, n),
        "nll_ref": nll_r, "nll_cand": nll_c, "entropy_ref": rng.random(n), "entropy_cand": rng.random(n),
        "p_top_ref": rng.random(n),
    }  # fmt: skip
    m["p_top_ref"][:5], m["p_top_ref"][5:8] = 1.0, 0.0  # a one-entry (greedy-warped) row, and the bins' other end
    prompt = np.repeat(np.arange(30), 100)
    a = aggregate.pair_aggregates(m, prompt, ks=(5,), resamples=200, seed=0)
    assert a["ppl_ref"] == pytest.approx(np.exp(nll_r.mean())) and a["ppl_cand"] == pytest.approx(np.exp(nll_c.mean()))
    assert a["ln_ppl_ratio"] == pytest.approx(math.log(a["ppl_ratio"]))
    assert a["nll_correlation"] == pytest.approx(stats.pearsonr(nll_r, nll_c)[0])
    assert a["delta_p_rms"] == pytest.approx(np.sqrt(np.mean(m["delta_p"] ** 2)))
    assert sum(b["positions"] for b in a["by_confidence"]) == n
    bins = a["by_confidence"]
    for b in bins:  # each bin [lo, hi), the last [lo, 1]: its count and mean KL against numpy
        inside = (m["p_top_ref"] >= b["p_top_lo"]) & ((m["p_top_ref"] < b["p_top_hi"]) | (b["p_top_hi"] == 1.0))
        assert b["positions"] == inside.sum() and b["kl_mean"] == pytest.approx(m["kl"][inside].mean(), rel=1e-12)
    assert bins[0]["p_top_lo"] == 0.0 and bins[-1]["p_top_hi"] == 1.0 and bins[-1]["positions"] >= 5
    assert a["kl_mean_ci95"][0] < a["kl_mean"] < a["kl_mean_ci95"][1]


def _cr1(x: np.ndarray, cluster: np.ndarray) -> float:
    """The cluster-robust standard error of a mean, written out as a loop over clusters."""
    mean, groups = x.mean(), sorted(set(cluster.tolist()))
    total = sum((x[cluster == g] - mean).sum() ** 2 for g in groups)
    return math.sqrt(len(groups) / (len(groups) - 1) * total) / len(x)


def test_clustered_standard_error():
    """One value per cluster: the sample standard deviation / sqrt(n) (scipy's sem); clusters of correlated values:
    the loop above, and wider than sem, which takes them as independent."""
    rng = np.random.default_rng(5)
    x = rng.lognormal(-6, 2, 400)
    assert aggregate.clustered_se(x, np.arange(400)) == pytest.approx(stats.sem(x), rel=1e-12)
    cluster = np.repeat(np.arange(40), 10)
    y = rng.normal(0, 1, 40)[cluster] + rng.normal(0, 0.1, 400)  # a shared level per cluster
    assert aggregate.clustered_se(y, cluster) == pytest.approx(_cr1(y, cluster), rel=1e-12)
    assert aggregate.clustered_se(y, cluster) > 2.5 * stats.sem(y)
    assert math.isnan(aggregate.clustered_se(y[:10], cluster[:10]))  # one cluster


def _pair_metrics(rng, prompt: np.ndarray) -> dict:
    """Per-position metrics with a level per prompt (its text's difficulty), as a real run's are."""
    n, level = len(prompt), rng.normal(0, 1, prompt.max() + 1)[prompt]
    nll_r = rng.exponential(2, n)
    return {
        "kl": np.exp(-7 + level + rng.normal(0, 0.5, n)), "kl_rev": rng.lognormal(-7, 1, n), "js": rng.lognormal(-8, 1, n),
        "tv": rng.random(n) * 0.1, "top1_agree": rng.random(n) < 0.9 + 0.05 * np.tanh(level),
        "ref_top_rank": rng.integers(0, 3, n), "delta_p": 0.01 * level + rng.normal(0, 0.01, n),
        "delta_p_top": rng.normal(0, 0.01, n), "nll_ref": nll_r, "nll_cand": nll_r + 0.02 * level + rng.normal(0.01, 0.02, n),
        "entropy_ref": rng.random(n), "entropy_cand": rng.random(n), "p_top_ref": rng.random(n),
    }  # fmt: skip


def test_standard_errors_over_prompts():
    """`*_se_prompts`: the cluster-robust standard error by prompt, against the loop over prompts (prompts of unequal
    length); the RMS Δp's by the delta method, as the per-position one. Where each prompt has a level of its own, the
    per-position one (llama.cpp's) is much smaller; and over 300 runs of new prompts, the spread of the mean KL is the
    one over prompts (within 15%), not the per-position one. From fewer than 10 prompts, the larger of the two."""
    rng = np.random.default_rng(6)
    prompt = np.repeat(np.arange(40), rng.integers(10, 90, 40))
    m = _pair_metrics(rng, prompt)
    a = aggregate.pair_aggregates(m, prompt, ks=(), resamples=0, seed=0)
    for key, x in (("kl_mean", m["kl"]), ("kl_rev_mean", m["kl_rev"]), ("js_mean", m["js"]), ("tv_mean", m["tv"]),
                   ("delta_p_mean", m["delta_p"]), ("top1_agree", m["top1_agree"].astype(np.float64)),
                   ("ln_ppl_ratio", m["nll_cand"] - m["nll_ref"])):  # fmt: skip
        assert a[f"{key}_se_prompts"] == pytest.approx(_cr1(x, prompt), rel=1e-9), key
    for name in ("delta_p", "delta_p_top"):
        rms = math.sqrt(np.mean(m[name] ** 2))
        assert a[f"{name}_rms_se_prompts"] == pytest.approx(_cr1(m[name] ** 2, prompt) / (2 * rms), rel=1e-9), name
    assert a["kl_mean_se_prompts"] > 2 * a["kl_mean_se"] and a["ln_ppl_ratio_se_prompts"] > 2 * a["ln_ppl_ratio_se"]
    means, ses = [], []
    for _ in range(300):
        m = _pair_metrics(rng, prompt)
        a = aggregate.pair_aggregates(m, prompt, ks=(), resamples=0, seed=0)
        means.append(a["kl_mean"])
        ses.append(a["kl_mean_se_prompts"])
    assert np.mean(ses) == pytest.approx(np.std(means, ddof=1), rel=0.15)
    one = aggregate.pair_aggregates(_pair_metrics(rng, np.zeros(50, int)), np.zeros(50, int), ks=(), resamples=0, seed=0)
    assert one["kl_mean_se_prompts"] == one["kl_mean_se"] and math.isfinite(one["kl_mean_se"])  # one prompt: per position
    # fewer than MIN_PROMPTS prompts: the larger of the two (CR1 from 3 clusters is noisy, and often too small)
    few = np.repeat(np.arange(3), 40)
    m = _pair_metrics(rng, few)
    a = aggregate.pair_aggregates(m, few, ks=(), resamples=0, seed=0)
    for key, x in (("kl_mean", m["kl"]), ("top1_agree", m["top1_agree"].astype(np.float64)), ("ln_ppl_ratio", m["nll_cand"] - m["nll_ref"])):
        assert a[f"{key}_se_prompts"] == pytest.approx(max(_cr1(x, few), a[f"{key}_se"]), rel=1e-9), key
    # the boundary: prompts whose means are all equal have CR1 = 0; from 10 prompts that is the error, from 9 the
    # per-position one
    for g, want_pos in ((10, False), (9, True)):
        prompt = np.repeat(np.arange(g), 20)
        m = _pair_metrics(rng, prompt)
        m["kl"] = np.tile(rng.lognormal(-7, 1, 20), g)  # each prompt the same 20 values
        a = aggregate.pair_aggregates(m, prompt, ks=(), resamples=0, seed=0)
        assert a["kl_mean_se_prompts"] == (a["kl_mean_se"] if want_pos else pytest.approx(0, abs=1e-18)), g
    assert aggregate.MIN_PROMPTS == 10


def test_depth_bins_against_numpy_and_scipy():
    """KL, its clustered standard error, the flip rate and the ln PPL ratio ± se by context depth in [2^k, 2^(k+1))
    bins, by hand, on random positions whose depths skip a bin (64-127: empty, NaN) and reach the edges 2^k - 1 and
    2^k; the outer bins cut to the depths scored (3 and 699, not 2 and 1023)."""
    rng = np.random.default_rng(3)
    depth = np.concatenate([rng.integers(3, 64, 900), rng.integers(128, 700, 900), [3, 63, 128, 255, 256, 511, 512, 699]])
    n = len(depth)
    window = rng.integers(0, 60, n)
    kl, flip, diff = rng.lognormal(-6, 2, n), rng.random(n) < 0.05, rng.normal(0.01, 0.1, n)
    bins = aggregate.depth_bins(depth.astype(np.int32), window, kl, flip, diff)
    assert [(b["depth_lo"], b["depth_hi"]) for b in bins] == [(3, 3)] + [(2**k, 2 ** (k + 1) - 1) for k in range(2, 9)] + [(512, 699)]
    assert sum(b["positions"] for b in bins) == n
    for b in bins:
        inside = (depth >= b["depth_lo"]) & (depth <= b["depth_hi"])
        assert b["positions"] == inside.sum() and b["windows"] == len(set(window[inside].tolist()))
        if b["depth_lo"] == 64:
            assert b["positions"] == 0 and all(math.isnan(b[k]) for k in ("kl_mean", "kl_mean_se", "flip_rate", "ln_ppl_ratio", "ln_ppl_ratio_se"))
            continue
        assert b["kl_mean"] == pytest.approx(kl[inside].mean(), rel=1e-12)
        assert b["kl_mean_se"] == pytest.approx(_cr1(kl[inside], window[inside]), rel=1e-10)
        assert b["flip_rate"] == pytest.approx(flip[inside].mean(), rel=1e-12)
        assert b["ln_ppl_ratio"] == pytest.approx(diff[inside].mean(), rel=1e-10)
        assert b["ln_ppl_ratio_se"] == pytest.approx(_cr1(diff[inside], window[inside]), rel=1e-10)
    one = aggregate.depth_bins(np.array([5, 6], np.int32), np.array([0, 0]), kl[:2], flip[:2], diff[:2])
    assert [(b["depth_lo"], b["depth_hi"], b["windows"]) for b in one] == [(5, 6, 1)] and math.isnan(one[0]["kl_mean_se"])  # one window
    assert aggregate.depth_bins(np.zeros(0, np.int32), window[:0], kl[:0], flip[:0], diff[:0]) == []
    # a pair that scores some of the run's positions only (cross_vocab) has the run's bins: cut to the run's span
    some = aggregate.depth_bins(np.array([5, 9], np.int32), np.array([0, 1]), kl[:2], flip[:2], diff[:2], span=(4, 12))
    assert [(b["depth_lo"], b["depth_hi"], b["positions"]) for b in some] == [(4, 7, 1), (8, 12, 1)]
    # depth 0 (a position scored from no context, which a model with a BOS token would have) is a bin of its own
    zero = aggregate.depth_bins(np.array([0, 0, 1, 2, 3], np.int32), np.arange(5), kl[:5], flip[:5], diff[:5])
    assert [(b["depth_lo"], b["depth_hi"], b["positions"]) for b in zero] == [(0, 0, 2), (1, 1, 1), (2, 3, 2)]


def test_llama_cpp_statistics():
    """What llama.cpp's --kl-divergence prints beside KL: the signed Δp of the next token (mean ± se, quartiles and
    the tails), RMS Δp ± se, PPL(Q) − PPL(base) ± se and PPL(Q)/PPL(base) ± se. Percentiles against numpy; the
    delta-method standard errors against scipy's bootstrap over positions (iid here), within 10%."""
    rng = np.random.default_rng(5)
    n = 4000
    nll_r = rng.exponential(2, n)
    nll_c = nll_r + rng.normal(0.02, 0.1, n)
    dp = rng.normal(-0.002, 0.02, n) + (rng.random(n) < 0.01) * rng.normal(0, 0.3, n)
    m = {
        "kl": rng.lognormal(-7, 1, n), "kl_rev": rng.lognormal(-7, 1, n), "js": rng.lognormal(-8, 1, n),
        "tv": rng.random(n) * 0.1, "top1_agree": rng.random(n) < 0.97, "top5_overlap": rng.random(n),
        "ref_top_rank": rng.integers(0, 3, n), "delta_p": dp, "delta_p_top": rng.normal(0, 0.01, n),
        "nll_ref": nll_r, "nll_cand": nll_c, "entropy_ref": rng.random(n), "entropy_cand": rng.random(n),
        "p_top_ref": rng.random(n),
    }  # fmt: skip
    a = aggregate.pair_aggregates(m, np.arange(n) // 40, ks=(5,), resamples=0, seed=0)
    assert a["delta_p_mean"] == pytest.approx(dp.mean()) and a["delta_p_mean_se"] == pytest.approx(stats.sem(dp))
    assert a["delta_p_min"] == dp.min() and a["delta_p_max"] == dp.max() and "delta_p_inf" not in a
    for q in (99.9, 99, 95, 90, 75, 50, 25, 10, 5, 1, 0.1):
        key = "delta_p_median" if q == 50 else "delta_p_p" + f"{q:g}".replace(".", "_")
        assert a[key] == pytest.approx(np.percentile(dp, q)), key
    assert a["ppl_diff"] == pytest.approx(np.exp(nll_c.mean()) - np.exp(nll_r.mean()))

    def boot_se(fn, *data):
        res = stats.bootstrap(data, fn, paired=True, vectorized=True, n_resamples=3000, method="percentile",
                              rng=np.random.default_rng(9))  # fmt: skip
        return res.standard_error

    se = {
        "ppl_diff_se": boot_se(lambda r, c, axis=-1: np.exp(c.mean(axis)) - np.exp(r.mean(axis)), nll_r, nll_c),
        "ppl_ratio_se": boot_se(lambda r, c, axis=-1: np.exp(c.mean(axis) - r.mean(axis)), nll_r, nll_c),
        "ppl_ref_se": boot_se(lambda r, axis=-1: np.exp(r.mean(axis)), nll_r),
        "delta_p_rms_se": boot_se(lambda x, axis=-1: np.sqrt((x**2).mean(axis)), dp),
    }
    for key, want in se.items():
        assert a[key] == pytest.approx(want, rel=0.1), key


def test_ppl_diff_se_of_nearly_equal_models_is_exact():
    """Two models whose NLLs differ by 1e-9 (a shuffled-ids copy of the reference): the delta method's
    pc²var_c + pr²var_r − 2·pr·pc·cov cancels to rounding, and once gave 0 (clamped from below 0). Against the
    same delta-method variance in exact rational arithmetic on the float64 inputs, within 1e-6 relative."""
    rng = np.random.default_rng(11)
    n = 300
    nll_r = rng.exponential(2, n)
    nll_c = nll_r + rng.normal(0, 1e-9, n)
    m = {k: rng.random(n) for k in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top", "entropy_ref", "entropy_cand", "p_top_ref")}
    m |= {"top1_agree": rng.random(n) < 0.9, "ref_top_rank": rng.integers(0, 3, n), "nll_ref": nll_r, "nll_cand": nll_c}
    a = aggregate.pair_aggregates(m, np.arange(n) // 30, ks=(), resamples=0, seed=0)
    pr, pc = Fraction(a["ppl_ref"]), Fraction(a["ppl_cand"])
    r, c = [Fraction(x) for x in nll_r.tolist()], [Fraction(x) for x in nll_c.tolist()]
    mr, mc = sum(r) / n, sum(c) / n
    var_r, var_c = (sum((x - m) ** 2 for x in xs) / (n - 1) for xs, m in ((r, mr), (c, mc)))
    cov = sum((x - mr) * (y - mc) for x, y in zip(r, c, strict=True)) / (n - 1)
    want = math.sqrt((pc * pc * var_c + pr * pr * var_r - 2 * pr * pc * cov) / n)
    assert want > 0 and a["ppl_diff_se"] == pytest.approx(want, rel=1e-6, abs=0)  # abs=0: pytest's default abs 1e-12 is 0.2% of it


def test_percentiles_next_to_an_infinite_kl_are_infinite():
    """numpy interpolates toward a +inf neighbour as inf − inf = NaN; a percentile there is +inf."""
    d = aggregate.distribution(np.array([np.inf, 0.2, 0.1]), "kl")
    assert d["kl_p99_9"] == d["kl_p99"] == d["kl_max"] == np.inf and d["kl_inf"] == 1
    assert d["kl_p1"] == pytest.approx(0.1 + 0.02 * (0.2 - 0.1)) and d["kl_median"] == 0.2  # below it, as numpy gives


def test_a_percentile_on_the_finite_value_beside_an_infinite_kl_is_that_value():
    """The linear rule's percentile q of n sorted values is x[h], h = (n − 1)·q/100, where h is whole: with 10 finite
    KLs and one +inf, p90 is the largest finite one (numpy gives 0·inf = NaN there, which was reported as +inf), and
    p95 lies halfway toward the +inf, so it is +inf; the others are the finite values' own interpolations."""
    rng = np.random.default_rng(4)
    finite = np.sort(rng.random(10))
    x = rng.permutation(np.append(finite, np.inf))
    d = aggregate.distribution(x, "kl")
    assert d["kl_p90"] == finite[9] and d["kl_p95"] == d["kl_p99"] == np.inf
    assert d["kl_p10"] == pytest.approx(finite[1], rel=1e-12) and d["kl_median"] == finite[5]
    assert d["kl_p5"] == pytest.approx((finite[0] + finite[1]) / 2, rel=1e-12)  # h = 0.5
    many = np.append(np.linspace(0, 1, 1000), np.inf)  # 1001 values: p99.9 is x[999] = 1, the largest finite one
    assert aggregate.distribution(many, "kl")["kl_p99_9"] == pytest.approx(1.0, rel=1e-12)


def test_percentiles_between_finite_values_below_an_infinite_one():
    """Twelve finite KLs 0.1 … 1.2 and one +inf (n − 1 = 12): p90 at h = 10.8 is 1.1 + 0.8·0.1 = 1.18, p10 at 1.2 is
    0.22, p5 0.16, p1 0.112, p0.1 0.1012 (by hand); p95 and up reach toward the +inf. One value, +inf: every
    percentile is +inf, and the mean has no standard error."""
    x = np.append(np.round(np.arange(1, 13) * 0.1, 10), np.inf)
    d = aggregate.distribution(np.random.default_rng(3).permutation(x), "kl")
    for key, want in (("kl_p90", 1.18), ("kl_p10", 0.22), ("kl_p5", 0.16), ("kl_p1", 0.112), ("kl_p0_1", 0.1012)):
        assert d[key] == pytest.approx(want, rel=1e-12, abs=0), key
    assert d["kl_p95"] == d["kl_p99"] == d["kl_p99_9"] == np.inf and d["kl_median"] == 0.7
    one = aggregate.distribution(np.array([np.inf]), "kl")
    assert all(one[f"kl_{aggregate._pkey(q)}"] == np.inf for q in aggregate.PERCENTILES) and math.isnan(one["kl_mean_se"])


def test_two_values_two_prompts_and_the_confidence_bins_edges():
    """The smallest samples that have a spread, by hand: two values 1 and 3 (sd √2, se 1), two 0/1 hits (se 0.5), two
    clusters of two (residual sums ∓2: √(2 · 8)/4 = 1), a bootstrap over two prompts (finite, around the mean); two
    positions' PPL errors and NLL correlation (±1 from two points). A top-1 probability on a bin's lower edge falls in
    that bin, and 1.0 in the last."""
    assert aggregate.distribution(np.array([1.0, 3.0]), "x")["x_mean_se"] == pytest.approx(1.0, rel=1e-12, abs=0)
    assert aggregate.proportion(np.array([True, False]), "t")["t_se"] == pytest.approx(0.5, rel=1e-12, abs=0)
    assert aggregate.clustered_se(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1])) == pytest.approx(1.0, rel=1e-12, abs=0)
    lo, hi = aggregate.bootstrap_mean(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1]), resamples=200, seed=0)
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= 2.5 <= hi
    rng = np.random.default_rng(6)
    m = {k: rng.random(2) for k in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top", "entropy_ref", "entropy_cand", "p_top_ref")}
    nll_r, nll_c = np.array([1.0, 2.0]), np.array([1.5, 1.0])
    m |= {"top1_agree": np.array([True, False]), "ref_top_rank": np.array([0, 1]), "nll_ref": nll_r, "nll_cand": nll_c}
    a = aggregate.pair_aggregates(m, np.array([0, 1]), ks=(), resamples=0, seed=0)
    d = [0.5, -1.0]  # nll_c − nll_r: sd of two values is |a − b|/√2, so se = |a − b|/2
    assert a["ln_ppl_ratio_se"] == pytest.approx(abs(d[0] - d[1]) / 2, rel=1e-12, abs=0)
    assert a["ppl_ref_se"] == pytest.approx(math.exp(1.5) * math.sqrt(0.5 / 2), rel=1e-12, abs=0)  # var_r = 0.5, over n = 2
    assert a["nll_correlation"] == pytest.approx(-1.0, rel=1e-12, abs=0)
    bins = aggregate.confidence_bins(np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0]), np.ones(8), np.zeros(8, dtype=bool))
    assert [b["positions"] for b in bins] == [1, 1, 1, 1, 1, 1, 2]


def test_per_prompt_of_one_position_and_of_constant_nlls(recwarn):
    """A prompt of one scored position has no standard error or correlation: NaN, quietly; the rest is its value."""
    rng = np.random.default_rng(2)
    n = 5
    m = {k: rng.random(n) for k in ("kl", "kl_rev", "js", "tv", "delta_p", "delta_p_top", "entropy_ref", "entropy_cand", "p_top_ref", "margin_ref", "top5_overlap")}
    m |= {"top1_agree": np.array([True, False, True, True, True]), "ref_top_rank": np.array([0, 2, 0, 0, 0]),
          "nll_ref": np.array([1.0, 2.0, 2.0, 2.0, 2.0]), "nll_cand": np.array([1.5, 2.0, 2.0, 2.0, 2.0])}  # fmt: skip
    one, rest = aggregate.per_prompt(m, np.array([0, 1, 1, 1, 1]), ["a", "b"], ks=(5,))
    assert one["prompt"] == "a" and one["positions"] == 1 and one["kl_mean"] == m["kl"][0] and one["top5_overlap"] == m["top5_overlap"][0]
    assert math.isnan(one["kl_mean_se"]) and math.isnan(one["top1_agree_se"]) and math.isnan(one["nll_correlation"])
    assert one["ppl_ratio"] == pytest.approx(math.exp(0.5))
    assert rest["positions"] == 4 and math.isnan(rest["nll_correlation"]) and rest["ppl_ratio"] == 1.0  # constant NLLs
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_bootstrap_can_be_turned_off():
    values, prompt = np.linspace(0, 1, 100), np.arange(100) // 10
    lo, hi = aggregate.bootstrap_mean(values, prompt, resamples=0, seed=0)
    assert math.isnan(lo) and math.isnan(hi)


def test_no_bootstrap_interval_of_a_mean_that_is_infinite():
    """A +inf KL (q = 0 where p > 0) makes the mean +inf: no interval (NaN, shown as "–"), not one from resampled
    infinities; the same prompts without it get a finite one."""
    prompt = np.repeat(np.arange(10), 5)
    values = np.random.default_rng(0).lognormal(-6, 1, 50)
    lo, hi = aggregate.bootstrap_mean(values, prompt, resamples=200, seed=0)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < values.mean() < hi
    values[7] = np.inf
    lo, hi = aggregate.bootstrap_mean(values, prompt, resamples=200, seed=0)
    assert math.isnan(lo) and math.isnan(hi)
