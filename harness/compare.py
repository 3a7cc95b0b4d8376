"""Streams two stores block by block through the metrics and reduces them to one summary per pair.

    harness compare --config configs/default.yaml      # extract, then this, then the report

Memory stays at a few [BLOCK, V] blocks whatever the number of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import metrics
from harness.store import Store

BLOCK = 256  # rows per block: 256 x 151646 float32 = 155 MB per side


@dataclass(frozen=True)
class PairSummary:
    reference: str
    candidate: str
    positions: int
    kl_mean: float  # nats, mean over positions of KL(reference ‖ candidate)
    kl_max: float  # nats
    top1_agree: float  # fraction of positions whose argmax token is the same
    pad_mass_ref: float  # mean probability the reference's raw rows put on padding columns
    pad_mass_cand: float


class CompareError(RuntimeError):
    pass


def compare(ref_name: str, ref: Store, cand_name: str, cand: Store) -> PairSummary:
    if not torch.equal(ref.read("target"), cand.read("target")):
        raise CompareError(f"stores of {ref_name!r} and {cand_name!r} do not hold the same token positions")
    kl_sum, kl_max, agree, n = 0.0, 0.0, 0, 0
    for a, b in zip(ref.blocks(BLOCK), cand.blocks(BLOCK), strict=True):
        k = metrics.kl(a, b)
        kl_sum += k.sum().item()
        kl_max = max(kl_max, k.max().item())
        agree += int(metrics.top1_agree(a, b).sum())
        n += len(k)
    return PairSummary(
        reference=ref_name,
        candidate=cand_name,
        positions=n,
        kl_mean=kl_sum / n,
        kl_max=kl_max,
        top1_agree=agree / n,
        pad_mass_ref=ref.read("pad_mass").double().mean().item(),
        pad_mass_cand=cand.read("pad_mass").double().mean().item(),
    )
