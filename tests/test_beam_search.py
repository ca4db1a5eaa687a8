"""Beam search (vLLM's LLM.beam_search / BeamSearchParams, and the server's use_beam_search).

The external reference is transformers' beam search over LlamaForCausalLM holding the tiny model's
weights. The two algorithms agree exactly where no beam ends: transformers ranks the beam x vocab
continuations and keeps the best num_beams, vLLM's takes each beam's 2 * beam_width best tokens and
keeps the best beam_width of their union, the same set (a global top-k element is in its own beam's
top k); and at the end all beams have one length, so any length penalty keeps their order. Where
beams end at EOS they differ by definition (vLLM counts the prompt in the length and keeps every
ended candidate; transformers counts generated tokens with the EOS, keeps only EOS candidates
ranked within num_beams, and stops early), so the comparison runs with EOS never ending a beam:
ignore_eos on our side, eos_token_id None on transformers' (its generation config has none), and
early_stopping at its default. transformers' sequences_scores (cumulative logprob / generated
length ** length_penalty) check our cum_logprob too.

EOS handling follows vLLM's definition (vllm/entrypoints/llm.py, get_beam_search_score); it is
checked against a search written here over full forwards without the KV cache (LLM.logits), with
an EOS id chosen so that beams do end, at several length penalties.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from pangu_infer import LLM, BeamSearchOutput, BeamSearchParams, SamplingParams
from pangu_infer.loader.random import random_state_dict, transformers_llama

PROMPTS = [[1, 5, 9, 200, 17, 33, 8, 412, 77], [1] + list(range(40, 60)), [1, 999, 3]]
BLOCK = 4  # a small block size: beams cross block boundaries within a few tokens


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, block_size=BLOCK)


@pytest.fixture(scope="module")
def reference(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


def _no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert all(c == 0 for c in engine.pool.ref_count)


def _transformers_beams(reference, ids, k, steps, length_penalty=1.0):
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=steps,
            length_penalty=length_penalty, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        )
    return [row[len(ids):].tolist() for row in out.sequences], out.sequences_scores.tolist()


@pytest.mark.parametrize("k", [2, 4])
def test_beams_match_transformers(llm, reference, k):
    steps = 7
    params = BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True, length_penalty=1.0)
    outs = llm.beam_search([{"prompt_token_ids": ids} for ids in PROMPTS], params)
    assert len(outs) == len(PROMPTS) and all(isinstance(o, BeamSearchOutput) for o in outs)
    for ids, out in zip(PROMPTS, outs):
        want, scores = _transformers_beams(reference, ids, k, steps)
        assert [s.output_token_ids for s in out.sequences] == want
        for seq, score in zip(out.sequences, scores):
            assert seq.tokens[: len(ids)] == ids and len(seq.tokens) == len(ids) + steps  # vLLM's: the prompt included
            assert seq.cum_logprob / steps == pytest.approx(score, abs=1e-4)
            assert seq.finish_reason == "length" and seq.stop_reason is None
            assert seq.text == llm.tokenizer.decode(seq.tokens)
            assert len(seq.logprobs) == steps and all(len(c) >= 2 * k for c in seq.logprobs)
    _no_leak(llm)


def test_concurrency_limit_runs_prompts_in_groups_with_the_same_beams(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in PROMPTS]
    together = llm.beam_search(prompts, params)
    steps = llm.engine.num_steps
    grouped = llm.beam_search(prompts, params, concurrency_limit=2)
    assert llm.engine.num_steps - steps == 2 * params.max_tokens  # two groups, one after the other
    assert [[s.tokens for s in o.sequences] for o in grouped] == [[s.tokens for s in o.sequences] for o in together]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="concurrency_limit"):
            llm.beam_search(prompts, params, concurrency_limit=bad)
    _no_leak(llm)


def _count_forwarded(llm, monkeypatch) -> list[int]:
    """The tokens each engine step forwards, from now on."""
    runner, forwarded = llm.engine.runner, []
    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda batch, drafts=None: forwarded.append(batch.total_tokens) or real_run(batch, drafts))
    return forwarded


@pytest.mark.parametrize("prompt_len", [41, 44])  # a partly filled last block, and none
def test_each_beam_step_forwards_one_token_a_beam(llm, monkeypatch, prompt_len):
    """All prompts' beams run together (one engine step per beam step), and each beam's request
    finds its prefix cached: its full blocks in the prefix cache, and the partly filled block its
    parent's request left copied into its own (a fresh block, since siblings write it apart), so it
    forwards its one new token only: a decode row."""
    engine = llm.engine
    prompt = list(range(5 * prompt_len, 6 * prompt_len))  # (in no other test)
    k, steps = 3, 6
    forwarded = _count_forwarded(llm, monkeypatch)
    out = llm.beam_search([{"prompt_token_ids": prompt}, {"prompt_token_ids": PROMPTS[0]}],
                          BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True))
    assert len(forwarded) == steps  # both prompts' beams in each step
    assert forwarded[0] <= prompt_len + len(PROMPTS[0]) and forwarded[1:] == [2 * k] * (steps - 1)
    monkeypatch.undo()
    alone = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True),
                            concurrency_limit=1)
    assert [s.tokens for s in out[0].sequences] == [s.tokens for s in alone[0].sequences]
    assert engine.pool.partial_of_key  # (named partial blocks stay findable while free)
    _no_leak(llm)


def test_beam_steps_share_their_prefix_with_prefix_caching_off(tiny_dense_dir, reference, monkeypatch):
    """As an n>1 request's forks do: each step's requests look their prefix up even where the
    operator turned prefix caching off, so no step computes a beam's whole prefix again."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, block_size=BLOCK,
              enable_prefix_caching=False)
    pool = llm.engine.pool
    forwarded = _count_forwarded(llm, monkeypatch)
    prompt, k, steps = list(range(100, 141)), 2, 6
    out = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True))[0]
    assert [s.output_token_ids for s in out.sequences] == _transformers_beams(reference, prompt, k, steps)[0]
    assert forwarded == [len(prompt)] + [k] * (steps - 1)  # (every prefix again: 41, 2 * 42, ..., 2 * 46)
    _no_leak(llm)
    # and an ordinary request still takes no hit
    hits = pool.prefix_hits
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert pool.prefix_hits == hits


