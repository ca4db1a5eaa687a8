"""Which kernel a quantized product with many rows runs: measured once per machine, then cached.

A weight-only int4/int8 kernel streams the weight once per product and wins at decode (few rows),
but its time grows with the rows; converting the weight to bf16 for one oneDNN product costs a
fixed pass over the weight and then runs at bf16 speed. Where the two cross depends on the CPU
(AMX or not, cores, memory): `convert_min_rows(kind)` times both on a weight of 1536 x 1536 for a
few row counts and returns the smallest row count from which converting is faster (a very large
number when it never is). The result is kept per machine (CPU model, threads, torch version) in
`~/.cache/pangu-infer/kernels.json` (`$XDG_CACHE_HOME` respected); `PANGU_INFER_KERNEL_ROWS_<KIND>`
(e.g. `PANGU_INFER_KERNEL_ROWS_INT4=64`) sets it by hand, and `PANGU_INFER_KERNEL_CACHE` names
another cache file.

int4 on CPU converts from the kernel's own packed layout (`dequantize_int4_cpu_packed`), which is
not a documented format: it is checked against the packing op itself before it is ever used, and
never used (the int4 kernel runs at every row count) where the check fails.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

NEVER = 1 << 30
ROW_CANDIDATES = (16, 32, 64, 128, 256, 512)
BENCH_N = BENCH_K = 1536
KINDS = ("int4", "int8")
_cache: dict[str, int] = {}


def cache_path() -> str:
    explicit = os.environ.get("PANGU_INFER_KERNEL_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pangu-infer", "kernels.json")


def machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}"


# ---------------------------------------------------------------------------------- conversion


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


# ---------------------------------------------------------------------------------- measuring


def _median_time(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(kind: str) -> int:
    """The smallest row count (of ROW_CANDIDATES) from which converting beats the kernel on CPU."""
    g = torch.Generator().manual_seed(0)
    n, k, group = BENCH_N, BENCH_K, 32
    if kind == "int4":
        if not int4_cpu_layout_ok():
            return NEVER
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = (torch.rand(k // group, n, 2, generator=g) * 0.01).to(torch.bfloat16)

        def kernel(x):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, data, group, scales)

        def convert(x):
            return torch.matmul(x, dequantize_int4_cpu_packed(data, group, scales))

    else:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU"):
            return NEVER
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s8 = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)

        def kernel(x):
            return torch.ops.aten._weight_int8pack_mm(x, w8, s8)

        def convert(x):
            return F.linear(x, w8.to(torch.bfloat16)) * s8

    for rows in ROW_CANDIDATES:
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        if _median_time(lambda: convert(x)) < _median_time(lambda: kernel(x)):
            return rows
    return NEVER


def _env_override(kind: str) -> Optional[int]:
    value = os.environ.get(f"PANGU_INFER_KERNEL_ROWS_{kind.upper()}")
    if value is None:
        return None
    try:
        rows = int(value)
    except ValueError:
        raise ValueError(f"PANGU_INFER_KERNEL_ROWS_{kind.upper()}={value!r} must be an integer (rows)") from None
    if rows < 1:
        raise ValueError(f"PANGU_INFER_KERNEL_ROWS_{kind.upper()}={value!r} must be at least 1")
    return rows


def cached_measurement(name: str, compute) -> int:
    """The positive int stored under `name` for this machine (machine_key()) in the cache file, or
    compute() stored there (a read-only home: measured again next time)."""
    path, key = cache_path(), machine_key()
    stored: dict = {}
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    entry = stored.get(key, {})
    value = entry.get(name) if isinstance(entry, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    value = compute()
    if not isinstance(entry, dict):
        stored[key] = {}
    stored.setdefault(key, {})[name] = value
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def convert_min_rows(kind: str) -> int:
    """Rows from which a CPU `kind` ("int4" | "int8") product converts the weight to bf16."""
    if kind not in KINDS:
        raise ValueError(f"kernel kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "int4" and not int4_cpu_layout_ok():
        return NEVER
    override = _env_override(kind)
    if override is not None:
        return override
    if kind in _cache:
        return _cache[kind]
    rows = cached_measurement(f"{kind}_convert_min_rows", lambda: measure(kind))
    _cache[kind] = rows
    return rows


__all__ = ["NEVER", "cache_path", "cached_measurement", "convert_min_rows", "dequantize_int4_cpu_packed", "int4_cpu_layout_ok", "measure"]
