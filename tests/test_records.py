"""The run record: writes and reads back losslessly, accepts older schemas, refuses what it cannot read."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
import torch

from harness import records
from harness.records import RecordError, RunRecord

BIN = {"p_top_lo": 0.0, "p_top_hi": 0.2, "positions": 3, "kl_mean": 1e-5, "flip_rate": 0.0}


def _record(**extra) -> RunRecord:
    pair = records.PairRecord(reference="ref", candidate="cand", aggregates={"positions": 3, "kl_mean": 1.5e-5, "kl_max": math.inf,
                              "kl_mean_se": math.nan, "top1_agree": 1.0, "by_confidence": [BIN]},
                              prompts=[{"prompt": "a", "kl_mean": 1e-5}], positions_file="positions-cand.npz")  # fmt: skip
    return RunRecord(schema_version=records.SCHEMA_VERSION, run_id="r1", status="ok", created_at="2026-01-01T00:00:00+00:00",
                     seed=3, batch_size=4, config={"seed": 3}, variants={"ref": {"dtype": "float32"}}, pairs=[pair],
                     matrix=[{"a": "ref", "b": "cand", "top1_agree": 0.9, "sym_kl_mean": 2e-5}], **extra)  # fmt: skip


def test_round_trip_keeps_every_value_including_inf_and_nan(tmp_path):
    written = _record(**records.environment())
    records.write(tmp_path, written)
    back = records.read(tmp_path)  # a folder or its run.json
    assert back.model_dump_json() == written.model_dump_json()
    agg = back.pairs[0].aggregates
    assert agg["kl_max"] == math.inf and math.isnan(agg["kl_mean_se"]) and agg["kl_mean"] == 1.5e-5
    assert records.read(tmp_path / "run.json").reference == "ref"


def test_environment_names_the_machine_the_libraries_and_the_commit():
    env = records.environment()
    assert env["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert {"transformers", "gptqmodel", "optimum", "python"} <= set(env["versions"])
    assert env["machine"]["cpus"] >= 1 and env["machine"]["ram_gib"] > 0 and env["machine"]["cpu"]
    assert re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"]) and isinstance(env["git"]["dirty"], bool)


def test_the_commit_is_the_harness_checkouts_wherever_it_runs(tmp_path, monkeypatch):
    import subprocess
    from pathlib import Path

    here = Path(records.__file__).parent
    want = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(tmp_path)  # outside any git checkout, as a user's project folder may be
    assert records.git_state()["commit"] == want


def test_reads_a_schema_1_record_and_upgrades_it(tmp_path):
    old = {  # exactly the keys schema 1 wrote
        "schema_version": 1, "status": "ok", "created_at": "2026-11-20T10:00:00+00:00",
        "machine": {"platform": "Linux", "cpus": 2}, "config": {"seed": 7, "batch_size": 8},
        "variants": {"ref": {}}, "noise_floor": None, "matrix": [],
        "pairs": [{"reference": "ref", "candidate": "c", "aggregates": {"positions": 9, "kl_mean": 0.1, "top1_agree": 0.9},
                   "prompts": [], "positions_file": "p.npz"}],
    }  # fmt: skip
    run = tmp_path / "20261120T100000Z-abcd1234"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(old))
    rec = records.read(run)
    assert rec.schema_version == records.SCHEMA_VERSION
    assert (rec.seed, rec.batch_size, rec.run_id, rec.files) == (7, 8, run.name, {})
    assert rec.pairs[0].aggregates["kl_mean"] == 0.1


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no run record there"),
        ("{not json", "cannot read the run record"),
        ("[1, 2]", "a run record is a JSON object"),
        ('{"status": "ok"}', "no integer 'schema_version'"),
        (json.dumps({"schema_version": 99, "status": "ok"}), "newer than this harness reads"),
        (json.dumps({"schema_version": 2, "status": "maybe", "created_at": "x"}), "key 'status'"),
    ],
)
def test_unreadable_records_name_the_file_and_the_problem(tmp_path, content, message):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(RecordError, match=re.escape(message)) as err:
        records.read(tmp_path)
    assert str(tmp_path / "run.json") in str(err.value)


def test_missing_or_broken_positions_file_is_a_record_error(tmp_path):
    pair = records.PairRecord(reference="ref", candidate="int4", aggregates={"positions": 4, "kl_mean": 0.0, "top1_agree": 1.0},
                              prompts=[], positions_file="positions-int4.npz")
    with pytest.raises(RecordError, match=r"positions-int4\.npz: the per-position data of pair 'int4' .* cannot be read"):
        records.load_positions(tmp_path, pair)
    (tmp_path / "positions-int4.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RecordError, match="run `harness compare` again"):
        records.load_positions(tmp_path, pair)


def test_a_record_that_lost_its_pairs_is_refused_before_any_report_is_rewritten(tmp_path):
    from harness import report

    records.write(tmp_path, records.RunRecord(schema_version=records.SCHEMA_VERSION, status="ok", created_at="2026-01-01T00:00:00Z"))
    raw = json.loads((tmp_path / "run.json").read_text())
    del raw["pairs"]
    (tmp_path / "run.json").write_text(json.dumps(raw))
    (tmp_path / "summary.csv").write_text("kept")
    with pytest.raises(RecordError, match="key 'pairs' is missing"):
        report.render(tmp_path)
    assert (tmp_path / "summary.csv").read_text() == "kept"
    with pytest.raises(RecordError, match="is a file, not a run folder or its run.json"):
        records.run_dir(tmp_path / "summary.csv")


def test_a_record_one_schema_newer_is_refused(tmp_path):
    """The boundary of `read`'s schema check: SCHEMA_VERSION + 1 is newer than this harness reads (99 is far past it)."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schema_version": records.SCHEMA_VERSION + 1, "status": "ok", "created_at": "x", "pairs": []}))
    with pytest.raises(records.RecordError, match="newer than this harness reads"):
        records.read(path)


