"""Cross-vocabulary alignment (harness/align.py, `cross_vocab: true`): byte keys of both vocabulary schemes, aligned
positions against a brute-force search, the shared-vocabulary projection against dicts in float64, and whole runs
against models whose vocabulary is the reference's permuted (every number must be the reference's) or cut short."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import axe_violations, open_page
from safetensors.torch import load_file, save_file
from scipy.special import rel_entr

from harness import align, config, llama_report, metrics, prompts, records, row_stats
from harness.cli import main
from harness.store import Store

SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"
TEXTS = [
    "The assert statement is a convenient way to insert debugging assertions into a program.",
    "Unicode: naïve café, 中文字符 and an emoji 🙂 split into bytes; tabs\tand\nnewlines.",
    "<|im_start|>user\nwhat is a generator?<|im_end|>\n<|im_start|>assistant\n",
]


def permuted_model(src: Path, dst: Path, seed: int = 0) -> np.ndarray:
    """`src` with its BPE ids shuffled: the tokenizer's vocabulary and the embedding rows (tied with the output
    layer) permuted alike, so it computes exactly the reference's distributions under other ids. Returns old -> new."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    perm = np.random.default_rng(seed).permutation(len(vocab))
    spec["model"]["vocab"] = {t: int(perm[i]) for t, i in vocab.items()}
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    weights = load_file(dst / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in weights:
            rows = weights[key].clone()
            rows[torch.from_numpy(perm)] = weights[key][: len(vocab)]
            weights[key] = rows
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "zoo.json").unlink(missing_ok=True)
    return perm


