"""Quantized products of many rows (prefill) that read the int4/int8 weight themselves, with AMX.

Why: the default many-row path (quant/prefill.py) converts the whole weight into oneDNN's packed
bf16 layout, then runs oneDNN's product; the bf16 weight is written out and read back once per
product, which is what keeps quantized prefill under bf16's speed (benchmarks/RESULTS.md,
"Quantized prefill into oneDNN's packed bf16 layout"). Here one C function does both, strip by
strip of output columns. int4 (bf16 tile products):

- a strip of S columns (a multiple of 32) of the weight (int4 in cpu_int4's layout with its bf16
  scale/zero per group, or its scale alone where every zero is 0) is converted into bf16 VNNI pairs in a
  buffer of this thread sized to stay in L2, in the order the products read it (k in chunks of KC,
  in each the strip's 32-column pieces, in each two 1 KB B tiles per 32 of k). The values are the
  packed path's: q * s + (z - 8 s) in fp32, one fused multiply-add, rounded to bf16 once;
- x is copied once per product into 32-row blocks laid out as AMX A tiles ([K/32][32][32] bf16,
  the last rows zero; a buffer kept per thread up to 32 MB, bigger ones allocated per call); every 32 rows run against each 32-column piece with 2 x 2 fp32 accumulator
  tiles (`tdpbf16ps`), k chunk by k chunk so that the rows' chunk stays in L1 across the pieces;
- while one strip is multiplied, the next one is converted into a second buffer a unit at a time
  between the tile products (the vector units are free while the tile unit works);
- each 32 x 32 block of fp32 sums is rounded to bf16 (nearest even) into y.

int8 with a bf16 scale per row (AMX-INT8 tile products, `i8_rows` in the C source): each row of x
quantized to 16-bit integers as quant/cpu_int8.py's decode kernel does it, split into two bytes
(two planes of x, read as A tiles where they lie), the weight's strips only transposed into B
tiles (no conversion to bf16), exact int32 sums scaled in double: a row's output is bit for bit the
decode kernel's rounded to bf16, for the tile work of a bf16 product and none of the weight's bf16
traffic (RESULTS.md, "int8 prefill with int8 tile products").

Rows are independent (each row's sums run over k in the same order whatever the row count), so a
row's result does not depend on the rows next to it. N must be a multiple of 16 (a last half
piece is converted zero-padded), K a multiple of 32 (int8: of 64, at most 65536; both at most
`max_k()`, any by default), else the caller's path runs. int4: Above K = 2048, K runs in panels of at most 2048 (`k_panel`): per
block of rows, per panel, all strips (the panel's x stays in L2), the fp32 sums of all the block's
rows and this thread's columns kept between panels and rounded once after the last.

Built once per machine with the C compiler (`$CC`, else `cc`/`gcc`) and `-march=native` (which
carries `-mamx-tile -mamx-bf16 -mamx-int8` on an AMX CPU) into `~/.cache/pangu-infer/`, loaded with ctypes;
the process asks Linux for the AMX tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`, as oneDNN does). Nothing of it runs where the CPU has no `amx_bf16`, where
there is no compiler or where Linux refuses the tile state: the packed path runs as before.

Whether it runs where it can: `PANGU_INFER_AMX_PREFILL=1` always, `=0` never; unset, a model's
int4 (or int8) products run it only if it beat the packed path by 3% in a short measurement: a
pass of 512-row products over one weight of each of the model's shapes of that kind (quant/tuning.py,
`amx_prefill_v<REVISION>_<kind>_<shapes>` in kernels.json), made once per machine and thread count when
the engine's background compile thread prepares the model (never inside a request). Which kinds
that is differs by machine: benchmarks/RESULTS.md, "Quantized prefill with an AMX kernel that reads
the quantized weight".
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import subprocess
import threading
from typing import Optional

import torch

from pangu_infer.device import tracing
from pangu_infer.native import C_FLAGS, build_c_library, c_compiler, cpu_flags
from pangu_infer.quant import cpu_int4
from pangu_infer.quant.c_simd import BF16_AVX512, INT4_OCTET, PLANE_WORD, TRANSPOSE16_EPI32

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_AMX_PREFILL"
STRIP_ENV = "PANGU_INFER_AMX_STRIP"  # output columns per strip, by hand (measuring)
K_CHUNK = 256  # k per chunk of a row block kept in L1 (a power of two)
ABI = 7
REVISION = 7  # in the names of the per-machine choices: a changed kernel or rule is measured again

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int pangu_amx_abi(void) { return 7; }

/* Ask the kernel for the AMX tile state (once per process; harmless if oneDNN already did). */
int pangu_amx_init(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : 1;
}

/* Buffers kept per thread and grown as needed: fresh big allocations are fresh pages (mmap), whose
   faults and zeroing cost a good part of a product. */
static __thread void* kept[4];
static __thread size_t kept_size[4];
static void* kept_buffer(int i, size_t bytes) {
  if (kept_size[i] < bytes) {
    free(kept[i]);
    bytes = (bytes + 4095) / 4096 * 4096;
    kept[i] = aligned_alloc(4096, bytes);
    kept_size[i] = kept[i] ? bytes : 0;
  }
  return kept[i];
}

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tilecfg;

/* Tiles 0-7: 16 rows of 64 bytes. A constant: gcc 12 does not order stores into a local configuration
   before `ldtilecfg` reads it (seen: the column bytes still zero, a general-protection fault), so nothing
   is stored at run time, and the barrier keeps it that way. */
static const tilecfg TILES = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
static void config_tiles(void) {
  __asm__ volatile("" ::: "memory");
  _tile_loadconfig(&TILES);
}

@BF16_AVX512@
/* lane r of even and odd (fp32) -> word r = (bf16(even[r]), bf16(odd[r])), rounded to nearest even as
   round_bf16x16 (vcvtne2ps2bf16 puts even in the low 16 halfwords, odd in the high ones; one permutation). */
static inline __m512i pairs(__m512 even, __m512 odd) {
  const __m512i idx = _mm512_setr_epi32(0x100000, 0x110001, 0x120002, 0x130003, 0x140004, 0x150005, 0x160006, 0x170007,
                                        0x180008, 0x190009, 0x1a000a, 0x1b000b, 0x1c000c, 0x1d000d, 0x1e000e, 0x1f000f);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

/* The strip buffer, in the order the products read it: k in chunks of KC (the last one shorter),
   in each the strip's 32-column pieces, in each piece per step of 32 in k two B tiles of 16 pairs x
   16 columns (1 KB each, a k pair of one column per 32-bit word, even k in the low half). 16-row
   block j of the strip (0 .. S/16 - 1) is tile (j % 2) of piece j / 2; p is the k pair. */
typedef struct { int64_t K, S, KC; int sh; int64_t ld, k0; } strip_t;  /* KC a power of two, KC / 2 = 1 << sh;
   K the k panel's width, k0 its first k in the weight, ld the weight's whole K */
static inline uint32_t* at(uint32_t* buf, int64_t j, int64_t p, const strip_t* t) {
  const int64_t p0 = (p >> t->sh) << t->sh, kcs = t->K - 2 * p0 < t->KC ? t->K - 2 * p0 : t->KC, q = p - p0;
  return buf + p0 * t->S + (j >> 1) * kcs * 16 + (q >> 4) * 512 + (j & 1) * 256 + (q & 15) * 16;
}

@INT4_OCTET@
@PLANE_WORD@
/* One octet of 5- or 6-bit codes (cpu_int4's layout plus the high bits, P planes: 1, 5-bit codes'
   plane, 16 bytes an octet; 2, 6-bit codes' crumbs, 32 bytes; cpu_int4.py's _INT5 has the bit orders)
   dequantized as int4_octet does: lo[j] = column j, hi[j] = column 4 + j, lane r = row r, the weight
   q * scale + (zero - 2^(3 + P) scale), one fused multiply-add. The high bits are brought to bits 4
   (and 5) of each byte as cpu_int4's high_to_bf16_t_block does per half of 8 rows: rows 0-7 in the low
   256 bits, rows 8-15 in the high ones. */
static inline __attribute__((always_inline)) void high_octet(const uint8_t* p, const uint8_t* e, const int P, const uint16_t* s,
                                                             int64_t zs, __m512 lo[4], __m512 hi[4]) {
  const __m512i byte_mask = _mm512_set1_epi32(0xFF), nib = _mm512_set1_epi32(15);
  const __m512 sc = bf16x16(s), off = group_off16(sc, s, zs, P == 1 ? 16.0f : 32.0f);
  __m256i h0, h1;
  if (P == 1) {  /* the plane: rows 8-15's bits two further up than rows 0-7's */
    const __m256i w = plane_word(e);
    h0 = w; h1 = _mm256_srli_epi32(w, 2);
  } else {  /* the crumbs: rows d's in bits 4-7 of each byte, rows 8 + d's in bits 0-3 */
    h0 = _mm256_loadu_si256((const __m256i*)(const void*)e); h1 = _mm256_slli_epi32(h0, 4);
  }
  const __m512i high = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
  const __m512i hmask = _mm512_set1_epi32(P == 1 ? 0x10 : 0x30);
  const __m512i v = _mm512_loadu_si512((const void*)p);
  for (int j = 0; j < 4; j++) {
    const __m512i bytes = _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), byte_mask);
    const __m512i c = _mm512_srli_epi32(high, 8 * j);
    const __m512i blo = _mm512_and_si512(c, hmask), bhi = _mm512_and_si512(_mm512_srli_epi32(c, P), hmask);
    lo[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_and_si512(bytes, nib), blo)), sc, off);
    hi[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(bytes, 4), bhi)), sc, off);
  }
}

/* Codes in cpu_int4's layout: w [N/16][K/8][64] bytes, sz bf16 [N/16][K/G][zs][16] (scales, then zeros
   where zs == 2; zs == 1: scales only); P 0: int4, 1 or 2: 5- or 6-bit codes with their high bits in
   hb [N/16][K/8][16 P] (a constant at each call). Octet o (k = 8o .. 8o + 7) of 16-row block b into
   strip block j. */
static inline __attribute__((always_inline)) void conv_codes(const uint8_t* w, const uint8_t* hb, const int P, const uint16_t* sz,
                                                             uint32_t* buf, int64_t b, int64_t j, int64_t o, const strip_t* st, int64_t G, int64_t zs) {
  const int64_t ld = st->ld, gs = 16 * zs;
  const uint8_t* p = w + (b * (ld / 8) + st->k0 / 8 + o) * 64;
  const uint16_t* s = sz + b * (ld / G) * gs + ((st->k0 + 8 * o) / G) * gs;
  __m512 lo[4], hi[4];
  if (P == 0) int4_octet(p, s, zs, lo, hi);
  else high_octet(p, hb + (b * (ld / 8) + st->k0 / 8 + o) * 16 * P, P, s, zs, lo, hi);
  uint32_t* d = at(buf, j, 4 * o, st);  /* pairs 4o .. 4o + 3: four consecutive rows of one B tile */
  _mm512_storeu_si512((void*)d, pairs(lo[0], lo[1]));
  _mm512_storeu_si512((void*)(d + 16), pairs(lo[2], lo[3]));
  _mm512_storeu_si512((void*)(d + 32), pairs(hi[0], hi[1]));
  _mm512_storeu_si512((void*)(d + 48), pairs(hi[2], hi[3]));
}

@TRANSPOSE16@
/* The conversion of one strip, a unit at a time (an octet of a 16-row block), so that the next
   strip's can run between the current strip's tile products. */
typedef struct {
  const void* w;
  const uint8_t* hb;
  int P;
  const uint16_t* q;
  uint32_t* buf;
  strip_t st;
  int64_t G, zs, b0, blocks, units, j, u;
  int64_t acc, num, den;  /* spread: num units per den tile steps (block32), acc the carry */
} cursor_t;

static void cursor_start(cursor_t* cu, const void* w, const uint8_t* hb, int P, const uint16_t* q, uint32_t* buf, int64_t K, int64_t KC,
                         int sh, int64_t G, int64_t zs, int64_t n0, int64_t ns, int64_t ld, int64_t k0) {
  cu->w = w; cu->hb = hb; cu->P = P; cu->q = q; cu->buf = buf; cu->G = G; cu->zs = zs;
  cu->b0 = n0 / 16; cu->blocks = ns / 16;
  cu->st.K = K; cu->st.S = (cu->blocks + 1) / 2 * 32; cu->st.KC = KC; cu->st.sh = sh; cu->st.ld = ld; cu->st.k0 = k0;
  cu->units = K / 8;
  cu->j = 0; cu->u = 0;
  cu->acc = 0; cu->num = 0; cu->den = 1;
}

static inline void cursor_step(cursor_t* cu) {
  if (cu->j >= cu->blocks) return;
  const uint8_t* w = (const uint8_t*)cu->w;
  if (cu->P == 0) conv_codes(w, NULL, 0, cu->q, cu->buf, cu->b0 + cu->j, cu->j, cu->u, &cu->st, cu->G, cu->zs);
  else if (cu->P == 1) conv_codes(w, cu->hb, 1, cu->q, cu->buf, cu->b0 + cu->j, cu->j, cu->u, &cu->st, cu->G, cu->zs);
  else conv_codes(w, cu->hb, 2, cu->q, cu->buf, cu->b0 + cu->j, cu->j, cu->u, &cu->st, cu->G, cu->zs);
  if (++cu->u == cu->units) { cu->u = 0; cu->j++; }
}

static void cursor_finish(cursor_t* cu) {
  while (cu->j < cu->blocks) cursor_step(cu);
  if (cu->blocks % 2) {  /* a last half piece: its other 16 columns zero */
    for (int64_t p = 0; p < cu->st.K / 2; p++) memset(at(cu->buf, cu->blocks, p, &cu->st), 0, 64);
  }
  cu->blocks = -1;
}

/* 32 rows of x, packed ([K/32][32 rows][32] bf16, xa) times one piece of a chunk of the strip (bp:
   per step of 32 in k two 1 KB B tiles) over k in [k0, k1): the fp32 sums added to c [32][32] (or
   written there when first). Both operands are read as contiguous 2 KB per step of 32 in k. */
static inline void block32(const uint16_t* xa, const uint32_t* bp, int64_t k0, int64_t k1, float* c, int first,
                           cursor_t* next) {
  if (first) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
  else {
    _tile_loadd(0, c, 128); _tile_loadd(1, c + 16, 128);
    _tile_loadd(2, c + 16 * 32, 128); _tile_loadd(3, c + 16 * 32 + 16, 128);
  }
  xa += k0 * 32;
  for (int64_t k = k0; k < k1; k += 32, xa += 32 * 32, bp += 512) {
    /* each load as late as its first use and as far as possible after the last product reading
       the tile it overwrites (tiles are not renamed) */
    _tile_loadd(4, xa, 64);
    _tile_loadd(6, bp, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bp + 256, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, xa + 16 * 32, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    /* the next strip's conversion, in the vector units while the tile products run, spread evenly
       over the strip's steps */
    next->acc += next->num;
    while (next->acc >= next->den) { next->acc -= next->den; cursor_step(next); }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

static inline void write_rows(const float* c, uint16_t* y, int64_t ldy, int64_t rows, int64_t cols) {
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : (cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1));
  for (int64_t r = 0; r < rows; r++) {
    __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * 32));
    __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * 32 + 16));
    _mm256_mask_storeu_epi16(y + r * ldy, m0, lo);
    if (m1) _mm256_mask_storeu_epi16(y + r * ldy + 16, m1, hi);
  }
}

/* y [M][N] bf16 = x [M][K] bf16 times W^T, W [N][K] in cpu_int4's layout: w = data [N/16][K/8][64], q = sz
   bf16 [N/16][K/G][zs][16], G the group, zs 2 (scales and zeros) or 1 (scales only), P planes of high
   bits in hb (0: int4 codes); N % 16 == 0, K % 32 == 0; S the strip width (a multiple of 32). Returns
   nonzero when refused. */
static int qmm_rows(const uint16_t* x, const void* w, const uint8_t* hb, int P, const uint16_t* q, uint16_t* y, int64_t M, int64_t N,
                    int64_t K, int64_t G, int64_t zs, int64_t S, int64_t kc, int64_t kp, int threads) {
  if (N % 16 || K % 32 || S % 32 || S <= 0 || M <= 0) return 1;
  if (G % 8 || G < 8 || K % G || zs < 1 || zs > 2) return 1;
  /* k in panels of KP (0: one panel): a panel's rows of x stay in L2 across all strips, the fp32 sums
     kept between panels */
  const int64_t KP = kp > 0 && kp < K ? kp : K, panels = (K + KP - 1) / KP;
  if (panels > 1 && (KP % 64 || KP % G)) return 1;
  int sh = 4;  /* k chunks: a power of two from 32 (the whole of K when kc <= 0) */
  while (kc > 0 ? (2 << sh) < kc : (2 << sh) < KP) sh++;
  const int64_t KC = (int64_t)2 << sh;
  const int64_t strips = (N + S - 1) / S, mblocks = (M + 31) / 32, kb = K / 32;
  /* x packed once: [M/32][K/32][32 rows][32] bf16, the last rows zero (A tiles read contiguous 2 KB) */
  /* kept per thread up to 32 MB (the size of the packed path's kept buffers), else per call */
  const size_t xbytes = (size_t)mblocks * 32 * K * 2;
  const int xkept = xbytes <= ((size_t)32 << 20);
  uint16_t* xp = (uint16_t*)(xkept ? kept_buffer(0, xbytes) : aligned_alloc(4096, (xbytes + 4095) / 4096 * 4096));
  if (!xp) return 2;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && mblocks >= 2)
  for (int64_t mb = 0; mb < mblocks; mb++) {
    for (int64_t r = 0; r < 32; r++) {
      const int64_t row = mb * 32 + r;
      uint16_t* dst = xp + mb * 32 * K + r * 32;
      if (row < M) {
        const uint16_t* src = x + row * K;
        for (int64_t b = 0; b < kb; b++) _mm512_store_si512((void*)(dst + b * 1024), _mm512_loadu_si512((const void*)(src + b * 32)));
      } else {
        for (int64_t b = 0; b < kb; b++) _mm512_store_si512((void*)(dst + b * 1024), _mm512_setzero_si512());
      }
    }
  }
  int fail = 0;
  #pragma omp parallel num_threads(threads > 1 ? threads : 1) if(threads > 1 && strips >= 2)
  {
    /* this thread's strips, in order (per k panel: all strips of one panel, then the next panel's):
       while one is multiplied, the next is converted into the other buffer */
    const int nt = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t s_begin = strips * me / nt, s_end = strips * (me + 1) / nt;
    const size_t bytes = (size_t)(S / 32) * (size_t)(KP / 2) * 128;
    uint32_t* bufs[2] = {(uint32_t*)kept_buffer(1, bytes), (uint32_t*)kept_buffer(3, bytes)};
    /* one panel: each strip's sums per 32 rows in c only while it runs; several: kept for all of this
       thread's strips and rows across the panels */
    const size_t cfloats = (size_t)(S / 32) * 1024 * (panels > 1 ? (size_t)(s_end > s_begin ? s_end - s_begin : 1) * mblocks : 1);
    float* c = (float*)kept_buffer(2, cfloats * sizeof(float));
    if (!(c && bufs[0] && bufs[1])) {
      #pragma omp atomic write
      fail = 2;
    } else if (s_begin < s_end) {
      config_tiles();
      cursor_t cur, nxt;
      int which = 0;
      cursor_start(&cur, w, hb, P, q, bufs[0], KP < K ? KP : K, KC, sh, G, zs, s_begin * S, N - s_begin * S < S ? N - s_begin * S : S, K, 0);
      cursor_finish(&cur);
      for (int64_t pn = 0; pn < panels; pn++) {
        const int64_t pk0 = pn * KP, pw = K - pk0 < KP ? K - pk0 : KP;
        for (int64_t s = s_begin; s < s_end; s++) {
          const int64_t n0 = s * S, ns = (N - n0 < S) ? N - n0 : S;
          const int64_t pieces = (ns / 16 + 1) / 2;
          const strip_t t = cur.st;
          uint32_t* buf = cur.buf;
          nxt.blocks = 0; nxt.j = 0; nxt.acc = 0; nxt.num = 0; nxt.den = 1;
          const int more = s + 1 < s_end || pn + 1 < panels;
          if (more) {  /* the next strip of this panel, or the first of the next panel */
            const int64_t n1 = s + 1 < s_end ? n0 + S : s_begin * S, q0 = s + 1 < s_end ? pk0 : pk0 + KP;
            const int64_t qw = K - q0 < KP ? K - q0 : KP;
            cursor_start(&nxt, w, hb, P, q, bufs[1 - which], qw, KC, sh, G, zs, n1, N - n1 < S ? N - n1 : S, K, q0);
            nxt.num = nxt.blocks * nxt.units; nxt.den = mblocks * pieces * (pw / 32);
          }
          /* per 32 rows of x: k in chunks of KC (their 32 x KC of x stays in L1 across the strip's
             pieces), each piece's sums kept in c between chunks (and panels) */
          for (int64_t mb = 0; mb < mblocks; mb++) {
            float* cc = panels > 1 ? c + ((s - s_begin) * mblocks + mb) * (S / 32) * 1024 : c;
            for (int64_t k0 = 0; k0 < pw; k0 += KC) {
              const int64_t k1 = k0 + KC < pw ? k0 + KC : pw;
              for (int64_t pc = 0; pc < pieces; pc++)
                block32(xp + mb * 32 * K, buf + (k0 / 2) * t.S + pc * ((k1 - k0) / 2) * 32, pk0 + k0, pk0 + k1,
                        cc + pc * 1024, pn == 0 && k0 == 0, &nxt);
            }
            if (pn + 1 < panels) continue;
            const int64_t rows = M - mb * 32 < 32 ? M - mb * 32 : 32;
            for (int64_t pc = 0; pc < pieces; pc++) {
              const int64_t cols = (ns - 32 * pc) < 32 ? ns - 32 * pc : 32;
              write_rows(cc + pc * 1024, y + mb * 32 * N + n0 + 32 * pc, N, rows, cols);
            }
          }
          if (more) { cursor_finish(&nxt); cur = nxt; which = 1 - which; }
        }
      }
      _tile_release();
    }
  }
  if (!xkept) free(xp);
  return fail;
}


/* ---------------- int8 weights: int8 x int8 tile products, the activations in two int8 levels ----------------
   Each row of x is quantized as pangu_infer.quant.cpu_int8's kernel does it (a = nearbyint(x / d) with d =
   max|x| / 32767 in fp32, |a| <= 32767) and split into a = 256 h + l, h = a >> 8 in [-128, 127] (signed), l =
   a & 255 (unsigned): two planes of bytes, [rows][K] each. The weight's 16-row blocks are the B tiles once
   their 4-byte k quads are transposed (a strip at a time, like the int4 conversion, into a buffer of this
   thread), the planes' rows the A tiles as they lie (16 rows, 64 bytes of k each): `tdpbssd` (h times w) and
   `tdpbusd` (l times w) into int32, exact (|h w| K < 2^31 and |l w| K < 2^31 for K <= 65536). Then y =
   (256 H + L) d scale in double, rounded to fp32 and then to bf16: bit for bit the decode kernel's fp32
   output rounded to bf16. The tile work is bf16's (two int8 products of 64 k per bf16 product of 32 k);
   what it saves is the weight's conversion to bf16 and the bf16 weight's traffic. */
#ifdef __AMX_INT8__
#define I8_LEVELS 32767.0f  /* cpu_int8's LEVELS */


/* One row of x into its planes (h, l: K bytes each) and its step d; a row holding NaN or infinity gets d
   NaN and zero planes (NaN outputs, as the decode kernel). */
static void i8_quantize_row(const uint16_t* xr, int64_t K, int8_t* h, uint8_t* l, double* d) {
  __m512i mx = _mm512_setzero_si512();  /* |x| as bf16 bits: ordered as integers, NaN above infinity */
  for (int64_t k = 0; k < K; k += 32)
    mx = _mm512_max_epu16(mx, _mm512_and_si512(_mm512_loadu_si512((const void*)(xr + k)), _mm512_set1_epi16(0x7fff)));
  const uint16_t top = (uint16_t)_mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_and_si512(mx, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(mx, 16)));
  float amax;
  { const uint32_t u = (uint32_t)top << 16; memcpy(&amax, &u, 4); }
  const float step = top < 0x7f80 ? amax / I8_LEVELS : __builtin_nanf("");
  const float inv = step > 0.0f ? 1.0f / step : 0.0f;
  *d = step;
  const __m512 vi = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16(xr + k), vi));  /* nearest even, as nearbyintf */
    _mm_storeu_si128((__m128i*)(h + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(a, 8)));
    _mm_storeu_si128((__m128i*)(l + k), _mm512_cvtepi32_epi8(a));
  }
}

/* A strip's buffer: per 32-column piece, per 64 of k, two B tiles (the piece's two 16-row blocks: 16 k
   quads x 16 rows x 4 bytes). One unit: 64 of k of one 16-row block, a 16 x 16 transpose of 32-bit words. */
typedef struct { const int8_t* w; int64_t K, n0, blocks, steps, j, s, acc, num, den; int8_t* buf; } i8cursor_t;

static inline void i8_step(i8cursor_t* cu) {
  if (cu->j >= cu->blocks) return;
  __m512i v[16];
  transpose16_epi32(cu->w + (cu->n0 + 16 * cu->j) * cu->K + 64 * cu->s, cu->K, v);
  int8_t* dst = cu->buf + ((cu->j / 2) * cu->steps + cu->s) * 2048 + (cu->j % 2) * 1024;
  for (int i = 0; i < 16; i++) _mm512_store_si512((void*)(dst + 64 * i), v[i]);
  if (++cu->s == cu->steps) { cu->s = 0; cu->j++; }
}

static inline void i8_start(i8cursor_t* cu, const int8_t* w, int64_t K, int64_t n0, int64_t blocks, int8_t* buf) {
  cu->w = w; cu->K = K; cu->n0 = n0; cu->blocks = blocks; cu->steps = K / 64; cu->j = 0; cu->s = 0;
  cu->acc = 0; cu->num = 0; cu->den = 1; cu->buf = buf;
}

/* The 4 int32 tiles of 16 rows of x times a piece (c: h by the first 16 columns, l by them, h by the
   second 16, l by them; [16 rows][16 columns] each) into y: (256 h + l) d scale, in double. */
static inline void i8_write(const int32_t* c, uint16_t* y, int64_t N, int64_t n0, int64_t cols, int64_t m0, int64_t rows,
                            const double* d, const uint16_t* sc) {
  const __mmask32 keep = cols >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << cols) - 1);
  const __m512 s0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)keep, sc + n0)), 16));
  const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)(keep >> 16), sc + n0 + 16)), 16));
  const __m512d s[4] = {_mm512_cvtps_pd(_mm512_castps512_ps256(s0)), _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s0), 1))),
                        _mm512_cvtps_pd(_mm512_castps512_ps256(s1)), _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s1), 1)))};
  const __m512d k256 = _mm512_set1_pd(256.0);
  for (int64_t r = 0; r < rows; r++) {
    const __m512d dr = _mm512_set1_pd(d[m0 + r]);
    __m256 f[4];
    for (int i = 0; i < 4; i++) {
      const int32_t* hh = c + (i >> 1) * 512 + r * 16 + (i & 1) * 8;
      const __m512d sum = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm256_load_si256((const __m256i*)hh)), k256,
                                          _mm512_cvtepi32_pd(_mm256_load_si256((const __m256i*)(hh + 256))));  /* exact */
      f[i] = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(sum, dr), s[i]));
    }
    const __m512 lo = _mm512_insertf32x8(_mm512_castps256_ps512(f[0]), f[1], 1);
    const __m512 hi = _mm512_insertf32x8(_mm512_castps256_ps512(f[2]), f[3], 1);
    _mm512_mask_storeu_epi16(y + (m0 + r) * N + n0, keep, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

/* y [M][N] bf16 = x [M][K] bf16 times (w [N][K] int8 with a bf16 scale per row sc)^T. N % 16 == 0, K % 64
   == 0, K <= 65536; S the strip width (a multiple of 32). Each thread takes an equal share of the 16-row
   blocks, in strips of S rows of w converted one while the one before is multiplied; per strip, per 16
   rows of x, per piece, all of k. A piece's sums are written while the next piece's tile products run
   (deferred by one piece). Returns nonzero when refused. */
static int i8_rows(const uint16_t* x, const int8_t* w, const uint16_t* sc, uint16_t* y, int64_t M, int64_t N, int64_t K,
                   int64_t S, int threads) {
  if (N % 16 || K % 64 || K > 65536 || S % 32 || S <= 0 || M <= 0) return 1;
  const int64_t tbs = (M + 15) / 16, Mp = tbs * 16, steps = K / 64, nblocks = N / 16, sb = S / 16;
  /* the planes kept per thread up to 32 MB (as qmm_rows' x), bigger ones allocated per call */
  const size_t pbytes = (size_t)Mp * K * 2;
  const int pkept = pbytes <= ((size_t)32 << 20);
  int8_t* hp = (int8_t*)(pkept ? kept_buffer(0, pbytes) : aligned_alloc(4096, (pbytes + 4095) / 4096 * 4096));
  double* d = (double*)kept_buffer(2, sizeof(double) * (size_t)Mp);
  if (!hp || !d) { if (!pkept) free(hp); return 2; }
  uint8_t* lp = (uint8_t*)hp + Mp * K;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && Mp >= 32)
  for (int64_t m = 0; m < Mp; m++) {
    if (m < M) i8_quantize_row(x + m * K, K, hp + m * K, lp + m * K, d + m);
    else { memset(hp + m * K, 0, K); memset(lp + m * K, 0, K); d[m] = 0.0; }
  }
  int fail = 0;
  #pragma omp parallel num_threads(threads > 1 ? threads : 1) if(threads > 1 && nblocks >= 2)
  {
    const int nt = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t b_begin = nblocks * me / nt, b_end = nblocks * (me + 1) / nt;
    int8_t* bufs[2] = {(int8_t*)kept_buffer(1, (size_t)S * K), (int8_t*)kept_buffer(3, (size_t)S * K)};
    if (!(bufs[0] && bufs[1])) {
      #pragma omp atomic write
      fail = 2;
    } else if (b_begin < b_end) {
      config_tiles();
      int32_t cb[2][1024] __attribute__((aligned(64)));
      int cw = 0;
      int64_t pend_n = -1, pend_m = 0, pend_cols = 0;
      i8cursor_t cur;
      i8_start(&cur, w, K, b_begin * 16, b_end - b_begin < sb ? b_end - b_begin : sb, bufs[0]);
      while (cur.j < cur.blocks) i8_step(&cur);
      int which = 0;
      for (int64_t b0 = b_begin; b0 < b_end; b0 += sb) {
        const int64_t blocks = b_end - b0 < sb ? b_end - b0 : sb, pieces = (blocks + 1) / 2, n0 = b0 * 16;
        const int8_t* buf = bufs[which];
        i8cursor_t nx;
        i8_start(&nx, w, K, (b0 + sb) * 16, 0, bufs[1 - which]);
        if (b0 + sb < b_end) {
          nx.blocks = b_end - b0 - sb < sb ? b_end - b0 - sb : sb;
          nx.num = nx.blocks * steps; nx.den = tbs * pieces * steps;
        }
        for (int64_t tb = 0; tb < tbs; tb++) {
          const int8_t* xh = hp + tb * 16 * K;
          const int8_t* xl = (const int8_t*)lp + tb * 16 * K;
          for (int64_t p = 0; p < pieces; p++) {
            const int8_t* bp = buf + p * steps * 2048;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t s = 0; s < steps; s++, bp += 2048) {
              _tile_loadd(4, xh + 64 * s, K);
              _tile_loadd(6, bp, 64);
              _tile_dpbssd(0, 4, 6);
              _tile_loadd(5, xl + 64 * s, K);
              _tile_dpbusd(1, 5, 6);
              _tile_loadd(7, bp + 1024, 64);
              _tile_dpbssd(2, 4, 7);
              _tile_dpbusd(3, 5, 7);
              nx.acc += nx.num;
              while (nx.acc >= nx.den) { nx.acc -= nx.den; i8_step(&nx); }
            }
            /* the previous piece's sums are written while this piece's tile products run */
            if (pend_n >= 0) i8_write(cb[1 - cw], y, N, pend_n, pend_cols, pend_m, M - pend_m < 16 ? M - pend_m : 16, d, sc);
            int32_t* c = cb[cw];
            _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64); _tile_stored(2, c + 512, 64); _tile_stored(3, c + 768, 64);
            pend_n = n0 + 32 * p; pend_cols = 16 * blocks - 32 * p < 32 ? 16 * blocks - 32 * p : 32; pend_m = tb * 16; cw = 1 - cw;
          }
        }
        while (nx.j < nx.blocks) i8_step(&nx);
        which = 1 - which;
      }
      if (pend_n >= 0) i8_write(cb[1 - cw], y, N, pend_n, pend_cols, pend_m, M - pend_m < 16 ? M - pend_m : 16, d, sc);
      _tile_release();
    }
  }
  if (!pkept) free(hp);
  return fail;
}
#endif

/* kind 4 (cpu_int4's layout, qmm_rows) in blocks of mb rows (0: all at once), each converting the
   weight again: a block's rows of x stay in L2 with the strip buffers instead of streaming through it
   once per strip; kind 8 (int8, i8_rows; G, zs, kc, mb and kp unused). */
int pangu_amx_qmm(const uint16_t* x, const void* w, const uint16_t* q, uint16_t* y, int64_t M, int64_t N,
                  int64_t K, int64_t G, int64_t zs, int kind, int64_t S, int64_t kc, int64_t mb, int64_t kp, int threads,
                  const uint8_t* hb, int64_t planes) {
#ifdef __AMX_INT8__
  if (kind == 8) return i8_rows(x, (const int8_t*)w, q, y, M, N, K, S, threads);
#endif
  if (kind != 4 || planes < 0 || planes > 2 || (planes && !hb)) return 1;
  const int P = (int)planes;
  if (mb <= 0 || mb >= M) return qmm_rows(x, w, hb, P, q, y, M, N, K, G, zs, S, kc, kp, threads);
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int rc = qmm_rows(x + m0 * K, w, hb, P, q, y + m0 * N, M - m0 < mb ? M - m0 : mb, N, K, G, zs, S, kc, kp, threads);
    if (rc) return rc;
  }
  return 0;
}
""".replace("@TRANSPOSE16@", TRANSPOSE16_EPI32).replace("@BF16_AVX512@", BF16_AVX512).replace("@INT4_OCTET@", INT4_OCTET).replace("@PLANE_WORD@", PLANE_WORD)

