"""64 concurrent streaming clients against a real server: early disconnects, malformed and hostile requests mixed in.

Every completed stream must equal the same prompt generated alone, every bad request must get a
4xx, nothing a 5xx, and afterwards every KV block is free again. The hostile requests are those
of issue 14 (ids past the vocabulary, huge n / logprobs / max_tokens / stop lists, deep JSON,
invalid UTF-8, prompts over the context): none of them may cost another client anything.
Bounded: 64 clients, 12-20 tokens each, a 120 s budget for the whole burst, loopback only.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time

import httpx
import pytest

from fixtures_server import metric_value, running_server
from pangu_infer import LLM, SamplingParams

NUM_CLIENTS = 64
BURST_BUDGET_S = 120.0
WORDS = "the quick brown fox jumps over lazy dog hello world city weather today 我们 今天 公园 天气 盘古 模型".split()
MALFORMED = [
    ("/v1/completions", "{not json"),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "top_p": 5})),
    ("/v1/completions", json.dumps({"model": "someone-else", "prompt": "hi"})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 100000})),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": []})),
]
CONTEXT = 512
HOSTILE = [
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stop_token_ids": [1000000000], "min_tokens": 2})),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                         "stop_token_ids": [1000000000], "min_tokens": 2, "stream": True})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [5, 10**12, -1]})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [5] * CONTEXT, "max_tokens": 1})),  # exactly the context
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [5] * (CONTEXT + 7), "max_tokens": 1})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "n": 10**9, "stream": True})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "logprobs": 10**9})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 10**30})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stop": ["x"] * 5000})),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stop_token_ids": list(range(5000))})),
    ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xc3\x28 \xff"}]}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "half \\ud800 a pair"}]}'),
]


def _jobs() -> list[dict]:
    rng = random.Random(1234)
    jobs = []
    hostile = 0
    for i in range(NUM_CLIENTS):
        kind = "malformed" if i % 6 == 5 else "hostile" if i % 6 == 2 or i % 12 == 0 else "disconnect" if i % 4 == 3 else "complete"
        hostile += kind == "hostile"
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
        jobs.append({"id": i, "kind": kind, "prompt": prompt, "max_tokens": rng.randint(12, 20),
                     "read_chunks": rng.randint(1, 4), "malformed": MALFORMED[i % len(MALFORMED)],
                     "hostile": HOSTILE[hostile % len(HOSTILE)]})
    return jobs


@pytest.fixture(scope="module")
def loaded_server(tiny_dense_dir, tmp_path_factory):
    """(server, alone-texts): references are generated in-process while the server process starts."""
    jobs = _jobs()
    alone: dict[int, str] = {}

    def reference() -> None:
        llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
        for job in jobs:
            if job["kind"] == "complete":
                params = SamplingParams(temperature=0, max_tokens=job["max_tokens"])
                alone[job["id"]] = llm.generate(job["prompt"], params, use_tqdm=False)[0].outputs[0].text

    worker = threading.Thread(target=reference)
    worker.start()
    with running_server(
        tiny_dense_dir, "--max-num-seqs", "64", "--max-model-len", str(CONTEXT), "--kv-cache-memory", "8MiB",
        "--served-model-name", "tiny", log_dir=tmp_path_factory.mktemp("load_logs"),
    ) as server:
        worker.join()
        yield server, jobs, alone


async def _client(http: httpx.AsyncClient, url: str, job: dict) -> dict:
    start = time.perf_counter()
    if job["kind"] in ("malformed", "hostile"):
        path, body = job[job["kind"]]
        response = await http.post(url + path, content=body, headers={"Content-Type": "application/json"})
        return {**job, "status": response.status_code}
    body = {"model": "tiny", "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0, "stream": True}
    text, chunks, ttft = "", 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {**job, "status": response.status_code, "error": (await response.aread()).decode()}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ttft = ttft if ttft is not None else time.perf_counter() - start
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
            if job["kind"] == "disconnect" and chunks >= job["read_chunks"]:
                break  # leaving the block closes the connection mid-stream
    return {**job, "status": 200, "text": text, "ttft": ttft, "seconds": time.perf_counter() - start}


def test_64_streaming_clients_with_disconnects_and_bad_requests(loaded_server):
    server, jobs, alone = loaded_server

    async def burst():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(_client(http, server.url, j) for j in jobs)), BURST_BUDGET_S)

    start = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - start

    complete = [r for r in results if r["kind"] == "complete"]
    for r in complete:
        assert r["status"] == 200, r
        assert r["text"] == alone[r["id"]], f"client {r['id']}: streamed text differs from the prompt run alone"
    for r in results:
        if r["kind"] in ("malformed", "hostile"):
            assert 400 <= r["status"] < 500, r
        assert r["status"] < 500, r

    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        used = metric_value(metrics, "pangu_kv_cache_blocks_used")
        if used == 0 and metric_value(metrics, "pangu_running_sequences") == 0:
            break
        assert time.monotonic() < deadline, f"{used} KV blocks still in use 30 s after the burst"
        time.sleep(0.2)
    server_errors = sum(
        metric_value(metrics, "pangu_http_requests_total", endpoint=e, status=s)
        for e in ("/v1/completions", "/v1/chat/completions") for s in ("500", "502", "503")
        if f'endpoint="{e}",status="{s}"' in metrics
    )
    assert server_errors == 0

    ttfts = sorted(r["ttft"] for r in complete)
    tokens = metric_value(metrics, "pangu_generation_tokens_total")
    print(
        f"\n[server load] {NUM_CLIENTS} clients in {wall:.2f} s: {len(complete)} completed (all equal to alone), "
        f"{sum(r['kind'] == 'disconnect' for r in results)} disconnected early, "
        f"{sum(r['kind'] in ('malformed', 'hostile') for r in results)} malformed or hostile -> 4xx, 0 5xx; "
        f"{tokens:.0f} tokens generated ({tokens / wall:.0f} tok/s); client TTFT p50 {statistics.median(ttfts) * 1e3:.0f} ms, "
        f"max {ttfts[-1] * 1e3:.0f} ms; KV blocks used after: 0 of {metric_value(metrics, 'pangu_kv_cache_blocks_total'):.0f}"
    )
