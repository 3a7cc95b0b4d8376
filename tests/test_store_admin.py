"""`harness store list|prune`: what the store folder holds, and pruning it to what kept runs name, never touching
a busy entry, an entry a kept run uses, or anything that is not the harness's."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest
import torch

from harness import records, store, store_admin
from harness.cli import main

OLD = time.time() - 2 * store_admin.BUSY_S  # older than any writer could be at work


def _store(root: Path, key: str, name: str, rows: int = 7) -> Path:
    s = store.Store(root / key)
    gen = torch.Generator().manual_seed(len(name))
    s.write_shard(0, {"logprobs": torch.log_softmax(torch.randn(rows, 50, generator=gen), -1).half(),
                      "target": torch.zeros(rows, dtype=torch.int64)}, {"segments": [0, 1]})  # fmt: skip
    s.write_index({"key": key, "model": {"name": name, "source": f"zoo:{name}", "dtype": "float16"}, "facts": {"shards": 1}})
    return s.root


def _run(reports: Path, run: str, stores: dict[str, Path], generations: Path | None = None) -> Path:
    record = records.RunRecord(
        schema_version=records.SCHEMA_VERSION, run_id=run, status="ok", created_at="2026-12-06T00:00:00+00:00",
        variants={name: {"store": str(path)} for name, path in stores.items()},
        inputs={"generations": str(generations)} if generations else {},
    )  # fmt: skip
    (reports / run).mkdir(parents=True)
    records.write(reports / run, record)
    return reports / run


def _keys(root: Path) -> set[str]:
    return {e.key for e in store_admin.entries(root)}


@pytest.fixture
def folder(tmp_store, tmp_path):
    """Three stores, two cached generations (one with a part share and an old temporary file of a dead writer), a
    run that uses store a and generation g1, a run that uses store b; and two things that are not the harness's."""
    a, b, c = (_store(tmp_store, k * 20, n) for k, n in (("a", "ref"), ("b", "int4"), ("c", "int8")))
    gens = tmp_store / "generations"
    gens.mkdir()
    g1, g2 = gens / f"{'d' * 20}.json", gens / f"{'e' * 20}.json"
    for path in (g1, gens / f"{'d' * 20}.part-1-of-2.json", g2):
        path.write_text('{"model": "zoo:ref", "continuations": [[1, 2]]}')
    dead = gens / f".{'d' * 20}.json.tmp-999999999"
    dead.write_text("{")
    os.utime(dead, (OLD, OLD))
    (tmp_store / "notes").mkdir()
    (tmp_store / "README").write_text("mine")
    reports = tmp_path / "reports"
    return {"a": a, "b": b, "c": c, "g1": g1, "g2": g2, "reports": reports,
            "run1": _run(reports, "run1", {"ref": a}, g1), "run2": _run(reports, "run2", {"int4": b})}  # fmt: skip


