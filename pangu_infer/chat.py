"""Chat messages -> prompt text, and model output -> reasoning, content and tool calls.

Pangu writes its thinking and tool calls inline, with [unusedN] special tokens as markers:

    [unused16]reasoning[unused17]answer
    [unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]

The engine decodes chat output with skip_special_tokens=False so the markers arrive as text;
`split_reasoning` / `parse_tool_calls` parse a finished text and `ChatStreamParser` the same
thing delta by delta, with identical results.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pangu_infer.tokenizer import Tokenizer

__all__ = [
    "THINK_START",
    "THINK_END",
    "TOOL_CALL_START",
    "TOOL_CALL_END",
    "ChatEvent",
    "ChatStreamParser",
    "is_pangu_template",
    "parse_tool_calls",
    "render_chat",
    "split_reasoning",
    "tools_system_prompt",
]

THINK_START = "[unused16]"
THINK_END = "[unused17]"
TOOL_CALL_START = "[unused11]"
TOOL_CALL_END = "[unused12]"

_PANGU_TURN_START = "[unused9]"
_ROLES = ("system", "user", "assistant", "tool", "function")
_THINKING_FLAGS = {False: " /no_think", "auto": " /auto_think"}


def is_pangu_template(tok: Tokenizer) -> bool:
    """True when the tokenizer's chat template is Pangu's ([unused9]ROLE：...[unused10] turns)."""
    return tok.chat_template is not None and _PANGU_TURN_START in tok.chat_template


def render_chat(
    tok: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool | str | None = None,
    tools: list[dict[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Validate OpenAI-style messages and render them into the model's prompt text.

    enable_thinking: for Pangu, False appends " /no_think" and "auto" appends " /auto_think" to the
    last user message; True/None keep slow thinking (the default). Other templates get it as the
    template variable `enable_thinking` when it is not None.
    tools: OpenAI function specs. A template that does not mention `tools` itself (Pangu's does not)
    gets them in the system turn as `tools_system_prompt` describes, and assistant `tool_calls` are
    written inline in the same [unused11]...[unused12] format the model answers with.
    """
    if enable_thinking not in (None, True, False, "auto"):
        raise ValueError(f"enable_thinking must be True, False, None or 'auto', got {enable_thinking!r}")
    normalized = _normalize_messages(messages)
    if tools is not None:
        _validate_tools(tools)
    template_tools = tools
    if tok.chat_template is not None and "tools" not in tok.chat_template:
        normalized = [_inline_tool_calls(i, m) for i, m in enumerate(normalized)]
        if tools:
            normalized = _with_tools_in_system(normalized, tools)
        template_tools = None
    if is_pangu_template(tok):
        normalized = _with_thinking_flag(normalized, enable_thinking)
    elif enable_thinking is not None:
        template_kwargs["enable_thinking"] = enable_thinking
    return tok.apply_chat_template(
        normalized, add_generation_prompt=add_generation_prompt, tools=template_tools, **template_kwargs
    )


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-turn text that offers `tools` to a model whose template has no tool support.

    Exact format (one JSON function spec per line, i.e. the "function" object of each OpenAI tool):

        # Tools

        You can call the following functions. Each line is one function, as JSON:
        {"name": "get_weather", "description": "...", "parameters": {...}}

        To call functions, reply with [unused11], then a JSON list of calls, then [unused12], e.g.
        [unused11][{"name": "function_name", "arguments": {"argument": "value"}}][unused12]
        Function results come back in a tool turn; then answer the user.

    It is placed before the content of an existing system message (separated by a blank line),
    or becomes a new system message at the start of the conversation.
    """
    specs = "\n".join(json.dumps(_function_spec(t), ensure_ascii=False) for t in tools)
    example = json.dumps([{"name": "function_name", "arguments": {"argument": "value"}}])
    return (
        "# Tools\n\n"
        "You can call the following functions. Each line is one function, as JSON:\n"
        f"{specs}\n\n"
        f"To call functions, reply with {TOOL_CALL_START}, then a JSON list of calls, then {TOOL_CALL_END}, e.g.\n"
        f"{TOOL_CALL_START}{example}{TOOL_CALL_END}\n"
        "Function results come back in a tool turn; then answer the user."
    )


def _function_spec(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"] if "function" in tool else tool


def _validate_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of function specs, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        spec = _function_spec(tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            expected = "{'type': 'function', 'function': {'name': str, ...}}"
            raise ValueError(f"tools[{i}] must be {expected}, got {tool!r}")


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Copies of the messages with string content; ValueError naming the first bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(_ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = ""
        normalized.append({**message, "content": _content_text(i, content)})
    return normalized


def _content_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                expected = "{'type': 'text', 'text': str}"
                raise ValueError(f"messages[{index}].content[{k}] must be {expected}, got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins several text parts
    raise ValueError(
        f"messages[{index}].content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _inline_tool_calls(index: int, message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message with `tool_calls`, rewritten as content + [unused11]...[unused12]."""
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    rendered = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"messages[{index}].tool_calls[{k}] must have function.name, got {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(
                    f"messages[{index}].tool_calls[{k}].function.arguments is not valid JSON: {arguments!r}"
                ) from None
        rendered.append({"name": function["name"], "arguments": arguments})
    text = message["content"] + TOOL_CALL_START + json.dumps(rendered, ensure_ascii=False) + TOOL_CALL_END
    return {key: value for key, value in message.items() if key != "tool_calls"} | {"content": text}


