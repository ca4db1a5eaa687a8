"""GGUF tensors straight into this engine's int4 / int8 layouts, block by block (no float model copy).

How each GGUF type is kept (`auto`, the default; docs/design.md has the table with the error bounds):

| GGUF type | kept as | exact? |
|---|---|---|
| Q4_0 `w = (q - 8) * d` | int4, groups of 32: scale d, zero 0 | q exact; d f16 -> bf16 (relative 2^-9) |
| Q4_1 `w = q * d + m` | int4, groups of 32: scale d, zero m + 8 d | q exact; d, m + 8 d rounded to bf16 |
| Q4_K `w = q * d * sc_j - dmin * m_j` (sub-blocks of 32) | int4, groups of 32: scale d sc_j, zero 8 d sc_j - dmin m_j | q exact; scale and zero rounded to bf16 |
| Q5_0 `d (q - 16)`, Q5_1 `d q + m`, Q5_K `q d sc_j - dmin m_j` | 5-bit codes, groups of 32: scale d (d sc_j), zero 0 (m + 16 d; 16 d sc_j - dmin m_j) | q exact; scale and zero rounded to bf16 (CPU, one process, every piece of the weight Q5, the kernel chosen: quant/loading.py) |
| Q6_K `d sc_j (q - 32)` (sub-blocks of 16) | 6-bit codes, groups of 16: scale d sc_j, zero 0 | q exact; scale rounded to bf16 (CPU, one process, every piece of the weight Q6_K, the kernel chosen: quant/loading.py) |
| Q8_0, other block types (and Q5 / Q6_K ones elsewhere) | int8, one scale per row | re-rounded: half a step of max|row| / 127 |
| F32, F16, BF16 | float (the model's dtype) | as a float load |

The engine's int4 weight is `(q - 8) * scale + zero` per group of 32 with bf16 scale and zero,
which is exactly what the CPU and CUDA int4 kernels compute: a Q4 block's 4-bit codes go into it
unchanged, only its f16 scale (and min) is rounded to bf16. int8 has one scale per output row (what
`_weight_int8pack_mm` takes), so the types with finer scales or 5/6-bit codes are dequantized one
slice of rows at a time (gguf's own dequantizer) and re-quantized per row.

A fused parameter (qkv_proj, gate_up_proj) takes one setting for all its pieces: int4 when every
piece is a Q4 type, float when every piece is float, int8 otherwise (5-bit codes where every piece is
a Q5 type, 6-bit ones where every piece is Q6_K, and the load hook keeps them: `high_bit_names`).

Memory: each tensor is converted from the memory-mapped file in slices of about a million
weights (16 million in pangu_infer.quant.transcode's C passes: Q4_0, Q4_1 and Q4_K into int4
pairs, Q8_0 and Q6_K to int8 rows, the same bytes as the numpy here); nothing but the converted
tensor and one slice's temporaries is ever held. With `iter_weights(lay_out=True)` (one process on
a CPU) a Q4 tensor or one kept as int8 is not converted here at all: it goes to the load hook
(transcode.Q4Blocks, transcode.Int8Rows), which writes it straight into its weight, a fused
weight's pieces at their rows.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from pangu_infer.memory import drop_mapped_range
from pangu_infer.quant import transcode
from pangu_infer.quant.formats import (
    QuantizationConfig,
    QuantizedTensor,
    SCALE_DTYPE,
    _quantize_int4,
    _quantize_int8,
)

GGUF_GROUP = 32  # weights per Q4_0 / Q4_1 block and per Q4_K sub-block: the int4 group size used
CHUNK_ELEMENTS = 1 << 20  # weights converted per slice of rows
C_CHUNK_ELEMENTS = 1 << 24  # ... by the C pass (Q4_0 / Q4_1 / Q4_K): 9 MB of the file per call
QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4")

Weight = Union[torch.Tensor, QuantizedTensor]


def _types():
    from gguf import GGMLQuantizationType as Q

    return Q


def int4_types() -> set:
    Q = _types()
    return {Q.Q4_0, Q.Q4_1, Q.Q4_K}


def float_types() -> set:
    Q = _types()
    return {Q.F32, Q.F16, Q.BF16}


def kept_method(tensor_type: Any) -> Optional[str]:
    """What `auto` keeps one GGUF tensor type as: "int4", "int8", or None (float)."""
    if tensor_type in float_types():
        return None
    return "int4" if tensor_type in int4_types() else "int8"


def combine_methods(methods: list[Optional[str]]) -> Optional[str]:
    """One setting for a fused parameter from the settings of its pieces (see the module docstring)."""
    kinds = set(methods)
    if kinds == {None}:
        return None
    if kinds == {"int4"}:
        return "int4"
    return "int8"


def setting_for(method: Optional[str], in_features: int) -> Optional[QuantizationConfig]:
    if method is None:
        return None
    if method == "int8":
        return QuantizationConfig("int8")
    group = QuantizationConfig("int4", GGUF_GROUP).group_for(in_features)
    return None if group is None else QuantizationConfig("int4", group)


# ------------------------------------------------------------------------------------ conversion


def _rows(t: Any) -> np.ndarray:
    """The tensor's data as [rows, bytes or values per row] (a view of the mapped file)."""
    data = t.data.view(np.ndarray)  # a plain view: numpy's memmap subclass costs per operation
    return data.reshape(-1, data.shape[-1]) if data.ndim != 2 else data


