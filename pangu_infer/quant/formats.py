"""Weight-only int8 / int4 number formats: quantize, dequantize, and the portable storage layout.

A weight keeps the linear layout [..., out, in] (N rows, K columns; leading dims are experts).

int8  symmetric, one scale per output row:           w = q * scale,              q in [-127, 127]
int4  asymmetric, one scale and zero per group of G consecutive input columns of a row:
                                                     w = (q - 8) * scale + zero, q in [0, 15]

int4 uses a zero point (min/max per group) because it spends all 16 levels on a skewed group,
and because `(q - 8) * scale + zero` is exactly what PyTorch's int4 kernels compute (CPU and
CUDA), so the stored numbers go to the kernels unchanged. Scales and zeros are stored in
bfloat16, the dtype the kernels read; quantization uses the rounded values, so the error
bounds below hold for what is stored. Because every row is quantized on its own, quantizing
q, k and v apart and stacking the rows equals quantizing the fused qkv_proj: the loader
quantizes each checkpoint tensor as it arrives and never holds a fused float parameter.

Portable int4 packing (checkpoints): uint8 [..., N, K/2], column 2j in the high nibble and
2j+1 in the low one (the order `aten._convert_weight_to_int4pack` takes on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

METHODS = ("int8", "int4")
# What LLM(quantization=...) and --quantization accept: "auto" keeps a checkpoint's own quantization
# (a GGUF file's block types, a `pangu-infer quantize` checkpoint's), "none" loads float weights.
CHOICES = ("auto", "none") + METHODS
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.bfloat16
QUANT_METHOD_KEY = "pangu-weight-only"  # quantization_config["quant_method"] of our checkpoints
# Rounding a scale up by one bf16 step keeps max|w| / scale <= 127 (or the group range <= 15 steps).
_ROUND_UP = 1.0 + 2.0**-7
# Rows quantized per slice (4 MB of fp32): no fp32 copy of a whole weight, and temporaries small
# enough for the heap to reuse instead of fragmenting. Each slice's results are written into the
# outputs, allocated once: no list of pieces and no concatenated copy next to it.
_CHUNK_ELEMENTS = 1 << 20


class QuantizationError(ValueError):
    """A quantization setting or quantized tensor this engine cannot use; the message names the value."""


@dataclass(frozen=True)
class QuantizationConfig:
    method: str
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"quantization method {self.method!r} is not supported; expected one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(
                f"int4 group size {self.group_size!r} is not supported; expected one of "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}"
            )

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` entry of a pre-quantized checkpoint's config.json."""
        d: dict[str, Any] = {"quant_method": QUANT_METHOD_KEY, "method": self.method, "scale_dtype": "bfloat16"}
        if self.method == "int4":
            d.update(group_size=self.group_size, zero_point=True)
        return d

    @classmethod
    def from_hf(cls, d: Any) -> "QuantizationConfig":
        if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD_KEY:
            shown = d.get("quant_method") if isinstance(d, dict) else d
            raise QuantizationError(
                f"config.json quantization_config with quant_method={shown!r} is not supported; "
                f"expected {QUANT_METHOD_KEY!r} (checkpoints written by `pangu-infer quantize`)"
            )
        return cls(d.get("method"), d.get("group_size", DEFAULT_GROUP_SIZE))

    def group_for(self, in_features: int) -> Optional[int]:
        """The int4 group size used for a weight with `in_features` columns; None keeps it float.

        The kernels need in_features divisible by the group: a smaller supported group is used
        when the requested one does not divide it (more scales, never less accuracy), and a
        weight whose in_features is not a multiple of 32 stays in float.
        """
        for g in sorted((g for g in INT4_GROUP_SIZES if g <= self.group_size), reverse=True):
            if in_features % g == 0:
                return g
        return None


def parse_quantization(quantization: Any, group_size: Optional[int] = None) -> Optional[QuantizationConfig]:
    """None, "auto", "none", "int8", "int4" or a QuantizationConfig (what LLM(quantization=...) accepts).

    "auto", "none" and None give None: no quantization while loading a float checkpoint.
    """
    if quantization is None or isinstance(quantization, QuantizationConfig):
        return quantization
    if not isinstance(quantization, str):
        raise QuantizationError(f"quantization={quantization!r} must be one of {', '.join(CHOICES)} or None")
    if quantization in ("auto", "none"):
        return None  # float checkpoints stay float; GGUF files decide per tensor (pangu_infer.loader.gguf_tensors)
    if quantization not in METHODS:
        raise QuantizationError(f"quantization method {quantization!r} is not supported; expected one of {', '.join(CHOICES)}")
    return QuantizationConfig(quantization, DEFAULT_GROUP_SIZE if group_size is None else group_size)


