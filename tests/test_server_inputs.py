"""Inputs a hostile or careless client gets wrong, each a 400 naming the field (found auditing the server).

- a NaN or Infinity anywhere in a body (Python's json reads them; JSON has none): the Responses API
  echoed text/tools/reasoning back, a 500 (JSONResponse refuses them) or a stream event that is not JSON;
- chat_template_kwargs that replace a function the chat template calls (strftime_now, namespace,
  raise_exception, range, ...): a TypeError inside the template, a 500;
- a value of the wrong JSON type (a string or a boolean for a number, a number for a boolean):
  lax pydantic converted it, so "n": "2" ran two sequences and "stop_token_ids": [true] stopped on token 1;
- response_format's json_schema beside type json_object or text (ignored: no constraint), and a
  schema of false (refused naming structured_outputs, a field the request did not have);
- an unknown key in the Responses API's text or reasoning (text.verbosity, which would change the
  reply) or the Messages API's output_config or thinking: ignored, as no top-level field is;
- max_completion_tokens or max_output_tokens of 0, or past the context: refused naming "max_tokens", a
  field the request did not have;
- a logit_bias key of 4300+ digits: int() refuses it with a ValueError, a 500; two keys of one
  token ("1" and "01"): one bias silently won; digits of other scripts ("１", "٣") read as token ids;
- allowed_token_ids of millions of ids (a 20 MB body): every step turned the whole list into a
  tensor on the engine thread, and every other request's 60 tokens took 33 s instead of 1.8 s;
- a 500 (a fault in a route or in the engine): uvicorn closed its keep-alive connection, and the next
  request on it, a good one, failed with a reset.
- an unknown key in a response format (response_format.json_schema, the Responses API's text.format,
  the Messages API's output_config.format): a misspelt "shema" left the reply unconstrained, a 200.
- /tokenize's chat fields (tools, chat_template_kwargs, add_generation_prompt, ...) beside a prompt:
  dropped, a 200; an empty Responses input: refused naming messages, a field that API does not have.
- a temperature past float32's range (1e308): infinite in the sampler, the masked logits over it NaN:
  a grammar's forbidden token drawn (a 500), allowed_token_ids not kept (a 200 with other tokens).
- a repetition penalty near 0 (1e-300: 0 as a float32; 1e-44: a positive logit over it +inf): NaN rows,
  so a grammar's forbidden token (a 500), tokens outside allowed_token_ids, a bad word, were drawn.
- a bad prompt of a completion's several (empty, an id outside the vocabulary, past the context):
  the engine's message for one prompt, with no word of which (embeddings name input[i]).
"""

from __future__ import annotations

import json
import re
import logging

import httpx
import pytest
from fastapi.testclient import TestClient

from fixtures_server import sdk_client, serving
from pangu_infer import LLM, SamplingParams
from pangu_infer.sampling_params import MAX_ALLOWED_TOKEN_IDS
from pangu_infer.server.app import create_app
from pangu_infer.server.chat_api import RESERVED_TEMPLATE_KWARGS
from pangu_infer.tokenizer import _compile_chat_template

MESSAGES = [{"role": "user", "content": "tell me about the weather in the city"}]


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256)


@pytest.fixture(scope="module")
def http(llm):
    with TestClient(create_app(llm, served_model_name="m"), raise_server_exceptions=False) as client:
        yield client


def _post_raw(http, path: str, text: str):
    return http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _error(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error["message"]


def _still_serves(http) -> None:
    ok = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------- NaN and Infinity
@pytest.mark.parametrize(("path", "body", "param"), [
    # echoed back by the Responses API: a 500 before the body guard refused them
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "text": {"format": {"type": "text"}, "x": float("nan")}}, "text.x"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "stream": True, "text": {"format": {"type": "text"}, "x": float("nan")}},
     "text.x"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "tool_choice": "none",
                       "tools": [{"type": "function", "name": "f", "parameters": {"type": "number", "maximum": float("inf")}}]},
     "tools.0.parameters.maximum"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2, "reasoning": {"effort": None, "x": float("-inf")}}, "reasoning.x"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": float("inf")}}, "logit_bias.5"),
])
def test_nan_and_infinity_anywhere_are_a_400_naming_where(http, path, body, param):
    response = _post_raw(http, path, json.dumps(body))  # (json.dumps writes NaN, Infinity, -Infinity)
    assert "JSON has no NaN or Infinity" in _error(response, param)
    _still_serves(http)


def test_a_number_too_large_for_a_double_is_refused_as_infinite(http):
    body = '{"input": "hi", "max_output_tokens": 2, "text": {"format": {"type": "text"}, "x": 1e999}}'
    assert "an infinite number" in _error(_post_raw(http, "/v1/responses", body), "text.x")


# ---------------------------------------------------------------------- chat_template_kwargs
# Calls what Llama 3's and Qwen's templates call: strftime_now, namespace, raise_exception, range.
CALLING_TEMPLATE = (
    "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "{% set ns = namespace(n=0) %}{% for i in range(1) %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}"
    "[unused9]{{ m['role'] }}：{{ m['content'] }}[unused10]{% endfor %}{% if add_generation_prompt %}[unused9]助手：{% endif %}"
)


