"""Pangu's inline markers: [unusedN] special tokens around thinking and tool calls."""

THINK_START = "[unused16]"
THINK_END = "[unused17]"
TOOL_CALL_START = "[unused11]"
TOOL_CALL_END = "[unused12]"
