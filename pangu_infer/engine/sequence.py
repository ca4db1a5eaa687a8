"""One completion being generated: its tokens, its KV blocks, its sampling state, its output."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pangu_infer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """The chosen token's logprob and the top alternatives (token id, logprob), best first; for a
    prompt token also its rank (1 + the tokens more likely than it, as vLLM ranks)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: Optional[int] = None


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: Any,
        generator: Optional[torch.Generator],
        parent: Optional["Sequence"] = None,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.detokenizer = detokenizer
        self.generator = generator
        self.parent = parent  # a fork waits until its parent's prompt is in the prefix cache
        # looks its prompt up in the prefix cache even with prefix caching off, as a fork does (a beam
        # search's step: LLMEngine.add_request(share_prefix=True))
        self.share_prefix = False
        # (block, slots): a partly filled block of an ended sequence whose first slots hold this
        # one's KV past its full blocks, held until they are copied into its own (BlockPool._match_partial)
        self.partial_source: Optional[tuple[int, int]] = None
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        # Tokens whose draft-model KV is valid (engine/draft_model.py), at most num_computed_tokens
        # after each step; cached blocks carry the draft's KV as they carry the target's.
        self.draft_computed = 0
        # The request's predicted output and where this sequence stands in it (spec_decode.Prediction)
        self.prediction: Optional[Any] = None
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of this sequence's full blocks
        self.output_text = ""
        self.emitted_text_len = 0
        self.emitted_token_len = 0
        self.logprobs: list[Logprob] = []
        # The request's prompt logprobs, kept by its first sequence: entry p for prompt token p
        # (None for the first, which nothing predicts); None when the request asks for none.
        self.prompt_logprobs: Optional[list[Optional[Logprob]]] = [None] if params.prompt_logprobs is not None and index == 0 else None
        self.cumulative_logprob = 0.0
        # An embedding request's sequence (LLMEngine.add_request(pooling=...)): "last" or "mean", None
        # for generation. It computes its prompt and ends, never sampling; `pooled` holds the final
        # hidden state of the last prompt position ("last") or the sum over positions 0..num_pooled-1
        # ("mean"), in float32; `embedding` the pooled vector, L2-normalized, once it ends.
        self.pooling: Optional[str] = None
        self.normalize = True  # the embedding L2-normalized (vLLM's PoolingParams.normalize)
        self.pooled: Optional[torch.Tensor] = None
        self.num_pooled = 0
        self.embedding: Optional[list[float]] = None
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[Any] = None
        self.arrival_time = time.monotonic()
        self.priority = 0  # the request's (scheduling_policy "priority": lower runs first)
        self.bad_words: Any = None  # its params.bad_words as sampler.BadWords (LLMEngine.bad_words_ids), or None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.num_preemptions = 0
        # structured outputs / thinking budget (engine/structured.py); None: unconstrained. It only
        # advances on appended tokens, so preemption by recomputation leaves it valid.
        self.structured: Any = None
        # The LoRA adapter it runs with (engine/lora.py; 0: none), and the root of its prefix-cache
        # hashes: blocks computed with one adapter never serve another or the base model, and
        # blocks of a request with a cache salt (vLLM's cache_salt) serve only requests with that salt.
        self.lora_key = 0
        self.lora_slot = -1  # its adapter's slot (models/lora.py), -1 for none
        self.user_salt: Optional[str] = None  # set before set_lora, which derives cache_salt from both
        self.cache_salt: Optional[bytes] = None

    def set_lora(self, key: int, slot: int) -> None:
        """Its adapter (key 0: none), and the root of its prefix-cache hashes from that and user_salt."""
        self.lora_key, self.lora_slot = key, slot
        if not self.lora_key and self.user_salt is None:
            self.cache_salt = None
            return
        h = hashlib.sha256(f"lora:{self.lora_key}".encode())
        if self.user_salt is not None:
            h.update(b"\0salt:" + self.user_salt.encode("utf-8", "surrogatepass"))
        self.cache_salt = h.digest()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prompt must be computed, not taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def skips_prefix_cache(self) -> bool:
        """Every prompt position must go through the forward: prompt logprobs still to compute, or
        mean pooling (last pooling needs only the last position, which a prefix-cache hit never covers)."""
        return self.wants_prompt_logprobs or (self.pooling == "mean" and self.num_pooled < self.num_prompt_tokens)

    def add_pooled(self, first: int, end: int, value: torch.Tensor) -> None:
        """A prefill chunk's pooling result for prompt positions first..end-1 (runner._pooled): their
        hidden states' sum (mean pooling: positions already summed, of a prompt computed again after
        preemption, are not in it), or the last position's hidden state (last pooling)."""
        if self.pooling == "last":
            self.pooled, self.num_pooled = value, end
            return
        if first != self.num_pooled:
            raise RuntimeError(f"pooled positions from {first} after {self.num_pooled} of them: a gap")
        self.pooled = value if self.pooled is None else self.pooled + value
        self.num_pooled = end

    def pooled_embedding(self) -> list[float]:
        """The embedding of the whole prompt: the pooled hidden state (mean: the sum over its count),
        L2-normalized unless `normalize` is off."""
        if self.pooled is None or self.num_pooled != self.num_prompt_tokens:
            raise RuntimeError(f"pooling ended after {self.num_pooled} of {self.num_prompt_tokens} prompt positions")
        v = self.pooled.cpu().double()  # (on the CPU: not every accelerator has float64)
        if self.pooling == "mean":
            v = v / self.num_pooled
        return (torch.nn.functional.normalize(v, dim=0) if self.normalize else v).tolist()

    def add_prompt_logprobs(self, first: int, entries: list[Logprob]) -> None:
        """Entries for prompt tokens first, first + 1, ...; those already held (a prompt computed
        again after preemption) are skipped."""
        if self.prompt_logprobs is None or first > len(self.prompt_logprobs):
            raise RuntimeError(f"prompt logprobs from position {first} after {len(self.prompt_logprobs or ())} of them: a gap")
        self.prompt_logprobs.extend(entries[len(self.prompt_logprobs) - first :])

    def append_token(self, token_id: int) -> None:
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; prompt and output so far are prefilled again later."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.draft_computed = 0
        self.block_table = []
        self.block_hashes = []
        self.num_preemptions += 1

    def ttft(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot(self) -> Optional[float]:
        n = len(self.output_token_ids)
        if n < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (n - 1)