@pytest.fixture(scope="module")
def calling_http(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256,
              chat_template=CALLING_TEMPLATE)
    with TestClient(create_app(llm, served_model_name="m"), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("name", ["strftime_now", "namespace", "range", "raise_exception"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_template_kwargs_may_not_replace_the_functions_a_template_calls(calling_http, name, path):
    body = {"messages": [{"role": "tool", "content": "x"}] if name == "raise_exception" else MESSAGES,
            "chat_template_kwargs": {name: 5}}
    if path != "/tokenize":
        body["max_tokens"] = 2
    message = _error(calling_http.post(path, json=body), "chat_template_kwargs")
    assert f"may not set {name}" in message
    # the template's own raise_exception still answers a 400 for what it refuses
    refused = calling_http.post(path, json={**body, "chat_template_kwargs": {}})
    assert refused.status_code == (400 if name == "raise_exception" else 200), refused.text
    _still_serves(calling_http)


def test_every_function_a_chat_template_gets_is_reserved():
    assert set(_compile_chat_template("x").environment.globals) <= RESERVED_TEMPLATE_KWARGS


# ---------------------------------------------------------------------- JSON types
WRONG_TYPES = [
    ("/v1/completions", "n", "2"), ("/v1/completions", "n", True), ("/v1/completions", "max_tokens", "5"),
    ("/v1/completions", "max_tokens", 5.0), ("/v1/completions", "temperature", True), ("/v1/completions", "temperature", "0.5"),
    ("/v1/completions", "seed", "1"), ("/v1/completions", "stop_token_ids", [True]), ("/v1/completions", "stop_token_ids", ["1"]),
    ("/v1/completions", "logprobs", True), ("/v1/completions", "echo", "yes"), ("/v1/completions", "echo", 1),
    ("/v1/completions", "include_stop_str_in_output", 1), ("/v1/completions", "prompt", [True, 5]),
    ("/v1/chat/completions", "logprobs", 1), ("/v1/chat/completions", "top_logprobs", "2"), ("/v1/chat/completions", "stream", "false"),
    ("/v1/chat/completions", "max_completion_tokens", "4"), ("/v1/chat/completions", "allowed_token_ids", [False, 5]),
    ("/v1/responses", "max_output_tokens", "4"), ("/v1/responses", "top_logprobs", True), ("/v1/responses", "store", "false"),
    ("/v1/messages", "max_tokens", "4"), ("/v1/messages", "top_k", True), ("/v1/messages", "stream", 0),
    ("/tokenize", "add_special_tokens", "no"), ("/detokenize", "tokens", [True, 5]),
]
BASES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2}, "/v1/messages": {"model": "m", "messages": MESSAGES, "max_tokens": 2},
    "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5]},
}


@pytest.mark.parametrize(("path", "field", "value"), WRONG_TYPES)
def test_a_value_of_the_wrong_json_type_is_refused_not_converted(http, path, field, value):
    response = http.post(path, json={**BASES[path], field: value})
    assert response.status_code == 400, f"{field}={value!r} -> {response.status_code} {response.text[:200]}"
    assert response.json()["error"]["param"].startswith(field), response.text
    assert "(got " in response.json()["error"]["message"]  # what was sent, or its bad element


def test_integers_still_read_as_floats(http):
    body = {**BASES["/v1/completions"], "temperature": 0, "top_p": 1, "presence_penalty": 0, "logit_bias": {"5": -100}}
    assert http.post("/v1/completions", json=body).status_code == 200


# ---------------------------------------------------------------------- response_format
@pytest.mark.parametrize("kind", ["json_object", "text"])
def test_a_json_schema_beside_another_response_format_type_is_refused(http, kind):
    rf = {"type": kind, "json_schema": {"name": "x", "schema": {"type": "integer"}}}
    message = _error(http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "response_format": rf}),
                     "response_format")
    assert f"json_schema is read only with type 'json_schema', not '{kind}'" in message


@pytest.mark.parametrize(("path", "field", "param"), [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
     "response_format.json_schema"),
    ("/v1/completions", {"structured_outputs": {"json": False}}, "structured_outputs.json"),
    ("/v1/completions", {"guided_json": False}, "guided_json"),
])
def test_the_schema_false_is_refused_naming_where_it_was_given(http, path, field, param):
    message = _error(http.post(path, json={**BASES[path], **field}), param)
    if param == "response_format.json_schema":  # (the others are typed: a boolean is no schema there)
        assert "the JSON schema false, which no output matches" in message


# ---------------------------------------------------------------------- objects of known keys
@pytest.mark.parametrize(("path", "field", "param"), [
    ("/v1/responses", {"text": {"format": {"type": "text"}, "verbosity": "low"}}, "text.verbosity"),
    ("/v1/responses", {"text": {"bogus": 1}}, "text.bogus"),
    ("/v1/responses", {"reasoning": {"effort": "low", "bogus": 1}}, "reasoning.bogus"),
    ("/v1/messages", {"output_config": {"effort": "high", "bogus": 1}}, "output_config.bogus"),
    ("/v1/messages", {"thinking": {"type": "disabled", "bogus": 1}}, "thinking.bogus"),
])
def test_an_unknown_key_in_an_object_field_is_refused_not_ignored(http, path, field, param):
    assert "Extra inputs are not permitted" in _error(http.post(path, json={**BASES[path], **field}), param)


