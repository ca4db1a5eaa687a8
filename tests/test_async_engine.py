"""AsyncEngine: concurrent asyncio callers over one LLMEngine thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

import pytest

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.async_engine import AsyncEngine
from pangu_infer.engine.engine import RequestError

PROMPTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "我们今天去公园散步",
    "tell me about the weather in the city today please",
    "盘古 大模型",
    "how fast is the inference engine",
]


@pytest.fixture(scope="module")
def reference_llm(tiny_dense_dir) -> LLM:
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def async_engine(tiny_dense_dir):
    engine = AsyncEngine.from_llm(LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True))
    yield engine
    engine.shutdown()


def _ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text)


async def _collect(engine: AsyncEngine, ids: list[int], params: SamplingParams, rid: str):
    """(final output, concatenated text deltas per completion, concatenated token deltas)."""
    texts: dict[int, str] = {}
    tokens: dict[int, list[int]] = {}
    final = None
    async for out in engine.generate(ids, params, rid):
        for c in out.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text_delta
            tokens.setdefault(c.index, []).extend(c.token_ids_delta)
        final = out
    return final, texts, tokens


def test_concurrent_requests_equal_running_each_alone(async_engine, reference_llm):
    params = [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=7, stop=["e"]),
        SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=10, n=2),
    ]
    jobs = [(i, p, params[i % len(params)]) for i, p in enumerate(PROMPTS)]
    alone = {i: reference_llm.generate(p, sp, use_tqdm=False)[0] for i, p, sp in jobs}

    async def main():
        return await asyncio.gather(*(_collect(async_engine, _ids(reference_llm, p), sp, f"c{i}") for i, p, sp in jobs))

    results = asyncio.run(main())
    for (i, _, _), (final, texts, tokens) in zip(jobs, results):
        assert final.finished
        for ref, got in zip(alone[i].outputs, final.outputs):
            assert got.token_ids == ref.token_ids
            assert got.text == ref.text
            assert texts[got.index] == ref.text  # the deltas add up to the whole text
            assert tokens[got.index] == ref.token_ids
            assert got.finish_reason == ref.finish_reason


def test_streamed_outputs_are_incremental_and_end_with_finished(async_engine, reference_llm):
    async def main():
        return [out async for out in async_engine.generate(_ids(reference_llm, "hello"), SamplingParams(temperature=0, max_tokens=5), "inc")]

    outs = asyncio.run(main())
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert sum(len(o.outputs[0].token_ids_delta) for o in outs) == 5
    assert outs[-1].outputs[0].finish_reason == "length"


def test_abort_mid_stream_frees_all_kv_blocks(async_engine, reference_llm):
    long = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)

    async def main():
        ids = _ids(reference_llm, PROMPTS[1])
        # 1) explicit abort while streaming
        gen = async_engine.generate(ids, long, "a1")
        first = await gen.__anext__()
        assert not first.finished
        await async_engine.abort("a1")
        # 2) the consumer stops iterating (what a disconnected HTTP client does)
        async with contextlib.aclosing(async_engine.generate(ids, long, "a2")) as gen2:
            async for _ in gen2:
                break
        # 3) the consuming task is cancelled
        async def consume():
            async for _ in async_engine.generate(ids, long, "a3"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await async_engine.stats()

    stats = asyncio.run(main())
    assert stats["kv_blocks_used"] == 0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not async_engine.engine.has_unfinished_requests()


def test_request_error_reaches_the_caller_and_the_loop_keeps_serving(async_engine, reference_llm):
    async def main():
        with pytest.raises(RequestError, match="context"):
            await _collect(async_engine, [5] * 100, SamplingParams(max_tokens=5000), "too-long")
        with pytest.raises(RequestError, match="outside the vocabulary"):
            await _collect(async_engine, [10**6], SamplingParams(max_tokens=2), "bad-id")
        return await _collect(async_engine, _ids(reference_llm, "hello"), SamplingParams(temperature=0, max_tokens=3), "ok")

    final, _, _ = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 3
    assert async_engine.is_running


def test_duplicate_request_id_is_rejected_without_aborting_the_first(async_engine, reference_llm):
    async def main():
        ids = _ids(reference_llm, "hello")
        # long enough to still be running when the duplicate arrives, however slow this machine is
        first = async_engine.generate(ids, SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True), "dup")
        seen = len((await first.__anext__()).outputs[0].token_ids)
        with pytest.raises(RequestError, match="already in use"):
            await _collect(async_engine, ids, SamplingParams(max_tokens=2), "dup")
        later = await first.__anext__()
        await first.aclose()
        return seen, later, await async_engine.stats()

    seen, later, stats = asyncio.run(main())
    assert len(later.outputs[0].token_ids) > seen and later.outputs[0].finish_reason is None
    assert stats["kv_blocks_used"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the thread's CPU time from /proc")
def test_idle_engine_thread_sleeps(async_engine):
    tid = async_engine._thread.native_id

    def cpu_seconds() -> float:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    before = cpu_seconds()
    time.sleep(0.5)
    assert cpu_seconds() - before < 0.05


def test_moe_stats_are_read_on_the_engine_thread(tiny_moge_dir):
    import threading

    llm = LLM(str(tiny_moge_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    engine = AsyncEngine.from_llm(llm)
    readers = []
    read = llm.model.moe_stats
    llm.model.moe_stats = lambda: readers.append(threading.current_thread()) or read()
    try:

        async def main():
            await _collect(engine, [1, 50, 60, 70], SamplingParams(temperature=0, max_tokens=4), "m")
            return await engine.moe_stats()

        stats = asyncio.run(main())
    finally:
        engine.shutdown()
    assert readers == [engine._thread]  # between steps, never beside a running forward
    assert stats["num_groups"] == 8
    # one expert per group per token: 4 prompt tokens and the 3 generated tokens fed back
    assert stats["layers"][0]["group_tokens"] == [7] * 8
    assert stats["imbalance_score"][8] == 0


def test_shutdown_fails_waiting_callers_instead_of_hanging(tiny_dense_dir):
    engine = AsyncEngine.from_llm(LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True))
    engine.shutdown()

    async def main():
        with pytest.raises(RuntimeError, match="stopped"):
            await engine.stats()

    asyncio.run(main())


def test_llm_generate_beside_a_running_server_goes_through_its_thread(tiny_dense_dir, reference_llm):
    """LLM.generate/chat on an LLM whose engine a server (AsyncEngine) drives: the engine is stepped
    by one thread only. Stepped from both, each thread took the other's outputs (a request that
    never finished for its caller: a test here hung until pytest's timeout) or corrupted the
    scheduler."""
    import threading

    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    engine = AsyncEngine.from_llm(llm)
    try:
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=8)
        served: list = []
        started = threading.Event()

        async def serve_one():
            async for out in engine.generate(_ids(llm, PROMPTS[0]), long, "served"):
                started.set()
                final = out
            served.append(final)

        server = threading.Thread(target=lambda: asyncio.run(serve_one()), daemon=True)
        server.start()
        assert started.wait(60)
        got: list = []
        caller = threading.Thread(target=lambda: got.append(llm.generate(PROMPTS[1:4], short, use_tqdm=False)), daemon=True)
        caller.start()
        caller.join(120)
        assert not caller.is_alive(), "LLM.generate beside the running server never returned"
        server.join(120)
        (outs,) = got
        alone = reference_llm.generate(PROMPTS[1:4], short, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]
        assert all(o.finished for o in outs)
        assert len(served) == 1 and len(served[0].outputs[0].token_ids) == 200
        # A bad request through the server's thread: the caller's ValueError, naming the prompt.
        with pytest.raises(RequestError, match="prompt 1"):
            llm.generate(["hello", "hi"], [short, SamplingParams(max_tokens=10**7)], use_tqdm=False)
        assert llm.generate("hello", short, use_tqdm=False)[0].finished
        with pytest.raises(RuntimeError, match="running server"):
            next(iter(llm.stream("hello", short)))
    finally:
        engine.shutdown()
    assert engine.engine.driver is None
    assert llm.generate("hello", short, use_tqdm=False)[0].finished  # stepped directly again
