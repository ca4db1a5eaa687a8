"""The chat page at / in a real browser: Debian's Chromium driven by Playwright.

The servers run in this process (create_app served by uvicorn threads) with real engines: the
tiny model that thinks for streaming and the thinking switch, the tiny random model (its replies
run to max_tokens) behind an API key for stop and regenerate, and a scripted engine for tool calls
and Markdown. Outside CI the module skips when Playwright or Chromium is missing; under CI
($CI set, where .ci/run installs Chromium) it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from fixtures_server import SCRIPTED_ANSWER, SCRIPTED_REASONING, ScriptedEngine, metric_value, serving
from pangu_infer import LLM
from pangu_infer.server.app import create_app

# Flags that let Debian's Chromium run headless as root in a container with no network.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 30_000  # generous: the machine may be shared; passing runs take well under a second per step
API_KEY = "page-key"
STOP_MAX_TOKENS = 2000  # the random model's greedy reply runs this long unless stopped
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_REPLY = ('[unused16]the user wants weather[unused17]**Checking** the `weather` <b>now</b>.'
              '[unused11][{"name": "get_weather", "arguments": {"city": "Paris"}}][unused12]')
LAST_REPLY = ".msg.assistant >> nth=-1"


def _chromium_or_skip() -> str:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the browser test needs Playwright for Python: pip install -e '.[test]'"
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and executable is None:
        reason = "the browser test needs Debian's Chromium (apt-get install chromium); none found on PATH"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"under CI the browser test must run (.ci/run installs Chromium): {reason}")
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="module")
def browser():
    executable = _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile; each test gets its own context.
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture
def phone_page(browser):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def thinking_llm(thinking_dense_dir):
    return LLM(str(thinking_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def thinker(thinking_llm):
    with serving(create_app(thinking_llm, served_model_name="thinker")) as url:
        yield url


@pytest.fixture(scope="module")
def talker(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=16 << 20, enforce_eager=True)
    with serving(create_app(llm, served_model_name="talker", api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def scripted(thinking_llm, pangu_tokenizer):
    engine = ScriptedEngine(pangu_tokenizer, TOOL_REPLY)
    with serving(create_app(thinking_llm, served_model_name="scripted", engine=engine)) as url:
        yield url


def _chat_bodies(page) -> list[dict]:
    """The JSON bodies the page POSTs to /v1/chat/completions, in order (filled as it sends)."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def _ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _wait_done(page):
    from playwright.sync_api import expect

    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-state", "done")
    return reply


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def _wait_idle(url: str, timeout: float = 20.0) -> str:
    """/metrics once no sequence runs and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(url)
        if metric_value(text, "pangu_running_sequences") == 0 and metric_value(text, "pangu_kv_cache_blocks_used") == 0:
            return text
        assert time.monotonic() < deadline, f"the server still runs a sequence {timeout} s after the page stopped it"
        time.sleep(0.05)


def _streaming_with_text(page, min_chars: int) -> None:
    page.wait_for_function(
        """(n) => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
                    return m && m.dataset.state === 'streaming' && m.querySelector('.content').textContent.length >= n; }""",
        arg=min_chars,
    )


# ---------------------------------------------------------------------- tests
def test_reply_streams_with_thinking_apart_and_the_switch_in_the_request(page, thinker):
    from playwright.sync_api import expect

    bodies = _chat_bodies(page)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(f"{thinker}/")
    expect(page.locator("#model-name")).to_have_text("thinker")

    _ask(page, "tell me about the weather")
    reply = _wait_done(page)
    expect(reply.locator(".content")).to_have_text(SCRIPTED_ANSWER)
    thinking = reply.locator("details.thinking")
    expect(thinking.locator(".reasoning")).to_have_text(SCRIPTED_REASONING)
    assert SCRIPTED_REASONING not in reply.locator(".content").inner_text()
    assert thinking.evaluate("d => !d.open"), "the thinking should fold once the answer has come"
    expect(thinking.locator(".reasoning")).to_be_hidden()
    thinking.locator("summary").click()
    expect(thinking.locator(".reasoning")).to_be_visible()
    assert bodies[-1]["stream"] is True
    assert bodies[-1]["chat_template_kwargs"] == {"enable_thinking": True}

    for turn, (label, sent) in enumerate((("off", False), ("auto", "auto"), ("on", True)), start=2):
        page.get_by_role("radio", name=label, exact=True).check()
        _ask(page, f"the weather with thinking {label}")
        expect(page.locator(".msg.assistant")).to_have_count(turn)
        _wait_done(page)
        assert bodies[-1]["chat_template_kwargs"] == {"enable_thinking": sent}

    # the conversation goes back with each request: answers, never their reasoning
    history = bodies[-1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 3 + ["user"]
    assert history[1]["content"].strip() == SCRIPTED_ANSWER and "reasoning_content" not in history[1]
    assert history[-1] == {"role": "user", "content": "the weather with thinking on"}
    # offline: nothing but this server was asked for anything
    assert urls and all(u.startswith(f"{thinker}/") or u.startswith("data:") for u in urls), urls


def test_key_is_asked_then_stop_frees_the_server_and_regenerate_and_clear(page, talker):
    from playwright.sync_api import expect

    # the page and its files load without the key; the API needs it
    assert httpx.get(f"{talker}/").status_code == 200
    assert httpx.get(f"{talker}/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{talker}/v1/models").status_code == 401

    bodies = _chat_bodies(page)
    page.goto(f"{talker}/")
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("needs an API key")
    page.fill("#api-key", "not-the-key")
    page.click("#use-key")
    expect(page.locator("#key-reason")).to_contain_text("did not accept")  # a 401 asks again
    page.fill("#api-key", API_KEY)
    page.click("#use-key")
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text("talker")

    page.click("#open-settings")
    page.fill("#max-tokens", str(STOP_MAX_TOKENS))
    page.fill("#temperature", "0")
    page.click("#save-settings")
    expect(page.locator("#settings")).to_be_hidden()

    generated_before = metric_value(_metrics(talker), "pangu_generation_tokens_total")
    _ask(page, "tell me a long story")
    _streaming_with_text(page, 20)  # the reply shows while it is still being written
    page.click("#stop")
    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(reply.locator(".stats")).to_contain_text("stopped")
    text = _wait_idle(talker)
    generated = metric_value(text, "pangu_generation_tokens_total") - generated_before
    assert 0 < generated < STOP_MAX_TOKENS // 2, f"the server went on generating after the stop: {generated} tokens"
    assert metric_value(text, "pangu_request_finish_total", finish_reason="abort") >= 1
    stopped_text = reply.locator(".content").text_content()
    assert stopped_text and page.locator(".msg.assistant").count() == 1
    body = bodies[-1]
    assert body["max_tokens"] == STOP_MAX_TOKENS and body["temperature"] == 0
    assert page.evaluate("() => localStorage.getItem('pangu-infer.apiKey')") == API_KEY

    # regenerate: the stopped reply goes, the same conversation is asked again
    reply.locator(".regenerate").click()
    _streaming_with_text(page, 1)
    assert len(bodies) == 2 and bodies[1]["messages"] == body["messages"]
    expect(page.locator(".msg.assistant")).to_have_count(1)

    # clear while it streams: the reply is stopped and the conversation is empty
    page.click("#clear")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    _wait_idle(talker)
    expect(page.locator("#send")).to_be_visible()


def test_tool_calls_and_markdown_show_as_such_on_a_phone(phone_page, scripted):
    from playwright.sync_api import expect

    page = phone_page
    bodies = _chat_bodies(page)
    page.goto(f"{scripted}/")
    page.click("#open-settings")
    page.fill("#tools", "[not json")
    page.click("#save-settings")
    expect(page.locator("#settings-error")).to_contain_text("Tools is not valid JSON")
    page.fill("#tools", json.dumps(TOOLS))
    page.fill("#system", "be brief")
    page.click("#save-settings")
    expect(page.locator("#settings")).to_be_hidden()

    _ask(page, "weather in Paris?")
    reply = _wait_done(page)
    call = reply.locator(".tool-call")
    expect(call.locator(".tool-name")).to_have_text("get_weather")
    assert json.loads(call.locator(".tool-args").text_content()) == {"city": "Paris"}
    content = reply.locator(".content")
    expect(content.locator("strong")).to_have_text("Checking")
    expect(content.locator("code")).to_have_text("weather")
    assert content.locator("b").count() == 0 and "<b>now</b>" in content.inner_text()  # model text is never HTML
    expect(reply.locator(".reasoning")).to_have_text("the user wants weather")
    expect(reply.locator(".stats")).to_contain_text("waiting for tool results")
    assert bodies[-1]["tools"] == TOOLS
    assert bodies[-1]["messages"][0] == {"role": "system", "content": "be brief"}

    _ask(page, "and tomorrow?")
    _wait_done(page)
    sent_call = bodies[-1]["messages"][2]["tool_calls"][0]
    assert sent_call["function"]["name"] == "get_weather"
    assert json.loads(sent_call["function"]["arguments"]) == {"city": "Paris"}

    # a phone-width screen: nothing wider than the screen, the composer in view
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("() => { const log = document.querySelector('#log'); return log.scrollWidth <= log.clientWidth; }")
    box = page.locator("#send").bounding_box()
    assert box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 740


MARKDOWN = """# Title
Some **bold**, *italic*, `a<b>` and ~~gone~~.

