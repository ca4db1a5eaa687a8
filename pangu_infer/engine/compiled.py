"""The torch.compile'd decode step: built and warmed up on a background thread when an engine
starts (engine/runner.py decodes eagerly until it is ready), kept in a persistent compile cache,
and replaced by the eager forward (with one line saying why) where it cannot be built."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import types
from typing import Callable, Iterator, Optional

import torch

from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.batch_invariant import KV_SPLIT
from pangu_infer.models.layers import UNMASKED_SDPA_MAX_CONTEXT, AttentionBatch, disable_compile_on_marked_methods
from pangu_infer.native import compile_cache_dir, compile_problem  # noqa: F401  (their home before native.py)
from pangu_infer.engine import saved_step

logger = logging.getLogger("pangu_infer.engine")

DecodeStep = Callable[[torch.Tensor, torch.Tensor, AttentionBatch], torch.Tensor]


def _decode_step(model: DecoderForCausalLM, input_ids, positions, attn) -> torch.Tensor:
    # Every row of a decode-only step samples: the head runs inside the compiled graph too. A
    # tensor-parallel worker rank holds no head (only rank 0 samples): its step ends at the hidden
    # states (the rank is a constant of the graph and of a saved step's key).
    hidden = model(input_ids, positions, attn)
    return hidden if model.parallel.rank else model.compute_logits(hidden)


# The sizes that change from one decode step to the next (batch rows, context length), marked
# dynamic on each step's inputs; (tensor name, dims). Everything else (weights, float attributes
# such as the norms' eps, the KV cache's shape) stays static: that keeps them constants of the
# graph, not per-call inputs.
_DYNAMIC_DIMS = (("slot_mapping", (0,)), ("decode_slots", (0, 1)), ("decode_mask", (0, 3)))


def _warmup_shapes(max_context: int, batch_invariant: bool = False, inline_bounds: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """(batch, context) of one decode step per graph dynamo keeps: batch 1 (a size of 1 is never
    dynamic), batch 1 past UNMASKED_SDPA_MAX_CONTEXT (another attention path) when a sequence
    can get that long, and every larger batch (one graph with dynamic batch and context).
    Batch-invariant steps have one attention path, over contexts padded to KV_SPLIT keys, and a
    graph per range of batch sizes between the row counts up to which linears are traced inline
    (`inline_bounds`, each below the engine's largest batch; models/batch_invariant.inline_rows)."""
    if batch_invariant:
        return [(1, 2 * KV_SPLIT), (2, 2 * KV_SPLIT)] + [(b + 1, 2 * KV_SPLIT) for b in sorted(set(inline_bounds)) if b >= 2]
    shapes = [(1, 16)]
    if max_context > UNMASKED_SDPA_MAX_CONTEXT:
        shapes.append((1, UNMASKED_SDPA_MAX_CONTEXT + 1))
    shapes.append((2, 16))
    return [(b, max(2, min(c, max_context))) for b, c in shapes]  # a context of 1 would be a static size


def _step_function() -> Callable:
    # A code object of its own per compiled function (see _compile).
    return types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, "decode_step")


def _options(device: torch.device, batch_invariant: bool) -> dict:
    """Inductor's options for the decode step (see _compile)."""
    options: dict = {"size_asserts": False, "alignment_asserts": False}
    if batch_invariant:
        # Round every intermediate to its dtype where eager does, so that a compiled decode step
        # computes the tokens' values bitwise like the eager prefill (preemption recomputes them so).
        options["emulate_precision_casts"] = True
    if device.type == "cpu":  # (on CUDA the C++ wrapper needs the CUDA toolkit's headers; untested there)
        options["cpp_wrapper"] = True
        # Kernels and wrapper compiled as two files: a first build of the demo model's step took
        # 219 s instead of 290 s on Zen 1 (g++ 48 s instead of 125 s), decode within noise.
        options["cpp_wrapper_build_separate"] = True
    return options


