"""Teacher-forced extraction: one model at a time, raw logits -> cut padding -> log-probs -> store.

    harness extract --config configs/default.yaml      # fills the store of every model, then stops

Every model runs over the reference tokenizer's ids (`prompts.Segment`s), in batches padded on the
right or the left with an attention mask and explicit position ids, so a padded row's logits equal
its unpadded ones. Each logits row is cut to the real token ids (`len(tokenizer)`, 151646 for
Qwen1.5) before the softmax; the probability the raw row put on the padding columns, and what the
model's own generation_config warpers would leave of it, are stored beside it. Each batch's rows go
to disk from a background thread (store.ShardWriter) while the next batch's forward pass runs, and
a finished shard completes there while the next shard fills.

Weights load through `LOADERS`, by the spec's `loader`: transformers' AutoModelForCausalLM (a GPTQ checkpoint
through optimum + gptqmodel, with the kernel that path picks), or gptqmodel's GPTQModel.load, whose kernel
`backend` may name, so that one checkpoint can be compared through two kernels. `device: sharded` spreads a
model's layers over every visible GPU (device_map="auto"); its inputs go to its embedding's device.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness import paths, zoo
from harness.config import ModelSpec
from harness.prompts import Segment, TokenizedPrompts
from harness.row_stats import row_stats
from harness.store import Store, aligned_empty, plan_shards, store_key
from harness.warpers import Warpers, candidates, warp_stats

EXTRACT_VERSION = 3  # bump when what is stored changes meaning
CHUNK_ROWS = 32  # rows post-processed at a time: 32 x 151936 float32 = 19 MB per temporary
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExtractError(RuntimeError):
    """A model that cannot be loaded or run, worded for the user."""


@dataclass(frozen=True)
class Loaded:
    spec: ModelSpec
    path: str  # resolved folder, or the hub id as given
    fingerprint: str  # what identifies these weights
    device: str


def resolve_device(device: str) -> str:
    """The config's device as loading takes it: auto becomes cuda or cpu; cuda:N must exist; sharded stays (its
    layers go where accelerate's device_map="auto" puts them: over every visible GPU, else the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"device {device!r} was asked for, but this machine has no CUDA device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ExtractError(f"device {device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")  # fmt: skip
    return device


def check_backend(spec: ModelSpec) -> None:
    """A `backend` must be one of the installed gptqmodel's kernels: a typo is an error before any model loads."""
    from harness.quant import quiet

    with quiet():
        from gptqmodel import BACKEND
    names = [b.value for b in BACKEND]
    if spec.backend not in names:
        close = difflib.get_close_matches(spec.backend, names, n=1)
        raise ExtractError(f"model {spec.name!r}: backend {spec.backend!r} is not a gptqmodel kernel"
                           + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; gptqmodel {version('gptqmodel')} has {', '.join(names)}")  # fmt: skip


def input_device(model) -> torch.device:
    """Where a loaded model takes its input ids: its embedding's device (the first GPU of a sharded model)."""
    return model.get_input_embeddings().weight.device


def _folder_fingerprint(folder: Path) -> str:
    manifest = folder / zoo.MANIFEST
    if manifest.is_file():  # a zoo build: its manifest holds every file's sha256
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def locate(spec: ModelSpec, zoo_profile: str) -> Loaded:
    """Where a model's weights are: a zoo build, a local folder, or a hub id."""
    device = resolve_device(spec.device)
    if spec.backend is not None:
        check_backend(spec)
    if spec.source.startswith("zoo:"):
        known = (*zoo.MODELS, *zoo.DAMAGED)
        if spec.source.removeprefix("zoo:") not in known:
            raise ExtractError(f"model {spec.name!r}: source {spec.source!r} is not in the embedded zoo, which has "
                               f"{', '.join('zoo:' + n for n in known)}")  # fmt: skip
        folder = zoo.resolve(spec.source, zoo_profile)
        return Loaded(spec, str(folder), _folder_fingerprint(folder), device)
    folder = Path(spec.source).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ExtractError(f"model {spec.name!r}: folder {folder} has no config.json; is it a Hugging Face model folder?")
        return Loaded(spec, str(folder.resolve()), _folder_fingerprint(folder), device)
    looks_local = spec.source.startswith((".", "/", "~")) or spec.source.count("/") != 1
    if looks_local:
        raise ExtractError(f"model {spec.name!r}: model folder {spec.source} does not exist")
    rev = spec.revision or "main"
    return Loaded(spec, spec.source, f"hub:{spec.source}@{hub_commit(spec.source, rev) or rev}", device)


def hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit a hub model's branch or tag stands for, so that a store made from one commit is not reused for
    the next: asked of the hub, or (offline, or where it does not answer) read from the local cache's refs; None
    where neither knows (the loader then says why it cannot load the model)."""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    from huggingface_hub import HfApi, constants

    if not (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")):
        with contextlib.suppress(Exception):  # no network, a gated or unknown repo: the cache, then the loader
            return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _loading(loaded: Loaded, what: str, load):
    """Runs a from_pretrained call; a missing file or an unreachable hub becomes one clear error."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        hint = ""
        if loaded.fingerprint.startswith("hub:"):
            hint = (
                " It is a hub id: without network access (or HF_HUB_OFFLINE) it must already be in the "
                "Hugging Face cache; otherwise download it elsewhere and give its local folder as `source`."
            )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"model {loaded.spec.name!r}: cannot load the {what} of {loaded.path}: {first}.{hint}") from exc


