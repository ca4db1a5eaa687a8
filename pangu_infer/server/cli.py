"""`pangu-infer serve`: load a model and serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from typing import Optional
from urllib.parse import urlsplit

from pangu_infer.cli import add_chat_template_argument, add_model_arguments, llm_kwargs

API_KEY_ENV = "PANGU_API_KEY"
UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model, as vLLM's `vllm serve MODEL` takes it (or --model / -m)")
    add_model_arguments(parser)
    add_chat_template_argument(parser)
    add_app_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--ssl-keyfile", "--ssl-key-file", dest="ssl_keyfile", default=None, metavar="FILE",
        help="serve HTTPS with this PEM private key (with --ssl-certfile; an encrypted one with --ssl-keyfile-password; "
        "vLLM's flag, llama.cpp's --ssl-key-file)",
    )
    parser.add_argument(
        "--ssl-certfile", "--ssl-cert-file", dest="ssl_certfile", default=None, metavar="FILE",
        help="serve HTTPS with this PEM certificate (chain) (with --ssl-keyfile; vLLM's flag, llama.cpp's --ssl-cert-file)",
    )
    parser.add_argument(
        "--ssl-keyfile-password", default=None, metavar="PASSWORD",
        help="the password of an encrypted --ssl-keyfile (uvicorn's and vLLM's flag; other users of this machine may see "
        "a command line's arguments)",
    )
    parser.add_argument(
        "--ssl-ca-certs", default=None, metavar="FILE",
        help="PEM file of the CA certificates that client certificates are verified against (with --ssl-cert-reqs 1 or 2; "
        "uvicorn's and vLLM's flag)",
    )
    parser.add_argument(
        "--ssl-cert-reqs", type=int, default=None, metavar="N",
        help="client certificates: 0 not asked for (the default), 1 optional (verified when sent), 2 required "
        "(Python's ssl.CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED; uvicorn's and vLLM's flag; needs --ssl-ca-certs)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /v1/*, /tokenize, /detokenize, /tokenizer_info "
        f"and the API docs; /health, /version, /metrics and the chat page stay open (default: ${API_KEY_ENV}; none: no check)",
    )
    parser.add_argument(
        "--root-path", default="", metavar="PATH",
        help="the path prefix a reverse proxy serves this server under, e.g. /llm (uvicorn's root_path, vLLM's "
        "flag): the proxy strips it before forwarding; the API docs (openapi servers) name it (default: none)",
    )
    parser.add_argument(
        "--enable-log-requests", action="store_true",
        help="log each request's prompt and sampling parameters when it arrives, and how it ended (vLLM's flag)",
    )
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="requests are not logged: the default (vLLM's older flag, taken so its command lines work)")
    parser.add_argument("--disable-fastapi-docs", action="store_true",
                        help="no API docs: /docs, /redoc and /openapi.json answer 404 (vLLM's flag)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no engine line every 10 s while requests run (prompt and generation throughput, requests "
                        "running and waiting, KV cache use, prefix cache hit rate), as vLLM's flag")
    parser.add_argument("--max-log-len", type=int, default=None, metavar="N",
                        help="with --enable-log-requests: characters of a logged prompt and of its parameters (default: all)")
    parser.add_argument(
        "--return-tokens-as-token-ids", action="store_true",
        help="logprobs name each token \"token_id:<id>\" instead of its text (vLLM's flag: tokens that are not whole "
        "UTF-8 text stay identifiable); a request's own return_tokens_as_token_ids still decides for it",
    )
    parser.add_argument(
        "--enable-request-id-headers", action="store_true",
        help="every response carries an X-Request-Id header: the request's own, or a new id (vLLM's flag; a request's "
        "X-Request-Id names its chat or completion reply either way)",
    )
    parser.add_argument(
        "--uvicorn-log-level", default=None, choices=UVICORN_LOG_LEVELS,
        help="uvicorn's log level (vLLM's flag); info logs every request (default: warning, info with --verbose)",
    )
    parser.add_argument(
        "--allowed-origins", default="", metavar="ORIGINS",
        help="comma-separated web origins whose pages may call the API from a browser (CORS), e.g. "
        "'http://localhost:5173,https://chat.example.org', or '*' for any (default: none: only the server's own chat page)",
    )
    parser.add_argument(
        "--enable-runtime-lora-updates", action="store_true",
        help="let clients load and unload LoRA adapters while the server runs: POST /v1/load_lora_adapter "
        '{"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"} (vLLM\'s; needs --enable-lora). '
        "Anyone with the API key can then make the server read any adapter folder on this machine",
    )


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the app itself (server/app.py create_app), which serve and run-batch
    build alike: the names it serves, request chat templates, the thinking budget, LoRA adapters,
    embeddings' pooling."""
    parser.add_argument(
        "--served-model-name", "-a", "--alias", dest="served_model_name", nargs="+", default=None, metavar="NAME",
        help="the model name clients send (default: the --model argument; -a/--alias: llama.cpp's spelling); "
        "several names: requests may send any, replies name the first (vLLM's)",
    )
    parser.add_argument(
        "--trust-request-chat-template", action="store_true",
        help="let a chat request bring its own Jinja chat_template (vLLM's flag; rendered in Jinja's sandbox); "
        "refused with a 400 otherwise",
    )
    # vLLM's tool and reasoning flags, as openPangu's own vLLM commands give them: this server always
    # reads Pangu's markers ([unused11]...[unused12] tool calls, [unused16]...[unused17] thinking),
    # which are the parsers vLLM-Ascend registers as "pangu"; another parser name is refused.
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="the model's tool calls become tool_calls: the default (vLLM's flag, taken so its command lines work)")
    parser.add_argument("--tool-call-parser", choices=["pangu"], default=None,
                        help="pangu: the [unused11]...[unused12] tool calls this server always reads (vLLM-Ascend's parser name)")
    parser.add_argument("--reasoning-parser", choices=["pangu"], default=None,
                        help="pangu: the [unused16]...[unused17] thinking this server always splits into reasoning (vLLM-Ascend's parser name)")
    parser.add_argument(
        "--reasoning-budget", type=int, default=None, metavar="N",
        help="default thinking budget of chat requests: after N reasoning tokens the server writes [unused17] "
        "itself and the answer follows (a request's max_reasoning_tokens or chat_template_kwargs.thinking_budget "
        "overrides it; default: no cap)",
    )
    parser.add_argument(
        "--lora-modules", nargs="+", action="extend", default=None, metavar="NAME=PATH",
        help="LoRA adapters (PEFT folders) to serve, each as NAME=PATH or a JSON object "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\'; a request picks one by sending its NAME as model '
        "(turns on --enable-lora; ids 1, 2, ... in this order)",
    )
    parser.add_argument(
        "--pooling", default="last", choices=["last", "mean"],
        help="how /v1/embeddings pools a prompt's final hidden states: last (default: the last token's, as vLLM "
        "pools a decoder) or mean (over the prompt's tokens; vLLM's --override-pooler-config pooling_type)",
    )


