"""int4 products of a few rows (decode) on x86 CPUs (AVX-512 VNNI, or AVX2): a small C kernel of our own.

Why: on some CPUs `aten._weight_int4pack_mm_for_cpu` reaches well under half of the memory's
streaming read at one token (benchmarks/RESULTS.md, "int4 decode kernel"), and a decode step of an
int4 model is almost all such products. This kernel does less arithmetic per weight byte:

- weights in their own layout, [N/16, K/8, 64] bytes: for each block of 16 rows and each 8 columns
  (an "octet"), 16 rows x 4 bytes; byte j of row r holds column 8o + j in the low nibble and
  column 8o + 4 + j in the high nibble. One 64-byte load feeds two `vpdpbusd` (u8 x s8 dot
  products of 4) per activation row, with no conversion of the weights to float;
- scales and zeros [N/16, K/G, 2, 16] in bf16 (the same rounding as the aten kernel's
  qScaleAndZeros): w = (q - 8) * scale + zero, so per group and row
  y += scale * sum(x q) + (zero - 8 scale) * sum(x). Where every zero of a weight is 0 (GGUF's Q4_0,
  w = (q - 8) d), the scales alone, [N/16, K/G, 1, 16]: 18 bytes read per 32 weights instead of 20
  (llama.cpp's Q4_0 reads 18), the same outputs bit for bit (the zero taken as 0 in the same
  arithmetic). The kernels read the values per group (1 or 2) from the layout's shape;
- activations quantized per group twice, x ~= d (a + b / 254) with int8 a and b (two more dot
  products per load): the rounding error is about 2^-16 of the group's largest value, finer than
  the bf16 activations the aten kernel takes (2^-9). That is the default where the CPU has AVX-512
  VNNI, which streams the weights at the memory's speed either way. On AVX2-only CPUs the kernel is
  bound by its dot products, and by default it quantizes once, x ~= d a: llama.cpp's Q8_0 rounding
  of the activations for its Q4 dot products, 1.5x faster there, and the demo model's perplexity
  moves by 0.01% (`activation_levels`, `PANGU_INFER_INT4_ACTIVATIONS=int8|int8x2`;
  benchmarks/int4_activations.py).
- a row of x holding NaN or infinity gives NaN in every output of that row (the group's step is NaN),
  as the product of the dequantized weight does; the other rows keep their bits.

Row counts above 4 run in chunks of 4 rows (each chunk reads the weight again). Codes of 5 and 6
bits (GGUF's Q5 blocks and Q6_K: pack5, pack6) keep their high bits in planes beside the nibbles;
the AVX-512 build multiplies all 16 rows of a block in one register for them as for 4-bit codes
(hblock16), the AVX2 build two halves of 8 (block8, many16, row16). The kernel is
built once per machine with the C compiler inductor also needs (`$CC`, else `cc`/`gcc`), with
`-march=native`, into `~/.cache/pangu-infer/` (`$XDG_CACHE_HOME` respected), and loaded with ctypes.
Where it cannot be used (no AVX-512 VNNI, no compiler, a shape it does not take) the aten kernel
runs as before. Where it can run, it is used if it beat aten's kernel in a short measurement
(one-row products over 32 MB of int4 weights, interleaved), made once per machine and kept in
pangu_infer.quant.tuning's per-machine cache (`~/.cache/pangu-infer/kernels.json`, key
`int4_decode_kernel`). `PANGU_INFER_INT4_KERNEL=aten` turns it off, `=own` uses it unmeasured.

Inside a compiled step the product is an operator opaque to inductor, like the aten kernel:
`pangu_infer::int4_native_mm`, registered from C++ (pangu_infer.native_ops: built once per
machine with torch's headers before the decode step is traced, `native_op`), which calls the
kernel with no Python in between, or where that cannot be built (or `PANGU_INFER_NATIVE_OPS=0`)
the Python custom op `pangu_infer::int4_vnni_mm` (about 25 us more per call). Eagerly the C
function is called directly (fewer microseconds per call, which the small expert products of a
MoE notice).
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
from pangu_infer.machine import own_kernel_measured_faster
from pangu_infer.native import C_FLAGS, build_c_library, c_compiler, cpu_flags
from pangu_infer.quant.c_simd import BF16_AVX2, BF16_AVX512, INT4_OCTET, PLANE_WORD, TRANSPOSE8
from pangu_infer.quant.scratch import scratch

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_INT4_KERNEL"
ACTIVATIONS_ENV = "PANGU_INFER_INT4_ACTIVATIONS"
ROW_BLOCK = 16  # rows per block of the layout
# The kernels' revision, in the names of the per-machine row counts from which their products of many
# rows convert the weight instead (quant/tuning.py): a changed kernel is measured again. 2: the AVX-512
# build's products of 2-4 rows per chunk sum both nibbles of a level in one register (4-bit codes 1.3x),
# and run 5- and 6-bit codes 16 rows to a register (hblock16; 6-bit 2.8-3.3x). 3: the AVX-512 build's
# 4-bit products of 1-4 rows per chunk with groups of 32 a constant (1.1-1.15x at 2-67 rows).
REVISION = 3
OCTET = 8  # columns per 64-byte load of a block

_HEAD = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

#define MMAX 4
/* INT4_FINE 1: activations as two int8 levels per group (coarse and fine); 0: the coarse level only
   (llama.cpp's Q8_0 rounding of the activations), half the dot products. */
#ifndef INT4_FINE
#define INT4_FINE 1
#endif

/* One row of activations streams the weight once, with little arithmetic per byte: the hardware's
   prefetchers, which learn each product's two streams (weights, scales) anew at every call, fall
   behind; a software prefetch of the line 1 KB ahead in the weights (each octet) and 512 bytes ahead
   in the scales (each group) made a decode step's int4 products (427 MB) 1.1x faster on a Zen 3
   (benchmarks/RESULTS.md, "int4 kernel: prefetching ahead"). Past a block's end they fetch the next
   block's bytes, which come next. The AVX-512 build's pair16 does the same for its two blocks
   (not measured on such a CPU yet). */
#define WEIGHTS_AHEAD 1024
#define SCALES_AHEAD 512
#define PREFETCH_AHEAD(ptr, bytes) _mm_prefetch((const char*)(ptr) + (bytes), _MM_HINT_T0)

static inline float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t tobf(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);  /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest even, as torch does */
  return (uint16_t)(u >> 16);
}

"""

