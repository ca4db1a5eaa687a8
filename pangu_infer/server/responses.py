"""OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`) over the chat path.

A request becomes a chat request (`to_chat_request`): `instructions` a system turn, the turns of
`previous_response_id` (kept in memory by server/response_store.py), then
`input` (a string, or items: messages, `function_call`, `function_call_output`; reasoning items
are skipped). Tools are function tools (`{"type": "function", "name", "parameters"}`), `text.format`
maps to response_format, `reasoning.effort` "none"/"minimal" turns thinking off. The chat path
renders, constrains and generates it; the reply becomes output items: a `reasoning` item (Pangu's
thinking), a `message` with one `output_text`, and a `function_call` per tool call. With
`stream: true` the items arrive as OpenAI's typed events (`ResponsesStream`), each with its
sequence_number, from `response.created` to `response.completed` (`response.incomplete` when
max_output_tokens cut it).
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Literal, Optional, Union, get_args

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from pangu_infer.chat import ChatStreamParser
from pangu_infer.chat.render import join_text_parts
from pangu_infer.errors import short_repr
from pangu_infer.outputs import RequestOutput
from pangu_infer.server.chat_api import (
    ChatParsing, chat_choice, chat_logprobs, chat_request, prepare_chat, start_chat, tool_field_sent_as,
)
from pangu_infer.server.errors import APIError, stream_error
from pangu_infer.server.params import log_ignored_fields
from pangu_infer.server.protocol import ChatCompletionRequest, ReasoningEffort, _Request
from pangu_infer.server.state import ServerState
from pangu_infer.server.streaming import final_outputs, merged_outputs, observe, sse_event, unless_gone
from pangu_infer.server.structured import JSON_SCHEMA_KEYS, check_format_keys, check_json_schema_fields

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


class ResponsesText(_Request):
    format: Optional[dict[str, Any]] = Field(None, description='{"type": "text" | "json_object" | "json_schema", ...}')
    # (OpenAI's verbosity would change the reply: refused as an unknown key, as chat refuses it)


class ResponsesReasoning(_Request):
    effort: Optional[str] = Field(None, description='"none" or "minimal" turn thinking off (checked in to_chat_request)')
    summary: Optional[str] = Field(None, description="accepted; reasoning items carry the thinking itself, their summary stays empty")
    generate_summary: Optional[str] = Field(None, description="summary's older name")


class ResponsesRequest(_Request):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)  # (a 0 is refused naming this field, not chat's max_tokens)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    # objects of known keys: an unknown one (text.verbosity) is a 400, not ignored
    text: Optional[ResponsesText] = Field(None, description='{"format": {"type": "text" | "json_object" | "json_schema", ...}}')
    reasoning: Optional[ResponsesReasoning] = Field(None, description='{"effort": ...}: "none" or "minimal" turn thinking off')
    stream: bool = False
    store: bool = Field(True, description="keep the response for previous_response_id and GET /v1/responses/{id}")
    previous_response_id: Optional[str] = Field(None, min_length=1)  # ("" had been taken as no previous response)
    top_logprobs: Optional[int] = Field(None, ge=0, description="up to the server's --max-logprobs (20 by default)")
    truncation: Optional[Literal["auto", "disabled"]] = Field(
        None, description="auto: drop the conversation's oldest turns until the prompt fits the context with max_output_tokens"
    )
    background: Optional[Literal[False]] = None
    # what to add to the output (OpenAI's values; see INCLUDE)
    include: Optional[list[str]] = None
    # accepted and ignored: bookkeeping (as protocol.IGNORED_FIELDS)
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None


def conversation(req: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The chat messages of this turn without `instructions`: the earlier turns, then `input`."""
    messages = list(history)
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    if not req.input:
        raise APIError(400, "input is an empty list: give a string or at least one item", param="input")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = ROLES.get(item.get("role")) if isinstance(item.get("role"), str) else None
            if role is None:
                raise APIError(400, f"{where}.role is {short_repr(item.get('role'))}; expected user, system, developer or assistant", param=where)
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where), "arguments": _arguments(item, where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # a reply's message and calls (or parallel calls) are one assistant turn
                messages[-1] = {**last, "tool_calls": [*last.get("tool_calls", []), call]}
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                             "content": _text(item.get("output"), where, "output")})
        elif kind == "reasoning":
            continue  # earlier thinking is not sent back to the model, as chat templates drop it too
        else:
            raise APIError(400, f"{where} has type {short_repr(kind)}; this server takes message, function_call, "
                           "function_call_output and reasoning items", param=where)
    return messages


