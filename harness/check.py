"""The quantization regression gate: limits from the config and/or a baseline run, one verdict.

    harness check --config configs/ci-gate.yaml             # compare, then gate (make check-quant)
    harness check --run reports/latest                      # gate a finished run with its config's limits
    harness check --run reports/latest --baseline reports/<run>/run.json --fail kl_mean:+10% top1_agree:-1%

Limits (`gate:` in the config) bound any aggregate of a pair by name: `min`, `max`, and `max_x_floor`
(a multiple of the noise-floor pair's value). `--fail METRIC:[+|-]AMOUNT[%]` (pytest-benchmark's
`--benchmark-compare-fail` idea) fails a pair whose metric moved past the baseline's by more than
AMOUNT in the bad direction: `+` an increase (the default), `-` a decrease; `%` relative, else absolute.
Each limit becomes a check whose `breach()` returns None or a Breach. A breach smaller than the
combined standard error of the numbers it compares is "within noise" (a warning) unless `strict`.
Every breach is printed once as a table; the last line is one JSON verdict, also in `gate.json`, and in the forms CI
systems read (JUnit XML, Markdown, GitHub annotations: `harness.gate_formats`). Exit 0 pass, 1 fail, 2 a usage or
config error (GateError).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import gate_formats, records
from harness.config import Limit

# What may differ between a run and its baseline with only a warning; the prompt set and the
# tokenizer may not (the numbers would not be comparable).
VERSION_KEYS = ("torch", "transformers", "gptqmodel", "optimum")
MACHINE_KEYS = ("cpu", "gpu")
CONFIG_KEYS = ("mode", "text", "generate", "store_dtype", "batch_size", "padding_side", "seed", "zoo_profile")
VARIANT_KEYS = ("source", "dtype", "device", "loader", "backend", "kernels", "cross_vocab")  # kernels: the quantized layers' classes


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
    noise: float | None = None  # the combined standard error it was judged against
    within_noise: bool = False
    passed: bool = False  # a check that held (the verdict lists them too: what was checked, against what)

    def line(self) -> str:
        base = f" (baseline {self.baseline:.4g})" if self.baseline is not None else ""
        verdict = "pass" if self.passed else "within noise" if self.within_noise else "FAIL"
        limit = "" if self.rule.endswith(f" {self.limit:g}") or math.isnan(self.limit) else f" = {self.limit:.4g}"  # "<= 0.01" says it
        if self.rule not in (ABSENT, UNMATCHED) and not math.isfinite(self.limit):  # an inf or NaN baseline or floor: no check can pass
            limit = f" = {self.limit:g}, from the {'baseline' if self.baseline is not None else 'noise floor'}'s value, which is not finite"
            base = ""
        value = "absent" if self.rule == ABSENT else f"{self.value:.4g}"
        return f"{self.pair}: {self.metric} = {value}, limit {self.rule}{limit}{base}: {verdict}"


def standard_error(aggregates: dict, metric: str) -> float | None:
    """The standard error of an aggregate where the run recorded one (or one follows from it)."""
    a = aggregates
    if isinstance(a.get(f"{metric}_se"), (int, float)):
        return float(a[f"{metric}_se"])
    if metric == "ppl_ratio" and "ln_ppl_ratio_se" in a:  # delta method: se(e^x) = e^x se(x)
        return float(a["ppl_ratio"] * a["ln_ppl_ratio_se"])
    if metric == "kl_floor_multiple" and a.get("kl_mean"):  # a record from before kl_floor_multiple_se: the pair's part
        return float(a["kl_floor_multiple"] * a.get("kl_mean_se", math.nan) / a["kl_mean"])
    if metric == "flip_rate" and "top1_agree_se" in a:
        return float(a["top1_agree_se"])
    return None


def _combined(*errors: float | None) -> float | None:
    if any(e is None or not math.isfinite(e) for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors))


def _judge(pair, metric, value, limit, rule, noise, *, baseline=None, strict=False, passed=False) -> Breach:
    within = not passed and not strict and noise is not None and abs(value - limit) < noise
    return Breach(pair, metric, value, limit, rule, baseline, noise, within, passed)


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

    def breach(self, aggregates: dict, floor: dict | None, *, strict: bool = False, pair: str | None = None) -> Breach | None:
        """`pair`: the candidate these aggregates are of (a "*" limit applies to each pair; its breach names it)."""
        out = self.outcome(aggregates, floor, strict=strict, pair=pair)
        return None if out.passed else out

    def outcome(self, aggregates: dict, floor: dict | None, *, strict: bool = False, pair: str | None = None) -> Breach:
        """The check on one pair, passed or not."""
        value = float(aggregates[self.metric])
        se = standard_error(aggregates, self.metric)
        if self.kind == "max_x_floor":
            limit = self.bound * float(floor[self.metric])
            se = _combined(se, None if (f := standard_error(floor, self.metric)) is None else self.bound * f)
        else:
            limit = self.bound
        bad = value < limit if self.kind == "min" else value > limit
        passed = not bad and not math.isnan(value) and math.isfinite(limit)  # an inf or NaN floor fails every check
        return _judge(pair or self.pair, self.metric, value, limit, self.rule, se, strict=strict, passed=passed)


DIVERGENCES = ("kl_", "js_", "tv_")  # aggregates that are 0 only for a pair whose distributions are the same


def _cross_vocab(metric: str) -> bool:
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

    def breach(self, pair: str, aggregates: dict, base: dict, *, strict: bool = False) -> Breach | None:
        out = self.outcome(pair, aggregates, base, strict=strict)
        return None if out.passed else out

    def outcome(self, pair: str, aggregates: dict, base: dict, *, strict: bool = False) -> Breach:
        """The check on one pair against its baseline pair, passed or not."""
        value, ref = float(aggregates[self.metric]), float(base[self.metric])
        step = abs(ref) * self.amount / 100 if self.relative else self.amount
        limit = ref + self.sign * step
        bad = (value - limit) * self.sign > 0
        passed = not bad and not math.isnan(value) and math.isfinite(limit)  # an inf or NaN baseline fails every check
        noise = _combined(standard_error(aggregates, self.metric), standard_error(base, self.metric))
        return _judge(pair, self.metric, value, limit, self.rule, noise, baseline=ref, strict=strict, passed=passed)


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


def _known_metric(metric: str, aggregates: dict, where: str) -> None:
    scalars = sorted(k for k, v in aggregates.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if metric not in scalars:
        if metric == "kl_floor_multiple":
            raise GateError(f"{where}: kl_floor_multiple is the mean KL over the noise floor's, and this run has no "
                            "noise_floor: set one in the config (noise_floor: NAME) and run it again")  # fmt: skip
        if _cross_vocab(metric):
            raise GateError(f"{where}: {metric} is an aggregate of cross_vocab pairs only (a variant with another "
                            "tokenizer, compared over the tokens both share, with cross_vocab: true), and there is none")  # fmt: skip
        close = difflib.get_close_matches(metric, scalars, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(scalars)}"
        raise GateError(f"{where}: unknown metric {metric!r}{hint}")


def same_inputs(ri: dict, mode: str | None, base: records.RunRecord, base_path: Path) -> None:
    """GateError where a run's inputs (`ri`, a record's `inputs`) and the baseline's are of another prompt set or
    tokenizer: then no number of one can be held against the other's."""
    bi = base.inputs
    for key, what in (("token_ids_sha256", "prompt set (token ids)"), ("tokenizer_sha256", "tokenizer")):
        if ri.get(key) and bi.get(key) and ri[key] != bi[key]:
            modes = (base.config.get("mode"), mode)
            why = (f"mode {modes[0]!r} there, {modes[1]!r} here: other positions are scored" if modes[0] != modes[1] else
                   f"{bi.get('prompts_file')}, {bi.get('prompts')} prompts; this run: {ri.get('prompts_file')}, {ri.get('prompts')} prompts")
            raise GateError(f"baseline {base_path} was made with another {what} ({why}): its numbers are not comparable")


