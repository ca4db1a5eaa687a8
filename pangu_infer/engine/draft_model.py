"""Speculative decoding with a draft model: a smaller model of the same tokenizer proposes k tokens
per decode sequence, one at a time, and the target verifies them in one forward (vLLM's
`speculative_config={"model": ..., "num_speculative_tokens": k}`, llama.cpp's `--model-draft`).

The draft model has a KV cache of its own, run by a ModelRunner of its own, paged by the target's
block tables: each sequence's draft keys and values lie at the same slots as the target's, so no
block bookkeeping of its own is needed (the engine sizes its blocks for both caches). The draft
cache follows the target's: every token the target computes in a step (prefill chunks and
decodes alike) is computed by the draft in the same step, before the target's forward, in one
forward with the catch-up of the drafted sequences. `Sequence.draft_computed` counts the tokens
whose draft KV is valid, of which the draft tokens the target rejected do not count.

Greedy requests draft the draft model's argmax, and write the text plain greedy decoding writes.
Sampled requests draw their drafts from the draft model's distribution under their own temperature,
top-k/top-p and min-p, kept for verification: spec_decode.verify's rejection sampling then keeps
them on the target's distribution, and accepts more than an argmax draft would where the two
models agree. A seeded request's drafts race with the draws its target tokens will be taken from
(spec_decode.verify_seeded), so its text is its seed's alone.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from pangu_infer.engine.runner import ModelRunner
from pangu_infer.engine.sampler import seeded_noise
from pangu_infer.engine.scheduler import ScheduledBatch
from pangu_infer.engine.sequence import Sequence
from pangu_infer.engine.spec_decode import Speculator, rows_probs

logger = logging.getLogger("pangu_infer.engine")


class _DraftView:
    """What the draft's runner reads of a sequence: its tokens up to `num_tokens`, of which
    `num_computed_tokens` have draft KV, in the sequence's own blocks. The runner computes logits
    where the view's last token is computed; `wants` marks the rows a draft token is taken from."""

    __slots__ = ("seq", "seq_id", "token_ids", "num_computed_tokens", "num_tokens", "block_table", "num_prompt_tokens", "wants")
    lora_slot = -1
    wants_prompt_logprobs = False
    pooling = None

    @property
    def params(self) -> Any:
        """The sequence's sampling parameters (its max_tokens: the runner's estimate of the steps left)."""
        return self.seq.params

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids

    def __init__(self, seq: Sequence, token_ids: list[int], computed: int, num_tokens: int, wants: bool):
        self.seq = seq
        self.seq_id = seq.seq_id
        self.token_ids = token_ids
        self.num_computed_tokens = computed
        self.num_tokens = num_tokens
        self.block_table = seq.block_table
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.wants = wants


