"""The decode step run eagerly with little Python in between the kernels.

Until the compiled decode step is ready (a few seconds after a warm start, a minute or more on a
machine's first), and always under `--enforce-eager` or where there is no C++ compiler, decode
steps run the model's modules eagerly. For a small model that is mostly Python: the demo model's
eager step took ~18 ms, of which ~8 ms in the C kernels and the rest in ~2,500 torch operator
calls, module calls and each kernel's checks of its operands (benchmarks/RESULTS.md). On a warm
start with a prompt given, those steps also hand the interpreter lock to the background compile
at every operator, and both slow down.

`EagerDecodeStep` runs the same operations in the same order on the same kernels (the same bits:
tests/test_eager_step.py) for the pre-norm decoder (models/dense.py's layer, attention and norm
classes exactly, on CPU, bf16 or float32 activations, decode attention by the C kernel, no LoRA, one rank),
with what the module path checks at each call checked once when it is built: the operands'
layouts and pointers. Quantized linears of the C kernels' kinds (int4, and 5- and 6-bit codes)
call their kernel straight; any other linear is called as a module, as is any MLP but SwiGLU
(MoGE's block and the other MoE blocks: their routing, expert dispatch and load counters). `build` returns None for a model or
runner it does not take, and those steps run the modules as before. `PANGU_INFER_EAGER_STEP=0`
turns it off.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pangu_infer.models import bi_attention_kernel, norm_rope
from pangu_infer.models.dense import DecoderForCausalLM, DecoderLayer
from pangu_infer.models.layers import Attention, AttentionBatch, RMSNorm, SwiGLU
from pangu_infer.quant import cpu_int4
from pangu_infer.quant.modules import PackedWeight, QuantizedLinear

ENV = "PANGU_INFER_EAGER_STEP"  # 0/off: eager decode steps run the model's modules

Linear = Callable[[torch.Tensor, int], torch.Tensor]
Norm = Callable[[torch.Tensor, int], torch.Tensor]


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _linear(module: torch.nn.Module) -> Linear:
    """module(x) for x [rows, in] (bf16 or float32) contiguous: the kernel called straight for a
    quantized linear the C kernels read at this row count (as PackedWeight.forward would call it:
    x rounded to bf16, the product in bf16, then x's dtype), else the module itself."""
    def as_module(x: torch.Tensor, threads: int) -> torch.Tensor:
        return module(x)

    weight = getattr(module, "weight", None)
    lib = cpu_int4.library()
    kind = getattr(weight, "kernel", None)
    if not (type(module) is QuantizedLinear and type(weight) is PackedWeight and lib is not None and kind in ("int4_vnni", "int5", "int6")):
        return as_module
    data, sz, hb = weight.data, weight.scales, weight.hb if kind != "int4_vnni" else None
    n, k = data.shape[0] * cpu_int4.ROW_BLOCK, data.shape[1] * cpu_int4.OCTET
    group, out_features, bias = weight.group_size, weight.out_features, module.bias
    if not (
        data.dtype == torch.uint8 and data.is_contiguous() and sz.dtype == torch.bfloat16 and sz.is_contiguous()
        and cpu_int4.scales_fit(sz, (data.shape[0], k // group)) and weight.in_features == k
        and (hb is None or (hb.dtype == torch.uint8 and hb.is_contiguous()))
    ):
        return as_module

    def call(x: torch.Tensor, threads: int) -> torch.Tensor:
        rows = x.shape[0]
        if rows >= weight.convert_min_rows or not rows:  # prefill-sized: the module's converted product
            return module(x)
        y = cpu_int4.mm_pass(lib, x.to(torch.bfloat16).contiguous(), data, sz, group, hb, threads)
        y = (y if n == out_features else y[:, :out_features]).to(x.dtype)
        return y if bias is None else y + bias

    call.direct = True  # type: ignore[attr-defined]  (the kernel called straight: tests)
    return call


def _mlp(mlp: torch.nn.Module) -> Linear:
    """mlp(h): SwiGLU's products and activation inline (its linears as `_linear` calls them), any
    other MLP (MoGE's and the other MoE blocks, their routing and load counters) as a module."""
    if type(mlp) is not SwiGLU:
        return lambda h, threads: mlp(h)
    gate_up, down, inter = _linear(mlp.gate_up_proj), _linear(mlp.down_proj), mlp.inter

    def call(h: torch.Tensor, threads: int) -> torch.Tensor:
        gate, up = gate_up(h, threads).split(inter, dim=-1)
        return down(F.silu(gate) * up, threads)

    call.linears = (gate_up, down)  # type: ignore[attr-defined]
    return call


def _norm(module: RMSNorm, lib) -> Optional[Norm]:
    """RMSNorm.forward's C pass (norm_rope.rms_norm_pass) for x [rows, N] contiguous of the weight's
    dtype (bf16 or float32), the weight checked once; None where that pass does not take the weight."""
    weight, eps = module.weight, module.eps
    n = weight.shape[0]
    if module.batch_invariant or weight.dtype not in norm_rope.KINDS or weight.dim() != 1 or not weight.is_contiguous() or n % 8 or not n:
        return None

    def call(x: torch.Tensor, threads: int) -> torch.Tensor:
        out = norm_rope.rms_norm_pass(lib, x, weight, eps, threads)
        if out is None:
            raise RuntimeError(f"RMSNorm loop refused x {tuple(x.shape)}")
        return out

    return call


class EagerDecodeStep:
    """model(input_ids, positions, attn) for a decode-only step (every row one sequence's next
    token, no prefills), as DecoderForCausalLM.forward computes it; built by `build`."""

    def __init__(self, model: DecoderForCausalLM, layers: list[tuple], final_norm: Norm, norm_lib, attention_lib):
        self.model = model
        self.layers = layers
        self.final_norm = final_norm
        self.dtype = model.model.norm.weight.dtype  # the activations'; every norm's weight has it (build)
        self.norm_lib = norm_lib
        self.attention_lib = attention_lib

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        model = self.model
        threads = torch.get_num_threads()
        x = model.model.embed_tokens(input_ids)
        cos, sin = model.rotary.cos_sin(positions, x.dtype)
        t = x.shape[0]
        head_dim, dtype = self.layers[0][6], self.dtype
        if (
            x.dtype != dtype or x.dim() != 2 or not x.is_contiguous() or cos.dtype != dtype
            or cos.shape != (t, head_dim) or sin.shape != cos.shape or not (cos.is_contiguous() and sin.is_contiguous())
        ):
            return model(input_ids, positions, attn)  # (a rotary this loop does not take: partial, other dtype)
        # Each decode group's slots and validity, once for every layer (Attention._paged takes them per layer).
        groups = attn.decode_groups or [tuple(attn.decode_slots.shape)]
        spans = []
        start = 0
        for end, ctx in groups:
            slots = attn.decode_slots[start:end, :ctx].to(torch.long).contiguous()
            valid = attn.decode_mask[start:end, ..., :ctx].reshape(end - start, ctx).to(torch.bool).contiguous()
            spans.append((start, end, slots, valid))
            start = end
        slot_mapping = attn.slot_mapping
        lib, lib_a = self.norm_lib, self.attention_lib
        for norm1, qkv, q_size, kv_size, heads, kv_heads, dim, scale, o_proj, layer, norm2, mlp in self.layers:
            h = norm1(x, threads)
            q, k, v = qkv(h, threads).split([q_size, kv_size, kv_size], dim=-1)
            # apply_rotary's C pass on each (rows of heads x dim, the row stride the fused product's)
            q_rot = norm_rope.rope_pass(lib, q.view(t, heads, dim), cos, sin, threads)
            k_rot = norm_rope.rope_pass(lib, k.view(t, kv_heads, dim), cos, sin, threads)
            if q_rot is None or k_rot is None:
                raise RuntimeError("rotary loop refused its operands")
            k_cache, v_cache = layer.k_cache, layer.v_cache
            k_cache.index_put_((slot_mapping,), k_rot.to(k_cache.dtype))
            v_cache.index_put_((slot_mapping,), v.view(t, kv_heads, dim).to(v_cache.dtype))
            out = torch.empty(t, heads, dim, dtype=dtype)
            for first, end, slots, valid in spans:
                bi_attention_kernel.attention_pass(lib_a, q_rot[first:end], k_cache, v_cache, slots, valid, out[first:end], scale, threads)
            x = x + o_proj(out.view(t, q_size), threads)
            x = x + mlp(norm2(x, threads), threads)
        return self.final_norm(x, threads)


def build(model: torch.nn.Module, decode_kernel: list[bool], k_caches: list, v_caches: list) -> Optional[EagerDecodeStep]:
    """The lean eager decode step for `model` under a runner whose layers' decode attention is
    `decode_kernel` over these caches, or None where it does not apply (then the modules run)."""
    if not enabled() or type(model).forward is not DecoderForCausalLM.forward or getattr(model, "batch_invariant", True):
        return None
    if model.__dict__.get("_lora_state") is not None or getattr(model, "parallel", None) is None or model.parallel.world_size != 1:
        return None
    norm_lib, attention_lib = norm_rope.library(), bi_attention_kernel.library()
    if norm_lib is None or attention_lib is None or not decode_kernel or not all(decode_kernel):
        return None
    dm = model.model
    if type(dm.norm) is not RMSNorm or len(k_caches) != len(dm.layers):
        return None
    final_norm = _norm(dm.norm, norm_lib)
    if final_norm is None:
        return None
    layers = []
    for layer, k_cache, v_cache in zip(dm.layers, k_caches, v_caches):
        a, mlp = layer.self_attn, layer.mlp
        if not (
            type(layer) is DecoderLayer and type(a) is Attention
            and type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
        ):
            return None
        if (
            a.values_in_keys or a.v_dim != a.head_dim or a.head_dim % 16
            or a.q_size != a.num_heads * a.head_dim or a.kv_size != a.num_kv_heads * a.head_dim
            # (a value cache of the key cache's shape, in a dtype the kernel reads)
            or not bi_attention_kernel.takes(a.num_heads, a.head_dim, dm.norm.weight.dtype, k_cache, v_cache)
        ):
            return None
        norm1, norm2 = _norm(layer.input_layernorm, norm_lib), _norm(layer.post_attention_layernorm, norm_lib)
        if norm1 is None or norm2 is None or {n.weight.dtype for n in (layer.input_layernorm, layer.post_attention_layernorm)} != {dm.norm.weight.dtype}:
            return None
        layers.append((
            norm1, _linear(a.qkv_proj), a.q_size, a.kv_size, a.num_heads, a.num_kv_heads, a.head_dim, float(a.scale),
            _linear(a.o_proj), a, norm2, _mlp(mlp),
        ))
    if len({entry[6] for entry in layers}) != 1:
        return None
    return EagerDecodeStep(model, layers, final_norm, norm_lib, attention_lib)
