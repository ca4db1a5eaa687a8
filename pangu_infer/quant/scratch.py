"""Buffers the many-row conversions of quantized weights write into, kept per key and thread.

A leaf of pangu_infer.quant: the conversions of quant/prefill.py and of cpu_int4's layout both use
it, and neither imports the other for it.
"""

from __future__ import annotations

import threading

import torch

SCRATCH_MAX_BYTES = 32 << 20  # bigger converted weights (a vocabulary head) are allocated per product
_local = threading.local()


def thread_buffers(kind: str) -> dict:
    """This thread's dict of kept buffers of one kind."""
    return _local.__dict__.setdefault(kind, {})


def scratch(key: tuple, shape: tuple) -> torch.Tensor:
    """A bf16 buffer of `shape` kept for this key and thread (the conversion overwrites it each
    product: its result is only read by that product). Big ones are not kept."""
    if 2 * shape[0] * shape[1] > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=torch.bfloat16)
    buffers = thread_buffers("buffers")
    # A buffer made under inference_mode is an inference tensor, which may not be written outside
    # it (and the other way round is fine but would keep two kinds apart anyway): one per mode.
    key = (*key, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(shape, dtype=torch.bfloat16)
    return buf
