"""Tensor and expert parallelism of PanguProMoEV2 and PanguUltraMoE on 2 and 4 CPU processes
(gloo) against one process: fp32 logits, greedy generation, and per-rank expert load.

R-72B on 4 ranks has fewer KV heads (2) than ranks: each KV head, and its sink keys and values,
is replicated on the two ranks whose query heads read it. Ultra-MoE's latent is replicated on
every rank; its query heads, kv_b_proj rows and o_proj columns are split.
"""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": list(range(5, 17))}, {"prompt_token_ids": list(range(40, 75))}]
LOGIT_IDS = list(range(3, 40))
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _workload(model_dir, world_size: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spawned ranks copy this: 4 ranks must not fight over 2 cores
    try:
        llm = LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=world_size,
                  kv_cache_memory=1 << 24, enforce_eager=True)
        logits = llm.logits(LOGIT_IDS)
        greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        stats = llm.moe_stats()
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    return {"logits": logits, "greedy": greedy, "moe_stats": stats}


@pytest.fixture(scope="module")
def run(tiny_r72b_dir, tiny_ultra_dir):
    dirs = {"r72b": tiny_r72b_dir, "ultra": tiny_ultra_dir}
    cache: dict = {}

    def get(kind: str, world_size: int) -> dict:
        if (kind, world_size) not in cache:
            cache[(kind, world_size)] = _workload(dirs[kind], world_size)
        return cache[(kind, world_size)]

    return get


CASES = [("r72b", 2), ("ultra", 2), ("r72b", 4)]


@pytest.mark.parametrize("kind,world_size", CASES)
def test_tensor_parallel_logits_and_greedy_match_one_process(run, kind, world_size):
    got, want = run(kind, world_size), run(kind, 1)
    assert (got["logits"] - want["logits"]).abs().max().item() < 1e-4
    assert got["greedy"] == want["greedy"]
    assert all(len(ids) == GREEDY.max_tokens for ids in got["greedy"])


@pytest.mark.parametrize("kind,world_size", CASES)
def test_each_rank_computes_its_own_experts_tokens(run, kind, world_size):
    ranks = run(kind, world_size)["moe_stats"]["ranks"]
    one = run(kind, 1)["moe_stats"]
    assert ranks["world_size"] == world_size
    for layer, counted in enumerate(ranks["rank_tokens"]):
        # Counted on each rank; the routing is the same everywhere, so they add up to the one-process count.
        experts = torch.tensor(one["layers"][layer]["expert_tokens"])
        assert counted == experts.view(world_size, -1).sum(-1).tolist()
