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
    reclaimable page cache) plus free swap, or less where a cgroup v2 memory limit (a container's)
    leaves less: its limit minus what the group holds, its page cache counting as free."""
    import psutil

    available = int(psutil.virtual_memory().available + psutil.swap_memory().free)
    limits = [v for v in (_cgroup_available(group) for group in _cgroup_groups()) if v is not None]
    return min([available] + limits)


def _cgroup_groups(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> list[str]:
    """The cgroup v2 folders whose memory limits bind this process: its own group (`0::/path` in
    /proc/self/cgroup, which systemd units, Slurm jobs and pods without a cgroup namespace are in)
    and every group above it, up to the root (a container's own namespace shows its group as /)."""
    path = "/"
    try:
        with open(self_cgroup, encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    path = line[3:].strip() or "/"
    except OSError:
        pass
    parts = [p for p in path.split("/") if p]
    return [root + "".join("/" + p for p in parts[:k]) for k in range(len(parts), -1, -1)]


def _cgroup_available(root: str = "/sys/fs/cgroup") -> Optional[int]:
    try:
        with open(f"{root}/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{root}/memory.current", encoding="ascii") as f:
            current = int(f.read().strip())
        cache = 0
        with open(f"{root}/memory.stat", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "file":
                    cache = int(value)
        return max(0, int(limit) - current + cache)
    except (OSError, ValueError):
        return None
