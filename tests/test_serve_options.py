"""`pangu-infer serve` options of vLLM and llama.cpp: HTTPS, generation-config defaults, root path,
uvicorn's log level, llama.cpp's spellings. Real servers on loopback, driven by the openai client."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import ssl
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional
from urllib.parse import urljoin, urlsplit

import httpx
import openai
import pytest

from fixtures_server import running_server
from pangu_infer.server.cli import check_ssl_files


# ---------------------------------------------------------------------- HTTPS
def _self_signed(directory: Path, name: str = "server", host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (an IP address) and its unencrypted key, as PEM files:
    (key, cert). Made with the cryptography package where installed, else the openssl command."""
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    if importlib.util.find_spec("cryptography") is None:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("making a test certificate needs the cryptography package or the openssl command")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key_path), "-out", str(cert_path),
             "-days", "2", "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}"],
            check=True, capture_output=True,
        )
        return key_path, cert_path
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_server(tiny_dense_dir, certificate, tmp_path_factory):
    key, cert = certificate
    with running_server(
        tiny_dense_dir, "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--served-model-name", "tiny-tls",
        "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
        log_dir=tmp_path_factory.mktemp("https_logs"), https_ca=cert,
    ) as s:
        yield s


def test_https_serves_the_api_to_a_client_that_trusts_the_certificate(https_server, certificate):
    _, cert = certificate
    assert https_server.url.startswith("https://127.0.0.1:")
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=60)
    client = openai.OpenAI(base_url=f"{https_server.url}/v1", api_key="unused", max_retries=0, http_client=trusting)
    assert [m.id for m in client.models.list().data] == ["tiny-tls"]
    reply = client.chat.completions.create(model="tiny-tls", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    assert f"on {https_server.url}/v1, chat page at {https_server.url}/" in https_server.log()
    # TLS for real: a client that does not trust the certificate is refused at the handshake ...
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https_server.url}/health", timeout=10)
    # ... and plain HTTP to the same port gets no answer.
    with pytest.raises(httpx.TransportError):
        httpx.get(https_server.url.replace("https://", "http://") + "/health", timeout=10)


