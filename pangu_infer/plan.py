"""`pangu-infer plan`: what a model needs before any weight is read.

Builds the model from its config.json, or from a .gguf file's header (no tensor data read), on the
meta device (no weights, no memory) and prints the total and active parameter counts, the weight
bytes as a load would hold them, the KV-cache bytes per token, and for a memory budget how many
tokens of context fit after the weights, per precision. The weights as loaded are the loader's own
estimate (`pangu_infer.loader.weights_bytes`: a GGUF file's tensors as the loader's plan keeps their
block types, 16-bit matrices a float32 CPU load keeps 16-bit, a bf16 load on a CPU that packs its
linears for oneDNN as packed, a tied head's packed copy included); the other precisions come from
`pangu_infer.quant.loading.quantized_weight_bytes`. `--dtype auto` (the default) is what generate
and serve pick on this machine when given no --dtype: the model's dtype and its KV cache's.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.device import DTYPES, resolve_device, resolve_dtype
from pangu_infer.engine.engine import KV_CACHE_DTYPES
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.registry import build_model_on_meta, count_active_parameters, count_parameters
from pangu_infer.quant.formats import CHOICES, DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, METHODS, QuantizationConfig, parse_quantization
from pangu_infer.quant.loading import quantized_weight_bytes, resolve_quantization

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto",) + FLOAT_DTYPES
GB = 10**9  # decimal gigabytes, as accelerator memory and the paper's "144 GB" are quoted
TABLE_ROWS = ("float32", "bfloat16") + METHODS  # float rows name the dtype, the others a quantization


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="model folder, its config.json, or a .gguf file (its header only is read; no weights needed)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES,
        help="float dtype of the weights that stay float and of the KV cache; auto (default): what generate and "
        "serve pick on this machine when given no --dtype (bfloat16 where it is native, float32 on a CPU without "
        "native bf16 products, its KV cache bfloat16 where that costs nothing)",
    )
    parser.add_argument(
        "--quantization", default="auto", choices=CHOICES,
        help="weight-only quantization: auto (default) and none keep the checkpoint's own quantization_config, if any, "
        "as generate and serve do; int8 or int4 quantize a float checkpoint",
    )
    parser.add_argument("--group-size", type=int, default=None, choices=INT4_GROUP_SIZES, help=f"int4 group size (default: {DEFAULT_GROUP_SIZE})")
    parser.add_argument("--memory-gb", type=_positive_gb, default=None, help="memory budget in GB (10^9 bytes): prints how much context fits")
    parser.add_argument(
        "--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
        help="the KV cache's dtype, as generate and serve take it (auto: the model's; fp8: one byte a value); "
        "not given: what they pick with this --dtype",
    )


def _positive_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid --memory-gb {text!r}: expected a positive number of GB, e.g. 80")
    return value


@dataclass
class Source:
    """What `--model` names: its config, and where a load would read the weights from."""

    config: ModelConfig
    path: str  # the folder, or the .gguf file
    gguf: Any = None  # a .gguf file's header (pangu_infer.loader.gguf.GGUFCheckpoint)
    has_weights: bool = False  # a folder holding its safetensors


def read_source(model: str) -> Source:
    """A model folder, its config.json, or a .gguf file (the header only; no tensor data read)."""
    from pangu_infer.loader.gguf import read_gguf

    path = os.path.expanduser(model)
    if path.endswith(".gguf") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ValueError(f"--model {model!r}: no such .gguf file")
        ckpt = read_gguf(path)  # a file that is not GGUF, or is cut short, is a GGUFError naming it
        return Source(ckpt.model_config(), path, gguf=ckpt)
    if os.path.isfile(path) and not path.endswith(".json"):
        raise ValueError(
            f"--model {model!r} is a file but neither a config.json nor a .gguf file; "
            "pass the model folder, its config.json or a .gguf file"
        )
    try:
        cfg = ModelConfig.from_file(path)
    except ConfigError as e:
        raise ConfigError(f"--model {model!r}: {e}") from None
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    return Source(cfg, folder, has_weights=_has_safetensors(folder))


def _has_safetensors(folder: str) -> bool:
    from pangu_infer.loader.safetensors import checkpoint_files

    try:
        return bool(checkpoint_files(folder))
    except ValueError:  # none there (or a broken index): counted from the config alone
        return False


def read_config(model: str) -> ModelConfig:
    """The config of a model folder, a config.json path or a .gguf file."""
    return read_source(model).config


def engine_dtypes(dtype: str, model: DecoderForCausalLM, kv_cache_dtype: Optional[str] = None) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, model dtype, KV-cache dtype) of a load with `--dtype dtype` (and `--kv-cache-dtype
    kv_cache_dtype`, if given) on this machine, as LLM chooses them: "auto" is device.default_dtype's
    choice, its KV cache engine.default_kv_cache_dtype's (bfloat16 on a CPU without native bf16, where
    that costs nothing); a dtype asked for is the cache's too, unless a cache dtype is asked for."""
    from pangu_infer.engine.engine import default_kv_cache_dtype, kv_torch_dtype

    device = resolve_device(None)
    chosen = resolve_dtype(dtype, device)
    if kv_cache_dtype is None:
        kv_cache_dtype = default_kv_cache_dtype(model, chosen, device) if dtype == "auto" else "auto"
    return device, chosen, kv_torch_dtype(kv_cache_dtype, chosen)


