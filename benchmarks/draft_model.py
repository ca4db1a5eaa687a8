"""Speculative decoding with a draft model, against the same target decoding alone.

The pair: the demo model (SmolLM2-135M-Instruct) as the target with its weights dequantized
(`quantization="none"`, the default dtype: float32 on CPUs without native bf16, bfloat16 with it),
drafted by the same GGUF file kept in int4 (`quantization="auto"`, the default): a draft that
reads about a quarter to an eighth of the target's bytes per token and agrees with it often, as a
Q4 draft of a model or a 1B draft of a 7B model would. The peer is the target alone, in the same
process. Both run their compiled decode steps (the script waits for them).

Measured in interleaved rounds, medians:
    decode   tokens/s of one chat reply at a time (--max-tokens each, three questions; greedy, or
             sampled at --temperature with a fixed seed);
    4-way    tokens/s of the three questions and one more at once;
and, from the speculative engine, the share of draft tokens accepted and whether every reply is
token for token the target's own greedy reply.

Usage:
    .venv/bin/python benchmarks/draft_model.py [--rounds 3] [--k 4] [--threads 2] [--max-tokens 128]
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
from pangu_infer.loader import demo_model_path  # noqa: E402

QUESTIONS = [
    "What is the capital of France? Answer in two sentences.",
    "Explain what a hash table is to a new programmer.",
    "Write a short poem about the sea.",
    "List three uses of Python in science.",
]


def prompts(llm: LLM, questions: list[str]) -> list[dict]:
    ids = []
    for q in questions:
        text = llm.render_chat([{"role": "user", "content": q}])
        ids.append({"prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)})
    return ids


def run(llm: LLM, batch: list, params: SamplingParams, together: bool) -> tuple[float, list[list[int]]]:
    """Tokens/s of the prompts (token-id dicts or strings), one at a time or together, and the replies' tokens."""
    start = time.perf_counter()
    if together:
        outs = llm.generate(batch, params, use_tqdm=False)
    else:
        outs = [llm.generate(p, params, use_tqdm=False)[0] for p in batch]
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(len(t) for t in tokens) / elapsed, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (replies compared token for token); else seeded sampling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_path()
    kw = dict(quantization="none", max_num_seqs=8)
    plain = LLM(path, **kw)
    spec = LLM(path, speculative_config={"model": path, "num_speculative_tokens": args.k}, **kw)
    print(f"waiting for the compiled steps ... (target {plain.dtype}, draft int4)".replace("torch.", ""), file=sys.stderr)
    for llm in (plain, spec):
        if not llm.wait_compiled():
            print("compiled decode is off: figures are eager ones", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0 if args.temperature else None)
    single = prompts(plain, QUESTIONS[:3])
    multi = prompts(plain, QUESTIONS)
    for llm in (plain, spec):  # warm-up (and the reference replies)
        run(llm, single[:1], SamplingParams(temperature=0, max_tokens=8), False)
    rates: dict[str, list[float]] = {k: [] for k in ("plain decode", "draft decode", "plain 4-way", "draft 4-way")}
    identical = True
    before = spec.engine.stats()
    for _ in range(args.rounds):
        r, want = run(plain, single, params, False)
        rates["plain decode"].append(r)
        r, got = run(spec, single, params, False)
        rates["draft decode"].append(r)
        identical &= got == want or args.temperature > 0
        r, want = run(plain, multi, params, True)
        rates["plain 4-way"].append(r)
        r, got = run(spec, multi, params, True)
        rates["draft 4-way"].append(r)
        identical &= got == want or args.temperature > 0
    after = spec.engine.stats()
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.threads} threads, target {path.rsplit('/', 1)[-1]} dequantized ({plain.dtype}), draft: the same file in int4, "
          f"k={args.k}, {args.max_tokens} tokens max, temperature {args.temperature}, median of {args.rounds} interleaved rounds"
          .replace("torch.", ""))
    print("| | target alone tok/s | with the draft tok/s | ratio |")
    print("|---|---|---|---|")
    for what in ("decode", "4-way"):
        p, d = med[f"plain {what}"], med[f"draft {what}"]
        print(f"| {what} | {p:.1f} | {d:.1f} | {d / p:.2f}x |")
    print(f"draft tokens accepted: {accepted}/{drafted} ({accepted / max(drafted, 1):.0%})"
          + (f"; replies identical to the target's greedy ones: {'yes' if identical else 'NO'}" if not args.temperature else ""))


if __name__ == "__main__":
    main()
