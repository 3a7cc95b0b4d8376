"""Extraction: batched = one at a time, padding columns cut, warper stats exact, stores reused and resumed."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from harness import extract, prompts, store, zoo
from harness.config import ModelSpec
from harness.warpers import Warpers, candidates, warp_stats

pytestmark = pytest.mark.slow
SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return prompts.tokenize(tokenizer, prompts.load(SMALL), max_length=2048, source="ref")


@pytest.fixture(scope="module")
def segments(tokens):
    return prompts.text_segments(tokens, context=48, score="all")


def _loaded(name, dtype="float32"):
    return extract.locate(ModelSpec(name=name, source=f"zoo:{name}", dtype=dtype), "micro")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", [zoo.CHAT_S, zoo.CHAT_M, zoo.GPTQ[4]])
def test_batched_equals_one_at_a_time(micro_zoo, tokens, name, side):
    model = extract.load_model(_loaded(name))
    batch = [tokens.ids[i] for i in range(4)]  # different lengths: the short ones are padded
    together = extract.forward_logits(model, batch, "cpu", side)
    for b, ids in enumerate(batch):
        alone = extract.forward_logits(model, [ids], "cpu", side)[0]
        mine = extract.own_rows(together, b, len(ids), side)
        assert mine.shape == alone.shape == (len(ids), model.config.vocab_size)
        torch.testing.assert_close(mine, alone, rtol=0, atol=1e-4)


def test_padding_columns_are_cut_and_their_mass_kept(micro_zoo, tokens):
    for name, width in ((zoo.CHAT_S, 151936), (zoo.CHAT_M, 152064)):
        model = extract.load_model(_loaded(name))
        raw = extract.forward_logits(model, [tokens.ids[0]], "cpu")[0]
        assert raw.shape[-1] == width
        logp, pad, lse, _ = extract.row_stats(raw, tokens.n_vocab)
        full = torch.softmax(raw.double(), -1)
        assert logp.shape[-1] == 151646
        torch.testing.assert_close(pad.double(), full[:, 151646:].sum(-1), rtol=1e-4, atol=1e-12)
        cut = full[:, :151646] / full[:, :151646].sum(-1, keepdim=True)
        torch.testing.assert_close(logp.double().exp(), cut, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(lse.double(), torch.logsumexp(raw.double(), -1), rtol=1e-6, atol=1e-5)
        assert (pad > 0).all() and (pad < 0.05).all()


def _transformers_warp(raw, ids, first, warpers):
    """The reference: transformers' own processors, one full row at a time, with the row's prefix."""
    from transformers import GenerationConfig
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )  # fmt: skip

    config = GenerationConfig(do_sample=True, **{k: v for k, v in warpers.__dict__.items() if k != "do_sample"})
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(config.repetition_penalty)])
    if config.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        procs.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        procs.append(TopPLogitsWarper(config.top_p))
    finite, mass = [], []
    p = torch.softmax(raw.double(), -1)
    for r in range(raw.shape[0]):
        out = procs(ids[None, : first + r + 1], raw[r : r + 1].clone())
        kept = torch.isfinite(out[0])
        finite.append(int(kept.sum()))
        mass.append(float(p[r][kept].sum()))
    return torch.tensor(finite), torch.tensor(mass, dtype=torch.float64)


@pytest.mark.parametrize(
    "warpers",
    [
        Warpers(do_sample=True, repetition_penalty=1.1, top_k=20, top_p=0.8),  # Qwen1.5-Chat's
        Warpers(do_sample=True, repetition_penalty=1.3, temperature=0.7, top_k=50, top_p=0.95),
        Warpers(do_sample=True, repetition_penalty=0.9, top_k=0, top_p=0.5),  # full-row path
    ],
)
def test_warp_stats_match_transformers(micro_zoo, tokens, warpers):
    model = extract.load_model(_loaded(zoo.CHAT_S))
    ids = torch.tensor(tokens.ids[1])
    raw = extract.forward_logits(model, [tokens.ids[1]], "cpu")[0][:-1]
    first = 5
    rows = raw[first:]
    n = candidates(warpers, ids, first, len(rows), rows.shape[1])
    _, _, lse, top = extract.row_stats(rows, tokens.n_vocab, top=n)  # the kernel's top n, as extraction uses it
    want_finite, want_mass = _transformers_warp(rows, ids, first, warpers)
    for given in (top, None):  # and warp_stats' own torch.topk
        finite, mass = warp_stats(rows, ids, first, lse, warpers, given)
        assert finite.tolist() == want_finite.tolist()
        torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=1e-7)
    assert (finite < 151936).all()


def test_greedy_warps_nothing():
    raw = torch.randn(3, 100)
    finite, mass = warp_stats(raw, torch.arange(4), 0, torch.logsumexp(raw, -1), Warpers(do_sample=False, top_k=20))
    assert finite.tolist() == [100] * 3 and mass.tolist() == [1.0] * 3


def test_store_is_reused_and_resumed(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)  # several shards from a few prompts
    loaded = _loaded(zoo.CHAT_S)
    run = dict(batch_size=3, store_dtype="float16", **QUIET)
    first, facts = extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert facts["shards"] >= 3 and facts["reused_shards"] == 0
    blocks = torch.cat(list(first.blocks(50)))
    assert blocks.shape == (sum(s.rows for s in segments), 151646)
    torch.testing.assert_close(blocks.double().exp().sum(-1), torch.ones(len(blocks), dtype=torch.float64), rtol=0, atol=1e-6)
    # every next token of every prompt is scored once, but each window's first
    assert first.read("target").tolist() == [t for s in segments for t in s.ids[1:]]
    finite = first.read("warp_finite")
    assert (finite >= 1).all() and (finite <= 20).all()  # the chat model's top_k 20

    again, facts = extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert again.root == first.root and facts["reused_shards"] == facts["shards"] and facts["extract_s"] == 0.0

    # An interrupted run: one shard lost, another truncated, a third with one byte flipped (same size:
    # only the checksum tells); only those three are redone.
    first.shard_path(1).unlink()
    path = first.shard_path(2)
    path.write_bytes(path.read_bytes()[:-10])
    path = first.shard_path(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert not first.is_complete(0)
    _, facts = extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert facts["reused_shards"] == facts["shards"] - 3
    torch.testing.assert_close(torch.cat(list(first.blocks(50))), blocks, rtol=0, atol=0)  # same numbers back
    assert json.loads((first.root / "index.json").read_text())["n_vocab"] == 151646


def test_nan_logits_name_the_prompt_and_keep_finished_shards(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)
    real_load = extract.load_model

    def poisoned(loaded):
        model = real_load(loaded)
        original = model.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            if kwargs["input_ids"].shape[0] and forward.calls >= 2:  # the third batch goes bad
                out.logits[0, -2, 7] = float("nan")
            forward.calls += 1
            return out

        forward.calls = 0
        model.forward = forward
        return model

    monkeypatch.setattr(extract, "load_model", poisoned)
    ids = tuple(p.id for p in tokens.prompts)
    with pytest.raises(extract.ExtractError, match=r"NaN or infinite logits on prompt '[\w-]+' at token \d+.*finished shards are kept"):
        extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=2, store_dtype="float16", prompt_ids=ids, **QUIET)
    done = store.Store(next(tmp_store.iterdir()))
    assert done.is_complete(0)


def test_full_disk_is_a_clear_error(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)
    real_write = store.ShardWriter._write

    def write(self, data, offset):
        if self.path.name == "shard-00001.safetensors" and offset > 0:  # the disk fills during shard 1's rows
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, offset)

    monkeypatch.setattr(store.ShardWriter, "_write", write)
    with pytest.raises(extract.ExtractError, match=r"cannot write shard 1 to .*No space left on device.*kept"):
        extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=4, store_dtype="float16", **QUIET)
    done = store.Store(next(tmp_store.iterdir()))
    assert done.is_complete(0) and not done.is_complete(1) and not list(done.root.glob(".*tmp*"))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    spec = ModelSpec(name="gone", source=str(tmp_path / "no-such-model"))
    with pytest.raises(extract.ExtractError, match=r"'gone'.*no-such-model does not exist"):
        extract.locate(spec, "micro")


def test_unknown_zoo_name_is_a_clear_error():
    spec = ModelSpec(name="tiny", source="zoo:tiny-qwen1.5-xl")
    with pytest.raises(extract.ExtractError, match=r"'tiny': source 'zoo:tiny-qwen1.5-xl' is not in the embedded zoo, which has zoo:tiny-qwen1.5-s,"):
        extract.locate(spec, "micro")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = extract.locate(ModelSpec(name="real", source="Qwen/Qwen1.5-0.5B-Chat"), "micro")
    with pytest.raises(extract.ExtractError, match=r"'real': cannot load the config of Qwen/Qwen1.5-0.5B-Chat.*local folder"):
        extract.context_length(loaded)


def test_a_hub_model_is_keyed_by_its_commit(tmp_path, monkeypatch):
    """Offline, a hub id's branch is read from the cache's refs: a new commit on main is another store."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--Qwen--Qwen1.5-0.5B-Chat" / "refs"
    spec = ModelSpec(name="real", source="Qwen/Qwen1.5-0.5B-Chat")
    assert extract.locate(spec, "micro").fingerprint == "hub:Qwen/Qwen1.5-0.5B-Chat@main"  # not cached: the branch
    refs.mkdir(parents=True)
    for commit in ("a" * 40, "b" * 40):
        (refs / "main").write_text(commit + "\n")
        assert extract.locate(spec, "micro").fingerprint == f"hub:Qwen/Qwen1.5-0.5B-Chat@{commit}"
    pinned = spec.model_copy(update={"revision": "c" * 40})
    assert extract.locate(pinned, "micro").fingerprint.endswith("@" + "c" * 40)