def test_beam_search_with_a_draft_model_keeps_the_beams(llm, tiny_dense_dir):
    """A draft model pages its KV by the target's blocks: a beam whose partial block was copied
    has the draft compute that part itself (its draft_computed stops at the full blocks)."""
    spec = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, block_size=BLOCK,
               speculative_model=str(tiny_dense_dir), num_speculative_tokens=2)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in PROMPTS]
    want = [[s.tokens for s in o.sequences] for o in llm.beam_search(prompts, params)]
    assert [[s.tokens for s in o.sequences] for o in spec.beam_search(prompts, params)] == want
    # and its draft cache stays whole: greedy text with drafts is the target's own afterwards
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, greedy, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    _no_leak(spec)


def _seq(seq_id, tokens, share=True):
    from pangu_infer.engine.sequence import Sequence

    seq = Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams(max_tokens=1), None, None)
    seq.share_prefix = share
    return seq


def test_a_partial_block_serves_only_while_it_is_unused_and_only_its_own_tokens():
    from pangu_infer.engine.kv_cache import BlockPool

    pool = BlockPool(num_blocks=6, block_size=4, enable_prefix_caching=False)
    parent = _seq(0, range(10, 20))  # 10 tokens: 2 full blocks and 2 slots of a third
    pool.match_prefix(parent, force=True)
    pool.allocate(parent, 10)
    parent.num_computed_tokens = 10
    pool.register_full_blocks(parent)
    tail = parent.block_table[2]
    pool.release(parent)
    # a child of the same tokens and one more: 2 full blocks hit, the tail's 2 slots to copy, 1 token to compute
    child = _seq(1, list(range(10, 20)) + [7])
    pool.match_prefix(child, force=True)
    assert child.num_computed_tokens == 10 and child.partial_source == (tail, 2)
    pool.allocate(child, 1)
    assert pool.take_partial_copies([child]) == [(tail, child.block_table[2], 2)] and child.block_table[2] != tail
    pool.release_partial_sources([child])
    pool.release(child)
    # other tokens in the tail, or no share_prefix: no match
    for other in (_seq(2, list(range(10, 19)) + [99, 7]), _seq(3, list(range(10, 20)) + [7], share=False)):
        pool.match_prefix(other, force=True)
        assert other.partial_source is None and other.num_computed_tokens == 8
        pool.release(other)
    # the tail block handed out to another sequence (the full blocks kept): the name is gone
    keeper = _seq(6, list(range(10, 18)) + [1], share=False)
    pool.match_prefix(keeper, force=True)
    assert keeper.num_computed_tokens == 8
    hog = _seq(4, range(500, 516), share=False)
    pool.allocate(hog, 16)
    assert tail in hog.block_table
    pool.release(hog)
    late = _seq(5, list(range(10, 20)) + [7])
    pool.match_prefix(late, force=True)
    assert late.partial_source is None and late.num_computed_tokens == 8
    pool.release(late)
    pool.release(keeper)
    assert pool.num_free_blocks == 6 and not any(pool.ref_count)


