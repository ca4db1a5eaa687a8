"""What generation returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pangu_infer.engine.sequence import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[Logprob]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: Any = None  # the stop string or stop token id that ended it
    # What is new since the previous output of this request (for streaming).
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: Optional[list[Logprob]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)  # ttft, tpot (seconds), cached prompt tokens
    reasoning: Optional[str] = None  # set by LLM.chat when the model wrote a thinking part
    # set when the request failed (finish_reason "error"): a generic message for a fault of the
    # engine (the log has the traceback), or what was wrong with the request's own input
    error: Optional[str] = None
    # the request field at fault when its own input made it fail (a grammar that allows nothing
    # more names "structured_outputs.json", or the server's "response_format"); None for the engine's
    error_param: Optional[str] = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (vLLM's
    # shape); complete once the prompt is computed (the first output with a generated token)
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class EmbeddingOutput:
    """vLLM's: the prompt's embedding (its final hidden states pooled, L2-normalized)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What an embedding request returns (LLM.embed), shaped like vLLM's: `outputs.embedding`.
    The engine gives one per request, when it ends (finished: True), or on failure with `error`
    (and `error_param` when its own input was at fault), as RequestOutput does."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: Optional[str] = None
    metrics: dict = field(default_factory=dict)  # e2e (seconds), cached prompt tokens
    error: Optional[str] = None
    error_param: Optional[str] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return 0


@dataclass
class BeamSearchSequence:
    """One sequence of LLM.beam_search, vLLM's shape: `tokens` and `text` hold the prompt and the
    generated tokens (a final EOS only with include_stop_str_in_output; `text` decodes `tokens`),
    `cum_logprob` the sum of the generated tokens' logprobs (EOS's included), `logprobs` per
    generated token the candidates read at that step (token id -> logprob), `finish_reason` "stop"
    (EOS, `stop_reason` its id) or "length" (max_tokens). `score`: how it ranked,
    cum_logprob / length ** length_penalty."""

    tokens: list[int]
    logprobs: list[dict[int, float]]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    score: float = 0.0
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens alone."""
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """vLLM's: the best beam_width sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]
