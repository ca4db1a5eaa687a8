"""The int4 kernel (pangu_infer.quant.cpu_int4) at 1-67 rows: this tree's build against another revision's.
With `--five-bit`, its 5-bit form (GGUF's Q5 blocks: pack5's layout, pangu_int5_mm; the other
revision must have it, ABI 5 or later).

Both builds come from the same file, this one from the working tree and the other from
`git show REV:pangu_infer/quant/cpu_int4.py`, at the activations' levels this CPU uses by default.
For one layer of the 1B Pangu-shaped model's int4 weights (qkv 3072x1536, o 1536x1536, gate/up
9600x1536, down 1536x4800) at group sizes 32 and 64: the outputs of the two builds are compared bit
for bit, then timed (best of interleaved passes), in milliseconds per row.

    .venv/bin/python benchmarks/int4_rows.py --against 5463de6 [--threads 2] [--five-bit]
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
    if lib.pangu_int4_abi() >= 5:
        lib.pangu_int5_mm.restype = ctypes.c_int
        lib.pangu_int5_mm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision of the other build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--five-bit", action="store_true", help="the 5-bit form (codes 0..31, pangu_int5_mm) instead of int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = cpu_int4.activation_levels()
    new_src, name = cpu_int4.isa_source(levels)
    if new_src is None or not c_compiler():
        sys.exit("cpu_int4's kernel does not run here")
    old = sources_at(args.against)
    old_src = cpu_int4.level_source(old["SOURCE"] if cpu_int4.has_vnni() else old["SOURCE_AVX2"], levels)
    libs = {"other": load_any(old_src, f"{name}_rev"), "this": load_any(new_src, name)}
    g = torch.Generator().manual_seed(0)
    print(f"{name}{', 5-bit codes' if args.five_bit else ''}, {levels} level(s), {args.threads} threads; ms per row of one 1B layer, best of {args.repeats} interleaved")
    print(f"{'group':>5s} {'rows':>5s} {args.against[:10]:>10s} {'this':>8s} {'speed':>6s}  bits")
    for group in (32, 64):
        weights = []
        for n, k in SHAPES:
            q = torch.randint(0, 32 if args.five_bit else 16, (n, k), dtype=torch.uint8, generator=g)
            scale, zero = torch.rand(n, k // group, generator=g) * 0.01, torch.rand(n, k // group, generator=g) * 0.01
            if args.five_bit:
                data, hb, sz = cpu_int4.pack5(q, scale, zero)
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
                rc = lib.pangu_int5_mm(xs[k].data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group, *zs, args.threads)
            assert rc == 0
            return y

        for m in ROWS:
            xs = {k: torch.randn(m, k, generator=g).bfloat16() for _, k in SHAPES}
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
