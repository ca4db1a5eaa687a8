"""`pangu-infer chat`: a terminal chat in the manner of `ollama run` and `llama-cli`.

Replies stream as they are written, Pangu's reasoning dimmed apart. Ctrl-C stops the reply being
written and keeps the conversation (a second Ctrl-C during the same reply quits). What is typed
comes from chat_input (readline, history, multi-line); lines that start with a /command are
handled here and never sent to the model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Optional, TextIO

from pangu_infer.chat import ChatStreamParser
from pangu_infer.chat_input import LineReader, history_path
from pangu_infer.sampling_params import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"
THINKING_MODES: dict[str, Any] = {"on": True, "off": False, "auto": "auto"}  # -> render_chat(enable_thinking=)
HELP = """Commands:
  /help, /?            this help
  /think on|off|auto   Pangu thinking: on reasons before answering, off answers directly, auto lets
                       the model choose; /think alone shows the mode
  /system TEXT         set the system prompt (the conversation goes on); /system alone shows it,
                       /system "" removes it
  /reset, /clear       forget the conversation (the system prompt stays)
  /exit, /bye          end the chat (so do Ctrl-D, and Ctrl-C at an empty prompt)

Multi-line messages: start with \"\"\" and end with a line ending in \"\"\" (/system \"\"\" ... works too),
or end a line with \\ to continue on the next.
Ctrl-C stops a reply and keeps the conversation; up and down arrows recall earlier lines
(kept in {history})."""
_COMMAND = re.compile(r"/([A-Za-z?][\w-]*)(?:\s+(.*))?", re.S)


@dataclass
class Reply:
    answer: str
    reasoning: str
    tokens: int
    seconds: float
    stopped: bool
    error: Optional[str] = None  # why it ended early (RequestOutput.error), when it failed


class ChatSession:
    """One conversation: the system prompt, the turns so far, the thinking mode."""

    def __init__(
        self, llm, params: SamplingParams, *, system: Optional[str], thinking: Optional[str], out: TextIO, stats: bool,
        lora_request=None,
    ):
        self.llm = llm
        self.lora_request = lora_request  # the LoRA adapter every reply runs with (--lora), or None
        # Markers must survive decoding so the stream parser can route reasoning apart from the answer.
        self.params = replace(params, skip_special_tokens=False)
        self.system = system or None
        self.thinking = thinking  # on | off | auto, or None: the model's default
        self.turns: list[dict] = []
        self.out = out
        self.color = out.isatty()
        self.stats = stats
        self.failed = False  # a message got an error instead of a reply

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def handle(self, text: str, literal: bool = False) -> bool:
        """Run a /command or answer a message; False when the chat should end."""
        command = None if literal else _COMMAND.fullmatch(text.strip())
        if command:
            return self.command(command.group(1).lower(), (command.group(2) or "").strip())
        self.ask(text)
        return True

    def command(self, name: str, arg: str) -> bool:
        if name in ("exit", "bye", "quit"):
            return False
        if name in ("help", "?"):
            self.say(HELP.format(history=history_path()))
        elif name == "think":
            if arg.lower() in THINKING_MODES:
                self.thinking = arg.lower()
            elif arg:
                self.say(f"/think {arg}: expected on, off or auto")
                return True
            self.say(f"thinking: {self.thinking or 'the model default'}")
        elif name == "system":
            if arg in ('""', "''"):
                self.system = None
            elif arg:
                self.system = arg
            self.say(f"system prompt: {self.system}" if self.system else "no system prompt")
        elif name in ("reset", "clear"):
            self.turns = []
            self.say("conversation cleared" + (" (the system prompt stays)" if self.system else ""))
        else:
            self.say(f"unknown command /{name}: /help lists the commands")
        return True

    def say(self, text: str) -> None:
        print(f"{DIM}{text}{RESET}" if self.color else text, file=self.out, flush=True)

    def ask(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self.llm.render_chat(self.messages(), enable_thinking=THINKING_MODES.get(self.thinking))
            reply = _stream_reply(self.llm, prompt, self.params, self.out, self.color, self.lora_request)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            self.turns.pop()
            self.failed = True
            print(f"pangu-infer chat: error: {e}", file=sys.stderr, flush=True)
            return
        if reply.error is not None:  # it ended early (an engine fault: the log has the traceback); the session goes on
            self.turns.pop()
            self.failed = True
            print(f"pangu-infer chat: error: the reply ended early: {reply.error}", file=sys.stderr, flush=True)
            return
        if reply.answer:  # a stopped reply stays in the conversation as far as it got
            self.turns.append({"role": "assistant", "content": reply.answer})
        if reply.stopped:
            self.say("[stopped]")
        if self.stats:
            from pangu_infer.engine.spec_decode import acceptance_words

            self.say(f"[{reply.tokens} tokens, {reply.tokens / max(reply.seconds, 1e-9):.1f} tokens/s{acceptance_words(self.llm.engine)}]")


def run_chat(llm, args: argparse.Namespace, params: SamplingParams, out: Optional[TextIO] = None) -> int:
    """Answer --message arguments, or read messages from stdin until /exit, Ctrl-D or end of input."""
    out = out or sys.stdout
    session = ChatSession(
        llm, params, system=args.system, thinking=args.thinking, out=out, stats=args.stats,
        lora_request=getattr(args, "lora_request", None),
    )
    if args.message:
        for text in args.message:
            if not session.handle(text):
                break
        return 1 if session.failed else 0
    with LineReader() as reader:
        if reader.interactive:
            name = os.path.basename(llm.loaded.source) or "the model"
            session.say(f"chatting with {name}: /help for commands, Ctrl-C stops a reply, Ctrl-D or /bye ends the chat")
        while True:
            try:
                message = reader.read_message()
            except EOFError:
                break
            if message is not None and not session.handle(*message):
                break
    return 1 if session.failed and not reader.interactive else 0


class _CtrlC:
    """While a reply streams, the first Ctrl-C asks it to stop (seen between engine steps, so the
    engine is never interrupted inside a step); a second one raises KeyboardInterrupt and quits."""

    def __enter__(self) -> "_CtrlC":
        self.requested = False
        self.installed = threading.current_thread() is threading.main_thread()  # signals go to the main thread
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


def _stream_reply(llm, prompt: str, params: SamplingParams, out: TextIO, color: bool, lora_request=None) -> Reply:
    """One reply streamed to `out`; the compile thread's progress lines wait until it has ended
    (with its newline), instead of landing in its middle."""
    from pangu_infer.engine.compiled import lines_held

    with lines_held():
        return _write_reply(llm, prompt, params, out, color, lora_request)


def _write_reply(llm, prompt: str, params: SamplingParams, out: TextIO, color: bool, lora_request=None) -> Reply:
    parser = ChatStreamParser()
    answer, reasoning = [], []
    in_reasoning = stopped = False
    failed = None
    n_tokens = 0
    start = time.perf_counter()
    request = {"prompt_token_ids": llm.encode_prompt(prompt), "prompt": prompt}
    # closing the stream aborts the request in the engine and frees its KV blocks
    with _CtrlC() as ctrl_c, contextlib.closing(llm.stream(request, params, lora_request=lora_request)) as steps:
        for step in steps:
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
            if ctrl_c.requested:
                stopped = True
                break
            failed = step.error or failed
    if in_reasoning and color:
        print(RESET, end="", file=out)
    print(file=out, flush=True)
    return Reply("".join(answer), "".join(reasoning), n_tokens, time.perf_counter() - start, stopped, failed)
