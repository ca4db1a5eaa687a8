"""Native code built on this machine: where compiled artifacts are kept, and whether a compiler is here.

torch.compile (inductor) and the engine's own C loops (pangu_infer.quant.prefill,
pangu_infer.quant.cpu_int4) all need a C/C++ compiler at run time and a cache that outlives the
process. Layer 1: it imports only pangu_infer.machine (the cache folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from pangu_infer.machine import cache_root


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled graphs between processes: `$TORCHINDUCTOR_CACHE_DIR` when
    the user set it, else ~/.cache/pangu-infer/torchinductor (inductor's own default is a
    temporary folder, emptied at reboot, which inductor writes into the variable once used)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return cache_root() / "torchinductor"


def compile_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot build the decode step on `device` here, or None when it can."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()  # inductor's own search (g++ or $CXX)
        except exc.InvalidCxxCompiler:
            return "no C++ compiler found (inductor needs g++, or $CXX naming one)"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor needs it on CUDA)"
    return f"torch.compile is not set up for {device.type} devices here"


__all__ = ["compile_cache_dir", "compile_problem"]
