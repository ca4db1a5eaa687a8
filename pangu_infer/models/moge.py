"""Pangu Pro MoE: Mixture of Grouped Experts (MoGE). Router, stacked experts, dispatch, load counters."""

from __future__ import annotations

import itertools
import re
import weakref
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer.config import ModelConfig
from pangu_infer.device import tracing
from pangu_infer.models import batch_invariant
from pangu_infer.models.batch_invariant import row_tiled
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.layers import SwiGLU, eager_in_compiled_steps
from pangu_infer.parallel.expert_load import rank_load_stats
from pangu_infer.parallel.state import current_parallel_state, rank_range

IMBALANCE_DEVICES = (1, 2, 4, 8)


def moge_route(router_logits: torch.Tensor, num_groups: int, fixed_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoGE router: softmax over all experts (fp32), then the best expert of each group.

    router_logits: [T, E]. Returns expert ids [T, G] (long, expert g*E/G + j) and their raw
    global probabilities [T, G] (fp32): no renormalisation. Ties go to the lowest index.
    fixed_order (the batch-invariant mode): the softmax of batch_invariant.softmax, which a
    compiled step computes bitwise as the eager forward does (torch.softmax does not).
    """
    t, e = router_logits.shape
    probs = batch_invariant.softmax(router_logits.float()) if fixed_order else torch.softmax(router_logits.float(), dim=-1)
    weights, local = probs.view(t, num_groups, e // num_groups).max(dim=-1)  # max returns the first maximal index
    return local + torch.arange(0, e, e // num_groups, device=local.device), weights


def imbalance_score(expert_counts: torch.Tensor, num_tokens: torch.Tensor, num_devices: int) -> torch.Tensor:
    """The paper's IS = (max_i T_i - min_i T_i) / |X| with experts spread over devices in order.

    expert_counts [..., E] (token-expert pairs per expert), num_tokens [...] -> IS [...].
    """
    per_device = expert_counts.unflatten(-1, (num_devices, -1)).sum(-1).float()
    return (per_device.amax(-1) - per_device.amin(-1)) / num_tokens.clamp(min=1)


# handle -> MoEBlock: whose experts pangu_infer::moe_dispatch runs. Entries leave with their block.
# The handle reaches the operator as a tensor (each block's `dispatch_handle`), not as an int:
# an int would be a constant of the traced graph, so that each process (and each model loaded in it)
# whose blocks were numbered otherwise would compile and save its own copy of the same step.
_BLOCKS: "weakref.WeakValueDictionary[int, MoEBlock]" = weakref.WeakValueDictionary()
_handles = itertools.count()

_lib = torch.library.Library("pangu_infer", "FRAGMENT")
_lib.define("moe_dispatch(Tensor x, Tensor flat_experts, Tensor flat_weights, Tensor counts, Tensor handle) -> Tensor")


def _moe_dispatch(x: torch.Tensor, flat_experts: torch.Tensor, flat_weights: torch.Tensor, counts: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return _BLOCKS[int(handle)]._dispatch(x, flat_experts, flat_weights, counts)


def _moe_dispatch_shape(x: torch.Tensor, flat_experts: torch.Tensor, flat_weights: torch.Tensor, counts: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_lib.impl("moe_dispatch", _moe_dispatch, "CompositeExplicitAutograd")
_lib._register_fake("moe_dispatch", _moe_dispatch_shape)


def count_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-expert pairs per expert [E] (long). Eagerly one bincount; inside a compiled step a
    scatter-add (bincount's output size depends on the values: dynamo breaks the graph on it)."""
    if tracing():
        return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    return torch.bincount(ids, minlength=num_experts)


class StackedExperts(nn.Module):
    """All routed experts of one layer: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        # Set by pangu_infer.quant when the experts are quantized or memory-mapped; w13/w2 are then gone.
        self.impl: Optional[nn.Module] = None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl.expert(e, x)
        gate, up = F.linear(x, self.w13[e]).split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    @property
    def split_products(self) -> bool:
        """Do gate_up() and down() exist here (plain, packed bf16 and quantized experts; not the
        memory-mapped ones, whose gate and up are apart)?"""
        return self.impl is None or hasattr(self.impl, "gate_up")

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """[T, 2I]: expert e's gate then up rows, as expert() computes them before the activation."""
        return F.linear(x, self.w13[e]) if self.impl is None else self.impl.gate_up(e, x)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.w2[e]) if self.impl is None else self.impl.down(e, h)

    def pack_experts(self) -> int:
        """Lay bf16 CPU experts out for oneDNN (models/packed.py's PackedExperts, called by
        pack_linears); the number of products packed, 0 when these experts are not plain bf16."""
        from pangu_infer.models.packed import PackedExperts, packable

        if self.impl is not None or not (packable(self.w13) and packable(self.w2)):
            return 0
        self.impl = PackedExperts(self.w13, self.w2, self.inter)
        del self.w13, self.w2
        return 2 * len(self.impl.w13)


