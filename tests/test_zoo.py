"""The embedded tiny Qwen1.5 family: loads through transformers, is what it claims, and is reproducible."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time

import pytest
import torch

from harness import zoo

pytestmark = pytest.mark.slow


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", zoo.MODELS)
def test_every_model_loads_through_transformers(micro_zoo, tokenizer, name):
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = micro_zoo[name]
    assert zoo.problem(folder) is None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert config.vocab_size == (152064 if "-m" in name else 151936)
    assert config.tie_word_embeddings == ("-m" not in name)
    assert (folder / "CARD.md").is_file()

    ids = tokenizer("The assert statement is a convenient way to insert debugging assertions", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0]
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()
    logp = torch.log_softmax(logits[:, : len(tokenizer)].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert entropy < 0.8 * math.log(len(tokenizer)), "a trained model is far from uniform"

    generation = GenerationConfig.from_pretrained(folder)
    if "chat" in name:
        assert generation.do_sample and generation.top_p == 0.8 and generation.eos_token_id == [151645, 151643]
        assert config.eos_token_id == 151645
    else:
        assert not generation.do_sample and config.eos_token_id == 151643
    if "gptq" in name:
        qc = config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        assert qc["bits"] == (4 if "int4" in name else 8) and qc["quant_method"] == "gptq"
        quantized = [m for m in model.modules() if hasattr(m, "qweight")]
        assert len(quantized) == 7 * config.num_hidden_layers  # q, k, v, o, gate, up, down


def test_tokenizer_folder_is_the_real_qwen_tokenizer(tokenizer):
    assert len(tokenizer) == 151646
    assert tokenizer("Hello world!").input_ids == [9707, 1879, 0]


def test_gptq_drifts_more_at_fewer_bits(micro_zoo, tokenizer):
    from transformers import AutoModelForCausalLM

    ids = tokenizer("Assignment statements are used to bind or rebind names to values", return_tensors="pt")

    def logp(name):
        model = AutoModelForCausalLM.from_pretrained(micro_zoo[name], dtype=torch.float32, device_map="cpu")
        with torch.no_grad():
            return torch.log_softmax(model(**ids).logits[0, :, :151646].double(), -1)

    ref = logp(zoo.CHAT_S)
    kl = {bits: (ref.exp() * (ref - logp(name))).sum(-1).mean().item() for bits, name in zoo.GPTQ.items()}
    assert 0 < kl[8] < kl[4]


def test_manifest_catches_corruption_and_build_repairs_it(micro_zoo, tmp_path, monkeypatch):
    """A flipped byte or a missing manifest is named, and a build replaces the folder."""
    home = tmp_path / "home"
    shutil.copytree(micro_zoo[zoo.GPTQ[8]].parent, home / "zoo" / "micro")
    monkeypatch.setenv("HARNESS_HOME", str(home))
    weights = zoo.model_dir(zoo.GPTQ[8], "micro") / "model.safetensors"
    good = _sha(weights)
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert "does not match its sha256" in zoo.problem(weights.parent)
    (zoo.model_dir(zoo.BASE_M, "micro") / zoo.MANIFEST).unlink()
    assert "build was interrupted" in zoo.problem(zoo.model_dir(zoo.BASE_M, "micro"))

    messages = []
    assert not torch.are_deterministic_algorithms_enabled()
    zoo.build("micro", log=messages.append)
    assert zoo.problem(weights.parent) is None and _sha(weights) == good  # rebuilt, bit for bit
    # the build's deterministic algorithms end with it: a compare that built a missing model keeps its own setting
    assert not torch.are_deterministic_algorithms_enabled()
    assert any("will be rebuilt" in m and zoo.GPTQ[8] in m for m in messages)
    assert all(state == "ok" for state in zoo.status("micro").values())


@pytest.mark.parametrize("content", ["[1]", '{"files": [1]}', '{"files": {"a": 3}}', '{"files": {"a": {"bytes": 1}}}', "{"])
def test_a_manifest_of_another_shape_is_named_not_a_crash(tmp_path, content):
    """`zoo list` and a build read every manifest: one edited into another shape is a folder to rebuild, named with
    why (it was a TypeError/AttributeError, exit 3)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / zoo.MANIFEST).write_text(content)
    assert zoo.problem(folder).startswith(f"{folder / zoo.MANIFEST} is unreadable (")


def test_half_built_folder_is_never_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path))
    final = zoo.model_dir(zoo.BASE_S, "micro")
    tmp = zoo.tmp_dir(final)  # what an interrupted build leaves behind
    (tmp / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert zoo.problem(final) == "not built"


def test_same_seed_same_bits(micro_zoo, tmp_path, monkeypatch):
    """Rebuilding the s lineage and its Int4 build from scratch reproduces the cached weights exactly."""
    home = tmp_path / "home"
    (home / "zoo" / "micro").mkdir(parents=True)
    shutil.copytree(micro_zoo["qwen-tokenizer"], home / "zoo" / "micro" / "qwen-tokenizer")
    for name in (zoo.BASE_M, zoo.CHAT_M, zoo.GPTQ[8]):  # not under test: keep the cached ones
        shutil.copytree(micro_zoo[name], home / "zoo" / "micro" / name)
    monkeypatch.setenv("HARNESS_HOME", str(home))
    zoo.build("micro", log=lambda _: None)
    for name in (zoo.BASE_S, zoo.CHAT_S, zoo.GPTQ[4]):
        assert _sha(zoo.model_dir(name, "micro") / "model.safetensors") == _sha(micro_zoo[name] / "model.safetensors"), name


def test_a_second_builder_waits_for_the_first(micro_zoo, tmp_path, monkeypatch):
    """Two processes building one profile (parts of `extract --part` on a fresh machine) would race to rename their
    folders into place: the second waits on the profile's lock, then finds the models built. Here the lock is held by
    an open file of this test (flock locks belong to open files, so the build's own is refused until it closes)."""
    import fcntl
    import threading

    home = tmp_path / "home"
    shutil.copytree(micro_zoo[zoo.TOKENIZER].parent, home / "zoo" / "micro", ignore=shutil.ignore_patterns(".build.lock"))
    monkeypatch.setenv("HARNESS_HOME", str(home))
    said, done = [], threading.Event()
    with (home / "zoo" / "micro" / ".build.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (zoo.build("micro", log=said.append), done.set()))
        worker.start()
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said and "waiting for another process that builds it" in said[0]
        assert not done.wait(1.0)  # still waiting while the lock is held
    worker.join(300)
    assert done.is_set() and not any("will be rebuilt" in m for m in said)  # found every model built
    assert all(state == "ok" for state in zoo.status("micro").values())
