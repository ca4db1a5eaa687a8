"""Constrained decoding (a JSON schema, xgrammar) with and without prompt-lookup drafts.

The demo model, no flags otherwise (compiled decode, the script waits for it), greedy requests
constrained to benchmarks/structured.py's order schema (a list of at least 30 items: its keys
repeat, which prompt lookup drafts from the reply itself). Two engines in one process: the peer
without speculation, the other with `num_speculative_tokens=--k`. Interleaved rounds, medians:

    1 stream   tokens/s of one constrained request at a time (three prompts);
    4-way      tokens/s of four at once;

plus the share of draft tokens accepted, and whether every reply is token for token the peer's.

Usage:
    .venv/bin/python benchmarks/structured_spec.py [--rounds 3] [--k 4] [--max-tokens 160] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.loader import demo_model_path  # noqa: E402
from pangu_infer.sampling_params import StructuredOutputsParams  # noqa: E402
from draft_model import run  # noqa: E402  (one prompt at a time, or all at once: tokens/s and the replies)
from structured import ORDER_SCHEMA  # noqa: E402

PROMPTS = ["An order for a coffee shop:", "Write a clothing order as JSON:", "Order list:", "Another order:"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = demo_model_path()
    plain, spec = LLM(path), LLM(path, num_speculative_tokens=args.k)
    for llm in (plain, spec):
        llm.wait_compiled()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=StructuredOutputsParams(json=ORDER_SCHEMA))
    for llm in (plain, spec):  # warm-up: the grammar compile
        run(llm, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, structured_outputs=params.structured_outputs), False)
    rates: dict[str, list[float]] = {k: [] for k in ("plain 1", "spec 1", "plain 4", "spec 4")}
    identical = True
    before = spec.engine.stats()
    for _ in range(args.rounds):
        for together, key in ((False, "1"), (True, "4")):
            prompts = PROMPTS[:3] if not together else PROMPTS
            r, want = run(plain, prompts, params, together)
            rates[f"plain {key}"].append(r)
            r, got = run(spec, prompts, params, together)
            rates[f"spec {key}"].append(r)
            identical &= got == want
    after = spec.engine.stats()
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.threads} threads, demo model, order schema, greedy, {args.max_tokens} tokens max, prompt lookup k={args.k}, "
          f"median of {args.rounds} interleaved rounds")
    print("| | no drafts tok/s | prompt lookup tok/s | ratio |")
    print("|---|---|---|---|")
    for key, label in (("1", "1 stream"), ("4", "4-way")):
        p, s = med[f"plain {key}"], med[f"spec {key}"]
        print(f"| {label} | {p:.1f} | {s:.1f} | {s / p:.2f}x |")
    print(f"draft tokens accepted: {accepted}/{drafted} ({accepted / max(drafted, 1):.0%}); "
          f"replies identical to the peer's: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
