"""Teacher-forced extraction: one model at a time, raw logits -> cut padding -> log-probs -> store.

    harness compare --config configs/default.yaml     # extraction is the first half of a compare

Every variant runs over the reference tokenizer's ids, in batches padded on the right with an
attention mask (causal attention: padding after a prompt cannot change its logits). The row of
logits is cut to the real token ids (`len(tokenizer)`, 151646 for Qwen1.5) before the softmax;
the probability that the raw row put on the padding columns is kept beside it.
"""

from __future__ import annotations

import gc
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import paths, zoo
from harness.config import ModelSpec
from harness.prompts import TokenizedPrompts
from harness.store import Store, plan_shards, store_key

EXTRACT_VERSION = 1  # bump when what is stored changes meaning
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
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"device {device!r} was asked for, but this machine has no CUDA device")
    return device


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
    if spec.source.startswith("zoo:"):
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
    return Loaded(spec, spec.source, f"hub:{spec.source}@{spec.revision or 'main'}", device)


def load_model(loaded: Loaded):
    from transformers import AutoModelForCausalLM

    spec = loaded.spec
    try:
        model = AutoModelForCausalLM.from_pretrained(
            loaded.path,
            revision=spec.revision,
            dtype=TORCH_DTYPES[spec.dtype],
            device_map=loaded.device,
            trust_remote_code=spec.trust_remote_code,
        )
    except OSError as exc:
        raise ExtractError(f"model {spec.name!r}: cannot load {loaded.path}: {exc}") from exc
    return model.eval()


def load_tokenizer(loaded: Loaded):
    from transformers import AutoTokenizer

    spec = loaded.spec
    try:
        return AutoTokenizer.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except OSError as exc:
        raise ExtractError(f"model {spec.name!r}: cannot load the tokenizer of {loaded.path}: {exc}") from exc


def context_length(loaded: Loaded) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(loaded.path, revision=loaded.spec.revision, trust_remote_code=loaded.spec.trust_remote_code)
    return int(config.max_position_embeddings)


@torch.no_grad()
def forward_logprobs(model, batch: list[tuple[int, ...]], n_vocab: int, device: str):
    """Per prompt: ([L-1, n_vocab] float32 log-probs of the next token, [L-1] pad mass)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # [B, T, V_padded]
    out = []
    for i, ids in enumerate(batch):
        raw = logits[i, : len(ids) - 1].float().cpu()  # [L-1, V_padded]; row t predicts ids[t + 1]
        if raw.shape[-1] < n_vocab:
            raise ExtractError(f"the model's logit rows are {raw.shape[-1]} wide, fewer than the tokenizer's {n_vocab} ids")
        lse_cut = torch.logsumexp(raw[:, :n_vocab], dim=-1)
        lse_pad = torch.logsumexp(raw[:, n_vocab:], dim=-1)  # -inf when there are no padding columns
        pad_mass = torch.exp(lse_pad - torch.logaddexp(lse_cut, lse_pad))  # mass on columns >= n_vocab
        out.append((raw[:, :n_vocab] - lse_cut[:, None], pad_mass))
    return out


def extract(
    loaded: Loaded,
    tokens: TokenizedPrompts,
    *,
    batch_size: int,
    store_dtype: str,
    log=print,
) -> tuple[Store, dict]:
    """Fills (or reuses, or resumes) the store of one model; returns it and timing facts."""
    spec = loaded.spec
    key = store_key(
        source=loaded.path, revision=spec.revision, fingerprint=loaded.fingerprint, dtype=spec.dtype,
        device=loaded.device.split(":")[0], ids=tokens.fingerprint, n_vocab=tokens.n_vocab,
        store_dtype=store_dtype, mode="text", version=EXTRACT_VERSION,
    )  # fmt: skip
    store = Store(paths.store_dir() / key)
    plan = plan_shards([len(ids) - 1 for ids in tokens.ids])
    todo = [i for i in range(len(plan)) if not store.is_complete(i)]
    facts = {"store": str(store.root), "shards": len(plan), "reused_shards": len(plan) - len(todo)}
    if not todo:
        log(f"{spec.name}: reusing {store.root}")
        return store, {**facts, "load_s": 0.0, "extract_s": 0.0}
    start = time.perf_counter()
    model = load_model(loaded)
    facts["load_s"] = time.perf_counter() - start
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        for shard in todo:
            lo, hi = plan[shard]
            rows, pads = [], []
            for b in range(lo, hi, batch_size):
                chunk = list(range(b, min(hi, b + batch_size)))
                for p, (logprobs, pad) in zip(chunk, forward_logprobs(model, [tokens.ids[p] for p in chunk], tokens.n_vocab, loaded.device)):
                    if not torch.isfinite(logprobs).any(dim=-1).all() or torch.isnan(logprobs).any():
                        raise ExtractError(
                            f"model {spec.name!r} produced NaN or all -inf logits on prompt {tokens.prompts[p].id!r}; "
                            f"its dtype {spec.dtype} may overflow, try float32"
                        )
                    rows.append(logprobs)
                    pads.append(pad)
            targets = [torch.tensor(tokens.ids[p][1:]) for p in range(lo, hi)]
            prompt_index = [torch.full((len(tokens.ids[p]) - 1,), p) for p in range(lo, hi)]
            store.write_shard(
                shard,
                {
                    "logprobs": torch.cat(rows).to(TORCH_DTYPES[store_dtype]),
                    "target": torch.cat(targets),
                    "prompt": torch.cat(prompt_index),
                    "pad_mass": torch.cat(pads),
                },
                {"prompts": [lo, hi]},
            )
            log(f"{spec.name}: shard {shard + 1}/{len(plan)} written")
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    facts["extract_s"] = time.perf_counter() - start
    store.write_index({"key": key, "model": spec.model_dump(), "path": loaded.path, "n_vocab": tokens.n_vocab, **facts})
    return store, facts

