// Extraction's per-row kernel (harness/row_stats.py loads it through harness/cext.py).
#include "exp_f32.h"
#include <algorithm>
// Rows [0, n) of x (stride ld), Vp wide; columns < nv are real tokens, the rest padding. out (stride ldo)
// gets x - logsumexp(real columns) as kind 0 float32, 1 float16, 2 bfloat16 (16-bit kinds: AVX-512 build only),
// nothing for kind -1 (out unused);
// lse[r] = logsumexp of the whole row, pad[r] = its probability mass on the padding columns.
enum { BS = 1024 };
// A row's top k (k = 0: none), by value, the lowest column first among equal values: entries above the threshold
// thr are appended to a buffer (compress-stored, 16 lanes at a time); when it is nearly full, nth_element keeps its
// k best and thr becomes the k-th value, so after the first few thousand entries hardly any lane passes.
enum { TOP_CAP = 4 * 256 + 64 };  // buffer entries for the largest k (row_stats.MAX_TOP)
struct Top { int k, n, cap; float thr; float bv[TOP_CAP + 16]; int32_t bi[TOP_CAP + 16]; };
struct TopEntry { float v; int32_t i; };
static inline bool top_before(const TopEntry& a, const TopEntry& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
static void top_prune(Top& T, bool final_sort) {
  static thread_local TopEntry e[TOP_CAP + 16];
  for (int j = 0; j < T.n; ++j) e[j] = {T.bv[j], T.bi[j]};
  const int keep = T.n < T.k ? T.n : T.k;
  if (T.n > keep) std::nth_element(e, e + keep - 1, e + T.n, top_before);
  if (final_sort) std::sort(e, e + keep, top_before);
  float lowest = INFINITY;
  for (int j = 0; j < keep; ++j) { T.bv[j] = e[j].v; T.bi[j] = e[j].i; lowest = e[j].v < lowest ? e[j].v : lowest; }
  T.n = keep;
  if (keep == T.k) T.thr = lowest;
}
static inline void top_scan(const float* x, int64_t a, int64_t b, Top& T) {  // scalar: a row's tail, or no AVX-512
  for (int64_t i = a; i < b; ++i)
    if (x[i] > T.thr) { T.bv[T.n] = x[i]; T.bi[T.n++] = (int32_t)i; if (T.n == T.cap) top_prune(T, false); }
}
// ln Σ exp(x[a:b]) (NaN if a NaN is there), its maximum into *mx, and (T.k > 0) columns [a, b) into the running top k.
static inline double log_sum_exp(const float* x, int64_t a, int64_t b, float* mx, Top& T) {
  float m = -INFINITY; int64_t i = a; int nan = 0;
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(-INFINITY); __mmask16 un = 0;
  for (; i + 16 <= b; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    vm = _mm512_max_ps(vm, v); un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // max_ps drops NaN: flag it
    if (T.k) {  // lanes above the threshold (rare once the buffer was first pruned) go into the buffer
      const __mmask16 gt = _mm512_cmp_ps_mask(v, _mm512_set1_ps(T.thr), _CMP_GT_OQ);
      if (gt) {
        // compressed in a register, then all 16 lanes stored (the buffer has 16 spare): a compress straight to memory
        // is microcoded on some CPUs (AMD Zen 4), ~10x slower
        _mm512_storeu_ps(T.bv + T.n, _mm512_maskz_compress_ps(gt, v));
        _mm512_storeu_si512(T.bi + T.n, _mm512_maskz_compress_epi32(gt, _mm512_add_epi32(_mm512_set1_epi32((int)i), _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15))));
        T.n += __builtin_popcount(gt);
        if (T.n > T.cap - 16) top_prune(T, false);
      }
    }
  }
  m = _mm512_reduce_max_ps(vm); nan = un != 0;
#endif
  if (T.k) top_scan(x, i, b, T);
  for (; i < b; ++i) { m = x[i] > m ? x[i] : m; nan |= x[i] != x[i]; }
  *mx = m;
  if (nan) return NAN;
  if (a == b || m == -INFINITY) return -INFINITY;
  double s = 0; i = a;
#ifdef __AVX512F__
  const __m512 vmax = _mm512_set1_ps(m);
  while (i + 16 <= b) {  // float32 lanes over a block, then float64 across blocks
    __m512 acc = _mm512_setzero_ps();
    const int64_t end = i + BS < b ? i + BS : b;
    for (; i + 16 <= end; i += 16) acc = _mm512_add_ps(acc, exp16z(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmax)));
    s += _mm512_reduce_add_ps(acc);
  }
