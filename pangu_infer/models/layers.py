"""Building blocks shared by every model: RMSNorm, rotary embeddings, paged attention, SwiGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.models import batch_invariant as bi
from pangu_infer.models import bi_attention_kernel, norm_rope
from pangu_infer.parallel.state import current_parallel_state, head_shard, row_parallel_linear


def eager_in_compiled_steps(fn):
    """Marks a method that a torch.compile'd step must run eagerly (data-dependent shapes, host
    bookkeeping). engine/compiled.py applies `torch.compiler.disable` to the marked methods when
    it first compiles a model of the class: applying it here, at import, would import
    torch._dynamo (about a second) into every start, eager ones included."""
    fn._eager_in_compiled_steps = True
    return fn


def disable_compile_on_marked_methods(model: nn.Module) -> None:
    """`torch.compiler.disable` on every method marked with `eager_in_compiled_steps` in the
    classes of `model`'s modules and of their plain attributes (once per class), and
    `torch.compiler.assume_constant_result` on `bi_attention_kernel.available` (it marks the
    function in place; at import it would import torch._dynamo into every start). Called before
    every trace of a model."""
    torch.compiler.assume_constant_result(bi_attention_kernel.available)
    classes = {type(m) for m in model.modules()}
    classes |= {type(v) for m in model.modules() for v in vars(m).values() if not isinstance(v, (torch.Tensor, dict))}
    for cls in classes:
        for klass in cls.__mro__:
            for name, attr in list(vars(klass).items()):
                if getattr(attr, "_eager_in_compiled_steps", False) and not getattr(attr, "_compile_disabled", False):
                    disabled = torch.compiler.disable(attr)
                    disabled._compile_disabled = True
                    setattr(klass, name, disabled)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        # Set by models/batch_invariant.make_batch_invariant: the mean of squares summed in a fixed
        # order, so that a compiled step rounds it as the eager forward does (bi.fixed_order_sum).
        self.batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_invariant:  # eager CPU steps: one C pass (models/norm_rope.py)
            y = norm_rope.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        # Normalise in fp32, multiply in the activation dtype: the reference implementations do.
        dtype = x.dtype
        xf = x.float()
        if self.batch_invariant:
            mean_sq = bi.fixed_order_sum(xf * xf) * (1.0 / xf.shape[-1])
        else:
            mean_sq = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(mean_sq + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.qk_rope_head_dim or cfg.head_dim  # partial RoPE (the Pangu MoE family) or the whole head
    # On the CPU even while a model is built on the meta device: meta's arange runs torch's
    # reference ops, whose first call imports torch._dynamo (a second of every start).
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.float()
    if rs["rope_type"] == "linear":
        return (inv_freq / rs["factor"]).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


class RotaryEmbedding(nn.Module):
    """Rotate-half (NeoX) rotary embedding over the full head_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    y = norm_rope.rotary(x, cos, sin)  # eager CPU steps: one C pass, the same bits (models/norm_rope.py)
    if y is not None:
        return y
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class InterleavedRotaryEmbedding(RotaryEmbedding):
    """GPT-J style rotary embedding: pairs (x[2i], x[2i+1]) rotated by p * theta^(-2i/dim)."""

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, dim]; cos/sin: [T, dim/2] -> o[2i] = x[2i]cos - x[2i+1]sin, o[2i+1] = x[2i+1]cos + x[2i]sin."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


@dataclass
class PrefillSlice:
    """One sequence's chunk of new tokens in a step: rows [start, start+length) of the flat batch."""

    start: int
    length: int
    context_len: int  # tokens in the cache after this step, new ones included
    kv_slots: torch.Tensor  # [context_len] flat cache slots, oldest first
    causal_mask: Optional[torch.Tensor]  # [length, context_len] bool, None when context_len == length


@dataclass
class AttentionBatch:
    """Where a step's tokens live in the paged KV cache. Decode tokens come first in the flat batch."""

    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) for each new token
    decode_slots: Optional[torch.Tensor] = None  # [num_decode, max_ctx] slots to read (padded)
    decode_mask: Optional[torch.Tensor] = None  # [num_decode, 1, 1, max_ctx] bool, True = attend
    # (end row, context) groups of decodes sorted by context, each padded only to its own context;
    # empty: one group of all decodes, sized by decode_slots' shape
    decode_groups: list[tuple[int, int]] = field(default_factory=list)
    prefills: list[PrefillSlice] = field(default_factory=list)
    # Every query attends alone over its own keys in fixed chunks (models/batch_invariant.py);
    # decode_slots' width is then a multiple of bi.KV_SPLIT and decode_groups is empty.
    batch_invariant: bool = False


