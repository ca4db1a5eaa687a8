"""The weight conversion of quantized CPU products with many rows (prefill), one C++ loop.

From a row count measured per machine (quant/tuning.py), an int4 or int8 CPU product converts its
weight to bf16 and runs one oneDNN product. With AMX the product is fast enough that the
conversion matters: in eager PyTorch the int4 one is five passes over the weight with fp32
temporaries and took longer than the product it feeds (benchmarks/RESULTS.md, "Quantized prefill:
one fused conversion"). Here each conversion is one vectorized C++ loop (`_SOURCE`), built with
inductor's own compiler setup (the C++ compiler compiled decode needs, its flags, its cache
directory) and called through ctypes, written into a buffer kept per shape and thread so that it
is still in cache when the product reads it:

- int4 (the aten kernel's packed layout, see `dequantize_int4_cpu_packed`): q * s + (z - 8 s) in
  fp32, rounded to bf16 once (to nearest even), W^T [K, N];
- int8: q * s in fp32, rounded to bf16 once, with the scale folded in (the product's output is
  then not scaled and rounded a second time); written as W^T [K, N] where the CPU has AVX-512
  (oneDNN multiplies by a row-major W^T faster), else as W [N, K].

- int8 and cpu_int4's int4 layout, where the check passes: straight into oneDNN's packed bf16
  layout, multiplied by the bf16 model's own product (section "into oneDNN's packed layout").

Their eager versions (`_int4_eager`, `_int8_eager`) compute the same formulas; they run until the
library is built, wherever building it fails, and when `PANGU_INFER_COMPILED_DEQUANT=0`. Building
never happens inside a request: `prepare(model)` builds the library (seconds; a cache hit after
the first time), checks it against the eager conversions and only then publishes it. The engine
calls it from its background compile thread after the decode step (engine/runner.py).
(torch.compile of the same formulas was measured too: its loops came out two to three times
slower, and each call paid dynamo's guards; RESULTS.md.)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Optional

import torch

from pangu_infer.device import cpu_has_bf16, tracing
from pangu_infer.quant import cpu_int4
from pangu_infer.quant.c_simd import BF16_AVX512, INT4_OCTET, TRANSPOSE16_EPI32
from pangu_infer.quant.scratch import SCRATCH_MAX_BYTES, scratch, thread_buffers


ENV = "PANGU_INFER_COMPILED_DEQUANT"
_INT4_BLOCK = 64  # rows per block of the packed int4 layout

logger = logging.getLogger("pangu_infer.quant")
_lib: Optional[tuple] = None  # (int4 fn, int8 fn) once built and checked
_failed: Optional[str] = None
_lock = threading.Lock()

# Inductor compiles with -fno-tree-loop-vectorize (it vectorizes its own loops); these loops rely on
# GCC's vectorizer, hence the pragma (clang ignores it and vectorizes at -O3 anyway).
_SOURCE = r"""
#pragma GCC optimize ("tree-loop-vectorize")
#include <stdint.h>
#include <string.h>
#include <limits.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
@BF16_AVX512@
#endif

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
// Round to nearest even, as torch's float -> bfloat16 conversion (no NaN here: finite scales).
static inline uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16); }

// data: [n/64][k][32] bytes (low nibble row d, high nibble row 32 + d of each 64-row block);
// sz: bf16 [k/g][n][2] (scale, zero); out: bf16 W^T [k][n]. Weight = (q - 8) * scale + zero.
extern "C" void pangu_int4_to_bf16(const uint8_t* data, const uint16_t* sz, uint16_t* out,
                                   int64_t n, int64_t k, int64_t g, int threads) {
  const int64_t groups = k / g, blocks = n / 64;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int64_t kg = 0; kg < groups; ++kg) {
    float s[64], z[64];
    const uint16_t* szr = sz + kg * n * 2;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int j = 0; j < 64; ++j) {
        const float sc = bf2f(szr[2 * (b * 64 + j)]);
        s[j] = sc;
        z[j] = bf2f(szr[2 * (b * 64 + j) + 1]) - 8.0f * sc;
      }
      for (int64_t kk = kg * g; kk < (kg + 1) * g; ++kk) {
        const uint8_t* src = data + (b * k + kk) * 32;
        uint16_t* o = out + kk * n + b * 64;
        for (int d = 0; d < 32; ++d) {
          const uint8_t v = src[d];
          o[d] = f2bf((float)(v & 15) * s[d] + z[d]);
          o[32 + d] = f2bf((float)(v >> 4) * s[32 + d] + z[32 + d]);
        }
      }
    }
  }
}

