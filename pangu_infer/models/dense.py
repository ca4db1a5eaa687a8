"""The decoder shared by Pangu 7B (openPangu-Embedded) and the Llama family, and its weight loading."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Protocol

import torch
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.errors import WeightError
from pangu_infer.models.batch_invariant import tied_head
from pangu_infer.models.layers import Attention, AttentionBatch, RMSNorm, RotaryEmbedding, SwiGLU, rope_inv_freq
from pangu_infer.parallel.sharding import WeightSharder
from pangu_infer.parallel.state import current_parallel_state

class WeightLoadHook(Protocol):
    """What `load_weights` asks of a hook that takes some checkpoint tensors itself.

    The model owns this contract; pangu_infer.quant.loading.LoadHook implements it (quantizing
    weights, or keeping MoGE experts memory-mapped), so models never import quant.
    """

    def take(self, name: str, target: str, index: Optional[tuple], tensor) -> bool:
        """True when the hook keeps `tensor` (checkpoint `name`, parameter `target[index]`)."""

    def finish(self, model: nn.Module) -> None:
        """Called once after the last tensor: swap in the modules built from what was taken."""


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, attn: Optional[AttentionBatch]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, make_mlp, make_layer=DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_layer(cfg, make_mlp(cfg, i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# HF tensor name pieces that land in one fused parameter: (piece, fused piece, shard).
_FUSED = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", "gate"),
    (".up_proj.", ".gate_up_proj.", "up"),
)
_SKIPPED = re.compile(r"\.rotary_emb\.inv_freq$")


class DecoderForCausalLM(nn.Module):
    """Pre-norm decoder with rotary attention (q/k/v/o biases per config) and SwiGLU MLPs."""

    layer_class = DecoderLayer
    rotary_class = RotaryEmbedding

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.parallel = current_parallel_state()  # this rank's shard (world size 1 in one process)
        self.model = DecoderModel(cfg, self.make_mlp, self.layer_class)
        self.rotary = self.rotary_class(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Set by models/batch_invariant.make_batch_invariant (linears row-tiled, MoGE fixed-order combine).
        self.batch_invariant = False

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    # ------------------------------------------------------------------ forward
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Optional[AttentionBatch] = None
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        layers = self.model.layers
        # By index: iterating the ModuleList has torch.compile guard its dict's key order, a guard
        # that a saved compiled step (engine/saved_step.py) cannot rebuild without the model.
        for i in range(len(layers)):
            x = layers[i](x, cos, sin, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # a module call, so a quantized head (pangu_infer.quant) works too
            return self.lm_head(hidden).float()
        if self.batch_invariant:
            return tied_head(hidden, self.model.embed_tokens.weight).float()
        return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()

    # ------------------------------------------------------------------ weights
    def expected_weight_names(self) -> list[str]:
        """Every HF tensor name a complete checkpoint of this config holds."""
        cfg = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            for proj in ("q", "k", "v"):
                names.append(f"{p}self_attn.{proj}_proj.weight")
                if cfg.qkv_bias:
                    names.append(f"{p}self_attn.{proj}_proj.bias")
            names.append(p + "self_attn.o_proj.weight")
            if cfg.o_bias:
                names.append(p + "self_attn.o_proj.bias")
            names += self.expected_mlp_names(p + "mlp.")
        return names

    def expected_mlp_names(self, prefix: str) -> list[str]:
        names = [f"{prefix}{proj}_proj.weight" for proj in ("gate", "up", "down")]
        if self.config.mlp_bias:
            names += [f"{prefix}{proj}_proj.bias" for proj in ("gate", "up", "down")]
        return names

    def map_weight_name(self, name: str) -> tuple[str, Optional[tuple]]:
        """HF tensor name -> (parameter name, index into that parameter or None for the whole)."""
        for piece, fused, shard in _FUSED:
            if piece in name:
                target = name.replace(piece, fused)
                return target, self._shard_index(target, shard)
        return name, None

    def _shard_index(self, target: str, shard: str) -> tuple:
        if shard in ("q", "k", "v"):
            attn = self.model.layers[0].self_attn  # this rank's (local) head sizes
            q, kv = attn.q_size, attn.kv_size
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        else:
            inter = self._gate_up_width(target)
            start, size = (0, inter) if shard == "gate" else (inter, inter)
        return (slice(start, start + size),)

    def _gate_up_width(self, target: str) -> int:
        # The SwiGLU that owns `...gate_up_proj.weight`: its width is this rank's share.
        return self.get_submodule(target.rsplit(".", 2)[0]).inter

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        hook: Optional[WeightLoadHook] = None,
        matrix_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Assign checkpoint tensors to the (meta-device) parameters; every mismatch names the tensor.

        `hook` (a WeightLoadHook, e.g. pangu_infer.quant.loading.LoadHook) may take a checkpoint tensor instead (to quantize
        it, or keep a MoGE expert memory-mapped) and swaps its modules in at the end.
        `matrix_dtype`: the dtype of tensors of 2 or more dims where it is not `dtype` (16-bit
        matrices under float32 activations, models/bf16_weights.py); the others stay in `dtype`.
        """
        params = dict(self.named_parameters())
        expected = set(self.expected_weight_names())
        sharder = self.weight_sharder()
        seen: set[str] = set()
        pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        for name, tensor in weights:
            if _SKIPPED.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the head anyway
            if name not in expected:
                raise WeightError(f"unexpected tensor {name!r} in the checkpoint (shape {tuple(tensor.shape)})")
            if not sharder.owns(name):
                continue  # another rank's expert, or the LM head on a worker rank
            tensor = sharder.shard(name, tensor)
            target, index = self.map_weight_name(name)
            param = params[target]
            want = tuple(param[index].shape) if index is not None else tuple(param.shape)
            if tuple(tensor.shape) != want:
                raise WeightError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want}")
            if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():  # (a QuantizedTensor carries its own)
                raise WeightError(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating-point weight")
            if hook is not None and hook.take(name, target, index, tensor):
                seen.add(name)
                continue
            if index is None:
                _set_param(self, target, tensor.to(device=device, dtype=matrix_dtype if matrix_dtype and tensor.dim() >= 2 else dtype))
            elif matrix_dtype is not None and tensor.dim() == 2 and param.is_meta and _piece_at(index) is not None:
                # A 16-bit piece of a fused matrix (q/k/v, gate/up) or of stacked MoE experts (an
                # expert's gate, up or down): kept as the checkpoint gives it (a view of the mapped
                # file, not a copy); models/bf16_weights.widen_model makes products of the pieces (or,
                # where it keeps no 16-bit weight, joins them: join_fused_pieces).
                pieces.setdefault(target, {})[_piece_at(index)] = tensor.to(device=device, dtype=matrix_dtype)  # (again: replaced)
            else:
                if param.is_meta:
                    kind = matrix_dtype if matrix_dtype and tensor.dim() >= 2 else dtype
                    param = _set_param(self, target, torch.empty(param.shape, dtype=kind, device=device))
                    params[target] = param
                param.data[index].copy_(tensor)
            seen.add(name)
        missing = sorted(n for n in expected - seen if sharder.owns(n))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise WeightError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")
        if pieces:  # (every piece came: the missing check above; in row order)
            self.fused_pieces = {t: [ps[at] for at in sorted(ps)] for t, ps in pieces.items()}
        if hook is not None:
            hook.finish(self)
        self.rotary.inv_freq = rope_inv_freq(self.config).to(device)
        self.finish_loading()

    def weight_sharder(self) -> WeightSharder:
        """Which slice of each checkpoint tensor this rank keeps."""
        return WeightSharder(self.config, self.parallel)

    def finish_loading(self) -> None:
        """Hook for models that re-lay parameters after loading (MoGE stacks its experts)."""


def row_piece_start(index: tuple) -> Optional[int]:
    """The first row of a piece given as rows [start, stop) of its fused parameter ((slice,)); None
    for any other index."""
    if len(index) == 1 and isinstance(index[0], slice) and index[0].step in (None, 1):
        return index[0].start or 0
    return None


def _piece_at(index: tuple) -> Optional[tuple[int, int]]:
    """(expert, first row) of a piece of a parameter given as rows [start, stop) of a fused matrix
    ((slice,): expert 0) or of one expert of a stack ((e, slice) or (e,)); None for other indexes."""
    start = row_piece_start(index)
    if start is not None:
        return 0, start
    if len(index) == 2 and isinstance(index[0], int):
        start = row_piece_start(index[1:])
        return None if start is None else (index[0], start)
    return (index[0], 0) if len(index) == 1 and isinstance(index[0], int) else None


def join_fused_pieces(model: nn.Module) -> None:
    """The matrices load_weights kept as pieces (model.fused_pieces: every piece, in row order, of
    every expert in order) that nothing took, each joined into its parameter (a copy, as loading them
    without pieces does)."""
    params = dict(model.named_parameters())
    for target, parts in model.__dict__.pop("fused_pieces", {}).items():
        _set_param(model, target, torch.cat(parts, dim=0).view(params[target].shape))


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    param = nn.Parameter(value, requires_grad=False)
    setattr(module, attr, param)
    return param
