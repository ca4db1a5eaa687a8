"""Architecture name -> model class."""

from __future__ import annotations

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
    with torch.device("meta"):
        return MODEL_CLASSES[cfg.architecture](cfg)


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
