"""Embeddings: LLM.embed and POST /v1/embeddings. A text's embedding is the model's final hidden state
(after the final norm) pooled over the prompt, last token or mean, L2-normalized: checked against
transformers' LlamaModel.last_hidden_state on the same weights, for the tiny Pangu (safetensors) and
a tiny GGUF file; run through the engine beside generation requests (neither changes the other);
through the openai client in both encodings; and every bad input a 400 / ValueError naming it."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine, embedding_params
from pangu_infer.engine.sequence import Sequence
from pangu_infer.errors import RequestError
from pangu_infer.loader.random import random_state_dict, transformers_llama
from pangu_infer.outputs import EmbeddingRequestOutput
from pangu_infer.server.app import create_app

# Lengths around the prefill chunk (32 tokens a step below): one token, within one chunk, exactly
# two chunks, several chunks.
PROMPTS = [[1, 5, 9, 200, 17, 33, 8, 412, 77], [7], [1] + list(range(40, 103)), [3] + list(range(300, 400))]
MAX_STEPS = 500  # far more than any test here needs: a request that never ends fails, not hangs
TOL = 2e-5  # float32 throughout; the engine's chunked attention sums in another order than transformers'


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_num_batched_tokens=32,
               max_num_seqs=8)


@pytest.fixture(scope="module")
def reference(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


def expected(reference, ids: list[int], pooling: str) -> torch.Tensor:
    """transformers' final hidden states (after the model's norm) pooled and L2-normalized."""
    with torch.no_grad():
        hidden = reference.model(torch.tensor([ids])).last_hidden_state[0].float()
    pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
    return torch.nn.functional.normalize(pooled, dim=0)


def check_equal(got, want: torch.Tensor) -> None:
    got = torch.tensor(got, dtype=torch.float32)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def all_freed(engine: LLMEngine) -> bool:
    return not engine.requests and engine.pool.num_free_blocks == engine.pool.num_blocks


# ---------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_equals_transformers_last_hidden_state_pooled(llm, reference, pooling):
    outs = llm.embed([{"prompt_token_ids": ids} for ids in PROMPTS], pooling=pooling)
    assert [type(o) for o in outs] == [EmbeddingRequestOutput] * len(PROMPTS)
    for ids, out in zip(PROMPTS, outs):
        assert out.finished and out.prompt_token_ids == ids and out.error is None
        assert len(out.outputs.embedding) == llm.config.hidden_size
        assert abs(np.linalg.norm(out.outputs.embedding) - 1) < 1e-6
        check_equal(out.outputs.embedding, expected(reference, ids, pooling))
    assert all_freed(llm.engine)


def test_the_two_poolings_differ_and_text_prompts_are_tokenized_as_generate_does(llm, reference, pangu_tokenizer):
    text = "the weather in the city today"
    last, mean = llm.embed(text)[0], llm.embed([text], pooling="mean")[0]  # the LLM's pooling: last
    ids = pangu_tokenizer.encode(text)
    assert last.prompt_token_ids == mean.prompt_token_ids == ids and last.prompt == text
    check_equal(last.outputs.embedding, expected(reference, ids, "last"))
    check_equal(mean.outputs.embedding, expected(reference, ids, "mean"))
    assert not np.allclose(last.outputs.embedding, mean.outputs.embedding, atol=1e-3)


def test_last_pooling_served_by_the_prefix_cache_is_the_same(llm, reference):
    """Last pooling takes cached blocks (the last position is always computed); mean computes all."""
    ids = [1] + list(range(500, 560))
    llm.embed({"prompt_token_ids": ids})
    out = llm.embed({"prompt_token_ids": ids})[0]
    assert out.metrics["num_cached_tokens"] >= 48
    check_equal(out.outputs.embedding, expected(reference, ids, "last"))
    mean = llm.embed({"prompt_token_ids": ids}, pooling="mean")[0]
    assert mean.metrics["num_cached_tokens"] == 0
    check_equal(mean.outputs.embedding, expected(reference, ids, "mean"))


def test_llm_pooling_argument_sets_the_default(tiny_dense_dir, reference):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, pooling="mean")
    out = llm.embed({"prompt_token_ids": PROMPTS[0]})[0]
    check_equal(out.outputs.embedding, expected(reference, PROMPTS[0], "mean"))
    with pytest.raises(ValueError, match="pooling='max' must be one of 'last', 'mean'"):
        LLM(str(tiny_dense_dir), pooling="max")


def test_gguf_model_embeds_like_transformers(tiny_llama_bias_gguf):
    """A llama GGUF file (Q/K rows permuted by the converter): the same embeddings as transformers."""
    g = tiny_llama_bias_gguf
    llm = LLM(str(g.path), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True)
    reference = transformers_llama(g.config, g.tensors)
    ids = [1, 20, 31, 7, 99, 14, 5]
    for pooling in ("last", "mean"):
        out = llm.embed({"prompt_token_ids": ids}, pooling=pooling)[0]
        check_equal(out.outputs.embedding, expected(reference, ids, pooling))


# ---------------------------------------------------------------------- in the engine, beside generation
def _drive(engine: LLMEngine, steps_between: int, gen: list[list[int]], embeds: list[tuple[list[int], str]], late=()):
    """Generation requests first, then, after `steps_between` steps, embedding requests and the `late`
    generation requests (whose prompts then run behind the embeddings' in a step); every step to the end."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, ids in enumerate(gen):
        engine.add_request(f"gen-{i}", ids, params)
    finals = {}
    for _ in range(steps_between):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for i, (ids, pooling) in enumerate(embeds):
        engine.add_request(f"emb-{i}", ids, embedding_params(), pooling=pooling)
    for i, ids in enumerate(late):
        engine.add_request(f"late-{i}", ids, params)
    saw_mixed = False
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            break
        kinds = {s.pooling is None for s in engine.scheduler.running} | {s.pooling is None for s in engine.scheduler.waiting}
        saw_mixed |= kinds == {True, False}
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    assert not engine.has_unfinished_requests(), f"requests still unfinished after {MAX_STEPS} steps"
    return finals, saw_mixed


def test_embeddings_batched_with_generation_change_neither(llm, reference):
    gen = [[1, 4, 8, 15, 16, 23, 42], [1] + list(range(600, 640))]
    embeds = [(ids, pooling) for ids in PROMPTS for pooling in ("last", "mean")]
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=8 << 20, enforce_eager=True, max_num_batched_tokens=32),
                       llm.generation_config)
    late = [[1, 9, 99, 999, 3, 33, 333], [1] + list(range(650, 670))]
    alone, _ = _drive(engine, 3, gen, [], late)
    together, mixed = _drive(engine, 3, gen, embeds, late)
    assert mixed  # the embedding requests ran in steps with the generation requests
    for rid in [f"gen-{i}" for i in range(len(gen))] + [f"late-{i}" for i in range(len(late))]:
        assert together[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids, rid
        assert len(alone[rid].outputs[0].token_ids) == 24
    for i, (ids, pooling) in enumerate(embeds):
        out = together[f"emb-{i}"]
        assert isinstance(out, EmbeddingRequestOutput) and out.error is None
        check_equal(out.outputs.embedding, expected(reference, ids, pooling))
    assert all_freed(engine)
    assert engine.stats()["generation_tokens"] == 2 * 4 * 24  # the embedding requests generated nothing


def test_mean_pooling_survives_preemption(llm, reference, monkeypatch):
    """A KV pool too small for everything at once: the mean-pooled prompt is preempted, and preempted
    again while computed anew before it reaches the positions it had summed; none is counted twice."""
    from pangu_infer.engine.scheduler import Scheduler

    preempted = []
    real = Scheduler._preempt

    def preempt(self, seq, batch):
        preempted.append((seq.request_id, seq.num_pooled, seq.num_computed_tokens))
        return real(self, seq, batch)

    monkeypatch.setattr(Scheduler, "_preempt", preempt)
    per_token = llm.config.kv_bytes_per_token(torch.float32)
    engine = LLMEngine(llm.model, llm.tokenizer,
                       EngineConfig(kv_cache_memory=per_token * 16 * 10, enforce_eager=True, max_num_batched_tokens=32, block_size=16),
                       llm.generation_config)
    gen = [[1] + list(range(700, 740)), [1] + list(range(800, 830))]
    embeds = [([2] + list(range(100, 190)), "mean"), ([2] + list(range(900, 960)), "last")]
    finals, _ = _drive(engine, 2, gen, embeds)
    # (its pooled positions ahead of those computed again: the recomputation skipped them)
    assert any(rid == "emb-0" and 0 < computed < pooled for rid, pooled, computed in preempted), preempted
    for i, (ids, pooling) in enumerate(embeds):
        check_equal(finals[f"emb-{i}"].outputs.embedding, expected(reference, ids, pooling))
    assert all_freed(engine)


def test_one_failing_embedding_request_ends_alone(llm, reference, monkeypatch):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=8 << 20, enforce_eager=True, max_num_batched_tokens=32),
                       llm.generation_config)
    real = Sequence.add_pooled

    def add_pooled(self, *args):
        if self.request_id == "emb-1":
            raise RuntimeError("broken pooling")
        return real(self, *args)

    monkeypatch.setattr(Sequence, "add_pooled", add_pooled)
    gen = [[1, 4, 8, 15, 16, 23, 42]]
    alone, _ = _drive(engine, 0, gen, [])
    embeds = [(PROMPTS[0], "mean"), (PROMPTS[2], "mean"), (PROMPTS[3], "last")]
    finals, _ = _drive(engine, 1, gen, embeds)
    assert finals["emb-1"].error is not None and finals["emb-1"].outputs.embedding == []
    for i in (0, 2):
        assert finals[f"emb-{i}"].error is None
        check_equal(finals[f"emb-{i}"].outputs.embedding, expected(reference, *embeds[i]))
    assert finals["gen-0"].outputs[0].token_ids == alone["gen-0"].outputs[0].token_ids
    assert all_freed(engine)