def test_tokenizer_key_is_the_tokenizer_files_bytes(tmp_path):
    def folder(name: str, vocab: str) -> extract.Loaded:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").write_text(vocab)
        (tmp_path / name / "model.safetensors").write_text(name)  # weights differ: no matter
        return extract.locate(ModelSpec(name=name, source=str(tmp_path / name)), "micro")

    a, b, c = folder("a", '{"v": 1}'), folder("b", '{"v": 1}'), folder("c", '{"v": 2}')
    assert extract.tokenizer_key(a) == extract.tokenizer_key(b) != extract.tokenizer_key(c)
    (tmp_path / "b" / "chat_template.jinja").write_text("{{ messages }}")  # a template of its own: another tokenizer
    assert extract.tokenizer_key(a) != extract.tokenizer_key(b)
    (tmp_path / "c" / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "c" / "qwen.tiktoken").write_text("a 0")  # a tokenizer file of a format not named anywhere
    assert extract.tokenizer_key(a) != extract.tokenizer_key(c)
    (tmp_path / "a" / "config.json").write_text('{"quantization_config": {}}')  # model metadata: no matter
    assert extract.tokenizer_key(a) == extract.tokenizer_key(folder("d", '{"v": 1}'))
    hub = extract.locate(ModelSpec(name="h", source="Qwen/Qwen1.5-0.5B-Chat", revision="r1"), "micro")
    assert extract.tokenizer_key(hub) != extract.tokenizer_key(extract.locate(ModelSpec(name="h", source="Qwen/Qwen1.5-0.5B-Chat"), "micro"))


