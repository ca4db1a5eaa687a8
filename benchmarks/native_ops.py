"""Compiled decode with the C kernels called through C++ operators (pangu_infer.native_ops, the
default) against the Python operators (each call enters Python, checks its operands and calls the
kernel through ctypes).

Variants, each in its own process (the operators are chosen when the decode step is traced):
  native   the default: every kernel a graph calls through its C++ operator;
  py-attn  attention and int8 products through their Python operators, int4 products native (the
           engine before attention and int8 had C++ operators);
  python   PANGU_INFER_NATIVE_OPS=0: every kernel through its Python operator.
Each process loads the model with no flags, waits for the compiled step, decodes once to warm up,
then times one sequence's decode and a batch of --batch sequences' decode. Rounds interleave the
variants; medians of --rounds.

    .venv/bin/python benchmarks/native_ops.py                # the demo model (SmolLM2-135M Q4_1 GGUF)
    .venv/bin/python benchmarks/native_ops.py --model /tmp/pangu1b.Q4_0.gguf --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from pangu_infer import LLM, SamplingParams
variant, model, tokens, batch, threads = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if variant == "py-attn":
    from pangu_infer.models import bi_attention_kernel
    from pangu_infer.quant import cpu_int8
    bi_attention_kernel.native_op = lambda: False
    cpu_int8.native_op = lambda: False
llm = LLM(model)
assert llm.wait_compiled() and llm.engine.runner.decode_forward is not None
prompts = [{"prompt_token_ids": [100 + 7 * i + j for j in range(24)]} for i in range(batch)]
warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
llm.generate(prompts, warm, use_tqdm=False)
params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
out = {}
for name, group in (("one", prompts[:1]), ("batch", prompts)):
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter(); llm.generate(group, first, use_tqdm=False); prefill = time.perf_counter() - start
    start = time.perf_counter(); llm.generate(group, params, use_tqdm=False); total = time.perf_counter() - start
    out[name] = len(group) * (tokens - 1) / (total - prefill)  # decode tokens/s, the prefill's time taken off
print(json.dumps(out))
"""

VARIANTS = ("native", "py-attn", "python")


def run(variant: str, args) -> dict[str, float]:
    env = dict(os.environ)
    if variant == "python":
        env["PANGU_INFER_NATIVE_OPS"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, variant, args.model or "", str(args.tokens), str(args.batch), str(args.threads)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per sequence")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {v: {"one": [], "batch": []} for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            for k, v in run(variant, args).items():
                results[variant][k].append(v)
    print(f"model: {args.model or 'demo (SmolLM2-135M Q4_1)'}, {args.threads} threads, {args.tokens} tokens, "
          f"median of {args.rounds} interleaved rounds; decode tok/s (ratio to native)")
    print(f"| variant | 1 sequence | {args.batch} sequences |")
    print("|---|---|---|")
    base = {k: statistics.median(v) for k, v in results["native"].items()}
    for variant in VARIANTS:
        med = {k: statistics.median(v) for k, v in results[variant].items()}
        print(f"| {variant} | {med['one']:.1f} ({med['one'] / base['one']:.2f}x) | {med['batch']:.1f} ({med['batch'] / base['batch']:.2f}x) |")


if __name__ == "__main__":
    main()
