"""Prompt sets (JSONL) turned into the one token-id stream that every variant is scored on.

    python -m harness.prompts configs/prompts/default.jsonl     # prints counts per prompt kind

A line is `{"id": ..., "text": ...}` (raw text) or `{"id": ..., "messages": [{"role", "content"}]}`
(rendered with the reference tokenizer's chat template). The reference tokenizer produces the ids;
each variant's tokenizer must produce exactly the same ids, or the run stops at the first difference
(unless `cross_vocab`: then the variant reads the same text its own way, `retokenize`, and align.py
matches the two readings).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class PromptError(ValueError):
    """A prompt file or tokenizer problem, naming the file and the prompt."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    where: str = field(default="", compare=False)  # "FILE:LINE" it came from, for error messages

    @property
    def named(self) -> str:
        """How an error names it: its id, and where it came from."""
        return f"{self.id!r}" + (f" ({self.where})" if self.where else "")

    @property
    def kind(self) -> str:
        return "chat" if self.messages else "text"


@dataclass(frozen=True)
class TokenizedPrompts:
    prompts: tuple[Prompt, ...]
    ids: tuple[tuple[int, ...], ...]  # token ids per prompt, as the reference tokenizer gives them
    n_vocab: int  # len(reference tokenizer): the real ids, the width every stored row is cut to

    @property
    def fingerprint(self) -> str:
        """sha256 over every prompt's ids: what a store or a baseline is tied to."""
        digest = hashlib.sha256()
        for ids in self.ids:
            digest.update(json.dumps(ids).encode())
        return digest.hexdigest()


TEXT_SUFFIXES = (".txt", ".raw")  # a plain text file is one text prompt (llama-perplexity's -f wiki.test.raw)


def load(path: Path) -> tuple[Prompt, ...]:
    """A JSONL prompt set; or, for a .txt / .raw file, the whole file as one text prompt named after the file."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    prompts, seen = [], set()
    plain = path.suffix.lower() in TEXT_SUFFIXES
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no text
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        kind = "text prompt files" if plain else "JSONL prompt files"
        raise PromptError(f"{path}:{line} is not UTF-8 text (byte {exc.start}: {exc.reason}); {kind} are UTF-8") from None
    if plain:
        if not text.strip():
            raise PromptError(f"prompt file {path} is empty (a {path.suffix} file is one text prompt)")
        return (Prompt(id=path.name, text=text, where=str(path)),)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            what = "" if path.suffix.lower() in (".jsonl", ".json") else (
                f" (a prompt file is JSONL, one JSON object a line, or a {' / '.join(TEXT_SUFFIXES)} file, one text prompt; "
                f"{path.suffix or 'no suffix'} is read as JSONL)")
            raise PromptError(f"{where} is not valid JSON: {exc}{what}") from None
        if not isinstance(row, dict) or "id" not in row or ("text" in row) == ("messages" in row):
            raise PromptError(f'{where}: each line needs "id" and exactly one of "text" or "messages"')
        extra = set(row) - {"id", "text", "messages"}
        if extra:
            raise PromptError(f"{where}: unknown keys {sorted(extra)}; a prompt has id, text or messages")
        pid = str(row["id"]) if isinstance(row["id"], (str, int)) and not isinstance(row["id"], bool) else ""
        if not pid.strip():
            raise PromptError(f'{where}: "id" must be a non-empty string or an integer, not {row["id"]!r}')
        if pid in seen:
            raise PromptError(f"{where}: prompt id {pid!r} is repeated")
        seen.add(pid)
        if "text" in row:
            if not isinstance(row["text"], str):
                raise PromptError(f'{where}: prompt {pid!r}: "text" must be a string, not {type(row["text"]).__name__}')
            if not row["text"].strip():
                raise PromptError(f"{where}: prompt {pid!r} has an empty text")
            prompts.append(Prompt(id=pid, text=row["text"], where=where))
        else:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["content"], str) for m in msgs
            ):
                raise PromptError(f'{where}: prompt {pid!r}: "messages" must be a non-empty list of {{"role", "content"}}')
            prompts.append(Prompt(id=pid, messages=tuple((m["role"], m["content"]) for m in msgs), where=where))
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return tuple(prompts)


def render(tokenizer, prompt: Prompt, *, generation_prompt: bool = False) -> str:
    """A prompt's text: raw text as is, a chat through the tokenizer's chat template (ending with the assistant's
    header when `generation_prompt`, for the generate mode)."""
    if prompt.messages is None:
        return prompt.text
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"prompt {prompt.named} is a chat, but the reference tokenizer has no chat template")
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, prompt: Prompt, *, generation_prompt: bool = False) -> list[int]:
    """Token ids of one prompt, rendered by `render` (no BOS added: Qwen has none)."""
    return tokenizer(render(tokenizer, prompt, generation_prompt=generation_prompt), add_special_tokens=False).input_ids


def retokenize(reference: TokenizedPrompts, ref_tokenizer, tokenizer) -> TokenizedPrompts:
    """The same prompts as another tokenizer reads them: each prompt's text as the reference renders it (a chat
    through the reference's template, so both read the same text), tokenized by `tokenizer` (cross_vocab)."""
    ids = []
    for prompt in reference.prompts:
        row = tokenizer(render(ref_tokenizer, prompt), add_special_tokens=False).input_ids
        if len(row) < 2:
            raise PromptError(f"prompt {prompt.named} is {len(row)} token long for another tokenizer: nothing to score")
        ids.append(tuple(row))
    return TokenizedPrompts(prompts=reference.prompts, ids=tuple(ids), n_vocab=len(tokenizer))


