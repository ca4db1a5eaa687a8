"""Native code built on this machine: where compiled artifacts are kept, and whether a compiler is here.

torch.compile (inductor) and the engine's own C kernels (pangu_infer.quant.cpu_int4,
pangu_infer.quant.amx, pangu_infer.models.bi_attention_kernel) all need a C/C++ compiler at run
time and a cache that outlives the process. Layer 1: it imports only pangu_infer.machine (the
cache folder).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from pangu_infer import machine
from pangu_infer.machine import cache_root, cpu_flags  # noqa: F401  (cpu_flags: here too, beside the builds)


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


# machine.py's name for the answers of inductor's instruction-set probes on this machine
VEC_ISA_CHOICE = "inductor_vec_isa"


def known_vec_isa() -> None:
    """Inductor's list of the vector instruction sets its C++ can use here, made without the probes
    this machine has passed before. Inductor checks each set the CPU lists (and AVX-512 BF16, VNNI,
    AMX within them) by building a test library and loading it in a child Python, in every process:
    six children on an AVX-512 CPU with AMX, 1.5 s of each process's first compile or compiled-step
    load (benchmarks/RESULTS.md). A probe that loaded is kept per machine (machine.py) with the
    compiler inductor uses, by its test library's name (a hash of the test's code and flags), and
    taken as loaded from then on; one that failed is probed again next time, as inductor would.
    Inductor keeps the list for the process. Linux on x86-64, where torch's probe is
    `VecISA._probe_load`; elsewhere inductor probes as before."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return
    from torch._inductor import cpu_vec_isa

    probe = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if probe is None or cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:
        return
    compiler = cxx_compiler()
    if compiler is None:
        return
    stored = machine.stored_choice(VEC_ISA_CHOICE)
    loaded = set(stored.get("loaded", [])) if isinstance(stored, dict) and stored.get("compiler") == compiler else set()
    passed: set[str] = set()

    def probe_known(self, output_path: str) -> bool:
        name = os.path.basename(output_path)
        if name in loaded:
            return True
        ok = probe(self, output_path)
        if ok:
            passed.add(name)
        return ok

    cpu_vec_isa.VecISA._probe_load = probe_known
    try:
        cpu_vec_isa.valid_vec_isa_list()
    finally:
        cpu_vec_isa.VecISA._probe_load = probe
    if passed:
        every = sorted(loaded | passed)
        machine.cached_choice(
            VEC_ISA_CHOICE, lambda: {"compiler": compiler, "loaded": every},
            lambda v: isinstance(v, dict) and v.get("compiler") == compiler and set(every) <= set(v.get("loaded", [])),
        )


# How the engine's C kernels are built: for this CPU (-march=native), OpenMP for their threads.
C_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def c_compiler() -> Optional[str]:
    """The C compiler for the engine's kernels: `$CC`, else cc or gcc on the PATH; None without one."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def kernel_library(name: str, source: str, what: str, otherwise: str, flags: Sequence[str] = C_FLAGS) -> Optional[ctypes.CDLL]:
    """build_c_library with the C compiler found here, or None, logged as `what` with what happens
    `otherwise`, where there is no compiler or the build fails: how each kernel module loads its C."""
    import logging

    log = logging.getLogger("pangu_infer.native")
    compiler = c_compiler()
    if not compiler:
        log.info("%s: no C compiler found; %s", what, otherwise)
        return None
    try:
        return build_c_library(name, source, compiler, flags)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s not built (%s): %s", what, e, otherwise)
        return None


def build_c_library(name: str, source: str, compiler: str, flags: Sequence[str] = C_FLAGS, link: Sequence[str] = ("-lm",)) -> ctypes.CDLL:
    """`source` compiled into a shared library once per machine and loaded. Kept in the cache
    folder as `<name>_<key>.so`, the key a hash of the source, the flags, the compiler and the CPU
    model, so a changed kernel or another CPU builds anew; written to a temporary name and renamed,
    so processes building at once never load a half-written file. Raises OSError or
    subprocess.SubprocessError when it cannot be built or loaded (the caller falls back)."""
    return ctypes.CDLL(_build(name, source, ".c", compiler, flags, link))


def _build(name: str, source: str, suffix: str, compiler: str, flags: Sequence[str], link: Sequence[str], timeout: int = 120) -> str:
    """The cached shared library's path, built first if it is not there (see build_c_library)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    key = hashlib.sha256("\0".join((source, " ".join(flags), compiler, cpu)).encode()).hexdigest()[:16]
    path = os.path.join(str(cache_root()), f"{name}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{name}{suffix}")
            with open(src, "w", encoding="utf-8") as f:
                f.write(source)
            out = os.path.join(tmp, f"{name}.so")
            subprocess.run([compiler, *flags, src, "-o", out, *link], check=True, capture_output=True, timeout=timeout)
            shutil.move(out, f"{path}.{os.getpid()}.tmp")
            os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path


def cxx_compiler() -> Optional[str]:
    """The C++ compiler inductor uses (`$CXX`, else g++ and the like), or None without one."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def build_torch_ops(name: str, source: str) -> str:
    """C++ `source` that registers operators with torch's dispatcher (TORCH_LIBRARY_FRAGMENT),
    compiled against this torch's headers and libraries once per machine (cached as
    build_c_library's are, the torch version in the key) and loaded into the process
    (torch.ops.load_library). Operators called from a compiled graph then run without Python in
    between. Returns the library's path; raises RuntimeError when there is no C++ compiler, and
    OSError or subprocess.SubprocessError when it cannot be built or loaded."""
    from torch.utils import cpp_extension

    compiler = cxx_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    # the torch version in the source: in the cache key, as the headers the library was built with
    path = _build(name, f"// torch {torch.__version__}\n" + source, ".cpp", compiler, flags, link, timeout=600)
    torch.ops.load_library(path)
    return path


__all__ = ["C_FLAGS", "build_c_library", "build_torch_ops", "c_compiler", "cxx_compiler", "compile_cache_dir", "compile_problem", "cpu_flags", "known_vec_isa"]
