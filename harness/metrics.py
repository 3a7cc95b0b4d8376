"""Per-position drift metrics: pure functions over [B, V] blocks of log-probs (no I/O, no devices).

    python -m harness.metrics      # checks kl() against scipy.special.rel_entr on random rows

Direction: `lp` is the reference, `lq` the candidate; KL(ref ‖ cand) = Σ p (log p − log q), in nats.
Every function takes rows already passed through `normalize` (float64 log-probs that sum to 1):
a float32 log-softmax row over 151646 columns sums to 1 only within ~1e-5, more than the KL of a
good quantization, so both sides are renormalised and accumulated in float64. Zero probabilities
(-inf log-probs, as warpers leave them) never make NaN: a zero in p contributes nothing, and a zero
in q where p > 0 makes KL(p ‖ q) +inf.
"""

from __future__ import annotations

import functools
import math

import torch


def normalize(logp: torch.Tensor) -> torch.Tensor:
    """[B, V] log-probs (any float dtype, maybe unnormalised) -> [B, V] float64 log-probs summing to 1."""
    return torch.log_softmax(logp.double(), dim=-1)


class BadRowsError(ValueError):
    """Rows of a block that hold NaN or +inf: no distribution, so no metric. `ref_rows` and `cand_rows` are the row
    indices (within the block) on each side."""

    def __init__(self, ref_rows: list[int], cand_rows: list[int]):
        self.ref_rows, self.cand_rows = ref_rows, cand_rows
        sides = [f"{name} rows {rows}" for name, rows in (("reference", ref_rows), ("candidate", cand_rows)) if rows]
        super().__init__(f"NaN or +inf log-probs in {' and '.join(sides)} of the block: such a row is no distribution")


def bad_rows(lp: torch.Tensor) -> torch.Tensor:
    """[B] bool: the rows of [B, V] log-probs that hold NaN or +inf."""
    return (~(lp < math.inf)).any(-1)