def _quantized(loaded: Loaded) -> bool | None:
    """Whether a local folder's config.json holds a quantization_config (None for a hub id: not known before loading)."""
    config = Path(loaded.path) / "config.json"
    return "quantization_config" in json.loads(config.read_text()) if config.is_file() else None


def _load_transformers(loaded: Loaded):
    from transformers import AutoModelForCausalLM

    spec = loaded.spec
    if _quantized(loaded):
        from harness.quant import quiet

        with quiet():  # gptqmodel prints a banner and its settings on import: not the harness's output
            import gptqmodel  # noqa: F401
    return _loading(
        loaded,
        "weights",
        lambda: AutoModelForCausalLM.from_pretrained(
            loaded.path,
            revision=spec.revision,
            dtype=TORCH_DTYPES[spec.dtype],
            device_map="auto" if loaded.device == "sharded" else loaded.device,
            trust_remote_code=spec.trust_remote_code,
        ),
    )


def _load_gptqmodel(loaded: Loaded):
    from harness.quant import quiet

    spec = loaded.spec
    if _quantized(loaded) is False:
        raise ExtractError(f"model {spec.name!r}: loader 'gptqmodel' loads quantized checkpoints, and "
                           f"{loaded.path}/config.json has no quantization_config; use loader: transformers")  # fmt: skip
    with quiet():  # its banner, kernel choice and housekeeping go to stdout
        from gptqmodel import GPTQModel

        place = {"device_map": "auto"} if loaded.device == "sharded" else {"device": loaded.device}
        extra = {"revision": spec.revision} if spec.revision else {}
        qmodel = _loading(
            loaded,
            "weights",
            lambda: GPTQModel.load(loaded.path, backend=spec.backend or "auto", dtype=TORCH_DTYPES[spec.dtype],
                                   trust_remote_code=spec.trust_remote_code, **place, **extra),
        )  # fmt: skip
    if not qmodel.quantized:  # a hub id without a quantization config: gptqmodel would hand back the float model
        raise ExtractError(f"model {spec.name!r}: loader 'gptqmodel' loads quantized checkpoints, and {loaded.path} "
                           "is not one; use loader: transformers")  # fmt: skip
    return qmodel.model  # the transformers model, its linear layers replaced by the backend's kernels


# The loaders a ModelSpec's `loader` names: each returns a transformers causal LM (forward, generate, config).
LOADERS = {"transformers": _load_transformers, "gptqmodel": _load_gptqmodel}


def load_model(loaded: Loaded):
    model = LOADERS[loaded.spec.loader](loaded)
    # Loading a GPTQ model imports gptqmodel, whose logger (logbar) then reports its own housekeeping.
    logging.getLogger("logbar").setLevel(logging.WARNING)
    return model.eval()


def kernels(model) -> list[str]:
    """The classes of a model's quantized linear layers (the kernel its loader chose), sorted; [] if it has none."""
    return sorted({type(m).__name__ for m in model.modules() if any(c.__name__ == "BaseQuantLinear" for c in type(m).__mro__)})


# Files that cannot change a tokenizer: weights and model metadata. Every other file of a folder counts, so a
# tokenizer format not foreseen here (tokenizer.model, *.tiktoken, ...) still keeps two folders apart.
NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".md", ".csv",
                 "config.json", "generation_config.json", "quantize_config.json", ".index.json", zoo.MANIFEST)  # fmt: skip


