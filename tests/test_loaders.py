"""Loading: where a model's weights are (zoo, folder, hub commit), which tokenizer it loads, the devices it may
take (sharded included), and gptqmodel's loader with its kernels; every failure a user can fix is a clear error."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import extract, loaders, prompts, zoo
from harness.config import ModelSpec

SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return prompts.tokenize(tokenizer, prompts.load(SMALL), max_length=2048, source="ref")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    spec = ModelSpec(name="gone", source=str(tmp_path / "no-such-model"))
    with pytest.raises(loaders.ExtractError, match=r"'gone'.*no-such-model does not exist"):
        loaders.locate(spec, "micro")


def test_folder_without_a_tokenizer_is_a_clear_error(micro_zoo, tmp_path):
    """Weights and config alone: not "its tokenizer has 1 tokens" later, but which files are missing."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(zoo.model_dir(zoo.BASE_S, "micro") / name)
    loaded = loaders.locate(ModelSpec(name="bare", source=str(tmp_path)), "micro")
    with pytest.raises(loaders.ExtractError, match=r"'bare': .* holds no tokenizer \(none of tokenizer.json, "):
        loaders.load_tokenizer(loaded)


def test_unknown_zoo_name_is_a_clear_error():
    spec = ModelSpec(name="tiny", source="zoo:tiny-qwen1.5-xl")
    with pytest.raises(loaders.ExtractError, match=r"'tiny': source 'zoo:tiny-qwen1.5-xl' is not in the embedded zoo, which has zoo:tiny-qwen1.5-s,"):
        loaders.locate(spec, "micro")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = loaders.locate(ModelSpec(name="real", source="Qwen/Qwen1.5-0.5B-Chat"), "micro")
    with pytest.raises(loaders.ExtractError, match=r"'real': cannot load the config of Qwen/Qwen1.5-0.5B-Chat.*local folder"):
        loaders.context_length(loaded)


def test_a_hub_model_is_keyed_by_its_commit(tmp_path, monkeypatch):
    """Offline, a hub id's branch is read from the cache's refs: a new commit on main is another store."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--Qwen--Qwen1.5-0.5B-Chat" / "refs"
    spec = ModelSpec(name="real", source="Qwen/Qwen1.5-0.5B-Chat")
    assert loaders.locate(spec, "micro").fingerprint == "hub:Qwen/Qwen1.5-0.5B-Chat@main"  # not cached: the branch
    refs.mkdir(parents=True)
    for commit in ("a" * 40, "b" * 40):
        (refs / "main").write_text(commit + "\n")
        assert loaders.locate(spec, "micro").fingerprint == f"hub:Qwen/Qwen1.5-0.5B-Chat@{commit}"
    pinned = spec.model_copy(update={"revision": "c" * 40})
    assert loaders.locate(pinned, "micro").fingerprint.endswith("@" + "c" * 40)


def test_a_hub_gptq_release_is_known_quantized_from_the_cache(tmp_path, monkeypatch):
    """A hub id's config.json is read from the cache (offline) before loading, so gptqmodel's banner is kept out of
    the output for a hub GPTQ release as for a local folder (it leaked for hub ids)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for repo, config in (("Qwen1.5-0.5B-Chat-GPTQ-Int4", {"quantization_config": {"bits": 4, "quant_method": "gptq"}}),
                         ("Qwen1.5-0.5B-Chat", {"model_type": "qwen2"})):  # fmt: skip
        root = tmp_path / f"models--Qwen--{repo}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("d" * 40)
        (root / "snapshots" / ("d" * 40)).mkdir(parents=True)
        (root / "snapshots" / ("d" * 40) / "config.json").write_text(json.dumps(config))
    quantized = loaders.locate(ModelSpec(name="q", source="Qwen/Qwen1.5-0.5B-Chat-GPTQ-Int4"), "micro")
    plain = loaders.locate(ModelSpec(name="p", source="Qwen/Qwen1.5-0.5B-Chat"), "micro")
    missing = loaders.locate(ModelSpec(name="m", source="Qwen/Qwen1.5-0.5B"), "micro")
    assert (loaders._quantized(quantized), loaders._quantized(plain), loaders._quantized(missing)) == (True, False, None)


