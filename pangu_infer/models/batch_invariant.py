"""Batch-invariant numerics: a token's hidden states, KV entries and logits computed bitwise the
same whatever else shares its step (EngineConfig.batch_invariant, `--batch-invariant`).

What varies with the batch on CPU, measured (benchmarks/batch_invariant.py --sources, and the
numbers in benchmarks/RESULTS.md):

- Linear products. oneDNN and MKL pick kernels and K-blockings by row count: row 0 of an
  M-row product can differ from the same row alone, from some M on that depends on the kernel,
  the shape, the CPU and the thread count (on an AMD EPYC without AMX the oneDNN-packed bf16 linear
  varied from 2 or 9 rows on; on an Intel Xeon with AMX it did not up to 128 rows; fp32 MKL varies
  at every M > 1 on both; RESULTS.md). A product whose calls all have the same shape is invariant
  by construction, so a linear whose kernel is not measured invariant runs in tiles of exactly
  PAD_TILE rows (the last one padded with zeros). Where a linear's rows were measured equal at
  every row count P..T (tiles(): once per kernel, shape and dtype, cached per machine and thread
  count like pangu_infer.quant.tuning's thresholds), it runs in calls of P..T rows: P = 1, no
  padding, a one-row decode costs what it does without the mode; P = 2 where a row alone rounds
  otherwise than among others and every 2..T rows alike (oneDNN's bf16 products over 1536 inputs
  on a Zen 4 EPYC: about 1 output in 7,000), a one-row call padded to two rows. The measurement
  compares every row of enough rows (2^17 outputs) in the wrapper's own calls, last tile included:
  such differences are rare, and 64 rows compared a few at a time missed them on the Zen 4. This
  wraps whatever linear module the model holds (`nn.Linear`, `PackedLinear`, the quantized
  linears of pangu_infer.quant, or any later one with the same call signature) without touching
  its kernel.
- Attention. Unmasked SDPA for one sequence, padded masked products for a batch and SDPA's flash
  kernel for prefill (whose KV split depends on the total length) all sum in different orders.
  Here every query token, decode or prefill, attends alone over its own context split into
  KV_SPLIT-key chunks at fixed positions: per (KV head, query, chunk) one [G, D] x [D, KV_SPLIT]
  and one [G, KV_SPLIT] x [KV_SPLIT, D] product in the cache dtype (the same shape every time;
  batched matmuls of one per-entry shape measured invariant in the batch count), one max over the
  whole context (exact), and the chunk sums added in chunk order by a sequential cumsum in fp32. Padding keys and
  chunks past a query's position add exact zeros. That is the torch form (torch_attention); where
  a C compiler and AVX-512 are there, one kernel of our own computes the same definition per query
  in one call per layer (models/bi_attention_kernel.py: fp32 sums in key order, masked keys not
  read; within rounding of the torch form, not its bits, so a process uses one or the other).
- Elementwise exp/log over a whole [B, V] batch take a scalar path for the elements past the last
  whole vector, so a row's values could depend on the rows after it: the sampler works row by row
  in this mode (engine/sampler.py). (Rotary cos/sin, RMSNorm and cumsum were checked row-invariant.)
- MoGE: expert products (row counts set by the routing of the other tokens) are tiled like every
  linear, and a token's expert outputs are summed over its groups in group order, in fp32.

- Compiled against eager (a decode step compiled, the prefill and a preempted sequence's
  recomputation eager): inductor's own reductions sum in another order than eager's aten kernels
  (most fp32 row sums of 64 values differ in the last bit), and its fp32 exp is Sleef's where
  eager's is MKL's. RMSNorm's mean square and the attention's chunk sums are therefore summed by
  fixed_order_sum (elementwise adds in an order set here) and the attention's exp is an exp2, which
  both compute alike. And a quantized weight's conversion row count (retuned by the compile thread
  after the wrap) never drops to a tile's row count (RowTiledLinear's floor).

The sampler needs nothing: greedy picks and logprobs are per-row and seeded rows draw from their
own generators (rows without a seed share the engine's generator and stay batch-dependent).
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer.device import tracing
from pangu_infer.parallel.state import ParallelState, RowParallelLinear

# At import, not inside the traced attention: the module registers pangu_infer::bi_attention.
from pangu_infer.models import bi_attention_kernel

# Padded tile: rows of every product of a kernel that is not row-invariant here (each call exactly
# PAD_TILE rows, the last tile padded with zeros). 8: a 16-way decode step is two tiles.
ROW_TILE = PAD_TILE = 8
# Free tiles: a kernel whose rows were measured equal at every row count P..T on this machine (P a
# MIN_ROWS entry) runs in calls of P..T rows, T the largest of these (no padding, or one row more,
# for a one-row decode; benchmarks/batch_invariant.py --sources, RESULTS.md).
FREE_TILES = (64, 32, 16, 8, 4, 2)
# Row floors tried: 1 (no padding), 2 (a one-row call padded to two rows, for a kernel whose one-row
# product alone differs from every other row count, as oneDNN's bf16 products over 1536 inputs on
# a Zen 4 EPYC: RESULTS.md; two rows cost what one does where the weight's bytes set the time).
MIN_ROWS = (1, 2)
# Products measured per (kernel, row floor, row count): outputs of a kernel that differs between
# row counts differ rarely (RESULTS.md), so the measurement needs many (measure_activations).
MEASURE_ELEMENTS = 1 << 17
MEASURE_MAX_ROWS = 2048
# Cache entry (pangu_infer.machine) of a linear's measured (min_rows, tile). A new measurement gets
# a new name: "batch_invariant_free_rows" was the old one's, whose 64 rows could miss a difference.
TILES_KEY = "batch_invariant_tiles"
# Set to 0: every linear in padded tiles, nothing measured.
MEASURE_ENV = "PANGU_INFER_BATCH_INVARIANT_MEASURE"
# Set to 0: compiled steps call every linear back through the opaque operator (no inlining).
INLINE_ENV = "PANGU_INFER_BATCH_INVARIANT_INLINE"
# Keys per attention chunk: fixed positions 0, KV_SPLIT, 2 * KV_SPLIT, ... of each sequence.
KV_SPLIT = 64
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
# Elements of gathered K (per tensor) for one block of prefill queries: bounds the memory.
_PREFILL_BLOCK_ELEMENTS = 1 << 24


def row_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = PAD_TILE, min_rows: int | None = None) -> torch.Tensor:
    """fn over the rows of x [M, K] in calls of at most `tile` rows, a call of fewer than `min_rows`
    rows (only the last can be) padded with zero rows to `min_rows` and its padding dropped.
    min_rows defaults to `tile`: every call exactly `tile` rows (for any kernel). Less is only for a
    kernel measured row-invariant at every row count min_rows..tile (tiles())."""
    min_rows = tile if min_rows is None else min_rows
    m = x.shape[0]
    if min_rows <= m <= tile:
        return fn(x)
    out = []
    for i in range(0, m, tile):
        part = x[i : i + tile]
        n = part.shape[0]
        out.append(fn(part) if n >= min_rows else fn(pad_rows(part, min_rows))[:n])
    return out[0] if len(out) == 1 else torch.cat(out)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [M, K] with zero rows appended up to `rows`."""
    return torch.cat((x, x.new_zeros(rows - x.shape[0], *x.shape[1:])))


