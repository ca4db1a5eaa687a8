"""A failure inside one request's work ends that request alone; the batch goes on.

Faults are injected where a request's own work runs (its sampling row, its detokenizer, its
stop-string check, its forward) while three good requests share the batch. Each good request
must finish with exactly the tokens it gets alone, the faulty one must finish with
finish_reason "error" keeping the tokens it had, and every KV block must be free afterwards.
"""

from __future__ import annotations

import logging

import pytest

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import LLMEngine

GOOD_PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21]]
GOOD_PARAMS = [
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),  # seeded: must not shift
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
]
BAD_PROMPT = [30, 31, 32]
FAIL_AFTER = 3  # the faulty request fails once it has this many tokens


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def llm(tiny_dense_dir) -> LLM:
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    return [llm.generate({"prompt_token_ids": p}, s, use_tqdm=False)[0].outputs[0].token_ids for p, s in zip(GOOD_PROMPTS, GOOD_PARAMS)]


def _run(engine: LLMEngine, bad_params: SamplingParams, after_add=None) -> dict:
    """The good requests with the faulty one in the middle of the batch, run to the end."""
    engine.add_request("good-0", GOOD_PROMPTS[0], GOOD_PARAMS[0])
    engine.add_request("bad", BAD_PROMPT, bad_params)
    for i in (1, 2):
        engine.add_request(f"good-{i}", GOOD_PROMPTS[i], GOOD_PARAMS[i])
    if after_add is not None:
        after_add(engine)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def _check(final: dict, alone: list[list[int]], engine: LLMEngine, caplog, bad_tokens: int = FAIL_AFTER) -> None:
    for i, expected in enumerate(alone):
        out = final[f"good-{i}"]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == expected, f"good-{i} changed by another request's failure"
    bad = final["bad"]
    assert bad.error is not None and "bad" in bad.error and "Boom" not in bad.error
    assert all(comp.finish_reason == "error" for comp in bad.outputs)
    # the tokens it had are kept (a fork of an n=2 request runs a step behind its parent)
    assert len(bad.outputs[0].token_ids) == bad_tokens and all(len(c.token_ids) <= bad_tokens for c in bad.outputs)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
    assert any("request bad failed" in r.getMessage() and r.exc_info and r.exc_info[0] is Boom for r in caplog.records)


def test_a_failing_sampling_row_fails_its_request_alone(llm, alone, monkeypatch, caplog):
    engine = llm.engine
    real = engine.sampler

    def sampler(logits, rows):
        result = real(logits, rows)  # the seeded rows have drawn: a retry must draw the same again
        if any(r.params.seed == 666 and len(r.output_token_ids) >= FAIL_AFTER for r in rows):
            raise Boom("a sampling row failed")
        return result

    monkeypatch.setattr(engine, "sampler", sampler)
    bad = SamplingParams(temperature=1.0, seed=666, n=2, max_tokens=10, ignore_eos=True)
    _check(_run(engine, bad), alone, engine, caplog)


def test_a_failing_detokenizer_fails_its_request_alone(llm, alone, caplog):
    class Exploding:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def step(self, ids):
            self.calls += 1
            if self.calls == FAIL_AFTER:
                raise Boom("a detokenizer failed")
            return self.inner.step(ids)

        def flush(self):
            return self.inner.flush()

    def explode(engine):
        for seq in engine.requests["bad"].seqs:
            seq.detokenizer = Exploding(seq.detokenizer)

    engine = llm.engine
    _check(_run(engine, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), explode), alone, engine, caplog)


def test_a_failing_stop_check_fails_its_request_alone(llm, alone, monkeypatch, caplog):
    import pangu_infer.engine.output as output_module

    real = output_module.check_stop_strings

    def check(seq, prev_len):
        if seq.request_id == "bad" and len(seq.output_token_ids) >= FAIL_AFTER:
            raise Boom("a stop check failed")
        return real(seq, prev_len)

    monkeypatch.setattr(output_module, "check_stop_strings", check)
    engine = llm.engine
    bad = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["never appears"])
    _check(_run(engine, bad), alone, engine, caplog)


def test_a_forward_that_fails_with_one_request_fails_that_request_alone(llm, alone, monkeypatch, caplog):
    engine = llm.engine
    real = engine.runner.run

    def run(batch, drafts=None):
        if any(s.request_id == "bad" and len(s.output_token_ids) >= FAIL_AFTER for s in batch.seqs):
            raise Boom("a forward failed")
        return real(batch, drafts)

    monkeypatch.setattr(engine.runner, "run", run)
    _check(_run(engine, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)), alone, engine, caplog)


def test_a_one_off_forward_fault_is_retried_and_loses_nothing(llm, alone, monkeypatch, caplog):
    """A fault that is no request's (it does not come back when retried): every request completes."""
    engine = llm.engine
    real = engine.runner.run
    calls = {"n": 0}

    def run(batch, drafts=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Boom("a one-off fault")
        return real(batch, drafts)

    monkeypatch.setattr(engine.runner, "run", run)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    final = _run(engine, params)
    expected_bad = llm.generate({"prompt_token_ids": BAD_PROMPT}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert final["bad"].error is None and final["bad"].outputs[0].token_ids == expected_bad
    for i, expected in enumerate(alone):
        assert final[f"good-{i}"].outputs[0].token_ids == expected
    assert engine.stats()["kv_blocks_used"] == 0
    assert any(r.exc_info and r.exc_info[0] is Boom and r.levelno == logging.ERROR for r in caplog.records)
