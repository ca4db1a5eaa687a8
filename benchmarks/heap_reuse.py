"""What keeping freed heap memory saves: prefill (and a 16-way run) with the engine's malloc settings
(pangu_infer.memory.keep_freed_heap, the default on CPU) against glibc's own (PANGU_INFER_KEEP_HEAP=0).

Each round starts one fresh process per setting, alternating (the settings are process-wide). A
process loads the model (no flags, eager decode so that no background compile shares the cores),
runs one untimed prefill, then --prompts prefills of --prompt-len random tokens (one output token
each), and reports per prefill: tokens/s, the kernel's minor page faults (getrusage) and system
CPU seconds; with --concurrency N also one run of N such prompts at once with 32 output tokens each
(tokens/s over the whole run, prefills included, as benchmarks/compare.py's 16-way figure).

    .venv/bin/python benchmarks/heap_reuse.py --model FILE.gguf [--prompt-len 512] [--rounds 3] [--concurrency 16] [--threads N]

Prints one line per process and the medians per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, random, resource, sys, time
from pangu_infer import LLM, SamplingParams
from pangu_infer.bench import run_throughput
model, n, prompts, concurrency, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = LLM(model, enforce_eager=True, threads=threads or None)
rng = random.Random(1)
def prompt():
    return {"prompt_token_ids": [rng.randrange(100, llm.config.vocab_size - 100) for _ in range(n)]}
one = SamplingParams(max_tokens=1, temperature=0)
llm.generate([prompt()], one, use_tqdm=False)
rows = []
for _ in range(prompts):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    llm.generate([prompt()], one, use_tqdm=False)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rows.append({"tok_s": n / (t1 - t0), "faults": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime})
thr = run_throughput(llm.engine, "random", n, 32, concurrency).tokens_per_s if concurrency else None
print("RESULT", json.dumps({"prefills": rows, "throughput": thr}))
"""


def run(model: str, setting: str, args) -> dict:
    env = dict(os.environ)
    if setting == "glibc default":
        env["PANGU_INFER_KEEP_HEAP"] = "0"
    else:
        env.pop("PANGU_INFER_KEEP_HEAP", None)
    cmd = [sys.executable, "-W", "ignore", "-c", CHILD, model, str(args.prompt_len), str(args.prompts), str(args.concurrency), str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or model folder")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=3, help="timed prefills per process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=0, help="also one run of this many prompts at once (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default, every core)")
    args = ap.parse_args()
    settings = ("kept (default)", "glibc default")
    results: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings:
            res = run(args.model, s, args)
            results[s].append(res)
            pre = res["prefills"]
            thr = f", {args.concurrency}-way {res['throughput']:.1f} tok/s" if res["throughput"] else ""
            print(f"round {r} {s:>15s}: prefill tok/s " + " ".join(f"{p['tok_s']:.1f}" for p in pre)
                  + f"; faults {statistics.median(p['faults'] for p in pre):.0f}, sys {statistics.median(p['sys_s'] for p in pre):.2f} s{thr}",
                  flush=True)
    print(f"\nmedians over {args.rounds} rounds, prompt {args.prompt_len}:")
    for s in settings:
        pre = [p for res in results[s] for p in res["prefills"]]
        thr = [res["throughput"] for res in results[s] if res["throughput"]]
        line = (f"{s:>15s}: prefill {statistics.median(p['tok_s'] for p in pre):.1f} tok/s (best {max(p['tok_s'] for p in pre):.1f}), "
                f"{statistics.median(p['faults'] for p in pre):.0f} faults, {statistics.median(p['sys_s'] for p in pre):.2f} s system")
        print(line + (f", {args.concurrency}-way {statistics.median(thr):.1f} tok/s" if thr else ""))


if __name__ == "__main__":
    main()
