"""Aggregates of per-position metrics: pure reducers from arrays to numbers with their uncertainty.

    harness compare --config configs/default.yaml      # calls pair_aggregates() once per pair

Means carry a standard error (sample std / √n), proportions a binomial one (√(p̂(1−p̂)/(n−1)), which
is the same with the 0/1 hits as the sample, and llama.cpp's "Same top p" ±): llama.cpp's, which take the
positions as independent. They are not: the positions of one prompt share its text and context, so the
headline means also carry a standard error over prompts (`*_se_prompts`, cluster-robust by prompt), 1.3 to
3 times larger on the default run, which the summary shows and the gate judges noise by; and the mean
KL and the top-1 agreement a bootstrap confidence interval that resamples prompts. Everything is
deterministic for a seed.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy import stats

PERCENTILES = (99.9, 99, 95, 90, 10, 5, 1, 0.1)
CONFIDENCE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0)  # edges on the reference's top-1 probability


def _pkey(q: float) -> str:
    return "p" + f"{q:g}".replace(".", "_")


def distribution(x: np.ndarray, name: str) -> dict[str, float]:
    """mean ± se, median, percentiles, min, max of `x`, keys prefixed by `name`; +inf values counted."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    inf = int(np.isinf(x).sum())
    out = {
        f"{name}_mean": float(x.mean()),
        f"{name}_mean_se": float(x.std(ddof=1) / math.sqrt(n)) if n > 1 and not inf else float("nan"),
        f"{name}_median": float(np.median(x)),
        f"{name}_min": float(x.min()),
        f"{name}_max": float(x.max()),
        f"{name}_inf": inf,
    }
    if not inf:
        out |= {f"{name}_{_pkey(q)}": float(v) for q, v in zip(PERCENTILES, np.percentile(x, PERCENTILES))}
        return out
    # numpy's interpolation gives NaN next to a +inf (0·inf where a percentile falls on the finite value beside it,
    # inf − inf between them), and its index (n − 1)·q/100 in floats may pass a whole one by 1e-13 toward the +inf:
    # the linear rule by hand, its index exact, so a percentile on a finite value is that value, one past it +inf
    xs = np.sort(x)
    for q in PERCENTILES:
        h = Fraction(str(q)) * (n - 1) / 100
        lo = math.floor(h)
        a, b = xs[lo], xs[min(lo + 1, n - 1)]
        out[f"{name}_{_pkey(q)}"] = float(a) if h == lo else math.inf if math.isinf(b) else float(a + float(h - lo) * (b - a))
    return out


def proportion(hits: np.ndarray, name: str) -> dict[str, float]:
    p, n = float(np.mean(hits)), len(hits)
    return {name: p, f"{name}_se": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")}


def bootstrap_mean(values: np.ndarray, prompt: np.ndarray, *, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile CI of the position-weighted mean of `values`, resampling whole prompts."""
    ids = np.unique(prompt)
    if resamples == 0 or len(ids) < 2 or not np.isfinite(values).all():  # 0: intervals turned off
        return float("nan"), float("nan")
    sums = np.bincount(np.searchsorted(ids, prompt), weights=values, minlength=len(ids))
    counts = np.bincount(np.searchsorted(ids, prompt), minlength=len(ids)).astype(np.float64)
    res = stats.bootstrap(
        (sums, counts),
        lambda s, c, axis=-1: s.sum(axis=axis) / c.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def confidence_bins(p_top: np.ndarray, kl: np.ndarray, flip: np.ndarray) -> list[dict]:
    """KL and flip rate by the reference's top-1 probability: drift concentrates where it is unsure."""
    rows = []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:], strict=True):
        inside = (p_top >= lo) & ((p_top < hi) if hi < 1.0 else (p_top <= hi))
        n = int(inside.sum())
        rows.append({
            "p_top_lo": lo, "p_top_hi": hi, "positions": n,
            "kl_mean": float(kl[inside].mean()) if n else float("nan"),
            "flip_rate": float(flip[inside].mean()) if n else float("nan"),
        })  # fmt: skip
    return rows


