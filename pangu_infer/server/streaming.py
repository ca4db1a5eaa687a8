"""Engine -> response: submitting a request's prompts, merging their streams, SSE framing, and
aborting when the client hangs up."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextlib import suppress
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Optional

from fastapi import Request
from fastapi.responses import Response

from pangu_infer.engine.async_engine import EngineDeadError
from pangu_infer.engine.beam_search import beam_search_stream, check_prompt
from pangu_infer.errors import RequestError, RequestFailedError, short_repr
from pangu_infer.outputs import EmbeddingRequestOutput, RequestOutput
from pangu_infer.sampling_params import BeamSearchParams, SamplingParams
from pangu_infer.server.errors import APIError, from_request_error
from pangu_infer.server.metrics import ServerMetrics
from pangu_infer.server.middleware import CLIENT_CLOSED
from pangu_infer.server.params import check_model
from pangu_infer.lora import LoRARequest
from pangu_infer.server.state import ServerState


async def start_requests(state: ServerState, prompts: list[tuple[Optional[str], list[int]]], params: SamplingParams, prefix: str,
                         lora: Optional[LoRARequest] = None, cache_salt: Optional[str] = None, priority: int = 0,
                         default_length: Optional[int] = None, length_field: str = "max_tokens", pooling: Optional[str] = None,
                         normalize: bool = True, client_id: Optional[str] = None, beam: Optional[BeamSearchParams] = None):
    """Submit every prompt (each with the LoRA adapter `lora`, the prefix-cache salt `cache_salt` and
    the scheduling priority, when given) and wait for each one's first output, so a bad request is a
    400 before any byte is sent. length_field: the name the client gave max_tokens (as_sent).
    pooling: embedding requests (server/embeddings.py), whose first output is their only one;
    normalize False: their vectors not L2-normalized. client_id: the request's own request_id
    (vLLM's): the reply's id is prefix-client_id. beam: each prompt a beam search instead
    (use_beam_search; its max_tokens that of `params` fitted per prompt), one output each."""
    def submit(adapter: Optional[LoRARequest]):
        return _start(state, prompts, params, prefix, adapter, cache_salt, priority, default_length, length_field, pooling, normalize,
                      client_id, beam)

    if lora is None:
        return await submit(None)
    # The adapter named again here, and the submission counted in the same step (no await between):
    # one unloaded since the request's check_model is the same 404 as an unknown model, and an
    # unload that comes later answers 409 until the engine runs the request (server/lora.py _remove),
    # instead of succeeding while this submission loads the adapter back into the engine.
    lora = check_model(state, lora.lora_name)
    name = lora.lora_name
    state.lora_submissions[name] = state.lora_submissions.get(name, 0) + 1
    try:
        started = await submit(lora)
    finally:
        left = state.lora_submissions.pop(name) - 1
        if left:
            state.lora_submissions[name] = left
    state.metrics.lora_requests.labels(name).inc()
    return started


def fit_default_length(state: ServerState, params: SamplingParams, ids: list[int], default_length: Optional[int] = None) -> SamplingParams:
    """A reply's length as vLLM's server sets it. A request that gave no length (max_tokens None):
    the API's own default (`default_length`: completions' 16) and the generation config's
    max_new_tokens, the smaller, or the prompt's room in the context if less; with neither, the
    room (the engine's None). A request's own max_tokens is kept, but never past the ceiling of a
    generation config the operator chose (LLM.max_tokens_ceiling: --override-generation-config's
    max_new_tokens, or a --generation-config folder's, which is then also the default above).
    A length (capped) past the prompt's room stays the engine's 400; a min_tokens past the ceiling is
    a 400 naming the ceiling (not the max_tokens it cut, a value the client never sent)."""
    ceiling = getattr(state.llm, "max_tokens_ceiling", None)
    if ceiling is not None and params.min_tokens > ceiling:
        raise RequestError(f"min_tokens={short_repr(params.min_tokens)} exceeds this server's cap of {ceiling} tokens on a reply's "
                           "length (the max_new_tokens of its generation config)", param="min_tokens")
    if params.max_tokens is not None:
        return params if ceiling is None or params.max_tokens <= ceiling else replace(params, max_tokens=ceiling)
    limits = [n for n in (default_length, getattr(state.llm, "default_max_tokens", None)) if n is not None]
    if not limits:
        return params
    room = state.llm.engine.max_model_len - len(ids)
    return replace(params, max_tokens=max(1, min(*limits, room)))


REQUEST_LOGGER = "pangu_infer.server.requests"
request_log = logging.getLogger(REQUEST_LOGGER)


def _clipped(text: str, limit: Optional[int]) -> str:
    return text if limit is None or len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def log_request(state: ServerState, request_id: str, text: Optional[str], ids: list[int], params: SamplingParams,
                lora: Optional[LoRARequest]) -> None:
    """--enable-log-requests: the prompt (its text, else its ids) and parameters of a request submitted."""
    prompt = repr(text) if text is not None else f"token ids {ids}"
    adapter = f", LoRA adapter {lora.lora_name!r}" if lora is not None else ""
    request_log.info("received request %s: prompt %s (%d tokens), params %s%s", request_id,
                     _clipped(prompt, state.max_log_len), len(ids), _clipped(repr(params), state.max_log_len), adapter)


def as_sent(error: APIError, field: str) -> APIError:
    """An admission error about max_tokens (the prompt and the reply past the context, or past the
    KV cache) named as the client named the field (the chat APIs' max_completion_tokens, ...)."""
    if error.param != "max_tokens" or field == "max_tokens":
        return error
    return APIError(error.status, error.message.replace("max_tokens", field), param=field, code=error.code)


def client_message(e: BaseException, length_field: str = "max_tokens") -> str:
    """What the client is told of the exception that ended its request, without the error id of a
    5xx (server/errors.py: a 400's message for a RequestError; a fault's generic message)."""
    if isinstance(e, RequestError):
        return as_sent(from_request_error(e), length_field).message
    if isinstance(e, EngineDeadError):
        return "the inference engine has stopped; restart the server"
    return "internal server error (the server log has the details)"


class LoggedStream:
    """--enable-log-requests: one engine stream that logs how its request ended, exactly once:
    finished (the finish reasons, and the tokens), failed (what the client is told: a 400's message,
    or the generic one of a fault; never a traceback), or aborted (closed or cancelled before it
    finished: the client left, or another prompt of its request failed). Iterated like the stream."""

    def __init__(self, gen: Any, request_id: str, length_field: str = "max_tokens"):
        self.gen, self.request_id, self.length_field = gen, request_id, length_field
        self.ended = False
        self.generated = 0

    def __aiter__(self) -> "LoggedStream":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.gen.__anext__()
        except StopAsyncIteration:
            self.aborted()  # (an engine stream ends with its finished output: never seen)
            raise
        except asyncio.CancelledError:
            self.aborted()
            raise
        except Exception as e:
            self.failed(e)
            raise
        self.generated = out.num_generated_tokens
        if out.finished and not self.ended:
            self.ended = True
            reasons = "embedded" if isinstance(out, EmbeddingRequestOutput) else ", ".join(sorted({str(c.finish_reason) for c in out.outputs}))
            request_log.info("finished request %s: %s, %d prompt + %d generated tokens", out.request_id, reasons,
                             out.num_prompt_tokens, out.num_generated_tokens)
        return out

    async def aclose(self) -> None:
        self.aborted()
        await self.gen.aclose()

    def failed(self, e: BaseException) -> None:
        if not self.ended:
            self.ended = True
            request_log.info("failed request %s: %s", self.request_id, client_message(e, self.length_field))

    def aborted(self) -> None:
        if not self.ended:
            self.ended = True
            request_log.info("aborted request %s: ended before it finished, after %d generated tokens", self.request_id,
                             self.generated)


def _printable(text: str) -> str:
    """`text` with each character that is not printable escaped as Python writes it ('\\n', '\\x1b')."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


async def _start(state: ServerState, prompts: list[tuple[Optional[str], list[int]]], params: SamplingParams, prefix: str,
                 lora: Optional[LoRARequest], cache_salt: Optional[str], priority: int = 0, default_length: Optional[int] = None,
                 length_field: str = "max_tokens", pooling: Optional[str] = None, normalize: bool = True,
                 client_id: Optional[str] = None, beam: Optional[BeamSearchParams] = None):
    base = f"{prefix}-{uuid.uuid4().hex}" if client_id is None else f"{prefix}-{client_id}"
    # The engine's ids stay unique whatever ids clients send (two requests of one request_id run both),
    # and are what the logs name: a character that is not printable (a line break, an escape
    # sequence) is written escaped, so that a request_id adds no lines to the server's log.
    engine_base = base if client_id is None else f"{prefix}-{_printable(client_id)}-{uuid.uuid4().hex}"
    # (only what is given: the tests' stand-in engines take none of these arguments)
    extra = {k: v for k, v in (("lora_request", lora), ("cache_salt", cache_salt), ("priority", priority or None), ("pooling", pooling),
                               ("normalize", None if normalize else False)) if v is not None}
    submitted = [  # (request id, prompt text, ids, the parameters it runs with)
        (engine_base if len(prompts) == 1 else f"{engine_base}-{i}", text, ids, fit_default_length(state, params, ids, default_length))
        for i, (text, ids) in enumerate(prompts)
    ]
    beams = [None if beam is None else replace(beam, max_tokens=own.max_tokens or max(1, state.llm.engine.max_model_len - len(ids)))
             for _, _, ids, own in submitted]
    if beam is not None:  # every prompt checked before any search starts (each runs to its end before its first output)
        for i, ((_, _, ids, _), each) in enumerate(zip(submitted, beams)):
            try:
                check_prompt(ids, each, state.llm.engine.limits)
            except RequestError as e:
                raise _prompts_error(e, i, len(prompts)) from None
    if state.log_requests:
        for request_id, text, ids, own in submitted:
            log_request(state, request_id, text, ids, own, lora)
    gens = [state.engine.generate(ids, own, request_id, prompt=text, **extra) if each is None else
            beam_search_stream(state.engine, ids, each, request_id, prompt=text, **extra)
            for (request_id, text, ids, own), each in zip(submitted, beams)]
    if state.log_requests:  # (each logged as received above: each logs its end)
        gens = [LoggedStream(g, request_id, length_field) for g, (request_id, *_) in zip(gens, submitted)]
    try:
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
    except BaseException:  # cancelled (the client left while queued): a stream never started is closed too
        await close_all(gens)
        raise
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        await close_all(gens)
        rejected = [(i, f) for i, f in enumerate(firsts) if isinstance(f, RequestError)]
        raise _prompts_error(rejected[0][1], rejected[0][0], len(prompts)) if rejected else errors[0]
    return base, gens, list(firsts)


def _prompts_error(e: RequestError, index: int, count: int) -> APIError:
    """A prompt's rejection as a 400; of a request's several prompts, it names which (prompt[i])."""
    err = from_request_error(e)
    if count > 1 and e.param == "prompt":
        err.message = f"prompt[{index}]: {err.message}"
    return err


async def close_all(gens: list) -> None:
    for g in gens:
        with suppress(BaseException):
            await g.aclose()


async def merged_outputs(gens: list, firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all prompts' streams as they arrive; closing it aborts the rest."""
    pending: dict[asyncio.Future, int] = {}
    try:
        for i, first in enumerate(firsts):
            yield i, first
            if not first.finished:
                pending[asyncio.ensure_future(gens[i].__anext__())] = i
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                out = task.result()
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(gens[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await close_all(gens)


async def final_outputs(state: ServerState, gens: list, firsts: list[RequestOutput]) -> list[RequestOutput]:
    finals: list[Optional[RequestOutput]] = [f if f.finished else None for f in firsts]
    try:
        async for i, out in merged_outputs(gens, firsts):
            if out.finished:
                finals[i] = out
                observe(state, out)
    except (RequestFailedError, RequestError):  # (a RequestError here: its own input ended it, a 400)
        state.metrics.finished.labels("error").inc()
        raise
    assert all(f is not None for f in finals)
    return finals  # type: ignore[return-value]


def observe(state: ServerState, out: RequestOutput) -> None:
    """A finished request counted (--enable-log-requests logs its end from its stream: LoggedStream)."""
    state.metrics.observe_request(out.metrics, (c.finish_reason for c in out.outputs))


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client hangs up first, cancel it (which aborts its requests) and raise."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise ClientGone()
    return task.result()


class ClientGone(Exception):
    pass


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_event(event: dict) -> str:
    """An SSE event named by its type (the Responses and Messages APIs' framing): `event:` then `data:`."""
    return f"event: {event['type']}\n{sse(event)}"


def envelope(model: str, request_id: str, obj: str, created: int, choices: list, **extra) -> dict:
    """OpenAI's response / chunk shape, the same for every endpoint (model: ServerState.reply_model)."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def usage_info(prompt_tokens: int, completion_tokens: int, outputs: list[RequestOutput]) -> dict:
    """OpenAI's usage, with the prompt tokens the prefix cache served (`outputs`: one per prompt)."""
    cached = sum(o.metrics.get("num_cached_tokens") or 0 for o in outputs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": cached}}
    predicted = [o.metrics for o in outputs if "accepted_prediction_tokens" in o.metrics]
    if predicted:  # (the final outputs': the counts grow as the reply is written)
        usage["completion_tokens_details"] = {
            name: sum(m[name] for m in predicted) for name in ("accepted_prediction_tokens", "rejected_prediction_tokens")
        }
    return usage


def stream_usage(req: Any) -> tuple[bool, bool]:
    """A streamed request's (last usage chunk, usage on every chunk): stream_options as vLLM reads them."""
    return req.stream_options.usage() if req.stream_options is not None else (False, False)


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """vLLM's usage on every chunk (continuous_usage_stats): the counts so far, without details."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def unless_gone(request: Request, work: Awaitable[Any], metrics: ServerMetrics) -> Any:
    """`work`'s result, or a bare 499 once the client has hung up (its requests aborted, blocks freed)."""
    try:
        return await unless_disconnected(request, work)
    except ClientGone:
        metrics.finished.labels("abort").inc()
        return Response(status_code=CLIENT_CLOSED)