def test_list_shows_every_entry_its_model_size_and_state(folder, tmp_store, capsys):
    assert main(["store", "list", "--keep", str(folder["run1"])]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    assert set(rows) == {"a" * 20, "b" * 20, "c" * 20, "d" * 20, "e" * 20}
    assert "kept" in rows["a" * 20] and "ref (zoo:ref) float16" in rows["a" * 20] and "1/1" in rows["a" * 20]
    assert "unused" in rows["b" * 20] and "kept" in rows["d" * 20] and "unused" in rows["e" * 20]
    want = sum(f.stat().st_size for f in tmp_store.rglob("*") if f.is_file() and "notes" not in f.parts and f.name != "README")
    assert f"5 entries, {store_admin.size_text(want)}; the kept runs use 2 of them" in out


def test_prune_keeps_what_the_kept_runs_name_and_nothing_else(folder, tmp_store, capsys):
    before = sorted(p.relative_to(tmp_store) for p in tmp_store.rglob("*"))
    assert main(["store", "prune", "--keep", str(folder["run1"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.relative_to(tmp_store) for p in tmp_store.rglob("*")) == before  # a dry run removes nothing
    assert out.count("would remove") == 3 + 1 and "would remove 3 of 5 entries" in out

    assert main(["store", "prune", "--keep", str(folder["reports"])]) == 0  # a reports folder: every run in it
    assert "removed 2 of 5 entries" in capsys.readouterr().out
    assert _keys(tmp_store) == {"a" * 20, "b" * 20, "d" * 20}
    assert not folder["c"].exists() and not folder["g2"].exists()
    # the kept generation keeps its share too, and loses only its dead writer's temporary file
    assert sorted(p.name for p in folder["g1"].parent.iterdir()) == [f"{'d' * 20}.json", f"{'d' * 20}.part-1-of-2.json"]
    assert store.Store(folder["a"]).is_complete(0) and store.Store(folder["b"]).is_complete(0)

    assert main(["store", "prune", "--keep", str(folder["run2"] / "run.json")]) == 0
    assert _keys(tmp_store) == {"b" * 20}
    assert main(["store", "prune", "--all"]) == 0
    assert _keys(tmp_store) == set()
    assert (tmp_store / "notes").is_dir() and (tmp_store / "README").read_text() == "mine"  # not the harness's


def test_a_moved_store_folder_keeps_its_matches_by_key(folder, tmp_store, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    _run(folder["reports"], "run3", {"int8": moved / folder["c"].name})
    assert main(["store", "prune", "--keep", str(folder["reports"] / "run3")]) == 0
    assert _keys(tmp_store) == {"c" * 20}


def test_busy_entries_are_left_alone(folder, tmp_store, capsys):
    # a live writer of this machine (this process's pid, however old its file), a recent one of any machine
    (folder["a"] / f".shard-00001.safetensors.tmp-{os.getpid()}").write_bytes(b"x")
    os.utime(folder["a"] / f".shard-00001.safetensors.tmp-{os.getpid()}", (OLD, OLD))
    (folder["b"] / ".shard-00001.safetensors.tmp-999999999").write_bytes(b"x")
    old = folder["c"] / ".shard-00001.safetensors.tmp-999999999"  # a dead writer's, long ago: not busy
    old.write_bytes(b"x")
    os.utime(old, (OLD, OLD))
    fresh = tmp_store / ("f" * 20)  # a store a writer just began: no shard, no index yet
    fresh.mkdir()
    progress = folder["g2"].with_suffix(".progress.jsonl")
    progress.write_text("[1]\n")
    with progress.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a generation at work (greedy._progress holds this lock)
        assert main(["store", "prune", "--all"]) == 0
        out = capsys.readouterr().out
    assert _keys(tmp_store) == {"a" * 20, "b" * 20, "e" * 20, "f" * 20}
    assert out.count("left alone") == 4 and "removed 2 of 6 entries" in out
    assert {e.key for e in store_admin.entries(tmp_store) if e.busy} == {"a" * 20, "b" * 20, "f" * 20}  # the lock is gone now
    os.utime(fresh, (OLD, OLD))  # an unfinished store nobody wrote to for long: a dead writer's
    assert main(["store", "prune", "--all"]) == 0 and _keys(tmp_store) == {"a" * 20, "b" * 20}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune"], "needs --keep RUN"),
        (["prune", "--all", "--keep", "{run1}"], "--keep and --all exclude each other"),
        (["prune", "--keep", "{missing}"], "no such run folder"),
        (["prune", "--keep", "{damaged}"], "cannot read the run record"),
        (["list", "--keep", "{empty}"], "a folder with no run.json"),
        (["list", "--all"], "--all and --dry-run are options of prune"),
    ],
)
def test_bad_keep_lists_remove_nothing(folder, tmp_store, tmp_path, capsys, args, message):
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "run.json").write_text('{"status": "ok", "pai')
    (tmp_path / "empty").mkdir()
    names = {"run1": folder["run1"], "missing": tmp_path / "nope", "damaged": tmp_path / "damaged", "empty": tmp_path / "empty"}
    before = sorted(tmp_store.rglob("*"))
    assert main(["store", *(a.format(**names) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(tmp_store.rglob("*")) == before


@pytest.mark.slow
def test_a_compare_record_names_every_entry_it_used(micro_zoo, tmp_store, tmp_path, capsys):
    """Generate mode: the stores and the reference's greedy continuations. Pruning to the run keeps all of them,
    and the same compare then reuses every one."""
    from tests.test_cli import ROOT, SMALL

    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "mode=generate", "generate.max_new_tokens=4", "noise_floor=null",
                 "variants=[{name: int4, source: 'zoo:tiny-qwen1.5-s-chat-gptq-int4'}]", f"reports_dir={tmp_path / 'r'}"]  # fmt: skip
    config = str(ROOT / "configs" / "default.yaml")
    assert main(["compare", "--config", config, *overrides]) == 0
    stray = _store(tmp_store, "f" * 20, "stray")
    capsys.readouterr()
    assert main(["store", "prune", "--keep", str(tmp_path / "r" / "latest")]) == 0
    assert "removed 1 of 4 entries" in capsys.readouterr().out and not stray.exists()
    assert [e.kind for e in store_admin.entries(tmp_store)].count("generations") == 1
    assert main(["compare", "--config", config, *overrides]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 2 and "as generated before" in out


def _failed_run(reports: Path, run: str) -> Path:
    """The record of a run stopped before its models' facts were in (SIGTERM mid-extraction): it names no store."""
    record = records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id=run, status="error", error="Terminated: terminated (SIGTERM)",
                               created_at="2026-12-06T00:00:00+00:00")  # fmt: skip
    (reports / run).mkdir(parents=True)
    records.write(reports / run, record)
    return reports / run


def test_keeping_only_a_failed_run_removes_nothing(folder, tmp_store, capsys):
    """Its record names no store, so keeping it alone kept nothing: prune removed every store (the ones it had just
    filled too). Now that is refused; beside a finished run it only draws a warning."""
    failed = _failed_run(folder["reports"], "run-failed")
    before = _keys(tmp_store)
    assert main(["store", "prune", "--keep", str(failed)]) == 2
    err = capsys.readouterr().err
    assert "name no store, so all 5 entries would go" in err and _keys(tmp_store) == before
    assert main(["store", "prune", "--keep", str(folder["reports"])]) == 0  # run1, run2 and the failed one
    out = capsys.readouterr().out
    assert f"warning: --keep {failed / 'run.json'} names no store (it failed: Terminated" in out
    assert _keys(tmp_store) == {"a" * 20, "b" * 20, "d" * 20}


@pytest.mark.parametrize("index", ["[1, 2]", '{"facts": "x"}', '{"facts": {"filled_by": "x", "shards": 1}}', ""])
def test_a_damaged_index_is_no_index(folder, tmp_store, capsys, index):
    """index.json is what the filling run wrote about a store; a hand-edited one crashed `store list` and a reuse."""
    (folder["c"] / "index.json").write_text(index)
    got = store.Store(folder["c"]).index()
    assert got is None or (isinstance(got["facts"], dict) and "filled_by" not in got["facts"])
    assert main(["store", "list"]) == 0 and "c" * 20 in capsys.readouterr().out


def test_a_store_folder_that_is_a_file_or_not_there_is_said_so(tmp_path, monkeypatch, capsys):
    """`store list` with HARNESS_STORE at a file is an error naming it (it listed 0 entries); at a folder not made yet
    it says that no run has extracted there, so a typo in the variable does not read as an empty store."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "afile"))
    for action in ("list", "prune"):
        assert main(["store", action, "--all"] if action == "prune" else ["store", action]) == 2
        assert f"the store folder {tmp_path / 'afile'} ($HARNESS_STORE) is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "typo"))
    assert main(["store", "list"]) == 0
    assert "($HARNESS_STORE): not there, so no run has extracted into it yet" in capsys.readouterr().out
    assert not (tmp_path / "typo").exists()
