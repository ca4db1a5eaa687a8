"""Structured outputs, forced tool calls and the thinking budget on Pangu: a tiny random Pangu 7B
(random weights: only the grammar makes its output well formed) and the scripted thinking model
(`[unused16]quick fox[unused17]hello world`), through the OpenAI API (official client) and the
Python API."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from fixtures_server import SCRIPTED_ANSWER, SCRIPTED_REASONING, running_server, sdk_client
from pangu_infer import LLM, SamplingParams
from pangu_infer.config import ModelConfig
from pangu_infer.sampling_params import StructuredOutputsParams
from pangu_infer.server.app import create_app

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
            "required": ["city", "metric"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                       "required": ["hour"], "additionalProperties": False},
    },
}
TOOLS = {"get_weather": WEATHER, "set_alarm": ALARM}


@pytest.fixture(scope="module")
def random_llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=16 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def random_client(random_llm):
    with TestClient(create_app(random_llm, served_model_name="random")) as http:
        yield sdk_client(http)


@pytest.fixture(scope="module")
def thinker(thinking_dense_dir):
    llm = LLM(str(thinking_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with TestClient(create_app(llm, served_model_name="thinker")) as http:
        yield llm, sdk_client(http)


def _valid_call(call) -> None:
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])


@pytest.mark.parametrize("thinking", [{"enable_thinking": False}, {"thinking_budget": 3}], ids=["no_think", "budget"])
def test_random_pangu_required_tool_choice_makes_a_valid_call(random_client, thinking):
    out = random_client.chat.completions.create(
        model="random", messages=MESSAGES, tools=[WEATHER, ALARM], tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=11, n=4, max_tokens=80, extra_body={"chat_template_kwargs": thinking},
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        _valid_call(call)


def test_random_pangu_named_tool_choice_calls_that_tool(random_client):
    out = random_client.chat.completions.create(
        model="random", messages=MESSAGES, tools=[WEATHER, ALARM], tool_choice={"type": "function", "function": {"name": "set_alarm"}},
        temperature=1.0, seed=12, n=4, max_tokens=60, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        assert call.function.name == "set_alarm"
        _valid_call(call)


def test_random_pangu_regex_choice_and_schema_in_one_batch(random_llm):
    """Constrained and unconstrained requests share the engine's batches (one generate call)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    params = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=20, n=2, structured_outputs=StructuredOutputsParams(regex=r"[ab]{3}-[0-9]")),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, n=2, structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"])),
        SamplingParams(temperature=1.0, seed=3, max_tokens=40, n=2, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=1.0, seed=4, max_tokens=20),
    ]
    outs = random_llm.generate(["a", "b", "c", "d"], params, use_tqdm=False)
    assert all(re.fullmatch(r"[ab]{3}-[0-9]", c.text) for c in outs[0].outputs), outs[0].outputs
    assert all(c.text in ("alpha", "beta") for c in outs[1].outputs)
    for c in outs[2].outputs:
        jsonschema.validate(json.loads(c.text), schema)
    assert len(outs[3].outputs[0].token_ids) == 20  # the free request ran its course beside them


def test_constraint_survives_preemption_and_speculation(tiny_dense_dir):
    """A KV pool too small for every sequence at once preempts (recompute keeps the matcher valid),
    beside prompt-lookup drafts checked against each sequence's grammar."""
    config = ModelConfig.from_hf_dict(json.loads((tiny_dense_dir / "config.json").read_text()))
    pool_tokens = 64  # 6 sequences of up to ~30 tokens need ~180
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, block_size=4, max_num_seqs=8, num_speculative_tokens=3,
              kv_cache_memory=pool_tokens * config.kv_bytes_per_token(torch.float32))
    pattern = r"(ab|cd){6,10}"
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, n=6, structured_outputs=StructuredOutputsParams(regex=pattern))
    (out,) = llm.generate(["ab cd ab cd ab cd"], params, use_tqdm=False)
    assert all(re.fullmatch(pattern, c.text) for c in out.outputs), [c.text for c in out.outputs]
    assert llm.engine.stats()["num_preemptions"] > 0


def test_thinking_budget_ends_the_reasoning_and_the_answer_follows(thinker):
    llm, client = thinker
    full = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20)
    assert full.choices[0].message.reasoning_content.strip() == SCRIPTED_REASONING
    reasoning_ids = llm.tokenizer.encode(SCRIPTED_REASONING, add_special_tokens=False)
    assert len(reasoning_ids) >= 2
    for budget, extra in ((1, {"max_reasoning_tokens": 1}), (0, {"chat_template_kwargs": {"thinking_budget": 0}})):
        out = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20, extra_body=extra)
        message = out.choices[0].message
        expected = llm.tokenizer.decode(reasoning_ids[:budget])
        assert message.reasoning_content == expected
        assert message.content.strip() == SCRIPTED_ANSWER
        chunks = list(client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20,
                                                     stream=True, extra_body=extra))
        streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        assert streamed == expected
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == SCRIPTED_ANSWER


def test_thinking_budget_in_the_python_api(thinker):
    llm, _ = thinker
    (out,) = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=20, max_reasoning_tokens=1), use_tqdm=False)
    first = llm.tokenizer.encode(SCRIPTED_REASONING, add_special_tokens=False)[:1]
    assert out.reasoning == llm.tokenizer.decode(first)
    assert out.outputs[0].text.strip() == SCRIPTED_ANSWER


