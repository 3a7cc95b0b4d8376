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


# --- fused CPU kernel: C++ source, built once per machine into $HARNESS_HOME/ext ----------------------
CPP = cext.EXP_F32 + cext.TOPK + r"""// One row at a time: pass 1 by blocks: max (+ NaN flag, + running top-k, + where the finite entries are while they
// are few) and the running sum of exp; pass 2 writes the kept entries; on a warped row (<= FCAP finite) the sum and
// pass 2 visit only those.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <stdlib.h>
#include <vector>
#include <algorithm>
#include <functional>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f_to_bf16(float f) {  // round to nearest even (inputs here are finite, >= 0)
  uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#ifdef __AVX512F__
// f_to_bf16 in 16 lanes (as 32-bit lanes holding the bfloat16 bits), as torch rounds when it writes a bfloat16 softmax.
static inline __m512i bf16_round16(__m512 p) {
  const __m512i u = _mm512_castps_si512(p);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
}
#endif
static inline float load1(const void* x, int bf, int64_t i) {
  return bf ? bf16_to_f(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}
#ifdef __AVX512F__
static inline __m512 load16(const void* x, int bf, int64_t i, __mmask16 m, __m512 fill) {
  if (bf) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)x + i);
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_mask_blend_ps(m, fill, v);
  }
  return _mm512_mask_loadu_ps(fill, m, (const float*)x + i);
}
// 32 entries from i, as two vectors: bfloat16 as its even entries (shifted up) and odd ones (masked), 2 ops where 16
// at a time take 4, so lane l holds entry i + 2l in *v0 and i + 2l + 1 in *v1; float32 as they come
static inline void load32(const void* x, int bf, int64_t i, __m512* v0, __m512* v1) {
  if (bf) {
    const __m512i u = _mm512_loadu_si512((const uint16_t*)x + i);
    *v0 = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *v1 = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
  } else { *v0 = _mm512_loadu_ps((const float*)x + i); *v1 = _mm512_loadu_ps((const float*)x + i + 16); }
}
#endif

// Adds (p, i) to a row's output if p survives as a nonzero value of the output dtype: at *c, then *c + 1 (REV 0), or
// at *c - 1 (REV 1: written from the last entry back).
template <int REV>
static inline void keep1(float p, int32_t i, int bf, float* vf, uint16_t* vb, int32_t* ix, int64_t* c) {
  if (bf) { uint16_t b = f_to_bf16(p); if (b) { const int64_t at = REV ? --*c : (*c)++; vb[at] = b; ix[at] = i; } }
  else if (p > 0.f) { const int64_t at = REV ? --*c : (*c)++; vf[at] = p; ix[at] = i; }
}

#ifdef __AVX512F__
// The lanes of v above thr into the running top k (lane l holds entry at + step·l, read again as stored); returns the
// new threshold.
static inline float topk_lanes(__m512 v, float thr, const void* row, int bf, int64_t at, int step, float* tv, int32_t* ti,
                               int* tc, int k, Big& big) {
  __mmask16 gt = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ);
  if (!gt) return thr;
  if (k <= 128) {
    alignas(64) float cv[16]; alignas(64) int32_t ci[16];
    const int n = __builtin_popcount(gt);
    for (int c = 0; gt; gt &= gt - 1, ++c) { const int64_t j = at + step * __builtin_ctz(gt); cv[c] = load1(row, bf, j); ci[c] = (int32_t)j; }
    if (k <= 32) topk_batch<2>(tv, ti, cv, ci, n); else if (k <= 64) topk_batch<4>(tv, ti, cv, ci, n); else topk_batch<8>(tv, ti, cv, ci, n);
    return topk_after(tv, tc, k, n);
  }
  for (; gt; gt &= gt - 1) {
    const int64_t j = at + step * __builtin_ctz(gt);
    const float e = load1(row, bf, j);
    if (e > thr) thr = big_add(big, k, thr, e, (int32_t)j);
  }
  return thr;
}

// Whether the 64 bytes of entries from i (32 bfloat16 or 16 float32) are all -inf, as most of a warped row's are: then
// they change nothing (max, NaN flag, finite list, top k), at one compare.
static inline bool ninf64(const void* row, int bf, int64_t i) {
  const __m512i u = _mm512_loadu_si512(bf ? (const void*)((const uint16_t*)row + i) : (const void*)((const float*)row + i));
  return bf ? _mm512_cmpeq_epi16_mask(u, _mm512_set1_epi16((short)0xFF80)) == 0xFFFFFFFFu
            : _mm512_cmpeq_epi32_mask(u, _mm512_set1_epi32((int)0xFF800000u)) == 0xFFFF;
}

// A dense p > 0 row's exps from its pass 1, kept for its output pass, which then takes a product an entry where it
// took an exp: e[j] = exp16s(x_j − m_g), m_g the max that Σ used over segment g = [start[g], start[g + 1]) (a new one
// wherever the running max rose; they start at multiples of 16), sc[g] = e^(m_g − m)/Σ once the row's m and Σ are
// known. A vector with a lane at or below lo[g] (about e^(−87 + m − m_g): x − m <= −87, which takes in −inf and the
// lanes pass 1 clamped) is done again from the row by exp16, as it was without the cache, which gives the subnormal
// p and the zeros that torch's float32 softmax gives. ok: false where the row's segments outnumber SEGS, or it is
// not a bfloat16 p > 0 row. On bfloat16 p > 0 rows against exp16 in the output pass: 1.07-1.23x the rows/s (A/B,
// six runs), outputs the same.
enum { SEGS = 64 };
struct ECache { std::vector<float> e; int64_t start[SEGS + 1]; float m[SEGS], sc[SEGS], lo[SEGS]; int n; bool ok; };

// A dense row's pass 3 (p > 0) over its first `to` entries in writing order, from d.done (both multiples of 16, or
// to = V): the kept p = exp(x − m) · inv and their columns. Forward (REV 0): columns ascending, appended at
// d.c = 0, 1, ... from the anchor; REV 1: columns descending, prepended at d.c = 0, -1, ... below the anchor. Either
// way a row's entries land in ascending column order; -d.c or d.c is its count when done.
// The kept entries are staged, 16 places at a time, in a register (d.sv, d.sx) that covers an aligned run of 16
// output places ("the chunk"): a full chunk goes out by non-temporal stores, which skip reading the output lines
// before writing them (44.8 against 19.0 GB/s of plain stores here), at whatever place the row starts and however
// many of its probabilities round to 0. The chunk's places before the row's first entry (REV: after its last) are
// d.skip's lanes; the chunk that holds them, and the last one, go out by plain masked stores. d.n: lanes filled
// (forward: lanes [0, n); REV: [16 − n, 16)), counting the skipped ones. Outputs whose values and indices do not
// share an alignment (not the Workspace's) are written by plain masked stores (d.staged false). d.ec: the row's
// ECache, or null (its p then from exp16 on the row); d.g: the segment of the last vector written.
struct Dense { const void* row; float m, inv; float* vf; uint16_t* vb; int32_t* ix; int64_t c, done, r;
               __m512i sv, sx, gi, gr; int n; __mmask16 skip; bool staged; const ECache* ec; int g; };
template <int REV>
static inline __attribute__((always_inline)) void dense_out(Dense& d, int bf, int64_t V, int64_t to) {
  const void* row = d.row; float* vf = d.vf; uint16_t* vb = d.vb; int32_t* ix = d.ix; int64_t c = d.c;
  const __m512 vmax = _mm512_set1_ps(d.m), vinv = _mm512_set1_ps(d.inv);
  const __m512i iota = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
  const int64_t top = (V + 15) / 16 * 16 - 16;  // the last vector's first column
  if (d.done == 0) {  // the anchor's place in its chunk
    const int ph = bf ? (int)(((uintptr_t)vb & 31) >> 1) : (int)(((uintptr_t)vf & 63) >> 2);
    d.staged = ((uintptr_t)ix & 63) == (uintptr_t)(4 * ph);
    d.n = REV ? (16 - ph) & 15 : ph;
    d.skip = (__mmask16)(REV ? (0xFFFFu << (16 - d.n)) : ((1u << d.n) - 1));
    d.sv = d.sx = _mm512_setzero_si512();
  }
  int n = d.n; __mmask16 skip = d.skip; __m512i sv = d.sv, sx = d.sx;
  // the permutes' indices for a vector of kc entries: gi puts them into the chunk's free lanes (forward: from lane n
  // up; REV: the kc lanes below 16 − n), as a two-source permute; gr moves the ones past the chunk's end to the next
  // chunk (mod 16). For kc = 16, the common case, they depend on n only and are kept (d.gi, d.gr) until n changes.
  auto perm_idx = [&](int kc, __m512i* gi, __m512i* gr) {
    *gr = _mm512_add_epi32(iota, _mm512_set1_epi32(REV ? n + kc : 16 - n));
    *gi = REV ? _mm512_mask_mov_epi32(*gr, _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32(16 - n)), iota)
              : _mm512_mask_add_epi32(iota, _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32(n)), iota, _mm512_set1_epi32(16 - n));
  };
  if (d.done == 0) { perm_idx(16, &d.gi, &d.gr); d.g = d.ec ? (REV ? d.ec->n - 1 : 0) : 0; }
  __m512i gi16 = d.gi, gr16 = d.gr;
  const ECache* ec = bf ? d.ec : nullptr; int g = d.g;  // (a constant null for float32)
  const float* E = ec ? ec->e.data() : nullptr;
  // the chunk (values sv, columns sx) to the places from q: whole and non-temporal, or its lanes `lanes` plainly
  // (bfloat16 narrowed in a register first: the narrowing store to memory is microcoded on Zen 4)
  auto out = [&](__m512i v, __m512i x, int64_t q, __mmask16 lanes) {
    if (lanes == 0xFFFF) {
      if (bf) _mm256_stream_si256((__m256i*)(vb + q), _mm512_cvtepi32_epi16(v)); else _mm512_stream_si512((__m512i*)(vf + q), v);
      _mm512_stream_si512((__m512i*)(ix + q), x);
    } else {
      if (bf) _mm256_mask_storeu_epi16(vb + q, lanes, _mm512_cvtepi32_epi16(v)); else _mm512_mask_storeu_epi32(vf + q, lanes, v);
      _mm512_mask_storeu_epi32(ix + q, lanes, x);
    }
  };
  for (int64_t j = d.done; j < to; j += 16) {
    const int64_t i = REV ? top - j : j;  // this vector's first column
    const __mmask16 msk = V - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - i)) - 1);
    __m512 p;
    __m512 e = _mm512_setzero_ps();
    if (ec) {
      if (REV) { while (i < ec->start[g]) --g; } else { while (i >= ec->start[g + 1]) ++g; }
      e = _mm512_maskz_loadu_ps(msk, E + i);
    }
    if (ec && !_mm512_mask_cmp_ps_mask(msk, e, _mm512_set1_ps(ec->lo[g]), _CMP_LE_OQ)) p = _mm512_mul_ps(e, _mm512_set1_ps(ec->sc[g]));
    else {
      const __m512 v = V - i >= 16 ? load16(row, bf, i, 0xFFFF, vmax) : load16(row, bf, i, msk, _mm512_set1_ps(-INFINITY));
      p = _mm512_mul_ps(exp16(_mm512_sub_ps(v, vmax)), vinv);
    }
    __m512i ii = _mm512_add_epi32(iota, _mm512_set1_epi32((int)i));
    __m512i pb;
#ifdef __AVX512BF16__
    // bfloat16, every lane a normal float: one rounding instruction (vcvtneps2bf16 rounds to nearest even as torch
    // does, but flushes subnormals, which bf16_round16 takes)
    if (bf && _mm512_cmp_ps_mask(p, _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ) == 0xFFFF)
      pb = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p));
    else
#endif
    pb = bf ? bf16_round16(p) : _mm512_castps_si512(p);
    const __mmask16 keep = msk & _mm512_test_epi32_mask(pb, pb);  // p > 0 (p >= 0 and not NaN here)
    const int kc = __builtin_popcount(keep);
    if (kc == 0) continue;
    if (keep != 0xFFFF) { pb = _mm512_maskz_compress_epi32(keep, pb); ii = _mm512_maskz_compress_epi32(keep, ii); }
    if (!d.staged) {
      const __mmask16 first = (__mmask16)((1u << kc) - 1);
      const int64_t at = REV ? c - kc : c;
      if (bf) _mm256_mask_storeu_epi16(vb + at, first, _mm512_cvtepi32_epi16(pb)); else _mm512_mask_storeu_epi32(vf + at, first, pb);
      _mm512_mask_storeu_epi32(ix + at, first, ii);
      c = at + (REV ? 0 : kc);
      continue;
    }
    __m512i gi = gi16, gr = gr16;
    if (kc < 16) perm_idx(kc, &gi, &gr);
    const __m512i mv = _mm512_permutex2var_epi32(sv, gi, pb), mx = _mm512_permutex2var_epi32(sx, gi, ii);
    if (n + kc >= 16) {  // the chunk is full: out, and the rest of the vector starts the next one
      out(mv, mx, REV ? c + n - 16 : c - n, (__mmask16)~skip);
      skip = 0;
      sv = _mm512_permutexvar_epi32(gr, pb); sx = _mm512_permutexvar_epi32(gr, ii);
    } else { sv = mv; sx = mx; }
    c += REV ? -kc : kc;
    if (kc < 16) { n = (n + kc) & 15; perm_idx(16, &gi16, &gr16); }
  }
  if (to == V && d.staged) {  // the row's last chunk
    const __mmask16 filled = (__mmask16)(REV ? 0xFFFFu << (16 - n) : (1u << n) - 1);
    if (filled & ~skip) out(sv, sx, REV ? c + n - 16 : c - n, (__mmask16)(filled & ~skip));
    n = 0;
  }
  d.c = c; d.done = to; d.n = n; d.skip = skip; d.sv = sv; d.sx = sx; d.gi = gi16; d.gr = gr16; d.g = g;
}
#endif

// Rows [0, n) of x (row stride `ld` elements). mode 0: keep p > 0 (cap >= V), mode 1: top k with p > 0 (cap >= k).
// The rows' kept entries go to vals/idx packed in row order: from [0] up (REV 0), or ending at [n*cap] (REV 1, rows
// done last to first, each written from its last entry back). Each row's entries are in ascending index (mode 0) or
// descending p (mode 1); counts[r] = row r's count. Returns -1, or the first bad row with *why = 1 (NaN), 2 (all
// -inf), 3 (+inf).
// (BF, MODE, REV as constants, so the compiler drops their tests from the loops; sf_rows picks the copy)
template <int BF, int MODE, int REV>
static int64_t sf_rows_t(const void* x, int64_t n, int64_t V, int64_t ld, int k, void* vals, int32_t* idx, int64_t cap,
                         int64_t* counts, int* why) {
  const int bf = BF, mode = MODE;
  int64_t pos = REV ? n * cap : 0, bad = -1;  // where the next row's entries start (REV: end)
  float tv[256]; int32_t ti[256];
#ifdef __AVX512F__
  enum { FCAP = 4096 };
  static thread_local int32_t fi[FCAP + 16];
  // a dense row's listed groups (one per 32 entries at most, so V / 16 + 2 with the last ones 16 wide), and top-k's
  // candidates among them
  static thread_local std::vector<int32_t> hits;
  static thread_local Big big;  // top-k's candidates where k > BIG_K
  if (hits.size() < (size_t)(V / 16 + 2)) hits.resize((size_t)(V / 16 + 2));
  int32_t* hit = hits.data();
  enum { CCAP = 1024 };
  static thread_local float cv[CCAP + 16]; static thread_local int32_t ci[CCAP + 16];
  // a dense bfloat16 p > 0 row's exps (ECache): two, as a row's output pass runs during the next row's pass 1. (On
  // float32 rows, twice the bytes, the cache's traffic cost more than the exps: 0.86-0.98x their rows/s.)
  static thread_local ECache ecs[2];
  int ecur = 0;
  if (!MODE && BF) for (ECache& c : ecs) if (c.e.size() < (size_t)(V + 32)) c.e.resize((size_t)(V + 32));
  const __m512i ilo = _mm512_setr_epi32(0,16,1,17,2,18,3,19,4,20,5,21,6,22,7,23), ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
  // A dense p > 0 row's writes (bound by the memory's write rate) go out one row late, 32 entries at a time inside the
  // next row's Σ exp loop (bound by arithmetic), so that the two overlap: +10% over writing each row at once; writing
  // a block of 1024 between blocks gained nothing.
  Dense pend{}; pend.r = -1;
  auto finish = [&](Dense& d) { dense_out<REV>(d, bf, V, V); counts[d.r] = REV ? -d.c : d.c; pos += d.c; d.r = -1; };
#endif
  for (int64_t rr = 0; rr < n; ++rr) {
    const int64_t r = REV ? n - 1 - rr : rr;
    const void* row = bf ? (const void*)((const uint16_t*)x + r * ld) : (const void*)((const float*)x + r * ld);
    float m = -INFINITY, thr = -INFINITY; int nan = 0, tc = 0; int64_t i = 0;
#ifdef __AVX512F__
    for (int j = 0; j < 128; ++j) tv[j] = -INFINITY;  // (an empty TopK)
    big.n = 0;
    // By blocks of BS: while the row has at most FCAP finite entries (and at least 1/4 of those read so far are
    // -inf), max, NaN, the finite entries' places and the running top k. Once it has more, Σ exp(x − max) for the blocks so far
    // (once, from cache), and from then on one look per entry: the exp sum against the max so far, with the max, NaN
    // and top-k checks folded into one compare whose hits are only listed (a block's max first, then its sum from L1,
    // ran at 0.7x these rows/s on cached rows). So the row is read from memory once, prefetched 1024 entries ahead,
    // and the exps overlap the reads.
    enum { BS = 1024 };
    int64_t nf = 0;  // finite entries listed in fi[] so far; -1 once there are more than FCAP
    int64_t summed = 0;  // a dense row: Σ covers [0, summed)
    double s = 0.0;
    __mmask16 un = 0;
    bool dense = false; float gate = 0.f; int64_t nh = 0, next = 0;  // the dense part's gate, listed groups (hit[]),
                                                                      // next settle()
    const __m512i iota16 = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
    const int es = bf ? 2 : 4;
    ECache& ec = ecs[ecur];
    ec.n = 0; ec.ok = !MODE && BF;
    float* const E = !MODE && BF ? ec.e.data() : nullptr;  // (a constant null where unused)
    auto note = [&](int64_t from, float mm) {  // Σ from column `from` on is taken against mm
      if (!ec.ok || (ec.n && ec.m[ec.n - 1] == mm)) return;
      if (ec.n == SEGS) { ec.ok = false; return; }
      ec.start[ec.n] = from; ec.m[ec.n] = mm; ++ec.n;
    };
    // A dense row's listed groups hit[0, nh), in entry order, from L2: NaN, the max (above the sums' max m, it scales
    // them, or they are done again where they overflowed), and top-k's candidates, the lanes above the gate or the
    // k-th largest so far, whichever is higher. The candidates go to the top k in chunks, in entry order as if every
    // entry had been looked at in turn (bfloat16: a group's even entries, then its odd ones), so that only a candidate
    // that enters it branches. Done where the row read so far has doubled (7 times in a 151936 row), and at its end:
    // the gate then rises with the top k (or the max), and ~130 groups are listed in an LM-shaped row, against ~550
    // with the first gate kept.
    auto settle = [&]() {
      __m512 vm = _mm512_set1_ps(-INFINITY);
      int nc = 0;
      auto take = [&](__m512 v, int64_t at, int step) {  // lane l holds entry at + step·l
        const __mmask16 c = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr > gate ? thr : gate), _CMP_GT_OQ);
        const __m512i ix = _mm512_add_epi32(_mm512_set1_epi32((int)at), step == 2 ? _mm512_add_epi32(iota16, iota16) : iota16);
        _mm512_storeu_ps(cv + nc, _mm512_maskz_compress_ps(c, v));
        _mm512_storeu_si512(ci + nc, _mm512_maskz_compress_epi32(c, ix));
        nc += __builtin_popcount(c);
      };
      auto insert = [&]() {
        if (k <= 128) {
          if (k <= 32) topk_batch<2>(tv, ti, cv, ci, nc); else if (k <= 64) topk_batch<4>(tv, ti, cv, ci, nc); else topk_batch<8>(tv, ti, cv, ci, nc);
          thr = topk_after(tv, &tc, k, nc);
        } else for (int j = 0; j < nc; ++j) if (cv[j] > thr) thr = big_add(big, k, thr, cv[j], ci[j]);
        nc = 0;
      };
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t a = hit[j];
        __m512 v0, v1;
        if (V - a < 32) {  // 16 wide
          v0 = load16(row, bf, a, V - a >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - a)) - 1), _mm512_set1_ps(-INFINITY));
          v1 = _mm512_set1_ps(-INFINITY);
          if (mode) take(v0, a, 1);
        } else {
          load32(row, bf, a, &v0, &v1);
          if (mode) { take(v0, a, bf ? 2 : 1); take(v1, bf ? a + 1 : a + 16, bf ? 2 : 1); }
        }
        un |= _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, _mm512_max_ps(v0, v1));
        if (nc > CCAP - 32) insert();
      }
      if (mode) insert();
      nh = 0;
      const float bm = _mm512_reduce_max_ps(vm);
      if (!un && bm > m) {
        if (bm < INFINITY) {
          s *= exp((double)m - (double)bm);
          if (!(s < INFINITY)) {  // a lane ~88 above m overflowed its block's sum: [0, summed) again, from bm
            const __m512 nmax = _mm512_set1_ps(bm);
            __m512 s0 = _mm512_setzero_ps();
            s = 0.0;
            ec.n = 0; note(0, bm);
            for (int64_t j = 0; j < summed; j += 16) {
              const __mmask16 msk = summed - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (summed - j)) - 1);
              const __m512 e = exp16s(_mm512_sub_ps(load16(row, bf, j, msk, _mm512_set1_ps(-INFINITY)), nmax));
              if (E) _mm512_mask_storeu_ps(E + j, msk, e);
              s0 = _mm512_add_ps(s0, e);
              if ((j & (BS - 1)) == BS - 16) { s += (double)_mm512_reduce_add_ps(s0); s0 = _mm512_setzero_ps(); }
            }
            s += (double)_mm512_reduce_add_ps(s0);
          }
        }
        m = bm;
      }
      gate = mode ? (thr > gate ? thr : gate) : m;
    };
    for (int64_t b0 = 0; b0 < V; b0 += BS) {
      const int64_t b1 = b0 + BS < V ? b0 + BS : V;
      if (nf < 0 && !un && m > -INFINITY && m < INFINITY) {
        // A dense row past its first blocks: one look per entry, Σ exp(x − m) against m, the max as of the last
        // settle(). A group of 32 entries with a lane above the gate (top-k: the k-th largest then, which is <= m;
        // else m) or NaN is only listed, without a branch, for settle() to go through. A branch here, taken ~70
        // times a row, cost over 100 cycles a hit (a mispredict drains this loop's long chains of exps), against
        // ~17 cycles a group of 32.
        if (!dense) { dense = true; gate = mode ? thr : m; next = 2 * b0; }
        const __m512 vmax = _mm512_set1_ps(m), g = _mm512_set1_ps(gate);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        note(b0, m);
        for (i = b0; i + 32 <= b1; i += 32) {
          _mm_prefetch((const char*)row + (i + 1024) * es, _MM_HINT_T0);
          if (!bf) _mm_prefetch((const char*)row + (i + 1040) * es, _MM_HINT_T0);  // (32 bfloat16 are one line)
          __m512 v0, v1;
          load32(row, bf, i, &v0, &v1);
          const __mmask16 h0 = _mm512_cmp_ps_mask(v0, g, _CMP_NLE_UQ), h1 = _mm512_cmp_ps_mask(v1, g, _CMP_NLE_UQ);
          hit[nh] = (int32_t)i; nh += (h0 | h1) != 0;
          const __m512 e0 = exp16s(_mm512_sub_ps(v0, vmax)), e1 = exp16s(_mm512_sub_ps(v1, vmax));
          if (E) {  // in column order (bfloat16's two vectors hold the even and the odd entries)
            _mm512_storeu_ps(E + i, bf ? _mm512_permutex2var_ps(e0, ilo, e1) : e0);
            _mm512_storeu_ps(E + i + 16, bf ? _mm512_permutex2var_ps(e0, ihi, e1) : e1);
          }
          s0 = _mm512_add_ps(s0, e0); s1 = _mm512_add_ps(s1, e1);
          if (pend.r >= 0) dense_out<REV>(pend, bf, V, i + 32);
        }
        for (; i < b1; i += 16) {  // the row's last entries, 16 at a time (so a listed group at V − 31 or above is 16 wide)
          const __mmask16 msk = b1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b1 - i)) - 1);
          const __m512 v = load16(row, bf, i, msk, _mm512_set1_ps(-INFINITY));
          hit[nh] = (int32_t)i; nh += _mm512_cmp_ps_mask(v, g, _CMP_NLE_UQ) != 0;
          const __m512 e = exp16s(_mm512_sub_ps(v, vmax));
          if (E) _mm512_mask_storeu_ps(E + i, msk, e);
          s0 = _mm512_add_ps(s0, e);
        }
        s += (double)_mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        summed = b1;
        if (pend.r >= 0) dense_out<REV>(pend, bf, V, b1);
        if (b1 >= next && b1 < V) { settle(); next = 2 * b1; }
        continue;
      }
      __m512 vm = _mm512_set1_ps(-INFINITY);
      for (i = b0; i < b1; i += 16) {
        _mm_prefetch((const char*)row + (i + 1024) * es, _MM_HINT_T0);
        // (warped bfloat16 rows from L3: 1.45x the rows/s; from memory, which bounds them here, the same)
        if (b1 - i >= 64 / es && ninf64(row, bf, i)) { i += 64 / es - 16; continue; }
        // (a constant mask for whole vectors: the masked bfloat16 load then needs no blend)
        __m512 v = b1 - i >= 16 ? load16(row, bf, i, 0xFFFF, _mm512_set1_ps(-INFINITY))
                                : load16(row, bf, i, (__mmask16)((1u << (b1 - i)) - 1), _mm512_set1_ps(-INFINITY));
        vm = _mm512_max_ps(vm, v); un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nf >= 0) {  // warped rows: remember where the few finite entries are, so the rest visits only them
          __mmask16 fin = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
          if (fin) {
            int cnt = __builtin_popcount(fin);
            if (nf + cnt > FCAP) nf = -1;
            else {  // compressed in a register, then stored whole (fi has 16 spare): a compress to memory is microcoded on Zen 4
              _mm512_storeu_si512(fi + nf, _mm512_maskz_compress_epi32(fin, _mm512_add_epi32(iota16, _mm512_set1_epi32((int)i))));
              nf += cnt;
            }
          }
        }
        if (mode) thr = topk_lanes(v, thr, row, bf, i, 1, tv, ti, &tc, k, big);
      }
      if (nf > b1 - b1 / 4) nf = -1;  // over 3/4 finite so far: a dense row
      const float bm = _mm512_reduce_max_ps(vm);
      if (bm > m) {
        if (summed > 0 && m > -INFINITY && bm < INFINITY) s *= exp((double)m - (double)bm);
        m = bm;
      }
      if (nf < 0 && !un && m < INFINITY) {  // a dense row (so m is finite): Σ exp(x − m) over [summed, b1), from L1/L2
        const __m512 vmax = _mm512_set1_ps(m);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        note(summed, m);
        for (i = summed; i + 32 <= b1; i += 32) {
          const __m512 e0 = exp16s(_mm512_sub_ps(load16(row, bf, i, 0xFFFF, vmax), vmax));
          const __m512 e1 = exp16s(_mm512_sub_ps(load16(row, bf, i + 16, 0xFFFF, vmax), vmax));
          if (E) { _mm512_storeu_ps(E + i, e0); _mm512_storeu_ps(E + i + 16, e1); }
          s0 = _mm512_add_ps(s0, e0); s1 = _mm512_add_ps(s1, e1);
          if (pend.r >= 0 && pend.done < i + 32) dense_out<REV>(pend, bf, V, i + 32);
        }
        for (; i < b1; i += 16) {
          __mmask16 msk = b1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b1 - i)) - 1);
          const __m512 e = exp16s(_mm512_sub_ps(load16(row, bf, i, msk, _mm512_set1_ps(-INFINITY)), vmax));
          if (E) _mm512_mask_storeu_ps(E + i, msk, e);
          s0 = _mm512_add_ps(s0, e);
        }
        s += (double)_mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        summed = b1;
      }
      if (pend.r >= 0) dense_out<REV>(pend, bf, V, b1);
    }
    if (dense) settle();
    if (mode && k > BIG_K) big_finish(big, k, tv, ti, &tc);
    if (pend.r >= 0) finish(pend);  // the blocks above wrote all of it: this sets its count
    nan = un != 0;
#else
    double s = 0.0;
    for (; i < V; ++i) { float e = load1(row, bf, i); nan |= e != e; m = e > m ? e : m;
      if (mode && e > thr) thr = topk_insert(tv, ti, &tc, k, e, (int32_t)i); }
#endif
    if (nan || m == -INFINITY || m == INFINITY) {  // (REV: the rows below may be bad too)
      *why = nan ? 1 : (m == INFINITY ? 3 : 2); bad = r;
      if (REV) continue; else return r;
    }
#ifdef __AVX512F__
    const bool listed = nf >= 0;  // at most FCAP finite entries (a warped row): sum and write from the list
    if (listed) for (int64_t j = 0; j < nf; ++j) s += exp_s(load1(row, bf, fi[j]) - m);
#else
    for (i = 0; i < V; ++i) s += exp_s(load1(row, bf, i) - m);
#endif
    const float inv = (float)(1.0 / s);
    float* vf = (float*)vals + pos; uint16_t* vb = (uint16_t*)vals + pos; int32_t* ix = idx + pos;
    int64_t c = 0;
    if (mode) {
      for (int jj = 0; jj < tc; ++jj) { const int j = REV ? tc - 1 - jj : jj; keep1<REV>(exp_s(tv[j] - m) * inv, ti[j], bf, vf, vb, ix, &c); }
    } else {
#ifdef __AVX512F__
      if (listed) for (int64_t jj = 0; jj < nf; ++jj) {
        const int64_t j = REV ? nf - 1 - jj : jj;
        keep1<REV>(exp_s(load1(row, bf, fi[j]) - m) * inv, fi[j], bf, vf, vb, ix, &c);
      } else {  // written one row behind: during the next row's pass 1, or after the loop for the last row
        pend = Dense{row, m, inv, vf, vb, ix, 0, 0, r};
        if (ec.ok && ec.n > 0) {  // the exps pass 1 kept, each segment's factor to p
          for (int g = 0; g < ec.n; ++g) {  // (lo: 1e-4 above e^−87, which covers exp16s's error)
            ec.sc[g] = ec.m[g] == m ? inv : (float)(exp((double)ec.m[g] - (double)m) / s);
            ec.lo[g] = (float)(exp(-87.0 + (double)m - (double)ec.m[g]) * 1.0001);
          }
          ec.start[ec.n] = V;
          pend.ec = &ec;
          ecur ^= 1;
        }
        continue;
      }
#else
      for (int64_t ii = 0; ii < V; ++ii) { i = REV ? V - 1 - ii : ii; keep1<REV>(exp_s(load1(row, bf, i) - m) * inv, (int32_t)i, bf, vf, vb, ix, &c); }
#endif
    }
    counts[r] = REV ? -c : c; pos += c;
  }
#ifdef __AVX512F__
  if (pend.r >= 0) finish(pend);
  _mm_sfence();
#endif
  return bad;
}

// (rev: only bfloat16 p > 0 pairs its threads, see sf_team, so only that copy runs backwards)
static int64_t sf_rows(const void* x, int bf, int64_t n, int64_t V, int64_t ld, int mode, int k, int rev,
                       void* vals, int32_t* idx, int64_t cap, int64_t* counts, int* why) {
#define SF_ROWS(B, M, R) sf_rows_t<B, M, R>(x, n, V, ld, k, vals, idx, cap, counts, why)
  if (rev) return SF_ROWS(1, 0, 1);
  return bf ? (mode ? SF_ROWS(1, 1, 0) : SF_ROWS(1, 0, 0)) : (mode ? SF_ROWS(0, 1, 0) : SF_ROWS(0, 0, 0));
#undef SF_ROWS
}

// Moves the concatenation of the nb ranges [lo[j], lo[j] + len[j]) of vals/idx (`total` entries) down to start at dst,
// with nt threads: in waves of `wave` entries in order, each read into a buffer by all threads, then written. Every
// entry moves down, so a wave's writes land below every later wave's reads.
static void move_down(char* vals, int32_t* idx, int es, const int64_t* lo, const int64_t* len, int nb, int64_t dst,
                      int64_t total, int64_t wave, int nt) {
  wave = wave < total ? wave : total;
  char* const bv = (char*)malloc(wave * (es + 4)); char* const bi = bv + wave * es;
  #pragma omp parallel num_threads(nt)
  for (int64_t k0 = 0; k0 < total; k0 += wave) {  // (every thread runs every wave, so the barriers match)
    const int64_t k1 = k0 + wave < total ? k0 + wave : total;
    int64_t a, b;
    team_part(k1 - k0, &a, &b);
    a += k0; b += k0;  // this thread's share of the wave
    int64_t base = 0;  // where range j starts in the concatenation
    for (int j = 0; j < nb; base += len[j], ++j) {
      const int64_t s = a > base ? a : base, e = b < base + len[j] ? b : base + len[j];
      if (s >= e) continue;
      memcpy(bv + (s - k0) * es, vals + (lo[j] + s - base) * es, (e - s) * es);
      memcpy(bi + (s - k0) * 4, idx + lo[j] + s - base, (e - s) * 4);
    }
    #pragma omp barrier
    memcpy(vals + (dst + a) * es, bv + (a - k0) * es, (b - a) * es);
    memcpy(idx + dst + a, bi + (a - k0) * 4, (b - a) * 4);
    #pragma omp barrier
  }
  free(bv);
}

// Rows [0, n) over an OpenMP team (contiguous parts, nt threads asked for): -1, or the first bad row with *why set.
// Then (no bad row) offsets[0..n] = the CSR offsets of counts, and the entries lie packed in row order from
// vals/idx[*start]. Each thread writes its part packed from the part's first slot (a*cap), and the blocks after the
// first move down to follow it. bfloat16 p > 0 pairs the threads instead: the even thread of each pair (t, t + 1)
// ends its entries at the boundary between their parts, where the odd thread starts its own, so a pair's entries are
// contiguous (all of them with 2 threads), and only the blocks of later pairs move (move_down, after the team).
// (A third of the realistic bfloat16 rows lose a few probabilities that round to 0, so the blocks after them would
// move: writing rows at r*cap and packing them afterwards ran at 0.65x the rows/s of the pairs. float32 rows rarely
// lose any, and there the paired thread's stores, at falling addresses, run at 0.75x.)
extern "C" int64_t sf_team(const void* x, int bf, int64_t n, int64_t V, int64_t ld, int mode, int k,
                           void* vals, int32_t* idx, int64_t cap, int64_t* counts, int64_t* offsets, int* why, int nt,
                           int64_t* start, int64_t wave) {
  const int es = bf ? 2 : 4;
  const int pairs = bf && mode == 0;  // see above
  int64_t first = -1;
  int T = 1;
  #pragma omp parallel num_threads(nt)
  {
    int64_t a, b;
    team_part(n, &a, &b);
#ifdef _OPENMP
    const int t = omp_get_thread_num(), tn = omp_get_num_threads();
#else
    const int t = 0, tn = 1;
#endif
    if (t == 0) T = tn;
    int w = 0;
    const int rev = pairs && t % 2 == 0 && t + 1 < tn;
    const int64_t bad = sf_rows((const char*)x + a * ld * es, bf, b - a, V, ld, mode, k, rev, (char*)vals + a * cap * es,
                                idx + a * cap, cap, counts + a, &w);
    #pragma omp critical
    if (bad >= 0 && (first < 0 || a + bad < first)) { first = a + bad; *why = w; }
  }
  offsets[0] = 0;
  for (int64_t r = 0; r < n; ++r) offsets[r + 1] = offsets[r] + counts[r];
  *start = 0;
  if (first >= 0) return first;
  int64_t* const lo = (int64_t*)malloc(2 * T * sizeof(int64_t)); int64_t* const len = lo + T;
  int nb = 0;
  for (int u = 0; u < T; ++nb) {  // the blocks (a pair's parts, or an unpaired last part): where each starts now
    const int w = pairs && u + 1 < T ? 2 : 1;
    const int64_t a0 = n * u / T, mid = n * (u + 1) / T, end = n * (u + w) / T;
    len[nb] = offsets[end] - offsets[a0];
    lo[nb] = w == 2 ? mid * cap - (offsets[mid] - offsets[a0]) : a0 * cap;
    u += w;
  }
  *start = lo[0];
  int64_t total = 0; bool moves = false;  // blocks 1.. follow block 0
  for (int j = 1; j < nb; ++j) { moves |= lo[j] != lo[0] + len[0] + total; total += len[j]; }
  if (moves) move_down((char*)vals, idx, es, lo + 1, len + 1, nb - 1, lo[0] + len[0], total, wave, nt);
  free(lo);
  return -1;
}

// The kernels' two roundings to bfloat16 on n values (its test holds them to torch's, ties included): bf16_round16 on
// whole vectors, f_to_bf16 on the rest.
extern "C" void sf_bf16(const float* f, uint16_t* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi32_epi16(bf16_round16(_mm512_loadu_ps(f + i))));
#endif
  for (; i < n; ++i) out[i] = f_to_bf16(f[i]);
}
// The row sums' exp (exp16s) on n values, for its accuracy test (the scalar exp_s without AVX-512).
extern "C" void sf_exp(const float* t, float* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, exp16s(_mm512_loadu_ps(t + i)));
#endif
  for (; i < n; ++i) out[i] = exp_s(t[i]);
}
"""


@cache
def _lib() -> ctypes.CDLL:
    lib = cext.build("softmax_filter", CPP)
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.sf_team.restype = i64
    lib.sf_team.argtypes = [vp, ctypes.c_int, i64, i64, i64, ctypes.c_int, ctypes.c_int, vp, vp, i64, vp, vp, vp, ctypes.c_int, vp, i64]
    lib.sf_bf16.restype, lib.sf_bf16.argtypes = None, [vp, vp, i64]
    lib.sf_exp.restype, lib.sf_exp.argtypes = None, [vp, vp, i64]
    return lib


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
