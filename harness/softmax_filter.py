"""Softmax-then-filter of logits rows into a sparse form: the reference snippet and faster equivalents.

    python -m harness.softmax_filter      # checks every available implementation against the snippet

A row of raw logits ([V] float32 or bfloat16, V = 151936 for Qwen1.5 up to 7B) becomes softmax
probabilities, of which only the kept ones are stored: `p > 0` (the snippet's filter), or the `k` most
likely with p > 0 ("top-k"). Every implementation returns a `SparseRows` (CSR: row offsets, column
indices, probabilities); probabilities are in the logits' dtype, as `torch.softmax` gives them.
A row holding NaN, +inf, or nothing but -inf raises ValueError naming the row (the snippet instead
returns an empty dict for it).

Implementations (IMPLS): "snippet" (the web snippet, list of [1, V] scores -> list of dicts),
"torch" (vectorized), "compiled" (torch.compile of "torch"), "fused-cpu" (a C++ kernel built on first
use with g++ and called through ctypes, rows split over torch.get_num_threads() threads), and
"triton" (fused Triton kernels for CUDA; need triton, imported lazily; on CPU tensors too under Triton's interpreter,
TRITON_INTERPRET=1, which is how the tests run them without a GPU).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from functools import cache

import torch

from harness import cext
from harness.metrics import lowest_ids_first

WHY = {1: "holds NaN", 2: "is all -inf", 3: "holds +inf"}
MOVE_WAVE = 1 << 20  # entries per wave of fused-cpu's parallel move of later thread blocks (a buffer of 6-8 MB)


@dataclass(frozen=True)
class SparseRows:
    offsets: torch.Tensor  # [B + 1] int64: row r's entries are [offsets[r], offsets[r + 1])
    indices: torch.Tensor  # [nnz] int32 column (token id); ascending for "p>0", by descending p for "top-k"
    values: torch.Tensor  # [nnz] probabilities, the logits' dtype

    def to_dicts(self) -> list[dict[int, float]]:
        """The snippet's form: one {token id: probability} per row."""
        off, idx, val = self.offsets.tolist(), self.indices.tolist(), self.values.float().tolist()
        return [dict(zip(idx[a:b], val[a:b])) for a, b in zip(off[:-1], off[1:])]


def snippet(scores: list[torch.Tensor]) -> list[dict[int, float]]:
    """The baseline users copy from the web, exactly: a list of [1, V] scores -> a list of dicts."""
    prob_distributions = [
        {i: p for i, p in enumerate(prob[0]) if p > 0}
        for prob in [torch.softmax(score, dim=1).tolist() for score in scores]
    ]
    return prob_distributions


def bad_row_error(x: torch.Tensor, first_row: int = 0) -> ValueError:
    """The ValueError for the first row of `x` [B, V] that has no distribution (NaN, +inf, all -inf)."""
    nan, pinf, empty = x.isnan().any(1), (x == float("inf")).any(1), (x == float("-inf")).all(1)
    for why, flags in (("holds NaN", nan), ("holds +inf", pinf), ("is all -inf", empty)):
        if flags.any():
            return ValueError(f"logits row {first_row + int(flags.nonzero()[0])} {why}: it has no softmax distribution")
    return ValueError("a logits row has no softmax distribution")


