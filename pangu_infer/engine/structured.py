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
from typing import Any, Optional, Sequence

import torch

from pangu_infer.errors import RequestError
from pangu_infer.sampling_params import StructuredOutputsParams

THINK_START = "[unused16]"
THINK_END = "[unused17]"
DEFAULT_CACHE_ENTRIES = 256
FORCED_STEPS_CHECKED = 32  # tokens a grammar forces one by one, followed at compile time to see it can go on


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
    compiled grammars keyed by (kind, canonical text)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], max_entries: int = DEFAULT_CACHE_ENTRIES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.max_entries = max_entries
        self._compiler = None
        self._entries: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.compile_seconds = 0.0  # total time spent compiling (misses)

    @property
    def compiler(self):
        if self._compiler is None:
            import xgrammar as xgr

            self._compiler = xgr.GrammarCompiler(self._tokenizer_info(), cache_enabled=False)
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
        """The compiled grammar of `spec` (cached); RequestError naming the field when it is invalid."""
        key = spec.key()
        with self._lock:
            compiled = self._entries.get(key)
            if compiled is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return compiled
            start = time.perf_counter()
            compiled = self._compile(spec.kind, key[1], spec)
            self.compile_seconds += time.perf_counter() - start
            self.misses += 1
            self._entries[key] = compiled
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return compiled

    def _compile(self, kind: str, text: str, spec: StructuredOutputsParams) -> Any:
        param = f"structured_outputs.{kind}"
        try:
            compiled = self._xgrammar_compile(kind, text, spec)
        except Exception as e:  # xgrammar's errors (RuntimeError subclasses, ValueError, ...): the request's fault
            raise RequestError(f"{param} is invalid: {_xgrammar_message(e, kind)}", param=param) from None
        if compiled is None:
            raise RequestError(f"unknown structured output kind {kind!r}", param="structured_outputs")
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
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses, "compile_seconds": self.compile_seconds}


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


class StructuredState:
    """One sequence's constraint: its thinking phase, its thinking budget and its grammar matcher."""

    def __init__(
        self,
        compiled: Any,
        markers: Optional[ThinkMarkers],
        prompt_token_ids: Sequence[int],
        max_reasoning_tokens: Optional[int],
        allow_thinking: bool = False,
    ):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled) if compiled is not None else None
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

    def draft_masks(self, draft: list[int], bitmask: torch.Tensor) -> list[int]:
        """Bitmask row j: the tokens the grammar allows after draft[:j], for j = 0..len(draft) (the
        rows a draft is verified on; a draft is a valid_prefix). Returns the rows filled: none past the
        grammar's end, which allows nothing more (needs_mask). The matcher is left as it was."""
        rows, accepted = [], 0
        for j in range(len(draft) + 1):
            if self.matcher.is_terminated():
                break
            self.matcher.fill_next_token_bitmask(bitmask, j)
            rows.append(j)
            if j == len(draft) or not self.draft_accept(draft[j]):
                break
            accepted += 1
        self.rollback(accepted)
        return rows

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed tokens into row `row` of an xgrammar bitmask (needs_mask() is true)."""
        if self.phase == "thinking":  # the budget is spent: only [unused17]
            bitmask[row].zero_()
            _set_bit(bitmask, row, self.markers.end)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.phase == "start":
            _set_bit(bitmask, row, self.markers.start)

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
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the request's grammar")


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