def _compile(model: DecoderForCausalLM, device: torch.device, batch_invariant: bool = False) -> DecodeStep:
    """torch.compile of `model`'s forward + head for decode-only steps, private to this model.

    Shapes: the batch and context sizes of the step's inputs are marked dynamic, so one graph
    serves every context length and batch size (dynamo keeps batch 1 apart, and batch 1 past
    UNMASKED_SDPA_MAX_CONTEXT). Nothing else is dynamic. With `dynamic=True`, dynamo also turned
    every float attribute (each norm's eps) into a tensor built on each call and gave the weights
    symbolic shapes; dynamic cache sizes cost one size argument per cache tensor per call. The cache shape is therefore static: graphs are kept per KV cache
    (slots, dtype), and an engine with another cache size compiles its own.

    On CPU the generated wrapper is C++ (`cpp_wrapper`): the ~300 kernel calls of a step no longer
    each go through Python (measured in benchmarks/RESULTS.md). The per-call checks of
    every buffer's size and alignment are off too. Its kernels and its entry are compiled apart
    (`cpp_wrapper_build_separate`: a shorter first build, measured in benchmarks/RESULTS.md).

    Each compiled function gets a code object of its own, because dynamo keeps graphs and their
    guards per code object: graphs traced for this model and cache shape are never tried on
    another's call. That makes it safe to drop the guards on the model's modules, weights and
    bound KV caches (weights never change after loading; the caches' shape and dtype are this
    function's key, and each step reads the caches bound at call time): about a thousand checks
    per step. A model that breaks the graph (`has_graph_breaks`: a MoE model off CPU, whose load
    counters stay outside the graph) keeps all guards: the code after a break is shared by every
    model of the class.
    """
    disable_compile_on_marked_methods(model)
    step = _step_function()
    options = _options(device, batch_invariant)
    if not getattr(model, "has_graph_breaks", False):
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    global _LAYERS_COMPILED
    _LAYERS_COMPILED += model.config.num_hidden_layers
    raise_recompile_limits(_LAYERS_COMPILED)
    compiled = torch.compile(step, options=options)

    def decode_step(input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        # dynamo's config is per thread (a context variable): the limits raised on the compile
        # thread do not hold on the thread that runs the steps, whose recompiles (a shape the
        # warm-up did not cover) hit the default 8, and frames past it run eagerly from then on.
        if torch._dynamo.config.recompile_limit < 4 * _LAYERS_COMPILED + 8:
            raise_recompile_limits(_LAYERS_COMPILED)
        _mark_dynamic(input_ids, positions, attn)
        return compiled(model, input_ids, positions, attn)

    return decode_step


def _mark_dynamic(input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> None:
    torch._dynamo.maybe_mark_dynamic(input_ids, 0)
    torch._dynamo.maybe_mark_dynamic(positions, 0)
    for name, dims in _DYNAMIC_DIMS:
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(getattr(attn, name), dim)


_LAYERS_COMPILED = 0  # decoder layers of every model compiled in this process: frames are shared per class


def raise_recompile_limits(num_layers: int) -> None:
    """Let dynamo keep a graph per layer and per graph shape.

    Past a graph break (a MoE model's host load counters, off CPU) dynamo compiles each decoder
    layer's frame apart: the layer's modules are guarded, their integer attributes included (a
    batch-invariant row-tiled linear's handle differs per layer), so the same code object gets one entry per layer
    and per graph shape. With dynamo's default limit of 8 entries per code object, every layer
    past the 8th of a 12-layer MoGE model ran eagerly inside the compiled step ("hit
    config.recompile_limit (8)"; Pangu Pro MoE has 48 layers). Limits are only ever raised.
    """
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 4 * num_layers + 8)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 16 * num_layers + 64)


class CompileStopped(BaseException):
    """Raised between two graphs of a build whose `stop` event is set (the engine was let go): a
    BaseException, so that the handlers that fall back from one way of building to another let it
    through."""


def check_stop(stop: Optional[threading.Event]) -> None:
    """CompileStopped where `stop` is set: a build's stopping point."""
    if stop is not None and stop.is_set():
        raise CompileStopped()


def _warm_up(step: DecodeStep, device: torch.device, shapes, scratch: range, batch_invariant: bool = False,
             stop: Optional[threading.Event] = None) -> None:
    """Run the compiled step once per (batch, context), on dummy tokens that read and write only
    the `scratch` slots of the bound cache (slots no sequence is ever given), so that no user
    request waits for a compile and a warm-up running beside live steps never touches their KV.
    Each shape is a graph of its own to trace and compile: `stop` is checked before each."""
    for batch, ctx in shapes:
        check_stop(stop)
        step(*_dummy_step(batch, ctx, device, scratch, batch_invariant))


def _dummy_step(batch: int, ctx: int, device: torch.device, scratch: range, batch_invariant: bool = False) -> tuple:
    """(input_ids, positions, attn) of a decode step of `batch` rows over `ctx` keys, on dummy
    tokens that read and write only the `scratch` slots."""
    base, size = scratch.start, len(scratch)
    attn = AttentionBatch(
        slot_mapping=base + torch.arange(batch, device=device) % size,
        decode_slots=(base + torch.arange(ctx, device=device) % size).repeat(batch, 1),
        decode_mask=torch.ones(batch, 1, 1, ctx, dtype=torch.bool, device=device),
        batch_invariant=batch_invariant,
    )
    ids = torch.zeros(batch, dtype=torch.long, device=device)
    return ids, torch.full((batch,), ctx - 1, dtype=torch.long, device=device), attn