def test_bad_ssl_files_are_named_before_the_model_loads(tmp_path, certificate):
    key, cert = certificate
    other_key, other_cert = _self_signed(tmp_path, "other")
    assert check_ssl_files(None, None) is False
    assert check_ssl_files(str(key), str(cert)) is True
    with pytest.raises(ValueError, match=r"--ssl-certfile needs --ssl-keyfile"):
        check_ssl_files(None, str(cert))
    with pytest.raises(ValueError, match=r"--ssl-keyfile needs --ssl-certfile"):
        check_ssl_files(str(key), None)
    with pytest.raises(ValueError, match=r"--ssl-certfile '.*missing.crt': no such file"):
        check_ssl_files(str(key), str(tmp_path / "missing.crt"))
    with pytest.raises(ValueError, match=r"--ssl-keyfile '.*missing.key': no such file"):
        check_ssl_files(str(tmp_path / "missing.key"), str(cert))
    with pytest.raises(ValueError, match=r"--ssl-certfile '.*server.key': not a PEM certificate"):
        check_ssl_files(str(key), str(key))
    with pytest.raises(ValueError, match=r"--ssl-keyfile '.*server.crt': not a PEM private key"):
        check_ssl_files(str(cert), str(cert))
    garbled = tmp_path / "garbled.crt"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"--ssl-certfile '.*garbled.crt': not a valid PEM certificate"):
        check_ssl_files(str(key), str(garbled))
    with pytest.raises(ValueError, match=r"--ssl-keyfile '.*other.key' does not match the certificate in --ssl-certfile '.*server.crt'"):
        check_ssl_files(str(other_key), str(cert))
    # The command: exit code 2 and one line naming the flag, before any model is looked for.
    run = subprocess.run(
        [sys.executable, "-m", "pangu_infer.cli", "serve", "--model", str(tmp_path / "no-such-model"),
         "--ssl-key-file", str(other_key), "--ssl-cert-file", str(cert)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "pangu-infer serve: error: --ssl-keyfile" in run.stderr and "does not match" in run.stderr, run.stderr
    assert "no-such-model" not in run.stderr


# ---------------------------------------------------------------------- client certificates, encrypted keys
def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("making test client certificates needs the openssl command")
    subprocess.run([openssl, *args], check=True, capture_output=True)


def _ca(directory: Path) -> tuple[Path, Path]:
    """A CA for client certificates: (key, cert)."""
    key, cert = directory / "ca.key", directory / "ca.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", "/CN=test client CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _client_certificate(directory: Path, ca: tuple[Path, Path], name: str = "client") -> tuple[Path, Path]:
    """A client certificate signed by `ca`: (key, cert)."""
    key, request, cert, extensions = (directory / f"{name}{ext}" for ext in (".key", ".csr", ".crt", ".ext"))
    extensions.write_text("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-set_serial", "2", "-days", "2",
             "-out", str(cert), "-extfile", str(extensions))
    return key, cert


def _encrypted(key: Path, password: str) -> Path:
    """A copy of `key` encrypted with `password` (PKCS#8, AES-256)."""
    encrypted = key.with_name(key.stem + "-encrypted.key")
    _openssl("pkey", "-in", str(key), "-aes256", "-passout", f"pass:{password}", "-out", str(encrypted))
    return encrypted


def _tls_client(server_cert: Path, client: Optional[tuple[Path, Path]] = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(server_cert))
    if client is not None:
        context.load_cert_chain(str(client[1]), str(client[0]))
    return httpx.Client(verify=context, timeout=60)


@pytest.fixture(scope="module")
def client_ca(tmp_path_factory) -> tuple[Path, Path]:
    return _ca(tmp_path_factory.mktemp("client_ca"))


@pytest.mark.parametrize("cert_reqs", ["2", "1"])
def test_client_certificates_are_required_or_optional_and_an_encrypted_key_serves(tiny_dense_dir, certificate, client_ca,
                                                                                  tmp_path, cert_reqs):
    """--ssl-cert-reqs 2 --ssl-ca-certs CA: a client without a certificate, or with one the CA did
    not sign, is refused at the handshake; one with a CA-signed certificate is served. 1: a client
    without one is served too, one with a certificate the CA did not sign is still refused. The
    server's key is encrypted: --ssl-keyfile-password reaches uvicorn."""
    key, cert = certificate
    signed = _client_certificate(tmp_path, client_ca)
    (tmp_path / "other").mkdir()
    stranger = _client_certificate(tmp_path, _ca(tmp_path / "other"), "stranger")  # signed by another CA
    with running_server(
        tiny_dense_dir, "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--served-model-name", "tiny-mtls",
        "--ssl-keyfile", str(_encrypted(key, "s3cret pass")), "--ssl-certfile", str(cert), "--ssl-keyfile-password", "s3cret pass",
        "--ssl-ca-certs", str(client_ca[1]), "--ssl-cert-reqs", cert_reqs,
        log_dir=tmp_path, https_ca=cert, https_client_cert=signed,
    ) as server:
        with _tls_client(cert, signed) as http:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, http_client=http)
            assert [m.id for m in client.models.list().data] == ["tiny-mtls"]
        with _tls_client(cert, stranger) as http, pytest.raises(httpx.TransportError):
            http.get(f"{server.url}/health")
        with _tls_client(cert) as http:
            if cert_reqs == "2":
                with pytest.raises(httpx.TransportError):
                    http.get(f"{server.url}/health")
            else:
                assert http.get(f"{server.url}/health").status_code == 200


def test_bad_client_certificate_and_key_password_flags_are_named_before_the_model_loads(tmp_path, certificate, client_ca, capsys):
    from pangu_infer.cli import main

    key, cert = certificate
    ca = str(client_ca[1])
    encrypted = _encrypted(key, "right")
    https = ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    garbled = tmp_path / "garbled.crt"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    assert check_ssl_files(str(key), str(cert), None, ca, 2) is True
    assert check_ssl_files(str(encrypted), str(cert), "right") is True
    # (flags, the flag the line starts with, what it says)
    for flags, flag, says in [
        (["--ssl-ca-certs", ca, "--ssl-cert-reqs", "2"], "--ssl-ca-certs", "needs HTTPS: give --ssl-keyfile and --ssl-certfile too"),
        (["--ssl-cert-reqs", "2"], "--ssl-cert-reqs", "needs HTTPS: give --ssl-keyfile and --ssl-certfile too"),
        (["--ssl-keyfile-password", "x"], "--ssl-keyfile-password", "needs HTTPS"),
        ([*https, "--ssl-cert-reqs", "3"], "--ssl-cert-reqs", "3: expected 0 (no client certificate), 1 (optional) or 2 (required)"),
        ([*https, "--ssl-cert-reqs", "-1", "--ssl-ca-certs", ca], "--ssl-cert-reqs", "-1: expected 0"),
        ([*https, "--ssl-cert-reqs", "2"], "--ssl-cert-reqs", "2 needs --ssl-ca-certs"),
        ([*https, "--ssl-ca-certs", ca], "--ssl-ca-certs", "is read only to verify client certificates: give --ssl-cert-reqs 2"),
        ([*https, "--ssl-cert-reqs", "1", "--ssl-ca-certs", str(tmp_path / "missing.pem")], "--ssl-ca-certs", "missing.pem': no such file"),
        ([*https, "--ssl-cert-reqs", "2", "--ssl-ca-certs", str(key)], "--ssl-ca-certs", "not a PEM file of CA certificates"),
        ([*https, "--ssl-cert-reqs", "2", "--ssl-ca-certs", str(garbled)], "--ssl-ca-certs", "not a valid PEM file of CA certificates"),
        (["--ssl-keyfile", str(encrypted), "--ssl-certfile", str(cert)], "--ssl-keyfile",
         "the key is encrypted (password-protected); give its password with --ssl-keyfile-password"),
        (["--ssl-keyfile", str(encrypted), "--ssl-certfile", str(cert), "--ssl-keyfile-password", "wrong"], "--ssl-keyfile-password",
         ": not the password of the key in --ssl-keyfile"),
        (["--ssl-keyfile", str(encrypted), "--ssl-certfile", str(cert), "--ssl-keyfile-password", ""], "--ssl-keyfile-password",
         "'': expected the key's password"),
    ]:
        assert main(["serve", str(tmp_path / "no-such-model"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"pangu-infer serve: error: {flag}") and says in err, (flags, err)
        assert len(err.strip().splitlines()) == 1 and "no-such-model" not in err and "Traceback" not in err, (flags, err)


# ---------------------------------------------------------------------- generation config
CHAT = [{"role": "user", "content": "tell me about the weather in the city"}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine_defaults_server(tiny_dense_dir, tmp_path_factory):
    """--generation-config vllm: the model's file (do_sample false: greedy) is ignored."""
    with running_server(
        tiny_dense_dir, "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--generation-config", "vllm",
        log_dir=tmp_path_factory.mktemp("genconfig_logs"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def folder_config_server(tiny_dense_dir, tmp_path_factory):
    """--generation-config FOLDER (sampling, replies of 3 tokens) with a greedy override over it."""
    folder = tmp_path_factory.mktemp("generation_config")
    (folder / "generation_config.json").write_text('{"do_sample": true, "temperature": 1.0, "top_k": 50, "max_new_tokens": 3}')
    with running_server(
        tiny_dense_dir, "--max-model-len", "128", "--kv-cache-memory", "8MiB", "--generation-config", str(folder),
        "--override-generation-config", '{"temperature": 0}',
        log_dir=tmp_path_factory.mktemp("genconfig_logs"),
    ) as s:
        yield s


def test_generation_config_vllm_ignores_the_models_file(engine_defaults_server):
    client = _client(engine_defaults_server)
    model = engine_defaults_server.model
    # The tiny model's generation_config.json says do_sample false; ignored, a request without a
    # temperature samples at 1.0: two replies differ, and differ from the greedy one.
    sampled = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, n=2)
    texts = [c.message.content for c in sampled.choices]
    greedy = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0).choices[0].message.content
    assert texts[0] != texts[1] and greedy not in texts


def test_a_folders_generation_config_with_the_override_over_it(folder_config_server):
    client = _client(folder_config_server)
    model = folder_config_server.model
    greedy = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0).choices[0].message.content
    # No temperature, no max_tokens: the override's temperature 0 (over the folder's 1.0) and the
    # folder's max_new_tokens 3.
    replies = [client.chat.completions.create(model=model, messages=CHAT) for _ in range(2)]
    for reply in replies:
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
        assert reply.choices[0].message.content == greedy
    # Completions too (instead of OpenAI's 16); a request's own values win, its length up to the
    # folder's max_new_tokens (vLLM's ceiling for a config the operator chose).
    plain = client.completions.create(model=model, prompt="the weather in the city")
    assert plain.usage.completion_tokens == 3
    assert client.completions.create(model=model, prompt="the weather in the city", max_tokens=2).usage.completion_tokens == 2
    assert client.completions.create(model=model, prompt="the weather in the city", max_tokens=5).usage.completion_tokens == 3
    sampled = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, n=2, temperature=1.0)
    assert sampled.choices[0].message.content != sampled.choices[1].message.content
    # The default length fits a prompt's room in the context (128 tokens), not a 400 for a length not asked.
    near_full = client.completions.create(model=model, prompt=[7] * 126)
    assert near_full.usage.completion_tokens == 2


def _reply_lengths(http, model: str, asked: Optional[int]) -> dict[str, tuple[int, str]]:
    """(generated tokens, finish reason) of a greedy request asking `asked` tokens (None: no length)
    on each API: chat (max_tokens and max_completion_tokens), completions, Responses, Messages."""
    def length(field: str) -> dict:
        return {} if asked is None else {field: asked}

    got = {}
    for name, field in (("chat", "max_tokens"), ("chat_completion_tokens", "max_completion_tokens")):
        r = http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "temperature": 0, "ignore_eos": True,
                                                    **length(field)}).json()
        got[name] = (r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"])
    r = http.post("/v1/completions", json={"model": model, "prompt": "the weather in the city", "temperature": 0,
                                           "ignore_eos": True, **length("max_tokens")}).json()
    got["completions"] = (r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"])
    r = http.post("/v1/responses", json={"model": model, "input": CHAT[0]["content"], "temperature": 0,
                                         **length("max_output_tokens")}).json()
    got["responses"] = (r["usage"]["output_tokens"], r["status"])
    if asked is not None:  # (Anthropic's max_tokens is required)
        r = http.post("/v1/messages", json={"model": model, "messages": CHAT, "temperature": 0, "max_tokens": asked}).json()
        got["messages"] = (r["usage"]["output_tokens"], r["stop_reason"])
    return got


def _cut(n: int, asked_some: bool = True) -> dict[str, tuple[int, str]]:
    cut = {"chat": (n, "length"), "chat_completion_tokens": (n, "length"), "completions": (n, "length"),
           "responses": (n, "incomplete")}
    return {**cut, "messages": (n, "max_tokens")} if asked_some else cut


def test_an_operators_max_new_tokens_caps_every_servers_request_as_vllms_does(tiny_dense_dir, tmp_path):
    """vLLM's server: --override-generation-config's max_new_tokens, or that of a --generation-config
    FOLDER, is a ceiling on a request's own max_tokens on every API; a request asking less gets what
    it asked. LLM.generate with a SamplingParams keeps its max_tokens (vLLM's offline API)."""
    from fastapi.testclient import TestClient

    from pangu_infer import LLM, SamplingParams
    from pangu_infer.server.app import create_app

    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 3}')
    small = {"dtype": "float32", "kv_cache_memory": 8 << 20, "enforce_eager": True, "max_model_len": 256}
    for chosen in ({"override_generation_config": {"max_new_tokens": 3}}, {"generation_config": str(folder)}):
        llm = LLM(str(tiny_dense_dir), **small, **chosen)
        with TestClient(create_app(llm, served_model_name="m")) as http:
            assert _reply_lengths(http, "m", 10) == _cut(3), chosen
            assert _reply_lengths(http, "m", 2) == _cut(2), chosen
            assert _reply_lengths(http, "m", None) == _cut(3, asked_some=False), chosen
            # Responses' truncation "auto" leaves room for the length the reply runs with (3), not
            # the 250 asked: the whole conversation is kept.
            turns = [{"role": "user", "content": "tell me about the weather " * 4}, {"role": "assistant", "content": "sunny"},
                     {"role": "user", "content": "and tomorrow?"}]
            whole = http.post("/v1/responses", json={"model": "m", "input": turns, "max_output_tokens": 3}).json()
            auto = http.post("/v1/responses", json={"model": "m", "input": turns, "max_output_tokens": 250, "truncation": "auto"}).json()
            assert auto["usage"]["input_tokens"] == whole["usage"]["input_tokens"] > 256 - 250, chosen
        offline = llm.generate(["the weather"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(offline[0].outputs[0].token_ids) == 10, chosen


def test_a_min_tokens_past_the_operators_cap_is_refused_naming_the_cap_not_a_max_tokens_never_sent(tiny_dense_dir):
    """min_tokens over --override-generation-config's max_new_tokens: the 400 had said "expected at
    most max_tokens=3", a value the client never sent (the request's max_tokens, cut to the cap)."""
    from fastapi.testclient import TestClient

    from pangu_infer import LLM
    from pangu_infer.server.app import create_app

    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256,
              override_generation_config={"max_new_tokens": 3})
    with TestClient(create_app(llm, served_model_name="m")) as http:
        for path, body in (("/v1/completions", {"prompt": "the weather", "max_tokens": 10}), ("/v1/completions", {"prompt": "the weather"}),
                           ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10})):
            r = http.post(path, json={"model": "m", **body, "min_tokens": 5})
            assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
            message = r.json()["error"]["message"]
            assert "min_tokens=5 exceeds this server's cap of 3 tokens on a reply's length" in message and "max_tokens=" not in message, message
            r = http.post(path, json={"model": "m", **body, "min_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def test_the_models_own_max_new_tokens_is_a_default_not_a_ceiling(tiny_dense_dir, tmp_path):
    """generation_config auto: the model's generation_config.json's max_new_tokens is the length of a
    request that gives none (vLLM's since its PR #34063), not a cap on one that gives its own."""
    from fastapi.testclient import TestClient

    from pangu_infer import LLM
    from pangu_infer.server.app import create_app

    model = tmp_path / "model"
    shutil.copytree(tiny_dense_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 3}))
    llm = LLM(str(model), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, max_model_len=256)
    assert llm.max_tokens_ceiling is None
    with TestClient(create_app(llm, served_model_name="m")) as http:
        assert _reply_lengths(http, "m", 10) == _cut(10)
        assert _reply_lengths(http, "m", None) == _cut(3, asked_some=False)


