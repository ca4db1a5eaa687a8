"""The batch-invariant attention (models/batch_invariant.attention) as one C kernel of our own.

Why: the torch form of the mode's attention is a dozen operators per layer (gathers by KV head,
two batched products per 64-key chunk, the fp32 chunk sums, the fixed-order sums, exp2), each
small at decode, so the mode's compiled step and its eager prefill paid for it in every layer
(benchmarks/RESULTS.md, issue 18, "the attention as one C kernel"). Here each query is computed by
itself, over its own keys, read through its slot list from the paged caches:

- per (query, KV head), the G query heads of the group share each key and value row read;
- scores q.k in fp32 (bf16 operands widened exactly), 16 keys at a time: each dot product of D
  values accumulated in 16 lanes, the 16 keys' lanes then summed together by one fixed tree of adds
  (the same for every key), times the scale;
- the max over the query's valid keys (exact), then p = exp2((s - max) * log2 e) by a polynomial
  of our own (the same bits everywhere it runs), keys that are not valid contributing exactly 0;
- the sum of p and the value rows weighted by p accumulated in fp32 in key-position order (16-key
  blocks at fixed positions 0, 16, 32, ... for the sum; one fused multiply-add per key and value
  lane for the values), then divided and rounded once to the output dtype.

Nothing in it depends on the other queries, how many there are, the padding past a query's
context (not read: masked keys are skipped), or the thread split (threads share out whole
(query, KV head) tasks). So a token's attention is the same bits as a decode query, alone or
batched, and as a prefill query (a recomputation after preemption), eager or inside a compiled
step (where it is an opaque op: `pangu_infer::bi_attention_native`, registered from C++ by
pangu_infer.native_ops, else the Python one `pangu_infer::bi_attention`).

Outside the mode, the same kernel is the default decode attention on CPU where a one-time
measurement finds it faster than gathering K/V into copies for two batched products
(models/layers.decode_kernel_chosen): it reads the paged cache in place and skips padding. It also
reads the fp8 caches of kv_cache_dtype "fp8"/"fp8_e4m3"/"fp8_e5m2" (`kv_kind` 2 and 3, KV_KINDS),
widening each byte to fp32 exactly as torch's cast does (always their decode attention on CPU).

Built once per machine like pangu_infer/quant/cpu_int4.py (`$CC`, else `cc`/`gcc`, -march=native,
into `~/.cache/pangu-infer/`), loaded with ctypes. Needs AVX-512F, or AVX2 with FMA, on x86-64 and
a head width that is a multiple of 16; elsewhere, or with `PANGU_INFER_BI_ATTENTION=torch`, the
torch form runs. The body is written once over a 16-lane vector; the AVX2 build holds it in two
256-bit halves and does the same operations lane for lane in the same order (the 16-key reduction
tree and the final sum included), written to give the AVX-512 build's bits. That was not run on
one machine with both (the AVX2 build is checked by the mode's tests and against SDPA; after the
split the AVX-512 source compiles to the same arithmetic instructions as before it).
The choice is made once per process (library()), so one process never mixes the two (they agree
only within rounding).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import subprocess
from typing import Optional

import torch

from pangu_infer import native_ops
from pangu_infer.device import tracing
from pangu_infer.native import C_FLAGS, build_c_library, c_compiler, cpu_flags

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_BI_ATTENTION"
MAX_HEAD_DIM = 256
MAX_GROUP = 16

# The kernel is written once (BODY) over a 16-lane fp32 vector `vec` and a few operations on it;
# each instruction set gives its own (AVX512: one __m512; AVX2: two __m256, lane for lane the same
# arithmetic in the same order, written to give the same bits; see the module docstring).
_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define MAXD 256
#define MAXG 16
/* rows ahead that the score and value passes prefetch: the cache's rows are a head's slice of
   each slot, strided, and a page's next slots may lie anywhere (benchmarks/decode_attention.py --against) */
#define KDIST 16
#define VDIST 16
"""