# ---------------------------------------------------------------------- Python errors
@pytest.mark.parametrize("prompts, needle", [
    ("", r"prompts\[0\] is empty"),
    (["fine", ""], r"prompts\[1\] is empty"),
    ({"prompt_token_ids": []}, r"prompts\[0\] is empty"),
    ({"prompt_token_ids": [1, 10**6]}, r"prompt token id 1000000 is outside the vocabulary"),
    ({"prompt_token_ids": [1, -3]}, r"prompt token id -3 is outside the vocabulary"),
    ({"prompt_token_ids": [1] * 2049}, r"the prompt has 2049 tokens, more than the model's context of 2048 tokens"),
    # a Python str from JSON's "\ud800": SentencePiece had raised a RuntimeError about a C++ cast
    (["fine", "half \udc80 a pair"], r"prompts\[1\]: the text holds a lone UTF-16 surrogate at character 5 \('\\udc80'\)"),
    ({"prompt": "\ud800"}, r"prompts\[0\]\['prompt'\]: the text holds a lone UTF-16 surrogate at character 0"),
])
def test_bad_prompts_are_a_value_error_naming_them(llm, prompts, needle):
    with pytest.raises(ValueError, match=needle) as e:
        llm.embed(prompts)
    assert isinstance(e.value, RequestError) and e.value.param == "prompt"
    assert all_freed(llm.engine)


