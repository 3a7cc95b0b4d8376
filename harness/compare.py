"""Streams two stores block by block through the metrics, then reduces them per pair and per prompt.

    harness compare --config configs/default.yaml      # extract, then this, then the report

Memory stays at a few [BLOCK, V] float64 blocks plus one float per metric and position.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from harness import aggregate, align, metrics, metrics_fused, progress, row_stats
from harness.store import Store, mapped_logprobs

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


def _bad_rows(exc: metrics.BadRowsError, start: int, sides: tuple[tuple[str, Store], tuple[str, Store]], rows_of=None) -> CompareError:
    """The store and positions behind a block's NaN or +inf rows (block rows from `start`; `rows_of`: per side, the
    store row of each compared row, where they are not the same), as one paragraph."""
    parts = []
    for side, ((name, store), rows) in enumerate(zip(sides, (exc.ref_rows, exc.cand_rows), strict=True)):
        if rows:
            at = [start + r if rows_of is None else int(rows_of[side][start + r]) for r in rows]
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
    ref: Store, cand: Store, target: torch.Tensor, ks, smoothing_eps: float | None = None, names=("reference", "candidate"),
    alignment: align.PairAlignment | None = None, float64_only: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every per-position metric of two stores, row by row; or, with an `alignment` (cross_vocab), of the aligned
    rows projected onto the shared vocabulary (align.VocabMap), `target` then being the reference's at those rows.
    `float64_only`: the fused kernel without its float32 fast path (the torch path is float64 throughout)."""
    fn, rows = position_metrics_fn()
    parts: dict[str, list] = {}
    start = 0
    # the fused kernel reads the stored dtype straight from the memory map; the torch path wants float32
    fused = fn is metrics_fused.fused_position_metrics
    if fused and float64_only:
        fn = functools.partial(fn, float64_only=True)
    if alignment is None:
        ref_blocks, cand_blocks = (s.blocks(rows, renormalise=False, reuse=not fused, native=fused) for s in (ref, cand))
        rows_of = None
    else:
        vocab, rows_of = alignment.vocab, (alignment.ref_rows, alignment.cand_rows)
        ref_blocks = (vocab.project(block, "ref") for block in _gathered(ref, alignment.ref_rows, rows))
        cand_blocks = (vocab.project(block, "cand") for block in _gathered(cand, alignment.cand_rows, rows))
        target = vocab.ref_column[target]
    for a, b in zip(ref_blocks, cand_blocks, strict=True):
        outside = None
        if alignment is not None:  # the shared tokens' log-probs, and how much of each row lies outside them
            (a, outside_ref), (b, outside_cand) = a, b
            outside = {"outside_ref": outside_ref, "outside_cand": outside_cand}
        try:
            block = fn(a, b, target[start : start + len(a)], ks)
        except metrics.BadRowsError as exc:
            raise _bad_rows(exc, start, ((names[0], ref), (names[1], cand)), rows_of) from None
        start += len(a)
        block |= outside or {}
        if smoothing_eps is not None:  # a finite stand-in beside every +inf KL (rare: only zeros in q, or in p for kl_rev)
            for name, (x, y) in (("kl", (a, b)), ("kl_rev", (b, a))):
                smoothed = block[name].clone()
                bad = torch.isinf(smoothed)
                if bad.any():
                    smoothed[bad] = metrics.kl_smoothed(metrics.normalize(x[bad]), metrics.normalize(y[bad]), smoothing_eps)
                block[f"{name}_smoothed"] = smoothed
        for name, values in block.items():
            parts.setdefault(name, []).append(values)
    return {name: torch.cat(values).numpy() for name, values in parts.items()}


