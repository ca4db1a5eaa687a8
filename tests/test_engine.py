"""Serving engine: continuous batching, chunked prefill, prefix caching, preemption, sampling in the batch."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine, RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def mixed_prompts(vocab: int, count: int = 24, seed: int = 0) -> list[list[int]]:
    """Prompts of 1 to 300 tokens, both ends included."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 300] + torch.randint(2, 300, (count - 2,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run(llm: LLM, prompts, params, **engine_kwargs) -> tuple[list, LLMEngine]:
    """Run prompts to completion on a fresh engine over the already loaded model (eager unless
    enforce_eager=False is passed)."""
    engine_kwargs.setdefault("enforce_eager", True)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(**engine_kwargs), llm.generation_config)
    if not engine_kwargs["enforce_eager"]:
        assert engine.runner.wait_compiled()  # the compiled step builds in the background
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), ids, p)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[str(i)] for i in range(len(prompts))], engine


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def recorded_steps(monkeypatch) -> list[list[tuple[str, int, int, int, int]]]:
    """Every runner step from here on: per scheduled sequence (request id, its first position, tokens
    computed, prompt tokens, all its tokens), read as the step starts."""
    from pangu_infer.engine.runner import ModelRunner

    steps: list[list[tuple[str, int, int, int, int]]] = []
    forward = ModelRunner.run

    def recording_run(self, batch, drafts=None):
        steps.append([(s.request_id, s.num_computed_tokens, n, s.num_prompt_tokens, s.num_tokens) for s, n in zip(batch.seqs, batch.num_tokens)])
        return forward(self, batch, drafts)

    monkeypatch.setattr(ModelRunner, "run", recording_run)
    return steps


def prefill_chunks(step) -> list[tuple[str, int, int]]:
    """(request, first position, tokens) of a recorded step's prefill chunks."""
    return [(r, start, n) for r, start, n, prompt, _ in step if start < prompt]


def six_prompts(llm) -> list[list[int]]:
    """Prompts of 300, 38, 129, 77, 211 and 53 tokens."""
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, llm.config.vocab_size, (n,), generator=g).tolist() for n in (300, 38, 129, 77, 211, 53)]


def assert_same_tokens_and_logprobs(outputs, expected, tol: float = 1e-4) -> None:
    """The same tokens, and each step's logprob and top entries (ids, and values within tol)."""
    for got, want in zip(outputs, expected, strict=True):
        got, want = got.outputs[0], want.outputs[0]
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= tol
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= tol


@pytest.fixture(scope="module", params=["dense", "moge"])
def llm(request, tiny_dense_dir, tiny_moge_dir):
    path = tiny_dense_dir if request.param == "dense" else tiny_moge_dir
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def alone(llm):
    """Each of the 24 mixed prompts run on its own: the reference for every batching test."""
    prompts = mixed_prompts(llm.config.vocab_size)
    return prompts, [token_ids(run(llm, [p], GREEDY, kv_cache_memory=8 << 20)[0])[0] for p in prompts]


def test_batched_greedy_equals_each_prompt_alone(llm, alone):
    prompts, expected = alone
    outs, engine = run(llm, prompts, GREEDY, kv_cache_memory=8 << 20, max_num_seqs=24)
    assert token_ids(outs) == expected
    assert engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_equals_unchunked(llm, monkeypatch):
    """Six prompts of 38 to 300 tokens under a 37-token step budget: every prompt is prefilled in
    several chunks that end mid-block (blocks of 16), steps share the budget between sequences.
    Tokens and fp32 logprobs equal those of whole-prompt prefills."""
    prompts = six_prompts(llm)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    steps = recorded_steps(monkeypatch)
    whole, _ = run(llm, prompts, params, kv_cache_memory=8 << 20, block_size=16)
    assert [len(prefill_chunks(step)) for step in steps if prefill_chunks(step)] == [len(prompts)]  # the reference: one prefill step
    steps.clear()
    chunked, _ = run(llm, prompts, params, kv_cache_memory=8 << 20, block_size=16, max_num_batched_tokens=37)
    chunks = [prefill_chunks(step) for step in steps]
    prefill = [c for step in chunks for c in step]
    assert all(sum(n for r, _, n in prefill if r == str(i)) == len(p) for i, p in enumerate(prompts))
    assert all(sum(r == str(i) for r, _, _ in prefill) >= 2 for i in range(len(prompts)))  # every prompt is split
    assert sum(start % 16 != 0 for _, start, _ in prefill) >= len(prompts)  # chunks that begin mid-block
    assert any(len(step) > 1 for step in chunks)  # a step holding chunks of two prompts
    assert_same_tokens_and_logprobs(chunked, whole)


