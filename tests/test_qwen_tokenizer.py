"""The Qwen tokenizer converted from qwen.tiktoken must give the real Qwen1.5 ids."""

import pytest

from harness.qwen_tokenizer import N_TOKENS, build_tokenizer, load_ranks, tiktoken_path, vocab_and_merges


@pytest.fixture(scope="module")
def fresh():
    return build_tokenizer()


def test_known_ids_and_size(fresh):
    assert fresh("Hello world!").input_ids == [9707, 1879, 0]
    assert len(fresh) == N_TOKENS == 151646
    assert fresh.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert fresh.bos_token is None
    assert fresh.eos_token_id == fresh.pad_token_id == 151643
    # Qwen splits digits one by one, and "你好" is one token in the real vocab.
    assert fresh("2024").input_ids == [17, 15, 17, 19]
    assert fresh("你好").input_ids == [108386]


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox's jump, in 2024: don't   stop!\n\n\tTabs too.",
        "你好，世界！今天天气很好。机器学习模型的量化可以减少内存占用。",
        "def f(x: int) -> int:\n    return x ** 2  # squares\n\nprint({k: f(k) for k in range(3)})\n",
        "Ünïcödé ñ émojis 🙂🚀 and mixed 中文 words",
    ],
)
def test_exact_round_trip(fresh, text):
    ids = fresh(text).input_ids
    assert fresh.decode(ids) == text
    assert max(ids) < 151643  # ordinary text never produces the specials


def test_special_tokens_are_atomic(fresh):
    ids = fresh("<|im_start|>user\nhi<|im_end|>").input_ids
    assert ids[0] == 151644 and ids[-1] == 151645


def test_chat_template_is_chatml(fresh):
    text = fresh.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_every_merge_rebuilds_its_token():
    """Each derived merge (a, b) of rank r must concatenate to the token of rank r."""
    ranks = load_ranks(tiktoken_path())
    vocab, merges = vocab_and_merges(ranks)
    multi = sorted((rank, text) for text, rank in vocab.items() if len(text) > 1)
    assert len(merges) == len(multi)
    for (rank, text), (a, b) in zip(multi[:: 997], merges[:: 997]):
        assert a + b == text, rank


def test_saved_tokenizer_reloads_with_autotokenizer(fresh, tmp_path):
    from transformers import AutoTokenizer

    fresh.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world! 你好 def f(): pass <|im_end|>"
    assert again(text).input_ids == fresh(text).input_ids
    assert len(again) == N_TOKENS
    assert type(again).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
