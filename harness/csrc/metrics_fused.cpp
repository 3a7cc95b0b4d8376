// The fused metrics kernel (harness/metrics_fused.py loads it through harness/cext.py).
#include "exp_f32.h"
#include "topk.h"
// Per row pair: a float32 fast path (row_f32), else the float64 kernel (row_f64); then finish()
// (see harness/metrics_fused.py's docstring).
#include <stdlib.h>

// A row pair's sums: ln of the normalisers (lx, ly), KL, KL_rev, Σ p·ln p, Σ q·ln q, Σ|p − q|, Σ (p + q)·ψ,
// +inf flags, #{y > y[ref top]}, and whether either row holds NaN or +inf (bad: its outputs are NaN).
struct Raw { double lx, ly, kl, klr, hp, hq, l1, js4; int infp, infq; int64_t rank; int bad = 0; };

// ψ(d) = u·d + ln(1 − u²) of the scalar kernel (psi8's forms): from u where u² <= 1/2, else 2 ln 2 − 2|d|·a/(1 + a)
// − 2 ln(1 + a) with a = e^(−|d|), as 1 − u² from u cancels; 2 ln 2 where u² rounds to 1.
static inline double psi1(double u, double d) {
  if (u * u <= 0.5) return u * d + log1p(-u * u);
  if (!(u * u < 1)) return 2 * M_LN2;
  const double a = exp(-fabs(d));
  return 2 * M_LN2 - 2 * (fabs(d) * a / (1 + a) + log1p(a));
}

// q_i − p_i, and p_i into *p: as p·expm1(−d) where ln p − ln q = d is small (no cancellation), else directly.
static inline double dprob(float xi, float yi, const Raw& R, double* p) {
  const double lp = (double)xi - R.lx, lq = (double)yi - R.ly, d = lp - lq;
  *p = exp(lp);
  return fabs(d) < 1 ? *p * expm1(-d) : exp(lq) - *p;
}

enum { NFIX = 14 };
// o: kl, kl_rev, js, tv, top1_agree, ref_top_rank, delta_p, delta_p_top, nll_ref, nll_cand, entropy_ref,
// entropy_cand, p_top_ref, margin_ref, then top{k}_overlap for each k of ks.
static void finish(const float* x, const float* y, int64_t t, const Raw& R, const int32_t* tx, const int32_t* ty,
                   const int32_t* ks, int nks, double* o) {
  double pt, ptop;
  if (R.bad) { for (int j = 0; j < NFIX + nks; ++j) o[j] = NAN; o[5] = -1; return; }  // the wrapper raises
  o[0] = R.infp ? INFINITY : (R.kl > 0 ? R.kl : 0.0);
  o[1] = R.infq ? INFINITY : (R.klr > 0 ? R.klr : 0.0);
  o[2] = fmin(fmax(0.25 * R.js4, 0.0), M_LN2);
  o[3] = fmin(fmax(0.5 * R.l1, 0.0), 1.0);
  o[4] = tx[0] == ty[0];
  o[5] = (double)R.rank;
  o[6] = dprob(x[t], y[t], R, &pt);
  o[7] = dprob(x[tx[0]], y[tx[0]], R, &ptop);
  o[8] = R.lx - (double)x[t];
  o[9] = R.ly - (double)y[t];
  o[10] = -R.hp;
  o[11] = -R.hq;
  o[12] = ptop;
  const double gap = (double)x[tx[1]] - (double)x[tx[0]];  // p_top − p_2nd = p_top·(1 − e^gap)
  o[13] = gap == -INFINITY ? ptop : gap != gap ? 0.0 : -ptop * expm1(gap);
  for (int j = 0; j < nks; ++j) {
    const int k = ks[j];
    int hit = 0;
    for (int a = 0; a < k; ++a)
      for (int b = 0; b < k; ++b)
        if (tx[a] == ty[b]) { ++hit; break; }
    o[NFIX + j] = (double)hit / k;
  }
}

