"""Every per-position metric of `metrics.position_metrics` from one fused C++ pass set per row pair.

    python -m harness.metrics_fused      # max relative difference from metrics.position_metrics, and speed

Same inputs, keys, dtypes and semantics as `metrics.position_metrics` ([B, V] ref and cand log-probs,
maybe unnormalised, -inf allowed; [B] targets): KL(ref ‖ cand) etc. in nats, renormalised in float64.
The kernel (C++ embedded below, built on first use with g++ into $HARNESS_HOME/ext, called through
ctypes on torch.get_num_threads() threads) goes over each float32 row pair twice. Pass 1, by blocks of
512 (the next blocks prefetched): the top-k lists of both rows (stable: among ties the lowest id ranks
first, as argmax does), then exp(v − running max) of the block in float64 (a 16-entry 2^(j/16) table
and a degree-7 polynomial, ≤ 1.03 ulp), kept in a per-thread buffer, and the block's sum; the
normalisers are Σ_b exp(R_b − max)·Σ_block, Kahan-compensated over blocks (a normaliser error δ moves
KL by ~δ). Pass 2: p and q from the buffer (no exps) and every sum. JS uses the non-cancelling form
JS = ¼ Σ (p+q)·ψ, u = (p−q)/(p+q), d = ln p − ln q, ψ = u·d + ln(1−u²) ≥ 0, so it stays accurate when
JS ~ 1e-8 (where H(m) − (H(p)+H(q))/2 loses digits); where |d| ≤ 0.2 (the usual case) ψ is the
series in d² of d·tanh(d/2) − 2 ln cosh(d/2), so no division or log. Top-k ties: torch.topk's
choice inside a tie group is unspecified; here the lowest ids win, so top{k}_overlap may differ from
the reference only when a tie straddles the k-th place.
"""

from __future__ import annotations

import ctypes
import math
from functools import cache

import torch

from harness import cext

MAX_K = 256