def tokenizer_key(loaded: Loaded) -> str:
    """What decides the tokenizer a model loads: the bytes of its folder's files but weights and model metadata,
    or the hub id and revision. Variants that share one (float32/float16/bfloat16 of one folder, quantized
    copies of it) load it once; a folder with anything different loads its own."""
    folder = Path(loaded.path)
    if not folder.is_dir():
        return f"hub:{loaded.path}@{loaded.spec.revision or 'main'}:{loaded.spec.trust_remote_code}"
    digest = hashlib.sha256(str(loaded.spec.trust_remote_code).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file() and not (path.name.endswith(NOT_TOKENIZER) and path.name != "tokenizer_config.json"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(loaded: Loaded):
    from transformers import AutoTokenizer

    spec = loaded.spec
    return _loading(
        loaded,
        "tokenizer",
        lambda: AutoTokenizer.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code),
    )


def load_generation_config(loaded: Loaded):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(loaded.path, revision=loaded.spec.revision)
    except OSError:  # a folder without generation_config.json: transformers' defaults (greedy)
        return GenerationConfig()


def context_length(loaded: Loaded) -> int:
    from transformers import AutoConfig

    spec = loaded.spec
    config = _loading(
        loaded,
        "config",
        lambda: AutoConfig.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code),
    )
    return int(config.max_position_embeddings)