#ifdef __AVX512F__
static const double LN2_HI = 0.6931471805599453094, LN2_LO = 2.319046813846299558e-17;
// exp(t) in float64 to ~1 ulp (t = (16m + j + f) ln2/16, 2^(j/16) from a 16-entry table, Taylor to r^7);
// t < -708 (incl. -inf) gives 0, t > 709 inf.
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
// ψ(d) = u·d + ln(1 − u²), u = (p − q)/(p + q) = tanh(d/2), in the lanes of `live` (JS = ¼ Σ (p + q)·ψ): a series in
// u² where every live u² <= 0.01; where u² > 1/2, 2 ln 2 − 2|d|·a/(1 + a) − 2 ln(1 + a), a = e^(−|d|) (1 − u² from
// u cancels there: at p/q = 1e-11 it kept 5 digits of ψ); 2 ln 2 where a side is 0 (-inf or underflowed: u² = 1) and
// outside `live`.
static inline __m512d psi8(__m512d pm, __m512d pp, __m512d d, __mmask8 live) {
  const __m512d one = _mm512_set1_pd(1.0), ln4 = _mm512_set1_pd(2 * LN2_HI);
  const __m512d u = _mm512_mul_pd(pm, recip8(pp)), z = _mm512_mul_pd(u, u);
  const __mmask8 ok = live & _mm512_cmp_pd_mask(z, one, _CMP_LT_OQ);
  if (!ok) return ln4;
  if (_mm512_mask_cmp_pd_mask(ok, z, _mm512_set1_pd(0.01), _CMP_LE_OQ) == ok) {
    __m512d t = _mm512_fmadd_pd(_mm512_set1_pd(1.0 / 66), z, _mm512_set1_pd(1.0 / 45));
    t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 28));
    t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 15));
    t = _mm512_fmadd_pd(t, z, _mm512_set1_pd(1.0 / 6));
    t = _mm512_fmadd_pd(t, z, one);
    return _mm512_mask_mov_pd(ln4, ok, _mm512_mul_pd(t, z));
  }
  const __mmask8 far = _mm512_mask_cmp_pd_mask(ok, z, _mm512_set1_pd(0.5), _CMP_GT_OQ), near = ok & ~far;
  __m512d out = _mm512_mask_mov_pd(ln4, near, _mm512_fmadd_pd(u, d, log1m8(_mm512_maskz_mov_pd(near, z))));
  if (far) {
    const __m512d ad = _mm512_abs_pd(d), a = exp8(_mm512_sub_pd(_mm512_setzero_pd(), ad));  // a <= e^(−1.76)
    const __m512d t = _mm512_fmadd_pd(_mm512_mul_pd(ad, a), recip8(_mm512_add_pd(one, a)), log1m8(_mm512_sub_pd(_mm512_setzero_pd(), a)));
    out = _mm512_mask_mov_pd(out, far, _mm512_fnmadd_pd(_mm512_set1_pd(2.0), t, ln4));
  }
  return out;
}
// KL's and KL_rev's terms p·g(d) and q·g(−d), g(d) = d + e^(−d) − 1 >= 0, d = ln p − ln q: Σ p·g(d) = Σ p·d + Σ (q − p)
// is KL, with no cancellation (Σ p·d sums terms of either sign, and an error δ in a normaliser moves it by δ; here
// by δ·Σ (p − q), second order). Where |d| <= 0.2, g(d) = d²·(E(d²) − d·O(d²)) in series (to d^11: < 1e-17
// relative); elsewhere p·d + (q − p) and (p − q) − q·d, which do not cancel there (q = p·e^(−d)).
static inline void gkl8(__m512d p, __m512d q, __m512d d, __m512d* tkl, __m512d* tklr) {
  const __m512d w = _mm512_mul_pd(d, d);
  __m512d e = _mm512_fmadd_pd(_mm512_set1_pd(1.0 / 479001600), w, _mm512_set1_pd(1.0 / 3628800));
  e = _mm512_fmadd_pd(e, w, _mm512_set1_pd(1.0 / 40320));
  e = _mm512_fmadd_pd(e, w, _mm512_set1_pd(1.0 / 720));
  e = _mm512_fmadd_pd(e, w, _mm512_set1_pd(1.0 / 24));
  e = _mm512_fmadd_pd(e, w, _mm512_set1_pd(0.5));
  __m512d o = _mm512_fmadd_pd(_mm512_set1_pd(1.0 / 6227020800), w, _mm512_set1_pd(1.0 / 39916800));
  o = _mm512_fmadd_pd(o, w, _mm512_set1_pd(1.0 / 362880));
  o = _mm512_fmadd_pd(o, w, _mm512_set1_pd(1.0 / 5040));
  o = _mm512_fmadd_pd(o, w, _mm512_set1_pd(1.0 / 120));
  o = _mm512_fmadd_pd(o, w, _mm512_set1_pd(1.0 / 6));
  const __m512d dodd = _mm512_mul_pd(d, o);
  *tkl = _mm512_mul_pd(p, _mm512_mul_pd(w, _mm512_sub_pd(e, dodd)));
  *tklr = _mm512_mul_pd(q, _mm512_mul_pd(w, _mm512_add_pd(e, dodd)));
  const __mmask8 big = _mm512_cmp_pd_mask(w, _mm512_set1_pd(0.04), _CMP_NLE_UQ);
  if (big) {
    const __m512d pq = _mm512_sub_pd(p, q);
    *tkl = _mm512_mask_mov_pd(*tkl, big, _mm512_fmsub_pd(p, d, pq));
    *tklr = _mm512_mask_mov_pd(*tklr, big, _mm512_fnmadd_pd(q, d, pq));
  }
}
static inline __m512d load8(const float* x, int64_t i, int64_t V) {  // 8 floats as doubles, -inf past the end
  __mmask8 m = V - i >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (V - i)) - 1);
  return _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(-INFINITY), m, x + i));
}
static inline double hsum(__m512d v) { return _mm512_reduce_add_pd(v); }
static inline __m512d cvt_half(__m512 v, int h) {  // lanes 8h .. 8h + 7 as doubles
  return _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(v, 1) : _mm512_castps512_ps256(v));
}
static inline __m512d fold16(__m512 v) {  // the 16 float32 lanes, pairwise added, as 8 doubles
  return _mm512_cvtps_pd(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

enum { BS = 512, G = 16 };  // rows go by blocks of BS (one float32 partial sum each; row_f64: one running max each), groups of G lanes

// ---------------------------------------------------------------------------------------------------------------------
// The float64 kernel: any row pair (-inf, unnormalised, far apart). Pass 1 by blocks: top-K of x and y, exp(v − running
// max) in float64 into buf, block sums; normalisers Kahan-compensated over blocks. Pass 2: every sum from buf.
static void row_f64(const float* x, const float* y, int64_t V, int K, int32_t* tx, int32_t* ty, double* buf, Raw& R) {
  float tvx[256], tvy[256];
  const int64_t Vr = (V + 7) / 8 * 8, nb = (V + BS - 1) / BS;
  double *bx = buf, *by = bx + Vr, *rx = by + Vr, *ry = rx + nb, *sx = ry + nb, *sy = sx + nb;
  const double NINF = -INFINITY;
  int cx = 0, cy = 0;
  __mmask16 bad = 0;
  __m256 vmin = _mm256_set1_ps(INFINITY);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
    for (int64_t i = i0; i < i1; i += 16) {  // lanes above the K-th value so far (all lanes until K are held) go to the lists
      __mmask16 m = i1 - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (i1 - i)) - 1);
      __m512 vx = _mm512_maskz_loadu_ps(m, x + i), vy = _mm512_maskz_loadu_ps(m, y + i);
      bad |= _mm512_cmp_ps_mask(vx, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ) | _mm512_cmp_ps_mask(vy, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);
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
  __m512d akl = _mm512_setzero_pd(), aklr = akl, ahp = akl, ahq = akl, atv = akl, ajs = akl;
  const __m512d vmx = _mm512_set1_pd(mx), vmy = _mm512_set1_pd(my), vlp = _mm512_set1_pd(lsp), vlq = _mm512_set1_pd(lsq);
  const __m512d vc = _mm512_set1_pd(c), ln4 = _mm512_set1_pd(2 * LN2_HI), ninf = _mm512_set1_pd(-INFINITY);
  const __m512d vyt = _mm512_set1_pd((double)y[tx[0]] - my), one = _mm512_set1_pd(1.0);
  if (finite) {  // no -inf in either row (so p, q > 0): Σ p·g(d) and Σ p dx − ln Σ, no masks
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
        ahp = _mm512_fmadd_pd(p, dx, ahp); ahq = _mm512_fmadd_pd(q, dy, ahq);
        __m512d pm = _mm512_sub_pd(p, q), pp = _mm512_add_pd(p, q);
        atv = _mm512_add_pd(atv, _mm512_abs_pd(pm));
        __m512d d = _mm512_sub_pd(e, vc), w = _mm512_mul_pd(d, d), psi, tkl, tklr;  // d = ln p − ln q
        gkl8(p, q, d, &tkl, &tklr);  // tail lanes: p = q = 0, terms 0
        akl = _mm512_add_pd(akl, tkl); aklr = _mm512_add_pd(aklr, tklr);
        if (_mm512_cmp_pd_mask(w, _mm512_set1_pd(0.04), _CMP_LE_OQ) == 0xFF) {
          // |d| <= 0.2 (the usual case): ψ = d tanh(d/2) − 2 ln cosh(d/2) in powers of w = d², to w^6
          // (the next term is 5461 w^7 / 13412044800: truncation < 1e-14 relative)
          __m512d t = _mm512_fmadd_pd(_mm512_set1_pd(-691.0 / 174182400), w, _mm512_set1_pd(31.0 / 806400));
          t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(-17.0 / 46080));
          t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(1.0 / 288));
          t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(-1.0 / 32));
          t = _mm512_fmadd_pd(t, w, _mm512_set1_pd(0.25));
          psi = _mm512_mul_pd(t, w);
        } else {  // tail lanes: p = q = 0, so u is NaN and ψ = 2 ln 2 times p + q = 0
          psi = psi8(pm, pp, d, 0xFF);
        }
        ajs = _mm512_fmadd_pd(pp, psi, ajs);
      }
    }
    kl = hsum(akl); klr = hsum(aklr); hp = hsum(ahp) - lsp; hq = hsum(ahq) - lsq; tv = hsum(atv); js = hsum(ajs);
  } else {  // Σ p·g(d) over the lanes both sides hold, which is KL − (the q mass where p = 0) + (the p mass where q = 0)
    __m512d aqo = _mm512_setzero_pd(), apo = aqo;
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
        __m512d tkl, tklr;
        gkl8(p, q, d, &tkl, &tklr);
        akl = _mm512_mask_add_pd(akl, both, akl, tkl);
        aklr = _mm512_mask_add_pd(aklr, both, aklr, tklr);
        ahp = _mm512_mask3_fmadd_pd(p, lp, ahp, fx);
        ahq = _mm512_mask3_fmadd_pd(q, lq, ahq, fy);
        __m512d pm = _mm512_sub_pd(p, q), pp = _mm512_add_pd(p, q);
        atv = _mm512_add_pd(atv, _mm512_abs_pd(pm));
        ajs = _mm512_fmadd_pd(pp, psi8(pm, pp, d, both), ajs);
        __mmask8 ox = fx & ~fy, oy = fy & ~fx;  // one side -inf: that KL is +inf where the other p > 0 in float64
        apo = _mm512_mask_add_pd(apo, ox, apo, p); aqo = _mm512_mask_add_pd(aqo, oy, aqo, q);
        if ((ox && !infp) || (oy && !infq)) {
          double a[8], bb[8]; _mm512_storeu_pd(a, lp); _mm512_storeu_pd(bb, lq);
          for (int l = 0; l < 8; ++l) { infp |= (ox >> l & 1) && exp(a[l]) > 0; infq |= (oy >> l & 1) && exp(bb[l]) > 0; }
        }
      }
    }
    kl = hsum(akl) + hsum(aqo); klr = hsum(aklr) + hsum(apo); hp = hsum(ahp); hq = hsum(ahq); tv = hsum(atv); js = hsum(ajs);
  }
  R.lx = mx + lsp; R.ly = my + lsq; R.kl = kl; R.klr = klr; R.hp = hp; R.hq = hq; R.l1 = tv; R.js4 = js;
  R.infp = infp; R.infq = infq; R.rank = cnt; R.bad = bad != 0;
}

// ---------------------------------------------------------------------------------------------------------------------
// The float32 fast path: finite rows whose normalisers differ by |c| <= 0.01 (log-prob rows always do). Groups of 16
// with every |x − y| <= 0.2 (a quantised model's drift) go in float32 with series; other groups (and the row's last
// < 16) in float64. Returns false (nothing usable) for a row it does not take, which then goes to row_f64.
// Per thread: per block b, S (Σ e), Sf (its float32 groups' part), E, Q (Σ e^(y−m) of float32 groups), A1, A2 (entropy
// sums), F (e^(m_b − max)), M (m_b); per entry e (pb) and d0 (db) of float32 groups; per group its path (gen).
struct Fast { double *S, *Sf, *E, *Q, *A1, *A2, *F; float *M, *pb, *db; uint8_t* gen; };

// The fast path's running top K of a row (K <= 256): values tv sorted descending with their ids ti (among equal values
// the lowest id first), the count c, thr (the K-th value once K are in, else -inf: only a value above it can enter)
// and max (the largest so far). K <= 16: topk_insert a candidate at a time; K <= 128: a group's candidates into TopK
// registers at once (no branch, no shifts in memory); beyond, Big's keys, sorted into tv/ti by top_finish. One
// insertion at a time costs O(K) moves and a mispredict: at K = 256 a row pair took 3.4x as long as at K = 10.
// (Finite candidates only: TopK's empty places are -inf, which a -inf candidate would land behind. row_f64, whose
// rows may have fewer than K finite entries, lists -inf ones too, with topk_insert.)
struct Top { float tv[256]; int32_t ti[256]; int c; float thr, max; Big big; };
static inline void top_init(Top& T, int K) {
  for (int j = 0; j < (K + 15) / 16 * 16; ++j) { T.tv[j] = -INFINITY; T.ti[j] = 0; }
  T.c = 0; T.thr = T.max = -INFINITY; T.big.n = 0;
}
// The lanes g of the G entries at x + at (each above T.thr, finite) into T.
static inline void top_lanes(Top& T, int K, const float* x, int64_t at, __mmask16 g) {
  if (K <= 16) {
    for (; g; g &= g - 1) { const int l = __builtin_ctz(g); T.thr = topk_insert(T.tv, T.ti, &T.c, K, x[at + l], (int32_t)(at + l)); }
  } else if (K <= BIG_K) {
    alignas(64) float cv[16]; alignas(64) int32_t ci[16];
    const __m512i ix = _mm512_add_epi32(_mm512_set1_epi32((int32_t)at), _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15));
    _mm512_store_ps(cv, _mm512_maskz_compress_ps(g, _mm512_maskz_loadu_ps(g, x + at)));
    _mm512_store_si512(ci, _mm512_maskz_compress_epi32(g, ix));
    const int n = __builtin_popcount(g);
    if (K <= 32) topk_batch<2>(T.tv, T.ti, cv, ci, n); else if (K <= 64) topk_batch<4>(T.tv, T.ti, cv, ci, n);
    else topk_batch<8>(T.tv, T.ti, cv, ci, n);
    T.thr = topk_after(T.tv, &T.c, K, n);
  } else {
    for (; g; g &= g - 1) {
      const int l = __builtin_ctz(g);
      const float v = x[at + l];
      if (v > T.thr) { T.thr = big_add(T.big, K, T.thr, v, (int32_t)(at + l)); T.max = v > T.max ? v : T.max; }
    }
    return;
  }
  T.max = T.tv[0];
}
// After the row: the top K sorted in tv/ti (and c set), the ids also into out[0, c).
static inline void top_finish(Top& T, int K, int32_t* out) {
  if (K > BIG_K) big_finish(T.big, K, T.tv, T.ti, &T.c);
  memcpy(out, T.ti, sizeof(int32_t) * T.c);
}
struct Row { __m512d Lx, Ly, c; };
struct Acc { __m512d kl, klr, hp, hq, tv, js; int infp, infq; };

