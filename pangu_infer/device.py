"""The only module that knows about cpu / cuda / npu."""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Optional, Union

import torch

from pangu_infer.errors import short_repr

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  registers the "npu" device with torch

    return bool(torch.npu.is_available())


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


_DEVICE_NAME = re.compile(r"(cpu|cuda|npu)(:\d+)?")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if device is not None and not isinstance(device, str):
        raise ValueError(f"device={short_repr(device)} must be a string: cpu, cuda or npu (optionally with :index)")
    name = device or default_device()
    if not _DEVICE_NAME.fullmatch(name):  # (torch.device("cpu:x") is torch's RuntimeError)
        raise ValueError(f"unknown device {name!r}: expected cpu, cuda or npu (optionally with :index)")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available on this machine")
    if kind == "npu" and not npu_available():
        raise ValueError(f"device={name!r} requested but torch_npu is not installed or finds no NPU")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (oneDNN's bf16 kernels: AVX-512 BW/VL/DQ with or
    without BF16 and AMX, or AVX-NE-CONVERT)? Without it (AVX2-only x86 such as AMD Zen 1-3, or a
    torch without oneDNN) every bf16 product is emulated: on a Zen 1 EPYC, 512-row products ran at
    5.4 GFLOP/s in bf16 against 32 in fp32, and one-row products read bf16 weights slower than
    fp32 ones (benchmarks/RESULTS.md, "A CPU without native bf16")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 weights halve the bytes read per decoded token and use AMX for batched products on
    # recent x86 CPUs (see benchmarks/RESULTS.md); GPUs and NPUs run bf16 natively. A CPU that
    # only emulates bf16 runs float32 (quantized weights stay quantized either way).
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_dtype(dtype: "Optional[str | torch.dtype]", device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}: expected float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list or dict is unhashable: not looked up)
        raise ValueError(f"unknown dtype {dtype!r}: expected one of float32, bfloat16, float16, auto")
    return DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def free_memory_bytes(device: torch.device) -> int:
    """Memory the KV cache may take from, on this device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "npu":
        free, _ = torch.npu.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def total_memory_bytes(device: torch.device) -> int:
    """The accelerator's whole memory (GPUs, NPUs)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    if device.type == "npu":
        return int(torch.npu.mem_get_info(device)[1])
    raise ValueError(f"device {device} has no memory of its own to take a share of")


def process_memory_bytes(device: torch.device) -> int:
    """What this process holds on the accelerator (torch's caching allocator: weights, buffers)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    if device.type == "npu":
        return int(torch.npu.memory_reserved(device))
    raise ValueError(f"device {device} has no memory of its own to take a share of")


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for tensor parallelism on this kind of device."""
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device.type]


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one rank: its own accelerator index, or the CPU shared by all ranks."""
    if device.type == "cpu":
        return device
    if device.type == "npu":
        torch.npu.set_device(local_rank)
    elif device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return torch.device(device.type, local_rank)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN build has the bf16 linear (AVX-512 BF16 / AMX)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    return bool(ops._is_mkldnn_bf16_supported())


def tracing() -> bool:
    """True while dynamo traces the calling code into a graph (a compiled step), False when it runs
    eagerly. Not `torch.compiler.is_compiling`: torch holds that flag for the whole process while
    any thread compiles, so the engine's requests, served eagerly while its background thread
    compiles the decode step, took the traced paths (the quantized prefill's eager formulas instead
    of its loops, the graph's LoRA switch instead of the live one). Dynamo folds this call to True."""
    return torch.compiler.is_dynamo_compiling()