CPP = r"""// Per row pair: pass 1 by blocks top-K of x and y (stable), exps and normalisers; pass 2 every sum (see the module docstring).
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

// Keeps the k largest (value, index) seen so far, sorted descending, earlier index first among ties.
static inline void topk_insert(float* tv, int32_t* ti, int* cnt, int k, float v, int32_t i) {
  if (*cnt == k && !(v > tv[k - 1])) return;
  int j = *cnt < k ? (*cnt)++ : k - 1;
  while (j > 0 && tv[j - 1] < v) { tv[j] = tv[j - 1]; ti[j] = ti[j - 1]; --j; }
  tv[j] = v; ti[j] = i;
}

#ifdef __AVX512F__
static const double LN2_HI = 0.6931471805599453094, LN2_LO = 2.319046813846299558e-17;
// exp(t) for t <= 0 in float64: t = (16m + j + f) ln2/16, |f ln2/16| <= ln2/32; 2^(j/16) from a 16-entry table in two
// registers, exp of the remainder by Taylor to r^7 (truncation < 1.3e-18 relative): error < 1 ulp + table rounding.
// t < -708 (incl. -inf) gives 0.
static inline __m512d exp8(__m512d t) {
  __mmask8 ok = _mm512_cmp_pd_mask(t, _mm512_set1_pd(-708.0), _CMP_GE_OQ);
  t = _mm512_max_pd(t, _mm512_set1_pd(-708.0));
  const __m512d magic = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  __m512d kd = _mm512_fmadd_pd(t, _mm512_set1_pd(23.083120654223414), magic);
  __m512d k = _mm512_sub_pd(kd, magic);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0.04332169878499658), t);
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(1.4494042586539372e-18), r);
  const __m512d t0 = _mm512_setr_pd(1.0, 1.0442737824274138, 1.0905077326652577, 1.1387886347566916, 1.189207115002721,
                                    1.241857812073484, 1.2968395546510096, 1.3542555469368927);
  const __m512d t1 = _mm512_setr_pd(1.4142135623730951, 1.4768261459394993, 1.5422108254079407, 1.6104903319492543,
                                    1.681792830507429, 1.7562521603732995, 1.8340080864093424, 1.9152065613971474);
  __m512d tab = _mm512_permutex2var_pd(t0, _mm512_castpd_si512(kd), t1);  // low 4 bits of k pick the entry
  __m512d p = _mm512_set1_pd(1.0 / 5040);
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 720));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 120));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 24));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0 / 6));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(0.5));
  p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(1.0));
  p = _mm512_mul_pd(p, r);                                   // exp(r) - 1
  p = _mm512_fmadd_pd(p, tab, tab);                          // 2^(j/16) exp(r)
  return _mm512_maskz_scalef_pd(ok, p, _mm512_mul_pd(k, _mm512_set1_pd(0.0625)));  // times 2^floor(k/16)
}
static inline __m512d recip8(__m512d a) {  // 1/a to ~1 ulp: rcp14 and two Newton steps
  __m512d y = _mm512_rcp14_pd(a);
  y = _mm512_fmadd_pd(y, _mm512_fnmadd_pd(a, y, _mm512_set1_pd(1.0)), y);
  return _mm512_fmadd_pd(y, _mm512_fnmadd_pd(a, y, _mm512_set1_pd(1.0)), y);
}
// log1p(-z) for 0 <= z < 1 (fdlibm's log kernel; where 1 - z >= sqrt(1/2) the argument -z is used exactly).
static inline __m512d log1m8(__m512d z) {
  __m512d w = _mm512_sub_pd(_mm512_set1_pd(1.0), z);
  __m512d e = _mm512_getexp_pd(_mm512_mul_pd(w, _mm512_set1_pd(1.4142135623730951)));
  __mmask8 big = _mm512_cmp_pd_mask(e, _mm512_setzero_pd(), _CMP_NEQ_OQ);
  __m512d f = _mm512_mask_sub_pd(_mm512_sub_pd(_mm512_setzero_pd(), z), big,
                                 _mm512_scalef_pd(w, _mm512_sub_pd(_mm512_setzero_pd(), e)), _mm512_set1_pd(1.0));
  __m512d s = _mm512_mul_pd(f, recip8(_mm512_add_pd(f, _mm512_set1_pd(2.0))));
  __m512d s2 = _mm512_mul_pd(s, s);
  __m512d R = _mm512_set1_pd(1.479819860511658591e-01);
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(1.531383769920937332e-01));
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(1.818357216161805012e-01));
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(2.222219843214978396e-01));
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(2.857142874366239149e-01));
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(3.999999999940941908e-01));
  R = _mm512_fmadd_pd(R, s2, _mm512_set1_pd(6.666666666666735130e-01));
  R = _mm512_mul_pd(R, s2);
  __m512d hfsq = _mm512_mul_pd(_mm512_set1_pd(0.5), _mm512_mul_pd(f, f));
  __m512d l = _mm512_sub_pd(f, _mm512_fnmadd_pd(s, _mm512_add_pd(hfsq, R), hfsq));
  return _mm512_fmadd_pd(e, _mm512_set1_pd(LN2_HI), l);
}
static inline __m512d load8(const float* x, int64_t i, int64_t V) {  // 8 floats as doubles, -inf past the end
  __mmask8 m = V - i >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (V - i)) - 1);
  return _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(-INFINITY), m, x + i));
}
static inline double hsum(__m512d v) { return _mm512_reduce_add_pd(v); }
#endif

// out[r*10 + ...]: log Σ_p, log Σ_q (with the maxima folded in: ln of the normaliser), Σp·d, −Σq·d, Σp·lp, Σq·lq,
// Σ|p−q|, Σ(p+q)ψ, kl=+inf flag, kl_rev=+inf flag. rank[r]: #{y > y[ref top]}. top[r*2K ...]: K ids of x, K of y.
#ifdef __AVX512F__
enum { BS = 512 };  // a row goes by blocks of BS: top-K scan, then exp(v − running max) while the block is in L1
extern "C" void pm_rows(const float* X, const float* Y, int64_t n, int64_t V, int64_t ldx, int64_t ldy, int K,
                        double* out, int64_t* rank, int32_t* top) {
  float tvx[256], tvy[256];
  // per thread: exp(x − Rx), exp(y − Ry) of a row, and per block Rx, Ry (then factors), Σ exp(x − Rx), Σ exp(y − Ry)
  static thread_local double* buf = nullptr; static thread_local int64_t cap = 0;
  const int64_t Vr = (V + 7) / 8 * 8, nb = (V + BS - 1) / BS, need = 2 * Vr + 4 * nb;
  if (cap < need) {
    free(buf); cap = 0;
    buf = (double*)aligned_alloc(64, (need * 8 + 63) / 64 * 64);
    if (!buf) { for (int64_t j = 0; j < n * 10; ++j) out[j] = NAN; for (int64_t j = 0; j < n; ++j) rank[j] = -1; return; }  // out of memory
    cap = need;
  }
  double *bx = buf, *by = bx + Vr, *rx = by + Vr, *ry = rx + nb, *sx = ry + nb, *sy = sx + nb;
  const double NINF = -INFINITY;
  for (int64_t r = 0; r < n; ++r) {
    const float* x = X + r * ldx; const float* y = Y + r * ldy;
    int32_t* tx = top + r * 2 * K; int32_t* ty = tx + K;
    int cx = 0, cy = 0;
    __m256 vmin = _mm256_set1_ps(INFINITY);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
      for (int64_t i = i0; i < i1; i += 16) {  // lanes above the K-th value so far (all lanes until K are held) go to the lists
        __mmask16 m = i1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (i1 - i)) - 1);
        __m512 vx = _mm512_maskz_loadu_ps(m, x + i), vy = _mm512_maskz_loadu_ps(m, y + i);
        __mmask16 gx = cx < K ? m : m & _mm512_cmp_ps_mask(vx, _mm512_set1_ps(tvx[K - 1]), _CMP_GT_OQ);
        __mmask16 gy = cy < K ? m : m & _mm512_cmp_ps_mask(vy, _mm512_set1_ps(tvy[K - 1]), _CMP_GT_OQ);
        while (gx) { int l = __builtin_ctz(gx); gx &= gx - 1; topk_insert(tvx, tx, &cx, K, x[i + l], (int32_t)(i + l)); }
        while (gy) { int l = __builtin_ctz(gy); gy &= gy - 1; topk_insert(tvy, ty, &cy, K, y[i + l], (int32_t)(i + l)); }
      }
      rx[b] = tvx[0]; ry[b] = tvy[0];  // running maxima, so every exp below is <= 1 (-inf: the block is all -inf so far)
      const __m512d vrx = _mm512_set1_pd(rx[b] == NINF ? 0.0 : rx[b]), vry = _mm512_set1_pd(ry[b] == NINF ? 0.0 : ry[b]);
      __m512d bp = _mm512_setzero_pd(), bq = bp;
      for (int64_t i = i0; i < i1; i += 8) {
        _mm_prefetch((const char*)(x + i + 2 * BS), _MM_HINT_T0); _mm_prefetch((const char*)(y + i + 2 * BS), _MM_HINT_T0);
        __mmask8 m = i1 - i >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (i1 - i)) - 1);
        __m256 fx = _mm256_mask_loadu_ps(_mm256_set1_ps(-INFINITY), m, x + i), fy = _mm256_mask_loadu_ps(_mm256_set1_ps(-INFINITY), m, y + i);
        vmin = _mm256_min_ps(vmin, _mm256_mask_mov_ps(_mm256_set1_ps(INFINITY), m, _mm256_min_ps(fx, fy)));
        __m512d ex = exp8(_mm512_sub_pd(_mm512_cvtps_pd(fx), vrx)), ey = exp8(_mm512_sub_pd(_mm512_cvtps_pd(fy), vry));
        _mm512_store_pd(bx + i, ex); _mm512_store_pd(by + i, ey);
        bp = _mm512_add_pd(bp, ex); bq = _mm512_add_pd(bq, ey);
      }
      sx[b] = hsum(bp); sy[b] = hsum(bq);
    }
    const double mx = tvx[0], my = tvy[0];
    const bool finite = _mm256_cmp_ps_mask(vmin, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ) == 0;
    // normalisers Σ_b exp(R_b − max) Σ_block, Kahan-compensated over blocks (exp only where the running max rose)
    double sp = 0, sq = 0, cp = 0, cq = 0;
    {
      double lx = NAN, fx = 0, ly = NAN, fy = 0;
      for (int64_t b = 0; b < nb; ++b) {
        if (!(rx[b] == lx)) { lx = rx[b]; fx = lx == NINF ? 0.0 : exp(lx - mx); }
        if (!(ry[b] == ly)) { ly = ry[b]; fy = ly == NINF ? 0.0 : exp(ly - my); }
        rx[b] = fx; ry[b] = fy;
        double a = fx * sx[b] - cp, t = sp + a; cp = (t - sp) - a; sp = t;
        a = fy * sy[b] - cq; t = sq + a; cq = (t - sq) - a; sq = t;
      }
    }
    const double lsp = log(sp), lsq = log(sq), c = lsp - lsq;
    for (int64_t b = 0; b < nb; ++b) { rx[b] /= sp; ry[b] /= sq; }  // p = exp(x − R_b) · rx[b]
    double kl = 0, klr = 0, hp = 0, hq = 0, tv = 0, js = 0; int infp = 0, infq = 0; int64_t cnt = 0;
    {
      __m512d akl = _mm512_setzero_pd(), aklr = akl, ahp = akl, ahq = akl, atv = akl, ajs = akl;
      const __m512d vmx = _mm512_set1_pd(mx), vmy = _mm512_set1_pd(my), vlp = _mm512_set1_pd(lsp), vlq = _mm512_set1_pd(lsq);
      const __m512d vc = _mm512_set1_pd(c), ln4 = _mm512_set1_pd(2 * LN2_HI), ninf = _mm512_set1_pd(-INFINITY);
      const __m512d vyt = _mm512_set1_pd((double)y[tx[0]] - my), one = _mm512_set1_pd(1.0), lim = _mm512_set1_pd(0.01);
      if (finite) {  // no -inf in either row (so p, q > 0): Σ p(dx − dy) − c and Σ p dx − ln Σ, no masks
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
          const __m512d gx = _mm512_set1_pd(rx[b]), gy = _mm512_set1_pd(ry[b]);
          for (int64_t i = i0; i < i1; i += 8) {
            __m512d dx = _mm512_sub_pd(load8(x, i, i1), vmx), dy = _mm512_sub_pd(load8(y, i, i1), vmy);
            cnt += __builtin_popcount(_mm512_cmp_pd_mask(dy, vyt, _CMP_GT_OQ));
            __m512d p = _mm512_mul_pd(_mm512_load_pd(bx + i), gx), q = _mm512_mul_pd(_mm512_load_pd(by + i), gy);
            if (i1 - i < 8) {
              __mmask8 m = (__mmask8)((1u << (i1 - i)) - 1);
              p = _mm512_maskz_mov_pd(m, p); q = _mm512_maskz_mov_pd(m, q); dx = _mm512_maskz_mov_pd(m, dx); dy = _mm512_maskz_mov_pd(m, dy);
            }
            __m512d e = _mm512_sub_pd(dx, dy);
            akl = _mm512_fmadd_pd(p, e, akl); aklr = _mm512_fnmadd_pd(q, e, aklr);
            ahp = _mm512_fmadd_pd(p, dx, ahp); ahq = _mm512_fmadd_pd(q, dy, ahq);
            __m512d pm = _mm512_sub_pd(p, q), pp = _mm512_add_pd(p, q);
            atv = _mm512_add_pd(atv, _mm512_abs_pd(pm));
            __m512d d = _mm512_sub_pd(e, vc), w = _mm512_mul_pd(d, d), psi;  // d = ln p − ln q
            if (_mm512_cmp_pd_mask(w, _mm512_set1_pd(0.04), _CMP_LE_OQ) == 0xFF) {
              // |d| <= 0.2 (the usual case): ψ = d tanh(d/2) − 2 ln cosh(d/2) in powers of w = d², to w^6
              // (the next term is 5461 w^7 / 13412044800: truncation < 1e-14 relative)
              __m512d t = _mm512_fmadd_pd(_mm512_set1_pd(-691.0 / 174182400), w, _mm512_set1_pd(31.0 / 806400));
              t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(-17.0 / 46080));
              t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(1.0 / 288));
              t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(-1.0 / 32));
              t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(0.25));
              psi = _mm512_mul_pd(t, w);
            } else {  // u = (p − q)/(p + q); tail lanes: p = q = 0, so u is NaN and ψ = 2 ln 2 times p + q = 0
              __m512d u = _mm512_mul_pd(pm, recip8(pp)), z = _mm512_mul_pd(u, u);
              __mmask8 ok = _mm512_cmp_pd_mask(z, one, _CMP_LT_OQ);
              psi = _mm512_mask_mov_pd(ln4, ok, _mm512_fmadd_pd(u, d, log1m8(_mm512_maskz_mov_pd(ok, z))));
            }
            ajs = _mm512_fmadd_pd(pp, psi, ajs);
          }
        }
        kl = hsum(akl) - c; klr = hsum(aklr) + c; hp = hsum(ahp) - lsp; hq = hsum(ahq) - lsq; tv = hsum(atv); js = hsum(ajs);
      } else {
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
          const __m512d gx = _mm512_set1_pd(rx[b]), gy = _mm512_set1_pd(ry[b]);
          for (int64_t i = i0; i < i1; i += 8) {
            __m512d dx = _mm512_sub_pd(load8(x, i, i1), vmx), dy = _mm512_sub_pd(load8(y, i, i1), vmy);
            cnt += __builtin_popcount(_mm512_cmp_pd_mask(dy, vyt, _CMP_GT_OQ));
            __m512d lp = _mm512_sub_pd(dx, vlp), lq = _mm512_sub_pd(dy, vlq);
            __mmask8 fx = _mm512_cmp_pd_mask(dx, ninf, _CMP_NEQ_OQ), fy = _mm512_cmp_pd_mask(dy, ninf, _CMP_NEQ_OQ), both = fx & fy;
            __m512d p = _mm512_maskz_mul_pd(fx, _mm512_load_pd(bx + i), gx), q = _mm512_maskz_mul_pd(fy, _mm512_load_pd(by + i), gy);
            __m512d d = _mm512_sub_pd(_mm512_sub_pd(dx, dy), vc);
            akl = _mm512_mask3_fmadd_pd(p, d, akl, both);
            aklr = _mm512_mask3_fnmadd_pd(q, d, aklr, both);
            ahp = _mm512_mask3_fmadd_pd(p, lp, ahp, fx);
            ahq = _mm512_mask3_fmadd_pd(q, lq, ahq, fy);
            __m512d pm = _mm512_sub_pd(p, q), pp = _mm512_add_pd(p, q);
            atv = _mm512_add_pd(atv, _mm512_abs_pd(pm));
            __m512d u = _mm512_mul_pd(pm, recip8(pp)), z = _mm512_mul_pd(u, u);
            __mmask8 ok = both & _mm512_cmp_pd_mask(z, one, _CMP_LT_OQ);
            __m512d psi = ln4;  // ψ(±1) = 2 ln 2: one side is 0 (-inf, or underflowed)
            if (ok && _mm512_mask_cmp_pd_mask(ok, z, lim, _CMP_LE_OQ) == ok) {
              __m512d t = _mm512_fmadd_pd(_mm512_set1_pd(1.0 / 66), z, _mm512_set1_pd(1.0 / 45));
              t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 28));
              t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 15));
              t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 6));
              t = _mm512_fmadd_pd(t, z, one);
              psi = _mm512_mask_mov_pd(ln4, ok, _mm512_mul_pd(t, z));
            } else if (ok) psi = _mm512_mask_mov_pd(ln4, ok, _mm512_fmadd_pd(u, d, log1m8(_mm512_maskz_mov_pd(ok, z))));
            ajs = _mm512_fmadd_pd(pp, psi, ajs);
            __mmask8 ox = fx & ~fy, oy = fy & ~fx;  // one side -inf: that KL is +inf where the other p > 0 in float64
            if ((ox && !infp) || (oy && !infq)) {
              double a[8], bb[8]; _mm512_storeu_pd(a, lp); _mm512_storeu_pd(bb, lq);
              for (int l = 0; l < 8; ++l) { infp |= (ox >> l & 1) && exp(a[l]) > 0; infq |= (oy >> l & 1) && exp(bb[l]) > 0; }
            }
          }
        }
        kl = hsum(akl); klr = hsum(aklr); hp = hsum(ahp); hq = hsum(ahq); tv = hsum(atv); js = hsum(ajs);
      }
    }
    double* o = out + r * 10;
    o[0] = mx + lsp; o[1] = my + lsq; o[2] = kl; o[3] = klr; o[4] = hp; o[5] = hq; o[6] = tv; o[7] = js;
    o[8] = infp; o[9] = infq; rank[r] = cnt;
  }
}
#else
extern "C" void pm_rows(const float* X, const float* Y, int64_t n, int64_t V, int64_t ldx, int64_t ldy, int K,
                        double* out, int64_t* rank, int32_t* top) {
  float tvx[256], tvy[256];
  for (int64_t r = 0; r < n; ++r) {
    const float* x = X + r * ldx; const float* y = Y + r * ldy;
    int32_t* tx = top + r * 2 * K; int32_t* ty = tx + K;
    int cx = 0, cy = 0; int64_t i = 0;
    for (; i < V; ++i) { topk_insert(tvx, tx, &cx, K, x[i], (int32_t)i); topk_insert(tvy, ty, &cy, K, y[i], (int32_t)i); }
    const double mx = tvx[0], my = tvy[0];
    const float ytop = y[tx[0]];
    double sp = 0, sq = 0; int64_t cnt = 0;
    for (i = 0; i < V; ++i) { sp += exp((double)x[i] - mx); sq += exp((double)y[i] - my); cnt += y[i] > ytop; }
    const double lsp = log(sp), lsq = log(sq), c = lsp - lsq;
    double kl = 0, klr = 0, hp = 0, hq = 0, tv = 0, js = 0; int infp = 0, infq = 0;
    for (i = 0; i < V; ++i) {
      double dx = (double)x[i] - mx, dy = (double)y[i] - my, lp = dx - lsp, lq = dy - lsq, p = exp(lp), q = exp(lq);
      int fx = dx != -INFINITY, fy = dy != -INFINITY;
      tv += fabs(p - q);
      if (fx && fy) {
        double d = (dx - dy) - c, u = (p - q) / (p + q);
        kl += p * d; klr -= q * d;
        js += (p + q) * (u * u < 1 ? u * d + log1p(-u * u) : 2 * M_LN2);
      } else { js += (p + q) * 2 * M_LN2; infp |= fx && p > 0; infq |= fy && q > 0; }
      if (fx) hp += p * lp;
      if (fy) hq += q * lq;
    }
    double* o = out + r * 10;
    o[0] = mx + lsp; o[1] = my + lsq; o[2] = kl; o[3] = klr; o[4] = hp; o[5] = hq; o[6] = tv; o[7] = js;
    o[8] = infp; o[9] = infq; rank[r] = cnt;
  }
}
#endif
"""