def test_generation_config_in_the_python_api_and_the_generate_command(tiny_dense_dir):
    from pangu_infer import LLM
    from pangu_infer.cli import build_parser, llm_kwargs, sampling_params

    base = ["generate", "--model", str(tiny_dense_dir), "--prompt", "x", "--enforce-eager", "--dtype", "float32"]
    args = build_parser().parse_args(
        [*base, "--generation-config", "vllm", "--override-generation-config", '{"top_k": 5, "max_new_tokens": 7}']
    )
    kwargs = llm_kwargs(args)
    assert kwargs["generation_config"] == "vllm" and kwargs["override_generation_config"] == {"top_k": 5, "max_new_tokens": 7}
    llm = LLM(args.model, **kwargs)
    defaults = llm.default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (1.0, 5, 7)
    assert sampling_params(llm, args).max_tokens == 7  # generate's length: the config's max_new_tokens
    assert sampling_params(llm, build_parser().parse_args([*base, "--max-tokens", "9"])).max_tokens == 9
    auto = LLM(str(tiny_dense_dir), enforce_eager=True, dtype="float32")  # the model's file: do_sample false
    assert auto.default_sampling_params().temperature == 0.0
    assert sampling_params(auto, build_parser().parse_args(base)).max_tokens == 256
    # llama.cpp's --ignore-eos (vLLM's ignore_eos)
    assert not sampling_params(auto, build_parser().parse_args(base)).ignore_eos
    assert sampling_params(auto, build_parser().parse_args([*base, "--ignore-eos"])).ignore_eos


