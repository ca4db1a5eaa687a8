"""Tensor and MoGE expert parallelism on 2 and 4 CPU processes (gloo) against one process.

Each (model, world size) runs once per module: its LLM starts its workers, runs the whole
workload and shuts down before the next one starts (one process group per process).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pangu_infer import LLM, BeamSearchParams, SamplingParams
from pangu_infer.config import ModelConfig
from pangu_infer.engine.saved_step import SavedStep
from pangu_infer.loader.random import pangu_dense_config
from pangu_infer.parallel.sharding import WeightSharder
from pangu_infer.parallel.state import ParallelState, head_shard

PROMPTS = [{"prompt_token_ids": list(range(5, 17))}, {"prompt_token_ids": list(range(40, 75))}]
LOGIT_IDS = list(range(3, 40))
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
CHAT = [{"role": "user", "content": "hello there"}]


def _workload(model_dir: Path, world_size: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spawned ranks copy this: 4 ranks must not fight over 2 cores
    try:
        # Eager on every rank, so that nothing here waits for a compile (the compiled steps of the
        # ranks: test_every_rank_decodes_with_its_compiled_step_by_default).
        llm = LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=world_size,
                  kv_cache_memory=1 << 24, enforce_eager=True)
        logits = llm.logits(LOGIT_IDS)
        greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        chat = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0].token_ids
        stats = llm.moe_stats()
        # (after the expert counts are read) embedding requests, and the first prompt again with its
        # greedy reply as the prediction: drafts of up to 8 tokens verified on every rank
        embeddings = [o.outputs.embedding for pooling in ("last", "mean") for o in llm.embed(PROMPTS, pooling=pooling, use_tqdm=False)]
        predicted = llm.generate(PROMPTS[0], SamplingParams(**{**GREEDY.__dict__, "prediction": greedy[0]}), use_tqdm=False)[0]
        # a beam search: each step's beams copy their parent's partly filled KV block, on every rank
        runner, copies = llm.engine.runner, []
        real_copy = runner.copy_slots
        runner.copy_slots = lambda slots: copies.append(len(slots)) or real_copy(slots)
        beams = llm.beam_search(PROMPTS[1], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True))[0].sequences
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    return {"logits": logits, "greedy": greedy, "chat": chat, "moe_stats": stats, "embeddings": embeddings,
            "predicted": (predicted.outputs[0].token_ids, predicted.metrics["accepted_prediction_tokens"]),
            "beams": ([b.tokens for b in beams], sum(copies))}


@pytest.fixture(scope="module")
def run(tiny_dense_dir, tiny_moge_dir):
    """run(kind, world_size) -> the workload's results, computed once per module."""
    dirs = {"dense": tiny_dense_dir, "moge": tiny_moge_dir}
    cache: dict[tuple[str, int], dict] = {}

    def get(kind: str, world_size: int) -> dict:
        if (kind, world_size) not in cache:
            cache[(kind, world_size)] = _workload(dirs[kind], world_size)
        return cache[(kind, world_size)]

    return get


CASES = [("dense", 2), ("moge", 2), ("dense", 4), ("moge", 4)]


@pytest.mark.parametrize("kind,world_size", CASES)
def test_fp32_logits_match_one_process(run, kind, world_size):
    got, want = run(kind, world_size)["logits"], run(kind, 1)["logits"]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind,world_size", CASES)
def test_greedy_generate_and_chat_match_one_process(run, kind, world_size):
    got, want = run(kind, world_size), run(kind, 1)
    assert got["greedy"] == want["greedy"]
    assert all(len(ids) == GREEDY.max_tokens for ids in got["greedy"])
    assert got["chat"] == want["chat"]


@pytest.mark.parametrize("kind,world_size", CASES)
def test_embeddings_and_predicted_outputs_match_one_process(run, kind, world_size):
    got, want = run(kind, world_size), run(kind, 1)
    for a, b in zip(got["embeddings"], want["embeddings"], strict=True):
        assert (torch.tensor(a) - torch.tensor(b)).abs().max().item() < 1e-5
    tokens, accepted = got["predicted"]
    assert tokens == want["greedy"][0] and accepted >= GREEDY.max_tokens - 1


@pytest.mark.parametrize("kind,world_size", CASES)
def test_beam_search_matches_one_process_with_its_kv_copies_on_every_rank(run, kind, world_size):
    (got, copied), (want, _) = run(kind, world_size)["beams"], run(kind, 1)["beams"]
    assert got == want and copied > 0