def test_tokenizer_key_is_the_tokenizer_files_bytes(tmp_path):
    def folder(name: str, vocab: str) -> loaders.Loaded:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").write_text(vocab)
        (tmp_path / name / "model.safetensors").write_text(name)  # weights differ: no matter
        return loaders.locate(ModelSpec(name=name, source=str(tmp_path / name)), "micro")

    a, b, c = folder("a", '{"v": 1}'), folder("b", '{"v": 1}'), folder("c", '{"v": 2}')
    assert loaders.tokenizer_key(a) == loaders.tokenizer_key(b) != loaders.tokenizer_key(c)
    (tmp_path / "b" / "chat_template.jinja").write_text("{{ messages }}")  # a template of its own: another tokenizer
    assert loaders.tokenizer_key(a) != loaders.tokenizer_key(b)
    (tmp_path / "c" / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "c" / "qwen.tiktoken").write_text("a 0")  # a tokenizer file of a format not named anywhere
    assert loaders.tokenizer_key(a) != loaders.tokenizer_key(c)
    (tmp_path / "a" / "config.json").write_text('{"quantization_config": {}}')  # model metadata: no matter
    assert loaders.tokenizer_key(a) == loaders.tokenizer_key(folder("d", '{"v": 1}'))
    hub = loaders.locate(ModelSpec(name="h", source="Qwen/Qwen1.5-0.5B-Chat", revision="r1"), "micro")
    assert loaders.tokenizer_key(hub) != loaders.tokenizer_key(loaders.locate(ModelSpec(name="h", source="Qwen/Qwen1.5-0.5B-Chat"), "micro"))


def _placed(name, device):
    return loaders.locate(ModelSpec(name=name, source=f"zoo:{name}", device=device), "micro")


@pytest.mark.slow
def test_a_sharded_model_takes_its_inputs_where_its_embedding_is(micro_zoo, tokens, monkeypatch):
    """device: sharded loads through accelerate's device_map="auto" (every visible GPU, else the CPU), and the inputs
    go to the embedding's device: same logits as the model on the device it lands on (bit for bit on the CPU)."""
    from transformers import AutoModelForCausalLM

    real, maps = AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        maps.append(kwargs["device_map"])
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = _placed(zoo.CHAT_S, "sharded")
    assert loaded.device == "sharded"
    spread = loaders.load_model(loaded)
    first = loaders.input_device(spread)
    assert first == spread.model.embed_tokens.weight.device
    if torch.cuda.is_available():
        assert first.type == "cuda"
    one = loaders.load_model(_placed(zoo.CHAT_S, "cuda:0" if torch.cuda.is_available() else "cpu"))
    batch = [tokens.ids[i] for i in range(3)]
    assert maps[0] == "auto" and maps[1] == one.device.type + (":0" if one.device.type == "cuda" else "")
    for keep in (None, (2, 9)):  # all positions, and the output layer on a window (its last layer's device)
        got = extract.forward_logits(spread, batch, first, keep=keep)
        want = extract.forward_logits(one, batch, loaders.input_device(one), keep=keep)
        assert got.shape[1] == (max(map(len, batch)) if keep is None else 7)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0 if first.type == "cpu" else 1e-4)


