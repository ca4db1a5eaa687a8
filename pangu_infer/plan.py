"""`pangu-infer plan`: what a model needs before any weight is read.

Builds the model from its config.json on the meta device (no weights, no memory) and prints the
total and active parameter counts, the weight bytes at a precision, the KV-cache bytes per token,
and for a memory budget how many tokens of context fit after the weights, per precision.
Weight bytes come from `pangu_infer.quant.loading.quantized_weight_bytes`, the loader's own accounting.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.device import DTYPES
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.registry import build_model_on_meta, count_active_parameters, count_parameters
from pangu_infer.quant.formats import CHOICES, DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, METHODS, QuantizationConfig, parse_quantization
from pangu_infer.quant.loading import quantized_weight_bytes, resolve_quantization

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
GB = 10**9  # decimal gigabytes, as accelerator memory and the paper's "144 GB" are quoted
TABLE_ROWS = ("float32", "bfloat16") + METHODS  # float rows name the dtype, the others a quantization


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or its config.json (no weights needed)")
    parser.add_argument("--dtype", default="bfloat16", choices=FLOAT_DTYPES, help="float dtype of the weights that stay float and of the KV cache (default: bfloat16)")
    parser.add_argument(
        "--quantization", default="auto", choices=CHOICES,
        help="weight-only quantization: auto (default) and none keep the checkpoint's own quantization_config, if any, "
        "as generate and serve do; int8 or int4 quantize a float checkpoint",
    )
    parser.add_argument("--group-size", type=int, default=None, choices=INT4_GROUP_SIZES, help=f"int4 group size (default: {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--memory-gb", type=_positive_gb, default=None, help="memory budget in GB (10^9 bytes): prints how much context fits")


def _positive_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid --memory-gb {text!r}: expected a positive number of GB, e.g. 80")
    return value


def read_config(model: str) -> ModelConfig:
    """The config of a model folder or of a config.json path."""
    path = os.path.expanduser(model)
    if os.path.isfile(path) and not path.endswith(".json"):
        raise ValueError(f"--model {model!r} is a file but not a config.json; pass the model folder or its config.json")
    try:
        return ModelConfig.from_file(path)
    except ConfigError as e:
        raise ConfigError(f"--model {model!r}: {e}") from None


def weight_bytes(
    model: DecoderForCausalLM,
    dtype: torch.dtype,
    quantization: str | QuantizationConfig | None,
    group_size: Optional[int] = None,
) -> int:
    """Resident weight bytes: float parts in `dtype`, quantized weights in the `pangu_infer.quant` format."""
    return quantized_weight_bytes(model, dtype, parse_quantization(quantization, group_size))


def context_tokens(memory_bytes: int, weights: int, kv_per_token: int) -> Optional[int]:
    """Tokens of KV cache that fit next to the weights; None when the weights alone do not fit."""
    if weights > memory_bytes:
        return None
    return (memory_bytes - weights) // kv_per_token


def run(args: argparse.Namespace) -> int:
    if args.group_size is not None and args.quantization != "int4":
        got = f"--quantization {args.quantization}"
        raise ValueError(f"--group-size {args.group_size} applies to --quantization int4 only, got {got}")
    cfg = read_config(args.model)
    model = build_model_on_meta(cfg)
    total, active = count_parameters(model), count_active_parameters(model)
    # A pre-quantized checkpoint's config.json says how its weights are stored.
    quant = resolve_quantization(model, parse_quantization(args.quantization, args.group_size))
    weights = weight_bytes(model, DTYPES[args.dtype], quant)
    kv = cfg.kv_bytes_per_token(DTYPES[args.dtype])
    precision = args.dtype if quant is None else f"{quant.method}, float parts in {args.dtype}"

    lines = [f"{cfg.architecture}  {args.model}"]
    experts = ""
    if cfg.is_moge:
        experts = (
            f" ({cfg.num_experts} experts in {cfg.num_expert_groups} groups, "
            f"{cfg.num_experts_per_tok} active per token)"
        )
    elif cfg.is_topk_moe:
        experts = (
            f" ({cfg.num_experts} routed experts, top-{cfg.num_experts_per_tok}, in {cfg.num_moe_layers} of "
            f"{cfg.num_hidden_layers} layers"
            + (f"; the {cfg.num_mtp_layers} MTP layer(s) not counted, not loaded)" if cfg.num_mtp_layers else ")")
        )
    lines.append(f"parameters  {_count(total)} total, {_count(active)} active{experts}")
    lines.append(f"weights     {_bytes(weights)} ({precision})")
    lines.append(f"KV cache    {kv:,} bytes per token = {kv / 1024:.1f} KiB ({args.dtype}){_kv_layout(cfg)}")
    if args.memory_gb is not None:
        budget = int(args.memory_gb * GB)
        tokens = context_tokens(budget, weights, kv)
        if tokens is None:
            fit = f"the weights do not fit ({_bytes(weights - budget)} short)"
        else:
            fit = (
                f"{_bytes(budget - weights)} left after the weights = {tokens:,} tokens of context "
                f"({tokens / cfg.max_position_embeddings:.2f} x the {cfg.max_position_embeddings:,}-token context)"
            )
        lines.append(f"memory      {args.memory_gb:g} GB: {fit}")
        lines.append("")
        int4_group = quant.group_size if quant is not None and quant.method == "int4" else args.group_size
        lines += _fit_table(model, cfg, budget, args.dtype, args.memory_gb, int4_group)
    print("\n".join(lines))
    return 0


def _fit_table(
    model: DecoderForCausalLM, cfg: ModelConfig, budget: int, dtype: str, memory_gb: float, int4_group: Optional[int]
) -> list[str]:
    """Weights, KV per token and context that fits, for float32, bfloat16, int8 and int4."""
    header = f"{'precision':<10} {'weights':>10}  {'KV/token':>10}  context tokens in {memory_gb:g} GB"
    rows = [header]
    for name in TABLE_ROWS:
        row_dtype, quant = (name, None) if name in FLOAT_DTYPES else (dtype, name)
        weights = weight_bytes(model, DTYPES[row_dtype], quant, int4_group if quant == "int4" else None)
        kv = cfg.kv_bytes_per_token(DTYPES[row_dtype])
        tokens = context_tokens(budget, weights, kv)
        fit = "does not fit" if tokens is None else f"{tokens:,}"
        rows.append(f"{name:<10} {_bytes(weights):>10}  {kv / 1024:>6.1f} KiB  {fit}")
    kept = "norms, biases and the MoGE router" if cfg.is_moge else (
        "norms, the router, its bias, the sinks and MLA's kv_b_proj" if cfg.is_topk_moe else "norms and biases"
    )
    rows.append(f"The quantized rows keep {kept} in {dtype}, and the KV cache too.")
    rows.append("Weights and KV cache only: activations and runtime buffers need memory on top.")
    return rows


def _kv_layout(cfg: ModelConfig) -> str:
    """What a token's KV entry holds, for the architectures whose entry is not K and V of one width."""
    if cfg.is_mla:
        full = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return (
            f"\n            MLA: {per_layer} values per token per layer (latent {cfg.kv_lora_rank} + rope key "
            f"{cfg.qk_rope_head_dim}) instead of {full:,} for full K and V (1/{full // per_layer})"
        )
    if cfg.is_topk_moe:
        sinks = f"; {cfg.param_sink_number} sink keys/values per layer are parameters, not cache" if cfg.param_sink_number else ""
        return (
            f"\n            {cfg.num_key_value_heads} KV heads x (K {cfg.head_dim} + V {cfg.v_head_dim}) values "
            f"per token per layer{sinks}"
        )
    return ""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.2f} M"


def _bytes(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 10**6:.2f} MB"


__all__ = ["add_arguments", "context_tokens", "read_config", "run", "weight_bytes"]