def _saved_steps_apply(model: DecoderForCausalLM, device: torch.device, batch_invariant: bool) -> bool:
    """Are this model's graphs saved whole (engine/saved_step.py)? On CPU, for a model traced as
    one graph; a model with graph breaks and the batch-invariant mode's graphs per batch range
    stay with torch.compile's caches, as does CUDA (untested there)."""
    return (
        saved_step.enabled() and device.type == "cpu" and not batch_invariant
        and not getattr(model, "has_graph_breaks", False)
    )


def _build_saved(
    model: DecoderForCausalLM, kv_cache: torch.Tensor, shapes, scratch: range, step: Optional[saved_step.SavedStep] = None,
    variant: str = "", stop: Optional[threading.Event] = None,
) -> saved_step.SavedStep:
    """The decode step (`step` extended, or a new one) over one saved graph per warm-up shape that
    the graphs before it do not cover: each loaded from the steps folder, or traced, compiled and
    saved there; each run once.
    Runs under inference_mode, as the steps do (a saved graph's guards hold its inputs' dispatch
    keys). Raises where torch cannot build or save one (the caller compiles the regular way)."""
    device = kv_cache.device
    disable_compile_on_marked_methods(model)
    options = _options(device, batch_invariant=False)
    step = step or saved_step.SavedStep(model, _decode_step)
    for batch, ctx in shapes:
        check_stop(stop)
        inputs = _dummy_step(batch, ctx, device, scratch)
        if step.graph_for(*inputs) is not None:
            continue
        key = saved_step.step_key(model, kv_cache, (batch, ctx), options, variant)
        graph = saved_step.load(key)
        if graph is not None and not graph.guard_check(model, *inputs):
            logger.info("the saved decode step for %s refuses the inputs it was built for: building it again", (batch, ctx))
            graph = None
        if graph is not None:
            step.loaded += 1
        else:
            step.built += 1
            _mark_dynamic(*inputs)
            compiled = torch.compile(_step_function(), fullgraph=True, options={**options, "guard_filter_fn": saved_step.serializable_guards})
            graph = _aot_compile(compiled, (model, *inputs))
            if not graph.guard_check(model, *inputs):
                raise RuntimeError(f"the graph built for a decode step of {batch} x {ctx} refuses its own inputs")
            saved_step.save(graph, key)
        graph.disable_guard_check()  # SavedStep checks the guards itself to choose the graph
        step.graphs.append(graph)
        step(*inputs)
    return step


