"""The real Qwen tokenizer, converted offline from the `qwen.tiktoken` file that `dashscope` ships.

Qwen1.5 checkpoints use a byte-level BPE of 151643 ranked tokens plus three specials
(`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645), no BOS token, the Qwen2
pre-tokenizer split pattern and NFC normalisation. The `.tiktoken` file holds only the ranks; the
merges follow from them: for each multi-byte token in rank order, BPE over its bytes with only the
merges of lower rank ends in exactly two parts, and those are that token's merge.

    python -m harness.qwen_tokenizer OUT_DIR     # writes a Qwen2Tokenizer folder
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_BPE_TOKENS = 151643
N_TOKENS = N_BPE_TOKENS + len(SPECIAL_TOKENS)  # len(tokenizer) of every Qwen1.5 release

# Qwen1.5-Chat's template (ChatML, default system prompt), as in its tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiktoken_path() -> Path:
    """Locates `dashscope/resources/qwen.tiktoken` without importing dashscope (and its deps)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The Qwen tokenizer file comes from the PyPI package 'dashscope' "
            "(dashscope/resources/qwen.tiktoken), which is not installed in this environment. "
            "Install it without its dependencies: pip install --no-deps dashscope"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed dashscope package.")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno} is not a 'base64-token rank' line: {exc}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merges of `token` using only the merges whose result ranks below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token rank {rank} ({token!r}) does not split into one merge: {parts}")
        merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def build_tokenizer(path: Path | None = None):
    """A transformers `Qwen2Tokenizer` equal to the one Qwen1.5 releases ship."""
    from transformers import Qwen2Tokenizer

    ranks = load_ranks(path or tiktoken_path())
    if len(ranks) != N_BPE_TOKENS:
        raise ValueError(f"expected {N_BPE_TOKENS} ranked tokens, found {len(ranks)}")
    vocab, merges = vocab_and_merges(ranks)
    for i, special in enumerate(SPECIAL_TOKENS):
        vocab[special] = N_BPE_TOKENS + i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


if __name__ == "__main__":
    from harness import script

    out = Path(script.args(__doc__, 1, 1)[0])
    build_tokenizer().save_pretrained(out)
    print(f"wrote {out}")
