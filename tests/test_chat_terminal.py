"""`pangu-infer chat`: what the model is sent for what a person types, and typing it in a real terminal.

The first tests pipe a script into run_chat with the real tiny models and check, through the real
chat template, the prompts that reach the engine. The last one drives `python -m pangu_infer chat`
in a pseudo-terminal with pexpect, keys and all: readline history with the up arrow, Ctrl-C in a
reply, while typing and at an empty prompt, multi-line input, /help, /think, /system, unknown commands.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys

import pexpect
import pytest

from fixtures_server import SCRIPTED_ANSWER, SCRIPTED_REASONING
from pangu_infer import LLM, SamplingParams
from pangu_infer.chat import render_chat
from pangu_infer.chat_input import LineReader
from pangu_infer.chat_session import run_chat

LONG_REPLY_TOKENS = 1500  # the random model's greedy replies run this long unless stopped


class Recorder:
    """The real LLM; keeps each prompt text the chat sends, and can press Ctrl-C during a reply."""

    def __init__(self, llm: LLM, ctrl_c_after_steps: int | None = None, presses: int = 1):
        self.llm, self.ctrl_c_after_steps, self.presses = llm, ctrl_c_after_steps, presses
        self.prompts: list[str] = []
        self.steps_seen: list[int] = []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def stream(self, request, params, lora_request=None):
        self.prompts.append(request["prompt"])
        self.steps_seen.append(0)
        for step in self.llm.stream(request, params):
            self.steps_seen[-1] += 1
            if self.steps_seen[-1] == self.ctrl_c_after_steps:
                for _ in range(self.presses):
                    os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends the process on Ctrl-C
            yield step


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"message": None, "system": None, "thinking": None, "stats": False, **overrides})


def _chat(monkeypatch, llm, script: str, max_tokens: int = 20, **args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    out = io.StringIO()
    code = run_chat(llm, _args(**args), SamplingParams(temperature=0, max_tokens=max_tokens), out=out)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def thinker(thinking_dense_dir):
    return LLM(str(thinking_dense_dir), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def talker(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=16 << 20, enforce_eager=True)


def test_commands_and_multi_line_input_shape_the_conversation(monkeypatch, thinker, pangu_tokenizer):
    llm = Recorder(thinker)
    script = "\n".join([
        "/think off",
        "/system you are terse",
        '"""',
        "line one",
        'line two"""',
        "/frobnicate now",
        "/help",
        "first \\",
        "continued",
        "/think auto",
        '/system """be',
        'brief"""',
        "second",
        "/reset",
        '"""/help is a message here"""',
        "/usr/bin/env is a path",
        "/exit",
        "never read",
    ])
    code, out = _chat(monkeypatch, llm, script)
    assert code == 0
    assert "thinking: off" in out and "system prompt: you are terse" in out and "thinking: auto" in out
    assert "unknown command /frobnicate" in out and "/think on|off|auto" in out  # and /help printed the help
    answer = {"role": "assistant", "content": SCRIPTED_ANSWER}
    expected = [
        ([{"role": "system", "content": "you are terse"}, {"role": "user", "content": "line one\nline two"}], False),
        ([{"role": "system", "content": "you are terse"}, {"role": "user", "content": "line one\nline two"}, answer,
          {"role": "user", "content": "first \ncontinued"}], False),
        ([{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "line one\nline two"}, answer,
          {"role": "user", "content": "first \ncontinued"}, answer, {"role": "user", "content": "second"}], "auto"),
        ([{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "/help is a message here"}], "auto"),
        ([{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "/help is a message here"}, answer,
          {"role": "user", "content": "/usr/bin/env is a path"}], "auto"),
    ]
    assert len(llm.prompts) == len(expected)
    for prompt, (messages, thinking) in zip(llm.prompts, expected):
        assert prompt == render_chat(pangu_tokenizer, messages, enable_thinking=thinking)
    assert out.count(f"[thinking] {SCRIPTED_REASONING}") == len(expected)


def test_message_flags_run_commands_too(thinker, capsys):
    llm = Recorder(thinker)
    code = run_chat(llm, _args(message=["/think off", "hi", "/bye", "not asked"]), SamplingParams(temperature=0, max_tokens=20))
    assert code == 0
    assert len(llm.prompts) == 1 and llm.prompts[0].endswith("hi /no_think[unused10][unused9]助手：")
    assert SCRIPTED_ANSWER in capsys.readouterr().out


def test_ctrl_c_stops_the_reply_frees_the_engine_and_keeps_the_session(monkeypatch, talker):
    llm = Recorder(talker, ctrl_c_after_steps=4)
    code, out = _chat(monkeypatch, llm, "tell me a story\nand then?\n", max_tokens=LONG_REPLY_TOKENS)
    assert code == 0
    assert llm.steps_seen == [4, 4]  # both replies stopped at the Ctrl-C, far short of max_tokens
    assert out.count("[stopped]") == 2
    stats = talker.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0
    assert not talker.engine.has_unfinished_requests()
    # the stopped reply stays in the conversation as far as it got
    first_answer = out.split("\n")[0]
    assert first_answer and f"[unused9]助手：{first_answer}[unused10]" in llm.prompts[1]


