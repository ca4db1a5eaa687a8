"""Choices measured once per machine and kept: which kernel or layout is faster on this CPU.

CPUs differ in what is fast (an AMD EPYC and an Intel Xeon with AMX disagree on oneDNN's layouts and
on the int4 kernels; benchmarks/RESULTS.md), so the engine times the candidates on first use and
keeps the answer per machine in `~/.cache/pangu-infer/kernels.json` (`$XDG_CACHE_HOME` respected;
`PANGU_INFER_KERNEL_CACHE` names another file). The key is the CPU model, the torch thread count
and the torch version: a change of any of them measures again.

Layer 1 (no imports from the rest of the package): models, quant and engine all use it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch


def cache_root() -> Path:
    """Where the engine keeps what it measured, built or converted on this machine:
    ~/.cache/pangu-infer, or under `$XDG_CACHE_HOME`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pangu-infer"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every Python file of this package (the C sources are strings in them): what the
    engine caches from its own code (converted models, saved compiled steps) is keyed by it."""
    root = Path(__file__).resolve().parent
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def engine_settings(*ignored: str) -> list[tuple[str, str]]:
    """The `PANGU_INFER_*` environment settings, sorted, less `ignored` (a cache's own switches):
    part of the key of what the engine caches, since any of them may change what it builds."""
    return sorted((k, v) for k, v in os.environ.items() if k.startswith("PANGU_INFER_") and k not in ignored)


def cache_path() -> str:
    explicit = os.environ.get("PANGU_INFER_KERNEL_CACHE")
    if explicit:
        return explicit
    return str(cache_root() / "kernels.json")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo), empty where it does not."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # Virtual machines often name every generation alike ("AMD EPYC" for Zen 1 with AVX2 only and for
    # Zen 4 with AVX-512): the feature flags that pick kernels tell them apart.
    isa = "+".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    return f"{cpu}|{isa or 'base'}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _read() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


# Every choice this process has made: {cache file: {machine key: {name: value}}} (choices_made()).
_MADE: dict[str, dict[str, dict[str, Any]]] = {}
_MADE_LOCK = threading.Lock()  # a compile thread may measure while a load copies the record


def choices_made() -> dict[str, dict[str, Any]]:
    """{machine key: {name: value}} of every choice cached_choice has given in this process from
    the cache file in use. Callers memoize choices of their own (functools.lru_cache), so what one
    model's load consulted is not visible by itself; this superset is: a model converted now was
    laid out by some of these."""
    with _MADE_LOCK:
        return json.loads(json.dumps(_MADE.get(cache_path(), {})))


_MISSING = object()  # a name the file no longer holds


def changed_choices(made: dict[str, dict[str, Any]]) -> list[str]:
    """The names in `made` (choices_made() of an earlier process) whose value is no longer the one
    stored for their machine key: measured again with another answer, or gone (the file deleted)."""
    stored = _read()
    return sorted(
        name for key, values in made.items() for name, value in values.items()
        if not isinstance(stored.get(key), dict) or stored[key].get(name, _MISSING) != value
    )


def stored_choice(name: str) -> Any:
    """The value stored under `name` for this machine, or None: what cached_choice would give without
    measuring, for callers that must not measure (a memory estimate before a load)."""
    entry = _read().get(machine_key())
    return entry.get(name) if isinstance(entry, dict) else None


def cached_choice(name: str, compute: Callable[[], Any], valid: Callable[[Any], bool]) -> Any:
    """The value stored under `name` for this machine if `valid(value)`, else compute() stored there.

    Processes measuring at once (two servers starting on a fresh machine, test workers) agree: the
    file is read, changed and replaced under a lock, a value another process stored while this one
    measured is taken instead of this one's (one answer per machine), and no process's entries are
    lost to another's rewrite. A read-only home only means measuring again next time; the file is
    replaced atomically and never left half written.
    """
    key = machine_key()
    path = cache_path()
    value = stored_choice(name)
    if not valid(value):
        measured = compute()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _locked(path):
                stored = _read()  # again, under the lock: another process may have written meanwhile
                if not isinstance(stored.get(key), dict):
                    stored[key] = {}
                value = stored[key].get(name)
                if not valid(value):
                    value = stored[key][name] = measured
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        json.dump(stored, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)
        except OSError:
            value = measured
    with _MADE_LOCK:
        _MADE.setdefault(path, {}).setdefault(key, {})[name] = value
    return value


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on `path`'s companion lock file (POSIX flock; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # Windows: last writer wins
        yield
        return
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def own_kernel_measured_faster(name: str, measure: Callable[[], dict[str, float]], what: str) -> bool:
    """Does this package's kernel ("own") beat aten's here: `measure()` -> seconds {"own", "aten"},
    run once per machine and kept under `name` (cached_choice); the choice is logged as `what`."""

    def measured() -> str:
        times = measure()
        value = "own" if times["own"] < times["aten"] else "aten"
        logging.getLogger("pangu_infer.machine").info(
            "%s: %s (own %.2f ms, aten %.2f ms)", what, value, times["own"] * 1e3, times["aten"] * 1e3
        )
        return value

    return cached_choice(name, measured, lambda v: v in ("own", "aten")) == "own"


def median_time(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of `reps` calls of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int = 5) -> dict[str, float]:
    """Median seconds per candidate, the candidates taking turns round by round (a machine whose
    load changes during the measurement moves every candidate alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def env_choice(var: str, choices: tuple[str, ...]) -> Optional[str]:
    """The value of environment variable `var` if set (one of `choices`, else a ValueError naming it)."""
    value = os.environ.get(var)
    if value is None or value == "":
        return None
    if value not in choices:
        raise ValueError(f"{var}={value!r}: expected one of {', '.join(choices)}")
    return value


__all__ = ["cache_path", "cache_root", "cached_choice", "env_choice", "interleaved_medians", "machine_key", "median_time", "own_kernel_measured_faster"]
