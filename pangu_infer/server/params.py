"""Request -> engine: the model check, sampling parameters from a request's fields, size limits."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

from pangu_infer.engine.admission import checked_logprobs
from pangu_infer.engine.beam_search import widest_beam
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.sampling_params import MAX_BEAM_WIDTH, BeamSearchParams, SamplingParams
from pangu_infer.server.errors import APIError
from pangu_infer.server.structured import request_constraint
from pangu_infer.server.protocol import IGNORED_FIELDS, MAX_REQUEST_ID_CHARS, SamplingFields
from pangu_infer.lora import LoRARequest
from pangu_infer.server.state import ServerState

logger = logging.getLogger("pangu_infer.server")
MAX_NAMES_IN_MESSAGE = 10  # LoRA adapters named in a model_not_found message

_logged_ignored_fields: set[str] = set()  # SDK fields this server ignores, each logged once


def check_model(state: ServerState, model: Optional[str]) -> Optional[LoRARequest]:
    """The LoRA adapter a request's `model` names (None: the served model, or no model given); any
    other name is a 404 model_not_found."""
    if model is None or model in state.model_names:
        return None
    module = state.loras.get(model)
    if module is not None:
        return module.request
    also = f" (also {', '.join(map(repr, state.other_model_names))})" if state.other_model_names else ""
    served = f"this server serves {state.model_name!r}{also}"
    if state.loras:
        names = sorted(state.loras)
        more = f" and {len(names) - MAX_NAMES_IN_MESSAGE} more" if len(names) > MAX_NAMES_IN_MESSAGE else ""
        served += f" and the LoRA adapters {', '.join(map(repr, names[:MAX_NAMES_IN_MESSAGE]))}{more}"
    raise APIError(404, f"the model {short_repr(model)} does not exist; {served}", param="model", code="model_not_found")


REQUEST_ID_HEADER = "X-Request-Id"


def client_request_id(request: Any, given: Optional[str]) -> Optional[str]:
    """The request's own id, as vLLM takes it: the X-Request-Id header when sent (over the body's
    request_id), else the body's (None: the server makes one). The header is held to request_id's
    length (it is repeated in every streamed chunk); a 400 names it. (A proxy's header
    characters cannot break the log: streaming._start escapes what is not printable.)"""
    header = request.headers.get(REQUEST_ID_HEADER)
    if header is None:
        return given
    if not 1 <= len(header) <= MAX_REQUEST_ID_CHARS:
        raise APIError(400, f"the {REQUEST_ID_HEADER} header must hold 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(header)}",
                       param=REQUEST_ID_HEADER)
    return header


def to_sampling_params(state: ServerState, req: SamplingFields, max_tokens: Optional[int], logprobs: Optional[int], chat: bool) -> SamplingParams:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed together with stream=true", param="stream_options")
    if req.prompt_logprobs is not None and req.stream:
        # vLLM refuses them too: a stream's chunks have no place for them
        raise APIError(400, f"prompt_logprobs={short_repr(req.prompt_logprobs)} is not available with stream=true; "
                       "ask without streaming", param="prompt_logprobs")
    limits = state.llm.engine.limits  # (the engine's admission checks them again, naming its own fields)
    checked_logprobs(logprobs, limits, "top_logprobs" if chat else "logprobs")
    checked_logprobs(req.prompt_logprobs, limits, "prompt_logprobs")
    changes: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            changes[name] = value
    changes.update(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        logit_bias=req.logit_bias,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
        truncation_side=req.truncation_side or "left",
        include_stop_str_in_output=req.include_stop_str_in_output,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,  # (completions: echo with logprobs asks for them too, app.py)
        # Chat keeps the [unusedN] markers for the reasoning / tool parsers; its skip_special_tokens
        # takes the special tokens out after parsing (chat_api.special_token_filter).
        skip_special_tokens=req.skip_special_tokens and not chat,
        structured_outputs=request_constraint(req),  # response_format, structured_outputs, guided_*
    )
    log_ignored_fields(req)
    return replace(state.llm.default_sampling_params(), **changes)  # RequestError -> a 400 naming the field


def log_ignored_fields(req: SamplingFields) -> None:
    for name in sorted(IGNORED_FIELDS & req.model_fields_set - _logged_ignored_fields):
        _logged_ignored_fields.add(name)
        logger.debug("ignoring the request field %r: it has no meaning on this server (logged once)", name)


def check_size(state: ServerState, num_prompts: int, n: int) -> None:
    total = num_prompts * n
    if total > state.max_seqs_per_request:
        raise APIError(
            400,
            f"this request asks for {num_prompts} prompt(s) x n={short_repr(n)} = {short_repr(total)} sequences; the server runs at most "
            f"{state.max_seqs_per_request} (--max-num-seqs) at once, so one request may ask for at most that many",
            param="n",
        )


# What beam search cannot honour (it reads n, temperature, max_tokens, ignore_eos, length_penalty,
# include_stop_str_in_output and skip_special_tokens): a request that sets one of these with
# use_beam_search is a 400 naming it (vLLM's server ignores most of them)
BEAM_SEARCH_REFUSED = (
    "logprobs", "top_logprobs", "prompt_logprobs", "echo", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
    "truncate_prompt_tokens", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "tools", "tool_choice", "prediction", "max_reasoning_tokens",
)


# Values of those fields that change nothing (the sampling defaults themselves: clients such as
# LangChain's OpenAI wrapper send them with every request), taken with use_beam_search as vLLM takes them.
_NO_EFFECT = {"top_p": 1.0, "top_k": (0, -1), "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
              "repetition_penalty": 1.0, "min_tokens": 0, "echo": False, "logprobs": False}


def _changes_nothing(name: str, value: Any) -> bool:
    """Is `value` of a beam-search-refused field one that changes nothing (an empty list or object, or
    _NO_EFFECT's)? Types count: chat's logprobs false changes nothing, completions' logprobs 0 asks for one."""
    if isinstance(value, (list, dict)) and not value:
        return True
    neutral = _NO_EFFECT.get(name, ())
    return any(value == n and type(value) is type(n) or isinstance(n, float) and type(value) is int and value == n
               for n in (neutral if isinstance(neutral, tuple) else (neutral,)))


def beam_search_params(state: ServerState, req: SamplingFields, params: SamplingParams) -> Optional[BeamSearchParams]:
    """use_beam_search's parameters (vLLM's: the beam width is n, the temperature the request's, else
    the default one), max_tokens as `params` has it (the server fits a length not given per prompt:
    streaming._start); None without use_beam_search. A 400 naming a field beam search cannot honour."""
    if not req.use_beam_search:
        if req.length_penalty != 1.0:
            raise APIError(400, f"length_penalty={short_repr(req.length_penalty)} applies only to beam search: give use_beam_search=true "
                           "with it", param="length_penalty")
        return None
    default = {name: f.default for name, f in type(req).model_fields.items()}
    for name in BEAM_SEARCH_REFUSED:
        value = getattr(req, name, None)
        if name in req.model_fields_set and value != default.get(name) and not _changes_nothing(name, value):
            raise APIError(400, f"{name} is not available with use_beam_search (beam search reads n, temperature, max_tokens, "
                           "ignore_eos, length_penalty and include_stop_str_in_output)", param=name)
    if params.structured_outputs is not None or params.max_reasoning_tokens is not None:  # (the server's own: a thinking budget)
        which = "max_reasoning_tokens" if params.max_reasoning_tokens is not None else "structured_outputs"
        raise APIError(400, f"{which} (this server's default) is not available with use_beam_search; give "
                       "chat_template_kwargs {\"enable_thinking\": false}, or no use_beam_search", param=which)
    limits = state.llm.engine.limits
    allowed = widest_beam(limits)  # (each beam reads 2 * n top logprobs a step)
    widest = MAX_BEAM_WIDTH if allowed is None else min(MAX_BEAM_WIDTH, allowed)
    if req.n > widest:
        why = "" if widest == MAX_BEAM_WIDTH else (
            f" (each beam reads 2 * n top logprobs a step, and this server's --max-logprobs is {limits.max_logprobs})")
        raise APIError(400, f"n={short_repr(req.n)} is the beam width of use_beam_search: at most {widest}{why}", param="n")
    try:
        return BeamSearchParams(beam_width=req.n, max_tokens=params.max_tokens or 1, ignore_eos=req.ignore_eos,
                                temperature=params.temperature, length_penalty=req.length_penalty,
                                include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=params.skip_special_tokens)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