def check_rows(ref: torch.Tensor, cand: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Raises BadRowsError naming the rows of ref and cand (among `rows`, all by default) that hold NaN or +inf."""
    index = torch.arange(len(ref)) if rows is None else rows
    r, c = (index[bad_rows(t[index])].tolist() for t in (ref, cand))
    if r or c:
        raise BadRowsError(r, c)


def _kl_sum(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[B] KL(p ‖ q) of normalised rows, d = log p − log q: Σ p·d written as Σ p·d + (q − p) over the entries where
    p > 0 (p·(d + e^−d − 1) ≥ 0, as p·expm1(−d) where |d| < 1; +inf where q = 0, as d = +inf), plus q where p = 0.
    The two sums are equal where Σp = Σq = 1; but `normalize` leaves each row's log-probs off by ~1e-15 (its float64
    log-sum-exp), which shifts every d alike. Σ p·d carries that shift whole: ~1e-14 absolute, up to 1.4e-5 relative
    of a quantised model's 1e-9 nats on LM-shaped rows, whose top token holds most of the mass. Here it weighs in
    as shift·(Σp − Σq): ~1e-30. (`position_metrics` runs at 0.81x its positions/s with it: A/B, 64 rows.)"""
    qp = torch.where(d.abs() < 1, p * torch.expm1(-d), q - p)  # q − p, without cancellation where d is small
    qp += p * d  # where q = 0 < p: d = +inf, so +inf
    return torch.where(p > 0, qp, q).sum(-1).clamp_min(0.0)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """[B] KL(p ‖ q) in nats, ≥ 0; +inf where q = 0 and p > 0 (as _kl_sum sums it)."""
    return _kl_sum(lp.exp(), lq.exp(), lp - lq)


def kl_smoothed(lp: torch.Tensor, lq: torch.Tensor, eps: float) -> torch.Tensor:
    """[B] KL(p ‖ (1 − ε) q + ε/V) in nats: finite where the candidate has zeros (filtered rows)."""
    floor = torch.full_like(lq, math.log(eps / lq.shape[-1]))
    return kl(lp, torch.logaddexp(lq + math.log1p(-eps), floor))


def js(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """[B] Jensen–Shannon divergence ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2, in nats (0 ≤ JS ≤ ln 2), summed as
    ¼ Σ (p + q)·ψ(log p − log q) (as position_metrics): the two KLs to m, summed as they are written, lost the digits
    of a tiny drift (1.7e-8 relative at JS 1e-9, 8e-4 at 8e-15 against mpmath). Entries 0 on both sides count 0."""
    terms = (lp.exp() + lq.exp()) * _psi(lp - lq)  # NaN where both are 0 (−inf − −inf), weighed by 0
    return (0.25 * torch.nan_to_num(terms, nan=0.0).sum(-1)).clamp(0.0, math.log(2.0))


def tv(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """[B] total variation ½ Σ |p − q|, in [0, 1]."""
    return (0.5 * (lp.exp() - lq.exp()).abs().sum(-1)).clamp(0.0, 1.0)


def entropy(lp: torch.Tensor) -> torch.Tensor:
    """[B] −Σ p log p in nats."""
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)


def _rounding_terms(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise float64 p u(x)²/12 of log-probs x held in `dtype` (p = e^x, 0 where x is -inf or NaN; u(x) the
    dtype's unit in the last place at x: eps 2^(e − 1) for |x| = m 2^e, m in [0.5, 1), one subnormal spacing below its
    smallest normal)."""
    x = x.float()
    info = torch.finfo(dtype)
    _, e = torch.frexp(x.abs())
    u = torch.where(x.abs() < info.smallest_normal, info.eps * info.smallest_normal, torch.ldexp(torch.full_like(x, info.eps), e - 1))
    p = torch.where(torch.isfinite(x), x.double().exp(), 0.0)
    return p * u.double().square() / 12


@functools.cache
def _rounding_table(dtype: torch.dtype) -> torch.Tensor:
    """[65536] float64: _rounding_terms of every 16-bit pattern of `dtype`, at index bits + 32768."""
    bits = (torch.arange(65536, dtype=torch.int32) - 32768).to(torch.int16)
    return _rounding_terms(bits.view(dtype), dtype)


def rounding_kl(stored: torch.Tensor) -> torch.Tensor:
    """[B] float64 nats: what rounding [B, V] log-probs to `stored`'s dtype (as a store holds them) adds to a mean KL
    against them, in expectation: Σ p u²/12. A stored log-prob x is off from the exact one by up to half its unit in
    the last place u(x), spread about uniformly: an error of variance u²/12. KL(p̃ ‖ q) then gains Σ p u²/12 at second
    order (its first-order terms have mean 0); against a candidate rounded alike, both rows renormalised, the gain is
    half this of p plus half this of q: about this, for the close pairs where it matters. Float16 rows of the tiny
    models give ~8e-7; bfloat16's 8 bits, 64 times as much; float32, 2^-26 of float16's. 16-bit rows are looked up
    per bit pattern (a 65536-entry table), 2.5x the formula's speed."""
    if stored.dtype in (torch.float16, torch.bfloat16):
        return _rounding_table(stored.dtype)[stored.contiguous().view(torch.int16).int() + 32768].sum(-1)
    return _rounding_terms(stored, stored.dtype).sum(-1)


def rank_of(lq: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B] int64: how many candidate tokens are strictly more likely than `token` (0 = its top)."""
    at = lq.gather(-1, token[:, None])
    return (lq > at).sum(-1)


def lowest_ids_first(x: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] ids (ascending) of each row's k largest values, where a tie straddles the k-th place (`kth`) the tied
    ones' lowest ids. From each row's k + 64 largest; a row whose tie runs past those is looked at whole."""
    m = min(k + 64, x.shape[1])
    vals, ids = x.topk(m, dim=-1)
    above, tied = vals > kth[:, None], vals == kth[:, None]
    whole = tied[:, -1] & (m < x.shape[1])
    past = x.shape[1]  # an id past every column: sorts last
    need = k - above.sum(1, keepdim=True)
    taken = torch.where(torch.arange(m, device=x.device) < need, torch.where(tied, ids, past).sort(1).values, past)
    out = torch.cat([torch.where(above, ids, past), taken], 1).sort(1).values[:, :k]
    if bool(whole.any()):
        rows = whole.nonzero().squeeze(1)
        xr, kr = x[rows], kth[rows, None]
        keep = xr > kr
        tr, tc = (xr == kr).nonzero().unbind(1)  # row-major: each row's tied columns ascending
        rank = torch.arange(len(tr), device=x.device) - torch.searchsorted(tr, torch.arange(len(rows), device=x.device))[tr]
        sel = rank < (k - keep.sum(1))[tr]
        keep[tr[sel], tc[sel]] = True
        out[rows] = keep.nonzero()[:, 1].view(len(rows), k)
    return out


def top_ids(lp: torch.Tensor, top, k: int) -> torch.Tensor:
    """[B, k] ids of each row's k largest log-probs, among tied values the lowest ids (torch.topk's pick inside a tie
    is unspecified; this is the fused kernel's rule, so both paths give one top-k overlap). `top`: lp.topk(m) with
    m > k where the row is wider than k, so that a tie straddling the k-th place shows."""
    ids = top.indices[:, :k]
    if top.values.shape[1] > k:
        straddle = top.values[:, k] == top.values[:, k - 1]
        if bool(straddle.any()):
            rows = straddle.nonzero().squeeze(1)
            ids = ids.clone()
            ids[rows] = lowest_ids_first(lp[rows], top.values[rows, k - 1], k)
    return ids


def at(lp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """[B] log-prob of `token` in each row."""
    return lp.gather(-1, token[:, None]).squeeze(-1)


def _psi(d: torch.Tensor) -> torch.Tensor:
    """ψ(d) = d·tanh(d/2) − 2 ln cosh(d/2) ≥ 0 of d = ln p − ln q, so that JS = ¼ Σ (p + q)·ψ(d) with no cancellation
    at tiny drift (where H(m) − (H(p) + H(q))/2 lost digits: 1.8e-6 relative at JS ~1e-9): u·d + ln(1 − u²) with
    u = tanh(d/2) for |d| < 1.5 (u² < 0.41), and 2 ln 2 − 2|d|·a/(1 + a) − 2 ln(1 + a), a = e^(−|d|), beyond (the
    fused kernel's forms); 2 ln 2 where one side is 0 (d = ±inf); NaN where both are (weighed by p + q = 0)."""
    u = torch.tanh(d / 2)
    psi = d * u + torch.log1p(-u * u)
    far = d.abs() >= 1.5  # NaN (both sides 0) stays out: its weight p + q is 0
    if bool(far.any()):
        ad = d[far].abs()
        a = torch.exp(-ad)
        psi[far] = torch.where(torch.isinf(ad), 2 * math.log(2.0), 2 * math.log(2.0) - 2 * (ad * a / (1 + a) + torch.log1p(a)))
    return psi


def position_metrics(ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, ks=(5, 10)) -> dict[str, torch.Tensor]:
    """Every per-position metric of one block: [B, V] ref and cand log-probs, [B] actual next tokens.

    Returns [B] float64 (or int64 / bool) tensors: kl, kl_rev, js, tv, top1_agree, top{k}_overlap,
    ref_top_rank (rank of the reference's top token under the candidate), delta_p (p_cand − p_ref of
    the actual next token), delta_p_top (of the reference's top token), nll_ref, nll_cand (of the
    actual next token), entropy_ref, entropy_cand, p_top_ref and margin_ref (the reference's top-1
    probability and its lead over its second token). Same formulas as the functions above, sharing
    p, q and log p − log q between them (each [B, V] float64 temporary is made once). A row with NaN or +inf
    raises BadRowsError.
    """
    check_rows(ref, cand)
    lp, lq = normalize(ref), normalize(cand)
    p, q = lp.exp(), lq.exp()
    inf = math.inf

    def xsum(x: torch.Tensor) -> torch.Tensor:  # 0 · ±inf terms (zero probabilities) count 0, +inf stays
        return torch.nan_to_num(x, nan=0.0, posinf=inf, neginf=-inf).sum(-1)

    d = lp - lq
    kl_fwd, kl_rev = _kl_sum(p, q, d), _kl_sum(q, p, -d)
    h_ref, h_cand = -xsum(p * lp), -xsum(q * lq)
    tv_ = 0.5 * (p - q).abs().sum(-1)
    js_ = 0.25 * xsum((p + q) * _psi(d))
    del d
    kmax = max(2, *ks)
    top_p, top_q = (x.topk(min(kmax + 1, x.shape[-1]), dim=-1) for x in (lp, lq))  # one more: ties past the k-th
    # argmax, not topk's first: among tied values (common in float16 stores) the lowest id wins, always
    ref_top = lp.argmax(-1)
    out = {
        "kl": kl_fwd,
        "kl_rev": kl_rev,
        "js": js_.clamp(0.0, math.log(2.0)),
        "tv": tv_.clamp(0.0, 1.0),
        "top1_agree": ref_top == lq.argmax(-1),
    }
    for k in ks:
        a, b = top_ids(lp, top_p, k), top_ids(lq, top_q, k)
        out[f"top{k}_overlap"] = (a[:, :, None] == b[:, None, :]).any(-1).double().mean(-1)
    p_top = top_p.values[:, 0].exp()
    out |= {
        "ref_top_rank": rank_of(lq, ref_top),
        "delta_p": at(q, target) - at(p, target),
        "delta_p_top": at(q, ref_top) - p_top,
        "nll_ref": -at(lp, target),
        "nll_cand": -at(lq, target),
        "entropy_ref": h_ref,
        "entropy_cand": h_cand,
        "p_top_ref": p_top,
        "margin_ref": p_top - top_p.values[:, 1].exp(),
    }
    return out


if __name__ == "__main__":
    import numpy as np
    from scipy.special import rel_entr

    gen = torch.Generator().manual_seed(0)
    a = normalize(torch.randn(4, 1000, generator=gen) * 3)
    b = normalize(torch.randn(4, 1000, generator=gen) * 3)
    ours = kl(a, b).numpy()
    theirs = rel_entr(a.exp().numpy(), b.exp().numpy()).sum(-1)
    print("ours  ", ours, "\nscipy ", theirs, "\nmax rel err", np.max(np.abs(ours - theirs) / theirs))
