"""Speculative decoding: drafts of up to k tokens per decode sequence, verified in one pass.

Drafts come from prompt lookup (`PromptLookupSpeculator`: a sequence whose last n tokens, n =
speculative_ngram down to prompt_lookup_min, occurred earlier in its prompt or output proposes
the up to k tokens that followed that earlier occurrence) or from a smaller draft model
(engine/draft_model.py). The runner computes the target's logits at the last token and at every
draft token in one forward; `verify` then keeps the longest acceptable prefix of the draft plus
one token of its own:

- greedy rows accept a draft token while it equals the argmax, so the text is the one plain
  greedy decoding writes;
- sampled rows use standard speculative rejection sampling: draft token d, drawn from the
  draft's distribution q, is accepted with probability min(1, p(d) / q(d)), and on rejection the
  token is drawn from max(p - q, 0) renormalised; the output follows the target distribution p.
  Prompt lookup's drafts are deterministic (q one-hot: d is accepted with probability p(d), and
  the residual is p with d removed); a draft model samples its drafts from its own distribution
  under the request's temperature, top-k/top-p and min-p (greedy requests take its argmax);
- seeded sampled rows keep draft tokens while they equal the token the sampler would draw at
  their position from the seed's own draws (verify_seeded): the text is the one the request
  writes without speculation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from pangu_infer.engine.sampler import _top_k_top_p_threshold, race_probs, seeded_noise, softmax_limit, temperatures
from pangu_infer.engine.sequence import Sequence
from pangu_infer.sampling_params import SamplingParams

logger = logging.getLogger("pangu_infer.engine")


def propose_ngram_draft(token_ids: list[int], max_ngram: int, num_tokens: int, min_ngram: int = 1) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest matching suffix of
    at least min_ngram tokens."""
    n_total = len(token_ids)
    if num_tokens < 1 or n_total < 2:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_ngram, n_total - 1), max(min_ngram, 1) - 1, -1):
        suffix = arr[n_total - n :]
        # Windows that start before the suffix itself: arr[i:i+n] for i in [0, n_total - n).
        windows = np.lib.stride_tricks.sliding_window_view(arr[: n_total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent match predicts best
            return arr[start : start + num_tokens].tolist()
    return []


def can_speculate(seq: Sequence) -> bool:
    """Rows whose logits the sampler would change (penalties, min_tokens, logit_bias,
    allowed_token_ids, bad_words) or that want logprobs take the plain path: verification scores the draft
    with the raw distribution."""
    p = seq.params
    return (
        seq.pooling is None  # (an embedding request's sequence never samples)
        and not p.logit_bias
        and p.allowed_token_ids is None
        and not p.bad_words
        and p.repetition_penalty == 1
        and p.presence_penalty == 0
        and p.frequency_penalty == 0
        and p.logprobs is None
        and len(seq.output_token_ids) >= p.min_tokens
    )


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from, per row: temperature, top-k/top-p, min-p."""
    return rows_probs(logits, [params] * logits.shape[0])


def rows_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """target_probs with each row's own sampling parameters, in one pass over the batch."""
    temperature = temperatures(params, logits.dtype, logits.device)  # (past the dtype's range: its largest value)
    scaled = logits / temperature[:, None]
    if any(p.top_k or p.top_p < 1 for p in params):
        threshold = _top_k_top_p_threshold(scaled, params)
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = softmax_limit(scaled)  # (a row holding +inf: uniform over those tokens, as the sampler draws it)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def verify(
    logits: torch.Tensor,
    draft: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    draft_probs: Optional[torch.Tensor] = None,
) -> list[int]:
    """logits [len(draft) + 1, V]: row j scores the token after draft[:j]. Returns the accepted
    draft prefix followed by one token chosen by the target model (1 to len(draft) + 1 tokens).
    draft_probs [len(draft), V]: the distribution each draft token was drawn from (None: the
    draft is deterministic, q one-hot)."""
    k = len(draft)
    assert logits.shape[0] == k + 1, (tuple(logits.shape), k)
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < k and best[accepted] == draft[accepted]:
            accepted += 1
        return draft[:accepted] + [best[accepted]]
    probs = target_probs(logits, params)
    draft_t = torch.tensor(draft, device=logits.device, dtype=torch.long)
    p_draft = probs[:k].gather(1, draft_t[:, None]).squeeze(1)
    if draft_probs is not None:  # accepted with probability min(1, p/q); q(d) > 0, d was drawn from q
        p_draft = p_draft / draft_probs.gather(1, draft_t[:, None]).squeeze(1)
    u = torch.rand(k, device=generator.device, generator=generator).to(logits.device)
    rejected = (u >= p_draft).nonzero()
    if rejected.numel() == 0:
        last = probs[k]  # every draft token accepted: a bonus token from the next position
        accepted = k
    else:
        accepted = int(rejected[0, 0])
        if draft_probs is None:
            last = probs[accepted].clone()
            last[draft[accepted]] = 0.0  # the residual max(p - q, 0) with a one-hot q
        else:
            last = (probs[accepted] - draft_probs[accepted]).clamp_(min=0)
            if not last.sum() > 0:  # p == q up to rounding: nothing left over; p itself
                last = probs[accepted]
    token = int(torch.multinomial(last.to(generator.device), 1, generator=generator))
    return draft[:accepted] + [token]


def verify_seeded(logits: torch.Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator) -> list[int]:
    """verify for a seeded sampled row: the token at each position is the one the sampler would draw
    there (race_probs and the generator's next seeded_noise, one draw per position), and a draft
    token is accepted while it is that token. The output is exactly what the request writes without
    speculation, whether a step drafts or how long its draft is (batch composition, budget, prefix
    hits, preemption). The generator ends one draw per token written, as the sampler leaves it.
    A draft drawn from q with the same noise (DraftModelSpeculator) is accepted as often as the two
    races agree: the Gumbel-max coupling of p and q (Daliri et al. 2024, "drafter-invariant
    speculative decoding"), at least (1 - TV) / (1 + TV), against rejection sampling's 1 - TV; a
    deterministic draft d is accepted with probability p(d), as rejection sampling accepts it."""
    k = len(draft)
    assert logits.shape[0] == k + 1, (tuple(logits.shape), k)
    probs = race_probs(logits, [params] * (k + 1))
    for j in range(k + 1):
        token = int((probs[j] / seeded_noise(generator, logits.shape[1]).to(logits.device)).argmax())
        if j == k or token != draft[j]:
            break
    return draft[:j] + [token]


class Speculator:
    """What the engine asks of a draft source: `propose` drafts for a step's decode sequences (their
    KV blocks reserved) and `verify` them against the target's logits; it counts how many draft
    tokens were accepted."""

    def __init__(self, num_tokens: int, device: torch.device, seed: Optional[int]):
        self.num_tokens = num_tokens
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @staticmethod
    def eligible(seq: Sequence, n: int) -> bool:
        """A decode sequence (one token left to compute) that may be drafted. A constrained one only
        in its answer under a grammar, whose drafts the engine cuts to what the grammar allows and
        verifies under its masks (LLMEngine._grammar_drafts)."""
        return (
            n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
            and (seq.structured is None or seq.structured.draftable()) and can_speculate(seq)
        )

    def draft_length(self, seq: Sequence, max_len: int, budget: int) -> int:
        """How many draft tokens a decode sequence may take: up to k, ending within max_tokens, the
        model's context (max_len) and the step's spare token budget."""
        return min(
            (seq.params.max_tokens or 0) - len(seq.output_token_ids) - 1,
            max_len - seq.num_tokens - 1,
            budget,
            self.num_tokens,
        )

    def propose(self, batch: Any, pool: Any, max_len: int, budget: int) -> dict[int, list[int]]:
        """seq_id -> draft for the step's eligible decode sequences, with KV blocks reserved, from
        draft_for (each sequence alone) until the step's spare token budget is spent."""
        drafts: dict[int, list[int]] = {}
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if budget < 1:
                break
            if not self.eligible(seq, n):
                continue
            try:
                draft = self.draft_for(seq, max_len, budget)
            except Exception:  # a draft only saves time: the sequence decodes without one
                logger.exception("no draft for request %s: proposing one failed", seq.request_id)
                continue
            if draft and pool.can_allocate(seq, 1 + len(draft)):
                pool.allocate(seq, 1 + len(draft))
                drafts[seq.seq_id] = draft
                budget -= len(draft)
        return drafts

    def draft_for(self, seq: Sequence, max_len: int, budget: int) -> list[int]:
        raise NotImplementedError

    def draft_probs(self, seq: Sequence) -> Optional[torch.Tensor]:
        """The distributions this step's draft for `seq` was drawn from ([k, V]), or None (deterministic)."""
        return None

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[int]:
        q = self.draft_probs(seq)
        if seq.generator is not None and not seq.params.greedy:  # a seeded request: its text is the seed's alone
            tokens = verify_seeded(logits, draft, seq.params, seq.generator)
        else:
            tokens = verify(logits, draft, seq.params, seq.generator or self.generator, None if q is None else q[: len(draft)])
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += len(tokens) - 1
        return tokens

    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def wait_compiled(self, timeout: Optional[float] = None) -> bool:
        return True

    def stop_compile(self) -> None:
        """Let a background build of the speculator's own compiled step go (none here)."""

    def describe(self) -> str:
        raise NotImplementedError


class PromptLookupSpeculator(Speculator):
    """Drafts from the sequence itself: the tokens that followed an earlier occurrence of its last n-gram."""

    def __init__(self, max_ngram: int, num_tokens: int, device: torch.device, seed: Optional[int], min_ngram: int = 1):
        super().__init__(num_tokens, device, seed)
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def draft_for(self, seq: Sequence, max_len: int, budget: int) -> list[int]:
        """A draft for one eligible decode sequence, capped so that it ends within max_tokens, the
        model's context (max_len) and the step's spare token budget."""
        left = self.draft_length(seq, max_len, budget)
        if left < 1:
            return []
        return propose_ngram_draft(seq.token_ids, self.max_ngram, left, self.min_ngram)

    def describe(self) -> str:
        return f"prompt lookup {self.num_tokens} tokens"


# Draft tokens per step from a request's predicted output (OpenAI's Predicted Outputs), whatever
# speculation the engine runs otherwise: a prediction is the client's own guess at the reply, long
# runs of it are accepted at once, and verifying a draft costs little more than decoding one token
# (the weights are read once for all its rows).
PREDICTION_DRAFT_TOKENS = 8
# The longest tail of the output looked up in the prediction once the output has left it.
PREDICTION_MAX_NGRAM = 8
# A one-token tail is looked up only this far past where the output left the prediction (a token
# replaced: the text goes on as predicted); further away one token matches by chance.
PREDICTION_NEAR = 16


class Prediction:
    """A sequence's predicted output as tokens, and where its output stands in it: output[:aligned]
    ends where tokens[:cursor] ends. Drafts are the prediction's tokens from the cursor on. Once the
    output leaves the prediction (cursor None), the draft comes from where the output's last tokens
    occur in it: the longest such tail (2 to PREDICTION_MAX_NGRAM tokens; one token only a little
    past where it left), its first occurrence from there on, else its last. A draft is as long as
    the last one held, plus one, doubled while whole drafts hold (up to PREDICTION_DRAFT_TOKENS):
    rows of a draft that misses cost a batch's step time for nothing."""

    __slots__ = ("tokens", "cursor", "aligned", "left_at", "draft_start", "draft_out_len", "length", "accepted", "rejected")

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.cursor: Optional[int] = 0  # the output starts as the prediction does
        self.aligned = 0
        self.left_at = 0  # the cursor when the output last left the prediction
        self.draft_start = 0
        self.draft_out_len = 0
        self.length = PREDICTION_DRAFT_TOKENS  # the next draft's length at most
        # OpenAI's accepted_prediction_tokens: the prediction's tokens the output took, drafted or
        # written as it said anyway; rejected_prediction_tokens: draft tokens it did not take
        self.accepted = 0
        self.rejected = 0

    def draft(self, output: list[int], num_tokens: int) -> list[int]:
        """Up to num_tokens tokens the prediction says follow `output` (none: no place in it fits)."""
        tokens, n_out = self.tokens, len(output)
        if self.cursor is not None and n_out > self.aligned:
            # tokens written since the last alignment (a bonus token, a step without a draft)
            new = np.asarray(output[self.aligned :], dtype=tokens.dtype)
            if np.array_equal(tokens[self.cursor : self.cursor + len(new)], new):
                self.cursor += len(new)
                self.accepted += len(new)  # the prediction's tokens, written as it said
            else:
                self.left_at, self.cursor = self.cursor, None
            self.aligned = n_out
        if self.cursor is None:
            self.cursor = self._find(output)
            if self.cursor is None:
                return []
            self.aligned = n_out
        self.draft_start, self.draft_out_len = self.cursor, n_out
        return tokens[self.cursor : self.cursor + min(num_tokens, self.length)].tolist()

    def _find(self, output: list[int]) -> Optional[int]:
        """Where in the prediction the output goes on: the end of the best occurrence of its tail."""
        tokens = self.tokens
        if not output or tokens.size < 2:
            return None
        # ends of the occurrences of the last token, with something after them to draft
        ends = np.flatnonzero(tokens[:-1] == output[-1]) + 1
        if not ends.size:
            return None
        longest = min(PREDICTION_MAX_NGRAM, len(output), int(ends.max()))
        tail = np.asarray(output[-longest:], dtype=tokens.dtype)
        length = np.ones(ends.size, dtype=np.int64)
        alive = np.ones(ends.size, dtype=bool)
        for j in range(2, longest + 1):  # how far back each occurrence agrees with the output
            idx = ends - j
            alive &= idx >= 0
            alive[alive] = tokens[idx[alive]] == tail[-j]
            length[alive] = j
            if not alive.any():
                break
        best = int(length.max())
        if best == 1:
            near = ends[(ends >= self.left_at) & (ends <= self.left_at + PREDICTION_NEAR)]
            return int(near[0]) if near.size else None
        chosen = ends[length == best]
        ahead = chosen[chosen >= self.left_at]
        return int(ahead[0] if ahead.size else chosen[-1])

    def verified(self, num_draft: int, num_accepted: int) -> None:
        """The draft of this step (its first num_draft tokens verified) kept num_accepted tokens."""
        self.accepted += num_accepted
        self.rejected += num_draft - num_accepted
        self.length = min(2 * self.length, PREDICTION_DRAFT_TOKENS) if num_accepted == num_draft else num_accepted + 1
        self.cursor = self.draft_start + num_accepted
        self.aligned = self.draft_out_len + num_accepted


class PredictionSpeculator(Speculator):
    """Drafts from the predicted outputs of the requests that give one (`Sequence.prediction`)."""

    def __init__(self, device: torch.device, seed: Optional[int]):
        super().__init__(PREDICTION_DRAFT_TOKENS, device, seed)

    def draft_for(self, seq: Sequence, max_len: int, budget: int) -> list[int]:
        if seq.prediction is None:
            return []
        left = self.draft_length(seq, max_len, budget)
        return seq.prediction.draft(seq.output_token_ids, left) if left > 0 else []

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[int]:
        tokens = super().verify(seq, logits, draft)
        seq.prediction.verified(len(draft), len(tokens) - 1)
        return tokens

    def describe(self) -> str:
        return f"predicted outputs {self.num_tokens} tokens"


def acceptance_words(engine: Any) -> str:
    """--stats' words on speculative decoding where it runs: the draft tokens accepted so far."""
    if engine.speculator is None:
        return ""
    stats = engine.stats()
    return f", drafts accepted {stats['spec_accepted_tokens']}/{stats['spec_draft_tokens']} ({stats['spec_acceptance_rate']:.0%})"


@dataclass
class SpeculativeSettings:
    """Speculation as the user asked for it (LLM's arguments or vLLM's speculative_config)."""

    num_tokens: int = 0  # draft tokens per step; 0: off
    draft_model: Optional[str] = None  # a folder, .gguf file or hub id; None: prompt lookup
    draft_quantization: str = "auto"
    ngram_max: int = 3
    ngram_min: int = 1


# A draft model given with no draft length drafts this many tokens per step.
DEFAULT_DRAFT_MODEL_TOKENS = 4
SPECULATIVE_CONFIG_KEYS = (
    "method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "quantization",
    "draft_tensor_parallel_size",
)


def speculative_settings(
    speculative_config: Optional[dict],
    speculative_model: Optional[str] = None,
    num_speculative_tokens: int = 0,
    speculative_ngram: int = 3,
) -> SpeculativeSettings:
    """vLLM's speculative_config ({"method": "ngram" | "draft_model", "model", "num_speculative_tokens",
    "prompt_lookup_max", "prompt_lookup_min", "quantization", "draft_tensor_parallel_size"}: 1, the
    draft whole on one rank, is how a draft runs here), or this engine's own arguments
    (speculative_model, num_speculative_tokens, speculative_ngram), as one SpeculativeSettings.
    A field given twice with two values, an unknown key or method, or a bad value is a ValueError
    naming it."""
    settings = SpeculativeSettings(num_tokens=num_speculative_tokens, draft_model=speculative_model, ngram_max=speculative_ngram)
    if speculative_model is not None and (not isinstance(speculative_model, str) or not speculative_model):
        raise ValueError(f"speculative_model={speculative_model!r} must be a path or hub id")
    if speculative_config is None:
        if settings.draft_model is not None and not settings.num_tokens:
            settings.num_tokens = DEFAULT_DRAFT_MODEL_TOKENS
        return settings
    if not isinstance(speculative_config, dict):
        raise ValueError(f"speculative_config={speculative_config!r} must be a dict (JSON object)")
    unknown = sorted(set(speculative_config) - set(SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"speculative_config: unknown key {unknown[0]!r} (known: {', '.join(SPECULATIVE_CONFIG_KEYS)})")
    method = speculative_config.get("method")
    model = speculative_config.get("model")
    if method not in (None, "ngram", "draft_model"):
        raise ValueError(f"speculative_config: method {method!r} is not supported (supported: 'ngram', 'draft_model')")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"speculative_config: model {model!r} must be a path or hub id")
        if method == "ngram":
            raise ValueError("speculative_config: method 'ngram' takes no model (drafts come from the prompt)")
        if settings.draft_model is not None and settings.draft_model != model:
            raise ValueError(f"speculative_config: model {model!r} differs from speculative_model={settings.draft_model!r}")
        settings.draft_model = model
    elif method == "draft_model" and settings.draft_model is None:
        raise ValueError("speculative_config: method 'draft_model' needs a model")
    elif method == "ngram" and settings.draft_model is not None:
        raise ValueError(f"speculative_config: method 'ngram' with speculative_model={settings.draft_model!r}")
    k = speculative_config.get("num_speculative_tokens")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens {k!r} must be a positive integer")
        if settings.num_tokens and settings.num_tokens != k:
            raise ValueError(f"speculative_config: num_speculative_tokens {k} differs from num_speculative_tokens={settings.num_tokens}")
        settings.num_tokens = k
    if not settings.num_tokens:
        if settings.draft_model is None:
            raise ValueError("speculative_config: num_speculative_tokens is required for prompt lookup ('ngram')")
        settings.num_tokens = DEFAULT_DRAFT_MODEL_TOKENS
    for key, field_name in (("prompt_lookup_max", "ngram_max"), ("prompt_lookup_min", "ngram_min")):
        v = speculative_config.get(key)
        if v is None:
            continue
        if settings.draft_model is not None:
            raise ValueError(f"speculative_config: {key} applies to prompt lookup ('ngram'), not to a draft model")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"speculative_config: {key} {v!r} must be a positive integer")
        setattr(settings, field_name, v)
    if settings.ngram_min > settings.ngram_max:
        raise ValueError(f"speculative_config: prompt_lookup_min {settings.ngram_min} exceeds prompt_lookup_max {settings.ngram_max}")
    draft_tp = speculative_config.get("draft_tensor_parallel_size")
    if draft_tp is not None:
        if settings.draft_model is None:
            raise ValueError("speculative_config: draft_tensor_parallel_size applies to a draft model")
        if draft_tp != 1 or isinstance(draft_tp, bool):
            raise ValueError(
                f"speculative_config: draft_tensor_parallel_size {draft_tp!r} is not supported: the draft model runs "
                "whole on rank 0 (1), beside a tensor-parallel target"
            )
    quantization = speculative_config.get("quantization")
    if quantization is not None:
        if settings.draft_model is None:
            raise ValueError("speculative_config: quantization applies to a draft model")
        if quantization not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"speculative_config: quantization {quantization!r} must be one of auto, none, int8, int4")
        settings.draft_quantization = quantization
    return settings