# AVX-512 VNNI: one 16-row block per 512-bit vector, `vpdpbusd` dot products.
_KERNELS_AVX512 = r"""
@BF16_AVX512@
@INT4_OCTET@
/* A group's end for 16 rows: its sum t in fp32 times the scales and the row's step, plus the offsets
   (zero - o scale) times the row's sum; the AVX2 build's group_end_sc steps, in order. */
static inline __m512 group_end16(__m512 acc, __m512 t, __m512 sc, __m512 off, float step, float sum) {
  acc = _mm512_fmadd_ps(t, _mm512_mul_ps(sc, _mm512_set1_ps(step)), acc);
  return _mm512_fmadd_ps(off, _mm512_set1_ps(sum), acc);
}
/* A group's sum t in fp32 from its int32 sums. level_sum16: coarse c and fine f sums that each hold
   the whole integer, t = c + f / 254 (one level: c). nibble_sum16: the high nibbles used in place
   (16 q) in sums of their own, c = cl + ch / 16 and f = fl + fh / 16 first (exact: the same integers,
   so the same t). */
static inline __m512 level_sum16(__m512i c, __m512i f) {
#if INT4_FINE
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(f), _mm512_set1_ps(1.0f / 254.0f), _mm512_cvtepi32_ps(c));
#else
  (void)f;
  return _mm512_cvtepi32_ps(c);
#endif
}
static inline __m512 nibble_sum16(__m512i cl, __m512i ch, __m512i fl, __m512i fh) {
  const __m512 sixteenth = _mm512_set1_ps(1.0f / 16.0f);
  const __m512 coarse = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ch), sixteenth, _mm512_cvtepi32_ps(cl));
#if INT4_FINE
  const __m512 fine = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fh), sixteenth, _mm512_cvtepi32_ps(fl));
  return _mm512_fmadd_ps(fine, _mm512_set1_ps(1.0f / 254.0f), coarse);
#else
  (void)fl; (void)fh;
  return coarse;
#endif
}
/* 16 sums rounded to bf16 (to nearest even) at y. */
static inline void store16(uint16_t* y, __m512 acc) {
  float t[16];
  _mm512_storeu_ps(t, acc);
  for (int d = 0; d < 16; d++) y[d] = tobf(t[d]);
}

/* One block of 16 rows for M (1..4) activation rows. xq: [2][MMAX][K] int8 (coarse, fine);
   dx, xs: [MMAX][K/G] per-group step and sum of x; zs: values per group and row in sz (1 or 2). */
static inline __attribute__((always_inline)) void block16(
    const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, const uint16_t* sz,
    uint16_t* y, const int M, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) {
  __m512 acc[MMAX];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(15);
  const int64_t ng = K / G, gs = 16 * zs;
  const uint8_t* p = w + b * (K / 8) * 64;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t g = 0; g < ng; g++, sp += gs) {
    /* four independent accumulator chains per row (coarse/fine x low/high nibble): the dot
       products' latency overlaps. High nibbles are used in place (v & 0xF0 = 16 q): no shift. */
    __m512i cl[MMAX], ch[MMAX], fl[MMAX], fh[MMAX];
    for (int m = 0; m < M; m++) {
      cl[m] = _mm512_setzero_si512(); ch[m] = _mm512_setzero_si512();
      fl[m] = _mm512_setzero_si512(); fh[m] = _mm512_setzero_si512();
    }
    for (int64_t o = 0; o < G / 8; o++, p += 64) {
      __m512i v = _mm512_loadu_si512((const void*)p);
      __m512i lo = _mm512_and_si512(v, mask);
      /* One or two rows: the high nibbles in place (16 q) into their own sums, cl + ch / 16 at the
         group's end. Three or four: shifted down once for all of them into the same sums, which then
         hold that integer, so its conversion is the same one rounding of the same value as that
         multiply-add's (the same bits): half the registers (4 rows 1.3x faster), and the end
         skips a conversion and a multiply-add per row and level; with fewer rows the longer chain of
         dependent products costs more than that (0.95x at 2 rows). */
      __m512i hi = M < 3 ? _mm512_andnot_si512(mask, v) : _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      for (int m = 0; m < M; m++) {
        const int8_t* c = xq + m * K + g * G + 8 * o;
        int32_t c0, c1;
        memcpy(&c0, c, 4); memcpy(&c1, c + 4, 4);
        cl[m] = _mm512_dpbusd_epi32(cl[m], lo, _mm512_set1_epi32(c0));
        if (M < 3) ch[m] = _mm512_dpbusd_epi32(ch[m], hi, _mm512_set1_epi32(c1));
        else cl[m] = _mm512_dpbusd_epi32(cl[m], hi, _mm512_set1_epi32(c1));
#if INT4_FINE
        const int8_t* f = c + MMAX * K;
        int32_t f0, f1;
        memcpy(&f0, f, 4); memcpy(&f1, f + 4, 4);
        fl[m] = _mm512_dpbusd_epi32(fl[m], lo, _mm512_set1_epi32(f0));
        if (M < 3) fh[m] = _mm512_dpbusd_epi32(fh[m], hi, _mm512_set1_epi32(f1));
        else fl[m] = _mm512_dpbusd_epi32(fl[m], hi, _mm512_set1_epi32(f1));
#endif
      }
    }
    const __m512 sc = bf16x16(sp), off = group_off16(sc, sp, zs, 8.0f);
    for (int m = 0; m < M; m++) {
      const __m512 t = M < 3 ? nibble_sum16(cl[m], ch[m], fl[m], fh[m]) : level_sum16(cl[m], fl[m]);
      acc[m] = group_end16(acc[m], t, sc, off, dx[m * ng + g], xs[m * ng + g]);
    }
  }
  for (int m = 0; m < M; m++) store16(y + m * ldy + b * 16, acc[m]);
}

/* Codes with P bit planes beside the nibbles (1: 5-bit codes, 2: 6-bit; _INT5's layout: a constant at
   every call) for M (1..4) activation rows: block16's loop with both halves of the block in one
   512-bit register, each octet's planes OR-ed into its unpacked nibbles as HIGH16 does for the AVX2
   build (the upper eight 32-bit lanes take the plane shifted as HIGH16's second half is), the low and
   high columns' products into the same int32 sums. Those sums are block8's integers and each group's
   end is block8's steps in order: the AVX2 build's bits. _INT5's row functions call it for 1-4 rows
   (HIGH_BLOCK16); one row with the row loop's prefetches. */
#define HIGH_BLOCK16 1
static inline __attribute__((always_inline)) void hblock16(
    const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, const uint8_t* hb, const int P, const uint16_t* sz,
    uint16_t* y, const int M, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) {
  __m512 acc[MMAX];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(15), hmask = _mm512_set1_epi8(P == 1 ? 16 : 0x30);
  const int64_t ng = K / G, gs = 16 * zs;
  const uint8_t* p = w + b * (K / 8) * 64;
  const uint8_t* e = hb + b * (K / 8) * 16 * P;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t g = 0; g < ng; g++, sp += gs) {
    __m512i cl[MMAX], fl[MMAX];
    for (int m = 0; m < M; m++) { cl[m] = _mm512_setzero_si512(); fl[m] = _mm512_setzero_si512(); }
    if (M == 1) PREFETCH_AHEAD(sp, SCALES_AHEAD);
    for (int64_t o = 0; o < G / 8; o++, p += 64, e += 16 * P) {
      if (M == 1) { PREFETCH_AHEAD(p, WEIGHTS_AHEAD); PREFETCH_AHEAD(e, WEIGHTS_AHEAD / 4 * P); }
      const __m512i v = _mm512_loadu_si512((const void*)p);
      /* lane d < 8: the bits HIGH16 gives rows d (lo0, hi0); lane 8 + d: those of rows 8 + d (lo1, hi1) */
      const __m512i high = P == 1
          ? _mm512_srlv_epi32(_mm512_sllv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(const void*)e)),
                                                _mm512_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0)),
                              _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2))
          : _mm512_sllv_epi32(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(const void*)e)),
                              _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4));
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, mask), _mm512_and_si512(high, hmask));
      const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), mask), _mm512_and_si512(_mm512_srli_epi32(high, P), hmask));
      for (int m = 0; m < M; m++) {
        const int8_t* c = xq + m * K + g * G + 8 * o;
        int32_t c0, c1;
        memcpy(&c0, c, 4); memcpy(&c1, c + 4, 4);
        cl[m] = _mm512_dpbusd_epi32(cl[m], lo, _mm512_set1_epi32(c0));
        cl[m] = _mm512_dpbusd_epi32(cl[m], hi, _mm512_set1_epi32(c1));
#if INT4_FINE
        const int8_t* f = c + MMAX * K;
        int32_t f0, f1;
        memcpy(&f0, f, 4); memcpy(&f1, f + 4, 4);
        fl[m] = _mm512_dpbusd_epi32(fl[m], lo, _mm512_set1_epi32(f0));
        fl[m] = _mm512_dpbusd_epi32(fl[m], hi, _mm512_set1_epi32(f1));
#endif
      }
    }
    const __m512 sc = bf16x16(sp), off = group_off16(sc, sp, zs, OFFSET(P));
    for (int m = 0; m < M; m++) {
      const __m512 t = level_sum16(cl[m], fl[m]);
      acc[m] = group_end16(acc[m], t, sc, off, dx[m * ng + g], xs[m * ng + g]);
    }
  }
  for (int m = 0; m < M; m++) store16(y + m * ldy + b * 16, acc[m]);
}

/* One activation row, two blocks (32 weight rows) at once: each broadcast of x feeds both, and
   eight accumulator chains overlap. */
static void pair16(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w,
                   const uint16_t* sz, uint16_t* y, int64_t K, int64_t G, int64_t zs, int64_t b) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(15);
  const int64_t ng = K / G, gs = 16 * zs;
  const uint8_t* p0 = w + b * (K / 8) * 64;
  const uint8_t* p1 = p0 + (K / 8) * 64;
  const uint16_t* s0 = sz + b * ng * gs;
  const uint16_t* s1 = s0 + ng * gs;
  for (int64_t g = 0; g < ng; g++, s0 += gs, s1 += gs) {
    __m512i cl0 = _mm512_setzero_si512(), ch0 = cl0, fl0 = cl0, fh0 = cl0;
    PREFETCH_AHEAD(s0, SCALES_AHEAD); PREFETCH_AHEAD(s1, SCALES_AHEAD);
    __m512i cl1 = cl0, ch1 = cl0, fl1 = cl0, fh1 = cl0;
    const int8_t* c = xq + g * G;
    const int8_t* f = c + MMAX * K;
    for (int64_t o = 0; o < G / 8; o++, p0 += 64, p1 += 64, c += 8, f += 8) {
      PREFETCH_AHEAD(p0, WEIGHTS_AHEAD); PREFETCH_AHEAD(p1, WEIGHTS_AHEAD);
      int32_t c0, c1;
      memcpy(&c0, c, 4); memcpy(&c1, c + 4, 4);
      const __m512i bc0 = _mm512_set1_epi32(c0), bc1 = _mm512_set1_epi32(c1);
      const __m512i v0 = _mm512_loadu_si512((const void*)p0), v1 = _mm512_loadu_si512((const void*)p1);
      const __m512i lo0 = _mm512_and_si512(v0, mask), hi0 = _mm512_andnot_si512(mask, v0);
      const __m512i lo1 = _mm512_and_si512(v1, mask), hi1 = _mm512_andnot_si512(mask, v1);
      cl0 = _mm512_dpbusd_epi32(cl0, lo0, bc0); ch0 = _mm512_dpbusd_epi32(ch0, hi0, bc1);
      cl1 = _mm512_dpbusd_epi32(cl1, lo1, bc0); ch1 = _mm512_dpbusd_epi32(ch1, hi1, bc1);
#if INT4_FINE
      int32_t f0, f1;
      memcpy(&f0, f, 4); memcpy(&f1, f + 4, 4);
      const __m512i bf0 = _mm512_set1_epi32(f0), bf1 = _mm512_set1_epi32(f1);
      fl0 = _mm512_dpbusd_epi32(fl0, lo0, bf0); fh0 = _mm512_dpbusd_epi32(fh0, hi0, bf1);
      fl1 = _mm512_dpbusd_epi32(fl1, lo1, bf0); fh1 = _mm512_dpbusd_epi32(fh1, hi1, bf1);
#endif
    }
    const __m512 sc0 = bf16x16(s0), sc1 = bf16x16(s1);
    acc0 = group_end16(acc0, nibble_sum16(cl0, ch0, fl0, fh0), sc0, group_off16(sc0, s0, zs, 8.0f), dx[g], xs[g]);
    acc1 = group_end16(acc1, nibble_sum16(cl1, ch1, fl1, fh1), sc1, group_off16(sc1, s1, zs, 8.0f), dx[g], xs[g]);
  }
  store16(y + b * 16, acc0);
  store16(y + b * 16 + 16, acc1);
}

/* Rows 1-4 against block b, the group size a constant where it is 32 (CALL_G: GGUF's Q4_0 and Q4_1
   blocks): 1.1-1.15x at 2-67 rows here (RESULTS.md, stop 53); the same bits. */
#define ROWS(MM) static void rows##MM(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  CALL_G(block16(xq, dx, xs, w, sz, y, MM, ldy, K, 32, zs, b), block16(xq, dx, xs, w, sz, y, MM, ldy, K, G, zs, b)); }
ROWS(1) ROWS(2) ROWS(3) ROWS(4)

/* W^T [K, N] bf16 from the layout (products of many rows convert the weight once and run one bf16
   product): w = q * scale + (zero - 8 scale) in fp32, one fused multiply-add, rounded to bf16 once
   (to nearest even). Each 64-byte load is one octet of 16 rows: lane r holds row r's 4 bytes. */
/* Block b (16 rows); zs (values per group and row) a constant at each call: no test per octet. */
static inline __attribute__((always_inline)) void to_bf16_t_block(const uint8_t* w, const uint16_t* sz, uint16_t* out,
                                                                  int64_t N, int64_t K, int64_t G, const int64_t zs, int64_t b) {
  const int64_t ng = K / G, octets = K / 8, gs = 16 * zs;
  const uint8_t* p = w + b * octets * 64;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t o = 0; o < octets; o++, p += 64) {
    __m512 f[2][4];  /* [low, high nibbles][j] */
    int4_octet(p, sp + ((8 * o) / G) * gs, zs, f[0], f[1]);
    for (int j = 0; j < 4; j++) {
      for (int h = 0; h < 2; h++) {
        const __m512i r = round_bf16x16_finite(f[h][j]);  /* finite scales: finite weights */
        _mm256_storeu_si256((__m256i*)(out + (8 * o + 4 * h + j) * N + 16 * b), _mm512_cvtepi32_epi16(r));
      }
    }
  }
}

""".replace("@BF16_AVX512@", BF16_AVX512).replace("@INT4_OCTET@", INT4_OCTET)

# AVX2 + FMA helpers and block functions of the AVX2 build's kernels and of the 5-bit kernel (_INT5),
# which both builds carry (AVX-512 CPUs have AVX2; static inline: the AVX-512 build compiles what its
# 5-bit functions call).
_AVX2_HELPERS = r"""
/* acc (int16) + per 16-bit lane: the two u8 x s8 products of (a, b) and those of (c, d); a, c in
   0..15, so each addend is at most 2 * 2 * 15 * 127 = 7620 in size (5-bit codes, 0..31: 15748). The empty asm keeps each
   step's sum in a register in this order: without it gcc 12 regroups a
   group's int16 additions, takes every product first and spills them to the stack (products of
   many rows 1.3x slower on Zen 3, one row 1.1x). */
static inline __m256i dot2(__m256i acc, __m256i a, __m256i b, __m256i c, __m256i d) {
  acc = _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(a, b), _mm256_maddubs_epi16(c, d)));
  __asm__("" : "+x"(acc));
  return acc;
}

/* 4 bytes at p in every 32-bit lane: one broadcast load (a scalar load, a move to a vector register
   and a broadcast measured slower here) */
static inline __m256i bcast4(const int8_t* p) { return _mm256_castps_si256(_mm256_broadcast_ss((const float*)(const void*)p)); }

@BF16_AVX2@
/* One group's end for 8 rows: the coarse and fine int32 sums (c, f) to fp32, times the group's scale
   and the row's step, plus (zero - 8 scale) times the row's sum; the AVX-512 build's steps, in order.
   sc: the group's 8 scales; off: zero - 8 scale (computed once per group where many rows share them). */
static inline __m256 group_end_sc(__m256 acc, __m256i c, __m256i f, __m256 sc, __m256 off, float step, float sum) {
#if INT4_FINE
  const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(f), _mm256_set1_ps(1.0f / 254.0f), _mm256_cvtepi32_ps(c));
#else
  (void)f;
  const __m256 t = _mm256_cvtepi32_ps(c);
#endif
  acc = _mm256_fmadd_ps(t, _mm256_mul_ps(sc, _mm256_set1_ps(step)), acc);
  return _mm256_fmadd_ps(off, _mm256_set1_ps(sum), acc);
}
@PLANE_WORD@
/* The high bits of one octet of a block OR-ed into its unpacked nibbles, by code width (P 1: the 5-bit
   codes' plane, 16 bytes an octet: plane_word; P 2: the 6-bit codes' 2 high bits, 32 bytes an octet,
   laid out so that one load and a shift give each register its bits: 32-bit lane d, byte j holds in
   bits 4-5 row d's column 8o + j (lo of rows 0-7), in bits 6-7 row d's column 8o + 4 + j (hi), in
   bits 0-1 row 8 + d's column 8o + j, in bits 2-3 row 8 + d's column 8o + 4 + j). HIGH16: all 16
   rows (lo0 and hi0 rows 0-7, lo1 and hi1 rows 8-15; e the octet's bytes); HIGH8: rows 8h .. 8h + 7.
   P a constant at each call. */
#define HIGH16(P, e, lo0, hi0, lo1, hi1) do { \
    if ((P) == 1) { \
      const __m256i w_ = plane_word(e), m_ = _mm256_set1_epi8(16); \
      lo0 = _mm256_or_si256(lo0, _mm256_and_si256(w_, m_)); hi0 = _mm256_or_si256(hi0, _mm256_and_si256(_mm256_srli_epi32(w_, 1), m_)); \
      lo1 = _mm256_or_si256(lo1, _mm256_and_si256(_mm256_srli_epi32(w_, 2), m_)); hi1 = _mm256_or_si256(hi1, _mm256_and_si256(_mm256_srli_epi32(w_, 3), m_)); \
    } else if ((P) == 2) { \
      const __m256i v_ = _mm256_loadu_si256((const __m256i*)(const void*)(e)), m_ = _mm256_set1_epi8(0x30); \
      lo0 = _mm256_or_si256(lo0, _mm256_and_si256(v_, m_)); hi0 = _mm256_or_si256(hi0, _mm256_and_si256(_mm256_srli_epi32(v_, 2), m_)); \
      lo1 = _mm256_or_si256(lo1, _mm256_and_si256(_mm256_slli_epi32(v_, 4), m_)); hi1 = _mm256_or_si256(hi1, _mm256_and_si256(_mm256_slli_epi32(v_, 2), m_)); \
    } \
  } while (0)
#define HIGH8(P, e, h, lo, hi) do { \
    if ((P) == 1) { \
      const __m256i w_ = _mm256_srl_epi32(plane_word(e), _mm_cvtsi32_si128(2 * (h))), m_ = _mm256_set1_epi8(16); \
      lo = _mm256_or_si256(lo, _mm256_and_si256(w_, m_)); hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi32(w_, 1), m_)); \
    } else if ((P) == 2) { \
      const __m256i v_ = _mm256_loadu_si256((const __m256i*)(const void*)(e)), m_ = _mm256_set1_epi8(0x30); \
      if ((h) == 0) { lo = _mm256_or_si256(lo, _mm256_and_si256(v_, m_)); hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi32(v_, 2), m_)); } \
      else { lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi32(v_, 4), m_)); hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi32(v_, 2), m_)); } \
    } \
  } while (0)
/* Octets summed in int16 before widening to int32, by code width: 4 with 4-bit codes (at most
   4 * 7620 = 30480), 2 with 5-bit ones (2 * 15748 = 31496), 1 with 6-bit ones (32004); the codes'
   middle (offset) 8, 16, 32. */
#define SPAN(P) ((P) == 0 ? 4 : (P) == 1 ? 2 : 1)
#define OFFSET(P) ((P) == 0 ? 8.0f : (P) == 1 ? 16.0f : 32.0f)

/* zero - o scale for a group's 8 rows, o the codes' offset (8, 16, 32 for 4-, 5-, 6-bit codes):
   s the group's scales, then where zs == 2 its zeros 16 halfwords on (zs == 1: scales only, zeros 0). */
static inline __m256 group_off(const uint16_t* s, int64_t zs, float o) {
  const __m256 sc = bf8(s), ze = zs == 2 ? bf8(s + 16) : _mm256_setzero_ps();
  return _mm256_fnmadd_ps(_mm256_set1_ps(o), sc, ze);
}

/* Half h (rows 8h .. 8h + 7) of 16-row block b for M (1..4) activation rows; the arithmetic of the
   AVX-512 block16 lane by lane. xq: [2][MMAX][K] int8 (coarse, fine); dx, xs: [MMAX][K/G]; zs: values
   per group and row in sz (1 or 2). P: the bit planes beside the nibbles (0: 4-bit codes, hb NULL;
   1: 5-bit, 2: 6-bit; a constant at every call, so the planes' steps compile away where there are
   none), hb the planes [N/16, K/8, 16 P], each code's high bits OR-ed into its nibble. Octets are
   summed in int16 SPAN(P) at a time before widening to int32. */
static inline __attribute__((always_inline)) void block8(
    const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, const uint8_t* hb, const int P, const uint16_t* sz,
    uint16_t* y, const int M, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b, int h) {
  __m256 acc[MMAX];
  for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(15);
  const int64_t ng = K / G, gs = 16 * zs, span = SPAN(P);
  const uint8_t* p = w + b * (K / 8) * 64 + 32 * h;
  const uint8_t* e = P ? hb + b * (K / 8) * 16 * P : NULL;
  const uint16_t* sp = sz + b * ng * gs + 8 * h;
  for (int64_t g = 0; g < ng; g++, sp += gs) {
    __m256i c[MMAX], f[MMAX];
    for (int m = 0; m < M; m++) { c[m] = _mm256_setzero_si256(); f[m] = _mm256_setzero_si256(); }
    for (int64_t o0 = 0; o0 < G / 8; o0 += span) {
      const int64_t o1 = o0 + span < G / 8 ? o0 + span : G / 8;
      __m256i c16[MMAX], f16[MMAX];
      for (int m = 0; m < M; m++) { c16[m] = _mm256_setzero_si256(); f16[m] = _mm256_setzero_si256(); }
      for (int64_t o = o0; o < o1; o++, p += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)p);
        __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        if (P) {
          HIGH8(P, e, h, lo, hi);
          e += 16 * P;
        }
        for (int m = 0; m < M; m++) {
          const int8_t* cq = xq + m * K + g * G + 8 * o;
          const int8_t* fq = cq + MMAX * K;
          c16[m] = dot2(c16[m], lo, bcast4(cq), hi, bcast4(cq + 4));
#if INT4_FINE
          f16[m] = dot2(f16[m], lo, bcast4(fq), hi, bcast4(fq + 4));
#else
          (void)fq;
#endif
        }
      }
      for (int m = 0; m < M; m++) {
        c[m] = _mm256_add_epi32(c[m], _mm256_madd_epi16(c16[m], _mm256_set1_epi16(1)));
        f[m] = _mm256_add_epi32(f[m], _mm256_madd_epi16(f16[m], _mm256_set1_epi16(1)));
      }
    }
    const __m256 sc = bf8(sp), off = group_off(sp, zs, OFFSET(P));
    for (int m = 0; m < M; m++) acc[m] = group_end_sc(acc[m], c[m], f[m], sc, off, dx[m * ng + g], xs[m * ng + g]);
  }
  for (int m = 0; m < M; m++) {
    float t[8];
    _mm256_storeu_ps(t, acc[m]);
    for (int d = 0; d < 8; d++) y[m * ldy + b * 16 + 8 * h + d] = tobf(t[d]);
  }
}

/* One activation row, all 16 rows of block b in one pass: each broadcast of x feeds both halves.
   hb and P as block8's (P 0: 4-bit codes); the same sums and group ends as block8: its bits. */
static inline __attribute__((always_inline)) void row16(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w,
                                                        const uint8_t* hb, const int P, const uint16_t* sz, uint16_t* y, int64_t K, int64_t G, int64_t zs, int64_t b) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const int64_t ng = K / G, gs = 16 * zs, span = SPAN(P);
  const uint8_t* p = w + b * (K / 8) * 64;
  const uint8_t* e = P ? hb + b * (K / 8) * 16 * P : NULL;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t g = 0; g < ng; g++, sp += gs) {
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, f0 = c0, f1 = c0;
    const int8_t* cq = xq + g * G;
    const int8_t* fq = cq + MMAX * K;
    PREFETCH_AHEAD(sp, SCALES_AHEAD);
    for (int64_t o0 = 0; o0 < G / 8; o0 += span) {
      const int64_t o1 = o0 + span < G / 8 ? o0 + span : G / 8;
      __m256i c160 = _mm256_setzero_si256(), c161 = c160, f160 = c160, f161 = c160;
      for (int64_t o = o0; o < o1; o++, p += 64, cq += 8, fq += 8) {
        PREFETCH_AHEAD(p, WEIGHTS_AHEAD);
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)p), v1 = _mm256_loadu_si256((const __m256i*)(p + 32));
        __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
        __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
        if (P) {
          PREFETCH_AHEAD(e, WEIGHTS_AHEAD / 4 * P);
          HIGH16(P, e, lo0, hi0, lo1, hi1);
          e += 16 * P;
        }
        const __m256i bc0 = bcast4(cq), bc1 = bcast4(cq + 4);
        c160 = dot2(c160, lo0, bc0, hi0, bc1); c161 = dot2(c161, lo1, bc0, hi1, bc1);
#if INT4_FINE
        const __m256i bf0 = bcast4(fq), bf1 = bcast4(fq + 4);
        f160 = dot2(f160, lo0, bf0, hi0, bf1); f161 = dot2(f161, lo1, bf0, hi1, bf1);
#endif
      }
      c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(c160, ones)); c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(c161, ones));
      f0 = _mm256_add_epi32(f0, _mm256_madd_epi16(f160, ones)); f1 = _mm256_add_epi32(f1, _mm256_madd_epi16(f161, ones));
    }
    const float o = OFFSET(P);
    acc0 = group_end_sc(acc0, c0, f0, bf8(sp), group_off(sp, zs, o), dx[g], xs[g]);
    acc1 = group_end_sc(acc1, c1, f1, bf8(sp + 8), group_off(sp + 8, zs, o), dx[g], xs[g]);
  }
  float t[16];
  _mm256_storeu_ps(t, acc0);
  _mm256_storeu_ps(t + 8, acc1);
  for (int d = 0; d < 16; d++) y[b * 16 + d] = tobf(t[d]);
}

/* CALL_G(f, ..., G, ...): f with the group size a constant where it is 32 (GGUF's Q4_0 and Q4_1 blocks,
   this engine's default): the compiler then unrolls a group's 4 octets and keeps its sums in
   registers, 1.2-1.3x faster products of 2-64 rows on Zen 1 (RESULTS.md, "a constant group").
   The same arithmetic in the same order either way: the same bits. */
#define CALL_G(call_32, call_g) do { if (G == 32) { call_32; } else { call_g; } } while (0)

/* R (1..4) activation rows against all 16 rows of block b, activations in one level, groups of G
   (16, 32, 64 or 128: a constant), in one pass: each broadcast of an activation's 4 bytes feeds both
   halves (as row16 does for one row), and each unpacked octet all R rows (16 int16 sums of `span`
   octets in registers at R = 4, widened to int32 every `span` octets: SPAN(P), hb and P as
   block8's). The int32 sums are block8's (exact integers), each group's end the
   same steps in the same order: block8's bits. On a Zen 3 EPYC at 4-2048 rows 1.1x block8's speed
   with 4-bit codes (both with dot2's register barrier; 1.4-1.5x block8's without it), 1.3-1.45x at
   2-16 rows with 5-bit codes (the plane expanded once for both halves). */
static inline __attribute__((always_inline)) void many16(
    const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, const uint8_t* hb, const int P, const uint16_t* sz,
    uint16_t* y, const int R, int64_t ldy, int64_t K, const int64_t G, const int64_t zs, int64_t b) {
  float acc[4][16] __attribute__((aligned(32)));  /* in memory: the registers hold the int16 sums */
  memset(acc, 0, sizeof acc);
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const int64_t ng = K / G, gs = 16 * zs;
  const int span = SPAN(P);
  const uint8_t* p = w + b * (K / 8) * 64;
  const uint8_t* e = P ? hb + b * (K / 8) * 16 * P : NULL;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t g = 0; g < ng; g++, sp += gs) {
    __m256i s0[4], s1[4];  /* the group's int32 sums */
    for (int q = 0; q < G / (8 * span); q++) {
      __m256i c0[4], c1[4];
      for (int m = 0; m < R; m++) { c0[m] = _mm256_setzero_si256(); c1[m] = _mm256_setzero_si256(); }
      for (int o = 0; o < span; o++, p += 64) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)p), v1 = _mm256_loadu_si256((const __m256i*)(p + 32));
        __m256i lo0 = _mm256_and_si256(v0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
        __m256i lo1 = _mm256_and_si256(v1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
        if (P) {
          HIGH16(P, e, lo0, hi0, lo1, hi1);
          e += 16 * P;
        }
        for (int m = 0; m < R; m++) {
          const int8_t* cq = xq + m * K + g * G + 8 * span * q + 8 * o;
          const __m256i b0 = bcast4(cq), b1 = bcast4(cq + 4);
          c0[m] = dot2(c0[m], lo0, b0, hi0, b1);
          c1[m] = dot2(c1[m], lo1, b0, hi1, b1);
        }
      }
      for (int m = 0; m < R; m++) {
        const __m256i t0 = _mm256_madd_epi16(c0[m], ones), t1 = _mm256_madd_epi16(c1[m], ones);
        s0[m] = q == 0 ? t0 : _mm256_add_epi32(s0[m], t0);
        s1[m] = q == 0 ? t1 : _mm256_add_epi32(s1[m], t1);
      }
    }
    const float o = OFFSET(P);
    const __m256 sc0 = bf8(sp), sc1 = bf8(sp + 8), off0 = group_off(sp, zs, o), off1 = group_off(sp + 8, zs, o);
    for (int m = 0; m < R; m++) {
      const float step = dx[m * ng + g], sum = xs[m * ng + g];
      _mm256_store_ps(acc[m], group_end_sc(_mm256_load_ps(acc[m]), s0[m], _mm256_setzero_si256(), sc0, off0, step, sum));
      _mm256_store_ps(acc[m] + 8, group_end_sc(_mm256_load_ps(acc[m] + 8), s1[m], _mm256_setzero_si256(), sc1, off1, step, sum));
    }
  }
  for (int m = 0; m < R; m++)
    for (int d = 0; d < 16; d++) y[m * ldy + b * 16 + d] = tobf(acc[m][d]);
}

/* With the activations in one level and groups of GG (16, 32, 64 or 128): both halves in one pass
   (many16), the group size and zs constants (HB, PP: NULL and 0 for 4-bit codes, else the planes and
   their count); else the halves apart (block8, groups of 32 a constant). */
#if INT4_FINE
#define MANY16(MM, GG, HB, PP) 0
#else
#define MANY16(MM, GG, HB, PP) (G == GG && (zs == 2 ? (many16(xq, dx, xs, w, HB, PP, sz, y, MM, ldy, K, GG, 2, b), 1) : (many16(xq, dx, xs, w, HB, PP, sz, y, MM, ldy, K, GG, 1, b), 1)))
#endif
""".replace("@PLANE_WORD@", PLANE_WORD).replace("@BF16_AVX2@", BF16_AVX2)

# AVX2 + FMA (CPUs without AVX-512 VNNI, e.g. AMD Zen 1-3): the same arithmetic per output row, a
# 16-row block as two halves of 8 rows. `vpdpbusd` is `vpmaddubsw` (u8 x s8 pairs to int16) then
# `vpmaddwd` by ones (pairs to int32); the high nibbles are shifted down first (16 q in place would
# overflow int16), and the low and high nibbles' pair sums of up to 4 octets are added in int16 (at
# most 4 * 2 * 2 * 15 * 127 = 30480) before one widening to int32. The integer sums are those of the AVX-512 kernel (its high-nibble sums
# are 16 times these, scaled by 1/16 exactly), so every output is bitwise the AVX-512 kernel's.
_KERNELS_AVX2 = r"""
#define ROWS(MM) static void rows##MM(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  if (MANY16(MM, 32, NULL, 0) || MANY16(MM, 64, NULL, 0) || MANY16(MM, 128, NULL, 0)) return; \
  for (int h = 0; h < 2; h++) \
    CALL_G(block8(xq, dx, xs, w, NULL, 0, sz, y, MM, ldy, K, 32, zs, b, h), block8(xq, dx, xs, w, NULL, 0, sz, y, MM, ldy, K, G, zs, b, h)); }
ROWS(2) ROWS(3) ROWS(4)
static void rows1(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, const uint16_t* sz,
                  uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) {
  (void)ldy;
  CALL_G(row16(xq, dx, xs, w, NULL, 0, sz, y, K, 32, zs, b), row16(xq, dx, xs, w, NULL, 0, sz, y, K, G, zs, b));
}

/* One activation row, blocks b and b + 1 (the AVX-512 kernel's pair; here one block after the other). */
static void pair16(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w,
                   const uint16_t* sz, uint16_t* y, int64_t K, int64_t G, int64_t zs, int64_t b) {
  for (int64_t i = b; i < b + 2; i++) CALL_G(row16(xq, dx, xs, w, NULL, 0, sz, y, K, 32, zs, i), row16(xq, dx, xs, w, NULL, 0, sz, y, K, G, zs, i));
}

/* W^T [K, N] bf16 from the layout, as the AVX-512 build's: q * scale + (zero - 8 scale) in fp32, one
   fused multiply-add, rounded to bf16 once (to nearest even). Block b (16 rows); zs (values per group
   and row) a constant at each call: no test per octet. */
static inline __attribute__((always_inline)) void to_bf16_t_block(const uint8_t* w, const uint16_t* sz, uint16_t* out,
                                                                  int64_t N, int64_t K, int64_t G, const int64_t zs, int64_t b) {
  const int64_t ng = K / G, octets = K / 8, gs = 16 * zs;
  const __m256i byte = _mm256_set1_epi32(0xFF), nib = _mm256_set1_epi32(15);
  for (int h = 0; h < 2; h++) {
    const uint8_t* p = w + b * octets * 64 + 32 * h;
    const uint16_t* sp = sz + b * ng * gs + 8 * h;
    for (int64_t o = 0; o < octets; o++, p += 64) {
      const uint16_t* s = sp + ((8 * o) / G) * gs;
      const __m256 sc = bf8(s), off = group_off(s, zs, 8.0f);
      const __m256i v = _mm256_loadu_si256((const __m256i*)p);
      for (int j = 0; j < 4; j++) {
        const __m256i bytes = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j), byte);
        const __m256 f[2] = {_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, nib)), sc, off),
                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), sc, off)};
        for (int q = 0; q < 2; q++) {
          const __m256i r = round_bf16_finite(f[q]);  /* finite scales: finite weights */
          /* 8 words 0..0xFFFF -> 8 bf16: packus per 128-bit lane, then the two lanes' low halves together */
          const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
          _mm_storeu_si128((__m128i*)(out + (8 * o + 4 * q + j) * N + 16 * b + 8 * h), _mm256_castsi256_si128(packed));
        }
      }
    }
  }
}

"""

# 5-bit codes (GGUF's Q5_0, Q5_1 and Q5_K blocks): the int4 layout's nibbles plus one bit plane, OR-ed
# into the nibbles as bit 4 before the same u8 x s8 dot products (codes 0..31: 2 * 31 * 127 fits
# `vpmaddubsw`'s int16 lanes; two octets are summed in int16 before widening, at most 31496):
# w = (q - 16) * scale + zero. 6 bits a weight read with scale and zero in bf16 per group of 32 (5.5
# with the scales only), where int8 rows read 8. AVX2 code, in both builds (not written for AVX-512:
# not measurable on this project's machines so far).
_INT5 = r"""
/* The high bits beside the nibbles: 5-bit codes' plane hb [N/16, K/8, 16] (for octet o of block b,
   byte 4e + j holds in bit 4a + 2h + n the 5th bit of row 8h + 4a + e's column 8o + 4n + j:
   plane_word) or 6-bit codes' 2 high bits hb [N/16, K/8, 32] (HIGH16's crumbs). */

/* hb is never NULL in the 5-bit functions: told to the compiler, so that the block functions' 5-bit
   steps are laid out as constants (two octets per int16 sum, the plane ORs unconditional) as the
   4-bit ones are with NULL (1.3x at 2-16 rows against a run-time test). */
#define HB_SET(hb) do { if (!(hb)) __builtin_unreachable(); } while (0)
/* The row functions of codes with P planes (q5_: 5-bit codes, q6_: 6-bit ones), the group size GC a
   constant where it is GC (32 for GGUF's Q5 blocks, 16 for Q6_K's scales). */
#ifdef HIGH_BLOCK16  /* the AVX-512 build: all 16 rows in one register (hblock16) */
#define HIGH_ROWS1(NAME, PP, GC) static void NAME(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint8_t* hb, const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  HB_SET(hb); \
  if (G == GC) hblock16(xq, dx, xs, w, hb, PP, sz, y, 1, ldy, K, GC, zs, b); else hblock16(xq, dx, xs, w, hb, PP, sz, y, 1, ldy, K, G, zs, b); }
#define HIGH_ROWS(NAME, MM, PP, GC) static void NAME##MM(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint8_t* hb, const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  HB_SET(hb); \
  if (G == GC) hblock16(xq, dx, xs, w, hb, PP, sz, y, MM, ldy, K, GC, zs, b); \
  else hblock16(xq, dx, xs, w, hb, PP, sz, y, MM, ldy, K, G, zs, b); }
#else
#define HIGH_ROWS1(NAME, PP, GC) static void NAME(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint8_t* hb, const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  (void)ldy; \
  HB_SET(hb); \
  if (G == GC) row16(xq, dx, xs, w, hb, PP, sz, y, K, GC, zs, b); else row16(xq, dx, xs, w, hb, PP, sz, y, K, G, zs, b); }
#define HIGH_ROWS(NAME, MM, PP, GC) static void NAME##MM(const int8_t* xq, const float* dx, const float* xs, const uint8_t* w, \
    const uint8_t* hb, const uint16_t* sz, uint16_t* y, int64_t ldy, int64_t K, int64_t G, int64_t zs, int64_t b) { \
  HB_SET(hb); \
  if ((GC != 32 && MANY16(MM, GC, hb, PP)) || MANY16(MM, 32, hb, PP) || MANY16(MM, 64, hb, PP) || MANY16(MM, 128, hb, PP)) return; \
  for (int h = 0; h < 2; h++) { \
    if (G == GC) block8(xq, dx, xs, w, hb, PP, sz, y, MM, ldy, K, GC, zs, b, h); \
    else block8(xq, dx, xs, w, hb, PP, sz, y, MM, ldy, K, G, zs, b, h); } }
#endif
HIGH_ROWS1(q5_rows1, 1, 32) HIGH_ROWS(q5_rows, 2, 1, 32) HIGH_ROWS(q5_rows, 3, 1, 32) HIGH_ROWS(q5_rows, 4, 1, 32)
HIGH_ROWS1(q6_rows1, 2, 16) HIGH_ROWS(q6_rows, 2, 2, 16) HIGH_ROWS(q6_rows, 3, 2, 16) HIGH_ROWS(q6_rows, 4, 2, 16)

/* W^T [K, N] bf16 from the layout of codes with P planes (1: 5-bit, 2: 6-bit; a constant at each
   call): q * scale + (zero - OFFSET(P) scale) in fp32, one fused multiply-add, rounded to bf16 once
   (to nearest even), as the int4 conversion. Block b. */
static inline __attribute__((always_inline)) void high_to_bf16_t_block(const uint8_t* w, const uint8_t* hb, const int P, const uint16_t* sz, uint16_t* out,
                                                                       int64_t N, int64_t K, int64_t G, int64_t zs, int64_t b) {
  const int64_t octets = K / 8, gs = 16 * zs;
  const __m256i byte = _mm256_set1_epi32(0xFF), nib = _mm256_set1_epi32(15);
  for (int h = 0; h < 2; h++) {
    const uint8_t* p = w + b * octets * 64 + 32 * h;
    const uint8_t* e = hb + b * octets * 16 * P;
    const uint16_t* sp = sz + b * (K / G) * gs + 8 * h;
    for (int64_t o = 0; o < octets; o++, p += 64, e += 16 * P) {
      const uint16_t* s = sp + ((8 * o) / G) * gs;
      const __m256 sc = bf8(s), off = group_off(s, zs, OFFSET(P));
      const __m256i v = _mm256_loadu_si256((const __m256i*)p);
      /* the octet's high bits of rows 8h + d in lane d: byte j's bits 4 (lo) and 5 (hi) for 5-bit codes
         (plane_word shifted by 2h), bits 4-5 (lo) and 6-7 (hi) for 6-bit ones (the crumbs, row 8 + d's
         shifted up by 4) */
      const __m256i high = P == 1 ? _mm256_srl_epi32(plane_word(e), _mm_cvtsi32_si128(2 * h))
                           : h == 0 ? _mm256_loadu_si256((const __m256i*)(const void*)e)
                           : _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(const void*)e), 4);
      const __m256i hmask = _mm256_set1_epi32(P == 1 ? 0x10 : 0x30);
      for (int j = 0; j < 4; j++) {
        const __m256i bytes = _mm256_and_si256(_mm256_srli_epi32(v, 8 * j), byte);
        const __m256i c = _mm256_srli_epi32(high, 8 * j);
        const __m256i blo = _mm256_and_si256(c, hmask), bhi = _mm256_and_si256(_mm256_srli_epi32(c, P), hmask);
        const __m256 f[2] = {_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(bytes, nib), blo)), sc, off),
                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(bytes, 4), bhi)), sc, off)};
        for (int q = 0; q < 2; q++) {
          const __m256i r = round_bf16_finite(f[q]);
          const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
          _mm_storeu_si128((__m128i*)(out + (8 * o + 4 * q + j) * N + 16 * b + 8 * h), _mm256_castsi256_si128(packed));
        }
      }
    }
  }
}

/* pangu_int4_to_bf16_t's for codes with `planes` bit planes (1: 5-bit codes, 2: 6-bit) in hb. */
int pangu_int5_to_bf16_t(const uint8_t* w, const uint8_t* hb, const uint16_t* sz, uint16_t* out,
                         int64_t N, int64_t K, int64_t G, int64_t zs, int64_t planes, int64_t threads) {
  if (N % 16 || G % 8 || G < 8 || K % G || zs < 1 || zs > 2 || !hb || planes < 1 || planes > 2) return 1;
  const int64_t nb = N / 16;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && nb >= 2 * threads)
  for (int64_t b = 0; b < nb; b++) {
    if (planes == 2) high_to_bf16_t_block(w, hb, 2, sz, out, N, K, G, zs, b);
    else high_to_bf16_t_block(w, hb, 1, sz, out, N, K, G, zs, b);
  }
  return 0;
}
"""

