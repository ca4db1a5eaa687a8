"""Request fields -> StructuredOutputsParams and thinking budget, for both endpoints.

    response_format {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...}   (vLLM)
    guided_json, guided_regex, guided_choice, guided_grammar                                          (vLLM's older names)
    tool_choice "required" | {"type": "function", "function": {"name"}}, and "auto" with tools (chat)
    max_reasoning_tokens, chat_template_kwargs.thinking_budget, server --reasoning-budget            (chat)

Tool calls are constrained to the format the server offers tools in (pangu_infer.chat.tools_system_prompt):
`[unused11]` + a JSON list of {"name": <a tool's name>, "arguments": <its parameters schema>} +
`[unused12]`, with xgrammar structural tags: a `tag` for "required" and a named tool (the reply is
the call), `triggered_tags` for "auto" (free text; once the model writes `[unused11]`, the rest of
the call is constrained). `parallel_tool_calls: false` allows one call.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pangu_infer.chat import TOOL_CALL_END, TOOL_CALL_START
from pangu_infer.errors import RequestError, short_repr
from pangu_infer.sampling_params import StructuredOutputsParams
from pangu_infer.server.errors import APIError

GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def request_constraint(req: Any) -> Optional[StructuredOutputsParams]:
    """The constraint of a request's response_format / structured_outputs / guided_* fields (at most one)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        found.append(("response_format", _response_format(rf, getattr(req, "_schema_param", "response_format.json_schema"))))
    if req.structured_outputs is not None:
        given = req.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        found.append(("structured_outputs", _build(given, None)))
    for field, kind in GUIDED_ALIASES.items():
        value = getattr(req, field, None)
        if value is not None:
            found.append((field, _build({kind: value}, field)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"give one constraint per request; got {names}", param=found[1][0])
    return found[0][1] if found else None


def _response_format(rf: Any, schema_param: str) -> StructuredOutputsParams:
    """schema_param: the name errors give the schema, as the client sent it (another API's field)."""
    if rf.type == "json_object":
        return _build({"json_object": True}, "response_format")
    if rf.type == "json_schema":
        spec = rf.json_schema
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError(
                400, 'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                param="response_format.json_schema",
            )
        check_format_keys(spec, "response_format.json_schema", JSON_SCHEMA_KEYS)
        check_json_schema_fields(spec, "response_format.json_schema")
        # OpenAI: a missing schema means any JSON object
        schema = spec.get("schema", {"type": "object"})
        return _build({"json": schema}, schema_param)
    raise APIError(
        400, f"response_format type {short_repr(rf.type)} is not supported: use 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")  # OpenAI's json_schema response format


def check_format_keys(spec: dict, where: str, known: tuple[str, ...]) -> None:
    """A response format (`where`, as the client sent it) holds only the keys it has: a misspelt
    one ("shema") left the reply unconstrained, a 200 that ignored it."""
    for key in spec:
        if key not in known:
            name = key if len(key) <= 80 else key[:77] + "..."
            raise APIError(400, f"{where}.{name} is not a field of {where}; it has {', '.join(known)}", param=f"{where}.{name}")


def check_json_schema_fields(spec: dict, where: str) -> None:
    """OpenAI's json_schema response format (`where`, as the client sent it): name and description
    strings, strict a boolean, each also null or left out."""
    for key, kind, expected in (("name", str, "a string"), ("description", str, "a string"), ("strict", bool, "true or false")):
        value = spec.get(key)
        if value is not None and not isinstance(value, kind):
            raise APIError(400, f"{where}.{key} must be {expected}, got {json.dumps(value)[:100]}", param=f"{where}.{key}")


def _build(fields: dict[str, Any], param: Optional[str]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields, param_name=param)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None


def tool_constraint(
    tools: list[dict], tool_choice: Any, parallel_tool_calls: Optional[bool], marker_ids: Optional[tuple[int, int]] = None
) -> Optional[StructuredOutputsParams]:
    """The structural tag that keeps tool calls well formed ("required", a named tool, or "auto").

    marker_ids: the ids of [unused11] and [unused12] where they are single tokens (Pangu's
    vocabulary): the call then opens and closes with those tokens, as the model was trained to
    write them; elsewhere the markers are text.
    """
    if not tools or tool_choice == "none":
        return None
    specs = [t["function"] for t in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        specs = [s for s in specs if s["name"] == name]
        if not specs:
            raise APIError(400, f"tool_choice names the function {short_repr(name)}, which is not in tools", param="tool_choice")
    items = [_call_schema(s) for s in specs]
    calls: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items}, "minItems": 1}
    if parallel_tool_calls is False or isinstance(tool_choice, dict):
        calls["maxItems"] = 1
    # at most one whitespace character in a row: a small model cannot wander off into endless whitespace
    content = {"type": "json_schema", "json_schema": calls, "max_whitespace_cnt": 1}
    if marker_ids is not None:
        begin: Any = {"type": "token", "token": marker_ids[0]}
        end: Any = {"type": "token", "token": marker_ids[1]}
    else:
        begin, end = TOOL_CALL_START, TOOL_CALL_END
    tag = {"type": "tag", "begin": begin, "content": content, "end": end}
    fmt: dict[str, Any]
    if tool_choice not in (None, "auto"):
        fmt = tag
    elif marker_ids is not None:
        fmt = {"type": "token_triggered_tags", "trigger_tokens": [marker_ids[0]], "tags": [tag],
               "stop_after_first": parallel_tool_calls is False}
    else:
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_START], "tags": [tag],
               "stop_after_first": parallel_tool_calls is False}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": fmt}, param_name="tools")


def _call_schema(spec: dict) -> dict:
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": spec["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def reasoning_budget(req: Any, template_kwargs: dict, default: Optional[int]) -> Optional[int]:
    """max_reasoning_tokens, or chat_template_kwargs.thinking_budget (popped), or the server default."""
    budget = template_kwargs.pop("thinking_budget", None)
    param = "chat_template_kwargs.thinking_budget"
    if req.max_reasoning_tokens is not None:
        if budget is not None and budget != req.max_reasoning_tokens:
            raise APIError(400, "max_reasoning_tokens and chat_template_kwargs.thinking_budget disagree; give one", param="max_reasoning_tokens")
        budget, param = req.max_reasoning_tokens, "max_reasoning_tokens"
    if budget is None:
        return default
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise APIError(400, f"{param}={short_repr(budget)}: expected an integer >= 0 (reasoning tokens)", param=param)
    return budget
