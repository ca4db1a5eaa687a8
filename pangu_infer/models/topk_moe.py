"""What openPangu-R-72B-2512 (models/pro_moe_v2.py) and Ultra-MoE-718B (models/ultra_moe.py) share:
the sigmoid top-k router with a selection-only correction bias, ungated shared experts, dense first
layers, sandwich norm, interleaved partial RoPE, and the skipped MTP layers after the last layer.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.models.layers import AttentionBatch, InterleavedRotaryEmbedding, RMSNorm, SwiGLU
from pangu_infer.models.moge import MoEBlock, PanguProMoEForCausalLM, moe_load_stats
from pangu_infer.parallel.sharding import FamilySharder

logger = logging.getLogger("pangu_infer.models")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def sigmoid_topk_route(
    logits: torch.Tensor,
    top_k: int,
    bias: Optional[torch.Tensor],
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores s = sigmoid(logits) in fp32; the top-k of s + bias choose the experts (the bias only
    selects); their weights are the unbiased s, divided by their sum when `normalize`, times
    `scale`. Returns expert ids [T, K] (long) and weights [T, K] (fp32)."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * scale


class TopKMoEBlock(MoEBlock):
    """Sigmoid top-k routed experts plus ungated shared experts (`mlp.shared_experts`)."""

    shared_prefix = "shared_experts"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, top_k=cfg.num_experts_per_tok)
        self.normalize = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        # Selection only; kept in fp32 (pangu_infer.models.topk_moe.FamilyForCausalLM.load_weights).
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = sigmoid_topk_route(logits, self.top_k, self.e_score_correction_bias, self.normalize, self.scale)
        return ids, weights.to(x.dtype)


class SandwichDecoderLayer(nn.Module):
    """h += post_attention_ln(Attn(input_ln(h))); h += post_mlp_ln(MLP(pre_mlp_ln(h))) with
    sandwich norm; plain pre-norm (h += Attn(input_ln(h)); h += MLP(post_attention_ln(h))) without."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module, attention: nn.Module):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        if self.sandwich:
            self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, attn: Optional[AttentionBatch]) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attn))
            return x + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class FamilyForCausalLM(PanguProMoEForCausalLM):
    """The shared model of PanguProMoEV2 and PanguUltraMoE; subclasses name the attention."""

    rotary_class = InterleavedRotaryEmbedding
    attention_class: type[nn.Module]

    def layer_class(self, cfg: ModelConfig, mlp: nn.Module) -> SandwichDecoderLayer:
        return SandwichDecoderLayer(cfg, mlp, self.attention_class(cfg))

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        if cfg.is_moe_layer(layer):
            return TopKMoEBlock(cfg)
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    # ------------------------------------------------------------------ weights
    def expected_weight_names(self) -> list[str]:
        cfg = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        norms = ["input_layernorm", "post_attention_layernorm"]
        if cfg.sandwich_norm:
            norms += ["pre_mlp_layernorm", "post_mlp_layernorm"]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [f"{p}{n}.weight" for n in norms]
            names += [p + "self_attn." + n for n in self.attention_class.weight_names(cfg)]
            if cfg.is_moe_layer(i):
                names += self.expected_mlp_names(p + "mlp.")
            else:
                names += [f"{p}mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        return names

    def expected_mlp_names(self, prefix: str) -> list[str]:
        cfg = self.config
        names = [prefix + "gate.weight"]
        if cfg.router_bias:
            names.append(prefix + "e_score_correction_bias")
        for e in range(cfg.num_experts):
            names += [f"{prefix}experts.{e}.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        if cfg.shared_expert_intermediate_size:
            names += [f"{prefix}shared_experts.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        return names

    def map_weight_name(self, name: str) -> tuple[str, Optional[tuple]]:
        if ".self_attn." in name:  # no fused pieces: the checkpoint's names are the parameters'
            return name, None
        return super().map_weight_name(name)

    def weight_sharder(self) -> FamilySharder:
        return FamilySharder(self.config, self.parallel)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], dtype, device, hook=None, matrix_dtype=None) -> None:
        biases: dict[str, torch.Tensor] = {}
        super().load_weights(self._checkpoint_names(weights, biases), dtype, device, hook, matrix_dtype)
        for name, bias in biases.items():  # the selection bias stays fp32, whatever the model dtype
            module = self.get_submodule(name.rpartition(".")[0])
            module.e_score_correction_bias = nn.Parameter(bias.to(device=device, dtype=torch.float32), requires_grad=False)

    def _checkpoint_names(self, weights, biases: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors under this model's names: DeepSeek's `mlp.gate.e_score_correction_bias`
        read as `mlp.e_score_correction_bias` (R-72B's name), and the MTP layers (index >=
        num_hidden_layers) skipped with one log line."""
        layers = self.config.num_hidden_layers
        skipped: set[int] = set()
        for name, tensor in weights:
            m = _LAYER.match(name)
            if m is not None and int(m.group(1)) >= layers:
                skipped.add(int(m.group(1)))
                continue
            name = name.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
            if name.endswith(".mlp.e_score_correction_bias") and isinstance(tensor, torch.Tensor):
                biases[name] = tensor.float().clone()
            yield name, tensor
        if skipped:
            logger.info(
                "skipped the multi-token-prediction (MTP) layer(s) %s stored after the last layer: "
                "plain decoding does not use them", sorted(skipped)
            )

    # ------------------------------------------------------------------ MoE statistics
    def moe_layers(self) -> list[TopKMoEBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, TopKMoEBlock)]

    def moe_stats(self) -> dict:
        """Tokens per expert per MoE layer and imbalance scores (experts spread over 1, 2, 4, 8
        devices in order). Groups do not apply: `global_topk_*` is the top-k of the same scores
        without the correction bias (the selection the bias changes)."""
        layers = []
        for m in self.moe_layers():
            d = m.load.as_dict(1)
            del d["group_tokens"]
            layers.append(d)
        return moe_load_stats(
            self, layers, num_experts=self.config.num_experts, num_groups=None, top_k=self.config.num_experts_per_tok
        )


__all__ = ["FamilyForCausalLM", "SandwichDecoderLayer", "TopKMoEBlock", "sigmoid_topk_route"]
