"""Per-request sampling parameters, shaped like vLLM's."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pangu_infer.errors import RequestError, short_repr

# Temperatures below this are greedy, as in vLLM: dividing logits by ~0 only adds rounding noise.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's and vLLM's default limit)
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # more than any vocabulary holds (153k for Pangu)
MAX_LOGIT_BIAS = 300  # tokens in one logit_bias (OpenAI's limit)
MAX_BAD_WORDS = 300  # words in one bad_words
MAX_PREDICTION_LENGTH = 4_000_000  # characters (or token ids) of a prediction; its tokens must fit the context too
MAX_BAD_WORD_CHARS = 1000  # characters in one of them
LOGIT_BIAS_RANGE = 100.0  # a bias is in [-100, 100], as OpenAI takes it
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch.Generator.manual_seed takes, with room for n


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM names it: exactly one of the fields is set.

    json: a JSON schema (dict or JSON text); regex: a regular expression the whole output
    matches; choice: the output is one of these strings; grammar: an EBNF grammar (xgrammar's
    GBNF-like dialect, rule `root`); json_object: any JSON object; structural_tag: xgrammar's
    structural tag (JSON text or dict), e.g. free text in which every `[unused11]...[unused12]`
    block is a JSON list of tool calls. The constraint applies to the answer: on a model with
    Pangu's thinking markers, a thinking part `[unused16]...[unused17]` is left free. Invalid
    values (a schema xgrammar cannot compile, a bad regex) raise RequestError at admission.
    """

    json: Union[None, str, dict[str, Any]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Union[None, str, dict[str, Any]] = None
    # the request field errors name (the server's "response_format", "tools"); None: structured_outputs.<kind>
    param_name: Optional[str] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        if self.json is False:  # a schema, not "unset" as json_object=False is: named where it was given
            param = self.param_name or "structured_outputs.json"
            raise RequestError(f"{param} is the JSON schema false, which no output matches", param=param)
        set_fields = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(set_fields) != 1:
            raise RequestError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object, structural_tag; "
                f"got {', '.join(set_fields) if set_fields else 'none'}",
                param="structured_outputs",
            )
        kind = set_fields[0]
        value = getattr(self, kind)
        param = self.param
        if kind in ("json", "structural_tag"):
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as e:
                    raise RequestError(f"{param} is not valid JSON: {e}", param=param) from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)) or (kind == "structural_tag" and not isinstance(parsed, dict)):
                raise RequestError(f"{param} must be a JSON object, got {short_repr(value)}", param=param)
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise RequestError(f"{param} must be a non-empty string, got {short_repr(value)}", param=param)
        elif kind == "choice":
            if not isinstance(value, list) or not value or any(not isinstance(c, str) or not c for c in value):
                raise RequestError(f"{param} must be a non-empty list of non-empty strings, got {short_repr(value)}", param=param)
        elif value is not True:
            raise RequestError(f"{param} must be true, got {short_repr(value)}", param=param)

    @property
    def kind(self) -> str:
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    @property
    def param(self) -> str:
        """The field errors about this constraint name: `param_name`, or structured_outputs.<kind>."""
        return self.param_name or f"structured_outputs.{self.kind}"

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what the compiled-grammar cache is keyed by."""
        kind = self.kind
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            value = json.loads(value) if isinstance(value, str) else value
            return kind, json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(value, ensure_ascii=False)
        return kind, str(value)


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class SamplingParams:
    """How one request is decoded. Invalid values raise RequestError (a ValueError) naming the parameter.

    Checked here: types and model-independent ranges. The engine checks the rest against the model
    at admission (pangu_infer.engine.admission): token ids against the vocabulary, lengths
    against the context.
    """

    n: int = 1
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included): greedy
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    # added to the logits of these token ids before penalties, temperature and filtering (OpenAI's
    # logit_bias: -100 all but bans a token, 100 all but forces it); keys may be ids or their text
    logit_bias: Optional[dict[int, float]] = None
    # when set, only these token ids can be drawn (vLLM's allowed_token_ids)
    allowed_token_ids: Optional[list[int]] = None
    # words never generated (vLLM's bad_words): each word's tokens, with and without a leading space,
    # may not all appear in a row; the engine bans a word's last token where the output ends with the rest
    bad_words: Optional[list[str]] = None
    logprobs: Optional[int] = None  # number of top alternatives to return with each token
    # logprobs of the prompt's tokens (all but the first) with this many top alternatives each
    # (vLLM's prompt_logprobs; the server's echo). The prompt is computed whole: no prefix cache.
    prompt_logprobs: Optional[int] = None
    # keep only the prompt's last k tokens (vLLM's left truncation); -1: as many as leave room for
    # max_tokens (or one token) in the model's context. None: a prompt that does not fit is an error
    truncate_prompt_tokens: Optional[int] = None
    # which end truncate_prompt_tokens keeps (vLLM's truncation_side): "left" cuts the start and keeps
    # the last k tokens, "right" cuts the end and keeps the first k
    truncation_side: str = "left"
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # a constraint on the answer (JSON schema, regex, choice, grammar), compiled with xgrammar
    structured_outputs: Optional[StructuredOutputsParams] = None
    # thinking budget: at most this many tokens between [unused16] and [unused17] (models with
    # Pangu's thinking markers); when reached, the engine emits [unused17] itself. None: no cap
    max_reasoning_tokens: Optional[int] = None
    # a constrained reply may open with a thinking part ([unused16]...[unused17]) that the constraint
    # skips; LLM.chat and the server's chat set it on Pangu templates unless enable_thinking is false
    allow_thinking: bool = False
    # the reply as the client expects it to read, mostly (OpenAI's Predicted Outputs): text, or its
    # token ids. The engine drafts from it and verifies the drafts, so the reply is the one written
    # without it, sooner where it matches (RequestOutput.metrics counts its tokens accepted and rejected)
    prediction: Union[None, str, list[int]] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, (list, tuple)) or self.stop is None:
            self.stop = list(self.stop or [])
        if isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None:
            self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = _token_keys(self.logit_bias)
        self._validate()
        if self.allowed_token_ids is not None and len(set(self.allowed_token_ids)) < len(self.allowed_token_ids):
            # a set of tokens: each step masks by this list, so a repeated id only costs every request in the batch
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))

    def _validate(self) -> None:
        def bad(name: str, expected: str) -> RequestError:
            return RequestError(
                f"invalid sampling parameter {name}={short_repr(getattr(self, name))}: expected {expected}", param=name
            )

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"at most max_tokens={short_repr(self.max_tokens)}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 or -1 disables it)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0")
        if not _is_num(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "a number in [-2, 2]")
        if not _is_num(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "a number in [-2, 2]")
        if not valid_seed(self.seed):
            raise bad("seed", f"an integer in [{SEED_MIN}, {SEED_MAX}] or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < -1):
            raise bad("logprobs", "an integer >= 0, -1 (every token of the vocabulary) or None")
        if self.truncate_prompt_tokens is not None and (
            not _is_int(self.truncate_prompt_tokens) or not (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)
        ):
            raise bad("truncate_prompt_tokens", "an integer >= 1, -1 (as many as fit the context) or None")
        if self.truncation_side not in ("left", "right"):
            raise bad("truncation_side", "'left' (keep the prompt's last tokens) or 'right' (keep its first)")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < -1):
            raise bad("prompt_logprobs", "an integer >= 0, -1 (every token of the vocabulary) or None")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
        if not isinstance(self.stop_token_ids, list) or any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(
                f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                param="stop_token_ids",
            )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "a mapping of token ids to numbers in [-100, 100], or None")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise RequestError(
                    f"logit_bias has {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS} are allowed", param="logit_bias"
                )
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise RequestError(f"logit_bias has the key {short_repr(token)}: expected a token id (an integer >= 0)", param="logit_bias")
                if not _is_num(bias) or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                    raise RequestError(
                        f"logit_bias[{token}]={short_repr(bias)}: expected a number in [-100, 100]", param="logit_bias"
                    )
        if isinstance(self.allowed_token_ids, list) and len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:  # before scanning them
            raise RequestError(f"allowed_token_ids has {len(self.allowed_token_ids)} ids; at most {MAX_ALLOWED_TOKEN_IDS} are allowed "
                               "(more than any vocabulary holds)", param="allowed_token_ids")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list)
            or not self.allowed_token_ids
            or any(not _is_int(t) or t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "a non-empty list of non-negative integers, or None")
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list) or any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
                raise bad("bad_words", "a list of words (strings with a non-space character), or None")
            if len(self.bad_words) > MAX_BAD_WORDS:
                raise RequestError(f"bad_words has {len(self.bad_words)} words; at most {MAX_BAD_WORDS} are allowed", param="bad_words")
            long = next((w for w in self.bad_words if len(w) > MAX_BAD_WORD_CHARS), None)
            if long is not None:
                raise RequestError(
                    f"bad_words holds a word of {len(long)} characters; at most {MAX_BAD_WORD_CHARS} are allowed", param="bad_words"
                )
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "a StructuredOutputsParams or None")
        if self.max_reasoning_tokens is not None and (not _is_int(self.max_reasoning_tokens) or self.max_reasoning_tokens < 0):
            raise bad("max_reasoning_tokens", "an integer >= 0 or None")
        if self.prediction is not None:
            if isinstance(self.prediction, tuple):
                self.prediction = list(self.prediction)
            if isinstance(self.prediction, list):
                if any(not _is_int(t) for t in self.prediction):
                    raise bad("prediction", "a text or a list of token ids (integers), or None")
            elif not isinstance(self.prediction, str):
                raise bad("prediction", "a text or a list of token ids (integers), or None")
            if len(self.prediction) > MAX_PREDICTION_LENGTH:
                raise RequestError(
                    f"prediction has {len(self.prediction)} {'characters' if isinstance(self.prediction, str) else 'token ids'}; "
                    f"at most {MAX_PREDICTION_LENGTH} are allowed", param="prediction",
                )
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "allow_thinking"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


MAX_TOKEN_ID_DIGITS = 20  # a logit_bias key longer is past any vocabulary (and int() refuses 4300+ digits)


def _token_keys(bias: dict) -> dict:
    """logit_bias with its keys as ints where they are ints or their decimal text in ASCII digits
    (JSON object keys are strings: OpenAI's {"1234": -100}); other keys are kept for _validate to
    name. Two keys of one token ("1" and "01") are a RequestError: one bias would silently win."""
    out: dict = {}
    given: dict = {}
    for key, value in bias.items():
        name = key
        if isinstance(key, str) and key.strip().isascii() and key.strip().isdecimal():
            if len(key.strip()) > MAX_TOKEN_ID_DIGITS:
                raise RequestError(f"logit_bias has the key {short_repr(key)}: a token id of {len(key.strip())} digits "
                                   "is outside any vocabulary", param="logit_bias")
            key = int(key)
        if key in out:
            raise RequestError(f"logit_bias names the token {short_repr(key)} twice ({short_repr(given[key])} and {short_repr(name)})",
                               param="logit_bias")
        out[key], given[key] = value, name
    return out


def valid_seed(x: object) -> bool:
    """None, or an integer in [SEED_MIN, SEED_MAX] (a request's seed, the engine's)."""
    return x is None or (_is_int(x) and SEED_MIN <= x <= SEED_MAX)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# beam_width * 2 candidates per beam are read as top logprobs each step (vLLM's 2k, after
# transformers'), so the widest beam is half the default logprobs limit (vLLM's is the same, its
# max_logprobs 20); an engine of a lower max_logprobs takes narrower beams only (beam_search.check_prompt)
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, for LLM.beam_search (and the server's use_beam_search): keep the
    beam_width best sequences for up to max_tokens tokens, scored by cumulative logprob /
    length ** length_penalty (the length counts the prompt, as vLLM's; a final EOS is not counted).
    temperature: as vLLM, the candidates of each beam are its 2 * beam_width most likely tokens
    (logprobs of the raw logits) plus, above 0, one token drawn at that temperature. ignore_eos: EOS
    is a token like any other (no beam ends before max_tokens). include_stop_str_in_output: a beam
    that ended with EOS keeps that token in its tokens. skip_special_tokens: for its text.
    A RequestError (a ValueError naming the field) for a value out of range."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> RequestError:
            return RequestError(f"invalid beam search parameter {name}={short_repr(getattr(self, name))}: expected {expected}", param=name)

        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise bad("beam_width", f"an integer in [1, {MAX_BEAM_WIDTH}] (each beam reads 2 * beam_width top logprobs, "
                      f"at most {MAX_LOGPROBS})")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not _is_num(self.length_penalty):
            raise bad("length_penalty", "a finite number")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
