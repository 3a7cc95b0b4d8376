"""Where a model's weights are and how they load: the config's `source`, `device`, `loader` and `backend`.

    python -c "from harness import loaders; print(loaders.LOADERS)"

`locate` resolves a ModelSpec to a `Loaded` (a zoo build, a local folder, or a hub id with the commit its revision
resolves to) and checks its device and backend before any model loads. Weights load through `LOADERS`, by the
spec's `loader`: transformers' AutoModelForCausalLM (a GPTQ checkpoint through optimum + gptqmodel, with the
kernel that path picks), or gptqmodel's GPTQModel.load, whose kernel `backend` may name, so that one checkpoint
can be compared through two kernels. `device: sharded` spreads a model's layers over every visible GPU
(device_map="auto"); its inputs go to its embedding's device. Every failure a user can fix is an ExtractError.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import gc
import hashlib
import json
import logging
import os
import sys
import types
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from harness import zoo
from harness.config import ModelSpec

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


def _folder_fingerprint(folder: Path, zoo_build: bool = False) -> str:
    """A zoo build by its manifest (every file's sha256); any other folder by its files' names, sizes and times, even
    when it holds a copied manifest (a copy of a zoo model whose weights were then changed is another model)."""
    manifest = folder / zoo.MANIFEST
    if zoo_build and manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def locate(spec: ModelSpec, zoo_profile: str) -> Loaded:
    """Where a model's weights are: a zoo build, a local folder, or a hub id."""
    try:
        device = resolve_device(spec.device)
    except ExtractError as exc:
        raise ExtractError(f"model {spec.name!r}: key 'device': {exc} (device: auto takes CUDA where there is one, "
                           "else the CPU)") from None
    if spec.backend is not None:
        check_backend(spec)
    local = spec.source.startswith("zoo:") or Path(spec.source).expanduser().is_dir()
    if spec.revision and local:  # a folder has one version: from_pretrained would ignore the revision
        raise ExtractError(f"model {spec.name!r}: key 'revision' ({spec.revision!r}) picks a commit of a hub id, and "
                           f"source {spec.source!r} is a {'zoo build' if spec.source.startswith('zoo:') else 'local folder'}: "
                           "drop the revision, or give the hub id")  # fmt: skip
    if spec.source.startswith("zoo:"):
        known = (*zoo.MODELS, *zoo.DAMAGED)
        if spec.source.removeprefix("zoo:") not in known:
            raise ExtractError(f"model {spec.name!r}: source {spec.source!r} is not in the embedded zoo, which has "
                               f"{', '.join('zoo:' + n for n in known)}")  # fmt: skip
        folder = zoo.resolve(spec.source, zoo_profile)
        return Loaded(spec, str(folder), _folder_fingerprint(folder, zoo_build=True), device)
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
    """Runs a from_pretrained call; a missing or damaged file, an unreachable hub or a GPTQ kernel that refuses the
    settings becomes one clear error."""
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, NotImplementedError, SafetensorError) as exc:
        hint = " A weights file is truncated or damaged: copy or download it again." if isinstance(exc, SafetensorError) else ""
        refused = isinstance(exc, NotImplementedError) or any(w in str(exc) for w in ("only supports", "requires"))
        if loaded.spec.loader == "gptqmodel" and refused and not hint:  # the kernel (named or picked) refuses the settings
            hint = (" With loader: gptqmodel the kernel must take the model's dtype and device (its CPU Int8 kernel takes "
                    "float16 or bfloat16 only): set this model's `dtype` or `backend`, or use loader: transformers.")
        if loaded.fingerprint.startswith("hub:") and not hint:
            hint = (
                " It is a hub id: without network access (or HF_HUB_OFFLINE) it must already be in the "
                "Hugging Face cache; otherwise download it elsewhere and give its local folder as `source`."
            )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"model {loaded.spec.name!r}: cannot load the {what} of {loaded.path}: {first.rstrip('.')}.{hint}") from exc


