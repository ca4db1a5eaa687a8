"""RMSNorm and the rotary embedding of eager steps (prefill) in fewer passes, with C loops of our own.

Why: in eager code each is a chain of torch operators over the whole chunk: RMSNorm widens x to
fp32, squares it, averages, multiplies, rounds back and multiplies by the weight (six passes, two
fp32 copies of the chunk); the rotary embedding builds the rotated copy (a negation and a cat) and
rounds two products and their sum. In a 2048-token prefill of a 1B model on 2 cores those took
about 15% of the time (benchmarks/RESULTS.md, "stop 52: RMSNorm and the rotary embedding in fewer
passes"). A compiled step fuses them already (inductor); these are for the eager steps.

- `rotary(x, cos, sin)`: out = x cos + rotate_half(x) sin with every operator's rounding as the
  torch form (layers.apply_rotary) does it: in a bf16 model each product rounded to bf16 and then
  their sum; in an fp32 model the two products and the sum in fp32, no fused multiply-add. The same
  bits as the torch form.
- `rms_norm(x, weight, eps)`: the mean of squares by torch's own operators (fp32 copy, square in
  place, mean: its reduction's order), then one pass for the rest: x / sqrt(mean + eps) in fp32
  rounded to the model's dtype, times the weight, rounded again, as layers.RMSNorm does. The same
  bits as the torch form. (A loop summing the squares in its own order was tried: one rounding in
  about 200,000 bf16 outputs differed, and that moved the demo model's bf16 perplexity by 0.35%.)

Rows are independent of each other and of how many there are (the batch-invariant mode's RMSNorm
keeps its own fixed-order torch form). x86-64 with AVX2 and FMA (AVX-512 CPUs have both), built once
per machine like the engine's other kernels; elsewhere, without a C compiler, inside a traced
graph, or with `PANGU_INFER_NORM_ROPE=torch`, the torch forms run (callers take None as "not
here"). Layer 1: imports pangu_infer.native and pangu_infer.device.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Optional

import torch

from pangu_infer.device import tracing
from pangu_infer.native import cpu_flags, kernel_library

ENV = "PANGU_INFER_NORM_ROPE"

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>

@BF16_AVX2@
static inline __m256 load8(const void* p, int bf) {  /* 8 values (bf16 or fp32) -> fp32 */
  return bf ? bf8((const uint16_t*)p) : _mm256_loadu_ps((const float*)p);
}
static inline __m256 as_bf16(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16(v), 16)); }
static inline void store8(void* p, __m256 v, int bf) {
  if (!bf) { _mm256_storeu_ps((float*)p, v); return; }
  const __m256i r = round_bf16(v);
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
/* a product or sum as the model's dtype rounds it (fp32: nothing more) */
static inline __m256 rnd(__m256 v, int bf) { return bf ? as_bf16(v) : v; }

/* out [T, H, D] (contiguous) = x cos + rotate_half(x) sin; x row t, head h at x + t * ldt + h * ldh
   (elements), cos and sin [T, D] contiguous; bf: 1 for bf16 values, 0 for fp32. */
__attribute__((optimize("fp-contract=off")))
int pangu_rope(const void* x, int64_t ldt, int64_t ldh, const void* cos, const void* sin, void* out,
               int64_t T, int64_t H, int64_t D, int64_t bf, int64_t threads) {
  if (D % 16 || bf < 0 || bf > 1) return 1;
  const int64_t es = bf ? 2 : 4, half = D / 2;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && T * H * D >= 65536)
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      const char* xr = (const char*)x + (t * ldt + h * ldh) * es;
      const char* cr = (const char*)cos + t * D * es;
      const char* sr = (const char*)sin + t * D * es;
      char* o = (char*)out + ((t * H + h) * D) * es;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 v = load8(xr + d * es, (int)bf), c = load8(cr + d * es, (int)bf), s = load8(sr + d * es, (int)bf);
        __m256 r = load8(xr + (d < half ? d + half : d - half) * es, (int)bf);
        if (d < half) r = _mm256_xor_ps(r, _mm256_set1_ps(-0.0f));
        store8(o + d * es, _mm256_add_ps(rnd(_mm256_mul_ps(v, c), (int)bf), rnd(_mm256_mul_ps(r, s), (int)bf)), (int)bf);
      }
    }
  return 0;
}

/* out [T, N] (contiguous) = rnd(rnd(x / sqrt(ms + eps)) * w); x row t at x + t * ldt, w [N], ms [T]
   each row's mean of squares as torch computed it (its reduction's order is torch's own). */
__attribute__((optimize("fp-contract=off")))
int pangu_rms_norm(const void* x, int64_t ldt, const float* ms, const void* w, void* out, int64_t T, int64_t N, float eps,
                   int64_t bf, int64_t threads) {
  if (N % 8 || bf < 0 || bf > 1) return 1;
  const int64_t es = bf ? 2 : 4;
  #pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) if(threads > 1 && T * N >= 65536)
  for (int64_t t = 0; t < T; t++) {
    const char* xr = (const char*)x + t * ldt * es;
    char* o = (char*)out + t * N * es;
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(ms[t] + eps));
    for (int64_t n = 0; n < N; n += 8) {
      const __m256 y = rnd(_mm256_mul_ps(load8(xr + n * es, (int)bf), r), (int)bf);
      store8(o + n * es, _mm256_mul_ps(load8((const char*)w + n * es, (int)bf), y), (int)bf);
    }
  }
  return 0;
}
"""


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("torch", "off", "0", "none")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The built loops, or None where they cannot run here (the torch forms run)."""
    if disabled() or platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= cpu_flags():
        return None
    # imported here: pangu_infer.quant's package imports the models (dense), which import this module
    from pangu_infer.quant.c_simd import BF16_AVX2

    lib = kernel_library("norm_rope", SOURCE.replace("@BF16_AVX2@", BF16_AVX2), "RMSNorm and rotary loops", "the torch forms run")
    if lib is None:
        return None
    lib.pangu_rope.restype = ctypes.c_int
    lib.pangu_rope.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5
    lib.pangu_rms_norm.restype = ctypes.c_int
    lib.pangu_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float] + [ctypes.c_int64] * 2
    return lib


# the activations' dtypes the loops take, and their kind flag
KINDS = {torch.bfloat16: 1, torch.float32: 0}


def _eager_cpu(*ts: torch.Tensor) -> bool:
    """CPU tensors outside a traced graph, with nothing to record for autograd."""
    if tracing() or any(t.device.type != "cpu" for t in ts):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[torch.Tensor]:
    """layers.apply_rotary's result (x [T, H, D], each row's D values contiguous; cos, sin [T, D]) or
    None where the loop does not take these operands (then the torch form runs)."""
    if (
        x.dtype not in KINDS
        or x.dim() != 3
        or x.stride(2) != 1
        or x.shape[2] % 16
        or cos.dtype != x.dtype
        or sin.dtype != x.dtype
        or cos.shape != (x.shape[0], x.shape[2])
        or sin.shape != cos.shape
        or not (cos.is_contiguous() and sin.is_contiguous())
        or not _eager_cpu(x, cos, sin)
    ):
        return None
    lib = library()
    return None if lib is None else rope_pass(lib, x, cos, sin, torch.get_num_threads())


def rope_pass(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, threads: int) -> Optional[torch.Tensor]:
    """rotary's loop on operands it takes (checked by the caller: rotary, or once by
    engine/eager_step.py); None where the loop refuses them."""
    t, h, d = x.shape
    out = torch.empty(t, h, d, dtype=x.dtype)
    if t and h:
        rc = lib.pangu_rope(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, h, d, KINDS[x.dtype], threads)
        if rc:
            return None
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """layers.RMSNorm's result for x [..., N] (rows contiguous) and a weight [N] of x's dtype, or None
    where the loop does not take these operands (then the torch form runs)."""
    n = x.shape[-1] if x.dim() else 0
    if (
        x.dtype not in KINDS
        or n % 8
        or n == 0
        or x.stride(-1) != 1
        or weight.dtype != x.dtype
        or weight.shape != (n,)
        or not weight.is_contiguous()
        or not _eager_cpu(x, weight)
    ):
        return None
    rows = x.reshape(-1, n) if x.dim() != 2 else x  # (the last stride stays 1)
    lib = library()
    if lib is None:
        return None
    out = rms_norm_pass(lib, rows, weight, eps, torch.get_num_threads())
    return None if out is None else out.view(x.shape)


def rms_norm_pass(lib: ctypes.CDLL, rows: torch.Tensor, weight: torch.Tensor, eps: float, threads: int) -> Optional[torch.Tensor]:
    """rms_norm's loop for rows [R, N] on operands it takes (checked by the caller: rms_norm, or once
    by engine/eager_step.py); None where the loop refuses them."""
    out = torch.empty(rows.shape, dtype=rows.dtype)
    if rows.shape[0]:
        # the mean of squares by torch's own operators (its reduction's order, so the same bits)
        mean_sq = rows.to(torch.float32, copy=True).pow_(2).mean(-1)
        rc = lib.pangu_rms_norm(rows.data_ptr(), rows.stride(0), mean_sq.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                rows.shape[0], rows.shape[1], eps, KINDS[rows.dtype], threads)
        if rc:
            return None
    return out
