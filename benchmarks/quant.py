"""Weight-only int8 / int4 against float: peak RSS while loading, and decode tokens/s; MoGE expert offload RSS.

Model: a random checkpoint (pangu_infer.loader.random) shaped like Pangu 7B (head_dim 128, 4 query
heads per kv head, q/k/v/o biases, MLP 3.125x hidden) scaled to about 1 B parameters, stored in
bf16 in shards of ~256 MB like a real release. The vocabulary is the tiny test tokenizer's.

Peak RSS: every load runs in its own subprocess (`ru_maxrss` after `load_model`); "above
baseline" subtracts the RSS of the same process after its imports, before loading (Python and
torch: ~220 MB). Decode: all models loaded in this process, `LLMEngine.step()` at batch 1 after
the prefill, modes alternating per round so that other jobs slow each alike; medians of rounds.
GB/s = weight bytes read per token / step time. Targets: peak RSS int8 <= 0.6x and int4 <= 0.35x
of bf16, whole process (the above-baseline ratio is printed too); int8 decode >= 1.5x the fastest
float decode.

Offload: a random MoGE checkpoint in bf16, RSS (resident, and its anonymous part) after loading
and after decoding, with and without `offload_experts=True`, each in its own subprocess.

    .venv/bin/python benchmarks/quant.py [--dir /tmp/pangu_quant_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_tokenizer import build_pangu_tokenizer  # noqa: E402  (works without pytest)

from pangu_infer.loader.random import pangu_dense_config, pangu_moge_config, random_state_dict, write_checkpoint  # noqa: E402

MODES = {  # name -> (dtype, quantization)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}
RSS_TARGETS = {"int8": 0.6, "int4": 0.35}
DECODE_TARGET = 1.5


def dense_config(vocab: int, eos: int) -> dict:
    return pangu_dense_config(
        vocab_size=vocab, eos_token_id=eos, hidden_size=2048, num_hidden_layers=20,
        num_attention_heads=16, num_key_value_heads=4, intermediate_size=6400,
    )


def moge_config(vocab: int, eos: int) -> dict:
    return pangu_moge_config(
        vocab_size=vocab, eos_token_id=eos, hidden_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, num_experts=64, moe_intermediate_size=512, shared_expert_intermediate_size=1024,
    )


def build(directory: Path, config: dict, tokenizer: Path, shards: int) -> None:
    if (directory / "config.json").is_file():
        return
    write_checkpoint(str(directory), config, random_state_dict(config, dtype=torch.bfloat16), num_shards=shards)
    for f in tokenizer.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())


def rss_mib() -> tuple[float, float]:
    """(resident, anonymous) MiB of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


