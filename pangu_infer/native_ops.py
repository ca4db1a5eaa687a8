"""The engine's C kernels as C++ operators, so that a compiled graph calls them without Python between.

A kernel registered from Python (`torch.library.Library(...).impl(name, python_function)`) costs
25-50 us a call on top of the kernel: the dispatcher enters Python, which checks the operands and
calls the C function through ctypes. A decode step of the demo model makes 120 int4 products and 30
attention calls: 3 ms and 1.4 ms of a 19 ms step. The operators here do the same checks in C++ and
call the same C functions, through pointers that each kernel's module sets once its C library is
loaded (`connect`), so the results are those of the eager calls, bit for bit:

- `pangu_infer::int4_native_mm(x, data, sz, group)` -> pangu_int4_mm (pangu_infer.quant.cpu_int4);
- `pangu_infer::int5_native_mm(x, data, hb, sz, group)` -> pangu_int5_mm (its 5- and 6-bit forms: the planes from hb's width);
- `pangu_infer::int8_native_mm(x, data, scales)` -> pangu_int8_mm (pangu_infer.quant.cpu_int8);
- `pangu_infer::bf16w_native_mm(x, weight, max_rows, slice)` -> pangu_bf16w_mm (pangu_f16w_mm for a
  float16 weight) for up to max_rows rows, else pangu_bf16w_gemm (pangu_f16w_gemm) where `slice`
  is 0, or the weight widened `slice` elements at a time into BLAS products
  (pangu_infer.models.bf16_weights);
- `pangu_infer::bi_attention_native(q, k_cache, v_cache, slots, valid, scale)` -> pangu_bi_attention
  (pangu_infer.models.bi_attention_kernel).

One library for all of them, compiled against this torch's headers once per machine (about 20 s
on a 2-core Zen 1, in the background compile before the decode step is traced; pangu_infer.native.build_torch_ops)
and loaded once per process. `PANGU_INFER_NATIVE_OPS=0` turns them off (the Python operators run).
The shape functions stay in Python (each kernel module registers its own): a C++ one reading
x.size(0) would specialize a compiled graph to each batch size. Layer 1: imports pangu_infer.native.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

ENV = "PANGU_INFER_NATIVE_OPS"

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <string>

typedef int (*int4_mm_fn)(const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
typedef int (*int8_mm_fn)(const void*, int64_t, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t);
typedef int (*attention_fn)(const void*, const void*, const void*, const void*, const void*, void*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, int, int, int, int64_t);
static std::atomic<int4_mm_fn> int4_kernel{nullptr};
typedef int (*int5_mm_fn)(const void*, const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
static std::atomic<int5_mm_fn> int5_kernel{nullptr};
static std::atomic<int8_mm_fn> int8_kernel{nullptr};
static std::atomic<attention_fn> attention_kernel{nullptr};
typedef int (*bf16w_mm_fn)(const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t);
static std::atomic<bf16w_mm_fn> bf16w_kernel{nullptr};
static std::atomic<bf16w_mm_fn> f16w_kernel{nullptr};
static std::atomic<bf16w_mm_fn> bf16w_gemm_kernel{nullptr};
static std::atomic<bf16w_mm_fn> f16w_gemm_kernel{nullptr};

static void set_native_kernel(const std::string& name, int64_t address) {
  if (name == "int4") int4_kernel.store(reinterpret_cast<int4_mm_fn>(address));
  else if (name == "int5") int5_kernel.store(reinterpret_cast<int5_mm_fn>(address));
  else if (name == "int8") int8_kernel.store(reinterpret_cast<int8_mm_fn>(address));
  else if (name == "attention") attention_kernel.store(reinterpret_cast<attention_fn>(address));
  else if (name == "bf16w") bf16w_kernel.store(reinterpret_cast<bf16w_mm_fn>(address));
  else if (name == "f16w") f16w_kernel.store(reinterpret_cast<bf16w_mm_fn>(address));
  else if (name == "bf16w_gemm") bf16w_gemm_kernel.store(reinterpret_cast<bf16w_mm_fn>(address));
  else if (name == "f16w_gemm") f16w_gemm_kernel.store(reinterpret_cast<bf16w_mm_fn>(address));
  else TORCH_CHECK(false, "set_native_kernel: no kernel named ", name);
}

static at::Tensor int4_native_mm(const at::Tensor& x_, const at::Tensor& data, const at::Tensor& sz, int64_t group) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(data.dim() == 3 && data.scalar_type() == at::kByte && data.is_contiguous(), "int4 kernel: weight ", data.sizes(), " ", data.scalar_type());
  const int64_t n = data.size(0) * 16, k = data.size(1) * 8;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == k, "int4 kernel: unexpected operands x ", x.sizes(), " ", x.scalar_type(), ", weight ", data.sizes());
  TORCH_CHECK(group > 0 && k % group == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 &&
              sz.size(0) == data.size(0) && sz.size(1) == k / group && (sz.size(2) == 1 || sz.size(2) == 2) && sz.size(3) == 16,
              "int4 kernel: scales ", sz.sizes(), " for weight ", data.sizes(), ", group ", group);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const int4_mm_fn f = int4_kernel.load();
  TORCH_CHECK(f != nullptr, "int4 kernel: not loaded");
  if (x.size(0)) {
    /* sz.size(2): values per group and row, 2 with the zeros stored, 1 for the scales alone */
    const int rc = f(x.data_ptr(), data.data_ptr(), sz.data_ptr(), y.data_ptr(), x.size(0), n, k, group, sz.size(2), at::get_num_threads());
    TORCH_CHECK(rc == 0, "int4 kernel refused x ", x.sizes(), ", weight ", data.sizes(), ", group ", group, " (", rc, ")");
  }
  return y;
}

static at::Tensor int5_native_mm(const at::Tensor& x_, const at::Tensor& data, const at::Tensor& hb, const at::Tensor& sz, int64_t group) {
  const at::Tensor x = x_.contiguous();
  TORCH_CHECK(data.dim() == 3 && data.scalar_type() == at::kByte && data.is_contiguous(), "int5 kernel: weight ", data.sizes(), " ", data.scalar_type());
  TORCH_CHECK(hb.dim() == 3 && hb.scalar_type() == at::kByte && hb.is_contiguous() && hb.size(0) == data.size(0) &&
              hb.size(1) == data.size(1) && (hb.size(2) == 16 || hb.size(2) == 32), "int5 kernel: bit planes ", hb.sizes(), " for weight ", data.sizes());
  const int64_t n = data.size(0) * 16, k = data.size(1) * 8;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == k, "int5 kernel: unexpected operands x ", x.sizes(), " ", x.scalar_type(), ", weight ", data.sizes());
  TORCH_CHECK(group > 0 && k % group == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 &&
              sz.size(0) == data.size(0) && sz.size(1) == k / group && (sz.size(2) == 1 || sz.size(2) == 2) && sz.size(3) == 16,
              "int5 kernel: scales ", sz.sizes(), " for weight ", data.sizes(), ", group ", group);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const int5_mm_fn f = int5_kernel.load();
  TORCH_CHECK(f != nullptr, "int5 kernel: not loaded");
  if (x.size(0)) {
    const int rc = f(x.data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(), x.size(0), n, k, group, sz.size(2), hb.size(2) / 16, at::get_num_threads());
    TORCH_CHECK(rc == 0, "int5 kernel refused x ", x.sizes(), ", weight ", data.sizes(), ", group ", group, " (", rc, ")");
  }
  return y;
}

static at::Tensor int8_native_mm(const at::Tensor& x_, const at::Tensor& data, const at::Tensor& scales) {
  TORCH_CHECK(x_.dim() == 2 && (x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16) &&
              data.scalar_type() == at::kChar && data.dim() == 2 && x_.size(1) == data.size(1) && data.size(1) % 16 == 0 &&
              scales.scalar_type() == at::kBFloat16 && scales.dim() == 1 && scales.size(0) == data.size(0) &&
              data.is_contiguous() && scales.is_contiguous(),
              "int8 kernel: unexpected operands x ", x_.sizes(), " ", x_.scalar_type(), ", weight ", data.sizes(), " ",
              data.scalar_type(), ", scales ", scales.sizes(), " ", scales.scalar_type());
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty({x.size(0), data.size(0)}, x.options().dtype(at::kFloat));
  const int8_mm_fn f = int8_kernel.load();
  TORCH_CHECK(f != nullptr, "int8 kernel: not loaded");
  if (x.size(0)) {
    const int rc = f(x.data_ptr(), x.scalar_type() == at::kBFloat16, data.data_ptr(), scales.data_ptr(), y.data_ptr(),
                     x.size(0), data.size(0), data.size(1), at::get_num_threads());
    TORCH_CHECK(rc == 0, "int8 kernel refused x ", x.sizes(), ", weight ", data.sizes(), " (", rc, ")");
  }
  return y;
}

static at::Tensor bf16w_native_mm(const at::Tensor& x_, const at::Tensor& w, int64_t max_rows, int64_t slice) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && w.dim() == 2 &&
              (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) &&
              x_.size(1) == w.size(1) && w.size(1) % 8 == 0 && w.is_contiguous(),
              "bf16-weight kernel: unexpected operands x ", x_.sizes(), " ", x_.scalar_type(), ", weight ", w.sizes(), " ", w.scalar_type());
  const at::Tensor x = x_.contiguous();
  const int64_t m = x.size(0), n = w.size(0), k = w.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  const bool half = w.scalar_type() == at::kHalf;
  if (m > max_rows && slice <= 0) {  /* the blocked product */
    const bf16w_mm_fn f = (half ? f16w_gemm_kernel : bf16w_gemm_kernel).load();
    TORCH_CHECK(f != nullptr, "bf16-weight blocked kernel: not loaded");
    const int rc = f(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, at::get_num_threads());
    TORCH_CHECK(rc == 0, "bf16-weight blocked kernel refused x ", x.sizes(), ", weight ", w.sizes(), " (", rc, ")");
    return y;
  }
  if (m > max_rows) {  /* widened slices of weight rows, one BLAS product each */
    const int64_t step = std::max<int64_t>(1, slice / std::max<int64_t>(k, 1));
    for (int64_t n0 = 0; n0 < n; n0 += step) {
      const int64_t len = std::min(step, n - n0);
      y.narrow(1, n0, len).copy_(at::mm(x, w.narrow(0, n0, len).to(at::kFloat).t()));
    }
    return y;
  }
  const bf16w_mm_fn f = (half ? f16w_kernel : bf16w_kernel).load();
  TORCH_CHECK(f != nullptr, "bf16-weight kernel: not loaded");
  if (m) {
    const int rc = f(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, at::get_num_threads());
    TORCH_CHECK(rc == 0, "bf16-weight kernel refused x ", x.sizes(), ", weight ", w.sizes(), " (", rc, ")");
  }
  return y;
}

static at::Tensor bi_attention_native(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& slots_, const at::Tensor& valid_, double scale) {
  TORCH_CHECK(q_.dim() == 3 && (q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kBFloat16),
              "batch-invariant attention: queries ", q_.sizes(), " ", q_.scalar_type());
  const at::ScalarType kv = k_cache.scalar_type();  /* the kernel's kv_kind: bf16 0, fp32 1, fp8 e4m3fn 2, e5m2 3 */
  const int kv_kind = kv == at::kBFloat16 ? 0 : kv == at::kFloat ? 1 : kv == at::kFloat8_e4m3fn ? 2 : kv == at::kFloat8_e5m2 ? 3 : -1;
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == kv && kv_kind >= 0,
              "batch-invariant attention: caches ", k_cache.sizes(), " ", k_cache.scalar_type(), " and ", v_cache.sizes(), " ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "batch-invariant attention: the caches must be contiguous");
  TORCH_CHECK(slots_.dim() == 2, "batch-invariant attention: slots ", slots_.sizes());
  const int64_t n = q_.size(0), h = q_.size(1), d = q_.size(2), length = slots_.size(1);
  const at::Tensor q = q_.contiguous();
  const at::Tensor slots = slots_.to(at::kLong).contiguous();
  const at::Tensor valid = valid_.reshape({n, length}).to(at::kBool).contiguous();
  at::Tensor out = at::empty({n, h, d}, q.options());
  const attention_fn f = attention_kernel.load();
  TORCH_CHECK(f != nullptr, "batch-invariant attention: not loaded");
  if (n) {
    const int rc = f(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), valid.data_ptr(), out.data_ptr(),
                     k_cache.size(0), n, h, k_cache.size(1), d, length, slots.size(0), static_cast<float>(scale),
                     q.scalar_type() == at::kFloat, kv_kind, q.scalar_type() == at::kFloat,
                     at::get_num_threads());
    TORCH_CHECK(rc == 0, "batch-invariant attention kernel refused q ", q.sizes(), ", cache ", k_cache.sizes(), " (", rc, ")");
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(pangu_infer, m) {
  m.def("int4_native_mm(Tensor x, Tensor data, Tensor sz, int group_size) -> Tensor");
  m.def("int5_native_mm(Tensor x, Tensor data, Tensor hb, Tensor sz, int group_size) -> Tensor");
  m.def("int8_native_mm(Tensor x, Tensor data, Tensor scales) -> Tensor");
  m.def("bi_attention_native(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor valid, float scale) -> Tensor");
  m.def("bf16w_native_mm(Tensor x, Tensor weight, int max_rows, int slice) -> Tensor");
  m.def("set_native_kernel(str name, int address) -> ()", set_native_kernel);
}
TORCH_LIBRARY_IMPL(pangu_infer, CPU, m) {
  m.impl("int4_native_mm", int4_native_mm);
  m.impl("int5_native_mm", int5_native_mm);
  m.impl("int8_native_mm", int8_native_mm);
  m.impl("bi_attention_native", bi_attention_native);
  m.impl("bf16w_native_mm", bf16w_native_mm);
}
"""

