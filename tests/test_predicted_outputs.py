"""Predicted outputs (OpenAI's `prediction`): the engine drafts from a request's predicted reply and
verifies the drafts, so the reply is the one written without it (greedy: token for token; sampled:
the same distribution), in fewer steps where the prediction holds."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine
from pangu_infer.engine.spec_decode import PREDICTION_DRAFT_TOKENS, PREDICTION_NEAR, Prediction
from pangu_infer.server.app import create_app
from test_spec_decode import CYCLIC_SAMPLES, assert_samples_follow_the_target, write_cyclic_model
from fixtures_server import sdk_client

PROMPT = [1, 5, 9, 200, 17, 33, 8, 412, 77, 19, 23]


def _prediction(tokens: list[int]) -> Prediction:
    return Prediction(np.asarray(tokens, dtype=np.int64))


# ---------------------------------------------------------------------- where a draft comes from
def test_a_draft_starts_where_the_prediction_starts_and_follows_what_was_accepted():
    p = _prediction(list(range(100, 120)))
    assert p.draft([], 4) == [100, 101, 102, 103]
    p.verified(4, 2)  # 100, 101 accepted; the bonus token (not 102) follows
    assert (p.accepted, p.rejected) == (2, 2)
    assert p.draft([100, 101, 102], 3) == [103, 104, 105]  # the bonus was the prediction's next token after all
    p.verified(3, 3)
    assert p.draft([100, 101, 102, 103, 104, 105, 106], 2) == [107, 108]  # so was the bonus of a whole draft
    assert p.draft([100, 101, 102, 103, 104, 105, 106, 107, 108, 109], 2) == [110, 111]  # steps without a draft too


def test_a_draft_resumes_after_an_edit_where_the_output_rejoins_the_prediction():
    predicted = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    p = _prediction(predicted)
    assert p.draft([10, 11], 3) == [12, 13, 14]  # (not verified: a step without drafts)
    # the output replaced 12 and 13 by 50, 51: no draft while it writes its own tokens
    assert p.draft([10, 11, 50], 3) == []
    assert p.draft([10, 11, 50, 51], 3) == []
    # then goes on as predicted: one token found near where it left, then two
    assert p.draft([10, 11, 50, 51, 14], 3) == [15, 16, 17]
    p.verified(3, 3)
    assert p.draft([10, 11, 50, 51, 14, 15, 16, 17, 18], 3) == [19]  # the prediction's end bounds the draft
    assert p.draft([10, 11, 50, 51, 14, 15, 16, 17, 18, 19], 3) == []


def test_a_lost_output_prefers_its_longest_tail_then_the_nearest_occurrence_ahead():
    #            0   1   2  3  4  5   6   7  8  9  10  11  12 13 14
    predicted = [7, 8, 9, 1, 2, 3, 30, 7, 8, 9, 40, 41, 7, 8, 9, 42]
    p = _prediction(predicted)
    # the tail (7, 8, 9) occurs three times: the first at or after where the output left (0) is the first
    assert p.draft([99, 7, 8, 9], 2) == [1, 2]
    # a longer tail wins over an occurrence nearer by
    p.cursor = None
    p.left_at = 12
    assert p.draft([99, 30, 7, 8, 9], 2) == [40, 41]
    # past every occurrence: the last one
    p.cursor = None
    p.left_at = 15
    assert p.draft([7, 8, 9], 2) == [42]


def test_one_token_matches_only_near_where_the_output_left():
    predicted = list(range(100, 100 + 3 * PREDICTION_NEAR))
    p = _prediction(predicted)
    far = predicted[PREDICTION_NEAR + 5]
    assert p.draft([55, far], 2) == []  # one token, far past where the output left: chance
    assert p.draft([55, 104], 2) == [105, 106]  # one token a little past it: a replaced token


# ---------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24, enforce_eager=True)


def _greedy(llm, prediction=None, max_tokens=40, n=1):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prediction=prediction, n=n)
    before = llm.engine.num_steps
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    return out, llm.engine.num_steps - before


def test_a_greedy_reply_is_the_same_with_any_prediction_and_faster_with_a_good_one(llm):
    plain, plain_steps = _greedy(llm)
    want = plain.outputs[0].token_ids
    assert "accepted_prediction_tokens" not in plain.metrics
    edited = list(want)
    edited[10:13] = [3, 4]  # a replaced stretch
    unrelated = [7] * 30
    for prediction, fewer in ((want, 3), (edited, 2), (unrelated, 0), ([], 0)):
        out, steps = _greedy(llm, prediction)
        assert out.outputs[0].token_ids == want
        accepted, rejected = out.metrics["accepted_prediction_tokens"], out.metrics["rejected_prediction_tokens"]
        if fewer:
            assert steps * fewer <= plain_steps, (steps, plain_steps)
            assert accepted >= len(want) - 5 * (4 - fewer) and rejected <= PREDICTION_DRAFT_TOKENS, (accepted, rejected)
        else:
            assert accepted <= 1  # (the unrelated prediction's 7 may come up once by chance)
    exact, _ = _greedy(llm, want)
    assert exact.metrics["rejected_prediction_tokens"] == 0 and exact.metrics["accepted_prediction_tokens"] >= len(want) - 1


def test_a_prediction_as_text_is_tokenized_as_the_reply(llm):
    plain, plain_steps = _greedy(llm, max_tokens=24)
    text = llm.get_tokenizer().decode(plain.outputs[0].token_ids)
    out, steps = _greedy(llm, text, max_tokens=24)
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    assert out.metrics["accepted_prediction_tokens"] > 0 and steps < plain_steps


def test_each_of_n_replies_follows_the_prediction_on_its_own(llm):
    plain, _ = _greedy(llm)
    want = plain.outputs[0].token_ids
    out, _ = _greedy(llm, want, n=2)
    assert [c.token_ids for c in out.outputs] == [want, want]
    assert out.metrics["accepted_prediction_tokens"] >= 2 * (len(want) - 10)


def test_sampled_replies_with_a_prediction_follow_the_target_distribution(tmp_path):
    """As test_spec_decode's end-to-end distribution test, with the drafts from a prediction (the
    cyclic continuation, which the head favours: accepted about half the time) and no prompt lookup."""
    model = write_cyclic_model(tmp_path, seed=5)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=256, seed=0, kv_cache_memory=16 << 20, enforce_eager=True))
    original = engine.add_request

    def add_request(request_id, prompt, params, *args, **kwargs):
        return original(request_id, prompt, SamplingParams(**{**params.__dict__, "prediction": [0, 1, 2, 3]}), *args, **kwargs)

    engine.add_request = add_request
    assert_samples_follow_the_target(engine, model)
    stats = engine.predictions
    assert stats.num_draft_tokens >= CYCLIC_SAMPLES and 0.2 < stats.acceptance_rate() < 0.8, vars(stats)


def test_predictions_and_prompt_lookup_draft_side_by_side(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24, enforce_eager=True, num_speculative_tokens=3)
    repeating = [5, 6, 7, 8] * 6
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = LLM(str(tiny_dense_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": repeating}], free, use_tqdm=False)]
    predicted = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prediction=want[0])
    llm.engine.add_request("p", PROMPT, predicted)
    llm.engine.add_request("r", repeating, free)
    outs = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            outs[out.request_id] = out
    assert [outs["p"].outputs[0].token_ids, outs["r"].outputs[0].token_ids] == want
    assert outs["p"].metrics["accepted_prediction_tokens"] >= len(want[0]) - 10
    assert llm.engine.stats()["spec_draft_tokens"] > 0  # prompt lookup drafted for the other request


@pytest.mark.parametrize("prediction, match", [
    ([1, 2, 10**6], r"prediction holds the token id 1000000, outside the model's vocabulary"),
    # (an id of 4001 digits had been echoed in full)
    pytest.param([1, 10**4000], r"prediction holds the token id <an integer of 13288 bits>, outside the model's vocabulary", id="4001-digits"),
    ([1] * 5000, r"prediction is 5000 tokens, more than the model's context of \d+ tokens"),
    # (a Python str from JSON's "\ud800": SentencePiece raised a RuntimeError about a C++ cast)
    ("fine \ud800 text", r"prediction: the text holds a lone UTF-16 surrogate at character 5 \('\\ud800'\)"),
])
def test_a_prediction_the_model_cannot_take_is_refused_naming_it(llm, prediction, match):
    with pytest.raises(ValueError, match=match) as e:
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=4, prediction=prediction), use_tqdm=False)
    assert e.value.param == "prediction" and len(str(e.value)) < 300


@pytest.mark.parametrize("prediction", [3, {"type": "content"}, [1, "2"], [True]])
def test_a_prediction_of_the_wrong_type_is_refused(prediction):
    with pytest.raises(ValueError, match="prediction=") as e:
        SamplingParams(prediction=prediction)
    assert e.value.param == "prediction"


# ---------------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def client(llm):
    with TestClient(create_app(llm, served_model_name="tiny")) as http:
        yield sdk_client(http), http


MESSAGES = [{"role": "user", "content": "tell me about the weather in the city"}]


def test_chat_with_a_prediction_gives_the_same_reply_and_counts_its_tokens(client):
    api, _ = client
    args = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    plain = api.chat.completions.create(**args)
    assert plain.usage.completion_tokens_details is None
    reply = plain.choices[0].message.content
    for prediction in (
        {"type": "content", "content": reply},
        {"type": "content", "content": [{"type": "text", "text": reply[:10]}, {"type": "text", "text": reply[10:]}]},
    ):
        got = api.chat.completions.create(**args, prediction=prediction)
        assert got.choices[0].message.content == reply
        details = got.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    chunks = list(api.chat.completions.create(**args, prediction={"type": "content", "content": reply}, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens == details.accepted_prediction_tokens


@pytest.mark.parametrize("prediction, param", [
    ({"type": "text", "content": "x"}, "prediction.type"),
    ({"type": "content", "content": 3}, "prediction.content"),
    ({"type": "content", "content": [{"type": "image_url", "text": "x"}]}, "prediction.content"),
    ({"type": "content"}, "prediction.content"),
    ("some text", "prediction"),
])
def test_a_malformed_prediction_is_a_400_naming_it(client, prediction, param):
    _, http = client
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "prediction": prediction})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_with_a_draft_model_the_prediction_goes_unused(tiny_dense_dir, caplog):
    """A draft model's cache follows the tokens of its own drafts: the engine drafts with it alone,
    says so once, and counts no prediction tokens."""
    plain, _ = _greedy(LLM(str(tiny_dense_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24, enforce_eager=True))
    drafted = LLM(str(tiny_dense_dir), dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24, enforce_eager=True,
                  speculative_model=str(tiny_dense_dir), num_speculative_tokens=2)
    with caplog.at_level("INFO", logger="pangu_infer.engine"):
        for _ in range(2):
            out, _ = _greedy(drafted, plain.outputs[0].token_ids)
            assert out.outputs[0].token_ids == plain.outputs[0].token_ids
            assert (out.metrics["accepted_prediction_tokens"], out.metrics["rejected_prediction_tokens"]) == (0, 0)
    assert caplog.text.count("predicted outputs go unused") == 1


def test_a_draft_after_a_miss_is_as_long_as_what_held_and_grows_while_drafts_hold():
    p = _prediction(list(range(100, 200)))
    assert len(p.draft([], 64)) == PREDICTION_DRAFT_TOKENS
    p.verified(PREDICTION_DRAFT_TOKENS, 0)  # nothing held: the bonus token was the prediction's next after all
    assert p.draft([100], 64) == [101]
    p.verified(1, 1)
    assert p.draft([100, 101, 102], 64) == [103, 104]
    p.verified(2, 1)  # one of two held
    assert p.draft([100, 101, 102, 103, 104], 64) == [105, 106]
    p.verified(2, 2)
    assert len(p.draft(list(range(100, 108)), 64)) == min(4, PREDICTION_DRAFT_TOKENS)
