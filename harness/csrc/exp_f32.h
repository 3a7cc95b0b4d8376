#pragma once
// The kernels' shared prelude (each kernel's .cpp includes it): team_part (a thread's rows of an OpenMP team), and
// float32 exp: exp_s scalar (d <= 0), exp16c AVX-512 (clamped at e^-87), exp16s (a table and a shorter polynomial,
// for sums), exp16z (0 below e^-87), exp16 (subnormals too); on CPUs with AVX2 and FMA but not AVX-512 (KERNEL_AVX2),
// exp8c, exp8s and exp8 in 8 lanes. topk.h: the running top-k lists.
#include <stdint.h>
#include <string.h>
#include <math.h>
// KERNEL_AVX2: the 8-lane paths of a CPU with AVX2 and FMA but no AVX-512 (AMD Zen 2 and 3, Intel client cores), which
// otherwise ran the scalar code (a build with -march=native there, or HARNESS_CEXT_PORTABLE=avx2 anywhere)
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define KERNEL_AVX2 1
#else
#define KERNEL_AVX2 0
#endif
#if defined(__AVX512F__) || KERNEL_AVX2
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
// Rows [*a, *b) of n for the calling thread of an OpenMP team: contiguous, in thread order (all n without OpenMP).
static inline void team_part(int64_t n, int64_t* a, int64_t* b) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  *a = n * t / nt; *b = n * (t + 1) / nt;
}
// exp(d) for d <= 0: Cephes expf polynomial; d is clamped at -150 so -inf gives exactly 0.
static inline float exp_s(float d) {
  d = d < -150.f ? -150.f : d;
  float n = nearbyintf(d * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, d); r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500E-4f;
  p = fmaf(p, r, 1.3981999507E-3f); p = fmaf(p, r, 8.3334519073E-3f); p = fmaf(p, r, 4.1665795894E-2f);
  p = fmaf(p, r, 1.6666665459E-1f); p = fmaf(p, r, 5.0000001201E-1f);
  p = fmaf(p * r, r, r) + 1.f;
  return ldexpf(p, (int)n);
}
#ifdef __AVX512F__
// exp(t), t <= 88, in 16 lanes (Cephes' range reduction, the polynomial below); lanes below -87 give e^-87 (1.6e-38),
// a difference under 1e-37 of any sum it enters (and no subnormal result).
static inline __m512 exp16c(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), t);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  // e^r = 1 + r·(1 + r·P(r)) on |r| <= ln2/2, P of degree 4 fitted for least maximum relative error, all in Horner
  // FMAs: 7.4e-8 relative at most in float32 over every 38th float of [-87, 0] (1 + r + r²·P, one op more, 8.4e-8;
  // Cephes' degree-5 P, as in exp_s, is no more exact in float32 and costs one more FMA a vector)
  __m512 p = _mm512_set1_ps(1.3814610429e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3687100559e-3f)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1668388992e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666521132e-1f)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999994040e-1f));
  p = _mm512_fmadd_ps(_mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f)), r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// e^t for sums of exps (softmax_filter's row sums, metrics_fused's sym_rows), 9 ops where exp16c takes 12:
