"""Which shard this process holds (rank, world size) and the collectives the model layers call."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.device import tracing


@dataclass
class ParallelState:
    """One rank of a tensor-parallel group. World size 1 means no communication at all."""

    rank: int = 0
    world_size: int = 1
    # Seconds and calls spent in collectives inside the model forward (benchmarks read these). Not
    # in the repr: a saved compiled step's key describes the model's plain attributes by it.
    collective_seconds: float = field(default=0.0, compare=False, repr=False)
    collective_calls: int = field(default=0, compare=False, repr=False)
    # Set on rank 0 by the driver: collects a list of counts from every rank ([item][rank]).
    gather_counts: Optional[Callable[[list[int]], list[list[int]]]] = field(default=None, compare=False, repr=False)
    # Batch-invariant mode (models/batch_invariant.make_batch_invariant): every reduction adds the
    # ranks' partial sums in rank order (ordered_all_reduce), the same order for every element
    # whatever the batch; a ring all-reduce adds an element's partials in an order set by the chunk
    # it falls in, which moves with the tensor's size (with more than 2 ranks, other bits).
    ordered_sums: bool = field(default=False, compare=False, repr=False)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def counts_per_rank(self, local: list[int]) -> list[list[int]]:
        """[item][rank] from every rank's own counts (just this rank's in one process)."""
        if self.gather_counts is None:
            return [[c] for c in local]
        return self.gather_counts(local)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks: in place eagerly; inside a compiled step, the opaque operator
        pangu_infer::all_reduce (use the tensor returned)."""
        if tracing():
            return torch.ops.pangu_infer.all_reduce(x)
        start = time.perf_counter()
        if self.ordered_sums:
            ordered_all_reduce(x, self.world_size)
        else:
            dist.all_reduce(x)
        self.collective_seconds += time.perf_counter() - start
        self.collective_calls += 1
        return x