class MoGELoad:
    """Tokens per expert since start, and per-step imbalance scores (MoGE and global top-k).

    An eager step only stacks its two count vectors on a pending list: no host sync and no small
    ops on the decode path. Pending steps are folded into the totals every FOLD_STEPS steps and
    whenever the totals are read. Inside a compiled step (torch.compile traces `record`) the step
    adds into tensors in place instead (a handful of ops inductor fuses, and no graph break);
    readers fold those in too.
    """

    FOLD_STEPS = 64

    def __init__(self, num_experts: int, top_k: int):
        self.top_k = top_k
        # Host tensors even when the model is built on the meta device.
        cpu = torch.device("cpu")
        self._counts = torch.zeros(2, num_experts, dtype=torch.long, device=cpu)  # MoGE, global top-k
        self._is_sum = torch.zeros(2, len(IMBALANCE_DEVICES), dtype=torch.float64, device=cpu)
        self._pending: list[torch.Tensor] = []  # [2, E] per step
        self._pending_tokens: list[int] = []
        self._steps = 0
        self._tokens = 0
        # What compiled steps added (see the class doc): counts [2, E], IS sums, steps, tokens.
        self._graph_counts = torch.zeros(2, num_experts, dtype=torch.long, device=cpu)
        self._graph_is = torch.zeros(2, len(IMBALANCE_DEVICES), dtype=torch.float64, device=cpu)
        self._graph_steps = torch.zeros((), dtype=torch.long, device=cpu)
        self._graph_tokens = torch.zeros((), dtype=torch.long, device=cpu)

    @property
    def steps(self) -> int:
        self._fold()
        return self._steps

    @property
    def tokens(self) -> int:
        self._fold()
        return self._tokens

    def record(self, expert_counts: torch.Tensor, router_logits: torch.Tensor, num_tokens: int) -> None:
        # Softmax keeps the order, so the global top-k of the logits is that of the probabilities.
        topk_ids = router_logits.topk(self.top_k, dim=-1).indices
        topk_counts = count_experts(topk_ids.flatten(), expert_counts.numel())
        if tracing() and expert_counts.device.type == "cpu":
            both = torch.stack((expert_counts, topk_counts))
            self._graph_counts += both
            # imbalance_score's numbers (integer counts, one float64 division), without a tensor of the count
            per_device = [both.unflatten(-1, (d, -1)).sum(-1).double() for d in IMBALANCE_DEVICES]
            spread = torch.stack([p.amax(-1) - p.amin(-1) for p in per_device], -1)
            self._graph_is += spread / max(num_tokens, 1)
            self._graph_steps += 1
            self._graph_tokens += num_tokens
            return
        self._record_pending(expert_counts, topk_counts, num_tokens)

    @eager_in_compiled_steps  # on an accelerator: host counters, so outside the graph (no sync in it)
    def _record_pending(self, expert_counts: torch.Tensor, topk_counts: torch.Tensor, num_tokens: int) -> None:
        self._pending.append(torch.stack((expert_counts, topk_counts)))
        self._pending_tokens.append(num_tokens)
        self._steps += 1
        self._tokens += num_tokens
        if len(self._pending) >= self.FOLD_STEPS:
            self._fold()

    def _fold(self) -> None:
        if self._graph_steps.item():  # what compiled steps added (a host sync: readers only)
            self._counts += self._graph_counts
            self._is_sum += self._graph_is
            self._steps += int(self._graph_steps)
            self._tokens += int(self._graph_tokens)
            for t in (self._graph_counts, self._graph_is, self._graph_steps, self._graph_tokens):
                t.zero_()
        if not self._pending:
            return
        counts = torch.stack(self._pending).cpu()  # [S, 2, E]
        tokens = torch.tensor(self._pending_tokens, dtype=torch.float64)[:, None]  # [S, 1]
        self._pending, self._pending_tokens = [], []
        self._counts += counts.sum(0)
        for i, d in enumerate(IMBALANCE_DEVICES):
            self._is_sum[:, i] += imbalance_score(counts, tokens, d).sum(0)

    @property
    def moge_counts(self) -> torch.Tensor:
        self._fold()
        return self._counts[0]

    @property
    def topk_counts(self) -> torch.Tensor:
        self._fold()
        return self._counts[1]

    def as_dict(self, num_groups: int) -> dict:
        self._fold()
        steps = max(self._steps, 1)
        moge_is, topk_is = self._is_sum.tolist()
        return {
            "tokens": self._tokens,
            "steps": self._steps,
            "expert_tokens": self.moge_counts.tolist(),
            "group_tokens": self.moge_counts.view(num_groups, -1).sum(-1).tolist(),
            "imbalance_score": {d: v / steps for d, v in zip(IMBALANCE_DEVICES, moge_is)},
            "global_topk_expert_tokens": self.topk_counts.tolist(),
            "global_topk_imbalance_score": {d: v / steps for d, v in zip(IMBALANCE_DEVICES, topk_is)},
        }


