"""The OpenAI-compatible HTTP API (FastAPI) over the AsyncEngine.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses   POST /v1/messages   POST /v1/embeddings
    GET /v1/models[/{name}]   POST /tokenize   POST /detokenize   GET /tokenizer_info
    POST /v1/load_lora_adapter   POST /v1/unload_lora_adapter (--enable-runtime-lora-updates; server/lora.py)
    GET /health   GET /version   GET /metrics   GET / (the chat page, static/; open without the API key)

Request path: JSON -> protocol.py models -> SamplingParams + prompt token ids (chat rendered
by pangu_infer.chat.render_chat) -> AsyncEngine.generate -> text deltas -> reasoning / tool-call
parsers (chat) -> OpenAI JSON or SSE chunks. Every user mistake is a 4xx in OpenAI's error shape
(server/errors.py); the API key, request counting and the body guard are ASGI middleware
(server/middleware.py). Request fields become engine parameters in server/params.py; submitting,
merging streams, SSE framing and hang-ups are server/streaming.py; the chat path the chat-shaped
endpoints share is server/chat_api.py, with the Responses API in server/responses.py and
Anthropic's Messages API in server/messages.py, embeddings in server/embeddings.py; this file holds the routes.
"""

from __future__ import annotations

import asyncio
import html
import logging
import sys
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

import pangu_infer
from pangu_infer.chat import ChatStreamParser
from pangu_infer.engine.async_engine import AsyncEngine
from pangu_infer.engine.sequence import Logprob
from pangu_infer.errors import short_repr
from pangu_infer.lora import LoRARequest
from pangu_infer.outputs import CompletionOutput, RequestOutput
from pangu_infer.server.errors import APIError, add_error_handlers, error_response, stream_error
from pangu_infer.server.metrics import STATS_LOGGER, ServerMetrics, log_stats_forever
from pangu_infer.server.middleware import AuthAndCount, BodyGuard, InternalErrors, RequestIdHeader
from pangu_infer.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pangu_infer.server import embeddings as embed_api
from pangu_infer.server import messages as anthropic
from pangu_infer.server import responses as resp
from pangu_infer.server.state import LoRAModule
from pangu_infer.server.lora import add_routes as lora_routes
from pangu_infer.server.chat_api import (
    ChatParsing,
    SpecialTokenFilter,
    chat_choice,
    chat_logprobs,
    checked_template_kwargs,
    echoed_text,
    finite,
    prompt_logprobs,
    reasoning_fields,
    render,
    special_token_filter,
    start_chat,
    token_name,
)
from pangu_infer.server.params import beam_search_params, check_model, check_size, client_request_id, to_sampling_params
from pangu_infer.server.state import ServerState
from pangu_infer.server.streaming import (
    REQUEST_LOGGER,
    envelope,
    final_outputs,
    merged_outputs,
    observe,
    running_usage,
    sse,
    start_requests,
    stream_usage,
    unless_gone,
    usage_info,
)

logger = logging.getLogger("pangu_infer.server")

# Routes outside /v1 that need the API key too (the API docs are added in create_app).
KEYED_ROUTES = {"/tokenize", "/detokenize", "/tokenizer_info"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}
}
CHAT_PAGE_DIR = Path(__file__).parent / "static"  # index.html, chat.js, markdown.js, chat.css