// w: int8 [n][k]; scale: bf16 [n]; out: bf16 [n][k] = w * scale.
extern "C" void pangu_int8_to_bf16(const int8_t* w, const uint16_t* scale, uint16_t* out,
                                   int64_t n, int64_t k, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int64_t r = 0; r < n; ++r) {
    const float s = bf2f(scale[r]);
    const int8_t* src = w + r * k;
    uint16_t* o = out + r * k;
    for (int64_t c = 0; c < k; ++c) o[c] = f2bf((float)src[c] * s);
  }
}

// The same, written transposed: out = W^T [k][n]. oneDNN multiplies by a row-major W^T faster
// than by W (RESULTS.md). Sixteen rows at a time: one gather takes 4 bytes of each row, and each
// of the 4 columns is stored as 16 contiguous bf16. Only built with AVX-512 (else returns 0).
extern "C" int pangu_int8_to_bf16_t(const int8_t* w, const uint16_t* scale, uint16_t* out,
                                    int64_t n, int64_t k, int threads) {
#ifdef __AVX512F__
  if (n % 16 || k % 4 || k * 16 > INT32_MAX) return 0;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
  for (int64_t r0 = 0; r0 < n; r0 += 16) {
    const __m512 s = bf16x16(scale + r0);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)k));
    const int8_t* base = w + r0 * k;
    for (int64_t c = 0; c < k; c += 4) {
      const __m512i g = _mm512_i32gather_epi32(idx, (const void*)(base + c), 1);
      for (int j = 0; j < 4; ++j) {
        const __m512i b = _mm512_srai_epi32(_mm512_sllv_epi32(g, _mm512_set1_epi32(24 - 8 * j)), 24);
        const __m512i r = round_bf16x16_finite(_mm512_mul_ps(_mm512_cvtepi32_ps(b), s));  // finite scales
        _mm256_storeu_si256((__m256i*)(out + (c + j) * n + r0), _mm512_cvtepi32_epi16(r));
      }
    }
  }
  return 1;
#else
  return 0;
#endif
}

#ifdef __AVX512F__
// oneDNN's packed bf16 layout of a weight W [n][k] ("general" hint, checked at run time by
// packed_layout_ok): [n/rb][k/2][rb][2], i.e. per block of rb rows (32 with AMX), k in pairs, each
// pair of a row one 32-bit word (even k low half). The loops go by 16 rows: for 16-row block b and
// pair p, 16 words at packed_at(b, p); blocks [b0, b1) are written (b0 * 16 a multiple of rb),
// relative to out = the start of row block b0.
static inline int64_t packed_at(int64_t b, int64_t b0, int64_t p, int64_t k, int64_t rb) {
  const int64_t r = b * 16 - b0 * 16;
  return (r / rb) * rb * k + p * rb * 2 + (r % rb) * 2;
}
// the even and odd k of 16 rows (finite: weights from finite scales) -> the 16 words of one pair, each
// value rounded to bf16 (round_bf16x16_top), even k in the low half
static inline __m512i pair_words(__m512 even, __m512 odd) {
  return _mm512_or_si512(_mm512_srli_epi32(round_bf16x16_top(even), 16),
                         _mm512_and_si512(round_bf16x16_top(odd), _mm512_set1_epi32((int)0xffff0000u)));
}

