#pragma once
#include "exp_f32.h"
// Top-k lists shared by the kernels: topk_insert (scalar), TopK<N> (k <= 128, in registers, AVX-512) and Big (k <= 256).
#include <algorithm>
#include <functional>
// Keeps the k largest (value, index) seen so far, sorted descending, the first added first among equal values;
// returns the new threshold (-inf until k are in). A v not above the k-th changes nothing.
static inline float topk_insert(float* tv, int32_t* ti, int* cnt, int k, float v, int32_t i) {
  if (*cnt == k && !(v > tv[k - 1])) return tv[k - 1];
  int j = *cnt < k ? (*cnt)++ : k - 1;
  while (j > 0 && tv[j - 1] < v) { tv[j] = tv[j - 1]; ti[j] = ti[j - 1]; --j; }
  tv[j] = v; ti[j] = i;
  return *cnt < k ? -INFINITY : tv[k - 1];
}

#ifdef __AVX512F__
// A top k of k <= 16·N in registers (N = 2, 4, 8: k <= 32, 64, 128): values v[0..N) sorted descending (among equal
// values, the first added first), their indices ix[0..N); places past those filled are -inf. topk_add puts v where
// it belongs and shifts the rest one place down, without a branch; a v that is not above the k-th only changes places
// k and after, so a batch of candidates goes in unchecked. (topk_insert's shifts and mispredicts cost ~100 cycles an
// insertion, ~200 times in a row at k = 20.)
template <int N> struct TopK { __m512 v[N]; __m512i ix[N]; };
template <int N> static inline TopK<N> topk_load(const float* tv, const int32_t* ti) {
  TopK<N> t;
  for (int r = 0; r < N; ++r) { t.v[r] = _mm512_loadu_ps(tv + 16 * r); t.ix[r] = _mm512_loadu_si512(ti + 16 * r); }
  return t;
}
template <int N> static inline void topk_store(const TopK<N>& t, float* tv, int32_t* ti) {
  for (int r = 0; r < N; ++r) { _mm512_storeu_ps(tv + 16 * r, t.v[r]); _mm512_storeu_si512(ti + 16 * r, t.ix[r]); }
}
template <int N> static inline void topk_add(TopK<N>& t, float v, int32_t i) {
  // place j keeps old j where old j >= v, takes v where old j − 1 >= v (or j = 0) and old j does not, else old j − 1:
  // a copy of each register's entries one place down (valignd: lane l gets lane l − 1, lane 0 the last of register
  // r − 1, +inf before register 0), two compares, two blends. Every step stays in the vector registers; the form
  // before counted v's place by popcounts in a general register and broadcast it back, a longer chain an insertion
  // (bfloat16 raw top-k, A/B: 1.02x the rows/s with this one).
  const __m512 vv = _mm512_set1_ps(v);
  const __m512i vi = _mm512_set1_epi32(i);
  __m512 prev = _mm512_set1_ps(INFINITY);
  __m512i prevx = vi;
  for (int r = 0; r < N; ++r) {
    const __m512 o = t.v[r];
    const __m512i ox = t.ix[r];
    const __m512 down = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(o), _mm512_castps_si512(prev), 15));
    const __m512i downx = _mm512_alignr_epi32(ox, prevx, 15);
    const __mmask16 keep = _mm512_cmp_ps_mask(o, vv, _CMP_GE_OQ), here = _mm512_cmp_ps_mask(down, vv, _CMP_GE_OQ) & ~keep;
    t.v[r] = _mm512_mask_mov_ps(_mm512_mask_mov_ps(down, here, vv), keep, o);
    t.ix[r] = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(downx, here, vi), keep, ox);
    prev = o; prevx = ox;
  }
}
// The candidates at cv/ci[0, n) into the top k in registers (k <= 16·N), then back to tv/ti.
template <int N> static inline void topk_batch(float* tv, int32_t* ti, const float* cv, const int32_t* ci, int n) {
  TopK<N> t = topk_load<N>(tv, ti);
  for (int j = 0; j < n; ++j) topk_add<N>(t, cv[j], ci[j]);
  topk_store<N>(t, tv, ti);
}
// After n candidates went into tv/ti (each above the threshold they were taken with): the count and the threshold.
static inline float topk_after(const float* tv, int* tc, int k, int n) {
  *tc = *tc + n < k ? *tc + n : k;
  return *tc < k ? -INFINITY : tv[k - 1];
}
#endif

// A top k of 128 < k <= 256 (BIG_K): each candidate (above the threshold when taken) appended as a key that orders
// as (value, −index), and the keys cut back to the k largest by nth_element (which raises the threshold) once k are
// in and whenever 2k are; sorted at the row's end. topk_insert's insertion into the sorted k costs O(k) a candidate:
// at k = 256 the row took 5x as long as at k = 20, and this takes 1.9x less time. At k = 33 to 64, where the
// threshold lagging between cuts lists more candidates, it was up to 8% slower than topk_insert; TopK<4> and <8>
// beat both up to k = 128. Outputs are the same.
enum { BIG_K = 128 };
enum { BCAP = 512 };
struct Big { uint64_t key[BCAP]; int n; };
static inline uint64_t big_key(float v, int32_t i) {
  uint32_t b; memcpy(&b, &v, 4);
  b ^= (b >> 31) ? 0xFFFFFFFFu : 0x80000000u;
  return (uint64_t)b << 32 | (uint32_t)(0xFFFFFFFFu - (uint32_t)i);
}
static inline float big_value(uint64_t key) {
  uint32_t b = (uint32_t)(key >> 32);
  b ^= (b >> 31) ? 0x80000000u : 0xFFFFFFFFu;
  float v; memcpy(&v, &b, 4); return v;
}
static inline float big_cut(Big& B, int k) {  // keeps the k largest keys; returns the k-th value (the threshold)
  if (B.n > k) { std::nth_element(B.key, B.key + k - 1, B.key + B.n, std::greater<uint64_t>()); B.n = k; }
  uint64_t kth = B.key[0];
  for (int j = 1; j < B.n; ++j) kth = B.key[j] < kth ? B.key[j] : kth;
  return big_value(kth);
}
static inline float big_add(Big& B, int k, float thr, float v, int32_t i) {
  B.key[B.n++] = big_key(v, i);
  return B.n == 2 * k || (thr == -INFINITY && B.n == k) ? big_cut(B, k) : thr;
}
static inline void big_finish(Big& B, int k, float* tv, int32_t* ti, int* tc) {  // the top k, sorted, into tv/ti
  if (B.n > k) big_cut(B, k);
  std::sort(B.key, B.key + B.n, std::greater<uint64_t>());
  for (int j = 0; j < B.n; ++j) { tv[j] = big_value(B.key[j]); ti[j] = (int32_t)(0xFFFFFFFFu - (uint32_t)B.key[j]); }
  *tc = B.n; B.n = 0;
}
