"""The OpenAI-compatible server: a real `pangu-infer serve` process driven by the official openai client."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from fastapi.testclient import TestClient

from fixtures_server import SCRIPTED_ANSWER, SCRIPTED_REASONING, ScriptedEngine, metric_value, running_server, sdk_client, serving
from pangu_infer import LLM
from pangu_infer.chat import render_chat
from pangu_infer.loader.random import random_state_dict, transformers_llama
from pangu_infer.server.app import create_app

API_KEY = "test-key"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the weather in the city"}]


@pytest.fixture(scope="module")
def server(tiny_dense_dir, tmp_path_factory):
    # A short context keeps fuzzed max_tokens values fast; a small pool keeps /metrics numbers readable.
    with running_server(
        tiny_dense_dir, "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--served-model-name", "tiny-pangu",
        api_key=API_KEY, log_dir=tmp_path_factory.mktemp("server_logs"),
    ) as s:
        s.model = "tiny-pangu"
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **server.headers, **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


# ---------------------------------------------------------------------- basics
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-pangu"]
    assert models[0].object == "model"


def test_models_retrieve_names_the_served_model(client):
    card = client.models.retrieve("tiny-pangu")
    assert card.id == "tiny-pangu" and card.object == "model"
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError, match="org/other"):
        client.models.retrieve("org/other")


def test_tokenize_and_detokenize_as_vllm_names_them(server, client, pangu_tokenizer):
    text = "the weather in the city 我们今天"
    plain = _post(server, "/tokenize", {"model": "tiny-pangu", "prompt": text, "return_token_strs": True}).json()
    assert plain["tokens"] == pangu_tokenizer.encode(text) and plain["count"] == len(plain["tokens"])
    assert plain["max_model_len"] == 256 and len(plain["token_strs"]) == plain["count"]
    bare = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == pangu_tokenizer.encode(text, add_special_tokens=False)
    chat = _post(server, "/tokenize", {"model": "tiny-pangu", "messages": MESSAGES}).json()
    used = client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == used
    back = _post(server, "/detokenize", {"model": "tiny-pangu", "tokens": plain["tokens"]}).json()
    assert back["prompt"] == pangu_tokenizer.decode(plain["tokens"], skip_special_tokens=False)
    for path, body, needle in [
        ("/detokenize", {"tokens": [5, 10**6]}, "1000000"),
        ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, "exactly one"),
        ("/tokenize", {}, "exactly one"),
        ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, "gpt-4"),
    ]:
        response = _post(server, path, body)
        assert 400 <= response.status_code < 500 and needle in response.json()["error"]["message"], response.text
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}).status_code == 401  # the key, as on /v1
    info = httpx.get(f"{server.url}/tokenizer_info", headers=server.headers).json()
    assert info["eos_token"] == pangu_tokenizer.eos_token and info["bos_token"] == pangu_tokenizer.bos_token
    assert info["chat_template"] == pangu_tokenizer.chat_template and info["model_max_length"] == 256


def test_continue_final_message_goes_on_writing_the_assistants_text(server, client, pangu_tokenizer):
    partial = MESSAGES + [{"role": "assistant", "content": "The weather in the city is"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    rendered = render_chat(pangu_tokenizer, partial, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("The weather in the city is")
    out = client.chat.completions.create(model="tiny-pangu", messages=partial, max_tokens=4, temperature=0, extra_body=extra)
    assert out.usage.prompt_tokens == len(pangu_tokenizer.encode(rendered))
    # the same prompt as a plain completion of the rendered text: the same continuation
    plain = client.completions.create(model="tiny-pangu", prompt=pangu_tokenizer.encode(rendered), max_tokens=4, temperature=0)
    assert out.choices[0].message.content == plain.choices[0].text
    counted = _post(server, "/tokenize", {"messages": partial, **extra}).json()["count"]
    assert counted == out.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        client.chat.completions.create(model="tiny-pangu", messages=partial, max_tokens=4, extra_body={"continue_final_message": True})


def test_health_version_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert "pangu_kv_cache_blocks_total" in _metrics(server)


# ---------------------------------------------------------------------- chat
def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=16)
    # The prompt's blocks in the prefix cache first, so both replies count the same cached tokens
    # (whether an earlier test on this worker's server sent MESSAGES depends on the test order).
    client.chat.completions.create(**kwargs)
    whole = client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_usage_counts_the_rendered_prompt(client, pangu_tokenizer):
    out = client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=5)
    prompt_ids = pangu_tokenizer.encode(render_chat(pangu_tokenizer, MESSAGES), add_special_tokens=False)
    assert out.usage.prompt_tokens in (len(prompt_ids), len(prompt_ids) + 1)  # + BOS when the template adds none
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_enable_thinking_false_appends_no_think(client):
    base = dict(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=1)
    slow = client.chat.completions.create(**base)
    fast = client.chat.completions.create(**base, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert fast.usage.prompt_tokens > slow.usage.prompt_tokens  # " /no_think" was added to the user turn


def test_reasoning_effort_none_turns_thinking_off_as_enable_thinking_false(server, client, pangu_tokenizer):
    base = dict(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=1)
    no_think = render_chat(pangu_tokenizer, MESSAGES, enable_thinking=False)
    for effort, rendered in (("none", no_think), ("minimal", no_think), ("high", render_chat(pangu_tokenizer, MESSAGES))):
        out = client.chat.completions.create(**base, reasoning_effort=effort)
        assert out.usage.prompt_tokens == len(pangu_tokenizer.encode(rendered)), effort
    clash = _post(server, "/v1/chat/completions", {**base, "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "reasoning_effort"
    assert _post(server, "/v1/chat/completions", {**base, "reasoning_effort": "max"}).status_code == 400
    effortless = client.responses.create(model="tiny-pangu", input=MESSAGES[1]["content"], instructions=MESSAGES[0]["content"],
                                         max_output_tokens=1, reasoning={"effort": "none"})
    assert effortless.usage.input_tokens == len(pangu_tokenizer.encode(no_think))


def test_chat_accepts_list_of_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "tell me about"}, {"type": "text", "text": "the city"}]}]
    joined = [{"role": "user", "content": "tell me about\nthe city"}]
    a = client.chat.completions.create(model="tiny-pangu", messages=parts, temperature=0, max_tokens=6)
    b = client.chat.completions.create(model="tiny-pangu", messages=joined, temperature=0, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_n_2_with_seed_is_repeatable(client):
    kwargs = dict(model="tiny-pangu", messages=MESSAGES, temperature=1.0, max_tokens=6, n=2, seed=7)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content
    assert first.usage.completion_tokens == 12
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in (0, 1)]
    assert texts == [c.message.content for c in first.choices]


def test_chat_logprobs_have_one_entry_per_token(client):
    out = client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the best


def test_stop_string_ends_the_reply_before_it(client):
    kwargs = dict(model="tiny-pangu", prompt="the quick brown fox", temperature=0, max_tokens=24)
    full = client.completions.create(**kwargs).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    cut = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_logit_bias_and_allowed_token_ids_steer_the_reply(client, pangu_tokenizer):
    a, b = [i for i in range(300, pangu_tokenizer.vocab_size) if pangu_tokenizer.decode([i]).strip().isalpha()][:2]
    kwargs = dict(model="tiny-pangu", prompt="hello world", temperature=0, max_tokens=4)

    def words(token: int, n: int = 4) -> list[str]:  # a continuation keeps the space a lone decode drops
        return pangu_tokenizer.decode([token] * n).split()

    def text(**extra) -> list[str]:
        return client.completions.create(**kwargs, **extra).choices[0].text.split()

    assert text(logit_bias={str(a): 100}) == words(a)
    # Between two allowed tokens, banning either leaves the other: whichever greedy preferred, one
    # of the two cases only holds if -100 bans.
    assert text(extra_body={"allowed_token_ids": [a, b]}, logit_bias={str(a): -100}) == words(b)
    assert text(extra_body={"allowed_token_ids": [a, b]}, logit_bias={str(b): -100}) == words(a)
    sampled = client.completions.create(**{**kwargs, "temperature": 1.5, "n": 4, "seed": 3}, extra_body={"allowed_token_ids": [b]})
    assert [c.text.split() for c in sampled.choices] == [words(b)] * 4
    chat = client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=3, logit_bias={str(b): 100})
    assert chat.choices[0].message.content.split() == words(b, 3)


def test_truncate_prompt_tokens_counts_and_echoes_the_kept_tokens(client, pangu_tokenizer):
    ids = [1] + list(range(40, 75))
    kwargs = dict(model="tiny-pangu", prompt=ids, temperature=0, max_tokens=3)
    cut = client.completions.create(**kwargs, echo=True, logprobs=0, extra_body={"truncate_prompt_tokens": 10})
    alone = client.completions.create(**{**kwargs, "prompt": ids[-10:]}, echo=True, logprobs=0)
    assert cut.usage.prompt_tokens == 10 and cut.choices[0].text == alone.choices[0].text
    assert cut.choices[0].text.startswith(pangu_tokenizer.decode(ids[-10:], skip_special_tokens=False))
    assert cut.choices[0].logprobs.token_logprobs == alone.choices[0].logprobs.token_logprobs
    long_chat = [{"role": "user", "content": "weather " * 400}]  # past the 256-token context
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny-pangu", messages=long_chat, max_tokens=2)
    fit = client.chat.completions.create(model="tiny-pangu", messages=long_chat, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert fit.usage.prompt_tokens == 256 - 2
    streamed = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True},
                                              extra_body={"truncate_prompt_tokens": 10}))
    assert streamed[-1].usage.prompt_tokens == 10


# ---------------------------------------------------------------------- completions
def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model="tiny-pangu", prompt="hello world", temperature=0, max_tokens=12)
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion"
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 12


def test_completion_prompt_forms_agree(client, pangu_tokenizer):
    ids = pangu_tokenizer.encode("hello world")
    kwargs = dict(model="tiny-pangu", temperature=0, max_tokens=6)
    by_text = client.completions.create(prompt="hello world", **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    several = client.completions.create(prompt=["hello world", "我们今天"], n=2, **kwargs)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == by_text.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + len(pangu_tokenizer.encode("我们今天"))


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny-pangu", prompt="hello", temperature=0, max_tokens=5, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text


def test_echo_scores_the_prompt_as_lm_eval_harness_asks(client, tiny_dense_config, pangu_tokenizer):
    """lm-evaluation-harness's loglikelihood request (token-id prompts, echo, logprobs=1,
    max_tokens=1): the prompt's logprobs are transformers' on the same weights."""
    reference = transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))
    prompts = [[1, 5, 9, 200, 17, 33, 8], [1] + list(range(40, 75))]
    out = client.completions.create(model="tiny-pangu", prompt=prompts, temperature=0, max_tokens=1, logprobs=1, echo=True, seed=1234)
    for ids, choice in zip(prompts, out.choices):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), want, atol=0.1)  # bf16 serving or fp32
        assert choice.text.startswith(pangu_tokenizer.decode(ids, skip_special_tokens=False))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert out.usage.completion_tokens == 2


def test_echo_with_max_tokens_0_returns_the_prompt_alone_streamed_or_not(client):
    kwargs = dict(model="tiny-pangu", prompt="the weather in the city", max_tokens=0, echo=True, logprobs=2)
    whole = client.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.text == "the weather in the city" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 0 and len(choice.logprobs.tokens) == whole.usage.prompt_tokens
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == choice.logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(**{**kwargs, "echo": False})


def test_streamed_echo_matches_the_whole_reply(client):
    kwargs = dict(model="tiny-pangu", prompt=["hello world", "我们今天"], temperature=0, max_tokens=5, echo=True, logprobs=1)
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text.startswith("hello world") and whole.choices[1].text.startswith("我们今天")
    chunks = list(client.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert sum((c.logprobs.tokens for c in mine), []) == choice.logprobs.tokens
        assert sum((c.logprobs.text_offset for c in mine), []) == choice.logprobs.text_offset


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", "{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", "[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "wizard"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny-pangu"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "n": 0}, 400, "n"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "top_logprobs": 2}, 400, "logprobs"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "max_tokens": 1000}, 400, "context"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "response_format": {"type": "xml"}}, 400, "xml"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "logit_bias": {"5": 500}}, 400, "logit_bias[5]=500"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "logit_bias": {"the": 5}}, 400, "logit_bias has the key 'the'"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "logit_bias": {"100000": 5}}, 400, "logit_bias holds the token id 100000, outside the vocabulary"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "allowed_token_ids": [3, 100000]}, 400, "allowed_token_ids holds 100000"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": "maybe"}}, 400, "enable_thinking"),
        ("/v1/chat/completions", {"model": "tiny-pangu", "messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, 400, "messages"),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, 404, "gpt-4"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": []}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": [5, 100000]}, 400, "vocabulary"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "n": 1000}, 400, "n=1000"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "stop": [""]}, 400, "stop"),
        ("/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "seed": 2**70}, 400, "seed"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "nope"),
    ],
)
def test_user_mistakes_are_4xx_in_openai_shape(server, path, body, status, needle):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]


def test_unknown_route_is_404_in_openai_shape(server):
    response = httpx.get(f"{server.url}/v1/engines", headers=server.headers)
    assert response.status_code == 404 and "error" in response.json()


def test_api_key_is_required_on_v1(server):
    body = {"model": "tiny-pangu", "prompt": "hi", "max_tokens": 1}
    missing = httpx.post(f"{server.url}/v1/completions", json=body)
    wrong = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_openai_client_raises_bad_request_for_a_bad_parameter(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, top_p=7)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)


# ---------------------------------------------------------------------- metrics and disconnects
def test_cache_salt_keeps_prefix_cache_blocks_to_requests_with_the_same_salt(server, client):
    """vLLM's cache_salt through the openai client: a prompt cached under one salt is computed again
    under another, and found again under its own (usage.prompt_tokens_details.cached_tokens, OpenAI's
    field, counts them, in chat and streamed chat too); an empty salt is a 400 naming the field."""
    ids = list(range(100, 150))  # three full blocks of 16

    def hits_after(salt: str) -> float:
        before = metric_value(_metrics(server), "pangu_prefix_cache_hits_total")
        out = client.completions.create(model="tiny-pangu", prompt=ids, max_tokens=1, extra_body={"cache_salt": salt})
        hits = metric_value(_metrics(server), "pangu_prefix_cache_hits_total") - before
        assert out.usage.prompt_tokens_details.cached_tokens == hits  # OpenAI's usage field says the same
        return hits

    assert hits_after("secret-a") == 0
    assert hits_after("secret-b") == 0
    assert hits_after("secret-a") == 48
    chat = {"model": "tiny-pangu", "messages": [{"role": "user", "content": "the same long question " * 6}], "max_tokens": 1}
    client.chat.completions.create(**chat)
    again = client.chat.completions.create(**chat)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    streamed = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = _post(server, path, {"model": "tiny-pangu", "max_tokens": 1, "cache_salt": "", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_metrics_counters_move(server, client):
    before = _metrics(server)
    client.completions.create(model="tiny-pangu", prompt="hello", temperature=0, max_tokens=4)
    _post(server, "/v1/completions", {"model": "tiny-pangu", "prompt": "hi", "top_p": 9})
    after = _metrics(server)

    def delta(name: str, **labels: str) -> float:
        def value(text: str) -> float:
            try:
                return metric_value(text, name, **labels)
            except KeyError:
                return 0.0
        return value(after) - value(before)

    assert delta("pangu_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("pangu_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("pangu_generation_tokens_total") == 4
    assert delta("pangu_prompt_tokens_total") > 0
    assert delta("pangu_time_to_first_token_seconds_count") == 1
    assert delta("pangu_request_finish_total", finish_reason="length") == 1
    assert metric_value(after, "pangu_kv_cache_blocks_used") == 0
    assert 0 <= metric_value(after, "pangu_prefix_cache_hit_rate") <= 1


def _wait_for_idle_kv(server, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(server)
        if metric_value(text, "pangu_kv_cache_blocks_used") == 0 and metric_value(text, "pangu_running_sequences") == 0:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use after {timeout} s:\n{text}")
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_and_frees_kv(server, stream):
    body = {"model": "tiny-pangu", "prompt": "hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=60, headers=server.headers) as http:
        if stream:
            with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
            # leaving the block closed the connection mid-stream
        else:
            # 32 sequences of 240 tokens: far longer than the client waits, however fast the machine.
            body.update(prompt=["hello"] * 8, n=4)
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    before_abort = time.monotonic()
    text = _wait_for_idle_kv(server)
    assert time.monotonic() - before_abort < 20
    assert metric_value(text, "pangu_request_finish_total", finish_reason="abort") >= 1


def test_moge_metrics_show_tokens_per_group_and_zero_imbalance(tiny_moge_dir):
    llm = LLM(str(tiny_moge_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with TestClient(create_app(llm, served_model_name="moge")) as http:
        assert http.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4, "temperature": 0}).status_code == 200
        text = http.get("/metrics").text
    groups = [metric_value(text, "pangu_moge_group_tokens_total", layer="0", group=str(g)) for g in range(8)]
    assert groups[0] > 0 and len(set(groups)) == 1  # one expert per group: every group gets every token
    assert metric_value(text, "pangu_moge_imbalance_score", devices="8") == 0
    assert metric_value(text, "pangu_moge_global_topk_imbalance_score", devices="8") > 0


# ---------------------------------------------------------------------- fuzzing the OpenAPI schema
FUZZ_EXAMPLES_PER_OPERATION = 8


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server):
    # Driven through hypothesis directly: schemathesis' own pytest plugin does not load under pytest 9.
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers)  # the docs need the key too
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/tokenize", "/detokenize"}
    seen: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            response = case.call(base_url=server.url, headers=server.headers, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:500]}"

        no_server_error()
    assert len(seen) >= len(operations)
    assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen)


# ---------------------------------------------------------------------- reasoning (a tiny model that thinks)
# In-process (same app, real engine, HTTP through TestClient): a second server process would cost
# another ~10 s of imports on this machine.
@pytest.fixture(scope="module")
def thinking_client(thinking_dense_dir):
    llm = LLM(str(thinking_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with TestClient(create_app(llm, served_model_name="thinker")) as http:
        yield sdk_client(http)


def test_reasoning_goes_to_reasoning_content_never_content(thinking_client):
    out = thinking_client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20)
    message = out.choices[0].message
    assert message.reasoning_content.strip() == SCRIPTED_REASONING
    assert message.reasoning == message.reasoning_content  # (vLLM's name now, beside the older one)
    assert message.content.strip() == SCRIPTED_ANSWER
    assert out.choices[0].finish_reason == "stop"


def test_streamed_reasoning_matches_non_streamed(thinking_client):
    chunks = list(thinking_client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning.strip() == SCRIPTED_REASONING and content.strip() == SCRIPTED_ANSWER
    # each delta under both names (vLLM's `reasoning` now, the older `reasoning_content`)
    assert all(getattr(d, "reasoning", None) == getattr(d, "reasoning_content", None) for d in deltas)
    # all reasoning arrives before any content
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas if getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, reverse=True)


def test_auto_think_reaches_the_prompt_through_the_release_template_and_reasoning_is_split(thinking_client, pangu_tokenizer):
    """openPangu-Embedded-7B-V1.1's adaptive thinking, end to end on the release's chat template
    (the tiny tokenizer carries it): `enable_thinking: "auto"` puts " /auto_think" at the end of
    the user turn, and the reply's [unused16]...[unused17] part still goes to reasoning_content."""
    auto = render_chat(pangu_tokenizer, MESSAGES, enable_thinking="auto")
    assert "[unused9]用户：tell me about the weather in the city /auto_think[unused10][unused9]助手：" in auto
    out = thinking_client.chat.completions.create(
        model="thinker", messages=MESSAGES, temperature=0, max_tokens=20, extra_body={"chat_template_kwargs": {"enable_thinking": "auto"}}
    )
    plain = thinking_client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=20)
    assert out.usage.prompt_tokens == len(pangu_tokenizer.encode(auto)) > plain.usage.prompt_tokens
    assert out.choices[0].message.reasoning_content.strip() == SCRIPTED_REASONING
    assert out.choices[0].message.content.strip() == SCRIPTED_ANSWER