// Pass 1 of a float64 group (n <= 16 lanes): Σ e^(x−m) into z, Σ e^(y−m) − e^(x−m) into e; false where a lane is not finite.
static inline bool gen_p1(const float* x, const float* y, int64_t n, float m, __m512d& z, __m512d& e) {
  const __m512d vm = _mm512_set1_pd(m), zero = _mm512_setzero_pd();
  for (int64_t h = 0; h < n; h += 8) {
    const __mmask8 mk = n - h >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (n - h)) - 1);
    const __m512d xd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, x + h)), yd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, y + h));
    if (_mm512_cmp_pd_mask(_mm512_sub_pd(xd, xd), zero, _CMP_EQ_OQ) != 0xFF ||
        _mm512_cmp_pd_mask(_mm512_sub_pd(yd, yd), zero, _CMP_EQ_OQ) != 0xFF) return false;  // ±inf − ±inf, NaN: NaN
    const __m512d ex = _mm512_maskz_mov_pd(mk, exp8(_mm512_sub_pd(xd, vm))), ey = _mm512_maskz_mov_pd(mk, exp8(_mm512_sub_pd(yd, vm)));
    z = _mm512_add_pd(z, ex); e = _mm512_add_pd(e, _mm512_sub_pd(ey, ex));
  }
  return true;
}

// E's terms of 16 lanes in float64: Σ e^(y−m) − e^(x−m) into e.
__attribute__((noinline)) static void ee_exact(const float* x, const float* y, float m, __m512d& e) {
  const __m512d vm = _mm512_set1_pd(m);
  for (int h = 0; h < 16; h += 8) {
    const __m512d xd = _mm512_cvtps_pd(_mm256_loadu_ps(x + h)), yd = _mm512_cvtps_pd(_mm256_loadu_ps(y + h));
    e = _mm512_add_pd(e, _mm512_sub_pd(exp8(_mm512_sub_pd(yd, vm)), exp8(_mm512_sub_pd(xd, vm))));
  }
}

// E's terms e^(y−m) − e^(x−m) of the lanes packed at px, py[0, n) (n <= 8) in float64 into e: the fast path's lanes
// whose float32 term is over 2^-23 of the row's largest, 8 to a vector.
static inline void ee_packed(const float* px, const float* py, int n, float m, __m512d& e) {
  const __mmask8 mk = (__mmask8)((1u << n) - 1);
  const __m512d vm = _mm512_set1_pd(m);
  const __m512d xd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, px)), yd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, py));
  e = _mm512_add_pd(e, _mm512_maskz_sub_pd(mk, exp8(_mm512_sub_pd(yd, vm)), exp8(_mm512_sub_pd(xd, vm))));
}

// Pass 2 of a float64 group, n <= 8 lanes (finite): p, q by exp8, KL as Σ p·d − p + q (= p·g(d)), KL_rev as Σ −q·d + p − q,
// ψ = u·d + ln(1 − u²) with u = (p − q)/(p + q) (series in u² where u² <= 0.01).
static inline void gen8(const float* x, const float* y, int64_t n, const Row& R, Acc& A) {
  const __mmask8 m = n >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << n) - 1);
  const __m512d xd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x)), yd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, y));
  const __m512d lp = _mm512_sub_pd(xd, R.Lx), lq = _mm512_sub_pd(yd, R.Ly);
  const __m512d p = _mm512_maskz_mov_pd(m, exp8(lp)), q = _mm512_maskz_mov_pd(m, exp8(lq));
  const __m512d d = _mm512_sub_pd(_mm512_sub_pd(xd, yd), R.c);
  const __m512d pm = _mm512_sub_pd(p, q), pp = _mm512_add_pd(p, q);
  A.kl = _mm512_add_pd(A.kl, _mm512_fmadd_pd(p, d, _mm512_sub_pd(q, p)));
  A.klr = _mm512_add_pd(A.klr, _mm512_fnmadd_pd(q, d, pm));
  A.hp = _mm512_fmadd_pd(p, lp, A.hp);
  A.hq = _mm512_fmadd_pd(q, lq, A.hq);
  A.tv = _mm512_add_pd(A.tv, _mm512_abs_pd(pm));
  A.js = _mm512_fmadd_pd(pp, psi8(pm, pp, d, m), A.js);  // lanes past n: p + q = 0
}

__attribute__((noinline)) static void gen16(const float* x, const float* y, int64_t n, const Row& R, Acc& A) {
  gen8(x, y, n < 8 ? n : 8, R, A);
  if (n > 8) gen8(x + 8, y + 8, n - 8, R, A);
}

// Pass 1's float32 work on 16 lanes with |d0| <= 0.21, d0 = x − y, w = d0², t = x − m: e = exp(t), and
// ee = e·(e^(−d0) − 1) rounded once (rounding e^(−d0) − 1 on its own would err alike wherever d0 repeats, as it does in float16 stores, and
// those errors would add up; these stay random). e^(−d0) − 1 = −d0 + w·Q(d0), Q = Σ_n≥2 (−d0)^(n−2)/n! to d0⁵ in Horner
// form (truncation < 2e-9 relative): Q's rounding, alike wherever d0 repeats, is scaled by w·Q/d0 <= 0.11.
static inline void p1_lanes(__m512 t, __m512 d0, __m512 w, __m512& e, __m512& ee) {
  e = exp16c(t);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(-1.0f / 5040), d0, _mm512_set1_ps(1.0f / 720));
  q = _mm512_fmadd_ps(q, d0, _mm512_set1_ps(-1.0f / 120));
  q = _mm512_fmadd_ps(q, d0, _mm512_set1_ps(1.0f / 24));
  q = _mm512_fmadd_ps(q, d0, _mm512_set1_ps(-1.0f / 6));
  q = _mm512_fmadd_ps(q, d0, _mm512_set1_ps(0.5f));
  ee = _mm512_fmsub_ps(e, _mm512_mul_ps(w, q), _mm512_mul_ps(e, d0));
}

// p1_lanes on two groups.
static inline void p1_lanes2(const __m512* t, const __m512* d0, const __m512* w, __m512* e, __m512* ee) {
  for (int u = 0; u < 2; ++u) p1_lanes(t[u], d0[u], w[u], e[u], ee[u]);
}

// The largest of two vectors of non-negative floats, or a NaN where a lane of either is NaN (as unsigned integers,
// non-negative floats order as floats do, and NaNs of either sign above +inf): one max instead of a second compare.
static inline __m512 umax(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

// The entropy sums' terms of lanes `bu` (within 8 of the maximum m) in float64 from x and y:
// Σ e·(x − m) into a[0], Σ (e + ee)·(y − m) into a[1]. Summed as the rest are, relative to m, such a term and its share
// of (m − ln Z)·Σ e cancel to p·ln p; in float32 (x − m and the product rounded) that left errors of ~1e-6 nats.
__attribute__((noinline)) static void big_lanes(const float* x, const float* y, float m, __mmask16 bu, __m512 e, __m512 ee, double* a) {
  alignas(64) float ev[16], eev[16];
  _mm512_store_ps(ev, e); _mm512_store_ps(eev, ee);
  for (; bu; bu &= bu - 1) {
    const int l = __builtin_ctz(bu);
    a[0] += (double)ev[l] * ((double)x[l] - m);
    a[1] += ((double)ev[l] + (double)eev[l]) * ((double)y[l] - m);
  }
}

// Pass 2 of a medium group (GEN_MED: finite, some |d| over 0.2, none over ~30), 16 lanes of e and d0, into the block's
// float32 sums (acc: KL, KL_rev, TV, JS). Lanes with |d| <= 0.5: g(d), g(−d) and e^(−d) − 1 by series to d^10
// (truncation < 1e-10 relative); beyond: from float32 exps, d + (e^(−d) − 1) and −d + (e^d − 1) (their float32 errors
// stay under 5e-7 of g from |d| = 0.5 on), and q's share as e·e^(−d) (e + e·em would cancel where q << p).
// ψ = d·tanh(d/2) − 2 ln cosh(d/2): its series to d^26 for |d| <= 1.5 (< 1e-8 relative), beyond
// 2 ln 2 − 2|d|·a/(1 + a) − 2 ln(1 + a), a = e^(−|d|) (cancelling by at most 5x there).
__attribute__((noinline)) static void med16(const float* pb, const float* db, __m512 vc, __m512 vcl, __m512* acc) {
  const __m512 e = _mm512_load_ps(pb), d = _mm512_sub_ps(_mm512_sub_ps(_mm512_load_ps(db), vc), vcl), w = _mm512_mul_ps(d, d);
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 ev = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 3628800), w, _mm512_set1_ps(1.0f / 40320));
  ev = _mm512_fmadd_ps(ev, w, _mm512_set1_ps(1.0f / 720));
  ev = _mm512_fmadd_ps(ev, w, _mm512_set1_ps(1.0f / 24));
  ev = _mm512_mul_ps(_mm512_fmadd_ps(ev, w, _mm512_set1_ps(0.5f)), w);
  __m512 od = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 362880), w, _mm512_set1_ps(1.0f / 5040));
  od = _mm512_fmadd_ps(od, w, _mm512_set1_ps(1.0f / 120));
  od = _mm512_mul_ps(_mm512_fmadd_ps(od, w, _mm512_set1_ps(1.0f / 6)), _mm512_mul_ps(w, d));
  __m512 g = _mm512_sub_ps(ev, od), gr = _mm512_add_ps(ev, od), em = _mm512_sub_ps(g, d);
  static const float PSI[13] = {2.5000000000e-01f, -3.1250000000e-02f, 3.4722222222e-03f, -3.6892361111e-04f,
                                3.8442460317e-05f, -3.9671057466e-06f, 4.0717132111e-07f, -4.1651755916e-08f,
                                4.2514659017e-09f, -4.3329745966e-10f, 4.4112269899e-11f, -4.4872435397e-12f,
                                4.5617340475e-13f};  // ψ's series in w = d²
  __m512 ps = _mm512_set1_ps(PSI[12]);
  for (int k = 11; k >= 0; --k) ps = _mm512_fmadd_ps(ps, w, _mm512_set1_ps(PSI[k]));
  ps = _mm512_mul_ps(ps, w);
  const __mmask16 far = _mm512_cmp_ps_mask(w, _mm512_set1_ps(0.25f), _CMP_GT_OQ);
  __m512 eq = _mm512_setzero_ps(), ee;
  if (far) {
    const __m512 xm = exp16c(_mm512_sub_ps(_mm512_setzero_ps(), d)), xp = exp16c(d);  // e^(−d), e^d
    const __m512 emb = _mm512_sub_ps(xm, one);
    g = _mm512_mask_mov_ps(g, far, _mm512_add_ps(d, emb));
    gr = _mm512_mask_mov_ps(gr, far, _mm512_sub_ps(_mm512_sub_ps(xp, one), d));
    em = _mm512_mask_mov_ps(em, far, emb);
    eq = _mm512_mul_ps(e, xm);
    const __mmask16 vfar = _mm512_cmp_ps_mask(w, _mm512_set1_ps(2.25f), _CMP_GT_OQ);
    if (vfar) {
      const __m512 a = _mm512_min_ps(xm, xp), ad = _mm512_abs_ps(d);  // e^(−|d|) <= e^-1.5
      const __m512 sa = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(2.f), a)), s2 = _mm512_mul_ps(sa, sa);
      __m512 l = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 11), s2, _mm512_set1_ps(1.0f / 9));  // ln(1 + a) = 2 atanh(sa)
      l = _mm512_fmadd_ps(l, s2, _mm512_set1_ps(1.0f / 7));
      l = _mm512_fmadd_ps(l, s2, _mm512_set1_ps(1.0f / 5));
      l = _mm512_fmadd_ps(l, s2, _mm512_set1_ps(1.0f / 3));
      l = _mm512_mul_ps(_mm512_fmadd_ps(l, s2, one), _mm512_add_ps(sa, sa));
      const __m512 t2 = _mm512_div_ps(_mm512_mul_ps(_mm512_add_ps(ad, ad), a), _mm512_add_ps(one, a));
      const __m512 pf = _mm512_sub_ps(_mm512_sub_ps(_mm512_set1_ps(1.3862943611f), t2), _mm512_add_ps(l, l));
      ps = _mm512_mask_mov_ps(ps, vfar, pf);
    }
  }
  ee = _mm512_mul_ps(e, em);
  eq = _mm512_mask_mov_ps(_mm512_add_ps(e, ee), far, eq);
  acc[0] = _mm512_fmadd_ps(e, g, acc[0]);
  acc[1] = _mm512_fmadd_ps(eq, gr, acc[1]);
  acc[2] = _mm512_add_ps(acc[2], _mm512_abs_ps(ee));
  acc[3] = _mm512_fmadd_ps(_mm512_add_ps(e, eq), ps, acc[3]);
}