// t = (k/32)·ln 2 + r with k = round(32·t/ln 2), read from the float that one FMA leaves in the "1.5·2^23" shifter;
// 2^(j/32) (j = k mod 32, the shifter's low 5 bits) from a 32-entry table in two registers (one vpermt2ps); e^r on
// |r| <= ln 2/64 from c0 + c1·r + c2·r² (minimax for relative error, 5.4e-8); 2^floor(k/32) by vscalefps, which
// floors k/32 itself. Its error is what exp16c's shape with a one-FMA reduction gave (both measured on every float
// in [-87, 0] against float64: 1.9e-7 relative on [-10, 0], 4.0e-7 at most, near −87): the ln 2 rounding adds
// (k/32)·1.9e-9, so in a sum, whose terms weigh in by their size, the relative error stays under 1.6e-7 +
// 2.7e-9·E_p[−t] (E_p[−t] <= ln V = 12 for a 151936 row): 2e-7 at most. On this module's bfloat16 row sums, 0.85
// against 1.0 of the cycles of a degree-5 polynomial with a roundscale (2 ops) for k.
static inline __m512 exp16s(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-87.f));
  const __m512 kf = _mm512_fmadd_ps(t, _mm512_set1_ps(46.166241308446828f), _mm512_set1_ps(12582912.f));  // 32/ln 2, 1.5·2^23
  const __m512 k32 = _mm512_fmsub_ps(kf, _mm512_set1_ps(0.03125f), _mm512_set1_ps(393216.f));  // k/32, exactly
  const __m512 r = _mm512_fnmadd_ps(k32, _mm512_set1_ps(0.693147180559945309f), t);
  const __m512 tab = _mm512_permutex2var_ps(  // 2^(j/32), j = 0..31, rounded to nearest
      _mm512_setr_ps(0x1p+0f, 0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f, 0x1.2387a6p+0f, 0x1.29e9ep+0f,
                     0x1.306fep+0f, 0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f, 0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab07ep+0f, 0x1.6247ecp+0f),
      _mm512_castps_si512(kf),
      _mm512_setr_ps(0x1.6a09e6p+0f, 0x1.71f75ep+0f, 0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f,
                     0x1.ae89fap+0f, 0x1.b7f77p+0f, 0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f, 0x1.ea4afap+0f, 0x1.f50766p+0f));
  const __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(0.49999633f), r, _mm512_set1_ps(1.0000147f));  // e^r ≈ 1 + r·a
  return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(tab, r), a, tab), k32);
}
// exp16c with lanes below -87 (and NaN lanes) giving 0 (their share of a sum is < 1e-37 of its largest term), so
// there is no scalar fallback.
static inline __m512 exp16z(__m512 t) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-87.f), _CMP_GE_OQ), exp16c(t));
}
// exp(d) for d <= 0, subnormal results included: exp16z, with the rare lanes in [-104, -87) redone in scalar code
// (a subnormal vector result costs a microcode assist per instruction, which on -inf-heavy (warped) rows made this
// pass 10x slower); runs below -104 (-inf) give 0 at once. A vector with every lane at or above -87 (the common
// case) costs one compare over exp16s (its error: 1.9e-7 relative on [-10, 0]; softmax_filter's p > 0 output pass
// ran at 1.16-1.19x its rows/s with it than with exp16c, whose 7.4e-8 cost 3 more ops).
static __attribute__((noinline)) __m512 exp16_rare(__m512 d);
static inline __m512 exp16(__m512 d) {
  if (__builtin_expect(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-87.f), _CMP_GE_OQ) == 0xFFFF, 1)) return exp16s(d);
  if (!_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.f), _CMP_GE_OQ)) return _mm512_setzero_ps();
  return exp16_rare(d);
}
// exp16's vectors with lanes in [-104, -87), out of line: inlined, its scalar loop and arrays made the callers' loops
// keep their vectors in memory (softmax_filter's p > 0 output pass ran at 0.86x its rows/s).
static __attribute__((noinline)) __m512 exp16_rare(__m512 d) {
  const __mmask16 band = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-87.f), _CMP_LT_OQ) & _mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.f), _CMP_GE_OQ);
  __m512 p = exp16z(d);
  if (band) {
    float dd[16], pp[16];
    _mm512_storeu_ps(dd, d); _mm512_storeu_ps(pp, p);
    for (int l = 0; l < 16; ++l) if (band >> l & 1) pp[l] = exp_s(dd[l]);
    p = _mm512_loadu_ps(pp);
  }
  return p;
}
#endif
#if KERNEL_AVX2
// exp16c in 8 lanes: exp(t), t <= 0, lanes below -87 give e^-87 (so 2^n stays a normal float's exponent: n >= -126
// with e^r >= 1/sqrt 2 only where n > -126, and the scaling is an integer add to the exponent field).
static inline __m256 exp8c(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), t);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.3814610429e-3f);  // exp16c's polynomial
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3687100559e-3f)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1668388992e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666521132e-1f)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.9999994040e-1f));
  p = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f)), r, _mm256_set1_ps(1.f));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}
