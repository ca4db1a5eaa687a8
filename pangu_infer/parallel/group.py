"""The process groups of tensor parallelism, shared by rank 0 (launch.py) and the workers (worker.py).

Every rank joins a compute group (the model's collectives: gloo on CPU, nccl/hccl on devices) and
a gloo control group over which rank 0 sends each step's inputs (messages.py).
"""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pangu_infer.models.layers import AttentionBatch, PrefillSlice
from pangu_infer.parallel.errors import ParallelStartupError

# Bounds that turn a stuck start into an error: a rank's weight loading, then joining the group.
LOAD_TIMEOUT_S = 1800.0
JOIN_TIMEOUT_S = 60.0
# Workers wait for rank 0's next step as long as the server idles.
IDLE_TIMEOUT = timedelta(days=365)
CPU = torch.device("cpu")


def join_group(backend: str, init_method: str, rank: int, world_size: int) -> dist.ProcessGroup:
    """Join the compute group (the model's collectives) and a gloo control group (step messages)."""
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=JOIN_TIMEOUT_S)
        )
    except Exception as e:  # the store's timeout or a refused connection
        raise ParallelStartupError(
            f"tensor-parallel rank {rank} could not join the {world_size}-rank group at {init_method} "
            f"within {JOIN_TIMEOUT_S:.0f} s: {e}"
        ) from None
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    try:
        dist.monitored_barrier(group=control, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    except Exception as e:  # names the ranks that never arrived
        raise ParallelStartupError(f"tensor-parallel rank {rank}: the first barrier failed: {e}") from None
    return control


def to_device(obj: Any, device: torch.device) -> Any:
    """Step inputs travel through the CPU control group; each rank moves them to its own device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (AttentionBatch, PrefillSlice)):
        return replace(obj, **{f.name: to_device(getattr(obj, f.name), device) for f in fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
