"""Compiled decode steps saved whole, so that the next process over the same model loads them in
seconds instead of tracing the model again.

A warm start with torch.compile's own caches still waits for dynamo to trace the model's Python
(22 of the 35 s a second start of the demo model waited; benchmarks/RESULTS.md): inductor's cache
keeps the generated code, not the trace. torch's `aot_compile` traces and compiles one graph for
example inputs, and `save_compiled_function` / `torch.compiler.load_compiled_function` write and
read it with its guards. Each graph the engine warms up (batch 1, batch 1 past
UNMASKED_SDPA_MAX_CONTEXT where that is another path, any larger batch) is one such function in a
file of its own here; `SavedStep` runs a step through the first graph whose guards take its inputs.

What a saved graph depends on is in its key, and a file is used only where the key matches: the
package's code, torch and Python, the machine (kernels are built with -march=native), the threads,
inductor's and dynamo's settings, the engine's PANGU_INFER_* settings, the KV cache's shape and
dtype, the graph's example shape, and the model's structure: every module's class, plain
attributes (norms' eps, each layer's decode attention kernel) and
tensors' shapes, strides and dtypes. Weights and KV caches are read from the model at each call,
never stored. Guards on the model's modules are dropped as in the regular compiled step (they
cannot be saved either), which is why the structure is in the key instead. The per-machine kernel
choices this process had made when the graph was built are recorded with it, and a graph built
under choices that kernels.json no longer holds is built again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pangu_infer import machine
from pangu_infer.engine import eager_step
from pangu_infer.models.layers import AttentionBatch

logger = logging.getLogger("pangu_infer.engine")

FORMAT = "pangu-infer-saved-step/1"
ENV_OFF = "PANGU_INFER_SAVED_STEPS"  # 0/off: trace the step in each process (torch.compile's caches only)
KEEP = 24  # saved graphs kept; the least recently used beyond these are deleted


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "1").strip().lower() not in ("0", "off", "false", "no")


def steps_dir() -> Path:
    from pangu_infer.native import compile_cache_dir

    return compile_cache_dir() / "pangu-infer-steps"


def _describe_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), list(value.stride()), str(value.dtype), str(value.device)]
    if isinstance(value, (list, tuple)):
        return [_describe_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def structure(model: torch.nn.Module) -> str:
    """A hash of what a traced step takes from the model besides its tensors' contents: each
    module's class and plain attributes, and every tensor's shape, stride and dtype."""
    h = hashlib.blake2b(digest_size=16)
    for path, module in model.named_modules(remove_duplicate=False):
        entry: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
        for name, value in module.__dict__.items():
            if not name.startswith("_") and name != "training":
                entry[name] = _describe_value(value)
        for kind in ("_parameters", "_buffers"):
            for name, t in module.__dict__[kind].items():
                entry[f"{kind}.{name}"] = _describe_value(t)
        h.update(json.dumps([path, entry], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _settings_hash() -> str:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    def canonical(value: Any) -> str:  # sets print in a per-process order (string hashing is salted)
        return repr(sorted(map(repr, value))) if isinstance(value, (set, frozenset)) else repr(value)

    items = [("inductor", k, canonical(v)) for k, v in inductor_config.save_config_portable().items()]
    items += [("dynamo", k, canonical(v)) for k, v in dynamo_config.save_config_portable().items()]
    return hashlib.blake2b(repr(sorted(items)).encode(), digest_size=16).hexdigest()


def step_key(model: torch.nn.Module, kv_cache: torch.Tensor, shape: tuple[int, int], options: dict, variant: str = "") -> dict:
    key = {
        "variant": variant,  # compiled.build_decode_step's: with LoRA adapters, their graph or the base one
        "format": FORMAT,
        "source": machine.source_hash(),
        "torch": torch.__version__,
        "python": sys.version,
        "machine": machine.machine_key(),
        "threads": torch.get_num_threads(),
        "compile_settings": _settings_hash(),
        "options": sorted((k, repr(v)) for k, v in options.items() if k != "guard_filter_fn"),
        # (less the switches of what no graph holds: this cache's, the eager decode step's)
        "settings": machine.engine_settings(ENV_OFF, eager_step.ENV),
        "model": structure(model),
        "kv_cache": [list(kv_cache.shape), str(kv_cache.dtype), str(kv_cache.device)],
        "graph": list(shape),
    }
    return json.loads(json.dumps(key))  # as the file's header reads back (tuples as lists)


def step_file(key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    return steps_dir() / f"{digest}.step"


def load(key: dict) -> Optional[Callable]:
    """The saved graph for `key`, or None (none saved, another key behind the name, kernel choices
    changed since it was built, or it cannot be read: each a quiet miss, logged)."""
    path = step_file(key)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            if header.get("key") != key:
                logger.info("saved decode step %s is for another key: building it again", path.name)
                return None
            changed = machine.changed_choices(header.get("choices", {}))
            if changed:
                logger.info("saved decode step %s was built under other kernel choices (%s): building it again", path.name, ", ".join(changed))
                return None
            # Inductor runs the compiler's preprocessor over its C++ wrapper's header, to key a
            # precompiled form of it, before it looks for the built library (0.17 s a graph): a
            # saved step's libraries are built already (one that is not builds without it).
            from torch._inductor import config as inductor_config

            with inductor_config.patch(cpp_cache_precompile_headers=False):
                fn = torch.compiler.load_compiled_function(io.BytesIO(f.read()))
        os.utime(path)  # recently used: kept when older files are pruned
        return fn
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001  a file torch can no longer read is rebuilt and replaced
        logger.info("saved decode step %s could not be loaded (%s: %s): building it again", path.name, type(e).__name__, str(e)[:200])
        return None


def save(fn: Any, key: dict) -> None:
    """Write the graph `fn` (an aot_compile result) for `key`, atomically, and prune old files.
    A cache that cannot be written only costs the next process a trace (logged)."""
    path = step_file(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = type(fn).serialize(fn).serialized_data
        header = json.dumps({"key": key, "choices": machine.choices_made()}).encode() + b"\n"
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
        os.replace(tmp, path)
        _prune(path.parent)
    except Exception as e:  # noqa: BLE001
        logger.info("could not save the compiled decode step to %s (%s: %s)", path, type(e).__name__, str(e)[:200])
    finally:  # a disk that filled up midway, or the process ending (a BaseException), keeps no partial file
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _prune(folder: Path) -> None:
    files = []
    for p in folder.glob("*.step"):
        try:
            files.append((p.stat().st_mtime, p))
        except OSError:
            pass
    for _, p in sorted(files, reverse=True)[KEEP:]:
        try:
            p.unlink()
        except OSError:
            pass


def serializable_guards(entries: Any) -> list[bool]:
    """The guards kept with a saved graph: those on its inputs' shapes, strides and dtypes and
    on grad mode. Dropped: guards on the model's modules (their attributes are in the key), on
    globals, and the kinds torch cannot save (object identities)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [
        not (e.is_global or e.guard_type in unsupported or e.orig_guard.source.is_unspecialized_nn_module())
        for e in entries
    ]


class SavedStep:
    """A decode step over saved (or just built and saved) graphs: each step runs the first graph
    whose guards take its inputs, or `eager` where none does (a shape no warm-up covered)."""

    def __init__(self, model: torch.nn.Module, eager: Callable) -> None:
        self.model = model
        self.eager = eager
        self.graphs: list[Any] = []
        self.loaded = 0  # graphs read from the steps folder
        self.built = 0  # graphs traced and compiled in this process
        self.missed = False  # a step ran eagerly (said once)

    def graph_for(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> Optional[Any]:
        for g in self.graphs:
            if g.guard_check(self.model, input_ids, positions, attn):
                return g
        return None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        g = self.graph_for(input_ids, positions, attn)
        if g is None:
            if not self.missed:
                self.missed = True
                logger.info("a decode step of %d rows over %d keys matched no saved graph: run eagerly", len(input_ids), attn.decode_mask.shape[-1])
            return self.eager(self.model, input_ids, positions, attn)
        return g(self.model, input_ids, positions, attn)  # its guards were just checked: check disabled
