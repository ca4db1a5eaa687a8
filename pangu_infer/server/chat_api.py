"""The chat path every chat-shaped endpoint shares: a request checked, rendered and submitted
(`start_chat`), and a finished reply parsed into reasoning, content and tool calls (`chat_choice`).
/v1/chat/completions (server/app.py), /v1/responses (server/responses.py) and /v1/messages
(server/messages.py) build a ChatCompletionRequest and go through here."""

from __future__ import annotations

import asyncio
import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from pangu_infer.chat import TOOL_CALL_END, TOOL_CALL_START, is_pangu_template, parse_tool_calls, render_chat, split_reasoning
from pangu_infer.chat.render import join_text_parts
from pangu_infer.engine.sequence import Logprob
from pangu_infer.errors import short_repr
from pangu_infer.outputs import CompletionOutput
from pangu_infer.sampling_params import SamplingParams
from pangu_infer.server.errors import APIError
from pangu_infer.server.params import beam_search_params, check_model, check_size, to_sampling_params
from pangu_infer.server.protocol import EFFORTS_WITHOUT_THINKING, ChatCompletionRequest
from pangu_infer.server.state import ServerState
from pangu_infer.server.streaming import as_sent, start_requests, unless_gone
from pangu_infer.server.structured import reasoning_budget, tool_constraint
from pangu_infer.tokenizer import ChatTemplateError, check_chat_template

# A request's own chat_template, at most: real templates take 2-20 KB; Jinja compiling 620 KB took
# 6 s and 500 MB, 6 MB a minute and 3 GB.
MAX_REQUEST_TEMPLATE_CHARS = 64 << 10

# Template variables the server sets itself; a request may not override them: the chat's own, and
# the functions templates call (Jinja's globals, jinja2.defaults.DEFAULT_NAMESPACE, and the two
# pangu_infer.tokenizer adds): {"strftime_now": 5} made Llama 3's template, which calls it, a 500.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "add_generation_prompt", "tools", "bos_token", "eos_token",
    "range", "dict", "lipsum", "cycler", "joiner", "namespace", "raise_exception", "strftime_now",
})


async def start_chat(state: ServerState, req: ChatCompletionRequest, request: Request, prefix: str, length_field: str,
                     client_id: Optional[str] = None):
    """A chat request checked, rendered and submitted: (request id, generators, first outputs,
    parsing, prompt ids as admitted, the model name to answer with), or the 499 Response of a
    client that left meanwhile. /v1/chat/completions, /v1/responses and /v1/messages share it.
    length_field: the name the client gave the reply's length limit (each API's own, which the chat
    request holds as max_completion_tokens or max_tokens): admission's errors about it name it.
    client_id: the reply's id is prefix-client_id (params.client_request_id); None: req.request_id, if any."""
    params, text, ids, parse = await prepare_chat(state, req)
    lora = check_model(state, req.model)  # (checked first thing in prepare_chat: here, only which adapter)
    # Watched for a disconnect from here on: queued or in prefill, a client that leaves frees its slot.
    try:
        started = await unless_gone(request, start_requests(state, [(text, ids)], params, prefix, lora, req.cache_salt, req.priority,
                                                              length_field=length_field, client_id=client_id or req.request_id,
                                                              beam=beam_search_params(state, req, params)),
                                    state.metrics)
    except APIError as e:
        raise as_sent(e, length_field) from None
    if isinstance(started, Response):
        return started
    request_id, gens, firsts = started
    # prompt ids as admitted (truncate_prompt_tokens)
    return request_id, gens, firsts, parse, firsts[0].prompt_token_ids, state.reply_model(lora)


async def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> tuple[SamplingParams, str, list[int], ChatParsing]:
    """A chat request checked and rendered: its sampling parameters, prompt text and ids, parsing."""
    check_model(state, req.model)
    tok = state.llm.tokenizer
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    forced_tool = req.tool_choice is not None and req.tool_choice not in ("auto", "none")
    if forced_tool and not req.tools:
        raise APIError(400, "tool_choice 'required' or a named function needs tools", param="tool_choice")
    use_tools = bool(req.tools) and req.tool_choice != "none"
    template_kwargs = checked_template_kwargs(req.chat_template_kwargs)
    enable_thinking = template_kwargs.pop("enable_thinking", None)
    if req.reasoning_effort is not None:
        thinking = req.reasoning_effort not in EFFORTS_WITHOUT_THINKING
        if enable_thinking is not None and enable_thinking != thinking:
            raise APIError(400, f"reasoning_effort={req.reasoning_effort!r} and chat_template_kwargs.enable_thinking="
                           f"{enable_thinking!r} disagree; give one", param="reasoning_effort")
        enable_thinking = thinking if enable_thinking is None else enable_thinking
    budget = reasoning_budget(req, template_kwargs, state.reasoning_budget)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = to_sampling_params(state, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, chat=True)
    params = with_tool_constraint(params, req, use_tools, forced_tool, enable_thinking, budget, tok)
    if req.prediction is not None:
        params = replace(params, prediction=req.prediction.text)
    check_size(state, 1, req.n)
    # Rendering and tokenizing take seconds for a prompt of megabytes: off the event loop, so that
    # other requests' streams go on meanwhile (as for every prompt below).
    text, ids = await asyncio.to_thread(render, state, req, req.tools if use_tools else None, enable_thinking, template_kwargs)
    return params, text, ids, ChatParsing(reasoning=is_pangu_template(tok, req.chat_template), tools=use_tools)