def create_app(
    llm: Any,
    *,
    served_model_name: Union[str, Sequence[str]],
    api_key: Optional[str] = None,
    engine: Any = None,
    reasoning_budget: Optional[int] = None,
    allowed_origins: Sequence[str] = (),
    lora_modules: Sequence[LoRAModule] = (),
    enable_runtime_lora_updates: bool = False,
    trust_request_chat_template: bool = False,
    enable_log_requests: bool = False,
    max_log_len: Optional[int] = None,
    enable_request_id_headers: bool = False,
    log_stats: bool = True,
    docs: bool = True,
    return_tokens_as_token_ids: bool = False,
) -> FastAPI:
    """The app serving `llm` as `served_model_name` (several names: requests may send any, replies
    name the first, as vLLM's); it owns (and stops) the AsyncEngine it makes.
    allowed_origins: web origins whose pages may call the API from a browser (CORS; "*" for any);
    none by default, so that a page on another site cannot drive a server on localhost.
    lora_modules: LoRA adapters already added to llm's engine (server/lora.py add_startup_adapters),
    served under their names; enable_runtime_lora_updates: /v1/load_lora_adapter and
    /v1/unload_lora_adapter change them while the server runs; trust_request_chat_template: a chat
    or /tokenize request may bring its own chat_template (vLLM's flag of the same name);
    enable_log_requests, max_log_len (vLLM's): log each request's prompt and parameters when it is
    submitted (cut to max_log_len characters) and how it ended, at INFO; enable_request_id_headers
    (vLLM's flag): every response carries X-Request-Id, the request's header or a new id; log_stats
    (False: vLLM's --disable-log-stats): vLLM's engine line at INFO every LOG_STATS_INTERVAL_S seconds
    while anything runs (prompt and generation throughput, requests running and waiting, KV cache use,
    prefix cache hit rate); docs (False: vLLM's --disable-fastapi-docs): no /docs, /redoc, /openapi.json;
    return_tokens_as_token_ids (vLLM's flag): logprobs name tokens "token_id:<id>" unless a request's own
    return_tokens_as_token_ids says otherwise."""
    own_engine = engine is None
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    served_model_name = names[0]
    state = ServerState(
        llm=llm,
        engine=AsyncEngine.from_llm(llm) if own_engine else engine,
        model_name=served_model_name,
        api_key=api_key,
        metrics=ServerMetrics(served_model_name),
        created=int(time.time()),
        max_seqs_per_request=llm.engine_config.max_num_seqs,
        token_texts={},
        reasoning_budget=reasoning_budget,
        loras={m.request.lora_name: m for m in lora_modules},
        next_lora_id=max((m.request.lora_int_id for m in lora_modules), default=0) + 1,
        runtime_lora_updates=enable_runtime_lora_updates,
        trust_request_chat_template=trust_request_chat_template,
        other_model_names=tuple(names[1:]),
        log_requests=enable_log_requests,
        max_log_len=max_log_len,
        return_tokens_as_token_ids=return_tokens_as_token_ids,
    )
    if enable_log_requests:  # (shown whatever the engine's log level: the operator asked for them)
        logging.getLogger(REQUEST_LOGGER).setLevel(logging.INFO)
    if log_stats:  # (shown by default, as vLLM's)
        logging.getLogger(STATS_LOGGER).setLevel(logging.INFO)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task = asyncio.create_task(log_stats_forever(state.engine)) if log_stats else None
        yield
        if stats_task is not None:
            stats_task.cancel()
        if own_engine:
            state.engine.shutdown()
        # A first load's model cache write still running: finished here, before uvicorn re-raises
        # the signal that stopped the server (the process then ends without atexit hooks).
        model_cache = sys.modules.get("pangu_infer.loader.model_cache")
        if model_cache is not None:
            model_cache.finish_writes(interruptible=False)

    off = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="pangu-infer OpenAI-compatible API", version=pangu_infer.__version__, lifespan=lifespan, **off)
    app.state.server = state
    add_error_handlers(app)
    _add_routes(app, state)
    lora_routes(app, state)
    _add_chat_page(app)
    # The API docs describe the API: they need the key too. (Added last = outermost: the key is
    # checked, and the request counted, before the body guard reads a byte.)
    keyed = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None} | KEYED_ROUTES
    app.add_middleware(InternalErrors)  # innermost: a route's fault is a 500 that keeps the connection
    app.add_middleware(BodyGuard)
    app.add_middleware(
        AuthAndCount, api_key=api_key, metrics=state.metrics, endpoints={getattr(r, "path", None) for r in app.routes}, protected=keyed
    )
    if enable_request_id_headers:  # (outside the key check: a 401 carries it too)
        app.add_middleware(RequestIdHeader)
    if allowed_origins:
        # Outermost: a browser's preflight carries no key, and a 401 needs the CORS headers to be read.
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"], expose_headers=["*"], max_age=600)
    return app


