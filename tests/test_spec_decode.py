"""Prompt-lookup speculative decoding: drafts, exact greedy output, the target distribution when sampling."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine
from pangu_infer.loader import load_model
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, write_checkpoint
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
    plain_before, spec_before = plain.engine.num_steps, spec.engine.num_steps
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0
    assert 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]  # the model repeats itself: some drafts hold
    assert spec.engine.num_steps - spec_before < plain.engine.num_steps - plain_before  # and save steps


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


def _chi_square_p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities; outcomes expected fewer than 5 times are pooled."""
    expected = probs.flatten().double() * observed.sum()
    observed = observed.flatten().double()
    pooled = expected < 5
    if pooled.any():
        observed = torch.cat((observed[~pooled], observed[pooled].sum()[None]))
        expected = torch.cat((expected[~pooled], expected[pooled].sum()[None]))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, chi2 / 2).item()


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_speculation_follows_the_target_distribution_end_to_end(tmp_path, seeded):
    """600 sampled completions of 4 tokens through the engine with 2-token prompt-lookup drafts
    (accepted, rejected and bonus tokens all occur) follow the joint distribution of those 4 tokens
    under the target model alone, computed exactly from full forwards. A 4-token vocabulary keeps
    the 256 outcomes countable; the head favours token i+1 after token i, so the drafts of the
    cyclic prompt are accepted about half the time. Fixed seeds (the test is deterministic): p = 0.93
    here, while accepting every draft, keeping the draft token in the residual, drawing the bonus
    token from the wrong row, accepting with probability sqrt(p) or verifying at temperature 1 each
    give p < 1e-14. Seeded requests (a seed each) are verified by spec_decode.verify_seeded."""
    model = write_cyclic_model(tmp_path, seed=5)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=256, num_speculative_tokens=2, seed=0, kv_cache_memory=16 << 20, enforce_eager=True))
    stats = assert_samples_follow_the_target(engine, model, seeded)
    assert stats["spec_draft_tokens"] >= CYCLIC_SAMPLES and 0.2 < stats["spec_acceptance_rate"] < 0.8, stats  # both outcomes seen


# The end-to-end distribution tests: a 4-token vocabulary, completions of 4 tokens at temperature 2.
CYCLIC_VOCAB, CYCLIC_TOKENS, CYCLIC_SAMPLES, CYCLIC_TEMPERATURE = 4, 4, 600, 2.0


def write_cyclic_model(directory, seed: int):
    """A random model of CYCLIC_VOCAB tokens whose head favours token i+1 after token i, written to
    `directory` and loaded (float32, CPU)."""
    config = pangu_dense_config(vocab_size=CYCLIC_VOCAB, eos_token_id=2)
    state = random_state_dict(config, seed=seed)
    state["lm_head.weight"] += 0.1 * state["model.embed_tokens.weight"].roll(1, 0)  # token j more likely after j - 1
    write_checkpoint(str(directory), config, state)
    return load_model(str(directory), torch.float32, torch.device("cpu"), load_tokenizer=False).model


def assert_samples_follow_the_target(engine, model, seeded: bool = False) -> dict:
    """CYCLIC_SAMPLES sampled completions through `engine` follow the joint distribution of their
    CYCLIC_TOKENS tokens under `model` alone, computed exactly from full forwards (Pearson's test,
    p > 1e-3); returns the engine's stats. seeded: each request with a seed of its own."""
    vocab, num_tokens, temperature = CYCLIC_VOCAB, CYCLIC_TOKENS, CYCLIC_TEMPERATURE
    prompt = list(range(vocab)) * 6
    for i in range(CYCLIC_SAMPLES):
        params = SamplingParams(temperature=temperature, max_tokens=num_tokens, ignore_eos=True, seed=1000 + i if seeded else None)
        engine.add_request(str(i), prompt, params)
    counts = torch.zeros((vocab,) * num_tokens)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                counts[tuple(out.outputs[0].token_ids)] += 1

    @functools.cache
    def next_token_probs(prefix: tuple[int, ...]) -> torch.Tensor:
        ids = torch.tensor(prompt + list(prefix))
        with torch.inference_mode():
            logits = model.compute_logits(model(ids, torch.arange(len(ids))))[-1]
        return torch.softmax(logits.double() / temperature, dim=-1)

    target = torch.zeros(counts.shape, dtype=torch.float64)
    for tokens in itertools.product(range(vocab), repeat=num_tokens):
        target[tokens] = math.prod(next_token_probs(tokens[:i])[t].item() for i, t in enumerate(tokens))
    assert abs(target.sum().item() - 1) < 1e-9
    p_value = _chi_square_p_value(counts, target)
    total_variation = 0.5 * (counts / CYCLIC_SAMPLES - target).abs().sum().item()
    assert p_value > 1e-3, f"chi-square p = {p_value:.3g}, total variation {total_variation:.3f}"
    return engine.stats()


def test_a_seeded_sampled_request_writes_the_same_text_with_prompt_lookup_or_a_prediction(tmp_path):
    """A seeded request's n-th token comes from its generator's n-th draw whether the sampler or
    verification writes it (spec_decode.verify_seeded), so drafts change how fast it is written,
    never what: with prompt lookup, each alone or six together (steps whose token budget leaves
    the drafts shorter, or none), and with a predicted output, the text is plain decoding's."""
    model = write_cyclic_model(tmp_path, seed=5)
    kw = dict(max_num_seqs=8, max_num_batched_tokens=32, kv_cache_memory=16 << 20, enforce_eager=True)
    plain = LLMEngine(model, None, EngineConfig(**kw))
    lookup = LLMEngine(model, None, EngineConfig(num_speculative_tokens=3, **kw))
    prompt = list(range(CYCLIC_VOCAB)) * 6
    params = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=seed) for seed in range(6)]
    want = _outputs(plain, prompt, params)
    assert len(set(map(tuple, want))) == 6
    assert _outputs(lookup, prompt, params) == want
    assert [_outputs(lookup, prompt, [p])[0] for p in params] == want
    assert lookup.stats()["spec_accepted_tokens"] > 20, lookup.stats()
    predicted = [SamplingParams(**{**p.__dict__, "prediction": list(range(CYCLIC_VOCAB)) * 6}) for p in params]
    assert _outputs(plain, prompt, predicted) == want
    assert plain.predictions.num_accepted_tokens > 20


_REQUEST_IDS = itertools.count()


def _outputs(engine, prompt: list[int], params: list[SamplingParams]) -> list[list[int]]:
    """The token ids each of the requests (one per params, all added at once) writes."""
    ids = [f"r{next(_REQUEST_IDS)}" for _ in params]
    for request_id, p in zip(ids, params):
        engine.add_request(request_id, prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[request_id] for request_id in ids]


@pytest.mark.parametrize("steer", ["logit_bias", "allowed_token_ids"])
def test_logit_bias_and_allowed_tokens_hold_with_prompt_lookup(plain_and_speculative, steer):
    """Drafts are verified against the raw argmax, so a steered row must not take them: its tokens
    are the plain engine's, and they differ from the unsteered ones."""
    plain, spec = plain_and_speculative
    prompt = {"prompt_token_ids": REPEATING}
    free = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    if steer == "logit_bias":
        extra = {"logit_bias": {t: 10.0 for t in REPEATING}}  # the prompt's tokens: drafts on every step
    else:
        extra = {"allowed_token_ids": sorted(set(REPEATING) - set(free[:4]))}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **extra)
    want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert want != free
    assert spec.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want
