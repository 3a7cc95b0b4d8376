"""End to end through the `harness` command on the micro zoo and the shipped default config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"


def test_compare_default_config_on_micro_zoo(micro_run):
    run_dir, out = micro_run  # the default config on the micro zoo, 8 small prompts + 2 with HTML payloads
    summary = run_dir / "summary.csv"
    rows = {r["candidate"]: r for r in csv.DictReader(summary.open())}
    assert set(rows) == {"s-chat-fp16", "s-chat-bf16", "s-chat-gptq-int8", "s-chat-gptq-int4", "s-base", "m-chat"}
    for row in rows.values():
        assert row["reference"] == "s-chat-fp32" and int(row["positions"]) > 100
    kl = {name: float(row["kl_mean"]) for name, row in rows.items()}
    top1 = {name: float(row["top1_agree"]) for name, row in rows.items()}
    # float16 < bfloat16 (3 fewer mantissa bits), Int8 < Int4; numerical noise and Int8 are tiny
    # beside a different model (the base, or another size).
    assert 0 < kl["s-chat-fp16"] < kl["s-chat-bf16"]
    assert 0 < kl["s-chat-gptq-int8"] < kl["s-chat-gptq-int4"]
    assert max(kl["s-chat-bf16"], kl["s-chat-gptq-int8"]) < 1e-2 < min(kl["s-base"], kl["m-chat"])
    assert top1["s-chat-gptq-int8"] >= 0.9
    assert "s-chat-gptq-int4" in out and "summary.csv" in out
    assert out.strip().splitlines()[-1] == f"report: {run_dir / 'index.html'}"  # `make compare` ends with it
    # the console table: each row's columns, by the header's names, as summary.csv has them (within the printed digits)
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("candidate "))
    names = lines[at].replace("± se", "kl_mean_se_prompts").replace("x floor", "kl_floor_multiple").split()  # ±: over prompts
    for line in lines[at + 1 : at + 1 + len(rows)]:
        cells = dict(zip(names, line.split(), strict=True))
        for name in names[1:]:
            rel = 5e-2 if name == "kl_mean_se_prompts" else 6e-3  # 2 significant digits there, 3 or more elsewhere
            assert float(cells[name]) == pytest.approx(float(rows[cells["candidate"]][name]), rel=rel), (cells["candidate"], name)
    # The noise floor (bf16) and every aggregate land where the report stage reads them.
    assert float(rows["s-chat-bf16"]["kl_floor_multiple"]) == pytest.approx(1.0)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["schema_version"] == 2 and run["status"] == "ok" and run["noise_floor"] == "s-chat-bf16"
    # what was measured and what measured it: the weights' fingerprint, and the versions that filled each store
    assert len(run["inputs"]["segments_sha256"]) == 64 and "generations" not in run["inputs"]  # text mode: none
    for name, v in run["variants"].items():
        assert len(v["fingerprint"]) == 64 and v["filled_by"]["versions"]["torch"] == torch.__version__, name
    # the float16 store's rounding, from the reference's rows: named under the table for each pair it is 5% or more of
    added = run["variants"]["s-chat-fp32"]["store_rounding_kl"]
    assert 1e-8 < added < kl["s-chat-bf16"]
    named = [name for name in kl if added / kl[name] >= 0.05]
    assert ("note: the reference's float16 store" in out) == bool(named) and all(f"of {name}'s" in out for name in named)
    agg = next(p for p in run["pairs"] if p["candidate"] == "s-chat-gptq-int4")["aggregates"]
    assert agg["kl_mean_ci95"][0] <= agg["kl_mean"] <= agg["kl_mean_ci95"][1]
    assert {"kl_p99_9", "js_mean_se", "ppl_ratio", "nll_correlation", "by_confidence", "top10_overlap"} <= set(agg)
    assert len(run["matrix"]) == 6 * 7 // 2  # every pair of the 7 models
    positions = np.load(run_dir / "positions-s-chat-gptq-int4.npz")
    assert len(positions["kl"]) == int(rows["s-chat-gptq-int4"]["positions"])
    np.testing.assert_allclose(positions["kl"].mean(), kl["s-chat-gptq-int4"], rtol=1e-9)
    prompt_rows = list(csv.DictReader((run_dir / "prompts.csv").open()))
    assert len(prompt_rows) == 6 * 10  # every (pair, prompt)


def test_config_error_exits_2_with_one_paragraph(tmp_path, capsys):
    assert main(["compare", "--config", str(ROOT / "configs" / "default.yaml"), "batch_sise=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "unknown key 'batch_sise'" in err and "default.yaml" in err
    assert "\n" not in err


def test_a_store_folder_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """It surfaced when the first shard was written, after the reference had loaded, as "a full disk?"; a reports_dir
    that is a file said "File exists"."""
    from harness import loaders

    def load(loaded):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(loaders, "load_model", load)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "afile"))
    for command in ("extract", "compare"):
        assert main([command, "--config", str(ROOT / "configs" / "default.yaml"), f"reports_dir={tmp_path / 'reports'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (compare's error record is named on the line before)
        assert err.startswith("harness: error: ") and f"the store folder {tmp_path / 'afile'} ($HARNESS_STORE) cannot be written: it is a file, not a folder" in err
        assert "Point HARNESS_STORE (or HARNESS_HOME) at a folder" in err
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "store"))
    assert main(["compare", "--config", str(ROOT / "configs" / "default.yaml"), f"reports_dir={tmp_path / 'afile'}"]) == 2
    assert f"key 'reports_dir': cannot write run folders in {tmp_path / 'afile'}: it is a file, not a folder" in capsys.readouterr().err


def test_bench_errors_are_handled_as_every_commands(monkeypatch, capsys):
    """`harness bench` went around the command's error handling: a RecordError (--into a run it cannot re-render)
    printed a raw traceback, and SIGTERM exited 1 rather than 143."""
    from harness import bench, cli, records

    for exc, code, said in ((records.RecordError("no tokens.json there"), 2, "harness: error: no tokens.json there"),
                            (cli.Terminated(), 143, "harness: terminated (SIGTERM)."),
                            (ZeroDivisionError(), 3, "internal error in 'bench'")):  # fmt: skip
        def fails(argv, exc=exc):
            raise exc

        monkeypatch.setattr(bench, "main", fails)
        assert main(["bench", "--quick"]) == code
        err = capsys.readouterr().err
        assert said in err and "Finished store shards" not in err


def test_extract_generate_mode_then_reuse(micro_zoo, tmp_path, tmp_store, capsys):
    config = str(ROOT / "configs" / "default.yaml")
    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "mode=generate", "generate.max_new_tokens=6",
                 "variants=[{name: int4, source: 'zoo:tiny-qwen1.5-s-chat-gptq-int4'}]", "noise_floor=null"]  # fmt: skip
    assert main(["extract", "--config", config, *overrides]) == 0
    first = capsys.readouterr().out
    assert "scored positions" in first and "reused" not in first
    assert main(["extract", "--config", config, *overrides]) == 0
    again = capsys.readouterr().out
    assert again.count("reused") == 2  # the reference and the variant, straight from the store

    from harness import store

    roots = [p for p in tmp_store.iterdir() if p.name != "generations"]
    stores = [store.Store(p) for p in roots]
    ref = next(s for s in stores if s.index()["model"]["name"] == "s-chat-fp32")
    # Teacher-forcing the reference on its own greedy continuation gives that continuation back.
    argmax = torch.cat([b.argmax(-1) for b in ref.blocks(64)])
    assert torch.equal(argmax, ref.read("target"))
    assert len(argmax) <= 8 * 6


def test_extract_in_parts_fills_the_same_store(micro_zoo, tmp_path, tmp_store, monkeypatch, capsys):
    """`harness extract --part K/N`: each part writes only its shards (i % N == K - 1) of every model's store; the parts
    together give the store, shard for shard, byte for byte, that one run writes; compare then reuses all of it. A bad
    K/N is a usage error."""
    from harness import store

    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)  # several shards from a few prompts
    config = str(ROOT / "configs" / "default.yaml")
    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "noise_floor=null", "text.context=16",
                 "variants=[{name: base, source: 'zoo:tiny-qwen1.5-s'}]"]  # fmt: skip
    assert main(["extract", "--config", config, "--part", "2/3", *overrides]) == 0
    out = capsys.readouterr().out
    roots = sorted(p for p in tmp_store.iterdir() if p.is_dir())
    assert len(roots) == 2 and out.count("shards left to other parts") == 2
    for root in roots:
        present = sorted(int(p.stem.split("-")[1]) for p in root.glob("shard-*.safetensors"))
        assert present and all(i % 3 == 1 for i in present)
    assert main(["extract", "--config", config, "--part", "2/3", *overrides]) == 0  # its part is done: nothing to do
    assert "part 2/3 is done" in capsys.readouterr().out
    for k in (1, 3):
        assert main(["extract", "--config", config, "--part", f"{k}/3", *overrides]) == 0
        out = capsys.readouterr().out
        assert out.count("shards kept from an earlier run, ") == 2 and ("left to other parts)" in out) == (k == 1)
    assert main(["compare", "--config", config, *overrides, f"reports_dir={tmp_path / 'reports'}"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2  # every shard was there
    from harness import records

    facts = records.read(tmp_path / "reports" / "latest").variants["base"]  # not the last part's own: this run's
    assert "part" not in facts and "left_to_other_parts" not in facts and facts["first_part"] == "3/3" and facts["forward_s"] == 0.0
    # tokens.json holds every prompt whole: a last token that a window of its own would hold (chat-09's 49th, at
    # context 16: the window would score nothing, so there is none) too
    from harness import config as config_module
    from harness import pipeline

    full = pipeline.plan(config_module.load(config, overrides), log=lambda _: None).tokens.ids
    listed = [p["ids"] for p in json.loads((tmp_path / "reports" / "latest" / "tokens.json").read_text())["prompts"]]
    assert listed == [list(ids) for ids in full] and any(len(ids) % 16 == 1 for ids in full)

    whole = tmp_path / "one-run"
    monkeypatch.setenv("HARNESS_STORE", str(whole))
    assert main(["extract", "--config", config, *overrides]) == 0
    assert sorted(p.name for p in whole.iterdir()) == [p.name for p in roots]  # the same store keys
    for root in roots:
        shards = sorted(root.glob("shard-*"))
        assert len(shards) >= 6  # 3 parts, 2 or more shards each (a .safetensors and its .json)
        for path in shards:
            assert path.read_bytes() == (whole / root.name / path.name).read_bytes(), path

    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--config", config, "--part", bad])
        assert exc.value.code == 2
    assert "is not K/N with 1 <= K <= N" in capsys.readouterr().err
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--config", config, "--part", "1/2", "--wait", bad])
        assert exc.value.code == 2 and f"argument --wait: '{bad}' is not a number of seconds, 0 or more" in capsys.readouterr().err
    assert main(["extract", "--config", config, "--wait", "60", *overrides]) == 2  # before any model loads
    assert "--wait applies with --part only" in capsys.readouterr().err


def test_extract_in_parts_splits_greedy_generation(micro_zoo, tmp_path, tmp_store, monkeypatch, capsys):
    """Generate mode with --part: each part generates its share of the prompts' greedy continuations and waits for the
    others'. A part whose others never come stops after --wait with a clear error and keeps its share; the merged
    continuations equal a single run's, and the stores come out whole."""
    config = str(ROOT / "configs" / "default.yaml")
    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "noise_floor=null", "mode=generate", "generate.max_new_tokens=6",
                 "variants=[{name: base, source: 'zoo:tiny-qwen1.5-s'}]"]  # fmt: skip
    assert main(["extract", "--config", config, "--part", "2/2", "--wait", "0", *overrides]) == 2
    err = capsys.readouterr().err
    assert "part 2/2: the greedy continuations of part(s) [1] are not in" in err and "after 0 s of waiting" in err
    gens = tmp_store / "generations"
    assert [p.name.split(".", 1)[1] for p in gens.glob("*.json")] == ["part-2-of-2.json"]  # its share, kept
    assert main(["extract", "--config", config, "--part", "1/2", "--wait", "0", *overrides]) == 0
    assert main(["extract", "--config", config, "--part", "2/2", "--wait", "0", *overrides]) == 0
    merged = next(p for p in gens.glob("*.json") if ".part-" not in p.name)
    capsys.readouterr()
    assert main(["compare", "--config", config, *overrides, f"reports_dir={tmp_path / 'reports'}"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2

    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "one-run"))
    assert main(["extract", "--config", config, *overrides]) == 0
    single = tmp_path / "one-run" / "generations" / merged.name
    assert json.loads(single.read_text())["continuations"] == json.loads(merged.read_text())["continuations"]
    assert sorted(p.name for p in (tmp_path / "one-run").iterdir()) == sorted(p.name for p in tmp_store.iterdir())