@INT4_OCTET@
// From cpu_int4's layout: w [n/16][k/8][16][4 bytes] (byte j of a row: low nibble k = 8o + j, high
// nibble k = 8o + 4 + j), sz bf16 [n/16][k/g][zs][16] (scale, then zero where zs == 2; zs == 1: scales
// only, zeros 0); weight = q * s + (z - 8 s) in fp32, one fused multiply-add, rounded once: the same
// values as pangu_int4_to_bf16_t.
// Block b (16 rows); zs a constant at each call: no test per octet.
static inline __attribute__((always_inline)) void int4v_block(const uint8_t* w, const uint16_t* sz, uint16_t* out, int64_t k,
                                                              int64_t g, const int64_t zs, int64_t rb, int64_t b0, int64_t b) {
  const int64_t ng = k / g, octets = k / 8, gs = 16 * zs;
  const uint8_t* p = w + b * octets * 64;
  const uint16_t* sp = sz + b * ng * gs;
  for (int64_t o = 0; o < octets; o++, p += 64) {
    __m512 lo[4], hi[4];
    int4_octet(p, sp + ((8 * o) / g) * gs, zs, lo, hi);
    // pairs 4o .. 4o + 3: k = 8o + (0, 1), (2, 3) from the low nibbles, (4, 5), (6, 7) from the high ones
    _mm512_storeu_si512((void*)(out + packed_at(b, b0, 4 * o, k, rb)), pair_words(lo[0], lo[1]));
    _mm512_storeu_si512((void*)(out + packed_at(b, b0, 4 * o + 1, k, rb)), pair_words(lo[2], lo[3]));
    _mm512_storeu_si512((void*)(out + packed_at(b, b0, 4 * o + 2, k, rb)), pair_words(hi[0], hi[1]));
    _mm512_storeu_si512((void*)(out + packed_at(b, b0, 4 * o + 3, k, rb)), pair_words(hi[2], hi[3]));
  }
}

extern "C" int pangu_int4v_to_packed(const uint8_t* w, const uint16_t* sz, uint16_t* out, int64_t n,
                                     int64_t k, int64_t g, int64_t zs, int64_t rb, int64_t b0, int64_t b1, int threads) {
  if (n % rb || rb % 16 || (b0 * 16) % rb || g % 8 || g < 8 || k % g || zs < 1 || zs > 2) return 0;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && b1 - b0 >= 2 * threads)
  for (int64_t b = b0; b < b1; ++b) {
    if (zs == 2) int4v_block(w, sz, out, k, g, 2, rb, b0, b);
    else int4v_block(w, sz, out, k, g, 1, rb, b0, b);
  }
  return 1;
}

