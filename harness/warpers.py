"""What a model's own generation_config leaves of each raw logits row: the "-inf puzzle", in numbers.

    python -m harness.warpers ~/.cache/harness/zoo/full/tiny-qwen1.5-s-chat    # prints its warpers

Qwen1.5-Chat ships `do_sample: true, top_k: 20, top_p: 0.8, repetition_penalty: 1.1`, so the `scores`
that `generate()` returns have all but a handful of entries at -inf, while `output_logits` are raw.
For every scored position the harness records how many entries those processors leave finite and
the probability mass (under the raw softmax) of what they keep. Processor order and semantics are
transformers': repetition penalty, temperature, top-k, top-p (the last two are transformers' own
warper classes, run on the candidate entries). Ties at the k-th value are kept, as transformers does,
except a tie that falls outside the candidate set (measure zero for real logits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class Warpers:
    do_sample: bool = False
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    @classmethod
    def from_generation_config(cls, config) -> Warpers:
        """The warpers generate() runs with this config: a field it leaves unset takes transformers' global default,
        as generate() fills it (top_k 50: a sampling config without top_k still cuts each row to 50 entries)."""
        defaults = {"do_sample": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
        if hasattr(config, "_get_default_generation_params"):  # transformers 5: the defaults generate() fills in
            defaults |= {k: v for k, v in config._get_default_generation_params().items() if k in defaults}

        def value(key: str):
            v = getattr(config, key, None)
            return defaults[key] if v is None else v

        return cls(
            do_sample=bool(value("do_sample")),
            repetition_penalty=float(value("repetition_penalty")),
            temperature=float(value("temperature")),
            top_k=int(value("top_k")),
            top_p=float(value("top_p")),
        )

    @property
    def filters(self) -> bool:
        """Whether anything can set entries to -inf (greedy decoding warps nothing)."""
        return self.do_sample and (self.top_k > 0 or self.top_p < 1.0)


def candidates(warpers: Warpers, ids: torch.Tensor, first_row: int, rows: int, width: int) -> int:
    """How many of a raw row's largest logits hold every entry the warpers can leave finite, for rows
    [first_row, first_row + rows) of sequence `ids`; 0 where that can be any entry (the whole row is needed).
    A penalty >= 1 only lowers seen tokens, so the top-k after it lies within the raw top (k + seen)."""
    if not (warpers.filters and warpers.top_k > 0 and warpers.repetition_penalty >= 1.0):
        return 0
    return min(width, warpers.top_k + int(ids[: first_row + rows].unique().numel()))


def warp_stats(
    raw: torch.Tensor,  # [R, V] float32 raw logits of consecutive rows of one sequence (full padded width)
    ids: torch.Tensor,  # [L] int64, the sequence; row j of `raw` predicts ids[first_row + j + 1]
    first_row: int,
    lse: torch.Tensor,  # [R] float32 logsumexp of each raw row (full width)
    warpers: Warpers,
    top: tuple[torch.Tensor, torch.Tensor] | None = None,  # raw.topk(candidates(...)) where already at hand
) -> tuple[torch.Tensor, torch.Tensor]:
    """([R] int32 entries left finite, [R] float32 raw probability mass of those entries)."""
    rows, width = raw.shape
    if not warpers.filters:
        return torch.full((rows,), width, dtype=torch.int32), torch.ones(rows)
    row_pos = torch.arange(first_row, first_row + rows)
    prefix = ids[: first_row + rows]
    n = candidates(warpers, ids, first_row, rows, width)
    if n:
        cand_val, cand_idx = top if top is not None else raw.topk(n, dim=-1)  # [R, n]
        if cand_val.shape != (rows, n):
            raise ValueError(f"top holds {tuple(cand_val.shape)} logits, not the [{rows}, {n}] the warpers need")
    else:
        cand_val, cand_idx = raw, torch.arange(width).expand(rows, width)
    scores = cand_val.clone()
    if warpers.repetition_penalty != 1.0:
        first_seen = torch.full((width,), len(ids), dtype=torch.long)
        first_seen.scatter_reduce_(0, prefix, torch.arange(len(prefix)), reduce="amin")
        seen = first_seen[cand_idx] <= row_pos[:, None]  # token already in the row's prefix
        p = warpers.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    if warpers.temperature != 1.0:
        scores = scores / warpers.temperature
    if warpers.top_k > 0:
        scores = TopKLogitsWarper(top_k=warpers.top_k)(None, scores)
    if warpers.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=warpers.top_p)(None, scores)
    kept = torch.isfinite(scores)
    mass = (torch.exp(cand_val - lse[:, None]) * kept).sum(-1)
    return kept.sum(-1).to(torch.int32), mass.float()


if __name__ == "__main__":
    from transformers import GenerationConfig

    print(Warpers.from_generation_config(GenerationConfig.from_pretrained(sys.argv[1])))
