"""LoRA adapters in `pangu-infer serve` (vLLM's --lora-modules, model = the adapter's name, runtime
load/unload): real server processes driven by the official openai client, every generated token
compared with PEFT's own model of the same adapter (tests/fixtures_lora.py); and an in-process server
whose request is held at a chosen point while an unload runs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from fixtures_server import metric_value, running_server
from pangu_infer.cli import main

API_KEY = "lora-key"
SERVED = "tiny-pangu"
MAX_TOKENS = 8
PROMPTS = ["the weather in the city", "我们今天 tell me about", "hello world, the quick fox"]
SMALL = ("--max-model-len", "256", "--kv-cache-memory", "16MiB", "--served-model-name", SERVED)


@pytest.fixture(scope="module")
def server(tiny_dense_dir, lora_adapters, tmp_path_factory):
    # one adapter as NAME=PATH, the other as vLLM's JSON form
    attn = json.dumps({"name": "attn", "path": str(lora_adapters["attn"].path)})
    with running_server(
        tiny_dense_dir, *SMALL, "--lora-modules", f"full={lora_adapters['full'].path}", attn,
        api_key=API_KEY, log_dir=tmp_path_factory.mktemp("lora_server_logs"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompts(pangu_tokenizer) -> list[list[int]]:
    return [pangu_tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(lora_adapters, prompts) -> dict[str, list[list[int]]]:
    """Greedy continuations by PEFT: each adapter's, and the base model's (the adapter switched off)."""
    out = {name: [adapter.greedy(ids, MAX_TOKENS) for ids in prompts] for name, adapter in lora_adapters.items()}
    full = lora_adapters["full"]
    with full.model.disable_adapter():
        out[SERVED] = [full.greedy(ids, MAX_TOKENS) for ids in prompts]
    return out


def _post(server, path: str, body, key: str = API_KEY) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120)


def _complete(client: openai.OpenAI, model: str, ids: list[int], **kwargs):
    # min_tokens masks eos as PEFT's min_new_tokens does: all MAX_TOKENS tokens are the greedy choice
    return client.completions.create(model=model, prompt=ids, temperature=0, max_tokens=MAX_TOKENS, logprobs=0,
                                     extra_body={"min_tokens": MAX_TOKENS, **kwargs.pop("extra_body", {})}, **kwargs)


def _text_after(tokenizer, prompt: list[int], out: list[int]) -> str:
    """The text `out` adds after `prompt` (what the server's detokenizer streams)."""
    return tokenizer.decode(prompt + out, skip_special_tokens=True)[len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def _check_choice(choice, prompt: list[int], want: list[int], tokenizer, what: str) -> None:
    """The choice's tokens are `want`: one token text per id (logprobs), and the text they decode to."""
    assert choice.logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in want], what
    assert choice.text == _text_after(tokenizer, prompt, want), what


# ---------------------------------------------------------------------- generation
def test_each_adapter_and_the_base_model_generate_their_own_tokens_in_shared_batches(client, prompts, expected, pangu_tokenizer):
    assert expected["full"] != expected[SERVED] and expected["attn"] != expected[SERVED] and expected["full"] != expected["attn"]
    jobs = [(model, i) for _ in range(2) for model in (SERVED, "full", "attn") for i in range(len(prompts))]
    # all at once: the engine batches base and adapter requests together
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: _complete(client, job[0], prompts[job[1]]), jobs))
    for (model, i), out in zip(jobs, outs):
        assert out.model == model
        _check_choice(out.choices[0], prompts[i], expected[model][i], pangu_tokenizer, f"{model} on prompt {i}")


