"""Pure ASGI middleware (streaming-safe): the API key, request counting, the body guard, the
generic 500 of a fault, and the X-Request-Id response header."""

from __future__ import annotations

import json
import math
import secrets
import uuid
from typing import Any, Optional

from pangu_infer.server.errors import APIError, error_response, internal_error
from pangu_infer.server.metrics import ServerMetrics
from pangu_infer.tokenizer import lone_surrogate_at

CLIENT_CLOSED = 499  # nginx's status for "client closed the connection"; only ever seen in metrics
MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context; keeps one client from filling memory
MAX_JSON_DEPTH = 64  # nesting of a request body (tool schemas are the deepest legitimate part)


class AuthAndCount:
    """API-key check on /v1/* and on the API docs (`protected`), and requests counted by endpoint and status."""

    def __init__(self, app: Any, api_key: Optional[str], metrics: ServerMetrics, endpoints: set, protected: set):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.endpoints, self.protected = endpoints, protected

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        endpoint = path if path in self.endpoints else "other"
        status = {"code": CLIENT_CLOSED}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            needs_key = path.startswith("/v1/") or path in self.protected
            if self.api_key is not None and needs_key and not self._authorized(scope):
                await error_response(
                    APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
                )(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            return True
        # x-api-key: the header Anthropic's API documents (its SDK 2.17 sends a bearer token)
        key = headers.get(b"x-api-key")
        return key is not None and secrets.compare_digest(key.strip(), self.api_key.encode())


def route_path(scope: dict) -> str:
    """The path the routes see: behind --root-path uvicorn puts the prefix in front of every path
    (ASGI's root_path), and the router takes it off again (as starlette's get_route_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class RequestIdHeader:
    """--enable-request-id-headers (vLLM's flag): every response carries an X-Request-Id header, the
    request's own (as it came: the HTTP parser has already refused what a header cannot hold) or
    else a new random one. (The header names a chat or completion reply whether or not this is on:
    params.client_request_id.)"""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        value = sent if sent is not None else uuid.uuid4().hex.encode()

        async def with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", value)]}
            await send(message)

        await self.app(scope, receive, with_id)


class InternalErrors:
    """A fault no exception handler answers becomes the generic 500 (server/errors.py internal_error:
    an id, the traceback in the log) here, and goes no further. Starlette's own last resort
    (ServerErrorMiddleware, where handlers of Exception go) answers and then raises the exception
    again, and uvicorn closes the connection of a request that raised: the next request on that
    keep-alive connection, a good one of the same client or of another behind a shared proxy,
    failed with a reset. After the response has started nothing can be answered any more: the
    exception goes on (the stream is cut, as it must be)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as e:
            if started:
                raise
            await error_response(internal_error(e, f"{scope['method']} {scope['path']}"))(scope, receive, send)


class BodyGuard:
    """Checks a JSON request body before the app parses it: size, UTF-8, nesting depth, lone
    surrogates, non-finite numbers.

    Each is a 400 (413 for size) naming the problem, where it would otherwise end deep in the
    stack: a RecursionError in a template, a UnicodeEncodeError in the tokenizer or in the
    response, a NaN echoed back (the Responses API returns its text, tools and reasoning) that no
    JSON response can hold. The body is read once here and handed on unchanged; later receives (the disconnect
    the routes watch for) pass straight through.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                err = APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
                await error_response(err)(scope, receive, send)
                return
        body = b"".join(chunks)
        problem = check_json_body(body)
        if problem is not None:
            await error_response(problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def check_json_body(body: bytes) -> Optional[APIError]:
    """A 400 for a body that is not UTF-8, nests too deeply, holds a lone surrogate or a number
    that is not finite (NaN, Infinity: Python's json reads them, JSON has none; 1e999 reads as
    Infinity); None when fine (and for a body that is not JSON at all: the app names that error itself)."""
    if not body.strip():
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return APIError(400, f"the request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})")
    try:
        value = json.loads(text)
    except RecursionError:
        return APIError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    except json.JSONDecodeError:
        return None  # the app's own message says where
    except ValueError:  # Python's limit on the digits of an integer
        return APIError(400, "the request body holds a number too long to read")
    if isinstance(value, str) and lone_surrogate_at(value) is not None:
        return _surrogate_error("")
    if _not_finite(value):
        return _not_finite_error("", value)
    if not isinstance(value, (dict, list)):
        return None
    # Iterative walk: the point is to refuse what recursive code downstream could not handle.
    # Only containers are pushed (paths are built for them alone): a long list of token ids costs one pass.
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return APIError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(key, str) and lone_surrogate_at(key) is not None:
                return _surrogate_error(path)
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, f"{path}.{key}" if path else str(key)))
            elif isinstance(child, str) and lone_surrogate_at(child) is not None:
                return _surrogate_error(f"{path}.{key}" if path else str(key))
            elif _not_finite(child):
                return _not_finite_error(f"{path}.{key}" if path else str(key), child)
    return None


def _is_json(scope: dict) -> bool:
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
    return not content_type or "json" in content_type


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _not_finite_error(path: str, value: float) -> APIError:
    where = f"invalid field '{path}'" if path else "invalid request body"
    return APIError(
        400,
        f"{where}: {'NaN' if math.isnan(value) else 'an infinite number'} is not a JSON number "
        "(JSON has no NaN or Infinity, and a literal too large for a double, like 1e999, reads as Infinity)",
        param=path or None,
    )


def _surrogate_error(path: str) -> APIError:
    where = f"invalid field '{path}'" if path else "invalid request body"
    return APIError(
        400,
        f"{where}: the text holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), "
        "which is not valid Unicode",
        param=path or None,
    )