def test_bad_generation_config_values_name_the_flag_and_key(tmp_path):
    from pangu_infer import LLM
    from pangu_infer.generation_config import check_generation_config, check_override

    flag = "--override-generation-config"
    assert check_override('{"temperature": 0.5, "top_p": 0.9, "min_p": 0.1, "top_k": 40, "repetition_penalty": 1.1}', flag)
    for text, pattern in [
        ("[0.5]", "expected a JSON object"),
        ("{temperature: 0.5}", "not valid JSON"),
        ('{"temprature": 0.5}', "unknown key 'temprature'"),
        ('{"max_tokens": 5}', "unknown key 'max_tokens'.*max_new_tokens"),
        ('{"temperature": "hot"}', "temperature must be a number, got 'hot'"),
        ('{"top_k": 2.5}', "top_k must be an integer"),
        ('{"top_p": true}', "top_p must be a number"),
        ('{"top_p": 0}', "top_p=0"),
        ('{"temperature": -1}', "temperature=-1"),
        ('{"max_new_tokens": 0}', "max_new_tokens=0"),
    ]:
        with pytest.raises(ValueError, match=f"^{flag}: .*{pattern}|^{flag} .*{pattern}"):
            check_override(text, flag)
    assert check_generation_config("auto") is None and check_generation_config("vllm") == {}
    with pytest.raises(ValueError, match=r"--generation-config 'greedy': expected 'auto', 'vllm' or a folder"):
        check_generation_config("greedy", "--generation-config")
    with pytest.raises(ValueError, match=r"--generation-config .*: the folder holds no generation_config.json"):
        check_generation_config(str(tmp_path), "--generation-config")
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"--generation-config .*generation_config.json is not a JSON object"):
        check_generation_config(str(tmp_path), "--generation-config")
    # The Python API names its arguments, before looking for the model.
    with pytest.raises(ValueError, match=r"^override_generation_config: unknown key 'bogus'"):
        LLM(str(tmp_path / "no-such-model"), override_generation_config={"bogus": 1})
    with pytest.raises(ValueError, match=r"^generation_config 'nope'"):
        LLM(str(tmp_path / "no-such-model"), generation_config="nope")
    # The commands: exit code 2 and one line naming the flag and key, before the model is looked for.
    run = subprocess.run(
        [sys.executable, "-m", "pangu_infer.cli", "serve", "--model", str(tmp_path / "no-such-model"),
         "--override-generation-config", '{"temperature": 0.5, "top_q": 1}'],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "pangu-infer serve: error: --override-generation-config: unknown key 'top_q'" in run.stderr, run.stderr


# ---------------------------------------------------------------------- root path, uvicorn log level
API_KEY = "proxy-key"


@pytest.fixture(scope="module")
def proxied_server(tiny_dense_dir, tmp_path_factory):
    """Behind a reverse proxy at /proxy (which strips the prefix before forwarding), uvicorn logging
    each request, and the server each request's prompt and parameters (cut to 40 characters)."""
    with running_server(
        tiny_dense_dir, "--kv-cache-memory", "8MiB", "-a", "tiny-proxied", "-c", "128", "-np", "3", "--root-path", "/proxy/",
        "--uvicorn-log-level", "info", "--enable-log-requests", "--max-log-len", "40",
        api_key=API_KEY, log_dir=tmp_path_factory.mktemp("proxy_logs"),
    ) as s:
        s.model = "tiny-proxied"
        yield s


def test_root_path_is_uvicorns_behind_a_proxy(proxied_server):
    from fixtures_server import metric_value

    url, key = proxied_server.url, {"Authorization": f"Bearer {API_KEY}"}
    # The proxy forwards /proxy/v1/models as /v1/models: the API answers there.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-proxied"]
    # The API key still guards /v1 and the docs (the middleware sees the path the routes see, not
    # the prefixed one uvicorn puts in the scope), and requests are counted by their endpoint.
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{url}/openapi.json", timeout=30).status_code == 401
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert metric_value(metrics, "pangu_http_requests_total", endpoint="/v1/models", status="401") >= 1
    # FastAPI's root_path behaviour: the OpenAPI document's servers entry and the docs page name the prefix.
    spec = httpx.get(f"{url}/openapi.json", headers=key, timeout=30).json()
    assert spec["servers"] == [{"url": "/proxy"}]
    assert "'/proxy/openapi.json'" in httpx.get(f"{url}/docs", headers=key, timeout=30).text
    # The chat page's links are relative (static/..., v1/...), to its base /proxy/ (the browser may
    # show /proxy or /proxy/: test_the_chat_page_loads_under_the_prefix_with_or_without_its_slash).
    page = httpx.get(f"{url}/", timeout=30).text
    assert 'href="static/chat.css"' in page and 'src="static/chat.js"' in page
    assert '<base href="/proxy/">' in page
    assert 'href="/' not in page.replace('<base href="/proxy/">', "") and 'src="/' not in page
    assert httpx.get(f"{url}/static/chat.js", timeout=30).status_code == 200
    assert "(behind a proxy at /proxy/)" in proxied_server.log()
    # llama.cpp's -a, -c, -np: the served name (above), the context and the batch the server took.
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, headers=key, timeout=30).json()
    assert tokenized["max_model_len"] == 128
    too_many = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "n": 4, "max_tokens": 1}, headers=key, timeout=30)
    assert too_many.status_code == 400 and "at most 3 (--max-num-seqs)" in too_many.json()["error"]["message"]
    # --uvicorn-log-level info: uvicorn's access log lines (not written at the default level, warning).
    assert '"GET /proxy/v1/models HTTP/1.1" 200' in proxied_server.log()
    # --enable-log-requests --max-log-len 40: the prompt and parameters when it arrives, its end
    prompt = "a prompt long enough to be cut in the log " * 3
    done = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, headers=key, timeout=30).json()
    log = proxied_server.log()
    assert f"received request {done['id']}: prompt {repr(prompt)[:40]}... ({len(repr(prompt))} characters) (" in log, log
    assert "(62 tokens), params SamplingParams(n=1, max_tokens=2, min_to... (" in log
    assert f"finished request {done['id']}: length, " in log and "2 generated tokens" in log


