"""The config.json of the newer open Pangu MoE models, read in any of the three key styles.

openPangu-R-72B-2512 (`PanguProMoEV2ForCausalLM`) and openPangu-Ultra-MoE-718B
(`PanguUltraMoEForCausalLM`) are described by the same facts under three sets of names:

- DeepSeek style, as vLLM reads them: `q_lora_rank`, `n_routed_experts`, `first_k_dense_replace`,
  `num_nextn_predict_layers`, ... (and for R-72B `qk_nope_dim`, `qk_rope_dim`, `v_channels`);
- the older Pangu style (transformers PR #42229, the first GitCode code): `attention_q_lora_dim`,
  `num_routed_experts`, `num_dense_layers`, `num_mtp_layers`, ...;
- omni-infer's: `num_experts`, `mlp_only_layers` (a list of the dense layers), and
  `shared_expert_intermediate_size` (the shared experts' total width).

`family_fields(d, arch)` reads whichever is present into one normalised dict of `ModelConfig`
fields. Two names for the same fact with different values, a dense-layer list that is not the
first layers, a field that would change the function in a way this engine does not compute (group
routing, a sliding window, attention biases, a rope scaling), and a field no style knows all get a
ConfigError that names the field.
"""

from __future__ import annotations

import math
from typing import Any

PRO_MOE_V2 = "PanguProMoEV2ForCausalLM"
ULTRA_MOE = "PanguUltraMoEForCausalLM"
FAMILY_ARCHITECTURES = (PRO_MOE_V2, ULTRA_MOE)

# canonical name -> the other styles' names for the same value
ALIASES: dict[str, tuple[str, ...]] = {
    "q_lora_rank": ("attention_q_lora_dim",),
    "kv_lora_rank": ("attention_kv_lora_dim",),
    "qk_nope_head_dim": ("attention_qk_dim", "qk_nope_dim"),
    "qk_rope_head_dim": ("attention_qk_rope_dim", "qk_rope_dim"),
    "v_head_dim": ("attention_v_dim", "v_channels"),
    "n_routed_experts": ("num_routed_experts", "num_experts"),
    "n_shared_experts": ("num_shared_experts",),
    "first_k_dense_replace": ("num_dense_layers",),
    "num_nextn_predict_layers": ("num_mtp_layers",),
}
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

# Fields every style may carry that change nothing here (training, bookkeeping, token ids, and
# the facts read by ModelConfig itself).
_HARMLESS = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "hidden_dropout", "tie_word_embeddings", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "hidden_act", "intermediate_size", "moe_intermediate_size",
    "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor", "router_enable_expert_bias",
    "sandwich_norm", "param_sink_number", "param_sink_with_value", "param_sink_scalar",
    "param_sink_of_head_dim", "quantization_config", "output_router_logits", "router_aux_loss_coef",
    "aux_loss_alpha", "seq_aux", "ep_size", "moe_layer_freq", "pretraining_tp", "is_causal",
    "shared_expert_intermediate_size", "mlp_only_layers", "rope_scaling", "rope_parameters",
    "topk_method", "scoring_func", "n_group", "topk_group", "attention_bias", "mlp_bias", "bias",
    "qkv_bias", "interleaved_sliding_window", "sliding_window", "head_dim", "rope_interleave",
    "num_expert_groups", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_return_dict", "keys_to_ignore_at_inference", "id2label", "label2id",
}


class FamilyConfigError(ValueError):
    """Raised as pangu_infer.config.ConfigError by the caller (kept separate to avoid a cycle)."""


def _canonical(d: dict[str, Any], name: str) -> Any:
    """The value under `name` or one of its aliases; contradicting values are an error."""
    found = {k: d[k] for k in (name, *ALIASES.get(name, ())) if d.get(k) is not None}
    values = list(found.values())
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"{k}={v!r}" for k, v in found.items())
        raise FamilyConfigError(f"contradictory config fields: {shown} name the same value")
    return values[0] if values else None