// Pass 1's sums from p1_one (the groups the paired fast path hands over), kept apart from the fast path's so that
// those stay in registers: Σ e, Σ ee in float64; the entropy sums' float32 and float64 (big_lanes) parts; Σ e and E of
// float64 groups (zg, eg, as gen_p1 and ee_exact give them); for Q, Σ ee of groups whose E went to float64 and the
// medium groups' e^(y−m) − (e + ee) (q2).
struct Slow { __m512d z, e, zg, eg, q2; __m512 a1, a2; double ad[2]; };

// A group's path (Fast::gen): bit 0 float64 throughout, bit 1 its E in float64 (ee_exact), bit 2 float32 with
// exps where |d0| > 0.2 ("medium"): 0 and 2 the fast path, 4 and 6 medium, 1 float64.
enum { GEN_F64 = 1, GEN_E64 = 2, GEN_MED = 4 };

// One group (n <= 16 lanes at j, after its top-K part) in pass 1: the float32 path where every |d0| <= 0.2; where
// some |d0| is larger but every one is <= 30 (all finite), the same with ee = e^(y−m) − e from a second float32 exp
// on those lanes (no cancellation there: |ee| >= 0.18 e); else the float64 one (gen_p1). In both float32 cases E's
// terms over 2^-23 of the row's largest go in float64. False where a lane is not finite.
__attribute__((noinline)) static bool p1_one(const float* x, const float* y, int64_t j, int64_t n, float m, const Fast& s,
                                              Slow& S) {
  const __mmask16 mk = n >= G ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  const __m512 vx = _mm512_maskz_loadu_ps(mk, x + j), vy = _mm512_maskz_loadu_ps(mk, y + j), vm = _mm512_set1_ps(m);
  const __m512 d0 = _mm512_sub_ps(vx, vy), w = _mm512_mul_ps(d0, d0);
  const __mmask16 near = _mm512_cmp_ps_mask(w, _mm512_set1_ps(0.04f), _CMP_LE_OQ);  // NaN, ±inf: not <=
  int med = 0;
  if (n == G && (near == 0xFFFF || (med = _mm512_cmp_ps_mask(w, _mm512_set1_ps(900.f), _CMP_LE_OQ) == 0xFFFF))) {
    const __m512 t = _mm512_sub_ps(vx, vm), ty = _mm512_sub_ps(vy, vm);
    __m512 e, ee;
    p1_lanes(t, d0, w, e, ee);
    __m512 eq = _mm512_add_ps(e, ee);  // e^(y − m)
    __mmask16 bu = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-8.f), _CMP_GT_OQ);
    if (med) {  // the lanes past 0.2: e^(y − m) from its own exp; "big" (entropy terms in float64) where either side is
      const __m512 ey = exp16c(ty);
      ee = _mm512_mask_blend_ps(near, _mm512_sub_ps(ey, e), ee);
      eq = _mm512_mask_blend_ps(near, ey, eq);
      bu |= _mm512_cmp_ps_mask(ty, _mm512_set1_ps(-8.f), _CMP_GT_OQ);
    }
    _mm512_store_ps(s.pb + j, e);
    _mm512_store_ps(s.db + j, d0);
    S.z = _mm512_add_pd(S.z, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1))));
    if (bu) big_lanes(x + j, y + j, m, bu, e, ee, S.ad);
    if (med) {  // Q and the big lanes' terms take e^(y−m) itself, not e + (e^(y−m) − e) (which cancels where q << p):
      for (int h = 0; h < 2; ++h) {  // the difference, in float64
        const __m512d corr = _mm512_sub_pd(_mm512_sub_pd(cvt_half(eq, h), cvt_half(e, h)), cvt_half(ee, h));
        S.q2 = _mm512_add_pd(S.q2, corr);
        const __mmask8 bh = (__mmask8)(bu >> (8 * h));
        if (bh) S.ad[1] += hsum(_mm512_maskz_mul_pd(bh, corr, cvt_half(ty, h)));
      }
    }
    S.a1 = _mm512_mask3_fmadd_ps(e, t, S.a1, (__mmask16)~bu);
    S.a2 = _mm512_mask3_fmadd_ps(eq, ty, S.a2, (__mmask16)~bu);
    const __m512d eed = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(ee)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(ee, 1)));
    // E's terms in float32 where every one is small: |ee| <= 2^-23 of the row's largest from the series; from the
    // exps (error ~6e-8 of e + e^(y−m), not of ee) only where both are <= 2^-30, so that c stays as exact as in float64
    __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(ee), _mm512_set1_ps(1.0f / 8388608), _CMP_LE_OQ);
    if (med) small = (small & near) | (_mm512_cmp_ps_mask(umax(e, eq), _mm512_set1_ps(1.0f / 1073741824), _CMP_LE_OQ) & ~near);
    if (small == 0xFFFF) {
      S.e = _mm512_add_pd(S.e, eed);
      s.gen[j / G] = med ? GEN_MED : 0;
    } else {  // a term of E over 2^-23 of the row's largest: float32's 1e-7 would show in c, so float64
      ee_exact(x + j, y + j, m, S.eg);
      S.q2 = _mm512_add_pd(S.q2, eed);
      s.gen[j / G] = med ? GEN_MED | GEN_E64 : GEN_E64;
    }
    return true;
  }
  s.gen[j / G] = GEN_F64;
  return gen_p1(x + j, y + j, n, m, S.zg, S.eg);
}