AVX512 = r"""
typedef __m512 vec;
/* keys whose dot products run side by side, value vectors accumulated in registers: 8 of 32 registers each */
#define KGROUP 8
#define VGROUP 8
typedef __mmask16 vmask;
static inline vec v_set1(float x) { return _mm512_set1_ps(x); }
static inline vec v_zero(void) { return _mm512_setzero_ps(); }
static inline vec v_add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec v_div(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec v_max(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec v_fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void v_store(float* p, vec x) { _mm512_storeu_ps(p, x); }
/* lanes of x where bit i of live is set, else those of s */
static inline vec v_select(vec s, unsigned live, vec x) { return _mm512_mask_mov_ps(s, (__mmask16)live, x); }
static inline float v_reduce_max(vec x) { return _mm512_reduce_max_ps(x); }
static inline float v_reduce_add(vec x) { return _mm512_reduce_add_ps(x); }
static inline vmask v_ge(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
static inline vec v_round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_scale2(vec p, vec n) { return _mm512_scalef_ps(p, n); }  /* p 2^n, n an integer */
static inline vec v_keep(vmask keep, vec x) { return _mm512_maskz_mov_ps(keep, x); }

@BF16_AVX512@
/* 16 lanes rounded to bf16, to nearest even as torch does (NaN stays NaN) */
static inline void store_bf16(uint16_t* dst, __m512 x) { _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(round_bf16x16(x))); }

static inline __m512 load16(const void* p, int f32) {
  if (f32) return _mm512_loadu_ps((const float*)p);
  return bf16x16((const uint16_t*)p);
}

/* 16 fp8 values of an fp8 cache (kind 2: e4m3fn, 3: e5m2) widened to fp32 exactly, as torch's casts
   widen them: the exponent rebiased in the bits (normal values), the mantissa times 2^-9 or 2^-16
   (subnormal ones), e4m3fn's 0x7F NaN, e5m2's top exponent inf or NaN; the sign last. */
static inline __m512 fp8x16(const uint8_t* p, int kind) {
  const int e4 = kind == 2, mbits = e4 ? 3 : 2;
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  const __m512i e = _mm512_srli_epi32(mag, mbits), m = _mm512_and_si512(mag, _mm512_set1_epi32(e4 ? 7 : 3));
  __m512 r = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 23 - mbits), _mm512_set1_epi32((e4 ? 120 : 112) << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_set1_ps(e4 ? 0x1p-9f : 0x1p-16f));
  r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), sub);
  if (e4) {
    r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), _mm512_set1_ps(__builtin_nanf("")));
  } else {
    const __m512i top = _mm512_or_si512(_mm512_set1_epi32(0x7F800000), _mm512_slli_epi32(m, 21));
    r = _mm512_mask_mov_ps(r, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(31)), _mm512_castsi512_ps(top));
  }
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

/* r[i] = the sum of the 16 lanes of a[i], i = 0..15, for all 16 at once: the same tree of adds
   for every i (lanes k and k+2 of each 128-bit quarter, then the two pairs, then quarters 0+1 and
   2+3, then the two halves). */
static inline __m512 reduce16(const __m512 a[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  /* c[i], quarter q, position p: the partial sum over quarter q of a[4i + p] */
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  /* e0: quarters (c0: 0+1, 2+3; c1: 0+1, 2+3); e1 the same for c2, c3 */
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}
"""

