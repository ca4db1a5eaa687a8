"""The int4 kernel (pangu_infer.quant.cpu_int4) at 1-67 rows: this tree's build against another revision's.
With `--bits 5` (or `--five-bit`), its 5-bit form (GGUF's Q5 blocks: pack5's layout, pangu_int5_mm; the
other revision must have it, ABI 5 or later); with `--bits 6` its 6-bit form (GGUF's Q6_K: pack6's
layout, groups of 16 and 32; ABI 6 or later). `--head`: the 1B model's output head (49152 x 1536)
instead of one layer.

Both builds come from the same file, this one from the working tree and the other from
`git show REV:pangu_infer/quant/cpu_int4.py`, at the activations' levels this CPU uses by default.
For one layer of the 1B Pangu-shaped model's int4 weights (qkv 3072x1536, o 1536x1536, gate/up
9600x1536, down 1536x4800) at group sizes 32 and 64: the outputs of the two builds are compared bit
for bit, then timed (best of interleaved passes), in milliseconds per row.

    .venv/bin/python benchmarks/int4_rows.py --against 5463de6 [--threads 2] [--bits 4|5|6] [--head]
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

from pangu_infer.native import build_c_library, c_compiler  # noqa: E402
from pangu_infer.quant import cpu_int4  # noqa: E402

SHAPES = ((3072, 1536), (1536, 1536), (9600, 1536), (1536, 4800))
HEAD = ((49152, 1536),)
ROWS = (1, 2, 3, 4, 5, 16, 67)


def sources_at(rev: str) -> dict:
    """The kernel sources of pangu_infer/quant/cpu_int4.py at `rev` (the module's text up to FLAGS run),
    with the shared C text of pangu_infer/quant/c_simd.py at `rev` where it has that file."""
    def show(path: str) -> str:
        return subprocess.check_output(["git", "show", f"{rev}:{path}"], cwd=ROOT, text=True)

    text = show("pangu_infer/quant/cpu_int4.py")[: show("pangu_infer/quant/cpu_int4.py").index("FLAGS = C_FLAGS")]
    ns: dict = {}
    if "from pangu_infer.quant.c_simd import" in text:
        exec(compile(show("pangu_infer/quant/c_simd.py"), f"{rev}:c_simd.py", "exec"), ns)  # that revision's int4_octet
        text = "\n".join(line for line in text.splitlines() if not line.startswith("from pangu_infer.quant.c_simd import"))
    exec(compile(text, f"{rev}:cpu_int4.py", "exec"), ns)
    return ns


def load_any(source: str, name: str) -> ctypes.CDLL:
    """A build of either ABI: pangu_int4_mm takes the layout's values per group (zs) from ABI 4 on."""
    lib = build_c_library(name, source, c_compiler(), cpu_int4.FLAGS)
    lib.pangu_int4_mm.restype = ctypes.c_int
    lib.pangu_int4_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * (6 if lib.pangu_int4_abi() >= 4 else 5)
    if lib.pangu_int4_abi() >= 5:  # ABI 6 added the planes (5- or 6-bit codes) before the threads
        lib.pangu_int5_mm.restype = ctypes.c_int
        lib.pangu_int5_mm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * (7 if lib.pangu_int4_abi() >= 6 else 6)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision of the other build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bits", type=int, choices=(4, 5, 6), default=4, help="code width: 4 (pangu_int4_mm), 5 or 6 (pangu_int5_mm)")
    ap.add_argument("--five-bit", action="store_true", help="the same as --bits 5")
    ap.add_argument("--head", action="store_true", help="the 1B model's output head (49152 x 1536) instead of one layer")
    args = ap.parse_args()
    bits = 5 if args.five_bit else args.bits
    shapes = HEAD if args.head else SHAPES
    torch.set_num_threads(args.threads)
    levels = cpu_int4.activation_levels()
    new_src, name = cpu_int4.isa_source(levels)
    if new_src is None or not c_compiler():
        sys.exit("cpu_int4's kernel does not run here")
    old = sources_at(args.against)
    old_src = cpu_int4.level_source(old["SOURCE"] if cpu_int4.has_vnni() else old["SOURCE_AVX2"], levels)
    libs = {"other": load_any(old_src, f"{name}_rev"), "this": load_any(new_src, name)}
    g = torch.Generator().manual_seed(0)
    if bits == 6 and min(lib.pangu_int4_abi() for lib in libs.values()) < 6:
        sys.exit(f"{args.against} has no 6-bit codes (ABI 6)")
    what = "the 1B head" if args.head else "one 1B layer"
    print(f"{name}, {bits}-bit codes, {levels} level(s), {args.threads} threads; ms per row of {what}, best of {args.repeats} interleaved")
    print(f"{'group':>5s} {'rows':>5s} {args.against[:10]:>10s} {'this':>8s} {'speed':>6s}  bits")
    for group in ((16, 32) if bits == 6 else (32, 64)):
        weights = []
        for n, k in shapes:
            q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
            scale, zero = torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01
            if bits > 4:  # Q6_K's scales only; Q5 blocks with zeros (Q5_1's)
                data, hb, sz = (cpu_int4.pack5 if bits == 5 else cpu_int4.pack6)(q, scale, None if bits == 6 else zero)
                weights.append((data, sz, n, k, hb))
            else:
                weights.append((*cpu_int4.pack(q, scale, zero), n, k, None))

        def run(lib, xs, data, sz, n, k, hb):
            y = torch.empty(xs[k].shape[0], n, dtype=torch.bfloat16)
            zs = (cpu_int4.zero_values(sz),) if lib.pangu_int4_abi() >= 4 else ()  # scale and zero per group (2)
            m = xs[k].shape[0]
            if hb is None:
                rc = lib.pangu_int4_mm(xs[k].data_ptr(), data.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group, *zs, args.threads)
            else:
                planes = (bits - 4,) if lib.pangu_int4_abi() >= 6 else ()
                rc = lib.pangu_int5_mm(xs[k].data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group, *zs, *planes, args.threads)
            assert rc == 0
            return y

        for m in ROWS:
            xs = {k: torch.randn(m, k, generator=g).bfloat16() for _, k in shapes}
            same = all(torch.equal(run(libs["other"], xs, *w), run(libs["this"], xs, *w)) for w in weights)
            best = {key: float("inf") for key in libs}
            for _ in range(args.repeats):
                for key, lib in libs.items():
                    start = time.perf_counter()
                    for w in weights:
                        run(lib, xs, *w)
                    best[key] = min(best[key], time.perf_counter() - start)
            print(f"{group:5d} {m:5d} {best['other'] * 1e3 / m:10.3f} {best['this'] * 1e3 / m:8.3f} {best['other'] / best['this']:5.2f}x  "
                  f"{'same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
