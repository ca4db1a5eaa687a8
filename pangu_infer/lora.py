"""LoRA adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), or as
llama.cpp's convert_lora_to_gguf.py writes them (one .gguf file), served beside the base model like
vLLM's: `LLM(..., enable_lora=True)` and a `LoRARequest` per request.

This module reads and checks an adapter against a model's projections
(models/lora.LoRAState.shapes); the engine installs what it returns (engine/engine.py, add_lora).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from pangu_infer import hub

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
            raise ValueError(f"lora_path={self.lora_path!r} must be the path of an adapter folder or .gguf file")


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
    if not hub.looks_like_hub_id(path):
        raise ValueError(f"LoRA adapter {path!r}: no such folder")
    return hub.download(path, f"LoRA adapter {path!r} is not a local folder", [ADAPTER_CONFIG, ADAPTER_WEIGHTS], ValueError)


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
    path: str,
    shapes: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    heads: Optional[tuple[int, int]] = None,
) -> LoRAAdapter:
    """Read a PEFT adapter folder, or a llama.cpp GGUF adapter file, for a model whose targetable
    projections are `shapes` (HF module name -> (in, out)) and whose attention has `heads` (query,
    key/value) heads; ValueError naming the adapter and what does not fit."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if path.endswith(".gguf") and os.path.isfile(os.path.expanduser(path)):
        return _read_gguf_adapter(os.path.expanduser(path), shapes, max_rank, dtype, device, heads)
    path = resolve_adapter_path(path)
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
        a, b = _both_halves(path, module, ab)
        r = _pattern_value(rank_pattern, module, cfg["r"])
        alpha = _pattern_value(alpha_pattern, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = _checked_pair(path, module, a, b, shapes, max_rank, scale, dtype, device)
        if a.shape[0] != r:
            raise ValueError(f"LoRA adapter {path!r}: {module!r} has rank {a.shape[0]}, its config says r={r}")
        top = max(top, r)
    return LoRAAdapter(path, top, modules)


def _both_halves(path: str, module: str, ab: dict[str, torch.Tensor], lower: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's (A, B) from {"A": ..., "B": ...}; a ValueError naming the half it lacks, spelled
    as the format names its tensors (lora_A in PEFT's, lora_a with `lower` in GGUF's)."""
    if set(ab) != {"A", "B"}:
        have = "".join(ab)
        spell = str.lower if lower else str
        raise ValueError(f"LoRA adapter {path!r}: {module!r} has lora_{spell(have)} but not lora_{spell('AB'.replace(have, ''))}")
    return ab["A"], ab["B"]


def _checked_pair(
    path: str, module: str, a: torch.Tensor, b: torch.Tensor, shapes: dict[str, tuple[int, int]], max_rank: int,
    scale: float, dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scale) of one projection, in the slots' dtype and device, once its shapes, rank and
    values are checked against the model."""
    n_in, n_out = shapes[module]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"LoRA adapter {path!r}: {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model needs "
            f"A [r, {n_in}] and B [{n_out}, r] (is the adapter for another model?)"
        )
    r = a.shape[0]
    if r > max_rank:
        raise ValueError(f"LoRA adapter {path!r}: rank {r} of {module!r} is above max_lora_rank={max_rank} (raise --max-lora-rank)")
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        raise ValueError(f"LoRA adapter {path!r}: {module!r} holds non-finite values")
    # A copied out of the file (safetensors maps it): the adapter is read on one thread and installed
    # later on another, and a file rewritten meanwhile must not take the mapped pages away (SIGBUS).
    return a.to(device=device, dtype=dtype, copy=True).contiguous(), (b.float() * scale).to(device=device, dtype=dtype).contiguous()


def _read_gguf_adapter(
    path: str, shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype, device: torch.device,
    heads: Optional[tuple[int, int]],
) -> LoRAAdapter:
    """A GGUF LoRA adapter as llama.cpp's convert_lora_to_gguf.py writes it: general.type "adapter",
    adapter.type "lora", adapter.lora.alpha, and per projection `blk.N.<tensor>.weight.lora_a` (A,
    [r, in]) and `.lora_b` (B, [out, r]) in f32/f16/bf16/q8_0. Scaled as llama.cpp scales it:
    alpha / r, or 1 where alpha is 0. For GGUF architecture `llama` the converter reordered the
    q/k projections' rows (LlamaModel.permute), and with them B's rows: put back in HF order."""
    from pangu_infer.loader.gguf import ARCHITECTURES, GGUFError, _dequantize, _hf_name, _Metadata, unpermute_rows
    from pangu_infer.loader.gguf_index import read_gguf_index

    def refuse(why: str) -> ValueError:
        return ValueError(f"LoRA adapter {path!r}: {why}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise refuse("a .gguf file that is not GGUF")
    try:
        reader = read_gguf_index(path)
    except ValueError as e:
        raise refuse(f"cannot read the GGUF file ({e})") from None
    md = _Metadata(reader.metadata, path)
    if md.get("general.type", None) != "adapter":
        raise refuse(f"general.type={md.get('general.type', None)!r}: a GGUF model, not an adapter (serve it with --model)")
    if md.get("adapter.type", None) != "lora":
        raise refuse(f"adapter.type={md.get('adapter.type', None)!r} is not supported (only lora adapters are)")
    if "adapter.alora.invocation_tokens" in md:
        raise refuse("an activated LoRA (adapter.alora.invocation_tokens) is not supported")
    arch = md.get("general.architecture", None)
    if arch not in ARCHITECTURES:
        raise refuse(f"general.architecture={arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    try:
        alpha = md.float("adapter.lora.alpha", 0.0)
    except GGUFError as e:
        raise refuse(str(e)) from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        try:
            hf = _hf_name(base, arch, 1 << 30, path) if kind in ("lora_a", "lora_b") else None
        except GGUFError:
            hf = None
        if hf is None or not hf.endswith(".weight"):
            raise refuse(f"tensor {t.name!r} is not a LoRA A/B matrix of a linear layer (norms or embeddings an adapter replaces are not applied)")
        module = hf[: -len(".weight")]
        if module not in shapes:
            raise refuse(
                f"tensor {t.name!r} targets {module!r}, which this engine cannot apply LoRA to (it applies it to the "
                "q/k/v/o projections and the dense MLPs' gate/up/down of this model)"
            )
        try:
            pairs.setdefault(module, {})[kind[-1].upper()] = _dequantize(t, path).float()
        except GGUFError as e:
            raise refuse(str(e)) from None
    if not pairs:
        raise refuse("the file holds no LoRA tensors")
    permuted = ARCHITECTURES[arch][2]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    top = 0
    for module, ab in sorted(pairs.items()):
        a, b = _both_halves(path, module, ab, lower=True)
        if permuted and module.endswith((".q_proj", ".k_proj")):
            if heads is None:
                raise refuse("its q/k rows are in llama.cpp's order and this model's head counts are unknown")
            n_head = heads[0] if module.endswith(".q_proj") else heads[1]
            if b.dim() != 2 or b.shape[0] % (2 * n_head):
                raise refuse(f"{module!r} has B {tuple(b.shape)}, not rows of {n_head} heads (is the adapter for another model?)")
            b = unpermute_rows(b, n_head)
        rank = a.shape[0] if a.dim() == 2 else 0
        modules[module] = _checked_pair(path, module, a, b, shapes, max_rank, alpha / rank if alpha and rank else 1.0, dtype, device)
        top = max(top, rank)
    return LoRAAdapter(path, top, modules)
