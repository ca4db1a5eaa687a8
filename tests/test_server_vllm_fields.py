"""vLLM's request fields on /v1/completions and /v1/chat/completions: prompt_logprobs,
return_tokens_as_token_ids and skip_special_tokens, driven by the openai client (extra_body) against
an in-process app over the tiny Pangu model. Prompt logprobs are checked against transformers'
LlamaForCausalLM on the same weights and against the engine's own LLM.generate."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from fastapi.testclient import TestClient

from fixtures_server import ScriptedEngine, sdk_client
from pangu_infer import LLM, SamplingParams
from pangu_infer.loader.random import random_state_dict, transformers_llama
from pangu_infer.server.app import create_app
from pangu_infer.server.chat_api import SpecialTokenFilter

MESSAGES = [{"role": "user", "content": "tell me about the weather in the city"}]
PROMPTS = [[1, 5, 9, 200, 17, 33, 8, 412, 77], [1] + list(range(40, 60))]
SPECIAL = 16  # [unused13]: a special token that is no marker of the reasoning / tool parsers
PLAIN = 500  # an ordinary token


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def reference(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


def _reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _check_prompt_logprobs(got, ids, k, reference, engine_entries, tokenizer):
    """vLLM's shape with transformers' values: null first, then {id: {logprob, rank, decoded_token}}
    holding the prompt token first and the top k ranked 1..k (the prompt token's rank: its true
    rank in the vocabulary); and exactly the engine's own numbers."""
    ref = _reference_logprobs(reference, ids)
    assert len(got) == len(ids) and got[0] is None and engine_entries[0] is None
    for p in range(1, len(ids)):
        row, token, position = ref[p - 1], ids[p], got[p]
        top_values, top_ids = row.topk(k)
        top_ids = top_ids.tolist()
        assert list(position) == [str(token)] + [str(t) for t in top_ids if t != token]
        assert abs(position[str(token)]["logprob"] - row[token].item()) <= 1e-4
        true_rank = int((row >= row[token]).sum())
        assert position[str(token)]["rank"] == true_rank
        for rank, (t, v) in enumerate(zip(top_ids, top_values.tolist()), 1):
            assert position[str(t)]["rank"] == rank and abs(position[str(t)]["logprob"] - v) <= 1e-4
        for t, entry in position.items():
            assert entry["decoded_token"] == tokenizer.decode([int(t)], skip_special_tokens=False)
        mine = engine_entries[p]  # LLM.generate(..., SamplingParams(prompt_logprobs=k))
        assert mine.token_id == token and position[str(token)]["logprob"] == pytest.approx(mine.logprob, abs=1e-6)
        top = {int(t): e["logprob"] for t, e in position.items() if int(t) != token or e["rank"] <= k}
        assert top == pytest.approx(dict(mine.top), abs=1e-6)


# ---------------------------------------------------------------------- prompt_logprobs
def test_completion_prompt_logprobs_are_vllms_shape_with_transformers_values(client, llm, reference, pangu_tokenizer):
    k = 3
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=2, temperature=0, n=2, extra_body={"prompt_logprobs": k})
    assert len(out.choices) == 4
    engine = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)
    for choice in out.choices:
        p = choice.index // 2
        _check_prompt_logprobs(choice.prompt_logprobs, PROMPTS[p], k, reference, engine[p].prompt_logprobs, pangu_tokenizer)
    # with k=0 every position holds the prompt token alone, with its rank
    zero = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1, extra_body={"prompt_logprobs": 0})
    lps = zero.choices[0].prompt_logprobs
    assert [list(pos) for pos in lps[1:]] == [[str(t)] for t in PROMPTS[0][1:]]
    ref = _reference_logprobs(reference, PROMPTS[0])
    assert [pos[str(t)]["logprob"] for pos, t in zip(lps[1:], PROMPTS[0][1:])] == pytest.approx(
        ref[torch.arange(len(PROMPTS[0]) - 1), torch.tensor(PROMPTS[0][1:])].tolist(), abs=1e-4)
    # not asked: no field
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1)
    assert "prompt_logprobs" not in plain.choices[0].model_dump()