def test_git_state_says_whether_the_checkout_had_changes(tmp_path):
    """run.json's git.dirty: False on a clean checkout, True once a tracked file changed (numbers from uncommitted
    code), in a throwaway repository."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    clean = records.git_state(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "f.py").write_text("x = 2\n")
    assert records.git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


def test_json_safe_keeps_the_sign_of_infinity():
    """gate.json and the page's data: NaN as null, +inf as "inf", -inf as "-inf" (not "inf")."""
    assert records.json_safe({"a": [math.inf, -math.inf, math.nan, 1.5]}) == {"a": ["inf", "-inf", None, 1.5]}


@pytest.mark.parametrize(
    "edit, key, why",
    [
        (lambda r: r["pairs"][0].update(aggregates={}), "pairs.0.aggregates.positions", "Field required"),
        (lambda r: r["pairs"][0]["aggregates"].update(kl_mean="abc"), "pairs.0.aggregates.kl_mean", "valid number"),
        (lambda r: r["pairs"][0]["aggregates"].update(kl_p99=[1]), "pairs.0.aggregates", "'kl_p99' is [1], not a number"),
        (lambda r: r["pairs"][0]["aggregates"].update(positions="many"), "pairs.0.aggregates.positions", "valid integer"),
        (lambda r: r["pairs"][0]["aggregates"].update(by_confidence=[1]), "pairs.0.aggregates.by_confidence.0", "valid dictionary"),
        (lambda r: r["pairs"][0]["aggregates"].update(kl_mean_ci95=5), "pairs.0.aggregates.kl_mean_ci95", "valid tuple"),
        (lambda r: r["pairs"][0].update(prompts=[{}]), "pairs.0.prompts.0.prompt", "Field required"),
        (lambda r: r["pairs"][0].update(prompts=[{"prompt": "a", "kl_mean": "x"}]), "pairs.0.prompts.0", "'kl_mean' is 'x'"),
        (lambda r: r.update(matrix=[{"a": 1}]), "matrix.0.a", "valid string"),
        (lambda r: r.update(matrix=[{"a": "x", "b": "y", "top1_agree": 0.5}]), "matrix.0.sym_kl_mean", "Field required"),
        (lambda r: r.update(throughput={"results": 3}), "throughput.results", "valid list"),
        (lambda r: r.update(throughput={"results": [{"gbps": "fast"}]}), "throughput.results.0.gbps", "valid number"),
    ],
)
def test_a_hand_edited_record_names_the_key_that_is_wrong(tmp_path, edit, key, why):
    """Values every reader (report, check, the page) takes from a record are checked on reading: a wrong type or a
    missing key is a RecordError naming the key, not a crash (exit 3) in whichever reader touched it first."""
    from harness import report

    records.write(tmp_path, _record())
    raw = json.loads((tmp_path / "run.json").read_text())
    edit(raw)
    (tmp_path / "run.json").write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=f"key {re.escape(repr(key))}: .*{re.escape(why)}.*changed by hand or damaged"):
        report.render(tmp_path)


