"""Admission: every field a request carries is checked against the model before any step runs.

The Python API raises RequestError (a ValueError) whose `param` and message name the field, and a
rejected request leaves nothing behind in the engine. Also here: near-zero temperatures are
greedy, and a prefix-cache hit needs the same tokens, not only the same hash.
"""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine import kv_cache
from pangu_infer.engine.sampler import Sampler, SamplingRow
from pangu_infer.errors import RequestError

CONTEXT = 64
MAX_SEQS = 4


@pytest.fixture(scope="module")
def llm(tiny_dense_dir) -> LLM:
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, max_model_len=CONTEXT, max_num_seqs=MAX_SEQS, enforce_eager=True)


def _assert_engine_empty(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats["num_waiting"] == stats["num_running"] == stats["kv_blocks_used"] == 0


def _mutated(**fields) -> SamplingParams:
    """Valid when built, changed afterwards: admission must check the request's values again."""
    params = SamplingParams(temperature=0, max_tokens=4)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


# (case id, prompt token ids, sampling params, the field named): both as functions of the vocabulary size
CASES = [
    ("id-past-vocab", lambda v: [5, v], lambda v: SamplingParams(max_tokens=4), "prompt"),
    ("negative-id", lambda v: [5, -1], lambda v: SamplingParams(max_tokens=4), "prompt"),
    ("bool-id", lambda v: [5, True], lambda v: SamplingParams(max_tokens=4), "prompt"),
    ("huge-id", lambda v: [10**5000], lambda v: SamplingParams(max_tokens=4), "prompt"),
    ("empty-prompt", lambda v: [], lambda v: SamplingParams(max_tokens=4), "prompt"),
    ("prompt-of-exactly-the-context", lambda v: [5] * CONTEXT, lambda v: SamplingParams(max_tokens=None), "prompt"),
    ("prompt-over-the-context", lambda v: [5] * (CONTEXT + 1), lambda v: SamplingParams(max_tokens=1), "prompt"),
    ("prompt-plus-max-tokens-over", lambda v: [5] * (CONTEXT - 1), lambda v: SamplingParams(max_tokens=2), "max_tokens"),
    ("huge-max-tokens", lambda v: [5], lambda v: SamplingParams(max_tokens=10**5000), "max_tokens"),
    ("max-tokens-zero", lambda v: [5], lambda v: SamplingParams(max_tokens=0), "max_tokens"),
    ("min-tokens-past-the-room-left", lambda v: [5] * 10, lambda v: SamplingParams(max_tokens=None, min_tokens=CONTEXT), "min_tokens"),
    ("issue-14-stop-token-id", lambda v: [5, 6], lambda v: SamplingParams(stop_token_ids=[1000000000], min_tokens=2), "stop_token_ids"),
    ("stop-token-id-at-vocab", lambda v: [5, 6], lambda v: SamplingParams(stop_token_ids=[v]), "stop_token_ids"),
    ("stop-token-id-negative", lambda v: [5, 6], lambda v: SamplingParams(stop_token_ids=[-3]), "stop_token_ids"),
    ("too-many-stop-token-ids", lambda v: [5, 6], lambda v: SamplingParams(stop_token_ids=[1] * 5000), "stop_token_ids"),
    ("too-many-stop-strings", lambda v: [5, 6], lambda v: SamplingParams(stop=[f"s{i}" for i in range(17)]), "stop"),
    ("empty-stop-string", lambda v: [5, 6], lambda v: SamplingParams(stop=[""]), "stop"),
    ("n-over-max-num-seqs", lambda v: [5, 6], lambda v: SamplingParams(n=MAX_SEQS + 1), "n"),
    ("huge-n", lambda v: [5, 6], lambda v: SamplingParams(n=10**12), "n"),
    ("logprobs-over-20", lambda v: [5, 6], lambda v: SamplingParams(logprobs=21), "logprobs"),
    ("seed-past-int64", lambda v: [5, 6], lambda v: SamplingParams(seed=2**64), "seed"),
    ("temperature-inf", lambda v: [5, 6], lambda v: SamplingParams(temperature=float("inf")), "temperature"),
    ("temperature-nan", lambda v: [5, 6], lambda v: SamplingParams(temperature=float("nan")), "temperature"),
    ("repetition-penalty-inf", lambda v: [5, 6], lambda v: SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
    ("ignore-eos-not-bool", lambda v: [5, 6], lambda v: SamplingParams(ignore_eos="yes"), "ignore_eos"),
    ("changed-after-build-logprobs", lambda v: [5, 6], lambda v: _mutated(logprobs=10**6), "logprobs"),
    ("changed-after-build-stop-ids", lambda v: [5, 6], lambda v: _mutated(stop_token_ids=[10**9]), "stop_token_ids"),
    ("changed-after-build-n", lambda v: [5, 6], lambda v: _mutated(n=10**9), "n"),
]


@pytest.mark.parametrize(("prompt", "params", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_field_is_a_value_error_naming_it_and_leaves_nothing_queued(llm, prompt, params, field):
    vocab = llm.config.vocab_size
    with pytest.raises(ValueError) as info:
        llm.generate({"prompt_token_ids": prompt(vocab)}, params(vocab), use_tqdm=False)
    assert isinstance(info.value, RequestError) and info.value.param == field, repr(info.value)
    assert field in str(info.value) and len(str(info.value)) < 400
    _assert_engine_empty(llm)


def test_the_engine_rejects_the_issue_14_request_and_keeps_serving(llm):
    engine = llm.engine
    with pytest.raises(RequestError, match="stop_token_ids holds 1000000000, outside the vocabulary") as info:
        engine.add_request("bad", [5, 6, 7], SamplingParams(stop_token_ids=[1000000000], min_tokens=2))
    assert info.value.param == "stop_token_ids"
    _assert_engine_empty(llm)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, min_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_prompt_of_one_less_than_the_context_gets_one_token(llm):
    out = llm.generate({"prompt_token_ids": [5] * (CONTEXT - 1)}, SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_a_rejected_prompt_leaves_no_earlier_prompt_of_the_call_queued(llm):
    good = {"prompt_token_ids": [5, 6, 7, 8]}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(RequestError, match=r"^prompt 2: prompt token id") as info:
        llm.generate([good, good, {"prompt_token_ids": [5, 10**9]}, good], params, use_tqdm=False)
    assert info.value.param == "prompt"
    _assert_engine_empty(llm)
    # the next call sees only its own requests
    again = llm.generate([good, good], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [alone, alone]


GREEDY = SamplingParams(temperature=0, max_tokens=2)

# (case id, a call on the LLM, the ValueError's message): each was another exception, or a message
# that named the wrong thing (or a float token id silently cut to an integer)
BAD_CALLS = [
    ("chat-one-message-not-in-a-list", lambda llm: llm.chat({"role": "user", "content": "hi"}, GREEDY, use_tqdm=False),
     r"messages must be a non-empty list of \{'role': \.\.\., 'content': \.\.\.\} dicts"),  # KeyError: 0
    ("generate-a-tensor", lambda llm: llm.generate(torch.tensor([5, 6]), GREEDY, use_tqdm=False),
     r"prompts\[0\] must be a string, \{'prompt_token_ids': \[\.\.\.\]\} or a list of token ids, got Tensor"),  # torch's RuntimeError
    ("generate-a-float-in-a-batch-of-ids", lambda llm: llm.generate([[5, 6], [7, 2.0]], GREEDY, use_tqdm=False),
     r"prompt token ids must be integers: prompts\[1\]\[1\] is 2\.0"),
    ("generate-an-empty-list-in-a-batch", lambda llm: llm.generate([[5, 6], []], GREEDY, use_tqdm=False),
     r"prompt 1: the prompt is empty"),
    ("generate-a-float-among-the-ids", lambda llm: llm.generate([5, 1.0, 6], GREEDY, use_tqdm=False),
     r"prompt token ids must be integers: \[1\] is 1\.0"),  # "prompts[0] must be a string ..., got int"
    ("logits-a-float-id", lambda llm: llm.logits([5, 1.5]), r"token id 1\.5 is not an integer"),  # cut to 1
    ("logits-a-bool-id", lambda llm: llm.logits([True]), r"token id True is not an integer"),  # read as 1
    ("logits-none", lambda llm: llm.logits(None), r"logits\(\) takes a list of token ids, got None"),  # TypeError
    ("logits-a-text", lambda llm: llm.logits("hello"), r"logits\(\) takes a list of token ids, got 'hello'"),  # TypeError
    ("stream-two-prompts", lambda llm: next(llm.stream(["a", "b"], GREEDY)),
     r"stream\(\) takes one prompt, got 2"),  # "too many values to unpack"
    ("encode-prompt-a-number", lambda llm: llm.encode_prompt(5), r"encode_prompt\(\) takes a text, got 5"),  # AttributeError
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_a_bad_argument_to_a_call_is_a_value_error_naming_it_and_the_llm_still_serves(llm, call, message):
    before = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=message):
        call(llm)
    _assert_engine_empty(llm)
    assert llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before


@pytest.mark.parametrize("temperature", [1e-6, 1e-9, 1e-20, 1e-40, 1e-45])
def test_near_zero_temperature_is_greedy(temperature):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 8
    logits[2, 17] = logits[2].max() + 1e-3  # a close second must still lose
    sampler = Sampler(seed=1)
    seeded = torch.Generator().manual_seed(3)
    state = seeded.get_state()
    rows = [
        SamplingRow(SamplingParams(temperature=temperature)),
        SamplingRow(SamplingParams(temperature=temperature, top_p=0.9)),
        SamplingRow(SamplingParams(temperature=temperature, top_k=5, min_p=0.2)),
        SamplingRow(SamplingParams(temperature=temperature, seed=3), generator=seeded),
    ]
    assert sampler(logits, rows).token_ids == logits.argmax(dim=-1).tolist()
    assert torch.equal(seeded.get_state(), state)  # greedy rows draw no randomness


def test_near_zero_temperature_generates_the_greedy_text(llm):
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    tiny = llm.generate(prompt, SamplingParams(temperature=1e-9, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


# ---------------------------------------------------------------------- prefix cache
def test_a_prefix_hit_needs_the_same_tokens_not_only_the_same_hash(llm, tiny_dense_dir, monkeypatch):
    """Every block hashes alike (a forced collision): a prompt must still never get another's KV."""
    bs = 16
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = list(range(100, 100 + 2 * bs + 1))
    other = list(range(300, 300 + 2 * bs + 1))  # other tokens, the same (forced) hashes
    shifted = first[:bs] + first[:bs] + [7]  # block 1 holds block 0's tokens, at another position
    # references from another model object, before the hash is broken
    alone = {name: llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids
             for name, ids in (("first", first), ("other", other), ("shifted", shifted))}

    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: b"\0" * 32)
    engine = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, max_model_len=CONTEXT, block_size=bs, enforce_eager=True).engine

    def generate(rid: str, ids: list[int]) -> list[int]:
        engine.add_request(rid, ids, params)
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out
        return final.outputs[0].token_ids

    assert generate("first", first) == alone["first"]
    hits = engine.pool.prefix_hits
    assert generate("other", other) == alone["other"]
    assert engine.pool.prefix_hits == hits  # the colliding blocks were not reused
    assert generate("shifted", shifted) == alone["shifted"]
    assert engine.pool.prefix_hits == hits + bs  # block 0 (the same tokens) reused, block 1 not
    assert generate("again", first) == alone["first"]
    assert engine.pool.prefix_hits == hits + 2 * bs  # a true hit still hits (one block: all hashes are one)
    assert engine.stats()["kv_blocks_used"] == 0


def test_block_hash_is_sha256_of_the_parent_and_the_tokens():
    import hashlib
    from array import array

    root = kv_cache.block_hash(None, [1, 2, 3])
    assert root == hashlib.sha256(array("q", [1, 2, 3]).tobytes()).digest()
    assert kv_cache.block_hash(root, [4]) == hashlib.sha256(root + array("q", [4]).tobytes()).digest()
    assert kv_cache.block_hash(None, [1, 2, 3]) != kv_cache.block_hash(root, [1, 2, 3])


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True, max_model_len=64)
    ids = list(range(3, 103))  # 100 tokens: longer than the context of 64
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="the prompt has 100 tokens"):
        llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy), use_tqdm=False)
    cut = llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy, truncate_prompt_tokens=20), use_tqdm=False)[0]
    alone = llm.generate({"prompt_token_ids": ids[-20:]}, SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-20:] and cut.outputs[0].token_ids == alone.outputs[0].token_ids
    fit = llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert fit.prompt_token_ids == ids[-(64 - 4):]  # as many as leave room for max_tokens
    short = llm.generate({"prompt_token_ids": ids[:5]}, SamplingParams(**greedy, truncate_prompt_tokens=20), use_tqdm=False)[0]
    assert short.prompt_token_ids == ids[:5]
    first = llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy, truncate_prompt_tokens=20, truncation_side="right"),
                         use_tqdm=False)[0]
    head = llm.generate({"prompt_token_ids": ids[:20]}, SamplingParams(**greedy), use_tqdm=False)[0]
    assert first.prompt_token_ids == ids[:20] and first.outputs[0].token_ids == head.outputs[0].token_ids  # (vLLM's truncation_side)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    for bad in ("middle", None, "Left"):
        with pytest.raises(ValueError, match="truncation_side"):
            SamplingParams(truncation_side=bad)


def test_a_batch_of_token_id_lists_is_a_batch_of_prompts_as_in_vllm(llm):
    """vLLM's generate takes token ids as one prompt ([5, 6, 7]) or a batch of them ([[5, 6, 7], [8, 9]])."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids for ids in ([5, 6, 7], [8, 9])]
    got = llm.generate([[5, 6, 7], (8, 9)], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in got] == [[5, 6, 7], [8, 9]]
    assert [o.outputs[0].token_ids for o in got] == want
