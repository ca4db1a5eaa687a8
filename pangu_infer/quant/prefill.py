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
from torch import nn


ENV = "PANGU_INFER_COMPILED_DEQUANT"
SCRATCH_MAX_BYTES = 32 << 20  # bigger converted weights (a vocabulary head) are allocated per product
_INT4_BLOCK = 64  # rows per block of the packed int4 layout

logger = logging.getLogger("pangu_infer.quant")
_lib: Optional[tuple] = None  # (int4 fn, int8 fn) once built and checked
_failed: Optional[str] = None
_lock = threading.Lock()
_local = threading.local()

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
    const __m512 s = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(scale + r0))), 16));
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)k));
    const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const int8_t* base = w + r0 * k;
    for (int64_t c = 0; c < k; c += 4) {
      const __m512i g = _mm512_i32gather_epi32(idx, (const void*)(base + c), 1);
      for (int j = 0; j < 4; ++j) {
        const __m512i b = _mm512_srai_epi32(_mm512_sllv_epi32(g, _mm512_set1_epi32(24 - 8 * j)), 24);
        __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(b), s));
        u = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
        _mm256_storeu_si256((__m256i*)(out + (c + j) * n + r0), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
      }
    }
  }
  return 1;
#else
  return 0;
#endif
}
"""


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _scratch(key: tuple, shape: tuple) -> torch.Tensor:
    """A bf16 buffer of `shape` kept for this key and thread (the conversion overwrites it each
    product: its result is only read by that product). Big ones are not kept."""
    if 2 * shape[0] * shape[1] > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=torch.bfloat16)
    buffers = _local.__dict__.setdefault("buffers", {})
    # A buffer made under inference_mode is an inference tensor, which may not be written outside
    # it (and the other way round is fine but would keep two kinds apart anyway): one per mode.
    key = (*key, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(shape, dtype=torch.bfloat16)
    return buf


scratch = _scratch  # for the other conversions of quant/ (cpu_int4's layout)


# ---------------------------------------------------------------------------------- int4


def _int4_eager(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # the same formula without out= into strided views (dynamo refuses those)
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
    return _lib if enabled() and not torch.compiler.is_compiling() else None


def int4_to_bf16(data: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    """W^T [K, N] in bf16 from the packed int4 layout (N a multiple of 64)."""
    lib = _usable()
    if lib is None or not _int4_fits(data, group_size, scales):
        return _int4_eager(data, group_size, scales)
    n, k = data.shape[0], data.shape[1] * 2
    out = _scratch(("int4", n, k), (k, n))
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
    if torch.compiler.is_compiling():
        return _int8_eager(data, scales)
    out = _scratch(("int8", *data.shape), tuple(data.shape))
    if lib is None or not _int8_fits(data, scales):
        return _int8_eager(data, scales, out)
    lib[1](data.data_ptr(), scales.data_ptr(), out.data_ptr(), data.shape[0], data.shape[1], torch.get_num_threads())
    return out


def int8_product(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 times the int8 weight converted to bf16 (scales folded in): [M, N]."""
    lib = _usable()
    if lib is not None and _int8_fits(data, scales):
        n, k = data.shape
        w_t = _scratch(("int8_t", n, k), (k, n))
        if lib[2](data.data_ptr(), scales.data_ptr(), w_t.data_ptr(), n, k, torch.get_num_threads()):
            return torch.matmul(x, w_t)
    return torch.nn.functional.linear(x, int8_to_bf16(data, scales))


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
    f4.restype = f8.restype = None
    f8t.restype = ctypes.c_int
    f4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    f8.argtypes = f8t.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    return f4, f8, f8t


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


__all__ = ["ENV", "scratch", "dequantize_int4_cpu_packed", "enabled", "int4_cpu_layout_ok", "int4_to_bf16", "int8_product", "int8_to_bf16", "prepare", "ready"]
