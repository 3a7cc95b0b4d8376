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

Models are located and loaded by `harness.loaders`; generate mode's continuations come from `harness.greedy`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
import time

import torch

from harness import loaders, paths
from harness.loaders import TORCH_DTYPES, ExtractError, Loaded
from harness.progress import bar as progress_bar
from harness.prompts import Segment
from harness.row_stats import row_stats
from harness.store import Store, aligned_empty, plan_shards, store_key
from harness.warpers import Warpers, candidates, warp_stats

EXTRACT_VERSION = 6  # bump when what is stored changes (4: warper figures with generate()'s defaults for unset fields;
# 5: the output layer on scored positions only, which moves the last bits of its rows; 6: on the columns from the
# first scored one to the row's end, logits_to_keep as an int)
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


def _full(exc: OSError) -> str:
    """What to do where a write failed for want of room."""
    return " (the disk is full: make room, or point HARNESS_STORE elsewhere)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""


def _write_index(store: Store, index: dict, name: str, shards: int) -> None:
    try:
        store.write_index(index)
    except OSError as exc:
        raise ExtractError(f"model {name!r}: cannot write {store.root / 'index.json'}: {exc.strerror or exc}{_full(exc)}. Its "
                           f"{shards} shards are complete and kept: the next run reuses them and writes it") from None  # fmt: skip


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
    index = {"key": key, "model": spec.model_dump(), "path": loaded.path, "n_vocab": n_vocab}
    if not missing:
        store.sweep()
        with contextlib.suppress(OSError):  # the folder's time is its last use (`harness store list`); read-only is fine
            os.utime(store.root)
        if store.index() is None:  # its filler stopped between the last shard and index.json: what is known of it
            with contextlib.suppress(OSError):  # best effort: a read-only store is still reused
                store.write_index(index | {"facts": facts})
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
            f"model {spec.name!r}: cannot write shard {shard} to {store.root}: {exc.strerror or exc}{_full(exc)}. "
            f"The {written} shards of this model finished in this run are kept, and the stores of the models before "
            "it; re-run to resume."
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
    _write_index(store, index | {"facts": facts}, spec.name, len(plan))
    if part is None:  # every shard is now complete (a part's worker leaves it to the other parts' last run)
        store.sweep()
    log(f"{spec.name}: {len(todo)} shards written to {store.root}")
    return store, facts