def tokenize(
    tokenizer, prompts: tuple[Prompt, ...], *, max_length: int | None, source: str, generation_prompt: bool = False
) -> TokenizedPrompts:
    """Tokenizes every prompt; `max_length` (None: no limit) is the most tokens one prompt may have."""
    ids = []
    for prompt in prompts:
        row = encode(tokenizer, prompt, generation_prompt=generation_prompt)
        if len(row) < (1 if generation_prompt else 2):
            raise PromptError(f"prompt {prompt.named} is {len(row)} token long: nothing to score")
        if max_length is not None and len(row) > max_length:
            raise PromptError(
                f"prompt {prompt.named} is {len(row)} tokens, longer than the context of {source} "
                f"({max_length} positions); shorten it or split it into several prompts"
            )
        ids.append(tuple(row))
    return TokenizedPrompts(prompts=prompts, ids=tuple(ids), n_vocab=len(tokenizer))


@dataclass(frozen=True)
class Segment:
    """One forward pass's worth of tokens: row t of its logits predicts ids[t + 1]."""

    prompt: int  # index of the prompt it comes from
    offset: int  # position of ids[0] in the prompt's full token sequence
    ids: tuple[int, ...]
    first: int  # first scored row; rows first .. len(ids) - 2 are scored

    @property
    def rows(self) -> int:
        return len(self.ids) - 1 - self.first