AVX2 = r"""
/* 16 lanes as two halves: lo = lanes 0..7, hi = lanes 8..15 */
typedef struct { __m256 lo, hi; } vec;
/* AVX-512's KGROUP and VGROUP for 16 registers (each vec two): the same sums in the same order */
#define KGROUP 4
#define VGROUP 4
typedef vec vmask;
#define V2(f, a, b) { f((a).lo, (b).lo), f((a).hi, (b).hi) }
static inline vec v_set1(float x) { const vec r = {_mm256_set1_ps(x), _mm256_set1_ps(x)}; return r; }
static inline vec v_zero(void) { const vec r = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return r; }
static inline vec v_add(vec a, vec b) { const vec r = V2(_mm256_add_ps, a, b); return r; }
static inline vec v_sub(vec a, vec b) { const vec r = V2(_mm256_sub_ps, a, b); return r; }
static inline vec v_mul(vec a, vec b) { const vec r = V2(_mm256_mul_ps, a, b); return r; }
static inline vec v_div(vec a, vec b) { const vec r = V2(_mm256_div_ps, a, b); return r; }
static inline vec v_max(vec a, vec b) { const vec r = V2(_mm256_max_ps, a, b); return r; }
static inline vec v_fmadd(vec a, vec b, vec c) {
  const vec r = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  return r;
}
static inline vec v_load(const float* p) { const vec r = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; return r; }
static inline void v_store(float* p, vec x) { _mm256_storeu_ps(p, x.lo); _mm256_storeu_ps(p + 8, x.hi); }
static inline __m256 lane_bits(unsigned bits) {  /* all ones in lane i where bit i is set */
  const __m256i b = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), b), b));
}
static inline vec v_select(vec s, unsigned live, vec x) {
  const vec r = {_mm256_blendv_ps(s.lo, x.lo, lane_bits(live & 0xff)), _mm256_blendv_ps(s.hi, x.hi, lane_bits(live >> 8))};
  return r;
}
static inline float v_reduce_max(vec x) {  /* exact in any order */
  float t[8];
  _mm256_storeu_ps(t, _mm256_max_ps(x.lo, x.hi));
  float m = t[0];
  for (int i = 1; i < 8; i++) m = t[i] > m ? t[i] : m;
  return m;
}
/* the order of GCC's _mm512_reduce_add_ps: the halves, their 128-bit halves, lanes (0+2, 1+3), then the two */
static inline float v_reduce_add(vec x) {
  const __m256 t3 = _mm256_add_ps(x.hi, x.lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
static inline vmask v_ge(vec a, vec b) {
  const vec r = {_mm256_cmp_ps(a.lo, b.lo, _CMP_GE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GE_OQ)};
  return r;
}
static inline vec v_round(vec x) {
  const vec r = {_mm256_round_ps(x.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                 _mm256_round_ps(x.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  return r;
}
static inline __m256 pow2(__m256 n) {  /* 2^n for an integer n in [-126, 127] */
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
/* p 2^n, n an integer in [-126, 0]: one rounding of the exact product, as AVX-512's scalef */
static inline vec v_scale2(vec p, vec n) { const vec r = {_mm256_mul_ps(p.lo, pow2(n.lo)), _mm256_mul_ps(p.hi, pow2(n.hi))}; return r; }
static inline vec v_keep(vmask keep, vec x) { const vec r = V2(_mm256_and_ps, keep, x); return r; }

@BF16_AVX2@
static inline __m128i bf16_8(__m256 x) {  /* 8 lanes rounded to bf16, to nearest even (NaN stays NaN) */
  const __m256i r = round_bf16(x);
  /* 8 words 0..0xFFFF: packus per 128-bit lane, then the two lanes' low halves together */
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
static inline void store_bf16(uint16_t* dst, vec x) {
  _mm_storeu_si128((__m128i*)dst, bf16_8(x.lo));
  _mm_storeu_si128((__m128i*)(dst + 8), bf16_8(x.hi));
}

static inline vec load16(const void* p, int f32) {
  if (f32) return v_load((const float*)p);
  const vec r = {bf8((const uint16_t*)p), bf8((const uint16_t*)p + 8)};
  return r;
}

/* AVX-512's fp8x16, 8 lanes at a time, the same arithmetic */
static inline __m256 fp8x8(const uint8_t* p, int kind) {
  const int e4 = kind == 2, mbits = e4 ? 3 : 2;
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  const __m256i e = _mm256_srli_epi32(mag, mbits), m = _mm256_and_si256(mag, _mm256_set1_epi32(e4 ? 7 : 3));
  __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 23 - mbits), _mm256_set1_epi32((e4 ? 120 : 112) << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(e4 ? 0x1p-9f : 0x1p-16f));
  r = _mm256_blendv_ps(r, sub, _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_setzero_si256())));
  if (e4) {
    r = _mm256_blendv_ps(r, _mm256_set1_ps(__builtin_nanf("")), _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))));
  } else {
    const __m256i top = _mm256_or_si256(_mm256_set1_epi32(0x7F800000), _mm256_slli_epi32(m, 21));
    r = _mm256_blendv_ps(r, _mm256_castsi256_ps(top), _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_set1_epi32(31))));
  }
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(r), sign));
}
static inline vec fp8x16(const uint8_t* p, int kind) {
  const vec r = {fp8x8(p, kind), fp8x8(p + 8, kind)};
  return r;
}

/* AVX-512's reduce16, the same tree of adds: within each 128-bit quarter as there (unpacks work
   per 128-bit lane), then quarters 0+1 (the lo half's two lanes) plus quarters 2+3 (the hi half's). */
static inline void quarters(const __m256 a[16], __m256 c[4]) {
  for (int i = 0; i < 4; i++) {
    __m256 b[2];
    for (int k = 0; k < 2; k++) {
      const __m256 x = a[4 * i + 2 * k], y = a[4 * i + 2 * k + 1];
      b[k] = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
    }
    const __m256d x = _mm256_castps_pd(b[0]), y = _mm256_castps_pd(b[1]);
    c[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
}
static inline vec reduce16(const vec a[16]) {
  __m256 lo[16], hi[16], cl[4], ch[4], s[4];
  for (int i = 0; i < 16; i++) { lo[i] = a[i].lo; hi[i] = a[i].hi; }
  quarters(lo, cl);  /* cl[i], 128-bit lane q (quarter q), position p: quarter q's sum of a[4i + p] */
  quarters(hi, ch);  /* the same for quarters 2 and 3 */
  /* quarters 0+1 and 2+3 of a[4i + p], i = 0..3, then their sum */
  for (int i = 0; i < 4; i++) {
    const __m128 q01 = _mm_add_ps(_mm256_castps256_ps128(cl[i]), _mm256_extractf128_ps(cl[i], 1));
    const __m128 q23 = _mm_add_ps(_mm256_castps256_ps128(ch[i]), _mm256_extractf128_ps(ch[i], 1));
    s[i] = _mm256_castps128_ps256(_mm_add_ps(q01, q23));
  }
  const vec r = {_mm256_insertf128_ps(s[0], _mm256_castps256_ps128(s[1]), 1), _mm256_insertf128_ps(s[2], _mm256_castps256_ps128(s[3]), 1)};
  return r;
}
"""

