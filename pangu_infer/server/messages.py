"""Anthropic's Messages API (`POST /v1/messages`) over the chat path, for clients written against it.

A request becomes a chat request (`to_chat_request`): `system` a system turn, user text blocks
user turns, `tool_result` blocks tool turns, assistant `tool_use` blocks tool calls (thinking
blocks are not sent back). Client tools (`{"name", "description", "input_schema"}`) become function
tools and `tool_choice` auto/any/tool/none maps to auto/required/named/none;
`thinking: {"type": "enabled", "budget_tokens": N}` turns Pangu's thinking on with that budget
(as Anthropic's: 1024 <= N < max_tokens),
`{"type": "adaptive"}` lets the model choose (Pangu's auto think), `{"type": "disabled"}` turns it
off; `output_config.format` (a JSON schema) constrains the text as response_format does. The reply becomes content blocks: `thinking`, `text`, and a `tool_use`
per call, with stop_reason end_turn, max_tokens, stop_sequence or tool_use. With `stream: true`,
Anthropic's events (`MessagesStream`): message_start, content_block_start/delta/stop per block,
message_delta with the stop reason and usage, message_stop. Errors keep this server's one shape
(OpenAI's); Anthropic's SDK raises its own exceptions from the status alone.
"""

from __future__ import annotations

import json
import uuid
from contextlib import aclosing, contextmanager
from typing import Any, AsyncIterator, Iterator, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from pangu_infer.chat import ChatStreamParser
from pangu_infer.chat.render import join_text_parts
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.outputs import RequestOutput
from pangu_infer.server.chat_api import ChatParsing, chat_choice, chat_request, prepare_chat, start_chat, tool_field_sent_as
from pangu_infer.server.errors import APIError, stream_error
from pangu_infer.server.protocol import ChatCompletionRequest, _Request
from pangu_infer.server.state import ServerState
from pangu_infer.server.structured import check_format_keys
from pangu_infer.server.streaming import final_outputs, merged_outputs, observe, sse_event, unless_gone


MIN_THINKING_BUDGET = 1024  # Anthropic's least thinking.budget_tokens


class ThinkingConfig(_Request):
    type: Any = None  # enabled, adaptive or disabled (checked in to_chat_request, as budget_tokens)
    budget_tokens: Any = None


class OutputConfig(_Request):
    format: Any = Field(None, description='{"type": "json_schema", "schema": ...} (checked in to_chat_request)')
    effort: Optional[str] = Field(None, description="accepted and ignored")


class MessagesRequest(_Request):
    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: Union[str, list[dict[str, Any]], None] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stream: bool = False
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
    # objects of known keys: an unknown one is a 400, not ignored
    thinking: Optional[ThinkingConfig] = Field(
        None, description='{"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} (Pangu\'s auto think) or {"type": "disabled"}'
    )
    output_config: Optional[OutputConfig] = Field(None, description='{"format": {"type": "json_schema", "schema": ...}}; effort is accepted and ignored')
    # accepted and ignored: bookkeeping, and prompt caching hints (the prefix cache needs none)
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    cache_control: Optional[dict[str, Any]] = None