// exp16s's idea in 8 lanes, for sums and the p > 0 output: t = (k/8)·ln 2 + r with k = round(8·t/ln 2), read from
// the float that one FMA leaves in the 1.5·2^23 shifter; 2^(j/8) (j = k mod 8, its low 3 bits) from an 8-entry table
// in one register (vpermps); e^r on |r| <= ln 2/16 as 1 + r + c2·r² + c3·r³ (least maximum relative error, 2.7e-8);
// 2^floor(k/8) added to the exponent field as an integer (AVX2 has no vscalefps). 12 ops where exp8c takes 14, and
// fewer of them on the FMA pipes: 0.27 against 0.37 ns an entry from L1 on a Zen 2 (one thread). Measured on every
// float in [-87, 0] against float64: 1.33e-7 relative on [-10, 0], 3.4e-7 at most (near -87: ln 2's float32
// rounding times k/8), against exp8c's 7.7e-8.
static inline __m256 exp8s(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-87.f));
  const __m256 kf = _mm256_fmadd_ps(t, _mm256_set1_ps(11.541560327111707f), _mm256_set1_ps(12582912.f));  // 8/ln 2, 1.5·2^23
  const __m256 k8 = _mm256_fmsub_ps(kf, _mm256_set1_ps(0.125f), _mm256_set1_ps(1572864.f));  // k/8, exactly
  const __m256 r = _mm256_fnmadd_ps(k8, _mm256_set1_ps(0.693147180559945309f), t);
  const __m256 tab = _mm256_permutevar8x32_ps(  // 2^(j/8), j = 0..7, rounded to nearest
      _mm256_setr_ps(0x1p+0f, 0x1.172b84p+0f, 0x1.306fe0p+0f, 0x1.4bfdaep+0f, 0x1.6a09e6p+0f, 0x1.8ace54p+0f, 0x1.ae89fap+0f, 0x1.d5818ep+0f),
      _mm256_castps_si256(kf));
  const __m256 a = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0.16664297878742218f), r, _mm256_set1_ps(0.5000647902488708f)), r,
                                   _mm256_set1_ps(1.f));  // e^r ≈ 1 + r·a
  const __m256 e = _mm256_fmadd_ps(_mm256_mul_ps(tab, r), a, tab);
  // (2^22 + k) >> 3 = 2^19 + floor(k/8), whose 2^19 the shift by 23 drops: floor(k/8) >= -126 after the clamp
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), _mm256_slli_epi32(_mm256_srli_epi32(_mm256_castps_si256(kf), 3), 23)));
}
// exp(d) for d <= 0 with subnormal results, as exp16: lanes in [-104, -87) from exp_s, out of line; below -104, 0
static __attribute__((noinline)) __m256 exp8_rare(__m256 d) {
  alignas(32) float dd[8], pp[8];
  _mm256_store_ps(dd, d);
  _mm256_store_ps(pp, exp8c(d));
  for (int l = 0; l < 8; ++l) if (!(dd[l] >= -87.f)) pp[l] = dd[l] >= -104.f ? exp_s(dd[l]) : 0.f;
  return _mm256_load_ps(pp);
}
static inline __m256 exp8(__m256 d) {
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-87.f), _CMP_GE_OQ)) == 0xFF, 1)) return exp8s(d);
  if (!_mm256_movemask_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.f), _CMP_GE_OQ))) return _mm256_setzero_ps();
  return exp8_rare(d);
}
static inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}
static inline double hsum8(__m256 v) {  // in double: the lanes' sums are each a block's
  const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif
