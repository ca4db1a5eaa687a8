"""Load-time conversion of GGUF blocks in one C pass each: Q4_0 / Q4_1 / Q4_K blocks straight into
pangu_infer.quant.cpu_int4's kernel layout and Q5_0 / Q5_1 / Q5_K ones into its 5-bit form
(`to_layout`, what `Q4Blocks` / `Q5Blocks` hand the load hook: any destination row, rows reordered), or into the portable int4 format (packed pairs, scale and zero
per group of 32) and the portable format into the kernel's layout (into a new tensor, or over the
pairs' own storage); Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks dequantized to float32, or straight to int8 rows with one
scale each (`dequantize_int8`: formats._quantize_int8's numbers, no float copy).

Why: these are shuffles of nibbles and conversions of f16 scales, but written as numpy / torch
operations each took several passes over temporaries of one to four bytes per weight. A first load
of a Q4_0 GGUF of openPangu-Embedded-7B's widths (4.7 GB) converted in 45.5 s on a 2-core Zen 3, 11 s
with these passes (benchmarks/RESULTS.md, "First load of the 7B Q4_0 file"); its Q4_K_M sibling 40.9
-> 15.7 s. They read and write each byte once, on torch's threads (OpenMP). Writing Q4 blocks straight
into the layout (the pieces of fused weights in their rows) and Q6_K straight to int8 took the 7B's
11 s to about 4 s (benchmarks/RESULTS.md, "stop 47").

Every pass gives the same bytes as the Python it replaces (tests/test_transcode.py compares them
bit for bit, every f16 value included; the dequantized values are gguf's own); where no C compiler
is found, the build fails, or `PANGU_INFER_TRANSCODE=0`, the Python runs instead. The library is
plain C (no intrinsics), built once per machine into the kernels' cache folder like the others, with
`-ffp-contract=off` (each product rounded as numpy rounds it).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import numpy as np
import torch

from pangu_infer.native import C_FLAGS, kernel_library

ENV = "PANGU_INFER_TRANSCODE"

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

int pangu_transcode_abi(void) { return 9; }

/* IEEE half -> float, every value exact (subnormals, infinities, NaN payloads as numpy's astype). */
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  /* subnormal: man * 2^-24, normalized */
    uint32_t e = 113u;
    while (!(man & 0x400u)) { man <<= 1; e--; }
    bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* n code bytes whose low nibbles are columns 0 .. n - 1 and high nibbles columns n .. 2n - 1 (a Q4_0 /
   Q4_1 block's 16 bytes, a Q4_K chunk's 32) -> n bytes of packed pairs, column 2i in the high nibble
   of byte i, 2i + 1 in the low. */
static inline void nibble_pairs(const uint8_t* q, int n, uint8_t* out) {
  for (int j = 0; j < n / 2; j++) {
    out[j] = (uint8_t)(((q[2 * j] & 15) << 4) | (q[2 * j + 1] & 15));
    out[n / 2 + j] = (uint8_t)((q[2 * j] & 0xf0) | (q[2 * j + 1] >> 4));
  }
}

/* rows x blocks of Q4_0 (head 2: f16 d, then 16 bytes of codes) or Q4_1 (head 4: f16 d, f16 m): the
   packed pairs [rows, 16 * blocks] (byte i: column 2i in the high nibble, 2i + 1 in the low; in a
   block, columns 0-15 are the low nibbles of its 16 code bytes, 16-31 the high ones), the scale d and
   the zero (0 for Q4_0, m + 8 d for Q4_1) as float [rows, blocks]. */
int pangu_q4_to_pairs(const uint8_t* src, int64_t rows, int64_t blocks, int64_t head, uint8_t* packed, float* scale, float* zero, int64_t threads) {
  const int64_t stride = head + 16, total = rows * blocks;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t i = 0; i < total; i++) {
    const uint8_t* blk = src + i * stride;
    const uint8_t* qs = blk + head;
    uint8_t* out = packed + i * 16;
    uint16_t dh;
    memcpy(&dh, blk, 2);
    const float d = f16_to_f32(dh);
    scale[i] = d;
    if (head == 4) {
      uint16_t mh;
      memcpy(&mh, blk + 2, 2);
      zero[i] = f16_to_f32(mh) + 8.0f * d;
    } else {
      zero[i] = 0.0f;
    }
    nibble_pairs(qs, 16, out);
  }
  return 0;
}

/* A Q4_K / Q5_K block's sub-block j (0..7): its scale d sc_j and min dmin m_j (f16 d and dmin, then
   12 bytes of 6-bit scales and mins: GGML's packing), each product rounded once, as gguf's numpy. */
static inline void k_scale_min(const uint8_t* blk, int j, float* ds, float* dm) {
  const uint8_t* sc = blk + 4;
  uint16_t dh, mh;
  memcpy(&dh, blk, 2);
  memcpy(&mh, blk + 2, 2);
  const int s = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
  const int m = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  *ds = f16_to_f32(dh) * (float)s;
  *dm = f16_to_f32(mh) * (float)m;
}

/* rows x blocks of Q4_K (256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes
   of codes) -> packed pairs [rows, 128 * blocks] and, per sub-block of 32, the scale d sc and the zero
   8 (d sc) - dmin m as float [rows, 8 * blocks]. Sub-blocks 2i and 2i + 1 are the low and high
   nibbles of code bytes 32i .. 32i + 31. */
int pangu_q4k_to_pairs(const uint8_t* src, int64_t rows, int64_t blocks, uint8_t* packed, float* scale, float* zero, int64_t threads) {
  const int64_t total = rows * blocks;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t i = 0; i < total; i++) {
    const uint8_t* blk = src + i * 144;
    const uint8_t* qs = blk + 16;
    uint8_t* out = packed + i * 128;
    for (int j = 0; j < 8; j++) {
      float ds, dm;
      k_scale_min(blk, j, &ds, &dm);
      scale[i * 8 + j] = ds;
      zero[i * 8 + j] = 8.0f * ds - dm;
    }
    for (int c = 0; c < 4; c++) nibble_pairs(qs + 32 * c, 32, out + 32 * c);
  }
  return 0;
}

/* float -> bf16 bits as torch rounds it (nearest, ties to even; every NaN -> 0x7fc0). */
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}

/* The int4 layout's 4 bytes of one row for 8 columns (byte j: column j low, j + 4 high) from 8 code
   bytes lo, hi whose `shift` nibbles (0: low, 4: high) hold columns 0-3 and 4-7. */
static inline uint32_t octet(const uint8_t* lo, const uint8_t* hi, int shift) {
  uint32_t a, b;
  memcpy(&a, lo, 4);
  memcpy(&b, hi, 4);
  return shift ? ((a >> 4) & 0x0f0f0f0fu) | (b & 0xf0f0f0f0u) : (a & 0x0f0f0f0fu) | ((b & 0x0f0f0f0fu) << 4);
}

/* Q4_0 / Q4_1 (type 2 / 3: blocks of 32) or Q4_K (type 12: blocks of 256, sub-blocks of 32) rows (`n` of
   them, K = 32 * groups columns) straight into the int4 kernel's layout of a weight
   (pangu_infer.quant.cpu_int4.pack): destination rows row0 .. row0 + n - 1 of data uint8 [*, K/8, 64]
   (16 rows a block: for each 8 columns o, 16 rows x 4 bytes, byte j holding column 8o + j in the low
   nibble and 8o + 4 + j in the high one) and of sz bf16 [*, K/32, zs, 16] (scale, then zero where zs
   is 2; zs 1: the scales alone). Destination row row0 + i comes from source row order[i] (order NULL:
   row i), at src + order[i] * row_bytes. Scales and zeros as q4_to_pairs / q4k_to_pairs compute them,
   rounded to bf16 as torch rounds; the same bytes as those, then pairs_to_octets and
   cpu_int4.pack_scales (tests/test_transcode.py). Each block of 16 rows is written group by group,
   each 64-byte line whole.
   Q5_0 / Q5_1 (type 6 / 7) or Q5_K (type 13) rows the same way into cpu_int4's 5-bit layout (pack5):
   the codes' low 4 bits in data's nibbles, their 5th bits in the plane hb uint8 [*, K/8, 16]
   (cpu_int4.pack_plane: byte 4e + j of octet o holds in bit 4a + 2h + n row 8h + 4a + e's column
   8o + 4n + j; the bits of a block's rows outside this call are kept), w = (q - 16) scale + zero: Q5_0 d and 0, Q5_1 d
   and m + 16 d, Q5_K d sc_j and 16 d sc_j - dmin m_j. hb: NULL for the Q4 types. */
/* pangu_blocks_to_layout's block b; five (5-bit codes) a constant at each call, so that the Q4 types'
   pass compiles without the plane's steps (it runs at the speed of the Q4-only pass it replaced:
   13 ms for the 7B's ffn_gate either way, in alternating order). */
static inline __attribute__((always_inline)) void layout_block(const uint8_t* src, int64_t row_bytes, int64_t n, int64_t groups, int64_t type, const int64_t* order,
                                                                int64_t row0, uint8_t* data, uint8_t* hb, uint16_t* sz, int64_t zs, int64_t b, const int five) {
  const int kq = type == 12 || type == 13;  /* K-quant blocks of 256 */
  const int64_t k = groups * 32, head = type == 3 || type == 7 ? 4 : 2;  /* f16 d (and m) before a 32-block's codes */
  const float offset = five ? 16.0f : 8.0f;  /* the codes' middle, in the zero: w = (q - offset) scale + zero */
  const uint8_t* rows[16];
  uint8_t mine[16];  /* plane bytes' bits of this call's rows: bits 4a + 2h, 4a + 2h + 1 of byte 4e + j are row 8h + 4a + e's */
  memset(mine, 0, sizeof mine);
  for (int64_t s = 0; s < 16; s++) {
    const int64_t i = b * 16 + s - row0;
    rows[s] = (i < 0 || i >= n) ? NULL : src + (order ? order[i] : i) * row_bytes;
    if (five && rows[s]) for (int j = 0; j < 4; j++) mine[4 * (s % 4) + j] |= (uint8_t)(3u << (4 * ((s % 8) / 4) + 2 * (s / 8)));
  }
  uint8_t* dblk = data + b * (k / 8) * 64;
  uint16_t* sblk = sz + b * groups * zs * 16;
  for (int64_t g = 0; g < groups; g++) {
    uint8_t* line = dblk + g * 4 * 64;
    uint8_t plane[4][16];
    if (five) memset(plane, 0, sizeof plane);
    uint16_t* sg = sblk + g * zs * 16;
    for (int64_t s = 0; s < 16; s++) {
      const uint8_t* row = rows[s];
      if (!row) continue;
      float d, z;
      uint32_t high = 0;  /* 5-bit codes: bit e is the 5th bit of the group's column e */
      if (kq) {
        const uint8_t* blk = row + (g / 8) * (five ? 176 : 144);
        const int j = (int)(g % 8);
        float ds, dm;
        k_scale_min(blk, j, &ds, &dm);
        d = ds;
        z = offset * ds - dm;
        const uint8_t* q = blk + (five ? 48 : 16) + 32 * (j / 2);  /* 32 code bytes: this sub-block in their low (j even) or high nibbles */
        const int shift = (j & 1) * 4;
        if (five) for (int e = 0; e < 32; e++) high |= (uint32_t)((blk[16 + e] >> j) & 1) << e;  /* Q5_K: 32 bytes of 5th bits */
        for (int t = 0; t < 4; t++) {
          const uint32_t w = octet(q + 8 * t, q + 8 * t + 4, shift);
          memcpy(line + t * 64 + s * 4, &w, 4);
        }
      } else {
        const uint8_t* blk = row + g * (head + (five ? 20 : 16));
        uint16_t dh, mh;
        memcpy(&dh, blk, 2);
        d = f16_to_f32(dh);
        if (head == 4) {
          memcpy(&mh, blk + 2, 2);
          z = f16_to_f32(mh) + offset * d;
        } else {
          z = 0.0f;
        }
        if (five) memcpy(&high, blk + head, 4);  /* Q5_0 / Q5_1: a 32-bit word of 5th bits */
        const uint8_t* q = blk + head + (five ? 4 : 0);  /* 16 code bytes: columns 0-15 in their low nibbles, 16-31 in the high */
        for (int t = 0; t < 4; t++) {
          const uint32_t w = octet(q + 8 * (t & 1), q + 8 * (t & 1) + 4, (t >> 1) * 4);
          memcpy(line + t * 64 + s * 4, &w, 4);
        }
      }
      if (five) {  /* row s = 8h + 4a + e: byte 4e + j, bit 4a + 2h (column 8t + j) and the next (8t + 4 + j) */
        const int e = (int)(s % 4), at = (int)(4 * ((s % 8) / 4) + 2 * (s / 8));
        for (int t = 0; t < 4; t++)
          for (int j = 0; j < 4; j++)
            plane[t][4 * e + j] |= (uint8_t)((((high >> (8 * t + j)) & 1u) << at) | (((high >> (8 * t + 4 + j)) & 1u) << (at + 1)));
      }
      sg[s] = f32_to_bf16(d);
      if (zs == 2) sg[16 + s] = f32_to_bf16(z);
    }
    if (five)
      for (int t = 0; t < 4; t++) {
        uint8_t* out = hb + (b * (k / 8) + g * 4 + t) * 16;
        for (int i = 0; i < 16; i++) out[i] = (uint8_t)((out[i] & ~mine[i]) | plane[t][i]);
      }
  }
}

/* Q6_K (type 14: blocks of 256 weights, 16 sub-blocks of 16 with int8 scales, w = d sc_j (q - 32))
   rows the same way into cpu_int4's 6-bit layout (pack6): groups of 16 (`groups` is K/16 here),
   scale d sc_j, zero 0 (zs 1: the scales alone; zs 2: zeros of 0 stored); the codes' low 4 bits in
   data's nibbles, their 2 high bits in hb uint8 [*, K/8, 32] (cpu_int4.pack_crumbs: for octet o,
   byte 4d + j holds in bits 4-5 row d's column 8o + j, in bits 6-7 row d's column 8o + 4 + j, in
   bits 0-1 and 2-3 the same of row 8 + d; the bits of a block's rows outside this call kept).
   Block b. */
static void q6k_layout_block(const uint8_t* src, int64_t row_bytes, int64_t n, int64_t groups, const int64_t* order,
                             int64_t row0, uint8_t* data, uint8_t* hb, uint16_t* sz, int64_t zs, int64_t b) {
  const int64_t octets = groups * 2;
  const uint8_t* rows[16];
  uint8_t mine[8];  /* the bits of byte 4d + j that this call's rows own: 0xF0 for row d, 0x0F for row 8 + d */
  memset(mine, 0, sizeof mine);
  for (int64_t s = 0; s < 16; s++) {
    const int64_t i = b * 16 + s - row0;
    rows[s] = (i < 0 || i >= n) ? NULL : src + (order ? order[i] : i) * row_bytes;
    if (rows[s]) mine[s % 8] |= (uint8_t)(s < 8 ? 0xF0 : 0x0F);
  }
  uint8_t* dblk = data + b * octets * 64;
  uint16_t* sblk = sz + b * groups * zs * 16;
  for (int64_t g = 0; g < groups; g++) {
    uint8_t crumbs[2][32];  /* the group's two octets' high bits */
    memset(crumbs, 0, sizeof crumbs);
    uint16_t* sg = sblk + g * zs * 16;
    const int sub = (int)(g % 16);  /* sub-block of the block: values 16 sub .. 16 sub + 15 */
    const int c = sub / 8, u = (sub % 8) / 2, j0 = 16 * (sub % 2);
    for (int64_t s = 0; s < 16; s++) {
      const uint8_t* row = rows[s];
      if (!row) continue;
      const uint8_t* blk = row + (g / 16) * 210;
      /* value e = 128 c + 32 u + j: low 4 bits from ql[64 c + 32 (u & 1) + j] (u >> 1: which nibble),
         high 2 from qh[32 c + j] (bits 2u, 2u + 1), as dequantize_row reads them */
      const uint8_t* l = blk + 64 * c + 32 * (u & 1) + j0;
      const uint8_t* h = blk + 128 + 32 * c + j0;
      const int ls = 4 * (u >> 1), hs = 2 * u;
      uint8_t code[16];
      for (int e = 0; e < 16; e++) code[e] = (uint8_t)(((l[e] >> ls) & 15) | (((h[e] >> hs) & 3) << 4));
      const int d = (int)(s % 8), at = s < 8 ? 4 : 0;  /* row d: bits 4-7; row 8 + d: bits 0-3 */
      for (int t = 0; t < 2; t++) {
        uint8_t w[4];
        for (int j = 0; j < 4; j++) {
          const uint8_t lo = code[8 * t + j], hi = code[8 * t + 4 + j];
          w[j] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
          crumbs[t][4 * d + j] |= (uint8_t)(((lo >> 4) | ((hi >> 4) << 2)) << at);
        }
        memcpy(dblk + (2 * g + t) * 64 + s * 4, w, 4);
      }
      uint16_t dh;
      memcpy(&dh, blk + 208, 2);
      sg[s] = f32_to_bf16(f16_to_f32(dh) * (float)(int8_t)blk[192 + sub]);
      if (zs == 2) sg[16 + s] = 0;
    }
    for (int t = 0; t < 2; t++) {
      uint8_t* out = hb + (b * octets + 2 * g + t) * 32;
      for (int i = 0; i < 32; i++) out[i] = (uint8_t)((out[i] & ~mine[i / 4]) | crumbs[t][i]);
    }
  }
}

int pangu_blocks_to_layout(const uint8_t* src, int64_t row_bytes, int64_t n, int64_t groups, int64_t type, const int64_t* order, int64_t row0, uint8_t* data, uint8_t* hb, uint16_t* sz, int64_t zs, int64_t threads) {
  if (n == 0) return 0;
  const int five = type == 6 || type == 7 || type == 13, six = type == 14;
  if ((type != 2 && type != 3 && type != 12 && !five && !six) || ((type == 12 || type == 13) && groups % 8) || (six && groups % 16) ||
      (zs != 1 && zs != 2) || n < 0 || !(five || six) != !hb) return 1;
  const int64_t first = row0 / 16, last = (row0 + n - 1) / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads((int)threads)
  for (int64_t b = first; b <= last; b++) {
    if (six) q6k_layout_block(src, row_bytes, n, groups, order, row0, data, hb, sz, zs, b);
    else if (five) layout_block(src, row_bytes, n, groups, type, order, row0, data, hb, sz, zs, b, 1);
    else layout_block(src, row_bytes, n, groups, type, order, row0, data, hb, sz, zs, b, 0);
  }
  return 0;
}

/* Weights and bytes per block of the types dequantize_row takes (GGML's numbers: 6 Q5_0, 7 Q5_1, 8 Q8_0,
   12 Q4_K, 13 Q5_K, 14 Q6_K); 0 for any other type. */
static int64_t block_weights(int64_t type) { return type == 6 || type == 7 || type == 8 ? 32 : type >= 12 && type <= 14 ? 256 : 0; }
static int64_t block_bytes(int64_t type) {
  switch (type) {
    case 6: return 22;
    case 7: return 24;
    case 8: return 34;
    case 12: return 144;
    case 13: return 176;
    case 14: return 210;
    default: return 0;
  }
}

/* One row of `blocks` blocks of a type block_weights takes dequantized into out[K], each value as gguf's
   numpy dequantizer computes it: Q5_0 d (q - 16), Q5_1 d q + m (q: 4 low bits | a bit of the block's
   32-bit qh << 4); Q8_0 x d; Q4_K / Q5_K (d sc_j) q - (dmin m_j) per sub-block j of 32 (Q5_K: the
   5th bit of value i of sub-block j is bit j of qh[i]); Q6_K (d sc) q with q = low | high << 4
   minus 32. */
static void dequantize_row(const uint8_t* row, int64_t blocks, int64_t type, float* out) {
  for (int64_t i = 0; i < blocks; i++) {
    uint16_t dh;
    if (type == 6 || type == 7) {
      const uint8_t* blk = row + i * block_bytes(type);
      const int64_t at = type == 6 ? 2 : 4;
      uint32_t qh;
      memcpy(&dh, blk, 2);
      memcpy(&qh, blk + at, 4);
      const uint8_t* qs = blk + at + 4;
      const float d = f16_to_f32(dh);
      float m = 0.0f;
      if (type == 7) {
        uint16_t mh;
        memcpy(&mh, blk + 2, 2);
        m = f16_to_f32(mh);
      }
      float* o = out + i * 32;
      for (int j = 0; j < 32; j++) {
        const int q = ((j < 16 ? qs[j] : qs[j - 16] >> 4) & 15) | (int)(((qh >> j) & 1u) << 4);
        o[j] = type == 6 ? d * (float)(q - 16) : d * (float)q + m;
      }
    } else if (type == 12 || type == 13) {
      const int64_t size = block_bytes(type);
      const uint8_t* blk = row + i * size;
      const uint8_t* qh = blk + 16;  /* Q5_K: 32 bytes of 5th bits before the codes */
      const uint8_t* qs = blk + (type == 13 ? 48 : 16);
      for (int j = 0; j < 8; j++) {
        float ds, dm;
        k_scale_min(blk, j, &ds, &dm);
        const uint8_t* q = qs + 32 * (j / 2);
        const int shift = (j & 1) * 4;
        float* o = out + i * 256 + j * 32;
        if (type == 13) {
          for (int e = 0; e < 32; e++) o[e] = ds * (float)(((q[e] >> shift) & 15) | (((qh[e] >> j) & 1) << 4)) - dm;
        } else {
          for (int e = 0; e < 32; e++) o[e] = ds * (float)((q[e] >> shift) & 15) - dm;
        }
      }
    } else if (type == 8) {
      const uint8_t* blk = row + i * 34;
      memcpy(&dh, blk, 2);
      const float d = f16_to_f32(dh);
      const int8_t* x = (const int8_t*)(blk + 2);
      float* o = out + i * 32;
      for (int j = 0; j < 32; j++) o[j] = (float)x[j] * d;
    } else {
      const uint8_t* blk = row + i * 210;
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const int8_t* sc = (const int8_t*)(blk + 192);
      memcpy(&dh, blk + 208, 2);
      const float d = f16_to_f32(dh);
      float* o = out + i * 256;
      /* value e = 128 c + 32 u + j: low 4 bits from ql[64 c + 32 (u & 1) + j] (u >> 1: which nibble),
         high 2 from qh[32 c + j] (bits 2u, 2u + 1), scale sc[e / 16] (runs of 32: vectorized) */
      for (int c = 0; c < 2; c++) {
        for (int u = 0; u < 4; u++) {
          const uint8_t* l = ql + 64 * c + 32 * (u & 1);
          const uint8_t* h = qh + 32 * c;
          const int ls = 4 * (u >> 1), hs = 2 * u, e0 = 128 * c + 32 * u;
          const float d0 = d * (float)sc[e0 >> 4], d1 = d * (float)sc[(e0 >> 4) + 1];
          for (int j = 0; j < 32; j++) {
            const int v = (((l[j] >> ls) & 15) | (((h[j] >> hs) & 3) << 4)) - 32;
            o[e0 + j] = (j < 16 ? d0 : d1) * (float)v;
          }
        }
      }
    }
  }
}

/* rows x blocks of one of dequantize_row's types (GGML's number) -> float [rows, K], each value as gguf's
   numpy dequantizer computes it. */
int pangu_dequantize(const uint8_t* src, int64_t rows, int64_t blocks, int64_t type, float* out, int64_t threads) {
  const int64_t per = block_weights(type), bytes = block_bytes(type);
  if (!per) return 1;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t r = 0; r < rows; r++) dequantize_row(src + r * blocks * bytes, blocks, type, out + r * blocks * per);
  return 0;
}

/* rows x blocks of one of dequantize_row's types -> int8 [rows, K] and one bf16 scale per row (bits) (row r
   of the output from source row order[r]; order NULL: row r), as
   pangu_infer.quant.formats._quantize_int8 computes them from the dequantized row: scale = bf16 of
   max(|w|) / 127 x (1 + 2^-7), at least bf16's smallest normal; q = w / scale rounded half to even,
   clamped to +-127 (a NaN row: scale NaN, codes 0). No float copy of the weight is made. */
int pangu_dequantize_int8(const uint8_t* src, int64_t rows, int64_t blocks, int64_t type, const int64_t* order, int8_t* q, uint16_t* scale, int64_t threads) {
  const int64_t per = block_weights(type), bytes = block_bytes(type), k = blocks * per;
  if (!per) return 1;
  float* tmp = (float*)malloc(sizeof(float) * (size_t)k * (size_t)threads);
  if (!tmp) return 1;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t r = 0; r < rows; r++) {
    float* w = tmp + (size_t)omp_get_thread_num() * (size_t)k;
    dequantize_row(src + (order ? order[r] : r) * blocks * bytes, blocks, type, w);
    /* max |w| as the largest bit pattern with the sign cleared: non-negative floats order as their
       bits do, every NaN's above infinity's (an integer reduction, which the compiler vectorizes) */
    uint32_t mb = 0;
    for (int64_t j = 0; j < k; j++) {
      uint32_t a;
      memcpy(&a, w + j, 4);  /* (the bits, without breaking C's aliasing rules) */
      a &= 0x7fffffffu;
      mb = a > mb ? a : mb;
    }
    const int nan = mb > 0x7f800000u;
    float m;
    memcpy(&m, &mb, 4);
    float s = m / 127.0f;
    s = s * 1.0078125f;
    s = s < 1.17549435e-38f ? 1.17549435e-38f : s;  /* bf16's smallest normal (torch.finfo(bfloat16).tiny) */
    const uint16_t sb = nan ? 0x7fc0 : f32_to_bf16(s);
    scale[r] = sb;
    int8_t* out = q + r * k;
    if (nan) {
      memset(out, 0, (size_t)k);
      continue;
    }
    uint32_t bits = (uint32_t)sb << 16;
    float sf;
    memcpy(&sf, &bits, 4);
    if (m <= 3.0e38f) {  /* finite: every quotient within +-127.5, a plain loop the compiler vectorizes */
      for (int64_t j = 0; j < k; j++) {
        float v = nearbyintf(w[j] / sf);
        v = v > 127.0f ? 127.0f : v;
        v = v < -127.0f ? -127.0f : v;
        out[j] = (int8_t)(int32_t)v;
      }
      continue;
    }
    for (int64_t j = 0; j < k; j++) {
      float v = nearbyintf(w[j] / sf);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      out[j] = v == v ? (int8_t)v : 0;  /* (an infinite weight over an infinite scale) */
    }
  }
  free(tmp);
  return 0;
}

/* One block of 16 rows of packed pairs (`valid` of them real, at src, k / 2 bytes each) -> the int4
   kernel's layout at dst, k / 8 x 64 bytes: for each 8 columns o, 16 rows x 4 bytes, byte j holding
   column 8o + j in the low nibble and 8o + 4 + j in the high one. Rows past `valid`: code 0. */
static void octets_block(const uint8_t* src, int64_t valid, int64_t k, uint8_t* dst) {
  const int64_t octets = k / 8;
  for (int64_t r = 0; r < 16; r++) {
    uint8_t* d = dst + r * 4;
    if (r >= valid) {
      for (int64_t o = 0; o < octets; o++) memset(d + o * 64, 0, 4);
      continue;
    }
    const uint8_t* p = src + r * (k / 2);
    for (int64_t o = 0; o < octets; o++, p += 4, d += 64) {
      d[0] = (uint8_t)((p[0] >> 4) | (p[2] & 0xf0));
      d[1] = (uint8_t)((p[0] & 15) | (p[2] << 4));
      d[2] = (uint8_t)((p[1] >> 4) | (p[3] & 0xf0));
      d[3] = (uint8_t)((p[1] & 15) | (p[3] << 4));
    }
  }
}

/* packed pairs [n, k / 2] -> the int4 kernel's layout [ceil(n / 16), k / 8, 64] (padded rows code 0). */
int pangu_pairs_to_octets(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out, int64_t threads) {
  const int64_t nb = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t b = 0; b < nb; b++) {
    const int64_t valid = n - b * 16 < 16 ? n - b * 16 : 16;
    octets_block(packed + b * 16 * (k / 2), valid, k, out + b * 8 * k);
  }
  return 0;
}

/* The same where n is a multiple of 16, in place: a block's pairs and its octets take the same 8 k
   bytes at the same offset, so each block is copied aside and written back rearranged. */
int pangu_pairs_to_octets_in_place(uint8_t* packed, int64_t n, int64_t k, int64_t threads) {
  if (n % 16 || threads < 1) return 1;
  const int64_t nb = n / 16, bytes = 8 * k;
  uint8_t* tmp = (uint8_t*)malloc((size_t)bytes * (size_t)threads);  /* before any byte is changed */
  if (!tmp) return 1;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t b = 0; b < nb; b++) {
    uint8_t* mine = tmp + (size_t)omp_get_thread_num() * (size_t)bytes;
    memcpy(mine, packed + b * bytes, (size_t)bytes);
    octets_block(mine, 16, k, packed + b * bytes);
  }
  free(tmp);
  return 0;
}
"""