def clustered_se(x: np.ndarray, cluster: np.ndarray) -> float:
    """The standard error of mean(x) where the values of one cluster are not independent (the positions of one window):
    sqrt(G / (G - 1) * sum over clusters of (sum of x - mean)^2) / n, the cluster-robust (CR1) estimate; NaN from
    fewer than 2 clusters. With one value per cluster it is the sample standard deviation / sqrt(n)."""
    groups, at = np.unique(cluster, return_inverse=True)
    if len(groups) < 2:
        return float("nan")
    residual = np.bincount(at, weights=np.asarray(x, dtype=np.float64) - np.mean(x, dtype=np.float64))
    return float(math.sqrt(len(groups) / (len(groups) - 1) * (residual**2).sum()) / len(x))


def _clustered_or_nan(x: np.ndarray, cluster: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return clustered_se(x, cluster) if len(x) and np.isfinite(x).all() else float("nan")  # an infinite mean has no ±


# from fewer prompts, a standard error over prompts is the larger of it and the per-position one: the cluster-robust
# estimate then has few degrees of freedom (G − 1), and from 2 prompts it is half the time under two-thirds of the truth
MIN_PROMPTS = 10


def prompt_errors(m: dict[str, np.ndarray], prompt: np.ndarray, nll_diff: np.ndarray, out: dict) -> dict:
    """The standard errors over prompts (`*_se_prompts`, clustered_se by prompt) of the headline aggregates in `out`
    (pair_aggregates' so far): each `distribution`'s mean, the top-1 agreement, ln PPL ratio (`nll_diff`: candidate
    NLL − reference NLL per position), the RMS Δp's, both PPLs, their ratio and difference (delta method, as the
    per-position ones in `out`). From fewer than MIN_PROMPTS prompts, each is the larger of that and the per-position
    one (from one prompt, the per-position one)."""
    nll_r, nll_c = (np.asarray(m[k], dtype=np.float64) for k in ("nll_ref", "nll_cand"))
    se = {f"{name}_mean_se_prompts": _clustered_or_nan(m[name], prompt)
          for name in ("kl", "kl_rev", "js", "tv", "kl_smoothed", "kl_rev_smoothed", "delta_p") if name in m}  # fmt: skip
    se["top1_agree_se_prompts"] = _clustered_or_nan(m["top1_agree"], prompt)
    se["ln_ppl_ratio_se_prompts"] = _clustered_or_nan(nll_diff, prompt)
    for name in ("delta_p", "delta_p_top"):
        rms = out[f"{name}_rms"]
        se[f"{name}_rms_se_prompts"] = _clustered_or_nan(np.square(m[name], dtype=np.float64), prompt) / (2 * rms) if rms > 0 else float("nan")
    se["ppl_ref_se_prompts"] = out["ppl_ref"] * _clustered_or_nan(nll_r, prompt)
    se["ppl_cand_se_prompts"] = out["ppl_cand"] * _clustered_or_nan(nll_c, prompt)
    se["ppl_ratio_se_prompts"] = out["ppl_ratio"] * se["ln_ppl_ratio_se_prompts"]
    with np.errstate(invalid="ignore"):  # an infinite PPL: no spread
        se["ppl_diff_se_prompts"] = _clustered_or_nan(out["ppl_cand"] * nll_c - out["ppl_ref"] * nll_r, prompt)
    if len(np.unique(prompt)) < MIN_PROMPTS:
        for key, v in se.items():
            per_position = out.get(key.removesuffix("_prompts"), float("nan"))
            se[key] = float(max(v, per_position) if math.isfinite(v) and math.isfinite(per_position) else per_position if math.isnan(v) else v)
    return se


def depth_bins(depth: np.ndarray, window: np.ndarray, kl: np.ndarray, flip: np.ndarray, nll_diff: np.ndarray,
               span: tuple[int, int] | None = None) -> list[dict]:  # fmt: skip
    """KL, flip rate and ln PPL ratio by context depth (the tokens a position's window gives the model before it), in
    bins of powers of two, [2^k, 2^(k+1)), from the shallowest scored position's bin to the deepest's, the outer
    bounds cut to the depths scored (`span`: the run's, so that a pair scoring some positions only, cross_vocab, has
    the other pairs' bins): drift that grows along the context (half-precision attention or rotary positions, a
    quantized KV path) shows here. Standard errors are clustered by window (`window`: each position's forward pass),
    whose positions are not independent; with fewer than 2 windows in a bin, NaN."""
    if not len(depth):
        return []
    rows, (first, last) = [], span or (int(depth.min()), int(depth.max()))
    bounds = [(0, 0)] if first == 0 else []  # a position scored from no context (a model with a BOS token: none here)
    for k in range(max(first, 1).bit_length() - 1, last.bit_length()):
        bounds.append((max(2**k, first), min(2 ** (k + 1) - 1, last)))
    for lo, hi in bounds:
        inside = (depth >= lo) & (depth <= hi)
        n = int(inside.sum())
        x, d, w = kl[inside].astype(np.float64), nll_diff[inside].astype(np.float64), window[inside]
        rows.append({
            "depth_lo": lo, "depth_hi": hi, "positions": n, "windows": int(len(np.unique(w))),
            "kl_mean": float(x.mean()) if n else float("nan"),
            "kl_mean_se": clustered_se(x, w) if n else float("nan"),
            "flip_rate": float(flip[inside].mean()) if n else float("nan"),
            "ln_ppl_ratio": float(d.mean()) if n else float("nan"),
            "ln_ppl_ratio_se": clustered_se(d, w) if n else float("nan"),
        })  # fmt: skip
    return rows


def pair_aggregates(m: dict[str, np.ndarray], prompt: np.ndarray, *, ks, resamples: int, seed: int,
                    depth_span: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """Every aggregate of one (reference, candidate) pair from its per-position metric arrays (`depth_span`: the
    run's shallowest and deepest scored depths, depth_bins' `span`)."""
    n = len(m["kl"])
    out: dict = {"positions": n}
    for name in ("kl", "kl_rev", "js", "tv", "kl_smoothed", "kl_rev_smoothed"):
        if name in m:
            out |= distribution(m[name], name)
    out |= proportion(m["top1_agree"], "top1_agree")
    for k in ks:
        out[f"top{k}_overlap"] = float(np.mean(m[f"top{k}_overlap"]))
    out["ref_top_rank_mean"] = float(np.mean(m["ref_top_rank"]))
    for name in ("delta_p", "delta_p_top"):
        x = np.asarray(m[name], dtype=np.float64)
        sq = x**2
        out[f"{name}_rms"] = float(np.sqrt(sq.mean()))
        # delta method: se(√mean(x²)) = se(mean(x²)) / (2·rms)
        out[f"{name}_rms_se"] = float(sq.std(ddof=1) / math.sqrt(n) / (2 * out[f"{name}_rms"])) if n > 1 and sq.any() else float("nan")
        out |= {f"{name}_abs_{_pkey(q)}": float(np.percentile(np.abs(x), q)) for q in (99, 95, 90)}
    # the signed Δp of the actual next token, as llama.cpp's --kl-divergence gives it (its quartiles too): where the
    # candidate loses probability on the text, the mean and the low percentiles go negative
    out |= {k: v for k, v in distribution(m["delta_p"], "delta_p").items() if k != "delta_p_inf"}
    out |= {f"delta_p_{_pkey(q)}": float(np.percentile(m["delta_p"], q)) for q in (75, 25)}
    nll_r, nll_c = np.asarray(m["nll_ref"], dtype=np.float64), np.asarray(m["nll_cand"], dtype=np.float64)
    out["ppl_ref"] = float(np.exp(nll_r.mean()))
    out["ppl_cand"] = float(np.exp(nll_c.mean()))
    out["ppl_ratio"] = out["ppl_cand"] / out["ppl_ref"]
    out["ppl_diff"] = out["ppl_cand"] - out["ppl_ref"]
    d = nll_c - nll_r
    out["ln_ppl_ratio"] = float(d.mean())
    if n > 1:  # standard errors by the delta method, from the per-position NLLs (and their covariance, for the diff)
        with np.errstate(invalid="ignore"):  # an NLL of +inf (a next token of probability 0): NaN, no spread
            cov = np.cov(nll_r, nll_c) / n  # of the two mean NLLs
        out["ln_ppl_ratio_se"] = float(d.std(ddof=1) / math.sqrt(n)) if np.isfinite(d).all() else float("nan")
        out["ppl_ref_se"] = out["ppl_ref"] * math.sqrt(cov[0, 0])
        out["ppl_cand_se"] = out["ppl_cand"] * math.sqrt(cov[1, 1])
        out["ppl_ratio_se"] = out["ppl_ratio"] * out["ln_ppl_ratio_se"]
        # se(pc - pr) = se of the mean of pc·nll_c - pr·nll_r: the spread of that one series rather than
        # pc²var_c + pr²var_r - 2·pr·pc·cov, whose terms cancel to rounding (or below 0) for nearly equal models
        lin = out["ppl_cand"] * nll_c - out["ppl_ref"] * nll_r
        out["ppl_diff_se"] = float(lin.std(ddof=1) / math.sqrt(n)) if np.isfinite(lin).all() else float("nan")
    else:
        out |= dict.fromkeys(("ln_ppl_ratio_se", "ppl_ref_se", "ppl_cand_se", "ppl_ratio_se", "ppl_diff_se"), float("nan"))
    out["nll_correlation"] = float(np.corrcoef(nll_r, nll_c)[0, 1]) if n > 1 and np.isfinite(nll_r).all() and np.isfinite(nll_c).all() else float("nan")
    out["entropy_ref_mean"] = float(m["entropy_ref"].mean())
    out["entropy_cand_mean"] = float(m["entropy_cand"].mean())
    out["flip_rate"] = 1.0 - out["top1_agree"]
    out["by_confidence"] = confidence_bins(m["p_top_ref"], m["kl"], ~m["top1_agree"].astype(bool))
    if "depth" in m:
        out["by_depth"] = depth_bins(m["depth"], m["window"], m["kl"], ~m["top1_agree"].astype(bool), d, depth_span)
    out |= prompt_errors(m, prompt, d, out)
    out["kl_mean_ci95"] = bootstrap_mean(m["kl"], prompt, resamples=resamples, seed=seed)
    out["top1_agree_ci95"] = bootstrap_mean(m["top1_agree"].astype(np.float64), prompt, resamples=resamples, seed=seed)
    return out


# what per_prompt keeps of each prompt's pair_aggregates (and its top-k overlaps): the summary's numbers, prompt by prompt
PROMPT_AGGREGATES = ("positions", "kl_mean", "kl_mean_se", "kl_median", "kl_p99", "kl_max", "kl_inf", "kl_rev_mean", "js_mean",
                     "tv_mean", "top1_agree", "top1_agree_se", "ref_top_rank_mean", "delta_p_mean", "delta_p_rms", "ppl_ref",
                     "ppl_cand", "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_se", "nll_correlation", "entropy_ref_mean",
                     "entropy_cand_mean")  # fmt: skip


def per_prompt(m: dict[str, np.ndarray], prompt: np.ndarray, names: list[str], ks=()) -> list[dict]:
    """The pair's aggregates for each prompt on its own: pair_aggregates over that prompt's positions (the same
    definitions; no bootstrap), PROMPT_AGGREGATES and the top-k overlaps of it. A standard error or correlation that
    one position cannot give is NaN."""
    rows = []
    keys = (*PROMPT_AGGREGATES, *(f"top{k}_overlap" for k in ks))
    for p in np.unique(prompt):
        inside = prompt == p
        with np.errstate(invalid="ignore", divide="ignore"):  # a prompt whose NLLs are constant has no correlation
            # without depth and window: no depth bins per prompt, which PROMPT_AGGREGATES leaves out
            a = pair_aggregates({k: v[inside] for k, v in m.items() if k not in ("depth", "window")}, prompt[inside], ks=ks, resamples=0, seed=0)
        rows.append({"prompt": names[int(p)], **{k: a[k] for k in keys}})
    return rows


def warp_summary(finite: np.ndarray, kept: np.ndarray, pad_mass: np.ndarray) -> dict:
    """Per position: `finite` [P] entries the warpers (top-k, top-p, ...) leave finite, `kept` [P] raw
    probability mass on those entries, `pad_mass` [P] raw mass on the padding columns past the tokenizer."""
    finite = np.asarray(finite, dtype=np.float64)
    out = {"positions": len(finite)}
    for name, x in (("finite", finite), ("kept_mass", np.asarray(kept, dtype=np.float64))):
        out |= {f"{name}_mean": float(x.mean()), f"{name}_min": float(x.min()), f"{name}_max": float(x.max())}
        out |= {f"{name}_{_pkey(q)}": float(np.percentile(x, q)) for q in (10, 50, 90)}
    out["single_finite_rate"] = float(np.mean(finite == 1))  # steps where sampling is in effect greedy
    out["pad_mass_max"] = float(np.max(pad_mass))
    return out
