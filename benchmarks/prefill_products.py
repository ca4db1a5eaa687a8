"""One quantized product of many rows against the bf16 peer's, per weight shape (issue 13).

For each shape [N, K] (out, in) and `--rows` rows, interleaved, median of `--reps` per round, best
of `--rounds` rounds:
- bf16 packed: the bf16 model's product (oneDNN-packed weight, models/packed.py): the peer;
- int4 / int8, plain W^T: the conversion to a plain bf16 W^T and a product on it
  (PANGU_INFER_PACKED_PREFILL=0, the path before);
- int4 / int8, packed: the conversion straight into oneDNN's packed layout and the peer's product
  (quant/prefill.py);
- conversion alone into the packed layout, and the product alone on it;
- int4 / int8 AMX: quant/amx.py's product that reads the quantized weight itself (converting
  strips in L2 and multiplying them with AMX tiles), where this machine has AMX.
int4 is cpu_int4's layout (groups of 32), int8 a weight with a bf16 scale per row.

    .venv/bin/python benchmarks/prefill_products.py --threads 1 --shapes 1536x576,576x1536,4800x1536,1536x4800
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="960x576,576x576,3072x576,576x1536,3072x1536,1536x1536,9600x1536,1536x4800")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pangu_infer.quant import amx, cpu_int4, prefill

    why = prefill.prepare()
    if why is not None or cpu_int4.library() is None:
        print(f"the compiled conversions or cpu_int4 do not run here ({why}): nothing to compare")
        return 1
    lib = prefill._lib
    g = torch.Generator().manual_seed(0)
    print(f"{args.rows} rows, {args.threads} threads; ms (median of {args.reps}, best of {args.rounds} interleaved rounds); ratio = bf16 / this")
    has_amx = amx.library() is not None
    amx_cols = ("int4 AMX", "int8 AMX") if has_amx else ()
    print("| N x K | bf16 packed | int4 plain W^T | int4 packed | int8 plain W^T | int8 packed | " + "".join(f"{c} | " for c in amx_cols) + "int4 conv. | int8 conv. | product |")
    print("|---" * (9 + len(amx_cols)) + "|")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        data, sz = cpu_int4.pack(q, torch.rand(n, k // 32, generator=g) * 0.01, torch.rand(n, k // 32, generator=g) * 0.01)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s8 = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
        x = torch.randn(args.rows, k, generator=g).to(torch.bfloat16)
        peer = torch.ops.mkldnn._reorder_linear_weight(cpu_int4.to_bf16_t(data, sz, 32).t().contiguous())
        rb = prefill.packed_rows(n, k)
        if not rb:
            print(f"| {shape} | oneDNN's packed layout not the one checked here |")
            continue
        scratch = prefill._packed_scratch(n, k)
        ptr = torch.ops.mkldnn.data_ptr(scratch)

        def plain(fn):
            def run():
                os.environ[prefill.PACKED_ENV] = "0"
                try:
                    return fn()
                finally:
                    del os.environ[prefill.PACKED_ENV]
            return run

        fns = {
            "bf16 packed": lambda: prefill._packed_linear(x, peer),
            "int4 plain W^T": plain(lambda: torch.matmul(x, cpu_int4.to_bf16_t(data, sz, 32))),
            "int4 packed": lambda: prefill.int4_vnni_packed_product(x, data, sz, 32),
            "int8 plain W^T": plain(lambda: prefill.int8_product(x, w8, s8)),
            "int8 packed": lambda: prefill.int8_packed_product(x, w8, s8),
            "int4 conv.": lambda: lib[3](data.data_ptr(), sz.data_ptr(), ptr, n, k, 32, cpu_int4.zero_values(sz), rb, 0, n // 16, args.threads),
            "int8 conv.": lambda: lib[4](w8.data_ptr(), s8.data_ptr(), ptr, n, k, rb, 0, n // 16, args.threads),
            "product": lambda: prefill._packed_linear(x, scratch),
        }
        refused = set()
        if has_amx:
            fns["int4 AMX"] = lambda: amx.int4_product(x, data, sz, 32)
            fns["int8 AMX"] = lambda: amx.int8_product(x, w8, s8)
            refused = {name for name in amx_cols if fns[name]() is None}  # e.g. K > amx.max_k()
            for name in refused:
                del fns[name]
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                fn()
                ts = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t)
                best[name] = min(best.get(name, float("inf")), statistics.median(ts))
        base = best["bf16 packed"]
        cells = [f"{1e3 * best['bf16 packed']:.2f}"]
        for name in ("int4 plain W^T", "int4 packed", "int8 plain W^T", "int8 packed", *amx_cols):
            if name in refused:
                cells.append("refused")
                continue
            cells.append(f"{1e3 * best[name]:.2f} ({base / best[name]:.2f}x)")
        cells += [f"{1e3 * best[name]:.2f}" for name in ("int4 conv.", "int8 conv.", "product")]
        print(f"| {shape} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