def _search_by_full_forwards(llm, ids, k, steps, eos, length_penalty):
    """vLLM's beam search written out over LLM.logits (no KV cache): (generated tokens, ended) best first."""
    beams = [([], 0.0)]
    done = []
    for _ in range(steps):
        cands = []
        for gen, cum in beams:
            lp = llm.logits(ids + gen)[-1].log_softmax(-1)
            values, tokens = lp.topk(2 * k)
            for t, v in zip(tokens.tolist(), values.tolist()):
                (done if t == eos else cands).append((gen + [t], cum + v))
        cands.sort(key=lambda c: c[1], reverse=True)
        beams = cands[:k]
        if not beams:
            break

    def score(item, ended):
        gen, cum = item
        return cum / ((len(ids) + len(gen) - (1 if ended else 0)) ** length_penalty)

    ranked = sorted([(score(d, True), d[0], True) for d in done] + [(score(b, False), b[0], False) for b in beams],
                    key=lambda r: r[0], reverse=True)
    return [(gen, ended) for _, gen, ended in ranked[:k]]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_eos_ends_beams_as_vllm_scores_them(llm, monkeypatch, length_penalty):
    ids, k, steps = PROMPTS[0], 3, 6
    # an EOS that the beams meet: the second most likely first token of this prompt
    eos = int(llm.logits(ids)[-1].topk(2).indices[1])
    monkeypatch.setattr(llm.engine, "eos_token_ids", {eos})
    want = _search_by_full_forwards(llm, ids, k, steps, eos, length_penalty)
    assert any(ended for _, ended in want)  # the case is the one meant
    for include in (False, True):
        out = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(
            beam_width=k, max_tokens=steps, length_penalty=length_penalty, include_stop_str_in_output=include))[0]
        got = [(s.tokens[len(ids):] + ([eos] if s.finish_reason == "stop" and not include else []), s.finish_reason == "stop")
               for s in out.sequences]
        assert got == want
        for s in out.sequences:
            if s.finish_reason == "stop":
                assert s.stop_reason == eos and (s.tokens[-1] == eos) == include
        scores = [s.score for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
    _no_leak(llm)


def test_temperature_adds_the_drawn_token_as_a_candidate(llm):
    """vLLM's: with temperature > 0 each beam's drawn token joins its 2 * beam_width candidates; at
    a temperature so high that draws are near uniform, some step's candidates hold one more token."""
    out = llm.beam_search({"prompt_token_ids": PROMPTS[1]}, BeamSearchParams(beam_width=2, max_tokens=8, temperature=50.0,
                                                                               ignore_eos=True))[0]
    sizes = {len(c) for s in out.sequences for c in s.logprobs}
    assert sizes <= {4, 5} and 5 in sizes
    _no_leak(llm)


def test_a_failed_step_leaves_nothing_in_the_engine(llm, monkeypatch):
    engine = llm.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        llm.beam_search([{"prompt_token_ids": ids} for ids in PROMPTS], BeamSearchParams(beam_width=3, max_tokens=6))
    monkeypatch.undo()
    _no_leak(llm)
    # and the engine serves as before
    ok = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("field, value", [
    ("beam_width", 0), ("beam_width", 11), ("beam_width", True), ("beam_width", "2"), ("max_tokens", 0), ("max_tokens", 2.0),
    ("length_penalty", math.nan), ("length_penalty", "1"), ("temperature", -0.5), ("ignore_eos", 1),
])
def test_bad_params_are_value_errors_naming_the_field(field, value):
    kwargs = {"beam_width": 2, "max_tokens": 4, field: value}
    with pytest.raises(ValueError, match=field) as info:
        BeamSearchParams(**kwargs)
    assert info.value.param == field


def test_a_prompt_too_long_for_max_tokens_is_refused_before_any_step(llm):
    steps = llm.engine.num_steps
    room = llm.engine.max_model_len - len(PROMPTS[0])
    with pytest.raises(ValueError, match="max_tokens") as info:
        llm.beam_search([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}],
                        BeamSearchParams(beam_width=2, max_tokens=room))  # (room for the first prompt only)
    assert info.value.param == "max_tokens" and "prompt 1" in str(info.value)
    assert llm.engine.num_steps == steps
    with pytest.raises(ValueError, match="params"):
        llm.beam_search("hello", SamplingParams(n=2))
    _no_leak(llm)


