"""Extraction: batched = one at a time, padding columns cut, stores reused and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import extract, prompts, store, zoo
from harness.config import ModelSpec

pytestmark = pytest.mark.slow
SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return prompts.tokenize(tokenizer, prompts.load(SMALL), max_length=2048, source="ref")


def _loaded(name, dtype="float32"):
    return extract.locate(ModelSpec(name=name, source=f"zoo:{name}", dtype=dtype), "micro")


@pytest.mark.parametrize("name", [zoo.CHAT_S, zoo.CHAT_M, zoo.GPTQ[4]])
def test_batched_equals_one_at_a_time(micro_zoo, tokens, name):
    loaded = _loaded(name)
    model = extract.load_model(loaded)
    batch = [tokens.ids[i] for i in range(4)]  # different lengths: the short ones are padded
    together = extract.forward_logprobs(model, batch, tokens.n_vocab, "cpu")
    for ids, (logp, pad) in zip(batch, together):
        (alone, alone_pad), = extract.forward_logprobs(model, [ids], tokens.n_vocab, "cpu")
        assert logp.shape == (len(ids) - 1, 151646)
        torch.testing.assert_close(logp, alone, rtol=0, atol=1e-4)
        torch.testing.assert_close(pad, alone_pad, rtol=0, atol=1e-6)


def test_padding_columns_are_cut_and_their_mass_kept(micro_zoo, tokens):
    for name, width in ((zoo.CHAT_S, 151936), (zoo.CHAT_M, 152064)):
        model = extract.load_model(_loaded(name))
        ids = tokens.ids[0]
        with torch.no_grad():
            raw = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        assert raw.shape[-1] == width
        (logp, pad), = extract.forward_logprobs(model, [ids], tokens.n_vocab, "cpu")
        full = torch.softmax(raw, -1)
        torch.testing.assert_close(pad.double(), full[:, 151646:].sum(-1), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(logp.double().exp(), full[:, :151646] / full[:, :151646].sum(-1, keepdim=True), rtol=1e-4, atol=1e-9)
        assert (pad > 0).all() and (pad < 0.05).all()


def test_store_is_reused_and_resumed(micro_zoo, tokens, tmp_store, monkeypatch):
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)  # several shards from a few prompts
    loaded = _loaded(zoo.CHAT_S)
    first, facts = extract.extract(loaded, tokens, batch_size=3, store_dtype="float16", log=lambda _: None)
    assert facts["shards"] >= 3 and facts["reused_shards"] == 0
    blocks = torch.cat(list(first.blocks(50)))
    assert blocks.shape == (sum(len(i) - 1 for i in tokens.ids), 151646)
    torch.testing.assert_close(blocks.exp().sum(-1), torch.ones(len(blocks)), rtol=0, atol=1e-5)  # renormalised on read

    again, facts = extract.extract(loaded, tokens, batch_size=3, store_dtype="float16", log=lambda _: None)
    assert again.root == first.root and facts["reused_shards"] == facts["shards"] and facts["extract_s"] == 0.0

    # An interrupted run: one shard lost, another corrupted; only those two are redone.
    first.shard_path(1).unlink()
    path = first.shard_path(2)
    path.write_bytes(path.read_bytes()[:-10])
    _, facts = extract.extract(loaded, tokens, batch_size=3, store_dtype="float16", log=lambda _: None)
    assert facts["reused_shards"] == facts["shards"] - 2
    torch.testing.assert_close(torch.cat(list(first.blocks(50))), blocks, rtol=0, atol=0)  # same numbers back
    assert json.loads((first.root / "index.json").read_text())["n_vocab"] == 151646


def test_missing_model_folder_is_a_clear_error(tmp_path):
    spec = ModelSpec(name="gone", source=str(tmp_path / "no-such-model"))
    with pytest.raises(extract.ExtractError, match=r"'gone'.*no-such-model does not exist"):
        extract.locate(spec, "micro")
