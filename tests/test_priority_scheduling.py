"""Priority scheduling as vLLM's `--scheduling-policy priority`: waiting requests run by
(priority, arrival), lower first; when KV blocks run out the running request of lowest priority
(the newest among equals) is preempted, not simply the newest; tokens are what they would be alone."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine, RequestError
from pangu_infer.engine.kv_cache import BlockPool
from pangu_infer.engine.scheduler import Scheduler
from pangu_infer.engine.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _seq(seq_id: int, priority: int, prompt_len: int) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, list(range(3, 3 + prompt_len)), GREEDY, None, None)
    seq.priority = priority
    return seq


def _decode_step(sched: Scheduler) -> None:
    """What a step does to the scheduled sequences: one more token each."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            seq.output_token_ids.append(7)


def test_waiting_requests_run_by_priority_then_arrival():
    sched = Scheduler(BlockPool(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy="priority")
    seqs = [_seq(i, p, 4) for i, p in enumerate([2, 0, 1, 0])]
    for s in seqs:
        sched.add(s)
    order = []
    for _ in seqs:
        batch = sched.schedule()
        order.append(batch.seqs[0].seq_id)
        sched.finish(batch.seqs[0])
    assert order == [1, 3, 2, 0]
    fcfs = Scheduler(BlockPool(64, 4), max_num_seqs=1, max_num_batched_tokens=64)
    for s in [_seq(i, 0, 4) for i in range(3)]:
        fcfs.add(s)
    assert [s.seq_id for s in fcfs.waiting] == [0, 1, 2]


@pytest.mark.parametrize("policy,victim", [("priority", 0), ("fcfs", 2)])
def test_the_lowest_priority_running_request_gives_its_blocks_back(policy, victim):
    # Request 0 (priority 5) runs first; 1 (priority 0) and 2 (priority 1) arrive after it. Each
    # prompt fills one block of 4; the pool's 2 free blocks cannot take all three next tokens.
    sched = Scheduler(BlockPool(5, 4), max_num_seqs=3, max_num_batched_tokens=64, policy=policy)
    seqs = [_seq(0, 5, 4), _seq(1, 0, 4), _seq(2, 1, 4)]
    sched.add(seqs[0])
    _decode_step(sched)
    sched.add(seqs[1])
    sched.add(seqs[2])
    _decode_step(sched)
    assert sched.running == seqs
    batch = sched.schedule()
    # priority: the oldest, of the lowest priority, although it was scheduled first; fcfs: the newest
    assert [s.seq_id for s in batch.preempted] == [victim]
    assert seqs[victim].status is SequenceStatus.WAITING and seqs[victim] not in batch.seqs
    assert sorted(s.seq_id for s in batch.seqs) == sorted({0, 1, 2} - {victim})
    assert batch.total_tokens == 2


def test_a_victim_already_scheduled_in_the_step_leaves_the_batch():
    # The oldest running request has the lowest priority: it is scheduled first, then the next
    # one finds no block and takes the oldest's blocks, so the oldest leaves the batch again.
    sched = Scheduler(BlockPool(3, 4), max_num_seqs=2, max_num_batched_tokens=64, policy="priority")
    low, high = _seq(0, 9, 4), _seq(1, 0, 4)
    sched.add(low)
    sched.add(high)
    assert [s.seq_id for s in sched.waiting] == [1, 0]
    _decode_step(sched)
    assert sched.running == [high, low]
    low.token_ids.append(7)  # the lower one is now longer: it needs its new block first
    sched.running.reverse()  # oldest first, as a request admitted before the other would be
    batch = sched.schedule()
    assert batch.seqs == [high] and batch.num_tokens == [1]
    assert batch.preempted == [low] and list(sched.waiting) == [low]
    assert sched.pool.num_free_blocks == 3 - len(high.block_table)


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=8 << 20, enforce_eager=True)


def _engine(llm: LLM, **kwargs) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(enforce_eager=True, **kwargs), llm.generation_config)


def _prompts(llm: LLM, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, llm.config.vocab_size, (length,), generator=g).tolist() for _ in range(count)]


def test_an_engine_starts_requests_in_priority_order(llm):
    prompts = _prompts(llm, 4, 12)
    priorities = [3, -1, 2, 0]
    for policy, want in (("priority", ["1", "3", "2", "0"]), ("fcfs", ["0", "1", "2", "3"])):
        engine = _engine(llm, max_num_seqs=1, kv_cache_memory=8 << 20, scheduling_policy=policy)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, GREEDY, priority=priorities[i] if policy == "priority" else 0)
        started = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id not in started:
                    started.append(out.request_id)
        assert started == want, policy


def test_preempted_by_priority_the_tokens_are_those_of_each_prompt_alone(llm):
    # 45 prompt tokens fill 3 blocks of 16, and the 4th generated token needs a 4th block: with
    # 7 blocks in all, two requests run and one of them is preempted on the way.
    prompts = _prompts(llm, 8, 45)
    alone = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
    per_token = llm.config.kv_bytes_per_token(torch.float32)
    engine = _engine(llm, max_num_seqs=8, kv_cache_memory=per_token * 16 * 7, block_size=16, scheduling_policy="priority")
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, GREEDY, priority=i % 3)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    assert [final[str(i)] for i in range(len(prompts))] == alone
    assert engine.stats()["num_preemptions"] > 0


def test_llm_generate_takes_one_priority_per_prompt(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True,
              scheduling_policy="priority", max_num_seqs=1)
    prompts = [{"prompt_token_ids": p} for p in _prompts(llm, 3, 6)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, priority=[5, 0, 1])
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6, 6]
    ttft = [o.metrics["ttft"] for o in outs]  # all arrived together: the order they started in
    assert ttft[1] < ttft[2] < ttft[0]
    with pytest.raises(ValueError, match=r"priority=\[0\] must be a list of integers, one per prompt \(3\)"):
        llm.generate(prompts, GREEDY, use_tqdm=False, priority=[0])


def test_a_priority_needs_the_priority_policy_and_an_integer(llm):
    with pytest.raises(RequestError, match=r"priority=2 needs priority scheduling.*--scheduling-policy priority") as e:
        llm.generate([{"prompt_token_ids": [5, 6]}], GREEDY, use_tqdm=False, priority=[2])
    assert e.value.param == "priority"
    engine = _engine(llm, kv_cache_memory=4 << 20, scheduling_policy="priority")
    for bad in (True, 1.5, "1", None):
        with pytest.raises(RequestError, match="must be an integer"):
            engine.add_request("x", [5, 6], GREEDY, priority=bad)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match=r"scheduling_policy='lifo' must be one of fcfs, priority"):
        EngineConfig(scheduling_policy="lifo")


def test_the_server_takes_a_priority_only_under_the_priority_policy(llm, tiny_dense_dir):
    from fastapi.testclient import TestClient

    from pangu_infer.server.app import create_app

    body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 2, "priority": 3}
    with TestClient(create_app(llm, served_model_name="m")) as http:  # fcfs
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        assert "--scheduling-policy priority" in r.json()["error"]["message"]
        assert http.post("/v1/completions", json={**body, "priority": 0}).status_code == 200
    ranked = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True,
                 scheduling_policy="priority")
    with TestClient(create_app(ranked, served_model_name="m")) as http:
        assert http.post("/v1/completions", json=body).status_code == 200
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2, "priority": -2})
        assert r.status_code == 200
        assert http.post("/v1/completions", json={**body, "priority": "high"}).status_code == 400