def test_completions_endpoint_hides_the_markers(thinking_client):
    out = thinking_client.completions.create(model="thinker", prompt="tell me about the city", temperature=0, max_tokens=20)
    assert "[unused" not in out.choices[0].text and SCRIPTED_ANSWER in out.choices[0].text


# ---------------------------------------------------------------------- tool calls (scripted engine)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_REPLY = '[unused16]the user wants weather[unused17]Let me check.[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]'


@pytest.fixture(scope="module")
def tool_server(tiny_dense_dir, pangu_tokenizer):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    engine = ScriptedEngine(pangu_tokenizer, TOOL_REPLY)
    with TestClient(create_app(llm, served_model_name="tools", engine=engine)) as http:
        yield sdk_client(http), engine


def test_tool_call_output_becomes_tool_calls(tool_server):
    client, _ = tool_server
    out = client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.reasoning_content == "the user wants weather"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_calls_match_non_streamed(tool_server):
    client, _ = tool_server
    chunks = list(client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_markers_stay_in_the_content(tool_server):
    # (as special tokens they leave the text unless skip_special_tokens is false: tests/test_server_vllm_fields.py)
    client, _ = tool_server
    out = client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                         extra_body={"skip_special_tokens": False})
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert '[unused11][{"name": "get_weather"' in out.choices[0].message.content


