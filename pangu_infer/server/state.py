"""What every route of the server shares: the model, the engine, metrics and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pangu_infer.server.metrics import ServerMetrics
from pangu_infer.server.response_store import ResponseStore


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

    def token_text(self, token_id: int) -> str:
        """A token's own text for logprobs (special tokens included), cached."""
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.llm.tokenizer.decode([token_id], skip_special_tokens=False)
        return text
