"""Quantize while loading, and keep MoGE experts memory-mapped: the hook `load_weights` calls.

`DecoderForCausalLM.load_weights(weights, dtype, device, hook=...)` hands every checkpoint
tensor to `hook.take(name, target, index, tensor)` after checking its name and shape; a tensor
the hook takes is not placed in the float parameter. `hook.finish(model)` then swaps the
quantized modules in. Peak memory is the quantized model plus one float tensor (quantized in
row slices), never a float copy of a fused parameter: see `pangu_infer.quant.formats` for why
quantizing the pieces of qkv_proj / gate_up_proj / w13 apart equals quantizing them fused.

Each weight is laid out for its kernel (`PackedWeight`) as soon as its last rows arrive, and its
portable form freed: a portable copy of the whole model never waits for `finish` next to the
packed one. The pages of the mapped checkpoint a quantized tensor is read from are dropped
slice by slice as it is quantized, and the heap is trimmed every TRIM_EVERY_BYTES of weights laid
out: the freed portable copies and the converters' temporaries (GGUF blocks, float slices) otherwise
stay resident in the heap until the end of the load (benchmarks/RESULTS.md, "Peak RSS while loading").

Which weights are quantized: every nn.Linear (attention, MLPs, shared experts, lm_head), the
routed experts (w13, w2) and the token embedding. The MoGE router (`mlp.gate`, hidden x 64)
stays float: it is 0.1% of a layer and its argmax picks the experts.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from pangu_infer.errors import WeightError
from pangu_infer.memory import drop_mapped_pages, file_backed_ranges, is_file_backed, trim_heap
from pangu_infer.models.dense import DecoderForCausalLM, row_piece_start
from pangu_infer.models.moge import MoEBlock, StackedExperts
from pangu_infer.parallel.state import RowParallelLinear
from pangu_infer.quant.formats import (
    QuantizationConfig,
    QuantizationError,
    QuantizedTensor,
    Weight,
    parse_quantization,
    quantize,
)
from pangu_infer.quant import cpu_int4, transcode
from pangu_infer.quant.modules import (
    CPU_INT4_ROWS,
    KERNEL_DTYPE,
    OffloadedExperts,
    PackedWeight,
    QuantizedEmbedding,
    QuantizedExperts,
    QuantizedLinear,
)

TRIM_EVERY_BYTES = 8 << 20  # of kept weights laid out; a trim costs a few ms (malloc_trim)
_EXPERT_PROJ = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def quantizable_weights(model: DecoderForCausalLM) -> dict[str, str]:
    """Parameter name -> kind ("linear", "embedding", "experts") of every weight quantization covers."""
    routers = {id(m.gate) for m in model.modules() if isinstance(m, MoEBlock)}
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in routers:
            out[f"{name}.weight"] = "linear"
        elif isinstance(module, nn.Embedding):
            out[f"{name}.weight"] = "embedding"
        elif isinstance(module, StackedExperts):
            out[f"{name}.w13"] = out[f"{name}.w2"] = "experts"
    return out


def quantized_method(config: QuantizationConfig, shape: torch.Size) -> Optional[QuantizationConfig]:
    """The setting one weight of this shape is stored with; None keeps it float (int4, K % 32 != 0)."""
    if config.method == "int8":
        return config
    group = config.group_for(shape[-1])
    return None if group is None else QuantizationConfig("int4", group)


def resolve_quantization(
    model: DecoderForCausalLM, quantization: Any, int4_group_size: Optional[int] = None
) -> Optional[QuantizationConfig]:
    """The user's choice checked against a pre-quantized checkpoint's `quantization_config`."""
    wanted = parse_quantization(quantization, int4_group_size)
    stored = model.config.quantization_config
    if stored is None:
        return wanted
    stored_cfg = QuantizationConfig.from_hf(stored)
    if wanted is not None and wanted.method != stored_cfg.method:
        raise QuantizationError(
            f"quantization={wanted.method!r} was asked for, but the checkpoint is pre-quantized "
            f"with {stored_cfg.method!r}; pass quantization={stored_cfg.method!r} or None"
        )
    return stored_cfg


class LoadHook:
    """Takes the weights that are quantized or offloaded while `load_weights` runs.

    memory_mapped: the checkpoint's tensors may be views of a mapped file (safetensors): their pages
    are given back as they are read, and a pre-quantized tensor that lies in the file is never laid
    out over its own storage. False (the GGUF loader: its tensors are converted copies) lets every
    int4 weight be rearranged in place."""

    def __init__(
        self,
        model: DecoderForCausalLM,
        quantization: Optional[QuantizationConfig],
        offload_experts: bool,
        dtype: torch.dtype,
        device: torch.device,
        memory_mapped: bool = False,
        settings: Optional[dict[str, Optional[QuantizationConfig]]] = None,
    ):
        cfg = model.config
        if offload_experts and not cfg.is_moe:
            raise ValueError(
                f"offload_experts=True needs an MoE model with routed experts; {cfg.architecture} has none"
            )
        if offload_experts and device.type != "cpu":
            raise ValueError(f"offload_experts=True keeps experts memory-mapped in host memory: device={device} must be cpu")
        self.model = model
        self.memory_mapped = memory_mapped
        self.laid_out = 0  # kept bytes laid out since the last heap trim
        self.quantization = quantization
        # Target parameter -> its own setting (GGUF files keep each tensor's type); else `quantization` for all.
        self.settings = settings
        self.offload_experts = offload_experts
        self.dtype = dtype
        self.device = device
        self.params = dict(model.named_parameters())
        self.kinds = quantizable_weights(model)
        # Fused targets still waiting for rows: the portable tensor, and the pieces already in
        # (index -> qweight elements; a piece that comes again overwrites its rows, as floats do).
        self.pending: dict[str, QuantizedTensor] = {}
        self.filled: dict[str, dict[tuple, int]] = {}
        # Complete targets: the kernel layout (linears, experts) or the portable tensor (embeddings).
        self.ready: dict[str, Union[PackedWeight, QuantizedTensor]] = {}
        # Linears being written straight into the int4 kernel's layout (GGUF Q4 blocks; Q5 blocks into
        # its 5-bit form; _lay_out): the layout, and the rows of each piece already in. (int8 rows go
        # into `pending`'s weight.)
        self.laying: dict[str, cpu_int4.Layout] = {}
        self.laid_rows: dict[str, dict[tuple, int]] = {}
        # StackedExperts module name -> {"gate"|"up"|"down": [view per expert]}
        self.offloaded: dict[str, dict[str, list]] = {}

    def _setting(self, target: str) -> Optional[QuantizationConfig]:
        if target not in self.kinds or self.quantization is None:
            return None
        if self.settings is not None:
            return self.settings.get(target)
        return quantized_method(self.quantization, self.params[target].shape)

    def weights(self, weights: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
        """The checkpoint's tensors, those that stay float copied out of the mapped file.

        With quantization, a float view (a norm weight, a bias) would keep its whole shard
        mapped, and every page the quantizer read would stay resident: peak memory would be the
        whole float checkpoint. The copies are small; the quantized tensors are read in place.
        """
        for name, tensor in weights:
            if self.quantization is not None and isinstance(tensor, torch.Tensor):
                target = self.model.map_weight_name(name)[0]
                offloaded = self.offload_experts and self.kinds.get(target) == "experts"
                if not offloaded and self._setting(target) is None:
                    tensor = tensor.clone()
            yield name, tensor

    def take(self, name: str, target: str, index: Optional[tuple], tensor: Weight) -> bool:
        if self.laid_out >= TRIM_EVERY_BYTES:
            # Here, not in _complete: by now the previous tensor's portable copy and temporaries are freed.
            self.laid_out = 0
            trim_heap()
        kind = self.kinds.get(target)
        if self.offload_experts and kind == "experts":
            self._offload(name, target, index, tensor)
            return True
        setting = self._setting(target)
        if index is not None and target in self.ready:
            raise WeightError(f"tensor {name!r} comes twice in the checkpoint ({target!r} was already complete)")
        if isinstance(tensor, transcode.HighBlocks) and not self._high_bit(target, setting, tensor.bits):
            tensor = tensor.as_int8_rows()  # this weight is not kept with its 5- or 6-bit codes: int8 rows, as before
        if isinstance(tensor, (transcode.Q4Blocks, transcode.HighBlocks, transcode.Int8Rows)):
            if self._lay_out(name, target, index, tensor, setting):
                return True
            if target in self.laying:
                raise WeightError(f"tensor {name!r} could not be laid out with the other pieces of {target!r}")
            tensor = tensor.materialize()  # the portable form, as other loaders give it
        elif target in self.laying:
            raise WeightError(f"tensor {name!r} is a {type(tensor).__name__}, but the other pieces of {target!r} were GGUF Q4 blocks")
        if setting is None:
            if isinstance(tensor, QuantizedTensor):
                raise WeightError(f"tensor {name!r} is quantized ({tensor.method}), but this model keeps {target!r} in float")
            return False
        if isinstance(tensor, QuantizedTensor):
            qt = _check_stored(name, tensor, setting)
        else:
            mapped = self.memory_mapped and tensor.device.type == "cpu"
            # Each slice of rows gives its pages back as soon as it is quantized, not the whole tensor at the end.
            qt = quantize(tensor, setting, done=drop_mapped_pages if mapped else None)
            self._release(tensor)
        if index is None:
            self._complete(target, qt)
        else:
            self._place(target, index, qt)
        return True

    def _high_bit(self, target: str, setting: Optional[QuantizationConfig], bits: int) -> bool:
        """Is `target` kept with its `bits`-bit codes (5: cpu_int4's 5-bit layout, its file's blocks Q5
        ones; 6: the 6-bit layout, Q6_K blocks; the loader sends transcode.HighBlocks only where every
        piece of it is of one width): a CPU linear whose plan keeps it int8, on a machine where that
        product was measured faster than int8's (keeps_high_bit), and not already begun in another form."""
        return (
            setting is not None and setting.method == "int8" and self.device.type == "cpu" and target not in self.pending
            and keeps_high_bit(self.params[target].shape, self.kinds.get(target), bits)
        )

    def _lay_out(self, name: str, target: str, index: Optional[tuple], blocks: Any, setting: Optional[QuantizationConfig]) -> bool:
        """Write a GGUF file's blocks (transcode.Q4Blocks, HighBlocks, Int8Rows) straight into their
        weight: Q4 blocks into the int4 kernel's layout of their linear, Q5 and Q6_K blocks into its
        5- and 6-bit layouts (where `_high_bit` chose them), int8 rows into the int8 weight (a fused one shared with
        pieces that come in the portable form: `_place`); a fused parameter's pieces at their rows.
        False where that is not this weight's form (then they are converted to the portable form and
        go the usual way)."""
        int4 = isinstance(blocks, (transcode.Q4Blocks, transcode.HighBlocks))  # into a cpu_int4.Layout
        high = isinstance(blocks, transcode.HighBlocks)
        param = self.params[target]
        row0 = 0 if index is None else row_piece_start(index)
        fits = row0 is not None and (high or (  # (Q5 / Q6_K blocks come here only where _high_bit chose them)
            setting is not None and setting.method == blocks.method and self.device.type == "cpu" and param.dim() == 2
            and self.kinds.get(target) in (("linear",) if int4 else ("linear", "embedding"))
            and (not int4 or (setting.group_size == blocks.group_size and cpu_int4.usable(param.shape[1], blocks.group_size)))
        ))
        if not int4:  # into the int8 weight, the one `_place` fills for a fused weight's other pieces
            into = self.pending.get(target)
            if into is None and not fits:
                return False
            if into is None:
                into = QuantizedTensor("int8", torch.empty(*param.shape, dtype=torch.int8), torch.empty(param.shape[0], dtype=torch.bfloat16))
            if into.method != "int8" or row0 is None or not blocks.lay_out(row0, into.qweight, into.scale):
                raise WeightError(f"tensor {name!r} could not be laid out with the other pieces of {target!r}")
            self._piece_in(target, index, into, self.pending, self.filled, len(blocks.part) * param.shape[1], into.qweight.numel())
            return True
        into = self.laying.get(target)
        if into is None:
            if not fits or target in self.pending:
                return False
            into = cpu_int4.Layout(param.shape[0], param.shape[1], blocks.group_size, blocks.zero_values, bits=blocks.bits)
        elif blocks.zero_values > into.zero_values:
            into = into.with_zeros()
        if into.method != blocks.method or into.group_size != blocks.group_size:
            raise WeightError(f"tensor {name!r} is {blocks.kind}, but the other pieces of {target!r} were laid out as {into.method}")
        if row0 is None or not blocks.lay_out(row0, into.data, into.sz, into.hb):
            raise WeightError(f"tensor {name!r} could not be laid out with the other pieces of {target!r}")
        self._piece_in(target, index, into, self.laying, self.laid_rows, len(blocks.part), into.out_features)
        return True

    def _piece_in(self, target: str, index: Optional[tuple], into: Any, store: dict, counts: dict, amount: int, total: int) -> None:
        """A weight written (index None) or one more of its pieces (`amount` of `total`): `store` holds
        it and `counts` its pieces (a piece that comes again counts once) until the last is in; then
        it is laid out for its kernel."""
        if index is None:
            self._complete(target, into)
            return
        store[target] = into
        pieces = counts.setdefault(target, {})
        pieces[_index_key(index)] = amount
        if sum(pieces.values()) >= total:
            del counts[target]
            self._complete(target, store.pop(target))

    def _complete(self, target: str, qt: Union[QuantizedTensor, cpu_int4.Layout]) -> None:
        """Lay out a weight whose rows have all arrived for its kernel; its portable copy is then freed."""
        if isinstance(qt, cpu_int4.Layout):
            self.ready[target] = PackedWeight(qt, self.device, self.dtype)
        elif self.kinds[target] == "embedding":
            self.ready[target] = qt
        else:  # qt is this loader's own copy unless it lies in a mapped file (a pre-quantized checkpoint's)
            mapped = self.memory_mapped and is_file_backed(qt.qweight, file_backed_ranges())  # (GGUF: converted copies)
            consume = qt.method == "int4" and qt.qweight.device.type == "cpu" and not mapped
            self.ready[target] = PackedWeight(qt, self.device, self.dtype, consume=consume)
        self.laid_out += qt.nbytes()

    def _release(self, tensor: torch.Tensor) -> None:
        """Give back the pages a float tensor took while it was quantized (Linux).

        Its pages of the mapped checkpoint would stay resident until the whole shard is closed
        (the quantizer's freed temporaries are trimmed from the heap in take()). Only file-backed
        views are dropped (they re-read from the file).
        """
        if self.memory_mapped and tensor.device.type == "cpu":
            drop_mapped_pages(tensor)

    def _place(self, target: str, index: tuple, qt: QuantizedTensor) -> None:
        """Copy the rows of one checkpoint tensor into the quantized form of its fused parameter,
        laid out for its kernel once all its rows are in (_piece_in)."""
        full = self.pending.get(target)
        if full is None:
            shape = self.params[target].shape
            lead, k = tuple(shape[:-1]), shape[-1]
            groups = qt.scale.shape[-1:] if qt.method == "int4" else ()
            full = QuantizedTensor(
                qt.method,
                torch.empty(*lead, k if qt.method == "int8" else k // 2, dtype=qt.qweight.dtype),
                torch.empty(*lead, *groups, dtype=qt.scale.dtype),
                None if qt.zero is None else torch.empty(*lead, *groups, dtype=qt.zero.dtype),
            )
        full.qweight[index].copy_(qt.qweight)
        full.scale[index].copy_(qt.scale)
        if qt.zero is not None:
            full.zero[index].copy_(qt.zero)
        self._piece_in(target, index, full, self.pending, self.filled, qt.qweight.numel(), full.qweight.numel())

    def _offload(self, name: str, target: str, index: tuple, tensor: Weight) -> None:
        m = _EXPERT_PROJ.search(name)
        assert m is not None, name
        expert, proj = index[0], m.group(1)  # index[0]: the expert's slot in this rank's stack
        module = target.rpartition(".")[0]
        if isinstance(tensor, QuantizedTensor):
            raise QuantizationError(
                f"offload_experts=True needs float experts, but {name!r} is stored as {tensor.method}: the "
                "kernels need aligned, repacked copies; offload from the float checkpoint (with quantization= "
                "for the rest of the model)"
            )
        n = len(self.params[target])
        lists = self.offloaded.setdefault(module, {p: [None] * n for p in ("gate", "up", "down")})
        lists[proj][expert] = tensor  # the memory-mapped view itself: paged in by the OS, never copied

    def finish(self, model: DecoderForCausalLM) -> None:
        # After load_weights (which checks that every tensor came) nothing is pending; a fused
        # parameter some of whose pieces never came is laid out as it is.
        while self.pending:
            target, qt = self.pending.popitem()
            self.filled.pop(target, None)
            self._complete(target, qt)
        while self.laying:
            target, layout = self.laying.popitem()
            self.laid_rows.pop(target, None)
            self._complete(target, layout)
        experts: dict[str, dict[str, PackedWeight]] = {}
        while self.ready:
            target, weight = self.ready.popitem()
            module_name, _, attr = target.rpartition(".")
            module = model.get_submodule(module_name)
            kind = self.kinds[target]
            if kind == "linear":
                if isinstance(module, RowParallelLinear):  # the rank's columns: summed over the ranks
                    _replace(model, module_name, module.around(QuantizedLinear(weight, None)))
                else:
                    _replace(model, module_name, QuantizedLinear(weight, module.bias))
            elif kind == "embedding":
                _replace(model, module_name, QuantizedEmbedding(weight, self.dtype, self.device))
                if model.lm_head is None:  # tied head: int8 shares the embedding's tensors
                    model.lm_head = QuantizedLinear(PackedWeight(weight, self.device, self.dtype), None)
            else:
                experts.setdefault(module_name, {})[attr] = weight
        for module_name, w in experts.items():
            module = model.get_submodule(module_name)
            module.impl = QuantizedExperts(w["w13"], w["w2"], module.inter)
            del module.w13, module.w2
        for module_name, lists in self.offloaded.items():
            module = model.get_submodule(module_name)
            module.impl = OffloadedExperts(lists["gate"], lists["up"], lists["down"])
            del module.w13, module.w2
        trim_heap()


def _index_key(index: tuple) -> tuple:
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)


