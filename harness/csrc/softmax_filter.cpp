// The fused-cpu softmax/filter kernel (harness/softmax_filter.py loads it through harness/cext.py).
#include "exp_f32.h"
#include "topk.h"
// One row at a time: pass 1 by blocks: max (+ NaN flag, + running top-k, + where the finite entries are while they
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

#if KERNEL_AVX2
// f_to_bf16 in 8 lanes (as bf16_round16)
static inline __m256i bf16_round8(__m256 p) {
  const __m256i u = _mm256_castps_si256(p);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
}
// 8 entries from i as floats (bfloat16 widened); at a row's end (V − i < 8) the missing lanes are -inf
static inline __m256 load8(const void* x, int bf, int64_t i, int64_t V) {
  if (V - i >= 8) {
    if (bf) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + i))), 16));
    return _mm256_loadu_ps((const float*)x + i);
  }
  alignas(32) float t[8];
  for (int l = 0; l < 8; ++l) t[l] = i + l < V ? load1(x, bf, i + l) : -INFINITY;
  return _mm256_load_ps(t);
}
// 16 entries from i as two vectors: bfloat16 as its even entries (shifted up) and its odd ones (masked), 2 ops where two
// load8 take 4 (for sums and gates, where the order of the entries does not matter); float32 as they come
static inline void load16x2(const void* x, int bf, int64_t i, int64_t V, __m256* v0, __m256* v1) {
  if (bf && V - i >= 16) {
    const __m256i u = _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i));
    *v0 = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    *v1 = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
  } else { *v0 = load8(x, bf, i, V); *v1 = load8(x, bf, i + 8, V); }
}
// Whether the 64 bytes of entries from i (32 bfloat16 or 16 float32) are all -inf, as most of a warped row's are: then
// they change nothing (max, NaN flag, finite list, top k), at one compare a 32 bytes.
static inline bool ninf64_8(const void* row, int bf, int64_t i) {
  const __m256i* p = (const __m256i*)(bf ? (const void*)((const uint16_t*)row + i) : (const void*)((const float*)row + i));
  const __m256i a = _mm256_loadu_si256(p), b = _mm256_loadu_si256(p + 1);
  const __m256i ni = bf ? _mm256_set1_epi16((short)0xFF80) : _mm256_set1_epi32((int)0xFF800000u);
  const __m256i eq = bf ? _mm256_and_si256(_mm256_cmpeq_epi16(a, ni), _mm256_cmpeq_epi16(b, ni))
                        : _mm256_and_si256(_mm256_cmpeq_epi32(a, ni), _mm256_cmpeq_epi32(b, ni));
  return _mm256_movemask_epi8(eq) == -1;
}
// A dense row's p > 0 output, 8 columns at a time: p = exp(x − m) · inv (subnormal p included, as torch gives them),
// the lanes that stay nonzero in the output dtype (f_to_bf16's rounding, as integers) appended at *c (REV: the row
// from its last vector back, each vector's kept lanes prepended below *c), whole vectors by one store each.
template <int REV>
static inline void dense_out8(const void* row, int bf, int64_t V, float m, float inv, float* vf, uint16_t* vb, int32_t* ix,
                              int64_t* cp) {
  const __m256 vmax = _mm256_set1_ps(m), vinv = _mm256_set1_ps(inv);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t nv = (V + 7) / 8;
  int64_t c = *cp;
  for (int64_t jj = 0; jj < nv; ++jj) {
    const int64_t i = 8 * (REV ? nv - 1 - jj : jj);
    const __m256 p = _mm256_mul_ps(exp8(_mm256_sub_ps(load8(row, bf, i, V), vmax)), vinv);
    const __m256i ii = _mm256_add_epi32(iota, _mm256_set1_epi32((int)i));
    const __m256i pb = bf ? bf16_round8(p) : _mm256_castps_si256(p);
    const int keep = 0xFF & ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(pb, _mm256_setzero_si256())));
    if (keep == 0xFF && V - i >= 8) {
      const int64_t at = REV ? c - 8 : c;
      if (bf) _mm_storeu_si128((__m128i*)(vb + at), _mm_packus_epi32(_mm256_castsi256_si128(pb), _mm256_extracti128_si256(pb, 1)));
      else _mm256_storeu_si256((__m256i*)(vf + at), pb);
      _mm256_storeu_si256((__m256i*)(ix + at), ii);
      c += REV ? -8 : 8;
    } else if (keep) {
      alignas(32) uint32_t pv[8];
      _mm256_store_si256((__m256i*)pv, pb);
      for (int ll = 0; ll < 8; ++ll) {
        const int l = REV ? 7 - ll : ll;
        if (!(keep >> l & 1) || i + l >= V) continue;
        const int64_t at = REV ? --c : c++;
        if (bf) vb[at] = (uint16_t)pv[l]; else memcpy(vf + at, pv + l, 4);
        ix[at] = (int32_t)(i + l);
      }
    }
  }
  *cp = c;
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
#elif KERNEL_AVX2
  enum { FCAP = 4096, BS = 1024 };
  static thread_local int32_t fi[FCAP + 8];
  int32_t hit[BS / 16 + 1];  // a dense block's listed groups
  static thread_local Big big;  // top-k's candidates where k > BIG_K
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
#elif KERNEL_AVX2
    // By blocks of BS: the block's max, NaN, the running top k and, while the row has at most FCAP finite entries (and
    // at least 1/4 of those read so far are -inf), where they are; then, once the row is dense, the block's Σ exp(x − m)
    // against the max so far, from L1 (and the blocks before the row turned dense once, from L2).
    int64_t nf = 0, summed = 0;  // fi[0, nf): the finite entries (-1 once there are more than FCAP); Σ covers [0, summed)
    double s = 0.0;
    int un = 0;
    const int es = bf ? 2 : 4;
    big.n = 0;
    for (int64_t b0 = 0; b0 < V; b0 += BS) {
      const int64_t b1 = b0 + BS < V ? b0 + BS : V;
      if (nf < 0 && !un && summed == b0 && b0 > 0) {
        // A dense row past its first block (so m is finite): one look per entry, Σ exp(x − m) against the max so far,
        // and one compare against a gate (top-k: the k-th largest so far, which is <= m; else m) that catches NaN,
        // +inf, a new max and top-k's candidates alike; a group of 16 entries with such a lane is only listed, without
        // a branch, and the block's listed groups are then gone through from L1. Where one held a new max, the
        // block's sum is taken again against it (a lane 88 above m overflows it; a row's max rises ~ln(blocks) times).
        // (The block's max first, then its sum from L1, ran at 0.7x these rows/s; groups of 32, which list more entries
        // to go through, at 0.88x.)
        const __m256 vmax = _mm256_set1_ps(m), g = _mm256_set1_ps(mode ? thr : m);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        int nh = 0;
        for (i = b0; i < b1; i += 16) {
          _mm_prefetch((const char*)row + (i + BS) * es, _MM_HINT_T0);
          __m256 v0, v1;
          load16x2(row, bf, i, b1, &v0, &v1);  // (past b1: -inf)
          hit[nh] = (int32_t)i;
          nh += _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(v0, g, _CMP_NLE_UQ), _mm256_cmp_ps(v1, g, _CMP_NLE_UQ))) != 0;
          s0 = _mm256_add_ps(s0, exp8s(_mm256_sub_ps(v0, vmax))); s1 = _mm256_add_ps(s1, exp8s(_mm256_sub_ps(v1, vmax)));
        }
        float bm = m;
        for (int h = 0; h < nh; ++h)  // in column order, as the scalar code takes them
          for (int64_t j = hit[h]; j < hit[h] + 16 && j < b1; ++j) {
            const float e = load1(row, bf, j);
            un |= e != e; bm = e > bm ? e : bm;
            if (mode && e > thr) thr = k > BIG_K ? big_add(big, k, thr, e, (int32_t)j) : topk_insert(tv, ti, &tc, k, e, (int32_t)j);
          }
        if (un || bm == INFINITY) { m = bm; summed = b1; continue; }  // a bad row: the sum no longer matters
        if (bm > m) {
          const __m256 nmax = _mm256_set1_ps(bm);
          s0 = s1 = _mm256_setzero_ps();
          for (i = b0; i < b1; i += 8) s0 = _mm256_add_ps(s0, exp8s(_mm256_sub_ps(load8(row, bf, i, b1), nmax)));
          s = s * exp((double)m - (double)bm);
          m = bm;
        }
        s += hsum8(_mm256_add_ps(s0, s1));
        summed = b1;
        continue;
      }
      __m256 vm = _mm256_set1_ps(-INFINITY), vu = _mm256_setzero_ps();
      for (i = b0; i < b1; i += 8) {
        if (b1 - i >= 64 / es && ninf64_8(row, bf, i)) { i += 64 / es - 8; continue; }
        const __m256 v = load8(row, bf, i, b1);
        vm = _mm256_max_ps(vm, v); vu = _mm256_or_ps(vu, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        if (nf >= 0) {  // warped rows: where the few finite entries are, so the rest visits only them
          int fin = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ));
          if (fin) {
            if (nf + __builtin_popcount(fin) > FCAP) nf = -1;
            else for (; fin; fin &= fin - 1) fi[nf++] = (int32_t)(i + __builtin_ctz(fin));
          }
        }
        if (mode) {  // candidates in column order, as the scalar code takes them
          for (int gt = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thr), _CMP_GT_OQ)); gt; gt &= gt - 1) {
            const int64_t j = i + __builtin_ctz(gt);
            const float e = load1(row, bf, j);
            if (e > thr) thr = k > BIG_K ? big_add(big, k, thr, e, (int32_t)j) : topk_insert(tv, ti, &tc, k, e, (int32_t)j);
          }
        }
      }
      un |= _mm256_movemask_ps(vu);
      if (nf > b1 - b1 / 4) nf = -1;  // over 3/4 finite so far: a dense row
      const float bm = hmax8(vm);
      if (bm > m) {
        if (summed > 0 && m > -INFINITY && bm < INFINITY) s *= exp((double)m - (double)bm);
        m = bm;
      }
      if (nf < 0 && !un && m < INFINITY) {  // dense (so m is finite): Σ exp(x − m) over [summed, b1)
        const __m256 vmax = _mm256_set1_ps(m);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (i = summed; i + 16 <= b1; i += 16) {
          _mm_prefetch((const char*)row + (i + BS) * es, _MM_HINT_T0);  // the next block, read while this one's exps run
          s0 = _mm256_add_ps(s0, exp8s(_mm256_sub_ps(load8(row, bf, i, b1), vmax)));
          s1 = _mm256_add_ps(s1, exp8s(_mm256_sub_ps(load8(row, bf, i + 8, b1), vmax)));
          if ((i & (BS - 1)) == BS - 16) { s += hsum8(_mm256_add_ps(s0, s1)); s0 = s1 = _mm256_setzero_ps(); }
        }
        for (; i < b1; i += 8) s0 = _mm256_add_ps(s0, exp8s(_mm256_sub_ps(load8(row, bf, i, b1), vmax)));  // (-inf past b1: e^-87)
        s += hsum8(_mm256_add_ps(s0, s1));
        summed = b1;
      }
    }
    if (mode && k > BIG_K) big_finish(big, k, tv, ti, &tc);
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
#if defined(__AVX512F__) || KERNEL_AVX2
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
#elif KERNEL_AVX2
      if (listed) for (int64_t jj = 0; jj < nf; ++jj) {
        const int64_t j = REV ? nf - 1 - jj : jj;
        keep1<REV>(exp_s(load1(row, bf, fi[j]) - m) * inv, fi[j], bf, vf, vb, ix, &c);
      } else dense_out8<REV>(row, bf, V, m, inv, vf, vb, ix, &c);
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