// mh: x's largest entry where the caller knows it (the row before took it), else NaN; xn: a row whose largest entry
// goes to *mhn (NaN unless the row is taken here): the next row's x, read as this row's x is, or null.
static bool row_f32(const float* x, const float* y, int64_t V, int K, int32_t* tx, int32_t* ty, const Fast& s, Raw& R,
                    float mh, const float* xn, float* mhn) {
  Top Tx, Ty;
  top_init(Tx, K); top_init(Ty, K);
  const int64_t nb = (V + BS - 1) / BS;
  // Pass 1, the one read of the rows: top-K of x and y; e = exp(x − m) in float32 (m: x's largest entry, rounded up),
  // kept in pb with d0 = x − y in db; Σ e, and Σ ee with ee = e·(e^(−d0) − 1),
  // which gives c = ln Z_x − ln Z_y = −ln(1 + Σ p·(e^(−d0) − 1)) with no cancellation: c is as exact as the drift it
  // measures; and the entropy sums Σ e·(x − m), Σ e^(y−m)·(y − m) in float32 per block. Of Σ e and Σ ee, terms of e
  // over e^-8 (the row's few largest, whose float32 rounding would show in ln Z and in a confident token's NLL) go
  // into float64 at once, and terms of ee over 2^-23 (of the row's largest term, 1) go in float64; the rest are
  // Kahan-compensated float32 sums over the block (error ~2^-24 of the sum, whatever the count), into float64 at
  // its end. (Compensated float32 in the add pipes, which have room here, is cheaper than converting to float64.)
  // m: x's largest entry, so that the tests of e and E's terms against 2^-23 and e^-8 below are relative to the
  // row's largest term. (With a running maximum instead, lower in the blocks before the row's top entry, 18% of an
  // LM-shaped row's entries went to the float64 paths, against 3%: 1.1x these rows/s.) From mh (read while the row
  // before was, or by to_f32), else one read of x here, which leaves x in the cache for pass 1. (A NaN may hide a
  // larger entry from the max; such a row leaves the fast path at its first NaN group.)
  *mhn = NAN;
  float m = mh;
  if (m != m) {
    __m512 a0 = _mm512_set1_ps(-INFINITY), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * G <= V; i += 4 * G) {
      a0 = _mm512_max_ps(a0, _mm512_loadu_ps(x + i)); a1 = _mm512_max_ps(a1, _mm512_loadu_ps(x + i + G));
      a2 = _mm512_max_ps(a2, _mm512_loadu_ps(x + i + 2 * G)); a3 = _mm512_max_ps(a3, _mm512_loadu_ps(x + i + 3 * G));
    }
    m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
    for (; i < V; ++i) m = x[i] > m ? x[i] : m;
  }
  const bool next = xn != nullptr;
  if (!next) xn = x;  // (read again from L1, and not used)
  __m512 nm = _mm512_set1_ps(-INFINITY);  // the largest of xn so far
  if (!(m > -INFINITY && m < INFINITY)) return false;
  // m is rounded up to an integer: then x − m is exact in float32 for every x <= m <= 0 (log-prob rows). With m's
  // own low bits, x − m would round alike for every x of a binade coarser than m's, and that shared error (up to
  // half an ulp of x, 5e-7 at x ~ −12) would bias ln Z, the NLLs and the entropies; the top-16 fix below only
  // reaches the largest terms.
  m = ceilf(m);
  const __m512 lim = _mm512_set1_ps(0.04f), tau = _mm512_set1_ps(1.0f / 8388608), big = _mm512_set1_ps(-8.f);
  float* const pb = s.pb; float* const db = s.db; uint8_t* const gen = s.gen;  // locals: no reloads after each store
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
    const __m512 vm = _mm512_set1_ps(m);
    __m512d zb = _mm512_setzero_pd();
    __m512 a1 = _mm512_setzero_ps(), a2 = a1, zf = a1, ef = a1, zc = a1, ec = a1;  // zc, ec: Kahan compensations
    Slow S;
    S.z = S.e = S.zg = S.eg = S.q2 = zb; S.a1 = S.a2 = a1; S.ad[0] = S.ad[1] = 0;
    // the block's groups with lanes whose E term goes in float64 ("hi", below): group gl[j], lanes gm[j]
    int32_t gl[BS / G + 2]; __mmask16 gm[BS / G + 2]; int ng = 0;
    // Two groups at a time (n <= 2G entries at i): one compare each for the top-k gate, the checks and the big lanes.
    // Inlined twice: for whole pairs (n = 2G, constant masks) and for a block's last n < 2G.
    auto step = [&](const int64_t i, const int64_t n) __attribute__((always_inline)) -> bool {
      const __mmask32 mk = n == 2 * G ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << n) - 1);
      _mm_prefetch((const char*)(x + i + 1024), _MM_HINT_T0); _mm_prefetch((const char*)(y + i + 1024), _MM_HINT_T0);
      _mm_prefetch((const char*)(x + i + 1040), _MM_HINT_T0); _mm_prefetch((const char*)(y + i + 1040), _MM_HINT_T0);
      _mm_prefetch((const char*)(xn + i + 1024), _MM_HINT_T0); _mm_prefetch((const char*)(xn + i + 1040), _MM_HINT_T0);
      const __mmask16 m0 = (__mmask16)mk, m1 = (__mmask16)(mk >> 16);
      nm = _mm512_max_ps(nm, _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m0, xn + i),
                                            _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m1, xn + i + G)));
      __m512 vx[2] = {_mm512_maskz_loadu_ps(m0, x + i), _mm512_maskz_loadu_ps(m1, x + i + G)};
      __m512 vy[2] = {_mm512_maskz_loadu_ps(m0, y + i), _mm512_maskz_loadu_ps(m1, y + i + G)};
      {
        const __m512 kx = _mm512_set1_ps(Tx.thr), ky = _mm512_set1_ps(Ty.thr);
        // one compare a row over both groups (a masked-off lane, 0, may pass it: the second compare is masked; exact
        // where the row is finite, which is the only case whose lists this path keeps: a NaN or inf anywhere sends the
        // row to row_f64), per lane only where it may pass; a group's lanes go in together, so the threshold of its
        // second group's compare may lag (a candidate not above the K-th changes nothing)
        if (__builtin_expect((_mm512_cmp_ps_mask(_mm512_max_ps(vx[0], vx[1]), kx, _CMP_GT_OQ) |
                              _mm512_cmp_ps_mask(_mm512_max_ps(vy[0], vy[1]), ky, _CMP_GT_OQ)) != 0, 0)) {
          const __mmask16 gx0 = _mm512_mask_cmp_ps_mask(m0, vx[0], kx, _CMP_GT_OQ), gx1 = _mm512_mask_cmp_ps_mask(m1, vx[1], kx, _CMP_GT_OQ);
          const __mmask16 gy0 = _mm512_mask_cmp_ps_mask(m0, vy[0], ky, _CMP_GT_OQ), gy1 = _mm512_mask_cmp_ps_mask(m1, vy[1], ky, _CMP_GT_OQ);
          if (gx0) top_lanes(Tx, K, x, i, gx0);
          if (gx1) top_lanes(Tx, K, x, i + G, gx1);
          if (gy0) top_lanes(Ty, K, y, i, gy0);
          if (gy1) top_lanes(Ty, K, y, i + G, gy1);
        }
      }
      __m512 d0[2], w[2];
      for (int u = 0; u < 2; ++u) { d0[u] = _mm512_sub_ps(vx[u], vy[u]); w[u] = _mm512_mul_ps(d0[u], d0[u]); }
      __m512 t[2], e[2], ee[2];
      for (int u = 0; u < 2; ++u) t[u] = _mm512_sub_ps(vx[u], vm);
      p1_lanes2(t, d0, w, e, ee);  // harmless garbage where the checks below fail
      // the fast case: every |d0| <= 0.2 (NaN, ±inf: not <=), else p1_one takes each group
      if (__builtin_expect(n == 2 * G && _mm512_cmp_ps_mask(umax(w[0], w[1]), lim, _CMP_LE_OQ) == 0xFFFF, 1)) {
        // lanes within 8 of the maximum (a row's few largest terms): Σ e straight into float64 and their
        // entropy terms in float64 (big_lanes); the rest into the block's compensated float32 sums.
        __m512 es[2] = {e[0], e[1]}, eq[2];
        for (int u = 0; u < 2; ++u) eq[u] = _mm512_add_ps(e[u], ee[u]);  // e^(y − m)
        __m512 eqs[2] = {eq[0], eq[1]};
        const __m512 tmax = _mm512_max_ps(t[0], t[1]);
        if (__builtin_expect(_mm512_cmp_ps_mask(tmax, big, _CMP_GT_OQ) != 0, 0)) for (int u = 0; u < 2; ++u) {
          const __mmask16 bu = _mm512_cmp_ps_mask(t[u], big, _CMP_GT_OQ);
          zb = _mm512_add_pd(zb, _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_mov_ps(bu, e[u]))));
          zb = _mm512_add_pd(zb, _mm512_cvtps_pd(_mm512_extractf32x8_ps(_mm512_maskz_mov_ps(bu, e[u]), 1)));
          if (bu) big_lanes(x + i + u * G, y + i + u * G, m, bu, e[u], ee[u], S.ad);
          es[u] = _mm512_maskz_mov_ps((__mmask16)~bu, e[u]);
          eqs[u] = _mm512_maskz_mov_ps((__mmask16)~bu, eq[u]);
        }
        for (int u = 0; u < 2; ++u) {
          _mm512_store_ps(pb + i + u * G, e[u]);
          _mm512_store_ps(db + i + u * G, d0[u]);
          a1 = _mm512_fmadd_ps(es[u], t[u], a1);
          a2 = _mm512_fmadd_ps(eqs[u], _mm512_sub_ps(vy[u], vm), a2);
        }
        // E's terms: those over 2^-23 of the row's largest ("hi": float32's 1e-7 would show in c) go in float64 at the
        // block's end (the groups that have one are listed here, without a branch); the rest into the block's
        // compensated float32 sum. 17% of an LM-shaped row's groups have a hi lane, about 3 of their 16. (Before,
        // such a group took a branch to ee_exact, all 16 lanes in float64: these rows ran at 0.85x.)
        const __mmask16 hi0 = _mm512_cmp_ps_mask(_mm512_abs_ps(ee[0]), tau, _CMP_GT_OQ), hi1 = _mm512_cmp_ps_mask(_mm512_abs_ps(ee[1]), tau, _CMP_GT_OQ);
        {  // Kahan-compensated float32 sums over the block
          const __m512 yz = _mm512_sub_ps(_mm512_add_ps(es[0], es[1]), zc), tz = _mm512_add_ps(zf, yz);
          zc = _mm512_sub_ps(_mm512_sub_ps(tz, zf), yz); zf = tz;
          const __m512 ye = _mm512_sub_ps(_mm512_add_ps(_mm512_maskz_mov_ps((__mmask16)~hi0, ee[0]), _mm512_maskz_mov_ps((__mmask16)~hi1, ee[1])), ec),
                       te = _mm512_add_ps(ef, ye);
          ec = _mm512_sub_ps(_mm512_sub_ps(te, ef), ye); ef = te;
        }
        gen[i / G] = gen[i / G + 1] = 0;
        gl[ng] = (int32_t)(i / G); gm[ng] = hi0; ng += hi0 != 0;
        gl[ng] = (int32_t)(i / G + 1); gm[ng] = hi1; ng += hi1 != 0;
      } else {
        if (!p1_one(x, y, i, n < G ? n : G, m, s, S)) return false;
        if (n > G && !p1_one(x, y, i + G, n - G, m, s, S)) return false;
      }
      return true;
    };
    int64_t i = i0;
    for (; i + 2 * G <= i1; i += 2 * G)
      if (!step(i, 2 * G)) return false;
    if (i < i1 && !step(i, i1 - i)) return false;
    // the hi lanes' E terms in float64, packed 8 to a vector (ee_packed), from x and y in L1; they go into E and Q
    // (whose other terms are Σ e + Σ ee in float32: e^(y−m) to ~1e-7 is what Q needs)
    __m512d eh = _mm512_setzero_pd();
    if (ng) {
      alignas(64) float px[BS + G], py[BS + G]; int np = 0;
      for (int j = 0; j < ng; ++j) {
        const int64_t a = (int64_t)gl[j] * G;
        _mm512_storeu_ps(px + np, _mm512_maskz_compress_ps(gm[j], _mm512_loadu_ps(x + a)));
        _mm512_storeu_ps(py + np, _mm512_maskz_compress_ps(gm[j], _mm512_loadu_ps(y + a)));
        np += __builtin_popcount(gm[j]);
      }
      for (int j = 0; j < np; j += 8) ee_packed(px + j, py + j, np - j < 8 ? np - j : 8, m, eh);
    }
    const __m512 zs = _mm512_sub_ps(zf, zc), es = _mm512_sub_ps(ef, ec);  // the compensated block sums, into float64
    const __m512d z = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(zs)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(zs, 1)));
    const __m512d e32 = _mm512_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(es)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(es, 1))),
                                      S.e);  // Σ ee of the groups whose E stayed float32
    s.Sf[b] = hsum(_mm512_add_pd(z, _mm512_add_pd(zb, S.z)));
    s.S[b] = s.Sf[b] + hsum(S.zg);
    s.E[b] = hsum(_mm512_add_pd(_mm512_add_pd(e32, eh), S.eg));
    s.Q[b] = s.Sf[b] + hsum(_mm512_add_pd(_mm512_add_pd(e32, eh), S.q2));  // Σ e^(y−m) = Σ e + Σ ee
    s.A1[b] = hsum(fold16(_mm512_add_ps(a1, S.a1))) + S.ad[0]; s.A2[b] = hsum(fold16(_mm512_add_ps(a2, S.a2))) + S.ad[1];
    s.M[b] = m;
  }
  // Z = Σ_b e^(m_b − max) S_b (Kahan), and the same for E; then the top 16 entries' float32 terms (the largest, whose
  // rounding would otherwise show in ln Z and c for peaked rows; each went into float64 as it was) are replaced by
  // float64 ones.
  top_finish(Tx, K, tx); top_finish(Ty, K, ty);
  const double Mx = Tx.max;
  double Z = 0, cz = 0, E = 0;
  {
    float last = NAN; double f = 0;
    for (int64_t b = 0; b < nb; ++b) {
      if (!(s.M[b] == last)) { last = s.M[b]; f = exp((double)last - Mx); }
      s.F[b] = f;
      double a = f * s.S[b] - cz, t = Z + a; cz = (t - Z) - a; Z = t;
      E += f * s.E[b];
    }
    alignas(64) float xv[16] = {0}, yv[16] = {0}, mv[16] = {0}, ev[16], eev[16];
    int64_t at[16]; int nt = 0;
    for (int j = 0; j < (Tx.c < 16 ? Tx.c : 16); ++j)
      if (!(s.gen[tx[j] / G] & GEN_F64)) { at[nt] = tx[j]; xv[nt] = x[tx[j]]; yv[nt] = y[tx[j]]; mv[nt] = s.M[tx[j] / BS]; ++nt; }
    {
      const __m512 vx = _mm512_load_ps(xv), d0 = _mm512_sub_ps(vx, _mm512_load_ps(yv));
      __m512 e, ee;
      p1_lanes(_mm512_sub_ps(vx, _mm512_load_ps(mv)), d0, _mm512_mul_ps(d0, d0), e, ee);  // bit for bit as in pass 1
      _mm512_store_ps(ev, e); _mm512_store_ps(eev, ee);
    }
    double fix = 0, fixe = 0;
    for (int l = 0; l < nt; ++l) {
      const double f = s.F[at[l] / BS], e64 = exp((double)xv[l] - (double)mv[l]);
      fix += f * (e64 - (double)ev[l]);
      if (!s.gen[at[l] / G] && fabsf(eev[l]) <= 1.0f / 8388608)  // (its E term in float32 in pass 1)
        fixe += f * (e64 * expm1((double)yv[l] - (double)xv[l]) - (double)eev[l]);
    }
    E += fixe;
    Z = Z + (fix - cz);
  }
  if (!(Z > 0 && Z < INFINITY && fabs(E) < INFINITY)) return false;
  const double lx = Mx + log(Z), c = -log1p(E / Z), ly = lx - c;
  if (!(fabs(c) <= 0.01 && fabs(lx) < 1e4)) return false;
  // entropy sums of the float32 groups: Σ p·ln p = Σ_b F_b/Z (A1_b + (m_b − lx) Sf_b), and Σ q·ln q likewise with
  // q's weights e^(c)·F_b/Z (every term of a block has the sign of its ln p: no cancellation)
  double hp = 0, hq = 0;
  for (int64_t b = 0; b < nb; ++b) {
    hp += s.F[b] * (s.A1[b] + ((double)s.M[b] - lx) * s.Sf[b]);
    hq += s.F[b] * (s.A2[b] + ((double)s.M[b] - ly) * s.Q[b]);
  }
  hp /= Z; hq *= exp(c) / Z;
  // Pass 2, from pb and db (1.2 MB: they stay in L2; fetching the next rows meanwhile would push them out):
  // p = e·e^(m_b − max)/Z; d = d0 − c = ln p − ln q; q = p·e^(−d). Sums in forms whose float32 rounding stays
  // relative: KL = Σ p·g(d), KL_rev = Σ q·g(−d), g(d) = d − 1 + e^(−d) ≥ 0 (= Σ p·d as Σp = Σq = 1),
  // TV = Σ p·|e^(−d) − 1|, JS = ¼ Σ (p + q)·ψ(d), ψ = d·tanh(d/2) − 2 ln cosh(d/2) ≥ 0. e^(−d) − 1 and ψ as series in
  // d, to d⁶ and w³ (w = d²): for |d| <= 0.21 the first term left out is under 1.7e-7 of g, of g(−d) and of ψ (under
  // 1e-12 at |d| = 0.01, a quantised model's usual drift). The sums run over e, not p, in float32 per block (p's
  // factor e^(m_b − max)/Z goes on in float64 at the block's end). Float64 groups read x and y again.
  const float c32 = (float)c;
  const __m512 vc = _mm512_set1_ps(c32), vcl = _mm512_set1_ps((float)(c - c32));
  Row Rg; Rg.Lx = _mm512_set1_pd(lx); Rg.Ly = _mm512_set1_pd(ly); Rg.c = _mm512_set1_pd(c);
  Acc A; A.kl = A.klr = A.hp = A.hq = A.tv = A.js = _mm512_setzero_pd(); A.infp = A.infq = 0;
  const double iz = 1.0 / Z;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t i0 = b * BS, i1 = i0 + BS < V ? i0 + BS : V;
    __m512 akl = _mm512_setzero_ps(), aklr = akl, atv = akl, ajs = akl;
    for (int64_t i = i0; i < i1; i += G) {
      const uint8_t gg = gen[i / G];
      if (__builtin_expect(gg == 0 || gg == GEN_E64, 1)) {
        const __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_load_ps(db + i), vc), vcl), w = _mm512_mul_ps(d, d);
        const __m512 e = _mm512_load_ps(pb + i);
        // e^(−d) − 1 = −d + ev − od: ev = w/2 + w²/24 + w³/720, od = d·w·(1/6 + w/120)
        __m512 ev = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 720), w, _mm512_set1_ps(1.0f / 24));
        ev = _mm512_mul_ps(_mm512_fmadd_ps(ev, w, _mm512_set1_ps(0.5f)), w);
        const __m512 od = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(1.0f / 120), w, _mm512_set1_ps(1.0f / 6)), _mm512_mul_ps(w, d));
        const __m512 g = _mm512_sub_ps(ev, od), gr = _mm512_add_ps(ev, od), em = _mm512_sub_ps(g, d);
        const __m512 ee = _mm512_mul_ps(e, em), eq = _mm512_add_ps(e, ee);  // q's share: e·e^(−d)
        akl = _mm512_fmadd_ps(e, g, akl);
        aklr = _mm512_fmadd_ps(eq, gr, aklr);
        atv = _mm512_add_ps(atv, _mm512_abs_ps(ee));
        // ψ = w/4 − w²/32 + w³/288
        __m512 ps = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 288), w, _mm512_set1_ps(-1.0f / 32));
        ps = _mm512_mul_ps(_mm512_fmadd_ps(ps, w, _mm512_set1_ps(0.25f)), w);
        ajs = _mm512_fmadd_ps(_mm512_add_ps(e, eq), ps, ajs);
      } else if (gg & GEN_MED) {
        __m512 acc[4] = {akl, aklr, atv, ajs};
        med16(pb + i, db + i, vc, vcl, acc);
        akl = acc[0]; aklr = acc[1]; atv = acc[2]; ajs = acc[3];
      } else {
        gen16(x + i, y + i, i1 - i < G ? i1 - i : G, Rg, A);
      }
    }
    const __m512d f = _mm512_set1_pd(s.F[b] * iz);
    A.kl = _mm512_fmadd_pd(fold16(akl), f, A.kl); A.klr = _mm512_fmadd_pd(fold16(aklr), f, A.klr);
    A.tv = _mm512_fmadd_pd(fold16(atv), f, A.tv); A.js = _mm512_fmadd_pd(fold16(ajs), f, A.js);
  }
  // rank of the ref's top token under the candidate: #{y > y_top} is read off y's top-K list where y_top is at least
  // its last value (everything above y_top is then in the list), else counted over the row
  const float yt = y[tx[0]];
  int64_t rank = 0;
  if (Ty.c < K || yt >= Ty.tv[K - 1]) {
    for (int j = 0; j < Ty.c; ++j) rank += Ty.tv[j] > yt;
  } else {
    const __m512 vyt = _mm512_set1_ps(yt);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
    const __m512i m1 = _mm512_set1_epi32(-1);
    int64_t i = 0;
    for (; i + 4 * G <= V; i += 4 * G) {
      c0 = _mm512_mask_sub_epi32(c0, _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i), vyt, _CMP_GT_OQ), c0, m1);
      c1 = _mm512_mask_sub_epi32(c1, _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i + G), vyt, _CMP_GT_OQ), c1, m1);
      c2 = _mm512_mask_sub_epi32(c2, _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i + 2 * G), vyt, _CMP_GT_OQ), c2, m1);
      c3 = _mm512_mask_sub_epi32(c3, _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i + 3 * G), vyt, _CMP_GT_OQ), c3, m1);
    }
    for (; i < V; ++i) rank += y[i] > yt;
    rank += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)));
  }
  R.lx = lx; R.ly = ly; R.kl = hsum(A.kl); R.klr = hsum(A.klr); R.hp = hp + hsum(A.hp); R.hq = hq + hsum(A.hq);
  R.l1 = hsum(A.tv); R.js4 = hsum(A.js); R.infp = R.infq = 0; R.rank = rank;
  if (next) *mhn = _mm512_reduce_max_ps(nm);
  return true;
}

