"""A second start with the compiled decode step saved whole (engine/saved_step.py, the default)
against one that traces the model again from torch.compile's caches (PANGU_INFER_SAVED_STEPS=0).

Each start is a new process on one cache folder (`--cache`, default a fresh temporary folder,
filled by one start of each variant before the timed rounds). A start loads the model with no
flags, waits for the compiled step, and reports: the load (seconds from the process's first line
to `LLM(...)` returning), the wait from there until the compiled step is ready, and decode tokens/s
with the compiled step for one sequence and for --batch sequences. Rounds interleave the variants;
medians of --rounds.

    .venv/bin/python benchmarks/saved_step.py                 # the demo model (SmolLM2-135M Q4_1 GGUF)
    .venv/bin/python benchmarks/saved_step.py --model /tmp/pangu1b.Q4_0.gguf --rounds 3

`--baseline DIR` adds a third variant: the engine of another checkout (say `git worktree add
/tmp/base HEAD~1`), started the same way with no settings, for before/after comparisons in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
from pangu_infer import LLM, SamplingParams
model, tokens, batch = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model)
loaded = time.perf_counter()
assert llm.wait_compiled(), llm.engine.runner.compile_error
ready = time.perf_counter()
prompts = [{"prompt_token_ids": [100 + 7 * i + j for j in range(24)]} for i in range(batch)]
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
rates = {}
for name, group in (("one", prompts[:1]), ("batch", prompts)):
    t = time.perf_counter()
    llm.generate(group, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(group, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    rates[name] = len(group) * (tokens - 1) / (time.perf_counter() - t - prefill)
print(json.dumps({"load": loaded - start, "ready": ready - loaded, **rates}))
"""

VARIANTS = {"saved": {}, "traced": {"PANGU_INFER_SAVED_STEPS": "0"}}


def start(variant: str, args, cache: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": cache, **VARIANTS[variant]}
    root = Path(__file__).resolve().parents[1]
    if variant == "baseline":  # the other checkout's package first on the path (the child's cwd)
        root = Path(args.baseline).resolve()
        env["PYTHONPATH"] = str(root)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, args.model or "", str(args.tokens), str(args.batch)],
        capture_output=True, text=True, env=env, cwd=root,
    )
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{variant}: {json.dumps(out)} ({time.perf_counter() - t:.1f} s in all)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per sequence")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=None, help="cache folder (XDG_CACHE_HOME) shared by every start")
    ap.add_argument("--baseline", default=None, metavar="DIR", help="also start the engine of the checkout in DIR, with no settings")
    args = ap.parse_args()
    if args.baseline:
        if not (Path(args.baseline) / "pangu_infer" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {args.baseline!r}: no pangu_infer package there")
        VARIANTS["baseline"] = {}
    cache = args.cache or tempfile.mkdtemp(prefix="pangu-saved-step-")
    for variant in VARIANTS:  # fill the cache: every timed start is a second start
        start(variant, args, cache)
    results: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for r in range(args.rounds):
        for variant in list(VARIANTS) if r % 2 == 0 else reversed(VARIANTS):
            for k, v in start(variant, args, cache).items():
                results[variant].setdefault(k, []).append(v)
    med = {v: {k: statistics.median(x) for k, x in res.items()} for v, res in results.items()}
    print(f"model: {args.model or 'demo (SmolLM2-135M Q4_1)'}, {os.cpu_count()} threads, {args.tokens} tokens, "
          f"median of {args.rounds} interleaved second starts")
    print(f"| variant | load s | compiled step ready s after load | decode tok/s, 1 sequence | {args.batch} sequences |")
    print("|---|---|---|---|---|")
    base = med["traced"]
    for variant, m in med.items():
        print(f"| {variant} | {m['load']:.1f} | {m['ready']:.1f} | {m['one']:.1f} ({m['one'] / base['one']:.2f}x) | "
              f"{m['batch']:.1f} ({m['batch'] / base['batch']:.2f}x) |")


if __name__ == "__main__":
    main()
