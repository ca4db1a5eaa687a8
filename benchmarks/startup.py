"""Startup: wall time of `pangu-infer generate --prompt Hi --max-tokens 1` in a fresh process.

Rows (each a new process, alternating, median of --runs; one untimed run of each first, so the
compile cache is warm, as on a user's second start):
- `pangu-infer generate` with no flags (compiled decode, built at load from the cache);
- the same with `--enforce-eager`;
- `python -c "import pangu_infer.cli"` and `import torch` (what any start pays);
- llama.cpp (llama-cpp-python) loading the same file and answering one token, when installed.
The `--stats` line of each pangu-infer run splits its load time (reading, packing, compiling).

    .venv/bin/python benchmarks/startup.py [--model FILE.gguf] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer.loader import demo_model_path  # noqa: E402

LLAMA_CPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, verbose=False)
print(llm("Hi", max_tokens=1)["choices"][0]["text"])
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = args.model or demo_model_path()
    py = sys.executable
    gen = [py, "-m", "pangu_infer.cli", "generate", "--model", model, "--prompt", "Hi", "--max-tokens", "1", "--stats"]
    rows = {
        "pangu-infer generate (no flags)": gen,
        "pangu-infer generate --enforce-eager": gen + ["--enforce-eager"],
        "import pangu_infer.cli": [py, "-c", "import pangu_infer.cli"],
        "import torch": [py, "-c", "import torch"],
    }
    try:
        import llama_cpp  # noqa: F401

        rows["llama-cpp-python: load + 1 token"] = [py, "-c", LLAMA_CPP, model]
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
    for cmd in rows.values():  # untimed: fills the compile cache, warms the page cache
        timed(cmd)
    walls: dict[str, list[float]] = {name: [] for name in rows}
    loads: dict[str, list[str]] = {name: [] for name in rows}
    for _ in range(args.runs):
        for name, cmd in rows.items():
            wall, err = timed(cmd)
            walls[name].append(wall)
            loads[name] += re.findall(r"\[loaded in [^\]]*\]", err)
    print(f"{os.path.basename(model)}: wall seconds of a fresh process, median of {args.runs} alternating runs")
    for name in rows:
        load = loads[name][len(loads[name]) // 2] if loads[name] else ""
        print(f"{name:40s}{statistics.median(walls[name]):8.2f} s  {load}")


if __name__ == "__main__":
    main()
