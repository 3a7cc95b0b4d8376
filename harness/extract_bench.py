"""Extraction overhead and memory: extract vs bare forward passes, and peak RSS at N and 10 N positions.

    python -m harness.extract_bench [--model tiny-qwen1.5-s-chat] [--profile full] [--positions 1024]
    python -m harness.extract_bench --shape qwen1.5-0.5b --positions 512 --no-10x
    python -m harness.extract_bench --shape qwen1.5-0.5b --context 512 --score llama_cpp --no-10x

`--shape qwen1.5-0.5b` measures a model of Qwen1.5-0.5B's exact architecture (24 layers, hidden 1024,
151936-wide logits, tied embeddings, the chat generation config) with seeded random weights: no
checkpoint can be downloaded here, and the cost of extraction does not depend on what the weights
learned. It is built once into $HARNESS_HOME/bench/. The tiny zoo models' forward pass is a fraction
of a millisecond per position, so there the fixed per-position cost of extraction dominates.

Each size runs in a fresh subprocess (so peak RSS is its own): it times the bare forward passes over
the same segments at the same batch size, then a full extraction into a throwaway store (log-softmax,
padding cut, warper stats, float16 shards written and hashed). The bare forward passes run the output
layer on the scored columns only, as extraction does; they are also timed with it on every position
(`all-pos s`, what the model costs without `logits_to_keep`). `--score llama_cpp` scores the second
half of each window only, where the two differ. Peak RSS is taken before the every-position passes.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rows_per_window(context: int, score: str) -> int:
    """The rows a window of `context` tokens scores (prompts.text_segments: llama_cpp's from context/2 on)."""
    return context - 1 - (context // 2 if score == "llama_cpp" else 0)


def _segments(tokenizer, positions: int, context: int, score: str = "all"):
    from harness import prompts, train

    ids = [t for seq in train.load_corpus(tokenizer).train for t in seq]
    per_window = _rows_per_window(context, score)
    windows = max(1, positions // per_window)
    ids = (ids * (1 + windows * context // len(ids)))[: windows * context]
    tokens = prompts.TokenizedPrompts(
        prompts=(prompts.Prompt(id="corpus", text="-"),), ids=(tuple(ids),), n_vocab=len(tokenizer)
    )
    return prompts.text_segments(tokens, context=context, score=score), tokens.n_vocab


# Qwen1.5-0.5B's config.json (the architecture fields)
SHAPES = {
    "qwen1.5-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu"),
}  # fmt: skip


def shaped_model(shape: str, profile: str) -> str:
    """A folder with a randomly initialised model of a real release's architecture (built once)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from harness import paths, zoo

    folder = paths.home() / "bench" / f"{shape}-shaped"
    if zoo.problem(folder) is None:
        return str(folder)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], bos_token_id=151643, eos_token_id=151645))
    model.generation_config = GenerationConfig(**zoo.CHAT_GENERATION)
    tmp = zoo.tmp_dir(folder)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(zoo.build(profile, log=lambda _: None)[zoo.TOKENIZER]).save_pretrained(tmp)
    zoo.publish(tmp, folder, {"name": folder.name, "shape": shape, "weights": "random, seed 0"})
    return str(folder)


def one(model_name: str, profile: str, positions: int, batch_size: int, context: int, shape: str | None = None,
        repeats: int = 1, score: str = "all") -> dict:  # fmt: skip
    """Runs in the subprocess: bare forward timing, then extraction; returns the figures."""
    import torch

    from harness import extract, loaders
    from harness.config import ModelSpec

    source = shaped_model(shape, profile) if shape else f"zoo:{model_name}"
    loaded = loaders.locate(ModelSpec(name=shape or model_name, source=source), profile)
    segments, n_vocab = _segments(loaders.load_tokenizer(loaded), positions, context, score)
    forward_s, all_s, extract_s, load_s, model_rss, peak_rss = [], [], [], [], 0.0, 0.0

    def bare(times: list, scored: bool) -> None:
        """Times the bare forward passes: the output layer on the scored columns (as extraction runs it), or on
        every position."""
        nonlocal model_rss
        model = loaders.load_model(loaded)
        model_rss = model_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, model loaded
        start = time.perf_counter()
        for b in range(0, len(segments), batch_size):
            batch = segments[b : b + batch_size]
            keep = extract.scored_window(batch, "right") if scored else None
            logits = extract.forward_logits(model, [s.ids for s in batch], "cpu", keep=keep)
            del logits
        times.append(time.perf_counter() - start)
        del model
        loaders.release_memory()

    for _ in range(repeats):  # alternated, and the fastest of each kept: robust to other load on the machine
        bare(forward_s, scored=True)
        with tempfile.TemporaryDirectory() as tmp:  # extraction loads its own model, as a run does
            os.environ["HARNESS_STORE"] = tmp
            start = time.perf_counter()
            _, facts = extract.extract(loaded, segments, n_vocab, batch_size=batch_size, store_dtype="float16", log=lambda _: None)
            extract_s.append(time.perf_counter() - start)
            load_s.append(facts["load_s"])
        # the high-water mark before the every-position passes, whose logits may be larger than extraction's
        peak_rss = peak_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        bare(all_s, scored=False)
    best = min(range(repeats), key=lambda i: extract_s[i] - load_s[i])
    forward_s, all_s, extract_s, facts = min(forward_s), min(all_s), extract_s[best], {"load_s": load_s[best]}
    rows = sum(s.rows for s in segments)
    return {
        "model": shape or model_name,
        "positions": rows,
        "batch_size": batch_size,
        "context": context,
        "score": score,
        "forward_s": forward_s,
        "forward_all_positions_s": all_s,
        "extract_s": extract_s,
        "load_s": facts["load_s"],
        # extraction loads the model itself; the bare forward passes start with it loaded
        "overhead_ratio": (extract_s - facts["load_s"]) / forward_s,
        "overhead_ms_per_position": 1000 * (extract_s - facts["load_s"] - forward_s) / rows,
        "model_rss_mib": model_rss,
        "peak_rss_mib": peak_rss,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen1.5-s-chat")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--positions", type=int, default=1024, help="N: the run is repeated at 10 N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--score", choices=["all", "llama_cpp"], default="all", help="which rows of each window are scored")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised model of this release's architecture")
    parser.add_argument("--no-10x", action="store_true", help="only N positions (skip the 10 N memory run)")
    parser.add_argument("--repeats", type=int, default=1, help="forward and extraction alternated this often; fastest kept")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if _rows_per_window(args.context, args.score) < 1:
        parser.error(f"--context {args.context} scores no row of a window (--score {args.score})")
    if args.one:
        print(json.dumps(one(args.model, args.profile, args.positions, args.batch_size, args.context, args.shape, args.repeats, args.score)))
        return 0
    results = []
    for positions in (args.positions,) if args.no_10x else (args.positions, 10 * args.positions):
        cmd = [sys.executable, "-m", "harness.extract_bench", "--one", "--model", args.model, "--profile", args.profile,
               "--positions", str(positions), "--batch-size", str(args.batch_size), "--context", str(args.context),
               "--repeats", str(args.repeats), "--score", args.score, *(["--shape", args.shape] if args.shape else [])]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:  # the worker's own error, not only CalledProcessError's exit status
            sys.exit(f"extract_bench: the {positions}-position worker failed (exit {run.returncode}):\n{run.stderr.strip()[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"{results[0]['model']}, batch {args.batch_size}, {args.context}-token windows scoring {args.score}; "
          "ratio = (extract - model load) / bare forward")
    print(f"{'positions':>9} {'all-pos s':>9} {'forward s':>9} {'extract s':>9} {'load s':>6} {'ratio':>6} {'ms/pos over':>11} "
          f"{'model MiB':>9} {'peak MiB':>9}")  # fmt: skip
    for r in results:
        print(f"{r['positions']:>9} {r['forward_all_positions_s']:>9.2f} {r['forward_s']:>9.2f} {r['extract_s']:>9.2f} "
              f"{r['load_s']:>6.2f} {r['overhead_ratio']:>6.2f} "
              f"{r['overhead_ms_per_position']:>11.3f} {r['model_rss_mib']:>9.0f} {r['peak_rss_mib']:>9.0f}")  # fmt: skip
    growth = results[1]["peak_rss_mib"] / results[0]["peak_rss_mib"] - 1 if len(results) > 1 else None
    if growth is not None:
        print(f"peak RSS grows {100 * growth:.1f}% for 10x the positions")
    print(json.dumps({"model": results[0]["model"], "profile": args.profile, "results": results, "rss_growth_10x": growth}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