def test_without_chunked_prefill_each_prompt_is_prefilled_whole_in_one_step(llm, monkeypatch):
    """enable_chunked_prefill=False (vLLM's): under a step budget that holds only some of the six
    prompts at once, each prompt is prefilled from its start to its end in one step, the later ones
    waiting for a step with room for all of theirs, beside the earlier ones' decodes. The tokens and
    logprobs equal those of all prompts prefilled in one step. The same budget with chunked
    prefill on splits prompts (what the setting changes)."""
    prompts = six_prompts(llm)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    recorded = recorded_steps(monkeypatch)
    whole, _ = run(llm, prompts, params, kv_cache_memory=8 << 20, block_size=16, enable_prefix_caching=False)
    recorded.clear()
    budget = dict(kv_cache_memory=8 << 20, block_size=16, max_model_len=320, max_num_batched_tokens=320, enable_prefix_caching=False)
    unchunked, _ = run(llm, prompts, params, enable_chunked_prefill=False, **budget)
    steps = [(prefill_chunks(step), len(step) - len(prefill_chunks(step))) for step in recorded]  # prefill chunks, decode rows
    prefill = [c for chunks, _ in steps for c in chunks]
    assert sorted(prefill) == sorted((str(i), 0, len(p)) for i, p in enumerate(prompts))  # each prompt once, whole
    assert sum(1 for chunks, _ in steps if chunks) >= 3  # 808 prompt tokens under a budget of 320
    assert any(chunks and decodes for chunks, decodes in steps)  # prefills beside decodes
    assert all(sum(n for _, _, n in chunks) + decodes <= 320 for chunks, decodes in steps)
    assert_same_tokens_and_logprobs(unchunked, whole)
    recorded.clear()
    run(llm, prompts, params, **budget)  # chunked prefill on (the default)
    assert any(start > 0 for step in recorded for _, start, _ in prefill_chunks(step))


def test_without_chunked_prefill_the_step_budget_holds_the_longest_prompt(llm):
    """vLLM's rule: without chunked prefill max_num_batched_tokens defaults to max(max_model_len,
    2048), and a smaller one given is a ValueError naming both (else a prompt of max_model_len
    tokens would wait forever)."""
    from pangu_infer.engine.engine import step_budget

    assert step_budget(EngineConfig(enable_chunked_prefill=False), 8192) == 8192
    assert step_budget(EngineConfig(enable_chunked_prefill=False), 512) == 2048
    assert step_budget(EngineConfig(), 8192) == 2048  # chunked: vLLM's 2048
    assert step_budget(EngineConfig(max_num_batched_tokens=300), 8192) == 300
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=100 is less than max_model_len=320 with enable_chunked_prefill=False"):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=320, enforce_eager=True))
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(enable_chunked_prefill=False, max_model_len=320, kv_cache_memory=8 << 20, enforce_eager=True))
    assert engine.engine_config.max_num_batched_tokens == 2048 and engine.scheduler.max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match=r"enable_chunked_prefill='no' must be True or False"):
        EngineConfig(enable_chunked_prefill="no")


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompts"])
def test_preemption_under_a_tiny_kv_budget_keeps_outputs(llm, alone, chunked, monkeypatch):
    """Without chunked prefill too: a prompt (or a preempted sequence's recomputation) waits for
    blocks for all its tokens, never taking a part of them."""
    prompts, expected = alone
    per_token = llm.config.kv_bytes_per_token(torch.float32)
    budget = per_token * 16 * 30  # 30 blocks of 16 tokens shared by 24 prompts of up to 308 tokens
    steps = recorded_steps(monkeypatch)
    outs, engine = run(llm, prompts, GREEDY, kv_cache_memory=budget, block_size=16, enable_chunked_prefill=chunked)
    assert token_ids(outs) == expected
    assert engine.stats()["num_preemptions"] > 0
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks
    if not chunked:  # no step left tokens of a sequence for a later one
        assert max(total - start - n for step in steps for _, start, n, _, total in step) == 0


