"""Predicted outputs (OpenAI's `prediction`): replies with and without a prediction, one engine.

The demo model, no flags (compiled decode, the script waits for it), greedy chat requests of
PROMPTS. Each prompt's reply without a prediction is the peer, and the source of its predictions:

    exact      the reply itself (an edit that changes nothing);
    edited     the reply with every 12th word replaced (an edit of a few words per line);
    unrelated  a text the reply has nothing in common with (the cost of a prediction that misses).

Interleaved rounds, medians of the tokens/s of one request at a time (`1 stream`), and of all
prompts at once (`4-way`), as ratios against the replies without a prediction in the same round;
the share of prediction tokens accepted; and whether every reply is token for token the peer's.

Usage:
    .venv/bin/python benchmarks/predicted_outputs.py [--rounds 3] [--max-tokens 200] [--threads 2]
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

PROMPTS = [
    "Write a Python function that parses a CSV file into a list of dicts, with a docstring.",
    "Write a short README section explaining how to install a Python package with pip.",
    "Write a JavaScript function that debounces another function, with comments.",
    "Write a SQL query that lists the ten customers with the most orders, and explain it.",
]
UNRELATED = "The quick brown fox jumps over the lazy dog while the band plays on. " * 12


def edited(text: str, every: int = 12) -> str:
    words = text.split(" ")
    return " ".join("changed" if i % every == every // 2 else w for i, w in enumerate(words))


def run(llm: LLM, prompts: list[str], predictions: list, max_tokens: int, together: bool):
    """(tokens/s, replies' token ids, accepted and rejected prediction tokens)."""
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, prediction=p) for p in predictions]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    if together:
        outs = llm.chat(chats, params, use_tqdm=False)
    else:
        outs = [llm.chat(c, p, use_tqdm=False)[0] for c, p in zip(chats, params)]
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    accepted = sum(o.metrics.get("accepted_prediction_tokens", 0) for o in outs)
    rejected = sum(o.metrics.get("rejected_prediction_tokens", 0) for o in outs)
    return sum(map(len, tokens)) / seconds, tokens, accepted, rejected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(demo_model_path())
    llm.wait_compiled()
    run(llm, PROMPTS[:1], [None], 8, False)  # warm-up
    _, want, _, _ = run(llm, PROMPTS, [None] * len(PROMPTS), args.max_tokens, True)
    texts = [llm.get_tokenizer().decode(t, skip_special_tokens=True) for t in want]
    cases = {"exact": texts, "edited": [edited(t) for t in texts], "unrelated": [UNRELATED] * len(PROMPTS)}
    ratios: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {name: [0, 0] for name in cases}
    identical = True
    for _ in range(args.rounds):
        for together, key in ((False, "1 stream"), (True, "4-way")):
            base, got, _, _ = run(llm, PROMPTS, [None] * len(PROMPTS), args.max_tokens, together)
            identical &= got == want
            for name, predictions in cases.items():
                rate, got, accepted, rejected = run(llm, PROMPTS, predictions, args.max_tokens, together)
                identical &= got == want
                ratios.setdefault(f"{name} {key}", []).append(rate / base)
                counts[name][0] += accepted
                counts[name][1] += rejected
    print("| prediction | 1 stream (x no prediction) | 4-way (x no prediction) | prediction tokens accepted |")
    print("|---|---|---|---|")
    for name in cases:
        a, r = counts[name]
        share = f"{a}/{a + r} ({a / max(a + r, 1):.0%})"
        print(f"| {name} | {statistics.median(ratios[f'{name} 1 stream']):.2f}x | {statistics.median(ratios[f'{name} 4-way']):.2f}x | {share} |")
    print(f"replies token for token the same as without a prediction: {identical}")
    print(f"reply tokens per round: {sum(map(len, want))} ({len(PROMPTS)} replies)")


if __name__ == "__main__":
    main()
