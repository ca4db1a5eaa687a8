"""One model configuration for every supported architecture, built from HF config.json or GGUF."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from pangu_infer.config_family import FAMILY_ARCHITECTURES, ULTRA_MOE, FamilyConfigError, family_fields, family_rope_theta

logger = logging.getLogger(__name__)

DENSE_ARCHITECTURES = ("PanguEmbeddedForCausalLM", "LlamaForCausalLM")
MOGE_ARCHITECTURES = ("PanguProMoEForCausalLM",)
# Top-k sigmoid-routed MoE with dense first layers and sandwich norm (pangu_infer/config_family.py)
TOPK_MOE_ARCHITECTURES = FAMILY_ARCHITECTURES
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOGE_ARCHITECTURES + TOPK_MOE_ARCHITECTURES
MODEL_TYPE_TO_ARCH = {
    "PanguEmbedded": "PanguEmbeddedForCausalLM",
    "llama": "LlamaForCausalLM",
    "PanguProMoE": "PanguProMoEForCausalLM",
    "pangu_ultra_moe": "PanguUltraMoEForCausalLM",
}
SUPPORTED_ROPE_SCALING = ("llama3", "linear")


class ConfigError(ValueError):
    """A config.json (or GGUF metadata) that this engine cannot run; the message names the field."""


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None
    # Mixture of Grouped Experts (PanguProMoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    num_expert_groups: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    quantization_config: Optional[dict] = None
    # PanguProMoEV2 / PanguUltraMoE (normalised from any key style by pangu_infer/config_family.py)
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    router_bias: bool = False  # e_score_correction_bias, used to select experts only
    sandwich_norm: bool = False
    num_mtp_layers: int = 0  # stored after the last layer; skipped
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # interleaved RoPE: the first dims of a head (V2), the last (MLA)
    v_head_dim: int = 0
    q_lora_rank: int = 0  # MLA (Ultra); 0 = a plain q_proj
    kv_lora_rank: int = 0  # MLA: the cached latent's width
    param_sink_number: int = 0  # V2: learned sink keys (and values) every query sees
    param_sink_with_value: bool = False

    @property
    def is_moge(self) -> bool:
        return self.architecture in MOGE_ARCHITECTURES

    @property
    def is_topk_moe(self) -> bool:
        return self.architecture in TOPK_MOE_ARCHITECTURES

    @property
    def is_moe(self) -> bool:
        """Routed experts of either kind (MoGE, or sigmoid top-k)."""
        return self.is_moge or self.is_topk_moe

    @property
    def is_mla(self) -> bool:
        return self.architecture == ULTRA_MOE

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moge or (self.is_topk_moe and layer >= self.first_k_dense_replace)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_expert_groups if self.is_moge else 0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        if self.is_mla:  # the compressed latent and the one rope key shared by the heads
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * elem
        if self.is_topk_moe:  # K and V heads of different widths (the sinks are parameters, not per token)
            return self.num_hidden_layers * self.num_key_value_heads * (self.head_dim + self.v_head_dim) * elem
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = _architecture(d)
        if arch in TOPK_MOE_ARCHITECTURES:
            return cls._from_family_dict(d, arch)
        get = _Getter(d)
        # the MLP's activation is SiLU (transformers' "silu" and "swish" alike): any other would run as SiLU
        if d.get("hidden_act") not in (None, "silu", "swish"):
            raise ConfigError(f"config field hidden_act={d['hidden_act']!r}: only silu is supported")
        hidden = get.int("hidden_size")
        heads = get.int("num_attention_heads")
        kv_heads = get.int("num_key_value_heads", default=heads)
        if heads <= 0:
            raise ConfigError(f"config field num_attention_heads={heads} must be positive")
        if kv_heads <= 0 or heads % kv_heads:
            raise ConfigError(
                f"config field num_key_value_heads={kv_heads} must divide num_attention_heads={heads}"
            )
        head_dim = get.int("head_dim", default=0) or 0
        if head_dim < 0:
            raise ConfigError(f"config field head_dim={head_dim} must be positive")
        if not head_dim:
            if hidden % heads:
                raise ConfigError(
                    f"config field hidden_size={hidden} is not divisible by num_attention_heads={heads}"
                )
            head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")

        if arch == "PanguEmbeddedForCausalLM":
            qkv_bias = o_bias = get.flag("bias")
        elif arch == "PanguProMoEForCausalLM":
            qkv_bias = o_bias = True  # always on in the release, not a config key
        else:
            qkv_bias = o_bias = get.flag("attention_bias")

        cfg = cls(
            architecture=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size", default=0 if arch in MOGE_ARCHITECTURES else None),
            num_hidden_layers=get.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get.positive_float("rms_norm_eps", default=1e-5),
            rope_theta=get.positive_float("rope_theta", default=10000.0),
            rope_scaling=_rope_scaling(d.get("rope_scaling")),
            max_position_embeddings=get.int("max_position_embeddings", default=4096),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=get.flag("mlp_bias"),
            tie_word_embeddings=get.flag("tie_word_embeddings"),
            torch_dtype=_torch_dtype(d),
            quantization_config=d.get("quantization_config"),
        )
        if arch in MOGE_ARCHITECTURES:
            cfg.num_experts = get.int("num_experts")
            cfg.num_experts_per_tok = get.int("num_experts_per_tok")
            cfg.num_expert_groups = get.int("num_expert_groups", default=8)
            cfg.moe_intermediate_size = get.int("moe_intermediate_size")
            cfg.shared_expert_intermediate_size = get.int("shared_expert_intermediate_size")
            for name in ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(cfg, name) <= 0:
                    raise ConfigError(f"config field {name}={getattr(cfg, name)} must be positive")
            if cfg.num_expert_groups <= 0 or cfg.num_experts % cfg.num_expert_groups:
                raise ConfigError(
                    f"config fields num_experts={cfg.num_experts} and num_expert_groups="
                    f"{cfg.num_expert_groups}: the experts must divide evenly into the groups"
                )
            if cfg.num_experts_per_tok != cfg.num_expert_groups:
                raise ConfigError(
                    f"config field num_experts_per_tok={cfg.num_experts_per_tok} must equal "
                    f"num_expert_groups={cfg.num_expert_groups}: MoGE picks one expert per group"
                )
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")
        for name in sizes + (() if arch in MOGE_ARCHITECTURES else ("intermediate_size",)):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"config field {name}={getattr(cfg, name)} must be positive")
        cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id = token_ids(d, cfg.vocab_size)
        return cfg

    @classmethod
    def _from_family_dict(cls, d: dict[str, Any], arch: str) -> "ModelConfig":
        try:
            fam = family_fields(d, arch)
            theta = family_rope_theta(d)
        except FamilyConfigError as e:
            raise ConfigError(str(e)) from None
        get = _Getter(d)
        heads = get.int("num_attention_heads")
        if heads <= 0:
            raise ConfigError(f"config field num_attention_heads={heads} must be positive")
        if arch == ULTRA_MOE:
            kv_heads = heads  # MLA: every head reads the one latent (num_key_value_heads is unused)
        else:
            kv_heads = get.int("num_key_value_heads", default=heads)
            if kv_heads <= 0 or heads % kv_heads:
                raise ConfigError(
                    f"config field num_key_value_heads={kv_heads} must divide num_attention_heads={heads}"
                )
        cfg = cls(
            architecture=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=get.int("hidden_size"),
            intermediate_size=get.int("intermediate_size", default=0),
            num_hidden_layers=get.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=get.positive_float("rms_norm_eps", default=1e-5),
            rope_theta=theta,
            max_position_embeddings=get.int("max_position_embeddings", default=4096),
            tie_word_embeddings=get.flag("tie_word_embeddings"),
            torch_dtype=_torch_dtype(d),
            quantization_config=d.get("quantization_config"),
            **fam,
        )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"config field {name}={getattr(cfg, name)} must be positive")
        if cfg.first_k_dense_replace and cfg.intermediate_size <= 0:
            raise ConfigError(
                f"config field intermediate_size={cfg.intermediate_size} must be positive (the width of the "
                f"first_k_dense_replace={cfg.first_k_dense_replace} dense layers)"
            )
        cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id = token_ids(d, cfg.vocab_size)
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_hf_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    mt = d.get("model_type")
    if not archs and mt in MODEL_TYPE_TO_ARCH:
        return MODEL_TYPE_TO_ARCH[mt]
    shown = archs or mt
    raise ConfigError(
        f"unsupported architecture {shown!r} (config field 'architectures'/'model_type'); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_scaling(rs: Any) -> Optional[dict]:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"config field rope_scaling={rs!r} must be an object or null")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(
            f"config field rope_scaling has unsupported type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
        )
    factor = rs.get("factor")
    if not _positive_number(factor):
        raise ConfigError(f"config field rope_scaling.factor={factor!r} must be a positive number")
    out = dict(rs)
    out["rope_type"] = kind
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if rs.get(key) is None:
                raise ConfigError(f"config field rope_scaling.{key}={rs.get(key)!r} is required for llama3 scaling")
            if not _positive_number(rs[key]):
                raise ConfigError(f"config field rope_scaling.{key}={rs[key]!r} must be a positive number")
        if rs["high_freq_factor"] <= rs["low_freq_factor"]:
            raise ConfigError(
                f"config field rope_scaling.high_freq_factor={rs['high_freq_factor']!r} must exceed "
                f"low_freq_factor={rs['low_freq_factor']!r}"
            )
    return out


def _positive_number(v: Any) -> bool:
    """A finite number above 0 (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _is_token_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A load-time warning given once per process: a model's files are read more than once per
    load (the memory check, the plan, the load itself), and the same fault is said once."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def token_ids(d: dict[str, Any], vocab_size: int, source: str = "config") -> tuple[Optional[int], list[int], Optional[int]]:
    """(bos_token_id, eos_token_ids, pad_token_id) of a config.json or generation_config.json dict
    (`source` names it in errors): eos an id or a list of ids, bos an id, pad an id; a value that
    is not an integer is an error. An id outside [0, vocab_size) is read as none, with one warning
    (bos, eos) or none (pad: -1 is older Llama conversions' "none", or a pad token added past the
    embedding), as transformers loads such a config (its generate only never meets that eos) and
    llama.cpp a GGUF's ("bad special token ..., using default id"): an eos no token can be never
    ends a sequence, and the model still runs (its other eos ids, or max_tokens, end replies)."""
    def check(name: str, v: Any) -> Optional[int]:
        if not _is_token_id(v):
            raise ConfigError(f"{source} field {name}={v!r} must be a token id (an integer)")
        if not 0 <= v < vocab_size:
            warn_once(f"{source} field {name}={v} is outside the vocabulary (vocab_size={vocab_size}): ignored"
                      + (" (no token of the model can be it)" if name == "eos_token_id" else ""))
            return None
        return v

    eos = d.get("eos_token_id")
    listed = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(_is_token_id(v) for v in listed):
        raise ConfigError(f"{source} field eos_token_id={eos!r} must be a token id or a list of token ids (integers)")
    eos_ids = [v for v in (check("eos_token_id", v) for v in listed) if v is not None]
    bos, pad = d.get("bos_token_id"), d.get("pad_token_id")
    if _is_token_id(pad) and not 0 <= pad < vocab_size:
        pad = None  # (no warning: -1 is a common spelling of none)
    return (None if bos is None else check("bos_token_id", bos)), eos_ids, (None if pad is None else check("pad_token_id", pad))


# HF's torch_dtype values: torch dtype names, with or without "torch.", and "auto"
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


def _torch_dtype(d: dict[str, Any]) -> Optional[str]:
    """The dtype the checkpoint was saved in: torch_dtype (or dtype, newer transformers' name) as a
    torch dtype name without "torch." ("bfloat16"), "auto", or None; anything else is an error."""
    found = None
    for key in ("torch_dtype", "dtype"):
        v = d.get(key)
        if v is None:
            continue
        name = v.removeprefix("torch.") if isinstance(v, str) else None
        if name != "auto" and name not in _TORCH_DTYPES:
            raise ConfigError(
                f"config field {key}={v!r} is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32' or 'auto')"
            )
        found = found or name
    return found


class _Getter:
    """Reads typed fields from a config dict; errors name the field and the value."""

    _MISSING = object()

    def __init__(self, d: dict[str, Any]):
        self.d = d

    def _get(self, key: str, default: Any) -> Any:
        v = self.d.get(key)
        if v is not None:
            return v
        if default is self._MISSING or default is None:
            raise ConfigError(f"config is missing the required field {key!r}")
        return default

    def int(self, key: str, default: Any = _MISSING) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config field {key}={v!r} must be an integer")
        return v

    def float(self, key: str, default: Any = _MISSING) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config field {key}={v!r} must be a number")
        return float(v)

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        v = self.float(key, default)
        if not _positive_number(v):
            raise ConfigError(f"config field {key}={v!r} must be a finite positive number")
        return v

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"config field {key}={v!r} must be true or false")
        return v