# What both builds share: the quantization of the activations, the row loops, the experts.
_COMMON = r"""
int pangu_int4_abi(void) { return 6; }
int pangu_int4_levels(void) { return INT4_FINE ? 2 : 1; }  /* int8 levels of the activations */

/* W^T [K, N] bf16 from the layout, block by block (each build's to_bf16_t_block), zs a constant per call. */
int pangu_int4_to_bf16_t(const uint8_t* w, const uint16_t* sz, uint16_t* out,
                         int64_t N, int64_t K, int64_t G, int64_t zs, int64_t threads) {
  if (N % 16 || G % 8 || G < 8 || K % G || zs < 1 || zs > 2) return 1;
  const int64_t nb = N / 16;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && nb >= 2 * threads)
  for (int64_t b = 0; b < nb; b++) {
    if (zs == 2) to_bf16_t_block(w, sz, out, N, K, G, 2, b);
    else to_bf16_t_block(w, sz, out, N, K, G, 1, b);
  }
  return 0;
}

/* ---- The routed experts of one token (decode at batch 1), one call per product kind and layer.
   The arithmetic is pangu_int4_mm's for one row, expert by expert: the same quantization of the
   row, the same blocks, the same rounding of each output to bf16. */

static inline float max8(__m256 v) {  /* the largest lane (lanes hold no NaN) */
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline int32_t add8(__m256i v) {  /* the lanes' sum (int32, wrapping: any order) */
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
@TRANSPOSE8@/* The low byte of each int32 lane (C's (int8_t) of an int32) to 8 consecutive bytes. */
static inline void low_bytes8(int8_t* dst, __m256i v) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i b = _mm256_shuffle_epi8(v, pick);
  const int32_t lo = _mm256_cvtsi256_si32(b), hi = _mm256_extract_epi32(b, 4);
  memcpy(dst, &lo, 4);
  memcpy(dst + 4, &hi, 4);
}

/* Rows m0..m0+mm-1 of x quantized per group into one chunk's buffers (xq [2][MMAX][K], dx and
   xs [MMAX][K/G] each). xs, what the zero point multiplies: with two levels the sum of x, with one
   the sum of its rounding d a (as llama.cpp's Q8_1): the product is then exactly (d a) . w, and the
   rounding's error sum(e w) rather than sum(e (w - zero')), about 2.5x smaller for Q4_1-style
   weights and not shifting a row's outputs along the scales (RESULTS.md, "the one-level rounding's
   sum"). */
static void quant_chunk(const uint16_t* x, int8_t* xq, float* dx, int64_t m0, int mm, int64_t K, int64_t G) {
  /* Eight values a step, each rounded as one value alone would be (the largest magnitude by max,
     which any order gives; nearbyint in the current rounding mode; C's float -> int32 -> int8). The
     one sum whose bits depend on its order, x's sum with two levels, is each group's own left-to-right
     fp32 sum, eight groups side by side (their values transposed into lanes). */
  const int64_t ng = K / G;
  float* xs = dx + MMAX * ng;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const int rn = _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC;  /* nearbyintf's rounding */
  for (int m = 0; m < mm; m++) {
    const uint16_t* xr = x + (m0 + m) * K;
    float* dr = dx + m * ng;
    float* sr = xs + m * ng;  /* each group's 1 / d until the group is quantized */
    for (int64_t g = 0; g < ng; g++) {
      const uint16_t* xg = xr + g * G;
      __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
      for (int64_t k = 0; k < G; k += 8) {
        const __m256 a = _mm256_andnot_ps(sign, bf8(xg + k));
        amax = _mm256_max_ps(a, amax);  /* a > amax ? a : amax: a NaN is passed over here */
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      }
      /* a NaN in the group makes its step NaN (and 1 / d 0): every output of the row is NaN, as
         the product of the dequantized weight gives (its codes would otherwise round as 0 and,
         with one level, the integer sum of a NaN's conversion make a huge finite output) */
      dr[g] = _mm256_movemask_ps(nan) ? __builtin_nanf("") : max8(amax);
    }
    int64_t g = 0;  /* d = amax / 127, 1 / d (0 where d is 0), eight groups a step */
    for (; g + 8 <= ng; g += 8) {
      const __m256 d = _mm256_div_ps(_mm256_loadu_ps(dr + g), _mm256_set1_ps(127.0f));
      const __m256 inv = _mm256_and_ps(_mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_div_ps(_mm256_set1_ps(1.0f), d));
      _mm256_storeu_ps(dr + g, d);
      _mm256_storeu_ps(sr + g, inv);
    }
    for (; g < ng; g++) {
      const float d = dr[g] / 127.0f;
      dr[g] = d;
      sr[g] = d > 0.0f ? 1.0f / d : 0.0f;
    }
    for (g = 0; g < ng; g++) {
      const uint16_t* xg = xr + g * G;
      const __m256 vinv = _mm256_set1_ps(sr[g]);
      __m256i qs = _mm256_setzero_si256();
      int8_t* q = xq + m * K + g * G;
      for (int64_t k = 0; k < G; k += 8) {
        const __m256 v = _mm256_mul_ps(bf8(xg + k), vinv), c = _mm256_round_ps(v, rn);
        const __m256i ci = _mm256_cvttps_epi32(c);
        low_bytes8(q + k, ci);
        qs = _mm256_add_epi32(qs, ci);
#if INT4_FINE
        low_bytes8(q + MMAX * K + k, _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, c), _mm256_set1_ps(254.0f)), rn)));
#endif
      }
#if !INT4_FINE
      sr[g] = dr[g] * (float)add8(qs);
#endif
    }
#if INT4_FINE
    for (int64_t g0 = 0; g0 < ng; g0 += 8) {  /* lane j: group g0 + j's sum, its values in order */
      const int n8 = ng - g0 < 8 ? (int)(ng - g0) : 8;
      __m256 sum = _mm256_setzero_ps();
      for (int64_t k = 0; k < G; k += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; j++) r[j] = j < n8 ? bf8(xr + (g0 + j) * G + k) : _mm256_setzero_ps();
        transpose8(r);
        for (int i = 0; i < 8; i++) sum = _mm256_add_ps(sum, r[i]);
      }
      float t[8];
      _mm256_storeu_ps(t, sum);
      for (int j = 0; j < n8; j++) xs[m * ng + g0 + j] = t[j];
    }
#endif
  }
}

/* The activations' quantization alone, for checking it: rows x [M, K] bf16 (M <= MMAX) -> xq [2][MMAX][K]
   int8 (coarse, fine: fine left unwritten with one level) and dx [2][MMAX][K/G] (steps, then sums).
   Returns 1 for a shape the kernel does not take. */
int pangu_int4_quantize(const uint16_t* x, int8_t* xq, float* dx, int64_t M, int64_t K, int64_t G) {
  if (M < 1 || M > MMAX || G % 8 || G < 8 || K % G) return 1;
  quant_chunk(x, xq, dx, 0, (int)M, K, G);
  return 0;
}

/* One quantized row times the weight: blocks in pairs, the last one alone when their count is odd. */
static void row_product(const int8_t* xq, const float* dx, const uint8_t* w, const uint16_t* sz,
                        uint16_t* y, int64_t N, int64_t K, int64_t G, int64_t zs, int64_t threads) {
  const int64_t nb = N / 16, pairs = nb / 2;
  const float* xs = dx + MMAX * (K / G);
  if (threads > 1 && pairs >= 4 * threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < pairs; i++) pair16(xq, dx, xs, w, sz, y, K, G, zs, 2 * i);
  } else {
    for (int64_t i = 0; i < pairs; i++) pair16(xq, dx, xs, w, sz, y, K, G, zs, 2 * i);
  }
  if (nb % 2) rows1(xq, dx, xs, w, sz, y, N, K, G, zs, nb - 1);
}

/* y [S, N] bf16: row x [K] bf16 times expert ids[j]'s weight, for each of the S selected experts.
   w, sz: all E experts stacked in the layout (zs values per group and row). Returns 3 for an expert
   id out of range. */
int pangu_int4_experts_mm(const uint16_t* x, const int64_t* ids, int64_t S, const uint8_t* w, const uint16_t* sz,
                          uint16_t* y, int64_t E, int64_t N, int64_t K, int64_t G, int64_t zs, int64_t threads) {
  if (N % 16 || G % 8 || G < 8 || K % G || zs < 1 || zs > 2) return 1;
  const int64_t ng = K / G, wstride = (N / 16) * (K / 8) * 64, sstride = (N / 16) * ng * 16 * zs;
  for (int64_t j = 0; j < S; j++) if (ids[j] < 0 || ids[j] >= E) return 3;
  int8_t* xq = (int8_t*)malloc((size_t)(2 * MMAX * K));
  float* dx = (float*)malloc(sizeof(float) * (size_t)(2 * MMAX * ng));
  if (!xq || !dx) { free(xq); free(dx); return 2; }
  quant_chunk(x, xq, dx, 0, 1, K, G);  /* once for all experts: the same row */
  for (int64_t j = 0; j < S; j++)
    row_product(xq, dx, w + ids[j] * wstride, sz + ids[j] * sstride, y + j * N, N, K, G, zs, threads);
  free(xq);
  free(dx);
  return 0;
}

/* The down products of the S selected experts and their weighted sum, as MoEBlock._one_token does
   it: each expert's output [H] rounded to bf16, times its routing weight in the activations' dtype
   (bf16: rounded to bf16; fp32: one fp32 product), summed in fp32 in ascending expert id (the
   first output is the start value, not 0 + it), rounded to the output's dtype.
   h: [S, K] bf16 (row j for expert ids[j]); wts: [S] bf16 or fp32 (out_fp32 says which, and the
   dtype of out [H]). No fused multiply-add: the product and the sum round apart, as in torch. */
__attribute__((optimize("fp-contract=off")))
int pangu_int4_experts_down(const uint16_t* h, const int64_t* ids, const void* wts, int64_t S, const uint8_t* w,
                            const uint16_t* sz, void* out, int64_t out_fp32, int64_t E, int64_t H, int64_t N,
                            int64_t K, int64_t G, int64_t zs, int64_t threads) {
  if (N % 16 || G % 8 || G < 8 || K % G || H > N || S < 1 || S > 256 || zs < 1 || zs > 2) return 1;
  const int64_t ng = K / G, wstride = (N / 16) * (K / 8) * 64, sstride = (N / 16) * ng * 16 * zs;
  int64_t order[256];
  for (int64_t j = 0; j < S; j++) {
    if (ids[j] < 0 || ids[j] >= E) return 3;
    int64_t i = j;  /* stable insertion sort of the slots by expert id */
    while (i > 0 && ids[order[i - 1]] > ids[j]) { order[i] = order[i - 1]; i--; }
    order[i] = j;
  }
  int8_t* xq = (int8_t*)malloc((size_t)(2 * MMAX * K));
  float* dx = (float*)malloc(sizeof(float) * (size_t)(2 * MMAX * ng));
  uint16_t* y = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)N);
  float* acc = (float*)malloc(sizeof(float) * (size_t)H);
  float* p = (float*)malloc(sizeof(float) * (size_t)H);
  if (!xq || !dx || !y || !acc || !p) { free(xq); free(dx); free(y); free(acc); free(p); return 2; }
  for (int64_t t = 0; t < S; t++) {
    const int64_t j = order[t], e = ids[j];
    quant_chunk(h + j * K, xq, dx, 0, 1, K, G);
    row_product(xq, dx, w + e * wstride, sz + e * sstride, y, N, K, G, zs, threads);
    if (out_fp32) {
      const float r = ((const float*)wts)[j];
      for (int64_t d = 0; d < H; d++) p[d] = bf(y[d]) * r;
    } else {
      const float r = bf(((const uint16_t*)wts)[j]);
      for (int64_t d = 0; d < H; d++) p[d] = bf(tobf(bf(y[d]) * r));
    }
    if (t == 0) memcpy(acc, p, sizeof(float) * (size_t)H);
    else for (int64_t d = 0; d < H; d++) acc[d] += p[d];
  }
  if (out_fp32) memcpy(out, acc, sizeof(float) * (size_t)H);
  else for (int64_t d = 0; d < H; d++) ((uint16_t*)out)[d] = tobf(acc[d]);
  free(xq); free(dx); free(y); free(acc); free(p);
  return 0;
}

/* y [M, N] bf16 = x [M, K] bf16 times the weight (sz: zs values per group and row, 1 or 2); returns
   0, or 1 for a shape it does not take. */
/* Rows per tile of the weight when many activation rows are multiplied: the tile's 16-row blocks
   (TILE_BLOCKS x 16 x K/2 bytes, 48 KB at K = 1536) stay in the core's cache while every chunk of
   activation rows runs over them, so the weight is read from memory once per product, not once per
   chunk of MMAX rows. */
#define TILE_BLOCKS 4

/* The product with 4-bit codes (hb NULL, planes 0) or 5- or 6-bit ones (hb the 1 or 2 bit planes:
   _INT5's functions). */
static int weight_mm(const uint16_t* x, const uint8_t* w, const uint8_t* hb, int64_t planes, const uint16_t* sz, uint16_t* y,
                     int64_t M, int64_t N, int64_t K, int64_t G, int64_t zs, int64_t threads) {
  if (M < 1 || N % 16 || G % 8 || G < 8 || K % G || zs < 1 || zs > 2) return 1;
  const int64_t ng = K / G, nb = N / 16, nc = (M + MMAX - 1) / MMAX;
  const int64_t xq_stride = 2 * MMAX * K, dx_stride = 2 * MMAX * ng;  /* one chunk's buffers */
  int8_t* xq = (int8_t*)malloc((size_t)(nc * xq_stride));
  float* dx = (float*)malloc(sizeof(float) * (size_t)(nc * dx_stride));
  if (!xq || !dx) { free(xq); free(dx); return 2; }
#define CHUNK_ROWS(c) ((int)(M - (c) * MMAX < MMAX ? M - (c) * MMAX : MMAX))  /* rows of chunk c */
  /* every row quantized once, chunk by chunk, before the products (chunks apart: the same bits
     however the threads share them) */
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && nc >= 4 * threads)
  for (int64_t c = 0; c < nc; c++)
    quant_chunk(x, xq + c * xq_stride, dx + c * dx_stride, c * MMAX, CHUNK_ROWS(c), K, G);
  if (M == 1 && hb) {  /* decode, 5- or 6-bit codes: block by block */
    const float* xs = dx + MMAX * ng;
    #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && nb >= 8 * threads)
    for (int64_t b = 0; b < nb; b++) {
      if (planes == 2) q6_rows1(xq, dx, xs, w, hb, sz, y, N, K, G, zs, b);
      else q5_rows1(xq, dx, xs, w, hb, sz, y, N, K, G, zs, b);
    }
  } else if (M == 1) {
    row_product(xq, dx, w, sz, y, N, K, G, zs, threads);  /* decode: the experts' one-row product */
  } else {
    /* tiles of the weight outside, the chunks of rows inside: each output is the same block
       function's over the same quantized chunk as one chunk at a time, so the same bits */
    int64_t tb = threads > 1 ? nb / (2 * threads) : TILE_BLOCKS;  /* smaller tiles where the weight is small */
    tb = tb < 1 ? 1 : tb > TILE_BLOCKS ? TILE_BLOCKS : tb;
    const int64_t tiles = (nb + tb - 1) / tb;
    #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && nb >= 4 * threads)
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t b1 = (t + 1) * tb < nb ? (t + 1) * tb : nb;
      for (int64_t c = 0; c < nc; c++) {
        const int rows = CHUNK_ROWS(c);
        void (*f)(const int8_t*, const float*, const float*, const uint8_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t) =
            rows == 1 ? rows1 : rows == 2 ? rows2 : rows == 3 ? rows3 : rows4;
        void (*f5)(const int8_t*, const float*, const float*, const uint8_t*, const uint8_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t) =
            planes == 2 ? (rows == 1 ? q6_rows1 : rows == 2 ? q6_rows2 : rows == 3 ? q6_rows3 : q6_rows4)
                        : (rows == 1 ? q5_rows1 : rows == 2 ? q5_rows2 : rows == 3 ? q5_rows3 : q5_rows4);
        const float* dc = dx + c * dx_stride;
        for (int64_t b = t * tb; b < b1; b++) {
          if (hb) f5(xq + c * xq_stride, dc, dc + MMAX * ng, w, hb, sz, y + c * MMAX * N, N, K, G, zs, b);
          else f(xq + c * xq_stride, dc, dc + MMAX * ng, w, sz, y + c * MMAX * N, N, K, G, zs, b);
        }
      }
    }
  }
#undef CHUNK_ROWS
  free(xq);
  free(dx);
  return 0;
}

int pangu_int4_mm(const uint16_t* x, const uint8_t* w, const uint16_t* sz, uint16_t* y,
                  int64_t M, int64_t N, int64_t K, int64_t G, int64_t zs, int64_t threads) {
  return weight_mm(x, w, NULL, 0, sz, y, M, N, K, G, zs, threads);
}

/* y [M, N] bf16 = x [M, K] bf16 times a weight of 5- or 6-bit codes: the int4 layout w (the low 4
   bits), its `planes` bit planes hb [N/16, K/8, 16 planes] (1: 5-bit codes, w = (q - 16) scale +
   zero; 2: 6-bit, w = (q - 32) scale + zero) and sz; pangu_int4_mm's rows, chunks and tiles. */
int pangu_int5_mm(const uint16_t* x, const uint8_t* w, const uint8_t* hb, const uint16_t* sz, uint16_t* y,
                  int64_t M, int64_t N, int64_t K, int64_t G, int64_t zs, int64_t planes, int64_t threads) {
  if (!hb || planes < 1 || planes > 2) return 1;
  return weight_mm(x, w, hb, planes, sz, y, M, N, K, G, zs, threads);
}
""".replace("@TRANSPOSE8@", TRANSPOSE8)