def _aot_compile(compiled, args: tuple, attempts: int = 4):
    """`compiled.aot_compile` of `args`, traced again where dynamo asks for it.

    When inductor's pass over the traced graph finds a float scalar input it cannot turn into a
    tensor, it records the scalar as one to specialize (a process-wide set, dynamo's TensorifyState)
    and raises TensorifyScalarRestartAnalysis; torch.compile's own path then traces the frame again,
    aot_compile passes the exception up. Whether it is raised depends on what earlier compiles in
    the process left in that set (seen with a MoGE step: one process built its saved step, another
    fell back to the regular path), so the trace is repeated here as dynamo would."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    for attempt in range(attempts):
        try:
            return compiled.aot_compile((args, {}))
        except TensorifyScalarRestartAnalysis:
            if attempt == attempts - 1:
                raise
            logger.info("tracing the decode step again: dynamo specializes a float it could not make a tensor")


def inline_bounds(model: torch.nn.Module, max_batch: Optional[int]) -> tuple[int, ...]:
    """The row counts below `max_batch` (None: any) up to which the model's batch-invariant
    linears are traced inline in a compiled step: a batch past one of them takes another graph."""
    from pangu_infer.models.batch_invariant import RowTiledLinear

    bounds = {m.inline_rows for m in model.modules() if isinstance(m, RowTiledLinear) and m.inline_rows > 0}
    return tuple(sorted(b for b in bounds if max_batch is None or b < max_batch))


def cached_decode_step(
    model: DecoderForCausalLM, kv_cache: torch.Tensor, max_context: int, batch_invariant: bool = False,
    max_batch: Optional[int] = None, variant: str = "",
) -> Optional[DecodeStep]:
    """The model's compiled step for this KV cache shape if one is built and warmed up for every
    graph `max_context` (and, batch-invariant, batches up to `max_batch`) needs (another engine
    over the same model built it), else None."""
    key = (tuple(kv_cache.shape), kv_cache.dtype, kv_cache.device, batch_invariant, variant)
    step, warmed = model.__dict__.get("_compiled_decode_steps", {}).get(key, (None, set()))
    bounds = inline_bounds(model, max_batch) if batch_invariant else ()
    return step if step is not None and set(_warmup_shapes(max_context, batch_invariant, bounds)) <= warmed else None


def build_decode_step(
    model: DecoderForCausalLM, kv_cache: torch.Tensor, max_context: int, scratch: range, batch_invariant: bool = False,
    max_batch: Optional[int] = None, variant: str = "", stop: Optional[threading.Event] = None,
) -> tuple[Optional[DecodeStep], Optional[str]]:
    """(the model's compiled decode step for the KV cache bound now, None) once built and warmed
    up, or (None, why) where compiling failed. `kv_cache` is one of the bound cache tensors;
    sequences reach at most `max_context` tokens (it decides which graphs to warm up); the warm-up
    writes only the `scratch` slots. Meant for a background thread: it prints nothing, and builds
    for one model run one at a time. A model with LoRA adapters has two: `variant` "lora" computes
    the adapters' products, "base" leaves them out (LoRAVariants runs each where it applies).
    `stop` set: CompileStopped before the next graph, nothing kept of the build."""
    lora = model.__dict__.get("_lora_state")
    if lora is None:
        return _build_decode_step(model, kv_cache, max_context, scratch, batch_invariant, max_batch, variant, stop)
    lora.in_graph = variant != "base"  # what the graphs traced now compute (models/lora.py)
    try:
        return _build_decode_step(model, kv_cache, max_context, scratch, batch_invariant, max_batch, variant, stop)
    finally:
        lora.in_graph = True


def _build_decode_step(
    model: DecoderForCausalLM, kv_cache: torch.Tensor, max_context: int, scratch: range, batch_invariant: bool,
    max_batch: Optional[int], variant: str, stop: Optional[threading.Event] = None,
) -> tuple[Optional[DecodeStep], Optional[str]]:
    # Inductor's caches read the variable each time they look a graph up.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    device = kv_cache.device
    shapes = _warmup_shapes(max_context, batch_invariant, inline_bounds(model, max_batch) if batch_invariant else ())
    key = (tuple(kv_cache.shape), kv_cache.dtype, device, batch_invariant, variant)
    lock = model.__dict__.setdefault("_compile_lock", threading.Lock())
    with lock:
        steps = model.__dict__.setdefault("_compiled_decode_steps", {})
        step, warmed = steps.get(key, (None, set()))
        if step is not None and set(shapes) <= warmed:  # another engine over this model built it
            return step, None
        if (step is None or isinstance(step, saved_step.SavedStep)) and _saved_steps_apply(model, device, batch_invariant):
            try:
                with torch.inference_mode():  # (graphs for shapes another engine's warm-up did not need added)
                    step = _build_saved(model, kv_cache, [s for s in shapes if s not in warmed], scratch, step, variant, stop)
                steps[key] = (step, warmed | set(shapes))
                return step, None
            except Exception:  # noqa: BLE001  the regular compiled step may still build
                logger.info("saving the compiled decode step failed: compiling it the regular way", exc_info=True)
                step, warmed = None, set()
        if step is None:
            step = _compile(model, device, batch_invariant)
        try:
            with torch.inference_mode():
                _warm_up(step, device, [s for s in shapes if s not in warmed], scratch, batch_invariant, stop)
        except Exception as e:  # noqa: BLE001  any dynamo/inductor failure: the eager forward still works
            logger.info("compiling the decode step failed", exc_info=True)
            text = str(e).strip()
            return None, f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
        steps[key] = (step, warmed | set(shapes))
        return step, None


class LoRAVariants:
    """The compiled decode step of a model with LoRA adapters: the graph with the adapters' products
    where a row of the step has an adapter (the runner's set_rows made `state.active` True), the
    graph without them where none has. Each call tells the graphs' guards which one runs
    (`state.in_graph`: a model with graph breaks keeps its graphs' guards on the model)."""

    def __init__(self, with_lora: DecodeStep, base: DecodeStep, state) -> None:
        self.with_lora, self.base, self.state = with_lora, base, state

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        on = self.state.active
        self.state.in_graph = on
        try:
            return (self.with_lora if on else self.base)(input_ids, positions, attn)
        finally:
            self.state.in_graph = True


# Lines say() was asked for while a reply streams to the terminal (lines_held), printed after it.
_held: Optional[list[str]] = None
_held_lock = threading.Lock()


def say(line: str, end: str = "\n") -> None:
    """One line on stderr (the compile thread's progress and fallbacks); held while lines_held() runs."""
    text = f"pangu-infer: {line}{end}"
    with _held_lock:
        if _held is not None:
            _held.append(text)
            return
    print(text, end="", file=sys.stderr, flush=True)


@contextlib.contextmanager
def lines_held() -> Iterator[None]:
    """While a reply streams to the terminal, say()'s lines (from the compile thread, which starts
    once the first step of a prompt given with the command is done) wait, and follow the reply
    instead of landing in its middle."""
    global _held
    with _held_lock:
        outer, _held = _held, _held if _held is not None else []
    try:
        yield
    finally:
        with _held_lock:
            lines = _held if outer is None else []
            _held = outer
        for text in lines or []:
            print(text, end="", file=sys.stderr, flush=True)
