"""Structured outputs on xgrammar: grammars compiled once per model and cached, a matcher per sequence.

    grammars = GrammarCache(tokenizer, vocab_size, stop_token_ids)      # one per engine
    compiled = grammars.compile(params.structured_outputs)             # RequestError if invalid; LRU-cached
    state = StructuredState(compiled, markers, prompt_ids, params.max_reasoning_tokens)   # one per sequence
    state.fill_mask(bitmask, row) -> bool    # before sampling: the row's allowed tokens
    state.accept(token)                      # after sampling: advances the matcher

Reasoning-aware: on a model with Pangu's thinking markers ([unused16] / [unused17]) and with
`allow_thinking` (chat with thinking on), the first generated token may open a thinking part, or
the prompt may end inside one; the thinking part is not constrained, and the grammar starts with
the token after [unused17]. Without `allow_thinking` (plain completions, thinking off) the
constraint starts at the first generated token. A thinking budget (`max_reasoning_tokens`) counts
the tokens after [unused16]; once it is reached, [unused17] is the only token allowed, so the
engine writes it itself. On models without the markers only the constraint applies.

The masks are xgrammar's packed bitmasks (int32 [rows, ceil(V / 32)]), filled per constrained
row by its matcher in C++ and applied to the logits in one call (`apply_bitmask`), so requests
with and without constraints share a batch and no Python loop runs over the vocabulary.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from pangu_infer.errors import RequestError, short_repr
from pangu_infer.sampling_params import StructuredOutputsParams

THINK_START = "[unused16]"
THINK_END = "[unused17]"
DEFAULT_CACHE_ENTRIES = 256
# Compiled grammars kept, in xgrammar's own count (CompiledGrammar.memory_size_bytes): a typical
# schema takes 10 KB-1 MB, the largest the limits below let through ~30 MB on a 49k vocabulary
# (more on a larger one); 256 MiB holds hundreds of the first and several of the second, small
# beside a model's weights and KV cache. One grammar larger than this alone is refused.
DEFAULT_CACHE_BYTES = 256 << 20
FORCED_STEPS_CHECKED = 32  # tokens a grammar forces one by one, followed at compile time to see it can go on

# What a constraint may hold, checked before xgrammar compiles it (compiling cannot be stopped once
# begun, and it holds a core and memory meanwhile). Measured on SmolLM2's 49k vocabulary, 2 cores:
# a choice of 100,000 strings (1.5 MB) took 11-30 s and ~300 MB; 120,000 characters of literal text
# take ~0.7 s and ~27 MB; 2,000 optional properties in one object 35 s (750 MB while compiling),
# 500 of them 0.5 s; a JSON string pattern [a-z]{1,10000} 9 s, ([a-z]{1,100}[0-9]{1,100}){1,100} 14 s,
# .{0,2000} 1.6 s. OpenAI's own limits for a schema: 120,000 characters of property names, enum and
# const values, 1,000 enum values, 5,000 properties.
MAX_GRAMMAR_CHARS = 120_000  # a regex's or grammar's text, choices together, a schema's literal text
MAX_CHOICES = 10_000  # entries of a choice, enum values of a schema together
MAX_PROPERTIES = 5_000  # properties of a schema together
MAX_OPTIONAL_PROPERTIES = 500  # properties not in their object's "required", together
MAX_PATTERN_REPETITION = 2_000  # characters a schema's pattern repeats (nested bounds multiplied)
# JSON schema annotations: free text xgrammar does not compile
_ANNOTATIONS = frozenset({"description", "title", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly"})


@dataclass(frozen=True)
class ThinkMarkers:
    start: int  # [unused16]
    end: int  # [unused17]


def think_markers(tokenizer: Any) -> Optional[ThinkMarkers]:
    """The thinking markers' ids when the tokenizer has both as single tokens, else None."""
    if tokenizer is None:
        return None
    start, end = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    return ThinkMarkers(start, end) if start is not None and end is not None else None


