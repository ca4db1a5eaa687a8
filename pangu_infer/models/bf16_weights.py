"""bf16 weights under float32 activations, for CPUs that do not multiply bf16 natively.

Where a CPU lacks native bf16 products (AVX2-only x86 such as AMD Zen 1-3), models run in float32
(device.default_dtype): oneDNN's emulated bf16 products ran several times slower than fp32 ones.
But the released checkpoints hold bf16 weights: widened to float32 at load they take twice the
memory (openPangu-Embedded-7B: 30 GB instead of 15, more than many machines have) and every
decoded token reads twice the bytes.

So the linear weights stay in bf16 as the checkpoint stores them, and their products run in
float32: for few rows (decode, small batches) a C kernel of this module that widens each weight
tile in registers (bf16 -> fp32 is a 16-bit shift, exact) and multiplies in float32 with FMA,
reading 2 bytes per weight; for many rows (prefill) a blocked product of this module that widens
each panel of weight rows as it packs it (BLIS's loops, a 6 x 16 register tile), where measured
faster than the other way (once per machine): slices of weight rows widened into a small float32
buffer for BLAS's product. The numbers are those of the float32 model (the same
weights, float32 arithmetic; only the order of the sums differs), with half the weight memory
and, on the Zen 1 EPYC of benchmarks/RESULTS.md, 2.3x the one-row speed of float32 `F.linear`.
The token embedding stays bf16 too (rows widened as they are looked up; a tied head multiplies
by the same table).

Used by loader.load_serving_model for a float32 model on CPU whose safetensors checkpoint stores
its 2-D weights in bf16, with no quantization asked, where the kernel builds (x86 with AVX2 and
FMA, a C compiler) and not measured clearly slower than float32 `F.linear` once per machine (key
`bf16_weight_kernel` of pangu_infer.machine's cache). `PANGU_INFER_BF16_WEIGHTS=0` keeps float32
weights; `=1` uses the kernel unmeasured.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer import native_ops
from pangu_infer.device import tracing
from pangu_infer.machine import cached_choice, interleaved_medians
from pangu_infer.native import cpu_flags, kernel_library
from pangu_infer.parallel.state import RowParallelLinear
from pangu_infer.quant.c_simd import BF16_AVX2, TRANSPOSE8

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_BF16_WEIGHTS"
COLUMNS = 8  # in_features must be a multiple of this (one AVX2 vector of floats)
KERNEL_MAX_ROWS = 48  # up to here the kernel; beyond, widened slices and BLAS (crossover ~64 rows on Zen 1)
SLICE_ELEMENTS = 1 << 21  # weights widened at once for many-row products: an 8 MB float32 buffer

SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Weight rows per tile: 64 KB of bf16 at K = 2048, kept in the core's cache while every row of x runs over it. */
#define TILE_ROWS 16

int pangu_bf16w_abi(void) { return 2; }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* 8 bf16 weights widened to float32: c_simd's bf8 (the 16 bits become the high half of each float, exactly). */
@BF16_AVX2@

/* 8 float16 weights widened to float32 (F16C), exactly. */
static inline __m256 widen_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

/* The 4 rows read at once are 4 streams of 2 K bytes. Where they are short (K <= 2048: 4 KB rows or
   less) the hardware's prefetchers do not learn them before the next 4 begin, and one software
   prefetch per 8 columns fetches the next 4 rows' bytes (into L2: the 64 bytes at 8 K + 8 k bytes
   from the first row, the line 4 rows on), in the first pass over a tile only (later rows of x find
   it in the cache). Longer rows stream without it: there it cost 5-10%. The same bits
   (benchmarks/RESULTS.md, "prefetching the next rows"). */
#define PREFETCH_MAX_K 2048
#define PREFETCH_NEXT_ROWS(w, K, k) _mm_prefetch((const char*)((uintptr_t)(w) + 8 * (uintptr_t)(K) + 8 * (uintptr_t)(k)), _MM_HINT_T1)

/* y [M, N] float32 = x [M, K] float32 times w [N, K] bf16 or float16 (transposed). Each output is
   the sum of its row of x against one weight row, in the same order whatever M is. Returns 0, or
   1 for a shape it does not take. */
#define WIDENED_MM(NAME, widen)                                                                                   \
int NAME(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int64_t threads) {       \
  if (M < 1 || N < 1 || K < 8 || K % 8) return 1;                                                                \
  const int64_t tiles = (N + TILE_ROWS - 1) / TILE_ROWS;                                                          \
  _Pragma("omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && tiles >= 2 * threads)") \
  for (int64_t t = 0; t < tiles; t++) {                                                                          \
    const int64_t n0 = t * TILE_ROWS, n1 = n0 + TILE_ROWS < N ? n0 + TILE_ROWS : N;                              \
    for (int64_t m = 0; m < M; m++) {                                                                            \
      const float* xm = x + m * K;                                                                               \
      const int prefetch = m == 0 && K <= PREFETCH_MAX_K;                                                        \
      int64_t n = n0;                                                                                            \
      for (; n + 4 <= n1; n += 4) {                                                                              \
        const uint16_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;                                \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                              \
        for (int64_t k = 0; k < K; k += 8) {                                                                     \
          if (prefetch) PREFETCH_NEXT_ROWS(w0, K, k);                                                            \
          const __m256 xv = _mm256_loadu_ps(xm + k);                                                             \
          a0 = _mm256_fmadd_ps(widen(w0 + k), xv, a0);                                                           \
          a1 = _mm256_fmadd_ps(widen(w1 + k), xv, a1);                                                           \
          a2 = _mm256_fmadd_ps(widen(w2 + k), xv, a2);                                                           \
          a3 = _mm256_fmadd_ps(widen(w3 + k), xv, a3);                                                           \
        }                                                                                                        \
        y[m * N + n] = hsum(a0);                                                                                 \
        y[m * N + n + 1] = hsum(a1);                                                                             \
        y[m * N + n + 2] = hsum(a2);                                                                             \
        y[m * N + n + 3] = hsum(a3);                                                                             \
      }                                                                                                          \
      for (; n < n1; n++) {                                                                                      \
        const uint16_t* wr = w + n * K;                                                                          \
        __m256 a = _mm256_setzero_ps();                                                                          \
        for (int64_t k = 0; k < K; k += 8) a = _mm256_fmadd_ps(widen(wr + k), _mm256_loadu_ps(xm + k), a);      \
        y[m * N + n] = hsum(a);                                                                                  \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  return 0;                                                                                                      \
}

WIDENED_MM(pangu_bf16w_mm, bf8)
WIDENED_MM(pangu_f16w_mm, widen_f16)

/* ---- many rows (prefill): a blocked product that widens the weight as it packs it ----
   y [M, N] = x [M, K] w [N, K]^T as BLAS does it (BLIS's loops), with the weight read in bf16 (or
   float16): each thread takes a range of panels of GEMM_NR weight rows; for each block of GEMM_MC
   rows of x (kept in L2) and GEMM_KC columns, a panel is widened to float32 and transposed into a
   [GEMM_KC][GEMM_NR] buffer (L1), which a 6 x 16 register tile of y multiplies against every
   6 rows of x. Every output sums its K products in the same order (blocks of GEMM_KC, in order),
   whatever M is. On the Zen 3 EPYC of benchmarks/RESULTS.md: 83-86 GFLOPS on one core, 150-175 on
   two, where widened slices into BLAS ran at 85-140 ("stop 46: a blocked product for bf16 weights"). */
#define GEMM_MR 6
#define GEMM_NR 16
#define GEMM_KC 512
#define GEMM_MC 144

@TRANSPOSE8@
/* out[k][j] = w[j][k0 + k] widened, j < GEMM_NR (rows from nr on: zeros), k < kc (a multiple of 8) */
#define PACK_PANEL(NAME, widen)                                                                                  \
static void NAME(const uint16_t* w, int64_t K, int64_t nr, int64_t k0, int64_t kc, float* out) {                \
  for (int64_t k = 0; k < kc; k += 8) {                                                                          \
    for (int half = 0; half < 2; half++) {                                                                       \
      __m256 r[8];                                                                                               \
      for (int j = 0; j < 8; j++) {                                                                              \
        const int64_t row = half * 8 + j;                                                                        \
        r[j] = row < nr ? widen(w + row * K + k0 + k) : _mm256_setzero_ps();                                     \
      }                                                                                                          \
      transpose8(r);                                                                                             \
      for (int j = 0; j < 8; j++) _mm256_store_ps(out + (k + j) * GEMM_NR + half * 8, r[j]);                     \
    }                                                                                                            \
  }                                                                                                              \
}
PACK_PANEL(pack_bf16, bf8)
PACK_PANEL(pack_f16, widen_f16)

/* y[i][0..15] (+)= sum over k < kc of x[i][k] * wp[k][0..15], for R rows i */
#define GEMM_TILE(R)                                                                                             \
static void tile_##R(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy, int add) { \
  __m256 c[R][2];                                                                                                \
  for (int i = 0; i < R; i++) { c[i][0] = _mm256_setzero_ps(); c[i][1] = _mm256_setzero_ps(); }                 \
  for (int64_t k = 0; k < kc; k++) {                                                                             \
    const __m256 b0 = _mm256_load_ps(wp + k * GEMM_NR), b1 = _mm256_load_ps(wp + k * GEMM_NR + 8);               \
    for (int i = 0; i < R; i++) {                                                                                \
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);                                                     \
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);                                                                 \
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);                                                                 \
    }                                                                                                            \
  }                                                                                                              \
  for (int i = 0; i < R; i++) {                                                                                  \
    float* yi = y + i * ldy;                                                                                     \
    if (add) {                                                                                                   \
      c[i][0] = _mm256_add_ps(c[i][0], _mm256_loadu_ps(yi));                                                     \
      c[i][1] = _mm256_add_ps(c[i][1], _mm256_loadu_ps(yi + 8));                                                 \
    }                                                                                                            \
    _mm256_storeu_ps(yi, c[i][0]);                                                                               \
    _mm256_storeu_ps(yi + 8, c[i][1]);                                                                           \
  }                                                                                                              \
}
GEMM_TILE(1) GEMM_TILE(2) GEMM_TILE(3) GEMM_TILE(4) GEMM_TILE(5) GEMM_TILE(6)

static void tile(int r, const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy, int add) {
  switch (r) {
    case 6: tile_6(x, ldx, wp, kc, y, ldy, add); break;
    case 5: tile_5(x, ldx, wp, kc, y, ldy, add); break;
    case 4: tile_4(x, ldx, wp, kc, y, ldy, add); break;
    case 3: tile_3(x, ldx, wp, kc, y, ldy, add); break;
    case 2: tile_2(x, ldx, wp, kc, y, ldy, add); break;
    default: tile_1(x, ldx, wp, kc, y, ldy, add); break;
  }
}

/* Same contract as pangu_bf16w_mm: 0, or 1 for a shape it does not take. */
#define BLOCKED_MM(NAME, pack)                                                                                   \
int NAME(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K, int64_t threads) {       \
  if (M < 1 || N < 1 || K < 8 || K % 8) return 1;                                                                \
  const int64_t panels = (N + GEMM_NR - 1) / GEMM_NR;                                                            \
  _Pragma("omp parallel num_threads(threads > 1 ? threads : 1) if(threads > 1 && panels >= 2 * threads)")        \
  {                                                                                                              \
    float wp[GEMM_KC * GEMM_NR] __attribute__((aligned(64)));                                                    \
    float edge[GEMM_MR * GEMM_NR];                                                                               \
    int t = 0, T = 1;                                                                                            \
    PANGU_OMP_THREAD(t, T);                                                                                      \
    const int64_t p0 = panels * t / T, p1 = panels * (t + 1) / T;                                                \
    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MC) {                                                                \
      const int64_t m1 = M - m0 < GEMM_MC ? M : m0 + GEMM_MC;                                                    \
      for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {                                                              \
        const int64_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;                                                  \
        for (int64_t p = p0; p < p1; p++) {                                                                      \
          const int64_t n0 = p * GEMM_NR, nr = N - n0 < GEMM_NR ? N - n0 : GEMM_NR;                              \
          pack(w + n0 * K, K, nr, k0, kc, wp);                                                                   \
          for (int64_t m = m0; m < m1; m += GEMM_MR) {                                                           \
            const int r = m1 - m < GEMM_MR ? (int)(m1 - m) : GEMM_MR;                                            \
            if (nr == GEMM_NR) {                                                                                 \
              tile(r, x + m * K + k0, K, wp, kc, y + m * N + n0, N, k0 > 0);                                     \
            } else { /* the last panel's rows past N: through a tile of its own */                               \
              for (int i = 0; i < r; i++)                                                                        \
                for (int j = 0; j < nr; j++) edge[i * GEMM_NR + j] = k0 > 0 ? y[(m + i) * N + n0 + j] : 0.f;     \
              tile(r, x + m * K + k0, K, wp, kc, edge, GEMM_NR, 1);                                              \
              for (int i = 0; i < r; i++)                                                                        \
                for (int j = 0; j < nr; j++) y[(m + i) * N + n0 + j] = edge[i * GEMM_NR + j];                    \
            }                                                                                                    \
          }                                                                                                      \
        }                                                                                                        \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  return 0;                                                                                                      \
}
#ifdef _OPENMP
#define PANGU_OMP_THREAD(t, T) do { t = omp_get_thread_num(); T = omp_get_num_threads(); } while (0)
#else
#define PANGU_OMP_THREAD(t, T) do { } while (0)
#endif
BLOCKED_MM(pangu_bf16w_gemm, pack_bf16)
BLOCKED_MM(pangu_f16w_gemm, pack_f16)
""".replace("@TRANSPOSE8@", TRANSPOSE8).replace("@BF16_AVX2@", BF16_AVX2)


