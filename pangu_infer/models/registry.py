"""Architecture name -> model class."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.moge import PanguProMoEForCausalLM
from pangu_infer.models.pro_moe_v2 import PanguProMoEV2ForCausalLM
from pangu_infer.models.ultra_moe import PanguUltraMoEForCausalLM

MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "PanguEmbeddedForCausalLM": DecoderForCausalLM,
    "LlamaForCausalLM": DecoderForCausalLM,
    "PanguProMoEForCausalLM": PanguProMoEForCausalLM,
    "PanguProMoEV2ForCausalLM": PanguProMoEV2ForCausalLM,
    "PanguUltraMoEForCausalLM": PanguUltraMoEForCausalLM,
}


def build_model_on_meta(cfg: ModelConfig) -> DecoderForCausalLM:
    """The model with every parameter on the meta device: shapes only, no memory. A ConfigError
    where the config's sizes make a weight past any tensor's size (torch's overflow, not a memory
    shortage: the memory check sizes the weights from this build)."""
    try:
        with torch.device("meta"), _no_init():
            return MODEL_CLASSES[cfg.architecture](cfg)
    except (RuntimeError, TypeError) as e:  # "Storage size calculation overflowed", "Overflow when unpacking long long"
        if "overflow" not in str(e).lower():
            raise
        sizes = ", ".join(f"{name}={getattr(cfg, name)}" for name in _SIZES if getattr(cfg, name, 0))
        raise ConfigError(f"config sizes too large for any tensor ({sizes}): {str(e).splitlines()[0]}") from None


# the config fields a weight's shape is made of (for build_model_on_meta's error)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
          "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts")


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "constant_", "ones_", "zeros_")


@contextmanager
def _no_init() -> Iterator[None]:
    """nn.Linear and nn.Embedding initialise their weights when built; on the meta device that
    is no work, but it runs through torch's reference ops, whose first call imports torch._dynamo
    (about a second of every start). The weights are loaded afterwards, so skip it."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_active_parameters(model: DecoderForCausalLM) -> int:
    """Parameters one token touches: all but the routed experts it is not sent to."""
    cfg = model.config
    total = count_parameters(model)
    if not cfg.is_moe:
        return total
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = (cfg.num_experts - cfg.num_experts_per_tok) * per_expert * cfg.num_moe_layers
    return total - idle