def _check_stored(name: str, qt: QuantizedTensor, setting: QuantizationConfig) -> QuantizedTensor:
    if qt.method != setting.method or (qt.method == "int4" and qt.group_size != setting.group_size):
        raise WeightError(
            f"tensor {name!r} is stored as {qt.method} with group size {qt.group_size}, expected "
            f"{setting.method}" + (f" with group size {setting.group_size}" if setting.method == "int4" else "")
        )
    return qt


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def make_load_hook(
    model: DecoderForCausalLM,
    quantization: Any,
    offload_experts: bool,
    dtype: torch.dtype,
    device: torch.device,
    memory_mapped: bool = True,
    int4_group_size: Optional[int] = None,
) -> Optional[LoadHook]:
    """The hook for load_weights, or None for a plain float load.

    int4_group_size: the group when `quantization` is just "int4" (GGUF sources pass 32).
    """
    config = resolve_quantization(model, quantization, int4_group_size)
    if offload_experts and not memory_mapped:
        raise ValueError("offload_experts=True needs a safetensors checkpoint (memory-mapped); GGUF tensors are dequantized copies")
    if config is None and not offload_experts:
        return None
    return LoadHook(model, config, offload_experts, dtype, device, memory_mapped)


def keeps_high_bit(shape: Sequence[int], kind: Optional[str], bits: int) -> bool:
    """Does a CPU load keep a parameter of this shape and kind (quantizable_weights') with its `bits`-bit
    codes where its GGUF blocks are Q5 ones (5) or Q6_K ones (6): a linear the kernel takes, on a
    machine where that form was chosen (cpu_int4.five_bit_chosen / six_bit_chosen: measured once per
    machine)."""
    blocks = transcode.Q6Blocks if bits == 6 else transcode.Q5Blocks
    chosen = cpu_int4.six_bit_chosen if bits == 6 else cpu_int4.five_bit_chosen
    return kind == "linear" and len(shape) == 2 and cpu_int4.usable(shape[1], blocks.group_size) and chosen()