// The kernels' two roundings to bfloat16 on n values (its test holds them to torch's, ties included): bf16_round16 (or
// bf16_round8) on whole vectors, f_to_bf16 on the rest.
extern "C" void sf_bf16(const float* f, uint16_t* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi32_epi16(bf16_round16(_mm512_loadu_ps(f + i))));
#elif KERNEL_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m256i b = bf16_round8(_mm256_loadu_ps(f + i));
    _mm_storeu_si128((__m128i*)(out + i), _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  }
#endif
  for (; i < n; ++i) out[i] = f_to_bf16(f[i]);
}
// The row sums' exp (exp16s; exp8s with AVX2 but not AVX-512; else the scalar exp_s) on n values, for its accuracy test.
extern "C" void sf_exp(const float* t, float* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, exp16s(_mm512_loadu_ps(t + i)));
#elif KERNEL_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp8s(_mm256_loadu_ps(t + i)));
#endif
  for (; i < n; ++i) out[i] = exp_s(t[i]);
}
// The vector width of this build's row loops: 16 (AVX-512), 8 (AVX2 and FMA), 1 (scalar).
extern "C" int sf_lanes() {
#ifdef __AVX512F__
  return 16;
#else
  return KERNEL_AVX2 ? 8 : 1;
#endif
}