def test_tools_and_tool_turns_are_rendered_into_the_prompt(tool_server, pangu_tokenizer):
    client, engine = tool_server
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model="tools", messages=history, tools=TOOLS)
    prompt = pangu_tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt  # the tool spec, in the system turn
    assert "[unused9]工具：sunny[unused10]" in prompt
    assert '[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]' in prompt


# ---------------------------------------------------------------------- the Responses API
RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "description": "weather of a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_responses_stream_and_whole_agree_through_the_sdks_accumulator(tool_server):
    """Reasoning, text and a function call as output items; streamed, the openai SDK's own
    accumulator (responses.stream) rebuilds the same response from the events."""
    client, _ = tool_server
    whole = client.responses.create(model="tools", input="weather in Paris?", tools=RESPONSE_TOOLS, instructions="be brief")
    assert whole.status == "completed" and whole.object == "response"
    assert [item.type for item in whole.output] == ["reasoning", "message", "function_call"]
    assert whole.output[0].content[0].text == "the user wants weather"
    assert whole.output_text == "Let me check."
    call = whole.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    with client.responses.stream(model="tools", input="weather in Paris?", tools=RESPONSE_TOOLS, instructions="be brief") as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [item.type for item in streamed.output] == ["reasoning", "message", "function_call"]
    assert streamed.output_text == whole.output_text and streamed.output[2].arguments == call.arguments
    assert streamed.usage.output_tokens == whole.usage.output_tokens > streamed.usage.output_tokens_details.reasoning_tokens > 0