# The fp8 KV caches (kv_cache_dtype "fp8", "fp8_e4m3", "fp8_e5m2"): read converted to the queries' dtype
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# A decode group of one sequence runs one unmasked SDPA call up to this context; beyond it the two
# products + softmax are faster (where they cross: benchmarks/cpu_kernels.py, figures in RESULTS.md).
UNMASKED_SDPA_MAX_CONTEXT = 768

# Decode attention by models/bi_attention_kernel.py's C kernel ("kernel"), by gathered K/V and two
# batched products ("torch"), or, unset, whichever a one-time measurement per machine and cache
# dtype finds faster (decode_kernel_chosen).
DECODE_ATTENTION_ENV = "PANGU_INFER_DECODE_ATTENTION"


def decode_kernel_chosen(kv_dtype: torch.dtype) -> bool:
    """Do decode queries on CPU run the C kernel, which reads each sequence's keys and values
    where they lie in the paged cache (no gathered copy), in fp32 with masked keys skipped?
    Forced by DECODE_ATTENTION_ENV, else measured once per machine and cache dtype against the
    torch form at a decode batch of 8 x 512 keys (kept in kernels.json); an fp8 cache's always
    (the kernel widens its bytes as it reads them)."""
    from pangu_infer import machine

    if kv_dtype not in bi_attention_kernel.KV_KINDS or not bi_attention_kernel.available():
        return False
    forced = machine.env_choice(DECODE_ATTENTION_ENV, ("kernel", "torch"))
    if forced is not None:
        return forced == "kernel"
    if kv_dtype in FP8_DTYPES:  # the torch form widens gathered copies first: 3.5x slower at 1024 keys (RESULTS.md)
        return True
    name = "decode_attention_kernel|" + str(kv_dtype).replace("torch.", "")
    return machine.own_kernel_measured_faster(name, lambda: _measure_decode(kv_dtype), "decode attention kernel")


def decode_kernel_takes(layer: "Attention", kv_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: Optional[torch.Tensor]) -> bool:
    """Can the C kernel run this layer's decode attention over these caches (no sinks, a value
    cache, shapes it handles)? Whether it is the faster form here is decode_kernel_chosen's. (The
    queries are in the cache's dtype, or for an fp8 cache in the model's, bfloat16 or float32: the
    kernel takes either, each call told which.)"""
    q_dtype = torch.float32 if kv_dtype in FP8_DTYPES else kv_dtype
    return layer.sinks(q_dtype) is None and bi_attention_kernel.takes(layer.num_heads, layer.head_dim, q_dtype, k_cache, v_cache)