def _one(engine, rid, ids, params=None):
    """One share_prefix request (a beam step's) run to its end on `engine` alone: its final output."""
    engine.add_request(rid, ids, params or SamplingParams(max_tokens=1, temperature=0, logprobs=4), share_prefix=True)
    for _ in range(50):
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
    raise AssertionError(f"request {rid} did not finish in 50 steps: {len(engine.scheduler.waiting)} waiting, "
                         f"{engine.pool.num_free_blocks} of {engine.pool.num_blocks} blocks free")


def test_a_beam_step_that_fills_the_kv_pool_gives_its_partial_block_up(tiny_dense_dir):
    """A beam step whose tokens take the whole KV pool (a prompt and max_tokens as long as the pool,
    which admission allows) cannot hold its parent's partly filled block as well as a block of its
    own to copy it into: it computes those slots instead, rather than waiting for a free block forever
    (the engine stepped on with nothing to run)."""
    small = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, block_size=BLOCK, max_model_len=4 * BLOCK, max_num_seqs=1)
    engine = small.engine
    assert engine.pool.num_blocks == 4
    prompt = PROMPTS[1][:13]  # 3 full blocks and 1 slot of the fourth
    first = _one(engine, "a", prompt)
    child = prompt + list(first.outputs[0].token_ids)  # 14 tokens: the 3 blocks cached, 1 slot in the parent's partial block
    hits = engine.pool.prefix_hits
    second = _one(engine, "b", child)
    assert engine.pool.prefix_hits - hits == 3 * BLOCK  # the dropped slot is not counted as a hit
    want = small.logits(child)[-1].log_softmax(-1)
    assert second.outputs[0].logprobs[0].logprob == pytest.approx(float(want[second.outputs[0].token_ids[0]]), abs=1e-4)
    # and the whole search, as greedy decoding (one beam: its best candidate each step)
    params = BeamSearchParams(beam_width=1, max_tokens=4 * BLOCK - 10, ignore_eos=True)
    beams = small.beam_search({"prompt_token_ids": PROMPTS[1][:10]}, params)[0].sequences
    greedy = small.generate({"prompt_token_ids": PROMPTS[1][:10]}, SamplingParams(temperature=0, max_tokens=params.max_tokens,
                                                                                    ignore_eos=True), use_tqdm=False)
    assert beams[0].output_token_ids == list(greedy[0].outputs[0].token_ids)
    _no_leak(small)


