"""Which LoRA adapters an engine holds: at most max_loras at once, the least recently used one
that no unfinished request runs with making room for a new one (models/lora.py applies them)."""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from typing import Iterable, Optional

import torch

from pangu_infer.lora import LoRAAdapter, LoRARequest, read_lora_adapter
from pangu_infer.models.lora import LoRAState

class LoRASlotsBusy(ValueError):
    """max_loras adapters are loaded and each is in use: a request for another one waits (the engine
    queues it until one is free)."""


# Keys of installed adapters, never reused in a process: engines sharing a model share its
# wrappers, and a prefix-cache block computed with one adapter is salted with its key.
_KEYS = itertools.count(1)


class LoRAManager:
    def __init__(self, state: LoRAState, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.state = state
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self._loaded: "OrderedDict[str, tuple[LoRARequest, int]]" = OrderedDict()  # least recently used first

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check the adapter's folder (no change to the engine: safe from any thread)."""
        return read_lora_adapter(request.lora_path, self.state.shapes(), self.max_rank, self.dtype, self.device)

    def holds(self, request: LoRARequest) -> bool:
        """Whether the adapter is loaded under its name (a dict lookup: safe from another thread)."""
        got = self._loaded.get(request.lora_name)
        return got is not None and got[0].lora_path == request.lora_path

    def add(self, request: LoRARequest, adapter: Optional[LoRAAdapter] = None, in_use: Iterable[int] = ()) -> int:
        """The key of the adapter `request` names, loading it (and evicting another) if needed."""
        got = self._loaded.get(request.lora_name)
        if got is not None:
            if os.path.realpath(got[0].lora_path) != os.path.realpath(request.lora_path):
                raise ValueError(
                    f"LoRA adapter {request.lora_name!r} is loaded from {got[0].lora_path!r}, not {request.lora_path!r}; "
                    "unload it first or choose another name"
                )
            self._loaded.move_to_end(request.lora_name)
            return got[1]
        if len(self._loaded) >= self.max_loras:
            busy = set(in_use)
            victim = next((name for name, (_, key) in self._loaded.items() if key not in busy), None)
            if victim is None:
                raise LoRASlotsBusy(
                    f"cannot load LoRA adapter {request.lora_name!r} now: max_loras={self.max_loras} adapters are "
                    "loaded and every one is in use by an unfinished request"
                )
        if adapter is None:
            adapter = self.read(request)
        if len(self._loaded) >= self.max_loras:
            self._unload(victim)
        key = next(_KEYS)
        self.state.install(key, adapter.modules)
        self._loaded[request.lora_name] = (request, key)
        return key

    def remove(self, name: str, in_use: Iterable[int] = ()) -> bool:
        got = self._loaded.get(name)
        if got is None:
            return False
        if got[1] in set(in_use):
            raise ValueError(f"LoRA adapter {name!r} is in use by an unfinished request; unload it when they end")
        self._unload(name)
        return True

    def _unload(self, name: str) -> None:
        _, key = self._loaded.pop(name)
        self.state.uninstall(key)

    def list(self) -> list[LoRARequest]:
        return [req for req, _ in self._loaded.values()]