BODY = r"""
/* 2^x for x <= 0: x = n + f, f in [-1/2, 1/2], 2^f by its Taylor polynomial of degree 7
   (relative error below 1e-8), scaled by 2^n; below -126 exactly 0 (and -inf gives 0). */
static inline vec exp2_neg(vec x) {
  const vec lim = v_set1(-126.0f);
  const vmask keep = v_ge(x, lim);
  x = v_max(x, lim);
  const vec n = v_round(x);
  const vec f = v_sub(x, n);
  vec p = v_set1(1.5252733804059841e-05f);                  /* ln2^7 / 7! */
  p = v_fmadd(p, f, v_set1(1.5403530393381609e-04f)); /* ln2^6 / 6! */
  p = v_fmadd(p, f, v_set1(1.3333558146428443e-03f)); /* ln2^5 / 5! */
  p = v_fmadd(p, f, v_set1(9.6181291076284772e-03f)); /* ln2^4 / 4! */
  p = v_fmadd(p, f, v_set1(5.5504108664821580e-02f)); /* ln2^3 / 3! */
  p = v_fmadd(p, f, v_set1(2.4022650695910071e-01f)); /* ln2^2 / 2! */
  p = v_fmadd(p, f, v_set1(6.9314718055994531e-01f)); /* ln2 */
  p = v_fmadd(p, f, v_set1(1.0f));
  return v_keep(keep, v_scale2(p, n));
}

int pangu_bi_attention_abi(void) { return 3; }

/* A cache row's 16 values from p: kv_kind 0 bf16, 1 fp32, 2 fp8 e4m3fn, 3 fp8 e5m2 */
static inline vec loadkv(const void* p, int kind) {
  return kind >= 2 ? fp8x16((const uint8_t*)p, kind) : load16(p, kind == 1);
}

/* q [N, H, D]; caches [S, Hkv, D] (value rows Dv wide, Dv = D here); slots [R, L] int64 (R = 1:
   shared by every query), valid [N, L] bytes; out [N, H, D]. *_f32: fp32, else bf16; the caches
   in kv_kind's dtype (loadkv).
   Returns 0, or nonzero for shapes it does not take (1) or a valid key's slot outside [0, S) (3;
   that query's output is then left unwritten). */
int pangu_bi_attention(const void* q, const void* kc, const void* vc, const int64_t* slots,
                       const uint8_t* valid, void* out, int64_t S, int64_t N, int64_t H, int64_t Hkv,
                       int64_t D, int64_t L, int64_t R, float scale, int q_f32, int kv_kind, int out_f32,
                       int64_t threads) {
  if (Hkv <= 0 || H % Hkv || D % 16 || D > MAXD || H / Hkv > MAXG || (R != 1 && R != N) || kv_kind < 0 || kv_kind > 3) return 1;
  const int64_t G = H / Hkv, V = D / 16, tasks = N * Hkv;
  const size_t qsz = q_f32 ? 4 : 2, ksz = kv_kind == 1 ? 4 : kv_kind == 0 ? 2 : 1, osz = out_f32 ? 4 : 2;
  const float log2e = 1.4426950408889634f;
  int bad = 0;
  #pragma omp parallel num_threads(threads > 1 ? threads : 1) if(threads > 1 && tasks >= 2)
  {
    /* per thread: scores [G][L rounded up to 16], fp32 */
    const int64_t Lp = (L + 15) / 16 * 16;
    float* sc = (float*)aligned_alloc(64, ((size_t)(G * Lp + 16) * sizeof(float) + 63) / 64 * 64);  /* a multiple of the alignment, as C11 asks */
    if (!sc) {
      #pragma omp atomic write
      bad = 2;
    }
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
      if (!sc) continue;
      const int64_t n = t / Hkv, h = t % Hkv;
      const int64_t* sl = slots + (R == 1 ? 0 : n * L);
      const uint8_t* ok = valid + n * L;
      vec qv[MAXG][MAXD / 16];
      for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < V; v++)
          qv[g][v] = load16((const char*)q + ((n * H + h * G + g) * D + 16 * v) * qsz, q_f32);
      float top[MAXG];
      /* scores; masked keys -inf (their rows are not read) */
      int oob = 0;
      for (int64_t j = 0; j < L; j++) oob |= ok[j] && (sl[j] < 0 || sl[j] >= S);
      if (oob) {
        #pragma omp atomic write
        bad = 3;
        continue;
      }
      /* 16 keys at a time: their rows widened to fp32 once (keys not valid are not read), then
         per query head 16 dot products reduced together by reduce16 (scores of keys not valid:
         -inf) */
      float kb[16 * MAXD] __attribute__((aligned(64)));
      memset(kb, 0, sizeof(float) * 16 * D);  /* rows of keys not valid are multiplied, then dropped */
      vec topv[MAXG];
      for (int64_t g = 0; g < G; g++) topv[g] = v_set1(-__builtin_inff());
      for (int64_t jb = 0; jb < Lp; jb += 16) {
        unsigned live = 0;
        for (int i = 0; i < 16; i++) {
          const int64_t j = jb + i;
          if (j + KDIST < L && ok[j + KDIST]) {  /* the next block's row, in cache by the time it is read */
            const char* nr = (const char*)kc + ((sl[j + KDIST] * Hkv + h) * D) * ksz;
            for (int64_t c = 0; c < D * ksz; c += 64) _mm_prefetch(nr + c, _MM_HINT_T0);
          }
          if (j >= L || !ok[j]) continue;
          live |= 1u << i;
          const char* kr = (const char*)kc + ((sl[j] * Hkv + h) * D) * ksz;
          for (int64_t v = 0; v < V; v++) v_store(kb + i * D + 16 * v, loadkv(kr + 16 * v * ksz, kv_kind));
        }
        for (int64_t g = 0; g < G; g++) {
          vec s = v_set1(-__builtin_inff());
          if (live) {
            /* KGROUP keys' dot products side by side (independent chains; each key's own sum over
               the D lanes in the same order as one at a time: v = 0, then fused adds for 1..V-1) */
            vec a[16];
            for (int i0 = 0; i0 < 16; i0 += KGROUP) {
              vec t[KGROUP];
              for (int i = 0; i < KGROUP; i++) t[i] = v_mul(qv[g][0], v_load(kb + (i0 + i) * D));
              for (int64_t v = 1; v < V; v++) {
                const vec qg = qv[g][v];
                for (int i = 0; i < KGROUP; i++) t[i] = v_fmadd(qg, v_load(kb + (i0 + i) * D + 16 * v), t[i]);
              }
              for (int i = 0; i < KGROUP; i++) a[i0 + i] = ((live >> (i0 + i)) & 1) ? t[i] : v_zero();
            }
            s = v_select(s, live, v_mul(reduce16(a), v_set1(scale)));
          }
          v_store(sc + g * Lp + jb, s);
          topv[g] = v_max(topv[g], s);
        }
      }
      for (int64_t g = 0; g < G; g++) top[g] = v_reduce_max(topv[g]);
      /* p = exp2((s - max) log2 e) in place, summed in 16 lanes by key position */
      float total[MAXG];
      for (int64_t g = 0; g < G; g++) {
        float* s = sc + g * Lp;
        const vec m = v_set1(top[g]), l2 = v_set1(log2e);
        vec sum = v_zero();
        for (int64_t j = 0; j < Lp; j += 16) {
          const vec p = exp2_neg(v_mul(v_sub(v_load(s + j), m), l2));
          v_store(s + j, p);
          sum = v_add(sum, p);
        }
        total[g] = v_reduce_add(sum);
      }
      /* values weighted by p, in key order: 16 keys at a time, their rows widened to fp32 once
         (kb again), then per query head VGROUP vectors of the sums held in registers over the 16
         keys (each lane's sum in the same key order as one key at a time; keys not valid skipped) */
      vec acc[MAXG][MAXD / 16];
      for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < V; v++) acc[g][v] = v_zero();
      for (int64_t jb = 0; jb < L; jb += 16) {
        const int m = L - jb < 16 ? (int)(L - jb) : 16;
        unsigned live = 0;
        for (int i = 0; i < m; i++) {
          const int64_t j = jb + i;
          if (j + VDIST < L && ok[j + VDIST]) {
            const char* nr = (const char*)vc + ((sl[j + VDIST] * Hkv + h) * D) * ksz;
            for (int64_t c = 0; c < D * ksz; c += 64) _mm_prefetch(nr + c, _MM_HINT_T0);
          }
          if (!ok[j]) continue;
          live |= 1u << i;
          const char* vr = (const char*)vc + ((sl[j] * Hkv + h) * D) * ksz;
          for (int64_t v = 0; v < V; v++) v_store(kb + i * D + 16 * v, loadkv(vr + 16 * v * ksz, kv_kind));
        }
        if (!live) continue;
        for (int64_t g = 0; g < G; g++) {
          const float* pg = sc + g * Lp + jb;
          int64_t v = 0;
          for (; v + VGROUP <= V; v += VGROUP) {
            vec r[VGROUP];
            for (int c = 0; c < VGROUP; c++) r[c] = acc[g][v + c];
            for (int i = 0; i < m; i++) {
              if (!((live >> i) & 1)) continue;
              const vec p = v_set1(pg[i]);
              for (int c = 0; c < VGROUP; c++) r[c] = v_fmadd(p, v_load(kb + i * D + 16 * (v + c)), r[c]);
            }
            for (int c = 0; c < VGROUP; c++) acc[g][v + c] = r[c];
          }
          for (; v < V; v++) {
            vec r = acc[g][v];
            for (int i = 0; i < m; i++)
              if ((live >> i) & 1) r = v_fmadd(v_set1(pg[i]), v_load(kb + i * D + 16 * v), r);
            acc[g][v] = r;
          }
        }
      }
      for (int64_t g = 0; g < G; g++) {
        /* no valid key: 0/0, NaN, as the torch form gives */
        const vec inv = v_set1(total[g]);
        char* o = (char*)out + ((n * H + h * G + g) * D) * osz;
        for (int64_t v = 0; v < V; v++) {
          const vec r = v_div(acc[g][v], inv);
          if (out_f32) {
            v_store((float*)o + 16 * v, r);
          } else {
            store_bf16((uint16_t*)o + 16 * v, r);
          }
        }
      }
    }
    free(sc);
  }
  return bad;
}
"""