class _PageLinks(HTMLParser):
    """The base href, stylesheets and scripts of an HTML page."""

    def __init__(self):
        super().__init__()
        self.base, self.assets = None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "base":
            self.base = attrs["href"]
        elif tag == "link" and attrs.get("rel") == "stylesheet" or tag == "script" and "src" in attrs:
            self.assets.append(attrs.get("href") or attrs["src"])


@pytest.mark.parametrize("shown", ["/proxy", "/proxy/"])
def test_the_chat_page_loads_under_the_prefix_with_or_without_its_slash(proxied_server, shown):
    """A browser at https://site/proxy or https://site/proxy/: a proxy that strips /proxy forwards
    both as /, and what the page links (its stylesheet, its scripts, the modules they import, the
    API it calls), resolved as a browser resolves them, is under /proxy/ and loads."""
    site = "https://site.example"

    def through_proxy(public: str, **kwargs) -> httpx.Response:
        path = urlsplit(public).path
        assert urlsplit(public).netloc == "site.example" and (path == "/proxy" or path.startswith("/proxy/")), \
            f"{public}: outside the proxy's prefix"
        return httpx.get(f"{proxied_server.url}{path[len('/proxy'):] or '/'}", timeout=30, **kwargs)

    page_url = site + shown
    page = through_proxy(page_url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = _PageLinks()
    links.feed(page.text)
    base = urljoin(page_url, links.base or "")
    assets = [urljoin(base, a) for a in links.assets]
    assert sorted(urlsplit(a).path for a in assets) == ["/proxy/static/chat.css", "/proxy/static/chat.js"]
    for asset in assets:
        got = through_proxy(asset)
        assert got.status_code == 200, asset
        assert got.headers["content-type"].startswith("text/css" if asset.endswith(".css") else "text/javascript"), got.headers
        # a module's imports resolve against the module's own URL
        for module in re.findall(r'^import .* from "([^"]+)";', got.text, re.MULTILINE):
            assert through_proxy(urljoin(asset, module)).status_code == 200, module
    # the page's fetches (v1/models, v1/chat/completions) resolve against its base
    models = through_proxy(urljoin(base, "v1/models"), headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-proxied"


def test_bad_root_path_and_the_log_level_default():
    from pangu_infer.cli import build_parser
    from pangu_infer.server.cli import root_path, uvicorn_log_level

    assert root_path("") == "" and root_path("/") == "" and root_path("/llm/") == "/llm" and root_path("/a/b") == "/a/b"
    for bad in ("llm", "/llm?x=1", "/a b", "/über", "//llm"):
        with pytest.raises(ValueError, match="^--root-path "):
            root_path(bad)
    parse = build_parser().parse_args
    assert uvicorn_log_level(parse(["serve"])) == "warning"
    assert uvicorn_log_level(parse(["-v", "serve"])) == "info"
    assert uvicorn_log_level(parse(["-v", "serve", "--uvicorn-log-level", "error"])) == "error"
    assert uvicorn_log_level(parse(["serve", "--uvicorn-log-level", "trace"])) == "trace"
    with pytest.raises(SystemExit):
        parse(["serve", "--uvicorn-log-level", "loud"])


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "x"], ["chat"], ["run-batch", "-i", "a", "-o", "b"],
                                     ["bench"], ["plan", "--model", "m"], ["quantize", "--model", "m", "--out", "o", "--method", "int8"]])
