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


def _record(**extra) -> RunRecord:
    pair = records.PairRecord(reference="ref", candidate="cand", aggregates={"kl_mean": 1.5e-5, "kl_max": math.inf,
                              "kl_mean_se": math.nan, "by_confidence": [{"p_top_lo": 0.0, "positions": 3}]},
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
        "pairs": [{"reference": "ref", "candidate": "c", "aggregates": {"kl_mean": 0.1}, "prompts": [], "positions_file": "p.npz"}],
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
    pair = records.PairRecord(reference="ref", candidate="int4", aggregates={}, prompts=[], positions_file="positions-int4.npz")
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