def source(isa: str) -> str:
    """The kernel's C source for "avx512" or "avx2"."""
    # imported here: pangu_infer.quant's package imports the models (dense), which import this module
    from pangu_infer.quant.c_simd import BF16_AVX2, BF16_AVX512

    return (_COMMON + (AVX512 if isa == "avx512" else AVX2) + BODY).replace("@BF16_AVX2@", BF16_AVX2).replace("@BF16_AVX512@", BF16_AVX512)

FLAGS = C_FLAGS


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("torch", "off", "0", "none")


def instruction_set() -> Optional[str]:
    """The build this CPU takes: "avx512" (AVX-512F), "avx2" (AVX2 and FMA), or None."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return None


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None where it cannot run here (then the torch form runs)."""
    if disabled() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    isa = instruction_set()
    if isa is None:
        return None
    compiler = c_compiler()
    if not compiler:
        log.info("batch-invariant attention: no C compiler found, using the torch form")
        return None
    try:
        lib = build_c_library("bi_attention", source(isa), compiler, FLAGS)
        if lib.pangu_bi_attention_abi() != 3:
            return None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("batch-invariant attention kernel not built (%s): using the torch form", e)
        return None
    fn = lib.pangu_bi_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] + [ctypes.c_int] * 3 + [ctypes.c_int64]
    return lib