@TRANSPOSE16@
// From int8 [n][k] and a bf16 scale per row: w * scale in fp32, rounded once (as pangu_int8_to_bf16).
extern "C" int pangu_int8_to_packed(const int8_t* w, const uint16_t* scale, uint16_t* out, int64_t n,
                                    int64_t k, int64_t rb, int64_t b0, int64_t b1, int threads) {
  if (n % rb || rb % 16 || (b0 * 16) % rb || k % 4 || k * 16 > INT32_MAX) return 0;
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && b1 - b0 >= 2 * threads)
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = b * 16;
    const __m512 s = bf16x16(scale + r0);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)k));
    const int8_t* base = w + r0 * k;
    int64_t c = 0;
    // 64 columns at a time: one 64-byte load per row and a 16 x 16 transpose of 32-bit words
    // (the gather below, 16 loads per 4 columns, for the rest)
    for (; c + 64 <= k; c += 64) {
      __m512i v[16];
      transpose16_epi32(base + c, k, v);
      for (int j = 0; j < 16; j++) {  // v[j]: lane i = row r0 + i, columns c + 4j .. c + 4j + 3
        __m512 r[4];
        for (int h = 0; h < 4; ++h)
          r[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(v[j], _mm512_set1_epi32(24 - 8 * h)), 24)), s);
        _mm512_storeu_si512((void*)(out + packed_at(b, b0, (c + 4 * j) / 2, k, rb)), pair_words(r[0], r[1]));
        _mm512_storeu_si512((void*)(out + packed_at(b, b0, (c + 4 * j) / 2 + 1, k, rb)), pair_words(r[2], r[3]));
      }
    }
    for (; c < k; c += 4) {
      const __m512i gv = _mm512_i32gather_epi32(idx, (const void*)(base + c), 1);
      __m512 r[4];
      for (int j = 0; j < 4; ++j)
        r[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(gv, _mm512_set1_epi32(24 - 8 * j)), 24)), s);
      _mm512_storeu_si512((void*)(out + packed_at(b, b0, c / 2, k, rb)), pair_words(r[0], r[1]));
      _mm512_storeu_si512((void*)(out + packed_at(b, b0, c / 2 + 1, k, rb)), pair_words(r[2], r[3]));
    }
  }
  return 1;
}
#else
extern "C" int pangu_int4v_to_packed(const uint8_t* w, const uint16_t* sz, uint16_t* out, int64_t n, int64_t k, int64_t g, int64_t zs, int64_t rb, int64_t b0, int64_t b1, int threads) { return 0; }
extern "C" int pangu_int8_to_packed(const int8_t* w, const uint16_t* scale, uint16_t* out, int64_t n, int64_t k, int64_t rb, int64_t b0, int64_t b1, int threads) { return 0; }
#endif
""".replace("@TRANSPOSE16@", TRANSPOSE16_EPI32).replace("@BF16_AVX512@", BF16_AVX512).replace("@INT4_OCTET@", INT4_OCTET)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")




# ---------------------------------------------------------------------------------- int4


def _int4_eager(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    if tracing():  # the same formula without out= into strided views (dynamo refuses those)
        n, k = data.shape[0], data.shape[1] * 2
        v = data.view(n // _INT4_BLOCK, k, 32).permute(1, 0, 2)
        codes = torch.stack((v & 15, v >> 4), dim=2).reshape(k // group_size, group_size, n).float()
        scale = scales[..., 0].unsqueeze(1).float()
        base = scales[..., 1].unsqueeze(1).float() - 8 * scale
        return (codes * scale + base).to(torch.bfloat16).view(k, n)
    return dequantize_int4_cpu_packed(data, group_size, scales)


def _int4_fits(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> bool:
    n, k = data.shape[0], data.shape[1] * 2
    return (
        data.dtype == torch.uint8 and scales.dtype == torch.bfloat16 and data.is_contiguous()
        and scales.is_contiguous() and n % _INT4_BLOCK == 0 and k % group_size == 0
        and tuple(scales.shape) == (k // group_size, n, 2)
    )


def _usable() -> Optional[tuple]:
    # Inside a graph dynamo traces (a compiled decode step with many rows), the eager formulas:
    # dynamo cannot trace a ctypes call, and inductor fuses those itself.
    return _lib if enabled() and not tracing() else None


def int4_to_bf16(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    """W^T [K, N] in bf16 from the packed int4 layout (N a multiple of 64)."""
    lib = _usable()
    if lib is None or not _int4_fits(data, group_size, scales):
        return _int4_eager(data, group_size, scales)
    n, k = data.shape[0], data.shape[1] * 2
    out = scratch(("int4", n, k), (k, n))
    lib[0](data.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, group_size, torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------------- int8


def _int8_eager(data: torch.Tensor, scales: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # One pass: the int8 values are exact in bf16, the product is computed in fp32 and rounded once.
    out = torch.empty(data.shape, dtype=torch.bfloat16) if out is None else out
    return torch.mul(data, scales.to(torch.bfloat16).unsqueeze(1), out=out)


def _int8_fits(data: torch.Tensor, scales: torch.Tensor) -> bool:
    return (
        data.dtype == torch.int8 and scales.dtype == torch.bfloat16 and data.is_contiguous()
        and scales.is_contiguous() and tuple(scales.shape) == tuple(data.shape[:1])
    )


def int8_to_bf16(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W [N, K] in bf16 with each row's scale folded in."""
    lib = _usable()
    if tracing():
        return _int8_eager(data, scales)
    out = scratch(("int8", *data.shape), tuple(data.shape))
    if lib is None or not _int8_fits(data, scales):
        return _int8_eager(data, scales, out)
    lib[1](data.data_ptr(), scales.data_ptr(), out.data_ptr(), data.shape[0], data.shape[1], torch.get_num_threads())
    return out