def truncated_model(src: Path, dst: Path, keep: int) -> None:
    """`src` with only its first `keep` BPE tokens (the merges that make them) and the three special tokens, renumbered
    after them; the embedding keeps those rows. Its splits are finer than the reference's."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < keep}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m if isinstance(m, list) else m.split(" ", 1)) in vocab]
    special = [t["id"] for t in spec["added_tokens"]]
    for k, t in enumerate(spec["added_tokens"]):
        t["id"] = keep + k
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    weights = load_file(dst / "model.safetensors")
    rows = torch.tensor(list(range(keep)) + special)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in weights:
            weights[key] = weights[key][rows].contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | {"vocab_size": keep + len(special), "bos_token_id": keep, "eos_token_id": keep}))
    gen = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps(gen | {"bos_token_id": keep, "eos_token_id": keep}))
    (dst / "zoo.json").unlink(missing_ok=True)


def metaspace_tokenizer():
    """A SentencePiece-style (Llama 2) fast tokenizer: "▁" for spaces, a dummy prefix, byte fallback <0xNN>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "t", "h", "e", "a", "c", "s", "th", "the", "▁the", "at", "▁c", "▁cat", "▁s", "▁sat", "▁ "]
    merges = [("t", "h"), ("th", "e"), ("▁", "the"), ("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "s"), ("▁s", "at"), ("▁", "▁")]
    merges = [m for m in merges if "".join(m) in pieces]
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def cut_tokenizer(micro_zoo, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("cut-tok") / "tok"
    shutil.copytree(micro_zoo["qwen-tokenizer"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < 3000}
    spec["model"] |= {"vocab": vocab, "merges": [m for m in spec["model"]["merges"] if "".join(m if isinstance(m, list) else m.split(" ", 1)) in vocab]}
    for k, t in enumerate(spec["added_tokens"]):
        t["id"] = 3000 + k
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(folder)


def test_byte_level_keys(tokenizer):
    keys = align.vocab_keys(tokenizer)
    assert len(keys) == len(tokenizer) == 151646
    assert keys[9707] == ("bytes", b"Hello") and keys[1879] == ("bytes", b" world")
    assert keys[151644] == ("special", b"<|im_start|>")
    # every ordinary token spells the bytes that decoding it alone gives, where those are whole characters
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 151643, 500).tolist():
        text = tokenizer.decode([i])
        if "\ufffd" not in text:
            assert keys[i] == ("bytes", text.encode()), i


def test_metaspace_keys_and_its_dummy_prefix(tokenizer):
    spm = metaspace_tokenizer()
    assert align.scheme(spm) == "metaspace" and align.scheme(tokenizer) == "byte_level"
    keys = align.vocab_keys(spm)
    vocab = spm.get_vocab()
    assert keys[vocab["▁the"]] == ("bytes", b" the") and keys[vocab["<0x0A>"]] == ("bytes", b"\n")
    assert keys[vocab["</s>"]] == ("special", b"</s>")
    text = "the cat sat\nthe hat"
    ids_a = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    ids_b = tuple(spm(text, add_special_tokens=False).input_ids)
    assert align.starts(keys, ids_b)[1] == b" " + text.encode()  # the dummy prefix
    ta, tb = align.aligned_positions(align.vocab_keys(tokenizer), ids_a, keys, ids_b)
    # "the| cat| sat|\n|the| hat" in Qwen; "▁the|▁cat|▁sat|<0x0A>|the|▁|h|at" here: the first four splits line up
    a_bytes = prompts.token_bytes(tokenizer, list(ids_a))
    got = [(b"".join(a_bytes[:t]), spm.convert_ids_to_tokens(ids_b[u])) for t, u in zip(ta, tb)]
    assert got[:4] == [(b"the", "▁cat"), (b"the cat", "▁sat"), (b"the cat sat", "<0x0A>"), (b"the cat sat\n", "the")]


def test_aligned_positions_by_hand_either_side_a_sentencepiece_reading():
    """Small vocabularies, pairs by hand: a SentencePiece reading (its dummy prefix's space) as the reference or as the
    candidate gives the same pairs; a reference of one byte a token lines up with the candidate's word starts from
    byte 1 on; the byte a mismatch is reported at, either way round and past a dummy prefix."""
    sp, qw = [("bytes", b" the"), ("bytes", b" cat")], [("bytes", b"the"), ("bytes", b" cat")]
    for got in (align.aligned_positions(sp, (0, 1), qw, (0, 1)), align.aligned_positions(qw, (0, 1), sp, (0, 1))):
        assert [x.tolist() for x in got] == [[1], [1]]
    text = b"I am here"
    bytewise = [("bytes", bytes([c])) for c in text]
    words = [("bytes", b"I"), ("bytes", b" am"), ("bytes", b" here")]
    got = align.aligned_positions(bytewise, tuple(range(len(text))), words, (0, 1, 2))
    assert [x.tolist() for x in got] == [[1, 4], [1, 2]]  # "I|am" at byte 1, "am| here" at byte 4
    short, long = [("bytes", b"one two")], [("bytes", b"one two three")]
    for a, b in ((short, long), (long, short)):
        with pytest.raises(align.AlignError, match="from byte 7 on"):
            align.aligned_positions(a, (0,), b, (0,))
    with pytest.raises(align.AlignError, match="from byte 6 on"):  # " one two" read past its dummy prefix
        align.aligned_positions([("bytes", b" one two")], (0,), [("bytes", b"one twx")], (0,))


def test_projection_onto_shared_tokens_by_hand():
    """A reference id that repeats a shared token's bytes (after the shared ones: its order is the identity, shorter
    than the row) adds its mass to that column, and none is left outside: [0.5, 0.3, 0.2] over a, b, a gives 0.7 and
    0.3. A candidate whose ids are the shared tokens in another order is gathered into the reference's order."""
    a, b, c = ("bytes", b"a"), ("bytes", b"b"), ("bytes", b"c")
    vm = align.VocabMap.build([a, b, a], [a, b])
    got, outside = vm.project(torch.tensor([[0.5, 0.3, 0.2]]).log(), "ref")
    torch.testing.assert_close(got.exp(), torch.tensor([[0.7, 0.3]]), rtol=1e-6, atol=0)
    assert outside.tolist() == [0.0]
    vm = align.VocabMap.build([a, b, c], [c, a, b])
    rows = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    got, outside = vm.project(rows, "cand")
    assert torch.equal(got, rows[:, [1, 2, 0]]) and outside.tolist() == [0.0]


@pytest.mark.parametrize("text", TEXTS)
def test_aligned_positions_are_exactly_the_equal_prefixes(tokenizer, cut_tokenizer, text):
    """Brute force: (t, u) is aligned iff the bytes of the first t reference tokens equal those of the first u candidate
    tokens (prompts.token_bytes, another implementation of the byte table), for t, u >= 1."""
    ids_a = list(tokenizer(text, add_special_tokens=False).input_ids)
    ids_b = list(cut_tokenizer(text, add_special_tokens=False).input_ids)
    assert ids_a != ids_b
    pa = np.cumsum([len(b) for b in prompts.token_bytes(tokenizer, ids_a)])
    pb = np.cumsum([len(b) for b in prompts.token_bytes(cut_tokenizer, ids_b)])
    sa, sb = b"".join(prompts.token_bytes(tokenizer, ids_a)), b"".join(prompts.token_bytes(cut_tokenizer, ids_b))
    assert sa == sb
    want = {(t, u) for t in range(1, len(ids_a)) for u in range(1, len(ids_b)) if pa[t - 1] == pb[u - 1]}
    ka, kb = align.vocab_keys(tokenizer), align.vocab_keys(cut_tokenizer)
    ta, tb = align.aligned_positions(ka, tuple(ids_a), kb, tuple(ids_b))
    assert set(zip(ta.tolist(), tb.tolist())) == want
    tb, ta = align.aligned_positions(kb, tuple(ids_b), ka, tuple(ids_a))  # the other way round: the same pairs
    assert set(zip(ta.tolist(), tb.tolist())) == want
    # the cut vocabulary splits finer: every reference split is one of its own, not the other way round
    assert len(want) == len(ids_a) - 1 and len(want) < len(ids_b) - 1


def test_a_continuation_is_read_token_by_token(tokenizer, cut_tokenizer):
    """align.continued: shared tokens keep the reference's split (even one its tokenizer would not make), a token the
    vocabulary lacks is split by its tokenizer, part of a character by the longest tokens that spell its bytes."""
    keys_a, keys_b = align.vocab_keys(tokenizer), align.vocab_keys(cut_tokenizer)
    words = [" the", "  ", "  ", " generator", "\u4e2d"]
    cont = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    assert [len(c) for c in cont] == [1, 1, 1, 1, 1] and tokenizer("    ", add_special_tokens=False).input_ids != cont[1] * 2
    emoji = tokenizer("\U0001f99c", add_special_tokens=False).input_ids[:1]  # the first 3 bytes of a 4-byte character
    flat = [i for c in cont for i in c] + emoji
    ids, first = align.continued("Say:", [keys_a[i] for i in flat], cut_tokenizer, keys_b, align.reading_index(cut_tokenizer, keys_b))
    assert ids[:first] == tuple(cut_tokenizer("Say:", add_special_tokens=False).input_ids)
    spelled = [keys_b[i][1] for i in ids[first:]]
    assert b"".join(spelled) == b"".join(keys_a[i][1] for i in flat)
    assert spelled[:3] == [b" the", b"  ", b"  "]  # the reference's split of the spaces, kept
    assert len(keys_a[flat[3]][1]) > 1 and keys_a[flat[3]] not in set(keys_b)  # " generator": split by its tokenizer
    partial = keys_a[emoji[0]][1]  # part of a character, not in the cut vocabulary: the longest tokens that spell it
    longest = align._longest_tokens(partial, align.reading_index(cut_tokenizer, keys_b))
    assert len(partial) == 3 and keys_a[emoji[0]] not in set(keys_b)
    assert ids[-len(longest) :] == tuple(longest) and b"".join(spelled[-len(longest) :]) == partial
    # the reference's own vocabulary reads it back id for id
    same, first = align.continued("Say:", [keys_a[i] for i in flat], tokenizer, keys_a, align.reading_index(tokenizer, keys_a))
    assert same[first:] == tuple(flat)


def test_a_sentencepiece_vocabulary_reads_a_continuation_with_its_own_pieces():
    """A continuation read by a SentencePiece vocabulary: a token it holds as its piece, never as the byte-fallback
    <0xNN> piece of the same byte ("a", not <0x61>); a token it lacks as the longest pieces that spell it (its
    tokenizer's own split puts "▁" before the text, so it never spells a piece inside a word); a byte no piece
    spells as <0xNN>."""
    tok = metaspace_tokenizer()
    keys = align.vocab_keys(tok)
    cont = [("bytes", b" s"), ("bytes", b"at"), ("bytes", b"a"), ("bytes", b"cat"), ("bytes", b"thez"), ("bytes", "é".encode())]
    ids, first = align.continued("the cat", cont, tok, keys, align.reading_index(tok, keys))
    assert ids[:first] == tuple(tok("the cat", add_special_tokens=False).input_ids)
    assert tok.convert_ids_to_tokens(list(ids[first:])) == ["▁s", "at", "a", "c", "at", "the", "<0x7A>", "<0xC3>", "<0xA9>"]
    assert tok.convert_ids_to_tokens(tok("cat", add_special_tokens=False).input_ids) == ["▁cat"]


def test_different_normalisers_are_a_clear_error_with_a_way_out(tokenizer):
    """A decomposed "é" (e + U+0301): Qwen's tokenizer composes it (NFC), a SentencePiece one without a normaliser does
    not. The error names the byte where they part (past the dummy prefix) and NFC; NFC text aligns."""
    import unicodedata

    sp = metaspace_tokenizer()
    ka, kb = align.vocab_keys(tokenizer), align.vocab_keys(sp)
    text = "the cafe\u0301 sat"
    read = [tuple(t(text, add_special_tokens=False).input_ids) for t in (tokenizer, sp)]
    with pytest.raises(align.AlignError, match=r"different text from byte 7 on .* unicodedata.normalize\('NFC', text\)"):
        align.aligned_positions(ka, read[0], kb, read[1], prompt="p")
    text = unicodedata.normalize("NFC", text)
    read = [tuple(t(text, add_special_tokens=False).input_ids) for t in (tokenizer, sp)]
    assert len(align.aligned_positions(ka, read[0], kb, read[1])[0]) >= 2


def test_different_text_is_a_clear_error(tokenizer):
    keys = align.vocab_keys(tokenizer)
    a = tuple(tokenizer("one two three", add_special_tokens=False).input_ids)
    b = tuple(tokenizer("one too three", add_special_tokens=False).input_ids)
    with pytest.raises(align.AlignError, match=r"prompt 'p7': 'ref' and 'x' tokenize it to different text from byte 5"):
        align.aligned_positions(keys, a, keys, b, prompt="p7", names=("ref", "x"))


@pytest.mark.parametrize("fused", [True, False], ids=["row-kernel", "torch"])
def test_projection_against_dicts_in_float64(monkeypatch, fused):
    """Random vocabularies over a small byte alphabet, with repeats (one token's bytes under two ids) and specials;
    project() and the metrics on its rows against grouping by hand, renormalising over the shared tokens in float64;
    with the fused row kernel and without it."""
    if not fused:
        monkeypatch.setattr(row_stats, "available", lambda: "off for this test")
    elif row_stats.available() is not None:
        pytest.skip(f"row_stats kernel: {row_stats.available()}")
    rng = np.random.default_rng(1)
    words = [bytes([97 + i]) for i in range(12)] + [b"ab", b"cd", b"x y", b" "]

    def vocab(n):
        keys = [("bytes", words[i]) for i in rng.integers(0, len(words), n)]
        return keys + [("special", b"<|end|>")]

    ka, kb = vocab(30), vocab(25)
    vm = align.VocabMap.build(ka, kb)
    rows_a = torch.log_softmax(torch.randn(7, len(ka), dtype=torch.float64) * 3, -1)
    rows_b = torch.log_softmax(torch.randn(7, len(kb), dtype=torch.float64) * 3, -1)
    rows_a[0, 3] = -torch.inf  # a filtered entry
    pa, out_a = vm.project(rows_a.float(), "ref")
    pb, out_b = vm.project(rows_b.float(), "cand")
    half = rows_a.half()  # stores hold 16-bit rows: read as they are, the same as widened first
    assert all(torch.equal(x, y) for x, y in zip(vm.project(half, "ref"), vm.project(half.float(), "ref"), strict=True))
    shared = sorted(set(ka) & set(kb), key=ka.index)
    assert vm.shared == len(shared) and pa.shape == (7, len(shared))
    for r in range(7):
        da, db = {}, {}
        for keys, row, d in ((ka, rows_a[r], da), (kb, rows_b[r], db)):
            for key, lp in zip(keys, row.tolist()):
                d[key] = d.get(key, 0.0) + np.exp(lp)
        p = np.array([da[k] for k in shared])
        q = np.array([db[k] for k in shared])
        np.testing.assert_allclose(pa[r].double().exp().numpy(), p, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(pb[r].double().exp().numpy(), q, rtol=1e-6, atol=1e-12)
        total_a, total_b = sum(da.values()), sum(db.values())  # row 0 lost its filtered entry's mass
        outside_a = sum(v for k, v in da.items() if k not in db) / total_a
        outside_b = sum(v for k, v in db.items() if k not in da) / total_b
        assert outside_a > 0 and outside_b > 0
        assert out_a[r].item() == pytest.approx(outside_a, rel=1e-5)
        assert out_b[r].item() == pytest.approx(outside_b, rel=1e-5)
        target = torch.tensor([0])
        m = metrics.position_metrics(pa[r : r + 1], pb[r : r + 1], target, ks=(2,))
        pn, qn = p / p.sum(), q / q.sum()
        assert m["kl"].item() == pytest.approx(rel_entr(pn, qn).sum(), rel=1e-5)
        assert m["tv"].item() == pytest.approx(0.5 * np.abs(pn - qn).sum(), rel=1e-5)
        assert bool(m["top1_agree"].item()) == (np.argmax(pn) == np.argmax(qn))
    # a reference id whose bytes the candidate lacks has no column
    missing = [i for i, k in enumerate(ka) if k not in set(kb)]
    assert all(vm.ref_column[i] == vm.shared for i in missing)


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def cross_run(micro_zoo, tmp_path_factory):
    """`harness compare` of the micro base model against itself with its vocabulary permuted and cut to 20000 BPE
    tokens, cross_vocab on: (run folder, stdout, models folder)."""
    tmp = tmp_path_factory.mktemp("cross-vocab")
    permuted_model(micro_zoo["tiny-qwen1.5-s"], tmp / "perm")
    truncated_model(micro_zoo["tiny-qwen1.5-s"], tmp / "cut", 20000)
    cfg = tmp / "cross.yaml"
    cfg.write_text(json.dumps({
        "name": "cross", "zoo_profile": "micro", "reference": {"name": "s", "source": "zoo:tiny-qwen1.5-s"},
        "variants": [{"name": "s-perm", "source": str(tmp / "perm")}, {"name": "s-cut", "source": str(tmp / "cut")},
                     {"name": "s-chat", "source": "zoo:tiny-qwen1.5-s-chat"}],
        "prompts": str(SMALL), "cross_vocab": True, "store_dtype": "float32", "reports_dir": str(tmp / "reports"),
        "metrics": {"bootstrap_resamples": 50},
    }))  # fmt: skip
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        assert main(["compare", "--config", str(cfg)]) == 0
    return (tmp / "reports" / "latest").resolve(), out.getvalue(), tmp


@pytest.mark.slow
def test_a_permuted_vocabulary_is_the_reference(cross_run):
    run_dir, stdout, _ = cross_run
    record = records.read(run_dir / "run.json")
    pair = next(p for p in record.pairs if p.candidate == "s-perm")
    a = pair.aggregates
    assert a["aligned_of"] == a["aligned"] == a["positions"] == record.pairs[-1].aggregates["positions"]
    assert a["shared_tokens"] == 151646 and a["outside_mass_ref"] == a["outside_mass_cand"] == 0
    # the same numbers under other ids: the only drift is float32 summation order (logits equal bit for bit)
    assert a["kl_max"] < 1e-8 and a["top1_agree"] == 1.0 and a["ppl_ratio"] == pytest.approx(1, abs=1e-6)
    assert "s-perm: another tokenizer (cross_vocab)" in stdout
    grid = {(r["a"], r["b"]): r for r in record.matrix}
    chat_perm, chat_ref = grid[("s-perm", "s-chat")], next(p for p in record.pairs if p.candidate == "s-chat").aggregates
    assert chat_perm["sym_kl_mean"] == pytest.approx(chat_ref["kl_mean"] + chat_ref["kl_rev_mean"], rel=1e-5)


@pytest.mark.slow
def test_a_cut_vocabulary_against_float64_by_hand(cross_run, micro_zoo):
    """Every per-position KL of the cut model, from its store and the reference's: rows grouped by bytes with dicts,
    conditioned on the shared tokens in float64, at the positions a brute-force prefix search aligns."""
    from transformers import AutoTokenizer

    run_dir, _, tmp = cross_run
    record = records.read(run_dir / "run.json")
    pair = next(p for p in record.pairs if p.candidate == "s-cut")
    a = pair.aggregates
    assert a["shared_tokens"] == 20003 and a["outside_mass_cand"] == 0 and 0.01 < a["outside_mass_ref"] < 0.5
    assert a["aligned"] == a["aligned_of"]  # the cut vocabulary splits finer: every reference split is one of its own
    assert 0.5 * a["aligned"] < a["positions"] < a["aligned"]  # some next tokens are not in the first 20000
    m = records.load_positions(run_dir, pair)
    ra, rc = Store(Path(record.variants["s"]["store"])), Store(Path(record.variants["s-cut"]["store"]))
    assert len(ra.shards()) == len(rc.shards()) == 1
    tok_a, tok_c = AutoTokenizer.from_pretrained(micro_zoo["tiny-qwen1.5-s"]), AutoTokenizer.from_pretrained(tmp / "cut")
    bytes_a = prompts.token_bytes(tok_a, list(range(len(tok_a))))
    bytes_c = prompts.token_bytes(tok_c, list(range(len(tok_c))))
    shared = sorted(set(bytes_a) & set(bytes_c))
    ia = torch.tensor([bytes_a.index(b) for b in shared])
    ic = torch.tensor([bytes_c.index(b) for b in shared])
    rows_a, rows_c = ra.read("prompt").numpy(), rc.read("prompt").numpy()
    pos_a, pos_c = ra.read("position").numpy(), rc.read("position").numpy()
    texts = [json.loads(line) for line in SMALL.read_text().splitlines() if line.strip()]
    all_a, all_c = next(ra.blocks(10**6, renormalise=False)), next(rc.blocks(10**6, renormalise=False))  # one shard each
    checked = 0
    for i in np.random.default_rng(0).choice(len(m["kl"]), 40, replace=False):
        p, t = int(m["prompt"][i]), int(m["position"][i])
        ids_a = tok_a(texts[p]["text"], add_special_tokens=False).input_ids if "text" in texts[p] else None
        if ids_a is None:
            continue
        ids_c = tok_c(texts[p]["text"], add_special_tokens=False).input_ids
        prefix = len(b"".join(prompts.token_bytes(tok_a, ids_a[:t])))
        lengths = np.cumsum([len(b) for b in prompts.token_bytes(tok_c, ids_c)])
        u = int(np.searchsorted(lengths, prefix)) + 1  # the cut model's position that has read the same bytes
        assert lengths[u - 1] == prefix
        row_a = int(np.flatnonzero((rows_a == p) & (pos_a == t))[0])
        row_c = int(np.flatnonzero((rows_c == p) & (pos_c == u))[0])
        la, lc = all_a[row_a].double(), all_c[row_c].double()
        pa, pc = la[ia].exp().numpy(), lc[ic].exp().numpy()
        pa, pc = pa / pa.sum(), pc / pc.sum()
        assert m["kl"][i] == pytest.approx(rel_entr(pa, pc).sum(), rel=1e-6, abs=1e-12)
        assert m["top1_agree"][i] == (np.argmax(pa) == np.argmax(pc))
        checked += 1
    assert checked >= 20


@pytest.mark.slow
def test_bits_per_byte_by_hand(cross_run, micro_zoo):
    """Each model's NLL over the text from the first byte where both have split, to the end, in bits per byte: from
    both stores' rows in float64 (logsumexp − the row's own next token), at the byte offsets a brute-force prefix
    search gives; and the difference's se against a bootstrap over spans."""
    from scipy.stats import bootstrap
    from transformers import AutoTokenizer

    from harness import compare, pipeline

    run_dir, _, tmp = cross_run
    record = records.read(run_dir / "run.json")
    pairs = {p.candidate: p.aggregates for p in record.pairs}
    perm, cut = pairs["s-perm"], pairs["s-cut"]
    assert perm["bpb_cand"] == pytest.approx(perm["bpb_ref"], rel=1e-8) and abs(perm["bpb_diff"]) < 1e-7
    stores = {name: Store(Path(record.variants[name]["store"])) for name in ("s", "s-cut")}
    toks = {"s": AutoTokenizer.from_pretrained(micro_zoo["tiny-qwen1.5-s"]), "s-cut": AutoTokenizer.from_pretrained(tmp / "cut")}
    texts = [prompts.render(toks["s"], prompt) for prompt in prompts.load(SMALL)]  # chats through the template
    nll, nbytes = {"s": 0.0, "s-cut": 0.0}, 0
    for p, text in enumerate(texts):
        ids = {name: tok(text, add_special_tokens=False).input_ids for name, tok in toks.items()}
        ends = {name: np.cumsum([len(b) for b in prompts.token_bytes(toks[name], ids[name])]) for name in toks}
        first = min(set(ends["s"][:-1].tolist()) & set(ends["s-cut"][:-1].tolist()))  # the first byte both split at
        nbytes += int(ends["s"][-1]) - first
        for name, store in stores.items():
            rows = next(store.blocks(10**6, renormalise=False)).double()
            prompt, position, target = (store.read(k).numpy() for k in ("prompt", "position", "target"))
            starts = np.concatenate([[0], ends[name][:-1]])
            for r in np.flatnonzero((prompt == p) & (starts[np.minimum(position, len(starts) - 1)] >= first)):
                nll[name] += float(torch.logsumexp(rows[r], 0) - rows[r, target[r]])
    assert cut["bpb_bytes"] == nbytes
    assert cut["bpb_ref"] == pytest.approx(nll["s"] / nbytes / np.log(2), rel=1e-6)
    assert cut["bpb_cand"] == pytest.approx(nll["s-cut"] / nbytes / np.log(2), rel=1e-6)
    # the standard error of the difference: a ratio estimator over spans, against scipy's bootstrap of the same ratio
    cfg = config.load(tmp / "cross.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        plan = pipeline.plan(cfg, log=lambda _: None)
    al = pipeline.alignment(plan, "s", "s-cut", stores, [str(i) for i in range(len(texts))])
    per_span = [np.bincount(span, weights=compare.own_nll(stores[name])[rows], minlength=len(al.span_bytes))
                for name, rows, span in (("s", al.ref_span_rows, al.ref_span), ("s-cut", al.cand_span_rows, al.cand_span))]  # fmt: skip
    diff = per_span[1] - per_span[0]
    boot = bootstrap((diff, al.span_bytes.astype(float)), lambda d, b: d.sum() / b.sum() / np.log(2), paired=True,
                     vectorized=False, n_resamples=2000, method="percentile", random_state=0)  # fmt: skip
    assert cut["bpb_diff"] == pytest.approx(diff.sum() / al.span_bytes.sum() / np.log(2), rel=1e-9)
    assert cut["bpb_diff_se"] == pytest.approx(boot.standard_error, rel=0.2)


@pytest.mark.slow
def test_what_a_cross_pair_adds_is_gateable(cross_run):
    run_dir, _, tmp = cross_run
    pairs = {p.candidate: p.aggregates for p in records.read(run_dir / "run.json").pairs}
    scalars = {name: {k for k, v in a.items() if isinstance(v, float | int) and not isinstance(v, bool)} for name, a in pairs.items()}
    assert scalars["s-cut"] - scalars["s-chat"] == set(align.AGGREGATES)  # the list cannot drift from what a run has
    assert config.load(tmp / "cross.yaml", ["gate={'*': {bpb_diff: {max: 0.5}}}"]).gate["*"]["bpb_diff"].max == 0.5
    with pytest.raises(config.ConfigError, match=r"gate\.\*\.bpb_diff: only a pair of two vocabularies has bpb_diff .*set cross_vocab: true"):
        config.load(tmp / "cross.yaml", ["cross_vocab=false", "gate={'*': {bpb_diff: {max: 0.5}}}"])


@pytest.mark.slow
def test_the_report_shows_cross_vocab_pairs(cross_run):
    run_dir, _, _ = cross_run
    html = (run_dir / "index.html").read_text()
    assert "cross-vocabulary</span>" in html and "<b>s-cut</b> has another tokenizer" in html and "bits per byte" in html
    data = json.loads(html.split('<script type="application/json" id="data">')[1].split("</script>")[0])
    n = len(data["pos"]["prompt"])
    assert all(len(v) == n for v in data["kl"].values())
    assert data["kl"]["s-cut"].count(None) > 0 and data["kl"]["s-chat"].count(None) == 0
    assert "s-cut" not in data["top"] and "s-perm" not in data["top"] and "s" in data["top"]
    # kl_report.txt: a cross_vocab pair's block says what it is over, and gives the bits per byte
    text = (run_dir / "kl_report.txt").read_text()
    cut = text.split("###### s-cut (Q)")[1].split("######")[0]
    a = {p.candidate: p.aggregates for p in records.read(run_dir / "run.json").pairs}["s-cut"]
    assert cut.startswith(f" against s (base), {a['positions']} positions (cross_vocab: of the positions that line up, "
                          f"those that predict a shared token; over the {a['shared_tokens']} shared tokens)\n")  # fmt: skip
    assert f"Positions compared            : {a['positions']} of {a['aligned_of']} ({a['aligned']} line up" in cut
    num = functools.partial(llama_report.llama_number, width=10, decimals=6)  # (tested in test_report)
    assert f"Bits per byte (Q)-(base)      : {num(a['bpb_diff'])} ± {num(a['bpb_diff_se'])}\n" in cut
    assert f"Bits per byte (Q)             : {num(a['bpb_cand'])}\n" in cut and f"Bytes (spans)                 : {a['bpb_bytes']} (" in cut
    pct = functools.partial(llama_report.llama_number, width=6, decimals=3)
    assert a["outside_mass_ref"] != a["outside_mass_cand"]  # so that swapping them would show
    assert f"Mass on them, base            : {pct(100 * (1 - a['outside_mass_ref']))} %\n" in cut
    assert f"Mass on them, Q               : {pct(100 * (1 - a['outside_mass_cand']))} %\n" in cut
    chat = text.split("###### s-chat (Q)")[1].split("######")[0]
    assert "cross_vocab" not in chat and "Bits per byte" not in chat  # a pair of one vocabulary: llama.cpp's block alone


@pytest.mark.slow
def test_the_token_view_leaves_unaligned_positions_out(cross_run, browser):
    run_dir, _, _ = cross_run
    page, seen = open_page(browser, run_dir / "index.html")
    page.select_option("#pair-select", "s-cut")
    scored, unaligned = page.locator("#tokens-out span.tok"), page.locator('#tokens-out span.ctx[title^="not aligned"]')
    assert scored.count() > 5 and unaligned.count() >= 1
    scored.nth(2).click()  # the reference's top-5 (and the next token below them where it is not one of them), and an
    # empty table for the candidate (another vocabulary: neither its top 5 nor its probability of the reference's token)
    below = page.locator("#detail tr.below").count()
    assert page.locator("#detail table").count() == 2 and page.locator("#detail table tr").count() == 6 + below + 1 and below <= 1
    assert page.locator("#detail table").nth(1).locator("tr").count() == 1
    assert axe_violations(page) == []  # the cross-vocabulary badge, the empty table, the positions left out as context
    page.select_option("#pair-select", "s-perm")
    assert page.locator('#tokens-out span.ctx[title^="not aligned"]').count() == 0
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] in ("error", "warning")] == []


@pytest.mark.slow
def test_a_sentencepiece_model_against_the_reference(micro_zoo, tmp_path):
    """A Llama model with a SentencePiece-style vocabulary (dummy prefix, "▁" and "<0x20>" both a space, byte
    fallback) against the Qwen reference: the run completes, and what it compares follows from the two vocabularies."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spm = metaspace_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(spm), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                                         bos_token_id=1, eos_token_id=2))  # fmt: skip
    model.save_pretrained(tmp_path / "llama")
    spm.save_pretrained(tmp_path / "llama")
    prompts_file = tmp_path / "p.jsonl"
    texts = ["the cat sat\nthe hat", "that cat, the hat sat; the cat at the sea"]
    prompts_file.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "name": "spm", "zoo_profile": "micro", "reference": {"name": "s", "source": "zoo:tiny-qwen1.5-s"},
        "variants": [{"name": "llama", "source": str(tmp_path / "llama")}], "prompts": str(prompts_file),
        "cross_vocab": True, "reports_dir": str(tmp_path / "reports"), "metrics": {"bootstrap_resamples": 0, "top_k": [2]},
    }))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("HARNESS_STORE", str(tmp_path / "store"))
        assert main(["compare", "--config", str(cfg)]) == 0
    record = records.read(tmp_path / "reports" / "latest" / "run.json")
    a = record.pairs[0].aggregates
    qwen = AutoTokenizer.from_pretrained(micro_zoo["tiny-qwen1.5-s"])
    keys_a, keys_b = align.vocab_keys(qwen), align.vocab_keys(spm)
    assert a["shared_tokens"] == len(set(keys_a) & set(keys_b))  # the 256 single bytes among them, " " once
    ids = [(tuple(qwen(t, add_special_tokens=False).input_ids), tuple(spm(t, add_special_tokens=False).input_ids)) for t in texts]
    aligned = sum(len(align.aligned_positions(keys_a, x, keys_b, y)[0]) for x, y in ids)  # through the dummy prefix
    assert a["aligned_of"] == sum(len(x) - 1 for x, _ in ids) and a["aligned"] == aligned > 3
    # its <unk>, <s> and </s> are not Qwen's: some of the candidate's mass lies outside the shared tokens
    assert 0 < a["positions"] <= aligned and np.isfinite(a["kl_mean"]) and 0 < a["outside_mass_cand"] < 1


@pytest.mark.slow
def test_without_cross_vocab_another_tokenizer_stops_the_run(cross_run):
    _, _, tmp = cross_run
    cfg = config.load(tmp / "cross.yaml", ["cross_vocab=false"])
    from harness import pipeline

    with pytest.raises(prompts.PromptError, match=r"variant 's-perm': its tokenizer differs .* set cross_vocab: true"):
        pipeline.plan(cfg, log=lambda _: None)


@pytest.mark.parametrize("reference", ["s", "cut"])
@pytest.mark.parametrize("score", ["all", "second_half"])
def test_long_texts_are_cut_into_windows_that_start_at_the_same_byte(cross_run, score, reference):
    """text.context far below the prompts' lengths (8 or 12 tokens: every prompt takes 2 to 11 windows). Against the
    micro model, the permuted and the cut model; against the cut model (whose finer splits leave many of its starts
    unshared, so windows move), the micro model and the permuted one. Each reference window starts at a byte where every
    tokenization starts a token; each variant's window starts at that byte; every token is scored at most once (with
    second_half, each past the first exactly once); and at every aligned position whose reference token is scored, the
    variant scores its token too, in a window that starts at the same byte: both models have read the same bytes."""
    from harness import pipeline

    _, _, tmp = cross_run
    context = 8 if reference == "s" else 12
    cfg = config.load(tmp / "cross.yaml", [f"text.context={context}", f"text.score={score}"])
    if reference == "cut":
        cfg = cfg.model_copy(update={"reference": cfg.variants[1].model_copy(update={"name": "s-cut"}),
                                     "variants": [cfg.variants[0], cfg.reference]})  # fmt: skip
        if score == "second_half":  # one of the micro model's tokens is 7 of the cut model's: a 4-token stride fails
            with pytest.raises(prompts.PromptError, match=r"prompt 'chat-09': no byte in its tokens 37 to 43 at which "
                               r"every model's tokenizer starts a token.* raise text.context"):  # fmt: skip
                pipeline.plan(cfg.model_copy(update={"text": cfg.text.model_copy(update={"context": 8})}), log=lambda _: None)
    plan = pipeline.plan(cfg, log=lambda _: None)
    ref = plan.sides[cfg.reference.name]
    windows = {p: [] for p in range(len(ref.ids))}
    for seg in plan.segments:
        windows[seg.prompt].append(seg)
    assert all(len(w) >= 2 for w in windows.values()) and max(len(w) for w in windows.values()) >= 8
    moved = sum(s.offset % (context if score == "all" else context // 2) != 0 for s in plan.segments)
    assert moved > 0 if reference == "cut" else moved == 0  # the micro model's every start is the cut model's too

    def scored(segments, n):  # (prompt, target index) -> the offset of the window that scores it
        out = {}
        for seg in segments:
            assert len(seg.ids) - 1 > seg.first >= 0
            for t in range(seg.offset + seg.first + 1, seg.offset + len(seg.ids)):
                assert (seg.prompt, t) not in out  # scored once
                out[seg.prompt, t] = seg.offset
        every = {(p, t) for p in range(len(n)) for t in range(1, n[p])}
        if score == "second_half":
            assert set(out) == every
        else:  # every token but a window's first (a prompt's last token can be a window of its own, with no row)
            assert set(out) <= every - {(s.prompt, s.offset) for s in segments}
            missed = every - set(out) - {(s.prompt, s.offset) for s in segments}
            # the cut model as reference: a variant's window can be left nothing to score (its tokens too)
            assert reference == "cut" or all(t == n[p] - 1 for p, t in missed)
        return out

    ref_scored = scored(plan.segments, [len(ids) for ids in ref.ids])
    assert all(len(s.ids) <= context for s in plan.segments)
    assert len(plan.own) == 2  # the two cross-vocabulary variants
    for name in plan.own:
        side, segments = plan.sides[name], plan.own[name][1]
        cand_scored = scored(segments, [len(ids) for ids in side.ids])
        checked = 0
        for p in windows:
            a, _ = align.starts(ref.keys, ref.ids[p])
            b, _ = align.starts(side.keys, side.ids[p])
            # a window for each of the reference's that leaves it a token to score, starting at the same byte
            own = [int(b[s.offset]) for s in segments if s.prompt == p]
            assert len(set(own)) == len(own) and set(own) <= {int(a[s.offset]) for s in windows[p]}
            for t, u in zip(*align.aligned_positions(ref.keys, ref.ids[p], side.keys, side.ids[p]), strict=True):
                if (p, t) in ref_scored:
                    assert a[ref_scored[p, t]] == b[cand_scored[p, u]]
                    checked += 1
        assert checked >= 100


@pytest.mark.slow
def test_a_windowed_run_of_the_permuted_model_is_exact(cross_run):
    """The permuted model in windows of 16 tokens: it reads exactly the reference's tokens in each window, so every
    compared position has KL ~ 0 and the same top token, and its bits per byte equal the reference's."""
    _, _, tmp = cross_run
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        assert main(["compare", "--config", str(tmp / "cross.yaml"), "text.context=16", "text.score=second_half"]) == 0
    run_dir = (tmp / "reports" / "latest").resolve()
    pairs = {p.candidate: p for p in records.read(run_dir / "run.json").pairs}
    a = pairs["s-perm"].aggregates
    m = records.load_positions(run_dir, pairs["s-perm"])
    assert a["positions"] == pairs["s-chat"].aggregates["positions"]  # every scored position compared
    assert m["kl"].max() < 1e-8 and a["top1_agree"] == 1.0 and abs(a["bpb_diff"]) < 1e-7
    assert pairs["s-cut"].aggregates["positions"] > 0.8 * a["positions"]


@pytest.mark.slow
def test_generate_mode_aligns_the_continuation(cross_run, tokenizer):
    """The reference's greedy continuation, read token by token by the permuted and the cut tokenizer (a greedy
    continuation need not be the tokenizer's own split of its text: the micro model repeats "  ", which the tokenizer
    would read as one longer run of spaces). Every continuation position aligns, as a brute-force search of byte
    prefixes also finds, and the permuted model is the reference at each."""
    from harness import pipeline

    _, _, tmp = cross_run
    overrides = ["mode=generate", "generate.max_new_tokens=12"]
    cfg = config.load(tmp / "cross.yaml", overrides)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("HARNESS_STORE", str(tmp / "store"))
        plan = pipeline.plan(cfg, log=lambda _: None)
        assert main(["compare", "--config", str(tmp / "cross.yaml"), *overrides]) == 0
    run_dir = (tmp / "reports" / "latest").resolve()
    record = records.read(run_dir / "run.json")
    assert record.config["mode"] == "generate"
    pairs = {p.candidate: p for p in record.pairs}
    n = pairs["s-chat"].aggregates["positions"]  # the same tokenizer: every continuation position
    ref = plan.sides["s"]
    for name in ("s-perm", "s-cut"):
        side, a = plan.sides[name], pairs[name].aggregates
        aligned, same_tokens = 0, set()
        for p, seg in enumerate(plan.segments):
            assert seg.prompt == p  # every micro prompt has a continuation
            ids_a, ids_b = ref.ids[p], side.ids[p]
            ends_a = np.cumsum([len(ref.keys[i][1]) for i in ids_a])
            ends_b = np.cumsum([len(side.keys[i][1]) for i in ids_b])
            scored_a = range(seg.first + 1, len(ids_a))  # positions (target indices) the reference scores
            aligned += sum(1 for t in scored_a if ends_a[t - 1] in set(ends_b[:-1].tolist()))
            common = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if ref.keys[x] != side.keys[y]), len(ids_a))
            same_tokens |= {(p, t) for t in scored_a if t < common}  # both read the same tokens before t
        assert a["aligned"] == aligned == n
        m = records.load_positions(run_dir, pairs[name])
        kl = {(int(p), int(t)): k for p, t, k in zip(m["prompt"], m["position"], m["kl"])}
        if name == "s-perm":
            assert len(same_tokens) == len(kl) == n and all(kl[pt] < 1e-8 for pt in same_tokens)
            assert a["top1_agree"] == 1.0 and a["bpb_bytes"] > 0 and abs(a["bpb_diff"]) < 1e-7
        # each variant scores only tokens that start inside the continuation: before its first scored token it has
        # read the whole prompt
        for seg in plan.own[name][1]:
            prompt = b"".join(ref.keys[i][1] for i in plan.tokens.ids[seg.prompt])
            assert b"".join(side.keys[i][1] for i in seg.ids[: seg.first + 1]).startswith(prompt)