def fixed_order_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over its last dim (kept, size 1) by pairwise halving: each step adds the first
    half to the second elementwise (an odd last element carried along), so the order of the
    additions is set here, not by a kernel. A reduction op (`sum`, `mean`) sums in an order its
    kernel picks, and inductor's generated reduction picks another than eager's aten kernel
    (fp32 rows of 64: most row sums differ in the last bit; RESULTS.md, issue 18 fourth pass),
    so a compiled step and the eager forward would round differently; fp32 elementwise adds
    are the same bits in both (inductor's C++ is built without unsafe math or contraction)."""
    while t.shape[-1] > 1:
        n = t.shape[-1]
        half = n // 2
        top = t[..., :half] + t[..., half : 2 * half]
        t = top if n % 2 == 0 else torch.cat((top, t[..., 2 * half :]), dim=-1)
    return t


def softmax(t: torch.Tensor) -> torch.Tensor:
    """Softmax of fp32 t over its last dim, the same bits eager and compiled: the max (exact),
    exp2 for exp and fixed_order_sum for the sum (inductor's softmax sums in another order and its
    exp is Sleef's where eager's is MKL's: the MoGE router's fp32 weights differed in about 3 of
    4 rows, RESULTS.md, issue 18 fifth pass). Measured bitwise equal compiled and eager, and alone
    and batched, at 64 experts (MoGE's); widths that are not a multiple of 32 can put a row in an
    elementwise kernel's scalar tail (not checked)."""
    p = torch.exp2((t - t.amax(-1, keepdim=True)) * _LOG2E)
    return p / fixed_order_sum(p)


def measure_activations(in_features: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows a kernel's row invariance is measured on: random, of mixed scale, and enough of them
    that the products hold at least MEASURE_ELEMENTS values (at least FREE_TILES[0] rows, at most
    MEASURE_MAX_ROWS). A kernel that differs between row counts mostly differs in a few outputs
    only, where its fp32 sums fall on either side of a bf16 rounding: on a Zen 4 EPYC a one-row
    bf16 product over 1536 inputs differed from the same row among others in about 1 output in
    7,000, which 64 rows of 576 outputs did not show reliably (RESULTS.md)."""
    rows = max(FREE_TILES[0], min(MEASURE_MAX_ROWS, -(-MEASURE_ELEMENTS // max(out_features, 1))))
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen).mul(4).add(0.1)).to(dtype)


def invariant_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, min_rows: int = 1, up_to: int = FREE_TILES[0]) -> int:
    """The largest T <= up_to such that fn over the rows of x in row_tiled calls of at most M rows
    (fewer than min_rows padded to min_rows: the wrapper's own calls, its last tile included)
    computes the bits of calls of exactly min_rows rows, for every M in min_rows..T; min_rows = 1
    compares against each row alone."""
    with torch.inference_mode():
        reference = row_tiled(fn, x, min_rows, min_rows)
        for m in range(min_rows + 1, up_to + 1):
            if not torch.equal(row_tiled(fn, x, m, min_rows), reference):
                return m - 1
    return up_to


def measure_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, int]:
    """(min_rows, tile) for fn on this machine: for each MIN_ROWS entry P, the largest FREE_TILES
    entry T with fn invariant at every row count P..T (invariant_rows), and with P > 1 only a T of
    at least PAD_TILE (fewer padded rows than PAD_TILE-row tiles, and tiles no smaller); the largest
    T wins, the smaller P on a tie. (PAD_TILE, PAD_TILE), padded tiles, where none is."""
    best = (PAD_TILE, PAD_TILE)
    for floor in MIN_ROWS:
        up_to = invariant_rows(fn, x, floor)
        tile = max([t for t in FREE_TILES if _tile_allowed(floor, t) and t <= up_to], default=0)
        if tile and (best == (PAD_TILE, PAD_TILE) or tile > best[1]):
            best = (floor, tile)
        if best[1] == FREE_TILES[0]:
            break
    return best


def _signature(module: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> str:
    """What a linear's kernel choice can depend on: its type, kernel attributes, sizes, dtypes."""
    parts = [type(module).__name__, f"{in_features}x{out_features}", str(dtype).removeprefix("torch.")]
    for holder in (module, getattr(module, "weight", None)):
        if holder is None:
            continue
        for attr in ("kernel", "convert_min_rows", "group_size", "method", "layout"):
            value = getattr(holder, attr, None)
            if isinstance(value, (int, str)):
                parts.append(f"{attr}={value}")
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        parts.append(f"w={str(weight.dtype).removeprefix('torch.')}")
    parts.append(f"bias={getattr(module, 'bias', None) is not None}")
    return "|".join(parts)


_tiles: dict[str, tuple[int, int]] = {}


def _tile_allowed(floor: int, tile: int) -> bool:
    return floor in MIN_ROWS and tile in FREE_TILES and tile >= (2 if floor == 1 else PAD_TILE)


def _valid_tiles(value: object) -> bool:
    """A cached (min_rows, tile): a JSON list measure_tiles could have returned."""
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
        return False
    return tuple(value) == (PAD_TILE, PAD_TILE) or _tile_allowed(*value)


def tiles(module: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> tuple[int, int]:
    """(min_rows, tile): `module` (on CPU) runs in calls of min_rows..tile rows, fewer padded to
    min_rows (measure_tiles; (PAD_TILE, PAD_TILE) where nothing was measured). Measured once per
    kernel, shape and dtype and cached per machine (pangu_infer.machine) like the quantized kernels'
    thresholds, under TILES_KEY: a cache entry of an earlier measurement (another name) is never
    taken for this one's."""
    from pangu_infer.machine import cached_choice

    if os.environ.get(MEASURE_ENV, "1") == "0":
        return PAD_TILE, PAD_TILE
    params = [t for t in itertools.chain(module.parameters(), module.buffers())]
    if any(t.device.type != "cpu" for t in params):
        return PAD_TILE, PAD_TILE
    key = f"{TILES_KEY}|{_signature(module, in_features, out_features, dtype)}"
    if key not in _tiles:

        def measure() -> list[int]:
            return list(measure_tiles(module, measure_activations(in_features, out_features, dtype)))

        floor, tile = cached_choice(key, measure, _valid_tiles)
        _tiles[key] = (floor, tile)
    return _tiles[key]


# handle -> (the wrapped linear module, tile, min_rows); what pangu_infer::row_tiled_linear runs. Entries leave with their wrapper.
_MODULES: dict[int, tuple[nn.Module, int, int]] = {}
_handles = itertools.count()

_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("row_tiled_linear(Tensor x, int handle, int out_features) -> Tensor")


def _row_tiled_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    # Called back from every compiled decode step once per linear: the common case (one tile, no
    # padding) goes straight to the module's forward.
    inner, tile, min_rows = _MODULES[handle]
    if min_rows <= x.shape[0] <= tile and torch.is_inference_mode_enabled():
        return inner.forward(x)
    with torch.inference_mode():
        return row_tiled(inner, x, tile, min_rows)


def _row_tiled_linear_fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


_lib.impl("row_tiled_linear", _row_tiled_linear, "CPU")
_lib.impl("row_tiled_linear", _row_tiled_linear, "CUDA")
_lib._register_fake("row_tiled_linear", _row_tiled_linear_fake)


class RowTiledLinear(nn.Module):
    """Any linear module (x [..., in] -> [..., out]) run in row tiles: calls of `min_rows` to `tile`
    rows (a shorter last one padded with zero rows to `min_rows`) where its kernel was measured
    row-invariant at every row count min_rows..tile (tiles(): min_rows 1, no padding, or 2), else
    PAD_TILE-row calls padded with zeros. An opaque operator to torch.compile, so the compiled
    decode step runs exactly the eager tiles; eager calls the tiles directly."""

    def __init__(self, inner: nn.Module, in_features: int, out_features: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = in_features, out_features
        self.min_rows, self.tile = tiles(inner, in_features, out_features, dtype) if dtype is not None else (PAD_TILE, PAD_TILE)
        # A quantized weight converts to bf16 from `convert_min_rows` rows (another kernel, other
        # bits); the tile was measured (and inline_rows set) with its value now. The compile thread
        # retunes it later (quant.modules.prepare_prefill: the compiled conversion's own crossing,
        # 32 rows where this was 64 on the machine of RESULTS.md), which made the 32-row tiles of a
        # prefill convert while a token alone did not: the floor keeps every tile on the kernel
        # measured here.
        weight = getattr(inner, "weight", None)
        if isinstance(getattr(weight, "convert_min_rows", None), int):
            weight.convert_min_rows_floor = max(getattr(weight, "convert_min_rows_floor", 1), self.tile + 1)
            weight.convert_min_rows = max(weight.convert_min_rows, weight.convert_min_rows_floor)
        # Rows up to which a compiled step traces the inner module itself instead of calling back
        # into Python (0: never); see inline_rows().
        measured = self.min_rows < self.tile
        self.inline_rows = inline_rows(inner, self.tile) if measured and os.environ.get(INLINE_ENV, "1") != "0" else 0
        self.handle = next(_handles)
        _MODULES[self.handle] = (inner, self.tile, self.min_rows)
        weakref.finalize(self, _MODULES.pop, self.handle, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).contiguous()
        if tracing():
            # Up to inline_rows the compiled graph calls the inner module's own kernel op, which is
            # what the eager tile calls (one tile, padded to min_rows as eager pads it): the same
            # bits without a Python callback per linear. The comparisons are guards on the step's
            # batch size, so a bigger batch gets its own graph (warmed up by engine/compiled.py),
            # with the callback.
            m = flat.shape[0]
            if m <= self.inline_rows:
                if self.min_rows == 1 or m >= self.min_rows:  # no guard where nothing is padded
                    y = self.inner(flat)
                else:
                    y = self.inner(pad_rows(flat, self.min_rows))[:m]
            else:
                y = torch.ops.pangu_infer.row_tiled_linear(flat, self.handle, self.out_features)
        else:
            y = row_tiled(self.inner, flat, self.tile, self.min_rows)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        inline = f", compiled inline up to {self.inline_rows} rows" if self.inline_rows else ""
        if self.min_rows == self.tile:
            tiling = f"padded tiles of {self.tile}"
        elif self.min_rows == 1:
            tiling = f"unpadded tiles of {self.tile}"
        else:
            tiling = f"tiles of {self.min_rows}..{self.tile} (fewer padded to {self.min_rows})"
        return f"rows in {tiling}{inline}"


def inline_rows(inner: nn.Module, tile: int) -> int:
    """Rows (<= tile) up to which a compiled step may trace `inner` in place of the opaque
    row_tiled_linear callback, 0 where it may not: only where the traced forward calls, at
    every row count up to that, the one kernel the eager tile calls, as an op inductor leaves
    opaque. That holds for
    - PackedLinear: its forward is the registered pangu_infer::packed_linear op;
    - the quantized linears with the own int4 kernel (the registered pangu_infer::int4_vnni_mm op, or
      its 5- and 6-bit forms' int5_vnni_mm)
      or the int8 kernel (quant/cpu_int8.py's registered pangu_infer::int8_own_mm op where it runs,
      else aten::_weight_int8pack_mm, which inductor lowers to a call of the same aten kernel
      unless max-autotune is on), below the row count where they convert the weight
      to bf16 instead (the conversion may be inductor's own loop when compiled).
    Any other module (plain nn.Linear, which inductor may lower to other code) keeps the callback."""
    from pangu_infer.models.packed import PackedLinear
    from pangu_infer.quant.modules import QuantizedLinear

    if type(inner) is PackedLinear:
        return tile
    if type(inner) is QuantizedLinear:
        weight = inner.weight
        if getattr(weight, "kernel", None) not in ("int4_vnni", "int5", "int6", "int8") or weight.method not in ("int4", "int5", "int6", "int8"):
            return 0
        if any(os.environ.get(v, "0") == "1" for v in ("TORCHINDUCTOR_MAX_AUTOTUNE", "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM")):
            return 0  # inductor may then pick its own GEMM template for the int8 product
        return max(0, min(tile, weight.convert_min_rows - 1))
    return 0


def linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module that stands for a linear layer (x [..., in] -> [..., out]), else None:
    `nn.Linear` itself (not the tensor-parallel subclasses, whose collectives stay untiled),
    `PackedLinear`, the quantized linears (sizes on the module or on its packed weight), and any
    later module named *Linear with integer `in_features` / `out_features`."""
    if isinstance(module, RowTiledLinear):
        return None
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear) or not type(module).__name__.endswith("Linear"):
        return None
    for holder in (module, getattr(module, "weight", None)):
        sizes = (getattr(holder, "in_features", None), getattr(holder, "out_features", None))
        if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            return sizes  # type: ignore[return-value]
    return None


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: that of the model's float parameters and buffers."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def make_batch_invariant(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Wrap every linear module of `model` in RowTiledLinear and switch its attention-free parts
    (MoGE combine, tied head) to their batch-invariant forms. Idempotent; returns how many
    modules were wrapped. dtype: the activations' (default: the model's float parameters')."""
    if getattr(model, "batch_invariant", False):
        return 0
    dtype = dtype or _activation_dtype(model)
    # Tensor parallel: a row-parallel linear's own product is tiled like any linear (its all-reduce
    # stays outside the tiles), and the ranks' partial sums are added in rank order.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RowParallelLinear:
                setattr(parent, name, child.around(_weight_only(child.weight)))
    parallel = getattr(model, "parallel", None)
    if isinstance(parallel, ParallelState) and parallel.is_parallel:
        parallel.ordered_sums = True
    sites = []
    for parent in model.modules():
        for name, child in parent.named_children():
            sizes = linear_sizes(child)
            if sizes is not None:
                sites.append((parent, name, child, sizes))
    for parent, name, child, (fin, fout) in sites:
        setattr(parent, name, RowTiledLinear(child, fin, fout, dtype))
    for m in model.modules():
        if "batch_invariant" in vars(m):
            m.batch_invariant = True
    model.batch_invariant = True
    return len(sites)


def _weight_only(weight: nn.Parameter) -> nn.Linear:
    """An nn.Linear of `weight` with no bias (a row-parallel linear's product alone)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = weight
    return linear


def tied_head(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """A tied LM head's product, row-tiled."""
    return row_tiled(lambda t: F.linear(t, embedding), hidden)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each query alone over its own keys, in fixed KV_SPLIT chunks (see the module docstring).

    q [N, H, D]; caches [S, Hkv, D]; slots [N or 1, L] (L a multiple of KV_SPLIT; padding repeats a
    real slot); valid [N, L] bool (key i attended by query n). Returns [N, H, D] in q's dtype.
    Where the C kernel of models/bi_attention_kernel.py runs (decided once per process and model:
    its sums are the same bits alone or batched, decode or prefill, eager or compiled, but not the
    torch form's bits), it computes this; else the torch form, torch_attention.
    """
    if bi_attention_kernel.usable(q, k_cache, v_cache):
        return bi_attention_kernel.attention(q, k_cache, v_cache, slots, valid, scale)
    return torch_attention(q, k_cache, v_cache, slots, valid, scale)


def torch_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """attention() in torch operators (where the C kernel does not run): per (KV head, query,
    chunk) two batched products, as the module docstring says."""
    n, h, d = q.shape
    hkv = k_cache.shape[1]
    g = h // hkv
    length = slots.shape[-1]
    chunks = length // KV_SPLIT
    rows = slots.shape[0]  # 1: every query reads the same keys (a prefill block), gathered once
    index = slots.reshape(-1)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # Heads first, [Hkv, rows, C, S, D], one index_select per head straight into place: every
        # (head, row, chunk) entry is then a contiguous [S, D] block and the batched products below
        # read them without a copy.
        out = cache.new_empty(hkv, index.numel(), cache.shape[-1])
        for head in range(hkv):
            torch.index_select(cache[:, head], 0, index, out=out[head])
        return out.view(hkv, rows, chunks, KV_SPLIT, cache.shape[-1])

    keys = gather(k_cache)
    vals = gather(v_cache)
    qg = q.to(keys.dtype).view(n, hkv, g, d).transpose(0, 1).reshape(hkv, n, 1, g, d)
    # One [G, D] x [D, S] product per (KV head, query, chunk) (q broadcast over the chunks); scores
    # rounded as the cache dtype's product gives them.
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [Hkv, N, C, G, S]
    mask = valid.view(1, n, chunks, 1, KV_SPLIT)
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(dim=(2, 4), keepdim=True)  # exact: the same whatever the padding
    # masked keys: exactly 0. exp2, not exp: eager's fp32 exp is MKL's vector exp and inductor's is
    # Sleef's, which differ in the last bit for about 1 value in 10; both run Sleef's exp2.
    probs = torch.exp2((scores - top) * _LOG2E)
    # [Hkv, N, C, G], over a fixed KV_SPLIT keys, in an order eager and compiled share
    sums = fixed_order_sum(probs)[..., 0]
    # One [G, S] x [S, D] product per chunk, in the cache dtype like the default path's
    parts = torch.matmul(probs.to(vals.dtype), vals).float()  # [Hkv, N, C, G, D]
    # Chunks added in order (cumsum is sequential); chunks past a query's last key add exact zeros.
    total = sums.cumsum(2)[:, :, -1]  # [Hkv, N, G]
    out = (parts.cumsum(2)[:, :, -1] / total[..., None]).transpose(0, 1)  # [N, Hkv, G, D]
    return out.reshape(n, h, d).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    context_len: int,
    scale: float,
) -> torch.Tensor:
    """A sequence's prefill chunk: q [n, H, D] for the last n of its context_len tokens (already
    in the cache at kv_slots [context_len]); in blocks of queries, each over the keys it can see."""
    n = q.shape[0]
    first = context_len - n  # position of the first query
    if bi_attention_kernel.usable(q, k_cache, v_cache):
        # One call for the whole chunk: the kernel takes each query alone whatever the block.
        q_pos = torch.arange(first, context_len, device=q.device)
        valid = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
        return bi_attention_kernel.attention(q, k_cache, v_cache, kv_slots[:context_len][None, :], valid, scale)
    hkv, d = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    block = 1
    while block < n and (block * 2) * context_len * hkv * d <= _PREFILL_BLOCK_ELEMENTS:
        block *= 2
    for start in range(0, n, block):
        stop = min(start + block, n)
        keys_needed = first + stop  # the block's last query sees keys [0, first + stop)
        length = -(-keys_needed // KV_SPLIT) * KV_SPLIT
        slots = kv_slots[:keys_needed]
        if length > keys_needed:
            slots = torch.cat((slots, slots[:1].expand(length - keys_needed)))
        q_pos = torch.arange(first + start, first + stop, device=q.device)
        valid = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        out[start:stop] = attention(q[start:stop], k_cache, v_cache, slots[None, :], valid, scale)
    return out