# Read once at import: a graph dynamo traces through weight_product reads a plain bool (the op behind
# cpu_has_bf16 returns a non-tensor, which dynamo cannot trace).
_NATIVE_BF16 = cpu_has_bf16()


def weight_product(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x [M, K] times a converted bf16 weight (W^T [K, N] when `transposed`, else W [N, K]): one
    oneDNN product where the CPU multiplies bf16 natively. Where it only emulates bf16
    (device.cpu_has_bf16: AVX2-only x86), the same bf16 operands multiplied in fp32 and the result
    rounded to x's dtype: 6x (W) to 40x (W^T) faster there (benchmarks/RESULTS.md, "A CPU without
    native bf16"), and the same sums (fp32 either way)."""
    if x.dtype == torch.float32 or not _NATIVE_BF16:
        y = torch.matmul(x.float(), w.float()) if transposed else torch.nn.functional.linear(x.float(), w.float())
        return y.to(x.dtype)
    return torch.matmul(x, w) if transposed else torch.nn.functional.linear(x, w)


def int8_product(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 times the int8 weight converted to bf16 (scales folded in): [M, N]."""
    y = int8_packed_product(x, data, scales)
    if y is not None:
        return y
    lib = _usable()
    if lib is not None and _int8_fits(data, scales):
        n, k = data.shape
        w_t = scratch(("int8_t", n, k), (k, n))
        if lib[2](data.data_ptr(), scales.data_ptr(), w_t.data_ptr(), n, k, torch.get_num_threads()):
            return weight_product(x, w_t, True)
    return weight_product(x, int8_to_bf16(data, scales), False)


# ---------------------------------------------------------------------------------- the eager conversion of the aten int4 layout


def dequantize_int4_cpu_packed(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    """W^T [K, N] in bf16 from `_convert_weight_to_int4pack_for_cpu`'s layout.

    data: uint8 [N, K/2] as packed (N a multiple of 64): blocks of 64 rows, each [K, 32] bytes
    whose low nibble is row d and high nibble row 32 + d. scales: [K/G, N, 2] (scale, zero).
    W^T comes out with N innermost, so each group's scale and zero broadcast over its G rows.
    """
    n = data.shape[0]
    k = data.shape[1] * 2
    nb = n // 64
    v = data.view(nb, k, 32).permute(1, 0, 2)  # [K, nb, 32]
    codes = torch.empty(k, nb, 2, 32, dtype=torch.uint8, device=data.device)
    torch.bitwise_and(v, 15, out=codes[:, :, 0])
    torch.bitwise_right_shift(v, 4, out=codes[:, :, 1])
    w = codes.view(k // group_size, group_size, n).to(torch.float32)
    scale = scales[..., 0].unsqueeze(1).float()  # [K/G, 1, N]
    # (q - 8) s + z = q s + (z - 8 s), in fp32 (bf16 addcmul takes a slow path on CPU), rounded to
    # bf16 once: each weight is within half a bf16 step of the kernel's own value, the rounding a
    # float bf16 weight has anyway.
    base = scales[..., 1].unsqueeze(1).float() - 8 * scale
    return torch.addcmul(base, w, scale, out=w).to(torch.bfloat16).view(k, n)


@functools.lru_cache(maxsize=None)
def int4_cpu_layout_ok() -> bool:
    """Does dequantize_int4_cpu_packed read this CPU's packed layout right? (checked by packing)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_convert_weight_to_int4pack_for_cpu", "CPU"):
        return False
    g = torch.Generator().manual_seed(0)
    n, k, group = 128, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = torch.stack((torch.ones(k // group, n), torch.zeros(k // group, n)), -1).to(torch.bfloat16)
    if packed.shape != (n, k // 2) or packed.dtype != torch.uint8:
        return False
    got = dequantize_int4_cpu_packed(packed, group, scales)
    return torch.equal(got.t().float(), (q - 8).float())



# ---------------------------------------------------------------------------------- preparing


def _build() -> tuple:
    from torch._inductor.codecache import CppCodeCache

    from pangu_infer.native import compile_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    lib = CppCodeCache.load(_SOURCE)
    f4, f8, f8t = lib.pangu_int4_to_bf16, lib.pangu_int8_to_bf16, lib.pangu_int8_to_bf16_t
    p4, p8 = lib.pangu_int4v_to_packed, lib.pangu_int8_to_packed
    f4.restype = f8.restype = None
    f8t.restype = p4.restype = p8.restype = ctypes.c_int
    f4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    f8.argtypes = f8t.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    p4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7 + [ctypes.c_int]
    p8.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    return f4, f8, f8t, p4, p8


def _check(lib: tuple) -> None:
    """The built loops against the eager conversions, on random weights of two blocks."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 128, 256, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = (torch.randn(k // group, n, 2, generator=g) * 0.02).to(torch.bfloat16)
    out = torch.empty(k, n, dtype=torch.bfloat16)
    for threads in (1, 2):
        lib[0](data.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, group, threads)
        _same("int4", out, _int4_eager(data, group, scales))
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) * 0.02).to(torch.bfloat16)
    out8 = torch.empty(n, k, dtype=torch.bfloat16)
    out8t = torch.empty(k, n, dtype=torch.bfloat16)
    for threads in (1, 2):
        lib[1](w8.data_ptr(), s8.data_ptr(), out8.data_ptr(), n, k, threads)
        _same("int8", out8, _int8_eager(w8, s8))
        if lib[2](w8.data_ptr(), s8.data_ptr(), out8t.data_ptr(), n, k, threads):
            _same("int8 (transposed)", out8t, _int8_eager(w8, s8).t())
    rb = packed_rows(n, k)
    if rb:
        if cpu_int4.library() is not None:
            qv = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
            sv = torch.rand(n, k // group, generator=g) * 0.02
            for zv in (torch.rand(n, k // group, generator=g) * 0.02, None):  # zeros stored, scales only
                dv, szv = cpu_int4.pack(qv, sv, zv)
                want = cpu_int4.dequantize_t(dv, szv, group).t()
                for threads in (1, 2):
                    got = _to_packed_raw(lib[3], (dv, szv, group), n, k, rb, threads)
                    _same("int4 (packed)", got, _pack_plain(want, rb))
        for threads in (1, 2):
            got = _to_packed_raw(lib[4], (w8, s8), n, k, rb, threads)
            _same("int8 (packed)", got, _pack_plain(_int8_eager(w8, s8), rb))


def _same(kind: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # The same formula in fp32; a fused multiply-add may round a last fp32 bit differently, which
    # bf16 rounding almost always hides: allow one bf16 step.
    if not torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0):
        raise RuntimeError(f"the compiled {kind} conversion differs from the eager one")


def prepare() -> Optional[str]:
    """Build and check the conversion loops (once per process; a cache hit after the first time):
    None when they are ready, else why the conversions stay eager. Never called inside a request:
    the engine's background compile thread calls it through
    `pangu_infer.quant.modules.prepare_prefill(model)`, which also retunes the model's weights."""
    global _lib, _failed
    if not enabled():
        return f"{ENV}=0"
    with _lock:
        if _lib is not None:
            return None
        if _failed is not None:
            return _failed
        from pangu_infer.native import compile_problem

        problem = compile_problem(torch.device("cpu"))
        if problem is not None:
            return problem
        try:
            lib = _build()
            with torch.inference_mode():
                _check(lib)
        except Exception as e:  # noqa: BLE001  any compiler/loader failure: the eager conversion still works
            logger.info("building the quantized prefill conversions failed", exc_info=True)
            _failed = f"{type(e).__name__}: {str(e).strip()[:200]}"
            return _failed
        _lib = lib
        return None


def ready() -> bool:
    return _lib is not None and enabled()


# ---------------------------------------------------------------------------------- into oneDNN's packed layout
#
# The bf16 peer multiplies by a weight oneDNN laid out once at load (models/packed.py); a product on
# a plain bf16 weight makes oneDNN re-lay it on every call, which at 512 rows cost about as much as
# the conversion itself (RESULTS.md, "Quantized prefill into oneDNN's packed layout"). So the int4
# (cpu_int4's layout) and int8 products of many rows convert straight into that packed layout, in
# an opaque oneDNN tensor kept per shape and thread whose memory the conversion overwrites, and run
# the peer's own product on it. The layout is not a documented format: `packed_layout_ok` checks it
# against oneDNN's own reorder, per shape, before it is ever written; where it differs the products
# convert to a plain W^T as before. PANGU_INFER_PACKED_PREFILL=0 turns this off.

PACKED_ENV = "PANGU_INFER_PACKED_PREFILL"
_ROWS = 16  # rows per step of the loops (the layout's row blocks are a multiple: 32 with AMX)
_PACKED_ROW_BLOCKS = (32, 16, 64)  # the layouts `packed_rows` tries


def packed_enabled() -> bool:
    return os.environ.get(PACKED_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _pack_plain(w: torch.Tensor, rb: int) -> torch.Tensor:
    """W [n, k] bf16 laid out as [n/rb][k/2][rb][2] (the layout the loops write), flat."""
    n, k = w.shape
    return w.reshape(n // rb, rb, k // 2, 2).permute(0, 2, 1, 3).reshape(-1)


def _mkldnn_raw(packed: torch.Tensor) -> torch.Tensor:
    nbytes = torch.ops.mkldnn._nbytes(packed)
    out = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    ctypes.memmove(out.data_ptr(), torch.ops.mkldnn.data_ptr(packed), nbytes)
    return out


@functools.lru_cache(maxsize=None)
def packed_rows(n: int, k: int) -> int:
    """The row block rb where oneDNN lays a bf16 [n, k] weight (no batch hint) out as
    `_pack_plain(w, rb)` here (checked on a random weight against its own reorder), else 0."""
    from pangu_infer.device import can_pack

    if n % _ROWS or k % 4 or n <= 0 or k <= 0 or not can_pack(torch.device("cpu"), torch.bfloat16):
        return 0
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_nbytes") and hasattr(ops, "data_ptr")):
        return 0
    g = torch.Generator().manual_seed(n * 7919 + k)
    with torch.inference_mode(False), torch.no_grad():
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        packed = ops._reorder_linear_weight(w)
        if ops._nbytes(packed) != 2 * n * k:
            return 0
        raw = _mkldnn_raw(packed).view(torch.int16)
        for rb in _PACKED_ROW_BLOCKS:
            if n % rb == 0 and torch.equal(raw, _pack_plain(w, rb).view(torch.int16)):
                return rb
    return 0


def packed_layout_ok(n: int, k: int) -> bool:
    return packed_rows(n, k) > 0


def _packed_scratch(n: int, k: int) -> torch.Tensor:
    """An opaque oneDNN bf16 [n, k] weight kept per shape and thread, whose memory is overwritten."""
    buffers = thread_buffers("packed")
    buf = buffers.get((n, k))
    if buf is None:
        with torch.inference_mode(False), torch.no_grad():
            buf = buffers[(n, k)] = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(n, k, dtype=torch.bfloat16))
    return buf


def _to_packed_raw(fn, args: tuple, n: int, k: int, rb: int, threads: int) -> torch.Tensor:
    """For the check: what loop `fn` writes, as a flat bf16 tensor."""
    out = torch.empty(n * k, dtype=torch.bfloat16)
    if len(args) == 3:
        data, sz, group = args
        ok = fn(data.data_ptr(), sz.data_ptr(), out.data_ptr(), n, k, group, cpu_int4.zero_values(sz), rb, 0, n // _ROWS, threads)
    else:
        data, scales = args
        ok = fn(data.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, rb, 0, n // _ROWS, threads)
    if not ok:
        raise RuntimeError("the packed conversion refused its shape")
    return out


def _packed_usable(n: int, k: int, x: torch.Tensor) -> Optional[tuple]:
    lib = _usable()
    if lib is None or not packed_enabled():
        return None
    if x.dim() != 2 or x.dtype != torch.bfloat16 or not x.is_contiguous() or not packed_layout_ok(n, k):
        return None
    return lib


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


SLICE_ENV = "PANGU_INFER_PACKED_SLICE_KB"
SLICE_KB = 8192


def _slice_rows(n: int, k: int, rb: int) -> int:
    """Rows per slice of a weight converted and multiplied slice by slice: all of them up to about
    SLICE_KB of bf16, else equal slices of at most that size (whole row blocks). A 29 MB converted
    weight (Pangu's 9600 x 1536 gate/up) written whole went out to memory and took 1.4-1.7x longer
    than four slices of 7 MB, each converted then multiplied (RESULTS.md); 4 MB slices paid more
    calls and output copies than they saved. PANGU_INFER_PACKED_SLICE_KB sets the size, 0 = whole."""
    try:
        kb = int(os.environ.get(SLICE_ENV, SLICE_KB))
    except ValueError:
        kb = SLICE_KB
    if kb <= 0 or 2 * n * k <= kb * 1024 * 5 // 4:
        return n
    pieces = -(-2 * n * k // (kb * 1024))
    return -(-(n // rb) // pieces) * rb


def _sliced_product(x: torch.Tensor, n: int, k: int, convert) -> Optional[torch.Tensor]:
    """x times the weight `convert(out_ptr, rb, b0, b1)` writes (16-row blocks b0..b1) into oneDNN's
    packed layout, whole or slice by slice (`_slice_rows`); None where a slice's layout is unchecked."""
    rb = packed_rows(n, k)
    step = _slice_rows(n, k, rb)
    if step >= n:
        if 2 * n * k > SCRATCH_MAX_BYTES:  # slicing turned off: not kept per thread, the plain path runs
            return None
        packed = _packed_scratch(n, k)
        return _packed_linear(x, packed) if convert(torch.ops.mkldnn.data_ptr(packed), rb, 0, n // _ROWS) else None
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    for a in range(0, n, step):
        m = min(step, n - a)
        if packed_rows(m, k) != rb:
            return None
        packed = _packed_scratch(m, k)
        if not convert(torch.ops.mkldnn.data_ptr(packed), rb, a // _ROWS, (a + m) // _ROWS):
            return None
        y[:, a : a + m] = _packed_linear(x, packed)
    return y


def int4_vnni_packed_product(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int) -> Optional[torch.Tensor]:
    """x [M, K] bf16 times a cpu_int4-layout weight converted into oneDNN's packed layout: [M, N]
    (N the padded row count), or None where this path does not run (then the caller converts to W^T)."""
    n, k = data.shape[0] * _ROWS, data.shape[1] * 8
    lib = _packed_usable(n, k, x)
    if lib is None or not (data.is_contiguous() and sz.is_contiguous()) or data.dtype != torch.uint8 or sz.dtype != torch.bfloat16:
        return None
    zs = cpu_int4.zero_values(sz)  # 2: scales and zeros; 1: scales only
    return _sliced_product(x, n, k, lambda out, rb, b0, b1: lib[3](
        data.data_ptr(), sz.data_ptr(), out, n, k, group_size, zs, rb, b0, b1, torch.get_num_threads()))


def int4_vnni_product(x: torch.Tensor, data: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] bf16 times a cpu_int4-layout weight converted to bf16: [M, N] (N the padded row
    count); into oneDNN's packed layout where it is checked, else to a plain W^T."""
    y = int4_vnni_packed_product(x, data, sz, group_size)
    return weight_product(x, cpu_int4.to_bf16_t(data, sz, group_size), True) if y is None else y


def int8_packed_product(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> Optional[torch.Tensor]:
    """x [M, K] bf16 times the int8 weight (scales folded in) in oneDNN's packed layout, or None."""
    n, k = data.shape
    lib = _packed_usable(n, k, x)
    if lib is None or not _int8_fits(data, scales):
        return None
    return _sliced_product(x, n, k, lambda out, rb, b0, b1: lib[4](
        data.data_ptr(), scales.data_ptr(), out, n, k, rb, b0, b1, torch.get_num_threads()))


__all__ = ["ENV", "dequantize_int4_cpu_packed", "enabled", "int4_cpu_layout_ok", "int4_to_bf16", "int4_vnni_packed_product", "int4_vnni_product", "int8_packed_product", "int8_product", "int8_to_bf16", "packed_enabled", "packed_layout_ok", "packed_rows", "prepare", "ready", "weight_product"]
