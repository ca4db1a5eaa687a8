"""Prompt-lookup speculative decoding: drafts, exact greedy output, the target distribution when sampling."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig
from pangu_infer.engine.spec_decode import propose_ngram_draft, target_probs, verify

REPEATING = [5, 6, 7, 8, 9, 10, 11, 12] * 6  # a prompt that repeats its context


def test_ngram_draft_continues_the_latest_earlier_occurrence():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert propose_ngram_draft(tokens, max_ngram=3, num_tokens=2) == [4, 5]


def test_ngram_draft_prefers_the_longest_matching_suffix():
    # "3" alone last occurred before 7, but "2 3" occurred before 4.
    tokens = [2, 3, 4, 3, 7, 2, 3]
    assert propose_ngram_draft(tokens, max_ngram=2, num_tokens=1) == [4]
    assert propose_ngram_draft(tokens, max_ngram=1, num_tokens=1) == [7]


def test_ngram_draft_is_empty_without_an_earlier_match():
    assert propose_ngram_draft([1, 2, 3, 4], max_ngram=3, num_tokens=4) == []
    assert propose_ngram_draft([1], max_ngram=3, num_tokens=4) == []


def test_engine_config_rejects_a_negative_draft_length():
    with pytest.raises(ValueError, match="num_speculative_tokens=-1"):
        EngineConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="speculative_ngram=0"):
        EngineConfig(speculative_ngram=0)


@pytest.fixture(scope="module")
def plain_and_speculative(tiny_dense_dir):
    kwargs = dict(dtype="float32", device="cpu", max_num_seqs=4, kv_cache_memory=1 << 24)
    return LLM(str(tiny_dense_dir), **kwargs, enforce_eager=True), LLM(str(tiny_dense_dir), num_speculative_tokens=4, **kwargs, enforce_eager=True)


def test_greedy_output_is_identical_with_prompt_lookup(plain_and_speculative):
    plain, spec = plain_and_speculative
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [{"prompt_token_ids": REPEATING}, {"prompt_token_ids": REPEATING[3:] + [20, 21]}]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    steps_before = spec.engine.num_steps
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0
    assert 0 <= stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    assert spec.engine.num_steps - steps_before <= plain.engine.num_steps  # never more steps


def test_speculation_stops_exactly_at_max_tokens(plain_and_speculative):
    _, spec = plain_and_speculative
    for max_tokens in (1, 2, 7):
        params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=1)
        out = spec.generate({"prompt_token_ids": REPEATING}, params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == max_tokens
        assert out.finish_reason == "length"


def test_speculative_kv_cache_stays_consistent_across_requests(plain_and_speculative):
    """Rejected draft tokens leave stale KV entries behind; later requests (sharing the prefix
    cache) must still see the same logits as the plain engine."""
    plain, spec = plain_and_speculative
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = {"prompt_token_ids": REPEATING + [13, 14, 15]}
    want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    for _ in range(2):
        assert spec.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want


def test_greedy_verification_keeps_the_matching_prefix_and_corrects_the_first_miss():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([3, 4, 0, 2]):
        logits[row, best] = 1.0
    g = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 4, 5], greedy, g) == [3, 4, 0]
    assert verify(logits, [3, 4, 0], greedy, g) == [3, 4, 0, 2]  # all accepted: one bonus token
    assert verify(logits, [1, 4, 0], greedy, g) == [3]


def test_target_probs_apply_top_k_like_the_sampler():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = target_probs(logits, SamplingParams(temperature=0.9, top_k=4))[0]
    assert p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever the draft, the first emitted token must follow p (the sampler's distribution)."""
    g = torch.Generator().manual_seed(1234)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.9)
    p = target_probs(logits[:1], params)[0]
    trials = 3000
    for draft_token in (0, 2):  # the likeliest token, and an unlikely one
        counts = torch.zeros(5)
        for _ in range(trials):
            counts[verify(logits, [draft_token], params, g)[0]] += 1
        freq = counts / trials
        # 4.5 standard deviations of a binomial frequency: at most ~0.04 here
        tolerance = 4.5 * (p * (1 - p) / trials).sqrt()
        assert torch.all((freq - p).abs() <= tolerance), (freq, p)