def _gathered(store: Store, rows: torch.Tensor, block: int):
    """[<=block, V] log-prob blocks of the given store rows, in their order, in the stored dtype (memory-mapped reads)."""
    maps = [mapped_logprobs(path) for path in store.shards()]
    bounds = np.cumsum([0] + [len(m) for m in maps])
    for start in range(0, len(rows), block):
        part = rows[start : start + block].numpy()
        shard = np.searchsorted(bounds, part, side="right") - 1
        out = torch.empty(len(part), maps[0].shape[1], dtype=maps[0].dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[torch.from_numpy(sel)] = maps[s][torch.from_numpy(part[sel] - bounds[s])]
        yield out


def own_nll(store: Store) -> np.ndarray:
    """[P] float64 NLL (nats) of each stored row's own next token, against the row's logsumexp (stored rows sum to 1
    only to their dtype's rounding): the fused row kernel's (row_stats: float32 lanes summed in float64, within
    ~1e-7 nats), else torch's in float64."""
    target, out, start = store.read("target"), [], 0
    fused = row_stats.available() is None
    for block in store.blocks(FUSED_BLOCK, renormalise=False, reuse=True):
        lse = row_stats.row_stats(block, block.shape[1], logprobs=False)[2].double() if fused else torch.logsumexp(block.double(), dim=-1)
        out.append(lse - block.gather(1, target[start : start + len(block), None]).squeeze(1).double())
        start += len(block)
    return torch.cat(out).numpy()


def bits_per_byte(ref: Store, cand: Store, alignment: align.PairAlignment) -> dict:
    """Each model's NLL over the bytes of the whole spans (align.spans) in bits per byte, each on its own tokens: the
    exact likelihood comparison across tokenizers. bpb_diff = cand − ref, its se that of a ratio estimator over spans."""
    a, spans_bytes = alignment, alignment.span_bytes
    n = len(spans_bytes)
    if n == 0:
        return {"bpb_spans": 0, "bpb_bytes": 0}
    nll = [np.bincount(span, weights=own_nll(store)[rows], minlength=n) for store, rows, span in
           ((ref, a.ref_span_rows, a.ref_span), (cand, a.cand_span_rows, a.cand_span))]  # fmt: skip
    total = spans_bytes.sum()
    diff = nll[1] - nll[0]  # [S] nats per span
    d = diff.sum() / total
    se = np.sqrt(n / (n - 1) * np.sum((diff - d * spans_bytes) ** 2)) / total if n > 1 else np.nan  # one span: no spread
    return {"bpb_ref": float(nll[0].sum() / total / np.log(2)), "bpb_cand": float(nll[1].sum() / total / np.log(2)),
            "bpb_diff": float(d / np.log(2)), "bpb_diff_se": float(se / np.log(2)), "bpb_spans": int(n), "bpb_bytes": int(total)}  # fmt: skip


ROUNDING_ROWS = 256  # the reference rows, evenly spaced, that estimate its store's rounding (1.7 s on 2 cores)


def store_rounding_kl(store: Store, rows: int = ROUNDING_ROWS) -> float:
    """About what rounding `store`'s log-probs to its dtype adds to the mean KL of a close pair against it, in nats:
    metrics.rounding_kl's mean over up to `rows` of its rows, evenly spaced (the first and last among them)."""
    n = len(store.read("target"))
    if n == 0:
        return 0.0
    picked = torch.linspace(0, n - 1, min(n, rows), dtype=torch.float64).round().long().unique()
    return float(torch.cat([metrics.rounding_kl(block) for block in _gathered(store, picked, BLOCK)]).mean())


# the per-position metrics that depend on the reference's row alone
REFERENCE_COLUMNS = ("nll_ref", "entropy_ref", "p_top_ref", "margin_ref")


def reference_columns(ref: Store) -> dict[str, np.ndarray]:
    """REFERENCE_COLUMNS of every stored row, from the reference alone (its rows against themselves, in float64: the
    default run's PPL(base) to 1e-16 of a float64 log-sum-exp's, against 5e-11 from a pair, at 1.7x a pair's time). A
    pair's own values of them agree to ~1e-9 relative, but the fused kernel takes a row in float64 where either side
    needs it, so they vary with the candidate; these are what every same-vocabulary pair reports, so that a run has
    one reference PPL, entropy and confidence binning."""
    m = pair_metrics(ref, ref, ref.read("target"), (1,), float64_only=True)
    return {name: m[name] for name in REFERENCE_COLUMNS}


def compare(
    ref_name: str, ref: Store, cand_name: str, cand: Store, *, ks=(5, 10), resamples: int = 1000, seed: int = 0,
    prompt_names: list[str] | None = None, smoothing_eps: float | None = None, alignment: align.PairAlignment | None = None,
    ref_columns: dict[str, np.ndarray] | None = None, depth: tuple[np.ndarray, np.ndarray] | None = None,
) -> PairResult:  # fmt: skip
    """One (reference, candidate) pair: per-position metrics, their aggregates and per-prompt ones. With an
    `alignment` (cross_vocab), over the aligned positions only, in the shared vocabulary (align.py). `ref_columns`
    (reference_columns of `ref`) replace the pair's own reference-side columns, except in a cross_vocab pair, whose
    reference rows are renormalised over the shared tokens. `depth` (prompts.row_depths and row_windows of the
    reference's segments): each reference row's context depth and window, kept per position and binned (`by_depth`)."""
    if alignment is None:
        target = _aligned(ref_name, ref, cand_name, cand)
        keep = slice(None)
    else:
        keep = alignment.ref_rows
        target = ref.read("target")[keep]
        if not len(keep):
            raise CompareError(f"no position of {ref_name!r} aligns with one of {cand_name!r}: their tokenizers never "
                               "start a token at the same byte past each prompt's first token before a token both "
                               "vocabularies hold")  # fmt: skip
    m = pair_metrics(ref, cand, target, ks, smoothing_eps, (ref_name, cand_name), alignment)
    if ref_columns is not None and alignment is None:
        # the candidate's NLL as the reference's float64 one plus the pair's own difference (both sides of a pair come
        # from one path, alike): a candidate that gives the reference's rows has its PPL exactly, ratio 1, not 1 + 1e-10.
        # Where the reference gives the next token probability 0 (NLL +inf), inf − inf: the candidate's own NLL
        both = np.isfinite(ref_columns["nll_ref"]) & np.isfinite(m["nll_ref"])
        with np.errstate(invalid="ignore"):  # the NaN that np.where leaves out
            m["nll_cand"] = np.where(both, ref_columns["nll_ref"] + (m["nll_cand"] - m["nll_ref"]), m["nll_cand"])
        m |= ref_columns
    prompt = ref.read("prompt")[keep].numpy()
    names = prompt_names or [str(i) for i in range(int(prompt.max()) + 1)]
    position = ref.read("position")
    m |= {"prompt": prompt, "position": position[keep].numpy(), "target": target.numpy()}
    if depth is not None:
        if len(depth[0]) != len(position):
            raise CompareError(f"the store of {ref_name!r} holds {len(position)} rows, and its segments score {len(depth[0])}")
        rows = keep.numpy() if alignment is not None else slice(None)
        m["depth"], m["window"] = depth[0][rows], depth[1][rows]
    extra = {}
    if alignment is not None:
        outside_ref, outside_cand = m.pop("outside_ref"), m.pop("outside_cand")
        m["ref_row"] = alignment.ref_rows.numpy()
        extra = {"aligned_of": alignment.ref_positions, "aligned": alignment.aligned, "shared_tokens": alignment.vocab.shared,
                 "outside_mass_ref": float(outside_ref.mean()), "outside_mass_cand": float(outside_cand.mean()),
                 **bits_per_byte(ref, cand, alignment)}  # fmt: skip
    span = (int(depth[0].min()), int(depth[0].max())) if depth is not None and len(depth[0]) else None  # the run's, not the pair's
    agg = aggregate.pair_aggregates(m, prompt, ks=ks, resamples=resamples, seed=seed, depth_span=span)
    agg["pad_mass_ref"] = float(ref.read("pad_mass")[keep].double().mean())
    agg["pad_mass_cand"] = float(cand.read("pad_mass")[slice(None) if alignment is None else alignment.cand_rows].double().mean())
    return PairResult(ref_name, cand_name, agg | extra, aggregate.per_prompt(m, prompt, names, ks), m)


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


def matrix(stores: dict[str, Store], known: list[PairResult], alignment=lambda a, b: None) -> list[dict]:
    """Top-1 agreement and symmetric KL (KL(a‖b) + KL(b‖a), nats) between every pair of models; `alignment(a, b)`
    gives how two models' rows line up where their tokenizers differ (cross_vocab), else None."""
    done = {(r.reference, r.candidate): r for r in known}
    rows = []
    for a, b in progress.bar(list(itertools.combinations(stores, 2)), desc="all-pairs matrix", unit="pair", leave=False):
        if (a, b) in done or (b, a) in done:
            r = done.get((a, b)) or done[(b, a)]
            top1, sym = r.aggregates["top1_agree"], r.aggregates["kl_mean"] + r.aggregates["kl_rev_mean"]
        elif (al := alignment(a, b)) is not None:
            m = pair_metrics(stores[a], stores[b], stores[a].read("target")[al.ref_rows], (2,), names=(a, b), alignment=al)
            top1, sym = float(m["top1_agree"].mean()), float((m["kl"] + m["kl_rev"]).mean())
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
    fused = row_stats.available() is None
    for block in store.blocks(FUSED_BLOCK, renormalise=False, reuse=True):
        if fused:
            _, _, lse, (values, index) = row_stats.row_stats(block, block.shape[1], top=k, logprobs=False)
        else:
            lse = torch.logsumexp(block.double(), dim=-1)
            values, index = torch.topk(block, k, dim=-1)
        ids.append(index.to(torch.int32))
        probs.append((values.double() - lse.double()[:, None]).exp().float())
    return torch.cat(ids).numpy(), torch.cat(probs).numpy()


def warp_summary(store: Store) -> dict:
    """What the model's own generation-config warpers leave at each scored position (aggregate.warp_summary)."""
    return aggregate.warp_summary(store.read("warp_finite").numpy(), store.read("warp_mass").numpy(), store.read("pad_mass").numpy())