def test_a_partial_copy_that_fails_leaves_its_block_unnamed(llm, monkeypatch):
    """A step whose partial-block copy fails ends the requests it was for; the block that copy was
    writing holds no valid K and V, so it must not be named for later steps (a later beam that
    extends the same tokens would copy it and score its candidates from garbage)."""
    engine = llm.engine
    prompt = [1, 77, 300, 41, 900, 12]  # 1 full block and 2 slots (in no other test)
    parent = _one(engine, "partial-parent", prompt)
    child = prompt + list(parent.outputs[0].token_ids)
    right = _one(engine, "partial-right", child).outputs[0].logprobs[0]
    runner = engine.runner

    def failing_copy(copies):  # fails midway: some destination slots written, wrongly
        dst = torch.tensor([d * BLOCK + j for _, d, m in copies for j in range(m)])
        for cache in runner.k_caches:
            cache[dst] = 7.0
        raise RuntimeError("injected copy failure")

    monkeypatch.setattr(runner, "copy_slots", failing_copy)
    failed = _one(engine, "partial-failed", child)
    assert failed.error is not None
    monkeypatch.undo()
    again = _one(engine, "partial-again", child).outputs[0].logprobs[0]
    assert again.token_id == right.token_id and again.logprob == pytest.approx(right.logprob, abs=1e-5)
    assert [t for t, _ in again.top] == [t for t, _ in right.top]
    _no_leak(llm)


@pytest.mark.parametrize("length_penalty", [400.0, -400.0, 1e6])
def test_a_length_penalty_past_the_float_range_ranks_as_its_exact_score(llm, length_penalty):
    """cum_logprob / length ** length_penalty with a power past the float range (a 9-token prompt:
    9 ** 400 is about 10 ** 381): the beams ranked by the exact value of that score (computed here
    in decimal arithmetic), not an OverflowError or ZeroDivisionError."""
    from decimal import MAX_EMAX, MIN_EMIN, Decimal, localcontext

    from pangu_infer.engine.beam_search import BeamSearch
    from pangu_infer.engine.sequence import Logprob

    ids = PROMPTS[0]
    params = BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=length_penalty, ignore_eos=True)
    plain = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True))[0]
    got = llm.beam_search({"prompt_token_ids": ids}, params)[0]
    # ignore_eos: every beam has one length at the end, so any penalty keeps the cumulative order
    assert [s.tokens for s in got.sequences] == [s.tokens for s in plain.sequences]
    # beams of different lengths (ended ones) ranked by the exact score
    search = BeamSearch(ids, BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=length_penalty), eos_token_ids={5})
    search.advance([Logprob(5, -0.5, [(5, -0.5), (6, -0.25)])])  # one beam ends at once (length 9), one goes on
    search.advance([Logprob(7, -0.125, [(7, -0.125), (8, -3.0)])])  # (length 11, then)
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 50, MAX_EMAX, MIN_EMIN

        def exact(cum, length):
            return Decimal(cum) / Decimal(length) ** Decimal(length_penalty)

        want = sorted([(exact(-0.5, 9), [5]), (exact(-0.375, 11), [6, 7]), (exact(-3.25, 11), [6, 8])], reverse=True)[:2]
    out = search.output(None).sequences
    assert [s.output_token_ids for s in out] == [gen if gen != [5] else [] for _, gen in want]
    assert all(math.isfinite(s.score) or s.score == -math.inf for s in out)


# ---------------------------------------------------------------------- server
def _decode(llm, ids):
    return llm.tokenizer.decode(ids)


