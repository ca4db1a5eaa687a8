"""Quantized weights in the layout of each device's kernel, and the modules swapped in for float ones.

Kernels (all shipped with PyTorch; measured in benchmarks/RESULTS.md, "weight-only quantization"):
- int8: `aten._weight_int8pack_mm(x, int8 [N, K], scales [N])` on CPU (and CUDA where the build
  has it). Activations go in as
  bf16 even for fp32 models: the fp32 path of the kernel is several times slower on CPU, and bf16
  rounding of activations (2^-9) is below int8's own error (2^-8).
- int8 on x86 CPUs with AVX2, where it was measured faster: this package's own kernel
  (pangu_infer.quant.cpu_int8, the same weight and scales; activations in 16-bit integers per row,
  exact integer sums, float32 out; `PANGU_INFER_INT8_KERNEL=aten` turns it off).
- int4 on CPU: `aten._convert_weight_to_int4pack_for_cpu(int32 [N, K], 1)` at load, then
  `aten._weight_int4pack_mm_for_cpu(x, packed, G, scale_and_zero [K/G, N, 2])`, bf16 activations
  (fp32 ones are several times slower). It needs N % 16 == 0: other row counts are zero-padded at load.
- int4 on x86 CPUs with AVX-512 VNNI: this package's own kernel and layout (pangu_infer.quant.cpu_int4,
  `PANGU_INFER_INT4_KERNEL=aten` turns it off), which reads the weight faster at decode.
- 5-bit codes (GGUF's Q5_0 / Q5_1 / Q5_K, written by the loader as cpu_int4.Layout with bits 5; kernel
  "int5") and 6-bit ones (GGUF's Q6_K, bits 6, groups of 16; kernel "int6"): the same kernel's forms
  with bit planes (the int4 layout plus one or two planes); products of many rows convert the weight
  to bf16 from the row count measured for each (tuning.convert_min_rows("int5") / ("int6")).
- From a row count measured once per machine on (pangu_infer.quant.tuning), int8 and int4 CPU
  products convert the weight to bf16 and run one oneDNN product instead (prefill); the
  conversion is one C++ loop per kind once `pangu_infer.quant.prefill.prepare` has built it.
- On CPUs with AMX, where it was measured faster (quant/amx.py, quant/tuning.py), int8 and
  cpu_int4-layout products of many rows run a kernel of our own that reads the quantized weight
  itself (no bf16 weight written out); PANGU_INFER_AMX_PREFILL=0 turns it off.
- int4 on CUDA: `aten._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` and
  `aten._weight_int4pack_mm` (bf16 only; K a multiple of 32 * inner_k_tiles / 2, N of 8).
- Anywhere else (other devices, shapes a kernel refuses): the weight is dequantized per product,
  slow but exact to the stored numbers.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer.quant import amx, cpu_int4, cpu_int8, transcode
from pangu_infer.quant.formats import QuantizedTensor, dequantize, unpack_int4
from pangu_infer.quant import prefill
from pangu_infer.quant.prefill import int4_to_bf16, int4_vnni_product, int8_product, weight_product
from pangu_infer.quant.tuning import NEVER, amx_prefill as amx_chosen, convert_min_rows

KERNEL_DTYPE = torch.bfloat16
INT8_ALIGN = 64
CPU_INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
CPU_INT4_BLOCK = 64  # rows per independent block of its output layout (checked in the tests)
PACK_CHUNK_ELEMENTS = 1 << 20
_CUDA_INNER_K_TILES = (8, 4, 2)


def _has_kernel(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _each_matrix(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn to every [N, ...] matrix of a [..., N, ...] stack (experts); load time only.

    Each result is copied into the output as it comes: no list of results next to their stack.
    """
    lead = x.shape[:-2]
    if not lead:
        return fn(x)
    flat = x.reshape(-1, *x.shape[-2:])
    out = None
    for i, m in enumerate(flat):
        y = fn(m)
        if out is None:
            out = y.new_empty((len(flat), *y.shape))
        out[i].copy_(y)
        del y
    return out.reshape(*lead, *out.shape[1:])