def _csr(counts: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> SparseRows:
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return SparseRows(offsets, indices, values)


def torch_filter(x: torch.Tensor, filter: str = "p>0", k: int = 20) -> SparseRows:
    """[B, V] logits -> SparseRows, with whole-batch torch ops (a [B, V] softmax and mask in memory)."""
    out = _torch_ops(x, filter, k)
    if out is None:
        raise bad_row_error(x)
    return out


def _torch_ops(x: torch.Tensor, filter: str, k: int) -> SparseRows | None:
    """torch_filter's ops; None where a row has no distribution. The callers raise: under torch.compile a raise here
    fails in torch 2.11's dynamo on CUDA (an AssertionError in the frame resumed after the graph break)."""
    p = torch.softmax(x, dim=-1)
    if filter == "p>0":
        keep = p > 0
        counts = keep.sum(1)
        if bool((counts == 0).any()):  # NaN, +inf or all -inf makes the whole softmax row NaN
            return None
        return _csr(counts, keep.view(-1).nonzero().squeeze(1).remainder_(x.shape[1]).int(), p[keep])
    if bool(p[:, 0].isnan().any()):  # NaN, +inf or all -inf makes the whole softmax row NaN (before any tie is read)
        return None
    # the k largest logits (not probabilities: in bfloat16 distinct logits share a p, and the kernels rank by logit)
    lx, idx = x.topk(min(k + 1, x.shape[1]), dim=-1)  # one more: does a tie straddle the k-th place?
    if lx.shape[1] > k:
        straddle = (lx[:, k] == lx[:, k - 1]) & (lx[:, k] > float("-inf"))
        lx, idx = lx[:, :k], idx[:, :k]
        if bool(straddle.any()):  # torch.topk's pick inside a tie is unspecified: the lowest ids, as the kernels take
            rows = straddle.nonzero().squeeze(1)
            idx[rows] = lowest_ids_first(x[rows], lx[rows, k - 1], k)
    # by descending logit, among equal logits the lowest id first (a stable sort of the ids in ascending order)
    idx = idx.sort(dim=1).values
    idx = idx.gather(1, x.gather(1, idx).sort(dim=1, descending=True, stable=True).indices)
    top = p.gather(1, idx)
    keep = top > 0
    return _csr(keep.sum(1), idx[keep].int(), top[keep])


@cache
def _compiled():
    # emulate_precision_casts: without it inductor tests `p > 0` on the float32 value it computes before rounding to
    # bfloat16, and keeps tokens whose stored probability rounds to 0 (22 of 64 realistic bfloat16 rows)
    return torch.compile(_torch_ops, dynamic=True, options={"emulate_precision_casts": True})


def compiled_filter(x: torch.Tensor, filter: str = "p>0", k: int = 20) -> SparseRows:
    """torch.compile of torch_filter (the first call per shape family compiles, seconds to a minute)."""
    out = _compiled()(x, filter, k)
    if out is None:
        raise bad_row_error(x)
    return out


# --- fused CPU kernel: harness/csrc/softmax_filter.cpp, built once per machine into $HARNESS_HOME/ext -------


@cache
def _lib() -> ctypes.CDLL:
    lib = cext.build("softmax_filter")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.sf_team.restype = i64
    lib.sf_team.argtypes = [vp, ctypes.c_int, i64, i64, i64, ctypes.c_int, ctypes.c_int, vp, vp, i64, vp, vp, vp, ctypes.c_int, vp, i64]
    lib.sf_bf16.restype, lib.sf_bf16.argtypes = None, [vp, vp, i64]
    lib.sf_exp.restype, lib.sf_exp.argtypes = None, [vp, vp, i64]
    lib.sf_lanes.restype, lib.sf_lanes.argtypes = ctypes.c_int, []
    return lib


def kernel_isa() -> str:
    """Which row loops the fused CPU kernel's build runs here: "avx512", "avx2" (AVX2 and FMA, 8 lanes) or "scalar"."""
    return {16: "avx512", 8: "avx2", 1: "scalar"}[_lib().sf_lanes()]


class Workspace:
    """Output buffers kept between calls, so a stream of batches pays no allocation or page faults.
    A result built in a workspace is a view of it: the next call with the same workspace overwrites it."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


def fused_cpu_filter(x: torch.Tensor, filter: str = "p>0", k: int = 20, workspace: Workspace | None = None) -> SparseRows:
    """[B, V] CPU float32/bfloat16 logits -> SparseRows, in one read of each row from memory.

    Per row: pass 1 max (+ NaN check, + running top k) and Σ exp(x - max) against the running max, pass 2
    the kept p = exp(x - max) / Σ, written compacted (for p > 0 on a dense row, during the next row's
    pass 1). Rows are split over torch.get_num_threads() threads (ctypes drops the GIL). The outputs' exp is
    within 2e-7 relative (a scalar Cephes polynomial, ~1e-7, or on dense p > 0 rows exp16s, 1.9e-7 on [-10, 0])
    and the sum's too (exp16s), so float32 values agree with a float64 softmax to ~4e-7 relative, plus what the
    float32 rounding of x - max adds (6e-8·|x - max|, as in torch's own float32 softmax; tests: |Δp| <= 1e-6), and
    bfloat16 ones round as torch's do up to one bfloat16 ulp near a rounding boundary. Dense p > 0 rows go out by
    non-temporal stores at any alignment (dense_out's staging); bfloat16 ones take their exps from pass 1 (ECache).
    That is the AVX-512 build. A CPU with AVX2 and FMA but not AVX-512 (kernel_isa() "avx2") runs 8-lane loops:
    by blocks of 1024 entries, the first block's max (+ NaN, top k, the finite entries of a warped row) and then
    its Σ exp from L1; past it, a dense row's one look per entry (Σ exp against the max so far, one compare that
    lists the groups holding a new max, a top-k candidate, NaN or +inf), the next block prefetched. exp8s (an
    8-entry table: 1.33e-7 relative on [-10, 0]) for the sums and the p > 0 output, which a dense row writes after
    the row by plain stores. Without AVX2, scalar loops.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2:
        raise ValueError(f"fused-cpu takes a [B, V] CPU float32/bfloat16 tensor, not {x.dtype} {tuple(x.shape)} on {x.device}")
    if filter not in ("p>0", "top-k") or not 0 < k <= 256:
        raise ValueError(f"filter must be 'p>0' or 'top-k' with 0 < k <= 256, not {filter!r}, k={k}")
    lib, ws = _lib(), workspace or Workspace()
    x = x if x.stride(1) == 1 else x.contiguous()
    (B, V), mode = x.shape, int(filter == "top-k")
    cap = k if mode else V
    vals, idx = ws.get("values", B * cap, x.dtype), ws.get("indices", B * cap, torch.int32)
    counts, offsets, why = ws.get("counts", B, torch.int64), ws.get("offsets", B + 1, torch.int64), ctypes.c_int(0)
    start = ctypes.c_int64(0)
    threads = max(1, min(torch.get_num_threads(), B))
    bad = lib.sf_team(x.data_ptr(), int(x.dtype == torch.bfloat16), B, V, x.stride(0), mode, k, vals.data_ptr(),
                      idx.data_ptr(), cap, counts.data_ptr(), offsets.data_ptr(), ctypes.byref(why), threads, ctypes.byref(start), MOVE_WAVE)  # fmt: skip
    if bad >= 0:
        raise ValueError(f"logits row {bad} {WHY[why.value]}: it has no softmax distribution")
    a, nnz = start.value, int(offsets[-1])  # the entries lie packed in row order from [a]
    return SparseRows(offsets, idx[a : a + nnz], vals[a : a + nnz])


# --- fused CUDA kernels (Triton, imported on first use) ------------------------------------------------
# Launch settings of triton_filter (top-k's swept on an H200, p > 0's not yet: README, "On the GPU"): columns per
# tile of the `stats` and `write` loops, warps per program, programs per multiprocessor over the batch, G, the
# columns per step of a segment in `stats` (for top-k also the group whose max it keeps; "row" for p > 0), and
# CAP: a part whose segments hold at most CAP / segments finite logits each (a warped row's) keeps them in
# `stats`, so that `write` need not read the part again; how top-k picks its groups and then its k logits ("topk":
# tl.topk's bitonic network over the keys, as measured; "bisect": a bisection on the values); how p > 0 keeps
# finite logits ("segment": `stats`, as measured; "part": `stats_part`, block-wide steps that skip all −inf ones).
# "bisect" and "part" have not yet run on a GPU; "fuse": False runs a one-part row's top k in the `top` kernel
# rather than at the end of `stats` (whose registers and tail then hold the program); top-k's "tile" ("segments": a
# step reads G columns of each of R segments; "contiguous": R·G adjacent columns, not yet run on a GPU). TUNED: per
# (filter, dtype), over TRITON.
TRITON = {"block": 4096, "warps": 8, "waves": 4, "group": 64, "row": 256, "cap": 512, "select": "topk", "capture": "segment",
          "fuse": True, "tile": "segments"}
TUNED: dict[tuple[str, torch.dtype], dict] = {("top-k", torch.float32): {"block": 2048}, ("top-k", torch.bfloat16): {"block": 2048}}


@cache
def _triton_kernels():
    """(stats, top, write, compact, stats_part) from harness.softmax_triton, which imports triton."""
    from harness import softmax_triton as kt

    return kt.stats, kt.top, kt.write, kt.compact, kt.stats_part


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_parts(B: int, V: int, block: int, device: torch.device, waves: int | None = None) -> int:
    """Programs per row: enough for `waves` (TRITON["waves"]) per multiprocessor over the batch (a batch of 16 rows
    alone would keep 16 of an H200's 132 busy), at most one per block of the row. 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(V, block), _cdiv((waves or TRITON["waves"]) * sms, max(B, 1))))


def triton_filter(x: torch.Tensor, filter: str = "p>0", k: int = 20, parts: int | None = None, **settings) -> SparseRows:
    """[B, V] CUDA logits -> SparseRows with fused Triton kernels, each row split over `parts` programs (default
    triton_parts; `settings` override TRITON's). `stats` reads each part once: max, Σ exp and, for top-k, each
    group's max; top-k then reads only the k groups with the largest maxima again (`top`, fused into `stats` where a
    row is one part), so about 1.01 reads a row at k = 20; p > 0's `write` reads a part again only where a segment
    of it holds more than CAP / segments finite logits (a raw row's, not a warped one's). One sync a call (the
    bad-row flag and the kept count); gaps (rows that keep fewer than k, or parts that drop entries) are closed by
    `compact`. Under Triton's interpreter
    (TRITON_INTERPRET=1 before triton is imported) it also takes CPU tensors: how the tests run it without a GPU."""
    unknown = sorted(set(settings) - set(TRITON) - {"maxnreg"})
    if unknown:
        raise ValueError(f"unknown triton_filter settings {unknown}: the settings are {sorted([*TRITON, 'maxnreg'])}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("triton takes a CUDA tensor")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() != 2:
        raise ValueError(f"triton takes a [B, V] float tensor, not {x.dtype} {tuple(x.shape)}")
    if filter not in ("p>0", "top-k") or not 0 < k <= 256:
        raise ValueError(f"filter must be 'p>0' or 'top-k' with 0 < k <= 256, not {filter!r}, k={k}")
    cfg = {**TRITON, **TUNED.get((filter, x.dtype), {}), **settings}
    x = x if x.stride(1) == 1 else x.contiguous()
    (B, V), topk, dev = x.shape, filter == "top-k", x.device
    kp = _pow2(max(k, 2))  # tl.topk takes a power of 2
    G = max(16, min(cfg["group"], 4096 // kp)) if topk else cfg["row"]  # top_of_row's tile, [kp, G], stays <= 4096
    block = max(cfg["block"], G)
    if (cfg["capture"] not in ("segment", "part") or cfg["select"] not in ("topk", "bisect") or cfg["cap"] != _pow2(cfg["cap"])
            or cfg["tile"] not in ("segments", "contiguous")):  # fmt: skip
        raise ValueError(f"capture must be 'segment' or 'part', select 'topk' or 'bisect', tile 'segments' or 'contiguous', "
                         f"cap a power of 2: not {cfg}")  # fmt: skip
    part_mode = not topk and cfg["capture"] == "part"
    R = 1 if part_mode else block // G  # segments a part
    CR = cfg["cap"] if part_mode else max(1, cfg["cap"] // R)  # finite logits kept a segment
    n = parts or triton_parts(B, V, block, dev, cfg["waves"])
    W = _cdiv(_cdiv(V, n), block) * block  # each part a whole number of tiles, so each segment of groups
    n, NG = _cdiv(V, W), _cdiv(V, G)
    NGP = max(_pow2(NG), kp)
    bf16 = x.dtype == torch.bfloat16
    stats, top, write, compact, stats_part = _triton_kernels()
    stat = torch.empty(B, n, 4, dtype=torch.float32, device=dev)  # max, Σ exp(x - max), NaN flag, finite a segment
    flag = torch.zeros(2, dtype=torch.int64, device=dev)  # any bad row; entries kept
    cap = k if topk else V
    vals = torch.empty(B * cap, dtype=x.dtype, device=dev)
    idx = torch.empty(B * cap, dtype=torch.int32, device=dev)
    counts = torch.empty(B, 1 if topk else n, dtype=torch.int64, device=dev)
    out_vals = vals.view(torch.int16) if bf16 else vals  # bfloat16 p are written as their bits
    gmax = torch.empty(B * NG if topk else 1, dtype=torch.float32, device=dev)
    select = topk and cfg["select"] == "bisect"
    sel = torch.empty(B * kp if select else 1, dtype=torch.int64, device=dev)  # top_of_row's choices (bisect)
    cval = torch.empty(1 if topk else B * n * R * CR, dtype=torch.float32, device=dev)
    cidx = torch.empty(cval.numel(), dtype=torch.int32, device=dev)
    ccnt = torch.empty(1 if topk else B * n * R, dtype=torch.int32, device=dev)
    warps = {"num_warps": cfg["warps"], **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})} if dev.type == "cuda" else {}
    fused = topk and n == 1 and cfg["fuse"]  # the row's top k at the end of `stats`
    if part_mode:
        stats_part[(B, n)](x, x.stride(0), V, W, stat, cval, cidx, ccnt, BLOCK=block, CAP=CR, **warps)
    else:
        stats[(B, n)](x, x.stride(0), V, W, k, stat, gmax, NG, cval, cidx, ccnt, out_vals, idx, counts, flag, sel, R=R, G=G,
                      CR=CR, TOPK=topk, FUSED=fused, KP=kp, NGP=NGP, BF16=bf16, SELECT=select,
                      CONTIG=topk and cfg["tile"] == "contiguous", **warps)  # fmt: skip
    if topk and not fused:
        top[(B,)](x, x.stride(0), V, k, n, stat, gmax, NG, out_vals, idx, counts, flag, sel, NP=_pow2(n), G=G, KP=kp,
                  NGP=NGP, BF16=bf16, SELECT=select, **warps)  # fmt: skip
    elif not topk:
        write[(B, n)](x, x.stride(0), V, W, cap, stat, cval, cidx, ccnt, out_vals, idx, counts, flag, BLOCK=block, R=R,
                      CR=CR, NP=_pow2(n), BF16=bf16, **warps)  # fmt: skip
    offsets = torch.arange(0, (B + 1) * cap, cap, dtype=torch.int64, device=dev)  # where no row has gaps
    bad, kept = flag.tolist()  # the call's one sync
    if bad:
        raise bad_row_error(x)
    if kept == B * cap:
        return SparseRows(offsets, idx, vals)
    flat = counts.view(-1)
    dst = torch.cumsum(flat, 0) - flat
    packed_vals, packed_idx = torch.empty(kept, dtype=x.dtype, device=dev), torch.empty(kept, dtype=torch.int32, device=dev)
    compact[counts.shape](out_vals, idx, flat, dst, W if not topk else k, cap,
                          packed_vals.view(torch.int16) if bf16 else packed_vals, packed_idx, BLOCK=1024)  # fmt: skip
    return _csr(counts.sum(1), packed_idx, packed_vals)


IMPLS = {"torch": torch_filter, "compiled": compiled_filter, "fused-cpu": fused_cpu_filter, "triton": triton_filter}


def available(name: str, device: str) -> str | None:
    """None where implementation `name` can run on `device` ("cpu"/"cuda"), else why not."""
    try:
        if name == "fused-cpu":
            if device != "cpu":
                return "fused-cpu is the CPU kernel"
            _lib()
        if name == "triton":
            if device != "cuda":
                return "triton needs CUDA"
            import triton  # noqa: F401
    except (ImportError, RuntimeError, OSError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def same(ref: list[dict[int, float]], got: SparseRows, filter: str = "p>0", k: int = 20, atol: float = 1e-6,
         exact: torch.Tensor | None = None) -> str | None:
    """None where `got` equals the snippet's `ref` (same kept tokens, |Δp| <= atol), else the first difference.
    For top-k: every token the snippet gives more than its k-th probability, and the rest of the k from those
    tied with it (which of a tie straddling the k-th place: see test_bench's tie test, the lowest ids).
    `exact`: the rows' [B, V] float64 softmax; a probability off the snippet's by more than atol then passes where
    it is within atol of the exact one, plus half a unit in the last place of got's dtype (a bfloat16 output is
    the exact p rounded). torch's own float32 softmax is off by up to ~2.3e-6 where one token holds most of a row
    (its float32 Σ adds the small terms to ~1), more than atol, so on LM-shaped rows the snippet alone would fail an
    implementation that is closer to the exact values than it is (the fused kernel: 3.3e-7)."""
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}.get(got.values.dtype, 53)
    for r, (want, have) in enumerate(zip(ref, got.to_dicts(), strict=True)):
        if filter == "top-k":
            order = sorted(want.values(), reverse=True)
            kth = order[min(k, len(order)) - 1]
            above = {i for i, p in want.items() if p > kth}
            if len(have) != min(k, len(want)) or not above <= have.keys() or any(want.get(i, -1.0) < kth for i in have):
                return f"row {r}: top-k tokens differ ({len(above - have.keys())} above the k-th missing)"
        elif have.keys() != want.keys():
            return f"row {r}: kept {len(have)} tokens, the snippet {len(want)} ({sorted(have.keys() ^ want.keys())[:5]} differ)"
        def off(i: int, p: float) -> float:  # how far p is beyond what it may differ by
            d = abs(p - want[i]) - atol
            if d > 0 and exact is not None:
                e = float(exact[r, i])
                d = min(d, abs(p - e) - atol - (math.ldexp(1.0, math.frexp(e)[1] - 1 - bits) if e > 0 else 0.0))
            return d

        worst = max(((off(i, p), i, p) for i, p in have.items()), default=(0.0, -1, 0.0))
        if worst[0] > 0:
            i, p = worst[1], worst[2]
            tail = f", the exact {float(exact[r, i]):.9g}" if exact is not None else ""
            return f"row {r}: probability of {i} off by {abs(p - want[i]):.3g} > {atol} (got {p:.9g}, the snippet {want[i]:.9g}{tail})"
    return None


if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5000, generator=gen) * 3
    x[1, 1::2], x[2, 1:] = x[1, 0], float("-inf")  # ties; a single finite entry
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(device, dtype)
        ref = snippet(list(xd.split(1)))
        for name, fn in IMPLS.items():
            why = available(name, device)
            for filter in ("p>0", "top-k"):
                diff = why or same(ref, fn(xd, filter), filter, atol=1e-6 if dtype == torch.float32 else 4e-3, exact=torch.softmax(xd.double(), -1).cpu())
                print(f"{name:>10} {str(dtype):>15} {filter:>6}: {diff or 'same as the snippet'}")
