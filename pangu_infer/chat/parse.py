"""Model output -> reasoning, content and tool calls: `split_reasoning` / `parse_tool_calls` parse
a finished text and `ChatStreamParser` the same thing delta by delta, with identical results."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pangu_infer.chat.markers import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START


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
    """OpenAI tool calls from the JSON between the markers, or None when it is not well formed (JSON
    nested deeper than Python's json recurses counts as not well formed: a reply steered into a
    thousand brackets, by a regex the request gave, had been a 500)."""
    try:
        return _call_block(body)
    except (ValueError, RecursionError):
        return None


def _call_block(body: str) -> list[dict[str, Any]] | None:
    data = json.loads(body)
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # already a JSON string, as OpenAI sends it
            arguments = json.loads(arguments)
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