class CountTokensRequest(MessagesRequest):
    """/v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: Optional[int] = None


def to_chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    messages: list[dict] = []
    if req.system is not None:
        messages.append({"role": "system", "content": _text(req.system, "system")})
    for i, message in enumerate(req.messages):
        messages += _chat_messages(message, f"messages[{i}]")
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_tokens,
        "stop": req.stop_sequences,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stream": req.stream,
    }
    if req.tools:
        fields["tools"] = [_tool(tool, f"tools[{k}]") for k, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        fields.update(_tool_choice(req.tool_choice))
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise APIError(400, 'output_config.format must be {"type": "json_schema", "schema": {...}}', param="output_config.format")
        check_format_keys(fmt, "output_config.format", ("type", "schema"))
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if req.thinking is not None:
        kind = req.thinking.type
        if kind == "adaptive":
            fields["chat_template_kwargs"] = {"enable_thinking": "auto"}
        elif kind == "enabled":
            # Anthropic's rules: at least 1024, and less than max_tokens, which the thinking counts toward
            budget = req.thinking.budget_tokens
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < MIN_THINKING_BUDGET:
                raise APIError(400, f"thinking.budget_tokens must be an integer >= {MIN_THINKING_BUDGET}, got {short_repr(budget)}",
                               param="thinking.budget_tokens")
            if req.max_tokens is not None and 1 <= req.max_tokens <= budget:  # (a max_tokens below 1 is its own 400)
                raise APIError(400, f"thinking.budget_tokens ({short_repr(budget)}) must be less than max_tokens "
                               f"({short_repr(req.max_tokens)}): the thinking counts toward max_tokens, and the answer needs room after it",
                               param="thinking.budget_tokens")
            fields["chat_template_kwargs"] = {"enable_thinking": True}
            fields["max_reasoning_tokens"] = budget
        elif kind == "disabled":
            fields["chat_template_kwargs"] = {"enable_thinking": False}
        else:
            raise APIError(400, f"thinking.type is {short_repr(kind)}; expected enabled, adaptive or disabled", param="thinking.type")
    return chat_request(fields, schema_param="output_config.format.schema", sent_as=_sent_as)


def _sent_as(loc: tuple) -> Optional[str]:
    """Where a Messages request gave what its chat request holds at `loc` (chat_request)."""
    if loc[:1] == ("max_completion_tokens",):
        return "max_tokens"
    return tool_field_sent_as(loc, {"parameters": "input_schema"})


def content_blocks(message: dict, stop_text: Optional[str] = None) -> list[dict]:
    """The reply's blocks from a chat reply (server/app.py's _chat_choice message)."""
    blocks: list[dict] = []
    if message.get("reasoning_content") is not None:
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    blocks += [tool_use_block(call) for call in message.get("tool_calls") or []]
    return blocks


def tool_use_block(call: dict) -> dict:
    arguments = call["function"]["arguments"]
    try:
        value = json.loads(arguments) if arguments else {}
    except (ValueError, RecursionError):  # (the parser gives JSON; kept safe for any other arguments)
        value = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": value if isinstance(value, dict) else {}}


def stop_reason(finish_reason: Optional[str], stop: Any, has_tool_use: bool) -> tuple[str, Optional[str]]:
    """(stop_reason, stop_sequence) of a finished chat reply."""
    if has_tool_use:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def message_object(message_id: str, model: str, content: list[dict], reason: Optional[str], sequence: Optional[str],
                   input_tokens: int, output_tokens: int, cached: int) -> dict:
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": cached},
    }


class MessagesStream:
    """Chat stream events (chat.ChatStreamParser: content, reasoning, tool_call) as Anthropic's
    content-block events, one block open at a time."""

    def __init__(self) -> None:
        self.index = -1
        self.open: Optional[str] = None  # "text" or "thinking"
        self.blocks: list[dict] = []

    def feed(self, kind: str, text: str = "", call: Optional[dict] = None) -> list[dict]:
        events: list[dict] = []
        want = {"content": "text", "reasoning": "thinking"}.get(kind)
        if self.open is not None and self.open != want:
            events += self.close()
        if kind == "tool_call":
            block = tool_use_block(call)
            self.index += 1
            self.blocks.append(block)
            events.append({"type": "content_block_start", "index": self.index, "content_block": {**block, "input": {}}})
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
            events.append({"type": "content_block_stop", "index": self.index})
            return events
        if self.open is None:
            self.open, self.index = want, self.index + 1
            block = {"type": "text", "text": ""} if want == "text" else {"type": "thinking", "thinking": "", "signature": ""}
            self.blocks.append(block)
            events.append({"type": "content_block_start", "index": self.index, "content_block": dict(block)})
        key = "text" if want == "text" else "thinking"
        self.blocks[-1][key] += text
        events.append({"type": "content_block_delta", "index": self.index, "delta": {"type": f"{key}_delta", key: text}})
        return events

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":  # no signature to give: an empty one, as the block carries
            events.append({"type": "content_block_delta", "index": self.index, "delta": {"type": "signature_delta", "signature": ""}})
        events.append({"type": "content_block_stop", "index": self.index})
        self.open = None
        return events


# ---------------------------------------------------------------------- the route
async def count_tokens(state: ServerState, req: CountTokensRequest) -> dict:
    """The prompt tokens the same Messages request would have (system, tools and thinking flags
    included), as Anthropic's count_tokens answers: {"input_tokens": N}."""
    with _stop_sequences_as_sent():
        _, _, ids, _ = await prepare_chat(state, to_chat_request(req))
    return {"input_tokens": len(ids)}


@contextmanager
def _stop_sequences_as_sent() -> Iterator[None]:
    """The sampling parameters' refusal of `stop` named stop_sequences, the field the client gave."""
    try:
        yield
    except RequestError as e:
        if e.param != "stop":
            raise
        raise APIError(400, str(e).replace("stop", "stop_sequences", 1), param="stop_sequences") from None