def app_llm_kwargs(args: argparse.Namespace) -> tuple[dict, list]:
    """LLM's keyword arguments for the model and app flags, and the --lora-modules read (which turn
    LoRA on): what serve and run-batch load alike."""
    from pangu_infer.server.lora import parse_lora_modules

    lora_modules = parse_lora_modules(args.lora_modules or [])
    kwargs = llm_kwargs(args)
    kwargs["pooling"] = args.pooling
    if lora_modules:
        kwargs["enable_lora"] = True
    return kwargs, lora_modules


def allowed_origins(text: str) -> list[str]:
    """--allowed-origins as a list: '*' or origins scheme://host[:port] (no path); ValueError naming a bad one."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    for origin in origins:
        if origin == "*":
            continue
        parsed = urlsplit(origin)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ValueError(f"--allowed-origins: {origin!r} is not an origin; expected scheme://host[:port], e.g. http://localhost:5173, or *")
    return [o.rstrip("/") for o in origins]


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey  # (without a callback OpenSSL would prompt on the terminal)


def _encrypted(certfile: str, keyfile: str) -> bool:
    """Whether loading the key asks for a password."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        return True
    except ssl.SSLError:
        pass
    return False


CERT_REQS = {0: "not asked for", 1: "optional", 2: "required"}  # ssl.CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED


def _check_pem(flag: str, path: str, what: str, marker: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: no such file")
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("latin-1")
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: cannot read it ({e.strerror or e})") from None
    if marker not in text:
        raise ValueError(f"{flag} {path!r}: not {what} (expected a '{marker.strip('-')}' block)")


def check_ssl_files(keyfile: Optional[str], certfile: Optional[str], password: Optional[str] = None,
                    ca_certs: Optional[str] = None, cert_reqs: Optional[int] = None) -> bool:
    """--ssl-keyfile and --ssl-certfile: both or neither, and a pair an SSL context loads (an
    encrypted key with --ssl-keyfile-password); --ssl-ca-certs and --ssl-cert-reqs: client
    certificates verified against a CA file that loads, only with HTTPS. Checked before the model
    loads; True when HTTPS is on. ValueError naming the flag (and the file)."""
    if cert_reqs is not None and cert_reqs not in CERT_REQS:
        raise ValueError(f"--ssl-cert-reqs {cert_reqs}: expected 0 (no client certificate), 1 (optional) or 2 (required)")
    if keyfile is None and certfile is None:
        given = [flag for flag, value in (("--ssl-keyfile-password", password), ("--ssl-ca-certs", ca_certs),
                                          ("--ssl-cert-reqs", cert_reqs)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} needs HTTPS: give --ssl-keyfile and --ssl-certfile too")
        return False
    if keyfile is None or certfile is None:
        given, missing = ("--ssl-certfile", "--ssl-keyfile") if keyfile is None else ("--ssl-keyfile", "--ssl-certfile")
        raise ValueError(f"{given} needs {missing} too: HTTPS takes a private key and its certificate")
    if password is not None and not password:
        raise ValueError("--ssl-keyfile-password '': expected the key's password (leave the flag out for an unencrypted key)")
    _check_pem("--ssl-certfile", certfile, "a PEM certificate", "-----BEGIN CERTIFICATE-----")
    _check_pem("--ssl-keyfile", keyfile, "a PEM private key", "PRIVATE KEY-----")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile, password=password if password is not None else _no_password)
    except _EncryptedKey:
        raise ValueError(f"--ssl-keyfile {keyfile!r}: the key is encrypted (password-protected); give its password "
                         "with --ssl-keyfile-password, or an unencrypted key") from None
    except ssl.SSLError as e:
        reason = getattr(e, "reason", None) or ""
        if "MISMATCH" in reason:
            raise ValueError(f"--ssl-keyfile {keyfile!r} does not match the certificate in --ssl-certfile {certfile!r}") from None
        if password is not None and _encrypted(certfile, keyfile):  # (OpenSSL names no reason: "PEM lib")
            raise ValueError(f"--ssl-keyfile-password: not the password of the key in --ssl-keyfile {keyfile!r}") from None
        try:  # which file: the certificate alone, read as a CA file, parses or not
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
        except ssl.SSLError:
            raise ValueError(f"--ssl-certfile {certfile!r}: not a valid PEM certificate ({e})") from None
        raise ValueError(f"--ssl-keyfile {keyfile!r}: not a valid PEM private key for --ssl-certfile {certfile!r} ({e})") from None
    if ca_certs is not None and not cert_reqs:
        raise ValueError("--ssl-ca-certs is read only to verify client certificates: give --ssl-cert-reqs 2 (required) "
                         "or 1 (optional) too")
    if cert_reqs and ca_certs is None:
        raise ValueError(f"--ssl-cert-reqs {cert_reqs} needs --ssl-ca-certs: the CA certificates that client certificates "
                         "are verified against (none would verify without them)")
    if ca_certs is not None:
        _check_pem("--ssl-ca-certs", ca_certs, "a PEM file of CA certificates", "-----BEGIN CERTIFICATE-----")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as e:
            raise ValueError(f"--ssl-ca-certs {ca_certs!r}: not a valid PEM file of CA certificates ({e})") from None
    return True


def root_path(text: str) -> str:
    """--root-path checked: '' or /segment[/segment...] (a trailing / dropped); ValueError naming the flag."""
    if text in ("", "/"):
        return ""
    if not text.startswith("/") or any(c in text for c in "?#") or any(c.isspace() for c in text) or "//" in text:
        raise ValueError(f"--root-path {text!r}: expected a URL path prefix such as /llm (starting with /, no query)")
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"--root-path {text!r}: expected an ASCII URL path (percent-encode other characters)") from None
    return text.rstrip("/")


