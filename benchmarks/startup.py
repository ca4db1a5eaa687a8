"""Startup: wall time of `pangu-infer generate --prompt Hi --max-tokens 1` in a fresh process.

Rows (each a new process, alternating, median of --runs; one untimed run of each first, so the
compile cache is warm and the file in the page cache, as on a user's second start):
- `pangu-infer generate` with no flags (compiled decode on: it builds in the background, the
  answer does not wait for it; the converted model mapped from its cache, loader/model_cache.py);
- the same with `--enforce-eager`;
- the same with the converted-model cache off (`PANGU_INFER_MODEL_CACHE=0`: the GGUF file is
  converted on every start, as before the cache);
- `python -c "import pangu_infer.cli"` and `import torch` (what any start pays);
- llama.cpp (llama-cpp-python) loading the same file and answering one token, when installed;
- the no-flags start again, waiting for the compiled decode step (`LLM.wait_compiled`): what a
  start costs until decode runs compiled.
Then one process timed phase by phase (`--breakdown`, the default): imports, the model cache
(a hit maps the converted model, its config and tokenizer spec), the GGUF header, the weights, the
tokenizer, packing, the engine (KV cache), the first answer, and the wait for the compiled step.

`--first-load` instead times a first start, each run with an empty model cache folder (the file
converted, the model cache written): when `LLM(file)` returns, when the first answer (8 tokens)
is back, when the process has ended (it waits for a cache write still running), then the next
start's `LLM(file)`. Rows: the default (above model_cache.BACKGROUND_BYTES the file is written and
checked after the load returns, with O_DIRECT); the write inside the load (O_DIRECT); the write
inside the load through the page cache (O_DIRECT refused, as on a file system without it);
llama.cpp loading the file and answering 8 tokens, when installed.

    .venv/bin/python benchmarks/startup.py [--model FILE.gguf] [--runs 3] [--no-breakdown] [--no-wait-row]
    .venv/bin/python benchmarks/startup.py --model FILE.gguf --first-load [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_CPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, verbose=False)
print(llm("Hi", max_tokens=1)["choices"][0]["text"])
"""

WAIT_COMPILED = """
import sys
from pangu_infer import LLM, SamplingParams
llm = LLM(sys.argv[1])
print(llm.generate("Hi", SamplingParams(max_tokens=1))[0].outputs[0].text)
assert llm.wait_compiled()
"""