def test_variant_with_a_shorter_context_is_refused(micro_zoo, tmp_path, tmp_store, capsys):
    import shutil

    from harness import zoo

    short = tmp_path / "short-context"
    shutil.copytree(micro_zoo[zoo.CHAT_S], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (short / "config.json").write_text(json.dumps(config))
    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "noise_floor=null", f"variants=[{{name: short, source: '{short}'}}]"]
    assert main(["extract", "--config", str(ROOT / "configs" / "default.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "variant 'short' has a context of 16 positions" in err and "lower 'text.context'" in err
    # in generate mode the segments are prompt + continuation: the advice names that mode's key
    assert main(["extract", "--config", str(ROOT / "configs" / "default.yaml"), *overrides, "mode=generate", "generate.max_new_tokens=4"]) == 2
    err = capsys.readouterr().err
    assert "variant 'short' has a context of 16 positions" in err and "lower 'generate.max_new_tokens' or shorten the prompts" in err
    # and continuations as long as the reference's context leave no room for a prompt: the key is named, not a prompt
    assert main(["extract", "--config", str(ROOT / "configs" / "default.yaml"), *overrides, "mode=generate", "generate.max_new_tokens=5000"]) == 2
    err = capsys.readouterr().err
    assert "key 'generate.max_new_tokens' is 5000, and the reference 's-chat-fp32' has a context of" in err


def test_an_interrupted_compare_leaves_an_error_record_saying_so(tmp_path, monkeypatch, capsys):
    from harness import cli, records

    def interrupted(cfg, *_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_compare", interrupted)
    assert main(["compare", "--config", str(ROOT / "configs" / "default.yaml"), f"reports_dir={tmp_path}"]) == 130
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # (`latest` stays on the last finished run)
    rec = records.read(run_dir)
    assert rec.status == "error" and rec.error == "KeyboardInterrupt: interrupted (Ctrl-C or SIGINT)"
    assert f"error record: {run_dir / 'run.json'}" in capsys.readouterr().err


def test_a_compare_stopped_by_sigterm_leaves_an_error_record_saying_so(tmp_path, monkeypatch, capsys):
    """`timeout` and schedulers stop a job with SIGTERM: taken as Ctrl-C is (exit 143, the shell's for SIGTERM), so the
    record of the failed run is written and finished work kept; the handler is put back afterwards."""
    import os
    import signal

    from harness import cli, records

    def stopped(cfg, *_):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(cli, "_compare", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["compare", "--config", str(ROOT / "configs" / "default.yaml"), f"reports_dir={tmp_path}"]) == 143
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert records.read(run_dir).error == "Terminated: terminated (SIGTERM)"
    err = capsys.readouterr().err
    assert "harness: terminated (SIGTERM). Finished store shards and greedy continuations are kept" in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_prompt_with_no_scored_token_keeps_every_prompt_at_its_index(micro_zoo, tmp_path, tmp_store, capsys):
    """text.score llama_cpp drops a prompt shorter than one window: it has no scored token. tokens.json still lists
    every prompt at its index, so positions.csv and the token view name the prompt each position belongs to (with
    the short prompt first, they named the next one, and the last raised an IndexError)."""
    import gzip

    long = " ".join(f"The river number {i} flows into the sea near town {i * 7}." for i in range(8))
    rows = [{"id": "short", "text": "Hi there."}, {"id": "long-a", "text": long}, {"id": "long-b", "text": long.replace("river", "road")}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["zoo_profile=micro", f"prompts={prompts}", "noise_floor=null", "text.context=32", "text.score=llama_cpp",
                 "metrics.bootstrap_resamples=20", "variants=[{name: base, source: 'zoo:tiny-qwen1.5-s'}]",
                 f"reports_dir={tmp_path / 'reports'}"]  # fmt: skip
    assert main(["compare", "--config", str(ROOT / "configs" / "default.yaml"), *overrides]) == 0
    assert ("warning: 1 of 3 prompts have no scored position (shorter than one window of text.context = 32 tokens, which "
            "llama_cpp scoring drops whole), so they are in no statistic: short") in capsys.readouterr().err
    run = tmp_path / "reports" / "latest"
    tokens = json.loads((run / "tokens.json").read_text())
    assert [p["id"] for p in tokens["prompts"]] == ["short", "long-a", "long-b"]
    ids = {p["id"]: p["ids"] for p in tokens["prompts"]}
    with gzip.open(run / "positions.csv.gz", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["prompt"] for r in rows} == {"long-a", "long-b"}
    assert all(ids[r["prompt"]][int(r["position"])] == int(r["token"]) for r in rows)  # each position in its own prompt
    page = (run / "index.html").read_text()  # the page says which prompts gave nothing, and why
    assert "<b>1 of the 3 prompts have no scored position</b> and are in no statistic: shorter than one window" in page
    assert "(mode text: windows of 32 tokens, text.score llama_cpp)" in page


def test_module_entry_points_take_help_and_refuse_flags(tmp_path):
    """`python -m harness.<module>`: -h/--help prints the docstring's usage (exit 0) and writes nothing; a flag or a
    wrong count of arguments is a usage error (exit 2), not a path (qwen_tokenizer wrote a folder named --help)."""
    import subprocess
    import sys

    def run(*argv):
        return subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    for module in ("harness.qwen_tokenizer", "harness.records", "harness.store", "harness.config"):
        done = run(module, "--help")
        assert done.returncode == 0 and f"python -m {module}" in done.stdout, (module, done.stderr)
    assert list(tmp_path.iterdir()) == []
    done = run("harness.qwen_tokenizer", "--out", "x")
    assert done.returncode == 2 and "unknown option --out" in done.stderr and not (tmp_path / "x").exists()
    done = run("harness.store", "a", "b")
    assert done.returncode == 2 and "2 arguments given, it takes 1" in done.stderr
    from harness.store import Store

    s = Store(tmp_path / "s")
    s.write_shard(0, {"logprobs": torch.log_softmax(torch.randn(4, 9), -1), "target": torch.arange(4)}, {"segments": [0, 1]})
    done = run("harness.store", "s")
    assert done.returncode == 0 and "shard-0" in done.stdout and " ok" in done.stdout, done.stderr
    data = bytearray(s.shard_path(0).read_bytes())
    data[-3] ^= 0x01
    s.shard_path(0).write_bytes(bytes(data))
    done = run("harness.store", "s")
    assert done.returncode == 1 and "INCOMPLETE" in done.stdout and not done.stderr  # a traceback would exit 1 too
    (tmp_path / "empty").mkdir()
    assert run("harness.store", "empty").returncode == 1  # no shard: nothing verifies


def test_importing_any_module_prints_and_writes_nothing(tmp_path):
    """Every module of the package imported in one process (all but __main__, which is the command): nothing on
    stdout and no file written, so a module's `python -m` demo (metrics' scipy check, say) runs only as a script."""
    import subprocess
    import sys

    code = ("import pkgutil, importlib, harness\n"
            "for m in pkgutil.iter_modules(harness.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('harness.' + m.name)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "", (done.stdout, done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_before_the_commands_handling_is_exit_130_or_143(monkeypatch, capsys):
    """SIGINT or SIGTERM in the seconds in which a command imports torch (before its own handling is in place): the
    one-line message and 130 or 143, not a traceback and exit 1 (which `check` keeps for a regression)."""
    from harness import cli

    for exc, code, word in ((KeyboardInterrupt(), 130, "interrupted"), (cli.Terminated(), 143, "terminated (SIGTERM)")):
        def early(argv, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "_main", early)
        assert main(["check", "--run", "x"]) == code
        err = capsys.readouterr().err
        assert err == f"harness: {word}.\n"


def test_a_run_interrupted_while_its_files_are_written_leaves_one_folder(micro_zoo, tmp_path, tmp_store, monkeypatch, capsys):
    """Interrupted while the run folder's files are written: the error record goes into that folder (it made a second
    one, and where both fell in one second, overwrote the first's run.json beside its files). Interrupted once the
    finished run's record is written, only its reports missing: the record is kept, with how to write them."""
    from harness import records, report

    overrides = ["zoo_profile=micro", f"prompts={SMALL}", "noise_floor=null", "metrics.bootstrap_resamples=0", "metrics.matrix=false",
                 "variants=[{name: base, source: 'zoo:tiny-qwen1.5-s'}]", f"reports_dir={tmp_path / 'r'}"]  # fmt: skip
    config = str(ROOT / "configs" / "default.yaml")
    save_run = report.save_run

    def cut_short(run_dir, *args):
        (run_dir / "positions-base.npz").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "save_run", cut_short)
    assert main(["compare", "--config", config, *overrides]) == 130
    (folder,) = [p for p in (tmp_path / "r").iterdir()]
    assert records.read(folder).status == "error" and (folder / "positions-base.npz").read_bytes() == b"half"

    monkeypatch.setattr(report, "save_run", save_run)
    render = report.render
    monkeypatch.setattr(report, "render", lambda run_dir, **_: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert main(["compare", "--config", config, *overrides]) == 130
    (folder,) = [p for p in (tmp_path / "r").iterdir() if p != folder]
    rec = records.read(folder)
    assert rec.status == "ok" and len(rec.pairs) == 1 and not (folder / "index.html").exists()
    assert f"the record of the finished run is complete in {folder}, its reports are not: `harness report {folder}`" in capsys.readouterr().err
    assert not (tmp_path / "r" / "latest").exists()
    monkeypatch.setattr(report, "render", render)
    assert main(["report", str(folder)]) == 0 and (folder / "index.html").is_file()


def test_run_folders_are_each_runs_own_within_one_second(tmp_path, monkeypatch):
    """The run id is the second and the config's hash: a second run of the config in the same second (two jobs, or a
    run and its error record) gets `<id>-2`, not the first one's folder."""
    from datetime import datetime, timezone

    from harness import records

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 7, 3, 0, 0, tzinfo=timezone.utc)

    monkeypatch.setattr(records, "datetime", Frozen)
    first, _ = records.new_run_dir(tmp_path, "{}")
    second, _ = records.new_run_dir(tmp_path, "{}")
    third, _ = records.new_run_dir(tmp_path, "{}")
    assert first.name.startswith("20261207T030000Z-") and (second.name, third.name) == (f"{first.name}-2", f"{first.name}-3")
