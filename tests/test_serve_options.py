"""`pangu-infer serve` options of vLLM and llama.cpp: HTTPS, generation-config defaults, root path,
uvicorn's log level, llama.cpp's spellings. Real servers on loopback, driven by the openai client."""

from __future__ import annotations

import importlib.util
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

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