def loaded_weight_bytes(
    source: Source, model: DecoderForCausalLM, dtype: torch.dtype, device: torch.device, quantization: Any,
) -> tuple[int, Optional[torch.dtype]]:
    """(bytes, the 16-bit dtype matrices are kept in or None) of the weights a load of `source` holds:
    the loader's estimate (loader.weights_bytes, checked against loaded models): a GGUF file's tensors as
    the loader's plan keeps them, a folder's 16-bit matrices kept 16-bit where a float32 CPU load keeps
    them. A config.json alone: float weights in `dtype`, the matrices in its torch_dtype where a float32
    CPU load would keep a checkpoint so stored (its files not read). `quantization`: what --quantization
    asks ("auto", "none", "int8", "int4", or a QuantizationConfig for a group size)."""
    from pangu_infer.loader import _kept_half_dtype, kept_half_dtype, weights_bytes

    if source.gguf is not None:
        half = _kept_half_dtype(source.gguf, dtype, device, quantization)
        return weights_bytes(source.path, dtype, quantization, False, True, device, ckpt=source.gguf), half
    if source.has_weights:
        half = kept_half_dtype(source.path, dtype, device, quantization, False)
        return weights_bytes(source.path, dtype, quantization, False, True, device), half
    half = _config_half(source.config, dtype, device, quantization)
    return quantized_weight_bytes(model, dtype, resolve_quantization(model, quantization), matrix_dtype=half, device=device), half


def _config_half(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, quantization: Any) -> Optional[torch.dtype]:
    """A config.json alone: the 16-bit dtype a float32 CPU load keeps the matrices in, taking its
    torch_dtype as the dtype the checkpoint stores them in (loader.kept_half_dtype reads the files)."""
    from pangu_infer.loader import _float32_cpu_load, _half_of
    from pangu_infer.models import bf16_weights

    stored = {"bfloat16": "BF16", "float16": "F16"}.get(str(cfg.torch_dtype))
    if stored is None or cfg.quantization_config or bf16_weights.disabled() or not _float32_cpu_load(dtype, device, quantization):
        return None
    return _half_of({stored})


