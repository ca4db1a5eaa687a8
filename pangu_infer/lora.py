"""LoRA adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), served
beside the base model like vLLM's: `LLM(..., enable_lora=True)` and a `LoRARequest` per request.

This module reads and checks an adapter folder against a model's projections
(models/lora.LoRAState.shapes); the engine installs what it returns (engine/engine.py, add_lora).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A PEFT tensor name: base_model.model.<module>.<kind>[.<adapter name>].weight, where kind is
# lora_A / lora_B for LoRA, other names (base_layer, lora_magnitude_vector, ...) for what is not.
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_[A-Za-z_]+|base_layer)\b(?P<rest>.*)$")
_LORA_AB = re.compile(r"^(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with (vLLM's fields): a name, a positive integer id of the
    caller's choosing, and the adapter's folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise ValueError(f"lora_name={self.lora_name!r} must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id={self.lora_int_id!r} must be a positive integer")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not str(self.lora_path):
            raise ValueError(f"lora_path={self.lora_path!r} must be the path of an adapter folder")


@dataclass
class LoRAAdapter:
    """An adapter read and checked: per HF module name, A [r, in] and B [out, r] with PEFT's
    scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) already multiplied into B."""

    path: str
    rank: int  # the largest of its modules
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def resolve_adapter_path(path: str) -> str:
    """A local adapter folder, or a hub id (org/name) whose adapter files are downloaded with
    huggingface_hub (as vLLM resolves a lora_path); ValueError naming it otherwise."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise ValueError(f"LoRA adapter {path!r} is a file; pass the adapter's folder (with {ADAPTER_CONFIG})")
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise ValueError(f"LoRA adapter {path!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    except Exception as e:  # network, auth and not-found errors all end here
        raise ValueError(f"LoRA adapter {path!r} is not a local folder and could not be downloaded from the hub: {e}") from None


def _config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise ValueError(f"LoRA adapter {path!r}: no {ADAPTER_CONFIG} (a PEFT adapter folder has one)")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA adapter {path!r}: {ADAPTER_CONFIG} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"LoRA adapter {path!r}: {ADAPTER_CONFIG} is not a JSON object")

    def refuse(field: str, why: str) -> None:
        raise ValueError(f"LoRA adapter {path!r}: {field}={cfg.get(field)!r} is not supported ({why})")

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", "only LORA adapters are")
    if cfg.get("use_dora"):
        refuse("use_dora", "DoRA's magnitude vectors are not applied")
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "GPT-2 style Conv1D weights")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        refuse("bias" if cfg.get("bias", "none") != "none" else "lora_bias", "adapters with biases")
    if cfg.get("modules_to_save"):
        refuse("modules_to_save", "adapters that replace whole modules")
    if cfg.get("layer_replication"):
        refuse("layer_replication", "adapters that duplicate layers")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(field) or {}, dict):
            refuse(field, "expected an object")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        refuse("r", "expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        refuse("lora_alpha", "expected a number")
    return cfg


def read_lora_adapter(
    path: str, shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype, device: torch.device
) -> LoRAAdapter:
    """Read a PEFT adapter folder for a model whose targetable projections are `shapes` (HF module
    name -> (in, out)); ValueError naming the folder and what does not fit."""
    from safetensors import SafetensorError, safe_open

    path = resolve_adapter_path(os.fspath(path))
    cfg = _config(path)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(
                f"LoRA adapter {path!r}: only adapter_model.bin (a pickle, which this engine does not load); "
                "save it with safetensors (PEFT's save_pretrained does by default)"
            )
        raise ValueError(f"LoRA adapter {path!r}: no {ADAPTER_WEIGHTS}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                m = _TENSOR.match(name)
                if m is not None and m.group("module") not in shapes:
                    raise ValueError(
                        f"LoRA adapter {path!r}: tensor {name!r} targets {m.group('module')!r}, which this engine cannot "
                        "apply LoRA to (it applies it to the q/k/v/o projections and the dense MLPs' gate/up/down of this model)"
                    )
                if m is None or m.group("kind") not in ("lora_A", "lora_B") or not _LORA_AB.match(m.group("rest")):
                    raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} is not a LoRA A/B matrix of a linear layer")
                pairs.setdefault(m.group("module"), {})[m.group("kind")[-1]] = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA adapter {path!r}: {ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from None
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    top = 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: {module!r} has lora_{''.join(ab)} but not lora_{'AB'.replace(''.join(ab), '')}")
        a, b = ab["A"], ab["B"]
        n_in, n_out = shapes[module]
        r = _pattern_value(rank_pattern, module, cfg["r"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA adapter {path!r}: {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model needs "
                f"A [r, {n_in}] and B [{n_out}, r] (is the adapter for another model?)"
            )
        if a.shape[0] != r:
            raise ValueError(f"LoRA adapter {path!r}: {module!r} has rank {a.shape[0]}, its config says r={r}")
        if r > max_rank:
            raise ValueError(
                f"LoRA adapter {path!r}: rank {r} of {module!r} is above max_lora_rank={max_rank} (raise --max-lora-rank)"
            )
        alpha = _pattern_value(alpha_pattern, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if not torch.isfinite(a).all() or not torch.isfinite(b).all():
            raise ValueError(f"LoRA adapter {path!r}: {module!r} holds non-finite values")
        modules[module] = (
            a.to(device=device, dtype=dtype).contiguous(),
            (b.float() * scale).to(device=device, dtype=dtype).contiguous(),
        )
        top = max(top, r)
    return LoRAAdapter(path, top, modules)