def test_constraint_starts_after_the_thinking_part(thinker):
    """Thinking on: the reasoning is free (the scripted model's own), the answer follows the choice."""
    _, client = thinker
    out = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=30,
                                         extra_body={"guided_choice": ["yes", "no"]})
    message = out.choices[0].message
    assert message.reasoning_content.strip() == SCRIPTED_REASONING
    assert message.content in ("yes", "no")


def test_server_reasoning_budget_flag(thinking_dense_dir, tmp_path_factory, pangu_tokenizer):
    with running_server(thinking_dense_dir, "--reasoning-budget", "1", "--kv-cache-memory", "8MiB",
                        log_dir=tmp_path_factory.mktemp("budget_flag")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        first = pangu_tokenizer.decode(pangu_tokenizer.encode(SCRIPTED_REASONING, add_special_tokens=False)[:1])
        out = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=20)
        assert out.choices[0].message.reasoning_content == first
        out = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=20,
                                             extra_body={"max_reasoning_tokens": 50})
        assert out.choices[0].message.reasoning_content.strip() == SCRIPTED_REASONING


SPEC_SCHEMA = {
    "type": "array", "minItems": 3, "maxItems": 3,
    "items": {"type": "object", "properties": {"name": {"enum": ["alpha", "beta"]}, "count": {"enum": [1, 2, 3]}},
              "required": ["name", "count"], "additionalProperties": False},
}


@pytest.mark.parametrize("speculation", ["prompt lookup", "draft model"])
def test_constrained_requests_take_speculative_drafts_and_keep_their_tokens(tiny_dense_dir, speculation):
    """A JSON schema whose output repeats its keys: drafts (prompt lookup, or a draft model equal to
    the target) are cut to what the grammar allows and verified under its masks, so the greedy tokens
    are those of decoding without drafts, drafts are accepted, and seeded sampled replies are
    valid and also those of decoding without drafts (spec_decode.verify_seeded, under the masks)."""
    kw = dict(dtype="float32", kv_cache_memory=16 << 20, enforce_eager=True)
    spec_kw = {"num_speculative_tokens": 4}
    if speculation == "draft model":
        spec_kw["speculative_model"] = str(tiny_dense_dir)
    plain, spec = LLM(str(tiny_dense_dir), **kw), LLM(str(tiny_dense_dir), **kw, **spec_kw)
    constrained = StructuredOutputsParams(json=SPEC_SCHEMA)
    greedy = SamplingParams(temperature=0, max_tokens=200, structured_outputs=constrained)
    prompts = ["List three items.", "Again:"]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    got = spec.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    for o in got:
        jsonschema.validate(json.loads(o.outputs[0].text), SPEC_SCHEMA)
    stats = spec.engine.stats()
    assert stats["spec_accepted_tokens"] > 0, stats
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=200, n=3, structured_outputs=constrained)
    accepted = stats["spec_accepted_tokens"]
    replies = spec.generate(prompts[:1], sampled, use_tqdm=False)[0].outputs
    for c in replies:
        jsonschema.validate(json.loads(c.text), SPEC_SCHEMA)
    assert [c.token_ids for c in replies] == [c.token_ids for c in plain.generate(prompts[:1], sampled, use_tqdm=False)[0].outputs]
    assert spec.engine.stats()["spec_accepted_tokens"] > accepted


# Compiles (the check at admission sees the path it forces token by token branch at once), but every
# reply dead-ends: the object's one required property is a string whose pattern matches no text.
DEAD_END = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}


@pytest.mark.parametrize("speculation", [None, "prompt lookup", "draft model"])
def test_a_grammar_that_dead_ends_ends_its_request_alone_naming_its_field(tiny_dense_dir, speculation):
    """Its grammar allows no token after `{"a": "`: that request ends with finish_reason "error", the
    message and field of a client's error (not "failed inside the engine"), and the request beside
    it in the same steps gets the tokens it gets alone; with drafts (prompt lookup, or a draft
    model equal to the target whose drafts run into the dead end) as well."""
    kw = dict(dtype="float32", kv_cache_memory=16 << 20, enforce_eager=True)
    spec_kw = {} if speculation is None else {"num_speculative_tokens": 4}
    if speculation == "draft model":
        spec_kw["speculative_model"] = str(tiny_dense_dir)
    llm = LLM(str(tiny_dense_dir), **kw, **spec_kw)
    good = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=SPEC_SCHEMA))
    alone = llm.generate(["List three items."], good, use_tqdm=False)[0].outputs[0].token_ids
    dead = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=DEAD_END))
    # (the prompt holds the dead end's prefix, for prompt lookup's drafts)
    bad, ok = llm.generate(['{"a": "{"a": "{"a": "', "List three items."], [dead, good], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error"
    assert bad.error_param == "structured_outputs.json", bad.error
    assert bad.error.startswith("structured_outputs.json allows no next token after the "), bad.error
    assert bad.outputs[0].text == '{"a": "'
    assert ok.error is None and ok.outputs[0].token_ids == alone
    if speculation is not None:
        assert llm.engine.stats()["spec_accepted_tokens"] > 0