def test_prefix_caching_equals_no_caching_and_counts_hits(llm):
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, llm.config.vocab_size, (70,), generator=g).tolist()
    prompts = [system + torch.randint(3, llm.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 20, 1)]
    cached, eng_on = run(llm, prompts, GREEDY, max_num_seqs=1, enable_prefix_caching=True, kv_cache_memory=8 << 20)
    plain, eng_off = run(llm, prompts, GREEDY, max_num_seqs=1, enable_prefix_caching=False, kv_cache_memory=8 << 20)
    assert token_ids(cached) == token_ids(plain)
    assert eng_on.stats()["prefix_cache_hits"] >= 3 * 64  # 4 full blocks of the system prompt, 3 times
    assert eng_off.stats()["prefix_cache_hits"] == 0
    assert cached[1].metrics["num_cached_tokens"] == 64


def test_seeded_sampling_is_independent_of_batch_composition(llm):
    prompts = mixed_prompts(llm.config.vocab_size, count=6, seed=1)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    alone_out = token_ids(run(llm, [prompts[0]], seeded)[0])[0]
    mixed, _ = run(llm, prompts[1:3] + [prompts[0]] + prompts[3:], [other, other, seeded, other, other, other])
    assert token_ids(mixed)[2] == alone_out


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = mixed_prompts(llm.config.vocab_size, count=2, seed=2)[1][:100]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)
    outs, engine = run(llm, [prompt], params, enable_prefix_caching=False, kv_cache_memory=8 << 20)
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) > 1
    assert engine.stats()["prefix_cache_hits"] >= 2 * 96  # forks reuse the parent's full prompt blocks


def test_abort_mid_stream_returns_every_block(llm):
    prompts = mixed_prompts(llm.config.vocab_size, count=8, seed=3)
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=8 << 20, enforce_eager=True))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    for i in range(0, 8, 2):
        assert engine.abort_request(str(i)).outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats()["kv_blocks_used"] == 0


def test_logprobs_are_the_log_softmax_of_the_model(llm):
    prompt = [1, 50, 60, 70]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 3
    seq = list(prompt)
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        ref = torch.log_softmax(llm.logits(seq)[-1], dim=-1)
        assert lp.token_id == tok and abs(lp.logprob - ref[tok].item()) < 1e-4
        assert [t for t, _ in lp.top] == ref.topk(4).indices.tolist()
        seq.append(tok)
    assert abs(comp.cumulative_logprob - sum(lp.logprob for lp in comp.logprobs)) < 1e-5


@pytest.mark.parametrize("form", ["kernel", "torch"])
def test_decode_attention_forms_give_the_full_forwards_tokens_and_logprobs(llm, form, monkeypatch):
    """Decode attention by the C kernel reading the paged cache in place (the default where it is
    the faster form, models/bi_attention_kernel.py) and by gathered K/V and two products: sequences
    of 1 to 300 tokens decoding together (padded to the longest context, masked), each token the
    full forward's argmax with its log-softmax."""
    from pangu_infer.models import bi_attention_kernel
    from pangu_infer.models.layers import DECODE_ATTENTION_ENV

    if form == "kernel" and not bi_attention_kernel.available():
        pytest.skip("no C compiler or no AVX2 here: the kernel does not run")
    monkeypatch.setenv(DECODE_ATTENTION_ENV, form)
    prompts = mixed_prompts(llm.config.vocab_size, count=8, seed=21)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True)
    outs, engine = run(llm, prompts, params, kv_cache_memory=8 << 20)
    assert engine.runner.decode_kernel == [form == "kernel"] * len(engine.runner.attention_layers)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for lp in out.outputs[0].logprobs:
            ref = torch.log_softmax(llm.logits(seq)[-1], dim=-1)
            assert lp.token_id == int(ref.argmax()) and abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
            seq.append(lp.token_id)


def test_stop_strings_cut_the_output(llm):
    full = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[3:6]
    assert stop and stop in full.text
    cut = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]


