"""safetensors checkpoints: one file or shards listed in model.safetensors.index.json, memory-mapped."""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

from pangu_infer.errors import WeightError, short_repr
from pangu_infer.quant.formats import SCALE_SUFFIX, ZERO_SUFFIX, QuantizedTensor, Weight

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(model_dir: str) -> list[str]:
    """The shard files of a checkpoint folder, in index order; errors name what is missing."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightError(f"{index_path} is not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightError(f"{index_path} is not a valid safetensors index (weight_map must map tensor names "
                              f"to shard file names, got {short_repr(weight_map)})")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise WeightError(f"shard(s) listed in {index_path} are missing: {', '.join(missing)}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    raise WeightError(f"no safetensors weights in {model_dir} (expected {SINGLE_FILE} or {INDEX_FILE})")


def checkpoint_bytes(files: list[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def open_safetensors(path: str):
    """safe_open with an error that names the file."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightError(f"cannot read safetensors file {path}: {e}") from None


def tensor_names(files: list[str]) -> list[str]:
    """The names of every tensor of the checkpoint's files, read from their headers only."""
    names: list[str] = []
    for path in files:
        with open_safetensors(path) as f:
            names.extend(f.keys())
    return names


def matrix_dtypes(files: list[str]) -> set[str]:
    """The dtypes ("BF16", "F32", ...) the checkpoint stores its matrices (tensors of 2 or more
    dims) in, read from the files' headers only."""
    out: set[str] = set()
    for path in files:
        with open_safetensors(path) as f:
            for name in f.keys():
                part = f.get_slice(name)
                if len(part.get_shape()) >= 2:
                    out.add(part.get_dtype())
    return out


def iter_safetensors(files: list[str], progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard; tensors are views of the mapped file."""
    from tqdm import tqdm

    with tqdm(total=checkpoint_bytes(files) if progress else 0, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for path in files:
            with open_safetensors(path) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor
                    bar.update(tensor.numel() * tensor.element_size())


def iter_quantized_safetensors(files: list[str]) -> Iterator[tuple[str, Weight]]:
    """(HF name, tensor or QuantizedTensor) from a `pangu-infer quantize` checkpoint, memory-mapped."""
    for path in files:
        with open_safetensors(path) as f:
            keys = set(f.keys())
            parts = {k + suffix for k in keys for suffix in (SCALE_SUFFIX, ZERO_SUFFIX)} & keys
            for name in sorted(keys - parts):
                tensor = f.get_tensor(name)
                if name + SCALE_SUFFIX not in keys:
                    yield name, tensor
                    continue
                method = {torch.int8: "int8", torch.uint8: "int4"}.get(tensor.dtype)
                if method is None:
                    raise WeightError(f"quantized tensor {name!r} in {path} has dtype {tensor.dtype}, expected int8 or uint8")
                zero = f.get_tensor(name + ZERO_SUFFIX) if name + ZERO_SUFFIX in keys else None
                yield name, QuantizedTensor(method, tensor, f.get_tensor(name + SCALE_SUFFIX), zero)
