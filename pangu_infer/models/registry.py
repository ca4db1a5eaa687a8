"""Architecture name -> model class."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pangu_infer.config import ModelConfig
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
    """The model with every parameter on the meta device: shapes only, no memory."""
    with torch.device("meta"), _no_init():
        return MODEL_CLASSES[cfg.architecture](cfg)


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