def test_a_device_this_machine_lacks_is_a_clear_error():
    if torch.cuda.is_available():
        want = rf"device 'cuda:{torch.cuda.device_count()}' was asked for, but this machine has \d+ CUDA device"
        with pytest.raises(loaders.ExtractError, match=want):
            _placed(zoo.CHAT_S, f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(loaders.ExtractError, match=f"model '{zoo.CHAT_S}': key 'device': device 'cuda:1' was asked for, but this machine has no CUDA"):
            _placed(zoo.CHAT_S, "cuda:1")


def test_a_revision_of_a_folder_is_an_error(tmp_path):
    """A zoo build or a local folder has one version: a `revision` would be ignored by from_pretrained, yet give the
    model a store of its own."""
    (tmp_path / "config.json").write_text("{}")
    for source, kind in (("zoo:tiny-qwen1.5-s-chat", "zoo build"), (str(tmp_path), "local folder")):
        with pytest.raises(loaders.ExtractError, match=f"model 'v': key 'revision' \\('abc'\\) picks a commit of a hub id, and source .* is a {kind}"):
            loaders.locate(ModelSpec(name="v", source=source, revision="abc"), "micro")


@pytest.mark.slow
def test_gptqmodel_loader_errors_are_clear(micro_zoo):
    with pytest.raises(loaders.ExtractError, match=r"backend 'gptq_troch' is not a gptqmodel kernel \(did you mean 'gptq_torch'\?\)"):
        loaders.locate(ModelSpec(name="q", source=f"zoo:{zoo.GPTQ[4]}", loader="gptqmodel", backend="gptq_troch"), "micro")
    floating = loaders.locate(ModelSpec(name="f", source=f"zoo:{zoo.CHAT_S}", loader="gptqmodel"), "micro")
    with pytest.raises(loaders.ExtractError, match=r"model 'f': loader 'gptqmodel' loads quantized checkpoints, and .*"
                                                   r"tiny-qwen1.5-s-chat/config.json has no quantization_config"):  # fmt: skip
        loaders.load_model(floating)
    aten32 = loaders.locate(ModelSpec(name="q", source=f"zoo:{zoo.GPTQ[4]}", loader="gptqmodel", backend="gptq_torch"), "micro")
    with pytest.raises(loaders.ExtractError, match=r"model 'q': cannot load the weights of .*only supports.*set this model's `dtype`"):
        loaders.load_model(aten32)  # that kernel takes float16 or bfloat16 only: gptqmodel's own message, and what to do
    int8 = loaders.locate(ModelSpec(name="q8", source=f"zoo:{zoo.GPTQ[8]}", loader="gptqmodel"), "micro")
    with pytest.raises(loaders.ExtractError, match=r"model 'q8': cannot load the weights of .*only supports.*"
                                                   r"set this model's `dtype` or `backend`, or use loader: transformers"):  # fmt: skip
        loaders.load_model(int8)  # no backend named: gptqmodel's choice for Int8 in float32 raised NotImplementedError


def test_a_copied_zoo_folder_is_keyed_by_its_files(micro_zoo, tmp_path):
    """A copy of a zoo model keeps its zoo.json; its weights may have been changed since, so only a `zoo:` source is
    keyed by the manifest, and a local copy by its own files (a change of them is another store)."""
    src = zoo.model_dir(zoo.CHAT_S, "micro")
    for name in ("config.json", zoo.MANIFEST):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"one")
    zoo_key = loaders.locate(ModelSpec(name="z", source=f"zoo:{zoo.CHAT_S}"), "micro").fingerprint
    before = loaders.locate(ModelSpec(name="c", source=str(tmp_path)), "micro").fingerprint
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    after = loaders.locate(ModelSpec(name="c", source=str(tmp_path)), "micro").fingerprint
    assert len({zoo_key, before, after}) == 3


# The quantization_config of Qwen's own GPTQ releases (Qwen/Qwen1.5-*-Chat-GPTQ-Int4/Int8, made with auto-gptq through
# optimum): optimum's GPTQConfig written out, with no checkpoint_format and no quantize_config.json beside it.
HUB_GPTQ_CONFIG = {"batch_size": 1, "block_name_to_quantize": None, "cache_block_outputs": True, "damp_percent": 0.01, "dataset": None,
                   "desc_act": False, "exllama_config": {"version": 1}, "group_size": 128, "max_input_length": None, "model_seqlen": None,
                   "module_name_preceding_first_block": None, "modules_in_block_to_quantize": None, "pad_token_id": None,
                   "quant_method": "gptq", "sym": True, "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False,
                   "use_exllama": True}  # fmt: skip


@pytest.mark.parametrize("bits", [4, 8])
def test_a_gptq_checkpoint_in_the_hub_releases_form_loads_as_the_zoos(micro_zoo, tmp_path, bits):
    """Real GPTQ releases carry an older config than gptqmodel writes: no checkpoint_format, which says how the zero
    points are stored (v1: one below their value, as auto-gptq wrote them). Both loaders must read such a folder
    to the zoo build's logits exactly; the same weights declared v2 are read wrong (so the check can fail)."""
    src = zoo.model_dir(zoo.GPTQ[bits], "micro")
    x = torch.tensor([[9707, 11, 1879, 0, 374, 264, 1273, 13, 151645, 198, 151644]])

    def logits(source, loader="transformers"):
        dtype = "bfloat16" if loader == "gptqmodel" and bits == 8 else "float32"  # gptqmodel's CPU Int8 kernel: 16-bit only
        model = loaders.load_model(loaders.locate(ModelSpec(name="q", source=str(source), loader=loader, dtype=dtype), "micro"))
        with torch.no_grad():
            return model(x).logits

    def hub_form(folder, **extra):
        folder.mkdir()
        for f in src.iterdir():
            if f.name not in (zoo.MANIFEST, "quantize_config.json"):
                (folder / f.name).symlink_to(f)
        config = json.loads((src / "config.json").read_text())
        own = config["quantization_config"]
        config["quantization_config"] = HUB_GPTQ_CONFIG | {"bits": bits, "group_size": own["group_size"]} | extra
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    hub = hub_form(tmp_path / "hub")
    for loader in ("transformers", "gptqmodel"):
        assert torch.equal(logits(hub, loader), logits(f"zoo:{zoo.GPTQ[bits]}", loader)), loader
    misread = logits(hub_form(tmp_path / "v2", checkpoint_format="gptq_v2"))
    assert (misread - logits(hub)).abs().max() > 0.01  # a zero point one step off: 3.0 in Int4, 0.05 in Int8 (micro)


