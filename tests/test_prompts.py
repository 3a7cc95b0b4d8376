"""Prompt files: bad input is a clear error; every variant must tokenize to the reference's ids."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from harness import prompts


def _jsonl(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_default_prompt_set_has_every_kind():
    from pathlib import Path

    loaded = prompts.load(Path(__file__).parents[1] / "configs" / "prompts" / "default.jsonl")
    ids = [p.id for p in loaded]
    assert len(loaded) >= 64
    assert {i.split("-")[0] for i in ids} >= {"en", "zh", "code", "chat"}
    assert any(p.messages and len(p.messages) >= 4 for p in loaded)  # multi-turn chats


def test_empty_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n\n")
    with pytest.raises(prompts.PromptError, match="holds no prompts"):
        prompts.load(path)


def test_a_byte_order_mark_is_not_text_and_a_csv_file_is_told_what_is_read(tmp_path):
    """Windows editors start UTF-8 files with a BOM (json refused the first line: "Unexpected UTF-8 BOM"); a .csv or
    other file is read as JSONL, and its error says which files are read how."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "hello"}\n')
    assert prompts.load(path) == (prompts.Prompt(id="a", text="hello", where=f"{path}:1"),)
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfone text")
    assert prompts.load(tmp_path / "w.txt")[0].text == "one text"
    (tmp_path / "p.csv").write_text("id,text\n1,hello\n")
    with pytest.raises(prompts.PromptError, match=r"p\.csv:1 is not valid JSON: .* \(a prompt file is JSONL, one JSON object a line, "
                                                  r"or a \.txt / \.raw file, one text prompt; \.csv is read as JSONL\)"):  # fmt: skip
        prompts.load(tmp_path / "p.csv")


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n\xff\xfe{"id": 2}\n')
    with pytest.raises(prompts.PromptError, match=r"p\.jsonl:2 is not UTF-8 text \(byte 23: invalid start byte\)"):
        prompts.load(path)
    with pytest.raises(prompts.PromptError, match="is a folder, not a file"):
        prompts.load(tmp_path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "a", "text": "  "}, "empty text"),
        ({"id": "a"}, "exactly one of"),
        ({"id": "a", "text": "x", "messages": []}, "exactly one of"),
        ({"id": "a", "messages": [{"role": "user"}]}, "messages"),
        ({"id": "a", "text": "x", "lang": "en"}, "unknown keys"),
        ({"id": "a", "text": 42}, '"text" must be a string, not int'),
        ({"id": "a", "text": None}, '"text" must be a string, not NoneType'),
        ({"id": "", "text": "x"}, '"id" must be a non-empty string or an integer'),
        ({"id": [1], "text": "x"}, '"id" must be a non-empty string or an integer'),
        ({"id": 1.5, "text": "x"}, '"id" must be a non-empty string or an integer'),
    ],
)
def test_bad_rows_name_the_line(tmp_path, row, message):
    with pytest.raises(prompts.PromptError, match=rf"p\.jsonl:1.*{message}"):
        prompts.load(_jsonl(tmp_path, [row]))


def test_repeated_id(tmp_path):
    with pytest.raises(prompts.PromptError, match="repeated"):
        prompts.load(_jsonl(tmp_path, [{"id": "a", "text": "x y"}, {"id": "a", "text": "z w"}]))


@pytest.mark.slow
def test_too_long_prompt_names_it(tokenizer, tmp_path):
    loaded = prompts.load(_jsonl(tmp_path, [{"id": "short", "text": "hello there"}, {"id": "long", "text": "word " * 50}]))
    with pytest.raises(prompts.PromptError, match=r"'long' \(.*p.jsonl:2\) is \d+ tokens, longer than the context of ref \(20 positions\)"):
        prompts.tokenize(tokenizer, loaded, max_length=20, source="ref")
    n = len(prompts.encode(tokenizer, loaded[1]))  # the limit is the most tokens a prompt may have: n fits, n - 1 not
    assert len(prompts.tokenize(tokenizer, loaded, max_length=n, source="ref").ids[1]) == n
    with pytest.raises(prompts.PromptError, match=rf"is {n} tokens, longer than the context of ref \({n - 1} positions\)"):
        prompts.tokenize(tokenizer, loaded, max_length=n - 1, source="ref")