def test_the_responses_api_echoes_text_and_reasoning_as_given(http):
    body = {**BASES["/v1/responses"], "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low", "summary": "auto"}}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == body["text"] and response.json()["reasoning"] == body["reasoning"]
    plain = http.post("/v1/responses", json=BASES["/v1/responses"]).json()
    assert plain["text"] == {"format": {"type": "text"}} and plain["reasoning"] == {"effort": None, "summary": None}
    shaped = http.post("/v1/messages", json={**BASES["/v1/messages"], "output_config": {"effort": "low"}, "thinking": {"type": "disabled"}})
    assert shaped.status_code == 200, shaped.text


# ---------------------------------------------------------------------- the length fields' names
@pytest.mark.parametrize(("path", "field"), [
    ("/v1/chat/completions", "max_completion_tokens"), ("/v1/responses", "max_output_tokens"), ("/v1/messages", "max_tokens"),
    ("/v1/messages/count_tokens", "max_tokens"),
])
@pytest.mark.parametrize("value", [0, -1])
def test_a_length_below_one_is_refused_under_the_name_it_was_given(http, path, field, value):
    """(The Messages API's max_tokens of 0 was refused as max_completion_tokens, its chat request's field.)"""
    body = {k: v for k, v in BASES[path.removesuffix("/count_tokens")].items() if not k.startswith("max_")}
    message = _error(http.post(path, json={**body, field: value}), field)
    assert "greater than or equal to 1" in message and "max_completion_tokens" not in message.replace(field, "")


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/chat/completions", "max_completion_tokens"), ("/v1/chat/completions", "max_tokens"),
    ("/v1/responses", "max_output_tokens"), ("/v1/messages", "max_tokens"),
])
def test_a_length_past_the_context_is_refused_under_the_name_it_was_given(http, path, field):
    body = {k: v for k, v in BASES[path].items() if not k.startswith("max_")}
    message = _error(http.post(path, json={**body, field: 1000}), field)  # the context: 256 tokens
    assert f"{field} (1000)" in message and "more than the model's context of 256 tokens" in message
    assert field == "max_tokens" or "max_tokens" not in message.replace(field, "")
    _still_serves(http)


def test_a_completion_that_gives_no_length_fits_its_prompts_room(http):
    """No max_tokens: OpenAI's 16, or the room the prompt leaves in the context if less (vLLM's min),
    not a 400 for a length the client did not ask; an explicit one past the context stays a 400."""
    near_full = http.post("/v1/completions", json={"prompt": [7] * 250, "temperature": 0, "ignore_eos": True})
    assert near_full.status_code == 200 and near_full.json()["usage"]["completion_tokens"] == 6, near_full.text
    short = http.post("/v1/completions", json={"prompt": [7] * 10, "temperature": 0, "ignore_eos": True})
    assert short.json()["usage"]["completion_tokens"] == 16
    assert "max_tokens (16)" in _error(http.post("/v1/completions", json={"prompt": [7] * 250, "max_tokens": 16}), "max_tokens")


# ---------------------------------------------------------------------- logit_bias keys
@pytest.mark.parametrize("digits", [21, 5000])
def test_a_logit_bias_key_of_too_many_digits_is_a_400(http, digits):
    body = {**BASES["/v1/completions"], "logit_bias": {"1" * digits: 1}}
    assert f"a token id of {digits} digits is outside any vocabulary" in _error(http.post("/v1/completions", json=body), "logit_bias")
    _still_serves(http)


@pytest.mark.parametrize(("bias", "message"), [
    ({"5": 1, "05": -1}, "logit_bias names the token 5 twice ('5' and '05')"),
    ({"5": 1, " 5": -1}, "logit_bias names the token 5 twice ('5' and ' 5')"),
    ({"\uff15": 1}, "logit_bias has the key '\uff15': expected a token id"),  # a fullwidth 5
    ({"\u0665": 1}, "logit_bias has the key '\u0665': expected a token id"),  # an Arabic-Indic 5
])
def test_logit_bias_keys_are_one_token_each_in_ascii_digits(http, bias, message):
    body = {**BASES["/v1/completions"], "logit_bias": bias}
    assert message in _error(http.post("/v1/completions", json=body), "logit_bias")