def _with_tools_in_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prompt = tools_system_prompt(tools)
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        return [{**messages[0], "content": f"{prompt}\n\n{system}" if system else prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _with_thinking_flag(messages: list[dict[str, Any]], enable_thinking: bool | str | None) -> list[dict[str, Any]]:
    flag = _THINKING_FLAGS.get(enable_thinking)
    if flag is None:
        return messages
    last_user = next((i for i in reversed(range(len(messages))) if messages[i]["role"] == "user"), None)
    if last_user is None:
        raise ValueError(f"enable_thinking={enable_thinking!r} needs a user message to append {flag.strip()!r} to")
    content = messages[last_user]["content"]
    if not content.endswith(flag):
        messages = list(messages)
        messages[last_user] = {**messages[last_user], "content": content + flag}
    return messages


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of `[unused16]reasoning[unused17]answer`.

    No start marker: (None, text). Start without end: everything after it is reasoning. Text
    before the start marker is content, followed by the text after the end marker.
    """
    start = text.find(THINK_START)
    if start < 0:
        return None, text
    rest = text[start + len(THINK_START):]
    end = rest.find(THINK_END)
    if end < 0:
        return rest, text[:start]
    return rest[:end], text[:start] + rest[end + len(THINK_END):]


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, calls) of text with `[unused11]<JSON>[unused12]` blocks.

    The JSON is a list of {"name", "arguments"} objects or one such object ("parameters" is
    accepted for "arguments"); a block missing its end marker runs to the end of the text. A
    block that does not parse stays in the content as it was. Calls are OpenAI-shaped:
    {"id": "call_<hex>", "type": "function", "function": {"name": str, "arguments": JSON str}}.
    """
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        block_end = len(text) if end < 0 else end + len(TOOL_CALL_END)
        parsed = _parse_call_block(text[body_start:len(text) if end < 0 else end])
        if parsed is None:
            content.append(text[start:block_end])
        else:
            calls.extend(parsed)
        if end < 0:
            break
        pos = block_end
    return "".join(content), calls


def _parse_call_block(body: str) -> list[dict[str, Any]] | None:
    """OpenAI tool calls from the JSON between the markers, or None when it is not well formed."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # already a JSON string, as OpenAI sends it
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        calls.append({
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
        })
    return calls


@dataclass
class ChatEvent:
    """One piece of streamed output: a reasoning or content text delta, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    tool_call: dict[str, Any] | None = None


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class _ReasoningSplitter:
    """Streaming split_reasoning: before the start marker, inside reasoning, after it."""

    def __init__(self) -> None:
        self.state: Literal["before", "reasoning", "after"] = "before"
        self.buffer = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.buffer += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "after":
                out.append(("content", self.buffer))
                self.buffer = ""
                return out
            marker, kind = (THINK_START, "content") if self.state == "before" else (THINK_END, "reasoning")
            found = self.buffer.find(marker)
            if found < 0:
                keep = _partial_marker_len(self.buffer, marker)
                out.append((kind, self.buffer[:len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            out.append((kind, self.buffer[:found]))
            self.buffer = self.buffer[found + len(marker):]
            self.state = "reasoning" if self.state == "before" else "after"

    def finish(self) -> list[tuple[str, str]]:
        kind = "reasoning" if self.state == "reasoning" else "content"
        out, self.buffer = [(kind, self.buffer)], ""
        return out


class _ToolCallExtractor:
    """Streaming parse_tool_calls over the content stream."""

    def __init__(self) -> None:
        self.in_call = False
        self.buffer = ""

    def feed(self, delta: str) -> list[ChatEvent]:
        self.buffer += delta
        out: list[ChatEvent] = []
        while True:
            if not self.in_call:
                found = self.buffer.find(TOOL_CALL_START)
                if found < 0:
                    keep = _partial_marker_len(self.buffer, TOOL_CALL_START)
                    out.append(ChatEvent("content", self.buffer[:len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                out.append(ChatEvent("content", self.buffer[:found]))
                self.buffer = self.buffer[found + len(TOOL_CALL_START):]
                self.in_call = True
            found = self.buffer.find(TOOL_CALL_END)
            if found < 0:
                return out  # the call body is only parsed once complete
            out.extend(self._close(self.buffer[:found], TOOL_CALL_END))
            self.buffer = self.buffer[found + len(TOOL_CALL_END):]
            self.in_call = False

    def finish(self) -> list[ChatEvent]:
        out = self._close(self.buffer, "") if self.in_call else [ChatEvent("content", self.buffer)]
        self.buffer, self.in_call = "", False
        return out

    @staticmethod
    def _close(body: str, end_marker: str) -> list[ChatEvent]:
        calls = _parse_call_block(body)
        if calls is None:
            return [ChatEvent("content", TOOL_CALL_START + body + end_marker)]
        return [ChatEvent("tool_call", tool_call=call) for call in calls]


class ChatStreamParser:
    """Streaming split_reasoning + parse_tool_calls: feed text deltas, get events.

    A delta ending in a possible marker prefix ("...[unus") is held back until the next delta
    shows whether it is a marker; a tool call is emitted whole once its end marker arrives.
    The streamed reasoning and content concatenate to exactly what split_reasoning and then
    parse_tool_calls (on the content) give for the whole text.
    """

    def __init__(self, *, reasoning: bool = True, tool_calls: bool = True) -> None:
        self._reasoning = _ReasoningSplitter() if reasoning else None
        self._tools = _ToolCallExtractor() if tool_calls else None

    def feed(self, delta: str) -> list[ChatEvent]:
        """Events that `delta` completes."""
        pieces = self._reasoning.feed(delta) if self._reasoning else [("content", delta)]
        return self._route(pieces, final=False)

    def finish(self) -> list[ChatEvent]:
        """Events for everything still held back; call once at the end of the stream."""
        pieces = self._reasoning.finish() if self._reasoning else []
        return self._route(pieces, final=True)

    def _route(self, pieces: list[tuple[str, str]], final: bool) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        for kind, text in pieces:
            if kind == "reasoning":
                events.append(ChatEvent("reasoning", text))
            elif self._tools:
                events.extend(self._tools.feed(text))
            else:
                events.append(ChatEvent("content", text))
        if final and self._tools:
            events.extend(self._tools.finish())
        return _merge(events)


def _merge(events: list[ChatEvent]) -> list[ChatEvent]:
    """Drop empty text events and join neighbouring text events of the same kind."""
    merged: list[ChatEvent] = []
    for event in events:
        if event.kind != "tool_call" and not event.text:
            continue
        if merged and event.kind != "tool_call" and merged[-1].kind == event.kind:
            merged[-1] = ChatEvent(event.kind, merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged
