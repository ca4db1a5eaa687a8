"""Speculative decoding with a draft model under tensor parallelism (2 CPU ranks over gloo): the
draft runs whole on rank 0 (vLLM's draft_tensor_parallel_size=1), the target's verifying forwards
(several rows per drafted sequence) are mirrored on every rank. The reference is one process
without a draft (test_parallel.py shows 2 ranks without a draft write the same).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fixtures_models import add_mlp_noise

from pangu_infer import LLM, SamplingParams

PROMPTS = [
    {"prompt_token_ids": [5, 17, 300, 42, 9, 120, 77, 8, 64, 900] * 3},
    {"prompt_token_ids": [11, 12, 13]},
    {"prompt_token_ids": list(range(100, 190))},  # several prefill chunks at max_num_batched_tokens=32
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=3, ignore_eos=True)
KW = dict(dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 24, enforce_eager=True)


def _noisy_twin(source: Path, directory: Path) -> Path:
    """`source`'s weights with noise on its MLPs: a draft that agrees with the target often, not always."""
    shutil.copytree(source, directory)
    return add_mlp_noise(directory)


def _tokens(llm: LLM, params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("kind", ["dense", "moge"])
def test_two_ranks_with_a_draft_model_write_one_process_greedy_text(kind, tiny_dense_dir, tiny_moge_dir, tmp_path):
    """A draft that is sometimes right (accepted and rejected drafts alike, through chunked
    prefills): the greedy tokens and the seeded sampled ones are one process's without a draft.
    A draft refused at load stops the started workers: the next tensor-parallel start in this
    process works."""
    target = {"dense": tiny_dense_dir, "moge": tiny_moge_dir}[kind]
    draft = _noisy_twin(target, tmp_path / "draft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned rank copies this
    try:
        plain = LLM(str(target), **KW)
        want = _tokens(plain, GREEDY)
        want_sampled = _tokens(plain, SAMPLED)
        del plain
        short = tmp_path / "short"  # a draft of a shorter context than the target's: refused once loaded
        shutil.copytree(draft, short)
        config = json.loads((short / "config.json").read_text())
        (short / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=64)))
        with pytest.raises(ValueError, match=r"context \(64 tokens\) is shorter"):
            LLM(str(target), tensor_parallel_size=2, speculative_model=str(short), **KW)
        assert not dist.is_initialized()
        llm = LLM(str(target), tensor_parallel_size=2, speculative_config={
            "model": str(draft), "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}, **KW)
        got = _tokens(llm, GREEDY)
        stats = llm.engine.stats()
        got_sampled = _tokens(llm, SAMPLED)
        draft_ranks = llm.engine.speculator.model.parallel.world_size
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert 0.1 < stats["spec_acceptance_rate"] < 1.0, stats
    assert got_sampled == want_sampled and all(len(t) == SAMPLED.max_tokens for t in got_sampled)
    assert draft_ranks == 1  # whole, on rank 0
