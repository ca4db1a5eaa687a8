"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A user's mistake is a 4xx whose message names the bad field. A fault of the server is a 5xx
with a generic message and an id; the traceback goes to the server log under that id, never
into the body.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pangu_infer.engine.async_engine import EngineDeadError
from pangu_infer.errors import RequestError

logger = logging.getLogger("pangu_infer.server")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def from_request_error(e: RequestError) -> APIError:
    """The engine's or SamplingParams' rejection of one field, as a 400 naming it."""
    return APIError(400, str(e), param=e.param)


def internal_error(exc: BaseException, context: str = "") -> APIError:
    """A 5xx for a fault of the server: a generic message with an id; the traceback goes to the log."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    logger.error("internal error %s%s", error_id, f" ({context})" if context else "", exc_info=exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the inference engine has stopped (id {error_id}); restart the server", code="engine_dead")
    return APIError(500, f"internal server error (id {error_id}; the server log has the details)", code="internal_error")


def stream_error(exc: BaseException, context: str) -> APIError:
    """What a stream's error event says after its 200: a 400's message and field when the request's
    own input ended it (a grammar that allows nothing more), else a fault of the server's."""
    return from_request_error(exc) if isinstance(exc, RequestError) else internal_error(exc, context)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(from_request_error(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    # The last resort of a fault outside the routes (the outer middleware); a route's fault is
    # answered by middleware.InternalErrors, which keeps the connection open.
    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error(exc, f"{request.method} {request.url.path}"))


def validation_message(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field and what was expected."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if not loc:
        return APIError(400, f"the request body must be a JSON object with Content-Type: application/json: {e.get('msg')}")
    # Union members show up as extra path parts (e.g. "str", "list[int]"); keep the field path only.
    field = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "function-after"})
    where = f"field '{field}'" if field else "the request body"
    got = e.get("input")
    got_text = "" if e.get("type") == "missing" else f" (got {json.dumps(got)[:100] if _jsonable(got) else type(got).__name__})"
    more = "" if len(errors) == 1 else f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, f"invalid {where}: {e.get('msg')}{got_text}{more}", param=field or None)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