def test_responses_continue_a_conversation_with_tool_results(tool_server, pangu_tokenizer):
    client, engine = tool_server
    first = client.responses.create(model="tools", input="weather in Paris?", tools=RESPONSE_TOOLS)
    call = first.output[-1]
    client.responses.create(model="tools", previous_response_id=first.id, tools=RESPONSE_TOOLS,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    prompt = pangu_tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)
    assert "[unused9]用户：weather in Paris?" in prompt  # the first turn, from the stored response
    assert '[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]' in prompt
    assert "[unused9]工具：sunny[unused10]" in prompt
    # the same conversation sent as items, without the store
    client.responses.create(model="tools", tools=RESPONSE_TOOLS, store=False, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert pangu_tokenizer.decode(engine.prompts[-1], skip_special_tokens=False).endswith(prompt[prompt.index("[unused9]用户"):])
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(model="tools", previous_response_id=first.id, input=[
        {"role": "user", "content": "and in Rome?"},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    items = client.responses.input_items.list(second.id)  # this request's own input, newest first
    assert [item.type for item in items.data] == ["function_call_output", "message"]
    assert items.data[1].content[0].text == "and in Rome?" and items.data[0].output == "sunny"
    oldest = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert [item.id for item in oldest.data] == [items.data[1].id] and oldest.has_more
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError, match=first.id):
        client.responses.create(model="tools", previous_response_id=first.id, input="again")


def test_responses_on_a_real_engine_match_chat_completions(client):
    kwargs = dict(model="tiny-pangu", temperature=0, max_output_tokens=6)
    out = client.responses.create(input=MESSAGES[1]["content"], instructions=MESSAGES[0]["content"], **kwargs)
    chat = client.chat.completions.create(model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=6)
    assert out.output_text == chat.choices[0].message.content
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == 6
    events = list(client.responses.create(input=MESSAGES[1]["content"], instructions=MESSAGES[0]["content"], stream=True, **kwargs))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == out.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with_lp = client.responses.create(input="hello", top_logprobs=2, **kwargs)
    logprobs = with_lp.output[0].content[0].logprobs
    assert len(logprobs) == 6 and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    streamed = list(client.responses.create(input="hello", top_logprobs=2, stream=True, **kwargs))[-1].response
    assert [lp.logprob for lp in streamed.output[0].content[0].logprobs] == [lp.logprob for lp in logprobs]
    # OpenAI's include asks for them too (no top_logprobs: none of the top ones); streamed the same
    included = client.responses.create(input="hello", include=["message.output_text.logprobs"], **kwargs)
    assert [lp.logprob for lp in included.output[0].content[0].logprobs] == [lp.logprob for lp in logprobs]
    assert all(lp.top_logprobs == [] for lp in included.output[0].content[0].logprobs)
    streamed = list(client.responses.create(input="hello", include=["message.output_text.logprobs"], stream=True, **kwargs))
    assert [lp.logprob for lp in streamed[-1].response.output[0].content[0].logprobs] == [lp.logprob for lp in logprobs]
    assert client.responses.create(input="hello", include=["reasoning.encrypted_content"], **kwargs).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="hello", include=["reasoning.encrypted_content", "message.output_text.nope"], **kwargs)
    assert info.value.body["param"] == "include[1]" and "message.output_text.logprobs" in info.value.body["message"]


def test_responses_truncation_auto_drops_the_oldest_turns_to_fit(client, pangu_tokenizer):
    long = "the weather in the city today " * 12  # about 90 tokens a turn; the context is 256
    kwargs = dict(model="tiny-pangu", temperature=0, max_output_tokens=8, instructions="be brief")
    first = client.responses.create(input=long, **kwargs)
    second = client.responses.create(input=long + "again", previous_response_id=first.id, **kwargs)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.responses.create(input=long + "and again", previous_response_id=second.id, **kwargs)
    fitted = client.responses.create(input=long + "and again", previous_response_id=second.id, truncation="auto", **kwargs)
    assert fitted.truncation == "auto" and fitted.usage.input_tokens + 8 <= 256
    # what was kept: the latest turns, whole, after the instructions
    kept = client.responses.create(input=long + "and again", previous_response_id=second.id, **{**kwargs, "max_output_tokens": 1},
                                   truncation="auto")
    assert kept.usage.input_tokens >= fitted.usage.input_tokens  # less room for the reply: never fewer turns
    alone = client.responses.create(input=long + "and again", **kwargs)
    assert alone.usage.input_tokens < fitted.usage.input_tokens  # more than the last turn was kept


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"input": [{"type": "web_search_call"}]}, 400, "web_search_call"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "function tools"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, 400, "xml"),
        ({"input": "hi", "reasoning": {"effort": "maximal"}}, 400, "maximal"),
        ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "resp_nope"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, 400, "wizard"),
        ({"input": "hi", "temperature": -1}, 400, "temperature"),
        ({"input": "hi", "truncation": "middle"}, 400, "truncation"),
        ({"input": "hi", "max_output_tokens": 10**6}, 400, "context"),
        ({"input": [{"role": ["user"], "content": "hi"}]}, 400, "['user']"),
        ({"input": "hi", "text": {"format": ["json_schema"]}}, 400, "text.format"),
        ({"input": "hi", "tool_choice": {"type": "function"}}, 400, "tool_choice"),
        ({"input": [{"type": "function_call", "call_id": 5, "name": "f", "arguments": "{}"}]}, 400, "call_id"),
    ],
)
def test_responses_mistakes_are_4xx_naming_them(server, body, status, needle):
    response = _post(server, "/v1/responses", {"model": "tiny-pangu", **body})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


