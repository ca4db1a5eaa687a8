"""int8 products of a few rows on x86 CPUs with AVX2 (AVX-512 VNNI where the CPU has it): a small C
kernel of our own, exact in its sums.

Why: `aten._weight_int8pack_mm` takes bf16 activations, rounds its outputs to bf16 and, on the
AVX2-only AMD EPYC (Zen 1) these products were measured on, runs 1.2x (one row) to 2x (16 rows)
slower than this kernel (benchmarks/RESULTS.md, "an int8 kernel of our own"). The int8 weight of a
Q4_0 GGUF file's output layer (llama.cpp's quantizer writes it as Q8_0) is the largest single
product of a decode step: at 16 sequences it took a fifth of the step.

What it computes, for x [M, K] (float32 or bfloat16) and the int8 weight [N, K] with one bf16 scale
per row (the engine's int8 format, unchanged):
- each row of x quantized to integers of 16 bits, a = round(x / d) with d = max|x| / 32767 (a
  rounding error of at most 2^-16 of the row's largest value: finer than the bf16 activations
  aten's kernel takes, 2^-9 of each value);
- the dot products sum(a w) exactly in integers (`vpmaddwd`: int16 pairs into int32, summed in
  int32 over CHUNK columns, which cannot overflow, then in int64);
- y = sum * d * scale in double, rounded once to float32: the output is float32, not bf16.

Each output depends on its own row of x only, in the same order whatever the other rows, so the
products are batch invariant. The weight is read in tiles of TILE_ROWS rows that stay in the
core's cache while every row of x runs over them. A row of x holding NaN or infinity gives NaN
outputs.

Built once per machine like pangu_infer/quant/cpu_int4.py (`$CC`, else `cc`/`gcc`, -march=native,
into ~/.cache/pangu-infer/), loaded with ctypes, and used where it beat aten's kernel in a short
measurement made once per machine (one-row products over 32 MB of int8 weights, medians of
interleaved passes; key `int8_decode_kernel` of pangu_infer.quant.tuning's cache).
`PANGU_INFER_INT8_KERNEL=aten` turns it off, `=own` uses it unmeasured. Inside a compiled step it
is an operator opaque to inductor: `pangu_infer::int8_native_mm`, registered from C++
(pangu_infer.native_ops, `native_op`), else the Python one `pangu_infer::int8_own_mm`; eagerly the
C function is called directly.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from typing import Optional

import torch

from pangu_infer import native_ops
from pangu_infer.device import tracing
from pangu_infer.machine import interleaved_medians, own_kernel_measured_faster
from pangu_infer.native import cpu_flags, kernel_library

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_INT8_KERNEL"
COLUMNS = 16  # K must be a multiple of this (as for aten's kernel)

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

/* Columns per int32 sum: each lane adds at most CHUNK / 8 products (AVX2; AVX-512: CHUNK / 16), each
   at most 128 * 32767 in size, so a lane stays under 2^30; the lanes are summed in int64 (hsum8,
   hsum16). quant/amx.py's prefill kernel quantizes rows the same way (LEVELS) and splits the integers
   into two bytes. */
#define CHUNK 1024
#define LEVELS 32767.0f
/* Weight rows per tile: 48 KB at K = 1536, kept in the core's cache while every row of x runs over it. */
#define TILE_ROWS 32

int pangu_int8_abi(void) { return 1; }

/* The 4 rows a call of dots reads are 4 short streams (K bytes each), too short for the hardware's
   prefetchers to learn before the next 4 begin: one software prefetch per 16 columns fetches the
   next 4 rows' bytes (the 64 bytes at 4 K + 4 k from this call's first row: as the 16 columns k
   of these 4 rows are read, the line 4 rows on), in the first pass over a tile only (P; the later
   rows of x find the tile in the cache). 1.9x faster one-row products at one thread on a
   Zen 3 EPYC (benchmarks/RESULTS.md, "int8 kernel: prefetching the next rows"); the same bits. */
#define PREFETCH_NEXT_ROWS(w, K, k) _mm_prefetch((const char*)((uintptr_t)(w) + 4 * (uintptr_t)(K) + 4 * (uintptr_t)(k)), _MM_HINT_T0)

static inline float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline int64_t hsum8(__m256i v) {  /* the 8 int32 lanes' sum, in int64 */
  const __m256i q = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* out[r][i] = sum over K of a[i][k] w[r][k], exactly, for R weight rows and A rows of a (A <= 2). */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
static inline int64_t hsum16(__m512i v) {  /* the 16 int32 lanes' sum, in int64 */
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
/* AVX-512 with VNNI: 32 columns a step, vpdpwssd adding the int16 pairs' products into int32 in one
   instruction (the same integers as vpmaddwd then vpaddd: the sums, exact, are the AVX2 path's). A
   last 16 columns (K % 32 == 16) come through the low halves, the high ones zero. */
static inline __attribute__((always_inline)) void dots(const int16_t* a, const int8_t* w, int64_t K,
                                                       const int R, const int A, const int P, int64_t (*out)[2]) {
  for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) out[r][i] = 0;
  for (int64_t c0 = 0; c0 < K; c0 += CHUNK) {
    const int64_t c1 = c0 + CHUNK < K ? c0 + CHUNK : K;
    __m512i acc[4][2];
    for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) acc[r][i] = _mm512_setzero_si512();
    int64_t k = c0;
    for (; k + 32 <= c1; k += 32) {
      if (P) { PREFETCH_NEXT_ROWS(w, K, k); PREFETCH_NEXT_ROWS(w, K, k + 16); }
      __m512i av[2];
      for (int i = 0; i < A; i++) av[i] = _mm512_loadu_si512((const void*)(a + i * K + k));
      for (int r = 0; r < R; r++) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * K + k)));
        for (int i = 0; i < A; i++) acc[r][i] = _mm512_dpwssd_epi32(acc[r][i], wv, av[i]);
      }
    }
    if (k < c1) {  /* 16 columns */
      __m512i av[2];
      for (int i = 0; i < A; i++) av[i] = _mm512_maskz_loadu_epi16(0xFFFF, (const void*)(a + i * K + k));
      for (int r = 0; r < R; r++) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(w + r * K + k))));
        for (int i = 0; i < A; i++) acc[r][i] = _mm512_dpwssd_epi32(acc[r][i], wv, av[i]);
      }
    }
    for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) out[r][i] += hsum16(acc[r][i]);
  }
}
#else
static inline __attribute__((always_inline)) void dots(const int16_t* a, const int8_t* w, int64_t K,
                                                       const int R, const int A, const int P, int64_t (*out)[2]) {
  for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) out[r][i] = 0;
  for (int64_t c0 = 0; c0 < K; c0 += CHUNK) {
    const int64_t c1 = c0 + CHUNK < K ? c0 + CHUNK : K;
    __m256i acc[4][2];
    for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) acc[r][i] = _mm256_setzero_si256();
    for (int64_t k = c0; k < c1; k += 16) {
      if (P) PREFETCH_NEXT_ROWS(w, K, k);
      __m256i av[2];
      for (int i = 0; i < A; i++) av[i] = _mm256_loadu_si256((const __m256i*)(a + i * K + k));
      for (int r = 0; r < R; r++) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + r * K + k)));
        for (int i = 0; i < A; i++) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(wv, av[i]));
      }
    }
    for (int r = 0; r < R; r++) for (int i = 0; i < A; i++) out[r][i] += hsum8(acc[r][i]);
  }
}
#endif

/* y [M, N] float32 = x [M, K] (float32, or bf16 where x_bf16) times w [N, K] int8 with scale [N] bf16.
   Returns 0, 1 for a shape it does not take, 2 when out of memory. */
int pangu_int8_mm(const void* x, int64_t x_bf16, const int8_t* w, const uint16_t* scale, float* y,
                  int64_t M, int64_t N, int64_t K, int64_t threads) {
  if (M < 1 || N < 1 || K < 16 || K % 16) return 1;
  int16_t* a = (int16_t*)malloc(sizeof(int16_t) * (size_t)(M * K));
  float* d = (float*)malloc(sizeof(float) * (size_t)M);
  if (!a || !d) { free(a); free(d); return 2; }
  for (int64_t m = 0; m < M; m++) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
      const float v = fabsf(x_bf16 ? bf(((const uint16_t*)x)[m * K + k]) : ((const float*)x)[m * K + k]);
      amax = v > amax || v != v ? v : amax;  /* NaN sticks */
    }
    const float step = amax <= 3.4e38f ? amax / LEVELS : NAN;  /* NaN or infinity in the row: NaN out */
    const float inv = step > 0.0f ? 1.0f / step : 0.0f;
    for (int64_t k = 0; k < K; k++) {
      const float v = x_bf16 ? bf(((const uint16_t*)x)[m * K + k]) : ((const float*)x)[m * K + k];
      a[m * K + k] = (int16_t)(inv > 0.0f ? nearbyintf(v * inv) : 0.0f);
    }
    d[m] = step;
  }
  const int64_t tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && tiles >= 2 * threads)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t n0 = t * TILE_ROWS, n1 = n0 + TILE_ROWS < N ? n0 + TILE_ROWS : N;
    for (int64_t m = 0; m < M; m += 2) {
      const int A = M - m >= 2 ? 2 : 1;
      const int16_t* am = a + m * K;
      for (int64_t n = n0; n < n1; n += 4) {
        const int R = n1 - n >= 4 ? 4 : (int)(n1 - n);
        int64_t s[4][2];
        if (R == 4) {
          if (A == 2) dots(am, w + n * K, K, 4, 2, m == 0, s); else dots(am, w + n * K, K, 4, 1, m == 0, s);
        } else {
          for (int r = 0; r < R; r++) {
            if (A == 2) dots(am, w + (n + r) * K, K, 1, 2, 0, s + r); else dots(am, w + (n + r) * K, K, 1, 1, 0, s + r);
          }
        }
        for (int r = 0; r < R; r++)
          for (int i = 0; i < A; i++)
            y[(m + i) * N + n + r] = (float)((double)s[r][i] * (double)d[m + i] * (double)bf(scale[n + r]));
      }
    }
  }
  free(a);
  free(d);
  return 0;
}
"""


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("aten", "off", "0", "none")