def test_echo_with_logprobs_carries_prompt_logprobs_as_vllm_does(client, reference, llm, pangu_tokenizer):
    ids = PROMPTS[0]
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                       extra_body={"prompt_logprobs": 4})
    choice = echoed.choices[0]
    engine = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=4), use_tqdm=False)[0]
    _check_prompt_logprobs(choice.prompt_logprobs, ids, 4, reference, engine.prompt_logprobs, pangu_tokenizer)
    # the echoed prompt's legacy logprobs keep logprobs=1 alternatives although the engine scored 4
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
    assert choice.logprobs.token_logprobs[1:len(ids)] == [choice.prompt_logprobs[p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    # echo with logprobs alone scores the prompt with logprobs alternatives, and says so (vLLM's choice)
    alone = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2).choices[0]
    assert all(len(pos) in (2, 3) for pos in alone.prompt_logprobs[1:])


def test_chat_prompt_logprobs_are_top_level_and_equal_the_rendered_prompts(client, http, reference, pangu_tokenizer):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2})
    ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert len(out.prompt_logprobs) == out.usage.prompt_tokens == len(ids)
    same = client.completions.create(model="tiny", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
    assert out.prompt_logprobs == same.choices[0].prompt_logprobs
    ref = _reference_logprobs(reference, ids)
    got = [pos[str(t)]["logprob"] for pos, t in zip(out.prompt_logprobs[1:], ids[1:])]
    assert got == pytest.approx(ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist(), abs=1e-4)
    assert "prompt_logprobs" not in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).model_dump()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("extra", "needle"), [
    ({"prompt_logprobs": 1, "stream": True}, "stream"),
    ({"prompt_logprobs": 0, "stream": True}, "stream"),
    ({"prompt_logprobs": -1}, "-1"),
    ({"prompt_logprobs": 21}, "21"),
    ({"prompt_logprobs": "many"}, "many"),
    ({"return_tokens_as_token_ids": "perhaps"}, "perhaps"),
    ({"skip_special_tokens": "perhaps"}, "perhaps"),
    ({"skip_special_tokens": None}, "null"),
])
def test_bad_values_are_a_400_naming_the_field_and_value(http, path, extra, needle):
    body = {"model": "tiny", "max_tokens": 2, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": MESSAGES}), **extra}
    response = http.post(path, json=body)
    field = next(k for k in extra if k != "stream")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and needle in error["message"], error


@pytest.mark.parametrize(("path", "field", "value", "needle"), [
    ("/v1/completions", "spaces_between_special_tokens", "yes", "yes"),
    ("/v1/chat/completions", "spaces_between_special_tokens", None, "null"),
    ("/v1/chat/completions", "include_reasoning", "no", "no"),
    ("/v1/chat/completions", "include_reasoning", 0, "0"),
    ("/v1/chat/completions", "echo", 1, "1"),
    ("/v1/completions", "include_reasoning", False, "include_reasoning"),  # (chat's field only, as vLLM's)
])
def test_bad_new_fields_are_a_400_naming_the_field(http, path, field, value, needle):
    body = {"model": "tiny", "max_tokens": 2, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": MESSAGES}), field: value}
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and needle in error["message"], error


# ---------------------------------------------------------------------- return_tokens_as_token_ids
def _ids(tokens: list[str]) -> list[int]:
    assert all(re.fullmatch(r"token_id:\d+", t) for t in tokens), tokens
    return [int(t.split(":")[1]) for t in tokens]


def _warm(create, **kwargs) -> None:
    """One request of the prompt first: its first request computes the prompt whole, later ones read its
    full blocks from the prefix cache and compute the rest (the attention summed in another order: fp32
    logprobs differ in their last bits), so the requests compared next are both of the latter kind."""
    create(**kwargs)


def test_completion_tokens_as_token_ids(client, pangu_tokenizer):
    kwargs = dict(model="tiny", prompt="the weather in the city", max_tokens=6, temperature=0, logprobs=2)
    _warm(client.completions.create, **kwargs)
    plain = client.completions.create(**kwargs).choices[0]
    as_ids = client.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    ids = _ids(as_ids.logprobs.tokens)
    assert [pangu_tokenizer.decode([t], skip_special_tokens=False) for t in ids] == plain.logprobs.tokens
    assert as_ids.logprobs.token_logprobs == plain.logprobs.token_logprobs
    assert as_ids.logprobs.text_offset == plain.logprobs.text_offset  # offsets into the text, as before
    for top, plain_top in zip(as_ids.logprobs.top_logprobs, plain.logprobs.top_logprobs):
        named = {pangu_tokenizer.decode([t], skip_special_tokens=False): v for t, v in zip(_ids(list(top)), top.values())}
        assert named == plain_top
    streamed = list(client.completions.create(**kwargs, stream=True, extra_body={"return_tokens_as_token_ids": True}))
    assert sum((c.choices[0].logprobs.tokens for c in streamed), []) == as_ids.logprobs.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in streamed), []) == as_ids.logprobs.text_offset
    # echo: the prompt's tokens too, its first one included
    echoed = client.completions.create(**{**kwargs, "prompt": PROMPTS[0]}, echo=True, extra_body={"return_tokens_as_token_ids": True})
    assert _ids(echoed.choices[0].logprobs.tokens)[: len(PROMPTS[0])] == PROMPTS[0]


def test_chat_tokens_as_token_ids(client, pangu_tokenizer):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    _warm(client.chat.completions.create, **kwargs)
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    as_ids = client.chat.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.content
    ids = _ids([e.token for e in as_ids])
    assert [pangu_tokenizer.decode([t], skip_special_tokens=False) for t in ids] == [e.token for e in plain]
    assert all(e.bytes == list(e.token.encode()) for e in as_ids)
    for mine, theirs in zip(as_ids, plain):
        tops = _ids([t.token for t in mine.top_logprobs])
        assert [pangu_tokenizer.decode([t], skip_special_tokens=False) for t in tops] == [t.token for t in theirs.top_logprobs]
        assert [t.logprob for t in mine.top_logprobs] == [t.logprob for t in theirs.top_logprobs]
    chunks = list(client.chat.completions.create(**kwargs, stream=True, extra_body={"return_tokens_as_token_ids": True}))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in as_ids]


# ---------------------------------------------------------------------- skip_special_tokens
MIXED = dict(max_tokens=16, temperature=1.0, seed=1, logprobs=0, extra_body={"allowed_token_ids": [SPECIAL, PLAIN], "return_tokens_as_token_ids": True})


def _mixed_ids(tokens: list[str]) -> list[int]:
    ids = _ids(tokens)
    assert SPECIAL in ids and PLAIN in ids, f"the seed must draw both tokens: {ids}"
    return ids