def _int(d: dict, name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FamilyConfigError(f"config field {name}={value!r} must be an integer >= {minimum}")
    return value


def _required(d: dict, name: str, minimum: int = 1) -> int:
    value = _canonical(d, name)
    if value is None:
        styles = " / ".join((name, *ALIASES.get(name, ())))
        raise FamilyConfigError(f"config is missing the required field {styles!r}")
    return _int(d, name, value, minimum)


def _flag(d: dict, name: str, default: bool) -> bool:
    value = d.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FamilyConfigError(f"config field {name}={value!r} must be true or false")
    return value


def family_fields(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """Normalised ModelConfig fields of a PanguProMoEV2 / PanguUltraMoE config.json dict."""
    known = set(_HARMLESS) | set(ALIASES) | {a for names in ALIASES.values() for a in names}
    unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
    if unknown:
        raise FamilyConfigError(
            f"unknown config field(s) {', '.join(unknown)} for {arch}: not in the DeepSeek, older Pangu "
            "or omni-infer key style; remove them or check the spelling"
        )
    _check_unsupported(d)
    layers = _required(d, "num_hidden_layers")
    out: dict[str, Any] = {}

    # ---- attention
    nope, rope, vdim = _required(d, "qk_nope_head_dim"), _required(d, "qk_rope_head_dim"), _required(d, "v_head_dim")
    if rope % 2:
        raise FamilyConfigError(f"config field qk_rope_head_dim={rope} must be even (rotary pairs)")
    out.update(qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vdim, head_dim=nope + rope)
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != nope + rope:
        raise FamilyConfigError(
            f"contradictory config fields: head_dim={head_dim!r} but qk_nope_head_dim + qk_rope_head_dim = {nope + rope}"
        )
    if arch == ULTRA_MOE:
        q_rank = _canonical(d, "q_lora_rank")
        out["q_lora_rank"] = 0 if q_rank is None else _int(d, "q_lora_rank", q_rank, 1)
        out["kv_lora_rank"] = _required(d, "kv_lora_rank")
        out["param_sink_number"] = 0
        if d.get("param_sink_number"):
            raise FamilyConfigError(f"config field param_sink_number={d['param_sink_number']!r}: {ULTRA_MOE} has no sinks")
    else:
        mla = [k for k in ("q_lora_rank", "kv_lora_rank") if _canonical(d, k) is not None]
        if mla:
            raise FamilyConfigError(
                f"config field {mla[0]} is an MLA field, but {PRO_MOE_V2} has grouped-query attention "
                "(vLLM would take the MLA path for it): remove it, or use PanguUltraMoEForCausalLM"
            )
        sinks = d.get("param_sink_number") or 0
        out["param_sink_number"] = _int(d, "param_sink_number", sinks, 0)
        out["param_sink_with_value"] = _flag(d, "param_sink_with_value", False)

    # ---- MoE
    experts = _required(d, "n_routed_experts")
    top_k = _required(d, "num_experts_per_tok")
    if top_k > experts:
        raise FamilyConfigError(f"config field num_experts_per_tok={top_k} exceeds n_routed_experts={experts}")
    moe_inter = _required(d, "moe_intermediate_size")
    shared = _canonical(d, "n_shared_experts")
    shared_width = d.get("shared_expert_intermediate_size")
    if shared_width is not None:
        _int(d, "shared_expert_intermediate_size", shared_width, 0)
        if shared is not None and shared * moe_inter != shared_width:
            raise FamilyConfigError(
                f"contradictory config fields: shared_expert_intermediate_size={shared_width} but "
                f"n_shared_experts={shared} x moe_intermediate_size={moe_inter} = {shared * moe_inter}"
            )
    else:
        shared_width = _int(d, "n_shared_experts", 0 if shared is None else shared, 0) * moe_inter
    dense = _canonical(d, "first_k_dense_replace")
    only = d.get("mlp_only_layers")
    if only is not None:
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            raise FamilyConfigError(f"config field mlp_only_layers={only!r} must be a list of layer indices")
        if sorted(only) != list(range(len(only))):
            raise FamilyConfigError(
                f"config field mlp_only_layers={only!r}: only the first layers can be dense here (0, 1, ..., k-1)"
            )
        if dense is not None and dense != len(only):
            raise FamilyConfigError(
                f"contradictory config fields: mlp_only_layers={only!r} ({len(only)} dense layers) but "
                f"first_k_dense_replace={dense}"
            )
        dense = len(only)
    dense = _int(d, "first_k_dense_replace", 0 if dense is None else dense, 0)
    if dense > layers:
        raise FamilyConfigError(f"config field first_k_dense_replace={dense} exceeds num_hidden_layers={layers}")
    scale = d.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise FamilyConfigError(f"config field routed_scaling_factor={scale!r} must be a finite positive number")
    mtp = _canonical(d, "num_nextn_predict_layers")
    out.update(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_width,
        first_k_dense_replace=dense,
        routed_scaling_factor=float(scale),
        norm_topk_prob=_flag(d, "norm_topk_prob", True),
        router_bias=_flag(d, "router_enable_expert_bias", False),
        num_mtp_layers=_int(d, "num_nextn_predict_layers", 0 if mtp is None else mtp, 0),
        # Ultra-MoE: the release carries the sandwich norms (spec §6.2); absent means on.
        sandwich_norm=_flag(d, "sandwich_norm", True),
    )
    if dense < layers and moe_inter <= 0:
        raise FamilyConfigError(f"config field moe_intermediate_size={moe_inter} must be positive")
    if dense and not isinstance(d.get("intermediate_size"), int):
        raise FamilyConfigError(f"config field intermediate_size={d.get('intermediate_size')!r} must be an integer (the dense layers' width)")
    return out


def _check_unsupported(d: dict[str, Any]) -> None:
    """Fields whose values would change the function in ways not computed here."""
    for key in ("n_group", "topk_group"):
        if d.get(key) not in (None, 1):
            raise FamilyConfigError(f"config field {key}={d[key]!r}: group-limited routing is not supported (1 is)")
    if d.get("scoring_func") not in (None, "sigmoid"):
        raise FamilyConfigError(f"config field scoring_func={d['scoring_func']!r}: the router here is sigmoid")
    if d.get("topk_method") not in (None, "noaux_tc", "greedy"):
        raise FamilyConfigError(f"config field topk_method={d['topk_method']!r} is not supported (noaux_tc, greedy)")
    for key in ("attention_bias", "mlp_bias", "bias", "qkv_bias"):
        if d.get(key):
            raise FamilyConfigError(f"config field {key}={d[key]!r}: these models have no biases")
    for key in ("interleaved_sliding_window", "sliding_window"):
        if d.get(key):
            raise FamilyConfigError(f"config field {key}={d[key]!r}: sliding-window attention is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise FamilyConfigError(f"config field hidden_act={d['hidden_act']!r}: only silu is supported")
    if d.get("rope_interleave") is False:
        raise FamilyConfigError("config field rope_interleave=false: these models use interleaved RoPE")
    for key in ("rope_scaling", "rope_parameters"):
        rs = d.get(key)
        if rs is None:
            continue
        if not isinstance(rs, dict):
            raise FamilyConfigError(f"config field {key}={rs!r} must be an object or null")
        kind = rs.get("rope_type", rs.get("type", "default"))
        trivial = kind == "default" or (
            kind in ("deepseek_yarn", "yarn")
            and rs.get("factor", 1) == 1
            and rs.get("mscale", 1) == rs.get("mscale_all_dim", 1)
        )
        if not trivial:
            raise FamilyConfigError(f"config field {key}={rs!r}: only plain RoPE (or yarn with factor 1) is supported")


def family_rope_theta(d: dict[str, Any]) -> float:
    """rope_theta, or rope_parameters.rope_theta (the newer transformers style); both must agree."""
    found = {}
    if d.get("rope_theta") is not None:
        found["rope_theta"] = d["rope_theta"]
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_theta") is not None:
        found["rope_parameters.rope_theta"] = rp["rope_theta"]
    values = list(found.values())
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"{k}={v!r}" for k, v in found.items())
        raise FamilyConfigError(f"contradictory config fields: {shown}")
    theta = values[0] if values else 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise FamilyConfigError(f"config field rope_theta={theta!r} must be a finite positive number")
    return float(theta)
