"""The same weights four ways on a CPU: int4 codes, 5-bit codes (GGUF's Q5 blocks as the loader keeps
them: cpu_int4's layout plus a bit plane), 6-bit codes (GGUF's Q6_K blocks as the loader keeps them:
two bit planes, groups of 16, scales only) and int8 rows (what Q5 and Q6_K blocks were kept as
before, and still are where those products are not chosen), products of `--rows` activation rows.

For each form, `--count` weights of [N, K] (random codes, scale and zero per group of 32, or a scale
per 16 for 6-bit codes; far more bytes than the caches hold), timed as one pass of products over all
of them, best of interleaved passes: milliseconds, the bytes the pass reads and the rate it reads
them at. int4, 5- and 6-bit run pangu_infer.quant.cpu_int4 (matmul, matmul5), int8 the product a
PackedWeight of int8 runs here (quant/cpu_int8.py's kernel where it is chosen, else aten's).

    .venv/bin/python benchmarks/five_bit.py [--rows 1] [--threads 2] [--n 4096 --k 2048 --count 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_infer.quant import cpu_int4, cpu_int8  # noqa: E402

GROUP = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if cpu_int4.library() is None:
        sys.exit("cpu_int4's kernel does not run here (no AVX2 + FMA, or no C compiler)")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, k = args.n, args.k
    four, five, six, eight = [], [], [], []
    for _ in range(args.count):
        q = torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=g)
        scale, zero = torch.rand(n, k // GROUP, generator=g) * 0.02, (torch.rand(n, k // GROUP, generator=g) - 0.5) * 0.02
        four.append(cpu_int4.pack(q & 15, scale, zero))
        five.append(cpu_int4.pack5(q, scale, zero))
        six.append(cpu_int4.pack6(q | (torch.randint(0, 2, (n, k), dtype=torch.uint8, generator=g) << 5), torch.rand(n, k // 16, generator=g) * 0.02, None))
        eight.append(((q.to(torch.int8) - 16).contiguous(), (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)))
        del q
    x = torch.randn(args.rows, k, generator=g).bfloat16()
    int8 = cpu_int8.matmul if cpu_int8.usable(k) else torch.ops.aten._weight_int8pack_mm
    runs = {
        "int4 (cpu_int4.matmul)": (lambda: [cpu_int4.matmul(x, d, sz, GROUP) for d, sz in four], four),
        "5-bit (cpu_int4.matmul5)": (lambda: [cpu_int4.matmul5(x, d, hb, sz, GROUP) for d, hb, sz in five], five),
        "6-bit, groups of 16": (lambda: [cpu_int4.matmul5(x, d, hb, sz, 16) for d, hb, sz in six], six),
        f"int8 rows ({'cpu_int8' if int8 is cpu_int8.matmul else 'aten'})": (lambda: [int8(x, d, s) for d, s in eight], eight),
    }
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for fn, _ in runs.values():
            fn()
        for _ in range(args.rounds):
            for name, (fn, _) in runs.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.count} weights of [{n}, {k}], {args.rows} row(s), {args.threads} threads, best of {args.rounds} interleaved passes")
    for name, (_, weights) in runs.items():
        nbytes = sum(t.nbytes for w in weights for t in w)
        print(f"{name:28s} {best[name] * 1e3:8.1f} ms  {nbytes / 1e6:6.0f} MB  {nbytes / best[name] / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
