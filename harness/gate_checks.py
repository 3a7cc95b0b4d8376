"""The gate's checks: each limit as an object whose `breach()` returns None or a Breach (pytest-benchmark's idea).

    harness check --run reports/latest --baseline reports/<run>/run.json --fail kl_mean:+10% top1_agree:-1%

`Threshold` is one bound of the config's `gate:` (`min`, `max`, `max_x_floor`: a multiple of the noise-floor pair's
value); `Regression` is one `--fail METRIC:[+|-]AMOUNT[%]` against the baseline's pair. A check that breaks its limit by
less than the standard error of the numbers it compares (`standard_error`: over prompts where the record has it;
against a baseline or the noise-floor pair, `paired_error`, of the difference paired by prompt, where it can be) is
"within noise" unless strict. `harness.check` runs them on a run and gives the verdict.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from harness import gate_formats
from harness.config import Limit

ABSENT = gate_formats.ABSENT  # "present in this run": the rule a baseline pair missing from the run breaks (with --strict and --fail)
UNMATCHED = "has a baseline pair"  # the rule a run pair missing from the baseline breaks (with --strict and --fail)


class GateError(ValueError):
    """A usage or config problem (exit 2), not a regression."""


@dataclass(frozen=True)
class Breach:
    pair: str
    metric: str
    value: float
    limit: float
    rule: str  # e.g. "<= 40 x floor", "+10% vs baseline"
    baseline: float | None = None
    noise: float | None = None  # the standard error it was judged against (of value − limit)
    within_noise: bool = False
    passed: bool = False  # a check that held (the verdict lists them too: what was checked, against what)
    paired: bool = False  # its noise is the error of value − limit paired by prompt (paired_error)

    def line(self) -> str:
        base = f" (baseline {self.baseline:.4g})" if self.baseline is not None else ""
        verdict = "pass" if self.passed else "within noise" if self.within_noise else "FAIL"
        limit = "" if self.rule.endswith(f" {self.limit:g}") or math.isnan(self.limit) else f" = {self.limit:.4g}"  # "<= 0.01" says it
        if self.rule not in (ABSENT, UNMATCHED) and not math.isfinite(self.limit):  # an inf or NaN baseline or floor: no check can pass
            limit = f" = {self.limit:g}, from the {'baseline' if self.baseline is not None else 'noise floor'}'s value, which is not finite"
            base = ""
        value = "absent" if self.rule == ABSENT else f"{self.value:.4g}"
        if self.within_noise and self.noise is not None:  # the band it is within, and what it is the error of
            verdict += f" (± {self.noise:.2g}{', paired by prompt' if self.paired else ''})"
        return f"{self.pair}: {self.metric} = {value}, limit {self.rule}{limit}{base}: {verdict}"


def standard_error(aggregates: dict, metric: str) -> float | None:
    """The standard error of an aggregate where the run recorded one (or one follows from it): the one over prompts
    (`*_se_prompts`: the positions of one prompt are not independent) where the record has it and it is finite, else
    the per-position one (a record from before 2026-12-07, or a run of one prompt)."""
    prompts = _error(aggregates, metric, "_se_prompts")
    return prompts if prompts is not None and math.isfinite(prompts) else _error(aggregates, metric, "_se")


def _error(a: dict, metric: str, suffix: str) -> float | None:
    if isinstance(a.get(f"{metric}{suffix}"), (int, float)):
        return float(a[f"{metric}{suffix}"])
    if metric == "ppl_ratio" and f"ln_ppl_ratio{suffix}" in a:  # delta method: se(e^x) = e^x se(x)
        return float(a["ppl_ratio"] * a[f"ln_ppl_ratio{suffix}"])
    if metric == "kl_floor_multiple" and suffix == "_se" and a.get("kl_mean"):  # a record from before kl_floor_multiple_se: the pair's part
        return float(a["kl_floor_multiple"] * a.get("kl_mean_se", math.nan) / a["kl_mean"])
    if metric == "flip_rate" and f"top1_agree{suffix}" in a:
        return float(a[f"top1_agree{suffix}"])
    return None


def _combined(*errors: float | None) -> float | None:
    if any(e is None or not math.isfinite(e) for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors))


def _judge(pair, metric, value, limit, rule, noise, *, baseline=None, strict=False, passed=False, paired=False) -> Breach:
    if noise is not None and not math.isfinite(noise):  # an error that overflowed (a PPL near 1e300) excuses nothing
        noise = None
    within = not passed and not strict and noise is not None and abs(value - limit) < noise
    return Breach(pair, metric, value, limit, rule, baseline, noise, within, passed, paired)


@dataclass(frozen=True)
class Threshold:
    """One bound from the config's `gate:` on one pair's aggregate."""

    pair: str
    metric: str
    kind: str  # "min", "max" or "max_x_floor"
    bound: float

    @property
    def rule(self) -> str:
        return {"min": f">= {self.bound:g}", "max": f"<= {self.bound:g}", "max_x_floor": f"<= {self.bound:g} x floor"}[self.kind]

    def breach(self, aggregates: dict, floor: dict | None, *, strict: bool = False, pair: str | None = None,
               rows: tuple[list[dict], list[dict]] | None = None) -> Breach | None:  # fmt: skip
        """`pair`: the candidate these aggregates are of (a "*" limit applies to each pair; its breach names it)."""
        out = self.outcome(aggregates, floor, strict=strict, pair=pair, rows=rows)
        return None if out.passed else out

    def outcome(self, aggregates: dict, floor: dict | None, *, strict: bool = False, pair: str | None = None,
                rows: tuple[list[dict], list[dict]] | None = None) -> Breach:  # fmt: skip
        """The check on one pair, passed or not. `rows`: this pair's per-prompt rows and the floor pair's, for a
        `max_x_floor` band of value − bound × floor paired by prompt (the two pairs of one run share its prompts)."""
        value = float(aggregates[self.metric])
        se = standard_error(aggregates, self.metric)
        if self.kind == "max_x_floor":
            ref = float(floor[self.metric])
            limit = self.bound * ref
            paired = paired_error(self.metric, *rows, self.bound, value=value, ref=ref) if rows is not None else None
            se = paired if paired is not None else _combined(se, None if (f := standard_error(floor, self.metric)) is None else self.bound * f)
        else:
            limit, paired = self.bound, None
        bad = value < limit if self.kind == "min" else value > limit
        passed = not bad and not math.isnan(value) and math.isfinite(limit)  # an inf or NaN floor fails every check
        return _judge(pair or self.pair, self.metric, value, limit, self.rule, se, strict=strict, passed=passed, paired=paired is not None)


DIVERGENCES = ("kl_", "js_", "tv_")  # aggregates that are 0 only for a pair whose distributions are the same


def cross_vocab_only(metric: str) -> bool:
    """Whether only a pair of two vocabularies has this aggregate (align.AGGREGATES; align imports torch: not at import)."""
    from harness.align import AGGREGATES

    return metric in AGGREGATES


_FAIL = re.compile(r"^(?P<metric>[A-Za-z_][A-Za-z0-9_]*):(?P<sign>[+-]?)(?P<amount>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?P<pct>%?)$")


@dataclass(frozen=True)
class Regression:
    """`--fail METRIC:[+|-]AMOUNT[%]`: the metric may not move past the baseline's in the bad direction."""

    metric: str
    sign: int  # +1: an increase is bad; -1: a decrease is bad
    amount: float
    relative: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> Regression:
        m = _FAIL.match(text.strip())
        if not m or not math.isfinite(float(m["amount"])):  # 1e400 reads as inf: a bound that passes everything
            raise GateError(
                f"--fail {text!r}: expected METRIC:[+|-]AMOUNT[%], e.g. kl_mean:+10% (fail if it grows by more "
                "than 10%), top1_agree:-1% (fail if it drops by more than 1%), kl_mean:+0.001 (absolute)"
            )
        return cls(m["metric"], -1 if m["sign"] == "-" else 1, float(m["amount"]), bool(m["pct"]), text.strip())

    @property
    def rule(self) -> str:
        return f"{'+' if self.sign > 0 else '-'}{self.amount:g}{'%' if self.relative else ''} vs baseline"

    def breach(self, pair: str, aggregates: dict, base: dict, *, strict: bool = False,
               rows: tuple[list[dict], list[dict]] | None = None) -> Breach | None:  # fmt: skip
        out = self.outcome(pair, aggregates, base, strict=strict, rows=rows)
        return None if out.passed else out

    def outcome(self, pair: str, aggregates: dict, base: dict, *, strict: bool = False,
                rows: tuple[list[dict], list[dict]] | None = None) -> Breach:  # fmt: skip
        """The check on one pair against its baseline pair, passed or not. `rows`: the pair's per-prompt rows in the
        run and in the baseline (records' `prompts`), for the noise band of the difference paired by prompt."""
        value, ref = float(aggregates[self.metric]), float(base[self.metric])
        step = abs(ref) * self.amount / 100 if self.relative else self.amount
        limit = ref + self.sign * step
        bad = (value - limit) * self.sign > 0
        passed = not bad and not math.isnan(value) and math.isfinite(limit)  # an inf or NaN baseline fails every check
        # value − limit = value − scale·ref − constant: relative, |ref| = ref·sign(ref)
        scale = 1 + self.sign * math.copysign(self.amount / 100, ref) if self.relative else 1.0
        paired = paired_error(self.metric, *rows, scale, value=value, ref=ref) if rows is not None else None
        noise = paired if paired is not None else _combined(standard_error(aggregates, self.metric),
                                                            None if (e := standard_error(base, self.metric)) is None else scale * e)  # fmt: skip
        return _judge(pair, self.metric, value, limit, self.rule, noise, baseline=ref, strict=strict, passed=passed, paired=paired is not None)


