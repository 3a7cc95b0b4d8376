"""Cross-vocabulary alignment: two tokenizers' readings of the same text, matched position by position and token by
token, so that a model with another vocabulary can be compared with the reference (config `cross_vocab: true`).

    python -m harness.align TOKENIZER_A TOKENIZER_B "some text"   # the aligned positions and the shared vocabulary

Positions. Each tokenizer splits the same text (a raw prompt, or a chat as the reference's template renders it);
its tokens' bytes concatenate to that text (a SentencePiece tokenizer's leading "▁" aside). A reference position and
a candidate position are aligned where both predict a token that starts at the same byte: both models have read
exactly the same bytes before it. Where the two split a word differently, the positions inside it have no partner
and are left out; the report gives the fraction aligned. In generate mode the variant reads the reference's greedy
continuation token by token (`continued`), keeping its splits, so that every position of it can align. A long text
(text mode) is cut into windows that start only where every tokenization starts a token (`window_starts`), each
variant's windows holding the same bytes as the reference's (`own_windows`), so in a window every model reads the
same text.

Vocabulary. A token of one vocabulary is the token of the other with the same bytes (special tokens: the same text,
special in both). A row of log-probs is projected onto the shared tokens, in the reference's id order; a vocabulary
that holds the same bytes under several ids (SentencePiece's "▁" and "<0x20>") has their mass summed into one entry.
The metrics renormalise what they are given, so they compare the two distributions conditioned on the shared tokens:
always finite, where one "everything else" entry would make KL infinite whenever one vocabulary holds the other (the
smaller model puts nothing there). The mass each model puts outside the shared tokens is reported beside them, and a
position whose next token (the reference's) is not shared is left out, like one whose split differs.
This is an approximation that same-vocabulary runs do not need: where one model would emit a longer token than the
other has, its mass sits on a token the other lacks (so outside) or on a shorter prefix token.

Likelihood. Cut at every byte where both tokenizations start a token (`spans`), the text falls into pieces that each
model predicts with the tokens starting in them, having read the same bytes before: their NLL sums are the same
event's, so bits per byte over those pieces (compare.bits_per_byte) compare the two models exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from harness import row_stats
from harness.prompts import PromptError, Segment

# what a cross_vocab pair's aggregates hold beyond a same-vocabulary pair's (compare.compare): gateable too
AGGREGATES = ("aligned_of", "aligned", "shared_tokens", "outside_mass_ref", "outside_mass_cand", "bpb_ref", "bpb_cand",
              "bpb_diff", "bpb_diff_se", "bpb_spans", "bpb_bytes")  # fmt: skip


class AlignError(PromptError):
    """Two tokenizers that cannot be aligned, naming the models and the prompt."""


def scheme(tokenizer) -> str:
    """How a vocabulary's pieces spell bytes: "byte_level" (GPT-2's byte alphabet: Qwen, Llama 3, GPT-2) or
    "metaspace" (SentencePiece: "▁" for a space, "<0xNN>" byte fallback: Llama 2, Mistral), from the tokenizer's
    decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers) one; cross-vocabulary "
                         "alignment reads its decoder to know how its tokens spell bytes")  # fmt: skip
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False)
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"Metaspace"' in decoder or "\u2581" in decoder:
        return "metaspace"
    raise AlignError(f"tokenizer {type(tokenizer).__name__} has the decoder {decoder}; cross-vocabulary alignment "
                     "knows byte-level BPE (GPT-2's byte alphabet) and SentencePiece-style (▁, <0xNN>) vocabularies")  # fmt: skip


def vocab_keys(tokenizer) -> list[tuple[str, bytes]]:
    """Per id of the tokenizer (len(tokenizer) of them): ("special", its text) for a special token, else ("bytes",
    the bytes it stands for). Two vocabularies share a token where the keys are equal."""
    from harness.qwen_tokenizer import byte_alphabet

    kind = scheme(tokenizer)
    decoder = {c: b for b, c in byte_alphabet().items()}
    special = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", True)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    keys = []
    for i, piece in enumerate(pieces):
        if i in special:
            keys.append(("special", special[i].encode()))
        elif piece is None:
            keys.append(("none", str(i).encode()))  # an id without a piece: matches nothing
        elif i in tokenizer.added_tokens_decoder:  # a non-special added token: its text as written
            keys.append(("bytes", piece.encode()))
        elif kind == "byte_level":
            keys.append(("bytes", bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()))
        elif _byte_piece(piece):
            keys.append(("bytes", bytes([int(piece[3:5], 16)])))
        else:
            keys.append(("bytes", piece.replace("\u2581", " ").encode()))
    return keys