// A float16 (kind 1) or bfloat16 (kind 2) row of V as float32 into dst (64-byte aligned): exact, -inf and NaN kept.
// The largest of the V entries goes to *mx where mx is not null (row_f32's maximum, taken here for free).
static void to_f32(const uint16_t* src, int kind, int64_t V, float* dst, float* mx) {
  int64_t i = 0;
  __m512 vmx = _mm512_set1_ps(-INFINITY);
  for (; i <= V; i += 16) {
    __m256i h;
    if (i + 16 <= V) {
      h = _mm256_loadu_si256((const __m256i*)(src + i));
    } else {
      alignas(32) uint16_t t[16] = {0};
      memcpy(t, src + i, (V - i) * 2);
      h = _mm256_load_si256((const __m256i*)t);
    }
    const __m512 v = kind == 1 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_store_ps(dst + i, v);
    vmx = _mm512_mask_max_ps(vmx, V - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - i)) - 1), vmx, v);
    if (i + 16 > V) break;
  }
  if (mx) *mx = _mm512_reduce_max_ps(vmx);
}

static void pm_rows(const void* X, const void* Y, int kind, int64_t n, int64_t V, int64_t ldx, int64_t ldy, int K,
                    const int64_t* T, const int32_t* ks, int nks, int mode, double* out, int32_t* top) {
  // per thread: row_f64's exps of a row pair and block table, then the fast path's block sums, p buffer and group
  // flags, and for 16-bit rows the pair as float32
  static thread_local char* buf = nullptr; static thread_local int64_t cap = 0;
  const int64_t Vr = (V + G - 1) / G * G, nb = (V + BS - 1) / BS, n64 = (2 * Vr + 4 * nb + 7 * nb + 7) / 8 * 8;
  const int64_t base = n64 * 8 + 2 * Vr * 4 + (nb + 15) / 16 * 64 + Vr / G + 64;  // doubles, pb and db, M, gen
  const int64_t conv_at = (base + 63) / 64 * 64, need = conv_at + (kind ? 2 * (Vr + G) * 4 : 0);  // then the rows
  if (cap < need) {
    free(buf); cap = 0;
    buf = (char*)aligned_alloc(64, (need + 63) / 64 * 64);
    if (!buf) { for (int64_t j = 0; j < n * (NFIX + nks); ++j) out[j] = NAN; return; }  // out of memory: NaN, the wrapper raises
    cap = need;
  }
  double* b64 = (double*)buf;
  Fast s;
  s.S = b64 + 2 * Vr + 4 * nb; s.Sf = s.S + nb; s.E = s.Sf + nb; s.Q = s.E + nb;
  s.A1 = s.Q + nb; s.A2 = s.A1 + nb; s.F = s.A2 + nb;
  s.pb = (float*)(b64 + n64); s.db = s.pb + Vr; s.M = s.db + Vr; s.gen = (uint8_t*)(s.M + (nb + 15) / 16 * 16);
  float* xb = (float*)(buf + conv_at);
  float* yb = xb + Vr + G;
  float mh = NAN;  // the row's largest x, where row_f32 took it while reading the row before, or to_f32 converting it
  for (int64_t r = 0; r < n; ++r) {
    const float* x; const float* y;
    if (kind) {
      to_f32((const uint16_t*)X + r * ldx, kind, V, xb, &mh); to_f32((const uint16_t*)Y + r * ldy, kind, V, yb, nullptr);
      x = xb; y = yb;
    } else {
      x = (const float*)X + r * ldx; y = (const float*)Y + r * ldy;
    }
    int32_t* tx = top + r * 2 * K; int32_t* ty = tx + K;
    Raw R;
    const float* xn = !kind && r + 1 < n ? (const float*)X + (r + 1) * ldx : nullptr;  // (16-bit rows: from to_f32)
    if (mode == 1 || !row_f32(x, y, V, K, tx, ty, s, R, mh, xn, &mh)) { row_f64(x, y, V, K, tx, ty, b64, R); mh = NAN; }
    finish(x, y, T[r], R, tx, ty, ks, nks, out + r * (NFIX + nks));
  }
}
#else
static void pm_rows(const void* X, const void* Y, int kind, int64_t n, int64_t V, int64_t ldx, int64_t ldy, int K,
                    const int64_t* T, const int32_t* ks, int nks, int mode, double* out, int32_t* top) {
  float tvx[256], tvy[256];  // (kind is 0 here: pm_native() says so, and the wrapper passes float32)
  for (int64_t r = 0; r < n; ++r) {
    const float* x = (const float*)X + r * ldx; const float* y = (const float*)Y + r * ldy;
    int32_t* tx = top + r * 2 * K; int32_t* ty = tx + K;
    int cx = 0, cy = 0; int64_t i = 0;
    for (; i < V; ++i) { topk_insert(tvx, tx, &cx, K, x[i], (int32_t)i); topk_insert(tvy, ty, &cy, K, y[i], (int32_t)i); }
    const double mx = tvx[0], my = tvy[0];
    const float ytop = y[tx[0]];
    double sp = 0, sq = 0, cp = 0, cq = 0; int64_t cnt = 0;  // normalisers Kahan-compensated: ln Z to ~1e-16
    int bad = 0;
    for (i = 0; i < V; ++i) {
      bad |= !(x[i] < INFINITY) || !(y[i] < INFINITY);
      double a = exp((double)x[i] - mx) - cp, t = sp + a; cp = (t - sp) - a; sp = t;
      a = exp((double)y[i] - my) - cq; t = sq + a; cq = (t - sq) - a; sq = t;
      cnt += y[i] > ytop;
    }
    const double lsp = log(sp), lsq = log(sq), c = lsp - lsq;
    // where both sides are finite, every sum in a form whose terms are >= 0 (no cancellation at tiny drift):
    // p·g(d) and q·g(−d) with g(d) = d + expm1(−d), p·|expm1(−d)|; the mass only one side has (po, qo) closes KL's sums
    double kl = 0, klr = 0, hp = 0, hq = 0, tv = 0, js = 0, po = 0, qo = 0; int infp = 0, infq = 0;
    for (i = 0; i < V; ++i) {
      double dx = (double)x[i] - mx, dy = (double)y[i] - my, lp = dx - lsp, lq = dy - lsq, p = exp(lp), q = exp(lq);
      int fx = dx != -INFINITY, fy = dy != -INFINITY;
      if (fx && fy) {
        const double d = (dx - dy) - c, em = expm1(-d), u = (p - q) / (p + q);
        kl += p * (d + em); klr += q * (expm1(d) - d); tv += p * fabs(em);
        js += (p + q) * psi1(u, d);
      } else {
        js += (p + q) * 2 * M_LN2; tv += p + q; po += fx ? p : 0.0; qo += fy ? q : 0.0;
        infp |= fx && p > 0; infq |= fy && q > 0;
      }
      if (fx) hp += p * lp;
      if (fy) hq += q * lq;
    }
    // Σ p·g(d) = Σ p·d − Σ (p − q) over the entries both have: KL = Σ p·g(d) + (qo − po), KL_rev likewise
    Raw R = {mx + lsp, my + lsq, kl + (qo - po), klr + (po - qo), hp, hq, tv, js, infp, infq, cnt, bad};
    finish(x, y, T[r], R, tx, ty, ks, nks, out + r * (NFIX + nks));
  }
}
#endif

