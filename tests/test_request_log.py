"""--enable-log-requests: every request logged as received logs exactly one ending line, however
it ends: finished (its finish reasons), failed (what the client was told: a 400's message, or the
generic message of a fault, never a traceback) or aborted (the client left, queued or mid-reply).

A real engine for the client's own mistakes found mid-reply (a grammar dead end, restrictions that
leave no token); a stand-in engine for a fault inside the engine and for a reply that never ends
(so that the client leaving is certain to come first)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fixtures_server import serving
from pangu_infer import LLM
from pangu_infer.engine.async_engine import EngineDeadError
from pangu_infer.errors import RequestFailedError
from pangu_infer.outputs import CompletionOutput, RequestOutput
from pangu_infer.server.app import create_app
from pangu_infer.server.streaming import REQUEST_LOGGER

MESSAGES = [{"role": "user", "content": "Describe a person."}]
# Compiles, but every reply dead-ends after `{"a": "`: the required property's pattern matches no text.
DEAD_END = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}
ENDINGS = ("finished request ", "failed request ", "aborted request ")


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256)


@pytest.fixture
def request_log(caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    return caplog


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == REQUEST_LOGGER]


def _request_ids(caplog) -> list[str]:
    return [line.split()[2].rstrip(":") for line in _lines(caplog) if line.startswith("received request ")]


def _ending(caplog, request_id: str, timeout: float = 0.0) -> str:
    """The one ending line of `request_id` (waiting up to `timeout` s for it: a server thread logs it)."""
    deadline = time.monotonic() + timeout
    while True:
        endings = [line for line in _lines(caplog) if line.startswith(ENDINGS) and line.split()[2].rstrip(":") == request_id]
        if endings or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert len(endings) == 1, (request_id, _lines(caplog))
    return endings[0]


def _sse_error(response) -> dict:
    events = [line for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return __import__("json").loads(events[-1][6:])["error"]


# ---------------------------------------------------------------------- the real engine
def test_a_request_the_client_got_wrong_mid_reply_logs_its_failure_with_the_400s_message(llm, request_log):
    dead = {"type": "json_schema", "json_schema": {"name": "dead", "schema": DEAD_END}}
    with TestClient(create_app(llm, served_model_name="m", enable_log_requests=True)) as http:
        # a grammar dead end: a 400, and after the 200 of a stream an error event
        for stream in (False, True):
            request_log.clear()
            r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 30, "response_format": dead, "stream": stream})
            error = _sse_error(r) if stream else r.json()["error"]
            assert r.status_code == (200 if stream else 400) and error["param"] == "response_format.json_schema", r.text
            (rid,) = _request_ids(request_log)
            assert _ending(request_log, rid) == f"failed request {rid}: {error['message']}"
        # restrictions that leave no token at the reply's first (a 400 before the 200, streamed too)
        eos = llm.tokenizer.eos_token_id
        for stream in (False, True):
            request_log.clear()
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "allowed_token_ids": [eos], "min_tokens": 2,
                                                   "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text
            (rid,) = _request_ids(request_log)
            assert _ending(request_log, rid) == f"failed request {rid}: {r.json()['error']['message']}"
        # a length past the context, refused at admission: named as the client named it
        request_log.clear()
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_completion_tokens": 10_000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
        (rid,) = _request_ids(request_log)
        assert _ending(request_log, rid) == f"failed request {rid}: {r.json()['error']['message']}"
        # two prompts, the second refused: it failed; the first, submitted and then given up, aborted
        # (or finished, if the engine was that quick)
        request_log.clear()
        r = http.post("/v1/completions", json={"prompt": [[5, 6], [5, 10_000_000]], "max_tokens": 50})
        assert r.status_code == 400, r.text
        first, second = _request_ids(request_log)
        # the reply names which of the request's prompts (prompt[1]); the log line is that prompt's own
        ending = _ending(request_log, second)
        assert ending.startswith(f"failed request {second}: ")
        assert "prompt[1]: " + ending.removeprefix(f"failed request {second}: ") == r.json()["error"]["message"]
        assert _ending(request_log, first).startswith((f"aborted request {first}: ", f"finished request {first}: "))
        # and requests that finish, on each API: one line, finished
        for path, body in [("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "stream": True}),
                           ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                           ("/v1/messages", {"model": "m", "messages": MESSAGES, "max_tokens": 2, "stream": True})]:
            request_log.clear()
            assert http.post(path, json=body).status_code == 200
            (rid,) = _request_ids(request_log)
            assert _ending(request_log, rid).startswith(f"finished request {rid}: length, "), path


# ---------------------------------------------------------------------- a stand-in engine
class EndingEngine:
    """Replies one token, then ends as `mode` says: "fault" (RequestFailedError, as AsyncEngine
    raises for a request that failed inside the engine), "dead" (EngineDeadError), "hang" (never
    ends; records the request ids it saw cancelled or closed), or "queued" (no token: hangs first)."""

    is_running = True

    def __init__(self, mode: str):
        self.mode = mode
        self.closed: list[str] = []

    async def generate(self, prompt_token_ids, params, request_id, prompt=None, **_):
        try:
            if self.mode != "queued":
                comp = CompletionOutput(0, "a", [7], text_delta="a", token_ids_delta=[7])
                yield RequestOutput(request_id, prompt, list(prompt_token_ids), [comp], finished=False)
            if self.mode == "fault":
                raise RequestFailedError(f"request {request_id} failed inside the engine: IndexError('secret detail')")
            if self.mode == "dead":
                raise EngineDeadError("the engine thread has stopped: RuntimeError('secret detail')")
            await asyncio.Event().wait()
        except (GeneratorExit, asyncio.CancelledError):
            self.closed.append(request_id)
            raise


@pytest.mark.parametrize("mode, told", [("fault", "internal server error"), ("dead", "the inference engine has stopped")])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_request_that_fails_inside_the_engine_logs_the_generic_message_not_the_details(llm, request_log, mode, told, path):
    body = {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "hi"}
    with TestClient(create_app(llm, served_model_name="m", engine=EndingEngine(mode), enable_log_requests=True),
                    raise_server_exceptions=False) as http:
        for stream in (False, True):
            request_log.clear()
            r = http.post(path, json={**body, "max_tokens": 5, "stream": stream})
            error = _sse_error(r) if stream else r.json()["error"]
            assert error["message"].startswith(told) and r.status_code == (200 if stream else 500 if mode == "fault" else 503), r.text
            (rid,) = _request_ids(request_log)
            line = _ending(request_log, rid)
            assert line.startswith(f"failed request {rid}: {told}"), line
            assert "secret" not in line and "Traceback" not in line and "Error" not in line, line


@pytest.mark.parametrize("mode", ["hang", "queued"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_logs_its_request_aborted(llm, request_log, mode, stream):
    """The client hangs up mid-reply, or while its request is still queued (no token yet)."""
    engine = EndingEngine(mode)
    with serving(create_app(llm, served_model_name="m", engine=engine, enable_log_requests=True)) as url:
        body = {"messages": MESSAGES, "max_tokens": 5, "stream": stream}
        if stream and mode == "hang":  # the 200 and the first chunk, then the client leaves
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 20
        while not _request_ids(request_log) and time.monotonic() < deadline:
            time.sleep(0.05)
        (rid,) = _request_ids(request_log)
        line = _ending(request_log, rid, timeout=20)
        assert line.startswith(f"aborted request {rid}: ended before it finished, after {1 if mode == 'hang' else 0} generated"), line
        assert engine.closed == [rid]  # (the engine's stream was closed: the request aborted there too)
