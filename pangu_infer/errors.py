"""Errors about one request, shared by the Python API and the server (no torch import)."""

from __future__ import annotations

from typing import Optional


class RequestError(ValueError):
    """A request that can never be served as asked (a bad field, too long for the context).

    `param` names the field at fault, as the server's 400 does ("stop_token_ids", "max_tokens").
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class RequestFailedError(RuntimeError):
    """An admitted request that failed inside the engine (a bug, a device fault); only it ended.

    The message is generic; the log has the traceback under the request id.
    """


def short_repr(value: object, limit: int = 80) -> str:
    """repr() for error messages: cut to `limit` characters, and safe for integers of any size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WeightError(ValueError):
    """A checkpoint whose tensors do not match the model; the message names the tensor."""