# ---------------------------------------------------------------------- allowed_token_ids
def test_allowed_token_ids_past_any_vocabulary_are_refused(http):
    body = {**BASES["/v1/completions"], "allowed_token_ids": [5, 6] * (MAX_ALLOWED_TOKEN_IDS // 2 + 1)}
    message = _error(http.post("/v1/completions", json=body), "allowed_token_ids")
    assert f"allowed_token_ids has {MAX_ALLOWED_TOKEN_IDS + 2} ids; at most {MAX_ALLOWED_TOKEN_IDS} are allowed" in message
    _still_serves(http)


def test_allowed_token_ids_are_kept_once_each_for_the_steps_that_mask_by_them(http):
    assert SamplingParams(allowed_token_ids=[7, 5, 7, 5, 9]).allowed_token_ids == [7, 5, 9]
    body = {**BASES["/v1/completions"], "allowed_token_ids": [5, 6] * 1000, "temperature": 1.0, "seed": 3, "max_tokens": 4,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert set(response.json()["choices"][0]["logprobs"]["tokens"]) <= {"token_id:5", "token_id:6"}


# ---------------------------------------------------------------------- a 500 keeps the connection
@pytest.fixture(scope="module")
def poisoned_llm(tiny_dense_dir):
    """Faults of the server itself: the tokenizer fails on prompts that say "poison" (in the route),
    the sampler on requests with seed 666 (inside the engine)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256)
    encode, sample = llm.tokenizer.encode, llm.engine.sampler

    def tokenize(text, *args, **kwargs):
        if "poison" in text:
            raise RuntimeError("secret detail")
        return encode(text, *args, **kwargs)

    def sampler(logits, rows):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("secret detail")
        return sample(logits, rows)

    llm.tokenizer.encode, llm.engine.sampler = tokenize, sampler
    return llm


@pytest.fixture
def poisoned_app(poisoned_llm):
    return create_app(poisoned_llm, served_model_name="m")  # one per test: an app stops its engine when it shuts down


FAULTS = [{"prompt": "poison", "max_tokens": 2}, {"prompt": "hi", "max_tokens": 2, "seed": 666, "temperature": 1.0}]


@pytest.mark.parametrize("fault", FAULTS, ids=["route", "engine"])
def test_a_500_leaves_the_connection_open_for_the_next_request(poisoned_app, fault, caplog):
    with serving(poisoned_app) as url, httpx.Client(base_url=url, timeout=60) as client, caplog.at_level(logging.ERROR):
        for _ in range(3):
            failed = client.post("/v1/completions", json=fault)
            assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
            assert "secret" not in failed.text
            # on the same keep-alive connection: it was closed after the 500, and this failed with a reset
            assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.getMessage().startswith("Exception in ASGI application")]


def test_the_app_raises_nothing_to_the_server_after_its_500(poisoned_app):
    with TestClient(poisoned_app, raise_server_exceptions=True) as client:  # (re-raises what reaches the server)
        for fault in FAULTS:
            assert client.post("/v1/completions", json=fault).status_code == 500


# ---------------------------------------------------------------------- enable_thinking
@pytest.mark.parametrize("value", ["yes", 1, [True]])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_bad_enable_thinking_is_refused_naming_it_not_messages(http, path, value):
    body = {**BASES[path if path != "/tokenize" else "/v1/chat/completions"], "chat_template_kwargs": {"enable_thinking": value}}
    if path == "/tokenize":
        del body["max_tokens"]
    message = _error(http.post(path, json=body), "chat_template_kwargs.enable_thinking")
    assert "chat_template_kwargs.enable_thinking must be true, false or \"auto\"" in message
    for good in (False, "auto"):  # (rendered, not refused)
        assert http.post(path, json={**body, "chat_template_kwargs": {"enable_thinking": good}}).status_code == 200


# ---------------------------------------------------------------------- the Responses API's input items
def test_a_function_call_item_of_bad_arguments_is_refused_naming_the_item(http):
    items = [{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "ok"},
             {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{not json"}]
    body = {**BASES["/v1/responses"], "instructions": "be brief", "input": items}  # (a system turn first: messages[k] != input[k])
    assert "input[3].arguments is not valid JSON" in _error(http.post("/v1/responses", json=body), "input[3].arguments")
    items[3]["arguments"] = '{"a": 1%s}' % ("0" * 5000)  # valid JSON, past Python's digit limit
    assert _error(http.post("/v1/responses", json=body), "input[3].arguments") == "input[3].arguments holds a number too long to read"
    items[3]["arguments"] = '{"a": 1}'
    assert http.post("/v1/responses", json=body).status_code == 200


def test_a_chat_tool_calls_arguments_past_pythons_digit_limit_are_refused_naming_them(http):
    """(Python's own message, which advised calling sys.set_int_max_str_digits, named no field.)"""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1%s}' % ("0" * 5000)}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    message = _error(http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}), "messages")
    assert message == "messages[1].tool_calls[0].function.arguments holds a number too long to read"


@pytest.mark.parametrize(("item", "param", "says"), [
    ({"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image"}]}, "input[1].output[0]", "must be an input_text"),
    ({"type": "function_call_output", "call_id": "c1", "output": 5}, "input[1].output", "must be a string or a list of text parts, got 5"),
    ({"type": "function_call_output", "call_id": "c1"}, "input[1].output", "got null"),
    ({"role": "user", "content": {"text": "hi"}}, "input[1].content", "must be a string or a list of text parts"),
])
def test_an_items_text_of_the_wrong_shape_is_refused_naming_where(http, item, param, says):
    """(A function_call_output's output was named input[k].output.content[j], a field no item has,
    and a content that is no text input[k] alone.)"""
    body = {**BASES["/v1/responses"], "input": [{"role": "user", "content": "hi"}, item]}
    message = _error(http.post("/v1/responses", json=body), param)
    assert message.startswith(param) and says in message and "output.content" not in message, message