def test_verbose_before_or_after_the_command(command):
    """`pangu-infer serve -v` as `pangu-infer -v serve` (it was an unrecognized argument after the command)."""
    from pangu_infer.cli import build_parser
    from pangu_infer.server.cli import uvicorn_log_level

    parse = build_parser().parse_args
    assert parse(command).verbose is False
    for argv in (["-v", *command], [*command, "-v"], [*command, "--verbose"], ["-v", *command, "-v"]):
        assert parse(argv).verbose is True, argv
    if command == ["serve"]:
        assert uvicorn_log_level(parse(["serve", "-v"])) == "info"


@pytest.mark.parametrize("size", ["infGiB", "1e400MiB", "-infB", "nanGiB"])
def test_a_kv_cache_memory_size_that_is_not_a_number_of_bytes_is_the_flags_error(size, capsys):
    """--kv-cache-memory infGiB was an OverflowError's traceback (int() of an infinite float)."""
    from pangu_infer.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "-p", "x", f"--kv-cache-memory={size}"])
    assert f"argument --kv-cache-memory: invalid memory size '{size}'" in capsys.readouterr().err


# ---------------------------------------------------------------------- llama.cpp's spellings
@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_llama_cpp_spellings_set_the_same_values(command):
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args
    extra = ["--prompt", "x"] if command == "generate" else []
    spelled = {
        ("-c", "512"): ("--max-model-len", "512"), ("--ctx-size", "384"): ("--max-model-len", "384"),
        ("-np", "3"): ("--max-num-seqs", "3"), ("--parallel", "5"): ("--max-num-seqs", "5"),
    }
    spelled.update({("-m", "x.gguf"): ("--model", "x.gguf"),
                    ("--no-enable-prefix-caching",): ("--no-prefix-caching",)})
    if command != "serve":
        spelled.update({("-n", "7"): ("--max-tokens", "7"), ("--n-predict", "9"): ("--max-tokens", "9")})
    if command == "generate":
        extra = ["-p", "x"]  # llama.cpp's -p for --prompt (the others compare against it)
        assert vars(parse([command, *extra])) == vars(parse([command, "--prompt", "x"]))
    if command == "serve":
        spelled.update({("-a", "pangu-7b"): ("--served-model-name", "pangu-7b"), ("--alias", "p"): ("--served-model-name", "p"),
                        ("--ssl-key-file", "k.pem"): ("--ssl-keyfile", "k.pem"), ("--ssl-cert-file", "c.pem"): ("--ssl-certfile", "c.pem")})
    for alias, name in spelled.items():
        assert vars(parse([command, *extra, *alias])) == vars(parse([command, *extra, *name])), alias
        assert vars(parse([command, *extra, *alias])) != vars(parse([command, *extra])), alias
    args = parse([command, *extra, "-c", "512", "-np", "3"])
    assert (llm_kwargs(args)["max_model_len"], llm_kwargs(args)["max_num_seqs"]) == (512, 3)
    if command != "generate":  # llama.cpp's --chat-template-file (a file that exists) and --jinja
        template = Path(__file__).resolve()  # (any file: its path is what is compared)
        assert vars(parse([command, "--chat-template-file", str(template)])) == vars(parse([command, "--chat-template", str(template)]))
        with pytest.raises(SystemExit):
            parse([command, "--chat-template-file", "/no/such/template.jinja"])
        assert llm_kwargs(parse([command, "--jinja"])) == llm_kwargs(parse([command]))
    # vLLM's --enable-prefix-caching is the default; --trust-remote-code has nothing to allow here
    assert vars(parse([command, *extra, "--enable-prefix-caching"])) == vars(parse([command, *extra]))
    assert llm_kwargs(parse([command, *extra, "--trust-remote-code"])) == llm_kwargs(parse([command, *extra]))
    if command == "serve":
        from pangu_infer.server.cli import served_name

        assert served_name(parse(["serve", "-a", "pangu-7b"]), "/models/x.gguf") == "pangu-7b"


