"""int4 decode kernel (quant/cpu_int4.py): activations in one int8 level or two, speed and precision.

The kernel quantizes a product's activations per group of the weight, in two int8 levels
(x ~= d (a + b / 254): finer than bf16) or in one (x ~= d a: llama.cpp's Q8_0 rounding for its Q4
dot products). One level halves the dot products; where the kernel is bound by them (AVX2-only
CPUs) that is the decode step's int4 time. Two measurements:

- speed: one-row products over openPangu-Embedded-1B's int4 weights (26 layers of q/k/v/o,
  gate/up, down; groups of 32, as Q4_0), each build of this CPU's kernel, alternating rounds,
  best of each, and their ratio;
- precision: perplexity of pangu_infer/data/alice_ch1.txt with the demo model's GGUF kept quantized
  and every int4 product of the passage run by the kernel (PANGU_INFER_KERNEL_ROWS_INT4_VNNI set
  past the passage's length, so no product converts its weight), at each level, against the same file
  dequantized to the default dtype (or --dtype), and llama.cpp's own perplexity of the same tokens
  from the same file (its prefill and its decode path) where llama-cpp-python is installed.

    .venv/bin/python benchmarks/int4_activations.py [--threads 2] [--rounds 5] [--gguf PATH] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PANGU_INFER_KERNEL_ROWS_INT4_VNNI"] = str(1 << 20)  # every int4 product through the kernel

PANGU_1B = [(3072, 1536), (1536, 1536), (9600, 1536), (1536, 4800)]  # qkv, o, gate/up, down
LAYERS, GROUP = 26, 32


def speed(rounds: int) -> dict[int, float]:
    """Seconds per token of the 1B model's int4 products, per number of levels (best of rounds)."""
    import torch

    from pangu_infer.native import c_compiler
    from pangu_infer.quant import cpu_int4

    source, name = cpu_int4.isa_source(2)  # two levels: the build's source as it is, and its name
    builds = {lv: cpu_int4.load(cpu_int4.level_source(source, lv), name + ("" if lv == 2 else "_q8"), c_compiler()) for lv in (2, 1)}
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in PANGU_1B * LAYERS:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        weights.append((*cpu_int4.pack(q, torch.rand(n, k // GROUP, generator=g) * 0.01, torch.rand(n, k // GROUP, generator=g) * 0.01), n, k))
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for k in {k for _, k in PANGU_1B}}
    ys = {n: torch.empty(1, n, dtype=torch.bfloat16) for n in {n for n, _ in PANGU_1B}}
    threads = torch.get_num_threads()

    def token(lib) -> None:
        for data, sz, n, k in weights:
            lib.pangu_int4_mm(xs[k].data_ptr(), data.data_ptr(), sz.data_ptr(), ys[n].data_ptr(), 1, n, k, GROUP, cpu_int4.zero_values(sz), threads)

    best = {lv: float("inf") for lv in builds}
    for lib in builds.values():
        token(lib)
    for _ in range(rounds):
        for lv, lib in builds.items():
            t = time.perf_counter()
            token(lib)
            best[lv] = min(best[lv], time.perf_counter() - t)
    nbytes = sum(d.numel() + s.numel() * 2 for d, s, _, _ in weights)
    print(f"{name} build, {threads} threads, {LAYERS} layers of Pangu-1B int4 weights ({nbytes / 1e6:.0f} MB with scales), one row")
    print("| activations | ms per token | GB/s |")
    print("|---|---|---|")
    for lv, s in best.items():
        print(f"| {'two int8 levels (int8x2)' if lv == 2 else 'one int8 level (int8, Q8_0)'} | {s * 1e3:.1f} | {nbytes / s / 1e9:.2f} |")
    print(f"one level / two levels speed: {best[2] / best[1]:.2f}x")
    return best


def precision(path: str, dtype_name: str = "auto") -> None:
    import torch

    from pangu_infer.device import default_dtype
    from pangu_infer.loader import load_model
    from pangu_infer.quant import cpu_int4

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gguf_quant import PASSAGE, perplexity

    cpu = torch.device("cpu")
    dtype = default_dtype(cpu) if dtype_name == "auto" else getattr(torch, dtype_name)
    rows = []
    kept = load_model(path, dtype, cpu, load_tokenizer=True, quantization="auto")
    for setting in ("int8x2", "int8"):
        os.environ[cpu_int4.ACTIVATIONS_ENV] = setting
        cpu_int4.library.cache_clear()
        t = time.perf_counter()
        rows.append((f"kept, int4 activations {setting}", perplexity(kept), time.perf_counter() - t))
    ids = list(kept.tokenizer.encode(PASSAGE.read_text()))  # the tokens perplexity() scores
    del kept
    none = load_model(path, dtype, cpu, load_tokenizer=True, quantization="none")
    rows.append((f"dequantized ({str(dtype).replace('torch.', '')})", perplexity(none), 0.0))
    base = rows[-1][1]
    rows += llama_cpp_rows(path, ids)
    print(f"\n{Path(path).name}, activations {dtype}, every int4 product through the kernel")
    print("| weights | perplexity (alice_ch1) | vs dequantized | seconds |")
    print("|---|---|---|---|")
    for name, v, s in rows:
        print(f"| {name} | {v:.3f} | {100 * (v / base - 1):+.2f}% | {s:.1f} |")


def llama_cpp_rows(path: str, ids: list[int]) -> list[tuple[str, float, float]]:
    """The peer: llama.cpp's perplexity of the same tokens from the same file, as its prefill
    (batches of 512) and its decode (one token a call) compute them; none without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("(llama-cpp-python not installed: no llama.cpp rows; see benchmarks/README.md)")
        return []
    import numpy as np
    import torch

    out = []
    for batch in (512, 1):
        llm = Llama(path, n_ctx=max(512, len(ids) + 8), n_batch=batch, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)
        t = time.perf_counter()
        llm.eval(ids)
        logits = torch.tensor(np.array(llm.scores[: len(ids)]))
        ppl = float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).exp())
        out.append((f"llama.cpp, the same file (n_batch {batch})", ppl, time.perf_counter() - t))
        del llm
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gguf", default=None, help="GGUF file for the perplexity (default: the demo model)")
    p.add_argument("--skip", default="", help="comma-separated: speed, ppl")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="activations' dtype for the perplexity (default: the CPU's default dtype)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if "speed" not in skip:
        speed(args.rounds)
    if "ppl" not in skip:
        from pangu_infer.loader import demo_model_path

        precision(args.gguf or str(demo_model_path()), args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
