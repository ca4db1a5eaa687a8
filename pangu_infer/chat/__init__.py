"""Chat messages -> prompt text, and model output -> reasoning, content and tool calls.

Pangu writes its thinking and tool calls inline, with [unusedN] special tokens as markers:

    [unused16]reasoning[unused17]answer
    [unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]

The engine decodes chat output with skip_special_tokens=False so the markers arrive as text;
`split_reasoning` / `parse_tool_calls` parse a finished text and `ChatStreamParser` the same
thing delta by delta, with identical results. Rendering lives in chat/render.py, parsing in
chat/parse.py, the markers in chat/markers.py.
"""

from pangu_infer.chat.markers import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START
from pangu_infer.chat.parse import ChatEvent, ChatStreamParser, parse_tool_calls, split_reasoning
from pangu_infer.chat.render import is_pangu_template, render_chat, tools_system_prompt

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
