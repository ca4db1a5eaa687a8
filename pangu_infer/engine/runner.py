"""The bridge between the engine and the model: a scheduled batch -> one forward -> logits."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from pangu_infer.engine.compiled import (
    CompileStopped,
    LoRAVariants,
    build_decode_step,
    cached_decode_step,
    check_stop,
    compile_cache_dir,
    compile_problem,
    say,
)
from pangu_infer.engine import eager_step
from pangu_infer.engine.sampler import token_logprobs
from pangu_infer.engine.scheduler import ScheduledBatch
from pangu_infer.engine.sequence import Logprob, Sequence
from pangu_infer.memory import keep_freed_heap
from pangu_infer.models.batch_invariant import KV_SPLIT, make_batch_invariant
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models import bf16_weights, bi_attention_kernel
from pangu_infer.models.layers import Attention, AttentionBatch, PrefillSlice, decode_kernel_chosen, decode_kernel_takes
from pangu_infer.native import known_vec_isa
from pangu_infer.parallel.state import collectives_skipped

logger = logging.getLogger("pangu_infer.engine")

# The background compile starts this long after load, or after the first step if one starts
# within it (engine/compiled.py; ModelRunner).
FIRST_STEP_GRACE_S = 1.0
# ... and then waits while steps keep coming, up to this long after load:
# a run shorter than that (a one-off `generate`) ends eagerly with the whole CPU, a longer one is
# compiled from then on; a run whose tokens left (max_tokens) at its eager steps' pace outlast the
# grace has it start at once (ModelRunner._wait_while_busy).
BUSY_GRACE_S = 5.0
# Steps further apart than this: the engine is idle (between two steps of a run: ~1 ms).
IDLE_GAP_S = 0.1
# How much lower the background compile's CPU priority is (nice increment; _lower_thread_priority).
COMPILE_NICE = 10
# Rows of prompt logits computed at once for prompt logprobs ([rows, vocab] float32: 78 MB at 153k).
PROMPT_LOGPROB_ROWS = 128


class _Binding:
    """Which runner's KV cache is on a model's layers. `lock` is held for a step; `pinned` is the
    token of a runner whose background compile needs its cache to stay bound (its own steps go on;
    another runner's steps wait until the compile ends)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.released = threading.Condition(self.lock)
        self.token: Optional[object] = None
        self.pinned: Optional[object] = None
        _BINDINGS.add(self)


# Every model's binding in the process (a speculative decoder's draft model has its own, beside its
# target's): _every_forward_held takes all their locks.
_BINDINGS: "weakref.WeakSet[_Binding]" = weakref.WeakSet()


@contextmanager
def _every_forward_held() -> Iterator[None]:
    """Every model's step lock in this process held (each forward takes its model's: ModelRunner.run,
    bind), taken in one order (by id) so that two holders cannot deadlock; a thread holds at most one
    of them otherwise (a draft model's forward and its target's run one after the other)."""
    locks = sorted((b.lock for b in list(_BINDINGS)), key=id)
    for lock in locks:
        lock.acquire()
    try:
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


class ModelRunner:
    """Owns the engine's KV cache and runs its steps. The cache is bound onto the model's attention
    layers for the duration of each step (`bind`), under a lock per model: engines sharing one
    model take turns, and each step reads and writes only its own engine's cache.

    Steps made only of decode tokens run a torch.compile'd forward and head (engine/compiled.py)
    unless `enforce_eager`. It is built on a background thread started here: steps run eagerly
    until it is ready and switch to it between steps, so no start and no request waits for a
    compile (`wait_compiled` does, for benchmarks and tests). Its warm-up runs only on a scratch
    block of the cache that the block pool never hands out."""

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
        max_num_seqs: Optional[int] = None,
    ):
        self.model = model
        # Every token computed bitwise the same whatever shares its step (models/batch_invariant.py).
        self.batch_invariant = batch_invariant
        self.max_num_seqs = max_num_seqs  # the largest decode batch (the batch-invariant graphs it needs)
        if batch_invariant:
            for m in model.modules():
                # The per-query attention of models/batch_invariant.py reads K and V of one width
                # from two caches, with no sinks.
                if isinstance(m, Attention) and (m.sinks(torch.float32) is not None or m.values_in_keys or m.v_dim != m.head_dim):
                    raise ValueError(
                        f"batch_invariant=True is not supported for {model.config.architecture} yet (its attention "
                        "has sinks, MLA or values narrower than keys); run it without --batch-invariant"
                    )
            make_batch_invariant(model)
        self.device = device
        if device.type == "cpu":  # the activations' memory kept from step to step (after loading's own trims)
            keep_freed_heap()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.lora = model.__dict__.get("_lora_state")  # LoRA adapters' shared state (models/lora.py), if enabled
        slots = num_blocks * block_size
        compile_ = not enforce_eager and bool(self.attention_layers)
        self.compiles = compile_  # a compiled decode step is (or was) being built
        # Never zero-filled: attention reads only slots its own sequence wrote (padding repeats
        # a valid slot), so the pages of a large pool are touched only as they are used. With
        # compiling on, one more block at the end is the warm-up's scratch space.
        # Each layer says what it caches per token (`Attention.cache_shapes`): K and V heads, K and V
        # of different widths, or one MLA latent with no value cache (None).
        shapes = [m.cache_shapes(slots + (block_size if compile_ else 0)) for m in self.attention_layers]
        self.k_caches = [torch.empty(k, dtype=kv_dtype, device=device) for k, _ in shapes]
        self.v_caches = [None if v is None else torch.empty(v, dtype=kv_dtype, device=device) for _, v in shapes]
        self.decode_kernel = self._choose_decode_attention(kv_dtype)
        # Eager decode-only steps with the modules' Python left out, where the model takes it
        # (engine/eager_step.py): until the compiled step is ready, or always under enforce_eager.
        self.eager_step = (
            eager_step.build(model, self.decode_kernel, self.k_caches, self.v_caches)
            if device.type == "cpu" and not batch_invariant else None
        )
        # The model's binding state. A token, not the runner, marks the bound cache, so that a
        # bound runner can still be collected (and unbinds then).
        self._binding = model.__dict__.setdefault("_kv_binding", _Binding())
        self._token = object()
        weakref.finalize(self, _unbind, self.attention_layers, self._binding, self._token)
        self.decode_forward: Optional[Callable] = None  # the compiled step, once ready
        # Tensor parallel, rank 0: called before each forward of the model with its kind ("forward"
        # eager, "decode" the compiled step) and inputs, and before each copy_slots ("copy"), so that
        # every worker rank does the same on its shard (parallel/launch.py). Not a forward hook:
        # dynamo would trace a hook into the step.
        self.mirror: Optional[Callable[[str, tuple], None]] = None
        self.compile_seconds = 0.0  # from here to the compiled step ready (0 while it builds)
        self.compile_error: Optional[str] = None  # why compiled decode is off, if it is
        self._compiled_done = threading.Event()
        self._compile_stop = threading.Event()  # stop_compile(): the build ends at its next stopping point
        # The first step's start and end: the build waits for the first step if one starts soon
        # after load (a prompt given with the command), so that it does not slow that answer.
        self._first_step = [threading.Event(), threading.Event()]
        self._in_step = False  # a step is running (the build's _wait_while_busy reads these)
        self._step_ended = 0.0  # time.monotonic() at the end of the last step
        # While the build waits (_wait_while_busy): the fastest decode-only step's seconds (one slow
        # step does not end the wait), and the most steps a sequence of the last has left (its
        # max_tokens, or the context's end)
        self._pace: Optional[tuple[float, int]] = None
        self._pacing = False
        self._max_context = 0
        if not compile_:
            self._compiled_done.set()
            return
        max_context = self._max_context = min(max_model_len or slots, slots)
        self.decode_forward = self._cached_step(max_context)
        if self.decode_forward is not None:  # another engine over this model built it
            self._compiled_done.set()
            return
        # A daemon thread, stopped at the interpreter's exit: a process that is done never waits for
        # the build. Everything compile-related, imports included (torch._inductor is a slow
        # import), happens on it. It runs in a copy of this thread's context: torch.compile's
        # settings (a `torch._inductor.config.patch` around the engine's creation) are context
        # variables.
        _start_compile_thread(contextvars.copy_context().run, self._build_compiled, max_context, range(slots, slots + block_size))

    def _choose_decode_attention(self, kv_dtype: torch.dtype) -> list[bool]:
        """Each layer's decode attention: True for the C kernel over the paged cache, where it takes
        the layer and is the faster form here (layers.decode_kernel_chosen), else gathered K/V and
        two products. The batch-invariant mode calls its own kernel."""
        takes = [
            not self.batch_invariant and self.device.type == "cpu" and decode_kernel_takes(m, kv_dtype, k, v)
            for m, k, v in zip(self.attention_layers, self.k_caches, self.v_caches)
        ]
        chosen = any(takes) and decode_kernel_chosen(kv_dtype)
        return [chosen and t for t in takes]

    def _cached_step(self, max_context: int) -> Optional[Callable]:
        """The compiled step another engine over this model built for this cache shape, or None; with
        LoRA adapters, both graphs (compiled.LoRAVariants) or None."""
        args = (self.model, self.k_caches[0], max_context, self.batch_invariant, self.max_num_seqs)
        if self.lora is None:
            return cached_decode_step(*args)
        with_lora, base = cached_decode_step(*args, variant="lora"), cached_decode_step(*args, variant="base")
        return LoRAVariants(with_lora, base, self.lora) if with_lora is not None and base is not None else None

    def _build_steps(self, max_context: int, scratch: range) -> tuple[Optional[Callable], Optional[str]]:
        """build_decode_step; with LoRA adapters, the graph with their products and the one without
        (LoRAVariants), or the first alone (logged) where the second fails to build."""
        args = (self.model, self.k_caches[0], max_context, scratch, self.batch_invariant, self.max_num_seqs)
        stop = self._compile_stop
        if self.lora is None:
            return build_decode_step(*args, stop=stop)
        step, error = build_decode_step(*args, variant="lora", stop=stop)
        if step is None:
            return step, error
        base, why = build_decode_step(*args, variant="base", stop=stop)
        if base is None:
            logger.info("the decode step without LoRA products failed to build (%s): steps with no adapter row "
                        "run the adapters' products too (zeros)", why)
            return step, None
        return LoRAVariants(step, base, self.lora), None

    def _build_compiled(self, max_context: int, scratch: range) -> None:
        start = time.perf_counter()
        step, error = None, "the compile thread stopped"
        # One build at a time in a process: two models' builds at once (two LLMs) failed one of them
        # in dynamo ("using FX to symbolically trace a dynamo-optimized function").
        locked = False
        try:
            started, ended = self._first_step
            if started.wait(FIRST_STEP_GRACE_S):
                ended.wait()
                self._wait_while_busy(start + BUSY_GRACE_S)
            check_stop(self._compile_stop)
            _lower_thread_priority()
            # (waiting for another model's build, if any; stop_compile() ends the wait)
            while not (locked := _COMPILE_LOCK.acquire(timeout=0.25)):
                check_stop(self._compile_stop)
            problem = compile_problem(self.device)
            if problem is not None:
                error = None
                self._compile_off(f"{problem}; decoding eagerly (--enforce-eager turns compiling off)")
                return
            if self.device.type == "cpu":
                known_vec_isa()  # inductor's probes of the CPU's instruction sets, once per machine
                # Inductor's TritonBundler keeps one process-wide list of the compile in progress,
                # asserted empty when a compile begins: a compile on another thread beside this build
                # (a user's own torch.compile, a test's) failed one of them (BackendCompilerFailed:
                # AssertionError in TritonBundler.begin_compile). No Triton kernels on the CPU: this
                # thread's compiles leave the list alone (a setting of this thread's context only).
                import torch._inductor.config as inductor_config

                inductor_config.bundle_triton_into_fx_graph_cache = False
            _trace_inductors_placeholder()
            if not self.model.parallel.rank:  # (tensor parallel: rank 0 says it for every rank)
                say(
                    "compiling the decode step in the background (a minute or more the first time on this "
                    f"machine, seconds from the cache in {compile_cache_dir()}); decoding eagerly until it is ready"
                )
            if self.device.type == "cpu":
                from pangu_infer.quant.modules import prepare_native_ops

                prepare_native_ops(self.model)  # before tracing: the graph calls C++ operators where built
                if any(isinstance(m, bf16_weights.Bf16WeightLinear) for m in self.model.modules()):
                    bf16_weights.native_op()
                if any(self.decode_kernel) or (self.batch_invariant and bi_attention_kernel.available()):
                    bi_attention_kernel.native_op()
            # (each tensor-parallel rank warms its own step up alone: no collective pairs across ranks)
            with self._pinned(), collectives_skipped():
                step, error = self._build_steps(max_context, scratch)
            if step is not None:
                self.decode_forward = step  # decode goes compiled while the prefill conversions compile
            if self.device.type == "cpu":
                from pangu_infer.quant.modules import prepare_prefill

                check_stop(self._compile_stop)
                why = prepare_prefill(self.model)  # quantized weights' conversion for prefill, one loop each
                if why is not None:
                    logger.info("quantized prefill conversions stay eager for some shapes: %s", why)
        except _ProcessExiting:
            error = None  # the process is ending: nothing to report
        except CompileStopped:  # stop_compile(): nothing to report either
            error = None
            if self.decode_forward is None:
                self.compile_error = "the build was stopped (stop_compile: the engine was let go)"
        except BaseException as e:  # noqa: BLE001  (reported below; the engine stays eager)
            error = f"{type(e).__name__}: {e}"
        finally:
            if locked:
                _COMPILE_LOCK.release()
            self.compile_seconds = time.perf_counter() - start
            if step is not None:
                self.decode_forward = step  # the next decode-only step runs it
                logger.info("compiled decode step ready after %.1f s", self.compile_seconds)
            elif error is not None:
                self._compile_off(f"compiling failed ({error}); decoding eagerly")
            self._compiled_done.set()

    def _compile_off(self, why: str) -> None:
        self.compile_error = why
        rank = self.model.parallel.rank
        say(f"{f'tensor-parallel rank {rank}: ' if rank else ''}compiled decode off: {why}")

    def stop_compile(self) -> None:
        """Let the background build go (the engine is being let go: LLM.shutdown, or the LLM is
        collected): it ends at its next stopping point (a wait for another model's build, before each
        graph, before the prefill conversions), and its thread drops the model. Steps keep running,
        eagerly where the compiled step was not ready."""
        self._compile_stop.set()

    def wait_compiled(self, timeout: Optional[float] = None) -> bool:
        """Wait for the background compile (at most `timeout` seconds); True when decode-only steps
        now run compiled, False where compiled decode is off (enforce_eager, or it failed) or the
        time ran out."""
        self._compiled_done.wait(timeout)
        return self.decode_forward is not None

    @property
    def compiling(self) -> bool:
        """True while the compiled step is being built (steps run eagerly meanwhile)."""
        return not self._compiled_done.is_set()

    @contextmanager
    def _pinned(self) -> Iterator[None]:
        """This runner's cache bound, and kept bound while the block runs without the lock (for the
        compile: this runner's steps go on beside it, another runner's wait for it)."""
        state = self._binding
        with state.lock:
            while state.pinned is not None:
                state.released.wait()
            self._point_layers()
            state.pinned = self._token
        try:
            yield
        finally:
            with state.lock:
                state.pinned = None
                state.released.notify_all()

    @contextmanager
    def bind(self) -> Iterator[None]:
        """This runner's KV cache on the model's layers, the model held for the duration."""
        with self._binding.lock:
            self._point_layers()
            yield

    def _point_layers(self) -> None:
        """Re-point the layers at this runner's cache if another engine's step ran last (the
        model's lock held; waits while another runner's compile has its cache pinned)."""
        state = self._binding
        if state.token is not self._token:
            while state.pinned is not None and state.pinned is not self._token:
                state.released.wait()
            for layer, k, v, kernel in zip(self.attention_layers, self.k_caches, self.v_caches, self.decode_kernel):
                # Straight into __dict__: nn.Module.__setattr__ is slow, and this runs per layer per step.
                layer.__dict__["k_cache"], layer.__dict__["v_cache"] = k, v
                layer.__dict__["decode_kernel"] = kernel
            state.token = self._token

    @torch.inference_mode()
    def copy_slots(self, copies: list[tuple[int, int, int]]) -> None:
        """(source block, destination block, count): the first `count` slots of each source block's
        keys and values copied into the destination block's, in every layer's cache."""
        if self.mirror is not None:  # tensor parallel: every rank's cache shard
            self.mirror("copy", (copies,))
        bs = self.block_size
        src = torch.tensor([s * bs + j for s, _, m in copies for j in range(m)], dtype=torch.long, device=self.device)
        dst = torch.tensor([d * bs + j for _, d, m in copies for j in range(m)], dtype=torch.long, device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            if cache is not None:
                cache[dst] = cache[src]

    def run(
        self, batch: ScheduledBatch, drafts: Optional[dict[int, list[int]]] = None
    ) -> tuple[list[Sequence], torch.Tensor, dict[int, tuple[int, list[Logprob]]], dict[int, tuple[int, int, torch.Tensor]]]:
        """Forward every scheduled token; returns the sequences that reached their last token
        (they sample next) and their logits [rows, vocab] in float32: one row per sequence, or,
        for a sequence with a speculative draft (seq_id -> tokens), one row for its last token
        and one for each draft token, which are forwarded after it. Third, for sequences that want
        prompt logprobs: seq_id -> (the first prompt position scored, its entries). Fourth, for
        embedding requests' sequences (which never sample): seq_id -> their chunk's pooling result
        (_pooled). The sequences themselves are left unchanged."""
        self._in_step = True
        began = time.perf_counter()
        try:
            if self._first_step[1].is_set():
                return self._run(batch, drafts)
            self._first_step[0].set()
            try:
                return self._run(batch, drafts)
            finally:
                self._first_step[1].set()
        finally:
            self._in_step = False
            self._step_ended = time.monotonic()
            if self._pacing and all(n == 1 for n in batch.num_tokens):
                took = time.perf_counter() - began
                self._pace = (took if self._pace is None else min(took, self._pace[0]), max(map(self._steps_left, batch.seqs), default=0))

    def _steps_left(self, seq: Sequence) -> int:
        """The most decode steps `seq` may still take: to its max_tokens or the context's end (fewer
        where it stops sooner: an end-of-sequence token, a stop string). A draft model's runner is
        given views of the sequences (draft_model._DraftView), which read these from theirs."""
        if seq.pooling is not None:
            return 0
        left = self._max_context - seq.num_tokens
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - len(seq.output_token_ids))
        return max(left, 0)

    def _wait_while_busy(self, deadline: float) -> None:
        """The build's start, held while steps keep coming until `deadline` (time.perf_counter), or
        the engine is idle for IDLE_GAP_S, or stop_compile(), or the running sequences' steps left
        (to their max_tokens), at the fastest decode step's pace, end after the deadline: waiting then
        would only put the compiled steps off. The build's first seconds are torch's imports and the
        saved graphs' loading, Python that takes the interpreter lock from every kernel call of an
        eager step beside it: the demo's eager steps ran 2-3x slower, and a 256-token `generate`
        took twice as long as without the build (benchmarks/RESULTS.md)."""
        self._pacing = True
        try:
            while (now := time.perf_counter()) < deadline and not self._compile_stop.is_set():
                if not self._in_step and time.monotonic() - self._step_ended > IDLE_GAP_S:
                    return
                pace = self._pace
                if pace is not None and pace[0] * pace[1] > deadline - now:
                    return
                time.sleep(0.02)
        finally:
            self._pacing = False

    @torch.inference_mode()
    def _run(
        self, batch: ScheduledBatch, drafts: Optional[dict[int, list[int]]] = None
    ) -> tuple[list[Sequence], torch.Tensor, dict[int, tuple[int, list[Logprob]]], dict]:
        bs = self.block_size
        drafts = drafts or {}
        decode_forward = self.decode_forward  # read once: the compile thread may set it meanwhile
        # A decode: the sequence's last token alone. (A one-token chunk of a prompt is not: nothing
        # samples from it, so it goes with the prefill chunks; nor an embedding request's last prompt
        # token, whose hidden state is pooled, not sampled.)
        final = [
            n == 1 and s.num_computed_tokens + 1 == s.num_tokens and s.pooling is None for s, n in zip(batch.seqs, batch.num_tokens)
        ]
        if drafts and decode_forward is not None and not self.batch_invariant and all(final):
            return self._run_drafted_decodes(batch, drafts, decode_forward)
        decodes = [(s, n) for s, n, f in zip(batch.seqs, batch.num_tokens, final) if f and s.seq_id not in drafts]
        # Shortest context first, so decode attention can pad each group only to its own longest.
        decodes.sort(key=lambda sn: sn[0].num_computed_tokens)
        prefills = [
            (s, n + len(drafts.get(s.seq_id, ())))
            for s, n, f in zip(batch.seqs, batch.num_tokens, final)
            if not f or s.seq_id in drafts
        ]
        ordered = decodes + prefills
        compiled = decode_forward is not None and not prefills  # a decode-only step
        lora_slots = self._lora_slots(ordered, compiled and not isinstance(decode_forward, LoRAVariants)) if self.lora is not None else None

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
            # Batch-invariant: whole KV_SPLIT chunks, at least two (padding chunks add exact zeros), so the
            # chunk count is never 1: a size of 1 is a shape torch.compile specializes on, and the extra
            # graph compiled in the middle of decoding (one-chunk contexts) took minutes.
            attn.decode_slots, attn.decode_mask = (
                self._decode_slots(decodes, ctx, KV_SPLIT, 2 * KV_SPLIT) if invariant else self._decode_slots(decodes, ctx)
            )
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
        # bind(), without a generator's cost on every step; held through the LM head too: every
        # module call of a step is inside it (runner._every_forward_held: inductor's process-wide
        # fx trace fails a module called beside it, the head's lm_head as the layers)
        with self._binding.lock:
            self._point_layers()
            if self.lora is not None:
                self.lora.set_rows(lora_slots)  # the adapters' slot of each row (models/lora.py)
            if compiled:  # logits of every row, in decode order
                if self.mirror is not None:
                    self.mirror("decode", (ids, pos, attn))
                return [s for s, _ in decodes], decode_forward(ids, pos, attn), {}, {}
            if self.mirror is not None:
                self.mirror("forward", (ids, pos, attn))
            eager = self.eager_step if decodes and not prefills and not invariant else None
            hidden = self.model(ids, pos, attn) if eager is None else eager(ids, pos, attn)
            prompt_logprobs = self._prompt_logprobs(hidden, prefills, len(decodes))
            pooled = self._pooled(hidden, prefills, len(decodes))
            sampled: list[Sequence] = []
            rows: list[int] = []
            end = 0
            for seq, n in ordered:
                end += n
                num_draft = len(drafts.get(seq.seq_id, ()))
                if seq.num_computed_tokens + n - num_draft == seq.num_tokens and seq.pooling is None:
                    sampled.append(seq)
                    rows.extend(range(end - 1 - num_draft, end))
            if not rows:
                return [], hidden.new_empty(0, 0, dtype=torch.float32), prompt_logprobs, pooled
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        return sampled, logits, prompt_logprobs, pooled

    def _run_drafted_decodes(
        self, batch: ScheduledBatch, drafts: dict[int, list[int]], decode_forward: Callable
    ) -> tuple[list[Sequence], torch.Tensor, dict[int, tuple[int, list[Logprob]]], dict]:
        """A step of decodes, some with speculative drafts, through the compiled decode step: each
        drafted sequence's last token and draft tokens are decode rows of their own, one position
        after another (every row's K and V are written to the cache before any row attends, so a
        draft token's row sees the rows before it). Rows stay in sequence order: each sequence's
        logits rows are contiguous, last token first, as `run` returns them."""
        bs = self.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        rows: list[tuple[Sequence, int]] = []
        for seq in batch.seqs:
            start = seq.num_computed_tokens
            tokens = [seq.token_ids[start], *drafts.get(seq.seq_id, ())]
            input_ids.extend(tokens)
            for pos in range(start, start + len(tokens)):
                positions.append(pos)
                slot_mapping.append(seq.block_table[pos // bs] * bs + pos % bs)
                rows.append((seq, 1))
        attn = AttentionBatch(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev))
        attn.decode_slots, attn.decode_mask = self._decode_slots(rows, [p + 1 for p in positions])
        lora_slots = self._lora_slots(rows, not isinstance(decode_forward, LoRAVariants)) if self.lora is not None else None
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        with self._binding.lock:
            self._point_layers()
            if self.lora is not None:
                self.lora.set_rows(lora_slots)
            if self.mirror is not None:
                self.mirror("decode", (ids, pos, attn))
            return list(batch.seqs), decode_forward(ids, pos, attn), {}, {}

    @staticmethod
    def _lora_slots(ordered: list[tuple[Sequence, int]], always: bool) -> Optional[list[int]]:
        """The LoRA slot of each row of the step (-1: none), or None where no row has an adapter
        (the step then skips the adapters' products: eagerly, or in the compiled graph without them)
        unless `always` (a compiled step with only the adapters' graph computes them, zeros for rows
        with no adapter)."""
        if not always and all(s.lora_slot < 0 for s, _ in ordered):
            return None
        return [s.lora_slot for s, n in ordered for _ in range(n)]

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prefills: list[tuple[Sequence, int]], row: int
    ) -> dict[int, tuple[int, list[Logprob]]]:
        """Prompt logprobs of the prefill chunks that want them: the hidden row of position p
        scores prompt token p + 1, computed PROMPT_LOGPROB_ROWS rows of logits at a time."""
        out: dict[int, tuple[int, list[Logprob]]] = {}
        for seq, n in prefills:
            start = seq.num_computed_tokens
            stop = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt position scores the first output
            if seq.wants_prompt_logprobs and stop > start:
                k = seq.params.prompt_logprobs
                entries: list[Logprob] = []
                for a in range(start, stop, PROMPT_LOGPROB_ROWS):
                    b = min(a + PROMPT_LOGPROB_ROWS, stop)
                    logits = self.model.compute_logits(hidden[row + a - start : row + b - start])
                    targets = seq.token_ids[a + 1 : b + 1]
                    entries += [Logprob(t, lp, top, rank) for t, (lp, top, rank) in zip(targets, token_logprobs(logits, targets, k))]
                out[seq.seq_id] = (start + 1, entries)
            row += n
        return out

    @staticmethod
    def _pooled(
        hidden: torch.Tensor, prefills: list[tuple[Sequence, int]], row: int
    ) -> dict[int, tuple[int, int, torch.Tensor]]:
        """Embedding requests' chunks (Sequence.pooling): seq_id -> (first position, end, float32
        [H]): mean pooling, the sum of the hidden rows of positions not pooled before (a prompt
        computed again after preemption skips those it already summed); last pooling, the row of
        the prompt's last position, in the chunk that computes it."""
        out: dict[int, tuple[int, int, torch.Tensor]] = {}
        for seq, n in prefills:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if seq.pooling == "mean":
                first = max(start, seq.num_pooled)
                if end > first:
                    out[seq.seq_id] = (first, end, hidden[row + first - start : row + n].float().sum(0))
            elif seq.pooling == "last" and end == seq.num_prompt_tokens:
                out[seq.seq_id] = (end - 1, end, hidden[row + n - 1].float())
            row += n
        return out

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

    def _decode_slots(
        self, decodes, ctx: list[int], multiple: int = 1, minimum: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] slots and [B, 1, 1, L] validity, L the longest context rounded up to `multiple`
        (and at least `minimum`)."""
        bs = self.block_size
        max_ctx = max(minimum, -(-max(ctx) // multiple) * multiple)
        max_blocks = -(-max_ctx // bs)
        # In numpy, then one tensor each: a third to a half of the time of the same steps as torch
        # operators on these small arrays (30 us of every decode step at batch 1, 450 at 64 x 1000 keys)
        table = np.array(
            [s.block_table[:max_blocks] + [s.block_table[0]] * (max_blocks - len(s.block_table[:max_blocks])) for s, _ in decodes],
            dtype=np.int64,
        )
        slots = (table[:, :, None] * bs + np.arange(bs)).reshape(len(decodes), -1)[:, :max_ctx]
        valid = np.arange(max_ctx)[None, :] < np.array(ctx)[:, None]
        # Padding repeats the sequence's first slot, which always holds real values.
        slots = np.where(valid, slots, slots[:, :1])
        return torch.from_numpy(slots).to(self.device), torch.from_numpy(valid).to(self.device)[:, None, None, :]


class _ProcessExiting(BaseException):
    """Raised in a compile thread still running when the interpreter exits (_stop_compiles)."""


# Held by the compile thread that is building (one at a time: _build_compiled).
_COMPILE_LOCK = threading.Lock()
# Compile threads still running: _stop_compiles stops them at the interpreter's exit.
_compile_threads: set[threading.Thread] = set()
_compile_threads_lock = threading.Lock()
# How long the exit waits for compile threads to unwind (a thread stops at its next Python bytecode:
# at most one C++ compiler run in practice).
EXIT_STOP_WAIT_S = 60.0


def _trace_inductors_placeholder() -> None:
    """torch.fx's symbolic tracing replaces nn.Module.__call__ for the whole process while it runs,
    so a module called on another thread meanwhile fails ("module is not installed as a
    submodule"). Inductor traces one function that way, once per process, in the middle of a
    compile (loop_body.InterpreterShim's placeholder graph, cached after): an eager step on the
    engine thread at that moment failed its request with a 500. Traced here first, holding the
    lock every step's forward takes, of every model in the process (a draft model's too:
    _every_forward_held); the compile's own traces (make_fx) pass other callers' module calls
    through. The module is imported before the locks are taken: its import (most of inductor, a
    second or more) held every step while the lock was."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except Exception as e:  # noqa: BLE001  (torch's private helper moved: the compile goes on as it did)
        logger.debug("inductor's placeholder graph not traced ahead: %s", e)
        return
    with _every_forward_held():  # no model's forward runs meanwhile: the target's, a draft's, another LLM's
        try:
            InterpreterShim._dummy_gm()
        except Exception as e:  # noqa: BLE001
            logger.debug("inductor's placeholder graph not traced ahead: %s", e)


def _start_compile_thread(target: Callable, *args) -> None:
    """Run `target(*args)` on a daemon thread, stopped when the interpreter exits if it still runs.

    A daemon thread still inside torch when the interpreter finalizes is ended by CPython
    (pthread_exit when it next takes the GIL), and that unwinds through torch's C++ destructors and
    aborts the process ("terminate called without an active exception", exit status 134): a short
    script that ends while the compiled step builds. So an exit handler, which runs before
    finalization, raises `_ProcessExiting` in the thread and waits for it to unwind. It is
    registered with the first thread, after torch's handlers, so it runs before them."""
    import atexit

    def main() -> None:
        try:
            target(*args)
            with _compile_threads_lock:
                # An exception raised by _stop_compiles just before is delivered by this call at the
                # latest: inside the try.
                _compile_threads.discard(threading.current_thread())
        except _ProcessExiting:
            pass

    thread = threading.Thread(target=main, name="pangu-infer-compile", daemon=True)
    with _compile_threads_lock:
        if not _compile_threads:
            atexit.unregister(_stop_compiles)
            atexit.register(_stop_compiles)
        _compile_threads.add(thread)
    thread.start()


def _stop_compiles() -> None:
    import ctypes

    with _compile_threads_lock:
        threads = [t for t in _compile_threads if t.ident is not None and t.is_alive()]
        for thread in threads:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_ProcessExiting))
        _compile_threads.clear()
    deadline = time.monotonic() + EXIT_STOP_WAIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _lower_thread_priority() -> None:
    """Give the calling thread (and the compiler processes it starts, which inherit it) a lower CPU
    priority: while the compiled step builds, the steps that answer run eagerly beside it and should
    get the CPU first (benchmarks/RESULTS.md, startup). Linux only: elsewhere setpriority on a
    thread id would renice the whole process. PANGU_INFER_COMPILE_NICE sets the increment (0: none)."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        step = int(os.environ.get("PANGU_INFER_COMPILE_NICE", COMPILE_NICE))
        if step > 0:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (OSError, ValueError):
        pass


def _unbind(layers: list[Attention], state: _Binding, token: object) -> None:
    """A collected runner's cache leaves the layers it is still bound to (its memory is freed)."""
    with state.lock:
        if state.token is token:
            for layer in layers:
                layer.__dict__["k_cache"] = layer.__dict__["v_cache"] = None
            state.token = None
