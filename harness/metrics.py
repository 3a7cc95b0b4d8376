"""Per-position drift metrics: pure functions over [B, V] blocks of log-probs (no I/O, no devices).

    python -m harness.metrics      # checks kl() against scipy.special.rel_entr on random rows

Direction: `ref` is the reference, `cand` the candidate; KL(ref ‖ cand) = Σ p_ref (log p_ref − log p_cand),
in nats. Rows are log-probs already normalised over the same vocabulary.
"""

from __future__ import annotations

import torch


def kl(ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[B, V] log-probs, [B, V] log-probs -> [B] float64 KL(ref ‖ cand) in nats.

    Both rows are renormalised and accumulated in float64: a float32 log-softmax row sums to 1 only
    within ~1e-7, which is larger than the KL of a good quantization, so without this a tiny KL can
    come out negative. A column where the reference has zero probability contributes 0; a column
    where the candidate has zero probability but the reference does not makes the row +inf (never NaN).
    """
    lp = torch.log_softmax(ref.double(), -1)
    lq = torch.log_softmax(cand.double(), -1)
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))  # 0 * (-inf - x) would be NaN
    return (p * diff).sum(-1).clamp_min(0.0)


def top1_agree(ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[B, V], [B, V] -> [B] bool: the candidate's most likely token is the reference's."""
    return ref.argmax(-1) == cand.argmax(-1)


if __name__ == "__main__":
    import numpy as np
    from scipy.special import rel_entr

    gen = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(4, 1000, generator=gen) * 3, -1)
    b = torch.log_softmax(torch.randn(4, 1000, generator=gen) * 3, -1)
    ours = kl(a, b).numpy()
    theirs = rel_entr(a.double().exp().numpy(), b.double().exp().numpy()).sum(-1)
    print("ours  ", ours, "\nscipy ", theirs, "\nmax rel err", np.max(np.abs(ours - theirs) / theirs))
