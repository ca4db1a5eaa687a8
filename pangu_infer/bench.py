"""`pangu-infer bench`: prefill, decode and throughput of this engine, against the memory-bandwidth limit.

Decode of one sequence reads every active weight once per token, so its speed limit is
memory bandwidth / weight bytes per token. The command measures this machine's bandwidth with a
large streaming read and prints how close decode gets to it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

MODES = ("all", "latency", "throughput")
PROMPT_KINDS = ("random", "repeat")
REPEAT_PERIOD = 32  # tokens in the block a "repeat" prompt repeats


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pangu_infer.cli import _memory, add_model_arguments

    add_model_arguments(p)
    p.add_argument("--mode", default="all", choices=MODES, help="latency: one stream; throughput: --concurrency at once")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default: 128)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (default: 128)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight in throughput mode (default: 16)")
    p.add_argument("--num-iters", type=int, default=3, help="latency runs, after one warm-up (default: 3)")
    p.add_argument(
        "--prompt-kind", default="random", choices=PROMPT_KINDS,
        help=f"random token ids, or a block of {REPEAT_PERIOD} random ids repeated (what prompt lookup speeds up)",
    )
    p.add_argument("--lora", default=None, metavar="PATH", help="run every request with this LoRA adapter (a PEFT folder or a GGUF adapter file)")
    p.add_argument(
        "--bandwidth-buffer", type=_memory, default=1 << 30,
        help="bytes the memory-bandwidth read streams through; larger than the caches (default: 1GiB)",
    )


@dataclass
class LatencyResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    acceptance_rate: Optional[float] = None


@dataclass
class ThroughputResult:
    concurrency: int
    output_tokens: int
    elapsed_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure_memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (sum of a large float32 buffer), best of `repeats`."""
    buf = torch.ones(size_bytes // 4, dtype=torch.float32)
    buf.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter and buffer except the embedding
    rows it does not look up (the table still counts where it is itself the LM head: a tied head
    without a copy of its own, or int8's that shares the embedding's tensors), and, for MoGE, only
    the share of routed experts a token is sent to."""
    cfg = model.config
    total = sum(t.numel() * t.element_size() for t in _weights(model))
    embed = model.get_submodule("model.embed_tokens")
    if model.lm_head is not None:  # a head of its own (untied, or a packed/quantized copy)
        head = {id(t) for t in _weights(model.lm_head)}
        total -= sum(t.numel() * t.element_size() for t in _weights(embed) if id(t) not in head)
    if cfg.is_moe:
        for layer in model.model.layers:
            if not hasattr(layer.mlp, "experts"):
                continue  # a dense layer of the MoE family
            experts = layer.mlp.experts
            routed = sum(t.numel() * t.element_size() for t in _weights(experts))
            total -= routed - routed * cfg.num_experts_per_tok // cfg.num_experts
    return total


def moge_routed_bytes_per_token(model: nn.Module) -> int:
    """Bytes of routed-expert weights one decoded token reads (its one expert per group, all layers)."""
    cfg = model.config
    total = 0
    for layer in model.model.layers:
        routed = sum(t.numel() * t.element_size() for t in _weights(layer.mlp.experts))
        total += routed * cfg.num_experts_per_tok // cfg.num_experts
    return total


def _weights(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int32):
            seen.setdefault(id(t), t)
    return list(seen.values())


def make_prompt(kind: str, length: int, vocab: int, rng: random.Random) -> list[int]:
    """Random ids from the lower vocabulary (ids that real tokenizers give to text pieces)."""
    high = max(2, min(vocab, 32000))
    if kind == "repeat":
        block = [rng.randrange(2, high) for _ in range(REPEAT_PERIOD)]
        return (block * (length // REPEAT_PERIOD + 1))[:length]
    return [rng.randrange(2, high) for _ in range(length)]


def run_latency(engine, prompt_kind: str, prompt_len: int, output_len: int, num_iters: int, seed: int = 0, lora=None) -> LatencyResult:
    """One request at a time: TTFT per run, and the time of every later token (step by step)."""
    from pangu_infer.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    spec = engine.speculator
    drafted = accepted = 0
    ttft: list[float] = []
    tpot: list[float] = []
    for i in range(num_iters + 1):  # the first run warms up
        prompt = make_prompt(prompt_kind, prompt_len, vocab, rng)  # fresh ids: no prefix-cache hits
        if spec is not None:
            before = (spec.num_draft_tokens, spec.num_accepted_tokens)
        rid = f"bench-latency-{i}"
        start = time.perf_counter()
        engine.add_request(rid, prompt, params, lora_request=lora)
        first = last = None
        per_token: list[float] = []
        done = False
        while not done:
            for out in engine.step():
                now = time.perf_counter()
                new = len(out.outputs[0].token_ids_delta)
                if first is None:
                    first = now
                    new -= 1
                if new > 0:
                    per_token += [(now - last) / new] * new
                last = now
                done = out.finished
        if i == 0:
            continue
        ttft.append(first - start)
        tpot += per_token
        if spec is not None:
            drafted += spec.num_draft_tokens - before[0]
            accepted += spec.num_accepted_tokens - before[1]
    return LatencyResult(
        prefill_tokens_per_s=prompt_len / statistics.median(ttft),
        decode_tokens_per_s=len(tpot) / sum(tpot) if tpot else float("nan"),
        ttft_s=ttft,
        tpot_s=tpot,
        acceptance_rate=(accepted / drafted if drafted else 0.0) if spec is not None else None,
    )


def run_throughput(engine, prompt_kind: str, prompt_len: int, output_len: int, concurrency: int, seed: int = 1, lora=None) -> ThroughputResult:
    """`concurrency` requests submitted together; aggregate generated tokens per second."""
    from pangu_infer.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    # Warm-up: two requests decoding together, so a compiled decode step has built its batched graph.
    warm = {f"bench-warm-{i}": make_prompt(prompt_kind, prompt_len, vocab, rng) for i in range(min(concurrency, 2))}
    _drain(engine, warm, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), lora)
    prompts = {f"bench-thr-{i}": make_prompt(prompt_kind, prompt_len, vocab, rng) for i in range(concurrency)}
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = _drain(engine, prompts, params, lora)
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        concurrency=concurrency,
        output_tokens=sum(o.num_generated_tokens for o in outs),
        elapsed_s=elapsed,
        ttft_s=[o.metrics["ttft"] for o in outs if o.metrics.get("ttft") is not None],
        tpot_s=[o.metrics["tpot"] for o in outs if o.metrics.get("tpot") is not None],
    )


def _drain(engine, prompts: dict[str, list[int]], params, lora=None) -> list:
    """Submit every prompt, step until all finish; the final RequestOutputs in submission order."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params, lora_request=lora)
    final = {}
    while len(final) < len(prompts):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[rid] for rid in prompts]


