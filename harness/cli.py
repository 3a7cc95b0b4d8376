"""The `harness` command: one entry point, a subcommand per workflow.

    harness extract --config configs/default.yaml [key.sub=value ...]
    harness compare --config configs/default.yaml [key.sub=value ...]
    harness bench [--quick] [--batches 1,16,256,4096] ...
    harness check --config configs/ci-gate.yaml [--baseline RUN.json --fail kl_mean:+10%] [--strict]
    harness report reports/latest                      # re-render CSV + HTML from run.json
    harness zoo build [--profile full|micro] [--force]
    harness zoo list [--profile full|micro]

Errors in what the user gave (config, prompts, model folders) print one paragraph and exit 2;
`check` exits 1 on a regression; anything unforeseen prints its traceback and exits 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))


def _quiet_libraries() -> None:
    """Keeps third-party chatter (deprecations, banners) out of the harness's own output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model


def _extract(cfg, part: tuple[int, int] | None = None, wait_s: float | None = None, planned=None):
    """Config -> plan -> every model's store (reused where it is complete): the first half of both commands.
    `planned(the_plan)` runs once the prompts are tokenized, before any model is extracted (check's baseline test)."""
    from harness import config, paths, pipeline

    if problem := paths.store_dir_problem():
        raise config.ConfigError(problem)
    the_plan = pipeline.plan(cfg, part=part, **({} if wait_s is None else {"wait_s": wait_s}))
    print(f"{len(the_plan.tokens.prompts)} prompts, {the_plan.positions} scored positions, vocab {the_plan.tokens.n_vocab}")
    scored = {s.prompt for s in the_plan.segments if s.rows > 0}
    if unscored := [p.id for i, p in enumerate(the_plan.tokens.prompts) if i not in scored]:
        why = ("the reference's greedy continuation is empty (it ended at once)" if cfg.mode == "generate" else
               f"shorter than one window of text.context = {cfg.text.context} tokens, which llama_cpp scoring drops whole"
               if cfg.text.score == "llama_cpp" else "too short to score a token")  # fmt: skip
        print(f"warning: {len(unscored)} of {len(the_plan.tokens.prompts)} prompts have no scored position ({why}), so they "
              f"are in no statistic: {', '.join(unscored[:8])}{', ...' if len(unscored) > 8 else ''}", file=sys.stderr)  # fmt: skip
    if planned is not None:
        planned(the_plan)
    stores, facts = pipeline.extract_all(cfg, the_plan, part=part)
    return the_plan, stores, facts


def cmd_extract(args) -> int:
    from harness import config

    if args.wait is not None and args.part is None:
        raise config.ConfigError("--wait applies with --part only (a part waits for the other parts' greedy "
                                 "continuations); without --part the run generates them all itself")  # fmt: skip
    _, _, facts = _extract(config.load(args.config, args.overrides), args.part, args.wait)
    for name, f in facts.items():
        done = "reused" if f["reused_shards"] == f["shards"] else f"{f['extract_s']:.1f}s"
        left = f"  ({f['left_to_other_parts']} of {f['shards']} shards left to other parts)" if f.get("left_to_other_parts") else ""
        print(f"{name:<28} {done:>8}  {f['store']}{left}")
    return 0


def _part(text: str) -> tuple[int, int]:
    """--part K/N -> (K, N), 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 1 <= K <= N (e.g. 2/4: the second of four parts)")
    return int(m[1]), int(m[2])


def _seconds(text: str) -> float:
    """--wait SECONDS: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 1 or more")
    return int(text)


def cmd_compare(args) -> int:
    from harness import config

    run_compare(config.load(args.config, args.overrides))
    return 0


def input_facts(cfg, the_plan) -> dict:
    """The run record's `inputs`: the prompt file, and fingerprints of the token ids, the tokenizer and what was scored."""
    from harness import extract, paths, prompts

    inputs = {
        "prompts_file": str(cfg.prompts), "prompts_sha256": paths.sha256_file(cfg.prompts), "prompts": len(the_plan.tokens.prompts),
        "positions": the_plan.positions, "token_ids_sha256": the_plan.tokens.fingerprint,
        "tokenizer_sha256": prompts.tokenizer_fingerprint(the_plan.tokenizer),
        # what was scored: the reference's windows (text) or prompt + greedy continuation (generate), token by token
        "segments_sha256": extract.segments_fingerprint(the_plan.segments),
    }  # fmt: skip
    if the_plan.generations is not None:  # `harness store prune --keep` keeps what a kept run used
        inputs["generations"] = str(the_plan.generations)
    return inputs


