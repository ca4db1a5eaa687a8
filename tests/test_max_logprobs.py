"""vLLM's max_logprobs (`--max-logprobs`, LLM(max_logprobs=...)): the most top logprobs a request's token
may ask for, 20 by default (OpenAI's limit), -1 for none; a request's -1 asks for the whole vocabulary.
Values against transformers' own log-softmax of the same random checkpoint."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from pangu_infer import LLM, SamplingParams
from pangu_infer.loader.random import random_state_dict, transformers_llama
from pangu_infer.sampling_params import BeamSearchParams
from pangu_infer.server.app import create_app

ARGS = dict(dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
PROMPT = [5, 17, 42, 9, 300]


@pytest.fixture(scope="module")
def llm30(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), **ARGS, max_logprobs=30)


@pytest.fixture(scope="module")
def unlimited(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), **ARGS, max_logprobs=-1)


@pytest.fixture(scope="module")
def reference(tiny_dense_config):
    model = transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)


def _one(llm, **params):
    return llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, **params), use_tqdm=False)[0]


def test_up_to_the_engines_limit_is_taken_and_past_it_is_a_value_error_naming_both(llm30, reference):
    out = _one(llm30, logprobs=30, prompt_logprobs=30)
    assert [len(lp.top) for lp in out.outputs[0].logprobs] == [30, 30]
    assert [len(lp.top) for lp in out.prompt_logprobs[1:]] == [30] * (len(PROMPT) - 1)
    for p, lp in enumerate(out.prompt_logprobs[1:]):
        values, ids = reference[p].topk(30)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    for field in ("logprobs", "prompt_logprobs"):
        for k in (31, -1):
            with pytest.raises(ValueError, match=rf"{field}={k}.*max_logprobs=30") as e:
                _one(llm30, **{field: k})
            assert e.value.param == field
    assert not llm30.engine.has_unfinished_requests()


def test_minus_one_is_the_whole_vocabulary_where_the_engine_has_no_limit(unlimited, reference):
    vocab = unlimited.engine.config.vocab_size
    out = _one(unlimited, logprobs=-1, prompt_logprobs=-1)
    for lp in out.outputs[0].logprobs:
        assert sorted(t for t, _ in lp.top) == list(range(vocab))
    for p, lp in enumerate(out.prompt_logprobs[1:]):
        values, ids = reference[p].sort(descending=True)
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
        got = dict(lp.top)
        assert [got[t] for t in range(vocab)] == pytest.approx(reference[p].tolist(), abs=1e-4)
    # and any count at all
    assert [len(lp.top) for lp in _one(unlimited, logprobs=vocab).outputs[0].logprobs] == [vocab, vocab]
    with TestClient(create_app(unlimited, served_model_name="m")) as http:  # an echoed prompt's too
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 1, "logprobs": -1, "echo": True, "return_tokens_as_token_ids": True}
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        tops = reply.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert tops[0] is None and [len(top) for top in tops[1:]] == [vocab] * len(PROMPT)


def test_a_limit_below_a_beam_searchs_reads_is_a_value_error_naming_the_beam_width(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), **ARGS, max_logprobs=4)
    with pytest.raises(ValueError, match=r"beam_width=3 .*max_logprobs=4") as e:
        llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(beam_width=3, max_tokens=2))
    assert e.value.param == "beam_width"
    assert len(llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(beam_width=2, max_tokens=2))[0].sequences) == 2
    with TestClient(create_app(llm, served_model_name="m")) as http:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2, "use_beam_search": True}
        reply = http.post("/v1/completions", json={**body, "n": 3})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "n" and "at most 2" in error["message"] and "--max-logprobs is 4" in error["message"], error
        assert len(http.post("/v1/completions", json={**body, "n": 2}).json()["choices"]) == 2


@pytest.mark.parametrize("bad", [-2, 1.5, "20", True])
def test_a_bad_limit_is_a_value_error_naming_it(tiny_dense_dir, bad):
    with pytest.raises(ValueError, match="max_logprobs="):
        LLM(str(tiny_dense_dir), **ARGS, max_logprobs=bad)


def test_the_server_names_the_field_the_client_gave(llm30):
    with TestClient(create_app(llm30, served_model_name="m")) as http:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": True}
        reply = http.post("/v1/chat/completions", json={**chat, "top_logprobs": 30})
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 30
        for path, body, field in [
            ("/v1/chat/completions", {**chat, "top_logprobs": 31}, "top_logprobs"),
            ("/v1/chat/completions", {**chat, "top_logprobs": -1}, "top_logprobs"),
            ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 1, "logprobs": 31}, "logprobs"),
            ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 1, "prompt_logprobs": 31}, "prompt_logprobs"),
        ]:
            reply = http.post(path, json=body)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == field and "max-logprobs" in error["message"].replace("max_logprobs", "max-logprobs"), error
        reply = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1, "logprobs": 25, "echo": True,
                                                       "return_tokens_as_token_ids": True})  # (texts may repeat)
        assert reply.status_code == 200, reply.text
        assert all(len(top) == 25 for top in reply.json()["choices"][0]["logprobs"]["top_logprobs"][1:])


def test_the_cli_flag_reaches_the_engine(tiny_dense_dir):
    from pangu_infer.cli import build_parser, llm_kwargs

    base = ["generate", "--model", str(tiny_dense_dir), "--prompt", "x"]
    assert llm_kwargs(build_parser().parse_args(base))["max_logprobs"] == 20
    assert llm_kwargs(build_parser().parse_args([*base, "--max-logprobs", "-1"]))["max_logprobs"] == -1
    serve = build_parser().parse_args(["serve", str(tiny_dense_dir), "--max-logprobs", "64"])
    assert llm_kwargs(serve)["max_logprobs"] == 64
