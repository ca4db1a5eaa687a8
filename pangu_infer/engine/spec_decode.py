"""Speculative decoding by prompt lookup: n-gram drafts from the sequence itself, verified in one pass.

Each decode step, a sequence whose last n tokens (n = speculative_ngram down to 1) occurred
earlier in its prompt or output proposes the up to k tokens that followed that earlier
occurrence. The runner computes logits at the last token and at every draft token in one
forward; `verify` then keeps the longest acceptable prefix of the draft plus one token of its own:

- greedy rows accept a draft token while it equals the argmax, so the text is the one plain
  greedy decoding writes;
- sampled rows use standard speculative rejection sampling. The draft is deterministic (q is
  one-hot), so draft token d is accepted with probability p(d), and on rejection the token is
  drawn from p with d removed and renormalised; the output follows the target distribution p.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pangu_infer.engine.sampler import _top_k_top_p_threshold
from pangu_infer.engine.sequence import Sequence
from pangu_infer.sampling_params import SamplingParams


def propose_ngram_draft(token_ids: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest matching suffix."""
    n_total = len(token_ids)
    if num_tokens < 1 or n_total < 2:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_ngram, n_total - 1), 0, -1):
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
    allowed_token_ids) or that want logprobs take the plain path: verification scores the draft
    with the raw distribution."""
    p = seq.params
    return (
        not p.logit_bias
        and p.allowed_token_ids is None
        and p.repetition_penalty == 1
        and p.presence_penalty == 0
        and p.frequency_penalty == 0
        and p.logprobs is None
        and len(seq.output_token_ids) >= p.min_tokens
    )


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from, per row: temperature, top-k/top-p, min-p."""
    scaled = logits / params.temperature
    if params.top_k or params.top_p < 1:
        threshold = _top_k_top_p_threshold(scaled, [params] * scaled.shape[0])
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * params.min_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def verify(
    logits: torch.Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator
) -> list[int]:
    """logits [len(draft) + 1, V]: row j scores the token after draft[:j]. Returns the accepted
    draft prefix followed by one token chosen by the target model (1 to len(draft) + 1 tokens)."""
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
    u = torch.rand(k, device=generator.device, generator=generator).to(logits.device)
    rejected = (u >= p_draft).nonzero()
    if rejected.numel() == 0:
        last = probs[k]  # every draft token accepted: a bonus token from the next position
        accepted = k
    else:
        accepted = int(rejected[0, 0])
        last = probs[accepted].clone()
        last[draft[accepted]] = 0.0  # the residual max(p - q, 0) with a one-hot q
    token = int(torch.multinomial(last.to(generator.device), 1, generator=generator))
    return draft[:accepted] + [token]


class PromptLookupSpeculator:
    """Proposes drafts for a step's decode sequences and counts how many of them were accepted."""

    def __init__(self, max_ngram: int, num_tokens: int, device: torch.device, seed: Optional[int]):
        self.max_ngram = max_ngram
        self.num_tokens = num_tokens
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def draft_for(self, seq: Sequence, max_len: int, budget: int) -> list[int]:
        """A draft for one decode sequence, capped so that it ends within max_tokens, the model's
        context (max_len) and the step's spare token budget."""
        if not can_speculate(seq):
            return []
        left = min(
            (seq.params.max_tokens or 0) - len(seq.output_token_ids) - 1,
            max_len - seq.num_tokens - 1,
            budget,
            self.num_tokens,
        )
        if left < 1:
            return []
        return propose_ngram_draft(seq.token_ids, self.max_ngram, left)

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[int]:
        tokens = verify(logits, draft, seq.params, seq.generator or self.generator)
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += len(tokens) - 1
        return tokens

    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
