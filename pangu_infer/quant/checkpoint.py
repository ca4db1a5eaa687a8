"""Pre-quantized checkpoints: what `pangu-infer quantize` writes, and loads again without re-quantizing.

Layout: the source's HF tensor names, so the normal loader path (name checks, fused
parameters, expert stacking) applies unchanged. A quantized weight `X.weight` is stored as
`X.weight` (int8 [N, K] or uint8 [N, K/2], see pangu_infer.quant.formats), `X.weight_scale` and, for
int4, `X.weight_zero`, always in the same shard. Other tensors keep their source dtype.
config.json gets `quantization_config` ({"quant_method": "pangu-weight-only", "method", ...}).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
from safetensors.torch import save_file

from pangu_infer.config import ModelConfig
from pangu_infer.loader import check_against_checkpoint
from pangu_infer.loader.safetensors import INDEX_FILE, SINGLE_FILE, checkpoint_files, iter_safetensors, tensor_names
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.registry import build_model_on_meta
from pangu_infer.quant.formats import QuantizationConfig, QuantizationError, quantize
from pangu_infer.quant.formats import SCALE_SUFFIX, ZERO_SUFFIX
from pangu_infer.quant.loading import quantizable_weights, quantized_method

SHARD_BYTES = 2 << 30
# Everything but weights is copied: tokenizer files, generation_config.json, chat templates.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


class QuantizedCheckpointWriter:
    """A `load_weights` hook that takes every tensor and writes it, quantized where it applies."""

    def __init__(self, model: DecoderForCausalLM, config: QuantizationConfig, out_dir: str, shard_bytes: int):
        self.config = config
        self.out_dir = out_dir
        self.shard_bytes = shard_bytes
        self.kinds = quantizable_weights(model)
        self.params = dict(model.named_parameters())
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_size = 0
        self.shards: list[list[str]] = []
        self.quantized = 0
        self.total_bytes = 0

    def take(self, name: str, target: str, index: Optional[tuple], tensor: torch.Tensor) -> bool:
        setting = None
        if target in self.kinds:
            setting = quantized_method(self.config, self.params[target].shape)
        qt = None if setting is None else quantize(tensor, setting)
        if qt is None:
            self._add({name: tensor.contiguous()})
            return True
        parts = {name: qt.qweight, name + SCALE_SUFFIX: qt.scale}
        if qt.zero is not None:
            parts[name + ZERO_SUFFIX] = qt.zero
        self._add(parts)
        self.quantized += 1
        return True

    def _add(self, parts: dict[str, torch.Tensor]) -> None:
        self.shard.update(parts)
        size = sum(t.numel() * t.element_size() for t in parts.values())
        self.shard_size += size
        self.total_bytes += size
        if self.shard_size >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.shard:
            return
        save_file(self.shard, os.path.join(self.out_dir, f"shard-{len(self.shards):05d}.tmp"))
        self.shards.append(list(self.shard))
        self.shard, self.shard_size = {}, 0

    def finish(self, model: DecoderForCausalLM) -> None:
        self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(os.path.join(self.out_dir, f"shard-{i:05d}.tmp"), os.path.join(self.out_dir, final))
        if n > 1:
            weight_map = {t: f for f, keys in zip(names, self.shards) for t in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def write_quantized_checkpoint(
    model_dir: str, out_dir: str, config: QuantizationConfig, shard_bytes: int = SHARD_BYTES
) -> QuantizedCheckpointWriter:
    """Quantize a safetensors model folder into out_dir, one tensor at a time (memory: one shard)."""
    if not os.path.isdir(model_dir):
        raise QuantizationError(
            f"--model {model_dir!r}: pangu-infer quantize reads a safetensors model folder "
            "(a .gguf file can be loaded with --quantization instead)"
        )
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise QuantizationError(f"--out {out_dir!r} is not empty; give a new or empty folder")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    cfg = ModelConfig.from_hf_dict(hf_config)
    if cfg.quantization_config is not None:
        raise QuantizationError(
            f"--model {model_dir!r} is already quantized ({cfg.quantization_config}); quantize its float source instead"
        )
    files = checkpoint_files(model_dir)
    check_against_checkpoint(cfg, tensor_names(files), f"the checkpoint in {model_dir}")  # before a meta model is built
    os.makedirs(out_dir, exist_ok=True)
    net = build_model_on_meta(cfg)
    writer = QuantizedCheckpointWriter(net, config, out_dir, shard_bytes)
    # load_weights checks every name and shape and maps them to parameters; the writer takes all.
    net.load_weights(iter_safetensors(files), dtype=torch.float32, device=torch.device("cpu"), hook=writer)
    hf_config["quantization_config"] = config.to_hf()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    for entry in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, entry)
        if os.path.isfile(src) and entry != "config.json" and not entry.endswith(_WEIGHT_SUFFIXES):
            shutil.copy(src, os.path.join(out_dir, entry))
    return writer
