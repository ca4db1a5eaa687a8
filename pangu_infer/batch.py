"""`pangu-infer run-batch`: vLLM's offline batch command, over the OpenAI Batch file format.

    pangu-infer run-batch -i requests.jsonl -o results.jsonl --model MODEL [model flags]

Each input line is {"custom_id", "method": "POST", "url", "body"}; each output line, in input
order, is {"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}. The body is what the server answers for that request, because the request goes
through the server itself: the app `serve` builds (server/app.py create_app), called in this
process as an ASGI application (no socket), so validation, chat templates, tools, structured
output, usage and error bodies are the server's own. A request the server refuses keeps its status
code and error body in `response`. A line that is not a request at all (not JSON, no custom_id,
url or body, a url or method that is not served, a custom_id already used, stream=true) gets
"response": null and "error": {"code", "message"} naming the problem and its line number. Blank
lines are skipped. Lines run concurrently, so the engine batches them; no line's failure touches
another's result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, Optional

from pangu_infer.cli import add_chat_template_argument, add_model_arguments
from pangu_infer.server.cli import add_app_arguments
from pangu_infer.tokenizer import lone_surrogate_at

logger = logging.getLogger("pangu_infer.batch")

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")
STDIO = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input-file", required=True, metavar="FILE",
                        help="the requests, one JSON object a line in OpenAI's Batch format ('-': stdin)")
    parser.add_argument("-o", "--output-file", required=True, metavar="FILE",
                        help="where the results go, one line per request in input order ('-': stdout)")
    add_model_arguments(parser)
    add_chat_template_argument(parser)
    add_app_arguments(parser)  # (serve's: the app is the one serve builds)


# ---------------------------------------------------------------------- the input file
class LineError(Exception):
    """A line that is no request: answered with "response": null and this error."""

    def __init__(self, code: str, message: str, custom_id: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


def read_input(path: str) -> bytes:
    """The input file's bytes ('-': stdin); ValueError naming the file when it cannot be read."""
    if path == STDIO:
        if sys.stdin is None:  # (`<&-`: Python leaves sys.stdin None)
            raise ValueError(f"cannot read the input file {STDIO!r}: stdin is closed")
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the input file {path!r}: {e.strerror or e}") from None


def check_output(path: str) -> None:
    """Fail before the model loads when the output file cannot be written."""
    if path == STDIO:
        if sys.stdout is None:  # (`>&-`)
            raise ValueError(f"cannot write the output file {STDIO!r}: stdout is closed")
        return
    if os.path.isdir(path):
        raise ValueError(f"the output file {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write the output file {path!r}: no folder {folder!r}")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise ValueError(f"cannot write the output file {path!r}: permission denied")


def parse_lines(data: bytes) -> list[tuple[int, Any]]:
    """(line number, the request dict or a LineError) for each line that is not blank; a custom_id
    used before is a LineError naming the line that used it."""
    items: list[tuple[int, Any]] = []
    seen: dict[str, int] = {}
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark, as some Windows editors write
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = _parse_line(number, raw)
            custom_id = item["custom_id"]
        except LineError as e:
            item, custom_id = e, e.custom_id
        # A custom_id is taken by the first line that gives it, even a line refused for another reason.
        first = seen.setdefault(custom_id, number) if custom_id is not None else number
        if first != number:
            item = LineError("duplicate_custom_id", f"line {number}: custom_id {custom_id!r} was used on line {first}; "
                             "each request needs its own", custom_id)
        items.append((number, item))
    return items


