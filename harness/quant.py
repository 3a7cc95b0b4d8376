"""GPTQ builds of the embedded family, made on the CPU with gptqmodel (not auto-gptq, which needs CUDA).

    harness zoo build       # quantizes tiny-qwen1.5-s-chat to Int4 and Int8 after training it

The result is an ordinary GPTQ checkpoint (`quantization_config` in config.json, packed int32
`qweight`/`qzeros`, `scales`) that `AutoModelForCausalLM.from_pretrained` loads on the CPU through
optimum + gptqmodel, as it loads `Qwen/Qwen1.5-*-Chat-GPTQ-Int4`. Settings follow those releases:
symmetric, no act-order (`desc_act` false); the group size comes from the zoo profile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from harness import paths, train

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def quiet():
    """gptqmodel prints a banner and per-layer tables to stdout; keep them out of the harness output. Every import
    of gptqmodel goes through here, so here too the tracebacks its modules keep are dropped (loaders.forget_kept_errors:
    they would hold the importing frames' locals for the rest of the process)."""
    from harness.loaders import forget_kept_errors

    sink = io.StringIO()
    with forget_kept_errors(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield sink
    for name in ("logbar", "tokenicer", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.ERROR)


def calibration(corpus: train.Corpus, samples: int, length: int) -> list[dict[str, torch.Tensor]]:
    """`samples` windows of `length` corpus tokens, evenly spaced over the training text."""
    ids, _ = train.windows(corpus.train, None, length - 1)  # [N, length]
    pick = torch.linspace(0, len(ids) - 1, min(samples, len(ids))).long()
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids[pick]]


def build_gptq(prof, source: Path, final: Path, bits: int, corpus: train.Corpus, *, log=print) -> None:
    from harness import zoo

    with quiet():
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.looper import loop_processor

    # gptqmodel 7.6 writes per-layer logs to ./logs of whatever the working directory is; keep them
    # beside the zoo instead of in the user's checkout.
    loop_processor._PROJECT_LOG_DIR = paths.home() / "logs" / "gptqmodel"

    torch.manual_seed(prof.seed)
    start = time.perf_counter()
    qconfig = QuantizeConfig(
        bits=bits,
        group_size=prof.gptq_group_size,
        desc_act=False,
        sym=True,
        offload_to_disk=False,  # keeps a random temporary path out of the saved config
        pack_impl="original",  # pure-torch packing: no C++ build on the fly
    )
    tmp = zoo.tmp_dir(final)
    calib = calibration(corpus, prof.gptq_samples, prof.seq_len)
    with quiet():
        model = GPTQModel.load(str(source), qconfig, dtype=torch.float32, device="cpu")
        model.quantize(calib, batch_size=1)
        model.save(str(tmp))
    del model
    # gptqmodel saves the tokenizer it loaded; the generation config and card come from the source.
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    seconds = time.perf_counter() - start
    facts = {
        "source": source.name,
        "bits": bits,
        "group size": prof.gptq_group_size,
        "desc_act": False,
        "sym": True,
        "calibration": f"{len(calib)} windows of {prof.seq_len} corpus tokens",
        "quantizer": "gptqmodel (CPU)",
        "build time (s)": f"{seconds:.1f}",
    }
    how = (
        f"GPTQ Int{bits} of `{source.name}`, made on the CPU with gptqmodel. Linear layers of the decoder are "
        "quantized; embeddings, norms and the output layer stay float32."
    )
    (tmp / "CARD.md").write_text(zoo.card(final.name, how, facts))
    zoo.publish(tmp, final, {"name": final.name, "profile": prof.name, "seed": prof.seed, "bits": bits})
    log(f"built {final.name} in {seconds:.1f}s")


def build_bad_scales(source: Path, final: Path, *, layer: str, sigma: float, seed: int, log=print) -> None:
    """A copy of the GPTQ checkpoint `source` whose one linear layer has its `scales` multiplied by
    seeded log-normal noise (exp(sigma * N(0, 1)) per group and column): what a corrupt upload or a
    buggy conversion does to one tensor. Every other byte of the checkpoint is unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from harness import zoo

    start = time.perf_counter()
    tmp = zoo.tmp_dir(final)
    for path in source.iterdir():
        if path.is_file() and path.name not in (zoo.MANIFEST, "CARD.md", "model.safetensors"):
            shutil.copy2(path, tmp / path.name)
    with safe_open(source / "model.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = f"{layer}.scales"
    if key not in tensors:
        raise ValueError(f"{source / 'model.safetensors'} has no tensor {key!r}")
    noise = torch.exp(sigma * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(seed)))
    tensors[key] = (tensors[key].float() * noise).to(tensors[key].dtype)
    save_file(tensors, tmp / "model.safetensors", metadata=metadata)
    facts = {"source": source.name, "damaged tensor": key, "noise": f"x exp({sigma} N(0,1)), seed {seed}"}
    how = f"`{source.name}` with the scales of `{layer}` perturbed: a deliberately damaged build, for testing the gate."
    (tmp / "CARD.md").write_text(zoo.card(final.name, how, facts))
    zoo.publish(tmp, final, {"name": final.name, "damaged": key, "sigma": sigma, "seed": seed})
    log(f"built {final.name} in {time.perf_counter() - start:.1f}s")