#ifdef __AVX512F__
// The all-pairs matrix's two numbers for a row pair: J = KL(p‖q) + KL(q‖p) = Σ (p − q)·d with d = ln p − ln q (both
// rows renormalised; every term >= 0, so the sum keeps its terms' relative error), and whether the argmaxes (lowest
// id among ties) agree. 2 to 4 exps an entry, in three reads of the pair (L2-resident after the first for 16-bit
// rows), where pm_rows' full set takes its slow paths on pairs that drift far (~3,400 positions/s there):
// - pass 1: the maxima (and argmaxes), and whether both rows are finite (if not: NaN, and the wrapper takes the pair
//   to pm_team, as it does any J out of float32's range);
// - pass 2: Σe and E (below), hence c = ln Z_x − ln Z_y, exact to its own size;
// - pass 3: each term, as p·d²·g(d) from a series where |d| <= 1 (no cancellation in p − q), else as d·(p − q)
//   (|p − q| >= 0.63·max(p, q) there).
// A term's error is ~3e-7 relative at most (an exp16s, a product, the series to d^10/11!); measured against float64:
// under 3e-7 relative, from J ~ 1e-20 to 90 nats (tests/test_metrics_fused.py).
template <int KIND>  // (a constant: the loads' dtype tests leave the loops)
static void sym_rows_t(const void* X, const void* Y, int64_t n, int64_t V, int64_t ldx, int64_t ldy, double* out) {
  const int kind = KIND;
  enum { SB = 1024 };
  const int64_t Vr = (V + 15) / 16 * 16;
  const int64_t es = kind ? 2 : 4;
  for (int64_t r = 0; r < n; ++r) {
    const char* x = (const char*)X + r * ldx * es; const char* y = (const char*)Y + r * ldy * es;
    const __mmask16 last = (__mmask16)((1u << (V - (Vr - 16))) - 1);  // the last vector's lanes
    // 16 entries from i as float32 (lanes off m: 0), from float32, float16 or bfloat16 rows
    auto ld = [&](const char* row, int64_t i, __mmask16 m) __attribute__((always_inline)) -> __m512 {
      if (kind == 0) return _mm512_maskz_loadu_ps(m, (const float*)row + i);
      const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)row + i);
      return kind == 1 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    };
    auto first = [&](const char* row, float v) {  // the first entry equal to v (the max: there is one)
      for (int64_t i = 0;; i += 16) {
        const __mmask16 eq = _mm512_cmp_ps_mask(ld(row, i, i + 16 <= V ? (__mmask16)0xFFFF : last), _mm512_set1_ps(v), _CMP_EQ_OQ);
        if (eq) return i + __builtin_ctz(eq);
      }
    };
    __m512 vx = _mm512_set1_ps(-INFINITY), vy = vx;
    __mmask16 bad = 0;
    for (int64_t i = 0; i < Vr; i += 16) {
      const __mmask16 m = i + 16 <= V ? (__mmask16)0xFFFF : last;
      const __m512 a = ld(x, i, m), b = ld(y, i, m);
      // a − a is 0 for finite a, NaN for ±inf and NaN
      bad |= _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b)), _mm512_setzero_ps(), _CMP_NEQ_UQ);
      vx = _mm512_mask_max_ps(vx, m, vx, a); vy = _mm512_mask_max_ps(vy, m, vy, b);
    }
    if (bad) { out[2 * r] = out[2 * r + 1] = NAN; continue; }
    const float mx = _mm512_reduce_max_ps(vx), my = _mm512_reduce_max_ps(vy);
    const int64_t ax = first(x, mx), ay = first(y, my);
    // (1 − e^(−v))/v = Σ_j u^j / (j + 1)!, u = −v, j = 0..10 (so that e^(−v) − 1 = −v·g and 1 − e^(−v) = v·g), in
    // Estrin's form (a third of Horner's latency; the same speed here, within the noise)
    auto g = [](__m512 v) __attribute__((always_inline)) {
      auto k = [](float f) { return _mm512_set1_ps(f); };
      const __m512 u = _mm512_sub_ps(_mm512_setzero_ps(), v), u2 = _mm512_mul_ps(u, u), u4 = _mm512_mul_ps(u2, u2);
      const __m512 a0 = _mm512_fmadd_ps(u, k(0.5f), k(1.f)), a1 = _mm512_fmadd_ps(u, k(1.f / 24), k(1.f / 6)),
                   a2 = _mm512_fmadd_ps(u, k(1.f / 720), k(1.f / 120)), a3 = _mm512_fmadd_ps(u, k(1.f / 40320), k(1.f / 5040)),
                   a4 = _mm512_fmadd_ps(u, k(1.f / 3628800), k(1.f / 362880));
      const __m512 b0 = _mm512_fmadd_ps(a1, u2, a0), b1 = _mm512_fmadd_ps(a3, u2, a2), b2 = _mm512_fmadd_ps(k(1.f / 39916800), u2, a4);
      return _mm512_fmadd_ps(_mm512_fmadd_ps(b2, u4, b1), u4, b0);
    };
    const __m512 one = _mm512_set1_ps(1.f), mone = _mm512_set1_ps(-1.f);
    auto near = [&](__m512 v) { return (__mmask16)(_mm512_cmp_ps_mask(v, one, _CMP_LE_OQ) & _mm512_cmp_ps_mask(v, mone, _CMP_GE_OQ)); };
    // Pass 2: Σe, e = exp(x − M), and E = Σ e·(e^(−d0) − 1) = Σ exp(y − M) − Σe (d0 = x − y; −e·d0·g(d0) where
    // |d0| <= 1): c = ln Z_x − ln Z_y = −ln(1 + E/Σe) without cancellation, as exact as the drift it measures
    // (the difference of two separately rounded sums was ~1e-7 off, which set J off by up to 2e-4 relative where
    // only a few entries differ). A lane of y over 80 above M would overflow: NaN, the full kernel.
    const __m512 M = _mm512_set1_ps(ceilf(mx));
    double sx = 0, E = 0;
    __mmask16 over = 0;
    for (int64_t b0 = 0; b0 < Vr; b0 += SB) {
      __m512 se = _mm512_setzero_ps(), sd = se;
      for (int64_t i = b0; i < Vr && i < b0 + SB; i += 16) {
        const __mmask16 m = i + 16 <= V ? (__mmask16)0xFFFF : last;
        const __m512 a = ld(x, i, m), b = ld(y, i, m), d0 = _mm512_sub_ps(a, b);
        const __m512 e = _mm512_maskz_mov_ps(m, exp16s(_mm512_sub_ps(a, M)));
        __m512 t = _mm512_mul_ps(_mm512_mul_ps(e, d0), g(d0));  // −e·(e^(−d0) − 1)
        const __mmask16 nr = near(d0);
        if ((__mmask16)(nr | ~m) != 0xFFFF) {
          const __m512 yb = _mm512_sub_ps(b, M);
          over |= _mm512_mask_cmp_ps_mask(m, yb, _mm512_set1_ps(80.f), _CMP_GT_OQ);
          t = _mm512_mask_mov_ps(_mm512_sub_ps(e, exp16s(yb)), nr, t);
        }
        se = _mm512_add_ps(se, e); sd = _mm512_sub_ps(sd, _mm512_maskz_mov_ps(m, t));
      }
      sx += (double)_mm512_reduce_add_ps(se); E += (double)_mm512_reduce_add_ps(sd);
    }
    if (over) { out[2 * r] = out[2 * r + 1] = NAN; continue; }
    const double c = -log1p(E / sx);
    const __m512 ix = _mm512_set1_ps((float)(1.0 / sx)), iy = _mm512_set1_ps((float)(1.0 / (sx + E))), vc = _mm512_set1_ps((float)c);
    // Pass 3: p = e/Σe, q = exp(y − M)/(Σe + E), d = d0 − c, each term p·d²·g(d) where |d| <= 1, else d·(p − q)
    double J = 0;
    for (int64_t b0 = 0; b0 < Vr; b0 += SB) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = b0; i < Vr && i < b0 + SB; i += 16) {
        const __mmask16 m = i + 16 <= V ? (__mmask16)0xFFFF : last;
        const __m512 a = ld(x, i, m), b = ld(y, i, m);
        const __m512 p = _mm512_mul_ps(exp16s(_mm512_sub_ps(a, M)), ix);
        const __m512 d = _mm512_sub_ps(_mm512_sub_ps(a, b), vc);
        __m512 term = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_mul_ps(d, d)), g(d));
        const __mmask16 nr = near(d);
        if ((__mmask16)(nr | ~m) != 0xFFFF) {  // (a drifting pair's groups: q too)
          const __m512 q = _mm512_mul_ps(exp16s(_mm512_sub_ps(b, M)), iy);
          term = _mm512_mask_mov_ps(_mm512_mul_ps(d, _mm512_sub_ps(p, q)), nr, term);
        }
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, term));
      }
      J += (double)_mm512_reduce_add_ps(acc);
    }
    out[2 * r] = J; out[2 * r + 1] = ax == ay;
  }
}
static void sym_rows(const void* X, const void* Y, int kind, int64_t n, int64_t V, int64_t ldx, int64_t ldy, double* out) {
  if (kind == 0) sym_rows_t<0>(X, Y, n, V, ldx, ldy, out);
  else if (kind == 1) sym_rows_t<1>(X, Y, n, V, ldx, ldy, out);
  else sym_rows_t<2>(X, Y, n, V, ldx, ldy, out);
}
#endif

