"""Resident memory of loaded weights: drop the pages of memory-mapped checkpoint tensors, return
freed heap to the system. Linux only (libc madvise / malloc_trim, /proc/self/maps); no-ops elsewhere.

Used by quantize-while-loading (pangu_infer.quant.loading) and by the oneDNN weight packing
(pangu_infer.models.packed): both read a float weight once, keep a new copy, and would otherwise leave
the original's file pages resident beside it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from typing import Optional

import torch

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a view of a memory-mapped file: out of RSS, still readable."""
    drop_mapped_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def drop_mapped_range(start: int, nbytes: int) -> None:
    """drop_mapped_pages for the bytes [start, start + nbytes) of a file mapping (a numpy memmap slice)."""
    libc = _libc()
    if libc is None:
        return
    end = start + nbytes
    lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


def trim_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB * sizeof(long))
MMAP_THRESHOLD_MAX = 32 << 20
KEEP_HEAP_ENV = "PANGU_INFER_KEEP_HEAP"


def keep_freed_heap() -> bool:
    """Let glibc's malloc keep freed memory for the next allocation of this process instead of
    returning it to the system at once: allocations up to 32 MiB come from the heap (the most glibc
    allows on 64-bit systems) and free memory at its top is returned past 1 GiB only (trim_heap
    still returns it on demand, as loading does). glibc's default returns a freed chunk once more
    than twice the largest freed one lies free: an eager forward's activations (a prefill chunk's
    [tokens, 2 x intermediate] of 10-20 MB) came back on every layer as fresh pages, each faulted
    in and zeroed by the kernel: 120,000-340,000 page faults and 0.3-1.0 s of system time in a
    512-token prefill of the 1B Pangu-shaped Q4_0 file on a Zen 3, against 10,000 and 0.03 s kept
    (benchmarks/RESULTS.md). Like a GPU engine's caching allocator or llama.cpp's compute buffers,
    the memory a step used stays for the next. True where applied (glibc, not turned off by
    PANGU_INFER_KEEP_HEAP=0); process-wide and idempotent."""
    if os.environ.get(KEEP_HEAP_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    # (setting either turns glibc's adjusting of both off: each is given)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings (Linux /proc/self/maps; none elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def is_file_backed(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether the tensor's bytes lie inside one of `ranges` (from file_backed_ranges())."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def available_memory_bytes() -> int:
    """Memory this process can still fill on the host: what the OS reports available (free plus
    reclaimable page cache) plus free swap, or less where a cgroup memory limit (a container's, a
    systemd unit's, a Slurm job's) leaves less: its limit minus what the group holds, its page cache
    counting as free. cgroup v2 (one unified tree) and v1 (the memory controller's own tree, as
    older Docker, Kubernetes and Slurm set up) are both read; the tightest limit counts."""
    import psutil

    available = int(psutil.virtual_memory().available + psutil.swap_memory().free)
    limits = [_cgroup_available(group) for group in cgroup_groups(V2_ROOT, SELF_CGROUP)]
    limits += [_cgroup_v1_available(group) for group in cgroup_groups(V1_ROOT, SELF_CGROUP, "memory")]
    return min([available] + [v for v in limits if v is not None])


SELF_CGROUP = "/proc/self/cgroup"
V2_ROOT = "/sys/fs/cgroup"
V1_ROOT = "/sys/fs/cgroup/memory"  # cgroup v1: the memory controller's own hierarchy
# cgroup v1 writes "no limit" as the largest page count times the page size (2**63 - 4096 with 4 KiB
# pages); anything from 2**62 bytes (4 EiB) up is read as that.
V1_NO_LIMIT = 1 << 62


def cgroup_groups(root: str = V2_ROOT, self_cgroup: str = SELF_CGROUP, controller: Optional[str] = None) -> list[str]:
    """The cgroup folders whose limits (memory here, CPU quota in cpu_threads) bind this process: its own group and every group above
    it, up to the root (a container's own namespace shows its group as /; a container whose
    hierarchy is mounted at its own group, with no namespace, finds only the root's folder there).
    The group is the path on /proc/self/cgroup's line for the hierarchy: `0::/path` for cgroup v2
    (controller None), `N:a,b,memory:/path` for the v1 hierarchy holding `controller`. Systemd
    units, Slurm jobs and pods without a cgroup namespace are in groups below the root."""
    path = "/"
    try:
        with open(self_cgroup, encoding="utf-8") as f:
            for line in f:
                fields = line.rstrip("\n").split(":", 2)
                if len(fields) != 3:
                    continue
                _, controllers, group = fields
                if (controllers == "") if controller is None else (controller in controllers.split(",")):
                    path = group.strip() or "/"
    except OSError:
        pass
    parts = [p for p in path.split("/") if p]
    return [root + "".join("/" + p for p in parts[:k]) for k in range(len(parts), -1, -1)]


def _cgroup_available(root: str = V2_ROOT) -> Optional[int]:
    """What a cgroup v2 group leaves: memory.max - memory.current + its page cache (memory.stat's
    `file`); None without a limit there."""
    try:
        with open(f"{root}/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{root}/memory.current", encoding="ascii") as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current + _stat(root, "file"))
    except (OSError, ValueError):
        return None


def _cgroup_v1_available(root: str = V1_ROOT) -> Optional[int]:
    """What a cgroup v1 memory group leaves: memory.limit_in_bytes - memory.usage_in_bytes + its page
    cache (memory.stat's `total_cache`, the group and the groups below it as the usage counts them:
    the counter v2 calls `file`; `cache` where the kernel gives no totals); None without a limit."""
    try:
        with open(f"{root}/memory.limit_in_bytes", encoding="ascii") as f:
            limit = int(f.read().strip())
        if limit >= V1_NO_LIMIT:
            return None
        with open(f"{root}/memory.usage_in_bytes", encoding="ascii") as f:
            usage = int(f.read().strip())
        cache = _stat(root, "total_cache", "cache")
        return max(0, limit - usage + cache)
    except (OSError, ValueError):
        return None


def _stat(root: str, *keys: str) -> int:
    """The first of `keys` that the group's memory.stat has (0 if none)."""
    values = {}
    with open(f"{root}/memory.stat", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in keys:
                values[key] = int(value)
    return next((values[k] for k in keys if k in values), 0)
