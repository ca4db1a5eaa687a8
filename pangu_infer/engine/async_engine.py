"""AsyncEngine: the LLMEngine driven from its own thread, streamed to asyncio callers.

LLMEngine is not thread-safe, so one thread owns it: every call into it (add_request,
abort_request, step, stats, moe_stats) runs there. The event loop sends commands through a
thread-safe queue; the engine thread answers through `loop.call_soon_threadsafe`, into one
future per command and one asyncio.Queue per request. LLM.generate/chat on the same engine (a
server and the Python API in one process) go through the same thread (run_blocking). With no request in flight the thread
blocks on the command queue, so an idle server burns no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Optional

from pangu_infer.engine.engine import LLMEngine
from pangu_infer.errors import RequestError, RequestFailedError
from pangu_infer.lora import LoRAAdapter, LoRARequest
from pangu_infer.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from pangu_infer.sampling_params import SamplingParams

logger = logging.getLogger("pangu_infer.engine")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served any more."""


@dataclass
class _Stream:
    """Where the engine thread delivers one request's outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: Optional[str]
    stream: _Stream
    done: asyncio.Future
    grammar: Optional[object] = None  # compiled beforehand (LLMEngine.compile_grammar)
    lora_request: Optional[LoRARequest] = None
    lora_adapter: Optional[LoRAAdapter] = None  # read beforehand (LLMEngine.read_lora)
    cache_salt: Optional[str] = None
    priority: int = 0
    bad_words_ids: Optional[list[list[int]]] = None  # tokenized beforehand (LLMEngine.bad_words_ids)
    prediction_ids: Optional[list[int]] = None  # tokenized beforehand (LLMEngine.prediction_ids)
    pooling: Optional[str] = None  # an embedding request's (LLMEngine.add_request)
    normalize: bool = True  # (an embedding request's: LLMEngine.add_request)
    share_prefix: bool = False  # (LLMEngine.add_request's)


@dataclass
class _Abort:
    request_id: str
    done: Optional[asyncio.Future]  # None: fire and forget (from a generator being closed)


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: asyncio.Future


_STOP = object()


class AsyncEngine:
    """Serve many concurrent asyncio callers from one LLMEngine running in its own thread.

    >>> engine = AsyncEngine.from_llm(LLM("model-dir"))
    >>> async for out in engine.generate(ids, SamplingParams(max_tokens=8), "req-1"):
    ...     print(out.outputs[0].text_delta, end="")
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="pangu-engine", daemon=True)
        # LLM.generate/chat on the same engine go through this thread while it runs (run_blocking).
        engine.driver = self
        self._thread.start()

    @classmethod
    def from_llm(cls, llm: Any) -> "AsyncEngine":
        """Reuse an LLM's loaded model and engine; llm.generate/chat then run through this engine's
        thread (run_blocking) while it runs."""
        return cls(llm.engine)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ the asyncio side
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
        cache_salt: Optional[str] = None,
        priority: int = 0,
        pooling: Optional[str] = None,
        normalize: bool = True,
        share_prefix: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the one with finished=True. `lora_request`: the LoRA
        adapter it runs with (one the engine does not hold, never loaded or made room for, is read
        on a worker thread first, so that reading its files stalls no other request). `cache_salt`
        and `priority`: LLMEngine.add_request's. `pooling`: an embedding request (LLMEngine.add_request's;
        `params` from embedding_params()), whose one output, an EmbeddingRequestOutput, is its last;
        `normalize` False: its pooled vector not L2-normalized. `share_prefix`: LLMEngine.add_request's.

        Raises RequestError (a ValueError naming the field) on the first iteration when the request
        cannot be served, and RequestFailedError when it failed inside the engine (the other
        requests go on). Stopping early (break + aclose, cancellation) aborts the request.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        added = loop.create_future()
        grammar = None
        if params.structured_outputs is not None:
            # Compiling takes seconds on a model's first constrained request: on a worker thread,
            # so that the engine thread goes on stepping the other requests meanwhile.
            grammar = await asyncio.to_thread(self.engine.compile_grammar, params)
        bad_words_ids = None
        if params.bad_words:
            # Up to 300 words of 1000 characters, each tokenized twice: tens of milliseconds that
            # would stall every other request's step on the engine thread.
            try:
                bad_words_ids = await asyncio.to_thread(self.engine.bad_words_ids, params.bad_words)
            except ValueError as e:
                raise RequestError(str(e), param="bad_words") from None
        prediction_ids = None
        if params.prediction is not None:
            # a predicted output may be as long as the reply: its tokenizing stalls no other request
            try:
                prediction_ids = await asyncio.to_thread(self.engine.prediction_ids, params.prediction)
            except ValueError as e:
                raise RequestError(str(e), param="prediction") from None
        adapter = None
        if lora_request is not None and not self.engine.lora_loaded(lora_request):
            try:
                adapter = await asyncio.to_thread(self.engine.read_lora, lora_request)
            except ValueError as e:
                raise RequestError(str(e), param="lora_request") from None
        self._send(_Add(request_id, list(prompt_token_ids), params, prompt, stream, added, grammar, lora_request, adapter,
                        cache_salt, priority, bad_words_ids, prediction_ids, pooling, normalize, share_prefix))
        try:
            await added
        except asyncio.CancelledError:
            self._commands.put(_Abort(request_id, None))  # it may have been added meanwhile
            raise
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                # A slow consumer gets everything that piled up as one output.
                while not stream.queue.empty() and not isinstance(item, BaseException):
                    nxt = stream.queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else _merge(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:  # the request's own input at fault (a 400), or the engine's
                    raise RequestError(item.error, param=item.error_param) if item.error_param else RequestFailedError(item.error)
                yield item
        finally:
            if not finished and self.is_running:
                # Closed early (client gone, task cancelled): free the request's KV blocks.
                self._commands.put(_Abort(request_id, None))

    def run_blocking(self, requests: list[tuple], pooling: Optional[str] = None, normalize: bool = True,
                     share_prefix: bool = False) -> list[RequestOutput]:
        """Generate (request_id, prompt ids, params, prompt[, lora_request[, cache_salt[, priority]]]) each to the end and return the final
        outputs, from a thread that runs no event loop: how LLM.generate/chat reach an engine this
        AsyncEngine drives (a server in the same process). The engine is stepped by its own thread
        only: stepped from two threads, each would take the other's outputs (a caller waiting
        forever) or corrupt the scheduler. A rejected request raises (RequestError, naming the
        prompt's index when there are several) and the others are aborted. `pooling`: every request
        is an embedding request pooled that way (generate's)."""

        async def one(
            index: int, request_id: str, ids: list[int], params: SamplingParams, prompt: Optional[str],
            lora_request: Optional[LoRARequest] = None, cache_salt: Optional[str] = None, priority: int = 0,
        ) -> RequestOutput:
            last = None
            try:
                async for out in self.generate(ids, params, request_id, prompt, lora_request, cache_salt, priority, pooling, normalize,
                                               share_prefix):
                    last = out
            except RequestError as e:
                if len(requests) == 1:
                    raise
                raise RequestError(f"prompt {index}: {e}", param=e.param) from None
            return last

        async def every() -> list[RequestOutput]:
            # On the first error gather raises it; asyncio.run then cancels the rest, whose
            # generators abort their requests.
            return list(await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests))))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(every())
        raise RuntimeError("this engine is driven by a running AsyncEngine (a server) and this thread runs an event loop: "
                           "use `await AsyncEngine.generate(...)` here, not LLM.generate/chat")

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op when unknown or finished); returns once its blocks are freed."""
        done = asyncio.get_running_loop().create_future()
        self._send(_Abort(request_id, done))
        await done

    async def stats(self) -> dict:
        """LLMEngine.stats(), read on the engine thread after every command sent before it."""
        return await self.call(lambda e: e.stats())

    async def moe_stats(self) -> dict:
        """Tokens per expert group and imbalance scores per layer ({} for dense models)."""
        return await self.call(lambda e: e.model.moe_stats() if e.config.is_moe else {})

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread, between steps, and return its result."""
        done = asyncio.get_running_loop().create_future()
        self._send(_Call(fn, done))
        return await done

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after the step in progress; in-flight requests get EngineDeadError."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    def _send(self, command: Any) -> None:
        if not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped" + (f": {self._error!r}" if self._error else ""))
        self._commands.put(command)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                # Block while idle; otherwise take what has arrived and get on with the next step.
                block = not self.engine.has_unfinished_requests()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if command is _STOP:
                        return
                    self._handle(command)
                    block = False
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # a bug in the engine: fail every waiting caller, not silently
            self._error = e
            logger.exception("the engine thread died")
            raise
        finally:
            if getattr(self.engine, "driver", None) is self:
                self.engine.driver = None
            dead = EngineDeadError("the engine thread has stopped" + (f": {self._error!r}" if self._error else ""))
            self._fail_all(dead)
            self._fail_pending(dead)

    def _handle(self, command: Any) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(
                    command.request_id, command.prompt_token_ids, command.params, command.prompt, command.grammar,
                    command.lora_request, command.lora_adapter, command.cache_salt, command.priority, command.bad_words_ids,
                    command.prediction_ids, command.pooling, command.normalize, command.share_prefix,
                )
            except Exception as e:  # RequestError, ValueError: the caller's mistake, not the engine's
                _resolve(command.stream.loop, command.done, error=e)
                return
            self._streams[command.request_id] = command.stream
            _resolve(command.stream.loop, command.done, None)
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._streams.pop(command.request_id, None)
            if command.done is not None:
                _resolve(command.done.get_loop(), command.done, None)
        elif isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as e:
                _resolve(command.done.get_loop(), command.done, error=e)
            else:
                _resolve(command.done.get_loop(), command.done, result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # LLMEngine.step ends a request whose own work fails by itself; an exception here is a
            # fault of the engine's bookkeeping, with every request in an unknown state: end them
            # (their streamed tokens stay delivered), keep serving new ones.
            logger.exception("engine step failed; ending %d requests", len(self._streams))
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
            self._fail_all(RequestFailedError("the engine step failed"))
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            _deliver(stream, out)

    def _fail_pending(self, error: BaseException) -> None:
        """Answer the commands that arrived after the stop, so no caller waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            done = getattr(command, "done", None)
            if done is not None:
                _resolve(done.get_loop(), done, error=error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            _deliver(stream, error)
        self._streams.clear()


def _deliver(stream: _Stream, item: Any) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
        pass


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None, error: Any = None) -> None:
    def settle() -> None:
        if future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


def _merge(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output carrying the deltas of both (later's totals, both deltas concatenated)."""
    if isinstance(later, EmbeddingRequestOutput):  # (an embedding request has one output: never merged)
        return later
    before = {c.index: c for c in earlier.outputs}
    outs = [_merge_completion(before[c.index], c) if c.index in before else c for c in later.outputs]
    return replace(later, outputs=outs)


def _merge_completion(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    logprobs = None if a.logprobs_delta is None and b.logprobs_delta is None else (a.logprobs_delta or []) + (b.logprobs_delta or [])
    return replace(
        b,
        text_delta=a.text_delta + b.text_delta,
        token_ids_delta=a.token_ids_delta + b.token_ids_delta,
        logprobs_delta=logprobs,
    )