@torch.no_grad()
def forward_logits(model, batch: list[tuple[int, ...]], device: str | torch.device, padding_side: str = "right") -> torch.Tensor:
    """[B, T, V_padded] raw logits; row b's own tokens sit at [b, :len] (right) or [b, T-len:] (left)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    for i, ids in enumerate(batch):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, cols] = torch.tensor(ids)
        attention[i, cols] = 1
        positions[i, cols] = torch.arange(len(ids))  # left padding must not shift the rotary positions
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device)
    )
    return out.logits


def own_rows(logits: torch.Tensor, b: int, length: int, padding_side: str) -> torch.Tensor:
    """The [length, V] logits of batch row b without its padding."""
    return logits[b, :length] if padding_side == "right" else logits[b, logits.shape[1] - length :]


def greedy_continuations(loaded: Loaded, tokens: TokenizedPrompts, max_new_tokens: int, log=print) -> list[list[int]]:
    """The reference's raw greedy continuation of every prompt (not its sampling generation_config).

    Cached beside the stores: the continuation fixes the ids every variant is scored on.
    """
    from transformers import GenerationConfig

    key = store_key(what="greedy", fingerprint=loaded.fingerprint, dtype=loaded.spec.dtype,
                    device=loaded.device.split(":")[0], ids=tokens.fingerprint, n=max_new_tokens,
                    loader=loaded.spec.loader, backend=loaded.spec.backend)  # fmt: skip
    path = paths.store_dir() / "generations" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["continuations"]
    own = load_generation_config(loaded)
    greedy = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id or own.eos_token_id,
    )  # fmt: skip
    model = load_model(loaded)
    # Replaced rather than passed: generate() fills a passed config's unset fields from the model's own
    # (Qwen1.5-Chat's repetition_penalty 1.1 would creep into "greedy").
    model.generation_config = greedy
    continuations = []
    try:
        for ids in tqdm(tokens.ids, desc=f"{loaded.spec.name}: greedy", unit="prompt", leave=False):
            x = torch.tensor([ids], device=input_device(model))
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x))
            continuations.append(out[0, len(ids) :].tolist())
    finally:
        del model
        gc.collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": continuations}))
    os.replace(tmp, path)
    log(f"{loaded.spec.name}: generated {sum(map(len, continuations))} greedy tokens")
    return continuations


def _fill(buf: dict, row: int, seg: Segment, own: torch.Tensor, n_vocab: int, warpers: Warpers, spec, name) -> None:
    """Writes one segment's scored rows into the shard buffers from `own` [len(ids), V_padded] logits."""
    ids = torch.tensor(seg.ids)
    # Chunks keep every temporary under glibc's 32 MB mmap threshold, so they reuse heap pages
    # instead of page-faulting fresh ones on every call.
    for r in range(seg.first, len(seg.ids) - 1, CHUNK_ROWS):
        r_end = min(r + CHUNK_ROWS, len(seg.ids) - 1)
        raw = own[r:r_end].float().cpu()  # [C, V_padded]
        rows = slice(row + r - seg.first, row + r_end - seg.first)
        n_top = candidates(warpers, ids, r, r_end - r, raw.shape[1])  # the warper figures need the raw top n
        _, pad_mass, lse, top = row_stats(raw, n_vocab, out=buf["logprobs"][rows], top=n_top)  # log-probs into the shard
        if not torch.isfinite(lse).all():
            bad = int((~torch.isfinite(lse)).nonzero()[0, 0]) + seg.offset + r
            raise ExtractError(
                f"model {spec.name!r} produced NaN or infinite logits on prompt {name!r} at token {bad}; "
                f"in {spec.dtype} its activations may overflow: try float32 (finished shards are kept)"
            )
        finite, kept = warp_stats(raw, ids, r, lse, warpers, top)
        buf["target"][rows] = ids[r + 1 : r_end + 1]
        buf["position"][rows] = torch.arange(r + 1, r_end + 1) + seg.offset
        buf["prompt"][rows] = seg.prompt
        buf["pad_mass"][rows] = pad_mass
        buf["warp_finite"][rows] = finite
        buf["warp_mass"][rows] = kept


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
    log=print,
) -> tuple[Store, dict]:
    """Fills (or reuses, or resumes) the store of one model; returns it and timing facts."""
    spec = loaded.spec
    # batch size and padding side too: a batch's shape moves the last bits of the logits, so each has its own store
    key = store_key(
        source=loaded.path, revision=spec.revision, fingerprint=loaded.fingerprint, dtype=spec.dtype,
        device=loaded.device.split(":")[0], segments=segments_fingerprint(segments), n_vocab=n_vocab,
        store_dtype=store_dtype, version=EXTRACT_VERSION, batch_size=batch_size, padding_side=padding_side,
        loader=spec.loader, backend=spec.backend,
    )  # fmt: skip
    store = Store(paths.store_dir() / key)
    plan = plan_shards([s.rows for s in segments])
    for stale in store.shards()[len(plan) :]:  # left by a store cut into more shards: not part of this plan
        stale.with_suffix(".json").unlink(missing_ok=True)
        stale.unlink()
    todo = [i for i in range(len(plan)) if not store.is_complete(i, plan[i])]
    facts = {"store": str(store.root), "shards": len(plan), "reused_shards": len(plan) - len(todo)}
    if not todo:
        log(f"{spec.name}: reusing {store.root}")
        first = (store.index() or {}).get("facts", {})  # the run that filled the store, for its timings
        timings = {"first_load_s": first.get("load_s"), "first_extract_s": first.get("extract_s")}
        return store, {**first, **facts, **timings, "load_s": 0.0, "extract_s": 0.0}
    start = time.perf_counter()
    model = load_model(loaded)
    warpers = Warpers.from_generation_config(load_generation_config(loaded))
    facts |= {"load_s": time.perf_counter() - start, "parameters": sum(p.numel() for p in model.parameters()),
              "kernels": kernels(model), "placed_on": sorted({str(p.device) for p in model.parameters()})}  # fmt: skip
    facts |= {"warpers": warpers.__dict__, "logit_width": int(model.config.vocab_size)}
    start, forward_s = time.perf_counter(), 0.0
    bar = tqdm(total=sum(plan[i][1] - plan[i][0] for i in todo), desc=f"extract {spec.name}", unit="seq", leave=False)
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
                    t0 = time.perf_counter()
                    logits = forward_logits(model, [s.ids for s in batch], input_device(model), padding_side)
                    forward_s += time.perf_counter() - t0
                    first = row
                    for i, seg in enumerate(batch):
                        name = prompt_ids[seg.prompt] if prompt_ids else seg.prompt
                        _fill(buf, row, seg, own_rows(logits, i, len(seg.ids), padding_side), n_vocab, warpers, spec, name)
                        row += seg.rows
                    del logits  # no view of it outlives this line, so the next batch's logits replace it
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
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    facts |= {"extract_s": time.perf_counter() - start, "forward_s": forward_s}
    store.write_index({"key": key, "model": spec.model_dump(), "path": loaded.path, "n_vocab": n_vocab, "facts": facts})
    log(f"{spec.name}: {len(todo)} shards written to {store.root}")
    return store, facts
