"""The bridge between the engine and the model: a scheduled batch -> one forward -> logits."""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from pangu_infer.engine.compiled import compiled_decode_step
from pangu_infer.engine.scheduler import ScheduledBatch
from pangu_infer.engine.sequence import Sequence
from pangu_infer.models.batch_invariant import KV_SPLIT, make_batch_invariant
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.layers import Attention, AttentionBatch, PrefillSlice


class ModelRunner:
    """Owns the engine's KV cache and runs its steps. The cache is bound onto the model's attention
    layers for the duration of each step (`bind`), under a lock per model: engines sharing one
    model take turns, and each step reads and writes only its own engine's cache."""

    def __init__(
        self,
        model: DecoderForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        enforce_eager: bool = True,
        max_model_len: Optional[int] = None,
        batch_invariant: bool = False,
    ):
        self.model = model
        # Every token computed bitwise the same whatever shares its step (models/batch_invariant.py).
        self.batch_invariant = batch_invariant
        if batch_invariant:
            make_batch_invariant(model)
        self.device = device
        self.block_size = block_size
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        slots = num_blocks * block_size
        # Never zero-filled: attention reads only slots its own sequence wrote (padding repeats
        # a valid slot), so the pages of a large pool are touched only as they are used.
        shapes = [(slots, m.num_kv_heads, m.head_dim) for m in self.attention_layers]
        self.k_caches = [torch.empty(shape, dtype=kv_dtype, device=device) for shape in shapes]
        self.v_caches = [torch.empty(shape, dtype=kv_dtype, device=device) for shape in shapes]
        # The model's binding state: [lock, token of the runner whose cache is bound]. A token, not
        # the runner, so that a bound runner can still be collected (and unbinds then).
        self._binding = model.__dict__.setdefault("_kv_binding", [threading.Lock(), None])
        self._token = object()
        weakref.finalize(self, _unbind, self.attention_layers, self._binding, self._token)
        # Steps made only of decode tokens (the bulk of generation) run a torch.compile'd forward
        # and head, compiled and warmed up here (engine/compiled.py), or eagerly where it cannot be.
        self.decode_forward = None
        self.compile_seconds = 0.0  # spent here building and warming up the compiled step
        if not enforce_eager and self.attention_layers:
            start = time.perf_counter()
            max_context = min(max_model_len or slots, slots)
            with self.bind():
                self.decode_forward = compiled_decode_step(model, self.k_caches[0], max_context, batch_invariant)
            self.compile_seconds = time.perf_counter() - start

    @contextmanager
    def bind(self) -> Iterator[None]:
        """This runner's KV cache on the model's layers, the model held for the duration."""
        with self._binding[0]:
            self._point_layers()
            yield

    def _point_layers(self) -> None:
        """Re-point the layers at this runner's cache if another engine's step ran last (the
        model's lock held)."""
        state = self._binding
        if state[1] is not self._token:
            for layer, k, v in zip(self.attention_layers, self.k_caches, self.v_caches):
                # Straight into __dict__: nn.Module.__setattr__ costs ~2 us a call, per step.
                layer.__dict__["k_cache"], layer.__dict__["v_cache"] = k, v
            state[1] = self._token

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, drafts: Optional[dict[int, list[int]]] = None
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Forward every scheduled token; returns the sequences that reached their last token
        (they sample next) and their logits [rows, vocab] in float32: one row per sequence, or,
        for a sequence with a speculative draft (seq_id -> tokens), one row for its last token
        and one for each draft token, which are forwarded after it."""
        bs = self.block_size
        drafts = drafts or {}
        decodes = [(s, n) for s, n in zip(batch.seqs, batch.num_tokens) if n == 1 and s.seq_id not in drafts]
        # Shortest context first, so decode attention can pad each group only to its own longest.
        decodes.sort(key=lambda sn: sn[0].num_computed_tokens)
        prefills = [
            (s, n + len(drafts.get(s.seq_id, ())))
            for s, n in zip(batch.seqs, batch.num_tokens)
            if n > 1 or s.seq_id in drafts
        ]
        ordered = decodes + prefills
        compiled = self.decode_forward is not None and not prefills  # a decode-only step

        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        for seq, n in ordered:
            start = seq.num_computed_tokens
            # A drafted sequence has only its last token left to compute; its draft follows it.
            input_ids.extend(seq.token_ids[start : start + n])
            input_ids.extend(drafts.get(seq.seq_id, ()))
            for pos in range(start, start + n):
                positions.append(pos)
                slot_mapping.append(seq.block_table[pos // bs] * bs + pos % bs)

        dev = self.device
        invariant = self.batch_invariant
        attn = AttentionBatch(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev), batch_invariant=invariant
        )
        if decodes:
            ctx = [s.num_computed_tokens + 1 for s, _ in decodes]
            attn.decode_slots, attn.decode_mask = self._decode_slots(decodes, ctx, KV_SPLIT if invariant else 1)
            # The compiled step pads all decodes to the longest context in one group: group sizes are
            # shapes, and each new combination (or a group of one) would cost a recompile.
            attn.decode_groups = [] if compiled or invariant else self._decode_groups(ctx)
        row = len(decodes)
        for seq, n in prefills:
            context_len = seq.num_computed_tokens + n
            kv_slots = self._slots(seq.block_table, context_len)
            mask = None
            if context_len != n and not invariant:  # (the batch-invariant path masks per query itself)
                q_pos = torch.arange(context_len - n, context_len, device=dev)
                mask = torch.arange(context_len, device=dev)[None, :] <= q_pos[:, None]
            attn.prefills.append(PrefillSlice(row, n, context_len, kv_slots, mask))
            row += n

        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        with self._binding[0]:  # bind(), without a generator's cost on every step
            self._point_layers()
            if compiled:  # logits of every row, in decode order
                return [s for s, _ in decodes], self.decode_forward(ids, pos, attn)
            hidden = self.model(ids, pos, attn)
        sampled: list[Sequence] = []
        rows: list[int] = []
        end = 0
        for seq, n in ordered:
            end += n
            num_draft = len(drafts.get(seq.seq_id, ()))
            if seq.num_computed_tokens + n - num_draft == seq.num_tokens:
                sampled.append(seq)
                rows.extend(range(end - 1 - num_draft, end))
        if not rows:
            return [], hidden.new_empty(0, 0, dtype=torch.float32)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        return sampled, logits

    def _slots(self, block_table: list[int], context_len: int) -> torch.Tensor:
        bs = self.block_size
        blocks = torch.tensor(block_table[: -(-context_len // bs)], dtype=torch.long, device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:context_len]

    @staticmethod
    def _decode_groups(ctx: list[int]) -> list[tuple[int, int]]:
        """Split sorted decode contexts in two where that pads the fewest slots, if it saves a fifth."""
        n = len(ctx)
        best = min(range(1, n + 1), key=lambda i: i * ctx[i - 1] + (n - i) * ctx[-1])
        if best == n or best * ctx[best - 1] + (n - best) * ctx[-1] > 0.8 * n * ctx[-1]:
            return [(n, ctx[-1])]
        return [(best, ctx[best - 1]), (n, ctx[-1])]

    def _decode_slots(self, decodes, ctx: list[int], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] slots and [B, 1, 1, L] validity, L the longest context rounded up to `multiple`."""
        bs = self.block_size
        dev = self.device
        max_ctx = -(-max(ctx) // multiple) * multiple
        max_blocks = -(-max_ctx // bs)
        table = torch.tensor(
            [s.block_table[:max_blocks] + [s.block_table[0]] * (max_blocks - len(s.block_table[:max_blocks])) for s, _ in decodes],
            dtype=torch.long,
            device=dev,
        )
        pos = torch.arange(max_ctx, device=dev)
        slots = table[:, pos // bs] * bs + pos % bs
        ctx_t = torch.tensor(ctx, device=dev)
        valid = pos[None, :] < ctx_t[:, None]
        # Padding repeats the sequence's first slot, which always holds real values.
        slots = torch.where(valid, slots, slots[:, :1])
        return slots, valid[:, None, None, :]


def _unbind(layers: list[Attention], state: list, token: object) -> None:
    """A collected runner's cache leaves the layers it is still bound to (its memory is freed)."""
    with state[0]:
        if state[1] is token:
            for layer in layers:
                layer.__dict__["k_cache"] = layer.__dict__["v_cache"] = None
            state[1] = None
