"""What a person types into `pangu-infer chat`, one message at a time.

At a terminal, lines are edited with readline, and each message (a multi-line one whole) goes into
a history that the up arrow recalls, kept across sessions in a history file. From a pipe, lines are
read as they come. A message spans several lines when it opens with \"\"\" (it ends at a line ending
in \"\"\", as in `ollama run`) or when a line ends with a backslash (the next line continues it).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, TextIO

PROMPT, CONTINUATION = ">>> ", "... "
HISTORY_LENGTH = 1000
BLOCK_QUOTES = '"""'
# A block may follow a /command, as in `/system """` (its text then becomes the argument).
_BLOCK_START = re.compile(r'(\s*/[A-Za-z?][\w-]*\s+)?"""(.*)', re.S)


def history_path() -> Path:
    """~/.cache/pangu-infer/chat_history (or under $XDG_CACHE_HOME)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pangu-infer" / "chat_history"


class LineReader:
    """Reads messages from stdin; as a context manager it saves the history when the chat ends."""

    def __init__(self, history: Optional[Path] = None):
        self.interactive = sys.stdin.isatty()
        self.history = history or history_path()
        self.readline = None
        self._typed: list[str] = []  # the lines of the message being read, as typed
        if self.interactive:
            try:
                import readline  # line editing for input(); absent on plain Windows Pythons
            except ImportError:
                readline = None
            self.readline = readline
        if self.readline is not None:
            self.readline.set_auto_history(False)  # whole messages are added, not their lines
            self._load_history()

    def __enter__(self) -> "LineReader":
        return self

    def __exit__(self, *exc) -> None:
        if self.readline is not None:
            self._save_history()

    def read_message(self) -> Optional[tuple[str, bool]]:
        """The next message and whether it is literal text (a bare \"\"\" block is never a command).

        None when there is nothing to send: an empty line, or Ctrl-C threw away what was typed.
        Raises EOFError when the chat should end: Ctrl-D or end of input, or Ctrl-C at an empty prompt.
        """
        self._typed = []
        try:
            line = self._line(PROMPT)
        except KeyboardInterrupt:
            typed = self.readline.get_line_buffer() if self.readline is not None else ""
            print()
            if typed.strip():
                return None  # like a shell: Ctrl-C drops the line being typed
            raise EOFError from None
        try:
            block = _BLOCK_START.fullmatch(line)
            if block:
                command = block.group(1) or ""
                text, literal = command + self._block(block.group(2)), not command
            else:
                # a line with newlines in it (pasted, or a message recalled with the up arrow) is one message
                parts = [line.replace("\\\n", "\n")]
                while parts[-1].endswith("\\"):
                    parts[-1] = parts[-1][:-1]
                    parts.append(self._line(CONTINUATION))
                text, literal = "\n".join(parts), False
        except KeyboardInterrupt:
            print()
            return None  # Ctrl-C in a multi-line message drops the message, not the chat
        if not text.strip():
            return None
        if self.readline is not None:
            self.readline.add_history("\n".join(self._typed))
        return text, literal

    def _block(self, first: str) -> str:
        lines = [first]
        while not lines[-1].rstrip().endswith(BLOCK_QUOTES):
            try:
                lines.append(self._line(CONTINUATION))
            except EOFError:
                print(f"pangu-infer chat: the input ended inside a {BLOCK_QUOTES} block; it was not sent", file=sys.stderr)
                raise
        lines[-1] = lines[-1].rstrip()[: -len(BLOCK_QUOTES)]
        return "\n".join(lines).strip("\n")

    def _line(self, prompt: str) -> str:
        if self.interactive:
            try:
                line = input(prompt)
            except EOFError:
                print()  # Ctrl-D leaves the cursor after the prompt
                raise
        else:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            line = line.rstrip("\r\n")
        self._typed.append(line)
        return line

    # The file holds one JSON string per entry, so multi-line messages come back whole.
    def _load_history(self) -> None:
        try:
            lines = self.history.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            print(f"pangu-infer chat: cannot read the history file {self.history}: {e}", file=sys.stderr)
            return
        for line in lines[-HISTORY_LENGTH:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = line  # a line written by hand
            if isinstance(entry, str) and entry:
                self.readline.add_history(entry)

    def _save_history(self) -> None:
        count = self.readline.get_current_history_length()
        entries = [self.readline.get_history_item(i) for i in range(max(1, count - HISTORY_LENGTH + 1), count + 1)]
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.history.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries if e), encoding="utf-8")
        except OSError as e:
            print(f"pangu-infer chat: cannot save the history file {self.history}: {e}", file=sys.stderr)