def child(args: argparse.Namespace) -> int:
    """One load (and optional decode) in a fresh process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    from pangu_infer import LLM, SamplingParams

    base = rss_mib()[0]
    start = time.perf_counter()
    llm = LLM(args.child_dir, dtype=args.child_dtype, device="cpu", quantization=args.child_quant,
              offload_experts=args.child_offload, kv_cache_memory=64 << 20)
    llm.wait_compiled()
    out = {"load_s": time.perf_counter() - start, "base_mib": base,
           "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["loaded_mib"], out["loaded_anon_mib"] = rss_mib()
    if args.child_decode:
        llm.generate({"prompt_token_ids": [1] + list(range(3, 40))},
                     SamplingParams(temperature=0, max_tokens=args.child_decode, ignore_eos=True), use_tqdm=False)
        out["decoded_mib"], out["decoded_anon_mib"] = rss_mib()
    print(json.dumps(out))
    return 0


def run_child(args: argparse.Namespace, directory: Path, dtype: str, quant, offload: bool = False, decode: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child-dir", str(directory), "--child-dtype", dtype,
           "--threads", str(args.threads), "--child-decode", str(decode)]
    if quant:
        cmd += ["--child-quant", quant]
    if offload:
        cmd.append("--child-offload")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def decode_times(llm, steps: int, r: int) -> float:
    from pangu_infer import SamplingParams

    engine = llm.engine
    prompt = [1] + [(97 * r + 13 * j) % (llm.config.vocab_size - 3) + 3 for j in range(15)]
    engine.add_request(f"r{r}", prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/pangu_quant_bench", help="where the random checkpoints are kept between runs")
    # 1 thread: with 2 OpenMP threads on the 2 shared cores, decode times measured the other jobs.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", help=argparse.SUPPRESS)
    p.add_argument("--child-quant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-offload", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-decode", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_dir:
        return child(args)
    torch.set_num_threads(args.threads)
    from pangu_infer import LLM
    from pangu_infer.models.registry import count_parameters
    from pangu_infer.tokenizer import load_tokenizer

    root = Path(args.dir)
    tok_dir = root / "tokenizer"
    if not tok_dir.is_dir():
        build_pangu_tokenizer(tok_dir)
    tok = load_tokenizer(tok_dir)
    dense_dir, moge_dir = root / "dense_1b", root / "moge"
    build(dense_dir, dense_config(tok.vocab_size, tok.eos_token_id), tok_dir, shards=8)
    build(moge_dir, moge_config(tok.vocab_size, tok.eos_token_id), tok_dir, shards=4)

    rss = {name: run_child(args, dense_dir, dtype, quant) for name, (dtype, quant) in MODES.items()}

    llms = {name: LLM(str(dense_dir), dtype=dtype, device="cpu", quantization=quant, kv_cache_memory=64 << 20)
            for name, (dtype, quant) in MODES.items()}
    for llm in llms.values():
        llm.wait_compiled()  # decode figures of the compiled step (it builds in the background)
    params = count_parameters(llms["fp32"].model)
    for llm in llms.values():
        decode_times(llm, 2, -1)  # warm-up
    per_round: dict[str, list[float]] = {name: [] for name in llms}
    for r in range(args.rounds):
        for name, llm in llms.items():
            per_round[name].append(decode_times(llm, args.steps, r))
    step = {name: statistics.median(v) for name, v in per_round.items()}
    weight_bytes = {name: resident_bytes(llm.model) for name, llm in llms.items()}
    del llms
    fastest_float = min(("fp32", "bf16"), key=lambda n: step[n])
    speedup = statistics.median(
        min(f, b) / q for f, b, q in zip(per_round["fp32"], per_round["bf16"], per_round["int8"])
    )

    print(f"dense Pangu-7B-shaped random model: {params / 1e9:.2f} B parameters, hidden 2048, 20 layers, "
          f"bf16 checkpoint in 8 shards; {args.threads} threads; decode batch 1, median of {args.rounds} "
          f"alternating rounds x {args.steps} steps")
    print("| mode | weights MiB | load s | peak RSS MiB | RSS / bf16 | above baseline MiB | / bf16 | decode tok/s | GB/s | / fastest float |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    b = rss["bf16"]
    for name in MODES:
        r = rss[name]
        above = r["peak_mib"] - r["base_mib"]
        print(f"| {name} | {weight_bytes[name] / 2**20:.0f} | {r['load_s']:.1f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / b['peak_mib']:.2f} | {above:.0f} | {above / (b['peak_mib'] - b['base_mib']):.2f} | "
              f"{1 / step[name]:.2f} | {weight_bytes[name] / step[name] / 1e9:.1f} | {step[fastest_float] / step[name]:.2f} |")
    ok = True
    for name, target in RSS_TARGETS.items():
        whole = rss[name]["peak_mib"] / b["peak_mib"]
        above = (rss[name]["peak_mib"] - rss[name]["base_mib"]) / (b["peak_mib"] - b["base_mib"])
        print(f"{name} peak RSS / bf16: {whole:.2f} whole process (target <= {target}), {above:.2f} above the import baseline")
        ok &= whole <= target
    print(f"int8 decode / fastest float ({fastest_float}) per round, median: {speedup:.2f}x (target >= {DECODE_TARGET})")
    ok &= speedup >= DECODE_TARGET

    print()
    print("MoGE offload: random Pangu Pro MoE-shaped checkpoint (hidden 1024, 6 layers, 64 experts x 512, "
          "shared 1024), bf16; RSS after loading and after decoding 16 tokens (each in its own process)")
    print("| mode | load s | RSS loaded MiB | anon loaded MiB | RSS after decode MiB | anon after decode MiB |")
    print("|---|---|---|---|---|---|")
    for name, offload, quant in (("bf16", False, None), ("bf16 + offload", True, None), ("int8 + offload", True, "int8")):
        r = run_child(args, moge_dir, "bfloat16", quant, offload=offload, decode=16)
        print(f"| {name} | {r['load_s']:.1f} | {r['loaded_mib']:.0f} | {r['loaded_anon_mib']:.0f} | "
              f"{r['decoded_mib']:.0f} | {r['decoded_anon_mib']:.0f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