def _setting() -> str:
    return os.environ.get(ENV, "").strip().lower()


def disabled() -> bool:
    return _setting() in ("0", "off", "false", "no")


def forced() -> bool:
    return _setting() in ("1", "on", "true", "yes")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built kernel, or None where it cannot run here (the model then keeps float32 weights)."""
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= set(flags):
        return None
    lib = kernel_library("bf16w_avx2", SOURCE, "bf16-weight kernel", "float32 weights")
    if lib is None or lib.pangu_bf16w_abi() != 2:
        return None
    for fn in (lib.pangu_bf16w_mm, lib.pangu_f16w_mm, lib.pangu_bf16w_gemm, lib.pangu_f16w_gemm):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    return lib


HALF = (torch.bfloat16, torch.float16)  # the 16-bit weights kept (both widen to float32 exactly)


def kernel_mm(x: torch.Tensor, weight: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """x [M, K] float32 times the bf16 or float16 weight [N, K] transposed -> [M, N] float32, by the C
    kernel: the one for few rows, or (blocked) the blocked product for many (pangu_bf16w_gemm)."""
    lib = library()
    if (
        lib is None or x.dim() != 2 or x.dtype != torch.float32 or weight.dtype not in HALF or weight.dim() != 2
        or x.shape[1] != weight.shape[1] or weight.shape[1] % COLUMNS or not weight.is_contiguous()
    ):
        raise ValueError(f"bf16-weight kernel: unexpected operands x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    if x.shape[0]:
        if blocked:
            fn = lib.pangu_bf16w_gemm if weight.dtype == torch.bfloat16 else lib.pangu_f16w_gemm
        else:
            fn = lib.pangu_bf16w_mm if weight.dtype == torch.bfloat16 else lib.pangu_f16w_mm
        rc = fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"bf16-weight kernel refused x {tuple(x.shape)}, weight {tuple(weight.shape)} ({rc})")
    return y


def widened_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same product for many rows: slices of weight rows widened to float32, each one BLAS product."""
    n, k = weight.shape
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    step = max(1, SLICE_ELEMENTS // max(k, 1))
    for n0 in range(0, n, step):
        torch.mm(x, weight[n0 : n0 + step].float().t(), out=y[:, n0 : n0 + step])
    return y


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 times a bf16 weight [N, K] transposed, in float32: the kernel for few rows;
    for many the blocked product where it is the choice here (blocked_chosen), else widened slices."""
    if x.shape[0] <= KERNEL_MAX_ROWS:
        return kernel_mm(x, weight)
    if blocked_chosen():
        return kernel_mm(x, weight, blocked=True)
    return widened_mm(x.contiguous(), weight)


# An operator opaque to inductor, so that a compiled decode step calls the kernel as it is: the C++
# one of pangu_infer.native_ops where it is built and connected (native_op), else this Python one.
_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("bf16w_mm(Tensor x, Tensor weight) -> Tensor")


def _shape(x: torch.Tensor, weight: torch.Tensor, *_) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


_lib.impl("bf16w_mm", matmul, "CPU")
_lib._register_fake("bf16w_mm", _shape)


_NATIVE = (("bf16w", "pangu_bf16w_mm"), ("f16w", "pangu_f16w_mm"), ("bf16w_gemm", "pangu_bf16w_gemm"), ("f16w_gemm", "pangu_f16w_gemm"))


_native_slice = SLICE_ELEMENTS  # the operator's `slice` in compiled graphs: 0 where the blocked kernel is chosen


def native_op() -> bool:
    """Point `pangu_infer::bf16w_native_mm` at this kernel (both weight dtypes, both row counts); True
    when compiled graphs call it from now on. (Makes the blocked kernel's choice here, before any
    graph is traced: a traced graph reads only its outcome.)"""
    global _native_slice
    _native_slice = 0 if blocked_chosen() else SLICE_ELEMENTS
    return all(native_ops.connect(kernel, library, symbol, "bf16w_native_mm", _shape) for kernel, symbol in _NATIVE)


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The product as the caller's context wants it: while compiling the C++ operator where it is
    connected (native_op), else the Python one; eagerly the functions themselves. (The operator's
    `slice` 0 asks for the blocked product above KERNEL_MAX_ROWS rows, else widened slices.)"""
    if tracing():
        if all(native_ops.connected(kernel) for kernel, _ in _NATIVE):
            return torch.ops.pangu_infer.bf16w_native_mm(x, weight, KERNEL_MAX_ROWS, _native_slice)
        return torch.ops.pangu_infer.bf16w_mm(x, weight)
    return matmul(x, weight)


class Bf16WeightLinear(nn.Module):
    """Stands in for an nn.Linear of a float32 model: the weight kept in bf16 (a buffer, as the
    checkpoint stores it), the product in float32 (see the module docstring).

    A fused matrix (q/k/v, gate/up) may be given as its pieces, in row order, as the checkpoint
    stores them (views of the mapped file: nothing copied, nothing resident but what the page cache
    holds): buffers piece0, piece1, ..., one product each, their columns side by side."""

    def __init__(self, weight: "torch.Tensor | list[torch.Tensor]", bias: Optional[torch.Tensor]):
        super().__init__()
        parts = list(weight) if isinstance(weight, (list, tuple)) else [weight]
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        self.pieces = len(parts) if isinstance(weight, (list, tuple)) else 0
        if self.pieces:
            for i, p in enumerate(parts):
                self.register_buffer(f"piece{i}", p.detach().contiguous())
        else:
            self.register_buffer("weight", weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.pieces:
            y = torch.cat([product(x2, getattr(self, f"piece{i}")) for i in range(self.pieces)], dim=1)
        else:
            y = product(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kept = f"bf16 weight in {self.pieces} pieces" if self.pieces else "bf16 weight"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kept}"


class Bf16Experts(nn.Module):
    """The routed experts of one MoE layer with w13 [E, 2I, H] and w2 [E, H, I] kept in bf16 (buffers),
    each expert's products in float32 by this module's kernel; `StackedExperts.impl` when set.

    Or, as the checkpoint stores them (views of the mapped file: nothing copied, nothing resident but
    what the page cache holds), w13 as each expert's row pieces (gate, up) and w2 as each expert's
    matrix: buffers w13_{e}_{i} and w2_{e}, one product per piece."""

    def __init__(self, w13: "torch.Tensor | list[list[torch.Tensor]]", w2: "torch.Tensor | list[torch.Tensor]", inter: int):
        super().__init__()
        self.inter = inter
        self.pieces = [len(parts) for parts in w13] if isinstance(w13, (list, tuple)) else None
        if self.pieces is None:
            self.register_buffer("w13", w13.detach().contiguous())
            self.register_buffer("w2", w2.detach().contiguous())
            return
        for e, parts in enumerate(w13):
            for i, p in enumerate(parts):
                self.register_buffer(f"w13_{e}_{i}", p.detach().contiguous())
            self.register_buffer(f"w2_{e}", w2[e].detach().contiguous())

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.pieces is None:
            return product(x, self.w13[e])
        return torch.cat([product(x, getattr(self, f"w13_{e}_{i}")) for i in range(self.pieces[e])], dim=-1)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return product(h, self.w2[e] if self.pieces is None else getattr(self, f"w2_{e}"))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e, x).split(self.inter, dim=-1)
        return self.down(e, F.silu(gate) * up)


class Bf16Embedding(nn.Module):
    """Stands in for nn.Embedding: the table kept in bf16, rows widened to float32 as they are looked up."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def widen_model(model: nn.Module) -> int:
    """A model whose matrices were loaded in bf16 or float16 (the rest in float32) made a float32
    model with 16-bit weights: every linear of a width the kernel takes (and the token embedding)
    keeps its weight behind a Bf16WeightLinear / Bf16Embedding, the routed experts of MoE layers
    behind Bf16Experts, every other parameter and buffer (norms, biases, routers, rotary tables)
    becomes float32 (exactly: both 16-bit formats widen without rounding). Returns how many linears
    kept 16-bit weights."""
    from pangu_infer.models.dense import join_fused_pieces
    from pangu_infer.models.moge import MoEBlock, StackedExperts

    routers = {id(m.gate) for m in model.modules() if isinstance(m, MoEBlock)}
    # fused matrices load_weights kept as the checkpoint's pieces (mapped views), by parameter name
    pieces: dict[str, list[torch.Tensor]] = model.__dict__.get("fused_pieces", {})
    sites = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            key = f"{path}.{name}.weight" if path else f"{name}.weight"
            parts = pieces.get(key)
            dtype = parts[0].dtype if parts else child.weight.dtype if type(child) in (nn.Linear, RowParallelLinear) else None
            if (
                type(child) in (nn.Linear, RowParallelLinear) and id(child) not in routers
                and dtype in HALF and child.in_features % COLUMNS == 0
            ):
                sites.append((parent, name, child, key))
    for parent, name, child, key in sites:
        weight = pieces.pop(key, None) or child.weight
        if isinstance(child, RowParallelLinear):  # a tensor-parallel rank's columns: its all-reduce stays around
            setattr(parent, name, child.around(Bf16WeightLinear(weight, None)))
        else:
            setattr(parent, name, Bf16WeightLinear(weight, child.bias))
    for path, experts in [(p, m) for p, m in model.named_modules() if isinstance(m, StackedExperts)]:
        w13, w2 = getattr(experts, "w13", None), getattr(experts, "w2", None)
        parts13, parts2 = pieces.get(f"{path}.w13"), pieces.get(f"{path}.w2")
        if (
            experts.impl is None and w13 is not None and parts13 and parts2 and parts13[0].dtype in HALF
            and w13.shape[-1] % COLUMNS == 0 and w2.shape[-1] % COLUMNS == 0 and len(parts2) == len(w2)
            and len(parts13) % len(w13) == 0
        ):  # the checkpoint's own matrices, expert by expert (views of the mapped file)
            per = len(parts13) // len(w13)
            experts.impl = Bf16Experts([parts13[e * per : (e + 1) * per] for e in range(len(w13))], parts2, experts.inter)
            del pieces[f"{path}.w13"], pieces[f"{path}.w2"], experts.w13, experts.w2
    join_fused_pieces(model)  # (pieces no kept linear or experts took: one parameter each, as without them)
    for experts in [m for m in model.modules() if isinstance(m, StackedExperts)]:  # experts loaded stacked, or joined
        w13, w2 = getattr(experts, "w13", None), getattr(experts, "w2", None)
        if (
            experts.impl is None and w13 is not None and w13.dtype in HALF and w2.dtype == w13.dtype
            and w13.shape[-1] % COLUMNS == 0 and w2.shape[-1] % COLUMNS == 0
        ):
            experts.impl = Bf16Experts(w13, w2, experts.inter)
            del experts.w13, experts.w2
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = getattr(model, "lm_head", False) is None
    # A tied table is the head too: kept 16-bit only where the kernel takes its width (else widened below).
    if type(embed) is nn.Embedding and embed.weight.dtype in HALF and (not tied or embed.weight.shape[1] % COLUMNS == 0):
        table = Bf16Embedding(embed.weight)
        model.model.embed_tokens = table
        if tied:
            model.lm_head = Bf16WeightLinear(table.weight, None)  # tied: the same 16-bit table
    for module in model.modules():
        if isinstance(module, (Bf16WeightLinear, Bf16Embedding, Bf16Experts)):
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != torch.float32:  # exact: bf16 and float16 both widen without rounding
                setattr(module, pname, nn.Parameter(p.detach().float(), requires_grad=False))
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                module.register_buffer(bname, b.float(), persistent=bname not in module._non_persistent_buffers_set)
    finish = getattr(model, "finish_loading", None)
    if callable(finish):
        finish()  # what the model derives from its parameters at load (R-72B's normed sink keys), again in float32
    return len(sites)


MEASURE_N, MEASURE_K, MEASURE_COUNT = 2048, 2048, 8  # 32 MB of bf16: beyond the caches


def measure() -> dict[str, float]:
    """Seconds for one-row products over MEASURE_COUNT weights: the kernel on bf16 weights ("own")
    against float32 `F.linear` on the same weights widened ("aten"), medians of interleaved passes."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(MEASURE_N, MEASURE_K, generator=g).to(torch.bfloat16) for _ in range(MEASURE_COUNT)]
    wide = [w.float() for w in weights]
    x = torch.randn(1, MEASURE_K, generator=g)
    with torch.inference_mode():
        return interleaved_medians({
            "own": lambda: [kernel_mm(x, w) for w in weights],
            "aten": lambda: [F.linear(x, w) for w in wide],
        })


def chosen() -> bool:
    """Are bf16 weights under float32 activations the choice here: not turned off, the kernel built,
    and forced or not measured clearly slower than float32 `F.linear` (once per machine)."""
    if disabled() or library() is None:
        return False
    return forced() or _measured_faster()


# bf16 weights take half the memory whatever their speed: they are kept unless the measurement finds
# them clearly slower (one made while other work loaded both cores once found the OpenMP kernel
# slower than float32 F.linear, which a quiet run measures at half its time).
SLOWER_BY = 1.25


@functools.lru_cache(maxsize=None)
def _measured_faster() -> bool:
    def measured() -> str:
        times = measure()
        value = "own" if times["own"] <= SLOWER_BY * times["aten"] else "aten"
        log.info("bf16-weight kernel: %s (own %.2f ms, float32 F.linear %.2f ms)", value, times["own"] * 1e3, times["aten"] * 1e3)
        return value

    return cached_choice("bf16_weight_kernel", measured, lambda v: v in ("own", "aten")) == "own"


BLOCKED_M, BLOCKED_N, BLOCKED_K, BLOCKED_COUNT = 128, 2048, 2048, 2  # a 128-token prefill over 16 MB of bf16


def measure_blocked() -> dict[str, float]:
    """Seconds for BLOCKED_M-row products over BLOCKED_COUNT weights: the blocked kernel ("own")
    against the weights widened in slices into BLAS products ("aten"), medians of interleaved passes."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(BLOCKED_N, BLOCKED_K, generator=g).to(torch.bfloat16) for _ in range(BLOCKED_COUNT)]
    x = torch.randn(BLOCKED_M, BLOCKED_K, generator=g)
    with torch.inference_mode():
        return interleaved_medians({
            "own": lambda: [kernel_mm(x, w, blocked=True) for w in weights],
            "aten": lambda: [widened_mm(x, w) for w in weights],
        })


@functools.lru_cache(maxsize=None)
def blocked_chosen() -> bool:
    """Many-row products by the blocked kernel: forced (PANGU_INFER_BF16_WEIGHTS=1), or measured
    faster than widened slices into BLAS once per machine (key `bf16_weight_prefill`: an AVX-512
    CPU's BLAS may beat this AVX2 kernel)."""
    if library() is None:
        return False
    if forced():
        return True

    def measured() -> str:
        times = measure_blocked()
        value = "own" if times["own"] <= times["aten"] else "aten"
        log.info("bf16-weight prefill: %s (own %.1f ms, widened slices %.1f ms)", value, times["own"] * 1e3, times["aten"] * 1e3)
        return value

    return cached_choice("bf16_weight_prefill", measured, lambda v: v in ("own", "aten")) == "own"


__all__ = ["Bf16Embedding", "Bf16Experts", "Bf16WeightLinear", "ENV", "blocked_chosen", "chosen", "library", "matmul", "measure", "measure_blocked", "widen_model"]