def test_interrupt_keeps_the_shard_being_written(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    """Rows go to disk while the next batch runs; Ctrl-C keeps finished shards and no partial file."""
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)
    plan = store.plan_shards([s.rows for s in segments])
    real_forward, calls = extract.forward_logits, []
    assert len(plan) >= 3
    first_batch_of_shard_2 = sum(-(-(hi - lo) // 2) for lo, hi in plan[:2])  # forward passes of shards 0 and 1, batch 2

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) > first_batch_of_shard_2:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(extract, "forward_logits", forward)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=2, store_dtype="float16", **QUIET)
    done = store.Store(next(tmp_store.iterdir()))
    assert done.is_complete(0) and done.is_complete(1) and not done.is_complete(2)
    assert not list(done.root.glob(".*tmp*"))  # no half-written file left behind


def test_a_store_cut_differently_is_redone_not_misread(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    """Shards hold a planned range of segments; if the plan changes, a shard with the same index is redone."""
    run = dict(batch_size=4, store_dtype="float16", **QUIET)
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)
    first, _ = extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, **run)
    want = first.read("target")
    monkeypatch.setattr(store, "SHARD_POSITIONS", 160)
    again, facts = extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, **run)
    assert facts["reused_shards"] < facts["shards"] and len(again.shards()) == facts["shards"]
    assert torch.equal(again.read("target"), want)  # no shard of the old cut is read


def test_each_batch_setting_has_its_own_store(micro_zoo, tokens, segments, tmp_store):
    """A batch's size and padding move the logits' last bits: a store made with others is not reused as this one's."""
    loaded = _loaded(zoo.CHAT_S)
    roots = {
        extract.extract(loaded, segments, tokens.n_vocab, store_dtype="float16", **QUIET, **setting)[0].root
        for setting in (dict(batch_size=3), dict(batch_size=2), dict(batch_size=3, padding_side="left"))
    }
    assert len(roots) == 3
    again, facts = extract.extract(loaded, segments, tokens.n_vocab, batch_size=2, store_dtype="float16", **QUIET)
    assert again.root in roots and facts["reused_shards"] == facts["shards"]