def text_segments(tokens: TokenizedPrompts, *, context: int, score: str, starts: list | None = None) -> list[Segment]:
    """Cuts each prompt into windows of at most `context` tokens.

    score="all": non-overlapping windows; every token but a window's first is scored.
    score="second_half" (strided, as Hugging Face's perplexity guide): windows of `context` at a stride of
    context/2; the first window scores all its rows and every later one only its second half, so each
    token is scored once, and with at least context/2 tokens before it once past the first window.
    score="llama_cpp" (llama-perplexity's and its --kl-divergence's positions): non-overlapping windows of
    exactly `context` tokens, the tail shorter than one dropped; each scores only the tokens after its
    first context/2 + 1 (rows context/2 .. context-2), so a prompt shorter than `context` scores nothing.

    `starts` (cross_vocab): per prompt, the sorted token indices at which a window may start (where every
    model's tokenization starts a token at the same byte, align.window_starts). A window then starts at the
    last of them at or before where it would, else the first after it that leaves a scored row ("all": ends
    there), and scores from the token after the previous window's last: each token is still scored once.
    """
    if score not in ("all", "second_half", "llama_cpp"):
        raise ValueError(f"text.score must be 'all', 'second_half' or 'llama_cpp', not {score!r}")
    if score == "llama_cpp":
        if starts is not None:
            raise PromptError("text.score 'llama_cpp' cuts windows at fixed token counts of the reference's tokens, which "
                              "another tokenizer's reading cannot keep (cross_vocab): use 'second_half' or 'all'")  # fmt: skip
        half = context // 2
        segments = [Segment(p, start, ids[start : start + context], half) for p, ids in enumerate(tokens.ids)
                    for start in range(0, len(ids) - context + 1, context) if context - 1 > half]  # fmt: skip
        if not segments:
            raise PromptError(
                f"text.score 'llama_cpp' scores whole windows of text.context = {context} tokens only (the tail shorter "
                f"than one is dropped, as llama-perplexity does), and no prompt has that many: the longest has "
                f"{max(map(len, tokens.ids))}. Lower text.context, or give longer texts (a .txt prompt file is one text)"
            )
        return segments
    segments = []
    for p, ids in enumerate(tokens.ids):
        allowed = None if starts is None else np.asarray(starts[p])

        def next_start(start: int, want: int, end: int) -> int:
            """`want` itself, or under `starts` the last allowed start in (start, want], else the first in (want, end)."""
            if allowed is None or want >= len(ids):
                return want
            k = np.searchsorted(allowed, want, side="right") - 1
            if allowed[k] > start:
                return int(allowed[k])
            if k + 1 < len(allowed) and allowed[k + 1] < end:
                return int(allowed[k + 1])
            raise PromptError(
                f"prompt {tokens.prompts[p].id!r}: no byte in its tokens {start + 1} to {end - 1} at which every "
                "model's tokenizer starts a token, so no window can start there with every model having read the "
                "same text (cross_vocab); raise text.context"
            )

        if score == "all":
            start = 0
            while start < len(ids) - 1:
                end = next_start(start, start + context, start + context + 1)
                if len(ids[start:end]) >= 2:
                    segments.append(Segment(p, start, ids[start:end], 0))
                start = end
            continue
        half = max(1, context // 2)
        start, scored_to = 0, 0  # scored_to: the end of the last window, whose tokens before it are scored
        while True:
            window = ids[start : start + context]
            first = 0 if start == 0 else scored_to - start - 1
            if len(window) - 1 > first:
                segments.append(Segment(p, start, window, first))
            if start + context >= len(ids):
                break
            start, scored_to = next_start(start, start + half, start + context), start + context
    return segments


def generate_segments(tokens: TokenizedPrompts, continuations: list[list[int]]) -> list[Segment]:
    """Prompt + the reference's greedy continuation; the continuation's tokens are the scored ones."""
    return [
        Segment(p, 0, ids + tuple(cont), len(ids) - 1)
        for p, (ids, cont) in enumerate(zip(tokens.ids, continuations, strict=True))
        if cont
    ]


def check_same_ids(
    reference: TokenizedPrompts, ref_tokenizer, tokenizer, name: str, *, generation_prompt: bool = False
) -> None:
    """Stops the run if `tokenizer` (a variant's) does not give the reference's ids, at the first difference."""
    if len(tokenizer) != reference.n_vocab:
        raise PromptError(
            f"variant {name!r}: its tokenizer has {len(tokenizer)} tokens, the reference's has {reference.n_vocab}; "
            "their distributions cannot be aligned position by position"
        )
    for prompt, ref_ids in zip(reference.prompts, reference.ids):
        ids = encode(tokenizer, prompt, generation_prompt=generation_prompt)
        if tuple(ids) != ref_ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
            mine = ids[at] if at < len(ids) else None
            theirs = ref_ids[at] if at < len(ref_ids) else None
            raise PromptError(
                f"variant {name!r}: its tokenizer differs from the reference's on prompt {prompt.named} at token {at}: "
                f"reference id {theirs} ({ref_tokenizer.decode([theirs]) if theirs is not None else 'end'!r}), "
                f"variant id {mine} ({tokenizer.decode([mine]) if mine is not None else 'end'!r})"
            )


def row_depths(segments: list[Segment]) -> np.ndarray:
    """[rows] each scored row's context depth, in the order a store holds the rows (segment by segment): the number
    of tokens its window gives the model before the token it predicts (row t of a segment sees ids[0..t]: t + 1)."""
    return np.concatenate([np.arange(s.first + 1, len(s.ids), dtype=np.int32) for s in segments] or [np.zeros(0, np.int32)])


def row_windows(segments: list[Segment]) -> np.ndarray:
    """[rows] each scored row's window: the index of its segment (one forward pass) in `segments`, in store order."""
    return np.repeat(np.arange(len(segments), dtype=np.int32), [s.rows for s in segments])


def sequences(segments: list[Segment]) -> dict[int, list[int]]:
    """prompt index -> its whole token sequence (prompt, and continuation in generate mode) from the segments."""
    out: dict[int, list[int]] = {}
    for s in segments:
        seq = out.setdefault(s.prompt, [])
        if s.offset + len(s.ids) > len(seq):  # windows overlap; every window agrees on the shared ids
            seq.extend(s.ids[len(seq) - s.offset :])
    return out


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each id's raw bytes (byte-level BPE pieces mapped back; special tokens as their own text)."""
    from harness.qwen_tokenizer import byte_alphabet

    decoder = {c: b for b, c in byte_alphabet().items()}  # GPT-2's byte <-> printable character table
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if i in special or any(c not in decoder for c in piece):
            out.append(piece.encode())
        else:
            out.append(bytes(decoder[c] for c in piece))
    return out


def sequence_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sequence: a character split over several tokens
    (CJK, emoji) is credited to the token that completes it, so the pieces join to the exact text."""
    import codecs

    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [utf8.decode(b) for b in token_bytes(tokenizer, ids)]
    texts[-1:] = [texts[-1] + utf8.decode(b"", final=True)] if texts else []
    return texts


def vocab_texts(tokenizer, ids: list[int]) -> dict[int, str]:
    """id -> printable text of that token alone; bytes of an incomplete character show as \\xNN."""
    return {i: b.decode("utf-8", errors="backslashreplace") for i, b in zip(ids, token_bytes(tokenizer, ids), strict=True)}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary, the added tokens and the chat template: what makes two tokenizers interchangeable."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps({i: str(t) for i, t in sorted(tokenizer.added_tokens_decoder.items())}).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


if __name__ == "__main__":
    from harness import script

    loaded = load(Path(script.args(__doc__, 1, 1)[0]))
    kinds = {}
    for p in loaded:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print(f"{len(loaded)} prompts: {kinds}")