def run_compare(cfg, planned=None) -> Path:
    """Extract, compare, record and render one config; returns the run folder. A failure after the
    config loaded still leaves a run record (status "error") saying what went wrong: in the run's own folder where
    the failure came while its files were written; none where the record of the finished run was written already
    (only its reports were not: `harness report` writes them)."""
    from harness import records, report

    records.check_writable(cfg.reports_dir)
    state = {}  # "run_dir" once the run folder exists, "recorded" once its run.json holds the finished run
    try:
        return _compare(cfg, planned, state)
    except (Exception, KeyboardInterrupt) as exc:  # the record says the run failed, and why; the error propagates
        if state.get("recorded"):  # the numbers are all in run.json: keep it, say how to finish the reports
            print(f"harness: the record of the finished run is complete in {state['run_dir']}, its reports are not: "
                  f"`harness report {state['run_dir']}` writes them", file=sys.stderr)  # fmt: skip
            raise
        if "run_dir" in state:  # the run's own folder, beside the files written before the failure
            run_dir, now = state["run_dir"], datetime.now(timezone.utc)
        else:
            run_dir, now = records.new_run_dir(cfg.reports_dir, cfg.model_dump_json())
        why = str(exc) or ("terminated (SIGTERM)" if isinstance(exc, Terminated) else
                           "interrupted (Ctrl-C or SIGINT)" if isinstance(exc, KeyboardInterrupt) else "no message")  # fmt: skip
        records.write(run_dir, records.RunRecord(
            schema_version=records.SCHEMA_VERSION, run_id=run_dir.name, status="error", error=f"{type(exc).__name__}: {why}",
            created_at=now.isoformat(), **records.environment(), seed=cfg.seed, batch_size=cfg.batch_size,
            config=json.loads(cfg.model_dump_json()),
        ))  # fmt: skip
        print(f"error record: {report.render(run_dir).with_name('run.json')}", file=sys.stderr)
        raise


def _compare(cfg, planned=None, state: dict | None = None) -> Path:
    from harness import compare, pipeline, progress, prompts, records, report

    the_plan, stores, facts = _extract(cfg, planned=planned)
    ref, options = cfg.reference.name, cfg.metrics
    names = [p.id for p in the_plan.tokens.prompts]

    def alignment(a: str, b: str):
        return pipeline.alignment(the_plan, a, b, stores, names)

    own, depth = compare.reference_columns(stores[ref]), (prompts.row_depths(the_plan.segments), prompts.row_windows(the_plan.segments))
    pairs = [
        compare.compare(ref, stores[ref], v.name, stores[v.name], ks=tuple(options.top_k),
                        resamples=options.bootstrap_resamples, seed=cfg.seed, prompt_names=names,
                        smoothing_eps=options.smoothing_eps, alignment=alignment(ref, v.name), ref_columns=own, depth=depth)
        for v in progress.bar(cfg.variants, desc="compare", unit="pair", leave=False)
    ]  # fmt: skip
    if warning := report.add_floor(pairs, cfg.noise_floor):
        print(f"warning: {warning}", file=sys.stderr)
    grid = compare.matrix(stores, pairs, alignment) if options.matrix else []
    # the token view shows top tokens in the reference's vocabulary: not those of a cross_vocab variant
    top = {name: compare.top_tokens(store) for name, store in progress.bar(stores.items(), desc="top tokens", unit="model", leave=False)
           if name not in the_plan.own}  # fmt: skip
    for name, store in stores.items():
        facts[name] |= {"warp": compare.warp_summary(store), "n_vocab": the_plan.model_tokens(name)[0].n_vocab}
    if cfg.store_dtype != "float32":  # the reference's rounding, which every mean KL against it carries (html_report.rounding_note)
        facts[ref]["store_rounding_kl"] = compare.store_rounding_kl(stores[ref])
    tokenizer = the_plan.tokenizer
    sequences = prompts.sequences(the_plan.segments)
    shown = {int(i) for ids, _ in top.values() for i in ids.reshape(-1)} | {int(i) for i in stores[ref].read("target")}
    tokens = {
        "n_vocab": the_plan.tokens.n_vocab,
        # every prompt, at its index: one with no scored token (shorter than a llama_cpp window, no continuation) too
        # text mode: the whole prompt (its windows may leave out a last token, which a one-token window would hold);
        # generate mode: prompt and continuation
        "prompts": [{"id": name, "ids": seq, "texts": prompts.sequence_texts(tokenizer, seq)}
                    for name, seq in ((names[p], list(the_plan.tokens.ids[p]) if cfg.mode == "text" else
                                       sequences.get(p, list(the_plan.tokens.ids[p]))) for p in range(len(names)))],
        "vocab": prompts.vocab_texts(tokenizer, sorted(shown)),
    }
    inputs = input_facts(cfg, the_plan)
    config_json = cfg.model_dump_json()  # the record's run id hashes exactly this
    run_dir, now = records.new_run_dir(cfg.reports_dir, config_json)
    state = {} if state is None else state
    state["run_dir"] = run_dir
    record = records.RunRecord(
        schema_version=records.SCHEMA_VERSION, run_id=run_dir.name, status="ok", created_at=now.isoformat(),
        **records.environment(), seed=cfg.seed, batch_size=cfg.batch_size, config=json.loads(config_json),
        inputs=inputs, variants=facts, noise_floor=cfg.noise_floor, matrix=grid,
    )  # fmt: skip
    record = report.save_run(run_dir, record, pairs, top, tokens)
    state["recorded"] = True
    index = report.render(run_dir)
    records.point_latest(cfg.reports_dir, run_dir)
    print(report.table(record))
    print(f"wrote {run_dir / 'summary.csv'}")
    print(f"report: {index}")
    return run_dir