- one
- two
  1. nested

<img src=x onerror="window.pwned = 1">

```python
print("<script>window.pwned = 2</script>")
```

| name | value |
|------|------:|
| a    | 1     |

> quoted
[bad](javascript:window.pwned=3) [good](https://example.com/?a=1&b=2)"""


def test_markdown_renders_blocks_and_never_lets_html_through(page, thinker):
    from playwright.sync_api import expect

    page.goto(f"{thinker}/")
    page.evaluate(
        """async (text) => {
            const { renderMarkdown } = await import('./static/markdown.js');
            const box = document.createElement('div');
            box.id = 'md';
            box.className = 'content';
            box.innerHTML = renderMarkdown(text);
            document.querySelector('#log').append(box);
        }""",
        MARKDOWN,
    )
    md = page.locator("#md")
    assert md.locator("h1").text_content() == "Title"
    assert md.locator("p strong").text_content() == "bold" and md.locator("p em").text_content() == "italic"
    assert md.locator("p > code").text_content() == "a<b>" and md.locator("del").text_content() == "gone"
    assert md.locator("ul > li").count() == 2 and md.locator("ul ol > li").text_content() == "nested"
    assert md.locator("pre code").text_content() == 'print("<script>window.pwned = 2</script>")'
    assert md.locator(".code-lang").text_content() == "python"
    assert md.locator("th").all_text_contents() == ["name", "value"] and md.locator("td").all_text_contents() == ["a", "1"]
    assert md.locator("blockquote").count() == 1
    assert md.locator("img, script, [onerror]").count() == 0
    assert md.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))") == ["https://example.com/?a=1&b=2"]
    assert page.evaluate("() => window.pwned") is None
    # a code block's Copy button puts its code, as text, on the clipboard
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    md.locator(".copy-code").click()
    expect(md.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == 'print("<script>window.pwned = 2</script>")'


# ---------------------------------------------------------------------- CORS: pages on other origins
async def _blank_page(scope, receive, send):
    """An ASGI app serving an empty HTML page: another origin for the browser to call the API from."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": b"<!doctype html><title>elsewhere</title>"})


CROSS_ORIGIN_FETCH = """async ([api, key]) => {
    try {
        const r = await fetch(api + "/v1/chat/completions", {method: "POST",
            headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
            body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 2})});
        const body = await r.json();
        return [r.status, body.object || body.error.code];
    } catch (e) {
        return ["blocked", String(e)];
    }
}"""


def test_a_page_on_an_allowed_origin_can_call_the_api_and_others_cannot(page, tiny_dense_dir):
    """CORS, as a real browser enforces it: a page on an origin given to --allowed-origins calls the
    API with its key (preflight included) and reads a 401 too; with no origins allowed (the
    default) the browser blocks the same call."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with serving(_blank_page) as elsewhere:
        page.goto(elsewhere)
        with serving(create_app(llm, served_model_name="m", api_key=API_KEY, allowed_origins=[elsewhere])) as api:
            assert page.evaluate(CROSS_ORIGIN_FETCH, [api, API_KEY]) == [200, "chat.completion"]
            assert page.evaluate(CROSS_ORIGIN_FETCH, [api, "wrong"]) == [401, "invalid_api_key"]
        with serving(create_app(llm, served_model_name="m", api_key=API_KEY, allowed_origins=["http://other.example:1"])) as api:
            status, why = page.evaluate(CROSS_ORIGIN_FETCH, [api, API_KEY])
            assert status == "blocked" and "fetch" in why.lower()
        with serving(create_app(llm, served_model_name="m", api_key=API_KEY)) as api:
            assert page.evaluate(CROSS_ORIGIN_FETCH, [api, API_KEY])[0] == "blocked"