_DTYPES = (torch.bfloat16, torch.float32)
# the caches' dtypes the kernel reads, by the kv_kind it is told (an fp8 cache outside the
# batch-invariant mode: its decode attention, kv_cache_dtype "fp8", "fp8_e4m3", "fp8_e5m2")
KV_KINDS = {torch.bfloat16: 0, torch.float32: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def available() -> bool:
    """Is the kernel built and loadable here? A constant to torch.compile: evaluated (and the
    kernel built) when a graph is traced, not traced into (library()'s file and ctypes calls would
    break the graph, and the decode step skips the module guards that a break needs). Marked so
    (`torch.compiler.assume_constant_result`) by layers.disable_compile_on_marked_methods before
    any trace, not here: the decorator imports torch._dynamo, 2 s of every start on Zen 1."""
    return library() is not None


def usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: Optional[torch.Tensor]) -> bool:
    """Does the kernel take this attention (else the torch form)? Fixed per model and cache:
    the same answer for every call of one engine."""
    return q.device.type == "cpu" and takes(q.shape[1], q.shape[-1], q.dtype, k_cache, v_cache)


def takes(heads: int, head_dim: int, q_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: Optional[torch.Tensor]) -> bool:
    """usable() from what a layer knows before its first query: query heads and width, the
    queries' dtype, and its caches."""
    if v_cache is None or not available():
        return False
    d = k_cache.shape[-1]
    hkv = k_cache.shape[1]
    return (
        k_cache.device.type == "cpu"
        and q_dtype in _DTYPES and k_cache.dtype in KV_KINDS and v_cache.dtype == k_cache.dtype
        and v_cache.shape == k_cache.shape and head_dim == d and d % 16 == 0 and d <= MAX_HEAD_DIM
        and heads % hkv == 0 and heads // hkv <= MAX_GROUP
    )