@pytest.mark.slow
def test_chat_prompts_use_the_template(tokenizer, tmp_path):
    loaded = prompts.load(_jsonl(tmp_path, [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}]))
    tokens = prompts.tokenize(tokenizer, loaded, max_length=100, source="ref")
    assert tokens.ids[0][0] == 151644 and tokens.ids[0][-2:] == (151645, 198)  # <|im_start|> ... <|im_end|>\n
    assert tokens.n_vocab == 151646
    # generate mode: the same turn, then the assistant's header the model continues from
    ask = prompts.tokenize(tokenizer, loaded, max_length=100, source="ref", generation_prompt=True)
    header = tuple(tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids)
    assert header[0] == 151644 and ask.ids[0] == tokens.ids[0] + header


@pytest.mark.slow
def test_mismatched_tokenizer_shows_first_difference(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    loaded = prompts.load(_jsonl(tmp_path, [{"id": "greet", "text": "Hello world! Hello again."}]))
    tokens = prompts.tokenize(tokenizer, loaded, max_length=100, source="ref")
    prompts.check_same_ids(tokens, tokenizer, tokenizer, "same")  # the same tokenizer passes

    # A tokenizer whose merges differ: " world" no longer merges, so ids part at token 1.
    tokenizer.save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m not in (["Ġw", "orld"], "Ġw orld", ["Ġwor", "ld"], "Ġwor ld")]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert other("Hello world!").input_ids != [9707, 1879, 0]
    with pytest.raises(prompts.PromptError, match=r"'odd'.*prompt 'greet' \(.*:1\) at token 1: reference id 1879"):
        prompts.check_same_ids(tokens, tokenizer, other, "odd")

    # Ids swapped between " world" and " again": each id's text comes from its own tokenizer.
    tokenizer.save_pretrained(tmp_path / "swapped")
    data = json.loads((tmp_path / "swapped" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġworld"], vocab["Ġagain"] = vocab["Ġagain"], vocab["Ġworld"]
    (tmp_path / "swapped" / "tokenizer.json").write_text(json.dumps(data))
    swapped = AutoTokenizer.from_pretrained(tmp_path / "swapped")
    again = tokenizer(" again").input_ids[0]
    with pytest.raises(prompts.PromptError, match=rf"reference id 1879 \(' world'\), variant id {again} \(' world'\)"):
        prompts.check_same_ids(tokens, tokenizer, swapped, "swapped")


def _tokens(lengths):
    ids = tuple(tuple(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths))
    return prompts.TokenizedPrompts(prompts=tuple(prompts.Prompt(id=str(i), text="x") for i in range(len(lengths))), ids=ids, n_vocab=1000)


@pytest.mark.parametrize("context", [4, 7, 16])
@pytest.mark.parametrize("score", ["all", "second_half"])
def test_text_windows_cover_each_token_once(context, score):
    tokens = _tokens([3, 25, 40, 2])
    segments = prompts.text_segments(tokens, context=context, score=score)
    for p, ids in enumerate(tokens.ids):
        scored = []
        for s in (s for s in segments if s.prompt == p):
            assert len(s.ids) <= context and s.ids == ids[s.offset : s.offset + len(s.ids)]
            scored += [s.offset + r + 1 for r in range(s.first, len(s.ids) - 1)]
            if score == "second_half" and s.offset > 0:
                assert s.first + 1 >= context // 2  # at least half a window of context before each
        assert len(scored) == len(set(scored))
        if score == "second_half":
            assert sorted(scored) == list(range(1, len(ids)))  # every next token, once
        else:
            assert set(scored) == set(range(1, len(ids))) - set(range(0, len(ids), context))


@pytest.mark.parametrize("context", [3, 4, 7, 16, 512])
def test_llama_cpp_windows_score_llama_perplexitys_positions(context):
    """llama-perplexity (perplexity.cpp, also its --kl-divergence): n_chunk = n_tokens / n_ctx chunks, the tail
    dropped; chunk i starts at i * n_ctx, first = n_ctx / 2, and logits first .. n_ctx - 2 are scored, each against
    the token after it. Written out here from those lines, per prompt (each a text file of its own there)."""
    lengths = [2, context - 1, context, context + 1, 2 * context + 3, 5 * context, 1031]
    tokens = _tokens(lengths)
    segments = prompts.text_segments(tokens, context=context, score="llama_cpp")
    for p, ids in enumerate(tokens.ids):
        want = []
        for i in range(len(ids) // context):
            start, first = i * context, context // 2
            want += [(start + j, ids[start + j + 1]) for j in range(first, context - 1)]  # (logit position, its target)
        got = [(s.offset + r, s.ids[r + 1]) for s in segments if s.prompt == p for r in range(s.first, len(s.ids) - 1)]
        assert got == want
        assert all(len(s.ids) == context and s.ids == ids[s.offset : s.offset + context] for s in segments if s.prompt == p)
    assert sum(s.rows for s in segments) == sum(n // context for n in lengths) * (context - 1 - context // 2)


def test_llama_cpp_windows_need_a_whole_window_and_one_tokenization():
    with pytest.raises(prompts.PromptError, match="no prompt has that many: the longest has 40"):
        prompts.text_segments(_tokens([3, 40]), context=64, score="llama_cpp")
    with pytest.raises(prompts.PromptError, match="cross_vocab"):
        prompts.text_segments(_tokens([80]), context=16, score="llama_cpp", starts=[[0, 5]])


def test_a_text_file_is_one_prompt(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 ...\n", encoding="utf-8")
    (loaded,) = prompts.load(path)
    assert loaded.id == "wiki.test.raw" and loaded.text == path.read_text(encoding="utf-8") and loaded.messages is None
    path.write_text("\n \n")
    with pytest.raises(prompts.PromptError, match="is empty"):
        prompts.load(path)
    path.write_bytes(b"ok\n\xff")
    with pytest.raises(prompts.PromptError, match=r"wiki.test.raw:2 is not UTF-8 .* text prompt files are UTF-8"):
        prompts.load(path)


def test_generate_segments_score_the_continuation():
    tokens = _tokens([5, 3])
    segments = prompts.generate_segments(tokens, [[7, 8, 9], []])
    assert len(segments) == 1
    (s,) = segments
    assert s.ids == tokens.ids[0] + (7, 8, 9) and s.first == 4 and s.rows == 3


class _Stub:
    """A tokenizer of `n` ids that reads every text as `ids`."""

    def __init__(self, n, ids):
        self.n, self.ids = n, list(ids)

    def __len__(self):
        return self.n

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=list(self.ids))


def test_a_variant_tokenizer_of_another_size_is_refused_even_with_the_same_ids():
    """Same ids for every prompt but one more token in its vocabulary (an added special token): the rows would be cut
    at the reference's width and the variant's mass on its extra id dropped unseen. check_same_ids stops the run."""
    ref = _Stub(1000, [5, 6, 7])
    tokens = prompts.TokenizedPrompts(prompts=(prompts.Prompt(id="a", text="x"),), ids=((5, 6, 7),), n_vocab=1000)
    prompts.check_same_ids(tokens, ref, _Stub(1000, [5, 6, 7]), "same")
    with pytest.raises(prompts.PromptError, match=r"variant 'wide': its tokenizer has 1001 tokens, the reference's has 1000"):
        prompts.check_same_ids(tokens, ref, _Stub(1001, [5, 6, 7]), "wide")


@pytest.mark.parametrize("score", ["all", "second_half"])
def test_sequences_rebuild_each_prompt_from_its_windows(score):
    """tokens.json's ids per prompt (cli): the windows of text_segments (overlapping for second_half) joined back."""
    ids = (tuple(range(100, 123)), tuple(range(200, 203)))
    tokens = prompts.TokenizedPrompts(prompts=tuple(prompts.Prompt(id=str(i), text="x") for i in range(2)), ids=ids, n_vocab=1000)
    segs = prompts.text_segments(tokens, context=6, score=score)
    assert prompts.sequences(segs) == {0: list(ids[0]), 1: list(ids[1])}


@pytest.mark.parametrize("context", [4, 5, 7, 16])
def test_second_half_windows_stride_by_half_a_context(context):
    tokens = _tokens([40])
    segs = prompts.text_segments(tokens, context=context, score="second_half")
    assert [s.offset for s in segs] == [k * (context // 2) for k in range(len(segs))]
    for s in segs[1:]:
        assert s.first + 1 >= context / 2  # every scored token has read at least half a window


def _hf_strided_depths(n: int, context: int) -> dict[int, int]:
    """Hugging Face's strided perplexity loop (its "Perplexity of fixed-length models" guide, max_length = context,
    stride = context // 2), written out: token t -> the tokens before it in the window that scores it."""
    depths, prev_end, stride = {}, 0, context // 2
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        for t in range(max(end - (end - prev_end), begin + 1), end):  # the last trg_len labels; the window's first has none
            depths[t] = t - begin
        prev_end = end
        if end == n:
            break
    return depths


@pytest.mark.parametrize("context", [4, 6, 16, 512])
@pytest.mark.parametrize("score", ["all", "second_half", "llama_cpp"])
def test_row_depths_are_the_tokens_each_window_gives_before_its_position(context, score):
    """Each scored row's context depth, in store order, against each scoring's own loop written out: non-overlapping
    windows (t mod context), Hugging Face's strided loop, and llama-perplexity's chunks (logit j of a chunk sees
    j + 1 tokens)."""
    lengths = [2, context - 1, context, context + 1, 2 * context + 3, 5 * context, 1031]
    tokens = _tokens(lengths)
    segments = prompts.text_segments(tokens, context=context, score=score)
    depths = prompts.row_depths(segments)
    assert depths.dtype == np.int32 and len(depths) == sum(s.rows for s in segments)
    got, at = {}, 0
    for s in segments:
        for r in range(s.first, len(s.ids) - 1):
            got[(s.prompt, s.offset + r + 1)] = int(depths[at])
            at += 1
    want = {}
    for p, n in enumerate(lengths):
        if score == "all":
            want |= {(p, t): t % context for t in range(1, n) if t % context}
        elif score == "second_half":
            want |= {(p, t): d for t, d in _hf_strided_depths(n, context).items()}
        else:
            want |= {(p, i * context + j + 1): j + 1 for i in range(n // context) for j in range(context // 2, context - 1)}
    assert got == want


def test_generate_rows_are_as_deep_as_the_prompt_and_the_continuation_so_far():
    segments = prompts.generate_segments(_tokens([5, 3]), [[7, 8, 9], [1]])
    assert prompts.row_depths(segments).tolist() == [5, 6, 7, 3]
    assert prompts.row_windows(segments).tolist() == [0, 0, 0, 1]
    assert prompts.row_depths([]).tolist() == [] and prompts.row_windows([]).tolist() == []


def test_row_windows_name_each_rows_forward_pass():
    segments = prompts.text_segments(_tokens([40, 3]), context=16, score="second_half")
    windows = prompts.row_windows(segments)
    assert windows.dtype == np.int32 and windows.tolist() == [i for i, s in enumerate(segments) for _ in range(s.rows)]