def comparability(run: records.RunRecord, base: records.RunRecord, base_path: Path) -> list[str]:
    """Warnings for every difference that may move the numbers; GateError where they cannot be compared."""
    same_inputs(run.inputs, run.config.get("mode"), base, base_path)
    ri, bi = run.inputs, base.inputs
    warnings = []
    if ri.get("segments_sha256") and bi.get("segments_sha256") and ri["segments_sha256"] != bi["segments_sha256"]:
        warnings.append("the scored tokens differ from the baseline's (" + (
            "the reference continued the prompts otherwise" if run.config.get("mode") == "generate" else
            "other windows") + "): the pairs are measured on other positions")  # fmt: skip
    if not (ri.get("token_ids_sha256") and bi.get("token_ids_sha256")):
        warnings.append("the prompt set and tokenizer cannot be verified: one record has no input fingerprints")
    for group, keys, a, b in (("versions", VERSION_KEYS, run.versions, base.versions), ("machine", MACHINE_KEYS, run.machine, base.machine),
                              ("config", CONFIG_KEYS, run.config, base.config)):  # fmt: skip
        for key in keys:
            if key in ("text", "generate") and a.get("mode") == b.get("mode") != key:  # the other mode's settings: unused
                continue
            if a.get(key) != b.get(key):
                warnings.append(f"{group}.{key} differs: baseline {b.get(key)!r}, this run {a.get(key)!r}")
    ref = run.reference
    here, there = (r.variants.get(ref or "", {}).get("fingerprint") for r in (run, base))
    if here and there and here != there:  # a candidate's weights differ by design (a new build); the reference's should not
        warnings.append(f"the reference {ref!r} has other weights than the baseline's ({there} there, {here} here): "
                        "the candidates are measured against another reference")  # fmt: skip
    for name, v in run.variants.items():
        if name not in base.variants:
            continue
        for key in VARIANT_KEYS:  # a key the baseline's record predates is not a difference
            if key in base.variants[name] and v.get(key) != base.variants[name][key]:
                warnings.append(f"{name}.{key} differs: baseline {base.variants[name].get(key)!r}, this run {v.get(key)!r}")
    return warnings


def gate(
    run: records.RunRecord, *, baseline: records.RunRecord | None = None, baseline_path: Path | None = None,
    fail: list[str] = (), strict: bool = False,
) -> dict:  # fmt: skip
    """Runs every check; returns the verdict {"verdict", "breaches", "within_noise", "passed", "warnings", "checks"}."""
    if run.status != "ok":
        raise GateError(f"run {run.run_id} failed ({run.error}); there is nothing to gate")
    if fail and baseline is None:
        raise GateError("--fail compares with a baseline: give --baseline reports/<run>/run.json")
    regressions = [Regression.parse(f) for f in fail]
    checks = thresholds(run.config.get("gate", {}))
    if not checks and not regressions:
        raise GateError(f"nothing to check: the config of run {run.run_id} has no 'gate' limits and no --fail was given")
    pairs = {p.candidate: p.aggregates for p in run.pairs}
    sample = {k: v for agg in pairs.values() for k, v in agg.items()}  # some metrics only some pairs have (cross_vocab)
    for t in checks:
        _known_metric(t.metric, sample, f"gate.{t.pair}")
        if t.pair != "*" and t.pair not in pairs:
            raise GateError(f"gate.{t.pair}: run {run.run_id} has no pair with candidate {t.pair!r}")
        if t.pair != "*" and t.metric not in pairs[t.pair]:
            raise GateError(f"gate.{t.pair}.{t.metric}: pair {t.pair!r} has no {t.metric} in run {run.run_id} "
                            "(only a pair whose variant reads the prompts with another tokenizer has it, with cross_vocab: "
                            f"true; {t.pair!r} has the reference's ids)")  # fmt: skip
        if t.kind == "max_x_floor" and run.noise_floor not in pairs:
            raise GateError(f"gate.{t.pair}.{t.metric}: max_x_floor needs a noise floor, and run {run.run_id} has none")
        if t.kind == "max_x_floor" and t.metric not in pairs[run.noise_floor]:
            raise GateError(f"gate.{t.pair}.{t.metric}: a limit in multiples of the noise floor's {t.metric}, and the floor "
                            f"pair {run.noise_floor!r} has none in run {run.run_id} (only a cross_vocab pair of two "
                            "vocabularies has it): give this limit as max or min")  # fmt: skip
        if t.metric == "kl_floor_multiple" and run.noise_floor not in pairs:
            raise GateError(f"gate.{t.pair}.kl_floor_multiple needs a noise floor, and run {run.run_id} has none")
        # a divergence of 0 in the floor pair means it is the reference itself: no multiple of it means anything (a
        # floor's flip rate or Δp may well be 0 or negative, and a limit of a multiple of it is then still a limit)
        of = "kl_mean" if t.metric == "kl_floor_multiple" else t.metric if t.kind == "max_x_floor" and t.metric.startswith(DIVERGENCES) else None
        if of is not None and not float(pairs[run.noise_floor].get(of, math.nan)) > 0:
            raise GateError(
                f"gate.{t.pair}.{t.metric}: a limit in multiples of the noise floor's {of}, and the floor pair "
                f"{run.noise_floor!r} has {of} {pairs[run.noise_floor].get(of)} in run {run.run_id}: it gives the "
                "reference's distributions exactly, so no multiple of it means anything. Make noise_floor a pair with "
                "numerical noise of its own (the reference in bfloat16, say)"
            )
    base_pairs = {p.candidate: p.aggregates for p in baseline.pairs} if baseline is not None else {}
    either = sample | {k: v for agg in base_pairs.values() for k, v in agg.items()}  # a dropped cross_vocab pair's too
    for r in regressions:
        _known_metric(r.metric, either, f"--fail {r.text}")
    warnings = comparability(run, baseline, baseline_path) if baseline is not None else []
    floor = pairs.get(run.noise_floor) if run.noise_floor else None
    found: list[Breach] = []
    for t in checks:
        for name in [p for p in pairs if t.metric in pairs[p]] if t.pair == "*" else [t.pair]:  # "*": the pairs that have it
            found.append(t.outcome(pairs[name], floor, strict=strict, pair=name))
    if baseline is not None:
        for name, agg in pairs.items():
            if name not in base_pairs:  # a new variant; or a renamed one, which --strict does not let pass unchecked
                unchecked = [r for r in regressions if r.metric in agg]
                if strict and unchecked:
                    found += [Breach(name, r.metric, float(agg[r.metric]), math.nan, UNMATCHED) for r in unchecked]
                else:
                    warnings.append(f"pair {name!r} is not in the baseline: not compared" + ("" if strict else " (with --strict and --fail, a breach)"))
                continue
            for r in regressions:
                if r.metric not in agg:  # a metric of cross_vocab pairs only, and this pair is not one
                    continue
                if r.metric not in base_pairs[name] and _cross_vocab(r.metric):  # the baseline's pair was not one
                    warnings.append(f"--fail {r.text}: baseline pair {name!r} has no {r.metric} (it was not a cross_vocab "
                                    "pair there): not compared")  # fmt: skip
                    continue
                _known_metric(r.metric, base_pairs[name], f"--fail {r.text} (baseline {baseline_path})")
                found.append(r.outcome(name, agg, base_pairs[name], strict=strict))
        for name, agg in base_pairs.items():
            if name in pairs:
                continue
            # a variant dropped from the config, or renamed: its regression would go unseen
            unchecked = [r for r in regressions if r.metric in agg]
            if strict and unchecked:
                found += [Breach(name, r.metric, math.nan, math.nan, ABSENT, float(agg[r.metric])) for r in unchecked]
            else:
                warnings.append(f"baseline pair {name!r} is not in this run: not compared" + ("" if strict else " (with --strict and --fail, a breach)"))
    # one check per pair, metric, rule and limit: "+10%" and "+10.0%", or a "*" limit and the same one on a pair, are one
    found = list({(b.pair, b.metric, b.rule, str(b.limit)): b for b in found}.values())
    n = len(found)
    if n == 0:  # a gate that checked nothing must not pass in CI
        raise GateError(f"no check ran on run {run.run_id}: " + "; ".join(warnings or ["no pair has the metrics the limits name"])
                        + ". With --strict, a pair missing on either side is a breach; or give the variants the baseline's names")  # fmt: skip
    breaches = [b for b in found if not b.within_noise and not b.passed]
    noise = [b for b in found if b.within_noise]
    warnings += [b.line() for b in noise]  # "...: within noise": it passes only because the numbers are noisy
    return {
        "verdict": "fail" if breaches else "pass",
        "breaches": [asdict(b) for b in breaches],
        "within_noise": [asdict(b) for b in noise],
        "passed": [asdict(b) for b in found if b.passed],
        "warnings": warnings,
        "checks": n,
        "run": run.run_id,
        "baseline": baseline.run_id if baseline is not None else None,
    }


