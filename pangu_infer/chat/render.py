"""Chat messages -> prompt text: the model's chat template, tools offered in the system turn,
Pangu's thinking switch, and every message checked on the way (a ValueError naming it)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pangu_infer.chat.markers import TOOL_CALL_END, TOOL_CALL_START
from pangu_infer.errors import short_repr
from pangu_infer.tokenizer import Tokenizer

_PANGU_TURN_START = "[unused9]"
_ROLES = ("system", "user", "assistant", "tool", "function")
_THINKING_FLAGS = {False: " /no_think", "auto": " /auto_think"}


def is_pangu_template(tok: Tokenizer, chat_template: str | None = None) -> bool:
    """True when the tokenizer's chat template (or `chat_template`, one given for a request) is
    Pangu's ([unused9]ROLE：...[unused10] turns)."""
    template = tok.chat_template if chat_template is None else chat_template
    return template is not None and _PANGU_TURN_START in template


def render_chat(
    tok: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    enable_thinking: bool | str | None = None,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Validate OpenAI-style messages and render them into the model's prompt text.

    chat_template: a Jinja template used instead of the tokenizer's (vLLM's per-request field).

    enable_thinking: for Pangu, False appends " /no_think" and "auto" appends " /auto_think" to the
    last user message; True/None keep slow thinking (the default). Other templates get it as the
    template variable `enable_thinking` when it is not None.
    tools: OpenAI function specs. A template that does not mention `tools` itself (Pangu's does not)
    gets them in the system turn as `tools_system_prompt` describes, and assistant `tool_calls` are
    written inline in the same [unused11]...[unused12] format the model answers with.
    continue_final_message (vLLM's name; needs add_generation_prompt=False): the last message is
    the assistant's, and the prompt ends right after its text, so the model goes on writing it.
    """
    if enable_thinking not in (None, True, False, "auto"):
        raise ValueError(f"enable_thinking must be True, False, None or 'auto', got {enable_thinking!r}")
    normalized = _normalize_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: set add_generation_prompt to false")
        if normalized[-1]["role"] != "assistant":
            raise ValueError(f"continue_final_message needs the last message to be the assistant's, not the {normalized[-1]['role']}'s")
    if tools is not None:
        _validate_tools(tools)
    template_tools = tools
    template = tok.chat_template if chat_template is None else chat_template
    if template is not None and "tools" not in template:
        normalized = [_inline_tool_calls(i, m) for i, m in enumerate(normalized)]
        if tools:
            normalized = _with_tools_in_system(normalized, tools)
        template_tools = None
    if is_pangu_template(tok, template):
        normalized = _with_thinking_flag(normalized, enable_thinking)
    elif enable_thinking is not None:
        template_kwargs["enable_thinking"] = enable_thinking
    if not continue_final_message:
        return tok.apply_chat_template(
            normalized, add_generation_prompt=add_generation_prompt, tools=template_tools, chat_template=template, **template_kwargs
        )
    # Render with a marker after the final text and cut there: whatever the template writes after
    # a message (its end-of-turn) goes, and nothing of the text itself.
    final = normalized[-1]["content"]
    marker = f"\x00continue-{uuid.uuid4().hex}\x00"
    normalized[-1] = {**normalized[-1], "content": final + marker}
    text = tok.apply_chat_template(
        normalized, add_generation_prompt=False, tools=template_tools, chat_template=template, **template_kwargs
    )
    if text.count(marker) != 1:
        raise ValueError("continue_final_message: this model's chat template does not write the final message's text as given")
    return text[: text.index(marker)]


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


def join_text_parts(parts: list, types: tuple[str, ...] = ("text",)) -> tuple[str, int]:
    """The texts of content parts {"type": one of `types`, "text": str}, joined by newlines as vLLM
    joins several text parts, and -1; or ("", the index of the first part that is not one).
    Chat messages here, and the Responses and Messages APIs' content blocks, share it."""
    texts = []
    for k, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") not in types or not isinstance(part.get("text"), str):
            return "", k
        texts.append(part["text"])
    return "\n".join(texts), -1


def _content_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        text, bad = join_text_parts(content)
        if bad >= 0:
            expected = "{'type': 'text', 'text': str}"
            raise ValueError(f"messages[{index}].content[{bad}] must be {expected}, got {content[bad]!r}")
        return text
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
                    f"messages[{index}].tool_calls[{k}].function.arguments is not valid JSON: {short_repr(arguments)}"
                ) from None
            except ValueError:  # Python's limit on the digits of an integer (its advice, sys.set_int_max_str_digits, is not the user's)
                raise ValueError(f"messages[{index}].tool_calls[{k}].function.arguments holds a number too long to read") from None
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