# ---------------------------------------------------------------------- schemas of other APIs' fields
@pytest.mark.parametrize(("path", "field", "param", "says"), [
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": False}}}, "text.format.schema",
     "text.format.schema is the JSON schema false"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format.schema",
     "text.format.schema is invalid"),  # (refused when it compiles, at admission)
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": "{}"}}}, "text.format.schema",
     "text.format.schema must be a JSON schema"),
    ("/v1/messages", {"output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, "output_config.format.schema",
     "output_config.format.schema is invalid"),
])
def test_a_bad_schema_is_named_as_the_api_names_it_not_response_format(http, path, field, param, says):
    message = _error(http.post(path, json={**BASES[path], **field}), param)
    assert says in message and "response_format" not in message
    _still_serves(http)


@pytest.mark.parametrize(("path", "field", "named"), [
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}, "text.format.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"guided_regex": "a+"}, "guided_regex"),
])
def test_a_forced_tool_call_with_a_schema_names_the_schemas_field_as_sent(http, path, field, named):
    tool = SHAPED_TOOL if path == "/v1/responses" else CHAT_TOOL
    body = {**BASES[path], **field, "tools": [tool], "tool_choice": "required"}
    message = _error(http.post(path, json=body), "tool_choice")
    assert message == f"tool_choice 'required' or a named function cannot be combined with {named}", message


# ---------------------------------------------------------------------- tool names
CHAT_TOOL, SHAPED_TOOL = {"type": "function", "function": {"name": "f"}}, {"type": "function", "name": "f"}


@pytest.mark.parametrize(("path", "tools", "param"), [
    ("/v1/chat/completions", [CHAT_TOOL, {"type": "function", "function": {"name": "g"}}, CHAT_TOOL], "tools"),
    ("/tokenize", [CHAT_TOOL, CHAT_TOOL], "tools"),
    ("/v1/responses", [SHAPED_TOOL, SHAPED_TOOL], "tools"),
    ("/v1/messages", [{"name": "f"}, {"name": "f"}], "tools"),
    ("/v1/chat/completions", [{"type": "function", "function": {"name": ""}}], "tools.0.function.name"),
    ("/v1/responses", [SHAPED_TOOL, {"type": "function", "name": ""}], "tools[1].name"),
    ("/v1/messages", [{"name": ""}], "tools[0].name"),
])
def test_tool_names_are_unique_and_not_empty(http, path, tools, param):
    body = {**BASES["/v1/chat/completions"], "max_tokens": None} if path == "/tokenize" else BASES[path]
    message = _error(http.post(path, json={**{k: v for k, v in body.items() if v is not None}, "tools": tools}), param)
    assert ("tool names must be unique" if param == "tools" else "at least 1 character" if "function" in param else "non-empty") in message
    if param == "tools":
        assert ("tools[0] and tools[2]" if len(tools) == 3 else "tools[0] and tools[1]") in message
    if path == "/tokenize":  # tools of distinct names: taken
        assert http.post(path, json={"messages": MESSAGES, "tools": [CHAT_TOOL, {"type": "function", "function": {"name": "g"}}]}).status_code == 200


@pytest.mark.parametrize(("path", "tool", "param"), [
    ("/v1/responses", {**SHAPED_TOOL, "parameters": "an object"}, "tools[0].parameters"),
    ("/v1/responses", {**SHAPED_TOOL, "description": 5}, "tools[0].description"),
    ("/v1/responses", {**SHAPED_TOOL, "strict": "yes"}, "tools[0].strict"),
    ("/v1/messages", {"name": "f", "input_schema": "an object"}, "tools[0].input_schema"),
    ("/v1/messages", {"name": "f", "description": ["d"]}, "tools[0].description"),
    ("/v1/messages/count_tokens", {"name": "f", "input_schema": 5}, "tools[0].input_schema"),
])
def test_a_tool_field_of_the_wrong_type_is_named_as_the_api_names_it(http, path, tool, param):
    """The Responses and Messages APIs give a tool's fields flat, and Messages calls its schema
    input_schema: their errors named the chat request's tools.0.function.parameters."""
    body = BASES[path.removesuffix("/count_tokens")]
    message = _error(http.post(path, json={**body, "tools": [tool]}), param)
    assert message.startswith(f"invalid request: {param}: ") and "function" not in message, message
    _still_serves(http)


# ---------------------------------------------------------------------- Messages' stop_sequences
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize(("stop", "says"), [([""], "stop_sequences=['']: expected a non-empty string"),
                                            (["x"] * 17, "stop_sequences has 17 strings; at most 16")])
def test_bad_stop_sequences_are_refused_naming_stop_sequences(http, path, stop, says):
    """(They were refused naming stop, chat's field, which a Messages request has not.)"""
    message = _error(http.post(path, json={**BASES["/v1/messages"], "stop_sequences": stop}), "stop_sequences")
    assert says in message, message


# ---------------------------------------------------------------------- assistant tool calls
@pytest.mark.parametrize("arguments", [{"city": "Rome"}, None, 5])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_tool_call_arguments_that_are_not_a_string_are_refused(http, path, arguments):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    body = {"messages": messages, **({"max_tokens": 2} if path != "/tokenize" else {})}
    param = "messages[1].tool_calls[0].function.arguments"
    assert f"{param} must be a string" in _error(http.post(path, json=body), param)
    call["function"]["arguments"] = '{"city": "Rome"}'
    assert http.post(path, json=body).status_code == 200


