"""What the HTTP server costs: the same batch through `pangu-infer serve` vs the AsyncEngine it runs on.

Each round runs N greedy prompts of --max-tokens tokens (ignore_eos, so every run generates the
same count) three ways, one after the other, so all see the same machine load:
  1. AsyncEngine in this process: N concurrent `generate` streams, no HTTP (the server's engine path);
  2. N concurrent streaming HTTP clients against a `pangu-infer serve` process on the same model;
  3. LLM.generate in this process's main thread, all prompts in one call.
The HTTP/AsyncEngine ratio is the server's overhead (HTTP, JSON, SSE, one extra process hop).
Also printed: client-side time to first token, and whether the streamed texts equal LLM.generate's.

    .venv/bin/python benchmarks/serve_overhead.py              # the demo model (SmolLM2-135M Q4_1 GGUF)
    .venv/bin/python benchmarks/serve_overhead.py --model DIR --clients 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.async_engine import AsyncEngine

WORDS = "the quick brown fox jumps over the lazy dog while a large language model answers every question".split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(4 + i % 9)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, ttft, text, tokens = time.perf_counter(), None, "", 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text += chunk["choices"][0]["text"]
            else:
                tokens = chunk["usage"]["completion_tokens"]
    return text, ttft, tokens


async def engine_burst(engine: AsyncEngine, llm: LLM, batch: list[str], params: SamplingParams, tag: str) -> int:
    async def one(i: int, prompt: str) -> int:
        n = 0
        async for out in engine.generate(llm.tokenizer.encode(prompt), params, f"{tag}-{i}"):
            n += len(out.outputs[0].token_ids_delta)
        return n

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(batch))))


async def http_burst(url: str, batch: list[str], max_tokens: int):
    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await asyncio.gather(*(one_client(http, url, p, max_tokens) for p in batch))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    batch = prompts(args.clients)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm = LLM(args.model, dtype=args.dtype)
    llm.wait_compiled()  # both sides decode with the compiled step (it builds in the background)
    llm.generate(batch[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    engine_llm = LLM(args.model, dtype=args.dtype)
    engine_llm.wait_compiled()
    engine = AsyncEngine.from_llm(engine_llm)
    asyncio.run(engine_burst(engine, engine_llm, batch[:2], SamplingParams(temperature=0, max_tokens=4), "warm"))

    port = free_port()
    cmd = [sys.executable, "-m", "pangu_infer.cli", "serve", "--port", str(port), "--dtype", args.dtype]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"pangu-infer serve did not start: {' '.join(cmd)}")
            time.sleep(0.5)
        asyncio.run(http_burst(url, batch[:2], 4))  # warm-up

        rows = []
        for r in range(args.rounds):
            start = time.perf_counter()
            engine_tokens = asyncio.run(engine_burst(engine, engine_llm, batch, params, f"r{r}"))
            t_engine = time.perf_counter() - start

            start = time.perf_counter()
            results = asyncio.run(http_burst(url, batch, args.max_tokens))
            t_http = time.perf_counter() - start
            http_tokens = sum(t for _, _, t in results)
            ttfts = sorted(t for _, t, _ in results)

            start = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            t_llm = time.perf_counter() - start
            llm_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            same = sum(text == o.outputs[0].text for (text, _, _), o in zip(results, outs))
            rows.append((r, engine_tokens / t_engine, http_tokens / t_http, llm_tokens / t_llm,
                         statistics.median(ttfts), ttfts[-1], same))
    finally:
        server.terminate()
        server.wait(30)
        engine.shutdown()

    print(f"model: {llm.loaded.source}  clients: {args.clients}  max_tokens: {args.max_tokens}  dtype: {llm.dtype}")
    print(f"{'round':>5} {'AsyncEngine tok/s':>18} {'HTTP tok/s':>11} {'HTTP/AsyncEngine':>17} {'LLM.generate tok/s':>19}"
          f" {'HTTP TTFT p50 ms':>17} {'max ms':>7} {'same text':>10}")
    for r, a, b, c, p50, mx, same in rows:
        print(f"{r:>5} {a:>18.1f} {b:>11.1f} {b / a:>17.2f} {c:>19.1f} {p50 * 1e3:>17.0f} {mx * 1e3:>7.0f} {same:>7}/{args.clients}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