class MoEBlock(nn.Module):
    """Routed experts (top-k per token, chosen by `route`) plus always-on shared experts, with the
    expert-parallel layout and load counters; MoGE and the sigmoid top-k MoE (models/topk_moe.py)
    differ only in the router."""

    shared_prefix = "shared_expert"  # the HF name of the shared MLP (its module attribute too)

    def __init__(self, cfg: ModelConfig, top_k: int):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = top_k
        self.parallel = current_parallel_state()
        # Expert parallel: this rank holds experts [start, stop) (all of them in one process).
        self.local_experts = rank_range(cfg.num_experts, self.parallel)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = StackedExperts(len(self.local_experts), cfg.hidden_size, cfg.moe_intermediate_size)
        # Its partial sum joins the routed experts' in the one collective of forward().
        shared = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, reduce=False) if cfg.shared_expert_intermediate_size else None
        setattr(self, self.shared_prefix, shared)
        self.load = MoGELoad(cfg.num_experts, cfg.num_experts_per_tok)
        self.track_load = True
        # models/batch_invariant.py: expert products in fixed row tiles, outputs summed per token in group order
        self.batch_invariant = False
        # Inside a compiled step the dispatch is the opaque operator pangu_infer::moe_dispatch, which
        # finds this block by its handle, read from this tensor (a graph input, as the bound KV
        # caches are: see _BLOCKS). A plain attribute, not a buffer: no weight, moved nowhere; on the
        # host whatever device the model is built on (the meta device included).
        handle = next(_handles)
        _BLOCKS[handle] = self
        self.dispatch_handle = torch.tensor(handle, dtype=torch.long, device="cpu")

    @property
    def local_expert_tokens(self) -> int:
        """Token-expert pairs this rank's experts computed (read from the load counters)."""
        return int(self.load.moge_counts[self.local_experts.start : self.local_experts.stop].sum())

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> expert ids [T, K] (long) and their weights [T, K] in x's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        logits = self.gate(x)
        expert_ids, weights = self.route(x, logits)
        flat_experts = expert_ids.flatten()
        counts = count_experts(flat_experts, self.num_experts)
        if self.track_load:
            self.load.record(counts, logits, t)
        impl = self.experts.impl
        if (
            t == 1 and not self.batch_invariant and self.local_experts.start == 0
            and self.local_experts.stop == self.num_experts
            and getattr(impl, "one_token_fused", None) is not None and impl.one_token_fused(x)
        ):
            # Decode at batch 1 with int4 experts on the own CPU kernel: one op for all experts, the
            # same numbers as _one_token, and no graph break in a compiled step.
            routed = impl.one_token(x, flat_experts, weights.flatten().to(x.dtype))
        elif tracing():
            # Data-dependent expert sizes: one opaque operator running _dispatch eagerly, so that the
            # step stays one graph (no graph break; it can be saved whole, engine/saved_step.py).
            routed = torch.ops.pangu_infer.moe_dispatch(x, flat_experts, weights.flatten(), counts, self.dispatch_handle)
        else:
            routed = self._dispatch(x, flat_experts, weights.flatten(), counts)
        shared = getattr(self, self.shared_prefix)
        out = routed if shared is None else shared(x) + routed
        if self.parallel.is_parallel:
            out = self.parallel.all_reduce(out)
        return out

    def _dispatch(self, x, flat_experts, flat_weights, counts) -> torch.Tensor:
        """Group the token-expert pairs by expert; one product per expert that received tokens.

        Inputs, weights and the scatter are batched over all pairs: at decode the per-op cost,
        not the arithmetic, is what a step of small expert products pays for.
        """
        local = self.local_experts
        # (Not in batch-invariant mode: its sum must be the same additions as the batched combine.)
        if x.shape[0] == 1 and not self.batch_invariant and local.start == 0 and local.stop == self.num_experts:
            return self._one_token(x, flat_experts, flat_weights)
        order = flat_experts.argsort(stable=True)
        # Pairs are sorted by expert: this rank's are one contiguous run.
        begin = int(counts[: local.start].sum()) if local.start else 0
        local_counts = counts[local.start : local.stop].tolist()
        pairs = order[begin : begin + sum(local_counts)]
        tokens = pairs // self.top_k
        xs = x[tokens]
        ys = []
        start = 0
        for e, n in enumerate(local_counts):
            if n:
                if self.batch_invariant:  # rows per expert depend on the other tokens: fixed tiles
                    ys.append(row_tiled(partial(self.experts.expert, e), xs[start : start + n]))
                else:
                    ys.append(self.experts.expert(e, xs[start : start + n]))
                start += n
        if self.batch_invariant:
            return self._combine_in_group_order(x, pairs, ys, flat_weights)
        out = torch.zeros_like(x)
        if ys:
            # One scatter for all pairs: in bf16 a token's expert outputs are summed in fp32, then rounded.
            out.index_add_(0, tokens, torch.cat(ys) * flat_weights[pairs, None])
        return out

    def _one_token(self, x: torch.Tensor, flat_experts: torch.Tensor, flat_weights: torch.Tensor) -> torch.Tensor:
        """Decode at batch 1: the token's top-k experts straight from its ids, nothing sorted or
        scattered on the device; only those experts' weights are read. The same arithmetic as the
        batched path's scatter: each weighted output rounded to x's dtype, then summed in fp32 in
        expert order, so that a token alone and in a batch get the same value."""
        ids = flat_experts.tolist()  # one host sync for the ids
        order = sorted(range(len(ids)), key=ids.__getitem__)
        experts = self.experts
        if experts.split_products:
            # The same numbers with fewer ops: the activation, the weighting and the conversion
            # run once over the experts' rows (elementwise: the same bits as row by row).
            i = experts.inter
            gu = torch.cat([experts.gate_up(ids[j], x) for j in order])  # [K, 2I]
            h = F.silu(gu[:, :i]) * gu[:, i:]
            ys = torch.cat([experts.down(ids[j], h[r : r + 1]) for r, j in enumerate(order)])  # [K, H]
            wy = (ys * flat_weights[order][:, None]).float()
            out = wy[0:1]
            for r in range(1, len(order)):
                out.add_(wy[r : r + 1])
            return out.to(x.dtype)
        out = None
        for j in order:
            y = (experts.expert(ids[j], x) * flat_weights[j]).float()
            out = y if out is None else out.add_(y)
        return out.to(x.dtype)

    def _combine_in_group_order(self, x, pairs, ys, flat_weights) -> torch.Tensor:
        """Each token's weighted expert outputs summed in fp32 in the router's order (MoGE: group
        order), then rounded: the same additions whatever the other tokens routed to."""
        t, g = x.shape[0], self.top_k
        per_pair = x.new_zeros(t * g, x.shape[1], dtype=torch.float32)  # row token * K + slot
        if ys:
            per_pair[pairs] = (torch.cat(ys) * flat_weights[pairs, None]).float()
        per_pair = per_pair.view(t, g, -1)
        out = per_pair[:, 0].clone()
        for group in range(1, g):
            out += per_pair[:, group]
        return out.to(x.dtype)