async def handle(state: ServerState, req: MessagesRequest, request: Request) -> Response:
    chat = to_chat_request(req)
    with _stop_sequences_as_sent():
        started = await start_chat(state, chat, request, "msg", "max_tokens")
    if isinstance(started, Response):
        return started
    request_id, gens, firsts, parse, ids, model = started
    message_id = f"msg_{request_id.split('-', 1)[1]}"
    if req.stream:
        return StreamingResponse(_stream(state, model, message_id, gens, firsts, parse, len(ids)), media_type="text/event-stream")
    result = await unless_gone(request, final_outputs(state, gens, firsts), state.metrics)
    if isinstance(result, Response):
        return result
    final = result[0]
    comp = final.outputs[0]
    blocks = content_blocks(chat_choice(state, comp, parse, False)["message"])
    reason, sequence = stop_reason(comp.finish_reason, comp.stop_reason, any(b["type"] == "tool_use" for b in blocks))
    cached = final.metrics.get("num_cached_tokens") or 0
    return JSONResponse(message_object(message_id, model, blocks, reason, sequence, len(ids), len(comp.token_ids), cached))


async def _stream(state: ServerState, model: str, message_id: str, gens: list, firsts: list[RequestOutput], parse: ChatParsing,
                  n_prompt: int) -> AsyncIterator[str]:
    stream = MessagesStream()
    parser = ChatStreamParser(reasoning=parse.reasoning, tool_calls=parse.tools)
    finished = False
    try:
        start = message_object(message_id, model, [], None, None, n_prompt, 0, 0)
        yield sse_event({"type": "message_start", "message": start})
        final = None
        async with aclosing(merged_outputs(gens, firsts)) as outputs:
            async for _, out in outputs:
                comp = out.outputs[0]
                parsed = parser.feed(comp.text_delta)
                if comp.finished:
                    parsed += parser.finish()
                for ev in parsed:
                    for event in stream.feed(ev.kind, getattr(ev, "text", ""), call=getattr(ev, "tool_call", None)):
                        yield sse_event(event)
                if out.finished:
                    observe(state, out)
                    final = out
        for event in stream.close():
            yield sse_event(event)
        comp = final.outputs[0]
        reason, sequence = stop_reason(comp.finish_reason, comp.stop_reason, any(b["type"] == "tool_use" for b in stream.blocks))
        yield sse_event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                      "usage": {"output_tokens": len(comp.token_ids)}})
        finished = True
        yield sse_event({"type": "message_stop"})
    except Exception as e:  # after the 200 is sent, an error can only travel as an event
        finished = True
        state.metrics.finished.labels("error").inc()
        error = stream_error(e, f"streaming {message_id}").body()["error"]
        kind = "invalid_request_error" if error["type"] == "invalid_request_error" else "api_error"
        yield sse_event({"type": "error", "error": {"type": kind, "message": error["message"]}})
    finally:
        if not finished:
            state.metrics.finished.labels("abort").inc()


def _chat_messages(message: dict, where: str) -> list[dict]:
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise APIError(400, f"{where}.role is {short_repr(role)}; expected user or assistant", param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
    if not content:  # (Anthropic refuses it; it had become an empty turn)
        raise APIError(400, f"{where}.content is an empty list: give a string or at least one content block", param=f"{where}.content")
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for k, block in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise APIError(400, f"{at} needs a string id and name", param=at)
            if not isinstance(block.get("input"), dict):  # (Anthropic's: a required object, the tool's arguments)
                raise APIError(400, f"{at}.input must be a JSON object (the tool's arguments), got {json.dumps(block.get('input'))[:100]}",
                               param=f"{at}.input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(400, f"{at}.tool_use_id must be a string", param=at)
            result = block.get("content", "")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": _text(result, at + ".content")})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier thinking is not sent back to the model
        else:
            raise APIError(400, f"{at} has type {short_repr(kind)}; this server takes text, tool_use (assistant), tool_result (user) "
                           "and thinking blocks", param=at)
    out = results
    if texts or calls or not results:
        turn: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        out = out + [turn]
    return out


def _tool(tool: Any, where: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" or not isinstance(tool.get("name"), str):
        raise APIError(400, f"{where} must be a client tool {{'name', 'description', 'input_schema'}}; server tools "
                       "(web search, code execution, ...) do not run here", param=where)
    if not tool["name"]:
        raise APIError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
    spec = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        spec["description"] = tool["description"]
    return {"type": "function", "function": spec}


def _tool_choice(choice: dict) -> dict:
    kind = choice.get("type")
    fields: dict[str, Any] = {}
    if kind == "auto":
        fields["tool_choice"] = "auto"
    elif kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "none":
        fields["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise APIError(400, f"tool_choice must be auto, any, none or {{'type': 'tool', 'name': ...}}, got {json.dumps(choice)[:200]}",
                       param="tool_choice")
    if choice.get("disable_parallel_tool_use"):
        fields["parallel_tool_calls"] = False
    return fields


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        text, k = join_text_parts(content)
        if k >= 0:
            raise APIError(400, f"{where}[{k}] must be a text block {{'type': 'text', 'text': ...}}", param=f"{where}[{k}]")
        return text
    raise APIError(400, f"{where} must be a string or a list of text blocks", param=where)


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"
