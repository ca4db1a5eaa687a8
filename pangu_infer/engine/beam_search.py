"""Beam search over the engine, as vLLM runs it: outside the sampler, every live beam one request
of one token per step, its candidates read from the top logprobs.

Each step, each live beam of a prompt is an engine request for its prompt plus the tokens the beam
has so far, with max_tokens 1 and logprobs 2 * beam_width (vLLM's, after transformers': enough that
beam_width candidates remain after the EOS ones). Its candidates are those tokens (logprobs of the
raw logits) plus, with temperature > 0, the token the request drew. A candidate that is EOS (the
engine's EOS ids; not with ignore_eos) ends its beam ("stop"); the others are ranked by
cum_logprob / length ** length_penalty (the same length for all of a step: the order of their
cumulative logprobs) and the best beam_width go on. After max_tokens steps, or when no beam is left,
the ended beams and the live ones ("length") are ranked by that score, the length counting the
prompt and the generated tokens without a final EOS (vLLM's get_beam_search_score), and the best
beam_width returned.

What a step costs: the requests of a step run together, in one engine step where the token budget
allows, and each forwards one token: a decode row (the compiled decode step where it is ready), one
per live beam. A beam's request finds its whole prefix but that token cached: its full blocks in the
prefix cache (the engine names every full block computed; a step's requests end and give their blocks
back before the next step's start, and those stay findable until reused), and the partly filled
block its parent's request left (BlockPool names it when that request ends: `share_prefix`), whose
first slots are copied into a fresh block of its own before the forward (siblings write their new
tokens apart): at most block_size - 1 slots of K and V per layer and beam
(`ModelRunner.copy_slots`). Where a block was reused meanwhile, that part is computed again instead.
The requests look their prefix up even with enable_prefix_caching off, as an n>1 request's forks do.
Full blocks shared by the beams of a prompt are held once.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from pangu_infer.engine.admission import Limits, admit
from pangu_infer.engine.sequence import Logprob
from pangu_infer.errors import RequestError, RequestFailedError
from pangu_infer.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from pangu_infer.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class _Beam:
    generated: list[int]  # the tokens after the prompt
    cum_logprob: float
    logprobs: list[dict[int, float]]  # per generated token: the candidates of its step
    ended: bool = False  # by EOS (its last generated token)


class BeamSearch:
    """The beams of one prompt: `inputs()` are the token lists to run this step (one token each,
    with step_params), `advance()` takes each one's logprob entry, `output()` the best sequences."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: Any):
        self.prompt = list(prompt_token_ids)
        self.params = params
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.beams = [_Beam([], 0.0, [])]
        self.completed: list[_Beam] = []  # ended by EOS: at most beam_width, the best so far
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def inputs(self) -> list[list[int]]:
        return [self.prompt + b.generated for b in self.beams]

    def _length(self, beam: _Beam) -> int:
        return max(len(self.prompt) + len(beam.generated) - (1 if beam.ended else 0), 1)

    def score(self, beam: _Beam) -> float:
        """cum_logprob / length ** length_penalty; where the power passes the float range, its limit
        (-0.0 for a power too large, -inf for one too small) instead of an OverflowError."""
        try:
            denominator = self._length(beam) ** self.params.length_penalty
        except OverflowError:
            denominator = math.inf
        if denominator == 0.0:
            return -math.inf if beam.cum_logprob < 0 else 0.0
        return beam.cum_logprob / denominator

    def _rank(self, beam: _Beam) -> tuple[float, float]:
        """The score, then (where scores are limits that tie) the logarithm of its magnitude, negated:
        the order of the exact scores (cumulative logprobs are <= 0)."""
        cum = beam.cum_logprob
        log_magnitude = -math.inf if cum == 0 else math.log(-cum) - self.params.length_penalty * math.log(self._length(beam))
        return self.score(beam), -log_magnitude

    def advance(self, entries: list[Logprob]) -> None:
        """One step: entry i is the logprob entry (the drawn token and the top ones) of beam i's token."""
        if len(entries) != len(self.beams):
            raise RuntimeError(f"{len(entries)} step results for {len(self.beams)} beams")
        width = self.params.beam_width
        live: list[tuple[float, int, int, dict[int, float]]] = []  # (cum logprob, beam, token, candidates)
        for i, (beam, entry) in enumerate(zip(self.beams, entries)):
            candidates = {int(t): float(v) for t, v in entry.top}
            candidates.setdefault(int(entry.token_id), float(entry.logprob))  # the drawn token (temperature > 0)
            for token, logprob in candidates.items():
                cum = beam.cum_logprob + logprob
                if token in self.eos:
                    self.completed.append(_Beam(beam.generated + [token], cum, beam.logprobs + [candidates], ended=True))
                else:
                    live.append((cum, i, token, candidates))
        # One length for every live candidate: the score's order is the cumulative logprob's. Stable:
        # ties keep beam order, then each beam's candidates best first (vLLM's order).
        live.sort(key=lambda c: c[0], reverse=True)
        self.beams = [
            _Beam(self.beams[i].generated + [token], cum, self.beams[i].logprobs + [candidates])
            for cum, i, token, candidates in live[:width]
        ]
        # An ended beam's score never changes: only the best beam_width can be returned.
        self.completed = sorted(self.completed, key=self._rank, reverse=True)[:width]
        self.steps += 1

    def output(self, decode: Optional[Callable[[list[int]], str]]) -> BeamSearchOutput:
        best = sorted(self.completed + self.beams, key=self._rank, reverse=True)[: self.params.beam_width]
        sequences = []
        for beam in best:
            keep = beam.generated if not beam.ended or self.params.include_stop_str_in_output else beam.generated[:-1]
            tokens = self.prompt + keep
            sequences.append(BeamSearchSequence(
                tokens=tokens,
                logprobs=beam.logprobs,
                cum_logprob=beam.cum_logprob,
                text=decode(tokens) if decode is not None else None,
                finish_reason="stop" if beam.ended else "length",
                stop_reason=beam.generated[-1] if beam.ended else None,
                score=self.score(beam),
                num_prompt_tokens=len(self.prompt),
            ))
        return BeamSearchOutput(sequences)


