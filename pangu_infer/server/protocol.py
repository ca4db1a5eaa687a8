"""OpenAI request and response shapes (pydantic), plus the vLLM extras this server accepts.

Requests forbid unknown fields, so a parameter this server does not implement is a clear 400
instead of being silently ignored. The exceptions are IGNORED_FIELDS: what the official SDK and
LangChain send that cannot change the reply here (user, metadata, store, ...); they are accepted
and ignored. Every field is checked for its JSON type here (strictly: no string or boolean read
as a number), and numbers for range by SamplingParams and the engine's
admission (pangu_infer.engine.admission), whose RequestError names the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from pangu_infer.sampling_params import MAX_STOP_STRINGS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The top logprobs a token may ask for are limited by the engine's max_logprobs (vLLM's flag, 20 by
# default, OpenAI's limit): checked with the request (params.to_sampling_params), not here.
MAX_REQUEST_ID_CHARS = 256  # a request_id is repeated in every streamed chunk
# Accepted and ignored: bookkeeping for OpenAI's platform (user, metadata, store, service_tier,
# safety_identifier, prompt caching hints).
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention",
})


# OpenAI's reasoning efforts; the first two turn Pangu's thinking off (server/chat_api.py).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
EFFORTS_WITHOUT_THINKING = ("none", "minimal")


class _Request(BaseModel):
    # strict: a value of the wrong JSON type is refused, not converted (lax pydantic read "2" as n=2,
    # true as temperature 1.0 and stop_token_ids [true] as token 1); an integer still reads as a float
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="a last chunk carries the whole request's usage; omitted: as continuous_usage_stats")
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: every chunk carries usage, the running count of its choice's tokens (with include_usage: "
        "false sends no usage at all, as vLLM)",
    )

    def usage(self) -> tuple[bool, bool]:
        """(the last usage chunk, usage on every chunk), as vLLM reads them: continuous_usage_stats only
        with include_usage; include_usage omitted is continuous_usage_stats (vLLM's default is true)."""
        final = self.include_usage if "include_usage" in self.model_fields_set else self.continuous_usage_stats
        return final, final and self.continuous_usage_stats


class ResponseFormat(_Request):
    type: str = Field(description="text, json_object or json_schema")
    json_schema: Optional[dict[str, Any]] = Field(None, description='{"name", "schema", "strict"}: the reply validates against schema')

    @model_validator(mode="after")
    def _schema_needs_its_type(self) -> "ResponseFormat":
        if self.json_schema is not None and self.type != "json_schema":  # it would constrain nothing
            raise PydanticCustomError("json_schema_unread", "json_schema is read only with type 'json_schema', not {type}",
                                      {"type": repr(self.type)[:80]})
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one field (pangu_infer.sampling_params.StructuredOutputsParams)."""

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json", description="a JSON schema")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = Field(None, description="EBNF (xgrammar's dialect, rule root)")
    json_object: Optional[bool] = None
    structural_tag: Union[dict[str, Any], str, None] = Field(None, description="xgrammar's structural tag")


class FunctionSpec(_Request):
    name: str = Field(min_length=1)  # (OpenAI refuses an empty name; the reply could not call it)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionSpec


def _unique_names(tools: list[Tool]) -> list[Tool]:
    """Tools of one name each (Anthropic refuses two of one name too): a call names the tool it calls."""
    first: dict[str, int] = {}
    for i, tool in enumerate(tools):
        k = first.setdefault(tool.function.name, i)
        if k != i:
            raise PydanticCustomError("duplicate_tool_name", "tools[{k}] and tools[{i}] are both named {name}; tool names must be unique",
                                      {"k": k, "i": i, "name": repr(tool.function.name)[:80]})
    return tools


Tools = Annotated[list[Tool], AfterValidator(_unique_names)]


class NamedToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class ChatMessage(_Request):
    # Roles and content parts are checked by pangu_infer.chat.render_chat, one place for all callers.
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning: Optional[str] = None  # a turn's thinking under vLLM's name now; reasoning_content, the older one
    reasoning_content: Optional[str] = None


class SamplingFields(_Request):
    """Fields shared by both endpoints (OpenAI's and vLLM's names)."""

    model: Optional[str] = Field(None, description="the served model name; defaults to it")
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = Field(1, ge=1, description="completions per prompt")
    stop: Union[str, list[str], None] = Field(None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id -> bias in [-100, 100], added to its logit")
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    allowed_token_ids: Optional[list[int]] = Field(None, description="only these token ids can be generated")
    bad_words: Optional[list[str]] = Field(None, description="words never generated (vLLM's)")
    priority: int = Field(
        0, ge=INT64_MIN, le=INT64_MAX,
        description="lower runs first, on a server started with --scheduling-policy priority (vLLM's); else only 0",
    )
    cache_salt: Optional[str] = Field(
        None, description="the prompt's prefix-cache blocks serve only requests with this salt (a secret per tenant, "
        "e.g. 43 base64 characters)",
    )
    truncate_prompt_tokens: Optional[int] = Field(None, description="keep the prompt's last k tokens; -1: as many as fit the context")
    truncation_side: Optional[Literal["left", "right"]] = Field(
        None, description="vLLM's: which end truncate_prompt_tokens keeps: left (the default) cuts the start, keeping the last "
        "k tokens; right cuts the end, keeping the first k",
    )
    request_id: Optional[str] = Field(
        None, min_length=1, max_length=MAX_REQUEST_ID_CHARS,
        description="vLLM's: the reply's id is cmpl-<request_id> (chat: chatcmpl-<request_id>), also in the request log",
    )
    include_stop_str_in_output: bool = False
    use_beam_search: bool = Field(False, description="beam search (vLLM's): the n best of n beams (n <= 10), each choice whole")
    length_penalty: float = Field(1.0, description="beam search's score: cumulative logprob / length ** length_penalty (vLLM's)")
    prompt_logprobs: Optional[int] = Field(
        None, ge=-1, description="score the prompt: each token's logprob with this many top alternatives (0 up to the "
        "server's --max-logprobs, 20 by default; -1 the whole vocabulary; not with stream=true), as vLLM returns them",
    )
    return_tokens_as_token_ids: Optional[bool] = Field(
        None, description='logprobs name tokens as "token_id:<id>" instead of their text (vLLM)'
    )
    return_token_ids: Optional[bool] = Field(
        None, description="vLLM's: the reply carries the prompt's token ids (prompt_token_ids) and each choice's generated ones "
        "(token_ids); streamed, prompt_token_ids in a choice's first chunk and token_ids per chunk",
    )
    skip_special_tokens: bool = Field(
        True, description="leave the tokenizer's special tokens out of the reply's text (chat: after the reasoning and "
        "tool-call markers are parsed)",
    )
    spaces_between_special_tokens: bool = Field(
        True, description="vLLM's; accepted and changes nothing: this server's tokenizers (and transformers' decode) "
        "join special tokens' texts without spaces either way (docs/design.md)",
    )
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Union[dict[str, Any], str, None] = Field(None, description="alias of structured_outputs.json")
    guided_regex: Optional[str] = Field(None, description="alias of structured_outputs.regex")
    guided_choice: Optional[list[str]] = Field(None, description="alias of structured_outputs.choice")
    guided_grammar: Optional[str] = Field(None, description="alias of structured_outputs.grammar")
    # accepted and ignored (IGNORED_FIELDS)
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None


class PredictionTextPart(_Request):
    type: Literal["text"]
    text: str


class PredictedOutput(_Request):
    type: Literal["content"]
    content: Union[str, list[PredictionTextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # (a 0 is refused naming this field, not max_tokens)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=-1, description="0 up to the server's --max-logprobs (20 by default); -1: "
                                        "the whole vocabulary (vLLM's)")
    tools: Optional[Tools] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        None, description='extra chat template variables, e.g. {"enable_thinking": false}'
    )
    chat_template: Optional[str] = Field(
        None, description="a Jinja chat template for this request instead of the model's (vLLM's; only on a server "
        "started with --trust-request-chat-template)"
    )
    reasoning_effort: Optional[ReasoningEffort] = Field(
        None, description='OpenAI\'s: "none" or "minimal" turn thinking off (enable_thinking false), the others leave it on'
    )
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant's turn opening (vLLM)")
    continue_final_message: bool = Field(
        False, description="the last message is the assistant's and the reply goes on writing it (vLLM; add_generation_prompt false)"
    )
    parallel_tool_calls: Optional[bool] = Field(None, description="false: at most one tool call")
    max_reasoning_tokens: Optional[int] = Field(
        None, description="thinking budget: after this many reasoning tokens the server ends the thinking part"
    )
    include_reasoning: bool = Field(True, description="vLLM's: false leaves the thinking out of the reply (reasoning and "
                                    "reasoning_content, streamed or not); the content is the same")
    echo: bool = Field(
        False, description="vLLM's: when the last message's role is the reply's (assistant: continue_final_message), the reply's "
        "content starts with that message's content (streamed: a chunk of its own after the role's)",
    )
    prediction: Optional[PredictedOutput] = Field(
        None, description="OpenAI's Predicted Outputs: text the reply is expected to repeat mostly (a file being edited); "
        "the server drafts from it and verifies the drafts, so the reply is the one written without it, sooner where "
        "it matches (usage.completion_tokens_details counts its tokens accepted and rejected)",
    )
    # Not a field: where the client gave response_format's schema, for the errors about it (the
    # Responses API's text.format.schema, Messages' output_config.format.schema; chat_api.chat_request).
    _schema_param: str = PrivateAttr("response_format.json_schema")


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, description="0 only with echo: the prompt (and its logprobs) without generating")
    logprobs: Optional[int] = Field(None, ge=-1, description="0 up to the server's --max-logprobs (20 by default); -1: the "
                                    "whole vocabulary (vLLM's)")
    echo: bool = Field(False, description="the reply starts with the prompt; with logprobs, the prompt's tokens are scored too")
    add_special_tokens: bool = Field(True, description="vLLM's: text prompts tokenized with BOS first when the model wants one")


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = Field(True, description="prompt only: BOS first when the model wants one")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Optional[Tools] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = None
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    """OpenAI's /v1/embeddings (server/embeddings.py): the inputs' embeddings, the model's final hidden
    states pooled (serve --pooling) and L2-normalized."""

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="a text, a list of texts, token ids, or a list of token-id lists; each embedded alone"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: each embedding's little-endian float32 bytes, base64-encoded"
    )
    dimensions: Optional[int] = Field(None, description="only the model's hidden size: its embeddings cannot be shortened")
    user: Optional[str] = Field(None, description="accepted and ignored")
    add_special_tokens: bool = Field(True, description="vLLM's: texts tokenized with BOS first when the model wants one")
    truncate_prompt_tokens: Optional[int] = Field(
        None, description="vLLM's: embed each input's last k tokens; -1: as many as fit the context (usage counts those kept)"
    )
    truncation_side: Optional[Literal["left", "right"]] = Field(
        None, description="vLLM's: right keeps each input's first k tokens instead (left, the default: the last k)"
    )
    normalize: bool = Field(True, description="vLLM's: true, the embedding L2-normalized; false, the pooled hidden state as it is")


# ---------------------------------------------------------------------- responses
class PromptTokensDetails(_Response):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache")


class CompletionTokensDetails(_Response):
    accepted_prediction_tokens: int = Field(0, description="tokens of the request's prediction that the reply took")
    rejected_prediction_tokens: int = Field(0, description="tokens of the request's prediction drafted and not taken")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    completion_tokens_details: Optional[CompletionTokensDetails] = Field(None, description="with a prediction")


class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Response):
    error: ErrorInfo


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: Optional[list[TokenLogprob]] = None


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning: Optional[str] = Field(None, description="Pangu's thinking ([unused16]...[unused17]); absent when none (vLLM's name)")
    reasoning_content: Optional[str] = Field(None, description="the same as reasoning (the older name, DeepSeek's)")
    tool_calls: Optional[list[ToolCall]] = Field(None, description="absent when the reply calls no tool")


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = Field(None, description="with return_token_ids: the generated token ids (vLLM's field)")


class PromptLogprob(_Response):
    logprob: float
    rank: Optional[int] = Field(None, description="1 for the likeliest token; null for a prompt token outside the top prompt_logprobs")
    decoded_token: str


# vLLM's prompt_logprobs: one entry per prompt token, null for the first; each maps token ids (the
# prompt token first, then the top alternatives) to their logprob, rank and text.
PromptLogprobs = list[Optional[dict[str, PromptLogprob]]]


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: Optional[PromptLogprobs] = Field(None, description="with prompt_logprobs (vLLM's field)")
    prompt_token_ids: Optional[list[int]] = Field(None, description="with return_token_ids: the prompt's token ids as run (vLLM's field)")


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    # None for the first token of an echoed prompt: nothing predicts it
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = Field(None, description="with prompt_logprobs, or echo with logprobs (vLLM's field)")
    prompt_token_ids: Optional[list[int]] = Field(None, description="with return_token_ids: its prompt's token ids as run (vLLM's field)")
    token_ids: Optional[list[int]] = Field(None, description="with return_token_ids: the generated token ids, not the echoed prompt's")


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(_Response):
    prompt: str


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pangu-infer"
    max_model_len: int
    root: Optional[str] = Field(None, description="a LoRA adapter's folder (vLLM's field; absent on the base model)")
    parent: Optional[str] = Field(None, description="the model a LoRA adapter adapts (vLLM's field; absent on the base model)")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
