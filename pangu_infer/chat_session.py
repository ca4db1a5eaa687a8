"""`pangu-infer chat`: an interactive terminal chat that streams the reply and shows reasoning apart."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Iterable, TextIO

from pangu_infer.chat import ChatStreamParser
from pangu_infer.sampling_params import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"


def run_chat(llm, args: argparse.Namespace, params: SamplingParams, out: TextIO = sys.stdout) -> int:
    """Read questions (from --message or stdin), stream answers; /reset clears the history, /exit quits."""
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    thinking = {"on": True, "off": False, "auto": "auto", None: None}[args.thinking]
    color = out.isatty()
    # Markers must survive decoding so the stream parser can route reasoning apart from the answer.
    params = replace(params, skip_special_tokens=False)
    for question in _questions(args.message):
        if question.strip() in ("/exit", "/quit"):
            break
        if question.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": question})
        prompt = llm.render_chat(history, enable_thinking=thinking)
        answer, reasoning, n_tokens, elapsed = _stream_reply(llm, prompt, params, out, color)
        history.append({"role": "assistant", "content": answer})
        if args.stats:
            print(f"{DIM if color else ''}[{n_tokens} tokens, {n_tokens / max(elapsed, 1e-9):.1f} tokens/s]{RESET if color else ''}", file=out)
    return 0


def _questions(messages) -> Iterable[str]:
    if messages:
        yield from messages
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _stream_reply(llm, prompt: str, params: SamplingParams, out: TextIO, color: bool):
    parser = ChatStreamParser()
    answer, reasoning = [], []
    in_reasoning = False
    n_tokens = 0
    start = time.perf_counter()
    for step in llm.stream({"prompt_token_ids": llm.encode_prompt(prompt), "prompt": prompt}, params):
        comp = step.outputs[0]
        n_tokens += len(comp.token_ids_delta)
        events = parser.feed(comp.text_delta) + (parser.finish() if step.finished else [])
        for ev in events:
            if ev.kind == "reasoning":
                if not in_reasoning:
                    print(f"{DIM if color else ''}[thinking] ", end="", file=out)
                    in_reasoning = True
                reasoning.append(ev.text)
                print(ev.text, end="", file=out, flush=True)
                continue
            if in_reasoning:
                print(f"{RESET if color else ''}\n", end="", file=out)
                in_reasoning = False
            if ev.kind == "content":
                answer.append(ev.text)
                print(ev.text, end="", file=out, flush=True)
            elif ev.kind == "tool_call":
                fn = ev.tool_call["function"]
                print(f"[tool call] {fn['name']}({fn['arguments']})", file=out)
    if in_reasoning and color:
        print(RESET, end="", file=out)
    print(file=out)
    return "".join(answer), "".join(reasoning), n_tokens, time.perf_counter() - start