// J and top-1 agreement of rows [0, n) (sym_rows) over an OpenMP team of nt threads; out: [n, 2]. Only where
// pm_native() (AVX-512).
extern "C" void sym_team(const void* X, const void* Y, int kind, int64_t n, int64_t V, int64_t ldx, int64_t ldy, double* out,
                         int nt) {
#ifdef __AVX512F__
  const int64_t es = kind ? 2 : 4;
  #pragma omp parallel num_threads(nt)
  {
    int64_t a, b;
    team_part(n, &a, &b);
    sym_rows((const char*)X + a * ldx * es, (const char*)Y + a * ldy * es, kind, b - a, V, ldx, ldy, out + 2 * a);
  }
#else
  (void)X; (void)Y; (void)kind; (void)V; (void)ldx; (void)ldy; (void)nt;
  for (int64_t j = 0; j < 2 * n; ++j) out[j] = NAN;
#endif
}

// Whether pm_team takes float16 and bfloat16 rows itself (kind 1, 2), converting each row pair as it comes.
extern "C" int pm_native() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

// Rows [0, n) over an OpenMP team of nt threads, each taking a contiguous part. X, Y: float32 rows (kind 0), or
// float16 / bfloat16 (kind 1 / 2, where pm_native()); ldx, ldy in elements.
extern "C" void pm_team(const void* X, const void* Y, int kind, int64_t n, int64_t V, int64_t ldx, int64_t ldy, int K,
                        const int64_t* T, const int32_t* ks, int nks, int mode, double* out, int32_t* top, int nt) {
  const int64_t es = kind ? 2 : 4;
  #pragma omp parallel num_threads(nt)
  {
    int64_t a, b;
    team_part(n, &a, &b);
    pm_rows((const char*)X + a * ldx * es, (const char*)Y + a * ldy * es, kind, b - a, V, ldx, ldy, K, T + a, ks, nks,
            mode, out + a * (NFIX + nks), top + a * 2 * K);
  }
}
