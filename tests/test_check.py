"""The quantization gate: limit and --fail parsing (harness.gate_checks), noise handling and comparability on synthetic
records; then on the micro family, the good builds pass and the deliberately damaged ones fail."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness import check, gate_checks, records
from harness.cli import main
from harness.gate_checks import GateError, Regression, Threshold, standard_error

ROOT = Path(__file__).parents[1]
SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"
INPUTS = {"prompts_file": "p.jsonl", "prompts": 8, "token_ids_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}


def _agg(kl: float, kl_se: float, top1: float, n: int = 1000) -> dict:
    return {"positions": n, "kl_mean": kl, "kl_mean_se": kl_se, "top1_agree": top1, "flip_rate": 1 - top1,
            "top1_agree_se": math.sqrt(top1 * (1 - top1) / n), "ppl_ratio": 1.01, "ln_ppl_ratio_se": 0.002,
            "by_confidence": []}  # fmt: skip


def _run(pairs: dict[str, dict], gate: dict | None = None, **extra) -> records.RunRecord:
    config = {"mode": "text", "store_dtype": "float16", "batch_size": 8, "seed": 0, "gate": gate or {}}
    return records.RunRecord(
        schema_version=records.SCHEMA_VERSION, run_id=extra.pop("run_id", "run"), status="ok", created_at="2026-11-25T00:00:00Z",
        config=config, noise_floor=extra.pop("noise_floor", "bf16"), inputs=dict(INPUTS), versions={"torch": "2.13.0"}, machine={"cpu": "x"},
        variants={name: {"dtype": "float32", "device": "cpu", "source": f"zoo:{name}"} for name in pairs},
        pairs=[records.PairRecord(reference="ref", candidate=c, aggregates=a, prompts=[], positions_file="-") for c, a in pairs.items()],
        **extra,
    )  # fmt: skip


GOOD = {"bf16": _agg(2e-4, 1e-5, 0.99), "int4": _agg(3e-3, 1e-4, 0.98)}


@pytest.mark.parametrize(
    "text, metric, sign, amount, relative",
    [("kl_mean:+10%", "kl_mean", 1, 10, True), ("top1_agree:-1%", "top1_agree", -1, 1, True),
     ("kl_mean:0.001", "kl_mean", 1, 0.001, False), ("kl_p99:+2.5e-3", "kl_p99", 1, 2.5e-3, False)],
)  # fmt: skip
def test_fail_expressions_parse(text, metric, sign, amount, relative):
    r = Regression.parse(text)
    assert (r.metric, r.sign, r.amount, r.relative) == (metric, sign, amount, relative)


@pytest.mark.parametrize("text", ["kl_mean", "kl_mean:+", "kl_mean:ten%", ":+10%", "kl_mean:+10%%", "kl mean:+1%", "kl_mean:*2", "kl_mean:+1e400"])  # 1e400: inf
def test_malformed_fail_expressions_are_usage_errors(text):
    with pytest.raises(GateError, match="expected METRIC"):
        Regression.parse(text)


def test_limits_pass_and_fail_with_the_floor_multiple():
    gate = {"int4": {"kl_mean": {"max": 0.01, "max_x_floor": 20}, "top1_agree": {"min": 0.95}}}
    v = check.gate(_run(GOOD, gate))
    assert v["verdict"] == "pass" and v["checks"] == 3 and v["breaches"] == []
    # what passed is listed too, with the value and limit it was held to: a verdict says what it checked
    assert [(b["metric"], b["rule"], b["value"]) for b in v["passed"]] == [("kl_mean", "<= 0.01", 3e-3), ("kl_mean", "<= 20 x floor", 3e-3),
                                                                          ("top1_agree", ">= 0.95", 0.98)]  # fmt: skip
    assert v["passed"][1]["limit"] == pytest.approx(20 * 2e-4) and all(b["passed"] and not b["within_noise"] for b in v["passed"])
    lines = check.table(v).splitlines()
    assert len(lines) == 2 + 3 + 1 and all(line.endswith(" pass") for line in lines[2:5]) and lines[-1] == "gate: all 3 checks pass (run run)"
    worse = {"bf16": GOOD["bf16"], "int4": _agg(0.05, 1e-3, 0.90)}
    v = check.gate(_run(worse, gate))
    assert v["verdict"] == "fail" and v["passed"] == []
    got = {(b["metric"], b["rule"]): b for b in v["breaches"]}
    assert set(got) == {("kl_mean", "<= 0.01"), ("kl_mean", "<= 20 x floor"), ("top1_agree", ">= 0.95")}
    assert got[("kl_mean", "<= 20 x floor")]["limit"] == pytest.approx(20 * 2e-4)
    assert got[("top1_agree", ">= 0.95")]["value"] == 0.90


def test_a_breach_inside_the_standard_error_is_within_noise_unless_strict():
    gate = {"int4": {"kl_mean": {"max": 2.95e-3}}}  # KL 3e-3 is 5e-5 over it; its standard error is 1e-4
    v = check.gate(_run(GOOD, gate))
    assert v["verdict"] == "pass" and len(v["within_noise"]) == 1 and "within noise" in v["warnings"][0]
    assert check.gate(_run(GOOD, gate), strict=True)["verdict"] == "fail"
    far = {"int4": {"kl_mean": {"max": 2.5e-3}}}  # 5 standard errors over
    assert check.gate(_run(GOOD, far))["verdict"] == "fail"
    past = {"int4": {"kl_mean": {"max": 2.85e-3}}}  # 1.5 standard errors over: the band is one se wide
    assert check.gate(_run(GOOD, past))["verdict"] == "fail"


def test_a_value_at_its_limit_passes_even_strict():
    T = Threshold
    at = {"kl_mean": 0.01, "top1_agree": 0.95}  # no standard errors: judged on the value alone
    assert T("p", "kl_mean", "max", 0.01).breach(at, None, strict=True) is None
    assert T("p", "top1_agree", "min", 0.95).breach(at, None, strict=True) is None
    floor = {"kl_mean": 5e-4}
    assert T("p", "kl_mean", "max_x_floor", 20).breach(at, floor, strict=True) is None  # 20 x 5e-4 = 0.01
    assert T("p", "kl_mean", "max", 0.0099).breach(at, None, strict=True).value == 0.01
    assert T("p", "top1_agree", "min", 0.951).breach(at, None, strict=True).limit == 0.951


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_baseline_or_floor_that_is_not_finite_fails_every_check(bad):
    """An inf or NaN baseline (a broken build's run) or noise floor makes an infinite or NaN limit, which every value
    met before (inf > inf and NaN comparisons are false): the check passed whatever the run measured."""
    floor, pair = {"kl_mean": bad, "kl_mean_se": 1e-5}, {"kl_mean": 4e-3, "kl_mean_se": 1e-4, "top1_agree": 0.9}
    b = Threshold("int4", "kl_mean", "max_x_floor", 20).breach(pair, floor)
    assert b is not None and not b.within_noise
    assert b.line().endswith(f"limit <= 20 x floor = {bad:g}, from the noise floor's value, which is not finite: FAIL")
    for metric, sign in (("kl_mean", 1), ("top1_agree", -1)):
        r = Regression.parse(f"{metric}:{'+' if sign > 0 else '-'}10%")
        b = r.breach("int4", pair, {metric: bad})
        assert b is not None and not b.within_noise and "from the baseline's value, which is not finite: FAIL" in b.line()
    assert Regression.parse("kl_mean:0.001").breach("int4", {"kl_mean": math.inf}, {"kl_mean": math.inf}) is not None


def test_a_floor_multiple_limit_carries_the_floors_standard_error():
    """The noise band of `max_x_floor: B` is the combined se of the pair's value and of B x the floor's:
    √(1e-4² + (20 x 1e-5)²) = 2.24e-4 here, so a breach of 1.5e-4 is within noise (not with the pair's se alone)."""
    floor, pair = {"kl_mean": 2e-4, "kl_mean_se": 1e-5}, {"kl_mean": 4.15e-3, "kl_mean_se": 1e-4}
    b = Threshold("int4", "kl_mean", "max_x_floor", 20).breach(pair, floor)
    assert b.limit == pytest.approx(4e-3) and b.noise == pytest.approx(math.hypot(1e-4, 20 * 1e-5), rel=1e-12)
    assert b.within_noise
    assert not Threshold("int4", "kl_mean", "max_x_floor", 20).breach(pair, floor, strict=True).within_noise


def test_the_same_limit_as_a_floor_multiple_has_the_same_noise_band():
    """`kl_floor_multiple: {max: B}` states what `kl_mean: {max_x_floor: B}` does: its band carries the floor's error
    too (report.add_floor's se: the delta method for a ratio, √((1e-4/4.15e-3)² + (1e-5/2e-4)²) x 20.75 = 1.152), so
    both call this breach within noise; it was 0.5 from the pair's error alone, and failed."""
    from harness import report
    from harness.compare import PairResult

    pairs = [PairResult("ref", "bf16", {"kl_mean": 2e-4, "kl_mean_se": 1e-5}, [], {}),
             PairResult("ref", "int4", {"kl_mean": 4.15e-3, "kl_mean_se": 1e-4}, [], {})]  # fmt: skip
    report.add_floor(pairs, "bf16")
    floor, pair = pairs[0].aggregates, pairs[1].aggregates
    assert floor["kl_floor_multiple"] == 1.0 and floor["kl_floor_multiple_se"] == 0.0
    assert pair["kl_floor_multiple_se"] == pytest.approx(20.75 * math.hypot(1e-4 / 4.15e-3, 1e-5 / 2e-4), rel=1e-12)
    as_floor = Threshold("int4", "kl_mean", "max_x_floor", 20).breach(pair, floor)
    as_multiple = Threshold("int4", "kl_floor_multiple", "max", 20).breach(pair, floor)
    assert as_floor.within_noise and as_multiple.within_noise
    assert as_multiple.noise == pytest.approx(as_floor.noise / floor["kl_mean"], rel=0.05)  # the same band, in floor units


@pytest.mark.parametrize("text, limit", [("delta_p_mean:+10%", -0.0018), ("delta_p_mean:-10%", -0.0022),
                                         ("ln_ppl_ratio:+0.001", -0.001), ("ppl_diff:-5%", -0.0021)])  # fmt: skip
def test_relative_fail_limits_on_negative_baselines(text, limit):
    """A relative step is a share of the baseline's size: +10% of −0.002 allows up to −0.0018 (towards 0, upward), not
    −0.0022. An unchanged run passes; a move just past the limit in the bad direction fails."""
    r = Regression.parse(text)
    base = {r.metric: -0.002}
    assert r.breach("p", {r.metric: -0.002}, base, strict=True) is None
    past = limit + r.sign * 1e-6
    b = r.breach("p", {r.metric: past}, base, strict=True)
    assert b is not None and b.limit == pytest.approx(limit, rel=1e-12) and not b.within_noise


def test_baseline_regressions_use_the_combined_standard_error():
    base = _run(GOOD, run_id="base")
    same = check.gate(_run(GOOD), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%", "top1_agree:-1%"])
    assert same["verdict"] == "pass" and same["checks"] == 4 and same["warnings"] == []
    slightly = {"bf16": GOOD["bf16"], "int4": _agg(3.35e-3, 1e-4, 0.98)}  # +11.7%, but within sqrt(2) x 1e-4 of the limit
    v = check.gate(_run(slightly), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and v["within_noise"][0]["baseline"] == 3e-3
    worse = {"bf16": GOOD["bf16"], "int4": _agg(6e-3, 1e-4, 0.95)}
    v = check.gate(_run(worse), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%", "top1_agree:-1%"])
    assert v["verdict"] == "fail" and {b["metric"] for b in v["breaches"]} == {"kl_mean", "top1_agree"}
    assert all(b["baseline"] is not None and b["pair"] == "int4" for b in v["breaches"])


def test_a_metric_only_cross_vocab_pairs_have():
    """bpb_diff exists only for a pair of two vocabularies: "*" gates the pairs that have it, a named pair without it is
    a usage error, and --fail compares it where the pair has it."""
    pairs = GOOD | {"cut": _agg(0.3, 0.02, 0.85) | {"bpb_diff": 1.7, "bpb_diff_se": 0.1}}
    v = check.gate(_run(pairs, {"*": {"bpb_diff": {"max": 1.0}}}))
    assert v["checks"] == 1 and [(b["pair"], b["metric"]) for b in v["breaches"]] == [("cut", "bpb_diff")]
    with pytest.raises(GateError, match=r"gate\.int4\.bpb_diff: pair 'int4' has no bpb_diff .*cross_vocab: true; 'int4' has the reference's ids"):
        check.gate(_run(pairs, {"int4": {"bpb_diff": {"max": 1.0}}}))
    # in multiples of a floor pair that has none (a same-vocabulary floor): a usage error, not a KeyError (exit 3)
    with pytest.raises(GateError, match=r"gate\.cut\.bpb_diff: a limit in multiples of the noise floor's bpb_diff, and the floor pair 'bf16' has none"):
        check.gate(_run(pairs, {"cut": {"bpb_diff": {"max_x_floor": 2}}}))
    base = _run(GOOD | {"cut": pairs["cut"] | {"bpb_diff": 1.2}}, run_id="base")
    v = check.gate(_run(pairs), baseline=base, baseline_path=Path("base"), fail=["bpb_diff:+0.1"])
    assert v["checks"] == 1 and v["breaches"][0]["pair"] == "cut" and v["breaches"][0]["baseline"] == 1.2
    with pytest.raises(GateError, match=r"gate\.\*: bpb_diff is an aggregate of cross_vocab pairs only .*and there is none"):
        check.gate(_run(GOOD, {"*": {"bpb_diff": {"max": 1.0}}}))
    with pytest.raises(GateError, match=r"--fail bpb_diff:\+0\.1: bpb_diff is an aggregate of cross_vocab pairs only"):
        check.gate(_run(GOOD), baseline=_run(GOOD, run_id="base"), baseline_path=Path("base"), fail=["bpb_diff:+0.1"])
    with pytest.raises(GateError, match="no check ran on run run: baseline pair 'cut' is not in this run"):  # the baseline has one
        check.gate(_run(GOOD), baseline=base, baseline_path=Path("base"), fail=["bpb_diff:+0.1"])


def test_usage_errors():
    run = _run(GOOD, {"int4": {"kl_mean": {"max": 0.01}}})
    with pytest.raises(GateError, match="give --baseline"):
        check.gate(run, fail=["kl_mean:+10%"])
    with pytest.raises(GateError, match="unknown metric 'kl_maen'; did you mean kl_mean"):
        check.gate(_run(GOOD, {"int4": {"kl_maen": {"max": 0.01}}}))
    with pytest.raises(GateError, match="unknown metric 'nonsense'"):
        check.gate(run, baseline=_run(GOOD), baseline_path=Path("b"), fail=["nonsense:+1%"])
    with pytest.raises(GateError, match="kl_floor_multiple is the mean KL over the noise floor's, and this run has no noise_floor"):
        check.gate(run, baseline=_run(GOOD), baseline_path=Path("b"), fail=["kl_floor_multiple:+10%"])  # (not "unknown metric")
    with pytest.raises(GateError, match="nothing to check"):
        check.gate(_run(GOOD))
    with pytest.raises(GateError, match="no pair with candidate 'int8'"):
        check.gate(_run(GOOD, {"int8": {"kl_mean": {"max": 0.01}}}))
    with pytest.raises(GateError, match="nothing to gate"):
        check.gate(run.model_copy(update={"status": "error", "error": "boom"}))


def test_a_baseline_with_another_prompt_set_or_tokenizer_is_refused():
    for key in ("token_ids_sha256", "tokenizer_sha256"):
        other = _run(GOOD, run_id="base")
        other.inputs[key] = "c" * 64
        with pytest.raises(GateError, match="not comparable"):
            check.gate(_run(GOOD), baseline=other, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    # the same prompt file, read in generate mode: the message says what differs
    other = _run(GOOD, run_id="base")
    other.inputs["token_ids_sha256"] = "c" * 64
    other.config["mode"] = "generate"
    with pytest.raises(GateError, match=r"another prompt set \(token ids\) \(mode 'generate' there, 'text' here: other positions"):
        check.gate(_run(GOOD), baseline=other, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])


def test_other_settings_and_machines_are_compared_with_a_warning_per_difference():
    other = _run({"int4": GOOD["int4"], "bf16": GOOD["bf16"]}, run_id="base")
    other = other.model_copy(update={
        "versions": {"torch": "2.12.0"}, "machine": {"cpu": "y"}, "config": {**other.config, "store_dtype": "float32"},
        "variants": {**other.variants, "int4": {**other.variants["int4"], "dtype": "bfloat16", "kernels": ["TorchAtenLinear"]},
                     "bf16": {**other.variants["bf16"], "loader": "transformers"}},
    })  # fmt: skip
    run = _run({**GOOD, "int8": _agg(1e-5, 1e-6, 0.999)})
    run.variants["int4"] |= {"loader": "gptqmodel", "backend": "gptq_marlin", "kernels": ["MarlinLinear"]}
    run.variants["bf16"] |= {"loader": "transformers"}
    # the reference's weights moved (a hub branch's new commit); a candidate's differ by design (the new build)
    other.variants |= {"ref": {"fingerprint": "hub:Qwen/Qwen1.5-0.5B-Chat@aaa"}}
    other.variants["int4"]["fingerprint"], run.variants["int4"]["fingerprint"] = "hub:a@1", "hub:a@2"
    run.variants["ref"] = {"fingerprint": "hub:Qwen/Qwen1.5-0.5B-Chat@bbb"}
    other.inputs["segments_sha256"], run.inputs["segments_sha256"] = "c" * 64, "d" * 64
    other.config["generate"], run.config["generate"] = {"max_new_tokens": 32}, {"max_new_tokens": 64}  # text mode: unused
    v = check.gate(run, baseline=other, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass"
    text = "\n".join(v["warnings"])
    for needle in ("versions.torch differs: baseline '2.12.0', this run '2.13.0'", "machine.cpu differs",
                   "the scored tokens differ from the baseline's (other windows): the pairs are measured on other positions",
                   "config.store_dtype differs", "int4.dtype differs", "pair 'int8' is not in the baseline",
                   "int4.kernels differs: baseline ['TorchAtenLinear'], this run ['MarlinLinear']"):  # fmt: skip
        assert needle in text
    assert "config.generate differs" not in text  # the other mode's settings move nothing
    assert "loader differs" not in text and "backend differs" not in text  # int4's baseline predates them; bf16's agrees
    assert ("the reference 'ref' has other weights than the baseline's (hub:Qwen/Qwen1.5-0.5B-Chat@aaa there, "
            "hub:Qwen/Qwen1.5-0.5B-Chat@bbb here)") in text and "int4.fingerprint" not in text and "hub:a@" not in text


def test_exit_codes_table_and_json_verdict_line(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    gate = {"int4": {"kl_mean": {"max_x_floor": 20}}}
    for folder, pairs in ((good, GOOD), (bad, {"bf16": GOOD["bf16"], "int4": _agg(0.02, 1e-4, 0.9)})):
        folder.mkdir()
        records.write(folder, _run(pairs, gate, run_id=folder.name))
    assert main(["check", "--run", str(good)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verdict"] == "pass"
    assert main(["check", "--run", str(good / "run.json")]) == 0  # the record's file, for its folder
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verdict"] == "pass"
    assert main(["check", "--run", str(bad), "--baseline", str(good / "run.json"), "--fail", "kl_mean:+10%"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    verdict = json.loads(out[-1])
    assert verdict["verdict"] == "fail" and len(verdict["breaches"]) == 2 and verdict["baseline"] == "good"
    assert {"pair", "metric", "value", "limit", "baseline"} <= set(verdict["breaches"][0]) and "warnings" in verdict
    assert any("int4" in line and "kl_mean" in line and "FAIL" in line and "<= 20 x floor" in line for line in out)
    assert json.loads((bad / "gate.json").read_text())["verdict"] == "fail"
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"schema_version": 1, "status": "ok", "created_at": "x"}))
    assert main(["check", "--run", str(good), "--baseline", str(old), "--fail", "kl_mean:+10%"]) == 2
    assert "schema 1 run record" in capsys.readouterr().err
    assert main(["check", "--run", str(good), "--fail", "kl_mean:+10%"]) == 2
    assert main(["check", "--run", str(good), "--config", "configs/ci-gate.yaml"]) == 2


def test_usage_errors_come_before_the_comparison(tmp_path, capsys, monkeypatch):
    """`check --config` runs the comparison (minutes to hours) only once its own arguments are known to be good."""
    from harness import cli

    ran = []
    monkeypatch.setattr(cli, "run_compare", lambda cfg, planned=None: ran.append(cfg) or tmp_path)
    gate = str(ROOT / "configs" / "ci-gate.yaml")
    good, failed = tmp_path / "good", tmp_path / "failed"
    good.mkdir()
    failed.mkdir()
    records.write(good, _run(GOOD, run_id="good"))
    records.write(failed, records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id="failed", status="error",
                                            error="KeyboardInterrupt: interrupted", created_at="2026-11-25T00:00:00Z"))  # fmt: skip
    for args, message in (
        (["--fail", "kl_mean:+10%"], "give --baseline"),
        (["--baseline", str(failed), "--fail", "kl_mean:+10%"], "is the record of a run that failed (KeyboardInterrupt: interrupted)"),
        (["--baseline", str(good), "--fail", "kl_mean+10%"], "expected METRIC:"),
        (["--baseline", str(good), "--fail", "kl_maen:+10%"], "unknown metric 'kl_maen'; did you mean kl_mean"),
        (["--baseline", str(tmp_path / "nowhere" / "run.json"), "--fail", "kl_mean:+10%"], "nowhere/run.json: no run record there"),
    ):
        assert main(["check", "--config", gate, *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["check", "--config", str(ROOT / "configs" / "default.yaml")]) == 2  # no gate limits, no --fail
    assert "nothing to check: " in capsys.readouterr().err
    assert ran == []


def test_a_crash_is_exit_3_not_a_regression(tmp_path, capsys, monkeypatch):
    from harness import cli

    def boom(cfg, planned=None):
        raise RuntimeError("an unforeseen failure")

    monkeypatch.setattr(cli, "run_compare", boom)
    assert main(["check", "--config", str(ROOT / "configs" / "ci-gate.yaml")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "an unforeseen failure" in err and "exit code 3" in err


# ---------------------------------------------------------------- the micro family, for real


@pytest.fixture(scope="module")
def gate_env(micro_zoo, tmp_path_factory):
    """Where the gate runs of this module put their stores (shared: unchanged models are reused) and reports."""
    tmp = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        yield tmp


def _gate(env: Path, *extra: str, source: str | None = None) -> list[str]:
    args = ["check", "--config", str(ROOT / "configs" / "ci-gate.yaml"), "zoo_profile=micro", f"prompts={SMALL}",
            f"reports_dir={env / 'reports'}", "metrics.bootstrap_resamples=0"]  # fmt: skip
    if source:
        args.append(f"variants.2.source=zoo:{source}")  # a new Int4 build, gated under the same name
    return args + list(extra)


def test_a_baseline_of_another_prompt_set_is_refused_before_any_model_is_extracted(micro_zoo, tmp_path, tmp_store, capsys):
    """`check --config --baseline` tests the baseline's prompt set and tokenizer against the run's once the prompts
    are tokenized, before any model runs: it was refused only after the whole comparison (minutes to hours)."""
    base = tmp_path / "base"
    base.mkdir()
    records.write(base, _run(GOOD, run_id="base"))  # another prompt set's fingerprints (INPUTS)
    assert main(_gate(tmp_path, "--baseline", str(base), "--fail", "kl_mean:+10%")) == 2
    err = capsys.readouterr().err
    assert f"baseline {base} was made with another prompt set (token ids)" in err and "not comparable" in err
    assert not tmp_store.exists() or list(tmp_store.iterdir()) == []  # no store was filled, or even begun


@pytest.mark.slow
def test_the_gate_passes_the_good_builds_and_fails_the_damaged_ones(gate_env, capsys):
    from harness import zoo

    assert main(_gate(gate_env)) == 0  # the project's own CI runs the gate on the micro family
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("gate: all 7 checks pass") and json.loads(out[-1])["verdict"] == "pass"
    good = (gate_env / "reports" / "latest").resolve()

    # each damaged build breaches the mean KL on every machine; which other checks it breaches follows the weights this
    # CPU trained (bad scales breached top-1 agreement on the AVX-512 VMs' micro family, not on a Zen 2's)
    for damaged, must in ((zoo.INT2, {"kl_mean"}), (zoo.BAD_SCALES, {"kl_mean"})):
        junit = gate_env / f"{damaged}.xml"
        assert main(_gate(gate_env, "--junit", str(junit), source=damaged)) == 1, damaged
        out = capsys.readouterr().out.strip().splitlines()
        verdict = json.loads(out[-1])
        assert verdict["verdict"] == "fail" and must <= {b["metric"] for b in verdict["breaches"]}
        text = junit.read_text()  # the CI report holds every check, the breaches as failures
        assert text.count("<testcase ") == verdict["checks"] == 7 and text.count("<failure ") == len(verdict["breaches"])
        assert all(b["pair"] == "s-chat-gptq-int4" for b in verdict["breaches"])
        table = "\n".join(out)
        assert "s-chat-gptq-int4" in table and "FAIL" in table and "kl_mean" in table
        bad = (gate_env / "reports" / "latest").resolve()
        page = (bad / "index.html").read_text()
        assert "Quantization gate: <span class=\"verdict fail\">FAIL</span>" in page and "id=gate-table" in page  # the report shows the verdict
        # against the good run as baseline it is a regression too, with a warning naming the new source
        assert main(["check", "--run", str(bad), "--baseline", str(good), "--fail", "kl_mean:+10%", "top1_agree:-1%"]) == 1
        verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert any(b["rule"] == "+10% vs baseline" and b["baseline"] is not None for b in verdict["breaches"])
        assert any("s-chat-gptq-int4.source differs" in w and damaged in w for w in verdict["warnings"])

    # a run against itself passes; so does a fresh run of the same builds (deterministic)
    assert main(["check", "--run", str(good), "--baseline", str(good), "--fail", "kl_mean:+10%", "top1_agree:-1%"]) == 0
    assert main(_gate(gate_env, "--baseline", str(good), "--fail", "kl_mean:+1%", "--strict")) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["verdict"] == "pass" and verdict["warnings"] == []


def test_a_floor_pair_without_drift_is_a_usage_error():
    """A noise floor identical to the reference (mean KL 0) makes every multiple of it 0: the gate says so (exit 2)
    rather than failing every pair against a limit of 0."""
    exact = {"bf16": _agg(0.0, 0.0, 1.0) | {"kl_floor_multiple": math.nan}, "int4": GOOD["int4"] | {"kl_floor_multiple": math.nan}}
    for limit in ({"kl_mean": {"max_x_floor": 20}}, {"kl_floor_multiple": {"max": 20}}):
        with pytest.raises(GateError, match=r"gate\.int4\.\w+: a limit in multiples of the noise floor's kl_mean, and the floor pair 'bf16' has kl_mean 0\.0"):
            check.gate(_run(exact, {"int4": limit}))
    assert check.gate(_run(exact, {"int4": {"kl_mean": {"max": 0.01}}}))["verdict"] == "pass"  # other limits still run
    # a floor whose top-1 agreement is perfect is still a floor for a metric that may be 0: a limit of a multiple of 0
    calm = {"bf16": GOOD["bf16"] | {"flip_rate": 0.0}, "int4": GOOD["int4"] | {"flip_rate": 0.02}}
    assert check.gate(_run(calm, {"int4": {"flip_rate": {"max_x_floor": 5}}}))["verdict"] == "fail"


def test_a_pair_missing_from_the_baseline_fails_only_with_strict():
    """A renamed (or new) variant has no baseline to compare with: a warning, and with --strict a breach."""
    base = _run(GOOD, run_id="base")
    run = _run({"bf16": GOOD["bf16"], "int4b": GOOD["int4"]})
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and any("pair 'int4b' is not in the baseline" in w for w in v["warnings"])
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"], strict=True)
    # a rename: the new name has no baseline pair, and the baseline's int4 is not in the run
    assert v["verdict"] == "fail" and [(b["pair"], b["rule"]) for b in v["breaches"]] == [("int4b", "has a baseline pair"), ("int4", check.ABSENT)]
    assert check.table(v).splitlines()[2].split() == ["int4b", "kl_mean", "0.003", "–", "–", "has", "a", "baseline", "pair", "FAIL"]
    assert check.table(v).splitlines()[3].split() == ["int4", "kl_mean", "absent", "–", "0.003", "present", "in", "this", "run", "FAIL"]
    # --strict with only config limits (no --fail): nothing to compare, so the warning stays
    v = check.gate(_run({"bf16": GOOD["bf16"], "int4b": GOOD["int4"]}, {"int4b": {"kl_mean": {"max": 0.01}}}),
                   baseline=base, baseline_path=Path("b.json"), strict=True)
    assert any("pair 'int4b' is not in the baseline" in w for w in v["warnings"])
    # a --fail metric the new pair does not have (a cross_vocab one) is no breach
    cross = GOOD["bf16"] | {"bpb_diff": 0.1}
    base, run = _run({"bf16": cross, "int4": GOOD["int4"]}, run_id="base"), _run({"bf16": cross, "int4b": GOOD["int4"]})
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%", "bpb_diff:+0.1"], strict=True)
    assert [(b["pair"], b["metric"]) for b in v["breaches"]] == [("int4b", "kl_mean"), ("int4", "kl_mean")]


def test_a_baseline_pair_missing_from_the_run_warns_and_fails_only_with_strict(tmp_path):
    """A variant dropped from the config (or renamed) would hide its regression: a warning naming it, and with --strict
    and --fail a breach per --fail metric it had, its baseline value beside "absent"."""
    base = _run({**GOOD, "int8": _agg(1e-5, 1e-6, 0.999) | {"bpb_diff": 0.01}}, run_id="base")
    v = check.gate(_run(GOOD), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and v["checks"] == 2
    assert "baseline pair 'int8' is not in this run: not compared (with --strict and --fail, a breach)" in v["warnings"]
    v = check.gate(_run(GOOD), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%", "top1_agree:-1%"], strict=True)
    assert v["verdict"] == "fail" and v["checks"] == 6
    assert [(b["pair"], b["metric"], b["baseline"]) for b in v["breaches"]] == [("int8", "kl_mean", 1e-5), ("int8", "top1_agree", 0.999)]
    assert check.Breach(**v["breaches"][0]).line() == "int8: kl_mean = absent, limit present in this run (baseline 1e-05): FAIL"
    (tmp_path / "gate.json").write_text(json.dumps(records.json_safe(v), allow_nan=False))  # strict JSON, as main writes it
    from harness import html_run

    assert "<td>int8</td><td>kl_mean</td><td>absent</td><td>–</td><td>1e-5</td>" in html_run.gate_section(tmp_path)
    # a dropped cross_vocab pair: its bits per byte are a known --fail metric (the baseline has them), and absent now
    v = check.gate(_run(GOOD), baseline=base, baseline_path=Path("b.json"), fail=["bpb_diff:+0.1"], strict=True)
    assert [(b["pair"], b["metric"], b["rule"]) for b in v["breaches"]] == [("int8", "bpb_diff", check.ABSENT)]
    # a pair that is cross_vocab in this run and was not in the baseline: not compared, with a warning
    run = _run(GOOD | {"int8": base.pairs[2].aggregates})
    with pytest.raises(check.GateError, match=r"no check ran on run .*--fail bpb_diff:\+0\.1: baseline pair 'int8' has no "
                       r"bpb_diff \(it was not a cross_vocab pair there\): not compared"):  # a gate that checked nothing fails
        check.gate(run, baseline=_run(GOOD | {"int8": _agg(1e-5, 1e-6, 0.999)}, run_id="base"), baseline_path=Path("b.json"),
                   fail=["bpb_diff:+0.1"])  # fmt: skip
    # with config limits only (no --fail) there is nothing to compare it on: the warning stays, no breach
    v = check.gate(_run(GOOD, {"int4": {"kl_mean": {"max": 0.01}}}), baseline=base, baseline_path=Path("b.json"), strict=True)
    assert v["verdict"] == "pass" and any("baseline pair 'int8' is not in this run" in w for w in v["warnings"])


def test_a_breach_line_states_its_limit_once():
    assert check.Breach("int4", "top1_agree", 0.98, 0.99, ">= 0.99").line() == "int4: top1_agree = 0.98, limit >= 0.99: FAIL"
    assert (check.Breach("int4", "kl_mean", 0.01, 0.008, "<= 40 x floor", within_noise=True).line()
            == "int4: kl_mean = 0.01, limit <= 40 x floor = 0.008: within noise")  # fmt: skip
    # within noise: the band, and whether it is the error of the difference paired by prompt
    assert (check.Breach("int4", "kl_mean", 0.0031, 0.003, "+10% vs baseline", 0.0027, 2.6e-4, within_noise=True, paired=True).line()
            == "int4: kl_mean = 0.0031, limit +10% vs baseline = 0.003 (baseline 0.0027): within noise (± 0.00026, paired by prompt)")  # fmt: skip
    assert check.Breach("int4", "kl_mean", 0.0031, 0.003, "<= 0.003", noise=2.6e-4, within_noise=True).line().endswith("within noise (± 0.00026)")


def test_a_nan_metric_fails_its_limit():
    """A limit on a metric that came out NaN (e.g. nll_correlation of constant NLLs, or a broken pair) is not a pass:
    NaN < limit and NaN > limit are both False, which a plain comparison would let through."""
    pairs = {"bf16": _agg(2e-4, 1e-5, 0.99), "int4": _agg(math.nan, math.nan, 0.98)}
    v = check.gate(_run(pairs, {"int4": {"kl_mean": {"max": 0.01}}}))
    assert v["verdict"] == "fail" and [b["metric"] for b in v["breaches"]] == ["kl_mean"]
    assert Threshold("p", "top1_agree", "min", 0.9).breach({"top1_agree": math.nan}, None) is not None
    base = _run({"bf16": _agg(2e-4, 1e-5, 0.99), "int4": _agg(3e-3, 1e-4, 0.98)}, run_id="base")
    v = check.gate(_run(pairs), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "fail" and v["breaches"][0]["pair"] == "int4"


def test_a_flip_rate_limit_has_the_top1_standard_error_as_its_noise_band():
    """flip_rate = 1 − top1_agree: its standard error is top1_agree's (the record has no flip_rate_se), so a breach
    inside it is within noise, and one past it fails."""
    agg = _agg(3e-3, 1e-4, 0.98)  # flip_rate 0.02, se √(0.98·0.02/1000) = 0.00443
    assert standard_error(agg, "flip_rate") == pytest.approx(agg["top1_agree_se"], rel=1e-12)
    v = check.gate(_run({"bf16": _agg(2e-4, 1e-5, 0.99), "int4": agg}, {"int4": {"flip_rate": {"max": 0.018}}}))
    assert v["verdict"] == "pass" and v["within_noise"][0]["noise"] == pytest.approx(agg["top1_agree_se"])
    v = check.gate(_run({"bf16": _agg(2e-4, 1e-5, 0.99), "int4": agg}, {"int4": {"flip_rate": {"max": 0.01}}}))
    assert v["verdict"] == "fail"


def test_a_ppl_ratio_se_follows_from_the_log_ratios_where_a_record_lacks_it():
    """standard_error(ppl_ratio) of a record without ppl_ratio_se: the delta method, e^x·se(x) = ppl_ratio·se(ln ratio)."""
    assert standard_error({"ppl_ratio": 1.25, "ln_ppl_ratio_se": 0.004}, "ppl_ratio") == pytest.approx(0.005, rel=1e-12)


def test_the_noise_band_is_the_standard_error_over_prompts_where_the_record_has_one():
    """The positions of one prompt are not independent, so the gate judges noise by `*_se_prompts` (larger) where the
    record has it: a breach of 2e-4 is past the per-position se (1e-4) and inside the one over prompts (3e-4); the
    ppl ratio's and flip rate's follow from ln_ppl_ratio_se_prompts and top1_agree_se_prompts, and the floor multiple's
    from report.add_floor's over both pairs' ones. NaN (an infinite mean) or absent (an older record): the per-position
    one."""
    from harness import report
    from harness.compare import PairResult

    agg = _agg(3.2e-3, 1e-4, 0.98) | {"kl_mean_se_prompts": 3e-4, "ln_ppl_ratio_se_prompts": 0.006, "top1_agree_se_prompts": 0.01}
    assert standard_error(agg, "kl_mean") == 3e-4 and standard_error(agg, "flip_rate") == 0.01
    assert standard_error(agg, "ppl_ratio") == pytest.approx(1.01 * 0.006, rel=1e-12)
    v = check.gate(_run({"bf16": _agg(2e-4, 1e-5, 0.99), "int4": agg}, {"int4": {"kl_mean": {"max": 3e-3}}}))
    assert v["verdict"] == "pass" and v["within_noise"][0]["noise"] == 3e-4
    assert standard_error(agg | {"kl_mean_se_prompts": math.nan}, "kl_mean") == 1e-4
    v = check.gate(_run({"bf16": _agg(2e-4, 1e-5, 0.99), "int4": _agg(3.2e-3, 1e-4, 0.98)}, {"int4": {"kl_mean": {"max": 3e-3}}}))
    assert v["verdict"] == "fail"  # the same breach, a record without them
    pairs = [PairResult("ref", "bf16", {"kl_mean": 2e-4, "kl_mean_se": 1e-5, "kl_mean_se_prompts": 3e-5}, [], {}),
             PairResult("ref", "int4", {"kl_mean": 4e-3, "kl_mean_se": 1e-4, "kl_mean_se_prompts": 4e-4}, [], {})]  # fmt: skip
    report.add_floor(pairs, "bf16")
    floor, pair = pairs[0].aggregates, pairs[1].aggregates
    assert floor["kl_floor_multiple_se_prompts"] == 0.0
    assert pair["kl_floor_multiple_se_prompts"] == pytest.approx(20 * math.hypot(4e-4 / 4e-3, 3e-5 / 2e-4), rel=1e-12)
    assert standard_error(pair, "kl_floor_multiple") == pair["kl_floor_multiple_se_prompts"]


def _paired_by_hand(diff: np.ndarray, prompt: np.ndarray) -> float:
    """The cluster-robust standard error of mean(diff) by prompt, the loop over prompts written out in math.fsum."""
    groups = sorted(set(prompt.tolist()))
    sums = [math.fsum(diff[prompt == g] - diff.mean()) for g in groups]
    return math.sqrt(len(groups) / (len(groups) - 1) * math.fsum(x * x for x in sums)) / len(diff)


def _build(rng, prompt: np.ndarray, level: np.ndarray, drift: float) -> dict:
    """A build's per-position metrics on prompts of a difficulty each (`level`), its KL scaled by `drift`."""
    n = len(prompt)
    nll_r = rng.exponential(2, n)
    return {"kl": drift * np.exp(-7 + level[prompt] + rng.normal(0, 0.3, n)), "kl_rev": rng.lognormal(-7, 1, n),
            "js": rng.lognormal(-8, 1, n), "tv": rng.random(n) * 0.1, "top1_agree": rng.random(n) < 0.95,
            "ref_top_rank": rng.integers(0, 3, n), "delta_p": rng.normal(0, 0.01, n), "delta_p_top": rng.normal(0, 0.01, n),
            "nll_ref": nll_r, "nll_cand": nll_r + drift * 0.01 * (1 + level[prompt]) + rng.normal(0, 0.01, n),
            "entropy_ref": rng.random(n), "entropy_cand": rng.random(n), "p_top_ref": rng.random(n)}  # fmt: skip


def test_a_regression_is_judged_by_the_difference_paired_by_prompt():
    """`--fail` against a baseline of the same prompts: the noise band is the standard error of (run − scale ×
    baseline) paired by prompt, from the records' per-prompt rows; against the cluster-robust loop over the positions'
    differences; over 300 new prompt sets it is the spread of that difference (within 15%), where the two errors
    combined as independent are several times it. So a 12% rise in mean KL against `kl_mean:+10%` fails, where the
    combined band called it within noise. Other prompts, or other positions in one: the combined band. ppl_ratio: its
    ln ratios paired, by the delta method."""
    from harness import aggregate

    rng = np.random.default_rng(8)
    prompt = np.repeat(np.arange(30), rng.integers(20, 60, 30))
    names = [f"p{i}" for i in range(30)]

    def pair(level, drift):
        m = _build(rng, prompt, level, drift)
        agg = aggregate.pair_aggregates(m, prompt, ks=(), resamples=0, seed=0)
        return m, agg, aggregate.per_prompt(m, prompt, names)

    level = rng.normal(0, 1, 30)
    (ma, a, rows_a), (mb, b, rows_b) = pair(level, 1.12), pair(level, 1.0)
    scale = 1.1  # kl_mean:+10%: limit = 1.1 x baseline
    got = gate_checks.paired_error("kl_mean", rows_a, rows_b, scale)
    assert got == pytest.approx(_paired_by_hand(ma["kl"] - scale * mb["kl"], prompt), rel=1e-9)  # the same positions
    combined = math.hypot(a["kl_mean_se_prompts"], scale * b["kl_mean_se_prompts"])
    assert combined > 3 * got
    spread, bands = [], []
    counts = np.bincount(prompt)
    for _ in range(300):  # per-prompt rows by numpy here (the loop above had per_prompt's)
        level = rng.normal(0, 1, 30)
        kl = [_build(rng, prompt, level, drift)["kl"] for drift in (1.12, 1.0)]
        r2, q2 = ([{"prompt": g, "positions": int(counts[g]), "kl_mean": float(v)} for g, v in enumerate(np.bincount(prompt, x) / counts)] for x in kl)
        spread.append(kl[0].mean() - scale * kl[1].mean())
        bands.append(gate_checks.paired_error("kl_mean", r2, q2, scale))
    assert np.mean(bands) == pytest.approx(np.std(spread, ddof=1), rel=0.15)
    run, base = _run({"int4": a}), _run({"int4": b}, run_id="base")
    run.pairs[0].prompts, base.pairs[0].prompts = rows_a, rows_b
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert a["kl_mean"] > 1.1 * b["kl_mean"] and v["verdict"] == "fail" and v["breaches"][0]["noise"] == pytest.approx(got, rel=1e-12)
    assert a["kl_mean"] - 1.1 * b["kl_mean"] < combined  # within the old band
    assert v["breaches"][0]["paired"]
    base.pairs[0].prompts = rows_b[1:]  # a prompt fewer: not paired
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and v["within_noise"][0]["noise"] == pytest.approx(combined, rel=1e-12)
    assert not v["within_noise"][0]["paired"] and v["warnings"][-1].endswith(f"within noise (± {combined:.2g})")
    assert gate_checks.paired_error("kl_mean", rows_a, [r | {"positions": r["positions"] + 1} for r in rows_b], 1.0) is None
    assert gate_checks.paired_error("kl_p99", rows_a, rows_b, 1.0) is None  # not a mean of positions
    # ppl_ratio = e^(mean ln ratio): the delta method, each side's per-position ln ratios times its value
    ln_a, ln_b = ma["nll_cand"] - ma["nll_ref"], mb["nll_cand"] - mb["nll_ref"]
    want = _paired_by_hand(a["ppl_ratio"] * ln_a - 1.01 * b["ppl_ratio"] * ln_b, prompt)
    got = gate_checks.paired_error("ppl_ratio", rows_a, rows_b, 1.01, value=a["ppl_ratio"], ref=b["ppl_ratio"])
    assert got == pytest.approx(want, rel=1e-9)


def test_a_regression_over_a_few_prompts_is_paired_too():
    """Below aggregate.MIN_PROMPTS (10) the record's own errors over prompts are the larger of CR1 and the per-position
    one, but a --fail band is still paired from 2 prompts: combining the two errors is the lenient side, and over 6
    prompts it calls a 15% rise against kl_mean:+10% within noise, where the paired band fails it."""
    from harness import aggregate

    rng = np.random.default_rng(10)
    prompt = np.repeat(np.arange(6), 200)
    names = [f"p{i}" for i in range(6)]
    level = rng.normal(0, 1, 6)
    (ma, mb) = (_build(rng, prompt, level, drift) for drift in (1.15, 1.0))
    a, b = (aggregate.pair_aggregates(m, prompt, ks=(), resamples=0, seed=0) for m in (ma, mb))
    run, base = _run({"int4": a}), _run({"int4": b}, run_id="base")
    run.pairs[0].prompts, base.pairs[0].prompts = aggregate.per_prompt(ma, prompt, names), aggregate.per_prompt(mb, prompt, names)
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    combined = math.hypot(a["kl_mean_se_prompts"], 1.1 * b["kl_mean_se_prompts"])
    assert v["verdict"] == "fail" and v["breaches"][0]["noise"] < a["kl_mean"] - 1.1 * b["kl_mean"] < combined


def test_a_floor_multiple_band_is_paired_by_prompt_with_the_floor_pair():
    """A pair and the noise-floor pair of one run share its prompts: `max_x_floor: B` is judged by the standard error
    of value − B·floor paired by prompt (the loop over the positions' differences, by hand), and kl_floor_multiple's
    over prompts is that of A − r·F over F (delta method for the ratio r = A/F). Both far below the two errors
    combined as if independent. One prompt, or a prompt twice: nothing is paired. A relative --fail on
    a negative baseline, and flip_rate through the top-1 rows with a relative limit, against their own differences."""
    from harness import aggregate, report
    from harness.compare import PairResult

    rng = np.random.default_rng(9)
    prompt = np.repeat(np.arange(30), rng.integers(20, 60, 30))
    names = [f"p{i}" for i in range(30)]
    level = rng.normal(0, 1, 30)
    m = {name: _build(rng, prompt, level, drift) for name, drift in (("bf16", 0.05), ("int4", 1.0))}
    results = [PairResult("ref", name, aggregate.pair_aggregates(x, prompt, ks=(), resamples=0, seed=0), aggregate.per_prompt(x, prompt, names), {})
               for name, x in m.items()]  # fmt: skip
    report.add_floor(results, "bf16")
    floor, pair = results[0].aggregates, results[1].aggregates

    def by_hand(diff):
        return _paired_by_hand(diff, prompt)

    r = pair["kl_floor_multiple"]
    assert pair["kl_floor_multiple_se_prompts"] == pytest.approx(by_hand(m["int4"]["kl"] - r * m["bf16"]["kl"]) / floor["kl_mean"], rel=1e-9)
    bound = r * 0.98  # a 2% breach
    run = _run({"bf16": floor, "int4": pair}, {"int4": {"kl_mean": {"max_x_floor": bound}}})
    run.pairs[0].prompts, run.pairs[1].prompts = results[0].prompts, results[1].prompts
    v = check.gate(run)
    band = by_hand(m["int4"]["kl"] - bound * m["bf16"]["kl"])
    assert v["verdict"] == "fail" and v["breaches"][0]["noise"] == pytest.approx(band, rel=1e-9) and v["breaches"][0]["paired"]
    assert math.hypot(pair["kl_mean_se_prompts"], bound * floor["kl_mean_se_prompts"]) > 3 * band
    one = (results[1].prompts[:1], results[0].prompts[:1])
    assert gate_checks.paired_error("kl_mean", *one, 1.0) is None  # one prompt: no spread
    twice = [res.prompts[:5] + res.prompts[4:5] for res in results[::-1]]  # a prompt twice, on both sides: not rows of one run
    assert gate_checks.paired_error("kl_mean", *twice, 1.0) is None
    assert gate_checks.paired_error("kl_mean", *(rows[:5] for rows in twice), 1.0) is not None
    # a relative limit on a negative baseline: delta_p_mean:+10% allows ref + 10% of |ref| = 0.9 x ref, so its band is
    # that of A − 0.9·B
    dp = [x["delta_p"] - 0.01 for x in (m["int4"], m["bf16"])]
    rows = [[r | {"delta_p_mean": float(x[prompt == i].mean())} for i, r in enumerate(res.prompts)] for x, res in zip(dp, results[::-1])]
    b = Regression.parse("delta_p_mean:+10%").outcome("int4", {"delta_p_mean": dp[0].mean()}, {"delta_p_mean": dp[1].mean()}, rows=tuple(rows))
    assert dp[1].mean() < 0 and b.limit == pytest.approx(0.9 * dp[1].mean(), rel=1e-12)
    assert b.noise == pytest.approx(by_hand(dp[0] - 0.9 * dp[1]), rel=1e-9)
    # flip_rate through the top-1 rows, a relative limit (scale 1.2): the flips' own differences, by hand
    flips = [1 - x["top1_agree"].astype(float) for x in (m["int4"], m["bf16"])]
    got = gate_checks.paired_error("flip_rate", results[1].prompts, results[0].prompts, 1.2)
    assert got == pytest.approx(by_hand(flips[0] - 1.2 * flips[1]), rel=1e-9)


def test_a_noise_band_needs_a_finite_error_of_the_metric_itself():
    """A limit's noise band is the metric's own standard error, and only a finite one: an error that overflowed (a PPL
    near 1e300) excuses no breach, and a metric without one (kl_p99, an overlap) never borrows another's (flip rate's
    fallback to top-1's is for flip_rate alone). kl_floor_multiple of a record that predates its own error: the
    pair's part, multiple × se(kl_mean) / kl_mean (none where the mean KL is 0). A breach exactly one error past its
    limit is past the band; a value inside its limit, within one error of it, passes with no warning."""
    b = Threshold("p", "kl_mean", "max", 0.01).breach({"kl_mean": 5.0, "kl_mean_se": math.inf}, None)
    assert b is not None and not b.within_noise and b.noise is None
    agg = _agg(3e-3, 1e-4, 0.98) | {"kl_p99": 0.05, "top5_overlap": 0.9}
    assert standard_error(agg, "kl_p99") is None and standard_error(agg, "top5_overlap") is None
    v = check.gate(_run({"bf16": GOOD["bf16"], "int4": agg}, {"int4": {"kl_p99": {"max": 0.0499}}}))
    assert v["verdict"] == "fail" and v["breaches"][0]["noise"] is None
    old = {"kl_floor_multiple": 20.75, "kl_mean": 4.15e-3, "kl_mean_se": 1e-4}
    assert standard_error(old, "kl_floor_multiple") == pytest.approx(0.5, rel=1e-12, abs=0)
    assert standard_error(old | {"kl_mean": 0.0}, "kl_floor_multiple") is None
    edge = Threshold("p", "kl_mean", "max", 0.5).breach({"kl_mean": 0.75, "kl_mean_se": 0.25}, None)
    assert edge is not None and not edge.within_noise  # |0.75 − 0.5| = 0.25 exactly: not inside a band of 0.25
    v = check.gate(_run({"bf16": GOOD["bf16"], "int4": _agg(0.00995, 1e-4, 0.98)}, {"int4": {"kl_mean": {"max": 0.01}}}))
    assert v["verdict"] == "pass" and v["within_noise"] == [] and v["warnings"] == [] and not v["passed"][0]["within_noise"]


def test_an_absolute_fail_limit_combines_both_errors_unscaled():
    """kl_mean:+0.001 against a baseline of 0.003: the limit is 0.004, and without per-prompt rows the band is both
    records' errors combined, the baseline's not scaled (an absolute step moves the limit, not its spread): √2·1e-4."""
    out = Regression.parse("kl_mean:+0.001").outcome("p", {"kl_mean": 0.0041, "kl_mean_se": 1e-4}, {"kl_mean": 0.003, "kl_mean_se": 1e-4})
    assert out.limit == pytest.approx(0.004, rel=1e-12, abs=0) and out.noise == pytest.approx(math.sqrt(2) * 1e-4, rel=1e-12, abs=0)
    assert out.within_noise and not out.passed and not out.paired


def test_paired_errors_from_two_prompts_and_rows_that_cannot_be_paired():
    """Two prompts of 10 and 30 positions, means 0.002/0.005 against 0.001/0.003: each prompt's part of N·D is 0.01
    and 0.06, D = 0.07/40, so the paired error is √(2/1 · 2 · 0.0075²)/40 = 3.75e-4 (by hand). None where a row's
    value is not a finite number (an infinite KL in one prompt: the gate falls back to the combined band rather than
    crash), or one side holds a prompt twice."""
    a = [{"prompt": "a", "positions": 10, "kl_mean": 0.002}, {"prompt": "b", "positions": 30, "kl_mean": 0.005}]
    b = [{"prompt": "a", "positions": 10, "kl_mean": 0.001}, {"prompt": "b", "positions": 30, "kl_mean": 0.003}]
    assert gate_checks.paired_error("kl_mean", a, b, 1.0) == pytest.approx(3.75e-4, rel=1e-12, abs=0)
    for bad in (math.inf, math.nan, None):
        assert gate_checks.paired_error("kl_mean", [a[0] | {"kl_mean": bad}, a[1]], b, 1.0) is None, bad
    assert gate_checks.paired_error("kl_mean", [a[0] | {"kl_mean": math.inf}, a[1]], [b[0], b[1] | {"kl_mean": math.inf}], 1.0) is None
    assert gate_checks.paired_error("kl_mean", a + [a[0]], b, 1.0) is None and gate_checks.paired_error("kl_mean", a, b + [b[1]], 1.0) is None
    run, base = _run({"int4": _agg(math.inf, math.nan, 0.98)}), _run({"int4": _agg(3e-3, 1e-4, 0.98)}, run_id="base")
    run.pairs[0].prompts, base.pairs[0].prompts = [a[0] | {"kl_mean": math.inf}, a[1]], b
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "fail" and v["breaches"][0]["noise"] is None


def test_a_run_without_a_noise_floor_is_gated_by_its_plain_limits():
    """No noise_floor in the run: min and max limits and --fail hold as ever; a limit in multiples of the floor, or on
    kl_floor_multiple, is a usage error that says so."""
    run = _run(GOOD, {"int4": {"kl_mean": {"max": 0.01}, "top1_agree": {"min": 0.95}}}, noise_floor=None)
    v = check.gate(run)
    assert v["verdict"] == "pass" and v["checks"] == 2
    with pytest.raises(GateError, match="max_x_floor needs a noise floor"):
        check.gate(_run(GOOD, {"int4": {"kl_mean": {"max_x_floor": 20}}}, noise_floor=None))


def test_a_fail_metric_the_baseline_pair_lacks_is_an_error_naming_the_baseline():
    """--fail on a metric the run's pair has and the baseline's pair does not (and that is not a cross_vocab
    aggregate, which a baseline pair of one vocabulary lacks by design): an error naming the baseline file."""
    run = _run({"int4": _agg(3e-3, 1e-4, 0.98) | {"kl_p99": 0.02}})
    with pytest.raises(GateError, match=r"kl_p99:\+10%.*baseline b\.json"):
        check.gate(run, baseline=_run({"int4": _agg(3e-3, 1e-4, 0.98)}, run_id="base"), baseline_path=Path("b.json"), fail=["kl_p99:+10%"])


def test_the_text_settings_differ_with_a_warning_in_text_mode_only():
    """config.text (the windows) moves the numbers of a text-mode run: a difference is a warning; in generate mode the
    text settings are unused and their difference is not one."""
    run, base = _run(GOOD), _run(GOOD, run_id="base")
    run.config["text"], base.config["text"] = {"context": 256}, {"context": 512}
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert "config.text differs: baseline {'context': 512}, this run {'context': 256}" in v["warnings"]
    run.config["mode"] = base.config["mode"] = "generate"
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert not any("config.text" in w for w in v["warnings"])


def test_a_run_without_input_fingerprints_is_compared_with_a_warning():
    """The run's record (not the baseline's) lacks token_ids_sha256 and segments_sha256: a warning, no KeyError."""
    run, base = _run(GOOD), _run(GOOD, run_id="base")
    run.inputs.pop("token_ids_sha256")
    base.inputs["segments_sha256"] = "c" * 64
    v = check.gate(run, baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and any("cannot be verified" in w for w in v["warnings"])


def test_a_baseline_without_input_fingerprints_is_compared_with_a_warning():
    """Where either record lacks token_ids_sha256 the prompt set cannot be verified: a warning says so (not silence)."""
    pairs = {"bf16": _agg(2e-4, 1e-5, 0.99), "int4": _agg(3e-3, 1e-4, 0.98)}
    base = _run(pairs, run_id="base")
    base.inputs.pop("token_ids_sha256")
    v = check.gate(_run(pairs), baseline=base, baseline_path=Path("b.json"), fail=["kl_mean:+10%"])
    assert v["verdict"] == "pass" and any("cannot be verified" in w for w in v["warnings"])


@pytest.mark.parametrize("text, value", [("kl_mean:+0.25", 0.75), ("kl_mean:+50%", 0.75), ("top1_agree:-50%", 0.25)])
def test_a_move_of_exactly_the_allowed_amount_passes_even_strict(text, value):
    """--fail METRIC:±AMOUNT fails a move past the baseline by more than AMOUNT: exactly AMOUNT passes (as a value
    at a config limit does); just past it fails. Values exact in binary floating point."""
    r = Regression.parse(text)
    assert r.breach("p", {r.metric: value}, {r.metric: 0.5}, strict=True) is None
    assert r.breach("p", {r.metric: value + r.sign * 1e-9}, {r.metric: 0.5}, strict=True) is not None


def test_a_star_limit_applies_to_every_variant_the_noise_floor_included():
    """gate: {"*": ...} is every variant (config: "'*', every variant"): the noise-floor pair too, one check each."""
    pairs = {"bf16": _agg(2e-4, 1e-6, 0.99), "int4": _agg(3e-3, 1e-5, 0.98)}
    v = check.gate(_run(pairs, {"*": {"kl_mean": {"max": 1e-4}}}))
    assert v["checks"] == 2 and sorted(b["pair"] for b in v["breaches"]) == ["bf16", "int4"]


# ---------------------------------------------------------------- the verdict in CI systems' forms


def _gate_pair(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "good", tmp_path / "bad"
    gate = {"int4": {"kl_mean": {"max_x_floor": 20}, "top1_agree": {"min": 0.95}}, "bf16": {"top1_agree": {"min": 0.985}}}
    # int4's top-1 0.9499 against 0.95 with a standard error of 0.0069: within noise
    for folder, pairs in ((good, GOOD), (bad, {"bf16": GOOD["bf16"], "int4": _agg(0.02, 1e-4, 0.9499)})):
        folder.mkdir()
        records.write(folder, _run(pairs, gate, run_id=folder.name))
    return good, bad


def test_the_verdict_as_junit_a_step_summary_and_annotations(tmp_path, capsys, monkeypatch):
    """Read back by junitparser (what CI test-report tools are built on): a test case per check, a breach a failure;
    the step summary appended after what earlier steps wrote; an annotation per breach; the JSON line still last."""
    from junitparser import Error, Failure, JUnitXml

    good, bad = _gate_pair(tmp_path)
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    junit = tmp_path / "ci" / "gate.xml"  # its folder is made
    args = ["check", "--run", str(bad), "--baseline", str(good), "--fail", "kl_mean:+10%", "--junit", str(junit)]
    assert main(args) == 1
    out = capsys.readouterr().out.strip().splitlines()
    verdict = json.loads(out[-1])
    assert verdict["checks"] == 5 and len(verdict["breaches"]) == 2 and len(verdict["within_noise"]) == 1

    suites = list(JUnitXml.fromfile(str(junit)))
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (5, 2, 0, 0)
    cases = {(c.classname, c.name): c for c in suite}
    assert len(cases) == 5
    failed = {k for k, c in cases.items() if any(isinstance(r, Failure) for r in c.result)}
    assert failed == {("gate.int4", "kl_mean <= 20 x floor"), ("gate.int4", "kl_mean +10% vs baseline")}
    assert not any(isinstance(r, Error) for c in suite for r in c.result)
    noisy = cases[("gate.int4", "top1_agree >= 0.95")]
    assert noisy.is_passed and "within noise" in noisy.system_out
    failure = next(r for r in cases[("gate.int4", "kl_mean <= 20 x floor")].result)
    assert failure.message.startswith("int4: kl_mean = 0.02, limit <= 20 x floor = 0.004") and failure.message.endswith("FAIL")
    assert {p.name: p.value for p in suite.properties()} == {"run": "bad", "baseline": "good", "verdict": "fail"}

    md = summary.read_text()
    assert md.startswith("earlier step\n### Quantization gate: FAIL\n")
    assert md == "earlier step\n" + (bad / "gate.md").read_text() + "\n"
    table = [line for line in md.splitlines() if line.startswith("| ") and "pair" not in line]
    assert len(table) == 5 and sum("**FAIL**" in line for line in table) == 2 and sum("within noise" in line for line in table) == 1
    assert all(len(line.split(" | ")) == 7 for line in table)

    errors = [line for line in out if line.startswith("::error ")]
    assert errors == [  # % escaped as GitHub's toolkit does (%25); ":" only in the title
        "::error title=gate%3A int4 kl_mean::int4: kl_mean = 0.02, limit <= 20 x floor = 0.004: FAIL",
        "::error title=gate%3A int4 kl_mean::int4: kl_mean = 0.02, limit +10%25 vs baseline = 0.0033 (baseline 0.003): FAIL",
    ]
    assert any(line.startswith("::warning title=gate::") and "within noise" in line for line in out)


def test_without_github_actions_there_are_no_annotations_and_gate_md_is_still_written(tmp_path, capsys, monkeypatch):
    good, _ = _gate_pair(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert main(["check", "--run", str(good)]) == 0
    assert not any(line.startswith("::") for line in capsys.readouterr().out.splitlines())
    monkeypatch.setenv("GITHUB_ACTIONS", "true")  # no breach: no ::error line, and no empty line in its place
    assert main(["check", "--run", str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "" not in out and not any(line.startswith("::error") for line in out)
    assert (good / "gate.md").read_text().startswith("### Quantization gate: PASS\n\nall 3 checks pass (run good)\n")


@pytest.mark.parametrize("kind", ["usage", "crash", "interrupt"])
def test_a_gate_without_a_verdict_leaves_an_error_in_its_junit_report(tmp_path, capsys, monkeypatch, kind):
    """A CI dashboard that reads the JUnit file shows why no check ran, instead of a missing report."""
    from junitparser import Error, JUnitXml

    from harness import cli

    junit, summary = tmp_path / "gate.xml", tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    if kind == "usage":
        code, args, message = 2, ["--fail", "kl_mean:+10%"], "--fail compares with a baseline"
    else:
        failure = RuntimeError("an unforeseen failure") if kind == "crash" else cli.Terminated()

        def boom(cfg, planned=None):
            raise failure

        monkeypatch.setattr(cli, "run_compare", boom)
        code, args, message = (3, [], "an unforeseen failure") if kind == "crash" else (143, [], "terminated (SIGTERM)")
    assert main(["check", "--config", str(ROOT / "configs" / "ci-gate.yaml"), "--junit", str(junit), *args]) == code
    capsys.readouterr()
    (suite,) = list(JUnitXml.fromfile(str(junit)))
    assert (suite.tests, suite.failures, suite.errors) == (1, 0, 1)
    (case,) = list(suite)
    (error,) = case.result
    assert isinstance(error, Error) and message in error.message
    assert error.type == {"usage": "input error, exit 2", "crash": "internal error, exit 3", "interrupt": "interrupted, exit 143"}[kind]
    assert summary.read_text().startswith("### Quantization gate: ERROR\n") and message in summary.read_text()


def test_markdown_cells_and_fences_hold_whatever_the_names_and_messages_hold():
    """Rendered by markdown-it (a CommonMark parser, with GitHub's tables): a pipe, a carriage return or HTML in a pair
    name or a warning stays text in its cell; an error message with a code fence in it stays in its block."""
    from markdown_it import MarkdownIt

    from harness import gate_formats

    name = "int|4\r<b>x</b>&amp;"
    v = check.gate(_run({"bf16": GOOD["bf16"], name: GOOD["int4"]}, {name: {"kl_mean": {"max": 1e-9}}}))
    v["warnings"].append("a | b\r\n<script>c</script>")
    html = MarkdownIt("commonmark").enable("table").render(gate_formats.markdown(v))
    assert html.count("<tr>") == 2 and html.count("<td") == 7  # the header, one check: no row split off
    assert "<td>int|4 &lt;b&gt;x&lt;/b&gt;&amp;amp;</td>" in html and "<b>" not in html and "<script>" not in html
    assert "<li>a | b &lt;script&gt;c&lt;/script&gt;</li>" in html
    html = MarkdownIt("commonmark").render(gate_formats.markdown_error("one ``` two\n```\nthree", "input error, exit 2"))
    assert html.count("<pre>") == 1 and "one ``` two\n```\nthree" in html


def test_junit_holds_control_characters_and_dotted_names_and_counts_a_check_once(tmp_path, capsys):
    """A control character (in a path, a message) would make the file unreadable XML; a dot in a pair's name would be
    read by Jenkins as a package; the same limit twice is one check."""
    from junitparser import JUnitXml

    good, bad = _gate_pair(tmp_path)
    junit = tmp_path / "gate.xml"
    assert main(["check", "--run", str(good), "--baseline", str(tmp_path / "no\x1bpe"), "--fail", "kl_mean:+10%", "--junit", str(junit)]) == 2
    (suite,) = list(JUnitXml.fromfile(str(junit)))
    assert "no\\x1bpe" in next(iter(suite)).result[0].message
    record = records.read(bad)
    dotted = record.model_copy(update={"pairs": [p.model_copy(update={"candidate": "qwen1.5-int4"}) if p.candidate == "int4" else p
                                                 for p in record.pairs],
                                       "config": record.config | {"gate": {"qwen1.5-int4": {"kl_mean": {"max": 0.01}}, "*": {"kl_mean": {"max": 0.01}}}}})  # fmt: skip
    records.write(bad, dotted)
    assert main(["check", "--run", str(bad), "--baseline", str(bad), "--fail", "kl_mean:+10%", "kl_mean:+10.0%", "--junit", str(junit)]) == 1
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["checks"] == 4  # <= 0.01 on each pair (twice on the dotted one: once), +10% on each (twice: once)
    (suite,) = list(JUnitXml.fromfile(str(junit)))
    names = [(c.classname, c.name) for c in suite]
    assert len(names) == len(set(names)) == 4 and ("gate.qwen1_5-int4", "kl_mean <= 0.01") in names


def test_an_unwritable_report_path_is_refused_before_the_gate_runs(tmp_path, capsys, monkeypatch):
    from harness import cli

    monkeypatch.setattr(cli, "run_compare", lambda cfg, planned=None: pytest.fail("the comparison ran"))
    (tmp_path / "afile").write_text("x")
    for flag, path, message in (("--junit", tmp_path / "afile" / "gate.xml", "is a file, not a folder"),
                                ("--markdown", tmp_path, "is a folder: give the path of a file")):  # fmt: skip
        assert main(["check", "--config", str(ROOT / "configs" / "ci-gate.yaml"), flag, str(path)]) == 2
        assert message in capsys.readouterr().err


def test_a_command_line_error_or_an_early_interrupt_replaces_a_stale_report(tmp_path, capsys, monkeypatch):
    """argparse's errors come before any command runs, and an interrupt can come before harness's own handling: both
    used to leave an earlier run's passing gate.xml in place, which a CI dashboard then showed."""
    from junitparser import Error, JUnitXml

    from harness import cli

    good, _ = _gate_pair(tmp_path)
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    assert main(["check", "--run", str(good), "--junit", str(junit), "--markdown", str(md)]) == 0
    assert md.read_text() == (good / "gate.md").read_text() and "PASS" in md.read_text()
    capsys.readouterr()
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    with pytest.raises(SystemExit) as exc:
        main(["check", "--run", str(good), "--fial", "kl_mean:+1%", f"--junit={junit}", "--markdown", str(md)])
    assert exc.value.code == 2
    out = capsys.readouterr()
    (case,) = list(next(iter(JUnitXml.fromfile(str(junit)))))
    (error,) = case.result
    assert isinstance(error, Error) and error.type == "usage error, exit 2" and "unrecognized arguments: --fial" in error.message
    assert md.read_text().startswith("### Quantization gate: ERROR") and "--fial" in md.read_text()
    assert out.out == "::error title=harness check%3A usage error%2C exit 2::harness: error: unrecognized arguments: --fial\n"

    def interrupted(argv):
        raise cli.Terminated()

    monkeypatch.setattr(cli, "_main", interrupted)
    assert main(["check", "--run", str(good), "--junit", str(junit)]) == 143
    (case,) = list(next(iter(JUnitXml.fromfile(str(junit)))))
    assert case.result[0].type == "interrupted, exit 143" and case.result[0].message == "terminated (SIGTERM)"


def test_a_crash_report_names_the_exception_and_holds_its_traceback(tmp_path, capsys, monkeypatch):
    from junitparser import JUnitXml

    from harness import cli

    monkeypatch.setattr(cli, "run_compare", lambda cfg, planned=None: {}["missing"])
    junit = tmp_path / "gate.xml"
    assert main(["check", "--config", str(ROOT / "configs" / "ci-gate.yaml"), "--junit", str(junit)]) == 3
    capsys.readouterr()
    (case,) = list(next(iter(JUnitXml.fromfile(str(junit)))))
    error = case.result[0]
    assert error.message == "KeyError: 'missing'" and "Traceback (most recent call last)" in error.text and "run_compare" in error.text


def test_no_verdict_reports_are_best_effort_and_each_flag_is_read_on_its_own(tmp_path, monkeypatch):
    """A message holding an undecodable path byte (a surrogate), a closed stdout, or `--junit` without its path: the
    reports that can be written are, and nothing raises (an exception here would turn exit 2 or 3 into 1)."""
    from harness import gate_formats

    summary, md = tmp_path / "summary.md", tmp_path / "gate.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    gate_formats.no_verdict(["--run", "x", "--markdown", str(md), "--junit"], "no run record at /tmp/no\udcffdir", "input error, exit 2")
    assert "/tmp/no\\udcffdir" in md.read_text() and "/tmp/no\\udcffdir" in summary.read_text()


def test_a_verdict_piped_into_head_keeps_its_exit_code(tmp_path):
    """`harness check ... | head -1` may close stdout before the table: the verdict's exit code stands (it was 3, an
    internal error, with a BrokenPipeError traceback). `| true` closes it before the first line, every time."""
    import subprocess
    import sys

    _, bad = _gate_pair(tmp_path)
    script = f'"{sys.executable}" -m harness check --run "{bad}" | true; echo "rc=${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "rc=1" and "Traceback" not in done.stderr, done.stderr