def gguf_precision(source: Source, model: DecoderForCausalLM, dtype: torch.dtype, device: torch.device, quantization: Any) -> str:
    """How a load keeps a .gguf file's tensors, per block type (the loader's plan), e.g.
    "Q4_1 as int4 in groups of 32, Q8_0 as int8, F32 as float32" ("Q5_K as 5-bit codes in groups of
    32 or int8" where some of a type's tensors keep their codes and others go to int8 rows)."""
    from pangu_infer.loader import _gguf_high_bit_targets, _gguf_plan, _kept_half_dtype

    settings, by_target = _gguf_plan(source.gguf, model, quantization)
    # Q5 / Q6_K blocks a CPU load keeps with their 5- / 6-bit codes (quant/loading.py), where the rest says int8
    high = _gguf_high_bit_targets(source.gguf, model, quantization, by_target) if device.type == "cpu" and by_target else {}
    half = _kept_half_dtype(source.gguf, dtype, device, quantization)
    kept: dict[str, list[str]] = {}
    count: dict[str, int] = {}
    for t in source.gguf.reader.tensors:
        name = source.gguf.hf_names.get(t.name)
        if name is None:
            continue
        setting = settings.get(name)
        if setting is None:
            as_dtype = half if half is not None and len(t.shape) >= 2 else dtype
            how = _name(as_dtype)
        elif setting.method == "int4":
            how = f"int4 in groups of {setting.group_size}"
        elif model.map_weight_name(name)[0] in high:
            bits = high[model.map_weight_name(name)[0]][0]
            how = f"{bits}-bit codes in groups of {16 if bits == 6 else 32}"
        else:
            how = setting.method
        count[t.tensor_type.name] = count.get(t.tensor_type.name, 0) + 1
        ways = kept.setdefault(t.tensor_type.name, [])
        if how not in ways:
            ways.append(how)
    by_count = sorted(kept, key=lambda ggml: -count[ggml])
    return ", ".join(f"{ggml} as {' or '.join(kept[ggml])}" for ggml in by_count)