def table(verdict: dict) -> str:
    """Every check, failed ones first, then a line with the verdict (a record from before `passed`: the others only)."""
    rows = gate_formats.checks(verdict)
    head = f"{'pair':<26} {'metric':<14} {'value':>11} {'limit':>11} {'baseline':>11}  {'rule':<22} verdict"
    lines = [head, "-" * len(head)] if rows else []
    for b in rows:
        c = gate_formats.cells(b)
        lines.append(f"{c['pair']:<26} {c['metric']:<14} {c['value']:>11} {c['limit']:>11} {c['baseline']:>11}  {c['rule']:<22} {c['verdict']}")
    lines.append(gate_formats.headline(verdict))
    return "\n".join(lines)


def _line(b: dict) -> str:
    return Breach(**b).line()


def load_baseline(path: Path) -> records.RunRecord:
    """A baseline must be a record of this very schema: older records lack what the gate compares."""
    version = records.schema_of(path)
    if version is None:  # missing, unreadable, not JSON, or no version in it: read() says which
        try:
            records.read(path)
        except records.RecordError as exc:
            raise GateError(f"baseline: {exc}") from None
    if version != records.SCHEMA_VERSION:
        raise GateError(
            f"baseline {path} is a schema {version} run record; the gate compares only schema {records.SCHEMA_VERSION} "
            "records: re-run the baseline with this harness"
        )
    try:
        record = records.read(path)
    except records.RecordError as exc:
        raise GateError(str(exc)) from None
    if record.status != "ok":
        raise GateError(f"baseline {path} is the record of a run that failed ({record.error}); it has no numbers to "
                        "compare with: give the run.json of a finished run")  # fmt: skip
    return record