def _measure_decode(kv_dtype: torch.dtype, batch: int = 8, length: int = 512, kv_heads: int = 8, group: int = 4, dim: int = 128) -> dict[str, float]:
    """Seconds per decode attention call, each form, over caches paged in blocks of 16 slots in a
    shuffled order (medians of interleaved passes)."""
    from pangu_infer.machine import interleaved_medians

    g = torch.Generator().manual_seed(0)
    slots = batch * length
    k_cache = torch.randn(slots, kv_heads, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(slots, kv_heads, dim, generator=g).to(kv_dtype)
    blocks = torch.randperm(slots // 16, generator=g)
    table = (blocks[:, None] * 16 + torch.arange(16)).reshape(batch, length)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(kv_dtype)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    scale = dim**-0.5

    def torch_form():
        keys, vals = gather_heads_first(k_cache, table), gather_heads_first(v_cache, table)
        return decode_products(q, keys, vals, mask, scale)

    with torch.inference_mode():
        return interleaved_medians({
            "own": lambda: bi_attention_kernel.run(q, k_cache, v_cache, table, mask.view(batch, length), scale),
            "aten": torch_form,
        })


def gather_heads_first(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [S, Hkv, D], slots [B, L] -> [B, Hkv, L, D] contiguous (index_select on rows is ~3x
    faster than advanced indexing, and contiguous heads-first K/V make the matmuls fast)."""
    b, n = slots.shape
    rows = cache.view(cache.shape[0], -1).index_select(0, slots.reshape(-1))
    return rows.view(b, n, *cache.shape[1:]).transpose(1, 2).contiguous()


def decode_products(q, keys, vals, mask, scale: float) -> torch.Tensor:
    """One query per sequence: q [B, H, D], keys/vals [B, Hkv, L, D], mask [B, 1, 1, L] -> [B, H, D].

    Two batched matmuls per KV head group in the cache dtype (CPU bf16 matmuls accumulate in
    fp32) with the softmax in fp32: on CPU this is several times faster than scaled_dot_product_attention
    with a mask (its slow path), and converting gathered K/V to fp32 cost more than the products.
    """
    b, h, d = q.shape
    hkv = keys.shape[1]
    qg = q.to(keys.dtype).view(b, hkv, h // hkv, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(vals.dtype)
    return torch.matmul(probs, vals).view(b, h, vals.shape[-1]).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Under tensor parallelism this rank holds a slice of the heads (all of them in one process).
        heads = head_shard(cfg, current_parallel_state())
        self.num_heads = heads.q_count
        self.num_kv_heads = heads.kv_count
        self.head_dim = cfg.head_dim
        self.v_dim = cfg.head_dim  # width of a value head (narrower than a key head in the MoE family)
        # > 0: there is no value cache, values are the first `values_in_keys` dims of each cached
        # key row (MLA caches one latent that serves as both)
        self.values_in_keys = 0
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self._init_projections(cfg)
        # The KV cache of the engine whose step runs now, bound by its runner (ModelRunner.bind): each
        # [num_blocks * block_size, kv_heads, head_dim] (flat slots). Two tensors, not views of one,
        # so that a compiled step can write them in place.
        self.k_cache: Optional[torch.Tensor] = None
        self.v_cache: Optional[torch.Tensor] = None
        # Decode queries by the C kernel that reads the paged cache in place (decode_kernel_chosen);
        # set by the runner that allocates the cache (ModelRunner), off for eager forwards without one.
        self.decode_kernel = False

    def _init_projections(self, cfg: ModelConfig) -> None:
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = row_parallel_linear(self.q_size, cfg.hidden_size, cfg.o_bias, current_parallel_state())

    def cache_shapes(self, slots: int) -> tuple[tuple[int, ...], Optional[tuple[int, ...]]]:
        """Shapes of this layer's key and value cache (None: no value cache) for `slots` tokens;
        the runner allocates them (ModelRunner)."""
        if self.values_in_keys:
            return (slots, self.num_kv_heads, self.head_dim), None
        return (slots, self.num_kv_heads, self.head_dim), (slots, self.num_kv_heads, self.v_dim)

    def sinks(self, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Keys [Hkv, S, D] and values [Hkv, S, Dv] every query attends to ahead of its context
        (PanguProMoEV2's learned sinks), or None."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: Optional[AttentionBatch],
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if attn is None:
            out = self._sdpa(q, k, v, mask=None, causal=True)
        else:
            out = self._paged(q, k, v, attn)
        return self.o_proj(out.reshape(t, self.q_size))

    def _sdpa(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """q: [Tq, H, D], k: [Tk, Hkv, D], v: [Tk, Hkv, Dv] -> [Tq, H, Dv]; sinks, if any, first."""
        sinks = self.sinks(k.dtype)
        if sinks is not None:
            sk, sv = sinks
            if mask is None:  # causal, bottom-right aligned like the cache path
                tq, tk = q.shape[0], k.shape[0]
                mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            mask = torch.cat((mask.new_ones(mask.shape[0], sk.shape[1]), mask), dim=1)
            k = torch.cat((sk.transpose(0, 1), k), dim=0)
            v = torch.cat((sv.transpose(0, 1), v), dim=0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.squeeze(0).transpose(0, 1)

    def _decode_attention(self, q, keys, vals, mask) -> torch.Tensor:
        """q [B, H, D], gathered keys/vals [B, Hkv, L, D], mask [B, 1, 1, L] -> [B, H, D] (decode_products)."""
        return decode_products(q, keys, vals, mask, self.scale)

    def _decode_attention_unmasked(self, q, keys, vals) -> torch.Tensor:
        """_decode_attention without padding: one SDPA call with each KV head's query heads as its
        query rows (faster than the two products and the softmax for one sequence on CPU;
        SDPA's enable_gqa path is slower still)."""
        b, h, d = q.shape
        hkv = keys.shape[1]
        qg = q.to(keys.dtype).view(b, hkv, h // hkv, d)
        return F.scaled_dot_product_attention(qg, keys, vals, scale=self.scale).reshape(b, h, -1).to(q.dtype)

    def _decode_kv(self, slots: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype):
        """Gathered keys [B, Hkv, L, D] and values [B, Hkv, L, Dv] of decode rows, sinks first; an
        fp8 cache's in `dtype` (the queries')."""
        keys = gather_heads_first(self.k_cache, slots)
        if keys.dtype in FP8_DTYPES:
            keys = keys.to(dtype)
        vals = keys[..., : self.values_in_keys] if self.values_in_keys else gather_heads_first(self.v_cache, slots)
        if vals.dtype in FP8_DTYPES:
            vals = vals.to(dtype)
        sinks = self.sinks(keys.dtype)
        if sinks is not None:
            b = keys.shape[0]
            sk, sv = sinks
            keys = torch.cat((sk.expand(b, *sk.shape), keys), dim=2)
            vals = torch.cat((sv.expand(b, *sv.shape), vals), dim=2)
            if mask is not None:
                mask = torch.cat((mask.new_ones(*mask.shape[:-1], sk.shape[1]), mask), dim=-1)
        return keys, vals, mask

    def _paged(self, q, k, v, attn: AttentionBatch) -> torch.Tensor:
        k_cache, v_cache = self.k_cache, self.v_cache
        assert k_cache is not None, "the runner binds a KV cache before a paged forward"
        # index_put_ on the cache tensors themselves: torch.compile keeps it in place (index_copy_
        # or a write through a view makes the compiled step copy the whole cache). An fp8 cache:
        # scale 1 (vLLM's without calibration), torch's cast saturating (e4m3: at +-448).
        k_cache.index_put_((attn.slot_mapping,), k.to(k_cache.dtype))
        if v_cache is not None:
            v_cache.index_put_((attn.slot_mapping,), v.to(v_cache.dtype))
        if attn.batch_invariant:
            return self._paged_batch_invariant(q, attn)
        out = q.new_empty(*q.shape[:2], self.v_dim)
        groups = attn.decode_groups
        if not groups and attn.decode_slots is not None:  # one group, sized by the slots' shape
            groups = [(attn.decode_slots.shape[0], attn.decode_slots.shape[1])]
        start = 0
        for end, ctx in groups:
            slots = attn.decode_slots[start:end, :ctx]
            if self.decode_kernel:  # masked keys are skipped, not read
                valid = attn.decode_mask[start:end, ..., :ctx].reshape(end - start, ctx)
                out[start:end] = bi_attention_kernel.attention(q[start:end], k_cache, v_cache, slots, valid, self.scale)
                start = end
                continue
            unmasked = end - start == 1 and ctx <= UNMASKED_SDPA_MAX_CONTEXT  # one sequence: nothing padded
            mask = None if unmasked else attn.decode_mask[start:end, ..., :ctx]
            keys, vals, mask = self._decode_kv(slots, mask, q.dtype)
            if unmasked:
                out[start:end] = self._decode_attention_unmasked(q[start:end], keys, vals)
            else:
                out[start:end] = self._decode_attention(q[start:end], keys, vals, mask)
            start = end
        for p in attn.prefills:
            rows = slice(p.start, p.start + p.length)
            if p.causal_mask is None:
                out[rows] = self._sdpa(q[rows], k[rows], v[rows], mask=None, causal=True)
            else:
                keys = k_cache[p.kv_slots].to(q.dtype)
                vals = keys[..., : self.values_in_keys] if self.values_in_keys else v_cache[p.kv_slots].to(q.dtype)
                out[rows] = self._sdpa(q[rows], keys, vals, mask=p.causal_mask, causal=False)
        return out

    def _paged_batch_invariant(self, q, attn: AttentionBatch) -> torch.Tensor:
        """Each query token alone over its own context, decode or prefill alike."""
        k_cache, v_cache = self.k_cache, self.v_cache
        parts = []
        if attn.decode_slots is not None:
            b, length = attn.decode_slots.shape
            parts.append(
                bi.attention(q[:b], k_cache, v_cache, attn.decode_slots, attn.decode_mask.view(b, length), self.scale)
            )
        for p in attn.prefills:
            rows = q[p.start : p.start + p.length]
            parts.append(bi.prefill_attention(rows, k_cache, v_cache, p.kv_slots, p.context_len, self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one product."""

    def __init__(self, hidden: int, inter: int, bias: bool = False, reduce: bool = True):
        super().__init__()
        # Tensor parallel: each rank holds inter/world columns of gate and of up, and the matching
        # rows of down; reduce=False leaves the sum over ranks to the caller.
        state = current_parallel_state()
        self.inter = inter // state.world_size
        self.gate_up_proj = nn.Linear(hidden, 2 * self.inter, bias=bias)
        self.down_proj = row_parallel_linear(self.inter, hidden, bias, state, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)
