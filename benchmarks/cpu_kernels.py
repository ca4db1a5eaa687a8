"""The CPU kernels a decode step is made of, side by side: which one to use, measured.

1. One-token products over weights far larger than the caches (what decode reads per token):
   GB/s of weight bytes for `F.linear` on a plain bf16 weight, the oneDNN-packed bf16 product
   (`pangu_infer.models.packed`), weight-only int8 (`aten._weight_int8pack_mm`), int4
   (`aten._weight_int4pack_mm_for_cpu`) at group sizes 32/64/128, and oneDNN's W8A8 product
   (`onednn.qlinear_pointwise`, int8 activations: not weight-only, shown as the lead for a faster
   int8), this package's int4 kernel (pangu_infer.quant.cpu_int4, where the CPU has AVX-512 VNNI),
   against a streaming read of a buffer of the same size.
2. Decode attention of one sequence (9 query / 3 KV heads of 64, as SmolLM2): the engine's two
   products + softmax, SDPA with enable_gqa, and SDPA with each KV head's query heads as rows.
3. Products of 1-512 rows (prefill chunks): the int8 and int4 kernels, whose time grows with the
   rows like a loop of one-row products, against converting the int8 weight to bf16 for one oneDNN
   product (what the engine does from 32 rows on) and the packed bf16 product.

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 2] [--weights-mb 1200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> float:
    """Best of `repeats` seconds for one call of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def products(args) -> None:
    n, k = 9600, 1536
    count = max(1, int(args.weights_mb * 1e6 // (n * k * 2)))
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(n, k, generator=g).bfloat16() for _ in range(count)]
    x = torch.randn(1, k, generator=g).bfloat16()
    bf16_bytes = count * n * k * 2
    rows = []

    def over_all(fn):
        return lambda: [fn(i) for i in range(count)]

    rows.append(("F.linear, plain bf16", bf16_bytes, timed(over_all(lambda i: F.linear(x, plain[i])), args.repeats)))
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in plain]
    rows.append((
        "oneDNN-packed bf16",
        bf16_bytes,
        timed(over_all(lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")), args.repeats),
    ))
    del packed
    int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(count)]
    del plain
    scales = torch.rand(n, generator=g).bfloat16()
    rows.append((
        "int8 weight-only (_weight_int8pack_mm)",
        bf16_bytes // 2,
        timed(over_all(lambda i: torch.ops.aten._weight_int8pack_mm(x, int8[i], scales)), args.repeats),
    ))
    if hasattr(torch.ops.onednn, "qlinear_prepack"):
        w8a8 = [torch.ops.onednn.qlinear_prepack(w, [1, k]) for w in int8]
        xq = torch.randint(0, 256, (1, k), dtype=torch.uint8, generator=g)
        wscale = torch.rand(n, generator=g) * 0.01
        wzero = torch.zeros(n, dtype=torch.int64)

        def qlinear(i):
            return torch.ops.onednn.qlinear_pointwise(
                xq, 0.02, 128, w8a8[i], wscale, wzero, None, 1.0, 0, torch.bfloat16, "none", [], ""
            )

        rows.append(("W8A8 (onednn.qlinear_pointwise)", bf16_bytes // 2, timed(over_all(qlinear), args.repeats)))
        del w8a8
    del int8
    int4 = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 1)
        for _ in range(count)
    ]
    for group in (32, 64, 128):
        sz = torch.randn(k // group, n, 2, generator=g).bfloat16()
        rows.append((
            f"int4 weight-only, group {group}",
            bf16_bytes // 4,
            timed(over_all(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4[i], group, sz)), args.repeats),
        ))
    del int4
    from pangu_infer.quant import cpu_int4

    if cpu_int4.library() is not None:  # this package's int4 kernel (AVX-512 VNNI), its own layout
        own = [cpu_int4.pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(n, k // 32), torch.rand(n, k // 32))[0] for _ in range(count)]
        for group in (32, 64, 128):
            sz = torch.rand(n // 16, k // group, 2, 16, generator=g).bfloat16()
            rows.append((
                f"int4 own kernel (cpu_int4), group {group}",
                bf16_bytes // 4,
                timed(over_all(lambda i: cpu_int4.matmul(x, own[i], sz, group)), args.repeats),
            ))
        del own
    buf = torch.ones(bf16_bytes // 4)
    rows.append(("streaming read (sum of fp32)", bf16_bytes, timed(buf.sum, args.repeats)))

    print(f"1. one-token products over {count} weights of {n} x {k} ({bf16_bytes / 1e6:.0f} MB in bf16), best of {args.repeats}")
    print(f"{'kernel':42s}{'MB read':>9s}{'ms':>9s}{'GB/s':>8s}{'x plain':>9s}")
    base = rows[0][2]
    for name, nbytes, seconds in rows:
        print(f"{name:42s}{nbytes / 1e6:9.0f}{seconds * 1e3:9.2f}{nbytes / seconds / 1e9:8.1f}{base / seconds:9.2f}")


def attention(args) -> None:
    heads, kv_heads, dim, scale = 9, 3, 64, 0.125
    g = torch.Generator().manual_seed(1)
    print(f"\n2. decode attention of one sequence ({heads} query / {kv_heads} KV heads of {dim}, bf16), microseconds")
    print(f"{'context':>8s}{'bmm+softmax+bmm':>17s}{'SDPA enable_gqa':>17s}{'SDPA groups as rows':>21s}")
    for ctx in (160, 600, 2000):
        q = torch.randn(1, heads, dim, generator=g).bfloat16()
        k = torch.randn(1, kv_heads, ctx, dim, generator=g).bfloat16()
        v = torch.randn(1, kv_heads, ctx, dim, generator=g).bfloat16()
        mask = torch.ones(1, 1, 1, ctx, dtype=torch.bool)
        qg = q.view(1, kv_heads, heads // kv_heads, dim)

        def products_softmax():
            s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).bfloat16()
            return torch.matmul(p, v)

        def gqa():
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)

        def as_rows():
            return F.scaled_dot_product_attention(qg, k, v, scale=scale)

        def us(fn):
            return timed(lambda: [fn() for _ in range(200)], args.repeats) / 200 * 1e6

        print(f"{ctx:8d}{us(products_softmax):17.1f}{us(gqa):17.1f}{us(as_rows):21.1f}")


def many_rows(args) -> None:
    """Products of many rows (prefill chunks): the weight-only kernels against converting the weight."""
    n, k = 4800, 1536
    g = torch.Generator().manual_seed(2)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g).bfloat16()
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 1)
    sz = torch.randn(k // 64, n, 2, generator=g).bfloat16()
    plain = torch.randn(n, k, generator=g).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(plain, 1)
    print(f"\n3. products of M rows by one {n} x {k} weight (prefill), milliseconds, best of {args.repeats}")
    print(f"{'rows':>6s}{'int8 kernel':>13s}{'int8 -> bf16 + F.linear':>25s}{'int4 kernel':>13s}{'packed bf16':>13s}")
    for m in (1, 8, 32, 128, 512):
        x = torch.randn(m, k, generator=g).bfloat16()
        cells = (
            lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scales),
            lambda: F.linear(x, w8.to(torch.bfloat16)) * scales,  # what PackedWeight does from 32 rows on
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 64, sz),
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        )
        ms = [timed(fn, args.repeats) * 1e3 for fn in cells]
        print(f"{m:6d}{ms[0]:13.2f}{ms[1]:25.2f}{ms[2]:13.2f}{ms[3]:13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-mb", type=float, default=1200, help="bf16 weight bytes streamed per pass (default: 1200)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.weights_mb <= 0 or args.repeats < 1:
        ap.error(f"--weights-mb {args.weights_mb} / --repeats {args.repeats}: expected positive values")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    with torch.inference_mode():
        products(args)
        attention(args)
        many_rows(args)


if __name__ == "__main__":
    main()
