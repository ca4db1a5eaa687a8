"""What every route of the server shares: the model, the engine, metrics and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pangu_infer.lora import LoRARequest
from pangu_infer.server.metrics import ServerMetrics
from pangu_infer.server.response_store import ResponseStore


@dataclass(frozen=True)
class LoRAModule:
    """An adapter this server serves: what requests naming it run with, and its /v1/models card
    (server/lora.py adds them)."""

    request: LoRARequest
    parent: str  # the model it adapts: its base_model_name, else the served model
    created: int


@dataclass
class ServerState:
    llm: Any  # pangu.LLM: tokenizer, encode_prompt, default_sampling_params, config
    engine: Any  # AsyncEngine or anything with its generate / stats / moe_stats
    model_name: str
    api_key: Optional[str]
    metrics: ServerMetrics
    created: int
    max_seqs_per_request: int
    token_texts: dict[int, str]
    reasoning_budget: Optional[int] = None  # --reasoning-budget: the default max_reasoning_tokens of chat requests
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses kept for previous_response_id
    loras: dict[str, LoRAModule] = field(default_factory=dict)  # LoRA adapters served, by name (server/lora.py)
    next_lora_id: int = 1  # lora_int_id of the next adapter loaded at runtime (ids are never reused)
    # Requests being submitted with an adapter, by its name: named again in loras and counted in one
    # step, uncounted once the engine runs them (streaming.start_requests); an unload answers 409
    # while any are (server/lora.py _remove), so none brings an unloaded adapter back into the engine.
    lora_submissions: dict[str, int] = field(default_factory=dict)
    runtime_lora_updates: bool = False  # --enable-runtime-lora-updates: /v1/load_lora_adapter and unload answer
    trust_request_chat_template: bool = False  # --trust-request-chat-template: a request may bring its chat_template
    # --return-tokens-as-token-ids (vLLM's): logprobs name tokens "token_id:<id>" where a request does not say
    return_tokens_as_token_ids: bool = False
    other_model_names: tuple[str, ...] = ()  # --served-model-name's names after the first: requests may send them
    log_requests: bool = False  # --enable-log-requests: each request's prompt and parameters, and its end, logged
    max_log_len: Optional[int] = None  # --max-log-len: characters of a logged prompt and parameters (None: all)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name of the served model (the first is the one replies give)."""
        return (self.model_name, *self.other_model_names)

    def tokens_as_ids(self, asked: Optional[bool]) -> bool:
        """Do a request's logprobs name tokens "token_id:<id>"? Its own return_tokens_as_token_ids, else the server's."""
        return self.return_tokens_as_token_ids if asked is None else bool(asked)

    def reply_model(self, lora: Optional[LoRARequest]) -> str:
        """The `model` a response names: the adapter's name for a request that runs one, else the served name."""
        return lora.lora_name if lora is not None else self.model_name

    def token_text(self, token_id: int) -> str:
        """A token's own text for logprobs (special tokens included), cached."""
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.llm.tokenizer.decode([token_id], skip_special_tokens=False)
        return text