def ordered_all_reduce(x: torch.Tensor, world_size: int) -> None:
    """x summed over the ranks in place, in rank order: every rank's partials gathered (copies,
    exact), then added one rank after another in float32 (at least), rounded once to x's dtype."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    total = parts[0].to(torch.promote_types(x.dtype, torch.float32))
    for part in parts[1:]:
        total += part
    x.copy_(total)


SINGLE_PROCESS = ParallelState()
_current: ParallelState = SINGLE_PROCESS
# The shard this process's layers were last built for under tensor parallelism (building_shard):
# the compiled all-reduce counts its time there, as the eager one does on the layers' own state.
_own: ParallelState = SINGLE_PROCESS
_skipping = threading.local()


# A compiled step's all-reduce: one opaque operator, so that a tensor-parallel rank's decode step
# is one graph like a single process's (dynamo would otherwise break the graph at the collective,
# or trace it as functional collectives, on every backend differently). It runs the eager one.
_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("all_reduce(Tensor x) -> Tensor")


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    if not getattr(_skipping, "on", False):
        _own.all_reduce(out)
    return out


_lib.impl("all_reduce", _all_reduce, "CompositeExplicitAutograd")
_lib._register_fake("all_reduce", lambda x: torch.empty_like(x))


@contextlib.contextmanager
def collectives_skipped() -> Iterator[None]:
    """Compiled steps run on this thread skip their all-reduces (each rank warms up its compiled
    step alone, on dummy tokens, beside the steps that answer: a collective there would pair with
    another rank's unrelated one). Eager forwards are untouched."""
    previous = getattr(_skipping, "on", False)
    _skipping.on = True
    try:
        yield
    finally:
        _skipping.on = previous


def current_parallel_state() -> ParallelState:
    """The state model layers read while they are built (world size 1 outside `building_shard`)."""
    return _current


@contextlib.contextmanager
def building_shard(state: ParallelState) -> Iterator[ParallelState]:
    """Layers built inside this block hold the shard of `state`'s rank."""
    global _current, _own
    previous, _current = _current, state
    if state.is_parallel:
        _own = state
    try:
        yield state
    finally:
        _current = previous


def check_tensor_parallel_size(world_size: object) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel_size={world_size!r} must be a positive integer")


def check_parallel_config(cfg: ModelConfig, world_size: int) -> None:
    """Every divisibility the shard layout needs, checked before any process is started."""
    check_tensor_parallel_size(world_size)
    if world_size == 1:
        return
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} must divide num_attention_heads={heads} (heads are split across ranks)"
        )
    if kv % world_size and world_size % kv:
        raise ValueError(
            f"tensor_parallel_size={world_size} and num_key_value_heads={kv}: one must divide the other "
            f"(KV heads are split, or replicated when there are fewer than ranks)"
        )
    widths = {"intermediate_size": cfg.intermediate_size}
    if cfg.is_topk_moe:
        widths = {"shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
        if cfg.first_k_dense_replace:
            widths["intermediate_size"] = cfg.intermediate_size
        if cfg.num_experts % world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} must divide n_routed_experts={cfg.num_experts} "
                f"(each rank holds an equal range of experts)"
            )
    if cfg.is_moge:
        widths = {"shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
        if cfg.num_expert_groups % world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} must divide num_expert_groups={cfg.num_expert_groups} "
                f"(each rank holds whole expert groups): use 1, 2, 4 or 8 for Pangu Pro MoE"
            )
    for name, width in widths.items():
        if width % world_size:
            raise ValueError(f"tensor_parallel_size={world_size} must divide {name}={width} (the MLP is split across ranks)")


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds: query heads [q_start, q_start+q_count), KV heads likewise."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def head_shard(cfg: ModelConfig, state: ParallelState) -> HeadShard:
    """Query heads split evenly; KV heads split too, or the one KV head its query heads read is
    replicated on each rank when there are fewer KV heads than ranks."""
    heads, kv, n, r = cfg.num_attention_heads, cfg.num_key_value_heads, state.world_size, state.rank
    q_count = heads // n
    if kv >= n:
        return HeadShard(r * q_count, q_count, r * (kv // n), kv // n)
    queries_per_kv = heads // kv
    return HeadShard(r * q_count, q_count, (r * q_count) // queries_per_kv, 1)


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T, then the bias once: each rank holds in_features/world columns.

    With reduce=False the partial sum is returned (the caller reduces several partial sums in one
    collective) and only rank 0 adds the bias, so the later sum still counts it once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, state: ParallelState, reduce: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.state = state
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reduced(F.linear(x, self.weight), self.bias, self.state, self.reduce)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's x_r @ W_r^T alone (what `finish` sums over the ranks): a LoRA wrapper adds
        the rank's share of the adapter's product between the two (models/lora.py)."""
        return F.linear(x, self.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """A partial product summed over the ranks (or left partial), the bias added once."""
        return _reduced(y, self.bias, self.state, self.reduce)

    def around(self, product: nn.Module) -> "RowParallelProduct":
        """This linear with its weight's product done by `product` (a quantized or packed weight
        laid out for its kernel, no bias): the all-reduce and the bias stay as they are."""
        return RowParallelProduct(product, self.bias, self.state, self.reduce)


class RowParallelProduct(nn.Module):
    """A RowParallelLinear whose x @ W_r^T is another module's (see RowParallelLinear.around)."""

    def __init__(self, product: nn.Module, bias: Optional[nn.Parameter], state: ParallelState, reduce: bool):
        super().__init__()
        self.product = product
        self.bias = bias
        self.state = state
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _reduced(self.product(x), self.bias, self.state, self.reduce)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return _reduced(y, self.bias, self.state, self.reduce)


def _reduced(y: torch.Tensor, bias: Optional[torch.Tensor], state: ParallelState, reduce: bool) -> torch.Tensor:
    """A row-parallel partial product summed over the ranks (or left partial), the bias added once."""
    if reduce:
        y = state.all_reduce(y)
        return y if bias is None else y + bias
    return y if bias is None or state.rank != 0 else y + bias


def row_parallel_linear(
    in_features: int, out_features: int, bias: bool, state: ParallelState, reduce: bool = True
) -> nn.Linear:
    """A plain nn.Linear in a single process (so that path is unchanged), RowParallelLinear otherwise."""
    if not state.is_parallel:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, state, reduce)


def rank_range(total: int, state: ParallelState) -> range:
    """This rank's contiguous share of `total` items (experts, MLP columns)."""
    per = total // state.world_size
    return range(state.rank * per, (state.rank + 1) * per)