def cmd_check(args) -> int:
    from harness import check, config, gate_formats, records

    if (args.config is None) == (args.run is None):
        raise check.GateError("give either --config (compare, then gate) or --run RUN_DIR (gate a finished run)")
    for path, flag in ((args.junit, "--junit"), (args.markdown, "--markdown")):  # before a comparison of hours, not after
        gate_formats.check_writable(path, flag)
    if args.run is None:
        cfg = config.load(args.config, args.overrides)
        base = check.preflight(cfg, baseline=args.baseline, fail=args.fail)

        def same_inputs(the_plan) -> None:  # another prompt set or tokenizer: refused before any model is extracted
            check.same_inputs(input_facts(cfg, the_plan), cfg.mode, base, args.baseline)

        run_dir = run_compare(cfg, planned=same_inputs if base is not None else None)
    elif args.overrides:
        raise check.GateError(f"overrides {args.overrides} apply to --config, not to --run")
    else:
        run_dir = records.run_dir(args.run)
    return check.main(run_dir, baseline=args.baseline, fail=args.fail, strict=args.strict, junit=args.junit, markdown=args.markdown)


def cmd_report(args) -> int:
    from harness import records, report, token_view

    index = report.render(records.run_dir(args.run_dir), args.view_positions or token_view.VIEW_POSITIONS)
    print(f"report: {index}")
    return 0


def cmd_store(args) -> int:
    from harness import store_admin

    return store_admin.main(args.action, args.keep, args.all, args.dry_run)