class DraftModelSpeculator(Speculator):
    def __init__(
        self,
        model: Any,
        num_tokens: int,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        seed: Optional[int],
        *,
        vocab_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enforce_eager: bool,
        name: str = "draft model",
    ):
        super().__init__(num_tokens, device, seed)
        self.model = model
        self.name = name
        # Draft tokens are target token ids: the draft's logits past the target's vocabulary are never taken.
        self.vocab_size = min(vocab_size, model.config.vocab_size)
        self.target_vocab = vocab_size
        # A sequence whose draft cache lags by more than a step's tokens (a draft forward failed)
        # catches up by at most this many tokens per step, and is drafted again once it has.
        self.max_catch_up = max_num_batched_tokens
        self.runner = ModelRunner(
            model, num_blocks, block_size, kv_dtype, device,
            enforce_eager=enforce_eager, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        )
        self.num_draft_forwards = 0
        # seq_id -> [k, V] distributions the step's sampled drafts were drawn from (verify reads them)
        self._probs: dict[int, list[torch.Tensor]] = {}
        self._advanced: dict[int, tuple[Any, int]] = {}

    def propose(self, batch: ScheduledBatch, pool: Any, max_len: int, budget: int) -> dict[int, list[int]]:
        """seq_id -> draft for the step's decode sequences (KV blocks reserved for 1 + k tokens),
        after the draft's cache has taken every token the target computes in this step."""
        lengths: dict[int, int] = {}
        self._probs = {}
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if budget < 1:
                break
            if not self.eligible(seq, n) or seq.num_tokens - self._computed(seq) > self.max_catch_up:
                continue
            k = self.draft_length(seq, max_len, budget)
            if k >= 1 and pool.can_allocate(seq, 1 + k):
                pool.allocate(seq, 1 + k)
                lengths[seq.seq_id] = k
                budget -= k
        self._advanced: dict[int, tuple[Any, int]] = {}  # seq_id -> (its grammar state, draft tokens it took)
        # A seeded request's drafts race with the noise its next tokens will be drawn with: its
        # generator is read ahead here and put back for verification (spec_decode.verify_seeded).
        seeded = [seq.generator for seq in batch.seqs if seq.seq_id in lengths and seq.generator is not None]
        states = [generator.get_state() for generator in seeded]
        try:
            return self._draft(batch, lengths)
        except Exception:  # a draft only saves time: the step goes on without drafts
            logger.exception("the draft model's forward failed; this step decodes without drafts")
            return {}
        finally:  # grammars back where the sequences stand (the engine checks and verifies the drafts)
            for state, n in self._advanced.values():
                state.rollback(n)
            for generator, state in zip(seeded, states):
                generator.set_state(state)

    @staticmethod
    def _computed(seq: Sequence) -> int:
        """Tokens with valid draft KV: those of the last step's draft tokens that the target kept."""
        return min(seq.draft_computed, seq.num_computed_tokens)

    def _draft(self, batch: ScheduledBatch, lengths: dict[int, int]) -> dict[int, list[int]]:
        # First forward: what the target computes in this step, for every sequence, from where each
        # one's draft cache stands; drafted sequences through their last token, whose logits give
        # their first draft token.
        spans = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = self._computed(seq)
            end = min(seq.num_computed_tokens + n, start + self.max_catch_up)
            if end > start:
                spans.append((seq, start, end, seq.seq_id in lengths))
        views: list[_DraftView] = []
        counts: list[int] = []
        if all(end - start <= self.num_tokens + 1 for _, start, end, _ in spans):
            # Decodes, and the one token more after a wholly accepted draft: one row per token (rows
            # of one sequence see each other's KV), so that the step is decode-only and runs compiled.
            for seq, start, end, drafted in spans:
                views += [_DraftView(seq, seq.token_ids, p, p + 1, drafted and p == end - 1) for p in range(start, end)]
            counts = [1] * len(views)
        else:  # prefill chunks: a chunk per sequence (logits only for the drafted ones)
            for seq, start, end, drafted in spans:
                views.append(_DraftView(seq, seq.token_ids, start, end if drafted else end + 1, drafted))
                counts.append(end - start)
        drafts: dict[int, list[int]] = {}
        if views:
            sampled, logits, _, _ = self.runner.run(ScheduledBatch(views, counts))
            self.num_draft_forwards += 1
            for seq, _, end, _ in spans:
                seq.draft_computed = end
            wanted = [i for i, view in enumerate(sampled) if view.wants]  # (a compiled step gives every row's logits)
            for i, token in zip(wanted, self._pick([sampled[i].seq for i in wanted], logits, wanted)):
                drafts[sampled[i].seq_id] = [token]
        # Then one token at a time: each draft token is the input of the next.
        seqs = {seq.seq_id: seq for seq in batch.seqs}
        for j in range(1, max(lengths.values(), default=0)):
            views = []
            for seq_id, draft in drafts.items():
                if len(draft) < lengths[seq_id]:
                    seq = seqs[seq_id]
                    tokens = seq.token_ids + draft
                    views.append(_DraftView(seq, tokens, len(tokens) - 1, len(tokens), True))
            if not views:
                break
            sampled, logits, _, _ = self.runner.run(ScheduledBatch(views, [1] * len(views)))
            self.num_draft_forwards += 1
            for view in views:
                view.seq.draft_computed = view.num_tokens
            for view, token in zip(sampled, self._pick([v.seq for v in sampled], logits, range(len(sampled)))):
                drafts[view.seq_id].append(token)
        return drafts

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor, rows) -> list[int]:
        """A draft token for each sequence from its row of the draft's logits: the argmax for greedy
        requests, else drawn from the distribution the request samples from (all sampled rows in one
        pass; kept for verification, over the target's vocabulary)."""
        if not seqs:
            return []
        logits = logits[list(rows), : self.vocab_size]
        # A constrained sequence drafts what its grammar allows, the grammar advanced past each draft token
        constrained = [i for i, seq in enumerate(seqs) if seq.structured is not None]
        for i in constrained:
            seqs[i].structured.draft_step(logits[i])
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled:
            probs = rows_probs(logits[sampled].float(), [seqs[i].params for i in sampled])
            if probs.shape[1] < self.target_vocab:
                probs = torch.nn.functional.pad(probs, (0, self.target_vocab - probs.shape[1]))
            for i, q in zip(sampled, probs):
                if seqs[i].generator is not None:  # the race its target's token at this position runs
                    tokens[i] = int((q / seeded_noise(seqs[i].generator, q.shape[0]).to(q.device)).argmax())
                else:
                    tokens[i] = int(torch.multinomial(q.to(self.generator.device), 1, generator=self.generator))
                    self._probs.setdefault(seqs[i].seq_id, []).append(q)
        for i in constrained:
            state = seqs[i].structured
            _, n = self._advanced.get(seqs[i].seq_id, (state, 0))
            if state.draft_accept(tokens[i]):
                self._advanced[seqs[i].seq_id] = (state, n + 1)
        return tokens

    def draft_probs(self, seq: Sequence) -> Optional[torch.Tensor]:
        probs = self._probs.pop(seq.seq_id, None)
        return None if probs is None else torch.stack(probs)

    def wait_compiled(self, timeout: Optional[float] = None) -> bool:
        return self.runner.wait_compiled(timeout)

    def stop_compile(self) -> None:
        self.runner.stop_compile()

    def describe(self) -> str:
        return f"draft model {self.name}, {self.num_tokens} tokens"
