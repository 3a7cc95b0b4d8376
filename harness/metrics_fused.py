"""Every per-position metric of `metrics.position_metrics` from one fused C++ kernel per row pair.

    python -m harness.metrics_fused      # max relative difference from metrics.position_metrics, and speed

Same inputs, keys, dtypes and semantics as `metrics.position_metrics` ([B, V] ref and cand log-probs,
maybe unnormalised, -inf allowed; [B] targets): KL(ref ‖ cand) etc. in nats, as if renormalised in
float64. The kernel (C++ in harness/csrc/metrics_fused.cpp, built on first use with g++ into $HARNESS_HOME/ext, called
through ctypes, rows split over torch.get_num_threads() OpenMP threads) computes every metric of a row pair, the
scalar ones (Δp, NLL, margin, top-k overlaps) included, and takes one of two paths:

- float32 fast path, for finite rows whose normalisers differ by |c| ≤ 0.01 (stored log-prob rows always
  do). Pass 1, the one read of the rows (prefetched 4 KB ahead, two groups of 16 at a time): the top-k
  lists (stable: among ties the lowest id ranks first, as argmax does; csrc/topk.h's registers for K <= 128,
  its key buffer beyond); e = exp(x − max) in float32 (the max of x taken while the row before is read)
  and d0 = x − y, both kept in per-thread buffers (1.2 MB); Σe (terms over e^-8 straight into float64, the
  rest by Kahan-compensated float32 sums; the top 16 terms redone in float64, so a peaked row's ln Z is exact to
  ~1e-15); the entropy sums; and Σ e·(e^(−d0) − 1) (likewise; terms above 2^-23 of the row's largest
  computed in float64), which gives c = ln Z_x − ln Z_y = −ln(1 + Σ p·(e^(−d0) − 1)) with no cancellation:
  c comes out as exact as the drift it measures (~1e-13 absolute at a quantised model's drift), which Δp
  and TV need. Pass 2 reads only the buffers: p = e / Z, d = d0 − c = ln p − ln q, q = p·e^(−d), and each
  sum in a form whose float32 rounding stays relative: KL = Σ p·g(d), KL_rev = Σ q·g(−d) with g(d) = d − 1
  + e^(−d) ≥ 0, TV = Σ p·|e^(−d) − 1|, JS = ¼ Σ (p+q)·ψ(d) with ψ = d·tanh(d/2) − 2 ln cosh(d/2) ≥ 0, all
  as series in d² while |d0| ≤ 0.2 in a group of 16 (the drift of a quantised model); float32 partial sums
  go into float64 once per 512 entries. Groups with a larger |d0| (up to 30) stay in float32 with exps on
  those lanes (a drift like base vs chat's; see med16 for the forms that keep them exact); groups beyond,
  or with -inf, go in float64 (exp8 and a log1p kernel). The rank of the reference's top token is read off
  the candidate's top-k list where it is in it.
- float64 kernel, for every other row (-inf entries, unnormalised rows, NaN): exps to ~1 ulp in
  float64, Kahan-compensated normalisers, the same non-cancelling KL, KL_rev (Σ p·g(d) in series where |d| <= 0.2;
  until 2026-12-07 Σ p·d − c, whose 1e-15 error in the normalisers was 7e-3 of a KL of 2.4e-13) and JS.

Both paths agree with the float64 torch reference within 1e-6 relative (tests/test_metrics_fused.py).
Top-k ties: the lowest ids win, here and in the torch reference (metrics.top_ids), so top{k}_overlap is equal.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from harness import cext, metrics

MAX_K = 256
NATIVE = {torch.float16: 1, torch.bfloat16: 2}  # 16-bit dtypes the kernel reads itself (pm_team's kind)
FIXED = ("kl", "kl_rev", "js", "tv", "top1_agree", "ref_top_rank", "delta_p", "delta_p_top", "nll_ref", "nll_cand",
         "entropy_ref", "entropy_cand", "p_top_ref", "margin_ref")  # fmt: skip



@cache
def _lib() -> ctypes.CDLL:
    lib = cext.build("metrics_fused")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.pm_team.restype = None
    lib.pm_team.argtypes = [vp, vp, ctypes.c_int, i64, i64, i64, i64, ctypes.c_int, vp, vp, ctypes.c_int, ctypes.c_int, vp, vp,
                            ctypes.c_int]  # fmt: skip
    lib.pm_native.restype = ctypes.c_int
    lib.sym_team.restype = None
    lib.sym_team.argtypes = [vp, vp, ctypes.c_int, i64, i64, i64, i64, vp, ctypes.c_int]
    return lib


def available() -> str | None:
    """None where the fused kernel builds and loads here, else why not."""
    return cext.why_not(_lib)


def fused_position_metrics(
    ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, ks=(5, 10), *, float64_only: bool = False
) -> dict[str, torch.Tensor]:
    """`metrics.position_metrics` from the fused kernel: [B, V] ref and cand log-probs (any float dtype,
    maybe unnormalised; read as float32), [B] next tokens -> the same dict of [B] float64 / int64 / bool
    tensors (KL(ref ‖ cand), kl_rev, js in nats; see metrics.position_metrics for every key). float16 and
    bfloat16 pairs of one dtype (a store's rows, memory-mapped) go in as they are: the kernel converts each row
    pair as it takes it, with no [B, V] float32 copy. `float64_only` skips the float32 fast path (for tests and
    the benchmark)."""
    if ref.dim() != 2 or ref.shape != cand.shape or ref.device.type != "cpu" or cand.device.type != "cpu":
        raise ValueError(f"fused_position_metrics takes two [B, V] CPU tensors, not {tuple(ref.shape)} and {tuple(cand.shape)}")
    (B, V), K = ref.shape, max(2, *ks)
    if K > min(MAX_K, V) or min(ks) < 1:
        raise ValueError(f"top-k sizes must be in [1, {min(MAX_K, V)}], not {tuple(ks)}")
    lib = _lib()
    kind = NATIVE.get(ref.dtype, 0) if ref.dtype == cand.dtype and lib.pm_native() else 0
    x, y = (t.float() if not kind and t.dtype != torch.float32 else t for t in (ref, cand))
    x, y = (t if t.stride(1) == 1 else t.contiguous() for t in (x, y))
    t = target.to(torch.int64).contiguous()
    if t.shape != (B,) or (B and not (0 <= int(t.min()) and int(t.max()) < V)):
        raise ValueError(f"targets must be [{B}] token ids in [0, {V}), not shape {tuple(t.shape)}")
    kk = torch.tensor(ks, dtype=torch.int32)
    width = len(FIXED) + len(ks)
    out = torch.empty(B, width, dtype=torch.float64)
    top = torch.empty(B, 2, K, dtype=torch.int32)

    lib.pm_team(x.data_ptr(), y.data_ptr(), kind, B, V, x.stride(0), y.stride(0), K, t.data_ptr(), kk.data_ptr(), len(ks),
                int(float64_only), out.data_ptr(), top.data_ptr(), max(1, min(torch.get_num_threads(), B)))  # fmt: skip
    cols = out.T.contiguous()
    if cols[5].isnan().any():  # the kernel could not allocate its per-thread buffer
        raise MemoryError("the fused metrics kernel could not allocate its ~4 MB per-thread buffer")
    if cols[0].isnan().any():  # rows with NaN or +inf (rank -1, the rest NaN)
        flagged = cols[0].isnan().nonzero().flatten()
        metrics.check_rows(ref, cand, flagged)
        raise RuntimeError(f"the fused metrics kernel flagged rows {flagged.tolist()}, which hold no NaN or +inf")
    res = dict(zip(FIXED, cols[: len(FIXED)], strict=True))
    res["top1_agree"] = res["top1_agree"] > 0
    res["ref_top_rank"] = res["ref_top_rank"].long()
    order = list(FIXED[:5]) + [f"top{k}_overlap" for k in ks] + list(FIXED[5:])
    res |= {f"top{k}_overlap": cols[len(FIXED) + j] for j, k in enumerate(ks)}
    return {key: res[key] for key in order}


def fused_sym_kl_top1(ref: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The all-pairs matrix's numbers for [B, V] ref and cand log-probs (as `fused_position_metrics` takes them):
    [B] float64 KL(ref ‖ cand) + KL(cand ‖ ref) in nats and [B] bool top-1 agreement, from the kernel's sym_rows (2
    exps an entry); rows with a non-finite entry, and every row where the kernel has no AVX-512 copy, from
    `fused_position_metrics`."""
    if ref.dim() != 2 or ref.shape != cand.shape or ref.device.type != "cpu" or cand.device.type != "cpu":
        raise ValueError(f"fused_sym_kl_top1 takes two [B, V] CPU tensors, not {tuple(ref.shape)} and {tuple(cand.shape)}")
    B, V = ref.shape
    lib = _lib()
    if not lib.pm_native():
        m = fused_position_metrics(ref, cand, torch.zeros(B, dtype=torch.int64), (2,))
        return m["kl"] + m["kl_rev"], m["top1_agree"]
    kind = NATIVE.get(ref.dtype, 0) if ref.dtype == cand.dtype else 0
    x, y = (t.float() if not kind and t.dtype != torch.float32 else t for t in (ref, cand))
    x, y = (t if t.stride(1) == 1 else t.contiguous() for t in (x, y))
    out = torch.empty(B, 2, dtype=torch.float64)
    lib.sym_team(x.data_ptr(), y.data_ptr(), kind, B, V, x.stride(0), y.stride(0), out.data_ptr(),
                 max(1, min(torch.get_num_threads(), B)))  # fmt: skip
    sym, top1 = out[:, 0].clone(), out[:, 1] > 0
    rest = (~torch.isfinite(sym)).nonzero().flatten()
    if len(rest):  # -inf, +inf or NaN in a row, or a sum out of float32's range: the full kernel, which handles them
        try:  # (and raises BadRowsError for NaN or +inf, with rows of ref[rest]: named here as rows of ref)
            m = fused_position_metrics(ref[rest], cand[rest], torch.zeros(len(rest), dtype=torch.int64), (2,))
        except metrics.BadRowsError as exc:
            raise metrics.BadRowsError(rest[exc.ref_rows].tolist(), rest[exc.cand_rows].tolist()) from None
        sym[rest], top1[rest] = m["kl"] + m["kl_rev"], m["top1_agree"]
    return sym, top1


if __name__ == "__main__":
    import time

    from harness import bench

    why = available()
    if why:
        raise SystemExit(f"fused kernel unavailable: {why}")
    width, rows = 151646, 64
    ref = torch.log_softmax(bench.realistic_logits(rows, width, seed=1), -1)
    cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
    target = torch.randint(0, width, (rows,), generator=torch.Generator().manual_seed(3))
    want = metrics.position_metrics(ref[:16], cand[:16], target[:16])
    got = fused_position_metrics(ref[:16], cand[:16], target[:16])
    for key, w in want.items():
        if key.endswith("_overlap"):  # both take tied values' lowest ids: equal
            print(f"{key:>14}: rows that differ {int((got[key] != w).sum())} of {len(w)}")
            continue
        diff = ((got[key].double() - w.double()).abs() / w.double().abs().clamp_min(1e-12)).max()
        print(f"{key:>14}: max relative difference {float(diff):.2e}")
    for f64 in (False, True):
        start = time.perf_counter()
        fused_position_metrics(ref, cand, target, float64_only=f64)
        rate = rows / (time.perf_counter() - start)
        path = "float64 kernel" if f64 else "fast path"
        print(f"{path}: {rate:.0f} positions/s, {rate * width * 8 / 1e9:.2f} GB/s read, {torch.get_num_threads()} threads")