# the aggregates that are position-weighted means of a per-position value, and the key of that mean in each prompt's
# row (flip_rate: 1 − top1_agree, whose difference has the same spread; ppl_ratio: e^ln_ppl_ratio, by the delta method)
PAIRED = {"kl_mean": "kl_mean", "kl_rev_mean": "kl_rev_mean", "js_mean": "js_mean", "tv_mean": "tv_mean",
          "top1_agree": "top1_agree", "flip_rate": "top1_agree", "delta_p_mean": "delta_p_mean", "ln_ppl_ratio": "ln_ppl_ratio",
          "ppl_ratio": "ln_ppl_ratio"}  # fmt: skip


def paired_error(metric: str, rows: list[dict], base_rows: list[dict], scale: float, *, value: float = math.nan,
                 ref: float = math.nan) -> float | None:  # fmt: skip
    """The standard error of (a pair's metric − scale × another's), both means over the positions of the same prompts
    (`rows`, `base_rows`: their per-prompt rows; the other pair is the baseline's, or the run's noise-floor pair),
    paired by prompt: √(G/(G−1) Σ_g (n_g (a_g − scale·b_g) − n_g D)²) / N, D the difference over all N positions, G
    prompts (cluster-robust, as aggregate.clustered_se). ppl_ratio = e^(mean ln ratio): its rows' ln ratios weighted
    by this pair's `value` and scale × the other's `ref` (d e^x = e^x dx). A prompt hard for one build is hard for
    the other: the two means move together, and their standard errors combined as if independent make a band several
    times too wide. None where it cannot be paired: a metric that is not such a mean (PAIRED), rows missing (an older
    record), other prompts or other positions per prompt, one prompt, or a value that is not finite. From 2 prompts on,
    unlike the record's own errors over prompts (aggregate.MIN_PROMPTS): a band from few prompts is itself noisy, but
    the combined one instead is the lenient side."""
    key = PAIRED.get(metric)
    if key is None or not rows or not base_rows:
        return None
    a = {r["prompt"]: (r.get("positions"), r.get(key)) for r in rows}
    b = {r["prompt"]: (r.get("positions"), r.get(key)) for r in base_rows}
    if a.keys() != b.keys() or len(a) < 2 or len(a) != len(rows) or len(b) != len(base_rows) or any(a[p][0] != b[p][0] for p in a):
        return None
    n = [a[p][0] for p in a]
    if any(not isinstance(x, (int, float)) or not math.isfinite(x) for p in a for x in (a[p][1], b[p][1])) or not all(n):
        return None
    wa, wb = (value, scale * ref) if metric == "ppl_ratio" else (1.0, scale)
    if not (math.isfinite(wa) and math.isfinite(wb)):
        return None
    sums = [k * (wa * a[p][1] - wb * b[p][1]) for k, p in zip(n, a)]  # each prompt's part of N·D
    total = sum(n)
    d = math.fsum(sums) / total
    return math.sqrt(len(n) / (len(n) - 1) * math.fsum((x - k * d) ** 2 for x, k in zip(sums, n))) / total


def thresholds(gate: dict) -> list[Threshold]:
    """The config's `gate:` (as the run record holds it) as checks."""
    out = []
    for pair, limits in (gate or {}).items():
        for metric, raw in limits.items():
            limit = raw if isinstance(raw, Limit) else Limit.model_validate(raw)
            for kind in ("min", "max", "max_x_floor"):
                if (bound := getattr(limit, kind)) is not None:
                    out.append(Threshold(pair, metric, kind, float(bound)))
    return out


def known_metric(metric: str, aggregates: dict, where: str) -> None:
    scalars = sorted(k for k, v in aggregates.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if metric not in scalars:
        if metric == "kl_floor_multiple":
            raise GateError(f"{where}: kl_floor_multiple is the mean KL over the noise floor's, and this run has no "
                            "noise_floor: set one in the config (noise_floor: NAME) and run it again")  # fmt: skip
        if cross_vocab_only(metric):
            raise GateError(f"{where}: {metric} is an aggregate of cross_vocab pairs only (a variant with another "
                            "tokenizer, compared over the tokens both share, with cross_vocab: true), and there is none")  # fmt: skip
        close = difflib.get_close_matches(metric, scalars, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(scalars)}"
        raise GateError(f"{where}: unknown metric {metric!r}{hint}")
