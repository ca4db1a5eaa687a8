"""Batched next-token sampling: float32 logits [B, V] plus per-row parameters -> one token per row.

Each step applies, as HF and vLLM do:

    allowed_token_ids (all others masked) -> logit_bias (added) -> bad_words (masked)
    -> min_tokens (stop and eos tokens masked) -> repetition penalty (prompt + output)
    -> presence / frequency penalties (output only) -> temperature -> top_k -> top_p -> min_p -> draw

Greedy rows (temperature below 1e-5, as in vLLM) take the argmax of the penalized logits and
consume no randomness. A seeded row draws by an exponential race, argmax(probs / E) with
E ~ Exp(1) per token, which picks token i with probability probs[i]; its noise comes from its own
generator, always with shape [V], so its tokens do not depend on the rest of the batch or its
position in it (and speculative verification repeats the race). The other sampled rows take one
uniform draw each from the sampler's generator through their cumulative distribution (the same
distribution, without V random numbers per row); under top_k or top_p, over their shortlist alone.

top_k and top_p become one logit threshold per row, so tokens tied with the last survivor survive
too (as in vLLM); with distinct logits that is exactly "the k largest" / "the smallest set whose
probability reaches top_p".

Logprobs follow vLLM: they are the log_softmax of the raw model logits, before min_tokens,
penalties, temperature and top-k/top-p/min-p filtering, so they describe what the model
predicted, not the (possibly truncated) distribution the token was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from pangu_infer.sampling_params import SamplingParams

# how many of the largest logits top_p looks at before falling back to sorting the whole vocabulary
_TOP_P_CANDIDATES = 1024


class BadWords:
    """A request's bad words as token sequences, grouped by the length of their prefix (all but the
    last token): prefix -> the last tokens it bans. A step looks up the output's last k tokens once
    per prefix length k, not once per word."""

    def __init__(self, words: Sequence[Sequence[int]]):
        self.by_prefix: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for word in words:
            self.by_prefix.setdefault(len(word) - 1, {}).setdefault(tuple(word[:-1]), []).append(word[-1])

    def banned(self, out: Sequence[int]) -> list[int]:
        """The tokens to ban after output `out` (vLLM's rule: the prompt does not count)."""
        n, found = len(out), []
        for k, table in self.by_prefix.items():
            if k <= n:
                found += table.get(tuple(out[n - k :]) if k else (), ())
        return found


@dataclass
class SamplingRow:
    """One row of the batch: its parameters, its random source and its token history."""

    params: SamplingParams
    generator: torch.Generator | None = None  # set when params.seed is; None -> the sampler's own
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()
    # the request's bad_words as token id sequences (LLMEngine.bad_words_ids), grouped
    bad_words: "BadWords | None" = None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # raw-logit logprob of every row's token once any row asks, else None
    top_logprobs: list[list[tuple[int, float]] | None]  # per row, when its params.logprobs = k > 0
    # rows whose own restrictions (allowed_token_ids, bad_words, min_tokens, a grammar's mask) left
    # no token at all: their token is meaningless, the request cannot go on (the caller ends it)
    blocked: list[int] = field(default_factory=list)


class Sampler:
    """Picks the next token of every row in one call; see the module docstring for the semantics."""

    def __init__(self, seed: int | None = None, batch_invariant: bool = False):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # Row by row whenever a row needs more than the argmax: elementwise exp/log over a [B, V]
        # batch take a scalar path for the elements past the last whole vector, so a row's
        # logprobs or top-p cut-off could depend on the rows after it (batch-invariant mode).
        self.batch_invariant = batch_invariant

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        token_bitmask: torch.Tensor | None = None,
        masked_rows: Sequence[int] = (),
    ) -> SampleResult:
        """token_bitmask: xgrammar's packed allowed-token mask [len(rows), ceil(V / 32)] (int32),
        applied to `masked_rows` only (structured outputs); logprobs stay those of the raw logits."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if self.batch_invariant and len(rows) > 1 and not all(
            r.params.greedy and r.params.logprobs is None and not _changes_logits(r) for r in rows
        ):
            masked = set(masked_rows) if token_bitmask is not None else set()
            return _concat([
                self(logits[i : i + 1], [row], token_bitmask[i : i + 1] if i in masked else None, (0,) if i in masked else ())
                for i, row in enumerate(rows)
            ])
        raw = logits
        if token_bitmask is not None and masked_rows:
            from pangu_infer.engine.structured import apply_bitmask

            logits = logits.clone(memory_format=torch.contiguous_format)
            apply_bitmask(logits, token_bitmask, list(masked_rows))
        blocked: list[int] = []
        if all(r.params.greedy and not _changes_logits(r) for r in rows):
            # the usual decode step: nothing else to do (a grammar's empty mask is caught before)
            token_ids = row_argmax(logits)
        else:
            token_ids, blocked = self._sample(logits, rows)
        result = _result(raw, token_ids, [r.params for r in rows])
        result.blocked = blocked
        return result

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, list[int]]:
        """The rows' tokens, and the rows left with no token allowed (SampleResult.blocked)."""
        blocked: list[int] = []
        if any(_changes_logits(r) for r in rows):
            # edited in place below; the caller's logits stay raw, for logprobs
            logits = logits.clone(memory_format=torch.contiguous_format)
            _apply_allowed_and_bias_(logits, rows)
            _ban_bad_words_(logits, rows)
            _suppress_stop_tokens_(logits, rows)
            _apply_penalties_(logits, rows)
            if any(_restricts(r) for r in rows):
                # the restrictions together may exclude every token (allowed_token_ids holding only
                # stop tokens under min_tokens, or none that the grammar's mask allows): drawn from a
                # row of -inf (NaN probabilities) the token would be arbitrary, against them all
                blocked = torch.isneginf(logits).all(dim=-1).nonzero().flatten().tolist()
                if blocked:
                    logits[blocked] = 0.0
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return row_argmax(logits), blocked
        token_ids = row_argmax(logits) if greedy else logits.new_empty(len(rows), dtype=torch.long)
        # unseeded rows with top_k or top_p draw among their shortlist alone; the others race
        short = [i for i in sampled if rows[i].generator is None and (rows[i].params.top_k or rows[i].params.top_p < 1)]
        raced = sorted(set(sampled) - set(short))
        for part, draw in ((short, self._draw_shortlisted), (raced, self._draw_raced)):
            if part:
                index = torch.tensor(part, device=logits.device)
                token_ids[index] = draw(logits[index] if len(part) < len(rows) else logits, [rows[i] for i in part])
        return token_ids, blocked

    def _draw_raced(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        return self._draw(race_probs(logits, [r.params for r in rows]), rows)

    def _draw_shortlisted(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Unseeded rows with top_k or top_p: each row's token drawn among the tokens at or above its
        cut-off only (weights exp(logit - the row's largest), min_p applied to them; the inverse of
        their cumulative distribution at one uniform draw), with no pass over the whole vocabulary
        after the cut-off is found: 16 rows of 153k under top_p 0.8, 41.8 -> 15.7 ms on a Zen 3
        (benchmarks/sampler.py). The same distribution as the race over race_probs."""
        params = [r.params for r in rows]
        scaled = _scaled(logits, params)
        n = scaled.shape[0]
        row, col = (scaled >= _top_k_top_p_threshold(scaled, params)).nonzero(as_tuple=True)
        value = scaled[row, col]
        largest = value.new_full((n,), float("-inf")).scatter_reduce_(0, row, value, "amax")
        weight = (value - largest[row]).exp_().to(torch.float64)  # (150k: 0.19 ms; exp after the cast 1.5)
        # an infinite logit (a model's overflow) makes its row's weights NaN: that row is drawn
        # below, by its argmax, and its weights stay out of the sums every later row reads
        broken = weight.isnan()
        broken_rows = row[broken].unique().tolist() if bool(broken.any()) else []
        weight = weight.masked_fill(broken, 0.0) if broken_rows else weight
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float64, device=weight.device)
            weight = weight.masked_fill(weight < min_p[row], 0.0)
        count = torch.bincount(row, minlength=n)
        if not len(col):  # no row kept a token (every row's logits hold NaN): each its argmax
            return row_argmax(scaled)
        end = count.cumsum(0)
        start = end - count
        cdf = weight.cumsum(0)
        before = torch.where(start > 0, cdf[(start - 1).clamp(min=0)], cdf.new_zeros(()))
        u = torch.empty(n, dtype=torch.float64, device=weight.device).uniform_(generator=self._default_generator(weight.device))
        at = torch.searchsorted(cdf, before + u * (cdf[(end - 1).clamp(min=0)] - before), right=True)
        at = torch.minimum(torch.maximum(at, start), (end - 1).clamp(min=0))
        tokens = col[at]
        odd = (count == 0) | (weight[at] <= 0)  # rare: a row with no token left (NaN logits), or rounding past its last weight
        for i in sorted(set(odd.nonzero().flatten().tolist()) | set(broken_rows)):
            if count[i] == 0 or i in broken_rows:
                tokens[i] = row_argmax(scaled[i : i + 1])[0]
            else:
                tokens[i] = col[int(start[i]) + int(torch.nonzero(weight[start[i] : end[i]] > 0)[-1])]
        return tokens

    def _draw(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Each row's token [n] from its probabilities [n, V] (unnormalized). A seeded row: the
        exponential race with its generator's next [V] draw (seeded_noise, which speculative
        verification repeats). The others: the inverse of the cumulative distribution (float64 sums)
        at one uniform draw each from the sampler's generator, instead of V draws, their logarithms
        and a division per row (about 1 ms of a 153k-token row's draw on a Zen 3, benchmarks/sampler.py)."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=probs.device)
        shared = [j for j, r in enumerate(rows) if r.generator is None]
        if shared:
            index = torch.tensor(shared, device=probs.device)
            tokens[index] = self._inverse_cdf(probs[index] if len(shared) < len(rows) else probs)
        for j, row in enumerate(rows):
            if row.generator is not None:
                tokens[j] = row_argmax((probs[j] / seeded_noise(row.generator, probs.shape[1]).to(probs.device))[None])[0]
        return tokens

    def _inverse_cdf(self, probs: torch.Tensor) -> torch.Tensor:
        """Token i of each row with probability probs[i] / sum(probs), at one uniform draw each from
        the sampler's generator (inverse_cdf)."""
        u = torch.empty(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
        return inverse_cdf(probs, u.uniform_(generator=self._default_generator(probs.device)))

    def _default_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's token [n] for its uniform draw u [n, 1] (float64, in [0, 1)) through the row's
    probabilities [n, V] (unnormalized): the first token whose cumulative sum exceeds u times the
    row's total (float64: the sums of 153k float32 probabilities lose nothing a draw could see).
    Tokens of probability 0 are never picked."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)
    # u * total rounding up to the total (odds about 2**-53) would land past the last token of
    # positive probability: take that token
    past = (probs.gather(1, picked) <= 0).squeeze(1)
    if bool(past.any()):
        last = probs.shape[1] - 1 - row_argmax((probs[past] > 0).flip(-1).to(torch.float32))
        picked[past] = last[:, None].to(picked.device)
    return picked.squeeze(1)


def race_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The probabilities [n, V] a sampled row races with (each row under its own temperature,
    top-k/top-p and min-p), unnormalized after min-p: the race's argmax does not change when a row is
    scaled. Speculative verification of a seeded row (spec_decode.verify_seeded) computes the very
    token the sampler would, from these and seeded_noise."""
    scaled = _scaled(logits, params)
    if any(p.top_k or p.top_p < 1 for p in params):
        scaled = scaled.masked_fill(scaled < _top_k_top_p_threshold(scaled, params), float("-inf"))
    probs = softmax_limit(scaled)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], 0.0)
    return probs


def softmax_limit(scaled: torch.Tensor) -> torch.Tensor:
    """Each row's softmax; a row holding +inf (a logit past the float range: a positive one over a
    repetition penalty near 0, a model's overflow) is its limit, uniform over its +inf tokens.
    softmax makes such a row NaN throughout, and a NaN row drew token 0 or the last one, a masked
    token as likely as any. (A row of NaN logits, with no +inf, stays NaN: some token.)"""
    probs = scaled.softmax(dim=-1)
    if not scaled.shape[1]:
        return probs
    broken = probs[:, 0].isnan()  # (one NaN makes its whole row NaN: a look at one column finds them)
    if bool(broken.any()):
        rows = broken.nonzero().flatten()
        infinite = torch.isposinf(scaled[rows])
        limit = infinite.any(dim=-1)
        uniform = infinite[limit].to(probs.dtype)
        probs[rows[limit]] = uniform / uniform.sum(dim=-1, keepdim=True)
    return probs


def _scaled(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The rows' logits over their temperatures (the same tensor where every temperature is 1: not to
    be edited in place)."""
    if all(p.temperature == 1 for p in params):
        return logits
    return logits / temperatures(params, torch.get_default_dtype(), logits.device)[:, None]


def temperatures(params: list[SamplingParams], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The rows' temperatures [n] in `dtype`, each at most its largest finite value: a temperature a
    double holds and a float32 does not (1e308) was infinite there, and a masked logit (-inf) over it
    NaN, so a grammar's or allowed_token_ids' masked tokens were drawn. At that bound the draw is
    already uniform over the tokens the masks leave."""
    top = torch.finfo(dtype).max
    return torch.tensor([min(p.temperature, top) for p in params], dtype=dtype, device=device)


def seeded_noise(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """A seeded row's Exp(1) noise [V] for its next token: one [V] draw of its generator, on the
    generator's own device (so a CPU generator works for any logits). The sampler and speculative
    verification take a seeded request's n-th output token from its n-th draw, so its tokens do
    not depend on which of them wrote which."""
    return _exponential_(torch.empty(vocab, device=generator.device).uniform_(generator=generator))


def _exponential_(uniform: torch.Tensor) -> torch.Tensor:
    """U(0, 1) -> Exp(1) in place: -log(U), several times faster than Tensor.exponential_ on CPU. U =
    0 gives inf (that token sits out this draw, odds 2**-24); the clamp keeps a 0/0 NaN from winning."""
    return uniform.log_().neg_().clamp_min_(torch.finfo(uniform.dtype).tiny)


def _changes_logits(row: SamplingRow) -> bool:
    p = row.params
    return (
        bool(p.logit_bias)
        or p.allowed_token_ids is not None
        or p.repetition_penalty != 1
        or p.presence_penalty != 0
        or p.frequency_penalty != 0
        or bool(_suppressed_tokens(row))
        or bool(_banned_tokens(row))
    )


def _restricts(row: SamplingRow) -> bool:
    """Can this row's own parameters mask tokens to -inf (not only shift them)?"""
    p = row.params
    return p.allowed_token_ids is not None or row.bad_words is not None or len(row.output_token_ids) < p.min_tokens


def _banned_tokens(row: SamplingRow) -> list[int]:
    """The last token of every bad word whose other tokens the output ends with (vLLM's rule: a
    one-token word is always banned; the prompt does not count)."""
    return row.bad_words.banned(row.output_token_ids) if row.bad_words is not None else []


def _ban_bad_words_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    pairs = [(i, t) for i, r in enumerate(rows) for t in _banned_tokens(r)]
    if pairs:
        index = torch.tensor(pairs, device=logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")


def _suppressed_tokens(row: SamplingRow) -> list[int]:
    """Tokens that would end the request, masked while it is still shorter than min_tokens."""
    p = row.params
    if len(row.output_token_ids) >= p.min_tokens:
        return []
    # with ignore_eos, eos does not end the request, so masking it would only distort sampling
    eos = [] if p.ignore_eos else list(row.eos_token_ids)
    return eos + list(p.stop_token_ids)


def _apply_allowed_and_bias_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """allowed_token_ids: every other token of the row to -inf; then logit_bias added (OpenAI)."""
    device = logits.device
    for i, row in enumerate(rows):
        allowed = row.params.allowed_token_ids
        if allowed is not None:
            index = torch.tensor(allowed, device=device)
            keep = logits[i, index]
            logits[i].fill_(float("-inf"))
            logits[i, index] = keep
    triples = [(i, t, b) for i, r in enumerate(rows) for t, b in (r.params.logit_bias or {}).items()]
    if triples:
        row_ids, token_ids, biases = zip(*triples)
        bias = torch.tensor(biases, dtype=logits.dtype, device=device)
        logits.index_put_((torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)), bias, accumulate=True)


def _suppress_stop_tokens_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    pairs = [(i, t) for i, r in enumerate(rows) for t in _suppressed_tokens(r)]
    if pairs:
        index = torch.tensor(pairs, device=logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")


def _apply_penalties_(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty over prompt + output (HF), then presence/frequency over output (OpenAI).

    Works on the (row, token) pairs that occur in the histories rather than on dense [B, V]
    tensors: a few thousand entries instead of several full passes over 32 x 153k logits.
    """
    params = [r.params for r in rows]
    device, vocab = logits.device, logits.shape[1]
    flat = logits.view(-1)
    if any(p.repetition_penalty != 1 for p in params):
        seen, _ = _occurrences([(i, seq) for i, r in enumerate(rows) if r.params.repetition_penalty != 1
                                for seq in (r.prompt_token_ids, r.output_token_ids)], vocab, device)
        # held to float32's normal range: a penalty under float32's range (1e-300) was 0 there (a masked
        # -inf times it NaN, which the argmax takes), one over it inf (a logit of 0 times it NaN)
        tiny, top = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
        penalty = torch.tensor([min(max(p.repetition_penalty, tiny), top) for p in params], device=device)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        seen, counts = _occurrences([(i, r.output_token_ids) for i, r in enumerate(rows)
                                     if r.params.presence_penalty != 0 or r.params.frequency_penalty != 0],
                                    vocab, device)
        row_of = seen // vocab
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[row_of]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[row_of]
        flat[seen] -= frequency * counts + presence


def _occurrences(
    histories: list[tuple[int, Sequence[int]]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct (row, token) pairs in the given sequences, as flat indices row * V + token,
    and how often each occurs."""
    tokens = torch.cat([torch.as_tensor(seq, dtype=torch.long).reshape(-1) for _, seq in histories])
    lengths = torch.tensor([len(seq) for _, seq in histories])
    row_ids = torch.repeat_interleave(torch.tensor([i for i, _ in histories]), lengths)
    seen, counts = torch.unique((row_ids * vocab + tokens).to(device), return_counts=True)
    return seen, counts.to(torch.float32)


def _top_k_top_p_threshold(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Per row [n, 1], the smallest logit that survives top_k and then top_p (ties with it survive too).

    Sorting the whole vocabulary is slow (a batch of rows of 153k logits), so this first looks only
    at the largest _TOP_P_CANDIDATES logits (or the largest top_k asked for), then at 16 times as
    many, and so on, and sorts everything only when some row's top_p nucleus ends in none of them.
    """
    device, vocab = logits.device, logits.shape[1]
    top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=device)
    # 2.0, not 1.0, for disabled rows: a cumulative sum rounding to 1 must not cut the tail
    top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=device)
    n = min(vocab, max([_TOP_P_CANDIDATES] + [p.top_k for p in params]))
    # the rows' logsumexp over the whole vocabulary, for rows whose top_k is not among the candidates
    # (top_p then measured over everything): needed at every shortlist short of the whole row
    whole = logits.logsumexp(dim=-1) if bool((top_k > n).any()) else None
    while True:
        threshold, resolved = _threshold_among_largest(logits, top_k, top_p, n, whole)
        if resolved or n == vocab:
            break
        n = min(vocab, 16 * n)
    # a row with neither filter (beside rows with one) keeps every token, not its n largest
    unfiltered = (top_k >= vocab) & (top_p > 1)
    return threshold.masked_fill(unfiltered[:, None], float("-inf")) if bool(unfiltered.any()) else threshold


def _threshold_among_largest(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, n: int, whole: torch.Tensor | None
) -> tuple[torch.Tensor, bool]:
    """The top_k / top_p cut-off found among the n largest logits, and whether n was enough. `whole`:
    the rows' logsumexp over all logits, given wherever some row's top_k exceeds n."""
    values = largest_sorted(logits, n)
    in_top_k = torch.arange(n, device=logits.device) < top_k[:, None]
    values = values.masked_fill(~in_top_k, float("-inf"))
    # top_p is measured in the distribution renormalized over the top_k survivors
    has_top_k = top_k <= n
    if bool(has_top_k.all()):
        log_z = values.logsumexp(dim=-1)
    else:
        log_z = torch.where(has_top_k, values.logsumexp(dim=-1), whole) if bool(has_top_k.any()) else whole
    probs = (values - log_z[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    # a token stays while the mass before it is below top_p: the smallest set reaching top_p,
    # never empty since the first token has nothing before it
    keep = in_top_k & (mass - probs < top_p[:, None])
    resolved = has_top_k | (top_p > 1) | (mass[:, -1] >= top_p)
    # (a row holding NaN keeps nothing: its first value, NaN, stands for it)
    return values.gather(1, keep.sum(dim=-1, keepdim=True).clamp(min=1) - 1), bool(resolved.all())


def _numpy_rows(x: torch.Tensor) -> bool:
    """Do x's rows go through numpy (float32 on the CPU)? Its SIMD sort, partition and argmax run
    many times faster than torch's CPU ones on a row of 153k logits (benchmarks/RESULTS.md,
    "the sampler's sort and argmax"): 15 ms against 0.9 ms a full sort, 1.0 against 0.2 ms the
    1024 largest, 0.17 against 0.02 ms an argmax."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and not x.requires_grad


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax [B, V] -> [B] int64: the first of equal maxima, NaN above everything (as
    torch.argmax and numpy.argmax both count)."""
    if _numpy_rows(x) and x.shape[1]:
        return torch.from_numpy(np.argmax(x.numpy(), axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def largest_sorted(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest values of each row, largest first [B, n] (NaN first, as torch's descending
    sort): values only, which any exact selection and sort give alike, bit for bit."""
    vocab = x.shape[1]
    if _numpy_rows(x) and 0 < n:
        a = x.numpy()
        if n < vocab:
            a = np.partition(a, vocab - n, axis=-1)[:, vocab - n :]
        return torch.from_numpy(np.sort(a, axis=-1)[:, ::-1].copy())  # (a copy: C order, positive strides)
    return x.topk(n, dim=-1).values if n < vocab else x.sort(dim=-1, descending=True).values


def _concat(parts: list[SampleResult]) -> SampleResult:
    """One-row results joined (a row that asked no logprobs gets 0.0, never read)."""
    any_logprobs = any(p.logprobs is not None for p in parts)
    return SampleResult(
        [p.token_ids[0] for p in parts],
        [p.logprobs[0] if p.logprobs is not None else 0.0 for p in parts] if any_logprobs else None,
        [p.top_logprobs[0] for p in parts],
        [i for i, p in enumerate(parts) if p.blocked],
    )


def _result(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SampleResult:
    """Token ids plus the logprobs asked for, read from the raw logits."""
    wants = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wants:
        return SampleResult(token_ids.tolist(), None, [None] * len(params))
    log_z = logits.logsumexp(dim=-1)
    chosen = logits.gather(1, token_ids[:, None]).squeeze(1) - log_z
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * len(params)
    top_rows = [i for i in wants if params[i].logprobs > 0]
    if top_rows:
        k_max = min(max(params[i].logprobs for i in top_rows), logits.shape[1])
        index = torch.tensor(top_rows, device=logits.device)
        values, ids = logits[index].topk(k_max, dim=-1)  # sorted, largest first
        values = (values - log_z[index, None]).tolist()
        ids = ids.tolist()
        for j, i in enumerate(top_rows):
            k = params[i].logprobs
            top_logprobs[i] = list(zip(ids[j][:k], values[j][:k]))
    return SampleResult(token_ids.tolist(), chosen.tolist(), top_logprobs)


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[tuple[float, list[tuple[int, float]], int]]:
    """Per row of raw logits [R, V]: the log_softmax value of that row's target token, the k most
    likely tokens, best first, and the target's rank (the tokens of a logit at least its own, itself
    included, as vLLM counts: 1 for the likeliest, and ties share the last place) (prompt
    logprobs: row p scores prompt token p + 1); the arithmetic of a sampled token's logprobs (_result)."""
    logits = logits.float()
    target = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    result = _result(logits, target, [SamplingParams(logprobs=k)] * len(target))
    ranks = (logits >= logits.gather(1, target[:, None])).sum(dim=1).tolist()
    return [(c, top or [], r) for c, top, r in zip(result.logprobs, result.top_logprobs, ranks)]