def weight_bytes(
    model: DecoderForCausalLM,
    dtype: torch.dtype,
    quantization: str | QuantizationConfig | None,
    group_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> int:
    """Resident weight bytes: float parts in `dtype`, quantized weights in the `pangu_infer.quant` format;
    with `device`, bf16 linears packed where a load there packs them (quantized_weight_bytes)."""
    return quantized_weight_bytes(model, dtype, parse_quantization(quantization, group_size), device=device)


def context_tokens(memory_bytes: int, weights: int, kv_per_token: int) -> Optional[int]:
    """Tokens of KV cache that fit next to the weights; None when the weights alone do not fit."""
    if weights > memory_bytes:
        return None
    return (memory_bytes - weights) // kv_per_token


def run(args: argparse.Namespace) -> int:
    if args.group_size is not None and args.quantization != "int4":
        got = f"--quantization {args.quantization}"
        raise ValueError(f"--group-size {args.group_size} applies to --quantization int4 only, got {got}")
    source = read_source(args.model)
    cfg = source.config
    model = build_model_on_meta(cfg)
    total, active = count_parameters(model), count_active_parameters(model)
    # A pre-quantized checkpoint's config.json says how its weights are stored.
    quant = resolve_quantization(model, parse_quantization(args.quantization, args.group_size))
    device, dtype, kv_dtype = engine_dtypes(args.dtype, model, args.kv_cache_dtype)
    dtype_name, kv_name = _name(dtype), _name(kv_dtype)
    # What LLM(quantization=...) is given: a group size only where asked (a .gguf file's int4 groups are 32).
    asked = args.quantization if args.group_size is None else parse_quantization(args.quantization, args.group_size)
    weights, half = loaded_weight_bytes(source, model, dtype, device, asked)
    kv = cfg.kv_bytes_per_token(kv_dtype)
    if source.gguf is not None:
        precision = "as loaded: " + gguf_precision(source, model, dtype, device, asked)
    else:
        precision = dtype_name if quant is None else f"{quant.method}, float parts in {dtype_name}"
        if half is not None:
            stored = "the checkpoint stores" if source.has_weights else "its config's torch_dtype says"
            precision += f"; the matrices kept in {_name(half)}, as {stored}"

    lines = [f"{cfg.architecture}  {args.model}" + ("  (GGUF header)" if source.gguf is not None else "")]
    chosen = (
        f"auto: what generate and serve pick on this machine ({device.type}) when given no --dtype"
        if args.dtype == "auto" else f"--dtype {args.dtype}"
    )
    if args.kv_cache_dtype is not None:
        chosen += f", --kv-cache-dtype {args.kv_cache_dtype}"
    lines.append(f"dtype       {dtype_name}, KV cache {kv_name} ({chosen})")
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
    lines.append(f"weights     {_bytes(weights)} ({precision}) = {weights:,} bytes")
    lines.append(f"KV cache    {kv:,} bytes per token = {kv / 1024:.1f} KiB ({kv_name}){_kv_layout(cfg)}")
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
        stored_int4 = source.gguf is None and quant is not None and quant.method == "int4"
        int4_group = quant.group_size if stored_int4 else args.group_size
        lines += _fit_table(source, model, budget, dtype_name, kv_dtype, args.memory_gb, int4_group, device, args.kv_cache_dtype is not None)
    print("\n".join(lines))
    return 0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fit_table(
    source: Source, model: DecoderForCausalLM, budget: int, dtype: str, kv_dtype: torch.dtype, memory_gb: float,
    int4_group: Optional[int], device: torch.device, kv_asked: bool = False,
) -> list[str]:
    """Weights, KV per token and context that fits, for float32, bfloat16, int8 and int4. The float rows
    are that --dtype (every weight and the KV cache in it; kv_asked: the KV cache in `kv_dtype`, a
    --kv-cache-dtype given); the quantized rows keep the float parts in `dtype` and the KV cache in
    `kv_dtype`, as --quantization int8/int4 would with this --dtype (a .gguf file's rows as the loader
    quantizes that file: int4 in its groups of 32)."""
    from pangu_infer.loader import weights_bytes

    cfg = source.config
    header = f"{'precision':<10} {'weights':>10}  {'KV/token':>10}  context tokens in {memory_gb:g} GB"
    rows = [header]
    for name in TABLE_ROWS:
        row_dtype, quant = (name, None) if name in FLOAT_DTYPES else (dtype, name)
        group = int4_group if quant == "int4" else None
        if quant is not None and source.gguf is not None:
            how = quant if group is None else parse_quantization(quant, group)
            weights = weights_bytes(source.path, DTYPES[row_dtype], how, False, device=device, ckpt=source.gguf)
        else:
            weights = weight_bytes(model, DTYPES[row_dtype], quant, group, device)
        kv = cfg.kv_bytes_per_token(DTYPES[row_dtype] if quant is None and not kv_asked else kv_dtype)
        tokens = context_tokens(budget, weights, kv)
        fit = "does not fit" if tokens is None else f"{tokens:,}"
        rows.append(f"{name:<10} {_bytes(weights):>10}  {kv / 1024:>6.1f} KiB  {fit}")
    kept = "norms, biases and the MoGE router" if cfg.is_moge else (
        "norms, the router, its bias, the sinks and MLA's kv_b_proj" if cfg.is_topk_moe else "norms and biases"
    )
    kv_name = _name(kv_dtype)
    cache = "and the KV cache too" if kv_name == dtype else f"the KV cache in {kv_name}"
    if kv_asked:
        rows.append(f"The quantized rows keep {kept} in {dtype}; every row's KV cache is {kv_name} (--kv-cache-dtype).")
    else:
        rows.append(f"The quantized rows keep {kept} in {dtype}, {cache}.")
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


__all__ = ["Source", "add_arguments", "context_tokens", "engine_dtypes", "loaded_weight_bytes", "read_config", "read_source", "run", "weight_bytes"]
