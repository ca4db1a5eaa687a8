"""Structured outputs and forced tool calls on the demo model (SmolLM2-135M), through a real
`pangu-infer serve` process and the official `openai` client; replies are checked with `jsonschema`."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from fixtures_server import running_server

MESSAGES = [{"role": "user", "content": "Describe a fictional person."}]

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "address"],
    "additionalProperties": False,
}
ARRAYS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 3},
    },
    "required": ["tags", "scores"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "size", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def server(smollm2_gguf_path, tmp_path_factory):
    with running_server(smollm2_gguf_path, "--max-num-seqs", "32", "--kv-cache-memory", "256MiB",
                        log_dir=tmp_path_factory.mktemp("structured_server")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["engineer", "artist", "doctor"]


def test_parse_with_a_pydantic_model(client, server):
    completion = client.chat.completions.parse(
        model=server.model, messages=MESSAGES, response_format=Person, temperature=0.7, seed=1, max_tokens=60,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_streaming_with_a_schema_concatenates_to_valid_json(client, server):
    chunks = list(client.chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=0.7, seed=3, max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": ENUMS}},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream
    jsonschema.validate(json.loads(text), ENUMS)


def test_json_object_is_an_object(client, server):
    ask = [{"role": "user", "content": 'Reply with a JSON object with the key "ok" set to true.'}]
    out = client.chat.completions.create(model=server.model, messages=ask, temperature=0, max_tokens=40,
                                         response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_regex_and_its_vllm_aliases(client, server):
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        out = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=1.0, seed=2,
                                             max_tokens=20, n=5, extra_body=extra)
        for choice in out.choices:
            assert re.fullmatch(pattern, choice.message.content), choice.message.content


def test_choice_on_both_endpoints(client, server):
    choices = ["positive", "negative", "neutral"]
    out = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "I love it!"}],
                                         temperature=1.0, seed=4, n=6, max_tokens=10, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    out = client.completions.create(model=server.model, prompt="The review was", temperature=1.0, seed=4, n=6, max_tokens=10,
                                    extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices for c in out.choices)


def test_grammar(client, server):
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    out = client.completions.create(model=server.model, prompt="Is the sky blue?", temperature=1.0, seed=6, max_tokens=10,
                                    n=3, extra_body={"guided_grammar": grammar})
    assert all(c.text in ("The answer is yes.", "The answer is no.") for c in out.choices)


def _check_call(call, tools_by_name):
    tool = tools_by_name[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_choice_required_gives_valid_calls(client, server):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(model=server.model, messages=question, tools=[WEATHER, TIME], tool_choice="required",
                                         temperature=1.0, seed=8, n=2, max_tokens=120, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1  # parallel_tool_calls=False
        _check_call(choice.message.tool_calls[0], {"get_weather": WEATHER, "get_time": TIME})


def test_named_tool_choice_calls_that_tool(client, server):
    question = [{"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(model=server.model, messages=question, tools=[WEATHER, TIME],
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         temperature=1.0, seed=9, n=2, max_tokens=80)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time"
        _check_call(call, {"get_time": TIME})


def test_streamed_forced_tool_call(client, server):
    question = [{"role": "user", "content": "What is the weather in Rome?"}]
    chunks = list(client.chat.completions.create(model=server.model, messages=question, tools=[WEATHER], tool_choice="required",
                                                 temperature=0.5, seed=10, max_tokens=120, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    _check_call(calls[0], {"get_weather": WEATHER})


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
         "response_format.json_schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        # grammars that match nothing: refused when they compile (were a 500 from the engine)
        ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs.regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[^\\s\\S]"}}}},
         "response_format.json_schema"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        # over the limits on what a constraint may hold: refused before xgrammar spends seconds on it
        ({"guided_choice": [f"c{i}" for i in range(10_001)]}, "guided_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[a-z]{1,2001}"}}}},
         "response_format.json_schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(501)}}}}], "tool_choice": "required"}, "tools"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}],
          "tool_choice": "required"}, "tools"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        # a keyword xgrammar would not enforce
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}, "response_format.json_schema"),
        ({"guided_json": {"type": "integer", "not": {"const": 3}}}, "guided_json"),
        ({"guided_choice": ["a"], "min_tokens": 3}, "min_tokens"),
        ({"chat_template_kwargs": {"thinking_budget": "lots"}}, "chat_template_kwargs.thinking_budget"),
    ],
)
def test_bad_constraints_are_a_400_naming_the_field(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5, extra_body=extra)
    assert info.value.body["param"] == param, info.value.body
    # xgrammar's words, without its log prefix, C++ source paths and internal checks
    assert not re.search(r"\[\d\d:\d\d:\d\d\]|/project/|\.cc\b|Check failed|std::", info.value.body["message"]), info.value.body
    # and the server still serves
    assert client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2).choices


# Compiles, but every reply dead-ends: the one required property's pattern matches no text.
DEAD_END = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}


def test_a_schema_that_dead_ends_is_a_400_naming_it_and_touches_no_other_request(client, server):
    """xgrammar compiles it and the check at admission passes it; the reply then reaches `{"a": "`,
    after which the grammar allows nothing. Not streamed: a 400 naming response_format's schema;
    streamed: an error event saying the same after the 200; a request running beside them gets the
    tokens it gets alone."""
    dead = {"type": "json_schema", "json_schema": {"name": "dead", "schema": DEAD_END}}
    beside = dict(model=server.model, messages=MESSAGES, max_tokens=24, temperature=0)
    alone = client.chat.completions.create(**beside).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:
        neighbour = pool.submit(lambda: client.chat.completions.create(**beside))
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=30, response_format=dead)
        assert neighbour.result().choices[0].message.content == alone
    body = info.value.body
    assert body["param"] == "response_format.json_schema", body
    assert body["message"].startswith("response_format.json_schema allows no next token after the "), body
    assert "inside the engine" not in body["message"] and "internal" not in body["message"], body
    stream = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=30, response_format=dead, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == '{"a": "'
    assert info.value.body["param"] == "response_format.json_schema", info.value.body
    assert info.value.body["type"] == "invalid_request_error", info.value.body
    assert info.value.message.startswith("response_format.json_schema allows no next token"), info.value.message


def _events(server, path: str, body: dict) -> list[dict]:
    import httpx

    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_dead_end_streamed_on_the_responses_and_messages_apis_is_the_clients_error(server):
    """After the 200, the Responses API's error event and the Messages API's say what the client's
    constraint did (a tool whose schema dead-ends, on the Messages API), not an internal error."""
    events = _events(server, "/v1/responses", {
        "model": server.model, "input": "Describe a person.", "max_output_tokens": 30, "stream": True,
        "text": {"format": {"type": "json_schema", "name": "dead", "schema": DEAD_END}},
    })
    error = events[-1]
    assert error["type"] == "error" and "allows no next token" in error["message"], error
    assert error["param"] and error["code"] is None, error
    tool = {"name": "dead", "input_schema": DEAD_END}
    events = _events(server, "/v1/messages", {
        "model": server.model, "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "Call it."}],
        "tools": [tool], "tool_choice": {"type": "any"},
    })
    error = events[-1]
    assert error["type"] == "error", error
    assert error["error"]["type"] == "invalid_request_error" and "tools allows no next token" in error["error"]["message"], error


def test_restrictions_that_leave_no_token_are_a_400_naming_them(client, server):
    """allowed_token_ids holding only the end-of-text token under min_tokens, or no token the
    grammar allows: at the reply's first token nothing is left. A 400 naming allowed_token_ids
    (streamed too: it fails before the 200), not a token drawn from a row of -inf."""
    import httpx

    def tokens(text: str) -> list[int]:
        body = {"model": server.model, "prompt": text, "add_special_tokens": False}
        return httpx.post(f"{server.url}/tokenize", json=body, timeout=60).json()["tokens"]

    (eos,), hello = tokens("<|im_end|>"), tokens("hello")
    cases = [
        ({"allowed_token_ids": [eos], "min_tokens": 2}, "allowed_token_ids and min_tokens together allow no token"),
        ({"allowed_token_ids": [hello[0] + 1], "guided_choice": ["hello"]}, "allowed_token_ids and guided_choice together"),
    ]
    for extra, message in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5, stream=stream, extra_body=extra)
            assert info.value.body["param"] == "allowed_token_ids", info.value.body
            assert info.value.body["message"].startswith(message), info.value.body
    # allowed_token_ids alone, and with min_tokens met by another token, still serve
    reply = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=5,
                                           extra_body={"allowed_token_ids": [eos, hello[0]], "min_tokens": 2})
    assert reply.choices[0].finish_reason in ("stop", "length")
