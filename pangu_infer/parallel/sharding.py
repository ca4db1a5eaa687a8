"""Which slice of each HF checkpoint tensor a rank keeps, decided by the tensor's name."""

from __future__ import annotations

import re
from typing import Any

import torch

from pangu_infer.config import ModelConfig
from pangu_infer.errors import WeightError
from pangu_infer.parallel.state import ParallelState, head_shard, rank_range

# A checkpoint tensor: a torch.Tensor, or a quantized one (pangu_infer.quant.formats.QuantizedTensor,
# a layer above this one: told apart here by not being a torch.Tensor).
Weight = Any

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
# Column-parallel: output rows split. The router (`mlp.gate.weight`) does not match: replicated.
_MLP_IN = re.compile(r"\.mlp\.(shared_experts?\.)?(gate|up)_proj\.(weight|bias)$")
# Row-parallel: input columns split; their biases stay whole (added once, after the sum).
_MLP_OUT = re.compile(r"\.mlp\.(shared_experts?\.)?down_proj\.weight$")


class WeightSharder:
    """Layout: attention heads and (shared-expert) MLP columns split over the ranks, routed experts
    placed by whole groups, embedding replicated (every rank embeds its input ids), the LM head on
    rank 0 only (only rank 0 samples, so workers never compute logits)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState):
        self.cfg = cfg
        self.state = state
        heads = head_shard(cfg, state)
        d = cfg.head_dim
        self.q_rows = slice(heads.q_start * d, (heads.q_start + heads.q_count) * d)
        self.kv_rows = slice(heads.kv_start * d, (heads.kv_start + heads.kv_count) * d)
        self.experts = rank_range(cfg.num_experts, state) if cfg.is_moe else range(0)

    def owns(self, name: str) -> bool:
        """False for tensors this rank never holds: other ranks' experts, and the head on workers."""
        if not self.state.is_parallel:
            return True
        if name == "lm_head.weight":
            return self.state.rank == 0
        m = _EXPERT.search(name)
        return m is None or int(m.group(1)) in self.experts

    def shard(self, name: str, tensor: Weight) -> Weight:
        """The rank's slice of an HF tensor (a view: only that slice is read from the mapped file).

        A quantized tensor (a GGUF file's blocks, a `pangu-infer quantize` checkpoint) is sliced
        the same way: rows as they are, input columns by whole int4 groups."""
        if not self.state.is_parallel or _EXPERT.search(name):
            return tensor
        if ".self_attn.q_proj." in name:
            return tensor[self.q_rows]
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return tensor[self.kv_rows]
        if name.endswith(".self_attn.o_proj.weight"):
            return input_columns(name, tensor, self.q_rows)
        if _MLP_IN.search(name):
            return tensor[self._columns(tensor.shape[0])]
        if _MLP_OUT.search(name):
            return input_columns(name, tensor, self._columns(tensor.shape[1]))
        return tensor

    def _columns(self, width: int) -> slice:
        r = rank_range(width, self.state)
        return slice(r.start, r.stop)


class FamilySharder(WeightSharder):
    """The layout of PanguProMoEV2 / PanguUltraMoE: query heads split (their rows of the fused
    qkv_proj, q_b_proj, kv_b_proj, and o_proj's columns), KV heads split or replicated as for the
    other models (with their sink keys and values), the MLA latent projections replicated (every
    rank caches the whole latent), routed experts in contiguous ranges, dense and shared MLPs split
    by columns."""

    def __init__(self, cfg: ModelConfig, state: ParallelState):
        super().__init__(cfg, state)
        self.heads = head_shard(cfg, state)

    def shard(self, name: str, tensor: Weight) -> Weight:
        if not self.state.is_parallel or ".self_attn." not in name:
            return super().shard(name, tensor)
        cfg, h = self.cfg, self.heads
        attr = name.rsplit(".self_attn.", 1)[1]

        def rows(t: Weight, offset: int, start: int, count: int, width: int) -> Weight:
            return t[offset + start * width : offset + (start + count) * width]

        if attr == "qkv_proj.weight":
            d, dv = cfg.head_dim, cfg.v_head_dim
            q_end = cfg.num_attention_heads * d
            k_end = q_end + cfg.num_key_value_heads * d
            parts = [
                rows(tensor, 0, h.q_start, h.q_count, d),
                rows(tensor, q_end, h.kv_start, h.kv_count, d),
                rows(tensor, k_end, h.kv_start, h.kv_count, dv),
            ]
            return torch.cat(parts) if isinstance(tensor, torch.Tensor) else type(tensor).cat(parts)
        if attr in ("param_sink_key", "param_sink_value"):
            return tensor[:, h.kv_start : h.kv_start + h.kv_count]
        if attr in ("q_b_proj.weight", "q_proj.weight"):
            return rows(tensor, 0, h.q_start, h.q_count, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        if attr == "kv_b_proj.weight":
            return rows(tensor, 0, h.q_start, h.q_count, cfg.qk_nope_head_dim + cfg.v_head_dim)
        if attr == "o_proj.weight":
            dv = cfg.v_head_dim
            return input_columns(name, tensor, slice(h.q_start * dv, (h.q_start + h.q_count) * dv))
        return tensor  # norms, q_a_proj, kv_a_proj_with_mqa: replicated


def input_columns(name: str, tensor: Weight, cols: slice) -> Weight:
    """A row-parallel shard: input columns of a float or quantized weight, copied out of the whole."""
    if isinstance(tensor, torch.Tensor):
        return tensor[:, cols].contiguous()
    try:
        return tensor.columns(cols.start, cols.stop)
    except ValueError as e:
        raise WeightError(
            f"tensor {name!r} cannot be split for tensor parallelism: {e}; use a tensor_parallel_size "
            f"whose shards hold whole groups, or a checkpoint quantized with a smaller group"
        ) from None