class GrammarCache:
    """xgrammar's GrammarCompiler for one model's tokenizer (built on first use) and an LRU of
    compiled grammars keyed by (kind, canonical text), bounded by their total size (max_bytes, in
    xgrammar's memory_size_bytes) and count. Evicting drops only the cache's reference: a request
    holds its own (StructuredState.compiled) until it ends.

    Thread-safe; a grammar compiles outside the cache's lock, so a slow one holds up no other
    request's cache hit or compile, and requests that bring the same new grammar meanwhile wait
    for that one compile.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()  # key -> (compiled, bytes)
        self._compiling: dict[tuple[str, str], _Compiling] = {}
        self._lock = threading.Lock()
        self.bytes = 0  # of the grammars cached
        self.hits = 0
        self.misses = 0
        self.compile_seconds = 0.0  # total time spent compiling (misses)

    @property
    def compiler(self):
        with self._compiler_lock:  # (seconds for a large vocabulary: built once)
            if self._compiler is None:
                import xgrammar as xgr

                # as many threads as the products get (cpu_threads: a container's CPU quota), at most
                # xgrammar's own default of 8: more only fight the engine's step for the cores
                # (benchmarks/RESULTS.md: 8 threads compiled no faster than 1 or 2 on 2 cores)
                threads = max(1, min(8, torch.get_num_threads()))
                self._compiler = xgr.GrammarCompiler(self._tokenizer_info(), max_threads=threads, cache_enabled=False)
            return self._compiler

    def _tokenizer_info(self):
        import xgrammar as xgr

        kind, vocab = self.tokenizer.grammar_vocab()
        if kind == "bytes":
            return xgr.TokenizerInfo(
                vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=vocab)
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec` (cached); RequestError naming the field when it is invalid
        or larger than the limits (MAX_CHOICES, ...; max_bytes compiled)."""
        key = spec.key()
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[0]
                pending = self._compiling.get(key)
                if pending is None:
                    pending = self._compiling[key] = _Compiling()
                    break
            pending.done.wait()  # another request compiles the same grammar: its result serves both
            if isinstance(pending.error, RequestError):
                raise RequestError(str(pending.error), param=pending.error.param)
            if pending.compiled is not None:
                with self._lock:
                    self.hits += 1
                return pending.compiled
            # it failed otherwise (not this request's fault): compile it here
        try:
            start = time.perf_counter()
            check_limits(spec)
            check_enforceable(spec)
            compiled = self._compile(spec.kind, key[1], spec)
            seconds = time.perf_counter() - start
        except BaseException as e:
            pending.error = e
            raise
        else:
            pending.compiled = compiled
            with self._lock:
                self.misses += 1
                self.compile_seconds += seconds
                self._store(key, compiled)
            return compiled
        finally:
            with self._lock:
                del self._compiling[key]
            pending.done.set()

    def _store(self, key: tuple[str, str], compiled: Any) -> None:
        size = compiled.memory_size_bytes
        self._entries[key] = (compiled, size)
        self.bytes += size
        while len(self._entries) > 1 and (self.bytes > self.max_bytes or len(self._entries) > self.max_entries):
            _, (_, evicted) = self._entries.popitem(last=False)  # the least recently used
            self.bytes -= evicted

    def _compile(self, kind: str, text: str, spec: StructuredOutputsParams) -> Any:
        param = f"structured_outputs.{kind}"
        try:
            compiled = self._xgrammar_compile(kind, text, spec)
        except Exception as e:  # xgrammar's errors (RuntimeError subclasses, ValueError, ...): the request's fault
            raise RequestError(f"{param} is invalid: {_xgrammar_message(e, kind)}", param=param) from None
        if compiled is None:
            raise RequestError(f"unknown structured output kind {kind!r}", param="structured_outputs")
        size = compiled.memory_size_bytes
        if size > self.max_bytes:
            raise RequestError(
                f"{param} compiles to a grammar of {_size(size)}; this server holds at most {_size(self.max_bytes)} of grammars",
                param=param,
            )
        if not self._matches_something(compiled):
            # the engine would find no token to sample at the reply's first step
            raise RequestError(f"{param} matches no output: no text (not even an empty one) satisfies it", param=param)
        return compiled

    def _xgrammar_compile(self, kind: str, text: str, spec: StructuredOutputsParams) -> Any:
        compiler = self.compiler
        if kind == "json":
            # compact JSON (", " and ": " separators, no free whitespace): a small model cannot
            # wander off into endless whitespace, and the reply parses the same
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=True) for c in spec.choice or [])
            return compiler.compile_grammar(f"root ::= {alternatives}")
        if kind == "grammar":
            return compiler.compile_grammar(text)
        if kind == "structural_tag":
            return compiler.compile_structural_tag(text)
        return None

    def _matches_something(self, compiled: Any) -> bool:
        """False when no reply can satisfy the grammar: its first token mask allows no token (and it
        cannot end at once, which would allow a stop token), or a path it forces token by token ends
        there (a JSON string whose pattern matches nothing allows its opening quote, then nothing).
        Catches the grammars that match nothing ("[^\\s\\S]", a character no token writes), not every
        dead end further on."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled)
        bitmask = allocate_bitmask(1, self.vocab_size)
        for _ in range(FORCED_STEPS_CHECKED):
            matcher.fill_next_token_bitmask(bitmask, 0)
            words = bitmask[0].nonzero().flatten().tolist()
            if not words:
                return False
            if len(words) > 1:
                return True
            word = int(bitmask[0, words[0]]) & 0xFFFFFFFF
            if word & (word - 1):  # more than one token
                return True
            token = words[0] * 32 + word.bit_length() - 1
            if token in self.stop_token_ids or not matcher.accept_token(token):
                return True
        return True

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "compile_seconds": self.compile_seconds}


class _Compiling:
    """A grammar being compiled: what requests for the same one wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.compiled: Any = None
        self.error: Optional[BaseException] = None