_state = {"loaded": None}  # None: not tried; True or False once tried
_connected: dict[str, bool] = {}  # kernel name -> its operator points at it
_fakes: set[str] = set()  # operators whose shape function is registered
_lock = threading.RLock()


def disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def load() -> bool:
    """Build (once per machine) and load the operators (once per process); True when they are
    there. False with PANGU_INFER_NATIVE_OPS=0 or when the build failed (logged once, at info
    level; the Python operators run as before)."""
    if disabled():
        return False
    with _lock:
        if _state["loaded"] is None:
            from pangu_infer.native import build_torch_ops

            try:
                build_torch_ops("native_ops", SOURCE)
                _state["loaded"] = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                # info, not a warning: a speed detail (the compiled step still builds, and where the
                # compiler is what fails, the step's own build fails with one line saying so)
                log.info("C++ operators not built (%s): compiled graphs call the Python ones", why)
                _state["loaded"] = False
        return _state["loaded"]


def connect(kernel: str, library: Callable[[], Optional[ctypes.CDLL]], symbol: str, op: str, shape: Callable) -> bool:
    """Make the operator `pangu_infer::<op>` call kernel `kernel` ("int4", "int5", "int8", "attention", "bf16w", "f16w",
    "bf16w_gemm" or "f16w_gemm"):
    the C function `symbol` of `library()` (None where that kernel does not run here), with `shape`
    as the operator's shape function; load() first. True when compiled graphs can call it from now
    on (see connected)."""
    if disabled():
        return False
    if _connected.get(kernel):
        return True
    lib = library()
    if lib is None or not load():
        return False
    with _lock:
        if not _connected.get(kernel):
            address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
            torch.ops.pangu_infer.set_native_kernel(kernel, address)
            if op not in _fakes:
                torch.library.register_fake(f"pangu_infer::{op}")(shape)
                _fakes.add(op)
            _connected[kernel] = True
    return True


def connected(kernel: str) -> bool:
    """Is kernel `kernel`'s operator connected (connect): what a graph being traced calls."""
    return _connected.get(kernel, False)


__all__ = ["ENV", "SOURCE", "connect", "connected", "disabled", "load"]
