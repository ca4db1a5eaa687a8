"""The KV block pool: fixed-size blocks, reference counts, and prefix caching by chained block hashes."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional, Sequence as Seq

from pangu_infer.engine.sequence import Sequence


def block_hash(parent: Optional[bytes], tokens: Seq[int]) -> bytes:
    """A full block is named by its tokens and everything before it (the parent block's hash).

    SHA-256, not Python's hash(): a client must not be able to craft a prompt whose block is taken
    for another prompt's (vLLM's CVE-2025-25183). A hit also compares the block's tokens, position
    and parent.
    """
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[Optional[bytes]] = [None] * num_blocks
        # What a cached block holds: (its index in the sequence, its parent's hash, its tokens).
        self.content_of: list[Optional[tuple]] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        # Blocks with no user, least recently freed first; cached ones stay findable until reused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence, force: bool = False) -> None:
        """Give a fresh sequence the cached blocks of its longest cached prefix.

        At least one token is left uncached so that the step computes the logits it samples from.
        `force` looks up even with prefix caching off: forks of an n>1 request share their prompt.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not (self.enable_prefix_caching or force):
            return
        bs = self.block_size
        usable = (seq.num_tokens - 1) // bs
        self.prefix_queries += seq.num_prompt_tokens
        parent = seq.cache_salt
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self.block_of_hash.get(h)
            if block is None or self.content_of[block] != (i, parent, tokens):
                break  # a miss, or a hash that names other tokens: never trust the hash alone
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        cached = len(seq.block_table) * bs
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        seq.draft_computed = cached
        self.prefix_hits += min(cached, seq.num_prompt_tokens)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step, name the blocks that just became full so later requests can reuse them."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.block_of_hash and self.hash_of[block] is None:
                self.block_of_hash[h] = block
                self.hash_of[block] = h
                self.content_of[block] = (i, parent, tokens)

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        assert need <= len(self.free), "caller checks can_allocate first"
        for _ in range(max(need, 0)):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks; the tail goes back first so shared prefixes stay cached longest."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _evict(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            del self.block_of_hash[h]
            self.hash_of[block] = None
            self.content_of[block] = None

    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