def test_written_values_pass_the_checks_unchanged():
    """NaN, inf, null and ints are numbers, and the record keeps what was written (an int stays an int); a number in a
    string is not one ("1e-3" would pass a lax float check and then fail in the report's number formats)."""
    agg = {"positions": 3, "kl_mean": math.nan, "top1_agree": 1, "kl_max": math.inf, "kl_p99": None, "kl_inf": 2,
           "kl_mean_ci95": [None, 1.0], "by_confidence": [BIN]}  # fmt: skip
    pair = records.PairRecord(reference="r", candidate="c", aggregates=agg, prompts=[{"prompt": "a", "kl_mean": None}],
                              positions_file="-")  # fmt: skip
    assert pair.aggregates == agg and type(pair.aggregates["top1_agree"]) is int
    for bad in ({"kl_mean": "1e-3"}, {"kl_max": "inf"}, {"positions": 3.0}, {"kl_inf": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}"):
            records.PairRecord(reference="r", candidate="c", aggregates=agg | bad, prompts=[], positions_file="-")


def test_side_files_with_the_wrong_arrays_are_record_errors(tmp_path):
    """A positions file without an array readers take, or with arrays of another length than the pair's positions;
    tokens.json with fewer prompts than the run, or a prompt without its texts: RecordErrors naming the file."""
    import numpy as np

    pair = records.PairRecord(reference="ref", candidate="q", aggregates={"positions": 4, "kl_mean": 0.1, "top1_agree": 1.0},
                              prompts=[], positions_file="positions-q.npz")  # fmt: skip
    full = {k: np.zeros(4) for k in ("kl", "prompt", "position", "target", "js")}
    np.savez(tmp_path / "positions-q.npz", **full)
    assert set(records.load_positions(tmp_path, pair)) == set(full)
    np.savez(tmp_path / "positions-q.npz", **{k: v for k, v in full.items() if k != "kl"})
    with pytest.raises(RecordError, match=r"positions-q\.npz: .*it lacks the array\(s\) kl\)"):
        records.load_positions(tmp_path, pair)
    np.savez(tmp_path / "positions-q.npz", **(full | {"js": np.zeros(3)}))
    with pytest.raises(RecordError, match=r"the pair has 4 positions, but its arrays' shapes are js \(3,\)"):
        records.load_positions(tmp_path, pair)

    rec = _record(files={"tokens": "tokens.json"}, inputs={"prompts": 2})
    prompt = {"id": "a", "ids": [1, 2], "texts": ["x", "y"]}
    (tmp_path / "tokens.json").write_text(json.dumps({"prompts": [prompt, prompt], "vocab": {"1": "x"}}))
    assert len(records.load_tokens(tmp_path, rec)["prompts"]) == 2
    (tmp_path / "tokens.json").write_text(json.dumps({"prompts": [prompt], "vocab": {"1": "x"}}))
    with pytest.raises(RecordError, match=r"tokens\.json: .*it holds 1 prompts, the run had 2"):
        records.load_tokens(tmp_path, rec)
    (tmp_path / "tokens.json").write_text(json.dumps({"prompts": [prompt, {"id": "b", "ids": [1]}], "vocab": {}}))
    with pytest.raises(RecordError, match=r"tokens\.json: .*prompts\.1\.texts: Field required"):
        records.load_tokens(tmp_path, rec)
