"""The cost of picking the next token: this engine's sampler against transformers' (the logits
warpers `generate` applies, then torch.multinomial; torch.argmax for greedy rows).

For each vocabulary size, batch size and setting: milliseconds per call (one decode step's
sampling for the whole batch), medians of interleaved rounds. Settings:

    greedy          temperature 0
    t=1             temperature 1.0, nothing else
    pangu           temperature 1.0, top_p 0.8: openPangu-Embedded-7B's generation_config.json,
                    what a request that sets nothing gets
    qwen            temperature 0.6, top_k 20, top_p 0.95
    seeded pangu    pangu with a per-request seed (the engine: an exponential race with the
                    request's own generator; transformers has no per-row seed, so its row is pangu's)
    pangu rep 1.1   pangu with repetition_penalty 1.1 over a 600-token history (100 prompt, 500 output)
    pangu lp 5      pangu asking logprobs 5 (transformers: log_softmax and topk of the raw scores)

Logits (random, fixed seed): "peaked" rows have 40 likely tokens 12-16 above a N(0, 2^2)
background, so the 0.8 nucleus is a few dozen tokens; "flat" rows have them 6-10 above, so the
nucleus runs into the tens of thousands (a start of a sentence, a creative prompt). The nucleus
size of the first row is printed.

Usage:
    .venv/bin/python benchmarks/sampler.py [--threads 2] [--rounds 7] [--vocab 49152 153376] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_infer.engine.sampler import Sampler, SamplingRow  # noqa: E402
from pangu_infer.sampling_params import SamplingParams  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402  (the peer, imported outside the timed calls)
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "t=1": dict(temperature=1.0),
    "pangu": dict(temperature=1.0, top_p=0.8),
    "qwen": dict(temperature=0.6, top_k=20, top_p=0.95),
    "seeded pangu": dict(temperature=1.0, top_p=0.8, seed=1),
    "pangu rep 1.1": dict(temperature=1.0, top_p=0.8, repetition_penalty=1.1),
    "pangu lp 5": dict(temperature=1.0, top_p=0.8, logprobs=5),
}
HISTORY = 600  # tokens of each row's history (the first 100 its prompt)


def make_logits(batch: int, vocab: int, lift: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2
    hot = torch.randint(0, vocab, (batch, 40), generator=g)
    return logits.scatter_add_(1, hot, lift + 4 * torch.rand(batch, 40, generator=g))


def nucleus_size(row: torch.Tensor, top_p: float) -> int:
    probs = row.double().softmax(-1).sort(descending=True).values
    return int(((probs.cumsum(-1) - probs) < top_p).sum())


def transformers_step(logits: torch.Tensor, params: dict, history: torch.Tensor) -> torch.Tensor:
    if params["temperature"] == 0:
        return logits.argmax(dim=-1)
    if params.get("logprobs"):
        logits.log_softmax(dim=-1).topk(params["logprobs"], dim=-1)
    warpers = LogitsProcessorList()
    if params.get("repetition_penalty", 1.0) != 1:
        warpers.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
    warpers.append(TemperatureLogitsWarper(params["temperature"]))
    if params.get("top_k"):
        warpers.append(TopKLogitsWarper(params["top_k"]))
    if params.get("top_p", 1.0) < 1:
        warpers.append(TopPLogitsWarper(params["top_p"]))
    scores = warpers(history, logits)  # (each warper returns a new tensor)
    return torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 153376])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(seed=0)
    print(f"{args.threads} threads; ms per call (a decode step's sampling for the batch), medians of {args.rounds} interleaved rounds")
    print(f"{'logits':>7s} {'vocab':>7s} {'batch':>5s} {'nucleus':>7s} {'setting':>13s} {'engine':>8s} {'transformers':>12s} {'speed':>6s}")
    for lift, kind in ((12.0, "peaked"), (6.0, "flat")):
        for vocab in args.vocab:
            for batch in args.batch:
                logits = make_logits(batch, vocab, lift)
                size = nucleus_size(logits[0], 0.8)
                history = torch.randint(0, vocab, (batch, HISTORY), generator=torch.Generator().manual_seed(1))
                for name, params in SETTINGS.items():
                    sp = SamplingParams(**params)
                    rows = [
                        SamplingRow(sp, torch.Generator().manual_seed(i) if sp.seed is not None else None,
                                    history[i, :100].tolist(), history[i, 100:].tolist(), (2,))
                        for i in range(batch)
                    ]
                    ours, theirs = [], []
                    for _ in range(2):  # warm both
                        sampler(logits, rows)
                        transformers_step(logits, params, history)
                    for _ in range(args.rounds):
                        t = time.perf_counter()
                        sampler(logits, rows)
                        ours.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        transformers_step(logits, params, history)
                        theirs.append(time.perf_counter() - t)
                    a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
                    print(f"{kind:>7s} {vocab:>7d} {batch:>5d} {size:>7d} {name:>13s} {a:>8.3f} {b:>12.3f} {b / a:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