FLAGS = (*C_FLAGS, "-Werror=incompatible-pointer-types")
_lock = threading.Lock()


def setting() -> str:
    """PANGU_INFER_AMX_PREFILL: "off", "on" (unmeasured) or "" (measured once per machine)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    if v in ("1", "on", "true", "yes"):
        return "on"
    return ""


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built kernel with the AMX tile state granted, or None where it cannot run here."""
    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        return None
    if not {"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"} <= cpu_flags():
        return None
    compiler = c_compiler()
    if not compiler:
        log.info("AMX prefill kernel: no C compiler found")
        return None
    try:
        lib = build_c_library("amx_prefill", SOURCE, compiler, FLAGS, link=())
        if lib.pangu_amx_abi() != ABI:
            return None
        if lib.pangu_amx_init() != 0:
            log.info("AMX prefill kernel: Linux refused the AMX tile state (arch_prctl)")
            return None
    except (OSError, subprocess.SubprocessError) as e:
        log.info("AMX prefill kernel not built (%s)", e)
        return None
    fn = lib.pangu_amx_qmm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    return lib


def prepare() -> bool:
    """Build the kernel (once per process; a cached library after the first time on a machine):
    True when it can run here. Never inside a request: the engine's background compile thread calls
    it through quant.modules.prepare_prefill, which then chooses per kind whether it runs."""
    if setting() == "off":
        return False
    with _lock:
        return library() is not None