def test_requests_that_can_never_fit_are_rejected_at_submission(llm):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_memory=llm.config.kv_bytes_per_token(torch.float32) * 64, max_model_len=128, enforce_eager=True))
    with pytest.raises(RequestError, match="context of 128 tokens"):
        engine.add_request("a", [5] * 100, SamplingParams(max_tokens=40))
    with pytest.raises(RequestError, match="whole pool"):
        engine.add_request("b", [5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("c", [], SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("d", [llm.config.vocab_size], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_compiled_decode_equals_eager(llm, alone):
    """torch.compile'd decode steps (dynamic batch and context) give the eager greedy tokens, for a
    batch of 24 whose size and decode groups change as requests finish, and for one prompt alone."""
    prompts, expected = alone
    outs, engine = run(llm, prompts, GREEDY, kv_cache_memory=8 << 20, max_num_seqs=24, enforce_eager=False)
    assert token_ids(outs) == expected
    assert engine.runner.decode_forward is not None
    outs, _ = run(llm, prompts[:1], GREEDY, kv_cache_memory=8 << 20, enforce_eager=False)
    assert token_ids(outs) == expected[:1]


def test_compiled_decode_is_private_to_its_model(tmp_path, tiny_dense_config, pangu_tokenizer_dir):
    """Two models of different widths compiled in one process: each runs its own graphs (the
    compiled step drops the guards on weights, so sharing graphs would break the second one)."""
    from fixtures_models import build_tiny_model

    wide = dict(tiny_dense_config, hidden_size=2 * tiny_dense_config["hidden_size"])
    for i, config in enumerate((tiny_dense_config, wide)):
        path = build_tiny_model(tmp_path / str(i), config, pangu_tokenizer_dir, seed=i)
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
        prompts = mixed_prompts(config["vocab_size"], count=4, seed=i)
        eager, _ = run(llm, prompts, GREEDY, kv_cache_memory=4 << 20)
        compiled, _ = run(llm, prompts, GREEDY, kv_cache_memory=4 << 20, max_model_len=512, enforce_eager=False)
        assert token_ids(compiled) == token_ids(eager)


def test_compiled_decode_graphs_are_per_cache_size(tiny_dense_dir):
    """The cache shape is static in the compiled graphs and their guards are dropped, so an engine
    with another cache size over the same model gets graphs of its own, and both decode right."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    prompts = mixed_prompts(llm.config.vocab_size, count=3, seed=3)
    eager, _ = run(llm, prompts, GREEDY, kv_cache_memory=4 << 20)
    for kv in (4 << 20, 6 << 20, 4 << 20):
        compiled, _ = run(llm, prompts, GREEDY, kv_cache_memory=kv, max_model_len=512, enforce_eager=False)
        assert token_ids(compiled) == token_ids(eager)
    assert len(llm.model._compiled_decode_steps) == 2


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_two_engines_over_one_model_interleaved_equal_each_alone(tiny_dense_dir, enforce_eager):
    """Each engine owns its KV cache: steps of two engines over one model object, interleaved,
    give each engine's greedy tokens alone (a cache bound on the shared layers once, at engine
    creation, made the first engine read and write the second's)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    prompts = mixed_prompts(llm.config.vocab_size, count=6, seed=11)
    kwargs = dict(kv_cache_memory=4 << 20, max_model_len=512, enforce_eager=enforce_eager)
    alone = [token_ids(run(llm, half, GREEDY, **kwargs)[0]) for half in (prompts[:3], prompts[3:])]
    engines = [LLMEngine(llm.model, llm.tokenizer, EngineConfig(**kwargs), llm.generation_config) for _ in range(2)]
    assert all(e.runner.wait_compiled() != enforce_eager for e in engines)
    for engine, half in zip(engines, (prompts[:3], prompts[3:])):
        for i, ids in enumerate(half):
            engine.add_request(str(i), ids, GREEDY)
    final: list[dict] = [{}, {}]
    while any(e.has_unfinished_requests() for e in engines):
        for engine, done in zip(engines, final):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    assert [token_ids([done[str(i)] for i in range(3)]) for done in final] == alone


def test_one_sequence_decoding_across_the_unmasked_sdpa_limit_matches_full_forward(llm):
    """A lone sequence decodes with one unmasked SDPA call up to UNMASKED_SDPA_MAX_CONTEXT tokens and
    with the masked products beyond: every token on both sides is the full forward's argmax."""
    from pangu_infer.models.layers import UNMASKED_SDPA_MAX_CONTEXT as limit

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, llm.config.vocab_size, (limit - 3,), generator=g).tolist()
    outs, _ = run(llm, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), kv_cache_memory=8 << 20)
    ids = prompt + outs[0].outputs[0].token_ids
    for i in range(len(prompt), len(ids)):
        assert int(llm.logits(ids[:i])[-1].argmax()) == ids[i]


def test_a_cache_salt_keeps_prefix_cache_blocks_to_requests_with_the_same_salt(llm):
    """vLLM's cache_salt: a prompt's blocks serve only requests with the same salt (none is a salt of
    its own), so one tenant cannot find another's prompt in the cache, not even by its speed; the
    tokens are the same either way."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, llm.config.vocab_size, (70,), generator=g).tolist()
    order = [None, None, "tenant-a", "tenant-a", "tenant-b", None]
    cached, tokens = [], []
    for salt in order:
        prompt = {"prompt_token_ids": ids} if salt is None else {"prompt_token_ids": ids, "cache_salt": salt}
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        cached.append(out.metrics["num_cached_tokens"])
        tokens.append(out.outputs[0].token_ids)
    assert cached == [0, 64, 0, 64, 0, 64]
    assert all(t == tokens[0] for t in tokens)
    for bad in ("", 5, "x" * 2000):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate({"prompt_token_ids": ids, "cache_salt": bad}, GREEDY, use_tqdm=False)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", "x", r"seed='x' must be an integer in \[-9223372036854775808, 9223372036854775807\] or None"),
    ("seed", 1.5, r"seed=1\.5 must be an integer"),
    ("seed", True, r"seed=True must be an integer"),
    ("seed", 2**64, r"seed=<an integer of 65 bits> must be an integer in"),
    ("enforce_eager", "no", r"enforce_eager='no' must be True or False"),
    ("enable_prefix_caching", "no", r"enable_prefix_caching='no' must be True or False"),
    ("max_model_len", True, r"max_model_len=True must be a positive integer"),
])
def test_an_engine_field_of_the_wrong_type_is_a_value_error_naming_it(field, value, message):
    """A str, float or bool seed was torch's RuntimeError from manual_seed once the model had loaded,
    one past int64 an unnamed "Overflow when unpacking long long"; enforce_eager and
    enable_prefix_caching "no" were taken as true (prefix caching on), max_model_len True as 1."""
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


def test_a_max_model_len_past_the_models_context_is_refused_naming_both(llm):
    """max_model_len 10**9 on a model of 2048 positions was cut to 2048 without a word (vLLM refuses
    it too); the model's own length is taken."""
    context = llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"max_model_len={context + 1} is more than the model's context of {context} tokens"):
        LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_model_len=context + 1, kv_cache_memory=8 << 20, enforce_eager=True))
    assert LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_model_len=context, kv_cache_memory=8 << 20, enforce_eager=True)).max_model_len == context


def test_calls_from_two_threads_on_one_llm_each_get_their_own_outputs(llm):
    """Two threads calling generate (or stream) on one LLM at once: each call's step loop took the
    other's outputs, so one raised KeyError and the other waited forever for outputs already taken."""
    import threading

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batches = [[{"prompt_token_ids": [5 + i, 6, 7]} for i in range(3)], [{"prompt_token_ids": [50 + i, 60, 70, 80]} for i in range(3)]]
    alone = [token_ids(llm.generate(b, params, use_tqdm=False)) for b in batches]
    streamed_alone = [o.outputs[0].token_ids for o in llm.stream({"prompt_token_ids": [9, 8, 7]}, params)][-1]
    got: dict = {}

    def call(k):
        try:
            if k < 2:
                got[k] = token_ids(llm.generate(batches[k], params, use_tqdm=False))
            else:
                got[k] = [o.outputs[0].token_ids for o in llm.stream({"prompt_token_ids": [9, 8, 7]}, params)][-1]
        except BaseException as e:  # (reported below)
            got[k] = repr(e)

    for _ in range(3):
        threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a call never returned"
        assert got == {0: alone[0], 1: alone[1], 2: streamed_alone}
        assert not llm.engine.has_unfinished_requests()