# ---------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="200 while the engine thread is alive, else 503")
    async def health() -> JSONResponse:
        if getattr(state.engine, "is_running", True):
            return JSONResponse({"status": "ok"})
        return error_response(APIError(503, "the engine thread has stopped; restart the server"))

    @app.get("/version")
    async def version() -> dict:
        return {"version": pangu_infer.__version__}

    @app.get("/metrics", summary="Prometheus text exposition", response_class=Response)
    async def metrics() -> Response:
        stats, moe = await state.engine.stats(), await state.engine.moe_stats()
        return Response(state.metrics.render(stats, moe), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(lora: Optional[LoRARequest] = None, name: Optional[str] = None) -> ModelCard:
        max_len = state.llm.engine.max_model_len
        if lora is None:
            return ModelCard(id=name or state.model_name, created=state.created, max_model_len=max_len)
        module = state.loras[lora.lora_name]
        return ModelCard(id=lora.lora_name, created=module.created, max_model_len=max_len, root=lora.lora_path, parent=module.parent)

    # The base model first, then the LoRA adapters (vLLM's order); root and parent only on adapters.
    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        return ModelList(data=[card(name=n) for n in state.model_names] + [card(m.request) for m in list(state.loras.values())])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def model(model: str) -> ModelCard:
        return card(check_model(state, model), name=model if model in state.model_names else None)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await asyncio.to_thread(_tokenize, state, body)

    @app.get("/tokenizer_info", summary="vLLM's: the special tokens and chat template, for clients that tokenize through the server")
    async def tokenizer_info() -> dict:
        tok = state.llm.tokenizer
        pad = tok.convert_ids_to_tokens([tok.pad_token_id])[0] if tok.pad_token_id is not None else None
        return {
            "tokenizer_class": type(tok).__name__,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": pad,
            "add_bos_token": tok.add_bos,
            "chat_template": tok.chat_template,
            "model_max_length": state.llm.engine.max_model_len,
            "vocab_size": tok.vocab_size,
        }

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(state, body.model)
        return await asyncio.to_thread(_detokenize, state, body.tokens)

    @app.post("/v1/chat/completions", responses={200: _ok(ChatCompletionResponse, "chat.completion.chunk"), **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    @app.post("/v1/completions", responses={200: _ok(CompletionResponse, "text_completion"), **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _completion(state, body, request)

    @app.post("/v1/embeddings", responses=ERROR_RESPONSES, summary="OpenAI's embeddings: final hidden states pooled (--pooling), L2-normalized")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await embed_api.handle(state, body, request)

    @app.post("/v1/responses", responses=ERROR_RESPONSES, summary="OpenAI's Responses API (server/responses.py)")
    async def responses(body: resp.ResponsesRequest, request: Request) -> Response:
        return await resp.handle(state, body, request)

    @app.post("/v1/messages", responses=ERROR_RESPONSES, summary="Anthropic's Messages API (server/messages.py)")
    async def messages(body: anthropic.MessagesRequest, request: Request) -> Response:
        return await anthropic.handle(state, body, request)

    @app.post("/v1/messages/count_tokens", responses=ERROR_RESPONSES, summary="Anthropic's: the prompt tokens of a Messages request")
    async def messages_count_tokens(body: anthropic.CountTokensRequest) -> dict:
        return await anthropic.count_tokens(state, body)

    @app.get("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def get_response(response_id: str) -> dict:
        return state.responses.get(response_id)[0]

    @app.get("/v1/responses/{response_id}/input_items", responses=ERROR_RESPONSES)
    async def response_input_items(response_id: str, limit: int = 20, order: str = "desc", after: Optional[str] = None) -> dict:
        return state.responses.input_items(response_id, limit, order, after)

    @app.delete("/v1/responses/{response_id}", responses=ERROR_RESPONSES)
    async def delete_response(response_id: str) -> dict:
        state.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def _add_chat_page(app: FastAPI) -> None:
    """The web chat at / (its assets under /static); it calls /v1 from the browser, so it needs no key itself.
    Its links are relative (static/chat.js, v1/...). Behind --root-path the page names the prefix as
    its base URL (<base href="/prefix/">): the browser shows /prefix as well as /prefix/ (a proxy that
    strips the prefix forwards both as /), and relative to /prefix the links would leave the prefix."""

    @app.get("/", include_in_schema=False)
    async def chat_page(request: Request) -> Response:
        prefix = request.scope.get("root_path", "").rstrip("/")
        if not prefix:
            return FileResponse(CHAT_PAGE_DIR / "index.html")
        return HTMLResponse(chat_page_html(prefix))

    app.mount("/static", StaticFiles(directory=CHAT_PAGE_DIR), name="static")


def chat_page_html(prefix: str) -> str:
    """index.html with `<base href="PREFIX/">` first in its head (before any link it resolves)."""
    page = (CHAT_PAGE_DIR / "index.html").read_text(encoding="utf-8")
    head = page.index("<head>") + len("<head>")
    return f'{page[:head]}\n<base href="{html.escape(prefix, quote=True)}/">{page[head:]}'


def _ok(model: type, chunk_object: str) -> dict:
    return {
        "model": model,
        "description": f"the whole reply; with stream=true, text/event-stream of `data: {{{chunk_object} JSON}}` lines ending in `data: [DONE]`",
    }


# ---------------------------------------------------------------------- request -> engine


# ---------------------------------------------------------------------- chat
async def _chat(state: ServerState, req: ChatCompletionRequest, request: Request) -> Response:
    length_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    client_id = client_request_id(request, req.request_id)
    started = await start_chat(state, req, request, "chatcmpl", length_field, client_id)
    if isinstance(started, Response):
        return started
    request_id, gens, firsts, parse, ids, model = started
    as_ids = state.tokens_as_ids(req.return_tokens_as_token_ids)
    echo = echoed_text(req)
    if req.stream:
        body = _chat_stream(state, model, request_id, gens, firsts, parse, req.logprobs, stream_usage(req),
                            special=req.skip_special_tokens, token_ids=as_ids, return_ids=bool(req.return_token_ids),
                            include_reasoning=req.include_reasoning, echo=echo)
        return StreamingResponse(body, media_type="text/event-stream")
    result = await unless_gone(request, final_outputs(state, gens, firsts), state.metrics)
    if isinstance(result, Response):
        return result
    final = result[0]
    special = special_token_filter(state) if req.skip_special_tokens else None
    choices = [chat_choice(state, c, parse, req.logprobs, special, as_ids, req.include_reasoning, echo) for c in final.outputs]
    usage = usage_info(len(ids), sum(len(c.token_ids) for c in final.outputs), [final])
    extra = {"prompt_logprobs": prompt_logprobs(state, final.prompt_logprobs)} if req.prompt_logprobs is not None else {}
    if req.return_token_ids:  # (vLLM's places: the prompt's on the response, each choice's own)
        extra["prompt_token_ids"] = list(ids)
        for choice, comp in zip(choices, final.outputs):
            choice["token_ids"] = list(comp.token_ids)
    return JSONResponse(envelope(model, request_id, "chat.completion", int(time.time()), choices, usage=usage, **extra))


# /tokenize's fields that shape a rendered chat: beside a prompt they would be dropped
CHAT_ONLY_TOKENIZE_FIELDS = ("tools", "chat_template_kwargs", "chat_template", "add_generation_prompt", "continue_final_message")


def _tokenize(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.prompt is not None:
        for name in CHAT_ONLY_TOKENIZE_FIELDS:  # (a value that changes nothing, the default or empty, is taken)
            value = getattr(req, name)
            if name in req.model_fields_set and value != TokenizeRequest.model_fields[name].default and value not in ([], {}):
                raise APIError(400, f"{name} applies to messages (a chat rendered by its template); this request gives a "
                               "prompt, tokenized as it is", param=name)
        ids = state.llm.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        template_kwargs = checked_template_kwargs(req.chat_template_kwargs)
        template_kwargs.pop("thinking_budget", None)  # a sampling setting: no part of the prompt
        _, ids = render(state, req, req.tools, template_kwargs.pop("enable_thinking", None), template_kwargs)
    strs = [state.token_text(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.llm.engine.max_model_len, tokens=ids, token_strs=strs)


def _detokenize(state: ServerState, tokens: list[int]) -> DetokenizeResponse:
    # the model's vocabulary, or the tokenizer's if wider: an id of the model's padded rows has
    # no piece, and is empty text (Tokenizer.decode), as in a reply that sampled it
    vocab = max(state.llm.tokenizer.vocab_size, state.llm.config.vocab_size)
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens holds {short_repr(bad)}, outside the vocabulary [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=state.llm.tokenizer.decode(tokens, skip_special_tokens=False))


async def _chat_stream(
    state: ServerState,
    model: str,
    request_id: str,
    gens: list,
    firsts: list[RequestOutput],
    parse: ChatParsing,
    logprobs: bool,
    usage: tuple[bool, bool],
    special: bool = False,
    token_ids: bool = False,
    return_ids: bool = False,
    include_reasoning: bool = True,
    echo: str = "",
) -> AsyncIterator[str]:
    """usage: (a last usage chunk, usage on every chunk: stream_usage); special: skip_special_tokens
    (their texts taken out of reasoning and content after parsing); token_ids:
    return_tokens_as_token_ids; return_ids: return_token_ids (the prompt's ids on each choice's
    first chunk, as vLLM, and each chunk's generated ids on its choice); include_reasoning false: no
    reasoning deltas (vLLM's field); echo: each choice's content starts with it, in a chunk of its own
    after the role's (vLLM's chat echo: chat_api.echoed_text)."""
    include_usage, continuous = usage
    created = int(time.time())
    n = len(firsts[0].outputs)
    parsers = [ChatStreamParser(reasoning=parse.reasoning, tool_calls=parse.tools) for _ in range(n)]
    # per choice, one filter per text channel; a channel's held-back tail is let out when the other speaks
    filters: list[Optional[dict[str, SpecialTokenFilter]]] = [
        {"content": special_token_filter(state), "reasoning": special_token_filter(state)} if special else None for _ in range(n)
    ]
    tool_indices = [0] * n
    done_choices: set[int] = set()
    completion_tokens = [0] * n
    prompt_tokens = len(firsts[0].prompt_token_ids)
    finished = False

    def chunk(index: int, delta: dict, finish_reason: Optional[str] = None, lps: Optional[list[Logprob]] = None,
              ids: Optional[list[int]] = None) -> str:
        """ids: the generated token ids it carries (return_token_ids); None on the first chunk, which
        carries the prompt's instead."""
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": chat_logprobs(state, lps or [], token_ids)} if logprobs and lps is not None else None,
            "finish_reason": finish_reason,
        }
        extra: dict[str, Any] = {}
        if return_ids:
            if ids is None:
                extra["prompt_token_ids"] = list(firsts[0].prompt_token_ids)
            else:
                choice["token_ids"] = ids
        if include_usage:
            extra["usage"] = running_usage(prompt_tokens, completion_tokens[index]) if continuous else None
        return sse(envelope(model, request_id, "chat.completion.chunk", created, [choice], **extra))

    def filtered(i: int, kind: str, text: str, final: bool = False) -> list[dict]:
        """The deltas of `text` on channel `kind` (content or reasoning), special tokens taken out
        when asked; what the other channel held back goes first (final: let out this channel's)."""
        def delta(channel: str, piece: str) -> dict:
            return {"content": piece} if channel == "content" else reasoning_fields(piece)

        channels = filters[i]
        if channels is None:
            return [delta(kind, text)]
        other = "reasoning" if kind == "content" else "content"
        deltas = []
        held = channels[other].finish()
        if held:
            deltas.append(delta(other, held))
        kept = channels[kind].finish() if final else channels[kind].feed(text)
        if kept:
            deltas.append(delta(kind, kept))
        return deltas

    def flush(i: int) -> list[dict]:
        """What the special-token filters still hold (before a tool call, and at the end)."""
        return [] if filters[i] is None else filtered(i, "content", "", final=True) + filtered(i, "reasoning", "", final=True)

    def events_to_deltas(i: int, events: list) -> list[dict]:
        deltas = []
        for ev in events:
            if ev.kind == "reasoning" and not include_reasoning:
                continue  # (its tokens' logprobs and ids still go out, on an empty content delta)
            if ev.kind in ("content", "reasoning"):
                deltas += filtered(i, ev.kind, ev.text)
            else:
                deltas += flush(i)
                call = ev.tool_call
                deltas.append({"tool_calls": [{"index": tool_indices[i], "id": call["id"], "type": "function", "function": call["function"]}]})
                tool_indices[i] += 1
        return deltas

    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        if echo:
            for i in range(n):
                yield chunk(i, {"content": echo}, ids=[])
        latest = list(firsts)  # each prompt's latest output: the usage's counts at the end
        async with aclosing(merged_outputs(gens, firsts)) as outputs:
            async for prompt_index, out in outputs:
                latest[prompt_index] = out
                for comp in out.outputs:
                    i = comp.index
                    if i in done_choices:
                        continue
                    completion_tokens[i] += len(comp.token_ids_delta)
                    if filters[i] is not None:
                        for channel in filters[i].values():
                            channel.saw(comp.token_ids_delta)
                    deltas = events_to_deltas(i, parsers[i].feed(comp.text_delta))
                    if comp.finished:
                        deltas += events_to_deltas(i, parsers[i].finish()) + flush(i)
                    lps = comp.logprobs_delta if comp.token_ids_delta else None
                    if not deltas and (lps or return_ids and comp.token_ids_delta):
                        deltas = [{"content": ""}]  # carry the logprobs / ids of tokens whose text is held back
                    for k, delta in enumerate(deltas):
                        yield chunk(i, delta, lps=lps if k == 0 else None, ids=list(comp.token_ids_delta) if k == 0 else [])
                    if comp.finished:
                        done_choices.add(i)
                        reason = "tool_calls" if tool_indices[i] else comp.finish_reason
                        yield chunk(i, {}, finish_reason=reason, ids=[])
                if out.finished:
                    observe(state, out)
        finished = True
        if include_usage:
            usage = usage_info(prompt_tokens, sum(completion_tokens), latest)
            yield sse(envelope(model, request_id, "chat.completion.chunk", created, [], usage=usage))
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 is sent, an error can only travel as an SSE event
        finished = True
        state.metrics.finished.labels("error").inc()
        yield sse(stream_error(e, f"streaming {request_id}").body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            state.metrics.finished.labels("abort").inc()


# ---------------------------------------------------------------------- completions
def _completion_prompts(state: ServerState, prompt: Any, n: int, add_special_tokens: bool = True) -> list[tuple[Optional[str], list[int]]]:
    """(text, ids) of each prompt; texts tokenized with BOS first when add_special_tokens (and the model wants it)."""
    if not prompt:
        raise APIError(400, "prompt is empty: give a string, a list of strings, or token ids", param="prompt")
    single = isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)
    check_size(state, 1 if single else len(prompt), n)  # before tokenizing what may be thousands of prompts
    if isinstance(prompt, str):
        return [(prompt, state.llm.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, state.llm.tokenizer.encode(p, add_special_tokens=add_special_tokens)) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    return [(None, list(p)) for p in prompt]


async def _completion(state: ServerState, req: CompletionRequest, request: Request) -> Response:
    lora = check_model(state, req.model)
    model = state.reply_model(lora)
    # echo with max_tokens 0 (OpenAI's way to score a text): one token is generated and dropped
    prompt_only = req.echo and req.max_tokens == 0
    # no max_tokens: OpenAI's 16, the generation config's max_new_tokens or the prompt's room, the
    # least (vLLM's; streaming.fit_default_length), not a 400 for a length the client did not ask
    default_length = None if "max_tokens" in req.model_fields_set else req.max_tokens
    max_tokens = 1 if prompt_only else None if default_length is not None else req.max_tokens
    params = to_sampling_params(state, req, max_tokens, req.logprobs, chat=False)
    if req.prompt_logprobs is None and req.echo and req.logprobs is not None:
        params = replace(params, prompt_logprobs=req.logprobs)  # the echoed prompt is scored (vLLM: the same)
    as_ids = state.tokens_as_ids(req.return_tokens_as_token_ids)
    prompts = await asyncio.to_thread(_completion_prompts, state, req.prompt, req.n, req.add_special_tokens)
    beam = beam_search_params(state, req, params)
    client_id = client_request_id(request, req.request_id)
    started = await unless_gone(request, start_requests(state, prompts, params, "cmpl", lora, req.cache_salt, req.priority,
                                                          default_length, client_id=client_id, beam=beam), state.metrics)
    if isinstance(started, Response):
        return started
    request_id, gens, firsts = started
    admitted = [(text if len(f.prompt_token_ids) == len(ids) else None, f.prompt_token_ids) for (text, ids), f in zip(prompts, firsts)]
    echo = await asyncio.to_thread(_Echo, state, admitted, req.logprobs, prompt_only, as_ids) if req.echo else None
    prompt_tokens = sum(len(ids) for _, ids in admitted)
    if req.stream:
        body = _completion_stream(state, model, request_id, gens, firsts, req.n, req.logprobs is not None, stream_usage(req), prompt_tokens,
                                  echo, token_ids=as_ids, return_ids=bool(req.return_token_ids))
        return StreamingResponse(body, media_type="text/event-stream")
    result = await unless_gone(request, final_outputs(state, gens, firsts), state.metrics)
    if isinstance(result, Response):
        return result
    choices = []
    for p, final in enumerate(result):
        # vLLM's: every choice carries its prompt's logprobs whenever they were computed
        scored = {"prompt_logprobs": prompt_logprobs(state, final.prompt_logprobs)} if params.prompt_logprobs is not None else {}
        for comp in final.outputs:
            # vLLM's return_token_ids: each choice its prompt's ids and its generated ones (an echoed
            # prompt's not among them; none when max_tokens 0 drops the one generated)
            ids = {"prompt_token_ids": list(final.prompt_token_ids),
                   "token_ids": [] if prompt_only else list(comp.token_ids)} if req.return_token_ids else {}
            if echo is not None:
                choices.append({**echo.choice(p * req.n + comp.index, p, final, comp), **scored, **ids})
                continue
            lps = _completion_logprobs(state, comp.logprobs or [], 0, as_ids=as_ids)[0] if req.logprobs is not None else None
            choices.append({"index": p * req.n + comp.index, "text": comp.text, "logprobs": lps, "finish_reason": comp.finish_reason,
                            **scored, **ids})
    generated = 0 if prompt_only else sum(len(c.token_ids) for f in result for c in f.outputs)
    usage = usage_info(prompt_tokens, generated, result)
    return JSONResponse(envelope(model, request_id, "text_completion", int(time.time()), choices, usage=usage))


def _completion_logprobs(state: ServerState, logprobs: list[Optional[Logprob]], offset: int, token_ids: Optional[list[int]] = None,
                         as_ids: bool = False, top: Optional[int] = None) -> tuple[dict, int]:
    """OpenAI's legacy logprobs of `logprobs` (an entry may be None: an echoed prompt's first
    token, whose id is then read from token_ids), and the text offset after them. as_ids: tokens
    named "token_id:<id>" (return_tokens_as_token_ids; text_offset still counts the text); top:
    at most this many alternatives per token (an echoed prompt scored with more)."""
    tokens, offsets = [], []
    for i, lp in enumerate(logprobs):
        token_id = lp.token_id if lp is not None else token_ids[i]
        tokens.append(token_name(state, token_id, as_ids))
        offsets.append(offset)
        offset += len(state.token_text(token_id))
    lps = {
        "tokens": tokens,
        "token_logprobs": [finite(lp.logprob) if lp is not None else None for lp in logprobs],
        "top_logprobs": [{token_name(state, t, as_ids): finite(v) for t, v in lp.top[:top]} if lp is not None else None for lp in logprobs],
        "text_offset": offsets,
    }
    return lps, offset


class _Echo:
    """echo=true: each choice starts with its prompt (the given text, or the ids decoded, special
    tokens kept: token-id prompts and prompts that truncate_prompt_tokens cut) and, with
    logprobs, the prompt's tokens scored first (at most `logprobs` alternatives each, whatever
    prompt_logprobs asked the engine for); prompt_only (max_tokens 0) drops the one generated token."""

    def __init__(self, state: ServerState, prompts: list[tuple[Optional[str], list[int]]], logprobs: Optional[int], prompt_only: bool,
                 as_ids: bool = False):
        self.state = state
        self.texts = [text if text is not None else state.llm.tokenizer.decode(ids, skip_special_tokens=False) for text, ids in prompts]
        self.logprobs = logprobs
        self.prompt_only = prompt_only
        self.as_ids = as_ids

    def prompt_logprobs(self, out: RequestOutput) -> tuple[Optional[dict], int]:
        """The prompt's legacy logprobs (None without logprobs) and the text offset after them."""
        if self.logprobs is None:
            return None, 0
        entries = list(out.prompt_logprobs or [])
        ids = out.prompt_token_ids  # as admitted
        entries += [None] * (len(ids) - len(entries))  # (always complete once a token is out)
        top = None if self.logprobs == -1 else self.logprobs  # (-1: the whole vocabulary, vLLM's)
        return _completion_logprobs(self.state, entries, 0, ids, self.as_ids, top)

    def choice(self, index: int, p: int, out: RequestOutput, comp: CompletionOutput) -> dict:
        lps, end = self.prompt_logprobs(out)
        if self.prompt_only:
            return {"index": index, "text": self.texts[p], "logprobs": lps, "finish_reason": "length"}
        if lps is not None:
            rest, _ = _completion_logprobs(self.state, comp.logprobs or [], end, as_ids=self.as_ids)
            lps = {key: lps[key] + rest[key] for key in lps}
        return {"index": index, "text": self.texts[p] + comp.text, "logprobs": lps, "finish_reason": comp.finish_reason}


async def _completion_stream(
    state: ServerState,
    model: str,
    request_id: str,
    gens: list,
    firsts: list[RequestOutput],
    n: int,
    logprobs: bool,
    usage: tuple[bool, bool],
    prompt_tokens: int,
    echo: Optional[_Echo] = None,
    token_ids: bool = False,
    return_ids: bool = False,
) -> AsyncIterator[str]:
    """usage: (a last usage chunk, usage on every chunk: stream_usage); token_ids:
    return_tokens_as_token_ids; return_ids: return_token_ids (a choice's first chunk carries its
    prompt's ids, each chunk the generated ids it adds, as vLLM)."""
    include_usage, continuous = usage
    created = int(time.time())
    generated: dict[int, int] = {}  # per choice, its tokens so far
    offsets: dict[int, int] = {}
    done_choices: set[int] = set()
    echoed: set[int] = set()
    started: set[int] = set()  # choices whose first chunk is out (return_token_ids)
    finished = False

    def chunk(p: int, choice: dict, ids: list[int]) -> str:
        """A chunk of one choice of prompt p; ids: the generated token ids it carries."""
        index = choice["index"]
        if return_ids:
            if index not in started:
                started.add(index)
                choice["prompt_token_ids"] = list(firsts[p].prompt_token_ids)
            choice["token_ids"] = ids
        extra: dict[str, Any] = {}
        if include_usage:  # (continuous: vLLM's counts, of this prompt and choice)
            extra["usage"] = running_usage(len(firsts[p].prompt_token_ids), generated.get(index, 0)) if continuous else None
        return sse(envelope(model, request_id, "text_completion", created, [choice], **extra))

    try:
        async with aclosing(merged_outputs(gens, firsts)) as outputs:
            async for p, out in outputs:
                for comp in out.outputs:
                    index = p * n + comp.index
                    if echo is not None and index not in echoed:
                        # the prompt first, in a chunk of its own (prompt_only: the whole choice)
                        echoed.add(index)
                        if echo.prompt_only:
                            choice = echo.choice(index, p, out, comp)
                        else:
                            prompt_lps, offsets[index] = echo.prompt_logprobs(out)
                            choice = {"index": index, "text": echo.texts[p], "logprobs": prompt_lps, "finish_reason": None}
                        yield chunk(p, choice, [])
                        if echo.prompt_only:
                            done_choices.add(index)
                    if index in done_choices or not (comp.text_delta or comp.token_ids_delta or comp.finished):
                        continue
                    if comp.finished:
                        done_choices.add(index)
                    generated[index] = generated.get(index, 0) + len(comp.token_ids_delta)
                    lps = None
                    if logprobs:
                        lps, offsets[index] = _completion_logprobs(state, comp.logprobs_delta or [], offsets.get(index, 0), as_ids=token_ids)
                    choice = {"index": index, "text": comp.text_delta, "logprobs": lps, "finish_reason": comp.finish_reason}
                    yield chunk(p, choice, list(comp.token_ids_delta))
                if out.finished:
                    observe(state, out)
        finished = True
        if include_usage:
            usage = usage_info(prompt_tokens, sum(generated.values()), firsts)
            yield sse(envelope(model, request_id, "text_completion", created, [], usage=usage))
        yield "data: [DONE]\n\n"
    except Exception as e:
        finished = True
        state.metrics.finished.labels("error").inc()
        yield sse(stream_error(e, f"streaming {request_id}").body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            state.metrics.finished.labels("abort").inc()