@pytest.mark.parametrize("skip", [None, True, False])
def test_completion_skip_special_tokens(client, pangu_tokenizer, skip):
    extra = {**MIXED["extra_body"], **({} if skip is None else {"skip_special_tokens": skip})}
    kwargs = dict(model="tiny", prompt="the weather", **{**MIXED, "extra_body": extra})
    choice = client.completions.create(**kwargs).choices[0]
    ids = _mixed_ids(choice.logprobs.tokens)
    keep = skip is False
    assert choice.text == pangu_tokenizer.decode(ids, skip_special_tokens=not keep)
    assert ("[unused13]" in choice.text) == keep
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text


@pytest.mark.parametrize("skip", [None, True, False])
def test_chat_skip_special_tokens_with_the_real_engine(client, http, skip):
    """Chat drops special tokens from the text after parsing; a completion of the same prompt ids
    with the same seed draws the same tokens and drops them in the engine's detokenizer: the same text."""
    extra = {**MIXED["extra_body"], **({} if skip is None else {"skip_special_tokens": skip})}
    kwargs = dict(model="tiny", **{**MIXED, "extra_body": extra})
    choice = client.chat.completions.create(messages=MESSAGES, **{**kwargs, "logprobs": True}).choices[0]
    ids = _mixed_ids([e.token for e in choice.logprobs.content])
    prompt = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    completion = client.completions.create(prompt=prompt, **kwargs).choices[0]
    assert _ids(completion.logprobs.tokens) == ids
    assert choice.message.content == completion.text
    assert ("[unused13]" in choice.message.content) == (skip is False)
    chunks = list(client.chat.completions.create(messages=MESSAGES, **{**kwargs, "logprobs": False}, stream=True))  # chat's is a boolean
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


SCRIPTED = ('[unused16]the [unused13]user wants[unused0] weather[unused17]Let me[unused13] check.'
            '[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def scripted_http(llm, pangu_tokenizer):
    engine = ScriptedEngine(pangu_tokenizer, SCRIPTED)
    with TestClient(create_app(llm, served_model_name="tools", engine=engine)) as http:
        yield http


@pytest.fixture(scope="module")
def scripted(scripted_http):
    return sdk_client(scripted_http)


@pytest.mark.parametrize("skip", [None, True, False])
def test_chat_skip_special_tokens_after_the_parsers(scripted, skip):
    """The reasoning and tool-call markers are read whatever the field says; the other special
    tokens leave reasoning and content unless skip_special_tokens is false, streamed or not."""
    kwargs = dict(model="tools", messages=MESSAGES, tools=TOOLS, extra_body={} if skip is None else {"skip_special_tokens": skip})
    message = scripted.chat.completions.create(**kwargs).choices[0].message
    if skip is False:
        assert message.reasoning_content == "the [unused13]user wants[unused0] weather"
        assert message.content == "Let me[unused13] check."
    else:
        assert message.reasoning_content == "the user wants weather" and message.content == "Let me check."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(scripted.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    assert [tc.function.name for d in deltas for tc in (d.tool_calls or [])] == ["get_weather"]
    # without tools the tool markers are special tokens like any other
    bare = scripted.chat.completions.create(model="tools", messages=MESSAGES, **({} if skip is None else {"extra_body": {"skip_special_tokens": skip}}))
    assert ("[unused11]" in bare.choices[0].message.content) == (skip is False)
    assert '[{"name": "get_weather"' in bare.choices[0].message.content


def test_special_token_filter_streamed_in_any_pieces_equals_the_whole(pangu_tokenizer):
    texts = {i: pangu_tokenizer.decode([i], skip_special_tokens=False) for i in pangu_tokenizer.all_special_ids}
    text = "a[unused1][unused13]b[unus[unused10]ed1]</s>c<s"
    everything = SpecialTokenFilter(texts)
    everything.saw(texts)  # the reply generated every special token
    whole = everything.remove(text)
    assert whole == "ab[unused1]c<s"
    for size in range(1, 8):
        stream = SpecialTokenFilter(texts)
        stream.saw(texts)
        pieces = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
        assert "".join(pieces) == whole, size


def test_special_token_text_written_as_ordinary_tokens_stays(pangu_tokenizer):
    """As vLLM skips by id: HTML's <s> written by the model as text is not a bos token."""
    texts = {i: pangu_tokenizer.decode([i], skip_special_tokens=False) for i in pangu_tokenizer.all_special_ids}
    bos = pangu_tokenizer.bos_token_id
    reply = "Use <s>old</s> text"
    quiet = SpecialTokenFilter(texts)
    ordinary = [t for piece in ("Use ", "<", "s", ">old", "</", "s", "> text") for t in pangu_tokenizer.encode(piece, add_special_tokens=False)]
    assert not set(ordinary) & set(texts)  # the characters, as ordinary tokens
    quiet.saw(ordinary)
    assert quiet.remove(reply) == reply
    loud = SpecialTokenFilter(texts)
    loud.saw([bos])
    assert loud.remove(reply) == reply.replace(texts[bos], "")


# ---------------------------------------------------------------------- stream_options.continuous_usage_stats
def _events(http, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed reply, as sent (a field absent stays absent)."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _body(path: str, **fields) -> dict:
    prompt = {"prompt": "the weather in the city"} if path == "/v1/completions" else {"messages": MESSAGES}
    return {"model": "tiny", "max_tokens": 5, "temperature": 1.0, "seed": 3, "stream": True, **prompt, **fields}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_puts_running_counts_on_every_chunk(http, path):
    """vLLM's: every chunk's usage holds the prompt's tokens and its own choice's tokens so far
    (counted here from its logprobs, one entry per token); the last chunk, of include_usage, still
    carries the whole request's usage with its details."""
    chat = path == "/v1/chat/completions"
    body = _body(path, n=2, logprobs=True if chat else 0, stream_options={"include_usage": True, "continuous_usage_stats": True})
    events = _events(http, path, body)
    prompt = body["messages"] if chat else body["prompt"]
    prompt_tokens = http.post("/tokenize", json={"messages": prompt} if chat else {"prompt": prompt}).json()["count"]
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == prompt_tokens
    seen = {0: 0, 1: 0}
    for c in chunks:
        (choice,) = c["choices"]
        lps = choice["logprobs"]
        seen[choice["index"]] += len(lps["content"] if chat else lps["tokens"]) if lps else 0
        assert c["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": seen[choice["index"]],
                              "total_tokens": prompt_tokens + seen[choice["index"]]}, c
    assert seen[0] and seen[1]
    assert last["usage"]["completion_tokens"] == seen[0] + seen[1] == 10
    assert last["usage"]["total_tokens"] == prompt_tokens + 10 and "prompt_tokens_details" in last["usage"]
    if chat:  # the role chunks first, before any token
        assert [c["usage"]["completion_tokens"] for c in chunks[:2]] == [0, 0]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("options", "final", "every"), [
    ({"continuous_usage_stats": True}, True, True),  # include_usage omitted: on with it (vLLM's default is true)
    ({"include_usage": False, "continuous_usage_stats": True}, False, False),  # vLLM: no usage at all
    ({"include_usage": True, "continuous_usage_stats": False}, True, False),
    ({"include_usage": True}, True, False),
    ({}, False, False),  # OpenAI's default, as before
])
def test_continuous_usage_stats_with_and_without_include_usage(http, path, options, final, every):
    *chunks, last = _events(http, path, _body(path, stream_options=options))
    if final:
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    else:
        chunks.append(last)
        assert all(c["choices"] for c in chunks)
    if every:
        assert all(c["usage"]["prompt_tokens"] > 0 for c in chunks)
    elif final:
        assert all(c["usage"] is None for c in chunks)  # OpenAI's null on the others
    else:
        assert all("usage" not in c for c in chunks)


def test_continuous_usage_stats_with_the_sdk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks) and chunks[-1].usage.completion_tokens == 4
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("options", "field", "needle"), [
    ({"continuous_usage_stats": "yes"}, "stream_options.continuous_usage_stats", "yes"),
    ({"continuous_usage_stats": None}, "stream_options.continuous_usage_stats", "null"),
    ({"continuous_usage_statistics": True}, "stream_options.continuous_usage_statistics", "continuous_usage_statistics"),
])
def test_bad_stream_options_are_a_400_naming_them(http, path, options, field, needle):
    response = http.post(path, json=_body(path, stream_options=options))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and needle in error["message"], error
    # and without stream, as before
    response = http.post(path, json={**_body(path, stream_options={"continuous_usage_stats": True}), "stream": False})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