@dataclass
class QuantizedTensor:
    """One weight [..., N, K] in the portable format (see the module docstring)."""

    method: str
    qweight: torch.Tensor  # int8 [..., N, K] | uint8 [..., N, K/2]
    scale: torch.Tensor  # bf16 [..., N] | bf16 [..., N, K/G]
    zero: Optional[torch.Tensor] = None  # int4: bf16 [..., N, K/G]

    @property
    def shape(self) -> torch.Size:
        """The float weight's shape (what the model's parameter has)."""
        if self.method == "int8":
            return self.qweight.shape
        return torch.Size((*self.qweight.shape[:-1], 2 * self.qweight.shape[-1]))

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scale.shape[-1] if self.method == "int4" else self.shape[-1]

    def __getitem__(self, index: Any) -> "QuantizedTensor":
        """Rows of the weight (index over the leading dims and N, never K)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantizedTensor(self.method, self.qweight[index], self.scale[index], zero)

    def columns(self, start: int, stop: int) -> "QuantizedTensor":
        """Input columns [start, stop) of the weight (a row-parallel shard), copied out.

        int8's scale is per output row, so it stays whole; int4 keeps the groups the slice covers,
        which needs start and stop on group boundaries (a ValueError otherwise)."""
        k = self.shape[-1]
        if not 0 <= start <= stop <= k:
            raise ValueError(f"columns [{start}, {stop}) are outside a weight of {k} input columns")
        if self.method == "int8":
            return QuantizedTensor("int8", self.qweight[..., start:stop].contiguous(), self.scale)
        g = self.group_size
        if start % g or stop % g:
            raise ValueError(
                f"columns [{start}, {stop}) of an int4 weight with groups of {g} do not start and end on group boundaries"
            )
        zero = None if self.zero is None else self.zero[..., start // g : stop // g].contiguous()
        return QuantizedTensor(
            "int4", self.qweight[..., start // 2 : stop // 2].contiguous(), self.scale[..., start // g : stop // g].contiguous(), zero
        )

    @staticmethod
    def cat(parts: "list[QuantizedTensor]") -> "QuantizedTensor":
        """Rows of several weights of one format stacked (torch.cat along N)."""
        first = parts[0]
        if any(p.method != first.method or p.shape[-1] != first.shape[-1] or p.group_size != first.group_size for p in parts):
            raise ValueError("only quantized weights of one format, width and group size can be stacked")
        scale_dim = -2 if first.method == "int4" else -1  # int4: [..., N, K/G]; int8: [..., N]
        zero = None if first.zero is None else torch.cat([p.zero for p in parts], dim=-2)
        return QuantizedTensor(
            first.method, torch.cat([p.qweight for p in parts], dim=-2), torch.cat([p.scale for p in parts], dim=scale_dim), zero
        )

    def nbytes(self) -> int:
        parts = [self.qweight, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


# A checkpoint tensor as the loaders yield it: plain, or already quantized.
Weight = Union[torch.Tensor, QuantizedTensor]

# Names of the parts of a quantized weight in a `pangu-infer quantize` safetensors file.
SCALE_SUFFIX = "_scale"
ZERO_SUFFIX = "_zero"


def quantize(
    w: torch.Tensor, config: QuantizationConfig, done: Optional[Callable[[torch.Tensor], None]] = None
) -> Optional[QuantizedTensor]:
    """Quantize a float weight [..., N, K]; None when this method keeps the weight float.

    done: called with each slice of rows of `w` once it is quantized and no longer read (the
    loader drops its pages of the mapped checkpoint there).
    """
    if config.method == "int8":
        return _by_row_chunks(w, _quantize_int8, "int8", done)
    group = config.group_for(w.shape[-1])
    if group is None:
        return None
    return _by_row_chunks(w, lambda x: _quantize_int4(x, group), "int4", done)


def _by_row_chunks(w: torch.Tensor, fn, method: str, done: Optional[Callable[[torch.Tensor], None]]) -> QuantizedTensor:
    flat = w.reshape(-1, w.shape[-1])
    rows = flat.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(w.shape[-1], 1))
    outs: list[torch.Tensor] = []
    for i in range(0, max(rows, 1), step):
        part = fn(flat[i : i + step])
        if not outs:
            outs = [p.new_empty((rows, *p.shape[1:])) for p in part]
        for out, p in zip(outs, part):
            out[i : i + step].copy_(p)
        del part
        if done is not None:
            done(flat[i : i + step])
    lead = w.shape[:-1]
    q = outs[0].reshape(*lead, outs[0].shape[-1])
    scale = outs[1].reshape(*lead, *outs[1].shape[1:])
    zero = outs[2].reshape(*lead, outs[2].shape[-1]) if len(outs) > 2 else None
    return QuantizedTensor(method, q, scale, zero)


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    return (x * _ROUND_UP).clamp_min(torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)


# Both work in place on one fp32 copy of the slice (a copy even of an fp32 input, which is the
# caller's): the same IEEE operations in the same order as out-of-place ones, one temporary.


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32, copy=True)
    scale = _round_up_bf16(wf.abs().amax(-1) / 127.0)
    q = wf.div_(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wf = w.to(torch.float32, copy=True).reshape(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = _round_up_bf16((hi - lo) / 15.0)
    zero = (lo + 8.0 * scale.float()).to(SCALE_DTYPE)
    q = wf.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
    return pack_int4(q.to(torch.uint8).reshape(n, k)), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] -> uint8 [..., K/2], even column in the high nibble."""
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 values 0..15 [..., K]."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [..., N, K] the quantized numbers stand for."""
    if qt.method == "int8":
        return (qt.qweight.float() * qt.scale.float()[..., None]).to(dtype)
    q = unpack_int4(qt.qweight).float()
    shape = q.shape
    groups = q.reshape(*shape[:-1], qt.scale.shape[-1], -1)
    w = (groups - 8.0) * qt.scale.float()[..., None] + qt.zero.float()[..., None]
    return w.reshape(shape).to(dtype)