def _byte_piece(piece: str | None) -> bool:
    """A SentencePiece byte-fallback piece, "<0xNN>"."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def starts(keys: list[tuple[str, bytes]], ids: tuple[int, ...]) -> tuple[np.ndarray, bytes]:
    """[len(ids)] int64 byte offset at which each token starts, and the bytes they spell together."""
    parts = [keys[i][1] for i in ids]
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]), b"".join(parts)


def _shared_starts(ref_keys: list, ref_ids, cand_keys: list, cand_ids, prompt: str, names) -> tuple[np.ndarray, np.ndarray, int]:
    """Each token's start byte in the text both spell ([len(ref_ids)], [len(cand_ids)] int64; a SentencePiece dummy
    prefix's space at -1), and the text's length; AlignError where they spell different text."""
    a, text_a = starts(ref_keys, ref_ids)
    b, text_b = starts(cand_keys, cand_ids)
    if text_b == text_a:
        return a, b, len(text_a)
    if text_b == b" " + text_a:  # SentencePiece's dummy prefix: its first token carries a space the text lacks
        return a, b - 1, len(text_a)
    if text_a == b" " + text_b:
        return a - 1, b, len(text_b)
    if text_b[:1] == b" " != text_a[:1]:  # a dummy prefix is not where they differ
        text_b = text_b[1:]
    elif text_a[:1] == b" " != text_b[:1]:
        text_a = text_a[1:]
    at = next((i for i, (x, y) in enumerate(zip(text_a, text_b)) if x != y), min(len(text_a), len(text_b)))
    raise AlignError(
        f"prompt {prompt!r}: {names[0]!r} and {names[1]!r} tokenize it to different text from byte {at} on "
        f"({text_a[max(0, at - 10) : at + 10]!r} against {text_b[max(0, at - 10) : at + 10]!r}): their "
        "normalisers differ, so no position can be aligned. Writing the prompt as the stricter normaliser leaves it "
        "(Qwen's composes Unicode to NFC: unicodedata.normalize('NFC', text)) makes both read the same text"
    )


def aligned_positions(
    ref_keys: list, ref_ids: tuple[int, ...], cand_keys: list, cand_ids: tuple[int, ...], *, prompt: str = "", names=("reference", "candidate")
) -> tuple[np.ndarray, np.ndarray]:
    """([N] token positions in the reference's ids, [N] in the candidate's) whose tokens start at the same byte, past
    the first: position t of either is the row that predicts token t from the bytes before it. Raises AlignError
    where the two tokenizations do not spell the same bytes (a SentencePiece tokenizer's added leading space aside)."""
    a, b, _ = _shared_starts(ref_keys, ref_ids, cand_keys, cand_ids, prompt, names)
    # a start shared by both, past the first token of each (token 0 is never predicted)
    common, ia, ib = np.intersect1d(a[1:], b[1:], assume_unique=False, return_indices=True)
    keep = common > 0  # a token at byte 0 (after a dummy-prefix token) has read nothing of the text
    return ia[keep] + 1, ib[keep] + 1


def spans(
    ref_keys: list, ref_ids: tuple[int, ...], cand_keys: list, cand_ids: tuple[int, ...], *, prompt: str = "", names=("reference", "candidate")
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The text cut at every start both tokenizations share (past byte 0), the last piece running to the end: each
    model predicts exactly the bytes of a span with the tokens that start in it, having read the same bytes before
    it, so each NLL sum over a span is that model's likelihood of its own tokenization of the same bytes (not of the
    bytes summed over every tokenization: see the README's "Bits per byte"). Returns each
    reference token's span ([len(ref_ids)] int64, -1 before the first span), each candidate token's, and [S] int64
    bytes per span."""
    a, b, length = _shared_starts(ref_keys, ref_ids, cand_keys, cand_ids, prompt, names)
    cuts = np.intersect1d(a[1:], b[1:])
    cuts = cuts[cuts > 0]
    edges = np.append(cuts, length)
    return (np.searchsorted(cuts, a, side="right") - 1, np.searchsorted(cuts, b, side="right") - 1,
            np.diff(edges).astype(np.int64))  # fmt: skip


def window_starts(ref: Side, others: list[Side], prompt_names: list[str], names: list[str]) -> list[np.ndarray]:
    """Text mode: per prompt, the reference token indices at which every other reading also starts a token at the same
    byte (0 always): where a window may start (prompts.text_segments' `starts`) so that, in a window, every model reads
    the same bytes."""
    out = []
    for p, ids in enumerate(ref.ids):
        keep = np.ones(len(ids), dtype=bool)
        for other, name in zip(others, names[1:], strict=True):
            a, b, _ = _shared_starts(ref.keys, ids, other.keys, other.ids[p], prompt_names[p], (names[0], name))
            keep &= np.isin(a, b)
        keep[0] = True
        out.append(np.flatnonzero(keep))
    return out


def own_windows(segments: list, ref: Side, cand: Side, prompt_names: list[str], names=("reference", "candidate")) -> list:
    """Text mode: the candidate's windows over its own reading, one for each of the reference's (`segments`, which start
    where window_starts allows): the same first byte; every candidate token that starts before the byte where the
    reference's next window starts scoring; scored from the first token that starts where the reference's window scores
    from (a window that scores all: every token past its first, as the reference's). So each candidate token is scored
    once, and where a position of each aligns, both models have read the same bytes."""
    out, byte_starts = [], {}
    for seg in segments:
        p = seg.prompt
        if p not in byte_starts:
            byte_starts[p] = _shared_starts(ref.keys, ref.ids[p], cand.keys, cand.ids[p], prompt_names[p], names)[:2]
        a, b = byte_starts[p]
        ids, n = cand.ids[p], len(ref.ids[p])
        s, e = seg.offset, seg.offset + len(seg.ids)
        sv = 0 if s == 0 else int(np.searchsorted(b, a[s]))
        if s and (sv == len(b) or b[sv] != a[s]):
            raise AlignError(f"prompt {prompt_names[p]!r}: a window of {names[0]!r} starts at byte {a[s]}, where "
                             f"{names[1]!r} starts no token (align.window_starts should have ruled that out)")  # fmt: skip
        ev = len(ids) if e >= n else int(np.searchsorted(b, a[e]))
        scored_from = sv + 1 if seg.first == 0 else int(np.searchsorted(b, a[s + seg.first + 1]))
        if ev - scored_from >= 1:
            out.append(Segment(p, sv, tuple(ids[sv:ev]), scored_from - sv - 1))
    return out


def continued(prompt_text: str, continuation: list, tokenizer, keys: list, index: dict) -> tuple[tuple[int, ...], int]:
    """Generate mode: another tokenizer's reading of a prompt and of the reference's continuation (its tokens' keys).
    The prompt is read as the tokenizer splits its text; the continuation token by token, as the reference read it:
    each as this vocabulary's token with the same bytes, or, where it has none, as the tokenizer splits that token's
    text where that spells exactly its bytes (a byte-level BPE's split), else as the longest tokens that spell it from
    its start on (a SentencePiece tokenizer puts its "▁" prefix before the text, so its split of a word piece never
    spells it; down to single bytes for part of a character), else the continuation stops there. So a continuation
    that is not its own tokenizer's split of its text (a greedy model may emit "  " "  " for one run of four spaces) is
    read with the reference's splits, and every split of it can align. Returns the ids and the index of the first
    continuation token. `keys`: vocab_keys(tokenizer); `index`: reading_index(tokenizer, keys)."""
    ids = list(tokenizer(prompt_text, add_special_tokens=False).input_ids)
    first = len(ids)
    for key in continuation:
        if key in index:
            ids.append(index[key])
            continue
        piece = key[1]
        try:
            split = tokenizer(piece.decode(), add_special_tokens=False).input_ids
        except UnicodeDecodeError:  # part of a character
            split = None
        if split is None or b"".join(keys[i][1] for i in split) != piece:
            split = _longest_tokens(piece, index)
            if split is None:
                break
        ids += split
    return tuple(ids), first


def _longest_tokens(piece: bytes, index: dict) -> list[int] | None:
    """`piece` spelled by the longest token of `index` that starts it, then the rest alike; None where some byte has
    no token."""
    out, i = [], 0
    while i < len(piece):
        j = next((j for j in range(len(piece), i, -1) if ("bytes", piece[i:j]) in index), None)
        if j is None:
            return None
        out.append(index["bytes", piece[i:j]])
        i = j
    return out


def reading_index(tokenizer, keys: list) -> dict:
    """key -> the id a model reads for those bytes: the lowest id with that key, but a SentencePiece byte-fallback
    piece (<0xNN>) only where no other piece spells its byte (its tokenizer writes "a" as the piece "a", never as
    <0x61>, which a model rarely sees)."""
    fallback = set()
    if scheme(tokenizer) == "metaspace":
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(keys))))
        fallback = {i for i, t in enumerate(pieces) if _byte_piece(t)}
    index: dict = {}
    for i, key in enumerate(keys):
        if i not in fallback:
            index.setdefault(key, i)
    for i in sorted(fallback):
        index.setdefault(keys[i], i)
    return index


@dataclass(frozen=True)
class VocabMap:
    """Shared tokens of two vocabularies: column j of a projected row is shared token j, whose first id in each
    vocabulary is ref[j], cand[j]."""

    ref: torch.Tensor  # [S] int64 ids in the reference's vocabulary
    cand: torch.Tensor  # [S] int64 ids in the candidate's
    ref_extra: tuple[tuple[int, int], ...]  # (column, id): further reference ids with a shared token's bytes
    cand_extra: tuple[tuple[int, int], ...]
    ref_order: torch.Tensor  # [*] int64: `ref`, then the reference ids in no shared column (what project gathers)
    cand_order: torch.Tensor
    ref_column: torch.Tensor  # [V_ref] int64: the column of each reference id, S where it is not shared

    @property
    def shared(self) -> int:
        return len(self.ref)

    @staticmethod
    def build(ref_keys: list, cand_keys: list) -> VocabMap:
        def firsts(keys) -> tuple[dict, dict]:  # key -> its first id; key -> its later ids (few: SentencePiece's)
            first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))  # the last write is the first id
            later: dict = {}
            if len(first) < len(keys):
                for i, key in enumerate(keys):
                    if first[key] != i:
                        later.setdefault(key, []).append(i)
            return first, later

        (fa, la), (fb, lb) = firsts(ref_keys), firsts(cand_keys)
        common = sorted((fa[key], key) for key in fa.keys() & fb.keys() if key[0] != "none")  # reference id order
        s = len(common)
        first, extra, order, columns = [], [], [], []
        for keys, f, later in ((ref_keys, fa, la), (cand_keys, fb, lb)):
            ids = np.array([f[key] for _, key in common], dtype=np.int64)
            column = np.full(len(keys), s, dtype=np.int64)  # every id of a shared token gets its column
            column[ids] = np.arange(s)
            more = tuple((j, i) for j, (_, key) in enumerate(common) if key in later for i in later[key])
            column[[i for _, i in more]] = [j for j, _ in more]
            first.append(ids)
            extra.append(more)
            order.append(torch.from_numpy(np.concatenate([ids, np.flatnonzero(column == s)])))
            columns.append(column)
        return VocabMap(
            ref=torch.from_numpy(first[0]), cand=torch.from_numpy(first[1]), ref_extra=extra[0], cand_extra=extra[1],
            ref_order=order[0], cand_order=order[1], ref_column=torch.from_numpy(columns[0]),
        )  # fmt: skip

    def project(self, rows: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] log-probs in one side's vocabulary ("ref" or "cand"), any float dtype -> ([B, S] float32 log-probs
        of the shared tokens, not renormalised (the metrics do it, exactly); [B] float32 share of the row's mass
        outside them). Each row is gathered in `order` (the shared columns, then the rest), and the fused row kernel
        (row_stats) takes the two log-sum-exps in one read, float32 lanes summed in float64; without it, torch's."""
        ids, extra, order = (self.ref, self.ref_extra, self.ref_order) if side == "ref" else (self.cand, self.cand_extra, self.cand_order)
        if len(order) == rows.shape[1] and bool((order == torch.arange(len(order))).all()):
            x = rows.float().contiguous()  # nothing to move
        else:  # a row at a time: a [B, V] column gather walks the columns, ~3x slower here
            x = torch.empty(len(rows), len(order))
            for r in range(len(rows)):
                x[r].copy_(rows[r][order])
        for j, i in extra:
            x[:, j] = torch.logaddexp(x[:, j], rows[:, i].float())
        outside = row_stats.row_stats(x, len(ids), logprobs=False)[1]
        return x[:, : len(ids)], outside


@dataclass(frozen=True)
class Side:
    """One model's reading of the prompts, as alignment needs it."""

    ids: tuple[tuple[int, ...], ...]  # token ids per prompt
    keys: list  # vocab_keys of its tokenizer

    @cached_property
    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps([self.ids, [k[1].hex() for k in self.keys]]).encode()).hexdigest()


@dataclass(frozen=True)
class PairAlignment:
    """Which stored rows of two models are compared, and how their vocabularies map."""

    ref_rows: torch.Tensor  # [N] int64 row indices into the reference's store
    cand_rows: torch.Tensor  # [N] int64 row indices into the candidate's store
    vocab: VocabMap
    ref_positions: int  # rows in the reference's store
    aligned: int  # of them, those whose split lines up; the N compared are those whose next token is also shared
    # whole spans (`spans`) whose every token both stores score: per side, the store rows inside them and their span
    ref_span_rows: np.ndarray  # [*] int64
    ref_span: np.ndarray  # [*] int64, in 0 .. S-1
    cand_span_rows: np.ndarray
    cand_span: np.ndarray
    span_bytes: np.ndarray  # [S] int64


def _row_index(prompt: np.ndarray, position: np.ndarray) -> dict[tuple[int, int], int]:
    return {(int(p), int(t)): r for r, (p, t) in enumerate(zip(prompt, position, strict=True))}


def align_stores(ref: Side, cand: Side, ref_store, cand_store, prompt_names: list[str], names=("reference", "candidate")) -> PairAlignment:
    """The aligned rows of two stores (each holds `prompt` and `position` per row), the vocabulary map, and the whole
    spans (`spans`) whose every token both stores score, for bits per byte."""
    rows_a = _row_index(ref_store.read("prompt").numpy(), ref_store.read("position").numpy())
    rows_b = _row_index(cand_store.read("prompt").numpy(), cand_store.read("position").numpy())
    ra, rb = [], []
    span_rows: tuple[list, list] = ([], [])
    span_of: tuple[list, list] = ([], [])
    span_bytes: list[int] = []
    for p, (ids_a, ids_b) in enumerate(zip(ref.ids, cand.ids, strict=True)):
        ta, tb = aligned_positions(ref.keys, ids_a, cand.keys, ids_b, prompt=prompt_names[p], names=names)
        for t, u in zip(ta.tolist(), tb.tolist()):
            if (p, t) in rows_a and (p, u) in rows_b:  # scored in both stores
                ra.append(rows_a[(p, t)])
                rb.append(rows_b[(p, u)])
        # whole spans: kept where both stores score every token that starts in them
        sa, sb, nbytes = spans(ref.keys, ids_a, cand.keys, ids_b, prompt=prompt_names[p], names=names)
        whole = np.ones(len(nbytes), dtype=bool)
        for span, rows in ((sa, rows_a), (sb, rows_b)):
            for t, k in enumerate(span.tolist()):
                if k >= 0 and (p, t) not in rows:
                    whole[k] = False
        renumber = np.cumsum(whole) - 1 + len(span_bytes)
        span_bytes += nbytes[whole].tolist()
        for side, (span, rows) in enumerate(((sa, rows_a), (sb, rows_b))):
            for t, k in enumerate(span.tolist()):
                if k >= 0 and whole[k]:
                    span_rows[side].append(rows[(p, t)])
                    span_of[side].append(int(renumber[k]))
    vocab = VocabMap.build(ref.keys, cand.keys)
    ra, rb = torch.tensor(ra, dtype=torch.long), torch.tensor(rb, dtype=torch.long)
    shared = vocab.ref_column[ref_store.read("target")[ra]] < vocab.shared
    return PairAlignment(
        ra[shared], rb[shared], vocab, len(rows_a), len(ra),
        *(np.array(x, dtype=np.int64) for x in (span_rows[0], span_of[0], span_rows[1], span_of[1], span_bytes)),
    )  # fmt: skip


if __name__ == "__main__":
    from transformers import AutoTokenizer

    from harness import script

    path_a, path_b, text = script.args(__doc__, 3, 3)
    tok_a, tok_b = (AutoTokenizer.from_pretrained(p) for p in (path_a, path_b))
    ka, kb = vocab_keys(tok_a), vocab_keys(tok_b)
    ida, idb = (tuple(t(text, add_special_tokens=False).input_ids) for t in (tok_a, tok_b))
    ta, tb = aligned_positions(ka, ida, kb, idb)
    vm = VocabMap.build(ka, kb)
    print(f"{len(ida)} and {len(idb)} tokens; {len(ta)} positions aligned; {vm.shared} tokens shared "
          f"({len(tok_a)} and {len(tok_b)} in the vocabularies)")  # fmt: skip
    for t, u in zip(ta, tb):
        print(f"  {t:>4} {u:>4}  next: {ka[ida[t]][1]!r} / {kb[idb[u]][1]!r}")
