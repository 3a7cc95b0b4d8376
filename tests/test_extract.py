"""Extraction: batched = one at a time, padding columns cut, warper stats exact, stores reused and resumed."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import extract, loaders, prompts, store, zoo
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


def _own_rows(logits: torch.Tensor, b: int, length: int, padding_side: str) -> torch.Tensor:
    """The [length, V] logits of batch row b of a full forward_logits without its padding."""
    return logits[b, :length] if padding_side == "right" else logits[b, logits.shape[1] - length :]


def _loaded(name, dtype="float32"):
    return loaders.locate(ModelSpec(name=name, source=f"zoo:{name}", dtype=dtype), "micro")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", [zoo.CHAT_S, zoo.CHAT_M, zoo.GPTQ[4]])
def test_batched_equals_one_at_a_time(micro_zoo, tokens, name, side):
    model = loaders.load_model(_loaded(name))
    batch = [tokens.ids[i] for i in range(4)]  # different lengths: the short ones are padded
    together = extract.forward_logits(model, batch, "cpu", side)
    for b, ids in enumerate(batch):
        alone = extract.forward_logits(model, [ids], "cpu", side)[0]
        mine = _own_rows(together, b, len(ids), side)
        assert mine.shape == alone.shape == (len(ids), model.config.vocab_size)
        torch.testing.assert_close(mine, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_output_layer_runs_on_scored_rows_only(micro_zoo, tokens, side):
    """Segments scored from a row past 0 (generate mode's continuations, llama.cpp's second half): the output layer
    sees only the batch's columns that hold scored rows, and each segment's rows equal the full forward's within
    float32 rounding (the matmul's shape moves the last bits). A forward without `logits_to_keep` is sliced instead."""
    model = loaders.load_model(_loaded(zoo.CHAT_S))
    batch = [prompts.Segment(p, 0, tokens.ids[p], first) for p, first in ((0, 5), (1, 3), (2, 9))]
    batch = [s for s in batch if s.rows > 0]
    assert len({len(s.ids) for s in batch}) > 1  # different lengths: padding moves the columns on the left
    ids = [s.ids for s in batch]
    lo, hi = extract.scored_window(batch, side)
    width = max(len(i) for i in ids)
    assert hi - lo < width - 1 and hi == width - 1  # narrower than the full rows; the longest row's last is unscored
    seen, asked = [], []
    hooks = [model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1])),
             model.register_forward_pre_hook(lambda _m, _a, kw: asked.append(kw.get("logits_to_keep")), with_kwargs=True)]  # fmt: skip
    try:
        kept = extract.forward_logits(model, ids, "cpu", side, keep=(lo, hi))
        full = extract.forward_logits(model, ids, "cpu", side)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [width - lo, width] and kept.shape == (len(batch), hi - lo, model.config.vocab_size)
    # an int, which accelerate's hooks do not move to a spread model's first device (a tensor they would)
    assert asked == [width - lo, None] and type(asked[0]) is int
    for b, seg in enumerate(batch):
        want = _own_rows(full, b, len(seg.ids), side)[seg.first : len(seg.ids) - 1]
        got = extract.scored_rows(kept, b, seg, width, lo, side)
        assert got.shape == want.shape == (seg.rows, model.config.vocab_size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep (custom code, older classes)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    assert extract.keeps_logits(model) and not extract.keeps_logits(NoKeep(model))
    assert torch.equal(extract.forward_logits(NoKeep(model), ids, "cpu", side, keep=(lo, hi)), full[:, lo:hi])
    assert extract.scored_window([prompts.Segment(0, 0, (1, 2, 3), 2)], side) is None  # nothing scored: no forward


@pytest.mark.parametrize("side", ["right", "left"])
def test_stored_rows_are_the_models_own_log_softmax(micro_zoo, tokens, tmp_store, side):
    """End to end, against transformers alone: each stored row is the log-softmax over the real ids of the model's
    logits for that segment run on its own (no padding, every position through the output layer), and its target's
    entry is minus torch's cross-entropy over the real ids. Segments scored from row 0, from the middle (generate
    mode, llama.cpp's halves) and not at all, in padded batches of 3; float32 store."""
    from transformers import AutoModelForCausalLM

    segments = [prompts.Segment(p, 0, tokens.ids[p], first) for p, first in ((0, 0), (1, 7), (2, 12), (3, 3), (4, 1))]
    segments.append(prompts.Segment(5, 2, tokens.ids[5][2:6], 3))  # nothing to score: 3 = len - 1
    made, _ = extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=3, store_dtype="float32",
                              padding_side=side, **QUIET)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(zoo.model_dir(zoo.CHAT_S, "micro"), dtype=torch.float32).eval()
    rows = torch.cat([load_file(str(f))["logprobs"] for f in sorted(made.root.glob("shard-*.safetensors"))])
    targets, positions = made.read("target"), made.read("position")
    row = 0
    for seg in segments:
        ids = torch.tensor([seg.ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :, : tokens.n_vocab].double()
        want = torch.log_softmax(logits, -1)[seg.first : len(seg.ids) - 1]
        got = rows[row : row + seg.rows].double()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
        target = ids[0, seg.first + 1 :]
        assert torch.equal(targets[row : row + seg.rows], target)
        assert torch.equal(positions[row : row + seg.rows], torch.arange(seg.first + 1, len(seg.ids)) + seg.offset)
        ce = torch.nn.functional.cross_entropy(logits[seg.first : -1], target, reduction="none")
        torch.testing.assert_close(got.gather(1, target[:, None])[:, 0], -ce, rtol=0, atol=2e-4)
        row += seg.rows
    assert row == len(rows)


def test_padding_columns_are_cut_and_their_mass_kept(micro_zoo, tokens):
    for name, width in ((zoo.CHAT_S, 151936), (zoo.CHAT_M, 152064)):
        model = loaders.load_model(_loaded(name))
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
    model = loaders.load_model(_loaded(zoo.CHAT_S))
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


def test_warp_stats_when_the_penalty_pushes_every_seen_token_out_of_the_top():
    """The seen tokens hold the raw top and the penalty sends them all below the rest: the candidates (top-k + seen of
    the raw row) must still reach the k that follow them. Against transformers' processors, on the full row too."""
    raw = torch.tensor([[5.0, 4.9, 4.8, 4.0, 3.9, 3.8, 1.0, 0.5, 0.2, -1.0]])
    ids, first = torch.tensor([0, 1, 2, 7]), 2  # row 0 predicts ids[3]: tokens 0, 1, 2 seen
    for w in (Warpers(do_sample=True, repetition_penalty=2.0, top_k=2), Warpers(do_sample=True, repetition_penalty=2.0, top_k=2, top_p=0.6)):
        assert candidates(w, ids, first, 1, raw.shape[1]) == 2 + 3
        want_finite, want_mass = _transformers_warp(raw, ids, first, w)
        finite, mass = warp_stats(raw, ids, first, torch.logsumexp(raw, -1), w)
        assert finite.tolist() == want_finite.tolist()
        torch.testing.assert_close(mass.double(), want_mass, rtol=1e-6, atol=0.0)


def test_warpers_from_a_generation_config():
    from transformers import GenerationConfig

    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    assert Warpers.from_generation_config(qwen) == Warpers(True, 1.1, 0.7, 20, 0.8)
    assert not Warpers.from_generation_config(GenerationConfig()).filters  # greedy: nothing goes to -inf
    # a sampling config that leaves top_k unset: generate() fills in transformers' default, 50, and cuts to it
    nucleus = GenerationConfig(do_sample=True, top_p=0.9)
    assert Warpers.from_generation_config(nucleus) == Warpers(True, 1.0, 1.0, 50, 0.9)
    assert Warpers.from_generation_config(GenerationConfig(do_sample=True, top_k=0)).top_k == 0  # off, as set


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
    assert first.read("position").tolist() == [s.offset + t for s in segments for t in range(1, len(s.ids))]
    finite = first.read("warp_finite")
    assert (finite >= 1).all() and (finite <= 20).all()  # the chat model's top_k 20

    again, facts = extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert again.root == first.root and facts["reused_shards"] == facts["shards"] and facts["extract_s"] == facts["forward_s"] == 0.0
    assert facts["first_extract_s"] > 0 and facts["first_part"] is None  # the filling run's time, beside this run's

    # A writer killed by SIGKILL leaves its temporary files (no abort() ran); a damaged index.json only loses the first
    # run's timings. A run over the complete store removes the one and does not trip on the other. A writer still at
    # work (a live process here; on another machine sharing the folder, a recent file) keeps its file.
    host = socket.gethostname()
    left = [first.root / f".shard-00001.safetensors.tmp-999999999@{host}", first.root / f".shard-00001.json.tmp-999999999@{host}"]
    working = [first.root / f".shard-00002.safetensors.tmp-{os.getpid()}@{host}", first.root / ".shard-00003.safetensors.tmp-7@elsewhere"]
    for path in left + working:
        path.write_bytes(b"x" * 100)
    (first.root / "index.json").write_text('{"broken')
    _, facts = extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert facts["reused_shards"] == facts["shards"] and not any(path.exists() for path in left)
    assert all(path.exists() for path in working)
    old = time.time() - 2 * store.BUSY_S
    os.utime(working[1], (old, old))  # nothing written for long on the other machine: a dead writer's
    extract.extract(loaded, segments, tokens.n_vocab, **run)
    assert working[0].exists() and not working[1].exists()
    working[0].unlink()

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

    # Another store dtype is another store: float16 rows are never handed to a float32 run.
    wide, facts = extract.extract(loaded, segments, tokens.n_vocab, **(run | {"store_dtype": "float32"}))
    assert wide.root != first.root and facts["reused_shards"] == 0
    assert next(wide.blocks(8, native=True)).dtype == torch.float32 and next(first.blocks(8, native=True)).dtype == torch.float16


def test_nan_logits_name_the_prompt_and_keep_finished_shards(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    monkeypatch.setattr(store, "SHARD_POSITIONS", 64)
    real_load = loaders.load_model

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

    monkeypatch.setattr(loaders, "load_model", poisoned)
    ids = tuple(p.id for p in tokens.prompts)
    with pytest.raises(loaders.ExtractError, match=r"NaN or infinite logits on prompt '[\w-]+' at token \d+; in float32 too, so its weights .*finished shards are kept"):
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
    with pytest.raises(loaders.ExtractError, match=r"cannot write shard 1 to .*No space left on device \(the disk is full: .*kept"):
        extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=4, store_dtype="float16", **QUIET)
    done = store.Store(next(tmp_store.iterdir()))
    assert done.is_complete(0) and not done.is_complete(1) and not list(done.root.glob(".*tmp*"))


def test_a_full_disk_at_the_index_and_a_store_left_without_one(micro_zoo, tokens, segments, tmp_store, monkeypatch):
    """Every shard written, then no room for index.json (or a stop just before it): a clear error, no empty temporary
    left, and the shards kept. The next run reuses them and writes the missing index.json (a store without one
    showed as '?' in `store list` for good: the reuse path never wrote it)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):  # the temporary is written; no room to finish it
        if Path(dst).name == "index.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(loaders.ExtractError, match=r"cannot write .*index\.json: No space left on device \(the disk is full: .*"
                                                  r"shards are complete and kept: the next run reuses them and writes it"):
        extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=4, store_dtype="float16", **QUIET)
    monkeypatch.setattr(os, "replace", real)
    (root,) = tmp_store.iterdir()
    done = store.Store(root)
    assert not (root / "index.json").exists() and not list(root.glob(".index.json.tmp*"))
    assert done.shards() and all(done.is_complete(i) for i in range(len(done.shards())))
    got, facts = extract.extract(_loaded(zoo.CHAT_S), segments, tokens.n_vocab, batch_size=4, store_dtype="float16", **QUIET)
    index = json.loads((root / "index.json").read_text())
    assert facts["reused_shards"] == facts["shards"] and index["model"]["name"] == zoo.CHAT_S and index["n_vocab"] == tokens.n_vocab
    assert index["facts"]["shards"] == facts["shards"] and got.index()["key"] == root.name


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


def test_one_checkpoint_through_two_kernels(micro_zoo, tokens, segments, tmp_store):
    """loader: gptqmodel loads a GPTQ checkpoint with the kernel `backend` names: the same int4 weights give logits
    close to transformers' path (its TorchAtenLinear) but not equal (another order of rounding), each kept in its
    own store, with the kernel that ran in the facts."""
    spec = dict(name="q", source=f"zoo:{zoo.GPTQ[4]}")
    via_transformers = loaders.locate(ModelSpec(**spec), "micro")
    via_gptqmodel = loaders.locate(ModelSpec(**spec, loader="gptqmodel", backend="gptq_torch_fused"), "micro")
    a, b = loaders.load_model(via_transformers), loaders.load_model(via_gptqmodel)
    assert loaders.kernels(a) == ["TorchAtenLinear"] and loaders.kernels(b) == ["TorchFusedLinear"]
    batch = [tokens.ids[i] for i in range(4)]
    la, lb = extract.forward_logits(a, batch, "cpu"), extract.forward_logits(b, batch, "cpu")
    gap = (la - lb).abs().amax().item()
    assert 0 < gap < 0.1, gap  # observed: 0.02 on logits of spread ~10
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.95
    assert loaders.kernels(loaders.load_model(_loaded(zoo.CHAT_S))) == []

    run = dict(batch_size=4, store_dtype="float16", **QUIET)
    (sa, fa), (sb, fb) = (extract.extract(x, segments, tokens.n_vocab, **run) for x in (via_transformers, via_gptqmodel))
    assert sa.root != sb.root
    assert fa["kernels"] == ["TorchAtenLinear"] and fb["kernels"] == ["TorchFusedLinear"]
    assert fa["placed_on"] == fb["placed_on"] == ["cpu"]
    _, again = extract.extract(via_gptqmodel, segments, tokens.n_vocab, **run)
    assert again["reused_shards"] == again["shards"] and again["kernels"] == ["TorchFusedLinear"]  # kept in the store


def test_batches_of_one_share_a_store_whatever_the_padding_side(micro_zoo, tokens, segments, tmp_store):
    """Nothing is padded in a batch of one, so the padding side cannot change a row: no second extraction."""
    loaded, few = _loaded(zoo.CHAT_S), segments[:3]
    right, _ = extract.extract(loaded, few, tokens.n_vocab, batch_size=1, store_dtype="float16", padding_side="right", **QUIET)
    left, facts = extract.extract(loaded, few, tokens.n_vocab, batch_size=1, store_dtype="float16", padding_side="left", **QUIET)
    assert left.root == right.root and facts["reused_shards"] == facts["shards"]
    batched, _ = extract.extract(loaded, few, tokens.n_vocab, batch_size=2, store_dtype="float16", padding_side="left", **QUIET)
    assert batched.root != right.root  # a padded batch moves the logits' last bits: its own store


def test_extract_bench_prints_its_table_and_json(micro_zoo, capsys):
    """`python -m harness.extract_bench` runs (in a subprocess, as users run it) and reports the positions it was
    asked for: llama.cpp's windows score rows context/2 .. context-2, so 3 windows of 32 tokens give 45 rows."""
    from harness import extract_bench

    assert extract_bench.main(["--profile", "micro", "--positions", "45", "--context", "32", "--score", "llama_cpp", "--no-10x"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "scoring llama_cpp" in out[0] and "all-pos s" in out[1]
    (r,) = json.loads(out[-1])["results"]
    assert (r["positions"], r["context"], r["score"], r["batch_size"]) == (45, 32, "llama_cpp", 8)
    assert r["forward_s"] > 0 and r["forward_all_positions_s"] > 0 and r["extract_s"] > r["load_s"]
