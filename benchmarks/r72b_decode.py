"""int4 batch-1 decode of an openPangu-R-72B-2512-shaped model against this machine's memory bandwidth.

The model has the release's widths (hidden 4608, 64 query / 4 KV heads of K 192 and V 128, 128
sinks with values, 80 routed experts of width 1280 with top-8, 2 shared experts, dense width
10240) and a few layers (default: 1 dense + 2 MoE, against 4 + 46 in the release); the vocabulary
is the test tokenizer's 1000 by default (`--vocab 153600` for the real head: with 3 layers it
would weigh 5x what it does against 50). Its random weights (pangu_infer.loader.random's names and
scales) are generated tensor by tensor and quantized to int4 while "loading", so no float copy of
the model is ever held or written.

What is timed: `LLMEngine.step()` of one sequence after its prefill (schedule, forward, head,
greedy sampling, detokenizing), decode compiled as by default (`--enforce-eager` for the eager
step). Peer: a streaming read of a 1 GiB buffer (`pangu_infer.bench.measure_memory_bandwidth`),
run in alternating rounds with the decode so both see the same machine load. Per round:
achieved = active bytes per token / median step time; ratio = achieved / bandwidth. The target
(issue 17): ratio >= 0.70, checked on the median of the per-round ratios.

    .venv/bin/python benchmarks/r72b_decode.py [--layers 3] [--rounds 5] [--steps 16] [--threads 2]
    .venv/bin/python benchmarks/r72b_decode.py --kernels default aten   # two models, rounds alternate

`--kernels default aten` builds the model twice, once with the default int4 kernel and once with
`PANGU_INFER_INT4_KERNEL=aten` (aten's `_weight_int4pack_mm_for_cpu`), and times them in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_tokenizer import build_pangu_tokenizer  # noqa: E402  (works without pytest)

from pangu_infer import SamplingParams  # noqa: E402
from pangu_infer.bench import measure_memory_bandwidth, weight_bytes_per_token  # noqa: E402
from pangu_infer.config import ModelConfig  # noqa: E402
from pangu_infer.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from pangu_infer.loader.random import pangu_r72b_config  # noqa: E402
from pangu_infer.models.registry import build_model_on_meta  # noqa: E402
from pangu_infer.quant.loading import make_load_hook  # noqa: E402
from pangu_infer.tokenizer import load_tokenizer  # noqa: E402

TARGET = 0.70


def r72b_shaped(vocab: int, layers: int, eos: int) -> dict:
    return pangu_r72b_config(
        vocab_size=vocab, hidden_size=4608, num_hidden_layers=layers, num_attention_heads=64,
        num_key_value_heads=4, qk_nope_dim=128, qk_rope_dim=64, v_channels=128, param_sink_number=128,
        first_k_dense_replace=1, intermediate_size=10240, n_routed_experts=80, num_experts_per_tok=8,
        n_shared_experts=2, moe_intermediate_size=1280, max_position_embeddings=4096, eos_token_id=eos,
        torch_dtype="bfloat16",
    )


def random_tensors(model, seed: int = 0):
    """(name, bf16 tensor) for every checkpoint name, made one at a time (scales as loader.random).
    The routed experts of a layer share one random tensor per projection (each is still quantized
    and stored apart, so a step reads the same bytes): drawing 2.8 G random numbers per MoE layer
    took most of a 20-minute build on the loaded benchmark machine."""
    g = torch.Generator().manual_seed(seed)
    expert_weights: dict[tuple, torch.Tensor] = {}
    for name in model.expected_weight_names():
        target, index = model.map_weight_name(name)
        param = model.get_parameter(target)
        shape = tuple(param[index].shape) if index is not None else tuple(param.shape)
        if ".mlp.experts." in name:
            layer, proj = name.split(".mlp.experts.")[0], name.rsplit(".", 2)[-2]
            if not any(k[0] == layer for k in expert_weights):
                expert_weights = {}  # a new layer: the previous layer's tensors can go
            if (layer, proj) not in expert_weights:
                expert_weights[layer, proj] = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)
            yield name, expert_weights[layer, proj]
            continue
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(("param_sink_key", "param_sink_value")) or name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        yield name, t.to(torch.bfloat16)


def decode_step_seconds(engine: LLMEngine, steps: int, round_index: int) -> float:
    """Median seconds of the engine steps after the prefill of one 32-token prompt."""
    vocab = engine.config.vocab_size
    prompt = [(97 * round_index + 13 * j) % (vocab - 3) + 3 for j in range(32)]
    engine.add_request(f"r{round_index}", prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_engine(cfg, tok, args, kernel: str) -> LLMEngine:
    from pangu_infer.quant import cpu_int4

    saved = os.environ.get(cpu_int4.ENV)
    saved_fused = os.environ.get(cpu_int4.FUSED_ENV)
    if kernel == "aten":
        os.environ[cpu_int4.ENV] = "aten"
        cpu_int4.library.cache_clear()
    if kernel == "unfused":  # the own kernel, experts one by one (MoEBlock._one_token), as before the fused op
        os.environ[cpu_int4.FUSED_ENV] = "off"
    try:
        model = build_model_on_meta(cfg)
        hook = make_load_hook(model, "int4", False, torch.bfloat16, torch.device("cpu"), memory_mapped=False, int4_group_size=args.group_size)
        model.load_weights(hook.weights(random_tensors(model)), dtype=torch.bfloat16, device=torch.device("cpu"), hook=hook)
        model.eval()
    finally:
        if kernel == "aten":
            os.environ.pop(cpu_int4.ENV) if saved is None else os.environ.__setitem__(cpu_int4.ENV, saved)
            cpu_int4.library.cache_clear()
        if kernel == "unfused":
            os.environ.pop(cpu_int4.FUSED_ENV) if saved_fused is None else os.environ.__setitem__(cpu_int4.FUSED_ENV, saved_fused)
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, kv_cache_memory=256 << 20, enforce_eager=args.enforce_eager))
    engine.runner.wait_compiled()  # the compiled step builds in the background: time that one
    return engine


def kernel_name(engine: LLMEngine) -> str:
    from pangu_infer.quant.modules import PackedWeight, QuantizedExperts

    kernels = sorted({m.kernel for m in engine.model.modules() if isinstance(m, PackedWeight)})
    experts = [m for m in engine.model.modules() if isinstance(m, QuantizedExperts)]
    unfused = any(m.w13.kernel == "int4_vnni" and not m.fused for m in experts)
    return "+".join(kernels) + (" (experts one by one)" if unfused else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3, help="decoder layers: the first dense, the rest MoE (default 3)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the test tokenizer's 1000)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--enforce-eager", action="store_true", help="decode eagerly instead of the compiled step")
    p.add_argument("--kernels", nargs="+", default=["default"], choices=["default", "aten", "unfused"],
                   help="int4 kernels to compare (unfused: the default kernel with PANGU_INFER_FUSED_EXPERTS=off)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        build_pangu_tokenizer(Path(tmp))
        tok = load_tokenizer(Path(tmp))
    config = r72b_shaped(args.vocab or tok.vocab_size, args.layers, tok.eos_token_id)
    cfg = ModelConfig.from_hf_dict(config)
    engines, load_s = {}, 0.0
    for kernel in args.kernels:
        start = time.perf_counter()
        engines[kernel] = build_engine(cfg, tok, args, kernel)
        load_s = time.perf_counter() - start
    per_token = weight_bytes_per_token(engines[args.kernels[0]].model)
    for engine in engines.values():
        decode_step_seconds(engine, 4, -1)  # warm-up
    rows = {kernel: [] for kernel in engines}
    for r in range(args.rounds):
        bandwidth = measure_memory_bandwidth(1 << 30, repeats=3)
        for kernel, engine in engines.items():
            step = decode_step_seconds(engine, args.steps, r)
            rows[kernel].append((bandwidth, step, per_token / step / bandwidth))
    compiled = engines[args.kernels[0]].runner.decode_forward is not None
    print(
        f"R-72B-2512-shaped int4 (group {args.group_size}, bf16 activations): hidden 4608, 64/4 heads, K 192 / V 128, "
        f"128 sinks, {args.layers} layers (1 dense 10240, {args.layers - 1} MoE: 80 x 1280 top-8 + 2 shared), vocab "
        f"{cfg.vocab_size}; {per_token / 1e6:.1f} MB of weights read per token; {args.threads} threads; "
        f"{'compiled' if compiled else 'eager'} decode; built and quantized in {load_s:.0f} s; "
        f"{args.rounds} alternating rounds of the bandwidth read and {args.steps} decode steps"
    )
    print("| int4 kernel | round | streaming read GB/s | decode ms/step | achieved GB/s | achieved / read |")
    print("|---|---|---|---|---|---|")
    for kernel in engines:
        name = kernel_name(engines[kernel])
        for i, (bw, step, ratio) in enumerate(rows[kernel]):
            print(f"| {name} | {i} | {bw / 1e9:.2f} | {step * 1e3:.2f} | {per_token / step / 1e9:.2f} | {ratio:.2f} |")
    for kernel in engines:
        med = statistics.median(r for _, _, r in rows[kernel])
        print(f"{kernel_name(engines[kernel])}: median achieved / read {med:.2f}; best round {max(r for _, _, r in rows[kernel]):.2f}")
    rows = rows[args.kernels[0]]
    median = statistics.median(r for _, _, r in rows)
    print(f"median achieved / read: {median:.2f} (target >= {TARGET}); best round {max(r for _, _, r in rows):.2f}")
    return 0 if median >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
