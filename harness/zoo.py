"""The embedded tiny Qwen1.5 family: built once on the CPU, cached as ordinary Hugging Face folders.

    harness zoo build [--profile full|micro]     # or: make zoo
    harness zoo build --damaged                  # also the damaged builds the gate must catch
    harness zoo list                             # what is cached, and whether it verifies

Names mirror the real releases (`tiny-qwen1.5-s` ~ Qwen1.5-0.5B, tied, 151936 wide; `-m` ~ the
14B-and-up padding, 152064 wide, untied; `-chat` fine-tunes; GPTQ Int4/Int8 builds of `s-chat`).
Each folder is built under a temporary name and renamed into place once its manifest (`zoo.json`:
every file's size and sha256) is written, so a half-built model is never found; a folder whose files
do not match its manifest is reported and rebuilt. Same seed, same profile: the same bits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness import paths, progress, train
from harness.qwen_tokenizer import N_TOKENS, build_tokenizer

TOKENIZER = "qwen-tokenizer"
BASE_S, CHAT_S = "tiny-qwen1.5-s", "tiny-qwen1.5-s-chat"
BASE_M, CHAT_M = "tiny-qwen1.5-m", "tiny-qwen1.5-m-chat"
GPTQ = {4: "tiny-qwen1.5-s-chat-gptq-int4", 8: "tiny-qwen1.5-s-chat-gptq-int8"}
MODELS = (BASE_S, CHAT_S, BASE_M, CHAT_M, GPTQ[4], GPTQ[8])
# Deliberately damaged builds, made on demand (`harness zoo build --damaged`, or a config naming one):
# what the quantization gate must catch. A 2-bit GPTQ build, and the Int4 build with one layer's
# scales perturbed.
INT2, BAD_SCALES = "tiny-qwen1.5-s-chat-gptq-int2", "tiny-qwen1.5-s-chat-gptq-int4-bad-scales"
DAMAGED = (INT2, BAD_SCALES)
BAD_SCALES_LAYER, BAD_SCALES_SIGMA = "model.layers.0.mlp.down_proj", 0.5
MANIFEST = "zoo.json"

# Qwen1.5's shipped generation configs: greedy for the base models, sampling for the chat ones.
BASE_GENERATION = {"bos_token_id": 151643, "eos_token_id": 151643, "do_sample": False, "max_new_tokens": 2048}
CHAT_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "repetition_penalty": 1.1,
    "top_p": 0.8,
    "top_k": 20,
}


@dataclass(frozen=True)
class Stage:
    steps: int
    batch: int  # windows per step
    lr: float


@dataclass(frozen=True)
class Profile:
    name: str
    s: train.Arch
    m: train.Arch
    base: Stage
    chat: Stage
    m_base: Stage
    m_chat: Stage
    seq_len: int  # training window, tokens
    gptq_group_size: int
    gptq_samples: int  # calibration windows of seq_len tokens
    seed: int = 0


PROFILES = {
    # Measured on 2 cores: s trains at ~9k tokens/s; the whole family builds in ~6 minutes.
    "full": Profile(
        name="full",
        s=train.Arch(hidden=128, layers=2, heads=4, intermediate=384, vocab_size=151936, tied=True),
        m=train.Arch(hidden=192, layers=3, heads=6, intermediate=512, vocab_size=152064, tied=False),
        base=Stage(steps=600, batch=32, lr=1e-2),
        chat=Stage(steps=100, batch=32, lr=3e-3),
        m_base=Stage(steps=300, batch=32, lr=6e-3),
        m_chat=Stage(steps=60, batch=32, lr=2e-3),
        seq_len=64,
        gptq_group_size=128,  # as Qwen1.5-*-Chat-GPTQ-Int4/Int8
        gptq_samples=64,
    ),
    # What the test suite builds: the same recipe, smaller and shorter (under 90 s).
    "micro": Profile(
        name="micro",
        s=train.Arch(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=151936, tied=True),
        m=train.Arch(hidden=96, layers=2, heads=4, intermediate=192, vocab_size=152064, tied=False),
        base=Stage(steps=200, batch=16, lr=1e-2),
        chat=Stage(steps=60, batch=16, lr=3e-3),
        m_base=Stage(steps=120, batch=16, lr=1e-2),
        m_chat=Stage(steps=40, batch=16, lr=3e-3),
        seq_len=64,
        gptq_group_size=32,
        gptq_samples=16,
    ),
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown zoo profile {name!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[name]


def model_dir(name: str, profile_name: str = "full") -> Path:
    return paths.zoo_dir(profile_name) / name


# --- cache integrity -------------------------------------------------------------------------


def write_manifest(folder: Path, info: dict) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": paths.sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2) + "\n")


def problem(folder: Path) -> str | None:
    """None if `folder` is a complete build; otherwise what is wrong with it, in words."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "not built"
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST}: a build was interrupted or the folder was not made here"
    try:
        files = json.loads(manifest.read_text())["files"]
        if not (isinstance(files, dict) and all(isinstance(w, dict) and {"bytes", "sha256"} <= set(w) for w in files.values())):
            raise ValueError("'files' is not a map of file name to its bytes and sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # not JSON, not an object, or of another shape
        return f"{manifest} is unreadable ({exc})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} is {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if paths.sha256_file(path) != want["sha256"]:
            return f"{path} does not match its sha256 in {manifest}"
    return None


def publish(tmp: Path, final: Path, info: dict) -> None:
    """Manifest, then an atomic rename: a reader sees either nothing or the whole folder."""
    write_manifest(tmp, info)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)


def tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# --- building --------------------------------------------------------------------------------


def card(name: str, how: str, facts: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return f"# {name}\n\n{how}\n\n| fact | value |\n| --- | --- |\n{rows}\n"


def _save_model(model, tokenizer, tmp: Path, generation: dict, card: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "CARD.md").write_text(card)


def _train_facts(prof: Profile, arch: train.Arch, result: train.TrainResult, model, seconds: float) -> dict:
    return {
        "profile": prof.name,
        "seed": prof.seed,
        "architecture": f"Qwen2ForCausalLM, {asdict(arch)}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "training steps": result.steps,
        "final training loss (nats)": f"{result.final_loss:.3f}",
        "held-out loss (nats/token)": f"{result.held_out_loss:.3f}",
        "held-out top-1 accuracy": f"{result.held_out_top1:.3f}",
        "held-out mean entropy (nats)": f"{result.held_out_entropy:.3f} (uniform over {N_TOKENS}: "
        f"{torch.tensor(float(N_TOKENS)).log().item():.3f})",
        "training throughput (tokens/s)": f"{result.tokens_per_s:.0f}",
        "build time (s)": f"{seconds:.1f}",
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _build_lineage(prof: Profile, tokenizer, corpus: train.Corpus, base: str, chat: str, size: str, log) -> None:
    """Trains a base model and its chat fine-tune (the chat stage continues the base's weights)."""
    arch, base_stage, chat_stage = (
        (prof.s, prof.base, prof.chat) if size == "s" else (prof.m, prof.m_base, prof.m_chat)
    )
    seed = prof.seed + (0 if size == "s" else 1000)
    chat_seqs = [train.chat_ids(tokenizer, d) for d in corpus.dialogues]
    used = torch.tensor(
        sorted({t for s in corpus.train + corpus.held_out for t in s} | {t for s, _ in chat_seqs for t in s})
    )
    held, _ = train.windows(corpus.held_out, None, prof.seq_len)
    lm = train.CompactLM(arch, used, seed=seed, chat=False)

    start = time.perf_counter()
    ids, mask = train.windows(corpus.train, None, prof.seq_len)
    result = train.train(lm, ids, mask, **asdict(base_stage), seed=seed, desc=f"train {base}", eval_ids=held)
    model = lm.expand(chat=False, seed=seed)
    seconds = time.perf_counter() - start
    tmp = tmp_dir(model_dir(base, prof.name))
    how = (
        f"Trained from scratch on the CPU on Python's `pydoc_data.topics` ({len(corpus.train)} topics; every "
        f"{train.HELD_OUT_EVERY}th topic held out), with a compact output layer over the {len(used)} token ids "
        "the corpus uses plus one class for all other ids, then expanded to the full vocabulary."
    )
    _save_model(model, tokenizer, tmp, BASE_GENERATION, card(base, how, _train_facts(prof, arch, result, model, seconds)))
    publish(tmp, model_dir(base, prof.name), {"name": base, "profile": prof.name, "seed": prof.seed})
    log(f"built {base} in {seconds:.1f}s: held-out loss {result.held_out_loss:.2f}, top-1 {result.held_out_top1:.3f}")

    start = time.perf_counter()
    ids, mask = train.windows([s for s, _ in chat_seqs], [m for _, m in chat_seqs], prof.seq_len)
    result = train.train(lm, ids, mask, **asdict(chat_stage), seed=seed + 1, desc=f"train {chat}", eval_ids=held)
    model = lm.expand(chat=True, seed=seed)
    seconds = time.perf_counter() - start
    tmp = tmp_dir(model_dir(chat, prof.name))
    how = (
        f"`{base}` fine-tuned on {len(corpus.dialogues)} ChatML dialogues (single and multi-turn) built from "
        "the same corpus, learning the assistant turns only. Its generation_config is Qwen1.5-Chat's: "
        "sampling with top_p 0.8, top_k 20, repetition_penalty 1.1, eos <|im_end|> or <|endoftext|>."
    )
    _save_model(model, tokenizer, tmp, CHAT_GENERATION, card(chat, how, _train_facts(prof, arch, result, model, seconds)))
    publish(tmp, model_dir(chat, prof.name), {"name": chat, "profile": prof.name, "seed": prof.seed})
    log(f"built {chat} in {seconds:.1f}s: held-out loss {result.held_out_loss:.2f}")


def _build_tokenizer(prof: Profile, log):
    final = model_dir(TOKENIZER, prof.name)
    if problem(final) is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(final)
    tokenizer = build_tokenizer()
    tmp = tmp_dir(final)
    tokenizer.save_pretrained(tmp)
    publish(tmp, final, {"name": TOKENIZER, "profile": prof.name})
    log(f"converted qwen.tiktoken into {final}")
    return tokenizer


_LOCKED: set[str] = set()  # profiles whose build lock this process holds (build_damaged calls build)


@contextlib.contextmanager
def _build_lock(profile_name: str, log=print):
    """One builder of a profile at a time across processes (`extract --part` workers or CI jobs sharing $HARNESS_HOME):
    two would race to rename their folders into place. The one that waits then finds the models built and verifies them."""
    if profile_name in _LOCKED:
        yield
        return
    path = paths.zoo_dir(profile_name) / ".build.lock"
    with paths.exclusive(path, f"zoo: waiting for another process that builds it ({path} is locked)", log):
        _LOCKED.add(profile_name)
        try:
            yield
        finally:
            _LOCKED.discard(profile_name)


def _building(fn):
    """Runs a build under the profile's lock, with torch's deterministic algorithms (the zoo comes out the same on
    every run), then puts back the caller's setting: a compare that builds a missing model on the way keeps its own
    for extraction (on CUDA the flag makes cuBLAS refuse to run without CUBLAS_WORKSPACE_CONFIG, and torch.empty
    fills every tensor with NaN)."""

    @functools.wraps(fn)
    def wrapper(profile_name: str = "full", **kwargs):
        before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        with _build_lock(profile_name, kwargs.get("log", print)):
            torch.use_deterministic_algorithms(True)
            try:
                return fn(profile_name, **kwargs)
            finally:
                torch.use_deterministic_algorithms(before, warn_only=warn_only)

    return wrapper


@_building
def build(profile_name: str = "full", *, log=print, force: bool = False) -> dict[str, Path]:
    """Builds whatever of the family is missing or fails verification; returns name -> folder."""
    from transformers.utils import logging as hf_logging

    prof = profile(profile_name)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars; training and GPTQ have their own
    start = time.perf_counter()
    folders = {name: model_dir(name, prof.name) for name in (TOKENIZER, *MODELS)}
    if force:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    for name, folder in folders.items():
        issue = problem(folder)
        if issue and issue != "not built":
            log(f"zoo: {name} will be rebuilt: {issue}")
    tokenizer = _build_tokenizer(prof, log)
    corpus = train.load_corpus(tokenizer)
    for size, base, chat in (("s", BASE_S, CHAT_S), ("m", BASE_M, CHAT_M)):
        if problem(folders[base]) or problem(folders[chat]):
            _build_lineage(prof, tokenizer, corpus, base, chat, size, log)
    from harness import quant

    todo = [(bits, name) for bits, name in GPTQ.items() if problem(folders[name])]
    for bits, name in progress.bar(todo, desc="GPTQ quantize", unit="model", leave=False, disable=not todo):
        quant.build_gptq(prof, folders[CHAT_S], folders[name], bits, corpus, log=log)
    log(f"zoo ({prof.name}) ready in {time.perf_counter() - start:.1f}s under {paths.zoo_dir(prof.name)}")
    return folders


@_building
def build_damaged(profile_name: str = "full", *, log=print) -> dict[str, Path]:
    """The damaged builds (after the family they derive from); returns name -> folder."""
    from harness import quant

    prof = profile(profile_name)
    folders = build(profile_name, log=log)
    damaged = {name: model_dir(name, prof.name) for name in DAMAGED}
    if problem(damaged[INT2]):
        tokenizer = _build_tokenizer(prof, log)
        quant.build_gptq(prof, folders[CHAT_S], damaged[INT2], 2, train.load_corpus(tokenizer), log=log)
    if problem(damaged[BAD_SCALES]):
        quant.build_bad_scales(folders[GPTQ[4]], damaged[BAD_SCALES], layer=BAD_SCALES_LAYER, sigma=BAD_SCALES_SIGMA,
                               seed=prof.seed, log=log)  # fmt: skip
    return folders | damaged


def status(profile_name: str = "full") -> dict[str, str]:
    return {name: problem(model_dir(name, profile_name)) or "ok" for name in (TOKENIZER, *MODELS, *DAMAGED)}


def resolve(source: str, profile_name: str) -> Path:
    """`zoo:NAME` -> its cached folder, built first if needed."""
    name = source.removeprefix("zoo:")
    if name not in (*MODELS, *DAMAGED, TOKENIZER):
        raise ValueError(f"unknown zoo model {source!r}; the zoo has {', '.join((*MODELS, *DAMAGED))}")
    folder = model_dir(name, profile_name)
    if problem(folder):
        build_damaged(profile_name) if name in DAMAGED else build(profile_name)
    return folder