# ---------------------------------------------------------------------- return_token_ids
def _decoded(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text of `ids` written after `prompt` (a SentencePiece word's leading space is kept there)."""
    head, whole = (tokenizer.decode(t, skip_special_tokens=True) for t in (prompt, prompt + ids))
    assert whole.startswith(head)
    return whole[len(head):]


def test_the_servers_flag_names_tokens_by_id_unless_a_request_says_otherwise(llm, client, pangu_tokenizer):
    # vLLM's --return-tokens-as-token-ids: the default of every request's return_tokens_as_token_ids
    from pangu_infer.server.cli import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--return-tokens-as-token-ids"]).return_tokens_as_token_ids
    assert not parser.parse_args([]).return_tokens_as_token_ids
    chat = dict(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    completion = dict(model="tiny", prompt="the weather in the city", max_tokens=4, temperature=0, logprobs=1)
    plain_chat = [e.token for e in client.chat.completions.create(**chat).choices[0].logprobs.content]
    plain_completion = client.completions.create(**completion).choices[0].logprobs.tokens
    with TestClient(create_app(llm, served_model_name="tiny", return_tokens_as_token_ids=True)) as http:
        by_id = sdk_client(http)
        named = [e.token for e in by_id.chat.completions.create(**chat).choices[0].logprobs.content]
        assert [pangu_tokenizer.decode([t], skip_special_tokens=False) for t in _ids(named)] == plain_chat
        assert _ids(by_id.completions.create(**completion).choices[0].logprobs.tokens)
        asked_text = by_id.completions.create(**completion, extra_body={"return_tokens_as_token_ids": False})
        assert asked_text.choices[0].logprobs.tokens == plain_completion


def test_completion_return_token_ids(client, http, pangu_tokenizer):
    """vLLM's places: each choice its prompt's ids (what /tokenize gives for the prompt) and its
    generated ids, which decode to its text; n > 1 and several prompts each get their own."""
    prompts = ["the weather in the city", "tell me"]
    kwargs = dict(model="tiny", prompt=prompts, max_tokens=6, temperature=1.0, seed=5, n=2)
    out = client.completions.create(**kwargs, extra_body={"return_token_ids": True})
    assert len(out.choices) == 4
    for choice in out.choices:
        assert choice.prompt_token_ids == http.post("/tokenize", json={"prompt": prompts[choice.index // 2]}).json()["tokens"]
        assert choice.token_ids and _decoded(pangu_tokenizer, choice.prompt_token_ids, choice.token_ids) == choice.text
    assert sum(len(c.token_ids) for c in out.choices) == out.usage.completion_tokens
    assert out.usage.prompt_tokens == sum(len(c.prompt_token_ids) for c in out.choices[::2])
    assert len({tuple(c.token_ids) for c in out.choices}) > 1  # each choice its own
    # the same ids with the ids named in logprobs (return_tokens_as_token_ids), and the same text without the field
    named = client.completions.create(**kwargs, logprobs=0, extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    assert [_ids(c.logprobs.tokens) for c in named.choices] == [c.token_ids for c in out.choices]
    for off in (client.completions.create(**kwargs), client.completions.create(**kwargs, extra_body={"return_token_ids": False})):
        assert [c.text for c in off.choices] == [c.text for c in out.choices]
        assert all("token_ids" not in c.model_dump() and "prompt_token_ids" not in c.model_dump() for c in off.choices)


def test_completion_return_token_ids_with_echo_and_truncation(client, http, pangu_tokenizer):
    """echo puts the prompt's text before the reply, as without the field (vLLM's intent: the
    prompt's ids stay in prompt_token_ids, token_ids hold the generated ones only); max_tokens 0
    generates none; a truncated prompt's ids are those it ran with."""
    prompt = "the weather in the city"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True, extra_body={"return_token_ids": True})
    choice = client.completions.create(**kwargs).choices[0]
    assert choice.prompt_token_ids == ids
    assert choice.text == prompt + _decoded(pangu_tokenizer, ids, choice.token_ids) and len(choice.token_ids) == 5
    assert choice.text == client.completions.create(**{**kwargs, "extra_body": {}}).choices[0].text
    only = client.completions.create(**{**kwargs, "max_tokens": 0}).choices[0]
    assert only.text == prompt and only.prompt_token_ids == ids and only.token_ids == []
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body={"return_token_ids": True, "truncate_prompt_tokens": 3})
    assert cut.choices[0].prompt_token_ids == ids[-3:] and cut.usage.prompt_tokens == 3


def test_completion_return_token_ids_streamed(http, pangu_tokenizer):
    """Streamed (vLLM's): a choice's first chunk carries its prompt's ids, every chunk the ids it
    adds; joined they are the unstreamed reply's, and the echoed prompt's chunk adds none."""
    body = {"model": "tiny", "prompt": ["the weather in the city", "tell me"], "max_tokens": 6, "temperature": 0, "n": 2,
            "return_token_ids": True}
    whole = http.post("/v1/completions", json=body).json()["choices"]
    for echo in (False, True):
        chunks = [c["choices"][0] for c in _events(http, "/v1/completions", {**body, "stream": True, "echo": echo})]
        for want in whole:
            mine = [c for c in chunks if c["index"] == want["index"]]
            assert mine[0]["prompt_token_ids"] == want["prompt_token_ids"]
            assert all("prompt_token_ids" not in c for c in mine[1:])
            assert sum((c["token_ids"] for c in mine), []) == want["token_ids"]
            text = "".join(c["text"] for c in mine)
            assert text == (body["prompt"][want["index"] // 2] if echo else "") + want["text"]
            if echo:
                assert mine[0]["token_ids"] == [] and mine[0]["text"] == body["prompt"][want["index"] // 2]
    plain = _events(http, "/v1/completions", {**body, "stream": True, "return_token_ids": False})
    assert all("token_ids" not in c["choices"][0] and "prompt_token_ids" not in c["choices"][0] for c in plain)


def test_chat_return_token_ids(client, http, pangu_tokenizer):
    """Chat (vLLM's places): the prompt's ids on the response, as /tokenize renders the messages;
    each choice's generated ids, which decode to its content."""
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=11, n=2)
    out = client.chat.completions.create(**kwargs, extra_body={"return_token_ids": True})
    assert out.prompt_token_ids == http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)
    for choice in out.choices:
        assert choice.token_ids and _decoded(pangu_tokenizer, out.prompt_token_ids, choice.token_ids) == choice.message.content
    assert sum(len(c.token_ids) for c in out.choices) == out.usage.completion_tokens
    named = client.chat.completions.create(**kwargs, logprobs=True, extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    assert [_ids([e.token for e in c.logprobs.content]) for c in named.choices] == [c.token_ids for c in out.choices]
    off = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in off.choices] == [c.message.content for c in out.choices]
    assert "prompt_token_ids" not in off.model_dump() and all("token_ids" not in c.model_dump() for c in off.choices)
    # truncated: the ids it ran with
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4})
    assert cut.prompt_token_ids == out.prompt_token_ids[-4:]


def test_chat_return_token_ids_streamed(http):
    """Streamed (vLLM's): each choice's first chunk (the role's) carries the prompt's ids at the
    top, every later chunk its choice's new ids; joined they are the unstreamed reply's."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "n": 2, "return_token_ids": True}
    whole = http.post("/v1/chat/completions", json=body).json()
    chunks = _events(http, "/v1/chat/completions", {**body, "stream": True})
    for want in whole["choices"]:
        mine = [c for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert mine[0]["prompt_token_ids"] == whole["prompt_token_ids"] and mine[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "token_ids" not in mine[0]["choices"][0] and all("prompt_token_ids" not in c for c in mine[1:])
        assert sum((c["choices"][0]["token_ids"] for c in mine[1:]), []) == want["token_ids"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in mine) == want["message"]["content"]


def test_chat_return_token_ids_hold_the_parsed_markers(scripted, pangu_tokenizer):
    """The generated ids are all the reply's, the reasoning and tool-call markers and the special
    tokens skip_special_tokens takes out of the text included (vLLM's output.token_ids); streamed,
    ids whose text the parsers hold back still come, on chunks of their own."""
    reply = pangu_tokenizer.encode(SCRIPTED, add_special_tokens=False)
    kwargs = dict(model="tools", messages=MESSAGES, tools=TOOLS, extra_body={"return_token_ids": True})
    out = scripted.chat.completions.create(**kwargs)
    assert out.choices[0].token_ids == reply and out.choices[0].message.tool_calls
    chunks = list(scripted.chat.completions.create(**kwargs, stream=True))
    assert sum((c.choices[0].token_ids for c in chunks[1:]), []) == reply
    assert chunks[0].prompt_token_ids == out.prompt_token_ids


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value", ["yes", 1])
def test_bad_return_token_ids_is_a_400(http, path, value):
    response = http.post(path, json={**_body(path), "stream": False, "return_token_ids": value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "return_token_ids" and str(value) in response.json()["error"]["message"]


# ---------------------------------------------------------------------- request_id, add_special_tokens
@pytest.mark.parametrize(("path", "prefix"), [("/v1/completions", "cmpl"), ("/v1/chat/completions", "chatcmpl")])
def test_request_id_names_the_reply(http, path, prefix):
    """vLLM's: the reply's id (every streamed chunk's too) is the endpoint's prefix and the
    request's request_id; two requests may send the same one, at the same time, and both run."""
    body = {**_body(path, stream=False, temperature=0, max_tokens=4), "request_id": "trace-42"}
    with http.stream("POST", path, json={**body, "stream": True}) as first:
        lines = first.iter_lines()
        opening = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
        second = http.post(path, json=body)  # while the first runs
        rest = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    assert second.status_code == 200 and second.json()["id"] == f"{prefix}-trace-42"
    assert {c["id"] for c in [opening, *rest]} == {f"{prefix}-trace-42"}
    streamed = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or "" for c in [opening, *rest])
    whole = second.json()["choices"][0]
    assert streamed == (whole["text"] if prefix == "cmpl" else whole["message"]["content"])  # (greedy: the same reply)
    plain = http.post(path, json=_body(path, stream=False, max_tokens=1)).json()["id"]
    assert re.fullmatch(rf"{prefix}-[0-9a-f]{{32}}", plain)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("value", "needle"), [("", "at least 1"), ("x" * 257, "at most 256"), (42, "42")])
def test_bad_request_id_is_a_400(http, path, value, needle):
    response = http.post(path, json={**_body(path, stream=False), "request_id": value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "request_id" and needle in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_id_writes_no_lines_of_its_own_into_the_log(llm, pangu_tokenizer, path, caplog):
    """--enable-log-requests logs each request by the engine's id, which holds the request_id: a line
    break or another control character in it is logged escaped (a client must not add lines of its
    own to the server's log, nor clear an operator's terminal); the reply's id is the request_id as sent."""
    forged = "t1\nreceived request cmpl-forged: prompt 'x'\r\x1b[2J\u2028"
    caplog.set_level(logging.INFO)
    engine = ScriptedEngine(pangu_tokenizer, "hello")
    with TestClient(create_app(llm, served_model_name="tiny", engine=engine, enable_log_requests=True)) as http:
        r = http.post(path, json={**_body(path, stream=False), "request_id": forged})
    assert r.status_code == 200 and r.json()["id"].endswith("-" + forged), r.text
    logged = [record.getMessage() for record in caplog.records if "t1" in record.getMessage()]
    assert any(m.startswith("received request ") for m in logged) and any(m.startswith("finished request ") for m in logged)
    assert not [m for m in logged if any(not c.isprintable() for c in m)], logged
    assert all("t1\\nreceived request cmpl-forged: prompt 'x'\\r\\x1b[2J\\u2028" in m for m in logged), logged


def test_completion_add_special_tokens(client, http):
    """vLLM's (completions): false tokenizes a text prompt without BOS, as /tokenize does with the
    same field; the reply is the one to those ids. Token-id prompts are taken as they are."""
    prompt = "the weather in the city"
    with_bos = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    without = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()["tokens"]
    assert with_bos == [1] + without
    kwargs = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"return_token_ids": True})
    bare = client.completions.create(prompt=prompt, **{**kwargs, "extra_body": {**kwargs["extra_body"], "add_special_tokens": False}})
    assert bare.choices[0].prompt_token_ids == without and bare.usage.prompt_tokens == len(without)
    assert bare.choices[0].text == client.completions.create(prompt=without, **kwargs).choices[0].text
    default = client.completions.create(prompt=prompt, **kwargs)
    assert default.choices[0].prompt_token_ids == with_bos
    ids = client.completions.create(prompt=with_bos, **{**kwargs, "extra_body": {**kwargs["extra_body"], "add_special_tokens": False}})
    assert ids.choices[0].prompt_token_ids == with_bos
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "add_special_tokens": "no"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "add_special_tokens"
    # chat renders its own special tokens (the template's): the field is not taken there
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "add_special_tokens": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "add_special_tokens"


# ---------------------------------------------------------------------- include_reasoning
def _chat_events(http, body: dict) -> list[dict]:
    return [c for c in _events(http, "/v1/chat/completions", {**body, "stream": True}) if c["choices"]]


def test_include_reasoning_false_leaves_the_thinking_out(scripted_http, pangu_tokenizer):
    """vLLM's field (default true): false drops the thinking, under both names, from the message and
    from every streamed delta; the content and the tool calls are those of the reply with it, and the
    ids of the thinking's tokens still come (return_token_ids)."""
    body = {"model": "tools", "messages": MESSAGES, "tools": TOOLS, "return_token_ids": True}
    shown = scripted_http.post("/v1/chat/completions", json=body).json()["choices"][0]
    hidden = scripted_http.post("/v1/chat/completions", json={**body, "include_reasoning": False}).json()["choices"][0]
    assert shown["message"]["reasoning"] == shown["message"]["reasoning_content"] == "the user wants weather"
    assert "reasoning" not in hidden["message"] and "reasoning_content" not in hidden["message"]
    assert hidden["message"]["content"] == shown["message"]["content"] == "Let me check."
    assert hidden["message"]["tool_calls"][0]["function"] == shown["message"]["tool_calls"][0]["function"]
    assert hidden["token_ids"] == shown["token_ids"]

    def streamed(extra: dict) -> tuple[list[dict], list[int]]:
        chunks = _chat_events(scripted_http, {**body, **extra})
        return [c["choices"][0]["delta"] for c in chunks], sum((c["choices"][0].get("token_ids", []) for c in chunks), [])

    deltas, ids = streamed({"include_reasoning": False})
    assert not [d for d in deltas if "reasoning" in d or "reasoning_content" in d], deltas
    shown_deltas, shown_ids = streamed({})
    assert "".join(d.get("reasoning") or "" for d in shown_deltas) == "the user wants weather"
    assert "".join(d.get("content") or "" for d in deltas) == "".join(d.get("content") or "" for d in shown_deltas) == "Let me check."
    assert ids == shown_ids == pangu_tokenizer.encode(SCRIPTED, add_special_tokens=False)
    assert [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", [])] == ["get_weather"]


# ---------------------------------------------------------------------- chat echo
PARTIAL = [MESSAGES[0], {"role": "assistant", "content": "The weather in the city is"}]


def test_chat_echo_starts_the_reply_with_the_last_assistant_message(client, http):
    """vLLM's chat echo (serving_chat: the last message's content before the reply when its role is
    the reply's): continuing an assistant's turn, each choice's content is that turn's text followed
    by what the reply without echo says; streamed, the text comes in a chunk of its own after the
    role's, and nothing else changes (ids, usage)."""
    kwargs = dict(model="tiny", messages=PARTIAL, max_tokens=5, temperature=0, n=2,
                  extra_body={"add_generation_prompt": False, "continue_final_message": True})
    plain = client.chat.completions.create(**kwargs)
    echoed = client.chat.completions.create(**{**kwargs, "extra_body": {**kwargs["extra_body"], "echo": True}})
    assert [c.message.content for c in echoed.choices] == [PARTIAL[1]["content"] + c.message.content for c in plain.choices]
    assert echoed.usage == plain.usage
    body = {"model": "tiny", "messages": PARTIAL, "max_tokens": 5, "temperature": 0, "n": 2, "add_generation_prompt": False,
            "continue_final_message": True, "echo": True, "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    whole = http.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    chunks = _chat_events(http, body)
    for want in whole["choices"]:
        mine = [c for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert mine[0]["choices"][0]["delta"]["role"] == "assistant"
        assert mine[1]["choices"][0]["delta"] == {"content": PARTIAL[1]["content"]} and mine[1]["choices"][0]["token_ids"] == []
        assert mine[1]["usage"]["completion_tokens"] == 0
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in mine) == want["message"]["content"]
        assert sum((c["choices"][0]["token_ids"] for c in mine[1:]), []) == want["token_ids"]


def test_chat_echo_needs_the_last_message_to_be_the_replys_role(client):
    """The last message a user's (vLLM answers add_generation_prompt's reply as the assistant's):
    echo adds nothing. Text parts are echoed as they are rendered, joined by newlines."""
    kwargs = dict(model="tiny", max_tokens=4, temperature=0)
    plain = client.chat.completions.create(messages=MESSAGES, **kwargs).choices[0].message.content
    assert client.chat.completions.create(messages=MESSAGES, **kwargs, extra_body={"echo": True}).choices[0].message.content == plain
    parts = [MESSAGES[0], {"role": "assistant", "content": [{"type": "text", "text": "The weather"}, {"type": "text", "text": "is"}]}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    after = client.chat.completions.create(messages=parts, **kwargs, extra_body=extra).choices[0].message.content
    echoed = client.chat.completions.create(messages=parts, **kwargs, extra_body={**extra, "echo": True}).choices[0].message.content
    assert echoed == "The weather\nis" + after


# ---------------------------------------------------------------------- spaces_between_special_tokens
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_spaces_between_special_tokens_is_taken_and_changes_nothing(http, pangu_tokenizer, path):
    """The reply's text with special tokens kept is the same with either value (completions: the
    tokenizer's decode of its ids): this server's tokenizers never put spaces around special tokens,
    and the next test shows transformers' decode ignores the flag too."""
    chat = path == "/v1/chat/completions"
    base = {"model": "tiny", **{k: v for k, v in MIXED.items() if k != "extra_body"}, **MIXED["extra_body"], "skip_special_tokens": False,
            "return_token_ids": True, **({"messages": MESSAGES, "logprobs": False} if chat else {"prompt": "the weather"})}
    texts = []
    for spaces in (True, False):
        choice = http.post(path, json={**base, "spaces_between_special_tokens": spaces}).json()["choices"][0]
        assert SPECIAL in choice["token_ids"] and PLAIN in choice["token_ids"]
        texts.append(choice["message"]["content"] if chat else choice["text"])
        assert "[unused13]" in texts[-1]
        if not chat:  # (chat's first word keeps its space after the rendered prompt)
            assert texts[-1] == pangu_tokenizer.decode(choice["token_ids"], skip_special_tokens=False)
    assert texts[0] == texts[1]


def test_transformers_decode_ignores_spaces_between_special_tokens(pangu_tokenizer, pangu_tokenizer_dir, smollm2_gguf_path):
    """transformers' decode with spaces_between_special_tokens true or false gives one text: for
    SmolLM2's GGUF tokenizer (tokenizers, as transformers builds it from the file) the text this
    server decodes; for the Pangu SentencePiece model (transformers' generic SentencePiece tokenizer,
    which keeps a word's dummy-prefix space after a special token where Pangu's own drops it) the same
    text with either value, as this server's."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from pangu_infer.loader.gguf import load_gguf_tokenizer, read_gguf

    ours = load_gguf_tokenizer(read_gguf(smollm2_gguf_path))
    reference = PreTrainedTokenizerFast(tokenizer_object=convert_gguf_tokenizer(*get_gguf_tokenizer(str(smollm2_gguf_path))[:2])[0])
    ids = ours.encode("<|im_start|>user\nhi<|im_end|><|im_start|><|im_end|>\n<|endoftext|>a<|endoftext|>", add_special_tokens=False)
    assert len(set(ids) & ours.all_special_ids) == 3
    for spaces in (True, False):
        assert reference.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == ours.decode(ids, skip_special_tokens=False)
    pangu = SentencePieceBackend.from_pretrained(str(pangu_tokenizer_dir))
    ids = pangu_tokenizer.encode("hello [unused13]world[unused0][unused1] the city</s>x[unused10]")
    texts = {pangu.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) for spaces in (True, False)}
    assert len(texts) == 1 and "[unused0][unused1]" in texts.pop()


# ---------------------------------------------------------------------- X-Request-Id
@pytest.mark.parametrize(("path", "prefix"), [("/v1/completions", "cmpl"), ("/v1/chat/completions", "chatcmpl")])
def test_x_request_id_header_names_the_reply(http, path, prefix):
    """vLLM's: a request's X-Request-Id header is its id (over a request_id in the body), in the
    reply's id and every streamed chunk's; without --enable-request-id-headers no header comes back."""
    body = _body(path, stream=False, max_tokens=2)
    r = http.post(path, json={**body, "request_id": "from-body"}, headers={"X-Request-Id": "from-header"})
    assert r.status_code == 200 and r.json()["id"] == f"{prefix}-from-header", r.text
    assert "x-request-id" not in r.headers
    with http.stream("POST", path, json={**body, "stream": True}, headers={"X-Request-Id": "trace"}) as response:
        ids = {json.loads(line[6:])["id"] for line in response.iter_lines() if line.startswith("data: {")}
    assert ids == {f"{prefix}-trace"}


@pytest.mark.parametrize(("value", "needle"), [("", "got 0"), ("x" * 257, "got 257")])
def test_bad_x_request_id_is_a_400_naming_the_header(http, value, needle):
    response = http.post("/v1/completions", json=_body("/v1/completions", stream=False), headers={"X-Request-Id": value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "X-Request-Id" and needle in error["message"], error


def test_enable_request_id_headers_echoes_the_header(llm, pangu_tokenizer):
    """--enable-request-id-headers (vLLM's): every response carries X-Request-Id, the request's own
    or a new one, errors and other endpoints included."""
    engine = ScriptedEngine(pangu_tokenizer, "hello")
    with TestClient(create_app(llm, served_model_name="tiny", engine=engine, enable_request_id_headers=True, api_key="k")) as http:
        auth = {"Authorization": "Bearer k"}
        ok = http.post("/v1/chat/completions", json=_body("/v1/chat/completions", stream=False), headers={**auth, "X-Request-Id": "t-1"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "t-1" and ok.json()["id"] == "chatcmpl-t-1"
        denied = http.post("/v1/completions", json=_body("/v1/completions"), headers={"X-Request-Id": "t-2"})
        assert denied.status_code == 401 and denied.headers["x-request-id"] == "t-2"
        fresh = [http.get("/health").headers["x-request-id"] for _ in range(2)]
        assert all(re.fullmatch(r"[0-9a-f]{32}", f) for f in fresh) and fresh[0] != fresh[1]


# ---------------------------------------------------------------------- truncation_side
def test_truncation_side_picks_the_end_truncate_prompt_tokens_keeps(client, http):
    """vLLM's truncation_side (with truncate_prompt_tokens k): right keeps the prompt's first k tokens,
    left (and no side, as before) its last k; the reply is the one to those ids."""
    prompt = "the weather in the city today"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(ids) > 4
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    for side, kept in ((None, ids[-4:]), ("left", ids[-4:]), ("right", ids[:4])):
        extra = {"return_token_ids": True, "truncate_prompt_tokens": 4, **({} if side is None else {"truncation_side": side})}
        choice = client.completions.create(**kwargs, extra_body=extra).choices[0]
        assert choice.prompt_token_ids == kept, side
        assert choice.text == client.completions.create(**{**kwargs, "prompt": kept}).choices[0].text
    assert client.completions.create(**kwargs, extra_body={"truncation_side": "right"}).choices[0].text == \
        client.completions.create(**kwargs).choices[0].text  # (no truncate_prompt_tokens: nothing is cut, as vLLM)
    rendered = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,
                                          extra_body={"return_token_ids": True, "truncate_prompt_tokens": 5, "truncation_side": "right"})
    assert chat.prompt_token_ids == rendered[:5]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
@pytest.mark.parametrize("value", ["middle", 1])
def test_bad_truncation_side_is_a_400(http, path, value):
    body = {"input": "a"} if path == "/v1/embeddings" else _body(path, stream=False)
    response = http.post(path, json={**body, "truncate_prompt_tokens": 2, "truncation_side": value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "truncation_side" and str(value) in error["message"], error
