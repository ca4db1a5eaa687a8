"""Which kernel a quantized product with many rows runs: measured once per machine, then cached.

A weight-only int4/int8 kernel streams the weight once per product and wins at decode (few rows),
but its time grows with the rows; converting the weight to bf16 for one oneDNN product costs a
fixed pass over the weight and then runs at bf16 speed. Where the two cross depends on the CPU
(AMX or not, cores, memory): `convert_min_rows(kind)` times both on a weight of 1536 x 1536 for a
few row counts, the two taking turns (interleaved medians), and returns the smallest row count from
which converting is faster there and at every larger count (a very large number when it never is;
`crossing`). The result is kept per machine (CPU model, threads, torch version) in
`~/.cache/pangu-infer/kernels.json` (`$XDG_CACHE_HOME` respected); `PANGU_INFER_KERNEL_ROWS_<KIND>`
(e.g. `PANGU_INFER_KERNEL_ROWS_INT4=64`) sets it by hand, and `PANGU_INFER_KERNEL_CACHE` names
another cache file.

`amx_prefill(kind, weights)` chooses, the same way, whether a model's many-row int4 (cpu_int4's
layout; int5 and int6: GGUF's 5- and 6-bit codes in it) or int8 products run quant/amx.py's kernel,
which reads the quantized weight itself, instead of the conversion to bf16 (int4 and int8 into
oneDNN's packed layout, 5- and 6-bit codes to a plain W^T): interleaved medians of a pass of 512-row
products over one weight of each of the model's shapes, and the AMX kernel only where it is at
least AMX_MARGIN faster (`amx_prefill_v<REVISION>_<kind>_<shapes>`; PANGU_INFER_AMX_PREFILL=0/1
decides by hand).

int4 on CPU converts from the kernel's own packed layout (`dequantize_int4_cpu_packed`), which is
not a documented format: it is checked against the packing op itself before it is ever used, and
never used (the int4 kernel runs at every row count) where the check fails.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from pangu_infer.device import default_dtype
from pangu_infer.machine import cache_path, cached_choice, interleaved_medians, machine_key
from pangu_infer.quant import cpu_int4, cpu_int8
from pangu_infer.quant.prefill import (
    dequantize_int4_cpu_packed, int4_cpu_layout_ok, int4_to_bf16, int4_vnni_product, int8_product, packed_enabled,
    packed_layout_ok, ready, weight_product,
)

NEVER = 1 << 30
Q8_KERNEL_MAX_ROWS = 64  # rows from which a one-level int4 kernel's products in bf16 models convert at the latest
ROW_CANDIDATES = (16, 32, 64, 128, 256, 512)
BENCH_N = BENCH_K = 1536
KINDS = ("int4", "int8", "int4_vnni", "int5", "int6")
MEASURE_REVISION = 2  # in the cached names: a changed measurement is made again, not read back
_cache: dict[str, object] = {}


# ---------------------------------------------------------------------------------- measuring


def measure(kind: str) -> int:
    """The smallest row count (of ROW_CANDIDATES) from which converting beats the kernel on CPU.

    Converting runs the conversion products run now (quant/prefill.py: the compiled loop once it
    is built, else the eager one)."""
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
            return weight_product(x, int4_to_bf16(data, group, scales), True)

    elif kind == "int4_vnni":  # this package's kernel and layout (quant/cpu_int4.py), converted by its C loop
        if cpu_int4.library() is None:
            return NEVER
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        data, sz = cpu_int4.pack(q, torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01)

        def kernel(x):
            return cpu_int4.matmul(x, data, sz, group)

        def convert(x):  # what PackedWeight runs: into oneDNN's packed layout where it can (quant/prefill.py)
            return int4_vnni_product(x, data, sz, group)

    elif kind in ("int5", "int6"):  # cpu_int4's 5- or 6-bit form (GGUF's Q5 / Q6_K blocks), converted to a plain W^T by its C loop
        if cpu_int4.library() is None:
            return NEVER
        if kind == "int5":
            q = torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=g)
            data, hb, sz = cpu_int4.pack5(q, torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01)
        else:  # Q6_K's form: groups of 16, the scales alone
            group = 16
            q = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
            data, hb, sz = cpu_int4.pack6(q, torch.rand(n, k // group, generator=g) * 0.01, None)

        def kernel(x):
            return cpu_int4.matmul5(x, data, hb, sz, group)

        def convert(x):  # what PackedWeight runs
            return weight_product(x, cpu_int4.to_bf16_t(data, sz, group, hb), True)

    else:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CPU"):
            return NEVER
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s8 = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
        own = cpu_int8.usable(k)  # the kernel few-row products run here (quant/modules.py)

        def kernel(x):
            return cpu_int8.matmul(x, w8, s8) if own else torch.ops.aten._weight_int8pack_mm(x, w8, s8)

        def convert(x):
            return int8_product(x, w8, s8)

    wins = []
    for rows in ROW_CANDIDATES:
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        t = interleaved_medians({"convert": lambda: convert(x), "kernel": lambda: kernel(x)}, rounds=5)
        wins.append(t["convert"] < t["kernel"])
    return crossing(wins)


def crossing(wins: list[bool]) -> int:
    """The row count (of ROW_CANDIDATES) from which converting won at every larger count too, else NEVER.

    Both times grow about linearly with the rows, converting from a fixed cost on a smaller slope:
    once it wins it keeps winning. A lone win below rows where the kernel won again is a blip of the
    machine's load (a run measured beside other work chose 256 where a quiet one finds never, and
    prefill ran 1.5x slower for it: RESULTS.md), not the crossing."""
    rows = NEVER
    for r, won in zip(reversed(ROW_CANDIDATES), reversed(wins)):
        if not won:
            break
        rows = r
    return rows


AMX_ROWS = 512
AMX_MARGIN = 0.97  # the AMX kernel's median at most this fraction of the packed path's


LAYOUT_KINDS = ("int4", "int5", "int6")  # kinds in cpu_int4's layout (5 and 6: codes with high bits)


def measure_amx(kind: str, weights: list) -> dict[str, float]:
    """Median seconds of one pass of products of AMX_ROWS rows over `weights` ([(data, scales,
    group, hb)], one of each shape of a model, cpu_int4's layout for "int4", "int5" and "int6" (hb:
    the high bits of 5- or 6-bit codes, else None), int8 [N, K] with a bf16 scale per row for "int8"),
    one after the other as a prefill runs them: quant/amx.py's kernel ("amx") and the many-row path
    that runs without it ("packed"), interleaved. A pass rather than each shape alone: the packed
    path's bf16 copies also push the next product's operands out of the caches, which a product
    timed alone does not see (RESULTS.md)."""
    from pangu_infer.quant import amx

    def k_of(data):
        return data.shape[1] * cpu_int4.OCTET if kind in LAYOUT_KINDS else data.shape[1]

    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(AMX_ROWS, k, generator=g).to(torch.bfloat16) for k in sorted({k_of(w[0]) for w in weights})}
    if kind in LAYOUT_KINDS:
        def kernel(x, d, s, group, hb):
            return amx.int4_product(x, d, s, group, hb)

        def packed(x, d, s, group, hb):  # as modules.PackedWeight: 5- and 6-bit codes to a bf16 W^T
            return int4_vnni_product(x, d, s, group) if hb is None else weight_product(x, cpu_int4.to_bf16_t(d, s, group, hb), True)
    else:
        def kernel(x, d, s, _group, _hb):
            return amx.int8_product(x, d, s)

        def packed(x, d, s, _group, _hb):
            return int8_product(x, d, s)

    def run(use_amx):
        for d, s, grp, hb in weights:
            x = xs[k_of(d)]
            if not use_amx or kernel(x, d, s, grp, hb) is None:  # a shape the kernel refuses: the packed path
                packed(x, d, s, grp, hb)
    with torch.inference_mode():
        return interleaved_medians({"amx": lambda: run(True), "packed": lambda: run(False)}, rounds=7)


def amx_prefill(kind: str, weights: list) -> bool:
    """Do many-row products of `kind` ("int4" | "int5" | "int6" | "int8") run quant/amx.py's kernel on
    this machine, for a model whose weights of that kind have these shapes (`weights`: one (data,
    scales, group, hb) of each): measured once per machine and set of shapes (cached), taken where it
    is at least AMX_MARGIN faster; PANGU_INFER_AMX_PREFILL=0/1 decides without measuring."""
    from pangu_infer.quant import amx

    setting = amx.setting()
    if setting:
        return setting == "on" and amx.library() is not None
    if amx.library() is None or not weights:
        return False
    shapes = []
    for d, _, grp, _ in weights:
        n, k = (d.shape[0] * cpu_int4.ROW_BLOCK, d.shape[1] * cpu_int4.OCTET) if kind in LAYOUT_KINDS else tuple(d.shape)
        shapes.append(f"{n}x{k}" + (f"g{grp}" if kind in LAYOUT_KINDS else ""))
    # the kernel's revision in the name: a changed kernel is measured again
    name = f"amx_prefill_v{amx.REVISION}_{kind}_" + "_".join(sorted(shapes))
    if name not in _cache:
        def measured() -> bool:
            t = measure_amx(kind, weights)
            return bool(t["amx"] <= AMX_MARGIN * t["packed"])

        _cache[name] = cached_choice(name, measured, lambda v: isinstance(v, bool))
    return bool(_cache[name])


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


def convert_min_rows(kind: str, activations: Optional[torch.dtype] = None) -> int:
    """Rows from which a CPU `kind` ("int4" | "int8" | "int4_vnni" | "int5" | "int6") product converts the weight to bf16.

    activations: the model's dtype (default: this CPU's default dtype); it matters only for
    cpu_int4's kernel with activations in one int8 level (see Q8_KERNEL_MAX_ROWS)."""
    if kind not in KINDS:
        raise ValueError(f"kernel kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "int4" and not int4_cpu_layout_ok():
        return NEVER
    override = _env_override(kind)
    if override is not None:
        return override
    # Measured apart for the eager conversion and the compiled one (they cross the kernel at
    # different row counts); the compiled one is measured once it is built (prefill.prepare).
    # cpu_int4's conversion is its library's own C loop from the start.
    # cpu_int4's own kernel per build (cpu_int4.tag(): its activations' levels).
    # cpu_int8's kernel apart from aten's (it crosses the conversion at other rows).
    own = kind in ("int4_vnni", "int5", "int6")  # cpu_int4's kernel, converted by its library's C loop
    tag = cpu_int4.tag() if own else "_own" if kind == "int8" and cpu_int8.usable(BENCH_K) else ""
    # cpu_int4's kernels' revision (cpu_int4.REVISION): a faster kernel crosses at other rows
    tag += f"_r{cpu_int4.REVISION}" if own else ""
    name = f"{kind}{tag}_convert_min_rows" + ("_compiled" if ready() and not own else "")
    # and apart again for the conversions into oneDNN's packed layout (prefill.py), cheaper still
    if kind not in ("int4", "int5", "int6") and ready() and packed_enabled() and packed_layout_ok(BENCH_N, BENCH_K):
        name += "_packed"
    # MEASURE_REVISION: values measured by an earlier rule (one median after the other) are measured again
    name += f"_v{MEASURE_REVISION}"
    if name not in _cache:
        _cache[name] = cached_choice(
            name, lambda: measure(kind), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        )
    if own and cpu_int4.tag() and (activations or default_dtype(torch.device("cpu"))) == torch.bfloat16:
        # Activations in one int8 level (llama.cpp's Q8_0 rounding) in a bf16 model: products of
        # many rows convert the weight to bf16 whatever the measurement says, which costs a bf16
        # model nothing more than its own dtype; run on every row of a prefill, the one-level rounding
        # moved the demo model's bf16 perplexity by +0.98% (benchmarks/int4_activations.py). In a
        # float32 model (the default on CPUs without native bf16) the kernel is the more precise
        # of the two (+0.5% against +0.7% for the weight rounded to bf16): the measurement decides.
        return min(_cache[name], Q8_KERNEL_MAX_ROWS)
    return _cache[name]


__all__ = ["AMX_MARGIN", "NEVER", "amx_prefill", "cache_path", "convert_min_rows", "machine_key", "dequantize_int4_cpu_packed", "int4_cpu_layout_ok", "measure", "measure_amx"]
