"""LoRA adapters on a loaded model, many at once: y = W x + B_a (A_a x) for the rows of adapter a.

`enable_lora(model, ...)` wraps every projection an adapter may target (q/k/v/o of attention,
gate/up/down of the dense and shared-expert MLPs) in a LoRALinear around whatever module holds its
weight (plain, oneDNN-packed or quantized: LoRA adds to its output). Fused modules (qkv_proj,
gate_up_proj) keep one pair per checkpoint projection, each adding to its own columns.

The adapters live in slots of fixed shape, so that one graph serves every mix of adapters: per
checkpoint projection, `lora_a` [slots * max_rank, in] (slot s's A in rows s*R .. s*R + r, zeros
after) and `lora_b` [out, slots * max_rank]. Every wrapper of a model shares one LoRAState, whose
`slot_ids` buffer says each row's slot for the step (-1: no adapter), written by the engine's
runner before each forward. A wrapper computes `(x @ lora_a^T) * mask @ lora_b^T`, the mask keeping
each row's own slot's columns: two products of slots * max_rank columns, whatever the adapters are,
traced once into the compiled decode step. Steps with no adapter row skip them: eager ones by
`state.active`, compiled ones by running a second graph traced without them (`state.in_graph`
False while it is traced; engine/compiled.py's LoRAVariants): the products read (in + out) *
slots * max_rank weights per projection, more than a 4-bit small model's own weights.

Under tensor parallelism each rank's slots hold its shard of every adapter, cut as the base weights
are (parallel/sharding.py, applied to the adapter's matrices by `_shard_indices`): a column-parallel
projection (q/k/v, gate/up: the rank holds some output rows) keeps those rows of B and all of A; a
row-parallel one (o_proj, down_proj: the rank holds some input columns, its partial product summed
over the ranks) keeps those columns of A and all of B, and adds its partial LoRA product to its
partial sum before the all-reduce, so the sum over the ranks is x @ A^T @ B^T once. Adapters are
checked against the whole model's shapes (`LoRAState.full_shapes`) and cut when installed.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn

from pangu_infer.device import tracing
from pangu_infer.models.batch_invariant import linear_sizes
from pangu_infer.parallel.state import ParallelState, RowParallelLinear, RowParallelProduct, building_shard

# The checkpoint projections an adapter may target, by HF module name. Routed experts are excluded.
_TARGET = re.compile(r"^(?P<module>.+\.(q|k|v|o|gate|up|down)_proj)\.weight$")


class LoRAState:
    """What every LoRALinear of one model shares: the slots' shape, each row's slot for the step,
    and which wrapper (and slice of it) each checkpoint projection is."""

    def __init__(self, slots: int, max_rank: int, max_rows: int, dtype: torch.dtype, device: torch.device):
        self.slots, self.max_rank, self.dtype, self.device = slots, max_rank, dtype, device
        # HF module name (model.layers.0.self_attn.q_proj) -> (wrapper, index of its slice)
        self.targets: dict[str, tuple["LoRALinear", int]] = {}
        self.slot_ids = torch.full((max_rows,), -1, dtype=torch.long, device=device)
        # What set_rows was last given (None: no adapter row): a tensor-parallel rank 0 sends it with
        # each step's inputs, so that the workers' steps use the same rows (parallel/launch.py).
        self.rows: Optional[list[int]] = None
        # Tensor parallel: HF module name -> (in, out) of the whole projection, which an adapter is
        # checked against, and the (input columns of A, output rows of B) this rank keeps of it
        # (None: all of them); empty in one process.
        self.full_shapes: dict[str, tuple[int, int]] = {}
        self.shard: dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        # Tensor parallel, rank 0: called with (slot, LoRARequest, LoRAAdapter) before an adapter is installed here,
        # so that every worker rank reads it and installs its shard into the same slot; raises (and
        # no rank changes) where a rank cannot (parallel/launch.py).
        self.on_install: Optional[Callable[[int, object, object], None]] = None
        # The slot of each column of lora_a's output: [slots * max_rank]
        self.column_slots = torch.arange(slots * max_rank, device=device) // max_rank
        self.active = False  # the step has rows with an adapter (set_rows)
        # What a graph being traced computes (read only while torch.compile traces): the adapters'
        # products (True), or not (False: the graph that steps with no adapter row run).
        self.in_graph = True
        self.manager: Optional[object] = None  # the engine-side LoRAManager over these slots (engine/lora.py)
        # (query, key/value) attention heads: a GGUF adapter's q/k rows are put back in HF order by head
        self.heads: Optional[tuple[int, int]] = None

    def shapes(self) -> dict[str, tuple[int, int]]:
        """HF module name -> (in_features, out_features) of that projection (the whole model's, also
        on a tensor-parallel rank: what an adapter is written for)."""
        if self.full_shapes:
            return dict(self.full_shapes)
        return {name: (w.in_features, w.slices[i][1]) for name, (w, i) in self.targets.items()}

    def set_rows(self, slots: Optional[list[int]]) -> None:
        """Each row's slot for the next step (-1: none); None: no row has an adapter."""
        if slots is None:
            self.active = False
            self.rows = None
            return
        if len(slots) > len(self.slot_ids):
            raise ValueError(f"a step of {len(slots)} rows; the LoRA slot table holds {len(self.slot_ids)}")
        self.slot_ids[: len(slots)].copy_(torch.tensor(slots, dtype=torch.long))
        self.rows = list(slots)
        self.active = True

    def install(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """An adapter's (A [r, in], scaled B [out, r]) per HF module name into `slot`; the
        projections it leaves out get zeros there. Whole matrices: a tensor-parallel rank keeps its
        shard of each (the scale, already in B, stays counted once: B is either cut by rows or whole
        on every rank with A cut, and the ranks' partial products are summed)."""
        r0, r1 = slot * self.max_rank, (slot + 1) * self.max_rank
        for wrapper, i in self.targets.values():
            wrapper.lora_a[i][r0:r1].zero_()
            wrapper.lora_b[i][:, r0:r1].zero_()
        for name, (a, b) in modules.items():
            wrapper, i = self.targets[name]
            cols, rows = self.shard.get(name, (None, None))
            if cols is not None:
                a = a.index_select(1, cols.to(a.device))
            if rows is not None:
                b = b.index_select(0, rows.to(b.device))
            r = a.shape[0]
            wrapper.lora_a[i][r0 : r0 + r].copy_(a)
            wrapper.lora_b[i][:, r0 : r0 + r].copy_(b)


class LoRALinear(nn.Module):
    """`base(x)` plus each row's adapter's low-rank product (models/lora.py)."""

    def __init__(self, base: nn.Module, in_features: int, state: LoRAState):
        super().__init__()
        self.base = base
        self.in_features = in_features
        # A tensor-parallel rank's row-parallel projection (its input columns): the LoRA product is
        # added to the partial sum before the base's all-reduce (and bias), not after.
        self.row_parallel = isinstance(base, (RowParallelLinear, RowParallelProduct))
        self.slices: list[tuple[int, int]] = []  # (first output column, width) of each checkpoint projection
        self.lora_a = nn.ParameterList()
        self.lora_b = nn.ParameterList()
        # Shared with every wrapper of the model (the same tensors): buffers, so that a compiled
        # step reads them at each call like the weights.
        self.register_buffer("slot_ids", state.slot_ids, persistent=False)
        self.register_buffer("column_slots", state.column_slots, persistent=False)
        self.__dict__["state"] = state

    def add_slice(self, start: int, width: int) -> int:
        s = self.state
        cols = s.slots * s.max_rank
        self.slices.append((start, width))
        self.lora_a.append(nn.Parameter(torch.zeros(cols, self.in_features, dtype=s.dtype, device=s.device), requires_grad=False))
        self.lora_b.append(nn.Parameter(torch.zeros(width, cols, dtype=s.dtype, device=s.device), requires_grad=False))
        return len(self.slices) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row_parallel = self.row_parallel
        y = self.base.partial(x) if row_parallel else self.base(x)
        if self.state.in_graph if tracing() else self.state.active:
            rows = self.slot_ids[: x.shape[0]]
            mask = (rows[:, None] == self.column_slots[None, :]).to(self.lora_a[0].dtype)
            xs = x.to(self.lora_a[0].dtype)
            parts = [((xs @ a.t()) * mask) @ b.t() for a, b in zip(self.lora_a, self.lora_b)]
            y = y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(y.dtype)
        return self.base.finish(y) if row_parallel else y


def enable_lora(
    model: nn.Module, slots: int, max_rank: int, max_rows: int, dtype: torch.dtype, device: torch.device
) -> LoRAState:
    """Wrap the model's LoRA-targetable projections, with `slots` adapter slots of rank `max_rank`,
    for steps of up to `max_rows` rows (once: a later call returns the same state, which must fit)."""
    existing = model.__dict__.get("_lora_state")
    if existing is not None:
        if (existing.slots, existing.max_rank) != (slots, max_rank) or len(existing.slot_ids) < max_rows:
            raise ValueError(
                f"this model already serves LoRA with max_loras={existing.slots}, max_lora_rank={existing.max_rank} "
                f"and steps of {len(existing.slot_ids)} rows; another engine over it must fit those"
            )
        return existing
    state = LoRAState(slots, max_rank, max_rows, dtype, device)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        state.heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
    wrappers: dict[str, tuple[LoRALinear, int]] = {}  # module path -> (wrapper, output width)
    for name in model.expected_weight_names():
        m = _TARGET.match(name)
        if m is None or ".experts." in name:
            continue
        target, index = model.map_weight_name(name)
        path = target.removesuffix(".weight")
        if path not in wrappers:
            try:
                base = model.get_submodule(path)
            except AttributeError:
                continue  # a weight that is not a module's (stacked experts)
            sizes = _row_parallel_sizes(base) or linear_sizes(base)
            if sizes is None:
                continue
            n_in, n_out = sizes
            parent_name, _, attr = path.rpartition(".")
            wrapper = LoRALinear(base, n_in, state)
            setattr(model.get_submodule(parent_name), attr, wrapper)
            wrappers[path] = (wrapper, n_out)
        wrapper, width = wrappers[path]
        start, size = (0, width) if index is None else (index[0].start, index[0].stop - index[0].start)
        state.targets[m.group("module")] = (wrapper, wrapper.add_slice(start, size))
    for path, (wrapper, width) in wrappers.items():
        # The parts are concatenated: the checkpoint projections must tile the output in order.
        ends = [start + size for start, size in wrapper.slices]
        if [start for start, _ in wrapper.slices] != [0] + ends[:-1] or ends[-1] != width:
            raise ValueError(f"LoRA: the checkpoint projections of {path} do not tile its output in order: {wrapper.slices}")
    parallel = getattr(model, "parallel", None)
    if parallel is not None and parallel.is_parallel:
        _shard_indices(model, state)
    model.__dict__["_lora_state"] = state
    return state


def _row_parallel_sizes(base: nn.Module) -> Optional[tuple[int, int]]:
    """(this rank's in, out) of a row-parallel projection (parallel/state.py), else None."""
    if isinstance(base, RowParallelLinear):
        return base.in_features, base.out_features
    if isinstance(base, RowParallelProduct):
        return linear_sizes(base.product)
    return None


def _shard_indices(model: nn.Module, state: LoRAState) -> None:
    """A tensor-parallel rank's `state.full_shapes` and `state.shard`: the whole model's shape of
    each target projection (from the model built for one process, on the meta device), and which
    of its output rows or input columns this rank holds, found by putting an index vector through
    the rank's own weight sharder (the same cut as the base weights: split or replicated KV heads,
    fused projections, row-parallel columns). Which way a projection is cut comes first, from a
    meta tensor of its whole shape; the index then goes through as one column (rows cut) or one row
    (columns cut), never a whole matrix of indices (a 72B model's o_proj copied out twice per layer
    took seconds)."""
    from pangu_infer.models.registry import build_model_on_meta

    with building_shard(ParallelState()):
        whole = build_model_on_meta(model.config)
    sharder = model.weight_sharder()
    for name, (wrapper, i) in state.targets.items():
        weight = name + ".weight"
        target, index = whole.map_weight_name(weight)
        param = whole.get_parameter(target)
        n_out, n_in = (param[index] if index is not None else param).shape
        cut_out, cut_in = sharder.shard(weight, torch.empty(n_out, n_in, device="meta")).shape
        if cut_in == n_in:  # column-parallel or replicated: the rows it keeps
            out_index, in_index = sharder.shard(weight, torch.arange(n_out)[:, None])[:, 0], torch.arange(n_in)
        elif cut_out == n_out:  # row-parallel: the input columns it keeps
            out_index, in_index = torch.arange(n_out), sharder.shard(weight, torch.arange(n_in)[None, :])[0, :]
        else:
            raise ValueError(f"LoRA under tensor parallelism: {name} is cut both by rows and by columns ([{n_out}, {n_in}] -> "
                             f"[{cut_out}, {cut_in}]), which its adapters cannot be")
        if len(out_index) != wrapper.slices[i][1] or len(in_index) != wrapper.in_features:
            raise ValueError(
                f"LoRA under tensor parallelism: {name} is [{n_out}, {n_in}] in the whole model, its shard here "
                f"[{wrapper.slices[i][1]}, {wrapper.in_features}], and the weight sharder keeps [{len(out_index)}, {len(in_index)}] of it"
            )
        state.full_shapes[name] = (n_in, n_out)
        state.shard[name] = (
            None if torch.equal(in_index, torch.arange(n_in)) else in_index.contiguous(),
            None if torch.equal(out_index, torch.arange(n_out)) else out_index.contiguous(),
        )