def _placed(name, device):
    return extract.locate(ModelSpec(name=name, source=f"zoo:{name}", device=device), "micro")


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
    spread = extract.load_model(loaded)
    first = extract.input_device(spread)
    assert first == spread.model.embed_tokens.weight.device
    if torch.cuda.is_available():
        assert first.type == "cuda"
    one = extract.load_model(_placed(zoo.CHAT_S, "cuda:0" if torch.cuda.is_available() else "cpu"))
    batch = [tokens.ids[i] for i in range(3)]
    got = extract.forward_logits(spread, batch, first)
    want = extract.forward_logits(one, batch, extract.input_device(one))
    assert maps[0] == "auto" and maps[1] == one.device.type + (":0" if one.device.type == "cuda" else "")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0 if first.type == "cpu" else 1e-4)


def test_a_device_this_machine_lacks_is_a_clear_error():
    if torch.cuda.is_available():
        want = rf"device 'cuda:{torch.cuda.device_count()}' was asked for, but this machine has \d+ CUDA device"
        with pytest.raises(extract.ExtractError, match=want):
            _placed(zoo.CHAT_S, f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(extract.ExtractError, match="device 'cuda:1' was asked for, but this machine has no CUDA"):
            _placed(zoo.CHAT_S, "cuda:1")


def test_one_checkpoint_through_two_kernels(micro_zoo, tokens, segments, tmp_store):
    """loader: gptqmodel loads a GPTQ checkpoint with the kernel `backend` names: the same int4 weights give logits
    close to transformers' path (its TorchAtenLinear) but not equal (another order of rounding), each kept in its
    own store, with the kernel that ran in the facts."""
    spec = dict(name="q", source=f"zoo:{zoo.GPTQ[4]}")
    via_transformers = extract.locate(ModelSpec(**spec), "micro")
    via_gptqmodel = extract.locate(ModelSpec(**spec, loader="gptqmodel", backend="gptq_torch_fused"), "micro")
    a, b = extract.load_model(via_transformers), extract.load_model(via_gptqmodel)
    assert extract.kernels(a) == ["TorchAtenLinear"] and extract.kernels(b) == ["TorchFusedLinear"]
    batch = [tokens.ids[i] for i in range(4)]
    la, lb = extract.forward_logits(a, batch, "cpu"), extract.forward_logits(b, batch, "cpu")
    gap = (la - lb).abs().amax().item()
    assert 0 < gap < 0.1, gap  # observed: 0.02 on logits of spread ~10
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.95
    assert extract.kernels(extract.load_model(_loaded(zoo.CHAT_S))) == []

    run = dict(batch_size=4, store_dtype="float16", **QUIET)
    (sa, fa), (sb, fb) = (extract.extract(x, segments, tokens.n_vocab, **run) for x in (via_transformers, via_gptqmodel))
    assert sa.root != sb.root
    assert fa["kernels"] == ["TorchAtenLinear"] and fb["kernels"] == ["TorchFusedLinear"]
    assert fa["placed_on"] == fb["placed_on"] == ["cpu"]
    _, again = extract.extract(via_gptqmodel, segments, tokens.n_vocab, **run)
    assert again["reused_shards"] == again["shards"] and again["kernels"] == ["TorchFusedLinear"]  # kept in the store


def test_gptqmodel_loader_errors_are_clear(micro_zoo):
    with pytest.raises(extract.ExtractError, match=r"backend 'gptq_troch' is not a gptqmodel kernel \(did you mean 'gptq_torch'\?\)"):
        extract.locate(ModelSpec(name="q", source=f"zoo:{zoo.GPTQ[4]}", loader="gptqmodel", backend="gptq_troch"), "micro")
    floating = extract.locate(ModelSpec(name="f", source=f"zoo:{zoo.CHAT_S}", loader="gptqmodel"), "micro")
    with pytest.raises(extract.ExtractError, match=r"model 'f': loader 'gptqmodel' loads quantized checkpoints, and .*"
                                                   r"tiny-qwen1.5-s-chat/config.json has no quantization_config"):  # fmt: skip
        extract.load_model(floating)
    aten32 = extract.locate(ModelSpec(name="q", source=f"zoo:{zoo.GPTQ[4]}", loader="gptqmodel", backend="gptq_torch"), "micro")
    with pytest.raises(extract.ExtractError, match=r"model 'q': cannot load the weights of .*only supports"):
        extract.load_model(aten32)  # that kernel takes float16 or bfloat16 only: gptqmodel's own message
