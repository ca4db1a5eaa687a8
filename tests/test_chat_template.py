"""A chat template of the user's instead of the model's, as vLLM takes it: `--chat-template`
(a file or the template itself), `LLM(chat_template=...)`, `LLM.chat(chat_template=...)`, and a
request's own `chat_template` on a server started with `--trust-request-chat-template`.

The reference rendering is transformers' `apply_chat_template` with the same template.
"""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from pangu_infer import LLM, SamplingParams
from pangu_infer.server.app import create_app

from fixtures_server import running_server

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]


def reference(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """transformers' rendering of `template` (a bare fast tokenizer: the template is all that counts)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def llm(tiny_dense_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "chatml.jinja"
    path.write_text(CHATML)
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 24, enforce_eager=True,
               chat_template=str(path))


def test_a_template_file_replaces_the_models_own(llm):
    assert llm.render_chat(MESSAGES) == reference(CHATML, MESSAGES)
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.encode_prompt(reference(CHATML, MESSAGES))


def test_a_template_for_one_call(llm):
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, chat_template=PLAIN)[0]
    assert out.prompt_token_ids == llm.encode_prompt(reference(PLAIN, MESSAGES))
    assert llm.render_chat(MESSAGES) == reference(CHATML, MESSAGES)  # the LLM's own template is left as it was


def test_a_bad_template_is_refused_before_loading_with_its_name(tmp_path):
    with pytest.raises(ValueError, match=r"chat template 'templates/missing\.jinja': no such file"):
        LLM("does-not-matter", chat_template="templates/missing.jinja")
    with pytest.raises(ValueError, match=r"chat template given is not valid Jinja: .*\(line 2\)"):
        LLM("does-not-matter", chat_template="{{ messages }}\n{% for m in %}")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if add_generation_prompt %}")
    with pytest.raises(ValueError, match=rf"chat template file '{broken}' is not valid Jinja"):
        LLM("does-not-matter", chat_template=str(broken))


def test_a_request_brings_its_template_only_where_the_server_trusts_it(llm):
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 1, "chat_template": PLAIN}
    with TestClient(create_app(llm, served_model_name="m")) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in r.json()["error"]["message"]
        r = http.post("/tokenize", json={"model": "m", "messages": MESSAGES, "chat_template": PLAIN})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    with TestClient(create_app(llm, served_model_name="m", trust_request_chat_template=True)) as http:
        r = http.post("/tokenize", json={"model": "m", "messages": MESSAGES, "chat_template": PLAIN})
        assert r.status_code == 200 and r.json()["tokens"] == llm.encode_prompt(reference(PLAIN, MESSAGES))
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == len(llm.encode_prompt(reference(PLAIN, MESSAGES)))
        r = http.post("/v1/chat/completions", json={**body, "chat_template": "{% for m in messages %}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
        assert "not valid Jinja" in r.json()["error"]["message"]
        # Without a template of its own, a request gets the server's (here the LLM's --chat-template).
        r = http.post("/tokenize", json={"model": "m", "messages": MESSAGES})
        assert r.json()["tokens"] == llm.encode_prompt(reference(CHATML, MESSAGES))


def test_serve_takes_a_template_as_text(tiny_dense_dir, tmp_path):
    # Typed in a shell, a template's newlines are `\n`: decoded as vLLM decodes them.
    with running_server(tiny_dense_dir, "--chat-template", PLAIN.replace("\n", "\\n"), log_dir=tmp_path) as server:
        r = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, timeout=60)
        assert r.status_code == 200
        info = httpx.get(f"{server.url}/tokenizer_info", timeout=60).json()
    assert info["chat_template"] == PLAIN
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 22, enforce_eager=True)
    assert r.json()["tokens"] == llm.encode_prompt(reference(PLAIN, MESSAGES))


def test_an_inline_templates_escapes_are_read_as_vllm_reads_them(tmp_path):
    """vLLM's load_chat_template decodes an inline template with Python's unicode_escape; here
    the same escapes, with non-ASCII text left as typed (unicode_escape would garble it)."""
    import codecs

    from pangu_infer.cli import build_parser

    def parsed(value):
        return build_parser().parse_args(["chat", "--chat-template", value]).chat_template

    typed = r"{% for m in messages %}{{ m['content'] }}\n\t\u00e9\x41\\{% endfor %}"
    assert parsed(typed) == codecs.decode(typed, "unicode_escape")
    assert parsed(r"{{ '你好' }}\n") == "{{ '你好' }}\n"
    named = tmp_path / "a\\nb.jinja"  # a file's path is a path: nothing decoded
    named.write_text(PLAIN)
    assert parsed(str(named)) == str(named)


# ---------------------------------------------------------------------- a template that fails or runs away
# Each: what happened before (a 500, or the server's memory and time spent), a 400 naming the template now.
HOSTILE_TEMPLATES = [
    ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 1 + 'a' }}", "TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
    ("{% for x in 5 %}{% endfor %}", "TypeError: 'int' object is not iterable"),
    ("{{ 'x' * 10**10 }}", "would make more than"),  # OOM-killed a test server
    ("{{ [1] * 10**9 }}", "would make more than"),
    ("{{ 10 ** 100000 }}", "an integer of more than 65536 bits"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "would make more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "would make more than"),
    ("{{ '{:>10000000000}'.format('x') }}", "would make more than"),
    ("{{ '{:>{}}'.format('x', 10**10) }}", "would make more than"),
    ("{{ 'x'.ljust(10**10) }}", "would make more than"),
    ("{{ 'x'|center(10**10) }}", "would make more than"),
    ("{{ 'a\nb'|indent(10**10) }}", "would make more than"),
    ("{{ '%*s' % (10**10, 'x') }}", "would make more than"),
    ("{{ '%(a)s' * 100000 % {'a': 'y' * 1000} }}", "would make more than"),
    ("{{ ('x' * 1000000).replace('x', 'y' * 100) }}", "would make more than"),
    ("{{ (['x' * 1000000] * 100)|join }}", "would make more than"),
    ("{{ ['x' * 1000000] * 100 }}", "would make more than"),  # a list written as text
    ("{{ lipsum(10**7) }}", "would make more than"),
    ("{{ [1]|batch(10**10, 'x')|list }}", "would make more than"),
    ("{{ messages|tojson(indent=10**10) }}", "may indent tojson by at most 64 characters"),
    # copies kept: slices of a long text in 300 variables
    ("{% set ns = namespace(s='x' * 1000000) %}" + "".join("{%% set ns.c%d = ns.s[%d:] %%}" % (i, i) for i in range(300)),
     "would make more than"),
    ("{% set s %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}", "would make more than"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps (loop iterations, calls and filters)"),
    ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}", "steps (loop iterations"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
]


@pytest.fixture(scope="module")
def trusting(llm):
    with TestClient(create_app(llm, served_model_name="m", trust_request_chat_template=True)) as http:
        yield http


@pytest.mark.parametrize("template, message", HOSTILE_TEMPLATES)
def test_a_requests_template_that_fails_or_runs_away_is_a_400_naming_it(trusting, template, message):
    start = time.perf_counter()
    for path, extra in (("/v1/chat/completions", {"max_tokens": 1}), ("/tokenize", {})):
        r = trusting.post(path, json={"model": "m", "messages": MESSAGES, "chat_template": template, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "chat_template" and error["message"].startswith("chat_template failed"), error
        assert message in error["message"], error
    # The budgets count steps and bytes, not time: this bound only tells a cut from a hang (each
    # template ran for minutes before them). 10 s failed once on a loaded 2-core machine (14.6 s).
    assert time.perf_counter() - start < 60
    # and the server still serves, its own template too
    assert trusting.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_the_error_says_at_which_line_of_the_template(trusting):
    r = trusting.post("/tokenize", json={"model": "m", "messages": MESSAGES, "chat_template": "{{ 'a' }}\n\n{{ 1/0 }}"})
    assert r.json()["error"]["message"] == "chat_template failed at line 3: ZeroDivisionError: division by zero"


def test_a_requests_template_is_at_most_64_kib(trusting):
    template = PLAIN + "{# " + "x" * (65536 - len(PLAIN) - 6) + " #}"
    ok = trusting.post("/tokenize", json={"model": "m", "messages": MESSAGES, "chat_template": template})
    assert ok.status_code == 200, ok.text
    r = trusting.post("/tokenize", json={"model": "m", "messages": MESSAGES, "chat_template": template + " "})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert r.json()["error"]["message"] == "chat template given has 65537 characters; at most 65536"


def test_a_template_of_the_python_api_fails_with_a_value_error(llm):
    with pytest.raises(ValueError, match=r"^chat_template failed at line 1: ZeroDivisionError: division by zero$"):
        llm.chat(MESSAGES, SamplingParams(max_tokens=1), use_tqdm=False, chat_template="{{ 1/0 }}")
    with pytest.raises(ValueError, match="would make more than"):
        llm.render_chat(MESSAGES, chat_template="{{ 'x' * 10**10 }}")


TOOLS_TEMPLATE = "{% for t in tools or [] %}{{ t['function']['description'] }}\n{% endfor %}" + PLAIN


@pytest.mark.parametrize(("messages", "tools", "where", "at"), [
    ([MESSAGES[0], {"role": "user", "content": "Name a \ud800 prime."}], None, r"messages\[1\]\['content'\]", r"7 \('\\ud800'\)"),
    ([{"role": "user", "content": [{"type": "text", "text": "fine"}, {"type": "text", "text": "\udc00"}]}], None,
     r"messages\[0\]\['content'\]\[1\]\['text'\]", r"0 \('\\udc00'\)"),
    ([MESSAGES, [MESSAGES[0], {"role": "user", "content": "x \ud800"}]], None, r"messages\[1\]\[1\]\['content'\]", "2"),
    (MESSAGES, [{"type": "function", "function": {"name": "f", "description": "half \udc80 a pair"}}],
     r"tools\[0\]\['function'\]\['description'\]", "5"),
])
def test_a_lone_surrogate_in_a_conversation_is_a_value_error_naming_where(llm, messages, tools, where, at):
    """A str Python builds from JSON's "\\ud800": the tokenizer's ValueError named a character of the
    rendered prompt, not the message or field the caller gave it in (as LLM.generate names a prompt)."""
    with pytest.raises(ValueError, match=rf"^{where}: the text holds a lone UTF-16 surrogate at character {at}") as e:
        llm.chat(messages, SamplingParams(max_tokens=1), tools=tools, chat_template=TOOLS_TEMPLATE, use_tqdm=False)
    assert e.value.param == ("tools" if tools else "messages")
    assert not llm.engine.has_unfinished_requests()


def test_the_models_own_template_failing_on_a_requests_messages_is_a_400_naming_messages(tiny_dense_dir):
    # (raise_exception in a model's template was a 400 already; any other failure was a 500)
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 22, enforce_eager=True,
              chat_template="{{ 'roles: ' ~ (100 // (messages|length - 1)) }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with TestClient(create_app(llm, served_model_name="m")) as http:
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES[1:], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "failed at line 1: ZeroDivisionError: integer division or modulo by zero" in r.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 1}).status_code == 200


# What the render budget hooks (*, +, %, ~, str methods, filters, tojson, loops, macros, output) must not change.
BUSY = """{%- set ns = namespace(n=0, names=[]) -%}
{%- macro turn(m) -%}<{{ m['role'] | upper }}>{{ m['content'] | trim }}</{{ m['role'] }}>{%- endmacro -%}
{%- for m in messages -%}
{%- set ns.n = ns.n + 1 -%}{%- set ns.names = ns.names + [m['role']] -%}
{{ turn(m) }}|{{ '%s:%03d' % (m['role'], loop.index) }}|{{ m['content'][1:4] }}{{ m['content'][::-2] }}|{{ '{}-{:>5}'.format(m['role'], loop.index0) }}|
{{- m['content'].split(' ')|join('_') ~ '/' ~ m['content'].replace('a', 'A') ~ '/' ~ (m['role'] * 2) ~ '/' ~ m['role']|center(12) }}
{{ m | tojson }}{{ m | tojson(indent=2) }}{{ [m['role'], 1, 2.5, none] | tojson(separators=(',', ':')) }}
{%- endfor -%}
{{ ns.n }} {{ ns.names|join(',') }} {{ messages[::-1]|map(attribute='role')|join }} {{ range(3)|list }} {{ messages|map(attribute='role')|unique|list }}
{%- for x in [[1, [2, 3]], [4]] recursive %}[{{ x if x is number else loop(x) }}]{% endfor %}
{{ 2 ** 10 }} {{ 7 % 3 }} {{ 'a\nb'|indent(2, true) }} {{ 'ab'|wordwrap(1) }} {{ [1, 2, 3, 4]|batch(3, 0)|list }}
{%- if add_generation_prompt %}<ASSISTANT>{% endif %}"""


def test_templates_render_as_transformers_renders_them(llm):
    messages = MESSAGES + [{"role": "assistant", "content": "  Two, a prime.  "}, {"role": "user", "content": "And another"}]
    for template in (BUSY, CHATML, PLAIN):
        assert llm.render_chat(messages, chat_template=template) == reference(template, messages)


def test_a_long_conversation_renders_within_the_budget(pangu_tokenizer):
    """The budget grows with what a template is given: a 20M-character message, 20,000 messages
    (Pangu's real template); a busy template's many copies of a 1M-character message, and its
    1,000 messages (a list grown by one item a message)."""
    long = [{"role": "user", "content": "字" * 20_000_000}]
    assert len(pangu_tokenizer.apply_chat_template(long)) > 20_000_000
    many = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(20_000)]
    assert pangu_tokenizer.apply_chat_template(many).count("turn") == 20_000
    assert len(pangu_tokenizer.apply_chat_template([{"role": "user", "content": "字" * 1_000_000}], chat_template=BUSY)) > 1_000_000
    assert pangu_tokenizer.apply_chat_template(many[:1000], chat_template=BUSY).count("turn") > 1000


THINKING = ("{% for m in messages %}{{ m['role'] }}: {% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>"
            "{% endif %}{{ m['content'] }}\n{% endfor %}")


def test_a_turns_thinking_sent_as_reasoning_reaches_the_template_as_reasoning_content(llm):
    """vLLM's clients now send an assistant turn's thinking back as `reasoning` (the name vLLM
    answers with since its PR #27752), templates read `reasoning_content` (transformers renders the
    reference): the prompt is the one the old name gives; both names with different texts are a 400."""
    turn = {"role": "assistant", "content": "7"}
    new = MESSAGES + [{**turn, "reasoning": "small primes first"}, {"role": "user", "content": "Another?"}]
    old = MESSAGES + [{**turn, "reasoning_content": "small primes first"}, {"role": "user", "content": "Another?"}]
    with TestClient(create_app(llm, served_model_name="m", trust_request_chat_template=True)) as http:
        for messages in (new, old, [{**m, "reasoning_content": m["reasoning"]} if "reasoning" in m else m for m in new]):
            r = http.post("/tokenize", json={"model": "m", "messages": messages, "chat_template": THINKING})
            assert r.status_code == 200 and r.json()["tokens"] == llm.encode_prompt(reference(THINKING, old, False))
        assert "<think>small primes first</think>" in reference(THINKING, old, False)
        both = MESSAGES + [{**turn, "reasoning": "a", "reasoning_content": "b"}]
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": both, "max_tokens": 1, "chat_template": THINKING})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[2].reasoning"
