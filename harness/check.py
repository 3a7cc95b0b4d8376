"""The quantization regression gate: limits from the config and/or a baseline run, one verdict.

    harness check --config configs/ci-gate.yaml             # compare, then gate (make check-quant)
    harness check --run reports/latest                      # gate a finished run with its config's limits
    harness check --run reports/latest --baseline reports/<run>/run.json --fail kl_mean:+10% top1_agree:-1%

Limits (`gate:` in the config) bound any aggregate of a pair by name: `min`, `max`, and `max_x_floor`
(a multiple of the noise-floor pair's value). `--fail METRIC:[+|-]AMOUNT[%]` (pytest-benchmark's
`--benchmark-compare-fail` idea) fails a pair whose metric moved past the baseline's by more than
AMOUNT in the bad direction: `+` an increase (the default), `-` a decrease; `%` relative, else absolute.
Each limit becomes a check whose `breach()` returns None or a Breach (`harness.gate_checks`). A breach smaller than the
standard error of the numbers it compares (over prompts; against a baseline or the noise-floor pair, that of the
difference paired by prompt where it can be) is "within noise" (a warning) unless `strict`.
Every breach is printed once as a table; the last line is one JSON verdict, also in `gate.json`, and in the forms CI
systems read (JUnit XML, Markdown, GitHub annotations: `harness.gate_formats`). Exit 0 pass, 1 fail, 2 a usage or
config error (GateError).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from harness import gate_formats, records
from harness.gate_checks import ABSENT, DIVERGENCES, UNMATCHED, Breach, GateError, Regression, cross_vocab_only, known_metric, thresholds

# What may differ between a run and its baseline with only a warning; the prompt set and the
# tokenizer may not (the numbers would not be comparable).
VERSION_KEYS = ("torch", "transformers", "gptqmodel", "optimum")
MACHINE_KEYS = ("cpu", "gpu")
CONFIG_KEYS = ("mode", "text", "generate", "store_dtype", "batch_size", "padding_side", "seed", "zoo_profile")
VARIANT_KEYS = ("source", "dtype", "device", "loader", "backend", "kernels", "cross_vocab")  # kernels: the quantized layers' classes


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
        known_metric(t.metric, sample, f"gate.{t.pair}")
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
    run_rows, base_rows = ({p.candidate: p.prompts for p in r.pairs} if r is not None else {} for r in (run, baseline))
    either = sample | {k: v for agg in base_pairs.values() for k, v in agg.items()}  # a dropped cross_vocab pair's too
    for r in regressions:
        known_metric(r.metric, either, f"--fail {r.text}")
    warnings = comparability(run, baseline, baseline_path) if baseline is not None else []
    floor = pairs.get(run.noise_floor) if run.noise_floor else None
    found: list[Breach] = []
    for t in checks:
        for name in [p for p in pairs if t.metric in pairs[p]] if t.pair == "*" else [t.pair]:  # "*": the pairs that have it
            rows = (run_rows[name], run_rows[run.noise_floor]) if t.kind == "max_x_floor" else None  # paired by prompt
            found.append(t.outcome(pairs[name], floor, strict=strict, pair=name, rows=rows))
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
                if r.metric not in base_pairs[name] and cross_vocab_only(r.metric):  # the baseline's pair was not one
                    warnings.append(f"--fail {r.text}: baseline pair {name!r} has no {r.metric} (it was not a cross_vocab "
                                    "pair there): not compared")  # fmt: skip
                    continue
                known_metric(r.metric, base_pairs[name], f"--fail {r.text} (baseline {baseline_path})")
                rows = (run_rows[name], base_rows[name])  # per prompt: the band of the difference, paired by prompt
                found.append(r.outcome(name, agg, base_pairs[name], strict=strict, rows=rows))
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
        known_metric(r.metric, known, f"--fail {r.text}")
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