def checked_template_kwargs(given: Optional[dict]) -> dict:
    template_kwargs = dict(given or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: the server sets them", param="chat_template_kwargs")
    thinking = template_kwargs.get("enable_thinking")
    if thinking not in (None, "auto") and not isinstance(thinking, bool):  # (render_chat's ValueError named messages)
        raise APIError(400, f"chat_template_kwargs.enable_thinking must be true, false or \"auto\", got {short_repr(thinking)}",
                       param="chat_template_kwargs.enable_thinking")
    return template_kwargs


def request_chat_template(state: ServerState, req: Any) -> Optional[str]:
    """A request's own chat_template (vLLM's field), checked: only on a server that trusts them."""
    given = getattr(req, "chat_template", None)
    if given is None:
        return None
    if not state.trust_request_chat_template:
        raise APIError(400, "chat_template in a request is refused: this server renders chats with its own template "
                       "(start it with --trust-request-chat-template to allow requests to bring theirs)", param="chat_template")
    try:
        check_chat_template(given, max_chars=MAX_REQUEST_TEMPLATE_CHARS)
    except ValueError as e:
        raise APIError(400, str(e), param="chat_template") from None
    return given


def reasoning_fields(text: str) -> dict[str, str]:
    """The thinking of a reply (or of a streamed delta) under both names clients read: `reasoning`,
    vLLM's since its PR #27752 (OpenAI's guidance for chain of thought in Chat Completions, as
    OpenRouter names it; vLLM has since dropped the old name), and `reasoning_content`, DeepSeek's,
    which older vLLM clients and the DeepSeek-convention ones (Vercel's AI SDK, OpenCode) read."""
    return {"reasoning": text, "reasoning_content": text}


# Fields only some roles carry (OpenAI's message types): a tool result answers a call by its id, and
# only an assistant makes calls. Taken elsewhere they were silently dropped or shown to the template
# as something the chat never said. (`name` goes with any role: OpenAI's types leave it off a tool
# result, but LangChain sends a ToolMessage's name, the tool's, and vLLM takes it.)
ROLES_OF_FIELD = {"tool_call_id": ("tool",), "tool_calls": ("assistant",)}


def check_message_fields(index: int, message: Any) -> None:
    """A 400 naming messages[index].FIELD for a field its role cannot carry (ROLES_OF_FIELD)."""
    for field, roles in ROLES_OF_FIELD.items():
        if getattr(message, field, None) is not None and message.role not in roles:
            where = f"messages[{index}].{field}"
            raise APIError(400, f"{where}: a message of role {short_repr(message.role)} cannot carry {field} "
                           f"(only {' or '.join(roles)} messages can)", param=where)


def _template_message(message: Any) -> dict[str, Any]:
    """A message as the chat template gets it: a turn's thinking sent as `reasoning` (vLLM's name
    now) is also its `reasoning_content`, the name templates read."""
    out = message.model_dump(exclude_none=True)
    if "reasoning" in out:
        out.setdefault("reasoning_content", out["reasoning"])
    return out


def render(state: ServerState, req: Any, tools: Optional[list], enable_thinking: Any, template_kwargs: dict) -> tuple[str, list[int]]:
    """A chat's prompt text and token ids, as the model's template (or the request's own, checked by
    request_chat_template) renders it (req: its messages, add_generation_prompt and continue_final_message)."""
    template = request_chat_template(state, req)
    for i, message in enumerate(req.messages):
        check_message_fields(i, message)
        if message.reasoning is not None and message.reasoning_content not in (None, message.reasoning):
            where = f"messages[{i}].reasoning"
            raise APIError(400, f"{where} and messages[{i}].reasoning_content differ; give one (the same thinking under "
                           "either name)", param=where)
        for k, call in enumerate(message.tool_calls or []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and not isinstance(function.get("arguments", ""), str):
                # (OpenAI's and vLLM's type; the renderer took an object as it was)
                where = f"messages[{i}].tool_calls[{k}].function.arguments"
                raise APIError(400, f"{where} must be a string (of JSON), got {short_repr(function['arguments'])}", param=where)
    try:
        text = render_chat(
            state.llm.tokenizer,
            [_template_message(m) for m in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            enable_thinking=enable_thinking,
            tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
            chat_template=template,
            **template_kwargs,
        )
    except ChatTemplateError as e:
        # the request's own template failing is that template's fault; the model's, what it was given
        raise APIError(400, str(e), param="chat_template" if template is not None else "messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return text, state.llm.encode_prompt(text)


def with_tool_constraint(params: SamplingParams, req: ChatCompletionRequest, use_tools: bool, forced_tool: bool,
                          enable_thinking: Any, budget: Optional[int], tok: Any) -> SamplingParams:
    """Tool calls constrained to well-formed calls (server/structured.py), and the thinking budget.
    On Pangu templates with thinking on, a constraint starts after the thinking part."""
    structured = params.structured_outputs
    if use_tools and (forced_tool or structured is None):
        if forced_tool and structured is not None:
            raise APIError(400, f"tool_choice 'required' or a named function cannot be combined with {structured.param}",
                           param="tool_choice")  # (named as the client sent it: text.format on the Responses API)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        structured = tool_constraint(tools, req.tool_choice.model_dump() if forced_tool and not isinstance(req.tool_choice, str)
                                     else req.tool_choice, req.parallel_tool_calls, tool_marker_ids(tok))
    thinking = enable_thinking is not False and is_pangu_template(tok, getattr(req, "chat_template", None))
    return replace(params, structured_outputs=structured, max_reasoning_tokens=budget, allow_thinking=thinking)


def tool_marker_ids(tok: Any) -> Optional[tuple[int, int]]:
    start, end = tok.token_to_id(TOOL_CALL_START), tok.token_to_id(TOOL_CALL_END)
    return (start, end) if start is not None and end is not None else None


@dataclass
class ChatParsing:
    reasoning: bool  # Pangu template: [unused16]...[unused17] is reasoning
    tools: bool  # tools offered: [unused11]...[unused12] are tool calls


def chat_choice(state: ServerState, comp: CompletionOutput, parse: ChatParsing, logprobs: bool,
                special: Optional[SpecialTokenFilter] = None, token_ids: bool = False, include_reasoning: bool = True,
                echo: str = "") -> dict:
    """special: the special tokens to take out of reasoning and content once parsed (skip_special_tokens);
    token_ids: logprobs name tokens as "token_id:<id>" (return_tokens_as_token_ids); include_reasoning
    false: the thinking left out (vLLM's field); echo: text the content starts with (echoed_text)."""
    reasoning, content = split_reasoning(comp.text) if parse.reasoning else (None, comp.text)
    calls: list[dict] = []
    if parse.tools:
        content, calls = parse_tool_calls(content)
    if special is not None:
        special.saw(comp.token_ids)
        content = special.remove(content)
        reasoning = special.remove(reasoning) if reasoning is not None else None
    if echo:
        content = echo + content
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning is not None and include_reasoning:
        message.update(reasoning_fields(reasoning))
    if calls:
        message["tool_calls"] = calls
    return {
        "index": comp.index,
        "message": message,
        "logprobs": {"content": chat_logprobs(state, comp.logprobs or [], token_ids)} if logprobs else None,
        "finish_reason": "tool_calls" if calls else comp.finish_reason,
    }


def echoed_text(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's content (text parts joined as rendered) when its role is the
    reply's, which is always the assistant's here (continue_final_message, or a last assistant turn);
    else nothing."""
    if not req.echo or not req.messages or req.messages[-1].role != "assistant":
        return ""
    content = req.messages[-1].content
    return join_text_parts(content)[0] if isinstance(content, list) else content or ""


def token_name(state: ServerState, token_id: int, as_id: bool) -> str:
    """A token as logprobs name it: its text, or vLLM's "token_id:<id>" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_id else state.token_text(token_id)


def chat_logprobs(state: ServerState, logprobs: list[Logprob], token_ids: bool = False) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_name(state, token_id, token_ids)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]


def prompt_logprobs(state: ServerState, entries: Optional[list[Optional[Logprob]]]) -> list[Optional[dict]]:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}, the prompt token first and then the top alternatives ranked 1, 2, ... (a prompt
    token among them keeps its first place with its rank there; one outside them has its rank
    among the whole vocabulary, 1 + the tokens more likely than it)."""
    out: list[Optional[dict]] = []
    for lp in entries or []:
        if lp is None:
            out.append(None)
            continue
        ranked = {t: (v, rank) for rank, (t, v) in enumerate(lp.top, 1)}
        logprob, rank = ranked.get(lp.token_id, (lp.logprob, lp.rank))
        position = {str(lp.token_id): {"logprob": finite(logprob), "rank": rank, "decoded_token": state.token_text(lp.token_id)}}
        for t, (v, r) in ranked.items():
            position.setdefault(str(t), {"logprob": finite(v), "rank": r, "decoded_token": state.token_text(t)})
        out.append(position)
    return out


class SpecialTokenFilter:
    """skip_special_tokens on chat: the texts of the special tokens a reply generated taken out of its
    reasoning and content after the reasoning / tool-call parsers have read their markers (the
    engine keeps special tokens for them). Only tokens whose ids the reply holds (`saw`) are taken
    out: the same characters written as ordinary tokens (HTML's `<s>` beside a bos `<s>`) stay, as
    vLLM's skipping by id keeps them (until the reply also generates that special token). Streamed,
    `feed` holds back a tail that may be the start of one until the next piece shows; the pieces
    joined equal `remove` of the whole text."""

    def __init__(self, texts: dict[int, str]):
        self._texts = texts
        self._seen: set[str] = set()
        _, self._prefixes, self._longest = _special_pattern(frozenset(texts.values()))
        self._pattern = None
        self._held = ""

    def saw(self, token_ids) -> None:
        """The reply's token ids so far: the special ones among them are taken out of its text."""
        new = {self._texts[t] for t in token_ids if t in self._texts} - self._seen
        if new:
            self._seen |= new
            self._pattern = _special_pattern(frozenset(self._seen))[0]

    def remove(self, text: str) -> str:
        return self._pattern.sub("", text) if self._pattern is not None else text

    def feed(self, text: str) -> str:
        text = self._held + text
        keep = next((k for k in range(min(self._longest, len(text)), 0, -1) if text[-k:] in self._prefixes), 0)
        self._held = text[len(text) - keep:] if keep else ""
        return self.remove(text[: len(text) - keep])

    def finish(self) -> str:
        text, self._held = self._held, ""
        return self.remove(text)


def special_token_filter(state: ServerState) -> SpecialTokenFilter:
    tok = state.llm.tokenizer
    return SpecialTokenFilter({i: text for i in tok.all_special_ids if (text := state.token_text(i))})


@functools.lru_cache(maxsize=8)
def _special_pattern(texts: frozenset[str]) -> tuple[Optional[re.Pattern], frozenset[str], int]:
    """(the texts as one regex, longest first; every proper prefix of one; the longest prefix's length)."""
    if not texts:
        return None, frozenset(), 0
    pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
    prefixes = frozenset(t[:k] for t in texts for k in range(1, len(t)))
    return pattern, prefixes, max(len(t) for t in texts) - 1


def finite(logprob: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number. -9999.0 is what vLLM sends too.
    return max(float(logprob), -9999.0)


def chat_request(fields: dict[str, Any], schema_param: Optional[str] = None,
                 sent_as: Optional[Callable[[tuple], Optional[str]]] = None) -> ChatCompletionRequest:
    """The chat request another API's request maps to (None fields left out); a field it got
    wrong is a 400 naming where. schema_param: where that API's request gave the schema it maps
    to response_format (errors about the schema name it). sent_as: where that API's request gave
    what the chat request holds at a location (pydantic's loc), None where it is the same; without
    it a Messages max_tokens of 0 was refused as max_completion_tokens, an input_schema that is no
    object as tools.0.function.parameters."""
    try:
        req = ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        where = (sent_as(loc) if sent_as is not None else None) or ".".join(str(p) for p in loc)
        raise APIError(400, f"invalid request: {where}: {first['msg']} (got {short_repr(first.get('input'))})", param=where) from None
    if schema_param is not None:
        req._schema_param = schema_param
    return req


def tool_field_sent_as(loc: tuple, names: Optional[dict[str, str]] = None) -> Optional[str]:
    """tools[k].FIELD for a chat request's tools.k.function.FIELD (the Responses and Messages APIs
    give a tool's fields flat; `names` renames some: Messages' input_schema is chat's parameters)."""
    if len(loc) >= 4 and loc[0] == "tools" and isinstance(loc[1], int) and loc[2] == "function":
        field = (names or {}).get(str(loc[3]), str(loc[3]))
        return ".".join([f"tools[{loc[1]}].{field}", *(str(p) for p in loc[4:])])
    return None
