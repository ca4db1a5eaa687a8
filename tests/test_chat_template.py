"""A chat template of the user's instead of the model's, as vLLM takes it: `--chat-template`
(a file or the template itself), `LLM(chat_template=...)`, `LLM.chat(chat_template=...)`, and a
request's own `chat_template` on a server started with `--trust-request-chat-template`.

The reference rendering is transformers' `apply_chat_template` with the same template.
"""

from __future__ import annotations

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