def quantized_weight_bytes(
    model: DecoderForCausalLM,
    dtype: torch.dtype,
    quantization: Optional[QuantizationConfig],
    offload_experts: bool = False,
    settings: Optional[dict[str, Optional[QuantizationConfig]]] = None,
    matrix_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    high_bit: Optional[dict[str, tuple[int, int]]] = None,
) -> int:
    """Resident bytes of the weights after loading with this setting (what the memory planner uses).

    settings: target parameter -> its own setting (None: float), in place of `quantization`, as
    LoadHook takes them (a GGUF file's per-tensor plan). matrix_dtype: the dtype float parameters
    of 2 or more dims are held in (load_weights' matrix_dtype), the others in `dtype`. device: where
    the load puts them; a bf16 load on a CPU that packs (device.can_pack, load_serving_model's rule)
    holds the plain bf16 linears oneDNN-packed (models/packed.py: padded to oneDNN's blocks) and,
    for a tied LM head whose embedding stays bf16, a packed copy of the embedding besides its rows.
    high_bit: target parameters held with 5- or 6-bit codes (cpu_int4's layouts with bit planes: GGUF
    Q5 or Q6_K blocks where the hook keeps them) in place of their int8 setting, each with (bits,
    values per group and row: 1 the scales alone, Q5_0 and Q6_K; 2 scale and zero)."""
    from pangu_infer.device import can_pack

    elem = torch.empty((), dtype=dtype).element_size()
    matrix_elem = elem if matrix_dtype is None else torch.empty((), dtype=matrix_dtype).element_size()
    scale_elem = torch.empty((), dtype=KERNEL_DTYPE).element_size()
    kinds = quantizable_weights(model) if quantization is not None or settings is not None or offload_experts else {}
    packs = device is not None and matrix_dtype is None and can_pack(device, dtype)
    packed_head = None
    if packs:
        from pangu_infer.models.packed import packed_blocks, packed_bytes, packed_parameters

        packed_names = packed_parameters(model)
        blocks = packed_blocks()
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if model.lm_head is None and isinstance(embed, nn.Embedding):  # tied: pack_linears' head copy
            packed_head = "model.embed_tokens.weight"
    total = 0
    for name, p in model.named_parameters():
        kind = kinds.get(name)
        if offload_experts and kind == "experts":
            continue  # memory-mapped, paged in per expert
        wanted = quantization if settings is None else settings.get(name)
        setting = None if kind is None or wanted is None else quantized_method(wanted, p.shape)
        if setting is None:
            if packs and name in packed_names:  # one packed matrix per expert ([E, N, K]) or per linear
                total += p.numel() // (p.shape[-2] * p.shape[-1]) * packed_bytes(p.shape[-2], p.shape[-1], blocks)
            elif name == packed_head:  # the rows the lookup reads, and the head's packed copy
                total += p.numel() * elem + packed_bytes(*p.shape, blocks)
            else:
                # The MoE family's expert-selection bias stays fp32 whatever the model dtype.
                total += p.numel() * (4 if name.endswith("e_score_correction_bias") else matrix_elem if p.dim() >= 2 else elem)
            continue
        lead = p.numel() // (p.shape[-2] * p.shape[-1])
        n, k = p.shape[-2], p.shape[-1]
        if high_bit and name in high_bit:  # 5 or 6 bits a weight (the int4 layout and its planes), scale (and zero) per 32 or 16
            bits, zs = high_bit[name]
            group = 16 if bits == 6 else 32
            n += -n % CPU_INT4_ROWS
            total += lead * (n * k * bits // 8 + zs * n * (k // group) * scale_elem)
            continue
        if setting.method == "int8":
            total += lead * (n * k + n * scale_elem)
            continue
        # a scale and a zero per group and row: where every zero is 0 (GGUF's Q4_0) the own CPU kernel's
        # layout keeps the scales alone (quant/cpu_int4.py): an upper bound there (20 bytes per 32 weights
        # counted, 18 held)
        packed = n * k // 2 + 2 * n * (k // setting.group_size) * scale_elem
        if kind == "embedding":
            total += packed
            if model.lm_head is None:  # tied head: a second, kernel-packed copy
                n += -n % CPU_INT4_ROWS
                total += n * k // 2 + 2 * n * (k // setting.group_size) * scale_elem
            continue
        n += -n % CPU_INT4_ROWS
        total += lead * (n * k // 2 + 2 * n * (k // setting.group_size) * scale_elem)
    return total


__all__ = [
    "LoadHook",
    "keeps_high_bit",
    "make_load_hook",
    "quantizable_weights",
    "quantized_method",
    "quantized_weight_bytes",
    "resolve_quantization",
]