def _parse_line(number: int, raw: bytes) -> dict:
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LineError("invalid_json_line", f"line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise LineError("invalid_json_line", f"line {number}: not valid JSON ({e})") from None
    except ValueError:  # Python's limit on the digits of an integer (its advice, sys.set_int_max_str_digits, is not the user's)
        raise LineError("invalid_json_line", f"line {number}: holds a number too long to read") from None  # (the server's words)
    if not isinstance(item, dict):
        raise LineError("invalid_json_line", f"line {number}: expected a JSON object, got {type(item).__name__}")
    custom_id = item.get("custom_id") if isinstance(item.get("custom_id"), str) else None
    # Echoed in the output line: one UTF-8 cannot write had ended the whole run, every line's result lost.
    if custom_id is not None and lone_surrogate_at(custom_id) is not None:
        raise LineError("invalid_request", f"line {number}: custom_id {json.dumps(custom_id)[:60]} holds a lone UTF-16 surrogate "
                        "(an escape like \\ud800 without its pair), which is not valid Unicode")
    missing = [key for key in ("custom_id", "url", "body") if key not in item]
    if missing:
        raise LineError("missing_required_parameter", f"line {number}: missing {', '.join(missing)}", custom_id)
    if custom_id is None:
        raise LineError("invalid_request", f"line {number}: custom_id must be a string, got {json.dumps(item['custom_id'])[:60]}")
    if item.get("method", "POST") != "POST":
        raise LineError("invalid_method", f"line {number}: method {json.dumps(item['method'])[:60]} is not supported; expected POST", custom_id)
    if item["url"] not in URLS:
        raise LineError("invalid_url", f"line {number}: url {json.dumps(item['url'])[:100]} is not supported; expected one of {', '.join(URLS)}",
                        custom_id)
    if not isinstance(item["body"], dict):
        raise LineError("invalid_request", f"line {number}: body must be a JSON object, got {type(item['body']).__name__}", custom_id)
    if _streams(item["body"].get("stream")):
        raise LineError("invalid_request", f"line {number}: stream=true is not supported in a batch; leave stream out", custom_id)
    return item


def _streams(value: Any) -> bool:
    """Whether the server would take `stream` as true (pydantic's reading of a bool: also "true", 1)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Optional[bool]).validate_python(value) is True
    except ValidationError:
        return False  # not a bool at all: the server's own 400


# ---------------------------------------------------------------------- running the requests
async def call_app(app: Any, url: str, body: bytes) -> tuple[int, bytes, str]:
    """POST `body` to `url` on the ASGI app: (status, response body, content type). The client
    stays connected until the response is complete (the server aborts requests whose client left)."""
    received = False
    done = asyncio.Event()
    start: dict = {}
    chunks: list[bytes] = []

    async def receive() -> dict:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": url, "raw_path": url.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"run-batch"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0), "server": ("run-batch", 80),
    }
    try:
        await app(scope, receive, send)
    finally:
        done.set()
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}
    return start.get("status", 500), b"".join(chunks), headers.get("content-type", "")


async def run_line(app: Any, number: int, item: dict) -> dict:
    """One request's output line."""
    try:
        body = json.dumps(item["body"]).encode()  # (ASCII escapes: a lone surrogate reaches the server's body guard)
    except (ValueError, RecursionError) as e:
        return _line(item["custom_id"], error=LineError("invalid_request", f"line {number}: body cannot be sent: {e}"))
    status, content, content_type = await call_app(app, item["url"], body)
    try:
        answer = json.loads(content)
    except ValueError:
        answer = None
    if answer is None or not content_type.startswith("application/json"):
        return _line(item["custom_id"], error=LineError(
            "invalid_response", f"line {number}: the server answered {status} with {content_type or 'no content type'}, not JSON"))
    request_id = answer.get("id") if isinstance(answer, dict) and isinstance(answer.get("id"), str) else f"req_{uuid.uuid4().hex}"
    return _line(item["custom_id"], response={"status_code": status, "request_id": request_id, "body": answer})


def _line(custom_id: Optional[str], response: Optional[dict] = None, error: Optional[LineError] = None) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


async def run_batch(app: Any, items: list[tuple[int, Any]], write, concurrency: int, progress=None) -> tuple[int, int]:
    """Answer every item through `app`, at most `concurrency` at once; `write(line_dict)` is called
    in input order as lines complete. (succeeded, failed): a 200 succeeded."""
    results: list[Optional[dict]] = [None] * len(items)
    counts = [0, 0]
    written = 0
    queue = iter(range(len(items)))

    def record(index: int, line: dict) -> None:
        nonlocal written
        results[index] = line
        ok = line["response"] is not None and line["response"]["status_code"] == 200
        counts[0 if ok else 1] += 1
        if progress is not None:
            progress.update(1)
        while written < len(results) and results[written] is not None:
            write(results[written])
            results[written] = None
            written += 1

    async def worker() -> None:
        for index in queue:
            number, item = items[index]
            if isinstance(item, LineError):
                record(index, _line(item.custom_id, error=item))
                continue
            try:
                line = await run_line(app, number, item)
            except Exception as e:  # (the app answers its own faults with a 500; this is a last resort)
                logger.error("run-batch: line %d failed", number, exc_info=e)
                line = _line(item["custom_id"], error=LineError("internal_error", f"line {number}: {type(e).__name__}: {e}"))
            record(index, line)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return counts[0], counts[1]


# ---------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pangu_infer.llm import LLM
    from pangu_infer.server.app import create_app
    from pangu_infer.server.cli import app_llm_kwargs, served_names
    from pangu_infer.server.lora import add_startup_adapters

    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise ValueError(f"--reasoning-budget {args.reasoning_budget}: expected an integer >= 0 (reasoning tokens)")
    kwargs, lora_modules = app_llm_kwargs(args)
    items = parse_lines(read_input(args.input_file))  # before the model loads: a bad path fails at once
    check_output(args.output_file)
    llm = LLM(args.model, **kwargs)
    try:
        names = served_names(args, llm.loaded.source)
        loras = add_startup_adapters(llm, lora_modules, names)
        # (no periodic engine line: the progress bar on stderr reports the run)
        app = create_app(llm, served_model_name=names, reasoning_budget=args.reasoning_budget, lora_modules=loras,
                         trust_request_chat_template=args.trust_request_chat_template, log_stats=False)
        out = sys.stdout if args.output_file == STDIO else open(args.output_file, "w", encoding="utf-8")
        try:
            def write(line: dict) -> None:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()

            # Twice the engine's batch: the next requests are rendered and queued while a step runs.
            concurrency = 2 * llm.engine_config.max_num_seqs
            start = time.perf_counter()
            with tqdm(total=len(items), desc="run-batch", unit="req", file=sys.stderr, dynamic_ncols=True) as progress:
                succeeded, failed = asyncio.run(_serve(app, items, write, concurrency, progress))
            elapsed = time.perf_counter() - start
        finally:
            if out is not sys.stdout:
                out.close()
    finally:
        llm.shutdown()
    where = "stdout" if args.output_file == STDIO else repr(args.output_file)
    print(f"pangu-infer run-batch: {succeeded} succeeded, {failed} failed, of {len(items)} requests in {elapsed:.1f} s; "
          f"results in {where}", file=sys.stderr)
    return 0


async def _serve(app: Any, items: list[tuple[int, Any]], write, concurrency: int, progress) -> tuple[int, int]:
    """run_batch inside the app's lifespan (its engine thread is stopped at the end)."""
    async with app.router.lifespan_context(app):
        return await run_batch(app, items, write, concurrency, progress)
