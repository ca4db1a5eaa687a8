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

import datetime
import functools
import json
import os
import re
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
        for i in ids:
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
        try:
            data = b"".join(self._piece_bytes[i] for i in segment)
        except IndexError:
            bad = next(i for i in segment if not 0 <= i < len(self._piece_bytes))
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})") from None
        # Each fragment was encoded with its own dummy prefix, so each one loses exactly one leading
        # space on the way back -- the same rule as sp.decode, applied per fragment.
        if self._drops_first_space and self._word_start[segment[0]]:
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id].content
        if not 0 <= token_id < self.sp.get_piece_size():
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
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
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        return self.tk.decode([i for i in ids if i not in skip_ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        token = self.tk.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token

    def token_to_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)


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
        """Token ids of `text`; with `add_special_tokens`, bos first when the model wants it (never eos)."""
        ids = self._backend.encode(text)
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
        import jinja2  # here: a start that renders no chat template does not pay its import

        try:
            return _compile_chat_template(template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template of tokenizer {self.name} failed: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _raise_template_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes, which would change prompts; transformers overrides it the same way.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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


def check_chat_template(source: str, name: str = "given") -> None:
    """A ValueError with Jinja's message and line when `source` is no valid template."""
    import jinja2

    try:
        _compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {name} is not valid Jinja: {e.message} (line {e.lineno})") from None


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> "jinja2.Template":
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


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
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None


def _chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    # Newer transformers save the template as its own file next to the config.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _token_text(value: Any) -> str | None:
    # Special tokens appear either as plain strings or as AddedToken dicts with "content".
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_token_text(name: str, config: dict[str, Any], special_map: dict[str, Any]) -> str | None:
    return _token_text(config.get(name)) or _token_text(special_map.get(name))


def _load_sentencepiece(
    folder: Path, config: dict[str, Any], special_map: dict[str, Any], chat_template: str | None
) -> Tokenizer:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {
        int(i): _AddedToken(
            content=t["content"],
            special=bool(t.get("special", False)),
            lstrip=bool(t.get("lstrip", False)),
            rstrip=bool(t.get("rstrip", False)),
        )
        for i, t in config.get("added_tokens_decoder", {}).items()
    }
    # Special tokens named only by text (no added_tokens_decoder entry) are still split out whole.
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    named = [_special_token_text(n, config, special_map) for n in names]
    additional = config.get("additional_special_tokens", special_map.get("additional_special_tokens", []))
    known = {t.content for t in added.values()}
    for text in named + [_token_text(t) for t in additional]:
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
    tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend = _HFTokenizersBackend(tk)
    bos_id = _optional_id(backend, folder, "bos_token", _special_token_text("bos_token", config, special_map))
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:
        # Without the flag, HF fast tokenizers add bos exactly when the post-processor does.
        add_bos = bos_id is not None and bos_id in tk.encode("", add_special_tokens=True).ids
    return Tokenizer.from_tokenizers(
        tk,
        bos_token_id=bos_id,
        eos_token_id=_optional_id(backend, folder, "eos_token", _special_token_text("eos_token", config, special_map)),
        pad_token_id=_optional_id(backend, folder, "pad_token", _special_token_text("pad_token", config, special_map)),
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
