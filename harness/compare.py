"""Streams two stores block by block through the metrics, then reduces them per pair and per prompt.

    harness compare --config configs/default.yaml      # extract, then this, then the report

Memory stays at a few [BLOCK, V] float64 blocks plus one float per metric and position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import aggregate, metrics, metrics_fused, row_stats
from harness.store import Store

# rows per block: 16 x 151646 float64 = 19 MB per temporary of the torch path, under glibc's 32 MB mmap
# threshold, so temporaries reuse heap pages instead of page-faulting fresh ones on every operation. The
# fused kernel has no temporaries and reads blocks into reused buffers, so it takes larger blocks: fewer
# calls, less thread wake-up per row.
BLOCK = 16
FUSED_BLOCK = 64


class CompareError(RuntimeError):
    pass


@dataclass(frozen=True)
class PairResult:
    reference: str
    candidate: str
    aggregates: dict  # every aggregate (aggregate.pair_aggregates), plus kl_floor_multiple if a floor is set
    prompts: list[dict]  # per-prompt aggregates
    positions: dict[str, np.ndarray] = field(repr=False)  # per-position metric arrays, [P] each


def _aligned(ref_name: str, ref: Store, cand_name: str, cand: Store) -> torch.Tensor:
    target = ref.read("target")
    if not torch.equal(target, cand.read("target")):
        raise CompareError(f"stores of {ref_name!r} and {cand_name!r} do not hold the same token positions")
    return target


def _bad_rows(exc: metrics.BadRowsError, start: int, sides: tuple[tuple[str, Store], tuple[str, Store]]) -> CompareError:
    """The store and positions behind a block's NaN or +inf rows (block rows from `start`), as one paragraph."""
    parts = []
    for (name, store), rows in zip(sides, (exc.ref_rows, exc.cand_rows), strict=True):
        if rows:
            at = [start + r for r in rows]
            prompt, position = store.read("prompt"), store.read("position")
            where = ", ".join(f"row {i} (prompt {int(prompt[i])}, token {int(position[i])})" for i in at[:5])
            more = f" and {len(at) - 5} more" if len(at) > 5 else ""
            parts.append(f"the store of {name!r} ({store.root}) holds NaN or +inf log-probs at {where}{more}")
    return CompareError(
        "; ".join(parts) + ". Extraction refuses such logits and checksums every shard, so the store was written by "
        "something else or changed since: delete that folder and run `harness extract` again (the other stores stay)."
    )


def position_metrics_fn():
    """(function, rows per block): the fused C++ kernel where it builds (g++ present), else the torch reference."""
    if metrics_fused.available() is None:
        return metrics_fused.fused_position_metrics, FUSED_BLOCK
    return metrics.position_metrics, BLOCK


def pair_metrics(
    ref: Store, cand: Store, target: torch.Tensor, ks, smoothing_eps: float | None = None, names=("reference", "candidate")
) -> dict[str, np.ndarray]:
    fn, rows = position_metrics_fn()
    parts: dict[str, list] = {}
    start = 0
    # the fused kernel reads the stored dtype straight from the memory map; the torch path wants float32
    fused = fn is metrics_fused.fused_position_metrics
    ref_blocks, cand_blocks = (s.blocks(rows, renormalise=False, reuse=not fused, native=fused) for s in (ref, cand))
    for a, b in zip(ref_blocks, cand_blocks, strict=True):
        try:
            block = fn(a, b, target[start : start + len(a)], ks)
        except metrics.BadRowsError as exc:
            raise _bad_rows(exc, start, ((names[0], ref), (names[1], cand))) from None
        start += len(a)
        if smoothing_eps is not None:  # a finite stand-in beside every +inf KL (rare: only zeros in q)
            smoothed = block["kl"].clone()
            bad = torch.isinf(smoothed)
            if bad.any():
                smoothed[bad] = metrics.kl_smoothed(metrics.normalize(a[bad]), metrics.normalize(b[bad]), smoothing_eps)
            block["kl_smoothed"] = smoothed
        for name, values in block.items():
            parts.setdefault(name, []).append(values)
    return {name: torch.cat(values).numpy() for name, values in parts.items()}


