"""batch_invariant=True under tensor parallelism: every rank's products are row-tiled and its
attention per query (models/batch_invariant.py), and the ranks' partial sums are added in rank
order (ParallelState.ordered_sums), so a prompt's reply and logprobs are bitwise the same alone
or in a batch, as test_batch_invariant.py checks in one process.

4 ranks: with 2, a ring all-reduce adds an element's two partials as a + b or b + a, the same
bits, so only more ranks show the ring's batch-dependent order (checked by hand: with 2 ranks
and the ordered sums off, nothing differed).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer import LLM
from pangu_infer.models.batch_invariant import RowTiledLinear, make_batch_invariant
from pangu_infer.parallel.state import ParallelState, RowParallelLinear, RowParallelProduct
from test_batch_invariant import PARAMS, SEEDED, _alone, _mixed, _prompts


def test_four_ranks_answer_a_prompt_alone_as_in_a_batch(tiny_dense_dir):
    """Greedy and seeded sampled prompts (logprobs included), alone and then arriving at random
    steps among the others with prefix-cache hits: bitwise equal. With the ranks' partials
    reduced by gloo's all-reduce instead, every prompt differed (bf16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned ranks copy this: 4 ranks on the test machine's cores
    try:
        llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", enforce_eager=True, batch_invariant=True,
                  max_num_seqs=16, tensor_parallel_size=4, kv_cache_memory=1 << 24)
        prompts = _prompts(8, seed=6)
        params = [SEEDED if i % 5 == 1 else PARAMS for i in range(len(prompts))]
        alone = [_alone(llm.engine, p, sp, f"alone-{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
        got = _mixed(llm.engine, prompts, params, random.Random(3), "mix")
        ordered, hits = llm.model.parallel.ordered_sums, llm.engine.pool.prefix_hits
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert ordered and hits > 0
    assert [i for i, (g, a) in enumerate(zip(got, alone)) if g != a] == []


def test_the_mode_tiles_a_row_parallel_product_outside_its_reduction():
    """A rank's o_proj / down_proj (RowParallelLinear: its own F.linear, then the all-reduce) gets
    its product row-tiled like one process's nn.Linear, the same weight, the bias still added once."""
    state = ParallelState(0, 2)
    model = nn.Module()
    model.parallel = state
    model.o_proj = RowParallelLinear(32, 16, True, state, reduce=False)  # reduce=False: no process group here
    weight, bias = model.o_proj.weight, model.o_proj.bias
    make_batch_invariant(model, torch.float32)
    proj = model.o_proj
    assert isinstance(proj, RowParallelProduct) and isinstance(proj.product, RowTiledLinear)
    assert proj.product.inner.weight is weight and proj.bias is bias and proj.product.inner.bias is None
    assert state.ordered_sums
    x = torch.randn(5, 32)
    torch.testing.assert_close(proj(x), F.linear(x, weight, bias))
