"""The bridge between the engine and the model: a scheduled batch -> one forward -> logits."""

from __future__ import annotations

import types
from typing import Optional

import torch

from pangu_infer.engine.scheduler import ScheduledBatch
from pangu_infer.engine.sequence import Sequence
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.layers import Attention, AttentionBatch, PrefillSlice


def _decode_step(model: DecoderForCausalLM, input_ids, positions, attn) -> torch.Tensor:
    # Every row of a decode-only step samples: the head runs inside the compiled graph too.
    return model.compute_logits(model(input_ids, positions, attn))


# The sizes that change from one decode step to the next (batch rows, context length), marked
# dynamic on each step's inputs; (tensor name, dims). Everything else (weights, float attributes
# such as the norms' eps) stays static: that keeps them constants of the graph, not per-call inputs.
_DYNAMIC_DIMS = (("slot_mapping", (0,)), ("decode_slots", (0, 1)), ("decode_mask", (0, 3)))


def compiled_forward(model: DecoderForCausalLM, kv_cache: tuple[int, torch.dtype], device: torch.device):
    """torch.compile of `model`'s forward + head for decode-only steps, private to this model and
    to its KV cache's (number of slots, dtype).

    Shapes: the batch and context sizes of the step's inputs are marked dynamic, so one graph
    serves every context length and batch size (dynamo keeps batch 1 apart, and batch 1 past
    UNMASKED_SDPA_MAX_CONTEXT): the compile cost (tens of seconds on a small CPU) is paid two or
    three times, not per step. Nothing else is dynamic. With `dynamic=True`, dynamo also turned
    every float attribute (each norm's eps) into a tensor built on each call and gave the weights
    symbolic shapes; dynamic cache sizes cost one size argument per cache tensor per call (~0.2 ms
    per step on SmolLM2). The cache shape is therefore static, and part of the key: an engine with
    another cache size over the same model compiles its own graphs.

    On CPU the generated wrapper is C++ (`cpp_wrapper`): the ~300 kernel calls of a step no longer
    each go through Python (SmolLM2 int4: 5.9 -> 4.7 ms per compiled step). The per-call checks of
    every buffer's size and alignment are off too.

    Each compiled function gets a code object of its own, because dynamo keeps graphs and their
    guards per code object: graphs traced for this model and cache are never tried on another
    model's or cache's call. That makes it safe to drop the guards on the model's modules, weights
    and caches (about a thousand checks, ~1 ms per step on CPU; weights never change after
    loading). A MoGE model breaks the graph around its data-dependent expert dispatch, and the code
    after a break is shared by every model of the class, so those keep all guards.
    """
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    if kv_cache in steps:  # another engine over the same model and cache size: its graphs serve
        return steps[kv_cache]
    step = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, "decode_step")
    options = {"size_asserts": False, "alignment_asserts": False}
    if device.type == "cpu":  # (on CUDA the C++ wrapper needs the CUDA toolkit's headers; untested there)
        options["cpp_wrapper"] = True
    if not getattr(model, "has_graph_breaks", False):
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(step, options=options)

    def decode_step(input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(input_ids, 0)
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        for name, dims in _DYNAMIC_DIMS:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(getattr(attn, name), dim)
        return compiled(model, input_ids, positions, attn)  # the caches are read from the layers

    steps[kv_cache] = decode_step
    return decode_step


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        compile_decode: bool = False,
    ):
        self.model = model
        self.device = device
        self.block_size = block_size
        cfg = model.config
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        slots = num_blocks * block_size
        # Never zero-filled: attention reads only slots its own sequence wrote (padding repeats
        # a valid slot), so the pages of a large pool are touched only as they are used.
        for layer in self.attention_layers:
            shape = (slots, layer.num_kv_heads, cfg.head_dim)
            layer.k_cache = torch.empty(shape, dtype=kv_dtype, device=device)
            layer.v_cache = torch.empty(shape, dtype=kv_dtype, device=device)
        # Steps made only of decode tokens (the bulk of generation) run a torch.compile'd forward
        # and head: one graph with dynamic batch and context sizes, so it compiles once, not per shape.
        self.decode_forward = compiled_forward(model, (slots, kv_dtype), device) if compile_decode else None

    def release(self) -> None:
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None

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
        attn = AttentionBatch(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev))
        if decodes:
            ctx = [s.num_computed_tokens + 1 for s, _ in decodes]
            attn.decode_slots, attn.decode_mask = self._decode_slots(decodes, ctx)
            # The compiled step pads all decodes to the longest context in one group: group sizes are
            # shapes, and each new combination (or a group of one) would cost a recompile.
            attn.decode_groups = [] if compiled else self._decode_groups(ctx)
        row = len(decodes)
        for seq, n in prefills:
            context_len = seq.num_computed_tokens + n
            kv_slots = self._slots(seq.block_table, context_len)
            mask = None
            if context_len != n:
                q_pos = torch.arange(context_len - n, context_len, device=dev)
                mask = torch.arange(context_len, device=dev)[None, :] <= q_pos[:, None]
            attn.prefills.append(PrefillSlice(row, n, context_len, kv_slots, mask))
            row += n

        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
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

    def _decode_slots(self, decodes, ctx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        dev = self.device
        max_ctx = max(ctx)
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
