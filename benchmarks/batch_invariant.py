"""Batch-invariant decoding (`--batch-invariant`) on the demo model (SmolLM2-135M-Instruct Q4_1 GGUF, bf16):

    --sources   what varies with the batch, measured one source at a time:
                (a) the model's own linear modules at the row counts the engine uses (row i of an
                    M-row product against the row alone);
                (b) the default attention paths for the same query: one-sequence unmasked SDPA,
                    batched masked products, prefill SDPA;
                (c) end to end, 64 greedy chat replies under 16-way load against alone, eager,
                    with each fix on by itself: none, attention, row-tiled linears, block-aligned
                    prefill chunks, all (= batch_invariant).
    --target    greedy chat replies under 16-way load equal alone: mismatches out of 64, the
                default path against batch_invariant (the issue's target: 64/64 equal).
    --speed     decode tokens/s (one sequence), 16-way throughput (16 requests at once) and the
                prefill of one long prompt (--prefill-tokens, a new prompt each round so the prefix
                cache never hits), default against batch_invariant, in interleaved rounds; medians
                and ratios.

Usage:
    .venv/bin/python benchmarks/batch_invariant.py --sources --target --speed [--enforce-eager] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from pangu_infer.models import batch_invariant as bi  # noqa: E402

TOPICS = ["the ocean", "a city at night", "autumn leaves", "a lost key", "the moon", "coffee", "a library",
          "mountains", "friendship", "a storm", "trains", "the desert", "music", "a garden", "snow", "time"]
TEMPLATES = ["Write a poem about {}.", "Explain {} to a child in one paragraph.",
             "Give three facts about {}.", "Write a short story that starts with {}."]
PROMPTS = [t.format(x) for t in TEMPLATES for x in TOPICS]  # 64


def chat_ids(llm: LLM, prompt: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def run_alone(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[tuple]:
    out = []
    for i, p in enumerate(prompts):
        engine.add_request(f"alone-{time.monotonic_ns()}-{i}", p, params)
        final = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                final = o if o.finished else final
        out.append(tuple(final.outputs[0].token_ids))
    return out


def run_loaded(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> list[tuple]:
    """`concurrency` clients: each sends its next request as soon as its last one finished."""
    queue = list(enumerate(prompts))[::-1]
    results: dict[int, tuple] = {}
    tag = time.monotonic_ns()
    while queue:
        while queue and len(engine.requests) < concurrency:
            i, p = queue.pop()
            engine.add_request(f"load-{tag}-{i}", p, params)
        for o in engine.step():
            if o.finished:
                results[int(o.request_id.rsplit("-", 1)[1])] = tuple(o.outputs[0].token_ids)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                results[int(o.request_id.rsplit("-", 1)[1])] = tuple(o.outputs[0].token_ids)
    return [results[i] for i in range(len(prompts))]


def mismatches(engine: LLMEngine, prompts, params, concurrency=16) -> int:
    alone = run_alone(engine, prompts, params)
    loaded = run_loaded(engine, prompts, params, concurrency)
    return sum(a != b for a, b in zip(alone, loaded))


def engine_for(llm: LLM, batch_invariant: bool, enforce_eager: bool) -> LLMEngine:
    cfg = EngineConfig(max_num_seqs=64, enforce_eager=enforce_eager, batch_invariant=batch_invariant, kv_cache_memory=1 << 30)
    engine = LLMEngine(llm.model, llm.tokenizer, cfg, llm.generation_config)
    engine.runner.wait_compiled()  # measure the compiled step, not the eager one used while it builds
    return engine


def sources(args) -> None:
    print("## (a) linear modules of the model: row counts where row i differs from the row alone")
    llm = LLM(dtype="bfloat16", device="cpu", enforce_eager=True)
    seen = set()
    for name, m in llm.model.named_modules():
        sizes = bi.linear_sizes(m)
        kind = (type(m).__name__, sizes)
        if sizes is None or kind in seen:
            continue
        seen.add(kind)
        x = torch.randn(512, sizes[0], generator=torch.Generator().manual_seed(0)).bfloat16()
        with torch.inference_mode():
            alone = torch.cat([m(x[i : i + 1]) for i in range(x.shape[0])])
            bad = [r for r in (2, 3, 4, 8, 9, 16, 17, 32, 33, 64, 128, 256, 512) if not torch.equal(m(x[:r]), alone[:r])]
        print(f"  {type(m).__name__} {sizes[0]}->{sizes[1]} ({name}): varies at M = {bad or 'none'}")
    print("## (b) default attention paths, one query, the same keys")
    attn = llm.model.model.layers[0].self_attn
    torch.manual_seed(0)
    hkv, d, h = attn.num_kv_heads, attn.head_dim, attn.num_heads
    for ctx in (40, 200, 700):
        keys = torch.randn(1, hkv, ctx, d).bfloat16()
        vals = torch.randn(1, hkv, ctx, d).bfloat16()
        q = torch.randn(1, h, d).bfloat16()
        alone = attn._decode_attention_unmasked(q, keys, vals)
        pad = 64
        kp = torch.cat((keys, keys[:, :, :1].expand(1, hkv, pad, d)), 2)
        vp = torch.cat((vals, vals[:, :, :1].expand(1, hkv, pad, d)), 2)
        mask = (torch.arange(ctx + pad) < ctx).view(1, 1, 1, -1)
        batched = attn._decode_attention(q, kp, vp, mask)
        full_q = torch.randn(ctx, h, d).bfloat16()
        full_q[-1] = q[0]
        pre = attn._sdpa(full_q, keys[0].transpose(0, 1), vals[0].transpose(0, 1), mask=None, causal=True)[-1:]
        print(f"  context {ctx}: unmasked-SDPA vs batched-masked equal: {torch.equal(alone, batched)}, "
              f"vs prefill SDPA equal: {torch.equal(alone, pre)}; max |diff| {float((alone.float() - batched.float()).abs().max()):.2e}")
    print("## (c) end to end, eager: greedy chat replies under 16-way load that differ from alone (of 64)")
    prompts = [chat_ids(llm, p) for p in PROMPTS[: args.num_prompts]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for label in ("none", "attention", "linears", "chunks", "all"):
        m = LLM(dtype="bfloat16", device="cpu", enforce_eager=True)
        if label in ("linears", "all"):
            bi.make_batch_invariant(m.model)
        eng = engine_for(m, False, True)
        if label in ("attention", "all"):
            eng.runner.batch_invariant = True
        if label in ("chunks", "all"):
            eng.scheduler.chunk_multiple = eng.pool.block_size
        start = time.perf_counter()
        print(f"  fix on: {label:10s} mismatches {mismatches(eng, prompts, params)}/{len(prompts)} ({time.perf_counter() - start:.0f} s)", flush=True)


def target(args) -> None:
    print(f"## target: greedy chat replies under 16-way load equal alone ({'eager' if args.enforce_eager else 'compiled decode'})")
    for invariant in (False, True):
        llm = LLM(dtype="bfloat16", device="cpu", enforce_eager=args.enforce_eager, batch_invariant=invariant, max_num_seqs=64)
        llm.wait_compiled()
        prompts = [chat_ids(llm, p) for p in PROMPTS[: args.num_prompts]]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        n = mismatches(llm.engine, prompts, params)
        print(f"  {'batch_invariant' if invariant else 'default':16s} equal {len(prompts) - n}/{len(prompts)}, mismatches {n}", flush=True)


def speed(args) -> None:
    print(f"## speed ({'eager' if args.enforce_eager else 'compiled decode'}), {args.rounds} interleaved rounds")
    llms = {inv: LLM(dtype="bfloat16", device="cpu", enforce_eager=args.enforce_eager, batch_invariant=inv, max_num_seqs=64)
            for inv in (False, True)}
    for llm in llms.values():
        llm.wait_compiled()
    # Two models: make_batch_invariant swaps the linears of the model it is given.
    prompts = [chat_ids(llms[False], p) for p in PROMPTS[:16]]
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    res = {(inv, what): [] for inv in (False, True) for what in ("decode", "x16", "prefill")}
    one = SamplingParams(temperature=0, max_tokens=1)
    for r in range(args.rounds):
        # A prompt of its own per round (its first tokens differ): no prefix-cache hit.
        text = f"Round {r}. " + " ".join(PROMPTS[(r + i) % len(PROMPTS)] for i in range(args.prefill_tokens // 4 + 1))
        long_prompt = llms[False].tokenizer.encode(text, add_special_tokens=False)[: args.prefill_tokens]
        for inv, llm in llms.items():
            eng = llm.engine
            start = time.perf_counter()
            run_alone(eng, [long_prompt], one)
            res[(inv, "prefill")].append(len(long_prompt) / (time.perf_counter() - start))
            start = time.perf_counter()
            run_alone(eng, prompts[:1], params)
            res[(inv, "decode")].append(args.decode_tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            run_loaded(eng, prompts, params, 16)
            res[(inv, "x16")].append(16 * args.decode_tokens / (time.perf_counter() - start))
        print(f"  round {r + 1}: " + ", ".join(f"{'bi' if k[0] else 'default'} {k[1]} {v[-1]:.1f}" for k, v in res.items()), flush=True)
    print("| measure | default tok/s | batch_invariant tok/s | ratio |\n| --- | --- | --- | --- |")
    for what, label in (("decode", "decode, 1 sequence"), ("x16", "16-way throughput"),
                        ("prefill", f"prefill of one {args.prefill_tokens}-token prompt")):
        a, b = statistics.median(res[(False, what)]), statistics.median(res[(True, what)])
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", action="store_true")
    p.add_argument("--target", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="target/speed: eager decode (default: compiled)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48, help="reply length for sources/target")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per request for speed")
    p.add_argument("--prefill-tokens", type=int, default=512, help="length of the long prompt for speed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.sources:
        sources(args)
    if args.target:
        target(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
