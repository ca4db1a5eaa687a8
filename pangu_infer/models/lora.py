"""LoRA adapters on a loaded model, many at once: y = W x + (B_a A_a x) for the rows of adapter a.

`enable_lora(model)` wraps every projection an adapter may target (q/k/v/o of attention, gate/up/down
of the dense and shared-expert MLPs) in a LoRALinear around whatever module holds its weight (plain,
oneDNN-packed or quantized: LoRA adds to its output). Fused modules (qkv_proj, gate_up_proj) keep one
adapter pair per checkpoint projection, each adding to its own columns. Every wrapper of a model
shares one LoRAState: the adapters' keys, and for the step being run, which rows use which adapter
(set by the engine's runner around the forward; None when no row uses one, and then the wrappers
are the base modules plus one attribute read, which is what the compiled decode step traces).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

# The checkpoint projections an adapter may target, by HF module name. Routed experts are excluded.
_TARGET = re.compile(r"^(?P<module>.+\.(q|k|v|o|gate|up|down)_proj)\.weight$")


class LoRAState:
    """What every LoRALinear of one model shares."""

    def __init__(self) -> None:
        # HF module name (model.layers.0.self_attn.q_proj) -> (wrapper, index of its slice)
        self.targets: dict[str, tuple["LoRALinear", int]] = {}
        # This step's rows per adapter key: [(key, row indices or None for every row)], None for none.
        self.rows: Optional[list[tuple[int, Optional[torch.Tensor]]]] = None

    def shapes(self) -> dict[str, tuple[int, int]]:
        """HF module name -> (in_features, out_features) of that projection."""
        return {name: (w.in_features, w.slices[i][1]) for name, (w, i) in self.targets.items()}

    def install(self, key: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """An adapter's (A [r, in], scaled B [out, r]) per HF module name, under `key`."""
        for name, (a, b) in modules.items():
            wrapper, i = self.targets[name]
            wrapper.adapters.setdefault(key, [None] * len(wrapper.slices))[i] = (a, b)

    def uninstall(self, key: int) -> None:
        for wrapper, _ in self.targets.values():
            wrapper.adapters.pop(key, None)


class LoRALinear(nn.Module):
    """`base(x)` plus, for each adapter of the step, its low-rank products on its rows."""

    def __init__(self, base: nn.Module, in_features: int, slices: list[tuple[int, int]], state: LoRAState):
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.slices = slices  # (first output column, width) of each checkpoint projection
        # Plain attributes, not submodules or buffers: shared state, and adapters that come and go.
        self.__dict__["state"] = state
        self.__dict__["adapters"] = {}  # key -> per slice (A, B) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.state.rows
        if rows is None:
            return y
        for key, idx in rows:
            pairs = self.adapters.get(key)
            if pairs is None:
                continue
            xs = x if idx is None else x.index_select(0, idx)
            for (start, width), pair in zip(self.slices, pairs):
                if pair is None:
                    continue
                a, b = pair
                delta = ((xs.to(a.dtype) @ a.t()) @ b.t()).to(y.dtype)  # (no-op casts but in a model of mixed dtypes)
                if idx is None:
                    y[:, start : start + width] += delta
                else:
                    y[:, start : start + width].index_add_(0, idx, delta)
        return y


def _in_features(module: nn.Module) -> Optional[int]:
    """The input width of a linear-like module (nn.Linear, PackedLinear, QuantizedLinear), else None."""
    n = getattr(module, "in_features", None)
    if n is None:
        n = getattr(getattr(module, "weight", None), "in_features", None)
    return n if isinstance(n, int) else None


def enable_lora(model: nn.Module) -> LoRAState:
    """Wrap the model's LoRA-targetable projections (once; a second call returns the same state)."""
    existing = model.__dict__.get("_lora_state")
    if existing is not None:
        return existing
    state = LoRAState()
    wrappers: dict[str, LoRALinear] = {}
    for name in model.expected_weight_names():
        m = _TARGET.match(name)
        if m is None or ".experts." in name:
            continue
        target, index = model.map_weight_name(name)
        path = target.removesuffix(".weight")
        wrapper = wrappers.get(path)
        if wrapper is None:
            try:
                base = model.get_submodule(path)
            except AttributeError:
                continue  # a weight that is not a module's (stacked experts)
            width = getattr(base, "out_features", None) or getattr(getattr(base, "weight", None), "out_features", None)
            n_in = _in_features(base)
            if n_in is None or not isinstance(width, int):
                continue
            parent_name, _, attr = path.rpartition(".")
            wrapper = LoRALinear(base, n_in, [], state)
            setattr(model.get_submodule(parent_name), attr, wrapper)
            wrappers[path] = wrapper
            wrapper.__dict__["_width"] = width
        if index is None:
            start, size = 0, wrapper.__dict__["_width"]
        else:
            sl = index[0]
            start, size = sl.start, sl.stop - sl.start
        wrapper.slices.append((start, size))
        state.targets[m.group("module")] = (wrapper, len(wrapper.slices) - 1)
    model.__dict__["_lora_state"] = state
    return state