SOURCE = _HEAD + _AVX2_HELPERS + _KERNELS_AVX512 + _INT5 + _COMMON
SOURCE_AVX2 = _HEAD + _AVX2_HELPERS + _KERNELS_AVX2 + _INT5 + _COMMON

FLAGS = C_FLAGS


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("aten", "off", "0", "none")


def forced() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("own", "vnni", "on", "1")


def has_vnni() -> bool:
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


def activation_levels() -> int:
    """How finely the kernel quantizes a product's activations, per group of the weight: 2 int8
    levels (x ~= d (a + b / 254), about 2^-16 of the group's largest value: finer than bf16) or 1
    (x ~= d a, about 2^-8: llama.cpp's Q8_0 rounding of the activations for its Q4 dot products).
    `PANGU_INFER_INT4_ACTIVATIONS=int8x2` or `=int8` chooses; by default 2 where the CPU has AVX-512
    VNNI (there the kernel streams the weights at the memory's speed either way) and 1 on AVX2-only
    CPUs, where the kernel is bound by its dot products and the second level costs 1.3-1.4x of the
    decode step's int4 time (benchmarks/RESULTS.md, "int4 activations in one int8 level on AVX2")."""
    value = os.environ.get(ACTIVATIONS_ENV, "").strip().lower()
    if value in ("", "auto"):
        return 2 if has_vnni() else 1
    if value in ("int8", "1"):
        return 1
    if value in ("int8x2", "2"):
        return 2
    raise ValueError(f"{ACTIVATIONS_ENV}={value!r}: expected auto, int8 (one level) or int8x2 (two levels)")


def tag() -> str:
    """What this build's measured choices are kept under, beside the machine's key: "" for two
    levels of activations, "_q8" for one (a faster kernel crosses the conversion at other rows)."""
    return "" if activation_levels() == 2 else "_q8"


def isa_source(levels: Optional[int] = None) -> tuple[Optional[str], str]:
    """The kernel's source for this CPU and the library's name: AVX-512 VNNI where the CPU has it,
    else AVX2 with FMA (the same outputs, bitwise, at either level), else (None, ""). `levels`: the
    activations' int8 levels (default: activation_levels())."""
    levels = activation_levels() if levels is None else levels
    flags = cpu_flags()
    if has_vnni():
        source, name = SOURCE, "int4_vnni"
    elif {"avx2", "fma"} <= flags:
        source, name = SOURCE_AVX2, "int4_avx2"
    else:
        return None, ""
    return level_source(source, levels), name + ("" if levels == 2 else "_q8")


def level_source(source: str, levels: int) -> str:
    """A build's source (SOURCE or SOURCE_AVX2) with its activations in `levels` int8 levels (1 or 2)."""
    if levels not in (1, 2):
        raise ValueError(f"int4 kernel: activations in {levels} levels (1 or 2)")
    return source if levels == 2 else "#define INT4_FINE 0\n" + source


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None where it cannot run here (then the aten kernel runs)."""
    if disabled() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    source, name = isa_source()
    if source is None:
        return None
    compiler = c_compiler()
    if not compiler:
        log.info("int4 decode kernel: no C compiler found, using aten's")
        return None
    try:
        return load(source, name, compiler)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("int4 decode kernel not built (%s): using aten's", e)
        return None


def load(source: str, name: str, compiler: str) -> Optional[ctypes.CDLL]:
    """One build of the kernel (SOURCE or SOURCE_AVX2), its functions typed; None for a library of
    another ABI. Raises what build_c_library raises."""
    lib = build_c_library(name, source, compiler, FLAGS)
    if lib.pangu_int4_abi() != 6:
        return None
    lib.pangu_int4_levels.restype = ctypes.c_int
    fn = lib.pangu_int4_mm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    ex = lib.pangu_int4_experts_mm
    ex.restype = ctypes.c_int
    ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6
    down = lib.pangu_int4_experts_down
    down.restype = ctypes.c_int
    down.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8
    lib.pangu_int4_quantize.restype = ctypes.c_int
    lib.pangu_int4_quantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    conv = lib.pangu_int4_to_bf16_t
    conv.restype = ctypes.c_int
    conv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
    fn5 = lib.pangu_int5_mm
    fn5.restype = ctypes.c_int
    fn5.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7
    conv5 = lib.pangu_int5_to_bf16_t
    conv5.restype = ctypes.c_int
    conv5.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
    return lib


def usable(in_features: int, group_size: int) -> bool:
    """Does this machine run the kernel (and is it the faster one here), for weights of this width and group?"""
    return group_size % OCTET == 0 and in_features % group_size == 0 and library() is not None and chosen()


MEASURE_N, MEASURE_K, MEASURE_GROUP, MEASURE_COUNT = 2048, 4096, 64, 8  # 32 MB of int4: beyond the caches


def _best_of_interleaved(runs: dict, passes: int = 5) -> dict[str, float]:
    """Best seconds of each candidate over `passes` interleaved passes, after a warm-up call of each."""
    import time

    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(passes):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure() -> dict[str, float]:
    """Seconds for one-row products over MEASURE_COUNT weights, each kernel (best of interleaved passes)."""
    g = torch.Generator().manual_seed(0)
    n, k, group = MEASURE_N, MEASURE_K, MEASURE_GROUP
    ours, aten = [], []
    for _ in range(MEASURE_COUNT):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // group, generator=g) * 0.01
        zero = torch.rand(n, k // group, generator=g) * 0.01
        ours.append(pack(q, scale, zero))
        aten.append((
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
            torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16),
        ))
        del q
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    runs = {
        "own": lambda: [matmul(x, d, sz, group) for d, sz in ours],
        "aten": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, d, group, sz) for d, sz in aten],
    }
    return _best_of_interleaved(runs)


@functools.lru_cache(maxsize=None)
def chosen() -> bool:
    """Is this package's kernel the one to use here: forced, else measured once per machine."""
    if disabled() or library() is None:
        return False
    if forced():
        return True
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int4pack_mm_for_cpu", "CPU"):
        return True
    return own_kernel_measured_faster("int4_decode_kernel" + tag(), measure, "int4 decode kernel")


FIVE_BIT_ENV = "PANGU_INFER_INT5"
# 96 MB as int8, 72 MB with 5-bit codes: past the last-level cache (at 32 MB as int8 the two measured
# within noise of each other on the 2-core EPYC of RESULTS.md, where one-row products of 150 MB and
# more run 1.45x faster with 5-bit codes); about 1.4 s once per machine
MEASURE5_N, MEASURE5_K, MEASURE5_COUNT = 4096, 4096, 6


SIX_BIT_ENV = "PANGU_INFER_INT6"