# ---------------------------------------------------------------------- Anthropic's Messages API
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "weather of a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture
def anthropic_tools(tool_server):
    import anthropic

    openai_client, engine = tool_server
    return anthropic.Anthropic(base_url="http://testserver", api_key="unused", http_client=openai_client._client, max_retries=0), engine


def test_messages_stream_and_whole_agree_through_the_anthropic_sdk(anthropic_tools):
    """Thinking, text and a tool_use block; streamed, the anthropic SDK's own accumulator
    (messages.stream(...).get_final_message()) rebuilds the same message from the events."""
    client, _ = anthropic_tools
    kwargs = dict(model="tools", max_tokens=100, system="be brief", tools=ANTHROPIC_TOOLS,
                  messages=[{"role": "user", "content": "weather in Paris?"}])
    whole = client.messages.create(**kwargs)
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
    assert whole.content[0].thinking == "the user wants weather" and whole.content[1].text == "Let me check."
    assert whole.content[2].name == "get_weather" and whole.content[2].input == {"city": "Paris"}
    assert whole.stop_reason == "tool_use" and whole.usage.output_tokens > 0
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in streamed.content] == ["thinking", "text", "tool_use"]
    assert streamed.content[1].text == whole.content[1].text and streamed.content[2].input == whole.content[2].input
    assert streamed.stop_reason == "tool_use" and streamed.usage.output_tokens == whole.usage.output_tokens