def run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """q [N, H, D]; caches [S, Hkv, D]; slots [N or 1, L] int64; valid [N, L] bool -> [N, H, D] in q's dtype."""
    lib = library()
    n, h, d = q.shape
    length = slots.shape[-1]
    q = q.contiguous()
    slots = slots.to(torch.long).contiguous()
    valid = valid.reshape(n, length).contiguous()
    if valid.dtype != torch.bool:
        valid = valid.to(torch.bool)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("batch-invariant attention: the caches must be contiguous")
    out = torch.empty(n, h, d, dtype=q.dtype)
    if n:
        attention_pass(lib, q, k_cache, v_cache, slots, valid, out, scale, torch.get_num_threads())
    return out


def attention_pass(lib: ctypes.CDLL, q, k_cache, v_cache, slots, valid, out, scale: float, threads: int) -> None:
    """The kernel's call on operands `run` has made fit (q [N, H, D] and out contiguous, of one
    dtype; slots [N or 1, L] long and valid [N, L] bool, contiguous; contiguous caches): out is
    written. run calls it, and the eager decode step (engine/eager_step.py) with each decode
    group's rows. RuntimeError where the kernel refuses them."""
    n, h, d = q.shape
    rc = lib.pangu_bi_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), valid.data_ptr(), out.data_ptr(),
        k_cache.shape[0], n, h, k_cache.shape[1], d, slots.shape[-1], slots.shape[0], float(scale),
        int(q.dtype == torch.float32), KV_KINDS[k_cache.dtype], int(out.dtype == torch.float32), threads,
    )
    if rc:
        raise RuntimeError(f"batch-invariant attention kernel refused q {tuple(q.shape)}, cache {tuple(k_cache.shape)} ({rc})")