@pytest.mark.parametrize("kind", ["dense", "moge"])
def test_every_rank_decodes_with_its_compiled_step_by_default(run, kind, tiny_dense_dir, tiny_moge_dir):
    """No flags: rank 0 and the worker each build a compiled decode step (the all-reduces inside it),
    every decode step runs compiled on both, and the tokens are one process's. A second start loads
    rank 0's step saved whole (nothing of the driver traced into it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = str({"dense": tiny_dense_dir, "moge": tiny_moge_dir}[kind])
    try:
        for start in range(2):
            llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_memory=1 << 24)
            assert llm.wait_compiled(timeout=540), llm.engine.runner.compile_error
            if start == 0:
                llm.shutdown()
        saved = llm.engine.runner.decode_forward
        assert isinstance(saved, SavedStep) and saved.built == 0 and saved.loaded > 0
        runner = llm.engine.runner
        step, rank0_steps = runner.decode_forward, []
        runner.decode_forward = lambda *inputs: (rank0_steps.append(1), step(*inputs))[1]
        before = llm.parallel.wait_compiled(0)
        greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        after = llm.parallel.wait_compiled(0)
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert greedy == run(kind, 1)["greedy"]
    decode_steps = GREEDY.max_tokens - 1  # (both prompts' decodes share each step)
    assert len(rank0_steps) == decode_steps
    (ready, done_before), = before
    assert ready and after == [(True, done_before + decode_steps)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_moge_ranks_process_equal_token_counts_on_every_layer(run, world_size):
    ranks = run("moge", world_size)["moe_stats"]["ranks"]
    one = run("moge", 1)["moe_stats"]
    assert ranks["world_size"] == world_size
    for layer, counted in enumerate(ranks["rank_tokens"]):
        # Measured on each rank; equal because every token picks one expert in every group.
        assert len(set(counted)) == 1 and counted[0] > 0
        groups = torch.tensor(one["layers"][layer]["group_tokens"])
        assert counted == groups.view(world_size, -1).sum(-1).tolist()
    assert ranks["imbalance_score"] == 0.0
    # Plain top-8 over all 64 experts on the same router probabilities is not balanced.
    assert ranks["global_topk_imbalance_score"] > 0.0
    topk = ranks["global_topk_rank_tokens"]
    assert all(sum(t) == sum(c) for t, c in zip(topk, ranks["rank_tokens"]))


def test_one_process_reports_its_expert_tokens_as_one_rank(run):
    stats = run("moge", 1)["moe_stats"]
    assert stats["ranks"]["rank_tokens"] == [[sum(layer["group_tokens"])] for layer in stats["layers"]]


def test_a_rank_that_fails_to_load_ends_the_launch_with_its_error(tiny_moge_dir, tmp_path):
    # Rank 1 of 2 owns experts 32..63: only it notices that one of them is missing.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_moge_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    gone = "model.layers.1.mlp.experts.63.down_proj.weight"
    del tensors[gone]
    save_file(tensors, broken / "model.safetensors")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pangu_infer.cli", "generate", "--model", str(broken), "--device", "cpu",
         "--dtype", "float32", "--tensor-parallel-size", "2", "--prompt", "hi", "--max-tokens", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert "rank 1 of 2 failed at startup" in proc.stderr
    assert gone in proc.stderr


def test_world_size_that_does_not_divide_the_heads_is_rejected_before_any_process_starts(tiny_dense_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_attention_heads=4"):
        LLM(str(tiny_dense_dir), dtype="float32", device="cpu", tensor_parallel_size=3)


def test_four_ranks_share_each_of_two_kv_heads_between_two_ranks():
    cfg = ModelConfig.from_hf_dict(pangu_dense_config(vocab_size=32))  # 4 heads, 2 KV heads
    shards = [head_shard(cfg, ParallelState(r, 4)) for r in range(4)]
    assert [(s.q_start, s.q_count) for s in shards] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert [(s.kv_start, s.kv_count) for s in shards] == [(0, 1), (0, 1), (1, 1), (1, 1)]


def test_each_rank_keeps_its_slice_of_fused_and_row_parallel_weights():
    cfg = ModelConfig.from_hf_dict(pangu_dense_config(vocab_size=32))  # head_dim 16, MLP 128
    rank1 = WeightSharder(cfg, ParallelState(1, 2))
    q = torch.arange(64 * 64.0).view(64, 64)
    assert torch.equal(rank1.shard("model.layers.0.self_attn.q_proj.weight", q), q[32:64])
    assert torch.equal(rank1.shard("model.layers.0.self_attn.k_proj.bias", torch.arange(32.0)), torch.arange(16.0, 32))
    assert torch.equal(rank1.shard("model.layers.0.self_attn.o_proj.weight", q), q[:, 32:64])
    o_bias = torch.arange(64.0)  # added once after the sum: every rank keeps it whole
    assert torch.equal(rank1.shard("model.layers.0.self_attn.o_proj.bias", o_bias), o_bias)
    up = torch.arange(128 * 64.0).view(128, 64)
    assert torch.equal(rank1.shard("model.layers.0.mlp.up_proj.weight", up), up[64:])
    assert torch.equal(rank1.shard("model.layers.0.mlp.down_proj.weight", up.T), up.T[:, 64:])
    assert not rank1.owns("lm_head.weight")
    assert WeightSharder(cfg, ParallelState(0, 2)).owns("lm_head.weight")