class MoGEBlock(MoEBlock):
    """Routed experts (one per group per token) plus the always-on shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, top_k=cfg.num_expert_groups)
        self.num_groups = cfg.num_expert_groups
        self.router_scale = nn.Parameter(torch.ones(1, cfg.num_experts))

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expert_ids, probs = moge_route(logits, self.num_groups, fixed_order=self.batch_invariant)
        return expert_ids, probs.to(x.dtype) * self.router_scale[0, expert_ids]  # [T, G]


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class PanguProMoEForCausalLM(DecoderForCausalLM):
    @property
    def has_graph_breaks(self) -> bool:
        """Does a compiled step break its graph? On CPU no: the dispatch is an operator and the load
        counters add in the graph. Elsewhere the counters are host tensors kept outside the graph
        (MoGELoad._record_pending), one break per MoE layer."""
        return self.model.norm.weight.device.type != "cpu"

    def make_mlp(self, cfg: ModelConfig, layer: int) -> nn.Module:
        return MoGEBlock(cfg)

    def expected_mlp_names(self, prefix: str) -> list[str]:
        names = [prefix + "gate.weight", prefix + "router_scale"]
        for e in range(self.config.num_experts):
            names += [f"{prefix}experts.{e}.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        names += [f"{prefix}shared_expert.{proj}_proj.weight" for proj in ("gate", "up", "down")]
        return names

    def map_weight_name(self, name: str) -> tuple[str, Optional[tuple]]:
        m = _EXPERT.match(name)
        if m is None:
            return super().map_weight_name(name)
        # Index into this rank's stacked experts (the loader only passes this rank's own).
        prefix, proj = m.group(1), m.group(3)
        e = int(m.group(2)) - rank_range(self.config.num_experts, self.parallel).start
        inter = self.config.moe_intermediate_size
        if proj == "down":
            return f"{prefix}.w2", (e,)
        start = 0 if proj == "gate" else inter
        return f"{prefix}.w13", (e, slice(start, start + inter))

    def moe_layers(self) -> list[MoGEBlock]:
        return [layer.mlp for layer in self.model.layers]

    def moe_stats(self) -> dict:
        layers = [m.load.as_dict(self.config.num_expert_groups) for m in self.moe_layers()]
        return moe_load_stats(self, layers, num_experts=self.config.num_experts, num_groups=self.config.num_expert_groups)


def moe_load_stats(model: DecoderForCausalLM, layers: list[dict], **header) -> dict:
    """LLM.moe_stats() of a MoE model: `header`, the per-layer load dicts, their mean imbalance
    scores, and the tokens each rank's experts computed, per layer, as each rank counted them."""
    n = max(len(layers), 1)

    def mean(key: str) -> dict:
        return {d: sum(l[key][d] for l in layers) / n for d in IMBALANCE_DEVICES}

    stats = {
        **header,
        "layers": layers,
        "imbalance_score": mean("imbalance_score"),
        "global_topk_imbalance_score": mean("global_topk_imbalance_score"),
    }
    rank_tokens = model.parallel.counts_per_rank([m.local_expert_tokens for m in model.moe_layers()])
    stats["ranks"] = rank_load_stats(stats, rank_tokens, model.parallel.world_size)
    return stats