def test_streaming_n_and_echo_run_the_adapter_too(client, server, prompts, expected, pangu_tokenizer):
    ids, want = prompts[0], expected["attn"][0]
    chunks = list(_complete(client, "attn", ids, stream=True))
    assert {c.model for c in chunks} == {"attn"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == _text_after(pangu_tokenizer, ids, want)
    several = _complete(client, "full", ids, n=2)
    for choice in several.choices:
        _check_choice(choice, ids, expected["full"][0], pangu_tokenizer, "n=2")
    echoed = _complete(client, "full", ids, echo=True)
    prompt_text = pangu_tokenizer.decode(ids, skip_special_tokens=False)
    assert echoed.choices[0].text == prompt_text + _text_after(pangu_tokenizer, ids, expected["full"][0])
    # two prompts in one request: each runs the adapter
    both = _complete(client, "attn", prompts[:2])
    for k, choice in enumerate(sorted(both.choices, key=lambda c: c.index)):
        _check_choice(choice, prompts[k], expected["attn"][k], pangu_tokenizer, f"prompt {k} of 2")
    assert metric_value(httpx.get(f"{server.url}/metrics").text, "pangu_lora_requests_total", lora_name="attn") >= 2


def test_chat_responses_and_messages_answer_with_the_adapters_name(client, server, lora_adapters, pangu_tokenizer):
    messages = [{"role": "user", "content": "tell me about the weather"}]
    counted = _post(server, "/tokenize", {"model": "full", "messages": messages})
    assert counted.status_code == 200, counted.text
    want = lora_adapters["full"].greedy(counted.json()["tokens"], 4)
    chat = client.chat.completions.create(model="full", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                          extra_body={"min_tokens": 4})
    assert chat.model == "full" and chat.choices[0].message is not None
    assert [lp.token for lp in chat.choices[0].logprobs.content] == [pangu_tokenizer.decode([t], skip_special_tokens=False) for t in want]
    base = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=4, temperature=0)
    assert base.model == SERVED
    chunks = list(client.chat.completions.create(model="attn", messages=messages, max_tokens=4, temperature=0, stream=True))
    assert chunks and {c.model for c in chunks} == {"attn"}
    response = _post(server, "/v1/responses", {"model": "attn", "input": "hello", "max_output_tokens": 4})
    assert response.status_code == 200 and response.json()["model"] == "attn", response.text
    message = _post(server, "/v1/messages", {"model": "full", "max_tokens": 4, "messages": messages})
    assert message.status_code == 200 and message.json()["model"] == "full", message.text
    streamed = httpx.post(f"{server.url}/v1/messages", json={"model": "attn", "max_tokens": 4, "messages": messages, "stream": True},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert '"model": "attn"' in streamed.text, streamed.text


# ---------------------------------------------------------------------- models
def test_models_lists_the_adapters_after_the_base_model(client, server, lora_adapters):
    cards = client.models.list().data
    assert [c.id for c in cards] == [SERVED, "full", "attn"]
    base = cards[0].model_dump()
    assert base["object"] == "model" and "parent" not in base and "root" not in base and base["max_model_len"] == 256
    for card in cards[1:]:
        assert card.object == "model" and card.owned_by
        assert card.parent == SERVED and card.root == str(lora_adapters[card.id].path)
    one = client.models.retrieve("attn")
    assert one.id == "attn" and one.parent == SERVED and one.root == str(lora_adapters["attn"].path)
    assert client.models.retrieve(SERVED).id == SERVED


def test_an_unknown_model_is_still_rejected(client, server, prompts):
    for name in ("gpt-4", "ful", "FULL"):
        with pytest.raises(openai.NotFoundError, match=name):
            _complete(client, name, prompts[0])
        with pytest.raises(openai.NotFoundError, match=name):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.NotFoundError, match=name):
            client.models.retrieve(name)
    response = _post(server, "/v1/messages", {"model": "gpt-4", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404 and "gpt-4" in response.text


def test_runtime_updates_are_refused_without_the_flag(server, lora_adapters):
    for path, body in [("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(lora_adapters["attn"].path)}),
                       ("/v1/unload_lora_adapter", {"lora_name": "full"})]:
        response = _post(server, path, body)
        assert response.status_code == 404 and "--enable-runtime-lora-updates" in response.json()["error"]["message"]
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "full"}, key="wrong").status_code == 401


# ---------------------------------------------------------------------- runtime updates
@pytest.fixture(scope="module")
def updatable(tiny_dense_dir, tmp_path_factory):
    with running_server(
        tiny_dense_dir, *SMALL, "--enable-lora", "--enable-runtime-lora-updates",
        api_key=API_KEY, log_dir=tmp_path_factory.mktemp("lora_runtime_logs"),
    ) as s:
        yield s


def test_load_use_and_unload_an_adapter_at_runtime(updatable, lora_adapters, prompts, expected, pangu_tokenizer):
    client = openai.OpenAI(base_url=f"{updatable.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    attn = str(lora_adapters["attn"].path)
    with pytest.raises(openai.NotFoundError, match="attn"):
        _complete(client, "attn", prompts[0])
    loaded = _post(updatable, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": attn})
    assert loaded.status_code == 200 and "attn" in loaded.text
    assert [c.id for c in client.models.list().data] == [SERVED, "attn"]
    assert client.models.retrieve("attn").parent == SERVED
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda model: _complete(client, model, prompts[1]), ["attn", SERVED]))
    _check_choice(outs[0].choices[0], prompts[1], expected["attn"][1], pangu_tokenizer, "attn loaded at runtime")
    _check_choice(outs[1].choices[0], prompts[1], expected[SERVED][1], pangu_tokenizer, "the base model beside it")
    # the same name and path again: nothing changes; another path under the name: refused
    assert _post(updatable, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": attn}).status_code == 200
    other = _post(updatable, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": str(lora_adapters["full"].path)})
    assert other.status_code == 400 and "attn" in other.json()["error"]["message"], other.text
    # load_inplace (vLLM's): the name now runs the other adapter, then the first one again
    for source in ("full", "attn"):
        swapped = _post(updatable, "/v1/load_lora_adapter",
                        {"lora_name": "attn", "lora_path": str(lora_adapters[source].path), "load_inplace": True})
        assert swapped.status_code == 200, swapped.text
        _check_choice(_complete(client, "attn", prompts[0]).choices[0], prompts[0], expected[source][0], pangu_tokenizer, source)
    unloaded = _post(updatable, "/v1/unload_lora_adapter", {"lora_name": "attn"})
    assert unloaded.status_code == 200 and "attn" in unloaded.text
    with pytest.raises(openai.NotFoundError, match="attn"):
        _complete(client, "attn", prompts[0])
    assert [c.id for c in client.models.list().data] == [SERVED]
    assert _post(updatable, "/v1/unload_lora_adapter", {"lora_name": "attn"}).status_code == 404
    # loaded again under another name: a new adapter that works the same
    again = _post(updatable, "/v1/load_lora_adapter", {"lora_name": "attn-2", "lora_path": attn})
    assert again.status_code == 200, again.text
    _check_choice(_complete(client, "attn-2", prompts[2]).choices[0], prompts[2], expected["attn"][2], pangu_tokenizer, "attn-2")
    assert _post(updatable, "/v1/unload_lora_adapter", {"lora_name": "attn-2"}).status_code == 200


def test_bad_load_and_unload_bodies_are_4xx_naming_the_problem(updatable, lora_adapters, tiny_dense_dir, tmp_path):
    attn = str(lora_adapters["attn"].path)
    (tmp_path / "empty").mkdir()
    cases = [
        ("/v1/load_lora_adapter", {"lora_path": attn}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "a"}, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": 5, "lora_path": attn}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": ["x"]}, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": attn}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": SERVED, "lora_path": attn}, SERVED),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path / "missing")}, "missing"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path / "empty")}, "empty"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tiny_dense_dir)}, str(tiny_dense_dir)),
        ("/v1/load_lora_adapter", "not json", "JSON"),
        ("/v1/load_lora_adapter", [], "object"),
        ("/v1/unload_lora_adapter", {}, "lora_name"),
        ("/v1/unload_lora_adapter", {"lora_name": None}, "lora_name"),
        ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, "never-loaded"),
    ]
    for path, body, needle in cases:
        response = _post(updatable, path, body)
        assert 400 <= response.status_code < 500, (path, body, response.status_code, response.text)
        assert needle in response.json()["error"]["message"], (path, body, response.text)
    assert [m["id"] for m in httpx.get(f"{updatable.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]] == [SERVED]
    # behind the API key like every /v1 route
    assert _post(updatable, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": attn}, key="wrong").status_code == 401


# ---------------------------------------------------------------------- startup
def test_a_bad_lora_module_stops_the_start_with_one_line_naming_it(tiny_dense_dir, lora_adapters, tmp_path, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    base = ["serve", "--model", str(tiny_dense_dir), "--dtype", "float32", "--enforce-eager", "--max-model-len", "64",
            "--kv-cache-memory", "4MiB", "--port", "0"]
    full = str(lora_adapters["full"].path)
    cases = [
        (["--lora-modules", "no-equals-sign"], "no-equals-sign"),
        (["--lora-modules", f"a={full}", f"a={full}"], "'a' is given twice"),
        (["--lora-modules", '{"name": "a"}'], "path"),
        (["--lora-modules", '{"name": "a", "path": "p", "color": 1}'], "color"),
        (["--served-model-name", "same", "--lora-modules", f"same={full}"], "same"),
        (["--lora-modules", f"full={full}", f"broken={tmp_path}"], f"--lora-modules broken={tmp_path}"),
        (["--enable-runtime-lora-updates"], "--enable-lora"),
    ]
    for flags, needle in cases:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith("pangu-infer serve: error: --") and needle in err, (flags, err)
        assert "\n" not in err and "Traceback" not in err, err


# ---------------------------------------------------------------------- unload racing a request
def test_a_request_racing_an_unload_never_brings_the_adapter_back(tiny_dense_dir, lora_adapters, monkeypatch):
    """A request that named an adapter just before its unload: held (threading.Event) between its
    model check and its submission, the unload succeeds and the request is the 404 of an unknown
    model; held inside its submission (the engine's generate), the unload is a 409 and the request
    runs with the adapter. Never an adapter the engine holds that the server no longer serves."""
    import asyncio
    import threading

    import pangu_infer.server.chat_api as chat_api
    from fixtures_server import serving
    from pangu_infer import LLM
    from pangu_infer.server.app import create_app

    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, max_model_len=256, enable_lora=True)
    app = create_app(llm, served_model_name=SERVED, api_key=API_KEY, enable_runtime_lora_updates=True)
    engine = app.state.server.engine
    attn = str(lora_adapters["attn"].path)
    chat = {"model": "attn", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    base = {**chat, "model": SERVED}
    reached, release = threading.Event(), threading.Event()

    def held(original):
        """`original` (a coroutine function) that waits for `release` first, on a worker thread."""
        async def wait_then(*args, **kwargs):
            reached.set()
            await asyncio.to_thread(release.wait, 60)
            return await original(*args, **kwargs)
        return wait_then

    def raced(server, unload_while_held):
        """A chat request for attn held where the patch holds it, unloaded meanwhile: both answers."""
        reached.clear(), release.clear()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_post, server, "/v1/chat/completions", chat)
            try:
                assert reached.wait(60), "the request was never held"
                unloaded = unload_while_held()
            finally:
                release.set()
            return unloaded, pending.result()

    def engine_holds() -> list[str]:
        return [r.lora_name for r in llm.engine.list_loras()]

    with serving(app) as url:
        server = SimpleNamespace(url=url)  # what _post needs
        load = {"lora_name": "attn", "lora_path": attn}
        assert _post(server, "/v1/load_lora_adapter", load).status_code == 200
        assert _post(server, "/v1/chat/completions", chat).status_code == 200
        assert engine_holds() == ["attn"]

        # 1. checked, not yet submitted: the unload succeeds, the request is a 404 like any unknown model
        with monkeypatch.context() as m:
            m.setattr(chat_api, "start_requests", held(chat_api.start_requests))
            unloaded, answer = raced(server, lambda: _post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"}))
        assert unloaded.status_code == 200, unloaded.text
        unknown = _post(server, "/v1/chat/completions", chat)
        assert answer.status_code == 404 and unknown.status_code == 404, answer.text
        assert answer.json() == unknown.json() and answer.json()["error"]["code"] == "model_not_found", answer.text
        assert engine_holds() == [], "an unloaded adapter is back in the engine"
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
        assert [c["id"] for c in models] == [SERVED]

        # 2. inside its submission: the unload is a 409 (in use) and the request runs with attn, while
        # a base model request beside them is not held up
        assert _post(server, "/v1/load_lora_adapter", load).status_code == 200
        original = engine.generate

        async def generate(*args, **kwargs):
            if kwargs.get("lora_request") is not None:
                reached.set()
                await asyncio.to_thread(release.wait, 60)
            async for out in original(*args, **kwargs):
                yield out

        with monkeypatch.context() as m:
            m.setattr(engine, "generate", generate)

            def unload_and_base():
                assert _post(server, "/v1/chat/completions", base).status_code == 200
                return _post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"})

            refused, answer = raced(server, unload_and_base)
        assert refused.status_code == 409 and "attn" in refused.json()["error"]["message"], refused.text
        assert answer.status_code == 200 and answer.json()["model"] == "attn", answer.text
        assert engine_holds() == ["attn"]
        assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"}).status_code == 200
        assert engine_holds() == []
