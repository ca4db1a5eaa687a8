"""The KV cache in bfloat16 against float32, for a model that computes in float32 (the default
dtype on CPUs without native bf16 products, where the default cache is now bfloat16).

The demo model (SmolLM2-135M-Instruct, its GGUF's int4 weights as loaded by default, float32
activations), loaded twice in one process: `kv_cache_dtype="float32"` (the peer) and "bfloat16".

    tokens      KV cache tokens in the default budget (4 GiB or a quarter of free memory on CPU);
    perplexity  of --ppl-tokens tokens of real text (this repository's docs/design.md), scored in
                prefill chunks of 256 tokens so that every chunk attends to the earlier ones
                through the cache;
    decode      tokens/s of one greedy request after a --context-token prompt, and of 8 at once
                after prompts of half that (compiled decode steps, medians of interleaved rounds).

Usage:
    .venv/bin/python benchmarks/kv_cache_dtype.py [--rounds 3] [--threads 2] [--context 2048]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.loader import demo_model_path  # noqa: E402


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [e.logprob for e in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def decode_rate(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    """Decode tokens/s of the prompts at once, from the step where every one has its first token."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"kv-{time.monotonic_ns()}-{i}", p, params)
    counts: dict[str, int] = {}
    start = None
    after = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        if start is None and len(counts) == len(prompts):
            start, after = time.perf_counter(), sum(counts.values())
    return (sum(counts.values()) - after) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_path()
    engines = {
        kv: LLM(path, dtype="float32", kv_cache_dtype=kv, max_num_batched_tokens=256, max_model_len=8192)
        for kv in ("float32", "bfloat16")
    }
    for llm in engines.values():
        llm.wait_compiled()
    tok = engines["float32"].tokenizer
    text = (ROOT / "docs" / "design.md").read_text()
    ids = tok.encode(text, add_special_tokens=False)[: args.ppl_tokens]
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(100, 40000, (args.context,), generator=g).tolist()
    half = [torch.randint(100, 40000, (args.context // 2,), generator=g).tolist() for _ in range(8)]
    rows: dict[str, dict[str, list[float]]] = {kv: {"ppl": [], "decode": [], "8-way": []} for kv in engines}
    for r in range(args.rounds):
        for kv, llm in engines.items():
            if r == 0:
                rows[kv]["ppl"].append(perplexity(llm, ids))
            # fresh prompts each round: the prefix cache serves neither
            rows[kv]["decode"].append(decode_rate(llm, [[r + 1] + long_prompt[1:]], args.decode_tokens))
            rows[kv]["8-way"].append(decode_rate(llm, [[r + 1] + p[1:] for p in half], args.decode_tokens))
    med = {kv: {k: statistics.median(v) for k, v in d.items()} for kv, d in rows.items()}
    f32, bf = med["float32"], med["bfloat16"]
    print(f"{args.threads} threads, demo model (int4 weights, float32 activations), median of {args.rounds} interleaved rounds")
    print("| KV cache | tokens in the default budget | perplexity (design.md, %d tokens) | decode tok/s at %d | 8-way tok/s at %d |"
          % (len(ids), args.context, args.context // 2))
    print("|---|---|---|---|---|")
    for kv, llm in engines.items():
        pool = llm.engine.pool
        m = med[kv]
        print(f"| {kv} | {pool.num_blocks * pool.block_size} | {m['ppl']:.4f} | {m['decode']:.1f} | {m['8-way']:.1f} |")
    print(f"bfloat16 / float32: perplexity {bf['ppl'] / f32['ppl'] - 1:+.3%}, decode {bf['decode'] / f32['decode']:.2f}x, "
          f"8-way {bf['8-way'] / f32['8-way']:.2f}x")


if __name__ == "__main__":
    main()
