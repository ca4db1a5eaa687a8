"""Which activation dtype and which int4 kernel a CPU should run, measured on it (issue 13).

On a CPU without native bf16 (AVX2-only x86, e.g. AMD Zen 1-3; `device.cpu_has_bf16()` False)
oneDNN emulates bf16, so the engine's default dtype there is float32 and the converted many-row
products of quantized weights multiply in fp32 (`quant.prefill.weight_product`). This prints, on
the machine it runs on, interleaved, best of `--rounds`:

1. products of `--rows` rows (a prefill chunk) per openPangu-Embedded-1B weight shape: bf16
   `F.linear`, fp32 `F.linear`, and the engine's int4 (cpu_int4 layout, groups of 32) and int8
   many-row products as they run here, GFLOP/s and each against fp32 and bf16;
2. one-row products (decode) over the model's 26 layers of int4 weights: this package's kernel
   (quant/cpu_int4.py: the AVX-512 VNNI build or the AVX2 one) against aten's
   `_weight_int4pack_mm_for_cpu`, ms per token and GB/s of weight bytes (scales included);
3. the one-row int8 head (49152 x 1536, `_weight_int8pack_mm`) with bf16 and fp32 activations.

    .venv/bin/python benchmarks/cpu_dtype.py [--threads 2] [--rows 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ((3072, 1536), (1536, 1536), (9600, 1536), (1536, 4800))  # qkv, o, gate+up, down
LAYERS = 26


def best_of(fns: dict, rounds: int) -> dict:
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pangu_infer.device import cpu_has_bf16, default_dtype
    from pangu_infer.native import cpu_flags
    from pangu_infer.quant import cpu_int4, prefill

    isa = cpu_int4.isa_source()[1] or "none"
    print(f"{args.threads} threads; native bf16: {cpu_has_bf16()}; default CPU dtype: {default_dtype(torch.device('cpu'))}; "
          f"cpu_int4 build: {isa} (library {'built' if cpu_int4.library() is not None else 'not built'}); "
          f"avx512f: {'avx512f' in cpu_flags()}")
    g = torch.Generator().manual_seed(0)
    group = 32

    print(f"\n| {args.rows} rows, shape (out x in) | bf16 F.linear GFLOP/s | fp32 F.linear | int4 (engine's path) | int8 (engine's path) | int4 vs fp32 | int8 vs fp32 | fp32 vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g) * 0.02
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        data, sz = cpu_int4.pack(q, torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s8 = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
        x = torch.randn(args.rows, k, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        fns = {
            "bf16": lambda: F.linear(xb, wb),
            "fp32": lambda: F.linear(x, w),
            "int4": lambda: prefill.int4_vnni_product(xb, data, sz, group) if cpu_int4.library() is not None else None,
            "int8": lambda: prefill.int8_product(xb, w8, s8),
        }
        t = best_of(fns, args.rounds)
        flop = 2 * args.rows * n * k
        gf = {name: flop / s / 1e9 for name, s in t.items()}
        print(f"| {n}x{k} | {gf['bf16']:.1f} | {gf['fp32']:.1f} | {gf['int4']:.1f} | {gf['int8']:.1f} | "
              f"{t['fp32'] / t['int4']:.2f}x | {t['fp32'] / t['int8']:.2f}x | {t['bf16'] / t['fp32']:.1f}x |")

    ours, aten = [], []
    for n, k in SHAPES * LAYERS:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        scale, zero = torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01
        if cpu_int4.library() is not None:
            ours.append((cpu_int4.pack(q, scale, zero), k))
        aten.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                     torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16), k))
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for _, k in SHAPES}
    fns = {"aten": lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], d, group, s) for d, s, k in aten]}
    if ours:
        fns["own"] = lambda: [cpu_int4.matmul(xs[k], d, s, group) for (d, s), k in ours]
    t = best_of(fns, args.rounds)
    nbytes = sum(n * k // 2 + n * (k // group) * 4 for n, k in SHAPES * LAYERS)  # codes + bf16 scale and zero
    print(f"\n| one row, {LAYERS} layers of int4 ({nbytes / 1e6:.0f} MB with scales) | ms per token | GB/s |")
    print("|---|---|---|")
    for name, s in t.items():
        label = f"this package's kernel ({isa})" if name == "own" else "aten _weight_int4pack_mm_for_cpu"
        print(f"| {label} | {s * 1e3:.1f} | {nbytes / s / 1e9:.2f} |")
    if ours:
        print(f"own / aten speed: {t['aten'] / t['own']:.2f}x")

    w8 = torch.randint(-127, 128, (49152, 1536), dtype=torch.int8, generator=g)
    s8 = torch.rand(49152, generator=g).bfloat16()
    heads = {
        "bf16 activations": (lambda x=torch.randn(1, 1536).bfloat16(): torch.ops.aten._weight_int8pack_mm(x, w8, s8)),
        "fp32 activations": (lambda x=torch.randn(1, 1536): torch.ops.aten._weight_int8pack_mm(x, w8, s8.float())),
    }
    t = best_of(heads, args.rounds)
    print("\n| int8 head 49152 x 1536, one row | ms | GB/s |")
    print("|---|---|---|")
    for name, s in t.items():
        print(f"| {name} | {s * 1e3:.1f} | {w8.numel() / s / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
