"""Teacher-forced extraction: one model at a time, raw logits -> cut padding -> log-probs -> store.

    harness extract --config configs/default.yaml      # fills the store of every model, then stops

Every model runs over the reference tokenizer's ids (`prompts.Segment`s), in batches padded on the
right or the left with an attention mask and explicit position ids, so a padded row's logits equal
its unpadded ones; the model's output layer runs only on the columns that hold scored rows (its
`logits_to_keep`). Each logits row is cut to the real token ids (`len(tokenizer)`, 151646 for
Qwen1.5) before the softmax; the probability the raw row put on the padding columns, and what the
model's own generation_config warpers would leave of it, are stored beside it. Each batch's rows go
to disk from a background thread (store.ShardWriter) while the next batch's forward pass runs, and
a finished shard completes there while the next shard fills.

Models are located and loaded by `harness.loaders`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import time
from pathlib import Path

import torch

from harness import loaders, paths
from harness.loaders import TORCH_DTYPES, ExtractError, Loaded
from harness.progress import bar as progress_bar
from harness.prompts import Segment, TokenizedPrompts
from harness.row_stats import row_stats
from harness.store import Store, aligned_empty, plan_shards, store_key, writer_tag
from harness.warpers import Warpers, candidates, warp_stats

GREEDY_VERSION = 2  # bump when the greedy continuations change (2: config.json's eos where there is no generation_config.json; padding ids never picked)
EXTRACT_VERSION = 6  # bump when what is stored changes (4: warper figures with generate()'s defaults for unset fields;
# 5: the output layer on scored positions only, which moves the last bits of its rows; 6: on the columns from the
# first scored one to the row's end, logits_to_keep as an int)
WAIT_S = 3600.0  # how long a generate-mode part waits for the other parts' greedy continuations (extract --wait)
CHUNK_ROWS = 32  # rows post-processed at a time: 32 x 151936 float32 = 19 MB per temporary


@torch.no_grad()
def forward_logits(
    model, batch: list[tuple[int, ...]], device: str | torch.device, padding_side: str = "right", keep: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """[B, T, V_padded] raw logits; row b's own tokens sit at [b, :len] (right) or [b, T-len:] (left).

    `keep` (lo, hi): only the padded batch's columns lo .. hi-1, [B, hi-lo, V_padded]. The model computes its output
    layer on the columns from lo on alone (its `logits_to_keep`), where its forward takes that argument."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    for i, ids in enumerate(batch):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, cols] = torch.tensor(ids)
        attention[i, cols] = 1
        positions[i, cols] = torch.arange(len(ids))  # left padding must not shift the rotary positions
    sliced = keep is not None and keeps_logits(model)
    # An int: the last width - lo columns. Not a tensor of positions: accelerate's hook moves a tensor argument to a
    # spread model's first device, while its last layer's output is on its last, and some custom classes take only
    # an int. Columns from hi on (at most the longest row's last, unscored) are cut below.
    extra = {"logits_to_keep": width - keep[0]} if sliced else {}
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device), **extra
    )
    if keep is None:
        return out.logits
    return out.logits[:, : keep[1] - keep[0]] if sliced else out.logits[:, keep[0] : keep[1]]


def keeps_logits(model) -> bool:
    """Whether a model's forward computes its logits on chosen positions only (transformers' `logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _first_column(seg: Segment, width: int, padding_side: str) -> int:
    """The column of a batch `width` tokens wide that holds segment `seg`'s first scored row."""
    return seg.first + (width - len(seg.ids) if padding_side == "left" else 0)


def scored_window(batch: list[Segment], padding_side: str) -> tuple[int, int] | None:
    """The padded batch's columns (lo, hi) that hold every scored row of its segments; None where none has one."""
    width = max(len(s.ids) for s in batch)
    spans = [(_first_column(s, width, padding_side), s.rows) for s in batch if s.rows > 0]
    return (min(f for f, _ in spans), max(f + n for f, n in spans)) if spans else None