@cache
def _lib() -> ctypes.CDLL:
    lib = cext.build("metrics_fused", CPP)
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.pm_rows.restype = None
    lib.pm_rows.argtypes = [vp, vp, i64, i64, i64, i64, ctypes.c_int, vp, vp, vp]
    return lib


def available() -> str | None:
    """None where the fused kernel builds and loads here, else why not."""
    return cext.why_not(_lib)



def fused_position_metrics(ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, ks=(5, 10)) -> dict[str, torch.Tensor]:
    """`metrics.position_metrics` from the fused kernel: [B, V] ref and cand log-probs (any float dtype,
    maybe unnormalised; read as float32), [B] next tokens -> the same dict of [B] float64 / int64 / bool
    tensors (KL(ref ‖ cand), kl_rev, js in nats; see metrics.position_metrics for every key)."""
    if ref.dim() != 2 or ref.shape != cand.shape or ref.device.type != "cpu" or cand.device.type != "cpu":
        raise ValueError(f"fused_position_metrics takes two [B, V] CPU tensors, not {tuple(ref.shape)} and {tuple(cand.shape)}")
    (B, V), K = ref.shape, max(2, *ks)
    if K > min(MAX_K, V):
        raise ValueError(f"top-k sizes must be at most {min(MAX_K, V)}, not {K}")
    x, y = (t.float() if t.dtype != torch.float32 else t for t in (ref, cand))
    x, y = (t if t.stride(1) == 1 else t.contiguous() for t in (x, y))
    lib = _lib()
    out = torch.empty(B, 10, dtype=torch.float64)
    rank = torch.empty(B, dtype=torch.int64)
    top = torch.empty(B, 2, K, dtype=torch.int32)

    def rows(a: int, b: int) -> None:
        lib.pm_rows(x.data_ptr() + a * x.stride(0) * 4, y.data_ptr() + a * y.stride(0) * 4, b - a, V, x.stride(0),
                    y.stride(0), K, out.data_ptr() + a * 80, rank.data_ptr() + a * 8, top.data_ptr() + a * 8 * K)

    n = max(1, min(torch.get_num_threads(), B))
    cuts = [B * i // n for i in range(n + 1)]
    if n == 1:
        rows(0, B)
    else:
        list(cext.pool(n).map(rows, cuts[:-1], cuts[1:]))
    if (rank < 0).any():  # the kernel could not allocate its per-thread buffer
        raise MemoryError("the fused metrics kernel could not allocate its ~2.4 MB per-thread buffer")
    log_zp, log_zq, kl, kl_rev, plp, qlq, l1, js4, inf_p, inf_q = out.unbind(1)
    top_p, top_q = top.long().unbind(1)  # [B, K] each, by descending log-prob
    inf = torch.full_like(kl, math.inf)
    ref_top, t = top_p[:, 0:1], target.long()[:, None]
    lp_t, lq_t = x.gather(1, t).squeeze(1).double() - log_zp, y.gather(1, t).squeeze(1).double() - log_zq
    p_top, p_2nd = (x.gather(1, top_p[:, :2]).double() - log_zp[:, None]).exp().unbind(1)
    res = {
        "kl": torch.where(inf_p > 0, inf, kl.clamp_min(0.0)),
        "kl_rev": torch.where(inf_q > 0, inf, kl_rev.clamp_min(0.0)),
        "js": (0.25 * js4).clamp(0.0, math.log(2.0)),
        "tv": (0.5 * l1).clamp(0.0, 1.0),
        "top1_agree": top_p[:, 0] == top_q[:, 0],
    }
    for k in ks:
        res[f"top{k}_overlap"] = (top_p[:, :k, None] == top_q[:, None, :k]).any(-1).double().mean(-1)
    res |= {
        "ref_top_rank": rank,
        "delta_p": lq_t.exp() - lp_t.exp(),
        "delta_p_top": (y.gather(1, ref_top).squeeze(1).double() - log_zq).exp() - p_top,
        "nll_ref": -lp_t,
        "nll_cand": -lq_t,
        "entropy_ref": -plp,
        "entropy_cand": -qlq,
        "p_top_ref": p_top,
        "margin_ref": p_top - p_2nd,
    }
    return res


if __name__ == "__main__":
    import time

    from harness import bench, metrics

    why = available()
    if why:
        raise SystemExit(f"fused kernel unavailable: {why}")
    width, rows = 151646, 64
    ref = torch.log_softmax(bench.realistic_logits(rows, width, seed=1), -1)
    cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
    target = torch.randint(0, width, (rows,), generator=torch.Generator().manual_seed(3))
    want, got = metrics.position_metrics(ref[:16], cand[:16], target[:16]), fused_position_metrics(ref[:16], cand[:16], target[:16])
    for key, w in want.items():
        diff = ((got[key].double() - w.double()).abs() / w.double().abs().clamp_min(1e-12)).max()
        print(f"{key:>14}: max relative difference {float(diff):.2e}")
    start = time.perf_counter()
    fused_position_metrics(ref, cand, target)
    rate = rows / (time.perf_counter() - start)
    print(f"{rate:.0f} positions/s, {rate * width * 8 / 1e9:.2f} GB/s read, {torch.get_num_threads()} threads")