def use(chosen: bool) -> bool:
    """Does a many-row product whose weight chose `chosen` (PackedWeight.amx_prefill, measured per
    machine) run the kernel now: PANGU_INFER_AMX_PREFILL=0 never, =1 always once
    prepare() has built it, else `chosen`; never inside a graph dynamo traces (a ctypes call)."""
    if tracing():
        return False
    s = setting()
    if s == "off":
        return False
    if s == "on":
        return library.cache_info().currsize > 0 and library() is not None
    return chosen


def _strip_by_hand() -> int:
    """PANGU_INFER_AMX_STRIP as a number (0: unset or not a number)."""
    try:
        return int(os.environ.get(STRIP_ENV, "0"))
    except ValueError:
        return 0


def strip_width(k: int) -> int:
    """Output columns per strip. Up to K = 2048: 64, with the rows in blocks (row_block) whose x
    stays in L2 beside the two strip buffers; wider: the strip's bf16 weight (2 K S bytes) within
    about 768 KB of L2, 32 to 256 columns, all rows at once (RESULTS.md, "Quantized prefill with an
    AMX kernel"). PANGU_INFER_AMX_STRIP sets it by hand."""
    s = _strip_by_hand()
    if s <= 0:
        kw = k_panel(k) or k  # with k panels, a strip is as wide as a panel's
        s = 64 if kw <= 2048 else (768 << 10) // (2 * kw)
    return max(32, min(256, s) // 32 * 32)


def row_block(k: int) -> int:
    """Rows per block, each block converting the weight again (0: all rows at once): up to K = 2048,
    about 768 KB of x (256 rows at K = 1536), which measured faster than x streaming through L2
    once per strip; wider K, all at once (a block small enough for L2 converts the weight too often)."""
    kw = k_panel(k) or k  # with k panels, a block's x per panel stays in L2
    return max(32, (768 << 10) // (2 * kw) // 32 * 32) if kw <= 2048 else 0


PANEL_ENV = "PANGU_INFER_AMX_K_PANEL"  # k panel width by hand (measuring; 0 = none)


def k_panel(k: int) -> int:
    """k per panel (0: all of K at once): above 2048, K in equal panels of at most 2048 (a multiple of
    128, so that int4 groups and int8 units stay whole; the last one shorter), each panel's rows of x
    kept in L2 across all strips and the fp32 sums kept between panels. PANGU_INFER_AMX_K_PANEL sets it."""
    env = os.environ.get(PANEL_ENV)
    if env is not None:
        try:
            return max(0, int(env)) // 128 * 128
        except ValueError:
            pass
    if k <= 2048:
        return 0
    panels = -(-k // 2048)
    return -(-k // panels // 128) * 128


MAX_K_ENV = "PANGU_INFER_AMX_MAX_K"
MAX_K = 0  # any K (k panels above 2048)


def max_k() -> int:
    """The widest K the kernel takes (PANGU_INFER_AMX_MAX_K; 0, the default, = any). Past 2048, K runs
    in panels (k_panel); without them x streamed from L3 once per strip and 1536 x 4800 measured
    0.69x of bf16 against the packed path's 0.84x, with them level or ahead (RESULTS.md, "int8
    through the AMX kernel with the scale on the sums", k panels). PANGU_INFER_AMX_MAX_K=2048 sends
    wider weights to the packed path again."""
    try:
        v = int(os.environ.get(MAX_K_ENV, MAX_K))
    except ValueError:
        v = MAX_K
    return v if v > 0 else 1 << 62


def _fits(x: torch.Tensor, n: int, k: int) -> bool:
    return (
        x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[1] == k and n % 16 == 0
        and k % 32 == 0 and n > 0 and k <= max_k()
    )


def _run(lib, x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, n: int, k: int, group: int, kind: int, zs: int = 1,
         hb: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    strip = strip_width(k) if kind == 4 else int8_strip_width(k)
    if x.shape[0] and lib.pangu_amx_qmm(
        x.data_ptr(), w.data_ptr(), q.data_ptr(), y.data_ptr(), x.shape[0], n, k, group, zs, kind, strip, K_CHUNK,
        row_block(k), k_panel(k), torch.get_num_threads(), None if hb is None else hb.data_ptr(), cpu_int4.planes(hb),
    ):
        return None
    return y


def int8_strip_width(k: int) -> int:
    """Weight rows per strip of the int8 kernel: its int8 strip (S K bytes, twice, the one multiplied and
    the next one) within about 768 KB each, 64 to 512 rows (RESULTS.md, "int8 prefill with int8 tile
    products"). PANGU_INFER_AMX_STRIP sets it by hand."""
    s = _strip_by_hand()
    if s <= 0:
        s = (768 << 10) // k
    return max(64, min(512, s) // 32 * 32)


def int4_product(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int,
                 hb: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """x [M, K] bf16 times a cpu_int4-layout weight (with hb, 5- or 6-bit codes: cpu_int4.pack5 /
    pack6's high bits): [M, N] bf16 (N the padded row count), or None where this kernel does not
    take the operands (then the caller's path runs)."""
    lib = library()
    n, k = data.shape[0] * cpu_int4.ROW_BLOCK, data.shape[1] * cpu_int4.OCTET
    if (
        lib is None or not _fits(x, n, k) or data.dtype != torch.uint8 or sz.dtype != torch.bfloat16
        or not (data.is_contiguous() and sz.is_contiguous()) or group_size % 8 or k % group_size
        or not cpu_int4.scales_fit(sz, (data.shape[0], k // group_size))
        or (hb is not None and (hb.dtype != torch.uint8 or not hb.is_contiguous()
                                or tuple(hb.shape) not in ((data.shape[0], data.shape[1], 16), (data.shape[0], data.shape[1], 32))))
    ):
        return None
    return _run(lib, x, data, sz, n, k, group_size, 4, cpu_int4.zero_values(sz), hb)


def int8_product(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> Optional[torch.Tensor]:
    """x [M, K] bf16 times an int8 weight [N, K] with a bf16 scale per row: [M, N] bf16 (bit for bit
    quant.cpu_int8's product rounded to bf16), or None where the kernel does not take the operands
    (K % 64, K > 65536, no AMX-INT8)."""
    lib = library()
    n, k = data.shape
    if (
        lib is None or "amx_int8" not in cpu_flags() or not _fits(x, n, k) or k % 64 or k > 65536
        or data.dtype != torch.int8 or scales.dtype != torch.bfloat16
        or not (data.is_contiguous() and scales.is_contiguous()) or tuple(scales.shape) != (n,)
    ):
        return None
    return _run(lib, x, data, scales, n, k, 0, 8)


__all__ = ["ENV", "int4_product", "int8_product", "library", "prepare", "row_block", "setting", "strip_width", "use"]