def _threads() -> int:
    """The passes' OpenMP threads: torch's (the engine's --threads, or what the CPU quota allows)."""
    return max(1, torch.get_num_threads())


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built library, or None (then the callers' Python runs)."""
    if disabled():
        return None
    # (products rounded one by one, as numpy computes them: no fused multiply-adds)
    lib = kernel_library("transcode", SOURCE, "weight repacking in C", "repacking in Python", flags=(*C_FLAGS, "-ffp-contract=off"))
    if lib is None or lib.pangu_transcode_abi() != 9:
        return None
    lib.pangu_q4_to_pairs.restype = ctypes.c_int
    lib.pangu_q4_to_pairs.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.pangu_pairs_to_octets.restype = ctypes.c_int
    lib.pangu_pairs_to_octets.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.pangu_pairs_to_octets_in_place.restype = ctypes.c_int
    lib.pangu_pairs_to_octets_in_place.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.pangu_q4k_to_pairs.restype = ctypes.c_int
    lib.pangu_q4k_to_pairs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.pangu_blocks_to_layout.restype = ctypes.c_int
    lib.pangu_blocks_to_layout.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    lib.pangu_dequantize_int8.restype = ctypes.c_int
    lib.pangu_dequantize_int8.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.pangu_dequantize.restype = ctypes.c_int
    lib.pangu_dequantize.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]
    return lib