def compare(
    ref_name: str, ref: Store, cand_name: str, cand: Store, *, ks=(5, 10), resamples: int = 1000, seed: int = 0,
    prompt_names: list[str] | None = None, smoothing_eps: float | None = None,
) -> PairResult:  # fmt: skip
    target = _aligned(ref_name, ref, cand_name, cand)
    m = pair_metrics(ref, cand, target, ks, smoothing_eps, (ref_name, cand_name))
    prompt = ref.read("prompt").numpy()
    names = prompt_names or [str(i) for i in range(int(prompt.max()) + 1)]
    m |= {"prompt": prompt, "position": ref.read("position").numpy(), "target": target.numpy()}
    agg = aggregate.pair_aggregates(m, prompt, ks=ks, resamples=resamples, seed=seed)
    agg["pad_mass_ref"] = float(ref.read("pad_mass").double().mean())
    agg["pad_mass_cand"] = float(cand.read("pad_mass").double().mean())
    return PairResult(ref_name, cand_name, agg, aggregate.per_prompt(m, prompt, names), m)


def pair_sym_top1(ref: Store, cand: Store, target: torch.Tensor, names=("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """[P] KL(ref ‖ cand) + KL(cand ‖ ref) and [P] top-1 agreement: from the fused kernel's symmetric-KL path (2
    to 4 exps an entry, ~3x the full kernel's speed on pairs that drift far) where it builds, else pair_metrics."""
    if metrics_fused.available() is not None:
        m = pair_metrics(ref, cand, target, ks=(2,), names=names)
        return m["kl"] + m["kl_rev"], m["top1_agree"]
    sym, top1 = [], []
    ref_blocks, cand_blocks = (s.blocks(FUSED_BLOCK, renormalise=False, native=True) for s in (ref, cand))
    start = 0
    for a, b in zip(ref_blocks, cand_blocks, strict=True):
        try:
            s, t = metrics_fused.fused_sym_kl_top1(a, b)
        except metrics.BadRowsError as exc:
            raise _bad_rows(exc, start, ((names[0], ref), (names[1], cand))) from None
        start += len(a)
        sym.append(s)
        top1.append(t)
    return torch.cat(sym).numpy(), torch.cat(top1).numpy()


def matrix(stores: dict[str, Store], known: list[PairResult]) -> list[dict]:
    """Top-1 agreement and symmetric KL (KL(a‖b) + KL(b‖a), nats) between every pair of models."""
    done = {(r.reference, r.candidate): r for r in known}
    rows = []
    for a, b in tqdm(list(itertools.combinations(stores, 2)), desc="all-pairs matrix", unit="pair", leave=False):
        if (a, b) in done or (b, a) in done:
            r = done.get((a, b)) or done[(b, a)]
            top1, sym = r.aggregates["top1_agree"], r.aggregates["kl_mean"] + r.aggregates["kl_rev_mean"]
        else:
            s, t = pair_sym_top1(stores[a], stores[b], _aligned(a, stores[a], b, stores[b]), (a, b))
            top1, sym = float(t.mean()), float(s.mean())
        rows.append({"a": a, "b": b, "top1_agree": top1, "sym_kl_mean": sym})
    return rows


def top_tokens(store: Store, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Each position's k most likely tokens: [P, k] int32 ids and [P, k] float32 probabilities, renormalised over the
    stored row (stored rows sum to 1 only to their dtype's rounding). From the fused row kernel where it builds
    (row_stats: the row's top k and logsumexp in one read; among equal log-probs the lowest id first; its float32
    logsumexp puts the probabilities within ~1e-6 relative), else torch.topk and a float64 logsumexp."""
    ids, probs = [], []
    fused, scratch = row_stats.available() is None, None
    for block in store.blocks(FUSED_BLOCK, renormalise=False, reuse=True):
        if fused:  # its log-prob output goes to a scratch buffer
            scratch = torch.empty(block.shape) if scratch is None else scratch
            _, _, lse, (values, index) = row_stats.row_stats(block, block.shape[1], scratch[: len(block)], top=k)
        else:
            lse = torch.logsumexp(block.double(), dim=-1)
            values, index = torch.topk(block, k, dim=-1)
        ids.append(index.to(torch.int32))
        probs.append((values.double() - lse.double()[:, None]).exp().float())
    return torch.cat(ids).numpy(), torch.cat(probs).numpy()


def warp_summary(store: Store) -> dict:
    """What the model's own generation-config warpers leave at each scored position (aggregate.warp_summary)."""
    return aggregate.warp_summary(store.read("warp_finite").numpy(), store.read("warp_mass").numpy(), store.read("pad_mass").numpy())