def scored_rows(logits: torch.Tensor, b: int, seg: Segment, width: int, lo: int, padding_side: str) -> torch.Tensor:
    """The [seg.rows, V] logits of segment `seg`'s scored rows, from batch row b of a forward_logits(keep=(lo, ..))
    over a batch `width` tokens wide."""
    first = _first_column(seg, width, padding_side) - lo
    return logits[b, first : first + seg.rows]


def greedy_continuations(
    loaded: Loaded, tokens: TokenizedPrompts, max_new_tokens: int, log=print, part: tuple[int, int] | None = None,
    wait_s: float = WAIT_S,
) -> list[list[int]]:  # fmt: skip
    """The reference's raw greedy continuation of every prompt (not its sampling generation_config).

    Cached beside the stores: the continuation fixes the ids every variant is scored on. Each finished prompt's is
    also appended to a `.progress.jsonl` file as it comes, so an interrupted run resumes after the last finished
    prompt. With `part` (k, n), this worker generates only the prompts p with p % n == k - 1 (each prompt is generated
    on its own, so the split changes nothing), caches them, and waits up to `wait_s` seconds for the other parts'
    before it merges them all.
    """
    path = generations_path(loaded, tokens, max_new_tokens)
    key = path.stem
    if path.is_file():
        continuations = json.loads(path.read_text())["continuations"]
        with contextlib.suppress(OSError):  # its time is its last use (`harness store list`)
            os.utime(path)
        log(f"{loaded.spec.name}: the greedy continuations of {len(continuations)} prompts, as generated before: {path}")
        return continuations
    if part is None:
        with _progress(path, log) as progress:
            if path.is_file():  # another process generated them while this one waited
                progress.unlink(missing_ok=True)
                return json.loads(path.read_text())["continuations"]
            known = _shares(path, len(tokens.ids), log)
            continuations = _generate(loaded, tokens.ids, tokens.n_vocab, max_new_tokens, progress, log, known)
            _write_json(path, {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": continuations})
            progress.unlink()
    else:
        k, n = part
        parts = [path.with_name(f"{key}.part-{i}-of-{n}.json") for i in range(1, n + 1)]
        if not parts[k - 1].is_file():
            with _progress(parts[k - 1], log) as progress:
                if not parts[k - 1].is_file():
                    mine = _generate(loaded, tokens.ids[k - 1 :: n], tokens.n_vocab, max_new_tokens, progress, log)
                    _write_json(parts[k - 1], {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": mine})
                progress.unlink(missing_ok=True)
        deadline, told = time.monotonic() + wait_s, False
        while (missing := [i + 1 for i, f in enumerate(parts) if not f.is_file()]) and not path.is_file():
            if time.monotonic() >= deadline:
                raise ExtractError(
                    f"part {k}/{n}: the greedy continuations of part(s) {missing} are not in {path.parent} after "
                    f"{wait_s:.0f} s of waiting. Every part needs every prompt's continuation to cut its shards; this "
                    "part's are kept there. Run the missing parts (or this one again once they are done)."
                )
            if not told:
                log(f"part {k}/{n}: waiting up to {wait_s:.0f} s for the greedy continuations of part(s) {missing}")
                told = True
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        if missing:  # a plain run (which takes the shares there are) merged them while this part waited
            return json.loads(path.read_text())["continuations"]
        continuations = [[] for _ in tokens.ids]
        for i, f in enumerate(parts):
            try:
                share = json.loads(f.read_text())["continuations"]
            except (ValueError, KeyError, TypeError):
                share = None
            if not _token_lists(share) or len(share) != len(continuations[i::n]):
                raise ExtractError(f"{f} is not part {i + 1}/{n}'s share of these {len(continuations)} prompts' greedy "
                                   "continuations (another prompt set, or a damaged file): delete it and run that part again")  # fmt: skip
            continuations[i::n] = share
        _write_json(path, {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": continuations})
    log(f"{loaded.spec.name}: {sum(map(len, continuations))} greedy tokens, cached in {path}")
    return continuations


def generations_path(loaded: Loaded, tokens: TokenizedPrompts, max_new_tokens: int) -> Path:
    """Where the reference's greedy continuations of these prompts are cached (a run record names it)."""
    key = store_key(what="greedy", version=GREEDY_VERSION, fingerprint=loaded.fingerprint, dtype=loaded.spec.dtype,
                    device=loaded.device.split(":")[0], ids=tokens.fingerprint, n=max_new_tokens,
                    loader=loaded.spec.loader, backend=loaded.spec.backend)  # fmt: skip
    return paths.store_dir() / "generations" / f"{key}.json"


def _shares(path: Path, n_prompts: int, log=print) -> dict[int, list[int]]:
    """The continuations that `--part K/N` runs left beside `path` (`<key>.part-K-of-N.json`, prompts K-1, K-1+N, ...),
    by prompt index: a plain run takes them rather than generate them again (each prompt is generated on its own,
    so a share's are the very ones it would generate). A share that is not a list of token-id lists, one a prompt of
    its part, is left alone with a warning; where shares of two part counts disagree on a prompt, the first stands."""
    known = {}
    for share in sorted(path.parent.glob(f"{path.stem}.part-*-of-*.json")):
        if not (m := re.fullmatch(r".*\.part-(\d+)-of-(\d+)\.json", share.name)):
            continue
        k, n = int(m[1]), int(m[2])
        try:
            got = json.loads(share.read_text())["continuations"]
        except (OSError, ValueError, KeyError, TypeError):
            got = None
        index = range(k - 1, n_prompts, n)
        if not (1 <= k <= n and _token_lists(got) and len(got) == len(index)):
            log(f"warning: {share} is not a share of these {n_prompts} prompts' continuations: not taken")
            continue
        for i, ids in zip(index, got, strict=True):
            if known.setdefault(i, ids) != ids:
                log(f"warning: {share} disagrees with another share on prompt {i + 1}'s continuation: the other's is taken")
    return known


def _token_lists(x) -> bool:
    return isinstance(x, list) and all(isinstance(c, list) and all(type(t) is int for t in c) for c in x)


def _write_json(path: Path, data: dict) -> None:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{writer_tag()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextlib.contextmanager
def _progress(cache: Path, log):
    """The `.progress.jsonl` file beside `cache`, locked: two processes generating the same continuations (a run and
    its repeat on a shared store) take turns rather than append to one file at once. Yields its path."""
    progress = cache.with_suffix(".progress.jsonl")
    waiting = f"waiting for another process that generates the continuations of {cache.name} ({progress} is locked)"
    with paths.exclusive(progress, waiting, log) as unlocked:
        if unlocked:
            log(f"warning: {progress.parent} cannot lock files ({unlocked}): do not run two generations of one config at once there")
        yield progress


def _finished(progress: Path) -> list[list[int]]:
    """The continuations a `.progress.jsonl` file holds, a line per prompt in order; a last line cut short by an
    interruption is dropped (and cut from the file, so that the next line appended starts clean)."""
    if not progress.is_file():
        return []
    done, good = [], 0
    with progress.open("rb") as f:
        for line in f:
            try:
                ids = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                ids = None
            if not isinstance(ids, list):
                break
            done.append(ids)
            good += len(line)
    if good != progress.stat().st_size:
        os.truncate(progress, good)
    return done


def _generate(
    loaded: Loaded, prompts: tuple, n_vocab: int, max_new_tokens: int, progress: Path, log=print,
    known: dict[int, list[int]] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of these prompts' ids, one prompt at a time (so a prompt's does not depend on the others),
    each appended to `progress` when done; the prompts already there are not generated again, nor those in `known`
    (by prompt index; see _shares): the model loads only if some prompt is in neither."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class RealIds(LogitsProcessor):
        """The padding columns (ids n_vocab up to the 151936 or 152064 of the row) are no tokens: never picked."""

        def __call__(self, input_ids, scores):
            scores[:, n_vocab:] = -torch.inf
            return scores

    real_ids = LogitsProcessorList([RealIds()])
    continuations = _finished(progress)[: len(prompts)]
    if len(continuations) == len(prompts):
        return continuations
    if continuations:
        log(f"{loaded.spec.name}: greedy: resuming after {len(continuations)} of {len(prompts)} prompts ({progress})")
    known = known or {}
    if taken := sum(i in known for i in range(len(continuations), len(prompts))):
        log(f"{loaded.spec.name}: greedy: {taken} of {len(prompts)} prompts' continuations taken from the shares of an "
            f"`extract --part` run ({progress.parent})")  # fmt: skip
    model = None
    if any(i not in known for i in range(len(continuations), len(prompts))):
        own = loaders.load_generation_config(loaded)
        greedy = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
            eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id or own.eos_token_id,
        )  # fmt: skip
        model = loaders.load_model(loaded)
        # Replaced rather than passed: generate() fills a passed config's unset fields from the model's own
        # (Qwen1.5-Chat's repetition_penalty 1.1 would creep into "greedy").
        model.generation_config = greedy
    try:
        with progress.open("a") as f:
            todo = range(len(continuations), len(prompts))
            for i in progress_bar(todo, desc=f"{loaded.spec.name}: greedy", unit="prompt", leave=False, initial=len(continuations), total=len(prompts)):
                if i in known:
                    continuations.append(known[i])
                else:
                    x = torch.tensor([prompts[i]], device=loaders.input_device(model))
                    with torch.no_grad():
                        out = model.generate(x, attention_mask=torch.ones_like(x), logits_processor=real_ids)
                    continuations.append(out[0, len(prompts[i]) :].tolist())
                f.write(json.dumps(continuations[-1]) + "\n")
                f.flush()
    finally:
        del model
        loaders.release_memory()
    return continuations


def _fill(buf: dict, row: int, seg: Segment, scored: torch.Tensor, n_vocab: int, warpers: Warpers, spec, name) -> None:
    """Writes one segment's scored rows into the shard buffers from `scored` [seg.rows, V_padded], its logits rows
    seg.first .. len(ids) - 2."""
    ids = torch.tensor(seg.ids)
    if int(ids.max()) >= n_vocab:  # a continuation cached before the padding columns were suppressed, or damaged
        raise ExtractError(f"prompt {name!r} holds token id {int(ids.max())}, past the tokenizer's {n_vocab} ids (a padding "
                           "column of the logit row): delete the cached continuations in the store's generations/ folder "
                           "and run again")  # fmt: skip
    # Chunks keep every temporary under glibc's 32 MB mmap threshold, so they reuse heap pages
    # instead of page-faulting fresh ones on every call.
    for r in range(seg.first, len(seg.ids) - 1, CHUNK_ROWS):
        r_end = min(r + CHUNK_ROWS, len(seg.ids) - 1)
        raw = scored[r - seg.first : r_end - seg.first].float().cpu()  # [C, V_padded]
        rows = slice(row + r - seg.first, row + r_end - seg.first)
        n_top = candidates(warpers, ids, r, r_end - r, raw.shape[1])  # the warper figures need the raw top n
        _, pad_mass, lse, top = row_stats(raw, n_vocab, out=buf["logprobs"][rows], top=n_top)  # log-probs into the shard
        if not torch.isfinite(lse).all():
            bad = int((~torch.isfinite(lse)).nonzero()[0, 0]) + seg.offset + r
            raise ExtractError(
                f"model {spec.name!r} produced NaN or infinite logits on prompt {name!r} at token {bad}; "
                + (f"in {spec.dtype} its activations may overflow: try dtype float32" if spec.dtype != "float32" else
                   "in float32 too, so its weights (or a quantized layer's kernel) likely hold NaN or inf: check the checkpoint")
                + " (finished shards are kept)"
            )
        finite, kept = warp_stats(raw, ids, r, lse, warpers, top)
        buf["target"][rows] = ids[r + 1 : r_end + 1]
        buf["position"][rows] = torch.arange(r + 1, r_end + 1) + seg.offset
        buf["prompt"][rows] = seg.prompt
        buf["pad_mass"][rows] = pad_mass
        buf["warp_finite"][rows] = finite
        buf["warp_mass"][rows] = kept


def _filled_by() -> dict:
    """The library versions and machine that filled a store: a run reusing it records them beside its own."""
    from harness import records

    env = records.environment()
    return {"versions": env["versions"], "machine": {k: env["machine"].get(k) for k in ("hostname", "cpu", "gpu")},
            "git": env["git"]}  # fmt: skip


def segments_fingerprint(segments: list[Segment]) -> str:
    digest = hashlib.sha256()
    for s in segments:
        digest.update(json.dumps([s.prompt, s.offset, s.first, s.ids]).encode())
    return digest.hexdigest()


def extract(
    loaded: Loaded,
    segments: list[Segment],
    n_vocab: int,
    *,
    batch_size: int,
    store_dtype: str,
    padding_side: str = "right",
    prompt_ids: tuple[str, ...] = (),
    part: tuple[int, int] | None = None,
    log=print,
) -> tuple[Store, dict]:
    """Fills (or reuses, or resumes) the store of one model; returns it and timing facts. `part` (k, n): only the
    missing shards i with i % n == k - 1, so that n workers sharing the store folder fill it together."""
    spec = loaded.spec
    # batch size and padding side too: a batch's shape moves the last bits of the logits, so each has its own store
    # (with batches of one nothing is padded: either side gives the same rows). A hub id's revision is in the
    # fingerprint as the commit it resolves to, so "main", null and that commit's hash share one store.
    key = store_key(
        source=loaded.path, fingerprint=loaded.fingerprint, dtype=spec.dtype,
        device=loaded.device.split(":")[0], segments=segments_fingerprint(segments), n_vocab=n_vocab,
        store_dtype=store_dtype, version=EXTRACT_VERSION, batch_size=batch_size,
        padding_side=padding_side if batch_size > 1 else None, loader=spec.loader, backend=spec.backend,
    )  # fmt: skip
    store = Store(paths.store_dir() / key)
    plan = plan_shards([s.rows for s in segments])
    for stale in store.shards()[len(plan) :]:  # left by a store cut into more shards: not part of this plan
        stale.with_suffix(".json").unlink(missing_ok=True)
        stale.unlink()
    missing = [i for i in range(len(plan)) if not store.is_complete(i, plan[i])]
    todo = missing if part is None else [i for i in missing if i % part[1] == part[0] - 1]
    facts = {"store": str(store.root), "shards": len(plan), "reused_shards": len(plan) - len(missing)}
    if part is not None:
        facts |= {"part": f"{part[0]}/{part[1]}", "left_to_other_parts": len(missing) - len(todo)}
    if not missing:
        store.sweep()
        with contextlib.suppress(OSError):  # the folder's time is its last use (`harness store list`); read-only is fine
            os.utime(store.root)
    if not todo:
        log(f"{spec.name}: reusing {store.root}" if not missing else
            f"{spec.name}: part {part[0]}/{part[1]} is done; {len(missing)} shards of other parts still missing in {store.root}")  # fmt: skip
        # the run that filled the store (the last part, where parts did), for its timings; this run's own are 0
        filled = (store.index() or {}).get("facts", {})
        first = {k: v for k, v in filled.items() if k not in ("part", "left_to_other_parts")}
        timings = {"first_load_s": filled.get("load_s"), "first_extract_s": filled.get("extract_s"), "first_part": filled.get("part")}
        return store, {**first, **facts, **timings, "load_s": 0.0, "extract_s": 0.0, "forward_s": 0.0}
    if len(missing) < len(plan):
        log(f"{spec.name}: resuming {store.root}: {len(plan) - len(missing)} of {len(plan)} shards kept from an earlier "
            f"run, {len(todo)} to fill" + (f" (and {len(missing) - len(todo)} left to other parts)" if len(todo) < len(missing) else ""))  # fmt: skip
    start = time.perf_counter()
    model = loaders.load_model(loaded)
    warpers = Warpers.from_generation_config(loaders.load_generation_config(loaded))
    facts |= {"load_s": time.perf_counter() - start, "parameters": loaders.parameter_count(model),
              "kernels": loaders.kernels(model), "placed_on": sorted({str(p.device) for p in model.parameters()})}  # fmt: skip
    facts |= {"warpers": warpers.__dict__, "logit_width": int(model.config.vocab_size)}
    start, forward_s = time.perf_counter(), 0.0
    bar = progress_bar(total=sum(plan[i][1] - plan[i][0] for i in todo), desc=f"extract {spec.name}", unit="seq", leave=False)
    written = 0  # shards finished in this run

    def failed(shard: int, exc: OSError) -> ExtractError:
        return ExtractError(
            f"model {spec.name!r}: cannot write shard {shard} to {store.root}: {exc.strerror or exc} "
            f"(a full disk?). The {written} shards finished in this run are kept; re-run to resume."
        )

    closing: tuple | None = None  # (shard, writer, future): the previous shard, finishing in the background

    def wait_closing() -> None:
        nonlocal closing, written
        if closing is None:
            return
        shard, writer, future = closing
        closing = None
        try:
            future.result()
        except OSError as exc:
            writer.abort()
            raise failed(shard, exc) from exc
        written += 1

    # Two log-prob buffers, taken in turn: one fills while the shard before is on its way to disk from the other.
    # Reused rather than allocated per shard: fresh pages would page-fault on first write, doubling the cost of
    # writing the rows into them. 4 KB-aligned, so the shard writer can hand them to the disk with O_DIRECT.
    shard_rows = [sum(segments[i].rows for i in range(*plan[shard])) for shard in todo]
    ring = [aligned_empty(max(shard_rows), n_vocab, TORCH_DTYPES[store_dtype]) for _ in range(min(2, len(todo)))]
    try:
        for turn, (shard, n_rows) in enumerate(zip(todo, shard_rows, strict=True)):
            lo, hi = plan[shard]
            buf = {  # filled batch by batch; with the shard before still being written, two shards in memory at most
                "logprobs": ring[turn % 2][:n_rows],
                "target": torch.empty(n_rows, dtype=torch.long),
                "prompt": torch.empty(n_rows, dtype=torch.long),
                "position": torch.empty(n_rows, dtype=torch.long),
                "pad_mass": torch.empty(n_rows),
                "warp_finite": torch.empty(n_rows, dtype=torch.int32),
                "warp_mass": torch.empty(n_rows),
            }
            try:
                writer = store.shard_writer(shard, {k: (v.dtype, tuple(v.shape)) for k, v in buf.items()}, {"segments": [lo, hi]})
            except OSError as exc:
                raise failed(shard, exc) from exc
            try:
                row = 0
                for b in range(lo, hi, batch_size):
                    batch = segments[b : min(hi, b + batch_size)]
                    window = scored_window(batch, padding_side)
                    first = row
                    if window is not None:  # the output layer runs on the columns that hold scored rows only
                        t0 = time.perf_counter()
                        logits = forward_logits(model, [s.ids for s in batch], loaders.input_device(model), padding_side, keep=window)
                        forward_s += time.perf_counter() - t0
                        width = max(len(s.ids) for s in batch)
                        for i, seg in enumerate(batch):
                            name = prompt_ids[seg.prompt] if prompt_ids else seg.prompt
                            own = scored_rows(logits, i, seg, width, window[0], padding_side)
                            _fill(buf, row, seg, own, n_vocab, warpers, spec, name)
                            row += seg.rows
                        del logits, own  # no view of it outlives this line, so the next batch's logits replace it
                    writer.write_rows(first, buf["logprobs"][first:row])  # to disk while the next batch runs
                    bar.update(len(batch))
                future = writer.close({k: v for k, v in buf.items() if k != "logprobs"}, wait=False)
            except OSError as exc:
                writer.abort()
                raise failed(shard, exc) from exc
            except BaseException:
                writer.abort()  # an unfinished shard leaves nothing behind; finished ones are kept
                raise
            wait_closing()  # the shard before: at most two shard buffers exist, one filling, one on its way to disk
            closing = (shard, writer, future)
            del buf, writer
        wait_closing()
    except BaseException:
        with contextlib.suppress(ExtractError):  # the error in flight is the one to report
            wait_closing()  # a finished shard still on its way to disk is completed and kept
        raise
    finally:
        bar.close()
        del model
        loaders.release_memory()
    facts |= {"extract_s": time.perf_counter() - start, "forward_s": forward_s, "filled_by": _filled_by()}
    store.write_index({"key": key, "model": spec.model_dump(), "path": loaded.path, "n_vocab": n_vocab, "facts": facts})
    if part is None:  # every shard is now complete (a part's worker leaves it to the other parts' last run)
        store.sweep()
    log(f"{spec.name}: {len(todo)} shards written to {store.root}")
    return store, facts