def check_limits(spec: StructuredOutputsParams) -> None:
    """RequestError naming the field when `spec` is larger than compiling it may cost (MAX_...)."""
    kind = spec.kind
    param = f"structured_outputs.{kind}"
    if kind == "choice":
        choices = spec.choice or []
        if len(choices) > MAX_CHOICES:
            raise RequestError(f"{param} has {len(choices)} choices; at most {MAX_CHOICES}", param=param)
        _check_chars(param, sum(len(c) for c in choices), "characters of choices")
    elif kind in ("regex", "grammar"):
        _check_chars(param, len(getattr(spec, kind)), "characters")
    elif kind in ("json", "structural_tag"):
        value = getattr(spec, kind)
        _check_schema(param, json.loads(value) if isinstance(value, str) else value)


# JSON-schema keywords xgrammar compiles without enforcing (the reply may break them): refused, as
# vLLM's xgrammar backend and OpenAI's strict mode refuse what they cannot enforce, rather than
# answered with a reply that breaks the schema. (tests/test_structured_limits.py checks that
# xgrammar still ignores each: drop one from here once it is enforced.)
UNENFORCED_KEYWORDS = ("not", "if", "then", "else", "contains", "minContains", "maxContains", "dependentRequired",
                       "dependentSchemas", "dependencies", "$dynamicRef", "$recursiveRef")
# keywords that sit beside allOf without constraining anything
_BESIDE_ALL_OF = _ANNOTATIONS | {"allOf", "$defs", "definitions", "$schema", "$id", "$anchor"}
# where a schema holds other schemas: maps of them, one, or lists of them
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames", "additionalItems")
_SCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf", "items")


def check_enforceable(spec: StructuredOutputsParams) -> None:
    """RequestError naming the field when a JSON schema of `spec` (a structural tag's too) uses a
    keyword xgrammar would not enforce (UNENFORCED_KEYWORDS, uniqueItems, allOf of several schemas
    or beside other keywords, a $ref outside the schema). The tools' schemas (param "tools") are
    enforced as far as xgrammar does, not refused: a function's parameters describe it to the model
    too, and OpenAI's function calling refuses none of these unless strict."""
    kind = spec.kind
    if kind not in ("json", "structural_tag") or spec.param_name == "tools":
        return
    value = getattr(spec, kind)
    value = json.loads(value) if isinstance(value, str) else value
    param = f"structured_outputs.{kind}"
    schemas = [(value, "#")] if kind == "json" else list(_tag_schemas(value))
    for schema, where in schemas:
        found = unenforced_keyword(schema)
        if found is not None:
            keyword, path = found
            at = where if path == "#" else where + path[1:]
            raise RequestError(
                f"{param} uses {keyword} (at {at}), which structured outputs cannot enforce (xgrammar ignores it: "
                "the reply could break it); leave it out, or check the reply yourself", param=param,
            )


