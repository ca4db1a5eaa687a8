"""Random checkpoints with the real tensor names, for tests and benchmarks (no download needed)."""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file

from pangu_infer.config import ModelConfig
from pangu_infer.models.registry import build_model_on_meta

PANGU_7B_FIELDS = {
    "architectures": ["PanguEmbeddedForCausalLM"],
    "model_type": "PanguEmbedded",
    "bias": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 16000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "pad_token_id": 0,
}


def _sized_config(base: dict, **fields) -> dict:
    d = dict(base)
    d.update(fields, torch_dtype="float32")
    return d


def pangu_dense_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    eos_token_id: int = 2,
    **extra,
) -> dict:
    """An HF config.json dict with the real openPangu-Embedded field names, at any size."""
    return _sized_config(
        PANGU_7B_FIELDS,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_token_id,
        **extra,
    )


PANGU_PRO_MOE_FIELDS = {
    "architectures": ["PanguProMoEForCausalLM"],
    "model_type": "PanguProMoE",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 16000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "pad_token_id": 0,
    "num_experts_per_tok": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def pangu_moge_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    num_experts: int = 64,
    moe_intermediate_size: int = 32,
    shared_expert_intermediate_size: int = 64,
    max_position_embeddings: int = 2048,
    eos_token_id: int = 2,
    **extra,
) -> dict:
    """An HF config.json dict with the real Pangu Pro MoE field names, at any size."""
    return _sized_config(
        PANGU_PRO_MOE_FIELDS,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        num_experts=num_experts,
        moe_intermediate_size=moe_intermediate_size,
        shared_expert_intermediate_size=shared_expert_intermediate_size,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_token_id,
        **extra,
    )


PANGU_R72B_FIELDS = {
    "architectures": ["PanguProMoEV2ForCausalLM"],
    "model_type": "PanguProMoE",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "param_sink_with_value": True,
    "sandwich_norm": True,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "router_enable_expert_bias": True,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 1,
    "pad_token_id": 0,
}


def pangu_r72b_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    qk_nope_dim: int = 16,
    qk_rope_dim: int = 8,
    v_channels: int = 16,
    param_sink_number: int = 4,
    first_k_dense_replace: int = 1,
    intermediate_size: int = 96,
    n_routed_experts: int = 16,
    num_experts_per_tok: int = 4,
    n_shared_experts: int = 2,
    moe_intermediate_size: int = 32,
    max_position_embeddings: int = 2048,
    eos_token_id: int = 2,
    **extra,
) -> dict:
    """An HF config.json dict with openPangu-R-72B-2512's field names (vLLM style), at any size."""
    return _sized_config(
        PANGU_R72B_FIELDS,
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim, v_channels=v_channels,
        param_sink_number=param_sink_number, first_k_dense_replace=first_k_dense_replace,
        intermediate_size=intermediate_size, n_routed_experts=n_routed_experts,
        num_experts_per_tok=num_experts_per_tok, n_shared_experts=n_shared_experts,
        moe_intermediate_size=moe_intermediate_size, max_position_embeddings=max_position_embeddings,
        eos_token_id=eos_token_id, **extra,
    )


PANGU_ULTRA_FIELDS = {
    "architectures": ["PanguUltraMoEForCausalLM"],
    "model_type": "pangu_ultra_moe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 25600000,
    "tie_word_embeddings": False,
    "sandwich_norm": True,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 1,
    "pad_token_id": 0,
}


def pangu_ultra_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 8,
    q_lora_rank: int = 24,
    kv_lora_rank: int = 32,
    qk_nope_head_dim: int = 16,
    qk_rope_head_dim: int = 8,
    v_head_dim: int = 16,
    first_k_dense_replace: int = 1,
    intermediate_size: int = 96,
    n_routed_experts: int = 16,
    num_experts_per_tok: int = 4,
    n_shared_experts: int = 1,
    moe_intermediate_size: int = 32,
    max_position_embeddings: int = 2048,
    eos_token_id: int = 2,
    **extra,
) -> dict:
    """An HF config.json dict with openPangu-Ultra-MoE-718B's field names (DeepSeek style), at any size."""
    return _sized_config(
        PANGU_ULTRA_FIELDS,
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
        first_k_dense_replace=first_k_dense_replace, intermediate_size=intermediate_size,
        n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
        n_shared_experts=n_shared_experts, moe_intermediate_size=moe_intermediate_size,
        max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id, **extra,
    )


