"""Which sequences run in a step: decodes and prefill chunks under a token budget, with preemption."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from pangu_infer.engine.kv_cache import BlockPool
from pangu_infer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step with how many of their tokens are computed in it."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


# vLLM's scheduling policies: "fcfs" serves requests in arrival order and preempts the newest
# running one when blocks run out; "priority" serves waiting requests by (priority, arrival), lower
# values first, and preempts the running request with the highest (priority, arrival).
POLICIES = ("fcfs", "priority")


def scheduling_rank(seq: Sequence) -> tuple[int, int]:
    """The priority policy's order: lower priority values first, then arrival."""
    return seq.priority, seq.seq_id  # seq ids grow with arrival; a request's forks are consecutive


class Scheduler:
    def __init__(
        self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, chunk_multiple: int = 1, policy: str = "fcfs",
        chunked_prefill: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy={policy!r} must be one of {', '.join(POLICIES)}")
        self.policy = policy
        self.pool = pool
        # A prefill chunk that stops short of the sequence's end stops at a multiple of this many
        # tokens of the sequence (batch-invariant mode: the block size), never where the step's
        # budget happens to run out.
        self.chunk_multiple = chunk_multiple
        # False (vLLM's enable_chunked_prefill=False): a sequence's remaining tokens are computed in one
        # step or wait for a step whose budget (and the KV pool) holds them all
        self.chunked_prefill = chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: preemption takes from the tail
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect_right(self.waiting, scheduling_rank(seq), key=scheduling_rank), seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Running sequences first, oldest first: decodes and the rest of chunked prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self.pool.can_allocate(seq, n):
                victim = self._victim()
                if self.running.index(victim) < i:  # already scheduled in this step (priority policy)
                    i -= 1
                    if victim in batch.seqs:
                        k = batch.seqs.index(victim)
                        del batch.seqs[k]
                        budget += batch.num_tokens.pop(k)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.pool.allocate(seq, n)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        # Then admit waiting sequences, unless this step already had to give blocks back.
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.parent is not None and not self._parent_prompt_cached(seq):
                break  # forks of an n>1 request follow their parent's prefill
            if not seq.block_table and not seq.skips_prefix_cache:
                self.pool.match_prefix(seq, force=seq.parent is not None or seq.share_prefix)
            n = self._chunk(seq, budget)
            if n and seq.partial_source is not None and not self.pool.can_allocate(seq, n):
                # Its parent's partly filled block and a block to copy it into do not both fit (a beam
                # step that fills the pool would wait forever): those slots are computed instead.
                self.pool.drop_partial(seq)
                n = self._chunk(seq, budget)
            if n == 0:  # the budget left does not reach its next chunk boundary: next step
                self.pool.release(seq)
                seq.num_computed_tokens = 0
                break
            if not self.pool.can_allocate(seq, n):
                if not self.running and not batch.seqs:
                    # Nothing else holds blocks: take a smaller chunk so the oldest still progresses.
                    n = (self.pool.num_free_blocks + len(seq.block_table)) * self.pool.block_size - seq.num_computed_tokens
                    n = self._chunk(seq, n)
                    if n <= 0:
                        break
                else:
                    self.pool.release(seq)
                    seq.num_computed_tokens = 0
                    break
            self.waiting.popleft()
            self.pool.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of `seq` to compute in this step within `budget`: all that remain, or a chunk
        ending on a multiple of chunk_multiple (0 when the budget does not reach one; without
        chunked prefill, 0 when it does not reach the end)."""
        start = seq.num_computed_tokens
        n = min(seq.num_tokens - start, budget)
        if n < seq.num_tokens - start:
            if not self.chunked_prefill:
                return 0
            if self.chunk_multiple > 1:
                n = (start + n) // self.chunk_multiple * self.chunk_multiple - start
        return max(n, 0)

    def _parent_prompt_cached(self, seq: Sequence) -> bool:
        parent = seq.parent
        assert parent is not None
        return parent.is_finished or parent.num_computed_tokens >= parent.num_prompt_tokens

    def _victim(self) -> Sequence:
        """The running sequence that gives its blocks back: the newest (fcfs), or the one of
        lowest priority, the newest among equals (priority)."""
        if self.policy == "priority":
            return max(self.running, key=scheduling_rank)
        return self.running[-1]

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.pool.release(seq)
        seq.reset_for_recompute()
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect_left(self.waiting, scheduling_rank(seq), key=scheduling_rank), seq)
        else:
            self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq)
        seq.status = SequenceStatus.FINISHED
