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


def _partial_key(parent: Optional[bytes], tokens: Seq[int]) -> bytes:
    """A partly filled block's name: as a full block's, marked apart."""
    return block_hash(b"partial" + (parent or b""), tokens)


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
        # The last, partly filled block of a share_prefix sequence that ended (a beam search's step),
        # named like a full block by its parent's hash and its tokens so far, findable while it is
        # free and not reused: the next step's beam that extends it gets a copy of it (take_partial_copies, then ModelRunner.copy_slots)
        # and computes only its new token (under tensor parallelism every rank copies its own shard:
        # ModelRunner.copy_slots is mirrored like a forward).
        self.partial_of_key: dict[bytes, int] = {}
        self.partial_content: list[Optional[tuple]] = [None] * num_blocks  # (key, index, parent, tokens)

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
        seq.draft_computed = cached  # (a draft model recomputes a partial block's part itself)
        if seq.share_prefix and len(seq.block_table) == usable:
            cached += self._match_partial(seq, parent)
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        self.prefix_hits += min(cached, seq.num_prompt_tokens)

    def _match_partial(self, seq: Sequence, parent: Optional[bytes]) -> int:
        """After a share_prefix sequence's full blocks: the partial block of an ended sequence that
        holds all but its last token past them, held for copying (seq.partial_source); its token count, or 0."""
        bs = self.block_size
        i = len(seq.block_table)
        tokens = tuple(seq.token_ids[i * bs : seq.num_tokens - 1])
        if not tokens:
            return 0
        key = _partial_key(parent, tokens)
        block = self.partial_of_key.get(key)
        if block is None or self.partial_content[block] != (key, i, parent, tokens):
            return 0
        self._take(block)
        seq.partial_source = (block, len(tokens))
        return len(tokens)

    def drop_partial(self, seq: Sequence) -> None:
        """A waiting sequence gives back the partial block it matched (it cannot hold that block and a
        block of its own to copy it into): those slots are computed in its forward instead."""
        block, count = seq.partial_source
        self._untake(block)
        seq.partial_source = None
        cached = seq.num_computed_tokens
        seq.num_computed_tokens = seq.num_cached_tokens = cached - count
        self.prefix_hits -= min(cached, seq.num_prompt_tokens) - min(cached - count, seq.num_prompt_tokens)

    def take_partial_copies(self, seqs: Seq[Sequence]) -> list[tuple[int, int, int]]:
        """(source block, destination block, slots) of each scheduled sequence that matched a partial
        block (its destination: the block of its table at that index, allocated by now); the copies
        must be made before the step's forward, and release_partial_sources after them."""
        copies = []
        for seq in seqs:
            if seq.partial_source is not None:
                block, count = seq.partial_source
                copies.append((block, seq.block_table[(seq.num_computed_tokens - count) // self.block_size], count))
        return copies

    def release_partial_sources(self, seqs: Seq[Sequence]) -> None:
        for seq in seqs:
            if seq.partial_source is not None:
                self._untake(seq.partial_source[0])
                seq.partial_source = None

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
        """Return a sequence's blocks; the tail goes back first so shared prefixes stay cached longest.
        A share_prefix sequence's partly filled last block is named for the next step's beams."""
        if seq.partial_source is not None:  # (matched, then not scheduled: no copy made)
            self._untake(seq.partial_source[0])
            seq.partial_source = None
        if seq.share_prefix:
            self._name_partial(seq)
        for block in reversed(seq.block_table):
            self._untake(block)
        seq.block_table = []
        seq.block_hashes = []

    def _untake(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0
        if self.ref_count[block] == 0:
            self.free[block] = None

    def _name_partial(self, seq: Sequence) -> None:
        bs = self.block_size
        i, filled = divmod(seq.num_computed_tokens, bs)
        if not filled or i >= len(seq.block_table) or len(seq.block_hashes) < i:
            return
        block = seq.block_table[i]
        if self.ref_count[block] != 1 or self.hash_of[block] is not None:
            return  # (another sequence writes it, or it is a full block's)
        parent = seq.block_hashes[i - 1] if i else seq.cache_salt
        tokens = tuple(seq.token_ids[i * bs : i * bs + filled])
        key = _partial_key(parent, tokens)
        old = self.partial_of_key.get(key)
        if old is not None and old != block:
            self.partial_content[old] = None
        self._forget_partial(block)
        self.partial_of_key[key] = block
        self.partial_content[block] = (key, i, parent, tokens)

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
        self._forget_partial(block)

    def _forget_partial(self, block: int) -> None:
        content = self.partial_content[block]
        if content is not None:
            if self.partial_of_key.get(content[0]) == block:
                del self.partial_of_key[content[0]]
            self.partial_content[block] = None

    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