def transformers_llama(config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """The peer model of tests and benchmarks: transformers' LlamaForCausalLM with q/k/v/o biases
    (Pangu 7B's layout) holding the same weights; generate() never stops at an eos."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        attention_bias=True,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    weights = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(weights, strict=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def random_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor a real checkpoint of this config holds, by HF name, with O(1) activations."""
    return dict(random_tensors(config, seed, dtype))


def random_tensors(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """random_state_dict's tensors one at a time, in the same order and with the same values (for
    checkpoints too large to hold twice)."""
    cfg = ModelConfig.from_hf_dict(config)
    model = build_model_on_meta(cfg)
    g = torch.Generator().manual_seed(seed)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for name in model.expected_weight_names():
        shapes[name] = _family_shape(model, name) if cfg.is_topk_moe else _hf_shape(name, cfg, h, q, kv)
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("router_scale"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.2 * torch.randn(shape, generator=g)  # sigmoid scores lie in (0, 1): this reorders some
        elif name.endswith(("param_sink_key", "param_sink_value")):
            t = torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        yield name, t.to(dtype)


DUMMY_SEED = 0  # load_format "dummy": every load of a config, and every tensor-parallel rank, the same weights


def dummy_tensors(model_dir: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The random weights of load_format "dummy" (vLLM's): random_tensors of the folder's config.json
    (as random_state_dict(config, DUMMY_SEED) holds them), one tensor at a time, in `dtype`."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return random_tensors(config, DUMMY_SEED, dtype)


def _family_shape(model, name: str) -> tuple[int, ...]:
    """The checkpoint shape of a PanguProMoEV2 / PanguUltraMoE tensor: its slice of the model's parameter."""
    target, index = model.map_weight_name(name)
    param = model.get_parameter(target)
    return tuple(param[index].shape) if index is not None else tuple(param.shape)


def _hf_shape(name: str, cfg: ModelConfig, h: int, q: int, kv: int) -> tuple[int, ...]:
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if name.endswith("norm.weight"):
        return (h,)
    if ".self_attn." in name:
        proj = name.split(".self_attn.")[1].split("_proj")[0]
        out_dim = {"q": q, "k": kv, "v": kv, "o": h}[proj]
        in_dim = q if proj == "o" else h
        return (out_dim,) if name.endswith(".bias") else (out_dim, in_dim)
    if name.endswith("mlp.gate.weight"):
        return (cfg.num_experts, h)
    if name.endswith("router_scale"):
        return (1, cfg.num_experts)
    if ".experts." in name:
        inter = cfg.moe_intermediate_size
    elif ".shared_expert." in name:
        inter = cfg.shared_expert_intermediate_size
    else:
        inter = cfg.intermediate_size
    if "down_proj" in name:
        return (h,) if name.endswith(".bias") else (h, inter)
    return (inter,) if name.endswith(".bias") else (inter, h)


def write_checkpoint(
    out_dir: str,
    config: dict,
    tensors: dict[str, torch.Tensor],
    num_shards: int = 1,
    extra_tensors: Optional[dict[str, torch.Tensor]] = None,
) -> str:
    """Write config.json and the tensors as one model.safetensors or N shards plus the index."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    items = dict(tensors)
    items.update(extra_tensors or {})
    names = list(items)
    if num_shards == 1:
        save_file({k: v.contiguous() for k, v in items.items()}, os.path.join(out_dir, "model.safetensors"))
        return out_dir
    per = -(-len(names) // num_shards)
    weight_map = {}
    total = 0
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: items[k].contiguous() for k in names[i * per : (i + 1) * per]}
        save_file(part, os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir
