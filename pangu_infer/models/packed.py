"""oneDNN-prepacked bf16 weights for the linear layers of a model served on CPU.

`F.linear` on a plain `[out, in]` bf16 weight makes oneDNN re-lay the weight into its blocked
format on every call. Laid out once, at load (`mkldnn._reorder_linear_weight`), the same product
streams the weight faster for one token and for small batches, and the same at prefill sizes
(benchmarks/cpu_kernels.py; the figures, which differ between CPUs, are in benchmarks/RESULTS.md). The packed tensor is opaque (no views, no
indexing), so packing happens after loading, quantization and sharding, on the modules that stay
plain `nn.Linear`; a tied LM head gets a packed copy of the embedding (the lookup needs rows).

torch.compile cannot take the opaque weights as graph inputs, so the product is the operator
`pangu_infer::packed_linear(x, handle, out_features)`: the weight is looked up from `handle` inside
the operator, and a compiled decode step calls it as an opaque kernel (a small fixed cost over the
direct call). The handle is a one-element tensor the module holds, a graph input read at each call,
not an int: an int would be a constant of the traced graph (and of a saved step's key), so a model
whose linears were numbered otherwise (a second LLM in the same process, a draft model loaded
first) would trace, compile and save its own copy of the same step (models/moge.py's dispatch
handle, the same way).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Optional

import torch
from torch import nn

from pangu_infer.device import can_pack  # noqa: F401  (here too: where the packing lives)
from pangu_infer.machine import cached_choice, env_choice, interleaved_medians, stored_choice
from pangu_infer.memory import drop_mapped_pages, file_backed_ranges, is_file_backed, trim_heap
from pangu_infer.parallel.state import RowParallelLinear

# handle -> (packed weight, bias): what pangu_infer::packed_linear multiplies by. Entries leave with their module.
_WEIGHTS: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
_handles = itertools.count()

_lib = torch.library.Library("pangu_infer", "DEF")
_lib.define("packed_linear(Tensor x, Tensor handle, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    weight, bias = _WEIGHTS[int(handle)]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_linear_shape(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


_lib.impl("packed_linear", _packed_linear, "CPU")
_lib._register_fake("packed_linear", _packed_linear_shape)


LAYOUT_ENV = "PANGU_INFER_PACKED_LAYOUT"
LAYOUTS = ("decode", "general")


@functools.lru_cache(maxsize=None)
def packed_layout() -> str:
    """"decode" (oneDNN's layout for one row, batch-size hint 1) or "general" (no hint).

    Which is faster differs between CPUs: on an Intel Xeon with AMX the general layout ran one-row
    products as fast and 512-row products 1.5x faster than the one-row layout, which had been
    chosen on an AMD EPYC (benchmarks/RESULTS.md). So it is measured once per machine
    (pangu_infer.machine, key `packed_bf16_layout`): the layout whose one-row products are within
    5% of the fastest and whose 256-row products are fastest. PANGU_INFER_PACKED_LAYOUT=decode|general
    sets it by hand.
    """
    forced = env_choice(LAYOUT_ENV, LAYOUTS)
    if forced is not None:
        return forced
    return cached_choice("packed_bf16_layout", measure_layouts, lambda v: v in LAYOUTS)


def measure_layouts(n_weights: int = 8, size: int = 2048) -> str:
    """Times both layouts on `n_weights` bf16 weights of size x size (64 MB by default: more than a
    CPU cache holds, as a model's weights are) at 1 and 256 rows, interleaved; returns the choice."""
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(size, size, generator=g).to(torch.bfloat16) for _ in range(n_weights)]
    layouts = {layout: [_reorder(w, layout) for w in plain] for layout in LAYOUTS}
    del plain
    xs = {rows: torch.randn(rows, size, generator=g).to(torch.bfloat16) for rows in (1, 256)}

    def products(weights: list[torch.Tensor], x: torch.Tensor):
        return lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in weights]

    one = interleaved_medians({name: products(ws, xs[1]) for name, ws in layouts.items()}, rounds=7)
    many = interleaved_medians({name: products(ws, xs[256]) for name, ws in layouts.items()}, rounds=3)
    best_one = min(one.values())
    near = [name for name in LAYOUTS if one[name] <= 1.05 * best_one]
    return min(near, key=lambda name: many[name])