def forced() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("own", "on", "1")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None where it cannot run here (then aten's int8 kernel runs)."""
    if disabled() or platform.machine() not in ("x86_64", "AMD64") or "avx2" not in cpu_flags():
        return None
    lib = kernel_library("int8_avx2", SOURCE, "int8 kernel", "using aten's")
    if lib is None or lib.pangu_int8_abi() != 1:
        return None
    fn = lib.pangu_int8_mm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    return lib


def matmul(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 or bf16 times int8 data [N, K] with bf16 scales [N] -> [M, N] float32."""
    lib = library()
    if (
        lib is None
        or x.dim() != 2
        or x.dtype not in (torch.float32, torch.bfloat16)
        or data.dtype != torch.int8
        or data.dim() != 2
        or x.shape[1] != data.shape[1]
        or data.shape[1] % COLUMNS
        or scales.dtype != torch.bfloat16
        or scales.shape != (data.shape[0],)
        or not (data.is_contiguous() and scales.is_contiguous())
    ):
        raise ValueError(
            f"int8 kernel: unexpected operands x {tuple(x.shape)} {x.dtype}, weight {tuple(data.shape)} {data.dtype}, "
            f"scales {tuple(scales.shape)} {scales.dtype}"
        )
    x = x.contiguous()
    y = torch.empty(x.shape[0], data.shape[0], dtype=torch.float32)
    if x.shape[0]:
        rc = lib.pangu_int8_mm(x.data_ptr(), int(x.dtype == torch.bfloat16), data.data_ptr(), scales.data_ptr(), y.data_ptr(),
                               x.shape[0], data.shape[0], data.shape[1], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"int8 kernel refused x {tuple(x.shape)}, weight {tuple(data.shape)} ({rc})")
    return y


# A plain Library registration (as quant/cpu_int4.py's): opaque to inductor inside a compiled step.
_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("int8_own_mm(Tensor x, Tensor data, Tensor scales) -> Tensor")


def _int8_own_mm(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return matmul(x, data, scales)


def _int8_own_mm_shape(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], data.shape[0], dtype=torch.float32)


_lib.impl("int8_own_mm", _int8_own_mm, "CPU")
_lib._register_fake("int8_own_mm", _int8_own_mm_shape)


def native_op() -> bool:
    """Point `pangu_infer::int8_native_mm` (pangu_infer.native_ops: the product registered from
    C++, no Python between a compiled graph and the kernel) at this kernel; True when compiled
    graphs call it from now on, False where the kernel or the operators are not built here."""
    return native_ops.connect("int8", library, "pangu_int8_mm", "int8_native_mm", _int8_own_mm_shape)


def product(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The product as the caller's context wants it: while compiling the C++ operator where it is
    connected (native_op), else the Python one; eagerly the C function."""
    if tracing():
        if native_ops.connected("int8"):
            return torch.ops.pangu_infer.int8_native_mm(x, data, scales)
        return torch.ops.pangu_infer.int8_own_mm(x, data, scales)
    return matmul(x, data, scales)


MEASURE_N, MEASURE_K, MEASURE_COUNT = 2048, 2048, 8  # 32 MB of int8: beyond the caches


def measure() -> dict[str, float]:
    """Seconds for one-row products over MEASURE_COUNT weights, each kernel (medians of interleaved passes)."""
    g = torch.Generator().manual_seed(0)
    weights = [
        (torch.randint(-127, 128, (MEASURE_N, MEASURE_K), dtype=torch.int8, generator=g),
         (torch.rand(MEASURE_N, generator=g) * 0.01).to(torch.bfloat16))
        for _ in range(MEASURE_COUNT)
    ]
    x = torch.randn(1, MEASURE_K, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        return interleaved_medians({
            "own": lambda: [matmul(x, w, s) for w, s in weights],
            "aten": lambda: [torch.ops.aten._weight_int8pack_mm(x, w, s) for w, s in weights],
        })


@functools.lru_cache(maxsize=None)
def chosen() -> bool:
    """Is this package's kernel the one to use here: forced, else measured once per machine."""
    if disabled() or library() is None:
        return False
    if forced() or not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU"):
        return True
    return own_kernel_measured_faster("int8_decode_kernel", measure, "int8 kernel")


def usable(in_features: int) -> bool:
    """Does this machine run the kernel (and is it the faster one here) for weights of this width?"""
    return in_features % COLUMNS == 0 and library() is not None and chosen()


__all__ = ["COLUMNS", "ENV", "chosen", "disabled", "forced", "library", "matmul", "native_op", "measure", "product", "usable"]