# ---------------------------------------------------------------------- fields a role cannot carry
@pytest.mark.parametrize(("message", "field"), [
    ({"role": "user", "content": "hi", "tool_call_id": "c1"}, "tool_call_id"),
    ({"role": "system", "content": "be brief", "tool_call_id": "c1"}, "tool_call_id"),
    ({"role": "assistant", "content": "ok", "tool_call_id": "c1"}, "tool_call_id"),
    ({"role": "user", "content": "hi", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "tool_calls"),
    ({"role": "tool", "content": "sunny", "tool_call_id": "c1", "tool_calls": []}, "tool_calls"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_field_the_messages_role_cannot_carry_is_refused_naming_it(http, path, message, field):
    """OpenAI's message types: tool_call_id only on a tool result, tool_calls only on an assistant's
    message; taken before, the field was dropped or rendered as something the chat never said."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = dict(message)  # (the parameter's dict is shared by both paths)
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}, message]
    body = {"messages": messages, **({"max_tokens": 2} if path != "/tokenize" else {})}
    param = f"messages[2].{field}"
    text = _error(http.post(path, json=body), param)
    assert f"role {message['role']!r} cannot carry {field}" in text, text
    del message[field]
    assert http.post(path, json=body).status_code == 200
    if field == "tool_call_id" and message["role"] == "user":  # the name OpenAI allows on a user's message
        assert http.post(path, json={**body, "messages": [*messages[:2], {**message, "name": "ann"}]}).status_code == 200


def test_a_tool_result_may_carry_the_tools_name(http):
    """LangChain sends a ToolMessage's name (LangGraph's tool node sets it to the tool's), as vLLM takes it."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "f"}]
    assert http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).status_code == 200


def test_the_openai_client_hears_which_message_field_is_refused(http):
    import openai

    client = sdk_client(http)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi", "tool_call_id": "c1"}])
    assert refused.value.body["param"] == "messages[0].tool_call_id", refused.value.body


# ---------------------------------------------------------------------- previous_response_id
def test_an_empty_previous_response_id_is_refused_not_taken_as_absent(http):
    body = {**BASES["/v1/responses"], "previous_response_id": ""}
    assert "at least 1 character" in _error(http.post("/v1/responses", json=body), "previous_response_id")
    stored = http.post("/v1/responses", json=BASES["/v1/responses"]).json()["id"]  # (a real one still continues)
    assert http.post("/v1/responses", json={**body, "previous_response_id": stored}).status_code == 200


# ---------------------------------------------------------------------- the Messages API's content
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_an_empty_content_list_is_refused_naming_the_message(http, path):
    messages = [*MESSAGES, {"role": "assistant", "content": "ok"}, {"role": "user", "content": []}]
    body = {**BASES["/v1/messages"], "messages": messages}
    assert "messages[2].content is an empty list" in _error(http.post(path, json=body), "messages[2].content")
    messages[2]["content"] = [{"type": "text", "text": "and tomorrow?"}]
    assert http.post(path, json=body).status_code == 200


def test_the_response_store_echoes_no_long_id_or_query_value_in_full(http):
    """GET/DELETE of a stored response by an id of 20,000 characters (the URL holds it), and
    input_items with such an `after`: a 404 or 400 whose message cuts the value (short_repr), not a
    body that repeats the client's 20 kB."""
    long_id = "resp_" + "x" * 20000
    for method, path in (("GET", f"/v1/responses/{long_id}"), ("DELETE", f"/v1/responses/{long_id}"),
                         ("GET", f"/v1/responses/{long_id}/input_items")):
        r = http.request(method, path)
        assert r.status_code == 404 and len(r.text) < 1000, (method, path[:40], len(r.text))
    created = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1}).json()
    r = http.get(f"/v1/responses/{created['id']}/input_items", params={"after": "item_" + "y" * 20000})
    assert r.status_code == 400 and len(r.text) < 1000 and _error(r, "after")


LONG = "z" * 20000


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/messages", {"thinking": {"type": LONG}}, "thinking.type"),
    ("/v1/messages", {"messages": [{"role": LONG, "content": "hi"}]}, "messages[0].role"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": LONG}]}]}, "messages[0].content[0]"),
    ("/v1/responses", {"input": [{"type": "message", "role": LONG, "content": "hi"}]}, "input[0]"),
    ("/v1/responses", {"input": [{"type": LONG}]}, "input[0]"),
    ("/v1/responses", {"reasoning": {"effort": LONG}}, "reasoning.effort"),
    ("/v1/responses", {"tools": [{"type": LONG}]}, "tools[0]"),
    ("/v1/responses", {"text": {"format": {"type": LONG}}}, "text.format"),
])
def test_a_long_value_of_a_named_kind_is_named_cut_not_echoed(http, path, extra, param):
    """A type, role or effort of 20,000 characters: a 400 naming the field whose message cuts the
    value (short_repr), not one that repeats the client's 20 kB."""
    r = http.post(path, json={**BASES[path], **extra})
    assert r.status_code == 400 and len(r.text) < 1000 and _error(r, param), (r.status_code, len(r.text), r.text[:300])