@pytest.mark.parametrize("prompts", [None, 5])
def test_prompts_that_are_no_prompts_are_a_value_error(llm, prompts):
    """(A TypeError from iterating them before.)"""
    with pytest.raises(ValueError, match=f"prompts must be a string, .*got {prompts}"):
        llm.embed(prompts)
    with pytest.raises(ValueError, match=f"prompts must be a string, .*got {prompts}"):
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    assert all_freed(llm.engine)


def test_logits_of_an_id_outside_the_vocabulary_name_it_cut(llm):
    """LLM.logits (the Python API's one forward): an id of 4001 digits had been echoed in full."""
    with pytest.raises(ValueError, match=r"^token id <an integer of 13288 bits> is outside the vocabulary \[0, \d+\)$"):
        llm.logits([1, 10**4000])
    with pytest.raises(ValueError, match=r"^token id -3 is outside the vocabulary"):
        llm.logits([1, -3])


def test_a_prompt_may_fill_the_context(tiny_dense_dir, tiny_dense_config, reference):
    """Unlike a generation request, an embedding's prompt may be as long as the context (nothing follows it)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, max_model_len=64)
    ids = [1] + list(range(200, 263))
    check_equal(llm.embed({"prompt_token_ids": ids})[0].outputs.embedding, expected(reference, ids, "last"))
    with pytest.raises(ValueError, match="the prompt has 65 tokens, more than the model's context of 64"):
        llm.embed({"prompt_token_ids": ids + [5]})


def test_bad_pooling_is_a_value_error(llm):
    with pytest.raises(ValueError, match="pooling='max' must be one of"):
        llm.embed("hello", pooling="max")


# ---------------------------------------------------------------------- the server
def test_openai_client_float_and_base64(client, llm, reference, pangu_tokenizer):
    texts = ["hello there", "the weather in the city", "a"]
    by_default = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    for res in (by_default, floats):
        assert res.object == "list" and res.model == "tiny"
        assert [d.index for d in res.data] == [0, 1, 2] and all(d.object == "embedding" for d in res.data)
        n = sum(len(pangu_tokenizer.encode(t)) for t in texts)
        assert res.usage.prompt_tokens == res.usage.total_tokens == n
        for text, d in zip(texts, res.data):
            check_equal(d.embedding, expected(reference, pangu_tokenizer.encode(text), "last"))
    # base64 carries float32: the floats rounded to float32 exactly
    np.testing.assert_array_equal(np.asarray(by_default.data[1].embedding, dtype=np.float32),
                                  np.asarray(floats.data[1].embedding, dtype=np.float32))
    ids = client.embeddings.create(model="tiny", input=[PROMPTS[0], PROMPTS[2]], encoding_format="float")
    for i, d in zip((0, 2), ids.data):
        check_equal(d.embedding, expected(reference, PROMPTS[i], "last"))
    assert llm.embed({"prompt_token_ids": PROMPTS[0]})[0].outputs.embedding == ids.data[0].embedding


def test_more_inputs_than_max_num_seqs_are_queued_not_refused(client, llm, reference):
    """LangChain's OpenAIEmbeddings sends 1000 texts a request; the engine runs max_num_seqs (8 here) at
    once and queues the rest."""
    inputs = [[1, 5 + i, 9, 200 + i] for i in range(3 * llm.engine_config.max_num_seqs + 1)]
    res = client.embeddings.create(model="tiny", input=inputs, encoding_format="float")
    assert [d.index for d in res.data] == list(range(len(inputs)))
    for ids, d in zip(inputs, res.data):
        check_equal(d.embedding, expected(reference, ids, "last"))
    assert all_freed(llm.engine)


def test_response_shape_and_base64_bytes(http, reference):
    body = {"model": "tiny", "input": PROMPTS[0], "encoding_format": "base64", "user": "someone",
            "dimensions": 64}
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    assert set(j) == {"object", "data", "model", "usage"} and j["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    assert j["data"][0].keys() == {"object", "index", "embedding"}
    vec = np.frombuffer(base64.b64decode(j["data"][0]["embedding"]), dtype="<f4")
    check_equal(vec.tolist(), expected(reference, PROMPTS[0], "last"))


def test_server_pooling_follows_the_llm(tiny_dense_dir, reference):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, pooling="mean")
    with TestClient(create_app(llm, served_model_name="tiny")) as http:
        r = http.post("/v1/embeddings", json={"input": PROMPTS[2]})
    assert r.status_code == 200, r.text
    check_equal(r.json()["data"][0]["embedding"], expected(reference, PROMPTS[2], "mean"))


def test_serve_pooling_flag_reaches_the_llm(monkeypatch):
    import argparse

    from pangu_infer.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args([]).pooling == "last"
    assert parser.parse_args(["--pooling", "mean"]).pooling == "mean"
    with pytest.raises(SystemExit):
        parser.parse_args(["--pooling", "max"])
    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(model, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("pangu_infer.llm.LLM", fake_llm)
    with pytest.raises(Stop):
        cli.run(parser.parse_args(["--pooling", "mean"]))
    assert seen["pooling"] == "mean"


@pytest.mark.parametrize("body, param, needle", [
    ({"input": ""}, "input", "input is an empty string"),
    ({"input": []}, "input", "input is empty"),
    ({"input": ["fine", ""]}, "input", r"input\[1\] is an empty string"),
    ({"input": [[1, 2], []]}, "input", r"input\[1\] is an empty list of token ids"),
    ({"input": [1, 10**6]}, "input", "input: prompt token id 1000000 is outside the vocabulary"),
    ({"input": [[1, 2], [1, -1]]}, "input", r"input\[1\]: prompt token id -1 is outside the vocabulary"),
    ({"input": [1] * 2049}, "input", "more than the model's context of 2048 tokens"),
    ({"input": ["a"] * 2049}, "input", r"input holds 2049 inputs; one request may embed at most 2048"),
    ({"input": [True, 2]}, "input", "invalid field 'input'"),
    ({"input": "a", "dimensions": 32}, "dimensions", "dimensions=32: this model's embeddings have 64 dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid field 'encoding_format'"),
    ({"input": "a", "pooling": "mean"}, "pooling", "invalid field 'pooling'"),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", r"truncate_prompt_tokens=0: expected an integer >= 1, -1"),
    ({"input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", r"truncate_prompt_tokens=-2: expected an integer >= 1, -1"),
    ({"input": "a", "truncate_prompt_tokens": "5"}, "truncate_prompt_tokens", "invalid field 'truncate_prompt_tokens'"),
    ({"input": "a", "normalize": "yes"}, "normalize", "invalid field 'normalize'"),
    ({"input": [1] * 2049, "truncate_prompt_tokens": 2049}, "input", "more than the model's context of 2048 tokens"),
])
def test_bad_requests_are_a_400_naming_the_field(http, llm, body, param, needle):
    import re

    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and re.search(needle, err["message"]), err
    assert all_freed(llm.engine)


def test_truncate_prompt_tokens_and_normalize_as_vllm_takes_them(http, llm, reference, pangu_tokenizer):
    """vLLM's fields: truncate_prompt_tokens k embeds each input's last k tokens (-1: as many as fit
    the context), usage counting those kept; normalize false gives the pooled hidden state as it is.
    Both were a 400 (unknown fields)."""
    def post(**body):
        r = http.post("/v1/embeddings", json={"model": "tiny", "encoding_format": "float", **body})
        assert r.status_code == 200, r.text
        return r.json()

    text = "the weather in the city today"
    cut = post(input=[PROMPTS[2], PROMPTS[0]], truncate_prompt_tokens=8)
    for got, ids in zip(cut["data"], (PROMPTS[2][-8:], PROMPTS[0][-8:])):
        check_equal(got["embedding"], expected(reference, ids, "last"))
    assert cut["usage"]["prompt_tokens"] == 16
    words = pangu_tokenizer.encode(text)
    assert len(words) > 3
    texts = post(input=[text, "a"], truncate_prompt_tokens=3)
    check_equal(texts["data"][0]["embedding"], expected(reference, words[-3:], "last"))
    assert texts["usage"]["prompt_tokens"] == 3 + min(3, len(pangu_tokenizer.encode("a")))
    longest = [1] + [100 + i % 800 for i in range(2050)]  # 2051 tokens: the last 2048 (the context) embedded
    fit = post(input=longest, truncate_prompt_tokens=-1)
    assert fit["usage"]["prompt_tokens"] == 2048
    check_equal(fit["data"][0]["embedding"], expected(reference, longest[-2048:], "last"))
    for given, ids in ((PROMPTS[2], PROMPTS[2]), (text, words)):  # truncation_side right (vLLM's): the first k
        first = post(input=given, truncate_prompt_tokens=3, truncation_side="right")
        check_equal(first["data"][0]["embedding"], expected(reference, ids[:3], "last"))

    with torch.no_grad():
        hidden = reference.model(torch.tensor([PROMPTS[0]])).last_hidden_state[0, -1].float()
    raw = post(input=PROMPTS[0], normalize=False)["data"][0]["embedding"]
    torch.testing.assert_close(torch.tensor(raw), hidden, atol=TOL * float(hidden.norm()), rtol=0)
    assert abs(np.linalg.norm(raw) - 1) > 0.1
    assert post(input=PROMPTS[0], normalize=True)["data"][0]["embedding"] == post(input=PROMPTS[0])["data"][0]["embedding"]
    # LLM.embed takes both too
    out = llm.embed({"prompt_token_ids": PROMPTS[2]}, truncate_prompt_tokens=10, normalize=False)[0]
    assert out.prompt_token_ids == PROMPTS[2][-10:]
    with torch.no_grad():
        want = reference.model(torch.tensor([PROMPTS[2][-10:]])).last_hidden_state[0, -1].float()
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=TOL * float(want.norm()), rtol=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens=0"):
        llm.embed("hello", truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="normalize='no' must be True or False"):
        llm.embed("hello", normalize="no")
    assert all_freed(llm.engine)


def test_unknown_model_is_a_404(http):
    r = http.post("/v1/embeddings", json={"model": "other", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="input is an empty string"):
        client.embeddings.create(model="tiny", input="")


def test_logged_requests_log_each_input_received_and_embedded(llm, caplog):
    import logging

    with TestClient(create_app(llm, served_model_name="tiny", enable_log_requests=True)) as http:
        with caplog.at_level(logging.INFO, logger="pangu_infer.server.requests"):
            r = http.post("/v1/embeddings", json={"input": ["one", "two"]})
    assert r.status_code == 200, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "pangu_infer.server.requests"]
    assert sum(line.startswith("received request embd-") for line in lines) == 2
    assert sum(line.startswith("finished request embd-") and ": embedded," in line for line in lines) == 2, lines


def test_lora_adapter_embeddings_equal_peft(tiny_dense_dir, lora_adapters, reference):
    """A request whose model names a LoRA adapter (or LLM.embed's lora_request) embeds with it:
    PEFT's model's last_hidden_state, pooled the same way."""
    from pangu_infer import LoRARequest
    from pangu_infer.server.lora import LoRAModulePath, add_startup_adapters

    adapter = lora_adapters["full"]
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, enable_lora=True)
    ids = PROMPTS[2]
    with torch.no_grad():
        hidden = adapter.model.get_base_model().model(torch.tensor([ids])).last_hidden_state[0].float()
    want = torch.nn.functional.normalize(hidden[-1], dim=0)
    assert not torch.allclose(want, expected(reference, ids, "last"), atol=1e-3)  # the adapter changes it
    out = llm.embed({"prompt_token_ids": ids}, lora_request=LoRARequest("full", 1, str(adapter.path)))[0]
    check_equal(out.outputs.embedding, want)
    loras = add_startup_adapters(llm, [LoRAModulePath("full", str(adapter.path))], "tiny")
    with TestClient(create_app(llm, served_model_name="tiny", lora_modules=loras)) as http:
        with_adapter = http.post("/v1/embeddings", json={"model": "full", "input": ids}).json()
        base = http.post("/v1/embeddings", json={"model": "tiny", "input": ids}).json()
    assert with_adapter["model"] == "full"
    check_equal(with_adapter["data"][0]["embedding"], want)
    check_equal(base["data"][0]["embedding"], expected(reference, ids, "last"))


def test_embeddings_beside_compiled_decode_steps(tiny_dense_dir, llm, reference):
    """With the compiled decode step (the default): steps holding an embedding's prompt run eagerly,
    decode-only steps compiled; tokens as the eager engine's, embeddings as transformers'."""
    compiled = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256,
                   max_num_batched_tokens=32)
    assert compiled.wait_compiled(), compiled.engine.runner.compile_error
    runner = compiled.engine.runner
    step, calls = runner.decode_forward, []
    runner.decode_forward = lambda *args: calls.append(1) or step(*args)
    gen = [[1, 4, 8, 15, 16, 23, 42], [1] + list(range(600, 640))]
    embeds = [(ids, pooling) for ids in PROMPTS for pooling in ("last", "mean")]
    late = [[1, 9, 99, 999, 3, 33, 333]]
    together, mixed = _drive(compiled.engine, 3, gen, embeds, late)
    assert mixed and calls  # embeddings ran beside generation, and decode-only steps ran compiled
    eager = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=8 << 20, enforce_eager=True, max_num_batched_tokens=32),
                      llm.generation_config)
    alone, _ = _drive(eager, 3, gen, [], late)
    for rid in ("gen-0", "gen-1", "late-0"):
        assert together[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids, rid
    for i, (ids, pooling) in enumerate(embeds):
        check_equal(together[f"emb-{i}"].outputs.embedding, expected(reference, ids, pooling))
    assert all_freed(compiled.engine)


def test_add_special_tokens_false_tokenizes_without_bos(http, reference, pangu_tokenizer):
    text = "the weather in the city"
    bare = pangu_tokenizer.encode(text, add_special_tokens=False)
    assert pangu_tokenizer.encode(text) != bare  # (this tokenizer adds BOS)
    r = http.post("/v1/embeddings", json={"input": text, "add_special_tokens": False, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(bare)
    check_equal(r.json()["data"][0]["embedding"], expected(reference, bare, "last"))
