"""How many CPU threads the engine's products use: `--threads` (llama.cpp's `-t`), else torch's
default (the cores this process may run on), cut to the CPUs a cgroup CPU quota allows.

A container given `--cpus=4` (Docker) or a CPU limit of 4 (Kubernetes) on a 64-core host still sees
all 64 cores: torch starts 32 or 64 OpenMP threads, the quota lets them run 4 CPUs' worth of time per
period, and every parallel product waits on threads the kernel has paused until the next period.
Decode of the demo model under a 1-CPU quota on 2 cores ran 9.6 tok/s with 2 threads and 30.7 with
1 (benchmarks/cpu_quota.py; benchmarks/RESULTS.md, "threads under a CPU quota"). A quota of q CPUs gets floor(q) threads (at
least 1). OMP_NUM_THREADS or MKL_NUM_THREADS, when set, is the user's choice and is kept.

Layer 1 (no imports from the rest of the package but pangu_infer.memory's cgroup paths).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import torch

from pangu_infer.memory import SELF_CGROUP, V2_ROOT, cgroup_groups

logger = logging.getLogger(__name__)

V1_CPU_ROOT = "/sys/fs/cgroup/cpu"  # cgroup v1: the cpu controller's hierarchy (often cpu,cpuacct)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# The most threads asked for (llama.cpp's GGML_MAX_N_THREADS): torch.set_num_threads(10**6) is a
# segmentation fault, 65536 libgomp's abort ("Thread creation failed"), and far fewer already only
# oversubscribe the cores.
MAX_THREADS = 512


def cpu_quota(v2_root: str = V2_ROOT, v1_root: str = V1_CPU_ROOT, self_cgroup: str = SELF_CGROUP) -> Optional[float]:
    """The CPUs a cgroup CPU quota lets this process use (e.g. 2.5), the tightest of its own group's
    and every group above it, cgroup v2 (`cpu.max`: "quota period" or "max period") and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1 for none); None where no quota binds."""
    quotas = [_v2_quota(g) for g in cgroup_groups(v2_root, self_cgroup)]
    quotas += [_v1_quota(g) for g in cgroup_groups(v1_root, self_cgroup, "cpu")]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _v2_quota(group: str) -> Optional[float]:
    try:
        with open(f"{group}/cpu.max", encoding="ascii") as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        q, p = int(quota), int(period or 100000)
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(group: str) -> Optional[float]:
    try:
        with open(f"{group}/cpu.cfs_quota_us", encoding="ascii") as f:
            quota = int(f.read().strip())
        with open(f"{group}/cpu.cfs_period_us", encoding="ascii") as f:
            period = int(f.read().strip())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def check_threads(threads: Any) -> Optional[int]:
    """`threads` as given to LLM(threads=) / --threads: None, or an int in [1, MAX_THREADS]; else a
    ValueError naming it."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer (or None for the default), got {threads!r}")
    if threads > MAX_THREADS:
        raise ValueError(f"threads={threads} is more than {MAX_THREADS}, the most this engine starts (llama.cpp's limit too)")
    return threads


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's thread count for this process and return it: `threads` when given; else, unless
    OMP_NUM_THREADS/MKL_NUM_THREADS says otherwise, torch's default cut to floor(CPU quota) where a
    cgroup quota allows fewer CPUs than that (logged at info level)."""
    threads = check_threads(threads)
    if threads is not None:
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
    current = torch.get_num_threads()
    if any(os.environ.get(var, "").strip() for var in THREAD_ENV):
        return current
    quota = cpu_quota()
    if quota is None:
        return current
    allowed = max(1, math.floor(quota))
    if allowed < current:
        torch.set_num_threads(allowed)
        logger.info(
            "using %d CPU threads, not %d: this process's cgroup CPU quota allows %.2g CPUs "
            "(--threads or OMP_NUM_THREADS chooses)", allowed, current, quota,
        )
        return allowed
    return current
