"""Text <-> token ids for Pangu (SentencePiece) and Llama-family (HF `tokenizers`) models.

    tok = load_tokenizer("/models/openpangu-embedded-7b")
    ids = tok.encode(tok.apply_chat_template(messages))
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    for new_ids in stream: print(detok.step(new_ids), end="")

Two backends sit behind one `Tokenizer`:

* SentencePiece (`tokenizer.model` + `tokenizer_config.json`), following the released slow
  tokenizer (`legacy: true`): the text is first split on the added tokens, then every plain
  fragment is encoded by SentencePiece on its own.
* HF `tokenizers` (`tokenizer.json`, or a `tokenizers.Tokenizer` built by the GGUF loader), which
  splits on its own added tokens and runs its own decoder chain.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import sentencepiece
import tokenizers

if TYPE_CHECKING:
    import jinja2

__all__ = ["Tokenizer", "IncrementalDetokenizer", "load_tokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class _AddedToken:
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_ids: frozenset[int]) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...

    def token_to_id(self, text: str) -> int | None: ...


def _with_pieces(ids: list[int], vocab_size: int) -> list[int]:
    """The ids that have a piece. An id past the tokenizer's pieces has none, and is dropped: the
    model's vocabulary may be wider than its tokenizer's (an embedding padded to a multiple of 64 or
    128, as many HF checkpoints are), and a sampled padding id decodes as empty text, as a
    transformers tokenizer decodes it, instead of failing its request. A negative id is an error."""
    if all(0 <= i < vocab_size for i in ids):
        return ids
    bad = next((i for i in ids if i < 0), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab_size})")
    return [i for i in ids if i < vocab_size]


class _SentencePieceBackend:
    """Slow-tokenizer semantics over a SentencePiece model plus the added tokens of tokenizer_config.json."""

    def __init__(self, sp: sentencepiece.SentencePieceProcessor, added: dict[int, _AddedToken]) -> None:
        self.sp = sp
        self.added = added
        self.added_by_text = {tok.content: i for i, tok in added.items()}
        self.vocab_size = max([sp.get_piece_size(), *(i + 1 for i in added)])
        # Longest first, so that "[unused10]" wins over a hypothetical "[unused1]" at the same position.
        alternatives = sorted(self.added_by_text, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        # Decoding is done here from per-piece bytes rather than by sp.decode, so that decoding any
        # window of ids is a prefix-consistent function (IncrementalDetokenizer relies on it).
        self._piece_bytes: list[bytes] = []
        self._word_start: list[bool] = []  # a normal piece that begins with "▁"
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            word_start = False
            if sp.is_byte(i):
                data = bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
            elif sp.is_control(i):
                data = b""
            elif sp.is_unknown(i):
                data = " \u2047 ".encode()  # the surface SentencePiece itself gives an unknown piece
            else:
                data = piece.replace("\u2581", " ").encode()
                word_start = piece.startswith("\u2581")
            self._piece_bytes.append(data)
            self._word_start.append(word_start)
        # Models with a dummy prefix drop the first piece's leading space on decode; ask sp which kind this is.
        probe = next((i for i, starts in enumerate(self._word_start) if starts), None)
        self._drops_first_space = probe is not None and not sp.decode([probe]).startswith(" ")

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        parts = self._split.split(text)  # plain, added, plain, added, ..., plain
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2 == 1:
                ids.append(self.added_by_text[part])
                continue
            # Honour lstrip/rstrip of the neighbouring added tokens, as the HF slow tokenizer does.
            if k > 0 and self.added[self.added_by_text[parts[k - 1]]].rstrip:
                part = part.lstrip()
            if k + 1 < len(parts) and self.added[self.added_by_text[parts[k + 1]]].lstrip:
                part = part.rstrip()
            if part:
                # Each fragment is encoded on its own and so gets its own dummy-prefix "▁", even right
                # after a special token: that is what the released slow tokenizer (LlamaTokenizer-style,
                # legacy=true) does -- it calls sp_model.encode(fragment) per fragment -- and what
                # llama.cpp does for this model, so it is the text the model was trained on.
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_ids: frozenset[int]) -> str:
        out: list[str] = []
        segment: list[int] = []
        for i in _with_pieces(ids, self.vocab_size):
            added = self.added.get(i)
            if added is None:
                segment.append(i)
                continue
            out.append(self._decode_segment(segment))
            segment = []
            if i not in skip_ids:
                out.append(added.content)
        out.append(self._decode_segment(segment))
        return "".join(out)

    def _decode_segment(self, segment: list[int]) -> str:
        if not segment:
            return ""
        segment = _with_pieces(segment, len(self._piece_bytes))  # (an id between the pieces and an added token)
        if not segment:
            return ""
        data = b"".join(self._piece_bytes[i] for i in segment)
        # Each fragment was encoded with its own dummy prefix, so each one loses exactly one leading
        # space on the way back -- the same rule as sp.decode, applied per fragment.
        if self._drops_first_space and self._word_start[segment[0]]:
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id].content
        if not _with_pieces([token_id], self.sp.get_piece_size()):
            return ""
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, text: str) -> int | None:
        if text in self.added_by_text:
            return self.added_by_text[text]
        token_id = self.sp.piece_to_id(text)
        # piece_to_id answers the unknown id for any string it does not know.
        return token_id if self.sp.id_to_piece(token_id) == text else None


class _HFTokenizersBackend:
    """A `tokenizers.Tokenizer`: it splits on its own added tokens and owns its decoder chain."""

    def __init__(self, tk: tokenizers.Tokenizer) -> None:
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # bos is added by Tokenizer.encode, not by the post-processor, so both backends behave alike.
        # encode_batch, not encode: it lets go of the GIL while it works (encode holds it nearly
        # throughout, so a prompt of 8 MB starved the engine thread: streams stalled for 11 s), and
        # it is as fast on short texts.
        return self.tk.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_ids: frozenset[int]) -> str:
        return self.tk.decode([i for i in _with_pieces(ids, self.vocab_size) if i not in skip_ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        if not _with_pieces([token_id], self.vocab_size):
            return ""
        token = self.tk.id_to_token(token_id)
        return "" if token is None else token

    def token_to_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)


def lone_surrogate_at(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in `text` (None: it is valid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class Tokenizer:
    """Encode, decode and chat-template rendering for one model; build it with `load_tokenizer`."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        special_token_ids: set[int],
        name: str,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.name = name
        self._special_ids = frozenset(special_token_ids) | {
            i for i in (bos_token_id, eos_token_id, pad_token_id) if i is not None
        }
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = backend.id_to_token(eos_token_id) if eos_token_id is not None else None

    @classmethod
    def from_tokenizers(
        cls,
        tk: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        add_bos: bool,
        chat_template: str | None,
        special_token_ids: set[int],
        name: str = "<tokenizers.Tokenizer>",
    ) -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer` (e.g. one the GGUF loader built from vocab and merges).

        `tk` must already know its added/special tokens (`tk.add_special_tokens`), since it does the
        splitting on them; `special_token_ids` are the ids `decode(skip_special_tokens=True)` drops.
        """
        return cls(
            _HFTokenizersBackend(tk),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            add_bos=add_bos,
            chat_template=chat_template,
            special_token_ids=set(special_token_ids),
            name=name,
        )

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def all_special_ids(self) -> set[int]:
        return set(self._special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, bos first when the model wants it (never eos).
        ValueError for a text holding a lone UTF-16 surrogate (a str Python builds from the JSON
        escape "\\ud800"), which neither backend can read: SentencePiece raised a RuntimeError
        about a C++ cast, tokenizers a TypeError."""
        try:
            ids = self._backend.encode(text)
        except (RuntimeError, TypeError):
            at = lone_surrogate_at(text) if isinstance(text, str) else None
            if at is None:
                raise
            raise ValueError(f"the text holds a lone UTF-16 surrogate at character {at} ({text[at]!a}), which is not valid Unicode") from None
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped or, with `skip_special_tokens=False`, kept as text."""
        return self._backend.decode([int(i) for i in ids], self._special_ids if skip_special_tokens else frozenset())

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, text: str) -> int | None:
        """Id of one vocabulary entry or added token such as "[unused16]"; None if there is none."""
        return self._backend.token_to_id(text)

    def grammar_vocab(self) -> tuple[str, Any]:
        """What a grammar engine needs to know each token's bytes.

        ("bytes", [bytes per id]) for SentencePiece models: the exact bytes each piece decodes to
        ("\u2581" as a space, byte pieces as their byte, control pieces empty, added tokens as their
        text); ("tokenizers", tokenizers.Tokenizer) for HF tokenizers, whose decoder says how to read
        the vocabulary (byte-level BPE, byte fallback).
        """
        backend = self._backend
        if isinstance(backend, _SentencePieceBackend):
            vocab = list(backend._piece_bytes) + [b""] * (backend.vocab_size - len(backend._piece_bytes))
            not_text = {self.bos_token_id, self.eos_token_id, self.pad_token_id, backend.sp.unk_id()}
            for i, added in backend.added.items():
                # markers such as [unused17] are text to a grammar (the chat parsers read them as text)
                vocab[i] = b"" if i in not_text else added.content.encode()
            return "bytes", vocab
        return "tokenizers", backend.tk

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the model's Jinja chat template (or `chat_template`, a template given for this
        call) the way transformers' apply_chat_template does."""
        template = self.chat_template if chat_template is None else chat_template
        if template is None:
            raise ValueError(
                f"tokenizer {self.name} has no chat_template, so it cannot render chat messages "
                "(give one with --chat-template, as vLLM takes it)"
            )
        # A template that fails while rendering (its raise_exception, an error in its code such as
        # {{ 1/0 }}, a limit of the sandbox below) fails on what this call gave it: a ChatTemplateError
        # (a ValueError) saying where and why, never another exception.
        whose = "chat_template" if chat_template is not None else f"chat template of tokenizer {self.name}"
        inputs = {"messages": messages, "tools": tools, **kwargs}
        budget = _TemplateBudget(
            chars=TEMPLATE_CHARS + TEMPLATE_INPUT_FACTOR * _text_size(inputs),
            ops=TEMPLATE_OPS + TEMPLATE_OPS_PER_ITEM * (len(messages) + len(tools or ())),
            seconds=TEMPLATE_SECONDS,
        )
        token = _BUDGET.set(budget)
        try:
            return _compile_chat_template(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except Exception as e:
            raise ChatTemplateError(f"{whose} failed{_template_line(e)}: {_template_error_text(e)}") from None
        finally:
            _BUDGET.reset(token)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


class ChatTemplateError(ValueError):
    """A chat template that failed while rendering: its own raise_exception (a template refusing
    the messages, e.g. roles out of order), an error in its code ({{ 1/0 }}), or a limit on what a
    template may make and run (TEMPLATE_CHARS, TEMPLATE_OPS, TEMPLATE_SECONDS)."""


def _raise_template_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    _budget().check(16 * len(fmt))  # (%c writes 24 characters for 2)
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes, which would change prompts; transformers overrides it the same way.
    if indent is None and separators is None:
        budget = _budget()
        budget.check(_text_size(value, budget.chars_left))
        return json.dumps(value, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    # an indent or separators repeat on every line or item: written piece by piece within the budget
    # (an indent of at most 64 characters: a line's indent is made whole, as deep as the value nests)
    budget = _budget()
    if (indent if isinstance(indent, int) else len(str(indent or ""))) > 64:
        raise _limit("may indent tojson by at most 64 characters")
    pieces = []
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for piece in encoder.iterencode(value):
        budget.charge(len(piece))
        pieces.append(piece)
    return "".join(pieces)


def load_chat_template(value: str) -> str:
    """--chat-template / LLM(chat_template=...): a Jinja file's path, or the template itself (as
    vLLM takes it); a ValueError naming it when it is neither, or when Jinja cannot parse it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template={value!r} must be a Jinja template or the path of a file holding one")
    path = Path(os.path.expanduser(value))
    try:
        is_file = "\n" not in value and path.is_file()
    except OSError:  # a long template is no file name
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"chat template file {value!r} cannot be read: {e}") from None
        check_chat_template(text, f"file {value!r}")
        return text
    if not any(c in value for c in "{}\n"):
        raise ValueError(f"chat template {value!r}: no such file (a template itself holds Jinja tags such as {{{{ ... }}}})")
    check_chat_template(value, "given")
    return value


def check_chat_template(source: str, name: str = "given", max_chars: int | None = None) -> None:
    """A ValueError with Jinja's message and line when `source` is no valid template (or, with
    `max_chars`, a longer one)."""
    import jinja2

    if max_chars is not None and len(source) > max_chars:
        raise ValueError(f"chat template {name} has {len(source)} characters; at most {max_chars}")
    try:
        _compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {name} is not valid Jinja: {e.message} (line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"chat template {name} nests too deeply to compile") from None


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> "jinja2.Template":
    import jinja2.ext

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], finalize=_written)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["lipsum"] = _lipsum
    return env.from_string(source)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (Jinja's names)
    from jinja2.utils import generate_lorem_ipsum

    _budget().check(12 * n * max if isinstance(n, int) and isinstance(max, int) else None)
    return generate_lorem_ipsum(n, html, min, max)


# ---------------------------------------------------------------------- what a template may make and run
# Jinja's sandbox keeps a template from Python's internals, not from spending the server's memory and
# time: {{ 'x' * 10**10 }} got a test server OOM-killed, and nested loops or a macro calling itself
# twice run for hours. Each render has a budget, checked by the sandbox's hooks below:
# - characters made: by * + % ~ on text and lists, slices, str methods, filters, padding ({:>N},
#   center, ...), the output of every block: at most TEMPLATE_CHARS plus TEMPLATE_INPUT_FACTOR x the characters
#   of the messages, tools and variables it was given (a list's item counts _ITEM_COST); amplifiers
#   are checked before they run;
# - steps: loop iterations, calls (macros, methods, functions) and filters: TEMPLATE_OPS plus
#   TEMPLATE_OPS_PER_ITEM per message and tool;
# - time: TEMPLATE_SECONDS, checked at each step (for what no step counts, e.g. `in` over a long list);
# - integers: at most TEMPLATE_INT_BITS bits from * and **.
# Real templates (Pangu's, Llama 3's, Qwen's, ChatML) stay far inside: a few characters per input
# character, a few steps per message.
TEMPLATE_CHARS = 16 << 20
TEMPLATE_INPUT_FACTOR = 8
TEMPLATE_OPS = 100_000
TEMPLATE_OPS_PER_ITEM = 100
TEMPLATE_SECONDS = 10.0
TEMPLATE_INT_BITS = 1 << 16
_ITEM_COST = 64  # a new list's item, as characters (a pointer and a small object)
_POINTER = 8  # an item of a list made of other lists' items (+, *)
_BUDGET: contextvars.ContextVar["_TemplateBudget | None"] = contextvars.ContextVar("pangu_infer_template_budget", default=None)


class _TemplateBudget:
    def __init__(self, chars: int, ops: int, seconds: float):
        self.chars = self.chars_left = chars
        self.ops = self.ops_left = ops
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def step(self) -> None:
        self.ops_left -= 1
        if self.ops_left < 0:
            raise _limit(f"ran more than {self.ops:,} steps (loop iterations, calls and filters)")
        if time.monotonic() > self.deadline:
            raise _limit(f"ran for more than {self.seconds:g} s")

    def check(self, size: Any) -> None:
        """Before something of `size` characters is made (charged once made)."""
        if not isinstance(size, int) or size > self.chars_left:
            raise _limit(f"would make more than {self.chars:,} characters (text repeated, joined, padded or written)")

    def charge(self, size: int) -> None:
        self.check(size)
        self.chars_left -= size


def _budget() -> _TemplateBudget:
    """This render's budget (a fresh one outside apply_chat_template)."""
    budget = _BUDGET.get()
    return budget if budget is not None else _TemplateBudget(TEMPLATE_CHARS, TEMPLATE_OPS, TEMPLATE_SECONDS)


def _limit(message: str) -> Exception:
    from jinja2.sandbox import SecurityError

    return SecurityError(f"the template {message}")


def _cost(value: Any) -> int:
    """What making `value` cost, in characters: its length; a list's items, and the text of those
    that are strings (split's pieces are new)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return _ITEM_COST * len(value) + sum(len(v) for v in value if isinstance(v, str))
    if isinstance(value, (dict, set, frozenset)):
        return _ITEM_COST * len(value)
    return 0


def _made(seq: Any) -> int:
    """What repeating or adding `seq` makes: its text, or a list's references (its items are shared)."""
    return len(seq) if isinstance(seq, str) else _POINTER * len(seq)


def _text_size(value: Any, limit: float = float("inf")) -> int:
    """About how many characters `value` writes as text (its strings, plus a little per item and
    number); counting stops past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += 4 * len(v) + 2
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 * len(v) + 2
            stack.extend(v)
        elif isinstance(v, bytes):
            total += 4 * len(v)
        elif isinstance(v, int) and v.bit_length() > 64:
            total += v.bit_length() // 3
        else:
            total += 24
    return total


_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _printf_size(fmt: str, args: Any, limit: int) -> int:
    """At most how many characters `fmt % args` writes: widths and precisions, and every value each
    conversion names (one mapping value may be named many times)."""
    mapping = args if isinstance(args, dict) and "%(" in fmt else None
    positional = iter(args if isinstance(args, tuple) else () if mapping is not None else (args,))
    size = len(fmt)
    for key, width, precision, conversion in _PRINTF.findall(fmt):
        if conversion == "%":
            continue
        for number in (width, precision):
            if number == "*":
                number = next(positional, 0)
                size += number if isinstance(number, int) and number > 0 else 0
            elif number:
                size += int(number) if len(number) < 10 else limit + 1
        value = mapping.get(key) if mapping is not None else next(positional, None)
        size += _text_size(value, limit)
        if size > limit:
            break
    return size


def _str_method_check(budget: _TemplateBudget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Before a str method that may write much more than its string runs (padding, replace, join,
    translate, expandtabs, split): its result's size checked; the args to call it with."""
    s, name = method.__self__, method.__name__

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        budget.check(max(len(s), arg(0, "width", 0)) if isinstance(arg(0, "width", 0), int) else 0)
    elif name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        budget.check(len(s) + s.count("\t") * max(tabsize, 0) if isinstance(tabsize, int) else 0)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new, count = args[0], args[1], arg(2, "count", -1)
        occurrences = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            occurrences = min(occurrences, count)
        budget.check(len(s) + occurrences * max(len(new) - len(old), 0))
    elif name == "join" and args:
        items = list(args[0])
        budget.check(_text_size(items, budget.chars_left) + len(s) * max(len(items) - 1, 0))
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.check(len(s) * max(longest, 1))
    elif name in ("split", "rsplit", "splitlines"):
        if name == "splitlines":
            pieces = s.count("\n") + s.count("\r") + 1
        else:
            sep, maxsplit = arg(0, "sep"), arg(1, "maxsplit", -1)
            pieces = s.count(sep) + 1 if isinstance(sep, str) and sep else sum(map(s.count, " \t\n\r\x0b\x0c")) + 1
            if isinstance(maxsplit, int) and maxsplit >= 0:
                pieces = min(pieces, maxsplit + 1)
        budget.check(len(s) + _ITEM_COST * pieces)
    return args


# filters that write their value as text first, whatever it is
_STRINGIFYING_FILTERS = frozenset({
    "string", "e", "escape", "forceescape", "upper", "lower", "title", "capitalize", "trim", "striptags",
    "urlencode", "wordcount", "truncate", "wordwrap", "center", "indent", "replace", "urlize", "format", "safe",
})


def _filter_check(name: str, budget: _TemplateBudget, a: tuple, kw: dict) -> tuple:
    """Before a filter that may write much more than it is given runs: its result's size checked;
    the args to call it with (`a` without the context Jinja passes some filters)."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return a[i] if len(a) > i else kw.get(key, default)

    if not a:
        return a
    value = a[0]
    if name in _STRINGIFYING_FILTERS and not isinstance(value, str):
        budget.check(6 * _text_size(value, budget.chars_left))  # (escape writes up to 5 characters for 1)
    if name == "center":
        width = arg(1, "width", 80)
        budget.check(max(len(str(value)), width) if isinstance(width, int) else 0)
    elif name == "indent":
        width = arg(1, "width", 4)
        text = str(value)
        budget.check(len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))))
    elif name == "format":
        budget.check(_printf_size(str(value), kw or tuple(a[1:]), budget.chars_left))
    elif name == "join":
        items = list(value)
        budget.check(_text_size(items, budget.chars_left) + len(str(arg(1, "d", ""))) * len(items))
        a = (items, *a[1:])
    elif name == "replace" and len(a) >= 3:
        text, old, new, count = str(value), str(a[1]), str(a[2]), arg(3, "count")
        occurrences = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            occurrences = min(occurrences, count)
        budget.check(len(text) + occurrences * max(len(new) - len(old), 0))
    elif name == "wordwrap":
        text = str(value)
        budget.check(len(text) + (len(text) + 1) * len(str(arg(4, "wrapstring", "\n") or "\n")))
    elif name == "batch" and arg(2, "fill_with") is not None:
        budget.check(_ITEM_COST * _number(arg(1, "linecount", 0)))
    elif name == "slice":
        budget.check(_ITEM_COST * _number(arg(1, "slices", 0)))
    elif name == "sum" and isinstance(arg(2, "start", 0), (list, tuple)):
        items = list(value)
        budget.check(sum(_cost(i) for i in items))
        a = (items, *a[1:])
    elif name == "list" and isinstance(value, str):
        budget.check(_ITEM_COST * len(value))
    elif name == "pprint":
        if _text_size(value, 4096) > 4096:
            raise _limit("may pprint only values of at most 4096 characters")
    elif name == "urlize":
        text = str(value)
        extra = len(str(arg(3, "target", "") or "")) + len(str(arg(4, "rel", "") or "")) + 64
        budget.check(3 * len(text) + (len(text) // 4 + 1) * extra)
    return a


def _number(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _bounded_filter(name: str, f: Any) -> Any:
    """Jinja's filter `f`, checked against the render's budget (a step, and what it writes)."""
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context / environment Jinja passes first

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        args = (*args[:skip], *_filter_check(name, budget, args[skip:], kwargs))
        result = f(*args, **kwargs)
        budget.charge(_cost(result))
        return result

    return bounded


class _Counted:
    """A for loop's iterable: each iteration a step."""

    __slots__ = ("items",)

    def __init__(self, items: Any):
        self.items = items

    def __iter__(self) -> Any:
        budget = _budget()
        for item in self.items:
            budget.step()
            yield item

    def __len__(self) -> int:
        return len(self.items)


def _counted(items: Any) -> _Counted:
    return _Counted(items)


def _sliced(value: Any, start: Any, stop: Any, step: Any) -> Any:
    return value[start:stop:step]


def _joined(*parts: Any) -> str:
    """`a ~ b ~ ...`: Jinja's own str_join, its size checked before it is made."""
    budget = _budget()
    budget.check(sum(_text_size(p, budget.chars_left) for p in parts))
    return "".join(map(str, parts))


def _written(value: Any) -> Any:
    """Jinja's finalize, for each {{ value }} before it becomes text: a list written as text may be
    far longer than what it cost ([big] * 100 is 100 references to one string)."""
    if not isinstance(value, str):
        budget = _budget()
        budget.check(_text_size(value, budget.chars_left))
    return value


def _template_line(error: BaseException) -> str:
    """ " at line N" of the template where `error` was raised (Jinja rewrites its traceback so)."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line else ""


def _template_error_text(error: BaseException) -> str:
    import jinja2

    text = str(error) if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


@functools.lru_cache(maxsize=None)
def _sandbox_class() -> type:
    """Jinja's ImmutableSandboxedEnvironment, with the render budget's hooks (built on first use: a
    start that renders no chat template does not import Jinja)."""
    from functools import update_wrapper

    import jinja2.nodes as nodes
    from jinja2.runtime import Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from jinja2.visitor import NodeTransformer
    from markupsafe import Markup

    class BoundedFormatter(SandboxedFormatter):
        # str.format: every field's width and precision checked, its text charged, before the join
        def format_field(self, value: Any, format_spec: str) -> Any:
            budget = _budget()
            if not isinstance(value, str):
                budget.check(_text_size(value, budget.chars_left))
            for number in re.findall(r"\d+", format_spec):
                budget.check(int(number) if len(number) < 10 else None)
            text = super().format_field(value, format_spec)
            budget.charge(len(text))
            return text

    class BoundedEscapeFormatter(BoundedFormatter, SandboxedEscapeFormatter):
        pass

    def counted(node: Any) -> Any:
        return nodes.Call(nodes.ImportedName(f"{__name__}._counted"), [node], [], None, None, lineno=node.lineno)

    class Bounded(NodeTransformer):
        # every for loop's iterable counted (a recursive loop's loop(...) calls too); ~ and slices checked
        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = counted(node.iter)
            if node.recursive:
                for call in node.find_all(nodes.Call):
                    if isinstance(call.node, nodes.Name) and call.node.name == "loop" and call.args:
                        call.args[0] = counted(call.args[0])
            return node

        def visit_Getitem(self, node: Any) -> Any:
            # a slice is a copy (text[1:], messages[::-1]): made by _sliced, through the sandbox's call
            node = self.generic_visit(node)
            if not isinstance(node.arg, nodes.Slice):
                return node
            bounds = [b if b is not None else nodes.Const(None) for b in (node.arg.start, node.arg.stop, node.arg.step)]
            return nodes.Call(nodes.ImportedName(f"{__name__}._sliced"), [node.node, *bounds], [], None, None, lineno=node.lineno)

        def visit_Concat(self, node: Any) -> Any:
            node = self.generic_visit(node)
            return nodes.Call(nodes.ImportedName(f"{__name__}._joined"), node.nodes, [], None, None, lineno=node.lineno)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source: str, name: Any, filename: Any) -> Any:
            tree = Bounded().visit(super()._parse(source, name, filename))
            tree.set_environment(self)
            return tree

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            ints = isinstance(left, int) and isinstance(right, int)
            if ints and operator in ("*", "**"):
                bits = left.bit_length() + right.bit_length() if operator == "*" else right * max(left.bit_length(), 1)
                if bits > TEMPLATE_INT_BITS:
                    raise _limit(f"would make an integer of more than {TEMPLATE_INT_BITS} bits")
            elif operator == "*":
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(times, int) and isinstance(seq, (str, list, tuple)):
                    budget.charge(_made(seq) * max(times, 0))
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.charge(_made(left) + _made(right))
            elif operator == "%" and isinstance(left, str):
                budget.charge(_printf_size(left, right, budget.chars_left))
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's own names)
            budget = _budget()
            budget.step()
            if isinstance(getattr(__obj, "__self__", None), str):
                args = _str_method_check(budget, __obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            if not isinstance(__obj, Macro):  # (a macro's output was charged as it was joined)
                budget.charge(_cost(result))
            return result

        def concat(self, parts: Any) -> str:
            """A template's or a block's output, joined: each piece charged first."""
            budget = _budget()
            if isinstance(parts, list):
                budget.charge(sum(map(len, parts)))
                return "".join(parts)
            out = []
            for piece in parts:
                budget.charge(len(piece))
                out.append(piece)
            return "".join(out)

        def wrap_str_format(self, value: Any) -> Any:
            if super().wrap_str_format(value) is None:  # not a str's format / format_map
                return None
            fmt = value.__self__
            formatter = BoundedEscapeFormatter(self, escape=fmt.escape) if isinstance(fmt, Markup) else BoundedFormatter(self)
            is_format_map = value.__name__ == "format_map"

            def bounded_format(*args: Any, **kwargs: Any) -> str:
                if is_format_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument")
                    args, kwargs = (), args[0]
                return type(fmt)(formatter.vformat(fmt, args, kwargs))

            return update_wrapper(bounded_format, value)

    return BoundedSandbox


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    Each step decodes a small window (the ids emitted last step plus the new ones) and emits the
    part beyond the previous window's text. The window starts at an already emitted token, so
    leading-space rules apply to both decodes alike; text ending in U+FFFD (a character cut in the
    middle of its bytes) is held back until the next ids complete it. The deltas concatenate to
    `tok.decode(all_ids)`; call `flush()` at the end to also release genuinely broken bytes.

    `prompt_ids` (optional) give the window its context, as vLLM does: the first generated word
    then keeps its leading space (" Paris" after "The capital of France is").
    """

    PROMPT_CONTEXT = 6  # prompt ids kept as context: enough for any leading-space rule

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> None:
        if not isinstance(skip_special_tokens, bool):  # e.g. prompt ids passed in its place
            raise TypeError(f"skip_special_tokens must be a bool, got {type(skip_special_tokens).__name__}")
        self._tok = tok
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in list(prompt_ids)[-self.PROMPT_CONTEXT :]]
        self._prefix_offset = 0  # window start: first id of the last emitted step
        self._read_offset = len(self._ids)  # ids before this have been emitted

    def step(self, new_ids: Sequence[int]) -> str:
        """Add ids; return the text they complete (possibly empty)."""
        # Models may pad their vocabulary past the tokenizer's; such ids have no text.
        vocab = self._tok.vocab_size
        self._ids.extend(int(i) for i in new_ids if 0 <= int(i) < vocab)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any text still held back (a trailing U+FFFD from bytes no later id can complete)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = functools.partial(self._tok.decode, skip_special_tokens=self._skip_special_tokens)
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or not full_text.startswith(prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model folder: `tokenizer.model` (SentencePiece) or else `tokenizer.json`.

    A SentencePiece model wins when both exist, because the Pangu encoding rules are those of the
    slow SentencePiece tokenizer.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist or is not a folder")
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    chat_template = _chat_template_of(folder, config)
    if (folder / "tokenizer.model").is_file():
        return _load_sentencepiece(folder, config, special_map, chat_template)
    if (folder / "tokenizer.json").is_file():
        return _load_hf_tokenizers(folder, config, special_map, chat_template)
    raise FileNotFoundError(
        f"no tokenizer in {str(folder)!r}: expected tokenizer.model (SentencePiece) or tokenizer.json"
    )


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # (JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8)
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, not {type(value).__name__}")
    return value


def _bad_field(file: Path, field: str, value: Any, expected: str) -> ValueError:
    """A field of a tokenizer file that is not what a tokenizer folder holds there."""
    from pangu_infer.errors import short_repr

    return ValueError(f"{str(file)!r}: {field}={short_repr(value)} must be {expected}")


def _chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    # Newer transformers save the template as its own file next to the config.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        for i, t in enumerate(template):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("template"), str):
                raise _bad_field(folder / "tokenizer_config.json", f"chat_template[{i}]", t, "{'name': str, 'template': str}")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _token_text(value: Any, file: Path, field: str) -> str | None:
    # Special tokens appear either as plain strings or as AddedToken dicts with "content".
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise _bad_field(file, field, value, "a token's text (a string, or an object with a string 'content')")
    return text


def _special_token_text(name: str, config: dict[str, Any], special_map: dict[str, Any], folder: Path) -> str | None:
    return (_token_text(config.get(name), folder / "tokenizer_config.json", name)
            or _token_text(special_map.get(name), folder / "special_tokens_map.json", name))


def _added_tokens(folder: Path, config: dict[str, Any]) -> dict[int, _AddedToken]:
    """tokenizer_config.json's added_tokens_decoder: {"id": {"content": text, "special": ...}}."""
    file = folder / "tokenizer_config.json"
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise _bad_field(file, "added_tokens_decoder", decoder, "an object of token ids to tokens")
    added = {}
    for i, t in decoder.items():
        if not (isinstance(i, str) and i.isascii() and i.isdecimal()):
            raise ValueError(f"{str(file)!r}: added_tokens_decoder has the key {i!r}: expected a token id (digits)")
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise _bad_field(file, f"added_tokens_decoder[{i!r}]", t, "an object with the token's text as 'content'")
        added[int(i)] = _AddedToken(
            content=t["content"],
            special=bool(t.get("special", False)),
            lstrip=bool(t.get("lstrip", False)),
            rstrip=bool(t.get("rstrip", False)),
        )
    return added


def _load_sentencepiece(
    folder: Path, config: dict[str, Any], special_map: dict[str, Any], chat_template: str | None
) -> Tokenizer:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    except (RuntimeError, OSError) as e:  # (sentencepiece's error for a file it cannot parse)
        raise ValueError(f"{str(folder / 'tokenizer.model')!r} is not a SentencePiece model: {e}") from None
    added = _added_tokens(folder, config)
    # Special tokens named only by text (no added_tokens_decoder entry) are still split out whole.
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    named = [_special_token_text(n, config, special_map, folder) for n in names]
    where = folder / ("tokenizer_config.json" if "additional_special_tokens" in config else "special_tokens_map.json")
    additional = config.get("additional_special_tokens", special_map.get("additional_special_tokens", []))
    if not isinstance(additional, list):
        raise _bad_field(where, "additional_special_tokens", additional, "a list of tokens")
    known = {t.content for t in added.values()}
    for text in named + [_token_text(t, where, f"additional_special_tokens[{i}]") for i, t in enumerate(additional)]:
        if text and text not in known:
            token_id = sp.piece_to_id(text)
            if sp.id_to_piece(token_id) != text:
                raise ValueError(f"special token {text!r} of {str(folder)!r} is not in tokenizer.model")
            added[token_id] = _AddedToken(content=text, special=True)
            known.add(text)
    backend = _SentencePieceBackend(sp, added)
    bos, eos, _, pad = named
    return Tokenizer(
        backend,
        bos_token_id=_required_id(backend, folder, "bos_token", bos or "<s>"),
        eos_token_id=_required_id(backend, folder, "eos_token", eos or "</s>"),
        pad_token_id=_optional_id(backend, folder, "pad_token", pad),
        add_bos=bool(config.get("add_bos_token", True)),
        chat_template=chat_template,
        special_token_ids={i for i, t in added.items() if t.special},
        name=str(folder),
    )


def _load_hf_tokenizers(
    folder: Path, config: dict[str, Any], special_map: dict[str, Any], chat_template: str | None
) -> Tokenizer:
    try:
        tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises Exception itself for a file it cannot parse
        raise ValueError(f"{str(folder / 'tokenizer.json')!r} is not a tokenizers tokenizer file: {e}") from None
    backend = _HFTokenizersBackend(tk)
    bos_id = _optional_id(backend, folder, "bos_token", _special_token_text("bos_token", config, special_map, folder))
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        # Without the flag, HF fast tokenizers add bos exactly when the post-processor does.
        add_bos = bos_id is not None and bos_id in tk.encode("", add_special_tokens=True).ids
    return Tokenizer.from_tokenizers(
        tk,
        bos_token_id=bos_id,
        eos_token_id=_optional_id(backend, folder, "eos_token", _special_token_text("eos_token", config, special_map, folder)),
        pad_token_id=_optional_id(backend, folder, "pad_token", _special_token_text("pad_token", config, special_map, folder)),
        add_bos=add_bos,
        chat_template=chat_template,
        special_token_ids={i for i, t in tk.get_added_tokens_decoder().items() if t.special},
        name=str(folder),
    )


def _optional_id(backend: _Backend, folder: Path, name: str, text: str | None) -> int | None:
    if text is None:
        return None
    return _required_id(backend, folder, name, text)


def _required_id(backend: _Backend, folder: Path, name: str, text: str) -> int:
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{name} {text!r} of {str(folder)!r} is not in the tokenizer's vocabulary")
    return token_id
