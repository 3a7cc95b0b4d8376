"""Aggregates against numpy/scipy computed independently, and the bootstrap resamples prompts."""

import math

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
    assert p["top1_agree_se"] == pytest.approx(math.sqrt(hits.mean() * (1 - hits.mean()) / 1000))
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
    # Positions inside a prompt are correlated: the prompt-level interval is wider than a naive one.
    naive = 1.96 * stats.sem(values)
    assert (hi - lo) > 2 * naive


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
    prompt = np.repeat(np.arange(30), 100)
    a = aggregate.pair_aggregates(m, prompt, ks=(5,), resamples=200, seed=0)
    assert a["ppl_ref"] == pytest.approx(np.exp(nll_r.mean())) and a["ppl_cand"] == pytest.approx(np.exp(nll_c.mean()))
    assert a["ln_ppl_ratio"] == pytest.approx(math.log(a["ppl_ratio"]))
    assert a["nll_correlation"] == pytest.approx(stats.pearsonr(nll_r, nll_c)[0])
    assert a["delta_p_rms"] == pytest.approx(np.sqrt(np.mean(m["delta_p"] ** 2)))
    assert sum(b["positions"] for b in a["by_confidence"]) == n
    assert a["kl_mean_ci95"][0] < a["kl_mean"] < a["kl_mean_ci95"][1]


def test_bootstrap_can_be_turned_off():
    values, prompt = np.linspace(0, 1, 100), np.arange(100) // 10
    lo, hi = aggregate.bootstrap_mean(values, prompt, resamples=0, seed=0)
    assert math.isnan(lo) and math.isnan(hi)