def test_a_gptq_build_counts_the_float_models_parameters(micro_zoo):
    """Its packed int weights and bias are buffers, not parameters: counted as the float model has them, a GPTQ build
    has exactly its source's parameters (it reported the embeddings and norms only)."""
    float_model, gptq = (loaders.load_model(loaders.locate(ModelSpec(name=n, source=f"zoo:{n}"), "micro")) for n in (zoo.CHAT_S, zoo.GPTQ[4]))
    assert loaders.parameter_count(float_model) == sum(p.numel() for p in float_model.parameters())
    assert sum(p.numel() for p in gptq.parameters()) < loaders.parameter_count(gptq) == loaders.parameter_count(float_model)


def test_a_dropped_model_is_freed_even_when_its_load_imported_gptqmodel(micro_zoo):
    """gptqmodel keeps an optional backend's ImportError as a global; its traceback held every frame of the first
    GPTQ load, and their locals kept that model alive for the rest of the process (a compare of four 0.5B models
    peaked at 9.8 GiB instead of 5.1). In a fresh process, so that this load is the one that imports gptqmodel."""
    code = f"""
import gc, sys, weakref
from harness import loaders
from harness.config import ModelSpec
assert "gptqmodel" not in sys.modules
model = loaders.load_model(loaders.locate(ModelSpec(name="q", source="zoo:{zoo.GPTQ[8]}"), "micro"))
assert "gptqmodel" in sys.modules
alive = weakref.ref(model)
del model
loaders.release_memory()
print("ALIVE" if alive() is not None else "FREED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FREED"


def test_kept_tracebacks_are_dropped_with_their_frames(tmp_path):
    """An exception kept as a module global, and the ones it was raised during or from, lose their tracebacks, so
    the frames they held and their locals are freed; type and message stay. A lazily loaded module among the new
    ones is not made to run its deferred import (its body would raise here)."""
    import importlib.util
    import types
    import weakref

    class Big:
        pass

    def fail(big):
        try:
            raise KeyError("inner")
        except KeyError:
            raise ImportError("no backend")  # noqa: B904 (raised during the KeyError: its __context__)

    def cause(big):
        try:
            raise OSError("the cause")
        except OSError as exc:
            return exc

    module = types.ModuleType("harness_test_kept_error")
    big, other = Big(), Big()
    alive, other_alive = weakref.ref(big), weakref.ref(other)
    try:
        fail(big)
    except ImportError as exc:
        module.ERROR = exc
    module.CAUSED = RuntimeError("raised from another, outside its except block")
    module.CAUSED.__cause__ = cause(other)  # a cause only: no __context__
    del big, other
    (tmp_path / "harness_test_lazy.py").write_text("raise AssertionError('the deferred import ran')\n")
    spec = importlib.util.spec_from_file_location("harness_test_lazy", tmp_path / "harness_test_lazy.py")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    lazy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lazy)
    names = {module.__name__, "harness_test_lazy"}  # not lazy.__name__: any attribute of it runs the import
    sys.modules |= {module.__name__: module, "harness_test_lazy": lazy}
    try:
        assert alive() is not None and other_alive() is not None  # held by the tracebacks' frames
        loaders._drop_kept_tracebacks(names | {"no-such-module"})
        gc.collect()
        assert alive() is None and other_alive() is None
        assert module.ERROR.__traceback__ is None and module.ERROR.__context__.__traceback__ is None
        assert module.CAUSED.__cause__.__traceback__ is None and str(module.CAUSED.__cause__) == "the cause"
        assert str(module.ERROR) == "no backend" and isinstance(module.ERROR.__context__, KeyError)
    finally:
        for name in names:
            del sys.modules[name]


def test_importing_gptqmodel_through_quiet_keeps_no_caller_alive():
    """Every import of gptqmodel goes through quant.quiet (a backend check imports it before any model loads): the
    importing function's locals are freed once it returns. In a fresh process, so that this is the first import."""
    code = """
import gc, sys, weakref
from harness.quant import quiet
class Big: pass
def plan():
    big = Big()
    with quiet():
        import gptqmodel
    return weakref.ref(big)
alive = plan()
gc.collect()
print("ALIVE" if alive() is not None else "FREED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FREED"
