"""openPangu-R-72B-2512 (`PanguProMoEV2ForCausalLM`): grouped-query attention with K-norm, K heads
of 192 and V heads of 128, interleaved RoPE on the first `qk_rope_head_dim` dims, and learned
sink keys/values every query sees; the sigmoid top-k MoE of models/topk_moe.py.

The sinks are per-layer parameters kept beside the paged KV cache (not in it): every attention
call, cached or not, prefill chunk or decode, puts the layer's S sink keys ahead of the context
keys in one softmax. So prefix caching, chunked prefill, batching and preemption work unchanged,
and no cache block is spent on them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.models.layers import Attention, AttentionBatch, RMSNorm, apply_rotary_interleaved
from pangu_infer.models.topk_moe import FamilyForCausalLM
from pangu_infer.parallel.state import current_parallel_state, head_shard, row_parallel_linear


class SinkAttention(Attention):
    """PanguProMoEV2 attention (spec §3.3), with the KV cache of `Attention` (K and V of their own widths)."""

    @staticmethod
    def weight_names(cfg: ModelConfig) -> list[str]:
        names = ["qkv_proj.weight", "k_layernorm.weight", "o_proj.weight"]
        if cfg.param_sink_number:
            names.append("param_sink_key")
            if cfg.param_sink_with_value:
                names.append("param_sink_value")
        return names

    def _init_projections(self, cfg: ModelConfig) -> None:
        state = current_parallel_state()
        heads = head_shard(cfg, state)
        self.v_dim = cfg.v_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_size = self.num_kv_heads * self.v_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + self.kv_size + self.v_size, bias=False)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_proj = row_parallel_linear(self.num_heads * self.v_dim, cfg.hidden_size, False, state)
        s = cfg.param_sink_number
        self.param_sink_key = nn.Parameter(torch.empty(s, heads.kv_count, self.head_dim)) if s else None
        with_value = s and cfg.param_sink_with_value
        self.param_sink_value = nn.Parameter(torch.empty(s, heads.kv_count, self.v_dim)) if with_value else None
        # Set by prepare_sinks() after loading: K-normed sink keys [Hkv, S, D], values [Hkv, S, Dv].
        self.sink_k: Optional[torch.Tensor] = None
        self.sink_v: Optional[torch.Tensor] = None

    def prepare_sinks(self) -> None:
        """K-norm the sink keys once (no RoPE: they have no position); zero values unless stored."""
        if self.param_sink_key is None:
            return
        with torch.no_grad():
            key = self.param_sink_key
            self.sink_k = self.k_layernorm(key).transpose(0, 1).contiguous()
            if self.param_sink_value is not None:
                self.sink_v = self.param_sink_value.transpose(0, 1).contiguous()
            else:
                self.sink_v = key.new_zeros(key.shape[1], key.shape[0], self.v_dim)

    def sinks(self, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.sink_k is None:
            return None
        return self.sink_k.to(dtype), self.sink_v.to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Optional[AttentionBatch]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.v_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = self.k_layernorm(k.view(t, self.num_kv_heads, self.head_dim))
        r = self.rope_dim  # RoPE on the first r dims of every head; the rest pass unchanged
        q = torch.cat((apply_rotary_interleaved(q[..., :r], cos, sin), q[..., r:]), dim=-1)
        k = torch.cat((apply_rotary_interleaved(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        v = v.view(t, self.num_kv_heads, self.v_dim)
        if attn is None:
            out = self._sdpa(q, k, v, mask=None, causal=True)
        else:
            out = self._paged(q, k, v, attn)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


class PanguProMoEV2ForCausalLM(FamilyForCausalLM):
    attention_class = SinkAttention

    def finish_loading(self) -> None:
        super().finish_loading()
        for m in self.modules():
            if isinstance(m, SinkAttention):
                m.prepare_sinks()