def test_completions_use_beam_search_returns_the_n_best_beams(client, llm):
    k, steps = 3, 5
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=k, max_tokens=steps, temperature=0,
                                    extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5})
    # offline on the LLM the server drives (through its engine thread)
    want = llm.beam_search([{"prompt_token_ids": ids} for ids in PROMPTS[:2]],
                           BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True, length_penalty=0.5))
    texts = [_decode(llm, s.output_token_ids) for out in want for s in out.sequences]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == texts
    assert len(set(texts[:k])) == k  # distinct beams
    assert all(c.finish_reason == "length" for c in got.choices)
    assert got.usage.completion_tokens == 2 * k * steps
    # streamed: each choice whole in one chunk, then its end, as vLLM's server streams a beam search
    stream = client.completions.create(model="tiny", prompt=PROMPTS[:2], n=k, max_tokens=steps, temperature=0, stream=True,
                                       extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5})
    streamed: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(2 * k)] == texts
    _no_leak(llm)


def test_chat_use_beam_search(client, llm):
    k, steps = 2, 4
    messages = [{"role": "user", "content": "tell me about the weather"}]
    got = client.chat.completions.create(model="tiny", messages=messages, n=k, max_tokens=steps, temperature=0,
                                         extra_body={"use_beam_search": True, "ignore_eos": True,
                                                     "chat_template_kwargs": {"enable_thinking": False}})
    prompt = llm.encode_prompt(llm.render_chat(messages, enable_thinking=False))
    want = llm.beam_search({"prompt_token_ids": prompt}, BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True,
                                                                          temperature=0.0))[0]
    assert len(got.choices) == k
    assert got.usage.completion_tokens == k * steps
    for choice, seq in zip(got.choices, want.sequences):
        assert choice.finish_reason == "length"
        assert choice.message.content == llm.tokenizer.decode(seq.output_token_ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, n=k, max_tokens=steps, temperature=0, stream=True,
                                            extra_body={"use_beam_search": True, "ignore_eos": True,
                                                        "chat_template_kwargs": {"enable_thinking": False}})
    streamed: dict[int, str] = {}
    reasons = {}
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert [streamed[i] for i in range(k)] == [c.message.content for c in got.choices]
    assert reasons == {i: "length" for i in range(k)}
    _no_leak(llm)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 2}, "logprobs"),
    ({"stop": ["x"]}, "stop"),
    ({"seed": 3}, "seed"),
    ({"top_p": 0.5}, "top_p"),
    ({"logprobs": 0}, "logprobs"),  # (completions' logprobs 0: the chosen token's logprob)
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ({"n": 11}, "n"),
    ({"max_tokens": 10**6}, "max_tokens"),
])
def test_completions_beam_search_refuses_what_it_cannot_honour(http, llm, extra, param):
    body = {"model": "tiny", "prompt": PROMPTS[0], "n": 2, "max_tokens": 4, "use_beam_search": True, **extra}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    _no_leak(llm)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sampling_values_that_change_nothing_are_taken_with_beam_search(http, llm, path):
    """Clients such as LangChain's send the sampling defaults with every request: top_p 1, penalties
    0, top_k -1, an empty stop list, chat's logprobs false. They change nothing, so use_beam_search
    answers as without them (vLLM takes them); other values of those fields stay a 400."""
    body = {"model": "tiny", "n": 2, "max_tokens": 3, "temperature": 0, "use_beam_search": True, "ignore_eos": True}
    body |= {"prompt": PROMPTS[0]} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}}
    plain = http.post(path, json=body)
    assert plain.status_code == 200, plain.text
    neutral = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "top_k": -1, "min_p": 0, "repetition_penalty": 1.0,
               "min_tokens": 0, "stop": [], "logit_bias": {}}
    neutral |= {"logprobs": False} if path == "/v1/chat/completions" else {"echo": False}
    got = http.post(path, json=body | neutral)
    assert got.status_code == 200, got.text

    def texts(r):
        return [c.get("text", c.get("message", {}).get("content")) for c in r.json()["choices"]]

    assert texts(got) == texts(plain)
    _no_leak(llm)