def test_serve_takes_the_model_as_vllm_serve_does():
    from pangu_infer.cli import build_parser
    from pangu_infer.server.cli import take_model_tag

    parse = build_parser().parse_args
    args = parse(["serve", "/models/pangu-7b", "--port", "8001"])
    take_model_tag(args)
    assert args.model == "/models/pangu-7b"
    same = parse(["serve", "/models/pangu-7b", "--model", "/models/pangu-7b"])
    take_model_tag(same)
    assert same.model == "/models/pangu-7b"
    with pytest.raises(ValueError, match=r"the model is named twice: '/models/a' and --model '/models/b'"):
        take_model_tag(parse(["serve", "/models/a", "--model", "/models/b"]))


def test_requests_are_logged_only_when_asked(tiny_dense_dir, caplog):
    """create_app(enable_log_requests=True): the prompt (ids when given as ids) and parameters of each
    request as it arrives, and how it ended; not by default (no prompt in the log unless asked)."""
    import logging

    from fastapi.testclient import TestClient

    from pangu_infer import LLM
    from pangu_infer.server.app import create_app

    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    caplog.set_level(logging.INFO, logger="pangu_infer.server.requests")
    for logged in (False, True):
        caplog.clear()
        with TestClient(create_app(llm, served_model_name="m", enable_log_requests=logged)) as http:
            chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "secret words"}], "max_tokens": 2}).json()
            ids = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1, "n": 2}).json()
        text = caplog.text
        if not logged:
            assert "secret words" not in text and "received request" not in text
            continue
        assert f"received request {chat['id']}: prompt '" in text and "secret words" in text and "max_tokens=2" in text
        assert f"received request {ids['id']}: prompt token ids [5, 6, 7] (3 tokens)" in text
        assert f"finished request {chat['id']}: " in text and f"finished request {ids['id']}: length, 3 prompt + 2 generated tokens" in text


@pytest.mark.parametrize("flags, says", [
    (["--enable-log-requests", "--disable-log-requests"], "--enable-log-requests and --disable-log-requests: give one"),
    (["--max-log-len", "-1"], "--max-log-len -1: expected a number of characters >= 0"),
])
def test_request_log_flags_are_checked_before_the_model_loads(flags, says, capsys):
    from pangu_infer.cli import main

    assert main(["serve", "/no/such/model", *flags]) == 2
    assert says in capsys.readouterr().err