def _drop(view: np.ndarray) -> None:
    """Give back the resident pages of a slice of the mapped file (they stay in the page cache)."""
    if view.size and view.flags.c_contiguous:
        drop_mapped_range(view.ctypes.data, view.nbytes)


def dequantize_rows(t: Any, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a GGUF tensor as float32 [rows, K], with gguf's own dequantizer."""
    from gguf.quants import dequantize

    Q = _types()
    part = _rows(t)[start:stop]
    if t.tensor_type == Q.F32:
        return torch.from_numpy(np.array(part, dtype=np.float32))
    if t.tensor_type == Q.F16:
        return torch.from_numpy(np.array(part, dtype=np.float16)).float()
    if t.tensor_type == Q.BF16:
        return torch.from_numpy(np.array(part).view(np.int16)).view(torch.bfloat16).float()
    fast = transcode.dequantize(part, t.tensor_type.name)  # Q8_0, Q6_K: the same values, in one C pass
    return fast if fast is not None else torch.from_numpy(dequantize(part, t.tensor_type))


def _q4_codes_and_params(t: Any, part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A slice of Q4 rows [rows, bytes] -> codes uint8 [rows, K] (0..15), scale, zero f32 [rows, K/32]."""
    Q = _types()
    rows = part.shape[0]
    if t.tensor_type in (Q.Q4_0, Q.Q4_1):
        head = 2 if t.tensor_type == Q.Q4_0 else 4
        blocks = part.reshape(rows, -1, head + 16)  # [rows, K/32, bytes per block]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., head:]
        codes = np.concatenate((qs & 15, qs >> 4), axis=-1)  # low nibbles: weights 0-15, high: 16-31
        if t.tensor_type == Q.Q4_0:
            zero = np.zeros_like(d)
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            zero = m + 8.0 * d
        return codes.reshape(rows, -1), d, zero
    # Q4_K: 256 weights per block: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of codes
    from gguf.quants import Q4_K

    blocks = part.reshape(-1, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])  # [n, 8] each, one per sub-block of 32
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    codes = np.concatenate((qs & 15, qs >> 4), axis=2)  # chunk i: sub-block 2i low nibbles, 2i+1 high
    scale = d * sc.astype(np.float32)
    zero = 8.0 * scale - dmin * mn.astype(np.float32)
    return codes.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


def convert(t: Any, setting: QuantizationConfig) -> QuantizedTensor:
    """One GGUF tensor (2-D, GGUF dims reversed = torch [N, K]) in the engine's portable format."""
    k = int(t.shape[0])
    n = int(np.prod([int(d) for d in t.shape[1:]])) if len(t.shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    direct = setting.method == "int4" and setting.group_size == GGUF_GROUP and t.tensor_type in int4_types()
    data = _rows(t)
    if direct:
        qt = _convert_q4_in_c(t, data, n, k)
        if qt is not None:
            return qt
    if setting.method == "int8" and t.tensor_type.name in transcode.DEQUANTIZED and transcode.library() is not None:
        return _convert_int8_in_c(t, data, n, k)
    outs: list[torch.Tensor] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        if direct:
            codes, scale, zero = _q4_codes_and_params(t, data[start:stop])
            packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # pangu_infer.quant.formats.pack_int4's order
            part = (torch.from_numpy(packed), torch.from_numpy(scale).to(SCALE_DTYPE), torch.from_numpy(zero).to(SCALE_DTYPE))
        else:
            x = dequantize_rows(t, start, stop)
            part = _quantize_int8(x) if setting.method == "int8" else _quantize_int4(x, setting.group_size)
        if not outs:
            outs = [p.new_empty((n, *p.shape[1:])) for p in part]
        for out, p in zip(outs, part):
            out[start:stop].copy_(p)
        del part
        _drop(data[start:stop])  # read once: its file pages leave this process's RSS
    return QuantizedTensor(setting.method, *outs)


def _convert_q4_in_c(t: Any, data: np.ndarray, n: int, k: int) -> Optional[QuantizedTensor]:
    """convert's Q4_0 / Q4_1 / Q4_K path by pangu_infer.quant.transcode's C pass (the same bytes),
    slices of C_CHUNK_ELEMENTS weights; None where that library is not here."""
    if transcode.library() is None:
        return None
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale = torch.empty(n, k // GGUF_GROUP, dtype=SCALE_DTYPE)
    zero = torch.empty(n, k // GGUF_GROUP, dtype=SCALE_DTYPE)
    step = max(1, C_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        params = transcode.q4_to_pairs(data[start:stop], t.tensor_type.name, packed[start:stop])
        if params is None:
            return None
        scale[start:stop].copy_(params[0])
        zero[start:stop].copy_(params[1])
        _drop(data[start:stop])
    return QuantizedTensor("int4", packed, scale, zero)


def _convert_int8_in_c(t: Any, data: np.ndarray, n: int, k: int) -> QuantizedTensor:
    """convert's int8 path for the block types transcode dequantizes (Q5_0, Q5_1, Q8_0, Q5_K, Q6_K; Q4_K
    where it is a piece of a fused weight whose other pieces are not Q4, as Q4_K_M files' q/k beside
    a Q6_K v) by transcode's C pass: dequantized and re-quantized per row in one go (the same codes
    and scales as _quantize_int8 of gguf's dequantized rows)."""
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=SCALE_DTYPE)
    step = max(1, C_CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        transcode.dequantize_int8(data[start:stop], t.tensor_type.name, q[start:stop], scale[start:stop])
        _drop(data[start:stop])
    return QuantizedTensor("int8", q, scale)


def permute_quantized_rows(qt: QuantizedTensor, fn) -> QuantizedTensor:
    """Apply a row permutation (llama's Q/K un-permute) to every per-row part of a quantized tensor."""
    return QuantizedTensor(qt.method, fn(qt.qweight), fn(qt.scale), None if qt.zero is None else fn(qt.zero))


def iter_weights(
    ckpt: Any, settings: dict[str, Optional[QuantizationConfig]], progress: bool = False, lay_out: bool = False,
    high_bit: frozenset = frozenset(),
) -> Iterator[tuple[str, Union[Weight, transcode.Q4Blocks]]]:
    """(HF name, tensor) of a GGUFCheckpoint: a QuantizedTensor where `settings` (HF tensor name ->
    setting) has one, else the float tensor as `GGUFCheckpoint.tensors()` gives it (float32).
    progress: a bar over the file's tensor bytes (as the safetensors loader's).
    lay_out: Q4_0 / Q4_1 / Q4_K tensors kept as int4 groups of 32 come unconverted, as
    transcode.Q4Blocks, for the load hook to write straight into its kernel's layout, and tensors
    kept as int8 (Q8_0, Q5 and Q6_K blocks) as transcode.Int8Rows, for it to write into their rows
    of the int8 weight (one process on a CPU: a tensor-parallel shard slices the portable form).
    high_bit (with lay_out): HF names of Q5_0 / Q5_1 / Q5_K and Q6_K tensors kept as int8 that come as
    transcode.Q5Blocks / Q6Blocks instead, for the hook to keep with their 5- or 6-bit codes where it
    can (`high_bit_names`: those whose parameter's pieces are all of one of these widths)."""
    from tqdm import tqdm

    total = sum(int(t.n_bytes) for t in ckpt.reader.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting weights", disable=not progress) as bar:
        for t in ckpt.reader.tensors:
            if ckpt.hf_names.get(t.name) is not None:
                yield _converted(ckpt, t, settings, lay_out, high_bit)
            bar.update(int(t.n_bytes))


def _converted(ckpt: Any, t: Any, settings: dict[str, Optional[QuantizationConfig]], lay_out: bool = False, high_bit: frozenset = frozenset()) -> tuple[str, Any]:
    """iter_weights' (HF name, tensor) for one GGUF tensor."""
    from pangu_infer.loader.gguf import _dequantize, unpermute_rows

    hf_name = ckpt.hf_names[t.name]
    setting = settings.get(hf_name)
    n_head = None
    if ckpt.permuted_qk and ".self_attn.q_proj." in hf_name:
        n_head = ckpt.config["num_attention_heads"]
    elif ckpt.permuted_qk and ".self_attn.k_proj." in hf_name:
        n_head = ckpt.config["num_key_value_heads"]

    def unpermuted(x: Weight) -> Weight:
        if n_head is None:
            return x
        fn = lambda y: unpermute_rows(y, n_head)  # noqa: E731
        return fn(x) if isinstance(x, torch.Tensor) else permute_quantized_rows(x, fn)

    data = _rows(t)
    if lay_out and setting is not None and len(t.shape) == 2 and data.flags.c_contiguous and transcode.library() is not None:
        kind = t.tensor_type.name
        if setting.method == "int4" and setting.group_size == GGUF_GROUP and t.tensor_type in int4_types():
            blocks = transcode.Q4Blocks
        elif setting.method == "int8" and kind in transcode.Q5_BYTES and hf_name in high_bit:
            blocks = transcode.Q5Blocks
        elif setting.method == "int8" and kind in transcode.Q6_BYTES and hf_name in high_bit:
            blocks = transcode.Q6Blocks
        elif setting.method == "int8" and kind in transcode.DEQUANTIZED:
            blocks = transcode.Int8Rows
        else:
            blocks = None
        if blocks is not None:
            order = None if n_head is None else unpermuted(torch.arange(len(data)))
            return hf_name, blocks(data, kind, order, lambda: unpermuted(convert(t, setting)), lambda: _drop(data))
    if setting is None:
        x: Weight = _dequantize(t, ckpt.path)  # a copy
        _drop(data)
    else:
        x = convert(t, setting)
    return hf_name, unpermuted(x)


def high_bit_names(tensor_types: dict[str, Any], targets: dict[str, tuple[str, int]], by_target: dict[str, Optional[QuantizationConfig]]) -> frozenset:
    """HF tensor names (of `tensor_types`: name -> GGUF type; `targets`: name -> (target parameter,
    in_features)) that may be kept with their 5- or 6-bit codes: Q5_0 / Q5_1 / Q5_K tensors, and Q6_K
    ones, whose parameter keeps int8 (`by_target`) and whose every piece is of one of those widths (a
    Q6_K v beside Q5_K or Q4_K q and k keeps the fused qkv in int8 rows)."""
    pieces: dict[str, list[str]] = {}
    for name in tensor_types:
        pieces.setdefault(targets[name][0], []).append(name)
    return frozenset(
        name
        for target, names in pieces.items()
        if by_target.get(target) is not None and by_target[target].method == "int8"
        and any(all(getattr(tensor_types[n], "name", None) in types for n in names) for types in (transcode.Q5_BYTES, transcode.Q6_BYTES))
        for name in names
    )


def plan_settings(
    tensor_types: dict[str, Any],
    targets: dict[str, tuple[str, int]],
    quantizable: set[str],
    quantization: str,
) -> dict[str, Optional[QuantizationConfig]]:
    """HF target parameter -> the setting it is loaded with.

    tensor_types: HF tensor name -> GGUF type; targets: HF tensor name -> (target parameter,
    in_features); quantizable: the target parameters quantization covers.
    """
    pieces: dict[str, list[Optional[str]]] = {}
    in_features: dict[str, int] = {}
    for name, ttype in tensor_types.items():
        target, k = targets[name]
        if target not in quantizable:
            continue
        pieces.setdefault(target, []).append(kept_method(ttype) if quantization == "auto" else quantization)
        in_features[target] = k
    return {target: setting_for(combine_methods(m), in_features[target]) for target, m in pieces.items()}


__all__ = [
    "GGUF_GROUP",
    "QUANTIZATION_CHOICES",
    "combine_methods",
    "convert",
    "dequantize_rows",
    "high_bit_names",
    "iter_weights",
    "kept_method",
    "plan_settings",
]