def test_window_starts_always_hold_token_0():
    """A SentencePiece reading's first token carries the dummy prefix's space, so it starts at byte −1 and token 0 of
    the reference (byte 0) has no partner; 0 is still a window start ("0 always"): without it text_segments'
    searchsorted(...) − 1 would index −1 and jump to the last allowed start."""
    ref_keys = [("bytes", bytes([c])) for c in range(256)]  # one byte per token
    other_keys = [("bytes", b" ab"), ("bytes", b"cd"), ("bytes", b"ef")]
    ref = align.Side(ids=(tuple(b"abcdef"),), keys=ref_keys)
    other = align.Side(ids=((0, 1, 2),), keys=other_keys)
    (starts,) = align.window_starts(ref, [other], ["p"], ["ref", "sp"])
    np.testing.assert_array_equal(starts, [0, 2, 4])


def test_ids_without_a_piece_are_never_shared():
    """vocab_keys gives an id with no piece ("none", its number): two vocabularies with holes at the same id must not
    share that 'token' (nothing says they spell the same bytes)."""
    ref_keys = [("bytes", b"a"), ("none", b"1"), ("bytes", b"b")]
    cand_keys = [("bytes", b"b"), ("none", b"1"), ("bytes", b"a")]
    vm = align.VocabMap.build(ref_keys, cand_keys)
    assert vm.shared == 2 and vm.ref.tolist() == [0, 2] and vm.cand.tolist() == [2, 0]
    assert vm.ref_column.tolist() == [0, 2, 1]  # id 1: no column (S = 2)


def test_window_starts_names_the_reference_where_a_reading_spells_other_text():
    """window_starts over two other readings, the second of which spells other text ("abce" against "abcd"): an
    AlignError naming the prompt, the reference and that model, and the byte where they part."""
    keys = [("bytes", b"ab"), ("bytes", b"cd"), ("bytes", b"ce")]
    ref = align.Side(ids=((0, 1),), keys=keys)
    same, odd = align.Side(ids=((0, 1),), keys=keys), align.Side(ids=((0, 2),), keys=keys)
    with pytest.raises(align.AlignError, match=r"prompt 'p': 'ref' and 'odd' tokenize it to different text from byte 3"):
        align.window_starts(ref, [same, odd], ["p"], ["ref", "same", "odd"])