# ---------------------------------------------------------------------- the Messages API's tool_use input
@pytest.mark.parametrize("given", [{"value": ["Rome"]}, {"value": "Rome"}, {"value": 5}, {"value": None}, {}])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_tool_use_input_that_is_not_an_object_is_refused_naming_it(http, path, given):
    """Anthropic's ToolUseBlockParam: input is a required object (the tool's arguments); a list, text
    or number had been sent to the model as that call's arguments, and a null or missing one as {}."""
    block = {"type": "tool_use", "id": "toolu_1", "name": "f", **({"input": given["value"]} if given else {})}
    messages = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "checking"}, block]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]
    body = {**BASES["/v1/messages"], "messages": messages}
    param = "messages[1].content[1].input"
    assert f"{param} must be a JSON object" in _error(http.post(path, json=body), param)
    block["input"] = {"city": "Rome"}
    assert http.post(path, json=body).status_code == 200


# ---------------------------------------------------------------------- the Messages API's thinking budget
@pytest.mark.parametrize(("path", "budget", "max_tokens", "says"), [
    ("/v1/messages", 1023, 2000, "must be an integer >= 1024"),
    ("/v1/messages", 1, 2000, "must be an integer >= 1024"),
    ("/v1/messages", 1024, 1024, "thinking.budget_tokens (1024) must be less than max_tokens (1024)"),
    ("/v1/messages", 5000, 2, "thinking.budget_tokens (5000) must be less than max_tokens (2)"),
    pytest.param("/v1/messages", 10**4000, 2, "thinking.budget_tokens (<an integer of 13288 bits>) must be less than max_tokens (2)",
                 id="4001-digits"),
    ("/v1/messages/count_tokens", 1023, None, "must be an integer >= 1024"),
])
def test_a_thinking_budget_anthropic_refuses_is_refused(http, path, budget, max_tokens, says):
    """Anthropic's rules for thinking.budget_tokens: at least 1024 and less than max_tokens (the thinking
    counts toward max_tokens); both had been taken (a budget of max_tokens or more left the answer no room)."""
    body = {**BASES["/v1/messages"], "max_tokens": max_tokens, "thinking": {"type": "enabled", "budget_tokens": budget}}
    message = _error(_post_raw(http, path, json.dumps(body)), "thinking.budget_tokens")
    assert says in message and len(message) < 300, message


def test_a_thinking_budget_anthropic_takes_becomes_the_reasoning_budget(http):
    from pangu_infer.server.messages import MessagesRequest, to_chat_request

    thinking = {"type": "enabled", "budget_tokens": 1024}
    chat = to_chat_request(MessagesRequest.model_validate({**BASES["/v1/messages"], "max_tokens": 1025, "thinking": thinking}))
    assert chat.max_reasoning_tokens == 1024 and chat.max_completion_tokens == 1025
    body = {**BASES["/v1/messages"], "thinking": thinking}
    del body["max_tokens"]
    assert http.post("/v1/messages/count_tokens", json=body).status_code == 200  # (no max_tokens to be less than)


# ---------------------------------------------------------------------- json_schema's name, description and strict
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("name", 5, "a string"), ("name", ["x"], "a string"), ("description", {"a": 1}, "a string"),
    ("strict", "x", "true or false"), ("strict", 1, "true or false"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_json_schema_name_or_strict_of_the_wrong_type_is_refused_naming_it(http, path, key, value, expected):
    """OpenAI's json_schema response format: name and description strings, strict a boolean or null;
    a number or text there had been taken (and ignored)."""
    def body(given):
        spec = {"name": "answer", "schema": {"type": "object"}, "strict": None, key: given}
        if path == "/v1/responses":
            return {**BASES[path], "text": {"format": {"type": "json_schema", **spec}}}
        return {**BASES[path], "response_format": {"type": "json_schema", "json_schema": spec}}

    param = f"text.format.{key}" if path == "/v1/responses" else f"response_format.json_schema.{key}"
    message = _error(http.post(path, json=body(value)), param)
    assert f"{param} must be {expected}, got {json.dumps(value)}" in message, message
    for good in (True, False, None) if key == "strict" else ("ok", None):
        assert http.post(path, json=body(good)).status_code == 200, good


# ---------------------------------------------------------------------- json_schema's keys
@pytest.mark.parametrize(("path", "fmt", "param"), [
    ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "x", "shema": {"type": "integer"}}},
     "response_format.json_schema.shema"),
    ("/v1/chat/completions", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}, "stict": True}},
     "response_format.json_schema.stict"),
    ("/v1/responses", {"type": "json_schema", "name": "x", "shema": {"type": "integer"}}, "text.format.shema"),
    ("/v1/responses", {"type": "json_object", "schema": {"type": "integer"}}, "text.format.schema"),
    ("/v1/responses", {"type": "text", "name": "x"}, "text.format.name"),
    ("/v1/messages", {"type": "json_schema", "schema": {"type": "integer"}, "strict": True}, "output_config.format.strict"),
])
def test_an_unknown_key_of_a_response_format_is_refused_not_ignored(http, path, fmt, param):
    """A misspelt key ("shema") left the reply unconstrained (any JSON object), a 200; a schema beside
    json_object was dropped. Each is refused, naming the key and the keys the format has."""
    field = {"/v1/chat/completions": {"response_format": fmt}, "/v1/responses": {"text": {"format": fmt}},
             "/v1/messages": {"output_config": {"format": fmt}}}[path]
    message = _error(http.post(path, json={**BASES[path], **field}), param)
    assert f"{param} is not a field of" in message, message
    _still_serves(http)