def input_items_of(req: ResponsesRequest) -> list[dict]:
    """The request's input as stored items, each with an id (OpenAI's shapes)."""
    raw = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = []
    for item in raw:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
            items.append({"id": item.get("id") or _id("msg"), "type": "message", "role": item.get("role"),
                          "status": "completed", "content": parts})
        else:
            prefix = {"function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}.get(kind, "item")
            items.append({**item, "id": item.get("id") or _id(prefix), "status": item.get("status", "completed")})
    return items


# OpenAI's values of `include`: the output text's logprobs (with top_logprobs of them, else none),
# and what this server has nothing of, so nothing to add (its reasoning is not encrypted: a reasoning
# item's text is in the output as it is; no built-in tools, no image inputs)
OUTPUT_LOGPROBS = "message.output_text.logprobs"
INCLUDE = (OUTPUT_LOGPROBS, "reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
           "web_search_call.action.sources", "message.input_image.image_url", "computer_call_output.output.image_url",
           "code_interpreter_call.outputs")


def _logprobs_asked(req: ResponsesRequest) -> bool:
    """Does the output carry its text's logprobs (include names them, or top_logprobs is given)?
    APIError naming an unknown include value."""
    for i, value in enumerate(req.include or []):
        if value not in INCLUDE:
            raise APIError(400, f"include[{i}] is {short_repr(value)}; expected one of {', '.join(INCLUDE)}", param=f"include[{i}]")
    return req.top_logprobs is not None or OUTPUT_LOGPROBS in (req.include or [])


def to_chat_request(req: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request that generates the reply to `messages` (conversation()) under req's settings."""
    tools, tool_choice = _tools(req)
    logprobs = _logprobs_asked(req)
    effort = req.reasoning.effort if req.reasoning is not None else None
    if effort is not None and effort not in get_args(ReasoningEffort):
        raise APIError(400, f"reasoning.effort is {short_repr(effort)}; expected one of {', '.join(get_args(ReasoningEffort))}", param="reasoning.effort")
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": ([{"role": "system", "content": req.instructions}] if req.instructions else []) + messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req.text.format if req.text is not None else None),
        "reasoning_effort": effort,
        "logprobs": logprobs,
        "top_logprobs": (req.top_logprobs or 0) if logprobs else None,
        "stream": req.stream,
    }
    return chat_request(fields, schema_param="text.format.schema", sent_as=tool_field_sent_as)


def output_items(message: dict, finish_reason: Optional[str], logprobs: Optional[list[dict]]) -> list[dict]:
    """The output items of a chat reply (server/app.py's _chat_choice message)."""
    items: list[dict] = []
    status = "incomplete" if finish_reason == "length" else "completed"
    if message.get("reasoning_content") is not None:
        items.append(reasoning_item(message["reasoning_content"], status))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append(message_item(message.get("content") or "", status, logprobs))
    items += [call_item(call, "completed") for call in calls]
    return items


def reasoning_item(text: str, status: str, item_id: Optional[str] = None) -> dict:
    return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str, status: str, logprobs: Optional[list[dict]] = None, item_id: Optional[str] = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant", "content": [part]}


def call_item(call: dict, status: str, item_id: Optional[str] = None) -> dict:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def response_object(req: ResponsesRequest, response_id: str, created: float, model: str, status: str,
                    output: list[dict], usage: Optional[dict]) -> dict:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "text": _given(req.text) or {"format": {"type": "text"}},
        "reasoning": _given(req.reasoning) or {"effort": None, "summary": None},
        "previous_response_id": req.previous_response_id,
        "store": req.store,
        "metadata": req.metadata or {},
        "truncation": req.truncation or "disabled",
        "top_logprobs": req.top_logprobs,
        "user": req.user,
    }