def _reorder(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The bf16 [out, in] `weight` laid out by oneDNN in `layout` (an opaque mkldnn tensor)."""
    if layout == "decode":
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def packed_bytes(out_features: int, in_features: int, blocks: Optional[tuple[int, int]] = None) -> int:
    """Bytes a bf16 [out, in] weight holds once packed, without packing it (the memory estimate's
    count, quant.loading.quantized_weight_bytes): oneDNN's blocked layout pads the rows and columns
    to its blocks (64 rows x 32 columns on an AVX-512 BF16 EPYC: a [3, 5000] weight takes 643,072
    bytes, not 30,000), blocks a model's own sizes, multiples of 64, leave unpadded. `blocks`:
    packed_blocks(), where the caller counts many weights (it reads the machine's stored choices)."""
    rows, cols = packed_blocks() if blocks is None else blocks
    return -(-out_features // rows) * rows * (-(-in_features // cols) * cols) * 2


def known_layout() -> Optional[str]:
    """The layout a load packs into where that is known without measuring: set by hand, or measured
    on this machine before (packed_layout's stored choice); None where a load would measure first."""
    forced = env_choice(LAYOUT_ENV, LAYOUTS)
    if forced is not None:
        return forced
    stored = stored_choice("packed_bf16_layout")
    return stored if stored in LAYOUTS else None


def packed_blocks() -> tuple[int, int]:
    """(rows, columns) oneDNN pads a packed bf16 weight to on this CPU, in the layout a load uses
    (known_layout), else the larger of the two layouts' (the estimate does not measure; on an AMX Xeon
    the general layout's blocks are half the decode layout's, on the EPYCs measured the same)."""
    known = known_layout()
    blocks = [layout_blocks(layout) for layout in ((known,) if known else LAYOUTS)]
    return max(r for r, _ in blocks), max(c for _, c in blocks)


@functools.lru_cache(maxsize=None)
def layout_blocks(layout: str) -> tuple[int, int]:
    """(rows, columns) oneDNN pads a bf16 weight packed in `layout` to: read from the bytes
    (`mkldnn._nbytes`) of two small packed probes, a row of 512 columns (the row block times 512)
    and 512 rows of one column (512 times the column block). (1, 1) where oneDNN cannot say (nothing
    padded)."""
    nbytes = getattr(torch.ops.mkldnn, "_nbytes", None)
    if nbytes is None:
        return 1, 1
    probe = 512  # a multiple of any block oneDNN uses
    rows = nbytes(_reorder(torch.zeros(1, probe, dtype=torch.bfloat16), layout)) // (2 * probe)
    cols = nbytes(_reorder(torch.zeros(probe, 1, dtype=torch.bfloat16), layout)) // (2 * probe)
    return max(rows, 1), max(cols, 1)


def packed_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters of `model` (built on the meta device, as a load builds it) that
    pack_linears lays out for oneDNN when they are plain bf16 on the CPU: the weight of every
    plain nn.Linear and RowParallelLinear, the MoGE routed experts' w13 and w2 (one packed matrix
    per expert). The tied LM head's packed copy is the embedding's, not a parameter of its own."""
    names = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if type(module) in (nn.Linear, RowParallelLinear):
            names.add(dot + "weight")
        elif callable(getattr(module, "pack_experts", None)):  # models/moge.py's StackedExperts
            names.update((dot + "w13", dot + "w2"))
    return names


class PackedLinear(nn.Module):
    """Stands in for a bf16 nn.Linear on CPU: same product, the weight pre-laid out for oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # oneDNN's layout for a batch-size hint: the one-row layout or the general one, whichever
        # this machine measured faster (packed_layout()).
        self.layout = packed_layout()
        self.weight = nn.Parameter(_reorder(weight.detach().contiguous(), self.layout), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        key = next(_handles)
        self.handle = torch.tensor(key, dtype=torch.long)  # a graph input, not a constant (module docstring)
        _WEIGHTS[key] = (self.weight, self.bias)
        weakref.finalize(self, _WEIGHTS.pop, key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.pangu_infer.packed_linear(x.reshape(-1, self.in_features).contiguous(), self.handle, self.out_features)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"oneDNN-packed ({self.layout} layout)"
        )


def pack_linears(model: nn.Module) -> int:
    """Swap every plain bf16 CPU nn.Linear of `model` (and a tied LM head) for a PackedLinear.

    Returns how many were packed. A tensor-parallel row-parallel linear keeps its all-reduce
    around the packed product (RowParallelLinear.around).
    """
    mapped = file_backed_ranges()
    # (parent, name) pairs, not the linears themselves: a list holding the old modules would keep
    # every plain weight alive until the end, twice the weights' memory at the peak.
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in (nn.Linear, RowParallelLinear) and packable(child.weight)
    ]
    count = 0
    for module, name in sites:
        child = getattr(module, name)
        if isinstance(child, RowParallelLinear):
            setattr(module, name, child.around(PackedLinear(child.weight, None)))
        else:
            setattr(module, name, PackedLinear(child.weight, child.bias))
        # A weight read straight from a memory-mapped checkpoint would otherwise stay resident
        # beside its packed copy (the mapping lives on while other tensors of the file do): drop
        # its pages, which the file still backs.
        if is_file_backed(child.weight, mapped):
            drop_mapped_pages(child.weight)
        del child
        count += 1
    count += _pack_experts(model)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "lm_head", False) is None and isinstance(embed, nn.Embedding) and packable(embed.weight):
        model.lm_head = PackedLinear(embed.weight, None)  # tied: a packed copy; the lookup keeps the rows
        count += 1
    trim_heap()  # plain copies of fused weights (qkv, gate_up) were heap memory
    return count


class PackedExperts(nn.Module):
    """bf16 MoGE routed experts, each expert's w13 and w2 laid out for oneDNN like a PackedLinear
    (the layout one-token products stream fastest from); `StackedExperts.impl` when set."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.ModuleList(PackedLinear(w, None) for w in w13)
        self.w2 = nn.ModuleList(PackedLinear(w, None) for w in w2)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13[e](x).split(self.inter, dim=-1)
        return self.w2[e](torch.nn.functional.silu(gate) * up)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.w13[e](x)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.w2[e](h)


def _pack_experts(model: nn.Module) -> int:
    """Pack the bf16 routed experts of every MoGE layer (those not quantized or memory-mapped).

    Peak memory: one layer's experts twice (its stack is freed before the next layer is packed).
    """
    count = 0
    for m in list(model.modules()):
        pack = getattr(m, "pack_experts", None)  # models/moge.py's StackedExperts (not imported: it imports this)
        if callable(pack):
            count += pack()
    return count


def has_packed_linears(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def packable(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not weight.is_meta