def test_several_served_names_as_vllm_takes_them(tiny_dense_dir):
    """--served-model-name a b: requests may send either name, replies name the first, /v1/models
    lists both; an adapter may not take either name; an empty name is refused."""
    from fastapi.testclient import TestClient

    from pangu_infer import LLM
    from pangu_infer.cli import build_parser
    from pangu_infer.server.app import create_app
    from pangu_infer.server.cli import served_names
    from pangu_infer.server.lora import LoRAModulePath, add_startup_adapters

    args = build_parser().parse_args(["serve", "x.gguf", "--served-model-name", "pangu", "pangu-7b", "pangu"])
    assert served_names(args, "x.gguf") == ["pangu", "pangu-7b"]
    with pytest.raises(ValueError, match="a name may not be empty"):
        served_names(build_parser().parse_args(["serve", "-a", " "]), "x.gguf")
    with pytest.raises(ValueError, match="the served model is called 'pangu-7b' too"):
        add_startup_adapters(None, [LoRAModulePath("pangu-7b", "/adapters/a")], ["pangu", "pangu-7b"])

    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with TestClient(create_app(llm, served_model_name=["pangu", "pangu-7b"])) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["pangu", "pangu-7b"]
        assert http.get("/v1/models/pangu-7b").json()["id"] == "pangu-7b"
        reply = http.post("/v1/completions", json={"model": "pangu-7b", "prompt": "hi", "max_tokens": 2}).json()
        assert reply["model"] == "pangu" and reply["usage"]["completion_tokens"] == 2
        missing = http.post("/v1/completions", json={"model": "other", "prompt": "hi", "max_tokens": 2})
        assert missing.status_code == 404 and "serves 'pangu' (also 'pangu-7b')" in missing.json()["error"]["message"]


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_chunked_prefill_flags_reach_the_engine(command):
    """vLLM's --enable-chunked-prefill (the default) and --no-enable-chunked-prefill; without chunked
    prefill --max-num-batched-tokens left out lets the engine take max_model_len (vLLM's default)."""
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args
    extra = ["--prompt", "x"] if command == "generate" else []
    default = llm_kwargs(parse([command, *extra]))
    assert default["enable_chunked_prefill"] is True and default["max_num_batched_tokens"] is None
    assert llm_kwargs(parse([command, *extra, "--enable-chunked-prefill"])) == default
    off = llm_kwargs(parse([command, *extra, "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]))
    assert off == {**default, "enable_chunked_prefill": False, "max_num_batched_tokens": 8192}


def test_token_counts_read_as_vllm_reads_them(capsys):
    """--max-model-len 4k / 25.6k (powers of 1000) and 16K (powers of 1024), as vLLM's flags take them,
    for -c and --max-num-batched-tokens too; anything else is the flag's own error."""
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args
    for text, value in (("4096", 4096), ("4k", 4000), ("4K", 4096), ("25.6k", 25600), ("1M", 1 << 20), ("2m", 2_000_000)):
        assert llm_kwargs(parse(["serve", "m", "--max-model-len", text]))["max_model_len"] == value
        assert llm_kwargs(parse(["generate", "-p", "x", "-c", text]))["max_model_len"] == value
        assert llm_kwargs(parse(["serve", "m", "--max-num-batched-tokens", text]))["max_num_batched_tokens"] == value
    for text in ("1.5K", "4.5", "4kb", "-1", "four"):
        with pytest.raises(SystemExit):
            parse(["serve", "m", "--max-model-len", text])
        assert f"argument --max-model-len/-c/--ctx-size: invalid token count '{text}'" in capsys.readouterr().err


def test_load_format_names_the_models_kind():
    """vLLM's --load-format: auto (the default), safetensors for a folder or hub id, gguf for a .gguf
    file (the demo model is one), dummy for a folder or hub id (random weights: test_dummy_load.py);
    the other kind is refused naming both, and a format this engine does not read (pt, npcache, ...)
    is argparse's error."""
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args

    def kwargs(argv: list[str]) -> dict:
        return {k: v for k, v in llm_kwargs(parse(argv)).items() if k != "load_format"}

    plain = kwargs(["serve", "org/model"])
    assert kwargs(["serve", "org/model", "--load-format", "safetensors"]) == plain
    assert kwargs(["serve", "--model", "m.gguf", "--load-format", "gguf"]) == kwargs(["serve", "--model", "m.gguf"])
    assert llm_kwargs(parse(["generate", "-p", "x", "--load-format", "gguf"]))  # the demo model
    for argv, says in ((["serve", "org/model", "--load-format", "gguf"], "--load-format gguf: --model 'org/model' is not a .gguf file"),
                       (["serve", "--model", "m.gguf", "--load-format", "safetensors"], "--load-format safetensors: --model 'm.gguf' is a .gguf file"),
                       (["generate", "-p", "x", "--load-format", "safetensors"], "--load-format safetensors: the demo model is a .gguf file"),
                       (["serve", "--model", "m.gguf", "--load-format", "dummy"], "--load-format dummy: --model 'm.gguf' is a .gguf file")):
        with pytest.raises(ValueError, match=re.escape(says)):
            llm_kwargs(parse(argv))
    assert llm_kwargs(parse(["serve", "org/model", "--load-format", "dummy"]))["load_format"] == "dummy"
    with pytest.raises(SystemExit):
        parse(["serve", "org/model", "--load-format", "pt"])


def test_vllms_parallel_size_flags():
    """-tp (vLLM's spelling of --tensor-parallel-size); --pipeline-parallel-size/-pp and
    --data-parallel-size/-dp take 1, what this engine does, and refuse more naming the flag."""
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args
    assert llm_kwargs(parse(["serve", "m", "-tp", "2"]))["tensor_parallel_size"] == 2
    assert llm_kwargs(parse(["serve", "m", "-pp", "1", "--data-parallel-size", "1"])) == llm_kwargs(parse(["serve", "m"]))
    for flags, says in ((["-pp", "2"], "--pipeline-parallel-size 2: pipeline parallelism is not done here"),
                        (["--data-parallel-size", "4"], "--data-parallel-size 4: one engine per server here")):
        with pytest.raises(ValueError, match=says):
            llm_kwargs(parse(["serve", "m", *flags]))


def test_openpangus_own_vllm_serve_command_line_works_here():
    """The flags of openPangu's published vLLM(-Ascend) serve commands (Ascend-Pangu-Infer's run
    scripts for Embedded 1B/7B; tool and reasoning parsers as vLLM-Ascend registers them) parse, and
    those that state what this engine always does change no setting; the settings they name are
    taken. A flag naming something this engine does not do is an error naming it."""
    from pangu_infer.cli import build_parser, llm_kwargs

    parse = build_parser().parse_args
    vllm = ["serve", "/opt/pangu/openPangu-Embedded-7B-V1.1", "--served-model-name", "pangu_embedded_7b",
            "--tensor-parallel-size", "1", "--trust-remote-code", "--host", "127.0.0.1", "--port", "1040",
            "--max-num-seqs", "32", "--max-model-len", "16384", "--max-num-batched-tokens", "4096",
            "--tokenizer-mode", "slow", "--dtype", "bfloat16", "--distributed-executor-backend", "mp",
            "--gpu-memory-utilization", "0.9", "--no-enable-prefix-caching", "--enable-chunked-prefill",
            "--enable-auto-tool-choice", "--tool-call-parser", "pangu", "--reasoning-parser", "pangu"]
    args = parse(vllm)
    kwargs = llm_kwargs(args)
    assert (kwargs["max_num_seqs"], kwargs["max_model_len"], kwargs["max_num_batched_tokens"]) == (32, 16384, 4096)
    assert kwargs["enable_prefix_caching"] is False and kwargs["dtype"] == "bfloat16" and kwargs["gpu_memory_utilization"] == 0.9
    plain = [a for a in vllm if a not in ("--tokenizer-mode", "slow", "--distributed-executor-backend", "mp", "--enable-chunked-prefill",
                                          "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser", "pangu", "--trust-remote-code")]
    assert llm_kwargs(parse(plain)) == kwargs
    with pytest.raises(ValueError, match=r"--distributed-executor-backend ray: .*Ray is not used"):
        llm_kwargs(parse([*plain, "--distributed-executor-backend", "ray"]))
    with pytest.raises(ValueError, match=r"--distributed-executor-backend uni runs one process: --tensor-parallel-size 2 needs mp"):
        llm_kwargs(parse([*plain, "--distributed-executor-backend", "uni", "--tensor-parallel-size", "2"]))
    with pytest.raises(ValueError, match=r"external_launcher: start each rank with torchrun"):
        llm_kwargs(parse([*plain, "--distributed-executor-backend", "external_launcher"]))
    for flag, value in (("--tool-call-parser", "hermes"), ("--reasoning-parser", "deepseek_r1"), ("--tokenizer-mode", "mistral")):
        with pytest.raises(SystemExit):
            parse([*plain, flag, value])
