"""Load-time conversion of GGUF blocks in one C pass each: Q4_0 / Q4_1 / Q4_K blocks into the
portable int4 format (packed pairs, scale and zero per group of 32), the portable format into
pangu_infer.quant.cpu_int4's kernel layout (into a new tensor, or over the pairs' own storage), and
Q8_0 / Q6_K blocks dequantized to float32 (then re-quantized per row as int8 by quant/formats.py).

Why: these are shuffles of nibbles and conversions of f16 scales, but written as numpy / torch
operations each took several passes over temporaries of one to four bytes per weight. A first load
of a Q4_0 GGUF of openPangu-Embedded-7B's widths (4.7 GB) converted in 45.5 s on a 2-core Zen 3, 11 s
with these passes (benchmarks/RESULTS.md, "First load of the 7B Q4_0 file"); its Q4_K_M sibling 40.9
-> 15.7 s. They read and write each byte once, on torch's threads (OpenMP).

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
#include <omp.h>

int pangu_transcode_abi(void) { return 4; }

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

/* rows x blocks of Q4_K (256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes
   of codes) -> packed pairs [rows, 128 * blocks] and, per sub-block of 32, the scale d sc and the zero
   8 (d sc) - dmin m as float [rows, 8 * blocks]. Sub-blocks 2i and 2i + 1 are the low and high
   nibbles of code bytes 32i .. 32i + 31. */
int pangu_q4k_to_pairs(const uint8_t* src, int64_t rows, int64_t blocks, uint8_t* packed, float* scale, float* zero, int64_t threads) {
  const int64_t total = rows * blocks;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t i = 0; i < total; i++) {
    const uint8_t* blk = src + i * 144;
    const uint8_t* sc = blk + 4;
    const uint8_t* qs = blk + 16;
    uint8_t* out = packed + i * 128;
    uint16_t dh, mh;
    memcpy(&dh, blk, 2);
    memcpy(&mh, blk + 2, 2);
    const float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
    for (int j = 0; j < 8; j++) {
      const int s = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
      const int m = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
      const float ds = d * (float)s, dm = dmin * (float)m;
      scale[i * 8 + j] = ds;
      zero[i * 8 + j] = 8.0f * ds - dm;
    }
    for (int c = 0; c < 4; c++) nibble_pairs(qs + 32 * c, 32, out + 32 * c);
  }
  return 0;
}

/* rows x blocks of Q8_0 (f16 d, 32 int8) or Q6_K (128 bytes of low 4 bits, 64 of high 2 bits, 16 int8
   scales, f16 d; 256 weights) -> float [rows, K], each value computed as gguf's numpy dequantizer
   does (Q8_0: x d; Q6_K: (d sc) q with q = low | high << 4 minus 32). type: 8 (Q8_0) or 14 (Q6_K). */
int pangu_dequantize(const uint8_t* src, int64_t rows, int64_t blocks, int64_t type, float* out, int64_t threads) {
  if (type != 8 && type != 14) return 1;
  const int64_t total = rows * blocks;
#pragma omp parallel for schedule(static) num_threads((int)threads)
  for (int64_t i = 0; i < total; i++) {
    uint16_t dh;
    if (type == 8) {
      const uint8_t* blk = src + i * 34;
      memcpy(&dh, blk, 2);
      const float d = f16_to_f32(dh);
      const int8_t* x = (const int8_t*)(blk + 2);
      float* o = out + i * 32;
      for (int j = 0; j < 32; j++) o[j] = (float)x[j] * d;
    } else {
      const uint8_t* blk = src + i * 210;
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const int8_t* sc = (const int8_t*)(blk + 192);
      memcpy(&dh, blk + 208, 2);
      const float d = f16_to_f32(dh);
      float* o = out + i * 256;
      for (int e = 0; e < 256; e++) {
        const int c = e >> 7, r = e & 127;
        const int lo = (ql[c * 64 + (r & 63)] >> (4 * (r >> 6))) & 15;
        const int hi = (qh[c * 32 + (r & 31)] >> (2 * (r >> 5))) & 3;
        o[e] = (d * (float)sc[e >> 4]) * (float)((lo | (hi << 4)) - 32);
      }
    }
  }
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
    if lib is None or lib.pangu_transcode_abi() != 4:
        return None
    lib.pangu_q4_to_pairs.restype = ctypes.c_int
    lib.pangu_q4_to_pairs.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.pangu_pairs_to_octets.restype = ctypes.c_int
    lib.pangu_pairs_to_octets.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.pangu_pairs_to_octets_in_place.restype = ctypes.c_int
    lib.pangu_pairs_to_octets_in_place.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.pangu_q4k_to_pairs.restype = ctypes.c_int
    lib.pangu_q4k_to_pairs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    lib.pangu_dequantize.restype = ctypes.c_int
    lib.pangu_dequantize.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]
    return lib


Q4_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q4_K": (144, 256)}  # bytes and weights per block
DEQUANTIZED = {"Q8_0": (8, 34, 32), "Q6_K": (14, 210, 256)}  # the C code, bytes and weights per block


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


def dequantize(part: np.ndarray, kind: str) -> Optional[torch.Tensor]:
    """Q8_0 or Q6_K (`kind`) rows [rows, bytes] (C-contiguous) -> float32 [rows, K], the values gguf's
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


__all__ = ["DEQUANTIZED", "ENV", "Q4_BYTES", "dequantize", "disabled", "library", "pairs_to_octets", "pairs_to_octets_in_place", "q4_to_pairs"]