Q4_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q4_K": (144, 256)}  # bytes and weights per block
# the types the C passes dequantize: GGML's type number, bytes and weights per block
DEQUANTIZED = {
    "Q5_0": (6, 22, 32), "Q5_1": (7, 24, 32), "Q8_0": (8, 34, 32), "Q4_K": (12, 144, 256), "Q5_K": (13, 176, 256), "Q6_K": (14, 210, 256),
}


def q4_to_pairs(part: np.ndarray, kind: str, packed: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Q4_0, Q4_1 or Q4_K (`kind`) rows [rows, bytes] (C-contiguous) -> their codes written into
    `packed` (uint8 [rows, K/2], contiguous) and (scale, zero) float32 [rows, K/32]; None where the
    library is not here (nothing written)."""
    lib = library()
    if lib is None or not part.flags.c_contiguous or not packed.is_contiguous():
        return None
    size, weights = Q4_BYTES[kind]
    rows, blocks = part.shape[0], part.shape[1] // size
    if part.shape[1] != blocks * size or tuple(packed.shape) != (rows, blocks * weights // 2) or packed.dtype != torch.uint8:
        raise ValueError(f"q4_to_pairs: {kind} rows {tuple(part.shape)} into {tuple(packed.shape)} {packed.dtype}")
    scale = torch.empty(rows, blocks * weights // 32, dtype=torch.float32)
    zero = torch.empty(rows, blocks * weights // 32, dtype=torch.float32)
    if kind == "Q4_K":
        lib.pangu_q4k_to_pairs(part.ctypes.data, rows, blocks, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), _threads())
    else:
        lib.pangu_q4_to_pairs(part.ctypes.data, rows, blocks, size - 16, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), _threads())
    return scale, zero


Q5_BYTES = {"Q5_0": (22, 32), "Q5_1": (24, 32), "Q5_K": (176, 256)}  # bytes and weights per block
Q6_BYTES = {"Q6_K": (210, 256)}
# GGML's type numbers, as pangu_blocks_to_layout takes them: Q4 types into the int4 layout, Q5 ones
# into its 5-bit form, Q6_K into its 6-bit form
LAYOUT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K": 12, "Q5_0": 6, "Q5_1": 7, "Q5_K": 13, "Q6_K": 14}
LAYOUT_BYTES = {**Q4_BYTES, **Q5_BYTES, **Q6_BYTES}  # bytes and weights per block of each
# the types whose every zero is 0 in their layout (w = (q - offset) scale): laid out with the scales alone
SCALES_ONLY = frozenset({"Q4_0", "Q5_0", "Q6_K"})


def layout_bits(kind: str) -> int:
    """The codes' width in the layout a GGUF type goes into (to_layout): 4, 5 or 6."""
    return 6 if kind in Q6_BYTES else 5 if kind in Q5_BYTES else 4


def layout_group(kind: str) -> int:
    """The group of weights sharing a scale (and zero) in that layout: Q6_K's sub-blocks of 16, else 32."""
    return 16 if kind in Q6_BYTES else 32


def to_layout(part: np.ndarray, kind: str, order: Optional[torch.Tensor], row0: int, data: torch.Tensor, sz: torch.Tensor,
              hb: Optional[torch.Tensor] = None) -> bool:
    """Q4_0, Q4_1 or Q4_K (`kind`) rows [n, bytes] (C-contiguous) written as rows row0 .. row0 + n - 1
    of a weight in the int4 kernel's layout: data uint8 [N/16, K/8, 64], sz bf16 [N/16, K/32, zs, 16]
    (cpu_int4.pack's; zs 1 drops the zeros: Q4_0's are all 0); or Q5_0, Q5_1 or Q5_K rows into its 5-bit
    form, with the bit plane hb uint8 [N/16, K/8, 16] (pack5's; zs 1 for Q5_0); or Q6_K rows into its
    6-bit form, groups of 16, with the planes hb uint8 [N/16, K/8, 32] (pack6's; zs 1: no zeros).
    Destination row row0 + i is source row order[i] (int64 [n]; None: row i). False where the library
    is not here (nothing written)."""
    lib = library()
    bits, group = layout_bits(kind), layout_group(kind)
    if lib is None or not part.flags.c_contiguous or not all(t is None or t.is_contiguous() for t in (data, sz, hb)):
        return False
    size, weights = LAYOUT_BYTES[kind]
    n, groups = part.shape[0], part.shape[1] // size * weights // group
    zs, k = sz.shape[-2], groups * group
    fits = (
        data.dtype == torch.uint8 and sz.dtype == torch.bfloat16 and tuple(data.shape[1:]) == (k // 8, 64)
        and tuple(sz.shape[1:]) == (groups, zs, 16) and zs in (1, 2) and len(sz) == len(data)
        and part.shape[1] == groups * group // weights * size and 0 <= row0 and row0 + n <= 16 * len(data)
        and (order is None or (order.dtype == torch.int64 and order.is_contiguous() and tuple(order.shape) == (n,)))
    )
    if not fits or (order is not None and n and not 0 <= int(order.min()) <= int(order.max()) < n):
        raise ValueError(f"to_layout: {kind} rows {tuple(part.shape)} at row {row0} into {tuple(data.shape)}, {tuple(sz.shape)}")
    if zs == 1 and kind not in SCALES_ONLY:
        raise ValueError(f"to_layout: {kind} has zeros; its layout needs them (zs 2)")
    if (bits > 4) != (hb is not None) or (hb is not None and (hb.dtype != torch.uint8 or tuple(hb.shape) != (*data.shape[:2], 16 * (bits - 4)))):
        plane = "none" if hb is None else f"{tuple(hb.shape)} {hb.dtype}"
        raise ValueError(f"to_layout: {kind} rows with bit plane {plane} for weight {tuple(data.shape)}")
    rc = lib.pangu_blocks_to_layout(
        part.ctypes.data, part.shape[1], n, groups, LAYOUT_TYPES[kind], None if order is None else order.data_ptr(),
        row0, data.data_ptr(), None if hb is None else hb.data_ptr(), sz.data_ptr(), zs, _threads(),
    )
    if rc:
        raise ValueError(f"to_layout: {kind} rows {tuple(part.shape)} refused")
    return True


class _Blocks:
    """A GGUF tensor not converted yet (Q4Blocks, Q5Blocks, Int8Rows): part, its rows [N, bytes] (C-contiguous,
    the mapped file); order, the source row of each row (int64 [N], llama.cpp's permuted q/k undone;
    None: as stored); materialize, the portable QuantizedTensor, rows in order; done, called once
    the blocks are read (their pages dropped)."""

    def __init__(self, part: np.ndarray, kind: str, order: Optional[torch.Tensor], materialize, done, size: int, weights: int):
        self.part, self.kind, self.order = part, kind, order
        self.shape = torch.Size((part.shape[0], part.shape[1] // size * weights))
        self._materialize, self._done = materialize, done

    def _written(self, ok: bool) -> bool:
        if ok and self._done is not None:
            self._done()
        return ok

    def materialize(self):
        return self._materialize()


class _LaidOutBlocks(_Blocks):
    """Q4, Q5 or Q6_K blocks (Q4Blocks, HighBlocks): written straight into their parameter's layout by
    one C pass over the mapped blocks (lay_out, to_layout; a fused parameter's pieces in their rows),
    or taken in the portable form (materialize) where they cannot."""

    group_size = 32
    bits = 4

    @property
    def zero_values(self) -> int:
        """1 where every zero is 0 (Q4_0: w = (q - 8) d; Q5_0: w = (q - 16) d; Q6_K: (q - 32) d sc_j), else 2."""
        return 1 if self.kind in SCALES_ONLY else 2

    def lay_out(self, row0: int, data: torch.Tensor, sz: torch.Tensor, hb: Optional[torch.Tensor] = None) -> bool:
        """Write the rows as rows row0.. of a layout (to_layout; hb the 5- or 6-bit form's planes, None
        for Q4 blocks); False where the library is not here."""
        return self._written(to_layout(self.part, self.kind, self.order, row0, data, sz, hb))


class Q4Blocks(_LaidOutBlocks):
    """A Q4_0 / Q4_1 / Q4_K tensor of a GGUF file, not converted yet: what the GGUF loader hands the load
    hook (pangu_infer.quant.loading) where the int4 kernel is cpu_int4's. The hook writes it straight
    into its parameter's layout (no portable copy, no pairs rearranged after), or takes the portable
    form where it cannot."""

    method = "int4"

    def __init__(self, part: np.ndarray, kind: str, order: Optional[torch.Tensor], materialize, done=None):
        super().__init__(part, kind, order, materialize, done, *Q4_BYTES[kind])


class HighBlocks(_LaidOutBlocks):
    """A GGUF tensor of codes wider than 4 bits (Q5Blocks, Q6Blocks), not converted yet: what the GGUF
    loader hands the load hook where cpu_int4's kernel runs and every piece of its weight is of the
    same width. The hook writes it straight into the weight's 5- or 6-bit layout (`bits`), or takes
    it as int8 rows (as_int8_rows) where it does not keep that width."""

    def as_int8_rows(self) -> "Int8Rows":
        """The same blocks kept as int8 rows (a weight not kept with its own code width)."""
        return Int8Rows(self.part, self.kind, self.order, self._materialize, self._done)


class Q5Blocks(HighBlocks):
    """A Q5_0 / Q5_1 / Q5_K tensor: into cpu_int4's 5-bit layout (groups of 32)."""

    method, bits = "int5", 5

    def __init__(self, part: np.ndarray, kind: str, order: Optional[torch.Tensor], materialize, done=None):
        super().__init__(part, kind, order, materialize, done, *Q5_BYTES[kind])


class Q6Blocks(HighBlocks):
    """A Q6_K tensor: into cpu_int4's 6-bit layout, groups of 16 (Q6_K's sub-blocks, each its own
    scale), the scales alone."""

    method, bits, group_size = "int6", 6, 16

    def __init__(self, part: np.ndarray, kind: str, order: Optional[torch.Tensor], materialize, done=None):
        super().__init__(part, kind, order, materialize, done, *Q6_BYTES[kind])


class Int8Rows(_Blocks):
    """A GGUF tensor of a type in DEQUANTIZED kept as int8, not converted yet: what the GGUF loader
    hands the load hook (pangu_infer.quant.loading) on a CPU, for it to write the rows straight into
    their place in the int8 weight (a fused parameter's pieces in their rows: no piece copied into
    it after) with dequantize_int8, or take the portable form (materialize) where it cannot."""

    method = "int8"

    def __init__(self, part: np.ndarray, kind: str, order: Optional[torch.Tensor], materialize, done=None):
        super().__init__(part, kind, order, materialize, done, *DEQUANTIZED[kind][1:])

    def lay_out(self, row0: int, q: torch.Tensor, scale: torch.Tensor) -> bool:
        """Write the rows as rows row0.. of int8 codes q [N, K] and bf16 scales [N]; False where the
        library is not here."""
        n = len(self.part)
        return self._written(dequantize_int8(self.part, self.kind, q[row0 : row0 + n], scale[row0 : row0 + n], self.order))


def dequantize(part: np.ndarray, kind: str) -> Optional[torch.Tensor]:
    """Rows [rows, bytes] (C-contiguous) of a type in DEQUANTIZED (`kind`) -> float32 [rows, K], the values gguf's
    own dequantizer gives, bit for bit; None where the library is not here or the type is another."""
    lib = library()
    if lib is None or kind not in DEQUANTIZED or not part.flags.c_contiguous:
        return None
    code, size, weights = DEQUANTIZED[kind]
    rows, blocks = part.shape[0], part.shape[1] // size
    if part.shape[1] != blocks * size:
        raise ValueError(f"dequantize: {kind} rows {tuple(part.shape)}")
    out = torch.empty(rows, blocks * weights, dtype=torch.float32)
    lib.pangu_dequantize(part.ctypes.data, rows, blocks, code, out.data_ptr(), _threads())
    return out


def dequantize_int8(part: np.ndarray, kind: str, q: torch.Tensor, scale: torch.Tensor, order: Optional[torch.Tensor] = None) -> bool:
    """Rows [rows, bytes] (C-contiguous) of a type in DEQUANTIZED (`kind`) -> int8 codes `q` [rows, K] and bf16
    scales `scale` [rows], what formats._quantize_int8 gives for the dequantized rows (one pass, no
    float copy); row i of the output from source row order[i] (int64 [rows]; None: row i). False
    where the library is not here or the type is another (nothing written)."""
    lib = library()
    if lib is None or kind not in DEQUANTIZED or not part.flags.c_contiguous:
        return False
    code, size, weights = DEQUANTIZED[kind]
    rows, blocks = part.shape[0], part.shape[1] // size
    fits = (
        part.shape[1] == blocks * size and q.dtype == torch.int8 and tuple(q.shape) == (rows, blocks * weights)
        and q.is_contiguous() and scale.dtype == torch.bfloat16 and tuple(scale.shape) == (rows,) and scale.is_contiguous()
        and (order is None or (order.dtype == torch.int64 and order.is_contiguous() and tuple(order.shape) == (rows,)))
    )
    if not fits or (order is not None and rows and not 0 <= int(order.min()) <= int(order.max()) < rows):
        raise ValueError(f"dequantize_int8: {kind} rows {tuple(part.shape)} into {tuple(q.shape)} {q.dtype}, {tuple(scale.shape)} {scale.dtype}")
    ptr = None if order is None else order.data_ptr()
    if lib.pangu_dequantize_int8(part.ctypes.data, rows, blocks, code, ptr, q.data_ptr(), scale.data_ptr(), _threads()):
        raise MemoryError("dequantize_int8: no memory for its row buffers")
    return True


def pairs_to_octets(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Packed pairs uint8 [N, K/2] -> `out` uint8 [ceil(N/16), K/8, 64] (cpu_int4.pack's weight, padded
    rows code 0); False where the library is not here (nothing written)."""
    lib = library()
    if lib is None or not packed.is_contiguous() or not out.is_contiguous():
        return False
    n, k = packed.shape[0], packed.shape[1] * 2
    if k % 8 or tuple(out.shape) != (-(-n // 16), k // 8, 64) or out.dtype != torch.uint8 or packed.dtype != torch.uint8:
        raise ValueError(f"pairs_to_octets: {tuple(packed.shape)} {packed.dtype} into {tuple(out.shape)} {out.dtype}")
    lib.pangu_pairs_to_octets(packed.data_ptr(), n, k, out.data_ptr(), _threads())
    return True


def pairs_to_octets_in_place(packed: torch.Tensor) -> Optional[torch.Tensor]:
    """pairs_to_octets over the pairs' own storage (uint8 [..., N, K/2], contiguous, N a multiple of
    16; leading dims: experts, whose blocks never straddle): the same tensor viewed as
    [..., N/16, K/8, 64], its pairs gone; None where it cannot (nothing changed)."""
    lib = library()
    n, half = packed.shape[-2], packed.shape[-1]
    if lib is None or packed.dtype != torch.uint8 or not packed.is_contiguous() or n % 16 or half % 4:
        return None
    if lib.pangu_pairs_to_octets_in_place(packed.data_ptr(), packed.numel() // half, 2 * half, _threads()):
        return None
    return packed.view(*packed.shape[:-2], n // 16, half // 4, 64)


__all__ = ["DEQUANTIZED", "ENV", "HighBlocks", "LAYOUT_TYPES", "Int8Rows", "Q4_BYTES", "Q4Blocks", "Q5_BYTES", "Q5Blocks", "Q6_BYTES", "Q6Blocks", "SCALES_ONLY", "layout_bits", "layout_group", "dequantize", "dequantize_int8", "disabled", "library", "pairs_to_octets", "pairs_to_octets_in_place", "q4_to_pairs", "to_layout"]