def _behind_root_path(app, prefix: str):
    """`app` as uvicorn --root-path PREFIX runs it: the prefix in front of every path, and as root_path."""

    async def prefixed(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "root_path": prefix, "path": prefix + scope["path"], "raw_path": prefix.encode() + scope["raw_path"]}
        await app(scope, receive, send)

    return prefixed


@pytest.mark.parametrize("shown", ["/llm", "/llm/"])
def test_the_page_works_behind_a_proxy_at_its_prefix_with_or_without_the_slash(page, thinking_llm, shown):
    """--root-path /llm behind a proxy that strips /llm (and serves nothing else): the browser at
    https://site.example/llm or /llm/ loads the page's stylesheet and scripts, and the page calls the API."""
    from playwright.sync_api import expect

    with serving(_behind_root_path(create_app(thinking_llm, served_model_name="prefixed"), "/llm")) as server:
        outside: list[str] = []

        def proxy(route):
            path = route.request.url.removeprefix("https://site.example")
            if path != "/llm" and not path.startswith("/llm/"):
                outside.append(route.request.url)
                route.fulfill(status=404, body="not behind the proxy")
                return
            route.fulfill(response=route.fetch(url=server + (path[len("/llm"):] or "/")))

        page.route("**/*", proxy)
        loaded: list[str] = []
        page.on("requestfinished", lambda r: loaded.append(r.url))
        page.goto(f"https://site.example{shown}")
        expect(page.locator("#model-name")).to_have_text("prefixed")  # chat.js ran and fetched v1/models
        assert page.evaluate("getComputedStyle(document.querySelector('header.top')).display") == "flex"  # chat.css applied
        assert not outside, outside
        assert {"https://site.example/llm/static/chat.css", "https://site.example/llm/static/chat.js",
                "https://site.example/llm/static/markdown.js", "https://site.example/llm/v1/models"} <= set(loaded), loaded