class PackedWeight(nn.Module):
    """One quantized weight [..., N, K] (leading dims: experts) laid out for its device's kernel."""

    def __init__(self, qt: Union[QuantizedTensor, cpu_int4.Layout], device: torch.device, activations: Optional[torch.dtype] = None, consume: bool = False):
        """consume: qt is the caller's to give up (a loader's fresh copy, not file-backed): where the
        layout allows, the weight is rearranged in qt's own storage instead of a second one. A
        cpu_int4.Layout is taken as it is (its tensors become the buffers)."""
        super().__init__()
        self.method = qt.method
        self.activations = activations  # the model's dtype, where known: some row choices depend on it
        self.out_features, self.in_features = qt.shape[-2], qt.shape[-1]
        self.group_size = qt.group_size
        self.convert_min_rows = NEVER  # products of this many rows or more convert the weight to bf16
        self.amx_prefill = False  # ... or run quant/amx.py's kernel (chosen per kind by prepare_prefill)
        if isinstance(qt, cpu_int4.Layout):  # written in the kernel's layout by the loader (a GGUF file's Q4, Q5 or Q6_K blocks)
            if device.type != "cpu" or not cpu_int4.usable(self.in_features, self.group_size):
                raise ValueError(f"an {qt.method} weight in cpu_int4's layout needs its kernel (device {device})")
            # 5- or 6-bit codes: the int4 layout and its bit planes (hb), cpu_int4's product with them
            self.kernel = "int4_vnni" if qt.hb is None else f"int{4 + cpu_int4.planes(qt.hb)}"
            self.register_buffer("scales", qt.sz)
            self.register_buffer("data", qt.data)
            if qt.hb is not None:
                self.register_buffer("hb", qt.hb)
            self.convert_min_rows = convert_min_rows(self.kernel, activations)
        elif qt.method == "int8" and self._int8_kernel_fits(qt, device):
            self.kernel = "int8"
            # fewer rows than convert_min_rows: quant/cpu_int8.py's kernel where it was measured faster
            self.own_int8 = device.type == "cpu" and cpu_int8.usable(self.in_features)
            if device.type == "cpu":
                self.convert_min_rows = convert_min_rows("int8")
            self.register_buffer("data", _aligned(qt.qweight.to(device)))
            self.register_buffer("scales", qt.scale.to(device=device, dtype=KERNEL_DTYPE))
        elif qt.method == "int4" and device.type == "cpu" and cpu_int4.usable(self.in_features, self.group_size):
            self.kernel = "int4_vnni"
            self._pack_int4_vnni(qt, consume)
            self.convert_min_rows = convert_min_rows("int4_vnni", activations)
        elif qt.method == "int4" and device.type == "cpu":
            self.kernel = "int4_cpu"
            self._pack_int4_cpu(qt)
            if self.data.shape[-2] % CPU_INT4_BLOCK == 0:  # the converter reads whole 64-row blocks
                self.convert_min_rows = convert_min_rows("int4")
        elif qt.method == "int4" and self._cuda_int4_tiles(device) is not None:
            self.kernel = "int4_cuda"
            tiles = self._cuda_int4_tiles(device)
            packed = _each_matrix(
                qt.qweight.to(device), lambda m: torch.ops.aten._convert_weight_to_int4pack(m.contiguous(), tiles)
            )
            self.register_buffer("data", packed)
            self.register_buffer("scales", _scale_and_zero(qt).to(device))
        else:
            self.kernel = "dequantize"
            self.register_buffer("data", qt.qweight.to(device))
            self.register_buffer("scales", qt.scale.to(device))
            self.register_buffer("zeros", None if qt.zero is None else qt.zero.to(device))

    def _int8_kernel_fits(self, qt: QuantizedTensor, device: torch.device) -> bool:
        # The CPU kernel reads the weight with aligned vector loads: it crashes (SIGSEGV) unless
        # the weight starts on 64 bytes and K is a multiple of 16 (measured on torch 2.13).
        n, k = self.out_features, self.in_features
        stacked_aligned = qt.qweight.dim() == 2 or (n * k) % INT8_ALIGN == 0
        return k % 16 == 0 and stacked_aligned and _has_kernel("aten::_weight_int8pack_mm", device)

    def _cuda_int4_tiles(self, device: torch.device) -> Optional[int]:
        if device.type != "cuda" or not _has_kernel("aten::_weight_int4pack_mm", device) or self.out_features % 8:
            return None
        return next((t for t in _CUDA_INNER_K_TILES if self.in_features % (16 * t) == 0), None)

    def _pack_int4_cpu(self, qt: QuantizedTensor) -> None:
        n, pad = self.out_features, -self.out_features % CPU_INT4_ROWS
        # The packed layout is made of independent blocks of 64 rows: packing a few MB of rows at
        # a time keeps the int32 temporaries small (big ones fragment the heap: RSS stays up).
        rows = max(CPU_INT4_BLOCK, PACK_CHUNK_ELEMENTS // self.in_features // CPU_INT4_BLOCK * CPU_INT4_BLOCK)

        def pack(m: torch.Tensor) -> torch.Tensor:
            out = None  # [n + pad, K/2] uint8, filled block by block
            for start in range(0, n, rows):
                part = m[start : start + rows]
                last = start + rows >= n
                q = torch.empty(len(part) + (pad if last else 0), self.in_features, dtype=torch.int32)
                torch.bitwise_right_shift(part, 4, out=q[: len(part), 0::2])
                torch.bitwise_and(part, 15, out=q[: len(part), 1::2])
                if last and pad:
                    q[len(part) :] = 8  # padded rows: (8 - 8) * scale + 0 = 0
                block = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
                del q
                if out is None:
                    out = block.new_empty((n + pad, *block.shape[1:]))
                out[start : start + len(block)].copy_(block)
                del block
            return out

        self.register_buffer("data", _each_matrix(qt.qweight, pack))
        self.register_buffer("scales", F.pad(_scale_and_zero(qt), (0, 0, 0, pad)).contiguous())

    def _pack_int4_vnni(self, qt: QuantizedTensor, consume: bool = False) -> None:
        n, pad = self.out_features, -self.out_features % cpu_int4.ROW_BLOCK
        lead = qt.qweight.shape[:-2]
        # Every zero 0 (GGUF's Q4_0: w = (q - 8) d), as the kernel reads it (its bf16 bits): the scales
        # alone, 1 value per group and row instead of 2 (10% fewer bytes per decode step's weight read).
        zeros = 2 if qt.zero is not None and bool(qt.zero.to(torch.bfloat16).view(torch.int16).any()) else 1
        scales = qt.scale.reshape(-1, *qt.scale.shape[-2:])
        zero_mats = qt.zero.reshape(-1, *qt.zero.shape[-2:]) if zeros == 2 else [None] * len(scales)
        sz = torch.empty(len(scales), (n + pad) // cpu_int4.ROW_BLOCK, qt.scale.shape[-1], zeros, cpu_int4.ROW_BLOCK, dtype=torch.bfloat16)
        for i, (s, z) in enumerate(zip(scales, zero_mats)):  # experts one at a time; padded rows: scale 0, zero 0
            sz[i].copy_(cpu_int4.pack_scales(F.pad(s, (0, 0, 0, pad)), None if z is None else F.pad(z, (0, 0, 0, pad))))
        self.register_buffer("scales", sz.reshape(*lead, *sz.shape[1:]))
        # The codes: in qt's own storage where the caller gives it up (the pairs and the kernel's
        # layout take the same bytes when no row is padded), else into a new tensor by transcode's
        # C pass, else in Python a few MB of rows at a time (the unpacked codes are a temporary of
        # one byte per weight; no second copy of the packed weight is made).
        data = transcode.pairs_to_octets_in_place(qt.qweight) if consume and not pad else None
        if data is None:
            mats = qt.qweight.reshape(-1, *qt.qweight.shape[-2:])
            data = torch.empty(len(mats), (n + pad) // cpu_int4.ROW_BLOCK, self.in_features // cpu_int4.OCTET, 64, dtype=torch.uint8)
            rows = max(cpu_int4.ROW_BLOCK, PACK_CHUNK_ELEMENTS // self.in_features // cpu_int4.ROW_BLOCK * cpu_int4.ROW_BLOCK)
            for i, m in enumerate(mats):  # experts one at a time
                if transcode.pairs_to_octets(m.contiguous(), data[i]):
                    continue
                for start in range(0, n, rows):
                    q = unpack_int4(m[start : start + rows])
                    if start + rows >= n and pad:  # padded rows: code 0 (their scale is 0)
                        q = F.pad(q, (0, 0, 0, pad))
                    b = start // cpu_int4.ROW_BLOCK
                    data[i, b : b + len(q) // cpu_int4.ROW_BLOCK].copy_(cpu_int4.pack_codes(q))
                    del q
            data = data.reshape(*lead, *data.shape[1:])
        self.register_buffer("data", data)

    def forward(self, x: torch.Tensor, expert: Optional[int] = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        data = self.data if expert is None else self.data[expert]
        scales = self.scales if expert is None else self.scales[expert]
        if self.kernel == "dequantize":
            zeros = None if self.zeros is None else (self.zeros if expert is None else self.zeros[expert])
            w = dequantize(QuantizedTensor(self.method, data, scales, zeros), x.dtype)
            return F.linear(x, w)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        xk = x2.to(KERNEL_DTYPE)
        if self.kernel == "int8" and x2.shape[0] >= self.convert_min_rows:
            # The CPU kernel's time grows with the rows like a loop of one-row products; from some
            # row count, converting the weight to bf16 for one oneDNN product is faster (prefill
            # runs this way). Where the two cross is measured once per machine (quant/tuning.py).
            # The scales are folded into the converted weight (quant/prefill.py: one fused loop
            # once compiled, one eager pass before).
            # Where quant/amx.py's kernel was chosen, it reads the int8 weight itself instead.
            y = amx.int8_product(xk, data, scales) if amx.use(self.amx_prefill) else None
            y = int8_product(xk, data, scales) if y is None else y
        elif self.kernel == "int4_vnni" and x2.shape[0] >= self.convert_min_rows:
            # Read by quant/amx.py's kernel where it was chosen, else converted straight into
            # oneDNN's packed layout where it is checked (quant/prefill.py), else to a plain W^T.
            y = amx.int4_product(xk, data, scales, self.group_size) if amx.use(self.amx_prefill) else None
            y = int4_vnni_product(xk, data, scales, self.group_size) if y is None else y
            y = y if y.shape[1] == self.out_features else y[:, : self.out_features]
        elif self.kernel == "int4_vnni":
            y = cpu_int4.product(xk, data, scales, self.group_size)[:, : self.out_features]
        elif self.kernel in ("int5", "int6") and x2.shape[0] >= self.convert_min_rows:
            # quant/amx.py's kernel where it was chosen, else the weight in bf16, one product (as int4's plain W^T)
            y = amx.int4_product(xk, data, scales, self.group_size, self.hb) if amx.use(self.amx_prefill) else None
            y = weight_product(xk, cpu_int4.to_bf16_t(data, scales, self.group_size, self.hb), True) if y is None else y
            y = y[:, : self.out_features]
        elif self.kernel in ("int5", "int6"):
            y = cpu_int4.product5(xk, data, self.hb, scales, self.group_size)[:, : self.out_features]
        elif self.kernel == "int4_cpu" and x2.shape[0] >= self.convert_min_rows:
            # The same for int4: W^T dequantized to bf16 from the kernel's own layout, one product.
            w_t = int4_to_bf16(data, self.group_size, scales)
            y = weight_product(xk, w_t if w_t.shape[1] == self.out_features else w_t[:, : self.out_features], True)
        elif self.kernel == "int8" and self.own_int8 and data.is_contiguous():
            # x in its own dtype (float32 models keep their activations); float32 out
            y = cpu_int8.product(x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float(), data, scales)
        elif self.kernel == "int8":
            y = torch.ops.aten._weight_int8pack_mm(xk, data, scales)
        elif self.kernel == "int4_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, data, self.group_size, scales)
            y = y[:, : self.out_features]
        else:
            y = torch.ops.aten._weight_int4pack_mm(xk, data, self.group_size, scales)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.method}, out={self.out_features}, in={self.in_features}, kernel={self.kernel}"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when it starts on INT8_ALIGN bytes (fresh allocations do), else an aligned copy."""
    return t if t.data_ptr() % INT8_ALIGN == 0 else t.clone()


def _scale_and_zero(qt: QuantizedTensor) -> torch.Tensor:
    """[..., N, K/G] scale and zero -> [..., K/G, N, 2], the int4 kernels' qScaleAndZeros."""
    sz = torch.stack((qt.scale, qt.zero), dim=-1).to(KERNEL_DTYPE)
    return sz.transpose(-3, -2).contiguous()


class QuantizedLinear(nn.Module):
    """Stands in for nn.Linear: y = x W^T + b with W quantized."""

    def __init__(self, weight: PackedWeight, bias: Optional[nn.Parameter]):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight(x)
        return y if self.bias is None else y + self.bias


class QuantizedEmbedding(nn.Module):
    """Stands in for nn.Embedding: rows are dequantized as tokens look them up."""

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.method = qt.method
        self.dtype = dtype
        self.register_buffer("qweight", qt.qweight.to(device))
        self.register_buffer("scale", qt.scale.to(device))
        self.register_buffer("zero", None if qt.zero is None else qt.zero.to(device))

    def portable(self) -> QuantizedTensor:
        return QuantizedTensor(self.method, self.qweight, self.scale, self.zero)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.portable()[ids], self.dtype)


class QuantizedExperts(nn.Module):
    """The routed experts of one MoGE layer with w13 [E, 2I, H] and w2 [E, H, I] quantized."""

    def __init__(self, w13: PackedWeight, w2: PackedWeight, inter: int):
        super().__init__()
        self.w13 = w13
        self.w2 = w2
        self.inter = inter
        # Read once at load (not per step: a compiled step would guard on the environment).
        self.fused = cpu_int4.fused_experts_enabled()

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x, e).split(self.inter, dim=-1)
        return self.w2(F.silu(gate) * up, e)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.w13(x, e)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.w2(h, e)

    def one_token_fused(self, x: torch.Tensor) -> bool:
        """Does one_token() take this token: both products on the own int4 kernel (CPU), x one
        row in bf16 or fp32, the fused path not turned off (PANGU_INFER_FUSED_EXPERTS=off at load)."""
        return (
            self.w13.kernel == "int4_vnni" and self.w2.kernel == "int4_vnni" and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float32) and self.fused
        )

    def one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All the token's routed experts in one op (cpu_int4.experts_one_token): the same numbers
        as MoEBlock._one_token's loop over expert(), without its host sync and per-expert ops."""
        return cpu_int4.experts(
            x, ids, weights, self.w13.data, self.w13.scales, self.w13.group_size,
            self.w2.data, self.w2.scales, self.w2.group_size, self.inter, self.w2.out_features,
        )


class OffloadedExperts(nn.Module):
    """Routed experts as per-expert views of the memory-mapped checkpoint, never copied.

    The OS pages an expert's weights in when a token is first routed to it and may drop them
    again under memory pressure. Kept as lists (not stacked): stacking would copy them. A view
    is cast per product when the checkpoint dtype differs from the model's (transient copy).
    """

    def __init__(self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate[e].to(x.dtype), self.up[e].to(x.dtype), self.down[e].to(x.dtype)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


__all__ = [
    "CPU_INT4_ROWS",
    "KERNEL_DTYPE",
    "OffloadedExperts",
    "PackedWeight",
    "prepare_native_ops",
    "prepare_prefill",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedLinear",
]


def prepare_native_ops(model: nn.Module) -> bool:
    """Before a decode step of `model` is traced: the C++ operators (pangu_infer.native_ops; built
    once per machine) of cpu_int4's and cpu_int8's products where the model has weights that use
    them. True when the graph will call one."""
    weights = [m for m in model.modules() if isinstance(m, PackedWeight)]
    int4 = any(m.kernel in ("int4_vnni", "int5", "int6") for m in weights) and cpu_int4.native_op()
    int8 = any(getattr(m, "own_int8", False) for m in weights) and cpu_int8.native_op()
    return int4 or int8


def prepare_prefill(model: nn.Module) -> Optional[str]:
    """Build the compiled prefill conversions (pangu_infer.quant.prefill) when `model` has quantized
    CPU weights whose products may convert, and set those weights' row counts from which they
    convert to the ones measured for the compiled conversion (once per machine, cached). None when
    ready or not needed, else why the conversions stay eager."""
    weights = [
        m for m in model.modules()
        if isinstance(m, PackedWeight) and m.data.device.type == "cpu"
        and (m.kernel in ("int8", "int4_vnni", "int5", "int6") or (m.kernel == "int4_cpu" and m.data.shape[-2] % CPU_INT4_BLOCK == 0))
    ]
    if not weights:
        return None
    why = prefill.prepare()
    if why is None:
        amx_ok = amx.prepare()
        for m in weights:
            # never down to a row count a batch-invariant tile runs (models/batch_invariant.RowTiledLinear)
            floor = getattr(m, "convert_min_rows_floor", 1)
            m.convert_min_rows = max(convert_min_rows({"int4_cpu": "int4"}.get(m.kernel, m.kernel), m.activations), floor)
            # oneDNN's packed layout, checked once per shape here rather than in a first request
            if m.kernel == "int8":
                prefill.packed_layout_ok(m.data.shape[-2], m.data.shape[-1])
            elif m.kernel == "int4_vnni":
                prefill.packed_layout_ok(m.data.shape[-3] * cpu_int4.ROW_BLOCK, m.data.shape[-2] * cpu_int4.OCTET)
        # quant/amx.py's kernel where it beat that path on a pass over one weight of each of the
        # model's shapes of that kind (measured once per machine, quant/tuning.py), chosen here
        # rather than in a first request
        for kernel, kind in (("int4_vnni", "int4"), ("int5", "int5"), ("int6", "int6"), ("int8", "int8")):
            same = [m for m in weights if m.kernel == kernel]
            if not (amx_ok and same):
                continue
            one_each = {}
            for m in same:
                lead = (0,) * (m.data.dim() - (2 if kernel == "int8" else 3))  # experts: the first one
                hb = getattr(m, "hb", None)
                hb = None if hb is None else hb[lead]
                one_each.setdefault((tuple(m.data.shape[len(lead):]), m.group_size), (m.data[lead], m.scales[lead], m.group_size, hb))
            chosen = amx_chosen(kind, list(one_each.values()))
            for m in same:
                m.amx_prefill = chosen
    return why