def _measure_codes(bits: int) -> dict[str, float]:
    """Seconds for one-row products over MEASURE5_COUNT weights: "own" with `bits`-bit codes (5: pack5's
    groups of 32 with zeros, GGUF's Q5 blocks; 6: pack6's groups of 16, scales only, Q6_K's), "aten"
    the same codes as int8 rows with the product a PackedWeight of int8 runs here (quant/cpu_int8.py's
    kernel where it is chosen, else aten's); best of interleaved passes."""
    from pangu_infer.quant import cpu_int8

    g = torch.Generator().manual_seed(0)
    n, k, group = MEASURE5_N, MEASURE5_K, 32 if bits == 5 else 16
    own, eight = [], []
    for _ in range(MEASURE5_COUNT):
        q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // group, generator=g) * 0.01
        own.append(pack5(q, scale, torch.rand(n, k // group, generator=g) * 0.01) if bits == 5 else pack6(q, scale, None))
        eight.append(((q.to(torch.int8) - (1 << (bits - 1))).contiguous(), (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)))
        del q
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    int8 = cpu_int8.matmul if cpu_int8.usable(k) else torch.ops.aten._weight_int8pack_mm
    runs = {
        "own": lambda: [matmul(x, d, sz, group, hb) for d, hb, sz in own],
        "aten": lambda: [int8(x, d, s) for d, s in eight],
    }
    return _best_of_interleaved(runs)


def measure_five_bit() -> dict[str, float]:
    """_measure_codes for 5-bit codes (what five_bit_chosen measures)."""
    return _measure_codes(5)


def measure_six_bit() -> dict[str, float]:
    """_measure_codes for 6-bit codes (what six_bit_chosen measures)."""
    return _measure_codes(6)


def _codes_chosen(env: str, key: str, measure_name: str, what: str) -> bool:
    """five_bit_chosen / six_bit_chosen: off with env=0 or where the kernel does not run, on with
    env=1, else the measurement (this module's `measure_name`, looked up at the call) made once per
    machine."""
    value = os.environ.get(env, "").strip().lower()
    if value in ("0", "off", "no", "false") or library() is None:
        return False
    if value in ("1", "on", "yes", "true"):
        return True
    return own_kernel_measured_faster(key + tag(), lambda: globals()[measure_name](), what)


@functools.lru_cache(maxsize=None)
def five_bit_chosen() -> bool:
    """Are GGUF's Q5 blocks kept with 5-bit codes here (the int4 layout and a bit plane, matmul5) rather
    than as int8 rows: where the kernel runs and its one-row product beat int8's in a short measurement
    made once per machine (pangu_infer.quant.tuning's cache, key `int5_decode_kernel`);
    `PANGU_INFER_INT5=0` keeps int8 rows, `=1` uses it unmeasured."""
    return _codes_chosen(FIVE_BIT_ENV, "int5_decode_kernel", "measure_five_bit", "5-bit decode kernel (against int8 rows)")


@functools.lru_cache(maxsize=None)
def six_bit_chosen() -> bool:
    """Are GGUF's Q6_K blocks kept with their 6-bit codes here (the int4 layout and the 2 high bits,
    groups of 16) rather than as int8 rows: five_bit_chosen's rule, measured apart (key
    `int6_decode_kernel`); `PANGU_INFER_INT6=0` keeps int8 rows, `=1` uses it unmeasured."""
    return _codes_chosen(SIX_BIT_ENV, "int6_decode_kernel", "measure_six_bit", "6-bit decode kernel (against int8 rows)")


# ------------------------------------------------------------------------------------ layout


class Layout:
    """A weight [N, K] written straight into the kernel's layout (pack's weight and scale-and-zero;
    bits 5 or 6: pack5's or pack6's, with the bit planes `hb`), row by row, by a loader (pangu_infer.quant.transcode's
    Q4Blocks, Q5Blocks and Q6Blocks: a GGUF file's blocks) instead of packed from the portable format. N is
    padded to whole blocks of 16 rows: the padded rows are code 0, scale 0 and zero 0 from the start,
    as pack's caller pads them."""

    def __init__(self, out_features: int, in_features: int, group_size: int, zero_values: int, bits: int = 4):
        if zero_values not in (1, 2) or in_features % group_size or group_size % OCTET or bits not in (4, 5, 6):
            raise ValueError(f"no int{bits} layout for [{out_features}, {in_features}] in groups of {group_size} with {zero_values} values")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.method = f"int{bits}"
        blocks = -(-out_features // ROW_BLOCK)
        self.data = torch.empty(blocks, in_features // OCTET, 64, dtype=torch.uint8)
        self.hb = torch.empty(blocks, in_features // OCTET, 16 * (bits - 4), dtype=torch.uint8) if bits > 4 else None
        self.sz = torch.empty(blocks, in_features // group_size, zero_values, ROW_BLOCK, dtype=torch.bfloat16)
        if out_features % ROW_BLOCK:
            for t in (self.data, self.hb, self.sz):
                if t is not None:
                    t[-1].zero_()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def zero_values(self) -> int:
        return zero_values(self.sz)

    def with_zeros(self) -> "Layout":
        """Room for zeros beside the scales (a piece with zeros after pieces without: theirs are 0)."""
        if self.zero_values == 2:
            return self
        sz = torch.zeros(*self.sz.shape[:-2], 2, ROW_BLOCK, dtype=self.sz.dtype)
        sz[..., :1, :] = self.sz
        self.sz = sz
        return self

    def nbytes(self) -> int:
        return self.data.nbytes + self.sz.nbytes + (0 if self.hb is None else self.hb.nbytes)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 0..15 [N, K] (N a multiple of 16), scale and zero [N, K/G] -> the kernel's layout:
    weight uint8 [N/16, K/8, 64] and scale-and-zero bf16 [N/16, K/G, 2, 16]; zero None (every zero
    0): the scales only, [N/16, K/G, 1, 16]."""
    return pack_codes(q), pack_scales(scale, zero)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """pack's weight half: codes uint8 0..15 [N, K] (N a multiple of 16) -> uint8 [N/16, K/8, 64]."""
    n, k = q.shape
    v = q.view(n // ROW_BLOCK, ROW_BLOCK, k // OCTET, 2, 4)
    data = torch.bitwise_or(v[:, :, :, 0], v[:, :, :, 1] << 4)  # [nb, 16, K/8, 4]
    return data.permute(0, 2, 1, 3).reshape(n // ROW_BLOCK, k // OCTET, 64).contiguous()


def pack_scales(scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """pack's scale-and-zero half: scale and zero [N, K/G] (N a multiple of 16; zero None: the scales
    alone) -> bf16 [N/16, K/G, 2 or 1, 16]."""
    n, ng = scale.shape
    parts = (scale,) if zero is None else (scale, zero)
    sz = torch.stack(parts, 0).to(torch.bfloat16)  # [1 or 2, N, K/G]
    return sz.view(len(parts), n // ROW_BLOCK, ROW_BLOCK, ng).permute(1, 3, 0, 2).contiguous()


def scales_fit(sz: torch.Tensor, lead: tuple) -> bool:
    """Is sz a scale-and-zero layout [*lead, 1 or 2, 16] (lead: its experts, blocks of 16 rows and
    groups): with the zeros stored or the scales alone."""
    return tuple(sz.shape) in ((*lead, 2, ROW_BLOCK), (*lead, 1, ROW_BLOCK))


def zero_values(sz: torch.Tensor) -> int:
    """Values per group and row of a scale-and-zero layout [..., K/G, 1 or 2, 16]: 2 with the zeros
    stored, 1 for the scales alone (every zero 0); what the C functions take as `zs`."""
    return sz.shape[-2]


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """The kernel's weight layout [N/16, K/8, 64] -> codes uint8 [N, K]."""
    nb, octets = data.shape[0], data.shape[1]
    v = data.view(nb, octets, ROW_BLOCK, 4)
    q = torch.stack((v & 15, v >> 4), dim=3)  # [nb, K/8, 16, 2, 4]
    return q.permute(0, 2, 1, 3, 4).reshape(nb * ROW_BLOCK, octets * OCTET)


def pack_plane(high: torch.Tensor) -> torch.Tensor:
    """The 5-bit layout's bit plane: the codes' 5th bits uint8 0/1 [N, K] (N a multiple of 16) ->
    uint8 [N/16, K/8, 16] (_INT5's plane_word: byte 4e + j of octet o holds in bit 4 a + 2 h + n the
    5th bit of row 8h + 4a + e's column 8o + 4n + j, for h, a, n in 0, 1)."""
    n, k = high.shape
    v = high.view(n // ROW_BLOCK, 2, 2, 4, k // OCTET, 2, 4).to(torch.int32)  # [nb, h, a, e, o, n, j]
    v = v.permute(0, 4, 3, 6, 2, 1, 5).reshape(n // ROW_BLOCK, k // OCTET, 4, 4, 8)  # [nb, o, e, j, bit 4a + 2h + n]
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (v * weights).sum(-1).to(torch.uint8).reshape(n // ROW_BLOCK, k // OCTET, 16)


def unpack_plane(hb: torch.Tensor) -> torch.Tensor:
    """pack_plane's inverse: [N/16, K/8, 16] -> the 5th bits uint8 0/1 [N, K]."""
    nb, octets = hb.shape[0], hb.shape[1]
    bits = (hb.reshape(nb, octets, 4, 4, 1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1  # [nb, o, e, j, bit]
    bits = bits.reshape(nb, octets, 4, 4, 2, 2, 2)  # [nb, o, e, j, a, h, n]
    return bits.permute(0, 5, 4, 2, 1, 6, 3).reshape(nb * ROW_BLOCK, octets * OCTET).to(torch.uint8)


def planes(hb: Optional[torch.Tensor]) -> int:
    """Bit planes beside the nibbles in hb [N/16, K/8, 16 P]: 1 for 5-bit codes (pack5), 2 for 6-bit
    ones (pack6); 0 for None (4-bit codes)."""
    return 0 if hb is None else hb.shape[-1] // 16


def pack_crumbs(high: torch.Tensor) -> torch.Tensor:
    """The 6-bit layout's high bits: the codes' 2 high bits uint8 0..3 [N, K] (N a multiple of 16) ->
    uint8 [N/16, K/8, 32] (_INT5's HIGH16: for octet o, byte 4d + j holds in bits 4-5 row d's column
    8o + j, in bits 6-7 row d's column 8o + 4 + j, in bits 0-1 and 2-3 the same of row 8 + d)."""
    n, k = high.shape
    v = high.view(n // ROW_BLOCK, 2, 8, k // OCTET, 2, 4)  # [nb, h, d, o, low/high nibble, j]
    b = (v[:, 0, :, :, 0] << 4) | (v[:, 0, :, :, 1] << 6) | v[:, 1, :, :, 0] | (v[:, 1, :, :, 1] << 2)  # [nb, d, o, j]
    return b.permute(0, 2, 1, 3).reshape(n // ROW_BLOCK, k // OCTET, 32).contiguous()


def unpack_crumbs(hb: torch.Tensor) -> torch.Tensor:
    """pack_crumbs' inverse: [N/16, K/8, 32] -> the 2 high bits uint8 0..3 [N, K]."""
    nb, octets = hb.shape[0], hb.shape[1]
    b = hb.reshape(nb, octets, 8, 4).permute(0, 2, 1, 3)  # [nb, d, o, j]
    rows = [torch.stack(((b >> s) & 3, (b >> (s + 2)) & 3), dim=3) for s in (4, 0)]  # rows d, then 8 + d: [nb, d, o, lh, j]
    return torch.stack(rows, dim=1).reshape(nb * ROW_BLOCK, octets * OCTET)


def unpack_high(hb: torch.Tensor) -> torch.Tensor:
    """The codes' bits above the nibbles (pack5's plane or pack6's crumbs): uint8 [N, K], 0..1 or 0..3."""
    return unpack_crumbs(hb) if planes(hb) == 2 else unpack_plane(hb)


def pack5(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5-bit codes uint8 0..31 [N, K] (N a multiple of 16), scale and zero [N, K/G] (w = (q - 16) scale +
    zero; zero None: every zero 0) -> the 5-bit layout: (weight [N/16, K/8, 64], bit plane [N/16, K/8, 16],
    scale-and-zero [N/16, K/G, 2 or 1, 16])."""
    return pack_codes(q & 15), pack_plane(q >> 4), pack_scales(scale, zero)


def pack6(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6-bit codes uint8 0..63 [N, K] (N a multiple of 16), scale and zero [N, K/G] (w = (q - 32) scale +
    zero; zero None: every zero 0; GGUF's Q6_K: groups of 16, scales only) -> the 6-bit layout: (weight
    [N/16, K/8, 64], the 2 high bits [N/16, K/8, 32] (pack_crumbs), scale-and-zero [N/16, K/G, 2 or 1, 16])."""
    return pack_codes(q & 15), pack_crumbs(q >> 4), pack_scales(scale, zero)


def dequantize_t(data: torch.Tensor, sz: torch.Tensor, group_size: int, hb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W^T [K, N] in bf16 from the kernel's layout (products of many rows convert the weight); hb: the
    bit planes of 5- or 6-bit codes (pack5's or pack6's layout: w = (q - 16) scale + zero, or q - 32),
    else None."""
    q = unpack_codes(data) if hb is None else unpack_codes(data) | (unpack_high(hb) << 4)
    q = q.float()  # [N, K]
    n, k = q.shape
    scale = sz[:, :, 0].permute(0, 2, 1).reshape(n, -1, 1).float()  # [N, K/G, 1]
    # scales only: zeros of 0 in the same formula (the same bits as stored zeros of 0)
    zero = sz[:, :, 1].permute(0, 2, 1).reshape(n, -1, 1).float() if zero_values(sz) == 2 else torch.zeros_like(scale)
    w = torch.addcmul(zero - (8 << planes(hb)) * scale, q.reshape(n, -1, group_size), scale)
    return w.reshape(n, k).to(torch.bfloat16).t()


def to_bf16_t(data: torch.Tensor, sz: torch.Tensor, group_size: int, hb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dequantize_t by the library's C loop (one pass, into a buffer kept per shape and thread),
    where it runs and outside a graph being traced; else dequantize_t. hb as dequantize_t's."""
    if tracing():  # a graph being traced: the traceable formula
        return dequantize_t(data, sz, group_size, hb)
    lib = library()
    n, k = data.shape[0] * ROW_BLOCK, data.shape[1] * OCTET
    if lib is None or not (data.is_contiguous() and sz.is_contiguous() and (hb is None or hb.is_contiguous())):
        return dequantize_t(data, sz, group_size, hb)
    out = scratch(("int4_vnni", n, k), (k, n))
    args = (out.data_ptr(), n, k, group_size, zero_values(sz), torch.get_num_threads())
    if hb is None:
        rc = lib.pangu_int4_to_bf16_t(data.data_ptr(), sz.data_ptr(), *args)
    else:
        rc = lib.pangu_int5_to_bf16_t(data.data_ptr(), hb.data_ptr(), sz.data_ptr(), *args[:-1], planes(hb), args[-1])
    return dequantize_t(data, sz, group_size, hb) if rc else out


# ------------------------------------------------------------------------------------ product


def matmul(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int, hb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] bf16 (contiguous) times the weight -> [M, N] bf16; N is the padded row count. hb: the
    bit planes of a weight of 5- or 6-bit codes (pack5's or pack6's layout), else None."""
    lib = library()
    k = data.shape[1] * OCTET
    kind = f"int{4 + planes(hb)}"
    if (
        lib is None
        or x.dtype != torch.bfloat16
        or x.dim() != 2
        or x.shape[1] != k
        or data.dtype != torch.uint8
        or sz.dtype != torch.bfloat16
        or not (x.is_contiguous() and data.is_contiguous() and sz.is_contiguous())
        or not scales_fit(sz, (data.shape[0], k // group_size))
        or (hb is not None and (hb.dtype != torch.uint8 or tuple(hb.shape) not in ((data.shape[0], data.shape[1], 16), (data.shape[0], data.shape[1], 32)) or not hb.is_contiguous()))
    ):
        plane = "" if hb is None else f", plane {tuple(hb.shape)}"
        raise ValueError(f"{kind} kernel: unexpected operands x {tuple(x.shape)} {x.dtype}, weight {tuple(data.shape)}{plane}, scales {tuple(sz.shape)}")
    return mm_pass(lib, x, data, sz, group_size, hb, torch.get_num_threads())


def mm_pass(lib: ctypes.CDLL, x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int, hb: Optional[torch.Tensor], threads: int) -> torch.Tensor:
    """matmul's kernel call on operands it has checked (or the eager decode step checked once per
    weight: engine/eager_step.py) -> [M, N] bf16; RuntimeError where the kernel refuses them."""
    n, k = data.shape[0] * ROW_BLOCK, data.shape[1] * OCTET
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0]:
        shape = (x.shape[0], n, k, group_size, zero_values(sz), threads)
        if hb is None:
            rc = lib.pangu_int4_mm(x.data_ptr(), data.data_ptr(), sz.data_ptr(), y.data_ptr(), *shape)
        else:
            rc = lib.pangu_int5_mm(x.data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(), *shape[:-1], planes(hb), shape[-1])
        if rc:
            kind = f"int{4 + planes(hb)}"
            raise RuntimeError(f"{kind} kernel refused x {tuple(x.shape)}, weight {tuple(data.shape)}, group {group_size} ({rc})")
    return y


def matmul5(x: torch.Tensor, data: torch.Tensor, hb: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] bf16 (contiguous) times a weight of 5- or 6-bit codes (pack5's or pack6's layout: data,
    bit planes hb, sz) -> [M, N] bf16; N the padded row count."""
    return matmul(x, data, sz, group_size, hb)


# A plain Library registration, not torch.library.custom_op: the latter's wrapping costs a few
# times the kernel itself at small expert widths (RESULTS.md, "int4 decode kernel of our own").
_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("int4_vnni_mm(Tensor x, Tensor data, Tensor sz, int group_size) -> Tensor")


def _int4_vnni_mm(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    return matmul(x.contiguous(), data, sz, group_size)


def _int4_vnni_mm_shape(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], data.shape[0] * ROW_BLOCK, dtype=torch.bfloat16)


_lib.impl("int4_vnni_mm", _int4_vnni_mm, "CPU")
_lib._register_fake("int4_vnni_mm", _int4_vnni_mm_shape)

_lib.define("int5_vnni_mm(Tensor x, Tensor data, Tensor hb, Tensor sz, int group_size) -> Tensor")


def _int5_vnni_mm(x: torch.Tensor, data: torch.Tensor, hb: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    return matmul5(x.contiguous(), data, hb, sz, group_size)


def _int5_vnni_mm_shape(x: torch.Tensor, data: torch.Tensor, hb: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], data.shape[0] * ROW_BLOCK, dtype=torch.bfloat16)


_lib.impl("int5_vnni_mm", _int5_vnni_mm, "CPU")
_lib._register_fake("int5_vnni_mm", _int5_vnni_mm_shape)


# ------------------------------------------------------------------ routed experts of one token

FUSED_ENV = "PANGU_INFER_FUSED_EXPERTS"


def fused_experts_enabled() -> bool:
    """The one-token expert path below, unless PANGU_INFER_FUSED_EXPERTS=off (then per expert)."""
    return os.environ.get(FUSED_ENV, "").strip().lower() not in ("off", "0", "no", "false")


def experts_one_token(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    data13: torch.Tensor, sz13: torch.Tensor, group13: int,
    data2: torch.Tensor, sz2: torch.Tensor, group2: int, inter: int, hidden: int,
) -> torch.Tensor:
    """The routed experts of one token, as MoEBlock._one_token computes them expert by expert:
    sum over the selected experts (ascending id) of weight * down(silu(gate) * up), each expert's
    output rounded to x's dtype, weighted in it, summed in fp32, rounded. Two C calls (all gate/up
    products; all down products with the weighted sum) and the activation between them in torch
    (the same ATen kernel as per expert, so the same bits). The ids are read by the C code: no
    host sync. x [1, H] bf16 or fp32; ids [S] int64; weights [S] in x's dtype; data13/sz13 and
    data2/sz2 the stacked experts' layouts ([E, ...]), each with its zeros or scales only."""
    lib = library()
    s, e = ids.numel(), data13.shape[0]
    n13, k13 = data13.shape[1] * ROW_BLOCK, data13.shape[2] * OCTET
    n2, k2 = data2.shape[1] * ROW_BLOCK, data2.shape[2] * OCTET
    if (
        lib is None or x.dtype not in (torch.bfloat16, torch.float32) or x.numel() != k13 or weights.dtype != x.dtype
        or ids.dtype != torch.long or weights.numel() != s or k2 != inter or 2 * inter > n13 or hidden > n2
        or data2.shape[0] != e or not all(t.is_contiguous() for t in (data13, sz13, data2, sz2))
        or not scales_fit(sz13, (e, n13 // ROW_BLOCK, k13 // group13)) or not scales_fit(sz2, (e, n2 // ROW_BLOCK, k2 // group2))
    ):
        raise ValueError(f"int4 experts: unexpected operands x {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)}, weights {weights.dtype}")
    threads = torch.get_num_threads()
    ids = ids.reshape(-1).contiguous()
    xk = x.reshape(1, k13).to(torch.bfloat16).contiguous()
    gu = torch.empty(s, n13, dtype=torch.bfloat16)
    rc = lib.pangu_int4_experts_mm(
        xk.data_ptr(), ids.data_ptr(), s, data13.data_ptr(), sz13.data_ptr(), gu.data_ptr(), e, n13, k13, group13, zero_values(sz13), threads
    )
    if rc:
        raise RuntimeError(f"int4 experts kernel refused the gate/up products ({rc})")
    gu = gu[:, : 2 * inter].to(x.dtype)
    h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(torch.bfloat16).contiguous()
    out = torch.empty(1, hidden, dtype=x.dtype)
    w = weights.reshape(-1).contiguous()
    rc = lib.pangu_int4_experts_down(
        h.data_ptr(), ids.data_ptr(), w.data_ptr(), s, data2.data_ptr(), sz2.data_ptr(), out.data_ptr(),
        int(x.dtype == torch.float32), e, hidden, n2, inter, group2, zero_values(sz2), threads,
    )
    if rc:
        raise RuntimeError(f"int4 experts kernel refused the down products ({rc})")
    return out


_lib.define(
    "int4_vnni_experts(Tensor x, Tensor ids, Tensor weights, Tensor data13, Tensor sz13, int group13, "
    "Tensor data2, Tensor sz2, int group2, int inter, int hidden) -> Tensor"
)


def _int4_vnni_experts_shape(x, ids, weights, data13, sz13, group13, data2, sz2, group2, inter, hidden):
    return x.new_empty(1, hidden)


_lib.impl("int4_vnni_experts", experts_one_token, "CPU")
_lib._register_fake("int4_vnni_experts", _int4_vnni_experts_shape)


def experts(x, ids, weights, data13, sz13, group13, data2, sz2, group2, inter, hidden) -> torch.Tensor:
    """experts_one_token as the caller's context wants it: the custom op while compiling, else direct."""
    if tracing():
        return torch.ops.pangu_infer.int4_vnni_experts(x, ids, weights, data13, sz13, group13, data2, sz2, group2, inter, hidden)
    return experts_one_token(x, ids, weights, data13, sz13, group13, data2, sz2, group2, inter, hidden)


# ------------------------------------------------------------- the product as a C++ operator


def native_op() -> bool:
    """Point `pangu_infer::int4_native_mm` (pangu_infer.native_ops: the product registered from
    C++, so that a compiled graph calls the kernel without Python in between) at this library's
    kernel; True when compiled graphs call it from now on. False where the kernel does not run
    here, PANGU_INFER_NATIVE_OPS=0, or the operators' build failed (logged; the Python operator
    runs as before). Meant for the background compile, before the decode step is traced."""
    int4 = native_ops.connect("int4", library, "pangu_int4_mm", "int4_native_mm", _int4_vnni_mm_shape)
    return native_ops.connect("int5", library, "pangu_int5_mm", "int5_native_mm", _int5_vnni_mm_shape) and int4


def product(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The product as the caller's context wants it: while compiling the C++ operator where it is
    connected (native_op), else the Python custom op; eagerly the C function directly."""
    if tracing():
        if native_ops.connected("int4"):
            return torch.ops.pangu_infer.int4_native_mm(x, data, sz, group_size)
        return torch.ops.pangu_infer.int4_vnni_mm(x, data, sz, group_size)
    return matmul(x.contiguous(), data, sz, group_size)


def product5(x: torch.Tensor, data: torch.Tensor, hb: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """product's 5-bit form (matmul5): the C++ operator while compiling where connected, else the
    Python custom op; eagerly the C function directly."""
    if tracing():
        if native_ops.connected("int5"):
            return torch.ops.pangu_infer.int5_native_mm(x, data, hb, sz, group_size)
        return torch.ops.pangu_infer.int5_vnni_mm(x, data, hb, sz, group_size)
    return matmul5(x.contiguous(), data, hb, sz, group_size)


__all__ = ["ACTIVATIONS_ENV", "ENV", "FIVE_BIT_ENV", "FUSED_ENV", "SIX_BIT_ENV", "five_bit_chosen", "measure_five_bit", "measure_six_bit", "six_bit_chosen", "activation_levels", "has_vnni", "level_source", "tag", "chosen", "dequantize_t", "disabled", "experts", "experts_one_token", "fused_experts_enabled", "forced", "library", "measure", "matmul", "matmul5", "native_op", "pack", "pack5", "pack6", "planes", "pack_codes", "pack_crumbs", "pack_plane", "pack_scales", "product", "product5", "scales_fit", "to_bf16_t", "unpack_codes", "unpack_crumbs", "unpack_high", "unpack_plane", "usable", "zero_values"]