def _tag_schemas(tag: Any) -> Iterator[tuple[Any, str]]:
    """The JSON schemas inside a structural tag (its formats of type json_schema), with their paths."""
    stack = [(tag, "#")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "json_schema" and "json_schema" in node:
                yield node["json_schema"], f"{path}/json_schema"
            for key, value in node.items():
                stack.append((value, f"{path}/{key}"))
        elif isinstance(node, list):
            stack.extend((value, f"{path}/{i}") for i, value in enumerate(node))


def unenforced_keyword(schema: Any) -> Optional[tuple[str, str]]:
    """(keyword, JSON pointer of the schema using it) for the first keyword of `schema` that xgrammar
    compiles without enforcing; None when it enforces them all. Walks schema positions only (a
    property named "not" is a name, not the keyword)."""
    stack = [(schema, "#")]
    while stack:  # (not recursive: a schema may nest deeper than Python's stack)
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        for keyword in UNENFORCED_KEYWORDS:
            if keyword in node:
                return keyword, path
        if node.get("uniqueItems") is True:
            return "uniqueItems", path
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return f"a $ref outside the schema ({short_repr(ref)})", path
        all_of = node.get("allOf")
        if isinstance(all_of, list) and (len(all_of) > 1 or node.keys() - _BESIDE_ALL_OF):
            return "allOf of several schemas" if len(all_of) > 1 else "allOf beside other keywords", path
        for key in _SCHEMA_MAPS:
            children = node.get(key)
            if isinstance(children, dict):
                stack.extend((child, f"{path}/{key}/{_pointer_part(name)}") for name, child in children.items())
        for key in _SCHEMA_ONE:
            stack.append((node.get(key), f"{path}/{key}"))
        for key in _SCHEMA_LISTS:
            children = node.get(key)
            if isinstance(children, list):
                stack.extend((child, f"{path}/{key}/{i}") for i, child in enumerate(children))
    return None


def _pointer_part(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")  # (RFC 6901)


def _check_chars(param: str, n: int, what: str) -> None:
    if n > MAX_GRAMMAR_CHARS:
        raise RequestError(f"{param} has {n} {what}; at most {MAX_GRAMMAR_CHARS}", param=param)


def _check_schema(param: str, schema: Any) -> None:
    """A JSON schema's (or a structural tag's, schemas inside) size: its literal text (keys and
    values, annotations such as descriptions aside), enum values, properties, optional properties
    and its patterns' repetition."""
    chars = enums = properties = optional = 0
    stack = [schema]
    while stack:  # (not recursive: a schema may nest deeper than Python's stack)
        node = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                required = node.get("required")
                required = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
                properties += len(props)
                optional += len(props.keys() - required)
            enum = node.get("enum")
            if isinstance(enum, list):
                enums += len(enum)
            pattern = node.get("pattern")
            if isinstance(pattern, str) and node.get("type") != "regex":  # (a structural tag's regex: not in a JSON string)
                repetition = pattern_repetition(pattern)
                if repetition > MAX_PATTERN_REPETITION:
                    raise RequestError(
                        f"{param} has a pattern that repeats up to {repetition} characters ({short_repr(pattern)}); "
                        f"at most {MAX_PATTERN_REPETITION}", param=param,
                    )
            for name, value in node.items():
                chars += len(name)
                if name not in _ANNOTATIONS:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            chars += len(node)
        else:
            chars += len(str(node)) if isinstance(node, float) else 1 if node is None or isinstance(node, bool) else _digits(node)
    if enums > MAX_CHOICES:
        raise RequestError(f"{param} has {enums} enum values; at most {MAX_CHOICES}", param=param)
    if properties > MAX_PROPERTIES:
        raise RequestError(f"{param} has {properties} properties; at most {MAX_PROPERTIES}", param=param)
    if optional > MAX_OPTIONAL_PROPERTIES:
        raise RequestError(
            f"{param} has {optional} optional properties (not in their object's required); at most "
            f"{MAX_OPTIONAL_PROPERTIES}: each one adds to every other's cost of compiling", param=param,
        )
    _check_chars(param, chars, "characters of literal text (names, enum and const values, patterns)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _digits(value: Any) -> int:
    return max(1, value.bit_length() * 3 // 10 + 1) if isinstance(value, int) else 1


_QUANTIFIER = re.compile(r"\{(\d{1,9})(,(\d{0,9}))?\}")


def pattern_repetition(pattern: str) -> int:
    """How many characters a regex's bounded repetitions spell out at most: each atom counts its
    {m,n} bound (n, or m for {m,}; 1 for *, + and ?) times the bounds of the groups around it; the
    alternatives of a group add up. [a-z]{1,100} -> 100, ([a-z]{1,100}[0-9]{1,100}){1,100} -> 20,000.
    (xgrammar spells bounded repetitions out inside a JSON string: compiling takes time that grows
    faster than this number.)"""
    stack: list[int] = [0]  # the weight of each open group so far
    i, n = 0, len(pattern)
    last = 0  # the weight of the atom just read, which a quantifier multiplies
    while i < n:
        c = pattern[i]
        if c == "\\":
            last, i = 1, i + 2
            stack[-1] += 1
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            last, i = 1, j + 1
            stack[-1] += 1
            continue
        if c == "(":
            stack.append(0)
            last, i = 0, i + 1
            continue
        if c == ")" and len(stack) > 1:
            last = stack.pop()
            stack[-1] += last
            i += 1
            continue
        if c == "{":
            m = _QUANTIFIER.match(pattern, i)
            if m:
                low, comma, high = int(m.group(1)), m.group(2), m.group(3)
                bound = int(high) if comma and high else max(low, 1)
                stack[-1] += last * (bound - 1)  # the atom counted once already
                last = last * bound
                i = m.end()
                continue
        if c in "*+?|^$":
            last = 0 if c in "|^$" else last
            i += 1
            continue
        last = 1
        stack[-1] += 1
        i += 1
    return sum(stack)


# xgrammar's C++ errors start with its log prefix, "[06:21:41] /project/cpp/json_schema_converter.cc:5082: ";
# a failed internal check adds "Check failed: (std::holds_alternative<Grammar>(result)) is false: ".
_LOG_PREFIX = re.compile(r"^\[\d{1,2}:\d{2}:\d{2}\]\s*(?:[^\s:]+\.(?:cc|cpp|cxx|cu|h|hpp)(?::\d+)*:\s*)?")
_SOURCE_PATH = re.compile(r"(?:/[\w.+-]+)+\.(?:cc|cpp|cxx|cu|h|hpp)(?::\d+)*:?\s*")
_CHECK_FAILED = re.compile(r"Check failed:.*? is false:?\s*")
# where the regex / schema was turned into xgrammar's EBNF: a position in text the client never wrote
_EBNF_POSITION = re.compile(r"EBNF parser error at line \d+, column \d+:\s*")
MAX_ERROR_CHARS = 300


def _xgrammar_message(error: BaseException, kind: str) -> str:
    """What xgrammar says is wrong, without its log prefix, C++ source paths and internal checks
    (a 400's body shows it to the client): "Unsupported type \"nope\"", "Regex parsing error at
    position 3: The parenthesis is not closed."."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # the message is the first line; a stack trace may follow
    text = _LOG_PREFIX.sub("", lines[0]) if lines else ""
    text = _CHECK_FAILED.sub("", text)
    text = _SOURCE_PATH.sub("", text)
    text = text.replace("Invalid structural tag error: ", "")
    if kind != "grammar":
        text = _EBNF_POSITION.sub("", text)
    text = text.strip()
    if not text:
        return "xgrammar cannot compile it"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class GrammarDeadEnd(RequestError):
    """A grammar that allows no next token after what the reply holds, a dead end the check at
    admission (`_matches_something`) cannot see: no reply satisfies it (an object property it
    requires whose pattern matches no text, a character no token of this model writes). The
    request's own fault, named by its field (the server's 400), not a fault of the engine."""


class StructuredState:
    """One sequence's constraint: its thinking phase, its thinking budget and its grammar matcher."""

    def __init__(
        self,
        compiled: Any,
        markers: Optional[ThinkMarkers],
        prompt_token_ids: Sequence[int],
        max_reasoning_tokens: Optional[int],
        allow_thinking: bool = False,
        param: str = "structured_outputs",
    ):
        import xgrammar as xgr

        self.compiled = compiled  # this request's own reference: the cache may evict it meanwhile
        self.matcher = xgr.GrammarMatcher(compiled) if compiled is not None else None
        self.param = param  # the request field the grammar came from, named by a dead end's error
        self.answer_tokens = 0  # tokens the grammar has accepted
        self.markers = markers
        self.budget = max_reasoning_tokens if markers is not None else None
        self.reasoning_tokens = 0
        if markers is None:
            self.phase = "answer"
        elif prompt_token_ids and prompt_token_ids[-1] == markers.start:
            self.phase = "thinking"  # the template opened the thinking part itself
        elif allow_thinking or self.matcher is None:
            self.phase = "start"  # the first token may open a thinking part
        else:
            self.phase = "answer"

    @property
    def constrains_answer(self) -> bool:
        return self.matcher is not None

    def needs_mask(self) -> bool:
        if self.phase == "thinking":
            return self.budget is not None and self.reasoning_tokens >= self.budget
        return self.matcher is not None and not self.matcher.is_terminated()

    def draftable(self) -> bool:
        """Speculative drafts can be checked here: the answer, under a grammar not yet ended."""
        return self.phase == "answer" and self.matcher is not None and not self.matcher.is_terminated()

    def valid_prefix(self, draft: list[int]) -> int:
        """How many leading draft tokens the grammar allows from here (the matcher is left as it was)."""
        n = 0
        for token in draft:
            if not self.draft_accept(token):
                break
            n += 1
        self.rollback(n)
        return n

    def draft_step(self, logits: torch.Tensor) -> None:
        """Mask, in place, a draft model's logits row [V] for the next draft token from here."""
        if not self.matcher.is_terminated():
            bitmask = allocate_bitmask(1, logits.shape[-1])
            self.matcher.fill_next_token_bitmask(bitmask, 0)
            apply_bitmask(logits[None], bitmask, [0])

    def draft_accept(self, token: int) -> bool:
        """Advance past a draft token for now (the drafter rolls back what it advanced: rollback)."""
        return not self.matcher.is_terminated() and self.matcher.accept_token(token)

    def rollback(self, n: int) -> None:
        """Undo the last n draft_accept calls."""
        if n:
            self.matcher.rollback(n)

    def draft_masks(self, draft: list[int], bitmask: torch.Tensor) -> tuple[list[int], int]:
        """Bitmask row j: the tokens the grammar allows after draft[:j], for j = 0..len(draft) (the
        rows a draft is verified on; a draft is a valid_prefix). Returns the rows filled (none past
        the grammar's end, which allows nothing more: needs_mask) and how many draft tokens to
        verify: all of them, or those before the first one after which the grammar allows nothing
        (a dead end it accepted; dropped, the target model's pick there meets the dead end next
        step). The matcher is left as it was. GrammarDeadEnd when it allows nothing from here."""
        rows, accepted, keep = [], 0, len(draft)
        for j in range(len(draft) + 1):
            if self.matcher.is_terminated():
                break
            self.matcher.fill_next_token_bitmask(bitmask, j)
            if not bool(bitmask[j].any()):
                if j == 0:
                    self.rollback(accepted)
                    raise self._dead_end()
                keep = j - 1
                break
            rows.append(j)
            if j == len(draft) or not self.draft_accept(draft[j]):
                break
            accepted += 1
        self.rollback(accepted)
        return rows, keep

    def _dead_end(self) -> GrammarDeadEnd:
        after = f"after the {self.answer_tokens} tokens of the reply so far" if self.answer_tokens else "at the reply's start"
        return GrammarDeadEnd(
            f"{self.param} allows no next token {after}: no reply satisfies it (a part of it, such as a required "
            "property's pattern, matches no text this model can write)",
            param=self.param,
        )

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed tokens into row `row` of an xgrammar bitmask (needs_mask() is true)."""
        if self.phase == "thinking":  # the budget is spent: only [unused17]
            bitmask[row].zero_()
            _set_bit(bitmask, row, self.markers.end)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.phase == "start":
            _set_bit(bitmask, row, self.markers.start)
        elif not bool(bitmask[row].any()):
            raise self._dead_end()

    def accept(self, token: int) -> None:
        """Advance past a generated token; ValueError if the grammar does not allow it."""
        if self.phase == "start":
            if token == self.markers.start:
                self.phase = "thinking"
                return
            self.phase = "answer"
        elif self.phase == "thinking":
            if token == self.markers.end:
                self.phase = "answer"
            else:
                self.reasoning_tokens += 1
            return
        if self.matcher is None:
            # only a budget to keep: every thinking part it opens is capped
            if self.markers is not None and token == self.markers.start:
                self.phase = "thinking"
                self.reasoning_tokens = 0
            return
        if not self.matcher.is_terminated():
            if not self.matcher.accept_token(token):
                raise ValueError(f"token {token} is not allowed by the request's grammar")
            self.answer_tokens += 1


def _set_bit(bitmask: torch.Tensor, row: int, token: int) -> None:
    word, bit = divmod(token, 32)
    value = 1 << bit
    if value >= 1 << 31:
        value -= 1 << 32  # the same bit pattern as an int32
    bitmask[row, word] |= value


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, every logit of `rows` whose bit in the matching bitmask row is 0."""
    import xgrammar as xgr

    if bitmask.device != logits.device:  # (masks are filled on the CPU; xgrammar's GPU kernels read them there)
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if len(rows) == logits.shape[0]:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
