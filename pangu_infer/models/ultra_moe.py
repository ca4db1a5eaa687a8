"""openPangu-Ultra-MoE-718B (`PanguUltraMoEForCausalLM`): DeepSeek-V3-style multi-head latent
attention (MLA) with the sigmoid top-k MoE of models/topk_moe.py and sandwich norm.

The paged KV cache holds what MLA needs and no more: per token and layer, the normalised
compressed latent c_kv (kv_lora_rank = 512) and the one rope key k_pe (qk_rope_head_dim = 64)
shared by all heads: 576 values, against 128 heads x (192 + 128) = 40,960 for full K and V.

Attention runs in the latent space ("weight absorption"): kv_b_proj = [W_uk; W_uv] per head, so
q_nope . k_nope = (q_nope W_uk) . c_kv and sum_j p_j v_j = W_uv (sum_j p_j c_kv_j). Each query head
becomes [q_nope W_uk | rope(q_pe)] (576 wide) against the cached [c_kv | rope(k_pe)] rows, one
key "head" for all query heads (multi-query), values = the first 512 dims of the same rows, and
the 512-wide output goes through W_uv, then o_proj. The score scale stays (nope + rope)^-0.5.
kv_b_proj is therefore a plain parameter, not a linear: quantization and oneDNN packing leave it
in float (2% of a layer's attention weights are it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.models.layers import Attention, AttentionBatch, RMSNorm, apply_rotary_interleaved
from pangu_infer.models.topk_moe import FamilyForCausalLM
from pangu_infer.parallel.state import current_parallel_state, head_shard, row_parallel_linear


class LatentUpProjection(nn.Module):
    """kv_b_proj's weight [heads * (qk_nope + v), kv_lora_rank], read by MLAAttention per head."""

    def __init__(self, heads: int, nope: int, v: int, rank: int):
        super().__init__()
        self.nope = nope
        self.weight = nn.Parameter(torch.empty(heads * (nope + v), rank))

    def split(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [heads, nope, rank] and W_uv [heads, v, rank]."""
        w = self.weight.view(heads, -1, self.weight.shape[-1])
        return w[:, : self.nope], w[:, self.nope :]


class MLAAttention(Attention):
    """Multi-head latent attention (spec §2.3) over a cache of [c_kv | k_pe] rows."""

    @staticmethod
    def weight_names(cfg: ModelConfig) -> list[str]:
        q = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] if cfg.q_lora_rank else ["q_proj.weight"]
        return q + ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]

    def _init_projections(self, cfg: ModelConfig) -> None:
        state = current_parallel_state()
        self.num_heads = head_shard(cfg, state).q_count
        self.nope, self.rope_dim, self.v_head = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        # The cache: one row per token, [c_kv | k_pe], read by every query head (one KV "head").
        self.num_kv_heads = 1
        self.head_dim = self.rank + self.rope_dim
        self.values_in_keys = self.v_dim = self.rank
        self.scale = (self.nope + self.rope_dim) ** -0.5
        q_width = self.num_heads * (self.nope + self.rope_dim)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(h, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, eps)
        self.kv_b_proj = LatentUpProjection(self.num_heads, self.nope, self.v_head, self.rank)
        self.o_proj = row_parallel_linear(self.num_heads * self.v_head, h, False, state)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Optional[AttentionBatch]) -> torch.Tensor:
        t, n = x.shape[0], self.num_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, n, -1).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        # RoPE on the last rope_dim dims: the query's per head, the key's once for all heads.
        q_pe = apply_rotary_interleaved(q_pe, cos, sin)
        k_pe = apply_rotary_interleaved(k_pe.view(t, 1, self.rope_dim), cos, sin)
        w_uk, w_uv = self.kv_b_proj.split(n)
        q_lat = torch.einsum("thd,hdr->thr", q_nope, w_uk.to(q_nope.dtype))  # [T, n, rank]
        q = torch.cat((q_lat, q_pe), dim=-1)  # [T, n, rank + rope]
        k = torch.cat((c_kv.view(t, 1, self.rank), k_pe), dim=-1)  # [T, 1, rank + rope]
        v = k[..., : self.rank]
        if attn is None:
            out = self._sdpa(q, k, v, mask=None, causal=True)
        else:
            out = self._paged(q, k, v, attn)
        out = torch.einsum("thr,hvr->thv", out, w_uv.to(out.dtype))  # [T, n, v_head]
        return self.o_proj(out.reshape(t, n * self.v_head))


class PanguUltraMoEForCausalLM(FamilyForCausalLM):
    attention_class = MLAAttention
