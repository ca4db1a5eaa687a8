"""Admission: every field of a request checked against the model before it reaches a step.

One place for the Python API (LLM, LLMEngine.add_request) and the server: what passes here can
not make a step fail for a reason of this request's own (an id past the vocabulary indexing the
logits, a length past the context), and what fails raises RequestError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

from pangu_infer.errors import RequestError, short_repr
from pangu_infer.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class Limits:
    """What the engine can serve: the model's vocabulary and context, the KV pool, the batch, the
    top logprobs a token may ask for (vLLM's max_logprobs; -1: the whole vocabulary)."""

    vocab_size: int
    max_model_len: int
    pool_tokens: int  # tokens the whole KV pool holds
    max_num_seqs: int
    max_logprobs: int = MAX_LOGPROBS


def checked_logprobs(k: Optional[int], limits: Limits, field: str) -> Optional[int]:
    """A request's count of top logprobs (logprobs, prompt_logprobs; the server's top_logprobs,
    named `field`): -1 (vLLM's: every token of the vocabulary) as the vocabulary's size; a
    RequestError naming `field` above the engine's max_logprobs or the vocabulary."""
    if k is None:
        return None
    vocab, cap = limits.vocab_size, limits.max_logprobs
    asked = vocab if k == -1 else k
    if cap != -1 and asked > cap:
        what = f"{field}=-1 (the whole vocabulary, {vocab} tokens)" if k == -1 else f"{field}={short_repr(k)}"
        raise RequestError(
            f"{what} is more than this engine's max_logprobs={cap} top logprobs a token (start it with a higher "
            "--max-logprobs, or LLM(max_logprobs=...); -1: no limit)",
            param=field,
        )
    if asked > vocab:
        raise RequestError(f"{field}={short_repr(k)} is more than the vocabulary's {vocab} tokens", param=field)
    return asked


def admit(
    prompt_token_ids: Sequence[int], params: SamplingParams, limits: Limits, prompt_only: bool = False
) -> tuple[list[int], SamplingParams]:
    """The request's own copies of its prompt and parameters (max_tokens filled in), or RequestError.
    prompt_only: an embedding request, which computes its prompt and generates nothing: the prompt
    may fill the context, and max_tokens is not read."""
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}", param="sampling_params")
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise RequestError(f"prompt token ids must be a list of integers, got {type(prompt_token_ids).__name__}", param="prompt")
    ids = list(prompt_token_ids)
    if not ids:
        raise RequestError("the prompt is empty: at least one token is needed", param="prompt")
    keep = params.truncate_prompt_tokens
    if keep is not None:
        if keep == -1:  # as many as fit: the context, less room for one generated token (but a prompt-only request's)
            keep = limits.max_model_len if prompt_only else max(limits.max_model_len - (params.max_tokens or 1), 1)
        ids = ids[:keep] if params.truncation_side == "right" else ids[-keep:]
    n_prompt = len(ids)
    context = limits.max_model_len
    if prompt_only:
        return _admit_prompt(ids, params, limits)
    if n_prompt >= context:  # before the scan below: a prompt of millions of ids costs nothing more
        raise RequestError(
            f"the prompt has {n_prompt} tokens; the model's context is {context} tokens, so a prompt may have "
            f"at most {context - 1} to leave room for one generated token",
            param="prompt",
        )
    vocab = limits.vocab_size
    _check_ids(ids, vocab)
    # A copy, validated again: the caller may have changed its SamplingParams since building it,
    # and the engine keeps this one for the request's whole life.
    max_tokens = params.max_tokens if params.max_tokens is not None else context - n_prompt
    params = replace(params, max_tokens=max_tokens)
    if n_prompt + max_tokens > context:
        raise RequestError(
            f"prompt ({n_prompt} tokens) + max_tokens ({short_repr(max_tokens)}) = {short_repr(n_prompt + max_tokens)} "
            f"tokens is more than the model's context of {context} tokens",
            param="max_tokens",
        )
    if n_prompt + max_tokens > limits.pool_tokens:
        raise RequestError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) needs more KV cache than the whole "
            f"pool holds ({limits.pool_tokens} tokens); raise kv_cache_memory or lower max_tokens",
            param="max_tokens",
        )
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise RequestError(f"stop_token_ids holds {short_repr(bad)}, outside the vocabulary [0, {vocab})", param="stop_token_ids")
    bad = next((t for t in params.logit_bias or () if t >= vocab), None)
    if bad is not None:
        raise RequestError(f"logit_bias holds the token id {short_repr(bad)}, outside the vocabulary [0, {vocab})", param="logit_bias")
    bad = next((t for t in params.allowed_token_ids or () if t >= vocab), None)
    if bad is not None:
        raise RequestError(f"allowed_token_ids holds {short_repr(bad)}, outside the vocabulary [0, {vocab})", param="allowed_token_ids")
    if params.n > limits.max_num_seqs:
        raise RequestError(
            f"n={short_repr(params.n)} asks for more sequences than the engine runs at once (max_num_seqs={limits.max_num_seqs})",
            param="n",
        )
    logprobs = checked_logprobs(params.logprobs, limits, "logprobs")
    prompt_logprobs = checked_logprobs(params.prompt_logprobs, limits, "prompt_logprobs")
    if (logprobs, prompt_logprobs) != (params.logprobs, params.prompt_logprobs):
        params = replace(params, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return ids, params


def _admit_prompt(ids: list[int], params: SamplingParams, limits: Limits) -> tuple[list[int], SamplingParams]:
    """admit's checks for a prompt-only request: its length (before the scan of its ids) and ids."""
    n_prompt, context = len(ids), limits.max_model_len
    if n_prompt > context:
        raise RequestError(f"the prompt has {n_prompt} tokens, more than the model's context of {context} tokens", param="prompt")
    if n_prompt > limits.pool_tokens:
        raise RequestError(
            f"the prompt has {n_prompt} tokens, more than the whole KV cache holds ({limits.pool_tokens} tokens); "
            "raise kv_cache_memory",
            param="prompt",
        )
    _check_ids(ids, limits.vocab_size)
    return ids, replace(params)


MAX_CACHE_SALT_CHARS = 1024


def check_cache_salt(salt: object) -> None:
    """A request's cache_salt: None, or a non-empty string of at most MAX_CACHE_SALT_CHARS."""
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise RequestError(f"cache_salt={short_repr(salt)} must be a non-empty string", param="cache_salt")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise RequestError(f"cache_salt has {len(salt)} characters; at most {MAX_CACHE_SALT_CHARS}", param="cache_salt")


def _check_ids(ids: list[int], vocab: int) -> None:
    bad = outside_vocabulary(ids, vocab)
    if bad is not None:
        raise RequestError(f"prompt token id {short_repr(bad)} is outside the vocabulary [0, {vocab})", param="prompt")


def outside_vocabulary(ids: Iterable[object], vocab: int) -> Optional[object]:
    """The first of `ids` that is no token id of a vocabulary of `vocab` (None: all are): a prompt's,
    bad_words' or a prediction's ids, each refused naming it."""
    return next((t for t in ids if not _is_token(t, vocab)), None)


def _is_token(t: object, vocab: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab


def compile_structured(params: SamplingParams, grammars) -> object | None:
    """The request's compiled grammar (xgrammar, cached per model), or None when it has no constraint.

    A schema, regex or grammar that xgrammar cannot compile raises RequestError naming the field
    (`structured_outputs.json`, or what the server mapped it from: `response_format`, `tools`).
    """
    spec = params.structured_outputs
    if spec is None:
        return None
    if grammars is None:
        raise RequestError("structured outputs need the model's tokenizer; this engine has none", param="structured_outputs")
    if params.min_tokens:
        raise RequestError(
            f"min_tokens={params.min_tokens} cannot be combined with a structured output: the grammar decides where the reply ends",
            param="min_tokens",
        )
    try:
        return grammars.compile(spec)
    except RequestError as e:
        if spec.param_name is None:
            raise
        raise RequestError(str(e).replace(e.param or "", spec.param_name, 1), param=spec.param_name) from None