def _check(args: argparse.Namespace) -> None:
    for name in ("prompt_len", "output_len", "concurrency", "num_iters"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: expected a positive integer")
    if not isinstance(args.bandwidth_buffer, int) or args.bandwidth_buffer < 1 << 20:
        raise ValueError(f"--bandwidth-buffer {args.bandwidth_buffer!r}: expected a size of at least 1MiB, e.g. 1GiB")
    if args.prompt_kind == "repeat" and args.prompt_len < 2 * REPEAT_PERIOD:
        raise ValueError(f"--prompt-len {args.prompt_len}: a repeat prompt needs at least {2 * REPEAT_PERIOD} tokens")


def run(args: argparse.Namespace) -> int:
    from pangu_infer.cli import llm_kwargs, load_line
    from pangu_infer.llm import LLM
    from pangu_infer.models.registry import build_model_on_meta, count_parameters

    _check(args)
    kwargs = llm_kwargs(args)
    if args.mode != "latency":
        kwargs["max_num_seqs"] = max(kwargs["max_num_seqs"], args.concurrency)
    llm = LLM(args.model, **kwargs)
    lora = None
    if args.lora:
        from pangu_infer.lora import LoRARequest

        lora = LoRARequest("bench", 1, args.lora)
        llm.engine.add_lora(lora)  # read before the clock starts
    llm.wait_compiled()  # figures of the compiled decode step (it builds in the background)
    engine = llm.engine
    cfg = llm.config
    # From the config: quantized weights are buffers and packed ones opaque, so the loaded
    # model's own parameters undercount (an int4 SmolLM2 showed "0.0 M").
    n_params = count_parameters(build_model_on_meta(cfg))
    print(
        f"model {llm.loaded.source}: {cfg.architecture}, {n_params / 1e6:.1f} M parameters, "
        f"{llm.dtype}".replace("torch.", "")
        + (f", {args.quantization}" if args.quantization else "")
        + (", random weights (--load-format dummy)" if args.load_format == "dummy" else "")
        + f", {torch.get_num_threads()} threads, prompt {args.prompt_len} ({args.prompt_kind}), output {args.output_len}"
        + (f", {engine.speculator.describe()}" if engine.speculator else "")
        + (f", LoRA adapter {args.lora}" if lora is not None else "")
    )
    print(load_line(llm))
    if args.mode in ("all", "latency"):
        bandwidth = measure_memory_bandwidth(args.bandwidth_buffer)
        per_token = weight_bytes_per_token(llm.model)
        lat = run_latency(engine, args.prompt_kind, args.prompt_len, args.output_len, args.num_iters, lora=lora)
        achieved = per_token * lat.decode_tokens_per_s
        print(f"prefill                {lat.prefill_tokens_per_s:10.1f} tokens/s")
        print(f"decode (1 stream)      {lat.decode_tokens_per_s:10.1f} tokens/s")
        print(f"TTFT median / p90      {1e3 * percentile(lat.ttft_s, 50):10.1f} / {1e3 * percentile(lat.ttft_s, 90):.1f} ms")
        print(f"TPOT median / p90      {1e3 * percentile(lat.tpot_s, 50):10.2f} / {1e3 * percentile(lat.tpot_s, 90):.2f} ms")
        print(f"weights read per token {per_token / 1e6:10.1f} MB")
        if cfg.is_moge:
            routed = moge_routed_bytes_per_token(llm.model)
            print(
                f"MoGE active bytes      {per_token / 1e6:10.1f} MB per token: {routed / 1e6:.1f} MB in "
                f"{cfg.num_experts_per_tok} of {cfg.num_experts} routed experts, the rest attention, "
                "shared expert, router, norms and head"
            )
        print(f"achieved bandwidth     {achieved / 1e9:10.2f} GB/s")
        print(
            f"memory bandwidth       {bandwidth / 1e9:10.2f} GB/s (streaming read, measured now): "
            f"decode reaches {100 * achieved / bandwidth:.0f}%"
        )
        if lat.acceptance_rate is not None:
            print(f"draft acceptance       {100 * lat.acceptance_rate:10.1f} %")
    if args.mode in ("all", "throughput"):
        thr = run_throughput(engine, args.prompt_kind, args.prompt_len, args.output_len, args.concurrency, lora=lora)
        print(f"throughput @{thr.concurrency:<3d}        {thr.tokens_per_s:10.1f} tokens/s ({thr.output_tokens} tokens in {thr.elapsed_s:.1f} s)")
        print(f"  TTFT median / p90    {1e3 * percentile(thr.ttft_s, 50):10.1f} / {1e3 * percentile(thr.ttft_s, 90):.1f} ms")
        print(f"  TPOT median / p90    {1e3 * percentile(thr.tpot_s, 50):10.2f} / {1e3 * percentile(thr.tpot_s, 90):.2f} ms")
    return 0
