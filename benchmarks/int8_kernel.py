"""The int8 products of a few rows: this package's kernel (pangu_infer.quant.cpu_int8) against aten's.

For each weight shape and row count: milliseconds per product (best of interleaved repeats) for
`cpu_int8.matmul` (float32 activations, float32 out) and `aten._weight_int8pack_mm` (bf16
activations and out), and each one's relative error (max |y - ref| / max |ref|) against the float64
product of the same int8 weight and scales. Shapes: the output layer of the 1B Pangu-shaped test
model (vocabulary 49152, hidden 1536: llama.cpp's quantizer writes it as Q8_0 in a Q4_0 file) and
one MLP product of the same model.

    .venv/bin/python benchmarks/int8_kernel.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_infer.quant import cpu_int8  # noqa: E402

SHAPES = ((49152, 1536), (4800, 1536))
ROWS = (1, 2, 4, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_int8.library() is None:
        sys.exit("cpu_int8's kernel does not run here (no AVX2 or no C compiler)")
    g = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads; ms per product, best of {args.repeats} interleaved; relative error against float64")
    print(f"{'weight':>12s} {'rows':>5s} {'own ms':>8s} {'aten ms':>8s} {'speed':>6s} {'own err':>8s} {'aten err':>9s}")
    for n, k in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
        wd = w.double() * s.double()[:, None]
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            ref = x.double() @ wd.T
            runs = {"own": lambda: cpu_int8.matmul(x, w, s), "aten": lambda: torch.ops.aten._weight_int8pack_mm(xb, w, s)}
            err = {name: ((fn().double() - ref).abs().max() / ref.abs().max()).item() for name, fn in runs.items()}
            best = {name: float("inf") for name in runs}
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            print(f"{n:>6d}x{k:<5d} {m:5d} {best['own'] * 1e3:8.2f} {best['aten'] * 1e3:8.2f} {best['aten'] / best['own']:5.2f}x"
                  f" {err['own']:8.1e} {err['aten']:9.1e}")


if __name__ == "__main__":
    main()
