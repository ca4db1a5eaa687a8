"""vLLM's bad_words: a word's tokens never all appear in a row in the output. A one-token word is
banned everywhere; a longer one only where the output already ends with its first tokens."""

from __future__ import annotations

import pytest

from pangu_infer import LLM, SamplingParams
from pangu_infer.errors import RequestError

PROMPT = {"prompt_token_ids": list(range(40, 60))}


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)


def _ids(llm: LLM, params: SamplingParams, prompt=PROMPT) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def _round_trip(llm: LLM, ids: list[int]) -> list[tuple[int, str]]:
    """(position, text) of output tokens whose text encodes back to that one token."""
    tok = llm.tokenizer
    out = []
    for i, t in enumerate(ids):
        text = tok.decode([t])
        if text.strip() and tok.encode(text.lstrip(), add_special_tokens=False) == [t]:
            out.append((i, text))
    return out


def test_a_one_token_word_is_never_generated(llm):
    plain = _ids(llm, greedy())
    position, word = next((i, w) for i, w in _round_trip(llm, plain) if i > 0)
    token = plain[position]
    got = _ids(llm, greedy(bad_words=[word]))
    assert token not in got
    assert got[:position] == plain[:position]  # the same text up to where the word came
    # The same as a logit bias that all but bans the token (OpenAI's -100).
    assert got == _ids(llm, greedy(logit_bias={token: -100}))


def test_a_two_token_word_is_cut_at_its_last_token_only(llm):
    plain = _ids(llm, greedy())
    tok = llm.tokenizer

    def two_tokens(i: int) -> bool:
        text = tok.decode(plain[i - 1 : i + 1]).lstrip()
        return plain[i] != plain[i - 1] and tok.encode(text, add_special_tokens=False) == plain[i - 1 : i + 1]

    i = next(i for i in range(1, len(plain)) if two_tokens(i))
    pair = plain[i - 1 : i + 1]
    word = tok.decode(pair)
    assert pair in llm.engine.bad_words_ids([word])  # the word is those two tokens
    got = _ids(llm, greedy(bad_words=[word]))
    assert got[:i] == plain[:i]  # its first token is still written
    assert got[i] != plain[i]  # but not followed by the second
    assert all(got[j : j + 2] != pair for j in range(len(got) - 1))


def test_requests_with_bad_words_decode_the_same_with_speculation(tiny_dense_dir, llm):
    # Prompt lookup would draft the repeated text; a banned word must not come back through a draft.
    prompt = {"prompt_token_ids": list(range(40, 52)) * 4}
    plain = _ids(llm, greedy(), prompt)
    word = next(w for i, w in _round_trip(llm, plain) if i > 0)
    want = _ids(llm, greedy(bad_words=[word]), prompt)
    spec = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True,
               num_speculative_tokens=4)
    assert _ids(spec, greedy(bad_words=[word]), prompt) == want


@pytest.mark.parametrize("value,message", [
    ("word", "expected a list of words"),
    ([""], "expected a list of words"),
    (["  "], "expected a list of words"),
    ([3], "expected a list of words"),
    (["w"] * 301, "bad_words has 301 words; at most 300"),
    (["w" * 1001], "a word of 1001 characters; at most 1000"),
])
def test_bad_words_that_are_not_words_name_the_field(value, message):
    with pytest.raises(RequestError, match=message) as e:
        SamplingParams(bad_words=value)
    assert e.value.param == "bad_words"


def test_the_server_takes_bad_words_as_vllm_does(llm):
    from fastapi.testclient import TestClient

    from pangu_infer.server.app import create_app

    plain = _ids(llm, greedy())
    word = next(w for i, w in _round_trip(llm, plain) if i > 0)
    want = llm.generate([PROMPT], greedy(bad_words=[word]), use_tqdm=False)[0].outputs[0].text
    body = {"model": "m", "prompt": PROMPT["prompt_token_ids"], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(llm, served_model_name="m")) as http:
        r = http.post("/v1/completions", json={**body, "bad_words": [word]})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        r = http.post("/v1/completions", json={**body, "bad_words": [""]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words"


def test_a_servers_bad_words_are_tokenized_off_the_engine_thread(llm, monkeypatch):
    """Hundreds of long words take tens of milliseconds to tokenize: not on the thread every request's steps run on."""
    import asyncio
    import threading

    from pangu_infer.engine.async_engine import AsyncEngine

    threads = []
    tokenize = llm.engine.bad_words_ids

    def recording(words):
        threads.append(threading.current_thread())
        return tokenize(words)

    monkeypatch.setattr(llm.engine, "bad_words_ids", recording)
    engine = AsyncEngine.from_llm(llm)
    word = next(w for i, w in _round_trip(llm, _ids(llm, greedy())) if i > 0)

    async def main():
        last = None
        async for out in engine.generate(PROMPT["prompt_token_ids"], greedy(bad_words=[word]), "bw-1"):
            last = out
        return last

    try:
        out = asyncio.run(main())
    finally:
        engine.shutdown()
    assert threads and all(t is not engine._thread for t in threads)
    assert out.outputs[0].token_ids == _ids(llm, greedy(bad_words=[word]))


def test_bad_words_past_the_token_budget_or_the_vocabulary_name_the_field(llm, monkeypatch):
    long = ["abc def 你好 " * 90] * 300  # about 1000 characters each: far more than 4096 tokens in all
    with pytest.raises(RequestError, match=r"bad_words come to \d+ tokens; at most 4096") as e:
        llm.generate([PROMPT], greedy(bad_words=long), use_tqdm=False)
    assert e.value.param == "bad_words"
    vocab = llm.config.vocab_size
    # a Python str from JSON's "\ud800": SentencePiece had raised a RuntimeError about a C++ cast
    with pytest.raises(RequestError, match=r"bad_words\[1\]: the text holds a lone UTF-16 surrogate at character 2") as e:
        llm.generate([PROMPT], greedy(bad_words=["fine", "no\ud800"]), use_tqdm=False)
    assert e.value.param == "bad_words"
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, add_special_tokens=True: [vocab + 5])
    with pytest.raises(RequestError, match=rf"token id {vocab + 5}, outside the model's vocabulary"):
        llm.generate([PROMPT], greedy(bad_words=["x"]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_bad_words_grouped_by_prefix_ban_what_each_word_bans():
    from pangu_infer.engine.sampler import BadWords

    words = [[5], [7, 8], [9, 7, 8], [7, 3], [1, 2, 3, 4]]
    table = BadWords(words)
    for out in ([], [7], [9, 7], [1, 2, 3], [2, 3], [0, 7]):
        want = sorted(w[-1] for w in words if len(w) - 1 <= len(out) and list(out[len(out) - len(w) + 1 :] if len(w) > 1 else []) == w[:-1])
        assert sorted(table.banned(out)) == want, out
