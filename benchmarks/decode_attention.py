"""Decode attention over a paged KV cache: the C kernel (models/bi_attention_kernel.py, reading each
query's keys and values where they lie in the pages) against the torch form (K/V gathered into
[B, Hkv, L, D] copies, two batched products, softmax in fp32), both eager.
With `--against REV`: this tree's kernel against the kernel source of another git revision, over
one cache pair per layer (26 layers, so the keys and values come from memory as in a decode step,
not from the last call's cache), microseconds per layer (median of passes, the two builds
alternated) and whether the outputs are the same bits.

For each shape (sequences x context, KV heads x query heads per KV head, head width 128) and cache
dtype: milliseconds per call (medians of interleaved passes, models/layers._measure_decode, the
measurement the engine makes once per machine) and the largest difference between the two forms'
outputs. Pages of 16 slots in a shuffled order, as a running engine's cache.

    .venv/bin/python benchmarks/decode_attention.py [--threads 2]
    .venv/bin/python benchmarks/decode_attention.py --against 358be75 [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pangu_infer.models import bi_attention_kernel, layers  # noqa: E402
from pangu_infer.native import build_c_library, c_compiler  # noqa: E402
from pangu_infer.quant.c_simd import BF16_AVX2, BF16_AVX512  # noqa: E402

# (sequences, context, KV heads, query heads per KV head, head width): the engine's own measurement,
# the 1B Pangu-shaped model's compare.py 16-way and one-sequence decode, one long context of a 7B
# shape, the demo model's one-sequence decode (3 KV heads of 64)
SHAPES = ((8, 512, 8, 4, 128), (16, 320, 6, 2, 128), (1, 320, 6, 2, 128), (1, 2048, 8, 4, 128), (1, 320, 3, 3, 64))


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


def source_at(rev: str) -> str:
    """The kernel's C source (this CPU's build) in models/bi_attention_kernel.py at git revision `rev`."""
    text = subprocess.check_output(["git", "show", f"{rev}:pangu_infer/models/bi_attention_kernel.py"], cwd=ROOT, text=True)
    ns: dict = {}
    exec(compile(text[: text.index("def source(")], f"{rev}:bi_attention_kernel.py", "exec"), ns)  # the C text only
    text = ns["_COMMON"] + (ns["AVX512"] if bi_attention_kernel.instruction_set() == "avx512" else ns["AVX2"]) + ns["BODY"]
    return text.replace("@BF16_AVX2@", BF16_AVX2).replace("@BF16_AVX512@", BF16_AVX512)  # (later revisions share them with other kernels)


def _loaded(source: str, name: str) -> ctypes.CDLL:
    lib = build_c_library(name, source, c_compiler(), bi_attention_kernel.FLAGS)
    lib.pangu_bi_attention.restype = ctypes.c_int
    lib.pangu_bi_attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] + [ctypes.c_int] * 3 + [ctypes.c_int64]
    return lib


def against(rev: str, rounds: int, layers_n: int = 26) -> None:
    """This tree's kernel and `rev`'s, bf16 caches, one cache pair per layer, pages of 16 slots in
    a shuffled order; the two builds alternated pass by pass."""
    builds = {rev[:10]: _loaded(source_at(rev), "bi_attention_against"), "this": _loaded(bi_attention_kernel.source(bi_attention_kernel.instruction_set()), "bi_attention_this")}
    print(f"{torch.get_num_threads()} threads, bf16 caches, {layers_n} layers' caches in turn; us per layer (median of {rounds} passes each)")
    print(f"{'seqs x ctx':>11s} {'Hkv x G':>8s} " + " ".join(f"{k:>10s}" for k in builds) + f" {'speed':>6s} {'GB/s':>6s}  bits")
    for batch, length, hkv, group, dim in SHAPES:
        g = torch.Generator().manual_seed(2)
        slots_n = max(8192, batch * length)
        caches = [(torch.randn(slots_n, hkv, dim, generator=g).bfloat16(), torch.randn(slots_n, hkv, dim, generator=g).bfloat16()) for _ in range(layers_n)]
        blocks = torch.randperm(slots_n // 16, generator=g)[: batch * -(-length // 16)].reshape(batch, -1)
        slots = (blocks[:, :, None] * 16 + torch.arange(16)).reshape(batch, -1)[:, :length].contiguous()
        valid = torch.ones(batch, length, dtype=torch.bool)
        q = torch.randn(batch, hkv * group, dim, generator=g).bfloat16()
        outs = {k: torch.empty_like(q) for k in builds}
        times: dict = {k: [] for k in builds}
        for r in range(rounds):
            for name in (list(builds) if r % 2 == 0 else list(reversed(builds))):
                lib, out = builds[name], outs[name]
                start = time.perf_counter()
                for kc, vc in caches:
                    rc = lib.pangu_bi_attention(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots.data_ptr(), valid.data_ptr(), out.data_ptr(),
                                                slots_n, batch, hkv * group, hkv, dim, length, batch, dim**-0.5, 0, 0, 0, torch.get_num_threads())
                    assert rc == 0, rc
                times[name].append((time.perf_counter() - start) / layers_n)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        old, this = med[rev[:10]], med["this"]
        gbs = batch * length * hkv * dim * 2 * 2 / this / 1e9
        same = "same" if torch.equal(outs[rev[:10]], outs["this"]) else "DIFFER"
        print(f"{f'{batch} x {length}':>11s} {f'{hkv} x {group}':>8s} " + " ".join(f"{med[k] * 1e6:10.1f}" for k in builds)
              + f" {old / this:5.2f}x {gbs:6.1f}  {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", help="git revision whose kernel source to measure this tree's against")
    ap.add_argument("--rounds", type=int, default=9, help="passes per build with --against")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not bi_attention_kernel.available():
        sys.exit("the attention kernel does not run here (no AVX-512F or AVX2+FMA, or no C compiler)")
    if args.against:
        against(args.against, args.rounds)
        return
    print(f"{args.threads} threads, build {bi_attention_kernel.instruction_set()}; ms per call (medians of interleaved passes)")
    print(f"{'cache':>9s} {'seqs x ctx':>11s} {'Hkv x G':>8s} {'kernel':>8s} {'torch':>8s} {'speed':>6s} {'max diff':>9s}")
    for dtype in (torch.float32, torch.bfloat16):
        for b, length, hkv, group, dim in SHAPES:
            t = layers._measure_decode(dtype, b, length, hkv, group, dim)
            diff = max_difference(dtype, b, length, hkv, group, dim)
            print(f"{str(dtype).replace('torch.', ''):>9s} {f'{b} x {length}':>11s} {f'{hkv} x {group}':>8s} "
                  f"{t['own'] * 1e3:8.2f} {t['aten'] * 1e3:8.2f} {t['aten'] / t['own']:5.1f}x {diff:9.1e}")


if __name__ == "__main__":
    main()