def usage(input_tokens: int, output_tokens: int, cached: int, reasoning_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


def reply_message(output: list[dict]) -> dict:
    """The reply as one assistant chat message, for the conversation a later turn continues."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message


class ResponsesStream:
    """Chat stream events (chat.ChatStreamParser: content, reasoning, tool_call) as Responses API
    events, one item open at a time: each event a dict, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0
        self.output: list[dict] = []  # finished items
        self.open: Optional[dict] = None  # the item being written: reasoning or message
        self.text = ""

    def event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def feed(self, kind: str, text: str = "", call: Optional[dict] = None, logprobs: Optional[list[dict]] = None) -> list[dict]:
        """Events for one parser event: `kind` is "content", "reasoning" or "tool_call"."""
        events: list[dict] = []
        want = {"content": "message", "reasoning": "reasoning"}.get(kind)
        if self.open is not None and self.open["type"] != want:
            events += self.close("completed")
        if kind == "tool_call":
            item = call_item(call, "in_progress")
            index = len(self.output)
            events.append(self.event("response.output_item.added", output_index=index, item={**item, "arguments": ""}))
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"]))
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=item["arguments"]))
            item["status"] = "completed"
            events.append(self.event("response.output_item.done", output_index=index, item=item))
            self.output.append(item)
            return events
        index = len(self.output)
        if self.open is None:
            self.open = (reasoning_item("", "in_progress") if want == "reasoning" else message_item("", "in_progress"))
            self.text = ""
            empty = {**self.open, "content": []}
            events.append(self.event("response.output_item.added", output_index=index, item=empty))
            events.append(self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                                     content_index=0, part=self._part("")))
        self.text += text
        if want == "reasoning":
            events.append(self.event("response.reasoning_text.delta", item_id=self.open["id"], output_index=index, content_index=0, delta=text))
        else:
            self.open["content"][0]["logprobs"] += logprobs or []
            events.append(self.event("response.output_text.delta", item_id=self.open["id"], output_index=index, content_index=0,
                                     delta=text, logprobs=logprobs or []))
        return events

    def close(self, status: str) -> list[dict]:
        """Events that finish the open item (none when no item is open)."""
        if self.open is None:
            return []
        item, index = self.open, len(self.output)
        part = self._part(self.text)
        item["content"] = [part]
        item["status"] = status
        done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        extra = {} if item["type"] == "reasoning" else {"logprobs": part["logprobs"]}
        events = [
            self.event(done, item_id=item["id"], output_index=index, content_index=0, text=self.text, **extra),
            self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part),
            self.event("response.output_item.done", output_index=index, item=item),
        ]
        self.output.append(item)
        self.open = None
        return events

    def _part(self, text: str) -> dict:
        if self.open is not None and self.open["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        logprobs = self.open["content"][0]["logprobs"] if self.open is not None and self.open["content"] else []
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}


# ---------------------------------------------------------------------- the route
async def handle(state: ServerState, req: ResponsesRequest, request: Request) -> Response:
    log_ignored_fields(req)
    history = state.responses.get(req.previous_response_id, "previous_response_id")[1] if req.previous_response_id else []
    messages = conversation(req, history)
    chat = to_chat_request(req, await _fitted(state, req, messages) if req.truncation == "auto" else messages)
    started = await start_chat(state, chat, request, "resp", "max_output_tokens")
    if isinstance(started, Response):
        return started
    request_id, gens, firsts, parse, ids, model = started
    response_id, created = f"resp_{request_id.split('-', 1)[1]}", now()
    if req.stream:
        return StreamingResponse(_stream(state, model, req, response_id, created, gens, firsts, parse, messages, len(ids)),
                                 media_type="text/event-stream")
    result = await unless_gone(request, final_outputs(state, gens, firsts), state.metrics)
    if isinstance(result, Response):
        return result
    final = result[0]
    comp = final.outputs[0]
    choice = chat_choice(state, comp, parse, chat.logprobs)
    lps = (choice["logprobs"] or {}).get("content")
    output = output_items(choice["message"], comp.finish_reason, lps)
    body = _finish(state, model, req, response_id, created, output, comp.finish_reason, final, len(ids), messages)
    return JSONResponse(body)


