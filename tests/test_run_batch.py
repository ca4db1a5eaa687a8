"""`pangu-infer run-batch` (vLLM's offline batch command, OpenAI's Batch file format): one output line
per request in input order, each body the server's own, line errors kept to their line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from fixtures_server import ScriptedEngine
from pangu_infer import LLM
from pangu_infer.batch import parse_lines, run_batch
from pangu_infer.cli import main
from pangu_infer.server.app import create_app

MODEL_FLAGS = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory", "8MiB", "--served-model-name", "m"]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me about the sea"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"model": "m", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
MESSAGES = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
RESPONSES = {"model": "m", "input": "hi", "max_output_tokens": 3, "temperature": 0}


def request(custom_id, url, body, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


MIXED = [
    request("chat-1", "/v1/chat/completions", CHAT),
    request("cmpl-1", "/v1/completions", COMPLETION),
    '{"custom_id": "broken", "url": "/v1/completions", "body": {',  # not JSON
    request("speech-1", "/v1/audio/speech", {"model": "m", "input": "hi"}),  # no such endpoint here
    "",  # blank: skipped
    request("too-long", "/v1/completions", {**COMPLETION, "max_tokens": -1}),  # the server's 400
    request("chat-1", "/v1/completions", COMPLETION),  # custom_id used on line 1
    request("stream-1", "/v1/chat/completions", {**CHAT, "stream": True}),
    request("msg-1", "/v1/messages", MESSAGES),
    request("resp-1", "/v1/responses", RESPONSES),
    json.dumps({"custom_id": "no-url", "method": "POST", "body": CHAT}),
    request("get-1", "/v1/completions", COMPLETION, method="GET"),
    request("embed-1", "/v1/embeddings", {"model": "m", "input": ["hi", "there"]}),
]


@pytest.fixture(scope="module")
def batch(tiny_dense_dir, tmp_path_factory):
    """The mixed file run once through `pangu-infer run-batch` (in this process): (output lines, stderr)."""
    folder = tmp_path_factory.mktemp("batch")
    (folder / "in.jsonl").write_text("\n".join(MIXED) + "\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run-batch", "-i", str(folder / "in.jsonl"), "-o", str(folder / "out.jsonl"), "--model", str(tiny_dense_dir), *MODEL_FLAGS])
    assert rc == 0, err.getvalue()
    return [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()], err.getvalue()


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


def test_a_mixed_file_gives_one_line_per_request_in_order(batch):
    lines, stderr = batch
    assert [line["custom_id"] for line in lines] == [
        "chat-1", "cmpl-1", None, "speech-1", "too-long", "chat-1", "stream-1", "msg-1", "resp-1", "no-url", "get-1", "embed-1"]
    assert all(line["id"].startswith("batch_req_") for line in lines) and len({line["id"] for line in lines}) == len(lines)
    by_position = dict(enumerate(lines))
    for k, kind in ((0, "chat.completion"), (1, "text_completion"), (7, "message"), (8, "response"), (11, "list")):
        line = by_position[k]
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        body = line["response"]["body"]
        assert body.get("object", body.get("type")) == kind
        assert line["response"]["request_id"] == body["id"] if kind != "list" else line["response"]["request_id"].startswith("req_")
    assert lines[0]["response"]["body"]["usage"]["completion_tokens"] == 6
    refused = lines[4]
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["param"] == "max_tokens"
    # Lines that are no request: no response, an error naming the problem and its line.
    errors = {line["custom_id"]: line["error"] for line in lines if line["response"] is None}
    assert set(errors) == {None, "speech-1", "chat-1", "stream-1", "no-url", "get-1"}
    assert errors[None]["code"] == "invalid_json_line" and errors[None]["message"].startswith("line 3: not valid JSON")
    assert errors["speech-1"]["code"] == "invalid_url" and errors["speech-1"]["message"].startswith("line 4: url \"/v1/audio/speech\"")
    assert lines[5]["error"] == {"code": "duplicate_custom_id", "message": lines[5]["error"]["message"]}
    assert lines[5]["error"]["message"].startswith("line 7: custom_id 'chat-1' was used on line 1")
    assert errors["stream-1"]["message"].startswith("line 8: stream=true is not supported")
    assert errors["no-url"] == {"code": "missing_required_parameter", "message": "line 11: missing url"}
    assert errors["get-1"]["code"] == "invalid_method" and errors["get-1"]["message"].startswith("line 12: method \"GET\"")
    assert [len(d["embedding"]) for d in lines[11]["response"]["body"]["data"]] == [64, 64]
    assert "5 succeeded, 7 failed, of 12 requests" in stderr and "run-batch" in stderr  # the summary, after tqdm's bar


def test_a_greedy_line_is_what_the_server_answers(batch, llm):
    lines, _ = batch
    with TestClient(create_app(llm, served_model_name="m")) as http:
        for body, line in ((CHAT, lines[0]), (COMPLETION, lines[1])):
            answer = http.post("/v1/chat/completions" if "messages" in body else "/v1/completions", json=body).json()
            got = line["response"]["body"]
            assert {k: v for k, v in got.items() if k not in ("id", "created")} == {k: v for k, v in answer.items() if k not in ("id", "created")}
        refused = http.post("/v1/completions", json={**COMPLETION, "max_tokens": -1})
        assert refused.status_code == lines[4]["response"]["status_code"] and refused.json() == lines[4]["response"]["body"]


def test_lines_run_concurrently_through_the_engine(llm):
    """Three requests in flight at once, or none gets its first token: a batch run one request after
    another would wait here forever (cut at 30 s)."""

    class Gate(ScriptedEngine):
        def __init__(self, tokenizer, reply, wanted):
            super().__init__(tokenizer, reply)
            self.wanted, self.arrived, self.all_in = wanted, 0, asyncio.Event()

        async def generate(self, *args, **kwargs):
            self.arrived += 1
            if self.arrived == self.wanted:
                self.all_in.set()
            await self.all_in.wait()
            async for out in super().generate(*args, **kwargs):
                yield out

    engine = Gate(llm.tokenizer, "hello world", 3)
    app = create_app(llm, served_model_name="m", engine=engine)
    items = parse_lines("\n".join(request(f"c{k}", "/v1/chat/completions", CHAT) for k in range(3)).encode())
    written = []
    counts = asyncio.run(asyncio.wait_for(run_batch(app, items, written.append, concurrency=8), 30))
    assert counts == (3, 0) and [line["custom_id"] for line in written] == ["c0", "c1", "c2"]
    assert {line["response"]["body"]["choices"][0]["message"]["content"] for line in written} == {"hello world"}


def test_stdin_to_stdout(tiny_dense_dir):
    """`-i - -o -`: the results alone on stdout, the progress and the summary on stderr (the input
    with a UTF-8 byte order mark, as Windows editors may write it)."""
    text = "\ufeff" + "\n".join([request("a", "/v1/completions", COMPLETION), "nonsense", request("b", "/v1/chat/completions", CHAT)])
    out = subprocess.run([sys.executable, "-m", "pangu_infer.cli", "run-batch", "-i", "-", "-o", "-", "--model", str(tiny_dense_dir), *MODEL_FLAGS],
                         input=text, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", None, "b"]
    assert lines[0]["response"]["status_code"] == 200 and lines[2]["response"]["body"]["object"] == "chat.completion"
    assert lines[1]["error"]["code"] == "invalid_json_line"
    assert "2 succeeded, 1 failed, of 3 requests" in out.stderr and "results in stdout" in out.stderr


def test_an_unreadable_input_or_model_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(out), "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert f"pangu-infer run-batch: error: cannot read the input file '{tmp_path / 'missing.jsonl'}': No such file or directory" in err
    assert not out.exists()
    assert main(["run-batch", "-i", str(tmp_path), "-o", str(out), "--model", "/no/such/model"]) == 2
    assert "cannot read the input file" in capsys.readouterr().err
    given = tmp_path / "in.jsonl"
    given.write_text(request("a", "/v1/completions", COMPLETION) + "\n")
    assert main(["run-batch", "-i", str(given), "-o", str(tmp_path / "no" / "out.jsonl"), "--model", "/no/such/model"]) == 2
    assert "cannot write the output file" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(given), "-o", str(out), "--model", str(tmp_path / "no-model")]) == 2
    assert "pangu-infer run-batch: error: " in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("stream", "flags", "message"), [
    ("stdin", ["-i", "-", "-o", "OUT"], "cannot read the input file '-': stdin is closed"),
    ("stdout", ["-i", "IN", "-o", "-"], "cannot write the output file '-': stdout is closed"),
])
def test_a_closed_stdin_or_stdout_given_as_a_file_is_a_clear_error(tmp_path, capsys, monkeypatch, stream, flags, message):
    """`-i - <&-` was an AttributeError's traceback ('NoneType' object has no attribute 'buffer');
    `-o - >&-` loaded the model and wrote the results nowhere."""
    given = tmp_path / "in.jsonl"
    given.write_text(request("a", "/v1/completions", COMPLETION) + "\n")
    flags = [str(given) if f == "IN" else str(tmp_path / "out.jsonl") if f == "OUT" else f for f in flags]
    monkeypatch.setattr(sys, stream, None)
    assert main(["run-batch", *flags, "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err.strip() == f"pangu-infer run-batch: error: {message}"


def test_a_number_too_long_to_read_fails_its_line_as_the_server_answers_it(llm):
    """An integer past Python's digit limit: the line's error had repeated Python's advice to call
    sys.set_int_max_str_digits, which means nothing to a batch's user; the server answers the same
    body a 400 in the same words."""
    body = '{"model": "m", "prompt": "x", "max_tokens": 2, "seed": 1%s}' % ("0" * 5000)
    lines = [request("first", "/v1/completions", COMPLETION), '{"custom_id": "big", "url": "/v1/completions", "body": %s}' % body]
    (_, first), (_, second) = parse_lines("\n".join(lines).encode())
    assert first["custom_id"] == "first"
    assert second.code == "invalid_json_line" and second.message == "line 2: holds a number too long to read", second.message
    with TestClient(create_app(llm, served_model_name="m")) as http:
        r = http.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body holds a number too long to read", r.text


def test_a_custom_id_that_is_not_unicode_fails_its_line_alone(tiny_dense_dir, tmp_path):
    """A custom_id holding a lone surrogate (JSON's "\\ud800") is echoed in no output line: UTF-8 cannot
    write it, and writing it had ended the whole run (exit 2), every other line's result lost."""
    lines = [
        request("first", "/v1/completions", COMPLETION),
        '{"custom_id": "\\ud800", "url": "/v1/completions", "body": {"model": "m", "prompt": "x", "max_tokens": 2}}',
        '{"custom_id": "half \\udc80", "body": {}}',  # (refused for its missing url too: the same error, first)
        request("last", "/v1/completions", COMPLETION),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_dense_dir), *MODEL_FLAGS])
    assert rc == 0, err.getvalue()
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["custom_id"] for line in out] == ["first", None, None, "last"]
    assert out[0]["response"]["status_code"] == out[3]["response"]["status_code"] == 200
    for number, line in ((2, out[1]), (3, out[2])):
        assert line["response"] is None and line["error"]["code"] == "invalid_request"
        assert line["error"]["message"].startswith(f"line {number}: custom_id ") and "lone UTF-16 surrogate" in line["error"]["message"]
    assert "2 succeeded, 2 failed, of 4 requests" in err.getvalue()