def test_messages_tool_results_render_as_tool_turns(anthropic_tools, pangu_tokenizer):
    client, engine = anthropic_tools
    client.messages.create(model="tools", max_tokens=50, tools=ANTHROPIC_TOOLS, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    prompt = pangu_tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)
    assert 'Let me check.[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]' in prompt
    assert prompt.endswith("[unused9]工具：sunny[unused10][unused9]助手：")


def test_messages_on_a_real_engine_match_chat_completions(server, pangu_tokenizer):
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    greedy = {"extra_body": {"temperature": 0}}  # this SDK no longer sends temperature itself; older ones and raw clients do
    out = client.messages.create(model="tiny-pangu", max_tokens=6, system=MESSAGES[0]["content"], **greedy,
                                 messages=[{"role": "user", "content": MESSAGES[1]["content"]}])
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
        model="tiny-pangu", messages=MESSAGES, temperature=0, max_tokens=6)
    assert out.content[0].text == chat.choices[0].message.content and out.stop_reason == "max_tokens"
    asked = dict(model="tiny-pangu", system=MESSAGES[0]["content"], messages=[{"role": "user", "content": MESSAGES[1]["content"]}])
    assert client.messages.count_tokens(**asked).input_tokens == out.usage.input_tokens
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
             for t in ANTHROPIC_TOOLS]
    with_tools = render_chat(pangu_tokenizer, MESSAGES, tools=tools)  # the tools' system text is counted too
    assert client.messages.count_tokens(**asked, tools=ANTHROPIC_TOOLS).input_tokens == len(pangu_tokenizer.encode(with_tools))
    assert out.usage.input_tokens == chat.usage.prompt_tokens and out.usage.output_tokens == 6
    stop = out.content[0].text[2:4]
    cut = client.messages.create(model="tiny-pangu", max_tokens=6, stop_sequences=[stop], system=MESSAGES[0]["content"], **greedy,
                                 messages=[{"role": "user", "content": MESSAGES[1]["content"]}])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop and cut.content[0].text == out.content[0].text[:2]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    shaped = client.messages.create(model="tiny-pangu", max_tokens=20, thinking={"type": "disabled"}, **greedy,
                                    output_config={"format": {"type": "json_schema", "schema": schema}},
                                    messages=[{"role": "user", "content": "answer"}])
    assert json.loads(shaped.content[0].text) in ({"ok": True}, {"ok": False}) and shaped.stop_reason == "end_turn"
    auto = client.messages.create(model="tiny-pangu", max_tokens=1, thinking={"type": "adaptive"}, system=MESSAGES[0]["content"],
                                  messages=[{"role": "user", "content": MESSAGES[1]["content"]}])
    assert auto.usage.input_tokens == len(pangu_tokenizer.encode(render_chat(pangu_tokenizer, MESSAGES, enable_thinking="auto")))
    no_think = client.messages.create(model="tiny-pangu", max_tokens=1, thinking={"type": "disabled"},
                                      messages=[{"role": "user", "content": MESSAGES[1]["content"]}], system=MESSAGES[0]["content"])
    assert no_think.usage.input_tokens == len(pangu_tokenizer.encode(render_chat(pangu_tokenizer, MESSAGES, enable_thinking=False)))
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="nope", max_retries=0).messages.create(
            model="tiny-pangu", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    # the key as the header Anthropic's API documents (this SDK version sends a bearer token instead)
    body = {"model": "tiny-pangu", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    for key, status in ((API_KEY, 200), ("nope", 401)):
        assert httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": key}, timeout=60).status_code == status
    for body, needle in [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"messages": [{"role": "system", "content": "x"}]}, "system"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 0}}, "budget_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ]:
        response = _post(server, "/v1/messages", {"model": "tiny-pangu", "max_tokens": 4, **body})
        assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text