# A plain Library registration (as quant/cpu_int4.py's ops): opaque to inductor, so a compiled
# step runs exactly the kernel an eager forward calls.
_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("bi_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor valid, float scale) -> Tensor")


def _bi_attention_shape(q, k_cache, v_cache, slots, valid, scale):
    return q.new_empty(q.shape)


def _bi_attention(q, k_cache, v_cache, slots, valid, scale):
    return run(q, k_cache, v_cache, slots, valid, scale)


_lib.impl("bi_attention", _bi_attention, "CPU")
_lib._register_fake("bi_attention", _bi_attention_shape)


def native_op() -> bool:
    """Point `pangu_infer::bi_attention_native` (pangu_infer.native_ops: the kernel's call
    registered from C++, no Python between a compiled graph and the kernel) at the kernel; True
    when compiled graphs call it from now on, False where the kernel or the operators are not built
    here (the Python operator runs)."""
    return native_ops.connect("attention", library, "pangu_bi_attention", "bi_attention_native", _bi_attention_shape)


def attention(q, k_cache, v_cache, slots, valid, scale) -> torch.Tensor:
    """The kernel as the caller's context wants it: while compiling the C++ operator where it is
    connected (native_op), else the Python one; eagerly the C function."""
    if tracing():
        if native_ops.connected("attention"):
            return torch.ops.pangu_infer.bi_attention_native(q, k_cache, v_cache, slots, valid, scale)
        return torch.ops.pangu_infer.bi_attention(q, k_cache, v_cache, slots, valid, scale)
    return run(q, k_cache, v_cache, slots, valid, scale)


__all__ = ["ENV", "attention", "disabled", "instruction_set", "library", "native_op", "run", "source", "takes", "usable"]
