"""A one-off run as a user starts one: `pangu-infer generate` with no tuning flags against llama.cpp's
own one-off run (llama-cpp-python: load the file, generate), on the same GGUF file, prompt and
token count (end-of-sequence ignored by both), each a fresh process, interleaved rounds; the wall
time of the whole process, start to exit. This engine's compiled step is built and saved by a
first run (not timed); the timed runs start warm, as a user's second run does. Also timed: this
engine with its eager decode step off (PANGU_INFER_EAGER_STEP=0, the modules' eager path).

    .venv/bin/python benchmarks/one_shot.py [--gguf FILE] [--tokens 256] [--rounds 3] [--threads 2]

Needs llama-cpp-python for its row (see README.md); without it the engine's rows alone print.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Once upon a time, there was a dragon who"

LLAMA = r"""
import sys
from llama_cpp import Llama
path, n, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = Llama(path, n_ctx=n + 256, n_threads=threads, n_threads_batch=threads, verbose=False)
out = m(prompt, max_tokens=n, temperature=0, logit_bias={m.token_eos(): -1e9})
print(f"[{out['usage']['completion_tokens']} tokens]")
"""


def demo_file() -> str:
    from pangu_infer.loader import demo_model_path

    return str(demo_model_path())


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{cmd[:4]}... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = re.findall(r"\[(\d+) tokens", done.stdout + done.stderr)
    return wall, int(found[-1]) if found else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: the demo model's)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.gguf or demo_file()
    env = {k: v for k, v in os.environ.items() if k != "PANGU_INFER_EAGER_STEP"}
    engine = [sys.executable, "-m", "pangu_infer", "generate", "--model", path, "--prompt", PROMPT, "--max-tokens",
              str(args.tokens), "--temperature", "0", "--ignore-eos", "--stats", "-t", str(args.threads)]
    runs = {
        "pangu-infer generate (no flags)": (engine, env),
        "  eager decode step off": (engine, {**env, "PANGU_INFER_EAGER_STEP": "0"}),
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        runs["llama.cpp (llama-cpp-python)"] = ([sys.executable, "-c", LLAMA, path, str(args.tokens), str(args.threads), PROMPT], env)
    else:
        print("llama-cpp-python is not installed: its row is left out")
    # A first run builds and saves the compiled decode step (the build waits for the run's end, then
    # runs while the process waits for it): not timed.
    subprocess.run([sys.executable, "-c", "import sys; from pangu_infer import LLM; LLM(sys.argv[1]).wait_compiled()", path],
                   env=env, capture_output=True, timeout=1800, check=True)
    walls: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, (cmd, run_env) in runs.items():
            wall, n = timed(cmd, run_env)
            walls[name].append(wall)
            tokens[name] = n
    peer = walls.get("llama.cpp (llama-cpp-python)")
    print(f"\n{Path(path).name}, {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds (median)\n")
    print("| run | wall s (median) | walls | tokens | tokens / wall s | vs llama.cpp (wall) |")
    print("|---|---|---|---|---|---|")
    for name, w in walls.items():
        med = statistics.median(w)
        ratio = f"{statistics.median(peer) / med:.2f}x" if peer else "-"
        print(f"| {name} | {med:.2f} | {' / '.join(f'{x:.2f}' for x in w)} | {tokens[name]} | {tokens[name] / med:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