@pytest.fixture
def taken_port(monkeypatch):
    """A loopback port something listens on, which fixtures_server._free_port hands out first (as
    when another test worker bound the port it had also probed), then free ports as before."""
    import fixtures_server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = fixtures_server._free_port
    ports = iter([port])
    monkeypatch.setattr(fixtures_server, "_free_port", lambda: next(ports, None) or real())
    try:
        yield port
    finally:
        taken.close()


def test_the_test_server_takes_another_port_when_one_is_taken_before_it_binds(tiny_dense_dir, tmp_path, taken_port):
    """Two test workers can probe the same free port: the server that loses the bind ("address
    already in use") is started again on another port instead of failing the test."""
    with running_server(tiny_dense_dir, "--max-model-len", "64", "--kv-cache-memory", "4MiB", log_dir=tmp_path) as s:
        assert s.url != f"http://127.0.0.1:{taken_port}"
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    assert any("address already in use" in p.read_text().lower() for p in tmp_path.glob("server-*.log"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread that lost the port
def test_an_app_served_in_a_thread_takes_another_port_when_one_is_taken(taken_port):
    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    with serving(app) as url:
        assert url != f"http://127.0.0.1:{taken_port}"
        assert httpx.get(url, timeout=10).text == "ok"


def test_the_response_store_keeps_the_newest_within_its_count_and_bytes():
    from pangu_infer.server.errors import APIError
    from pangu_infer.server.response_store import ResponseStore

    store = ResponseStore(capacity=3, max_bytes=2000)
    for i in range(4):
        assert store.put({"id": f"r{i}"}, [{"role": "user", "content": "x" * 100}])
    with pytest.raises(APIError, match="r0"):
        store.get("r0")  # over the count: the oldest went
    assert store.get("r3")[0] == {"id": "r3"}
    assert store.put({"id": "big"}, [{"role": "user", "content": "y" * 1700}])
    assert [k for k in ("r1", "r2", "r3", "big") if _stored(store, k)] == ["r3", "big"]  # over the bytes
    assert not store.put({"id": "huge"}, [{"role": "user", "content": "z" * 5000}]) and not _stored(store, "huge")
    store.delete("big")
    assert store.bytes == sum(len(json.dumps(part)) for part in (*store.get("r3"), []))  # response, messages, input items


def _stored(store, key: str) -> bool:
    from pangu_infer.server.errors import APIError

    try:
        store.get(key)
        return True
    except APIError:
        return False


def test_allowed_origins_are_checked_before_the_model_loads():
    from pangu_infer.server.cli import allowed_origins

    assert allowed_origins("") == []
    assert allowed_origins("http://localhost:5173, https://chat.example.org/,*") == ["http://localhost:5173", "https://chat.example.org", "*"]
    for bad in ("chat.example.org", "ftp://x", "https://x/app", "http://"):
        with pytest.raises(ValueError, match="is not an origin"):
            allowed_origins(bad)