async def _fitted(state: ServerState, req: ResponsesRequest, messages: list[dict]) -> list[dict]:
    """truncation "auto": the conversation from its latest start (a turn that is not a tool result)
    whose prompt, instructions and template included, leaves max_output_tokens (or one token) of the
    context; binary search over the start, so a long conversation renders O(log n) times. When even
    the last turn alone does not fit, it is sent as is and admission names the problem."""
    asked, ceiling = req.max_output_tokens or 1, getattr(state.llm, "max_tokens_ceiling", None)
    room = state.llm.engine.max_model_len - (asked if ceiling is None else min(asked, ceiling))  # (the length it runs with)
    starts = [i for i, m in enumerate(messages) if m["role"] != "tool"]

    async def fits(start: int) -> bool:
        _, _, ids, _ = await prepare_chat(state, to_chat_request(req, messages[start:]))
        return len(ids) <= room

    if not starts or await fits(0):
        return messages
    lo, hi = 0, len(starts) - 1  # starts[hi] is tried last: the latest turn alone
    while lo < hi:
        mid = (lo + hi) // 2
        if await fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return messages[starts[lo]:]


def _finish(state: ServerState, model: str, req: ResponsesRequest, response_id: str, created: float, output: list[dict],
            finish_reason: Optional[str], final: RequestOutput, n_prompt: int, messages: list[dict]) -> dict:
    """The response object of a finished reply, stored when req.store."""
    reasoning = "".join(part["text"] for item in output if item["type"] == "reasoning" for part in item["content"])
    reasoning_tokens = len(state.llm.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    completion = sum(len(c.token_ids) for c in final.outputs)
    counts = usage(n_prompt, completion, final.metrics.get("num_cached_tokens") or 0, min(reasoning_tokens, completion))
    status = "incomplete" if finish_reason == "length" else "completed"
    body = response_object(req, response_id, created, model, status, output, counts)
    if req.store and not state.responses.put(body, messages + [reply_message(output)], input_items_of(req)):
        body["store"] = False  # over the store's whole byte budget: answered, not kept
    return body


async def _stream(state: ServerState, model: str, req: ResponsesRequest, response_id: str, created: float, gens: list,
                  firsts: list[RequestOutput], parse: "ChatParsing", messages: list[dict], n_prompt: int) -> AsyncIterator[str]:
    stream = ResponsesStream()
    parser = ChatStreamParser(reasoning=parse.reasoning, tool_calls=parse.tools)
    started = response_object(req, response_id, created, model, "in_progress", [], None)
    finished = False
    pending: list[dict] = []  # logprobs of tokens whose text the parser still holds back
    want_logprobs = _logprobs_asked(req)  # (its include was checked when the request started)

    def events_of(parsed: list) -> list[dict]:
        events = []
        for ev in parsed:
            if ev.kind == "tool_call":
                events += stream.feed("tool_call", call=ev.tool_call)
            elif ev.kind == "content":
                events += stream.feed("content", ev.text, logprobs=list(pending))
                pending.clear()  # sent with the first text after them
            else:
                events += stream.feed(ev.kind, ev.text)
        return events

    try:
        yield sse_event(stream.event("response.created", response=started))
        yield sse_event(stream.event("response.in_progress", response=started))
        final = None
        async with aclosing(merged_outputs(gens, firsts)) as outputs:
            async for _, out in outputs:
                comp = out.outputs[0]
                if want_logprobs and comp.token_ids_delta:
                    pending.extend(chat_logprobs(state, comp.logprobs_delta or []))
                parsed = parser.feed(comp.text_delta)
                if comp.finished:
                    parsed += parser.finish()
                for event in events_of(parsed):
                    yield sse_event(event)
                if out.finished:
                    observe(state, out)
                    final = out
        comp = final.outputs[0]
        status = "incomplete" if comp.finish_reason == "length" else "completed"
        for event in stream.close(status):
            yield sse_event(event)
        body = _finish(state, model, req, response_id, created, stream.output, comp.finish_reason, final, n_prompt, messages)
        finished = True
        yield sse_event(stream.event("response.incomplete" if status == "incomplete" else "response.completed", response=body))
    except Exception as e:  # after the 200 is sent, an error can only travel as an event
        finished = True
        state.metrics.finished.labels("error").inc()
        error = stream_error(e, f"streaming {response_id}").body()["error"]
        yield sse_event(stream.event("error", code=error.get("code"), message=error["message"], param=error.get("param")))
    finally:
        if not finished:
            state.metrics.finished.labels("abort").inc()


def _tools(req: ResponsesRequest) -> tuple[Optional[list[dict]], Any]:
    tools = None
    if req.tools is not None:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.get("type") != "function":
                raise APIError(400, f"tools[{i}] has type {short_repr(tool.get('type'))}; this server runs function tools only", param=f"tools[{i}]")
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise APIError(400, f"tools[{i}].name must be a non-empty string, got {json.dumps(tool.get('name'))[:100]}",
                               param=f"tools[{i}].name")
            spec = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
            tools.append({"type": "function", "function": spec})
    choice: Any = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _given(obj: Optional[_Request]) -> dict:
    """An object field as the request gave it (for the response, which echoes it)."""
    return obj.model_dump(exclude_unset=True) if obj is not None else {}


def _response_format(fmt: Optional[dict]) -> Optional[dict]:
    """text.format as chat's response_format."""
    if fmt is None:
        return None
    if fmt.get("type") in ("text", "json_object"):  # (json_schema's keys: check_format_keys below)
        check_format_keys(fmt, "text.format", ("type",))
    if fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if "schema" in fmt and not isinstance(fmt["schema"], (dict, bool)):
            raise APIError(400, f"text.format.schema must be a JSON schema (an object), got {json.dumps(fmt['schema'])[:200]}",
                           param="text.format.schema")
        check_format_keys(fmt, "text.format", ("type", *JSON_SCHEMA_KEYS))
        check_json_schema_fields(fmt, "text.format")
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(400, f"text.format.type is {short_repr(fmt.get('type'))}; expected text, json_object or json_schema", param="text.format")


def _text(content: Any, where: str, field: str = "content") -> str:
    """The text of an item's `field` (its content, a function_call_output's output): a string, or
    text parts joined; a 400 naming where (input[i].FIELD[k]) for anything else."""
    at = f"{where}.{field}"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        text, k = join_text_parts(content, ("input_text", "output_text", "text"))
        if k >= 0:
            raise APIError(400, f"{at}[{k}] must be an input_text or output_text part with text, got {json.dumps(content[k])[:200]}",
                           param=f"{at}[{k}]")
        return text
    raise APIError(400, f"{at} must be a string or a list of text parts, got {json.dumps(content)[:100]}", param=at)


def _field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value


def _arguments(item: dict, where: str) -> str:
    """A function_call item's arguments: a string of JSON (the prompt writes the call as JSON; the
    chat renderer's error named messages[k], an index into the converted conversation)."""
    arguments = _field(item, "arguments", where)
    try:
        if arguments.strip():
            json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        raise APIError(400, f"{where}.arguments is not valid JSON: {json.dumps(arguments)[:200]}", param=f"{where}.arguments") from None
    except ValueError:  # Python's limit on the digits of an integer (its advice, sys.set_int_max_str_digits, is not the user's)
        raise APIError(400, f"{where}.arguments holds a number too long to read", param=f"{where}.arguments") from None
    return arguments


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def now() -> float:
    return float(int(time.time()))