def _quantized(loaded: Loaded) -> bool | None:
    """Whether a model's config.json holds a quantization_config: a local folder's, or a hub id's (from the cache, or
    fetched as from_pretrained would); None where it cannot be read (the load then says why)."""
    config = Path(loaded.path) / "config.json"
    if not config.is_file() and loaded.fingerprint.startswith("hub:"):
        from huggingface_hub import hf_hub_download

        with contextlib.suppress(Exception):  # offline and not cached, unknown repo: from_pretrained reports it
            config = Path(hf_hub_download(loaded.path, "config.json", revision=loaded.spec.revision))
    try:
        return "quantization_config" in json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        return None


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
    with forget_kept_errors():
        model = LOADERS[loaded.spec.loader](loaded)
    # Loading a GPTQ model imports gptqmodel, whose logger (logbar) then reports its own housekeeping.
    logging.getLogger("logbar").setLevel(logging.WARNING)
    return model.eval()


@contextlib.contextmanager
def forget_kept_errors():
    """Around code that may import modules (a model's load, gptqmodel's import): the tracebacks that the modules it
    imports keep as globals are dropped after it (_drop_kept_tracebacks)."""
    imported = set(sys.modules)
    try:
        yield
    finally:
        _drop_kept_tracebacks(set(sys.modules) - imported)


def _drop_kept_tracebacks(modules: set[str]) -> None:
    """Forgets the tracebacks of exceptions that `modules` (imported inside forget_kept_errors) keep as globals.

    gptqmodel keeps the ImportError of an optional backend (`_LLAMA_CPP_IMPORT_ERROR`). Its traceback holds the
    frames of the import, and through them every caller's frame, from_pretrained's and load_model's among them:
    once those return, their locals (the model) stayed alive for the rest of the process, 1.8 GiB for a 0.5B
    model. The exception itself (its type and message) is kept."""
    for name in modules:
        module = sys.modules.get(name)
        if not issubclass(type(module), types.ModuleType):
            continue
        namespace = object.__getattribute__(module, "__dict__")  # not the module's own lookup: a lazy one would import
        todo, seen = [v for v in list(namespace.values()) if issubclass(type(v), BaseException)], set()
        while todo:  # the exception, and those it was raised during or from
            value = todo.pop()
            if id(value) not in seen:
                seen.add(id(value))
                value.__traceback__ = None
                todo += [e for e in (value.__context__, value.__cause__) if e is not None]


def release_memory() -> None:
    """After a model is dropped: forgets torch's compiled code, collects the model, and hands the allocator's free
    memory back to the system.

    glibc keeps freed heap pages (weights under its 32 MB mmap threshold, a model's layers) for reuse; one model
    after another, a compare process grew by 1 to 2 GiB a model at 0.5B. malloc_trim(0) returns them."""
    torch.compiler.reset()  # gptqmodel's compiled kernels (Int8's recompile per layer) hold code and guards
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(loaded: Loaded):
    from transformers import AutoTokenizer

    spec = loaded.spec
    folder = Path(loaded.path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ExtractError(
            f"model {spec.name!r}: {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model it was made from into it"
        )
    return _loading(
        loaded,
        "tokenizer",
        lambda: AutoTokenizer.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code),
    )


def load_generation_config(loaded: Loaded):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(loaded.path, revision=loaded.spec.revision)
    except OSError:  # no generation_config.json: what transformers makes of config.json (its eos, bos, pad; greedy)
        from transformers import AutoConfig

        spec = loaded.spec
        config = _loading(loaded, "config", lambda: AutoConfig.from_pretrained(
            loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code))  # fmt: skip
        return GenerationConfig.from_model_config(config)


def parameter_count(model) -> int:
    """The weights as the float model has them. A quantized layer (gptqmodel's: packed int buffers `qweight`, its bias
    a buffer too) counts in_features x out_features and its bias, which `parameters()` leaves out."""
    n = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features") and hasattr(module, "out_features"):
            n += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and not any(bias is p for p in module.parameters(recurse=False)):
                n += bias.numel()
    return n


def size_estimate(loaded: Loaded) -> int | None:
    """Roughly how many parameters a model has, from its config.json (decoder layers at 12 h² each, the embeddings);
    None where the config cannot be read or lacks the sizes."""
    from transformers import AutoConfig

    spec = loaded.spec
    try:
        config = AutoConfig.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        return int(12 * config.num_hidden_layers * config.hidden_size**2 + config.vocab_size * config.hidden_size)
    except Exception:  # a missing or odd config: the load reports it
        return None


def context_length(loaded: Loaded) -> int:
    from transformers import AutoConfig

    spec = loaded.spec
    config = _loading(
        loaded,
        "config",
        lambda: AutoConfig.from_pretrained(loaded.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code),
    )
    return int(config.max_position_embeddings)