def test_second_ctrl_c_in_one_reply_quits(monkeypatch, talker):
    llm = Recorder(talker, ctrl_c_after_steps=2, presses=2)
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt):
        _chat(monkeypatch, llm, "tell me a story\n", max_tokens=LONG_REPLY_TOKENS)
    assert llm.steps_seen == [2]
    assert signal.getsignal(signal.SIGINT) is before  # the chat's handler is gone again
    assert talker.engine.stats()["kv_blocks_used"] == 0


def test_a_conversation_too_long_for_the_context_is_an_error_not_the_end(monkeypatch, thinker, capsys):
    llm = Recorder(thinker)
    code, out = _chat(monkeypatch, llm, "word " * 3000 + "\nhello\n")
    err = capsys.readouterr().err
    assert "pangu-infer chat: error:" in err and "Traceback" not in err
    assert out.count(SCRIPTED_ANSWER) == 1 and llm.prompts[-1].count("word") == 0  # the long one left no trace
    assert code == 1  # piped input: the failure shows in the exit status


class Failing(Recorder):
    """The first reply fails inside the engine after two steps (an engine fault: RequestOutput.error)."""

    def stream(self, request, params, lora_request=None):
        from dataclasses import replace

        for i, step in enumerate(super().stream(request, params)):
            if len(self.prompts) == 1 and i == 1:
                outs = [replace(c, finish_reason="error") for c in step.outputs]
                yield replace(step, outputs=outs, finished=True, error="request 0 failed inside the engine")
                return
            yield step


def test_a_reply_that_fails_is_an_error_and_the_session_goes_on(monkeypatch, thinker, capsys):
    llm = Failing(thinker)
    code, out = _chat(monkeypatch, llm, "first\nsecond\n")
    err = capsys.readouterr().err
    assert "pangu-infer chat: error: the reply ended early: request 0 failed inside the engine" in err
    assert code == 1  # piped input: the failure shows in the exit status
    # the failed turn left no trace: the second prompt holds the second message alone
    assert len(llm.prompts) == 2 and "first" not in llm.prompts[1] and "second" in llm.prompts[1]
    assert out.count(SCRIPTED_ANSWER) == 1


class Announcing(Recorder):
    """Says a line mid-reply, as the compile thread does once the first step of a prompt given with
    the command is done (say(), on stderr)."""

    def stream(self, request, params, lora_request=None):
        from pangu_infer.engine.compiled import say

        for i, step in enumerate(super().stream(request, params)):
            if i == 2:
                say("compiling the decode step in the background")
            yield step


def test_the_compile_threads_line_follows_the_reply_instead_of_landing_inside_it(monkeypatch, talker):
    """stdout and stderr share the terminal: a line said mid-reply waits until the reply's newline."""
    shared = io.StringIO()  # the terminal both streams write to
    monkeypatch.setattr(sys, "stderr", shared)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code = run_chat(Announcing(talker), _args(), SamplingParams(temperature=0, max_tokens=8), out=shared)
    assert code == 0
    text = shared.getvalue()
    reply, _, after = text.partition("pangu-infer: compiling the decode step in the background\n")
    assert after is not None and reply.endswith("\n") and len(reply.strip()) > 0, text
    from pangu_infer.engine import compiled

    assert compiled._held is None  # nothing held once the reply is done


def test_generate_says_why_a_reply_ended_early(monkeypatch, tiny_dense_dir, capsys):
    from dataclasses import replace

    from pangu_infer.cli import main

    real = LLM.generate

    def failing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return [replace(o, error="request 0 failed inside the engine") for o in out]

    monkeypatch.setattr(LLM, "generate", failing)
    code = main(["generate", "--model", str(tiny_dense_dir), "--dtype", "float32", "--enforce-eager", "--prompt", "Hi",
                 "--max-tokens", "3", "--kv-cache-memory", "8MiB"])
    assert code == 1
    assert "pangu-infer generate: the reply ended early: request 0 failed inside the engine" in capsys.readouterr().err