def preflight(cfg, *, baseline: Path | None, fail: list[str]) -> records.RunRecord | None:
    """`harness check --config`'s usage errors before the comparison runs (which may take hours), not after: --fail
    without a baseline or malformed, a baseline that cannot be read or is of another schema, nothing to check, and
    --fail metrics that no pair will have (the config's gate metrics are checked when it loads). Returns the
    baseline's record, whose inputs `same_inputs` holds against the run's once its prompts are tokenized."""
    if fail and baseline is None:
        raise GateError("--fail compares with a baseline: give --baseline reports/<run>/run.json")
    regressions = [Regression.parse(f) for f in fail]
    base = load_baseline(Path(baseline)) if baseline is not None else None
    if not cfg.gate and not regressions:
        raise GateError(f"nothing to check: {cfg.source_file} has no 'gate' limits and no --fail was given")
    from harness.config import gate_metrics

    known = dict.fromkeys(gate_metrics(cfg.metrics.top_k, cfg.noise_floor is not None, cfg.cross_vocab), 0.0)
    for r in regressions:
        _known_metric(r.metric, known, f"--fail {r.text}")
    return base


def main(run_dir: Path, *, baseline: Path | None, fail: list[str], strict: bool, junit: Path | None = None,
         markdown: Path | None = None) -> int:  # fmt: skip
    run = records.read(run_dir)
    base = load_baseline(Path(baseline)) if baseline else None
    verdict = gate(run, baseline=base, baseline_path=baseline, fail=fail, strict=strict)
    summary = gate_formats.markdown(verdict)
    for path, text in ((Path(run_dir) / "gate.md", summary), (markdown, summary), (junit, junit and gate_formats.junit(verdict, _line))):
        if path is not None:
            try:
                gate_formats.write(path, text)
            except OSError as exc:  # the verdict stands without it (a full disk: the paths were checked before the gate)
                verdict["warnings"].append(f"{path} not written: {exc.strerror or exc}")
    if (problem := gate_formats.append_step_summary(summary)) is not None:
        verdict["warnings"].append(problem)

    def save() -> None:
        (Path(run_dir) / "gate.json").write_text(json.dumps(records.json_safe(verdict), indent=2) + "\n")

    save()
    from harness import report

    try:
        report.render(run_dir)  # index.html gains the verdict
    except (OSError, ValueError, KeyError) as exc:  # the verdict stands without it
        verdict["warnings"].append(f"{run_dir}/index.html not re-rendered: {exc}")
        save()
    try:
        if gate_formats.in_github_actions() and (lines := gate_formats.annotations(verdict, _line)):
            print("\n".join(lines))
        for w in verdict["warnings"]:
            print(f"warning: {w}")
        print(table(verdict))
        print(json.dumps(records.json_safe(verdict), separators=(",", ":"), allow_nan=False), flush=True)
    except BrokenPipeError:  # stdout closed early (`| head -1`): the verdict stands, and so does its exit code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
    return 1 if verdict["verdict"] == "fail" else 0