def uvicorn_log_level(args: argparse.Namespace) -> str:
    """--uvicorn-log-level, else warning (info with --verbose), as before the flag."""
    if args.uvicorn_log_level is not None:
        return args.uvicorn_log_level
    return "info" if getattr(args, "verbose", False) else "warning"


def served_names(args: argparse.Namespace, source: str) -> list[str]:
    """The names the model is served under (--served-model-name, several in vLLM's way), else the
    --model argument, else the demo model's file name; ValueError for an empty one."""
    if args.served_model_name:
        names = list(dict.fromkeys(args.served_model_name))  # (a name given twice: once)
        if any(not name.strip() for name in names):
            raise ValueError(f"--served-model-name {names!r}: a name may not be empty")
        return names
    if args.model:
        return [args.model]
    return [os.path.splitext(os.path.basename(source))[0]]  # the demo model: its file name


def served_name(args: argparse.Namespace, source: str) -> str:
    """The name replies give: the first of served_names."""
    return served_names(args, source)[0]


def take_model_tag(args: argparse.Namespace) -> None:
    """`serve MODEL` (vLLM's positional) as --model; ValueError when both name different models."""
    tag = getattr(args, "model_tag", None)
    if tag is None:
        return
    if args.model is not None and args.model != tag:
        raise ValueError(f"the model is named twice: {tag!r} and --model {args.model!r}; give one")
    args.model = tag


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pangu_infer.llm import LLM
    from pangu_infer.server.app import create_app
    from pangu_infer.server.lora import add_startup_adapters

    take_model_tag(args)
    if args.enable_log_requests and args.disable_log_requests:
        raise ValueError("--enable-log-requests and --disable-log-requests: give one")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len {args.max_log_len}: expected a number of characters >= 0")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected a TCP port in 0..65535")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise ValueError(f"--reasoning-budget {args.reasoning_budget}: expected an integer >= 0 (reasoning tokens)")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError(f"--api-key {args.api_key!r}: expected a non-empty key")
    origins = allowed_origins(args.allowed_origins)
    https = check_ssl_files(args.ssl_keyfile, args.ssl_certfile, args.ssl_keyfile_password, args.ssl_ca_certs, args.ssl_cert_reqs)
    prefix = root_path(args.root_path)
    kwargs, lora_modules = app_llm_kwargs(args)
    if args.enable_runtime_lora_updates and not kwargs.get("enable_lora"):
        raise ValueError("--enable-runtime-lora-updates needs LoRA turned on: add --enable-lora (or --lora-modules)")
    llm = LLM(args.model, **kwargs)
    try:
        names = served_names(args, llm.loaded.source)
        name = names[0]
        loras = add_startup_adapters(llm, lora_modules, names)
        app = create_app(llm, served_model_name=names, api_key=args.api_key, reasoning_budget=args.reasoning_budget,
                         allowed_origins=origins, lora_modules=loras,
                         enable_runtime_lora_updates=args.enable_runtime_lora_updates,
                         trust_request_chat_template=args.trust_request_chat_template,
                         enable_log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                         enable_request_id_headers=args.enable_request_id_headers, log_stats=not args.disable_log_stats,
                         docs=not args.disable_fastapi_docs, return_tokens_as_token_ids=args.return_tokens_as_token_ids)
        base = f"{'https' if https else 'http'}://{args.host}:{args.port}"
        adapters = f" with LoRA adapters {', '.join(repr(m.request.lora_name) for m in loras)}" if loras else ""
        proxied = f" (behind a proxy at {prefix}/)" if prefix else ""
        also = f" (also {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
        print(f"pangu-infer serve: {name!r}{also}{adapters} on {base}/v1, chat page at {base}/{proxied}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=uvicorn_log_level(args),
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_keyfile_password=args.ssl_keyfile_password,
                    ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs or ssl.CERT_NONE, root_path=prefix)
    finally:
        llm.shutdown()  # tensor-parallel worker processes, if any
    return 0
