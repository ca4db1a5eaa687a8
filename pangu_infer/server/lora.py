"""LoRA adapters served as models of their own, as vLLM serves them.

`serve --lora-modules NAME=PATH ...` (or JSON objects `{"name", "path", "base_model_name"}`) reads
and adds each adapter at startup (`add_startup_adapters`, ids 1, 2, ...). A request picks one by
its `model` field (server/params.py check_model); /v1/models lists them after the base model.
With `--enable-runtime-lora-updates`, `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
`POST /v1/unload_lora_adapter {"lora_name"}` change the set while the server runs (vLLM's routes
and bodies): the adapter is read on a worker thread and added on the engine thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import Field

from pangu_infer.errors import short_repr
from pangu_infer.lora import LoRARequest
from pangu_infer.server.errors import APIError
from pangu_infer.server.protocol import ErrorResponse, _Request
from pangu_infer.server.state import LoRAModule, ServerState

logger = logging.getLogger("pangu_infer.server")


@dataclass(frozen=True)
class LoRAModulePath:
    """One --lora-modules entry (vLLM's LoRAModulePath)."""

    name: str
    path: str
    base_model_name: Optional[str] = None


def parse_lora_modules(entries: list[str]) -> list[LoRAModulePath]:
    """--lora-modules values, each NAME=PATH or a JSON object {"name", "path", "base_model_name"};
    ValueError naming a bad entry or a name given twice."""
    modules: list[LoRAModulePath] = []
    for text in entries:
        module = _parse_one(text)
        if any(m.name == module.name for m in modules):
            raise ValueError(f"--lora-modules: the name {module.name!r} is given twice; each adapter needs its own name")
        modules.append(module)
    return modules


def _parse_one(text: str) -> LoRAModulePath:
    expected = 'expected NAME=PATH or a JSON object {"name": ..., "path": ..., "base_model_name": ...}'
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {short_repr(text)}: not valid JSON ({e.msg}); {expected}") from None
        if not isinstance(value, dict):
            raise ValueError(f"--lora-modules {short_repr(text)}: {expected}")
        unknown = sorted(set(value) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"--lora-modules {short_repr(text)}: unknown key {unknown[0]!r}; {expected}")
        name, path, base = value.get("name"), value.get("path"), value.get("base_model_name")
        if base is not None and (not isinstance(base, str) or not base.strip()):
            raise ValueError(f"--lora-modules {short_repr(text)}: base_model_name must be a non-empty string")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {short_repr(text)}: {expected}")
        name, path, base = name.strip(), path.strip(), None
    for key, value in (("name", name), ("path", path)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"--lora-modules {short_repr(text)}: the adapter's {key} must be a non-empty string; {expected}")
    return LoRAModulePath(name, path, base)


def add_startup_adapters(llm: Any, modules: list[LoRAModulePath], served_model_name: Union[str, Sequence[str]]) -> list[LoRAModule]:
    """Read and add each --lora-modules adapter to llm's engine (before the engine thread starts),
    ids 1, 2, ...; ValueError naming the module that cannot be served."""
    loaded = []
    created = int(time.time())
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    for lora_id, module in enumerate(modules, start=1):
        if module.name in names:
            raise ValueError(f"--lora-modules {module.name}: the served model is called {module.name!r} too; "
                             "give the adapter another name")
        request = LoRARequest(module.name, lora_id, module.path)
        try:
            llm.engine.add_lora(request)
        except ValueError as e:
            raise ValueError(f"--lora-modules {module.name}={module.path}: {e}") from None
        loaded.append(LoRAModule(request, module.base_model_name or names[0], created))
    return loaded


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(description="the name requests give as their model")
    lora_path: str = Field(description="a PEFT adapter folder on the server (adapter_config.json, adapter_model.safetensors), or a GGUF adapter file")
    load_inplace: bool = Field(False, description="replace an adapter already loaded under this name")


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_int_id: Optional[int] = Field(None, description="accepted as vLLM does; when given it must be the adapter's id")


def add_routes(app: FastAPI, state: ServerState) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409)}
    updates = asyncio.Lock()  # one load or unload at a time: each checks, then changes, the set

    def check_enabled() -> None:
        if not state.runtime_lora_updates:
            raise APIError(404, "runtime LoRA updates are off on this server: start it with --enable-runtime-lora-updates "
                           "(and --enable-lora) to load and unload adapters", code="not_found")

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=errors,
              summary="vLLM's: serve a LoRA adapter under a new model name (--enable-runtime-lora-updates)")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        name, path = body.lora_name, body.lora_path
        if not name.strip():
            raise APIError(400, "lora_name is empty; give the adapter a name", param="lora_name")
        if not path.strip():
            raise APIError(400, "lora_path is empty; give the adapter's folder or .gguf file", param="lora_path")
        if name in state.model_names:
            raise APIError(400, f"lora_name {short_repr(name)} is the served model's name; give the adapter another", param="lora_name")
        async with updates:
            old = state.loras.get(name)
            if old is not None and not body.load_inplace:
                if old.request.lora_path == path:
                    return PlainTextResponse(f"Success: LoRA adapter '{name}' is already loaded.")
                raise APIError(400, f"lora_name {short_repr(name)} is already loaded from {old.request.lora_path!r}, not "
                               f"{short_repr(path, 400)}; unload it first, or send load_inplace: true", param="lora_name")
            request = LoRARequest(name, state.next_lora_id, path)
            try:
                adapter = await asyncio.to_thread(state.llm.engine.read_lora, request)
            except (ValueError, OSError) as e:
                # (the engine's message names the folder and what is wrong with it)
                message = str(e) if path in str(e) else f"lora_path {short_repr(path, 400)}: {e}"
                raise APIError(400, message, param="lora_path") from None
            if old is not None:
                await _remove(state, old.request)

            def install(engine: Any) -> None:
                # Not served under this name, so what the engine may hold under it is stale (one that
                # LLM.generate loaded on the same engine): dropped, unless still running.
                with suppress(ValueError):
                    engine.remove_lora(name)
                engine.add_lora(request, adapter)

            try:
                await state.engine.call(install)
            except ValueError as e:
                raise APIError(400, f"LoRA adapter {short_repr(name)} cannot be added: {e}", param="lora_name") from None
            state.next_lora_id += 1
            state.loras[name] = LoRAModule(request, state.model_name, int(time.time()))
        logger.info("loaded LoRA adapter %r (id %d) from %s", name, request.lora_int_id, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=errors,
              summary="vLLM's: stop serving a LoRA adapter (--enable-runtime-lora-updates)")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_enabled()
        name = body.lora_name
        async with updates:
            module = state.loras.get(name)
            if module is None:
                raise APIError(404, f"the LoRA adapter {short_repr(name)} is not loaded", param="lora_name", code="model_not_found")
            if body.lora_int_id is not None and body.lora_int_id != module.request.lora_int_id:
                raise APIError(400, f"lora_int_id {short_repr(body.lora_int_id)} is not the id of {name!r} "
                               f"({module.request.lora_int_id})", param="lora_int_id")
            await _remove(state, module.request)
        logger.info("unloaded LoRA adapter %r", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def _remove(state: ServerState, request: LoRARequest) -> None:
    """Stop serving an adapter: out of the list first (no new request picks it), then out of the
    engine; back in the list when the engine refuses (requests still run with it: 409). Requests
    still being submitted with it (streaming.start_requests) are in use too: 409, checked in the
    same step as the list changes, as they would load it back into the engine after its removal."""
    if state.lora_submissions.get(request.lora_name):
        raise APIError(409, f"the LoRA adapter {request.lora_name!r} cannot be unloaded now: it is in use by an unfinished "
                       "request; unload it when they end", param="lora_name")
    module = state.loras.pop(request.lora_name)
    try:
        await state.engine.call(lambda e: e.remove_lora(request.lora_name))  # False: not loaded there (evicted)
    except ValueError as e:
        state.loras[request.lora_name] = module
        raise APIError(409, f"the LoRA adapter {request.lora_name!r} cannot be unloaded now: {e}", param="lora_name") from None