def step_params(params: BeamSearchParams) -> SamplingParams:
    """What each beam's request of a step runs with: one token, the 2 * beam_width top logprobs."""
    return SamplingParams(max_tokens=1, temperature=params.temperature, logprobs=2 * params.beam_width,
                          skip_special_tokens=params.skip_special_tokens)


def check_prompt(prompt_token_ids: list[int], params: BeamSearchParams, limits: Limits) -> None:
    """The checks of a request of the longest beam (the prompt, max_tokens after it: the context,
    the KV pool, the vocabulary; the 2 * beam_width top logprobs of its steps against the engine's
    max_logprobs), before any step: a RequestError naming the field."""
    admit(list(prompt_token_ids), SamplingParams(max_tokens=params.max_tokens), limits)
    widest = widest_beam(limits)
    if widest is not None and params.beam_width > widest:
        raise RequestError(
            f"beam_width={params.beam_width} reads {2 * params.beam_width} top logprobs a step (2 * beam_width), more "
            f"than this engine's max_logprobs={limits.max_logprobs}: at most beam_width={widest} here "
            "(or start it with a higher --max-logprobs)",
            param="beam_width",
        )


def widest_beam(limits: Limits) -> Optional[int]:
    """The widest beam whose steps' 2 * beam_width top logprobs the engine's max_logprobs allows
    (None: no limit)."""
    return None if limits.max_logprobs == -1 else limits.max_logprobs // 2


def step_entry(out: RequestOutput) -> Logprob:
    """The logprob entry of a beam's one-token request; its failure raised as the engine's would be."""
    if out.error is not None:
        raise RequestError(out.error, param=out.error_param) if out.error_param else RequestFailedError(out.error)
    comp = out.outputs[0]
    if not comp.logprobs:
        raise RequestFailedError(f"beam search step {out.request_id} ended without a token ({comp.finish_reason})")
    return comp.logprobs[0]


def completions(search: BeamSearch, decode: Callable[[list[int]], str]) -> list[CompletionOutput]:
    """The server's reply to one prompt: its best beam_width beams as completions, best first, each
    whole at once (text_delta and token_ids_delta: all of it), as vLLM's server answers."""
    outs = []
    for i, seq in enumerate(search.output(None).sequences):
        ids = seq.output_token_ids
        # (a kept EOS's text is left out of the text, as vLLM's server leaves it)
        text = decode(ids[:-1] if seq.finish_reason == "stop" and search.params.include_stop_str_in_output else ids)
        outs.append(CompletionOutput(index=i, text=text, token_ids=ids, cumulative_logprob=seq.cum_logprob, finish_reason=seq.finish_reason,
                                     stop_reason=seq.stop_reason, text_delta=text, token_ids_delta=list(ids)))
    return outs


async def beam_search_stream(
    engine: Any,
    prompt_token_ids: list[int],
    params: BeamSearchParams,
    request_id: str,
    prompt: Optional[str] = None,
    **extra: Any,
) -> AsyncIterator[RequestOutput]:
    """An AsyncEngine's beam search of one prompt, as a stream of one output (finished): the
    server's use_beam_search. Each step's beams run as requests of the AsyncEngine beside any other
    request (`extra`: generate's lora_request, cache_salt, priority). A RequestError (a 400) when the
    prompt and max_tokens do not fit, on the first iteration; closing it or cancelling it aborts the
    step's requests (each generate aborts its own)."""
    llm_engine = engine.engine
    check_prompt(prompt_token_ids, params, llm_engine.limits)
    search = BeamSearch(prompt_token_ids, params, llm_engine.eos_token_ids)
    each = step_params(params)

    async def one(ids: list[int], rid: str) -> Logprob:
        last = None
        async for out in engine.generate(ids, each, rid, share_prefix=True, **extra):
            last = out
        return step_entry(last)

    while not search.done:
        inputs = search.inputs()
        tasks = [asyncio.ensure_future(one(ids, f"{request_id}-beam{search.steps}.{i}")) for i, ids in enumerate(inputs)]
        try:
            entries = await asyncio.gather(*tasks)
        finally:  # one failed or the client left: the step's other requests end too
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        search.advance(list(entries))
    tok = llm_engine.tokenizer

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=params.skip_special_tokens) if tok is not None else ""

    yield RequestOutput(request_id, prompt, list(prompt_token_ids), completions(search, decode), True)