# One process, phase by phase: LLM(path) with its parts timed by wrapping them, as JSON on stdout.
BREAKDOWN = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import pangu_infer.cli
from pangu_infer import LLM, SamplingParams
import pangu_infer.engine.engine as E, pangu_infer.llm as L, pangu_infer.loader.gguf as G
import pangu_infer.loader.model_cache as MC, pangu_infer.models.packed as P
t2 = time.perf_counter()
spent = {}
def wrap(owner, name, label):
    inner = getattr(owner, name)
    def clocked(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
    setattr(owner, name, clocked)
wrap(MC, "load", "model cache (key, map the converted model)")
wrap(G, "read_gguf", "GGUF header (metadata, tensor index)")
wrap(G, "tokenizer_from_spec", "tokenizer")
wrap(L, "load_serving_model", "load_model")
wrap(P, "pack_linears", "packing (oneDNN layout)")
wrap(E, "ModelRunner", "runner (KV cache; compile thread started)")
llm = LLM(sys.argv[1], enforce_eager=bool(int(sys.argv[2])))
t3 = time.perf_counter()
llm.generate("Hi", SamplingParams(max_tokens=1))
t4 = time.perf_counter()
marks = {"import torch": t1 - t0, "import pangu_infer (cli, LLM)": t2 - t1}
inner = ("model cache (key, map the converted model)", "GGUF header (metadata, tensor index)", "tokenizer")
marks |= {k: spent.get(k, 0.0) for k in inner}
# load_serving_model holds the inner phases and the packing (loader.load_serving_model packs)
packing = spent.get("packing (oneDNN layout)", 0.0)
marks["weights (read, convert, place; cache write)"] = spent["load_model"] - sum(spent.get(k, 0.0) for k in inner) - packing
marks |= {k: spent.get(k, 0.0) for k in ("packing (oneDNN layout)", "runner (KV cache; compile thread started)")}
marks["rest of LLM()"] = (t3 - t2) - sum(v for k, v in spent.items() if k not in inner and k != "packing (oneDNN layout)")
marks["first answer (prefill of 'Hi', 1 token)"] = t4 - t3
if llm.wait_compiled():
    marks["then: wait for the compiled decode step"] = time.perf_counter() - t4
print(json.dumps(marks))
"""


# A first start: LLM(file) with the cache folder empty, as JSON on stdout (the parent times the
# process's end). argv: file, how the cache is written (background | inside | inside-buffered | hit)
FIRST_LOAD = """
import json, sys, time
t0 = time.perf_counter()
import pangu_infer.loader.model_cache as MC
from pangu_infer import LLM, SamplingParams
how = sys.argv[2]
if how.startswith("inside"):
    MC.BACKGROUND_BYTES = 1 << 62
if how == "inside-buffered":
    class Refused:
        def __init__(self, path):
            raise MC._DirectRefused()
    MC._DirectSink = Refused
llm = LLM(sys.argv[1], enforce_eager=True)
t1 = time.perf_counter()
llm.generate("Hi", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
print(json.dumps({"loaded": t1 - t0, "answered": time.perf_counter() - t0}))
"""

LLAMA_CPP_8 = """
import json, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, verbose=False)
t1 = time.perf_counter()
llm("Hi", max_tokens=8)
print(json.dumps({"loaded": t1 - t0, "answered": time.perf_counter() - t0}))
"""

NO_CACHE = {"PANGU_INFER_MODEL_CACHE": "0"}


def first_loads(model: str, runs: int) -> None:
    """--first-load: see the module docstring."""
    import shutil
    import tempfile

    py = sys.executable
    rows = {
        "no flags (written after the load)": "background",
        "written inside the load (O_DIRECT)": "inside",
        "inside the load, through the page cache": "inside-buffered",
    }
    try:
        import llama_cpp  # noqa: F401

        rows["llama-cpp-python: load + 8 tokens"] = "llama.cpp"
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in rows}
    for _ in range(runs):
        for name, how in rows.items():
            folder = tempfile.mkdtemp(prefix="pangu-first-load-")
            env = {"PANGU_INFER_MODEL_CACHE": "1", "PANGU_INFER_MODEL_CACHE_DIR": folder}
            try:
                cmd = [py, "-c", LLAMA_CPP_8, model] if how == "llama.cpp" else [py, "-c", FIRST_LOAD, model, how]
                wall, out, _ = timed(cmd, env)
                marks = json.loads(out.strip().splitlines()[-1]) | {"ended": wall}
                if how != "llama.cpp":
                    assert os.listdir(folder), f"{name}: no cache file written"
                    _, out, _ = timed([py, "-c", FIRST_LOAD, model, "hit"], env)
                    marks["next start: loaded"] = json.loads(out.strip().splitlines()[-1])["loaded"]
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for k, v in marks.items():
                figures[name].setdefault(k, []).append(v)
    print(f"{os.path.basename(model)}: a first start (empty model cache folder), seconds from the process's start, "
          f"median of {runs} alternating runs")
    print(f"{'':42s}{'loaded':>9s}{'answered':>10s}{'ended':>8s}{'next start':>12s}")
    for name, marks in figures.items():
        cells = [statistics.median(marks[k]) if k in marks else float("nan") for k in ("loaded", "answered", "ended", "next start: loaded")]
        print(f"{name:42s}" + "".join(f"{c:{w}.1f}" for c, w in zip(cells, (9, 10, 8, 12))))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, proc.stdout, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the phase-by-phase process")
    ap.add_argument("--no-wait-row", action="store_true", help="skip the row that waits for the compiled step")
    ap.add_argument("--first-load", action="store_true", help="time first starts instead (see above)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pangu_infer.loader import demo_model_path

    model = args.model or demo_model_path()
    if args.first_load:
        first_loads(model, args.runs)
        return
    py = sys.executable
    gen = [py, "-m", "pangu_infer.cli", "generate", "--model", model, "--prompt", "Hi", "--max-tokens", "1", "--stats"]
    rows = {
        "pangu-infer generate (no flags)": gen,
        "pangu-infer generate --enforce-eager": gen + ["--enforce-eager"],
        "generate, model cache off": (gen, NO_CACHE),
        "import pangu_infer.cli": [py, "-c", "import pangu_infer.cli"],
        "import torch": [py, "-c", "import torch"],
    }
    try:
        import llama_cpp  # noqa: F401

        rows["llama-cpp-python: load + 1 token"] = [py, "-c", LLAMA_CPP, model]
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
    if not args.no_wait_row:
        rows["LLM(file), 1 token, then wait_compiled()"] = [py, "-c", WAIT_COMPILED, model]
    rows = {name: cmd if isinstance(cmd, tuple) else (cmd, None) for name, cmd in rows.items()}
    for cmd, env in rows.values():  # untimed: fills the compile and model caches, warms the page cache
        timed(cmd, env)
    walls: dict[str, list[float]] = {name: [] for name in rows}
    loads: dict[str, list[str]] = {name: [] for name in rows}
    for _ in range(args.runs):
        for name, (cmd, env) in rows.items():
            wall, _, err = timed(cmd, env)
            walls[name].append(wall)
            loads[name] += re.findall(r"\[loaded in [^\]]*\]", err)
    print(f"{os.path.basename(model)}: wall seconds of a fresh process, median of {args.runs} alternating runs")
    for name in rows:
        load = loads[name][len(loads[name]) // 2] if loads[name] else ""
        print(f"{name:42s}{statistics.median(walls[name]):8.2f} s  {load}")
    if args.no_breakdown:
        return
    kinds = [(1, None, "--enforce-eager"), (1, NO_CACHE, "--enforce-eager, model cache off")]
    if not args.no_wait_row:
        kinds.insert(0, (0, None, "no flags"))
    for eager, env, label in kinds:
        phases: dict[str, list[float]] = {}
        for _ in range(args.runs):
            _, out, _ = timed([py, "-c", BREAKDOWN, model, str(eager)], env)
            for name, sec in json.loads(out.strip().splitlines()[-1]).items():
                phases.setdefault(name, []).append(sec)
        print(f"\none process, phase by phase ({label}), median of {args.runs}:")
        for name, secs in phases.items():
            print(f"  {name:46s}{statistics.median(secs):7.2f} s")


if __name__ == "__main__":
    main()