def test_chat_with_stdin_closed_and_no_message_is_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    """`pangu-infer chat <&-` (Python's sys.stdin is then None) was an AttributeError's traceback
    ('NoneType' object has no attribute 'isatty') once the model had loaded."""
    from pangu_infer.cli import main

    monkeypatch.setattr(sys, "stdin", None)
    code = main(["chat", "--model", str(tmp_path / "not-loaded"), "--enforce-eager"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "pangu-infer chat: error: stdin is closed and no --message was given: nothing to answer"


@pytest.mark.parametrize("command", [["chat", "--message", "Hi"], ["generate", "--prompt", "Hi"]])
def test_a_closed_stdout_is_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys, command):
    """`pangu-infer chat --message Hi >&-` was an AttributeError's traceback ('NoneType' object has
    no attribute 'isatty'), generate's reply went nowhere and its exit flush was one too."""
    from pangu_infer.cli import main

    monkeypatch.setattr(sys, "stdout", None)
    code = main([*command, "--model", str(tmp_path / "not-loaded"), "--enforce-eager"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"pangu-infer {command[0]}: error: stdout is closed: nowhere to write the reply"


# ---------------------------------------------------------------------- in a real terminal
UP = "\x1b[A"
PTY_TIMEOUT_S = 90  # the chat loads torch and the model first; the steps below take well under a second each


def test_typing_in_a_terminal(tiny_dense_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "PANGU_API_KEY")}
    env.update(HOME=str(home), TERM="xterm", INPUTRC=os.devnull, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pangu_infer", "chat", "--model", str(tiny_dense_dir), "--dtype", "float32",
           "--temperature", "0", "--max-tokens", str(LONG_REPLY_TOKENS), "--kv-cache-memory", "16MiB", "--enforce-eager"]
    # Ctrl-C as in a terminal, even when this run was started where SIGINT is ignored (a background
    # job of a shell without job control): a process starting with SIGINT ignored keeps it ignored.
    chat = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", codec_errors="replace",
                         timeout=PTY_TIMEOUT_S, dimensions=(40, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def prompt() -> None:
            chat.expect_exact(">>> ")

        def type_line(text: str) -> None:
            chat.send(text + "\r")
            chat.expect_exact(text.split("\n")[-1])  # the terminal echoes it

        def reply_then_ctrl_c() -> str:
            chat.expect(r"\S{3}")  # the reply has started
            chat.sendintr()
            chat.expect_exact("[stopped]")
            streamed = chat.before
            prompt()
            return streamed

        chat.expect_exact("/help for commands")
        prompt()
        type_line("/help")
        chat.expect_exact("/think on|off|auto")
        prompt()
        type_line("/frobnicate")
        chat.expect_exact("unknown command /frobnicate")
        prompt()  # nothing was sent to the model: the prompt is straight back
        type_line("/think off")
        chat.expect_exact("thinking: off")
        prompt()
        type_line("/system be terse")
        chat.expect_exact("system prompt: be terse")
        prompt()

        type_line("tell me a story")
        first = reply_then_ctrl_c()
        assert first.strip()

        # the up arrow brings back the last line; Enter asks it again, and the engine still answers
        chat.send(UP)
        chat.expect_exact("tell me a story")
        chat.send("\r")
        reply_then_ctrl_c()

        # a multi-line message is one message: no reply until the block closes
        type_line('"""')
        chat.expect_exact("... ")
        type_line("line one")
        chat.expect_exact("... ")
        type_line('line two"""')
        reply_then_ctrl_c()
        chat.send(UP)  # comes back whole, and is again one message
        chat.expect_exact('line two"""')
        chat.send("\r")
        reply_then_ctrl_c()

        # Ctrl-C while typing throws the line away and keeps the chat; at an empty prompt it ends the chat
        chat.send("half a thought")
        chat.expect_exact("half a thought")  # readline echoes what it has read (unread input would be flushed)
        chat.sendintr()
        prompt()
        chat.sendintr()
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0, chat.before
    lines = (home / ".cache" / "pangu-infer" / "chat_history").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    assert history == ["/help", "/frobnicate", "/think off", "/system be terse", "tell me a story", "tell me a story",
                       '"""\nline one\nline two"""', '"""\nline one\nline two"""']


def test_history_file_keeps_multi_line_messages_whole_across_sessions(monkeypatch, tmp_path):
    readline = pytest.importorskip("readline")  # part of CPython on Linux and macOS
    path = tmp_path / "history"
    typed = iter(['"""', "one", 'two"""', "last \\", "line", "/bye"])

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    readline.clear_history()
    try:
        with LineReader(history=path) as reader:
            assert [reader.read_message() for _ in range(3)] == [("one\ntwo", True), ("last \nline", False), ("/bye", False)]
        readline.clear_history()
        recalled = iter(['"""\none\ntwo"""', "last \\\nline"])  # what the up arrow gives back: whole messages
        monkeypatch.setattr("builtins.input", lambda prompt: next(recalled))
        with LineReader(history=path) as reader:
            assert [readline.get_history_item(i) for i in (1, 2, 3)] == ['"""\none\ntwo"""', "last \\\nline", "/bye"]
            assert [reader.read_message() for _ in range(2)] == [("one\ntwo", True), ("last \nline", False)]
    finally:
        readline.clear_history()
