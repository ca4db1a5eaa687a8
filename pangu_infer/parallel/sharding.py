"""Which slice of each HF checkpoint tensor a rank keeps, decided by the tensor's name."""

from __future__ import annotations

import re

import torch

from pangu_infer.config import ModelConfig
from pangu_infer.parallel.state import ParallelState, head_shard, rank_range

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
# Column-parallel: output rows split. The router (`mlp.gate.weight`) does not match: replicated.
_MLP_IN = re.compile(r"\.mlp\.(shared_expert\.)?(gate|up)_proj\.(weight|bias)$")
# Row-parallel: input columns split; their biases stay whole (added once, after the sum).
_MLP_OUT = re.compile(r"\.mlp\.(shared_expert\.)?down_proj\.weight$")


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
        self.experts = rank_range(cfg.num_experts, state) if cfg.is_moge else range(0)

    def owns(self, name: str) -> bool:
        """False for tensors this rank never holds: other ranks' experts, and the head on workers."""
        if not self.state.is_parallel:
            return True
        if name == "lm_head.weight":
            return self.state.rank == 0
        m = _EXPERT.search(name)
        return m is None or int(m.group(1)) in self.experts

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's slice of an HF tensor (a view: only that slice is read from the mapped file)."""
        if not self.state.is_parallel or _EXPERT.search(name):
            return tensor
        if ".self_attn.q_proj." in name:
            return tensor[self.q_rows]
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return tensor[self.kv_rows]
        if name.endswith(".self_attn.o_proj.weight"):
            return tensor[:, self.q_rows].contiguous()  # a column slice: copy it out of the full tensor
        if _MLP_IN.search(name):
            return tensor[self._columns(tensor.shape[0])]
        if _MLP_OUT.search(name):
            return tensor[:, self._columns(tensor.shape[1])].contiguous()
        return tensor

    def _columns(self, width: int) -> slice:
        r = rank_range(width, self.state)
        return slice(r.start, r.stop)
