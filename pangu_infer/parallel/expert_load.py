"""Per-rank MoGE load: tokens each rank's experts processed, against plain global top-k routing."""

from __future__ import annotations

import torch


def rank_load_stats(moe_stats: dict, rank_tokens: list[list[int]], world_size: int) -> dict:
    """The "ranks" section of LLM.moe_stats().

    rank_tokens[layer][rank]: token-expert pairs the rank's experts computed, counted on that rank.
    The global top-k figures put the same router probabilities through a plain top-k over all
    experts, with the experts spread over the ranks in the same contiguous order.
    """
    topk = [
        torch.tensor(layer["global_topk_expert_tokens"]).view(world_size, -1).sum(-1).tolist()
        for layer in moe_stats["layers"]
    ]
    return {
        "world_size": world_size,
        "rank_tokens": rank_tokens,
        "global_topk_rank_tokens": topk,
        # Mean over steps and layers of (max - min tokens per rank) / tokens in the step.
        "imbalance_score": moe_stats["imbalance_score"].get(world_size),
        "global_topk_imbalance_score": moe_stats["global_topk_imbalance_score"].get(world_size),
    }
