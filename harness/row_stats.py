"""The per-row work of extraction, fused: raw logits -> log-probs over the real token ids, written
straight into the store's buffer in its dtype, plus the mass on the padding columns and the full
row's log normaliser.

    python -m harness.row_stats      # largest difference from the torch reference, and the speed of both

`row_stats(raw, n_vocab, out, top)` takes [R, V_padded] float32 logits. The C++ kernel (built on first
use, see harness.cext) reads each row three times while it sits in cache: the maxima of the real
and the padding columns (and the row's `top` largest logits, which the warper figures start from, so
no separate torch.topk pass), Σ exp(x − max) of each (float32 lanes, summed across blocks in float64),
then x − logsumexp(real columns) converted to float32, float16 or bfloat16 (round to nearest even,
as torch converts). Rows are split over torch.get_num_threads() threads. Where the kernel cannot
build (no g++), or has no vector path for a 16-bit output, the torch reference does the same work.
NaN or ±inf in a row gives a non-finite logsumexp, which the caller reports.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from harness import cext

KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_TOP = 256  # the largest top k the kernel keeps (its TOP_CAP)



@cache
def _lib() -> ctypes.CDLL:
    lib = cext.build("row_stats")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.rs_vector.restype = ctypes.c_int
    lib.rs_team.restype = None
    lib.rs_team.argtypes = [vp, i64, i64, i64, i64, vp, ctypes.c_int, i64, vp, vp, ctypes.c_int, vp, vp, ctypes.c_int]
    return lib


def available() -> str | None:
    """None where the kernel builds and loads here, else why not."""
    return cext.why_not(_lib)



def reference(raw: torch.Tensor, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch version: ([R, n_vocab] float32 log-probs, [R] pad mass, [R] logsumexp of the full row)."""
    lse_cut = torch.logsumexp(raw[:, :n_vocab], dim=-1)
    lse_pad = torch.logsumexp(raw[:, n_vocab:], dim=-1)  # -inf when there are no padding columns
    lse_full = torch.logaddexp(lse_cut, lse_pad)
    pad_mass = torch.exp(lse_pad - lse_full)  # mass on columns >= n_vocab
    return raw[:, :n_vocab] - lse_cut[:, None], pad_mass, lse_full


def row_stats(
    raw: torch.Tensor, n_vocab: int, out: torch.Tensor | None = None, top: int = 0, logprobs: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """[R, V_padded] float32 raw logits -> (log-probs [R, n_vocab] written into `out` (its dtype; a new
    float32 tensor if None; None without `logprobs`), [R] float32 pad mass, [R] float32 logsumexp of the full
    row, and with `top` > 0 the row's `top` largest raw logits over the full width: ([R, top] float32
    descending, [R, top] int64 columns), else None). The kernel keeps the running top (up to MAX_TOP) in the
    same read as the maximum; among equal values it keeps the lowest columns, where torch.topk's choice is
    unspecified."""
    rows, width = raw.shape
    if not logprobs:
        out = None
    elif out is None:
        out = torch.empty(rows, n_vocab)
    elif out.shape != (rows, n_vocab) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-contiguous [{rows}, {n_vocab}] tensor, not {tuple(out.shape)}")
    top = min(top, width)
    kind = -1 if out is None else KINDS.get(out.dtype)
    use_kernel = (
        available() is None and raw.dtype == torch.float32 and raw.device.type == "cpu" and raw.stride(1) == 1
        and kind is not None and (kind <= 0 or _lib().rs_vector())
    )  # fmt: skip
    if not use_kernel:
        got, pad_mass, lse = reference(raw.float(), n_vocab)
        if out is not None:
            out.copy_(got)
        return out, pad_mass, lse, raw.float().topk(top, dim=-1) if top else None
    k = top if top <= MAX_TOP else 0
    lse, pad = torch.empty(rows), torch.empty(rows)
    top_v, top_i = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int32)
    if rows:
        _lib().rs_team(raw.data_ptr(), rows, width, raw.stride(0), n_vocab, 0 if out is None else out.data_ptr(), kind,
                       0 if out is None else out.stride(0),
                       lse.data_ptr(), pad.data_ptr(), k, top_v.data_ptr(), top_i.data_ptr(),
                       max(1, min(torch.get_num_threads(), rows)))  # fmt: skip
    if not top:
        return out, pad, lse, None
    if k == 0:  # past MAX_TOP
        return out, pad, lse, raw.topk(top, dim=-1)
    top_i = top_i.long()
    short = (top_i[:, -1] < 0).nonzero().squeeze(1)  # rows with fewer than `top` entries above -inf: torch lists -inf ones
    if short.numel():
        top_v[short], top_i[short] = raw[short].topk(top, dim=-1)
    return out, pad, lse, (top_v, top_i)


if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    raw = torch.randn(32, 151936) * 3
    print(f"kernel: {available() or 'available'}")
    want, want_pad, want_lse = reference(raw, 151646)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got, pad, lse, _ = row_stats(raw, 151646, torch.empty(32, 151646, dtype=dtype))
        err = (got.float() - want.to(dtype).float()).abs().max().item()
        print(f"{str(dtype):>15}: max |Δ log-prob| {err:.2g}, |Δ lse| {(lse - want_lse).abs().max():.2g}, |Δ pad| {(pad - want_pad).abs().max():.2g}")
    for name, fn in (("torch", lambda: reference(raw, 151646)), ("fused", lambda: row_stats(raw, 151646, torch.empty(32, 151646, dtype=torch.float16)))):
        fn()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        print(f"{name}: {(time.perf_counter() - t) / 320 * 1e6:.0f} us/row")