# ---------------------------------------------------------------------- /tokenize's chat fields beside a prompt
@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("chat_template_kwargs", {"enable_thinking": False}),
    ("chat_template", "{{ messages }}"), ("add_generation_prompt", False), ("continue_final_message", True),
])
def test_a_chat_field_beside_a_prompt_to_tokenize_is_refused_not_ignored(http, field, value):
    """These shape a rendered chat; a prompt is tokenized as given, so they had been dropped (a 200
    counting tokens the client did not ask for). Their defaults, which change nothing, are still taken."""
    message = _error(http.post("/tokenize", json={"prompt": "hi", field: value}), field)
    assert f"{field} applies to messages" in message, message
    default = {"tools": [], "chat_template_kwargs": {}, "chat_template": None, "add_generation_prompt": True,
               "continue_final_message": False}[field]
    assert http.post("/tokenize", json={"prompt": "hi", field: default}).status_code == 200


def test_an_empty_responses_input_is_refused_naming_input(http):
    """(It was refused naming messages, a field the Responses API does not have.)"""
    message = _error(http.post("/v1/responses", json={**BASES["/v1/responses"], "input": []}), "input")
    assert "messages" not in message, message


# ---------------------------------------------------------------------- a temperature past float32
@pytest.mark.parametrize("temperature", [1e308, 3.5e38])
@pytest.mark.parametrize("constraint", ["regex", "allowed_token_ids"])
def test_a_temperature_past_float32_keeps_the_masks(http, temperature, constraint):
    """A temperature a double holds and a float32 does not was infinite in the sampler: the masked
    (-inf) logits over it were NaN, a grammar's forbidden token was drawn (the request a 500) and
    allowed_token_ids was not kept. It is a uniform draw over the tokens the masks leave."""
    body = {**BASES["/v1/completions"], "max_tokens": 6, "temperature": temperature, "seed": 1, "return_token_ids": True}
    if constraint == "regex":
        body["structured_outputs"] = {"regex": "[ab]+"}
    else:
        body["allowed_token_ids"] = [300, 301]
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if constraint == "regex":
        assert re.fullmatch("[ab]+", choice["text"]), choice
    else:
        assert set(choice["token_ids"]) <= {300, 301}, choice
    _still_serves(http)


# ---------------------------------------------------------------------- a repetition penalty near 0
@pytest.mark.parametrize("penalty", [1e-300, 1e-44])
@pytest.mark.parametrize("constraint", ["regex", "allowed_token_ids", "bad_words"])
def test_a_repetition_penalty_near_zero_keeps_the_masks(http, penalty, constraint):
    """A penalty under float32's range was 0 in the sampler, and a seen token's masked logit (-inf)
    times it NaN: the greedy argmax took that token (a bad word written). A seen token's positive
    logit over a penalty near 0 is past the float range (+inf): the sampled row was NaN throughout
    and drew token 0 or the last one whatever the masks (a 500 under a grammar, other tokens than
    allowed_token_ids). The draw is now the limit: among the +inf tokens."""
    body = {**BASES["/v1/completions"], "prompt": "a b a b the cat", "max_tokens": 6, "repetition_penalty": penalty,
            "return_token_ids": True}
    body.update({"regex": {"structured_outputs": {"regex": "[ab]+"}}, "allowed_token_ids": {"allowed_token_ids": [300, 301]},
                 "bad_words": {"bad_words": ["the"]}}[constraint])
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0}):
        response = http.post("/v1/completions", json={**body, **sampling})
        assert response.status_code == 200, (sampling, response.text)
        choice = response.json()["choices"][0]
        if constraint == "regex":
            assert re.fullmatch("[ab]+", choice["text"]), (sampling, choice)
        elif constraint == "allowed_token_ids":
            assert set(choice["token_ids"]) <= {300, 301}, (sampling, choice)
        else:
            assert "the" not in choice["text"], (sampling, choice)
    _still_serves(http)


# ---------------------------------------------------------------------- which prompt of several
@pytest.mark.parametrize(("prompt", "says"), [
    ([[5, 6], []], "prompt[1]: the prompt is empty"),
    ([[5], [5, 10**9]], "prompt[1]: prompt token id 1000000000 is outside the vocabulary"),
    ([[5], [5] * 300], "prompt[1]: "),  # past the context of 256 tokens
    ([[5], [6], []], "prompt[2]: the prompt is empty"),
])
@pytest.mark.parametrize("beam", [False, True])
def test_a_bad_prompt_of_several_is_named_by_its_index(http, prompt, says, beam):
    """(The message was the engine's for one prompt, with no word of which of the request's it was.)"""
    body = {**BASES["/v1/completions"], "prompt": prompt, "max_tokens": 2, **({"use_beam_search": True} if beam else {})}
    message = _error(http.post("/v1/completions", json=body), "prompt")
    assert message.startswith(says), message
