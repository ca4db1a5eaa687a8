"""Decode attention over a paged KV cache: the C kernel (models/bi_attention_kernel.py, reading each
query's keys and values where they lie in the pages) against the torch form (K/V gathered into
[B, Hkv, L, D] copies, two batched products, softmax in fp32), both eager.

For each shape (sequences x context, KV heads x query heads per KV head, head width 128) and cache
dtype: milliseconds per call (medians of interleaved passes, models/layers._measure_decode, the
measurement the engine makes once per machine) and the largest difference between the two forms'
outputs. Pages of 16 slots in a shuffled order, as a running engine's cache.

    .venv/bin/python benchmarks/decode_attention.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pangu_infer.models import bi_attention_kernel, layers  # noqa: E402

# (sequences, context, KV heads, query heads per KV head): the engine's own measurement, the 1B
# Pangu-shaped model's compare.py 16-way and one-sequence decode, one long context of a 7B shape
SHAPES = ((8, 512, 8, 4), (16, 320, 6, 2), (1, 320, 6, 2), (1, 2048, 8, 4))


def max_difference(kv_dtype: torch.dtype, batch: int, length: int, kv_heads: int, group: int, dim: int = 128) -> float:
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(batch * length, kv_heads, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(batch * length, kv_heads, dim, generator=g).to(kv_dtype)
    table = (torch.randperm(batch * length // 16, generator=g)[:, None] * 16 + torch.arange(16)).reshape(batch, length)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(kv_dtype)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    own = bi_attention_kernel.run(q, k_cache, v_cache, table, mask.view(batch, length), dim**-0.5)
    ref = layers.decode_products(q, layers.gather_heads_first(k_cache, table), layers.gather_heads_first(v_cache, table), mask, dim**-0.5)
    return float((own.float() - ref.float()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not bi_attention_kernel.available():
        sys.exit("the attention kernel does not run here (no AVX-512F or AVX2+FMA, or no C compiler)")
    print(f"{args.threads} threads, build {bi_attention_kernel.instruction_set()}; ms per call (medians of interleaved passes)")
    print(f"{'cache':>9s} {'seqs x ctx':>11s} {'Hkv x G':>8s} {'kernel':>8s} {'torch':>8s} {'speed':>6s} {'max diff':>9s}")
    for dtype in (torch.float32, torch.bfloat16):
        for b, length, hkv, group in SHAPES:
            t = layers._measure_decode(dtype, b, length, hkv, group)
            diff = max_difference(dtype, b, length, hkv, group)
            print(f"{str(dtype).replace('torch.', ''):>9s} {f'{b} x {length}':>11s} {f'{hkv} x {group}':>8s} "
                  f"{t['own'] * 1e3:8.2f} {t['aten'] * 1e3:8.2f} {t['aten'] / t['own']:5.1f}x {diff:9.1e}")


if __name__ == "__main__":
    main()