def test_bad_length_penalty_and_length_penalty_without_beam_search(http):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "use_beam_search": True, "length_penalty": "x"})
    assert r.status_code == 400 and "length_penalty" in r.text
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "length_penalty": 2.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "length_penalty"
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                "use_beam_search": True, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_other_requests_run_unaffected_beside_a_beam_search(http, llm):
    greedy = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = http.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    results: dict[str, object] = {}

    def beam():
        results["beam"] = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[1], "n": 4, "max_tokens": 80,
                                                             "temperature": 0, "use_beam_search": True, "ignore_eos": True})

    t = threading.Thread(target=beam)
    t.start()
    while not llm.engine.requests and t.is_alive():  # (read from here: a glance, not a step)
        time.sleep(0.001)
    beside = [http.post("/v1/completions", json=greedy).json()["choices"][0]["text"] for _ in range(3)]
    overlapped = t.is_alive()
    t.join()
    assert overlapped  # the greedy requests ran while the beam search did
    assert beside == [alone] * 3
    assert results["beam"].status_code == 200 and len(results["beam"].json()["choices"]) == 4
    _no_leak(llm)


def test_stream_of_a_beam_search_sends_its_error_as_sse_after_the_200(http):
    """A refused request is a 400 before any byte, streamed or not."""
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "n": 2, "max_tokens": 10**6, "stream": True,
                                           "use_beam_search": True})
    assert r.status_code == 400 and json.loads(r.text)["error"]["param"] == "max_tokens"


def test_a_beam_search_cancelled_midway_frees_every_block(http, llm):
    """The client leaves during a server's beam search (its task cancelled, as unless_gone cancels it):
    the beam requests of the step in flight end, no later step starts, and no block stays held."""
    import asyncio

    from pangu_infer.engine.beam_search import beam_search_stream

    driver = llm.engine.driver  # the AsyncEngine the app runs

    async def scenario():
        before = await driver.call(lambda e: e.num_steps)
        search = beam_search_stream(driver, PROMPTS[1], BeamSearchParams(beam_width=4, max_tokens=200, ignore_eos=True), "cancelled")
        task = asyncio.ensure_future(search.__anext__())
        # a few of its 200 steps in (counted: polling for requests in flight could keep landing
        # between two steps, where none are, on a loaded machine, until the search had ended)
        while await driver.call(lambda e: e.num_steps) < before + 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        steps = await driver.call(lambda e: e.num_steps)
        await asyncio.sleep(0.2)  # the search goes no further
        return steps, await driver.call(lambda e: (e.num_steps, dict(e.requests), e.pool.num_free_blocks, e.pool.num_blocks))

    steps, (steps_later, requests, free, total) = asyncio.run(scenario())
    assert steps_later == steps and not requests and free == total


def test_a_prompt_that_fills_the_context_is_a_400_naming_the_prompt(http, llm):
    """No max_tokens (null: the rest of the context) after a prompt that leaves none."""
    prompt = [1] + [7] * (llm.engine.max_model_len - 1)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": None, "use_beam_search": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "context" in r.json()["error"]["message"]
    _no_leak(llm)


def test_a_length_penalty_past_the_float_range_is_no_server_error(http):
    for penalty in (400.0, -400.0, 1e300):
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "n": 2, "max_tokens": 3, "temperature": 0,
                                               "use_beam_search": True, "length_penalty": penalty, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2


def test_a_prompt_that_does_not_fit_refuses_the_request_before_any_beam_step(http, llm):
    """Several prompts, the second too long for max_tokens: the 400 comes before any step, not after
    the first prompt's whole beam search has run."""
    steps = llm.engine.num_steps
    long = [1] + [7] * (llm.engine.max_model_len - 5)  # room for 4 tokens
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [PROMPTS[2], long], "n": 2, "max_tokens": 5,
                                           "use_beam_search": True, "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert llm.engine.num_steps == steps
    _no_leak(llm)