def cmd_zoo(args) -> int:
    from harness import zoo

    if args.action == "build":
        zoo.build(args.profile, force=args.force)
        if args.damaged:
            zoo.build_damaged(args.profile)
    for name, state in zoo.status(args.profile).items():
        print(f"{name:<42} {state:<10} {zoo.model_dir(name, args.profile)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Keeps the message of a command-line error (argparse prints it and exits 2), for the gate's no-verdict reports."""

    last_error: str | None = None

    def error(self, message):
        _Parser.last_error = f"{self.prog}: error: {message}"
        super().error(message)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="harness", description="Compare Qwen1.5 variants' next-token distributions.")
    sub = top.add_subparsers(dest="command", required=True)
    for name, run, text in (
        ("extract", cmd_extract, "fill the log-prob store of every model (reused and resumed across runs)"),
        ("compare", cmd_compare, "extract every model, compare each variant with the reference, report"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="a YAML comparison config, e.g. configs/default.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, values parsed as YAML")
        p.set_defaults(run_command=run)
        if name == "extract":
            p.add_argument("--part", type=_part, metavar="K/N",
                           help="fill only part K of N of each store's shards: N workers (GPUs or machines sharing the "
                                "store folder: $HARNESS_STORE, else $HARNESS_HOME/store) run one part each; `harness compare` then reuses "
                                "them and fills whatever is still missing")  # fmt: skip
            p.add_argument("--wait", type=_seconds, metavar="SECONDS",
                           help="generate mode with --part: each part generates its share of the reference's greedy "
                                "continuations, then waits this long for the other parts' (default 3600; a plain run that "
                                "merges them ends the wait too)")  # fmt: skip
    p = sub.add_parser("check", help="the quantization regression gate: limits and/or a baseline, one verdict; "
                       "exit 0 pass, 1 a regression, 2 bad input, 3 an internal error")
    p.add_argument("--config", help="compare with this config, then gate the run with its 'gate' limits")
    p.add_argument("--run", help="gate a finished run folder or its run.json (e.g. reports/latest) with its config's limits")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    p.add_argument("--baseline", type=Path, help="a run.json (or its folder) to compare with")
    p.add_argument("--fail", action="extend", nargs="+", default=[], metavar="METRIC:[+|-]AMOUNT[%]",
                   help="regressions against the baseline that fail the gate, e.g. kl_mean:+10%% top1_agree:-1%%")
    p.add_argument("--strict", action="store_true", help="fail even on breaches within the runs' standard error, and on "
                   "a pair that the baseline or the run lacks (with --fail)")
    p.add_argument("--junit", type=Path, metavar="PATH", help="also write the verdict as JUnit XML, a test case per check "
                   "(an error case where the gate gives no verdict), for GitLab, Jenkins or a test-report action")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the verdict as a Markdown table (or the error "
                   "where the gate gives no verdict), for a pull-request comment")
    p.set_defaults(run_command=cmd_check)
    p = sub.add_parser("report", help="re-render a run folder's CSV and HTML reports from its run.json (no model loads)")
    p.add_argument("run_dir", help="a run folder (or its run.json), e.g. reports/latest")
    p.add_argument("--view-positions", type=_positive_int, default=None, metavar="N",
                   help="the most positions the page's token view holds (default 20000; past it, the first prompts' only)")
    p.set_defaults(run_command=cmd_report)
    sub.add_parser("bench", help="throughput of the softmax/filter step beside the memory ceiling (bench --help)")
    p = sub.add_parser("store", help="list the log-prob stores and cached generations, or prune them to what kept runs use")
    p.add_argument("action", choices=["list", "prune"], help="list: every store and cached generation, its size, last use "
                   "and state ('kept' where a --keep run names it); prune: remove those no --keep run names, or all (--all)")
    p.add_argument("--keep", action="extend", nargs="+", type=Path, default=[], metavar="RUN",
                   help="run folders, run.json files or reports folders: the stores and generations they name stay "
                        "(list marks them)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="prune: remove every store and generation (not with --keep)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")
    p.set_defaults(run_command=cmd_store)
    p = sub.add_parser("zoo", help="build or list the embedded tiny Qwen1.5 family")
    p.add_argument("action", choices=["build", "list"])
    p.add_argument("--profile", default="full", choices=["full", "micro"])
    p.add_argument("--force", action="store_true", help="rebuild even what verifies")
    p.add_argument("--damaged", action="store_true", help="also build the damaged GPTQ builds (int2, bad scales)")
    p.set_defaults(run_command=cmd_zoo)
    return top


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a scheduler stopping a job) taken as Ctrl-C is: the finished store shards and greedy
    continuations are kept, and a compare that stops leaves its error record."""


def _terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        before = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread (an embedding application's worker): its own signal handling stands
        before = None
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # in the seconds before _main's own handling (its imports load torch): no traceback
        print(f"harness: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}.", file=sys.stderr)
        _no_verdict(argv, *_interrupted(exc))
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def input_errors() -> tuple[type[Exception], ...]:
    """The errors of bad input (a config, prompts, a model folder, a record, the gate's arguments): exit 2."""
    from harness.check import GateError
    from harness.compare import CompareError
    from harness.config import ConfigError
    from harness.loaders import ExtractError
    from harness.prompts import PromptError
    from harness.records import RecordError

    return ConfigError, PromptError, ExtractError, CompareError, RecordError, GateError


def _interrupted(exc: KeyboardInterrupt) -> tuple[str, str]:
    term = isinstance(exc, Terminated)
    return ("terminated (SIGTERM)" if term else "interrupted (Ctrl-C)"), f"interrupted, exit {143 if term else 130}"


def _no_verdict(argv: list[str], message: str, kind: str, detail: str | None = None) -> None:
    """`harness check` that ends without a verdict still writes its CI reports, naming why (gate_formats.no_verdict)."""
    if argv[:1] == ["check"]:
        from harness import gate_formats

        gate_formats.no_verdict(argv[1:], message, kind, detail)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # its options are harness.bench's own; its errors are handled as every command's
        from harness import bench

        run, extracting = (lambda: bench.main(argv[1:])), False
    else:
        try:
            args = parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):  # not --help
                _no_verdict(argv, _Parser.last_error or "a command-line error (see the usage above)", f"usage error, exit {exc.code}")
            raise
        _quiet_libraries()
        run = lambda: args.run_command(args)  # noqa: E731
        extracting = args.command in ("compare", "extract") or (args.command == "check" and args.config)
    bad_input = input_errors()  # imported here, not while an exception is being matched
    try:
        return run()
    except bad_input as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        _no_verdict(argv, str(exc), "input error, exit 2")
        return 2
    except KeyboardInterrupt as exc:
        kept = " Finished store shards and greedy continuations are kept: the same command resumes from them."
        print(f"harness: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}." + (kept if extracting else ""), file=sys.stderr)
        _no_verdict(argv, *_interrupted(exc))
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug, or a failure no check foresaw: not exit 1, which `check` keeps for a regression
        traceback.print_exc()
        print(f"harness: internal error in '{argv[0] if argv else ''}' (traceback above), exit code 3", file=sys.stderr)
        _no_verdict(argv, f"{type(exc).__name__}: {exc}", "internal error, exit 3", detail=traceback.format_exc())
        return 3


if __name__ == "__main__":
    sys.exit(main())
