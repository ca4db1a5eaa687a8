"""Real `pangu-infer serve` processes on loopback for the server tests, and a tiny model that thinks.

`running_server(model_dir, *flags)` starts `python -m pangu_infer.cli serve` on a free 127.0.0.1 port,
waits for /health and stops the process afterwards; test modules wrap it in module-scoped
fixtures so each module starts its server once. `serving(app)` serves an app made in the test
process (uvicorn in a thread) for clients that need a real socket, such as a browser.
`metric_value` reads one sample from /metrics; `ScriptedEngine` stands in for the engine with a
fixed reply.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_models import build_tiny_model
from pangu_infer.outputs import CompletionOutput, RequestOutput
from pangu_infer.tokenizer import IncrementalDetokenizer

# Generous: a server that crashes is seen at once (poll), and a 2-core machine shared with other
# jobs has taken over 90 s to import torch and load the tiny model.
STARTUP_TIMEOUT_S = 300.0


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    model: str  # the served model name
    api_key: Optional[str]
    process: subprocess.Popen
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PortTaken(RuntimeError):
    pass


@contextlib.contextmanager
def running_server(model_dir: Path, *flags: str, api_key: Optional[str] = None, log_dir: Path,
                   https_ca: Optional[Path] = None, https_client_cert: Optional[tuple[Path, Path]] = None) -> Iterator[ServerProcess]:
    """`pangu-infer serve model_dir --dtype float32 --enforce-eager ...flags` (the model positional, as
    `vllm serve MODEL` takes it: every server test runs that spelling) on a free loopback port
    (another port if a test running beside this one took it between the probe and the bind).
    https_ca: the server serves HTTPS (flags name its key and certificate): its url is https://,
    and /health is checked trusting this certificate file (presenting https_client_cert, (key, cert), when given)."""
    for attempt in range(3):
        try:
            with _running_server(model_dir, *flags, api_key=api_key, log_dir=log_dir, https_ca=https_ca,
                                 https_client_cert=https_client_cert) as server:
                yield server
            return
        except _PortTaken:
            if attempt == 2:
                raise


@contextlib.contextmanager
def _running_server(model_dir: Path, *flags: str, api_key: Optional[str] = None, log_dir: Path,
                    https_ca: Optional[Path] = None, https_client_cert: Optional[tuple[Path, Path]] = None) -> Iterator[ServerProcess]:
    port = _free_port()
    cmd = [sys.executable, "-m", "pangu_infer.cli", "serve", str(model_dir), "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", *flags]
    env = {k: v for k, v in os.environ.items() if k != "PANGU_API_KEY"}
    if api_key is not None:
        cmd += ["--api-key", api_key]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    scheme = "https" if https_ca is not None else "http"
    verify = ssl.create_default_context(cafile=str(https_ca)) if https_ca is not None else True
    if https_client_cert is not None:
        verify.load_cert_chain(str(https_client_cert[1]), str(https_client_cert[0]))
    server = ServerProcess(f"{scheme}://127.0.0.1:{port}", str(model_dir), api_key, process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                if "address already in use" in server.log().lower():
                    raise _PortTaken(port)
                raise RuntimeError(f"pangu-infer serve exited with {process.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2, verify=verify).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pangu-infer serve did not answer /health within {STARTUP_TIMEOUT_S} s:\n{server.log()}")
            time.sleep(0.2)
        if not {"--served-model-name", "-a", "--alias"} & set(flags):  # the model given positionally was the one loaded
            assert f"pangu-infer serve: {str(model_dir)!r}" in server.log(), server.log()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve an ASGI app on a free loopback port from a thread; yields its http://127.0.0.1:PORT
    (a server whose thread ends before it starts, as one that lost its port to another test
    worker's does, is tried again on another port, twice)."""
    import uvicorn

    for attempt in range(3):
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.started or thread.is_alive() or attempt == 2:
            break
    try:
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def sdk_client(http):
    """The openai SDK over an in-process app (a fastapi TestClient as its HTTP client; no retries)."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def http(llm):
    """The server's app over the test module's `llm` fixture (served as "tiny"), in a TestClient.
    A module that needs another app (other names, flags, exceptions raised) defines its own `http`."""
    from fastapi.testclient import TestClient

    from pangu_infer.server.app import create_app

    with TestClient(create_app(llm, served_model_name="tiny")) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    """The openai SDK over the module's `http`."""
    return sdk_client(http)


class ScriptedEngine:
    """Answers every request with the same token ids, one per output, through the real detokenizer."""

    is_running = True

    def __init__(self, tokenizer, reply: str):
        self.tokenizer = tokenizer
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_token_ids, params, request_id, prompt=None):
        self.prompts.append(list(prompt_token_ids))
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        text = ""
        for k, token in enumerate(self.reply_ids):
            delta = detok.step([token])
            text += delta
            last = k == len(self.reply_ids) - 1
            comp = CompletionOutput(0, text, self.reply_ids[: k + 1], finish_reason="stop" if last else None,
                                    text_delta=delta, token_ids_delta=[token])
            yield RequestOutput(request_id, prompt, list(prompt_token_ids), [comp], finished=last)


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The value of the sample `name{labels...}` in a Prometheus text exposition (KeyError if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"no sample {name}{labels} in /metrics")


def _chain_token_ids(tokenizer, reasoning: str, answer: str) -> list[int]:
    think_start, think_end = tokenizer.token_to_id("[unused16]"), tokenizer.token_to_id("[unused17]")
    ids = [think_start, *tokenizer.encode(reasoning, add_special_tokens=False), think_end,
           *tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    assert len(set(ids)) == len(ids), f"the scripted output must not repeat a token: {ids}"
    return ids


SCRIPTED_REASONING = "quick fox"
SCRIPTED_ANSWER = "hello world"


@pytest.fixture(scope="session")
def thinking_dense_dir(tmp_path_factory, tiny_dense_config, pangu_tokenizer_dir, pangu_tokenizer) -> Path:
    """A tiny Pangu 7B whose greedy reply to any chat is `[unused16]quick fox[unused17]hello world` + eos.

    Every layer's o_proj and down_proj are zero, so the last hidden state is the embedding of the
    current token: the reply is a chain where each token's embedding (a unit vector) selects the
    next token's lm_head row. Any token outside the chain leads to its start, [unused16].
    """
    directory = build_tiny_model(tmp_path_factory.mktemp("thinking_dense"), tiny_dense_config, pangu_tokenizer_dir)
    chain = _chain_token_ids(pangu_tokenizer, SCRIPTED_REASONING, SCRIPTED_ANSWER)
    hidden = tiny_dense_config["hidden_size"]
    assert len(chain) < hidden
    (file,) = directory.glob("*.safetensors")
    tensors = load_file(file)
    for name in list(tensors):
        if ".o_proj." in name or ".down_proj." in name:
            tensors[name] = torch.zeros_like(tensors[name])
    tensors["model.norm.weight"] = torch.ones(hidden)
    embed = torch.zeros_like(tensors["model.embed_tokens.weight"])
    embed[:, hidden - 1] = 1.0  # every token not in the chain: "start the reply"
    lm_head = torch.zeros_like(tensors["lm_head.weight"])
    lm_head[chain[0], hidden - 1] = 10.0
    for i, token in enumerate(chain):
        embed[token] = 0.0
        embed[token, i] = 1.0
        if i + 1 < len(chain):
            lm_head[chain[i + 1], i] = 10.0
    tensors["model.embed_tokens.weight"], tensors["lm_head.weight"] = embed, lm_head
    save_file(tensors, str(file), metadata={"format": "pt"})
    return directory
