"""MoGE decode at batch 1 against the memory bandwidth its active bytes need: bf16, int8, int4.

A random Pangu Pro MoE-shaped checkpoint (pangu_infer.loader.random: 64 routed experts in 8 groups,
one per group per token, shared expert; hidden 1024, experts of width 256 and a shared expert of
1024 by default, the 72B's proportions) is loaded three times with `LLM`: bf16 (routed experts
oneDNN-packed per expert), `quantization="int8"` and `"int4"`. What is timed: `LLMEngine.step()`
after the prefill, one token per step, the three models in alternating rounds (median step of
each round, then the median over rounds). Active bytes per token are `pangu_infer.bench`'s
`weight_bytes_per_token` (attention, router, shared expert, 8 of 64 routed experts, norms, head);
bandwidth is a streaming read measured in the same run (`measure_memory_bandwidth`). The target
(issue 13): int4 reaches >= 70% of the bandwidth for its active bytes.

    .venv/bin/python benchmarks/moge_decode.py                 # compiled decode off by default here
    .venv/bin/python benchmarks/moge_decode.py --compiled      # the default engine path (compiles first)
    .venv/bin/python benchmarks/moge_decode.py --methods int4 int4-aten   # the int4 kernels side by side
    .venv/bin/python benchmarks/moge_decode.py --pro-moe       # Pangu Pro MoE's real widths, 2 layers

`int4-aten` is int4 with `PANGU_INFER_INT4_KERNEL=aten` while it loads: aten's
`_weight_int4pack_mm_for_cpu` where the default would use pangu_infer.quant.cpu_int4's kernel;
`int4-unfused` is int4 with `PANGU_INFER_FUSED_EXPERTS=off` (experts one by one at batch 1).
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_tokenizer import build_pangu_tokenizer  # noqa: E402  (works without pytest)

from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.bench import measure_memory_bandwidth, moge_routed_bytes_per_token, weight_bytes_per_token  # noqa: E402
from pangu_infer.loader.random import pangu_moge_config, random_state_dict, write_checkpoint  # noqa: E402

TARGET = 0.70
PRO_MOE_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "pangu-pro-moe-72b" / "config.json"


def decode_step_times(llm: LLM, steps: int, round_index: int) -> list[float]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    vocab = llm.config.vocab_size
    prompt = [1] + [(97 * round_index + 13 * j) % (vocab - 3) + 3 for j in range(15)]
    engine.add_request(f"r{round_index}", prompt, params)
    engine.step()  # prefill and first token
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def load(path: str, method: str, eager: bool) -> LLM:
    from pangu_infer.quant import cpu_int4

    kernel = os.environ.get(cpu_int4.ENV)
    fused = os.environ.get(cpu_int4.FUSED_ENV)
    if method == "int4-aten":
        os.environ[cpu_int4.ENV] = "aten"
        cpu_int4.library.cache_clear()
    if method == "int4-unfused":
        os.environ[cpu_int4.FUSED_ENV] = "off"
    try:
        quantization = None if method == "bf16" else method.split("-")[0]
        return LLM(path, dtype="bfloat16", device="cpu", kv_cache_memory=256 << 20, quantization=quantization, enforce_eager=eager)
    finally:
        if method == "int4-aten":
            os.environ.pop(cpu_int4.ENV) if kernel is None else os.environ.__setitem__(cpu_int4.ENV, kernel)
            cpu_int4.library.cache_clear()
        if method == "int4-unfused":
            os.environ.pop(cpu_int4.FUSED_ENV) if fused is None else os.environ.__setitem__(cpu_int4.FUSED_ENV, fused)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pro-moe", action="store_true",
        help="Pangu Pro MoE's own widths (hidden 5120, 40/8 heads of 128, experts of 1344, shared 1344: "
        "read from tests/data/models/pangu-pro-moe-72b/config.json) with --layers layers (default 2 then)",
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --pro-moe)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--shared-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compiled", action="store_true", help="compiled decode (the engine default; compiles at load)")
    p.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4"])
    args = p.parse_args()
    if args.pro_moe:
        import json

        real = json.loads(PRO_MOE_CONFIG.read_text())  # the repository's copy of the 72B's config.json
        args.hidden, args.heads, args.kv_heads = real["hidden_size"], real["num_attention_heads"], real["num_key_value_heads"]
        args.expert_size, args.shared_size = real["moe_intermediate_size"], real["shared_expert_intermediate_size"]
    args.layers = args.layers or (2 if args.pro_moe else 4)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_pangu_tokenizer(root / "tokenizer")
        from pangu_infer.tokenizer import load_tokenizer

        tok = load_tokenizer(root / "tokenizer")
        cfg = pangu_moge_config(
            vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_experts=64,
            moe_intermediate_size=args.expert_size, shared_expert_intermediate_size=args.shared_size,
            eos_token_id=tok.eos_token_id,
        )
        write_checkpoint(str(root / "moge"), cfg, random_state_dict(cfg, dtype=torch.bfloat16))
        for f in (root / "tokenizer").iterdir():
            (root / "moge" / f.name).write_bytes(f.read_bytes())
        llms = {m: load(str(root / "moge"), m, not args.compiled) for m in args.methods}
        if args.compiled:
            for llm in llms.values():
                llm.wait_compiled()  # the compiled step builds in the background: time that one
        active = {m: weight_bytes_per_token(llm.model) for m, llm in llms.items()}
        routed = {m: moge_routed_bytes_per_token(llm.model) for m, llm in llms.items()}
        for m, llm in llms.items():
            decode_step_times(llm, 4, -1)  # warm-up
        per_round: dict[str, list[float]] = {m: [] for m in llms}
        bandwidths = []
        for r in range(args.rounds):
            bandwidths.append(measure_memory_bandwidth(256 << 20))
            for m, llm in llms.items():
                per_round[m].append(statistics.median(decode_step_times(llm, args.steps, r)))
    bandwidth = statistics.median(bandwidths)
    print(
        f"MoGE 64 experts x {args.expert_size} in 8 groups + shared {args.shared_size}, hidden {args.hidden}, "
        f"{args.layers} layers, vocab {cfg['vocab_size']}; {args.threads} threads; "
        f"{'compiled' if args.compiled else 'eager'} decode; {args.rounds} alternating rounds x {args.steps} steps; "
        f"streaming read {bandwidth / 1e9:.2f} GB/s (median of one per round)"
    )
    print("| weights | active MB/token | of which routed | ms/step (median) | tokens/s | GB/s for active bytes | % of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    frac = {}
    for m in llms:
        step = statistics.median(per_round[m])
        gbs = active[m] / step / 1e9
        frac[m] = gbs * 1e9 / bandwidth
        print(f"| {m} | {active[m] / 1e6:.2f} | {routed[m] / 1e6:.2f} | {step * 1e3:.2f} | {1 / step:.1f} | {gbs:.2f} | {100 * frac[m]:.0f}% |")
    if "int4" in frac:
        print(f"int4: {100 * frac['int4']:.0f}% of the bandwidth for its active bytes (target >= {100 * TARGET:.0f}%)")
        return 0 if frac["int4"] >= TARGET else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
