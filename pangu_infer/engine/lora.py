"""Which LoRA adapters a model holds: one per slot (max_loras slots, models/lora.py), the least
recently used one that no unfinished request runs with making room for a new one. Requests take
and give back a reference to their adapter, so engines sharing one model share its adapters."""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from typing import Optional

from pangu_infer.lora import LoRAAdapter, LoRARequest, read_lora_adapter
from pangu_infer.models.lora import LoRAState


class LoRASlotsBusy(ValueError):
    """Every slot holds an adapter some unfinished request runs with: a request for another one
    waits (the engine queues it until a slot is free)."""


# Keys of installed adapters, never reused in a process: a prefix-cache block computed with one
# adapter is salted with its key, and must not serve the next adapter in the same slot.
_KEYS = itertools.count(1)


class LoRAManager:
    def __init__(self, state: LoRAState):
        self.state = state
        self.max_loras = state.slots
        self._loaded: "OrderedDict[str, tuple[LoRARequest, int, int]]" = OrderedDict()  # name -> (request, key, slot); LRU first
        self._refs: dict[int, int] = {}  # key -> unfinished requests running with it

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Read and check the adapter's folder (no change to the engine: safe from any thread)."""
        s = self.state
        return read_lora_adapter(request.lora_path, s.shapes(), s.max_rank, s.dtype, s.device, s.heads)

    def holds(self, request: LoRARequest) -> bool:
        """Whether the adapter is loaded under its name (a dict lookup: safe from another thread)."""
        got = self._loaded.get(request.lora_name)
        return got is not None and _same_folder(got[0], request)

    def add(self, request: LoRARequest, adapter: Optional[LoRAAdapter] = None) -> tuple[int, int]:
        """(key, slot) of the adapter `request` names, loading it (in place of an idle one) if needed;
        LoRASlotsBusy when every slot's adapter is in use."""
        got = self._loaded.get(request.lora_name)
        if got is not None:
            if not _same_folder(got[0], request):
                raise ValueError(
                    f"LoRA adapter {request.lora_name!r} is loaded from {got[0].lora_path!r}, not {request.lora_path!r}; "
                    "unload it first or choose another name"
                )
            self._loaded.move_to_end(request.lora_name)
            return got[1], got[2]
        used = {slot for _, _, slot in self._loaded.values()}
        free = next((s for s in range(self.max_loras) if s not in used), None)
        victim = None
        if free is None:
            victim = next((name for name, (_, key, _) in self._loaded.items() if not self._refs.get(key)), None)
            if victim is None:
                raise LoRASlotsBusy(
                    f"cannot load LoRA adapter {request.lora_name!r} now: max_loras={self.max_loras} adapters are "
                    "loaded and every one is in use by an unfinished request"
                )
        if adapter is None:
            adapter = self.read(request)
        if victim is not None:
            free = self._loaded[victim][2]
        if self.state.on_install is not None:
            # tensor parallel: every worker rank installs it in this slot too, or none does (ValueError)
            self.state.on_install(free, request, adapter)
        if victim is not None:
            del self._loaded[victim]
        key = next(_KEYS)
        self.state.install(free, adapter.modules)
        self._loaded[request.lora_name] = (request, key, free)
        return key, free

    def acquire(self, key: int) -> None:
        self._refs[key] = self._refs.get(key, 0) + 1

    def release(self, key: int) -> None:
        left = self._refs.get(key, 0) - 1
        if left > 0:
            self._refs[key] = left
        else:
            self._refs.pop(key, None)

    def remove(self, name: str) -> bool:
        got = self._loaded.get(name)
        if got is None:
            return False
        if self._refs.get(got[1]):
            raise ValueError(f"LoRA adapter {name!r} is in use by an unfinished request; unload it when they end")
        del self._loaded[name]  # its slot's values stay until the next adapter is written over them
        return True

    def list(self) -> list[LoRARequest]:
        return [req for req, _, _ in self._loaded.values()]

    def name_of(self, key: int) -> Optional[str]:
        """The name of the loaded adapter installed under `key` (None once it was unloaded)."""
        return next((req.lora_name for req, k, _ in self._loaded.values() if k == key), None)


def _same_folder(a: LoRARequest, b: LoRARequest) -> bool:
    return os.path.realpath(a.lora_path) == os.path.realpath(b.lora_path)