#endif
  for (; i < b; ++i) s += exp_s(x[i] - m);  // +inf in the row: m = +inf, so s = 0 and m + log s is NaN
  return (double)m + log(s);
}

extern "C" int rs_vector(void) {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

static void rs_rows(const float* X, int64_t n, int64_t Vp, int64_t ld, int64_t nv, void* out, int kind, int64_t ldo,
                    float* lse, float* pad, int k, float* topv, int32_t* topi) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = X + r * ld;
    float mc, mp;
    static thread_local Top T;
    T.k = k; T.n = 0; T.thr = -INFINITY; T.cap = 4 * k + 64;  // small prunes often: each nth_element stays in L1
    const double lc = log_sum_exp(x, 0, nv, &mc, T), lp = log_sum_exp(x, nv, Vp, &mp, T);
    if (k) {
      top_prune(T, true);
      for (int j = 0; j < k; ++j) {  // fewer than k above -inf: -1 columns, see row_stats()
        topv[r * k + j] = j < T.n ? T.bv[j] : -INFINITY; topi[r * k + j] = j < T.n ? T.bi[j] : -1;
      }
    }
    const double hi = lc > lp ? lc : lp, full = lp == -INFINITY ? lc : hi + log1p(exp((lc > lp ? lp : lc) - hi));
    lse[r] = (float)full;
    pad[r] = lp == -INFINITY ? 0.f : (float)exp(lp - full);
    if (kind < 0) continue;  // the sums only
    const float c = (float)lc;
    int64_t i = 0;
    if (kind == 0) {
      float* o = (float*)out + r * ldo;
#ifdef __AVX512F__
      for (; i + 16 <= nv; i += 16) _mm512_storeu_ps(o + i, _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(c)));
#endif
      for (; i < nv; ++i) o[i] = x[i] - c;
    }
#ifdef __AVX512F__
    else if (kind == 1) {
      uint16_t* o = (uint16_t*)out + r * ldo;
      for (; i < nv; i += 16) {
        __mmask16 m = nv - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nv - i)) - 1);
        __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(c));
        _mm256_mask_storeu_epi16(o + i, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    } else {
      uint16_t* o = (uint16_t*)out + r * ldo;
      for (; i < nv; i += 16) {
        __mmask16 m = nv - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nv - i)) - 1);
        __m512i u = _mm512_castps_si512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(c)));
        // round to nearest even on the top 16 bits (finite values; -inf stays -inf)
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        _mm512_mask_cvtepi32_storeu_epi16(o + i, m, _mm512_srli_epi32(u, 16));
      }
    }
#endif
  }
}

// Rows [0, n) over an OpenMP team of nt threads, each taking a contiguous part.
extern "C" void rs_team(const float* X, int64_t n, int64_t Vp, int64_t ld, int64_t nv, void* out, int kind, int64_t ldo,
                        float* lse, float* pad, int k, float* topv, int32_t* topi, int nt) {
  const int64_t es = kind == 0 ? 4 : kind > 0 ? 2 : 0;
  #pragma omp parallel num_threads(nt)
  {
    int64_t a, b;
    team_part(n, &a, &b);
    rs_rows(X + a * ld, b - a, Vp, ld, nv, (char*)out + a * ldo * es, kind, ldo, lse + a, pad + a, k, topv + a * k, topi + a * k);
  }
}
