"""A bf16 checkpoint on a CPU without native bf16 products: its matrices kept in bf16 and multiplied
in float32 (the default, pangu_infer/models/bf16_weights.py) against the same checkpoint widened to
float32 at load (the peer: what the default was before, `PANGU_INFER_BF16_WEIGHTS=0`).

A random openPangu-Embedded-1B-shaped checkpoint in bf16 (hidden 1536, 26 layers, 12/6 heads,
MLP 4800, Pangu's vocabulary of 153,376: about 1.0 B parameters), loaded twice in one process
with dtype float32 (the default dtype on such a CPU), eager decode steps on both sides unless
--compiled (the compiled step takes many minutes to build on a small CPU). Interleaved rounds,
medians:

    weights     bytes one decoded token reads (pangu_infer.bench.weight_bytes_per_token)
    decode      tokens/s of one greedy request after a 64-token prompt
    8-way       tokens/s of 8 such requests at once
    prefill     tokens/s of a --prompt-len token prompt (one request, max_tokens 1)
    logits      max |difference| of the two models' logits on one prompt (same weights: float32 sums in another order)

A third row is the bf16 model with its many-row products (prefill) as they were before the blocked
kernel: the weight widened in slices into BLAS products (`blocked_chosen` False while it runs).

`--products` instead times the many-row products alone at openPangu-Embedded-7B's shapes (hidden
4096, MLP 12800, 32/8 heads of 128: q/k/v 6144 x 4096, o 4096 x 4096, gate/up 25600 x 4096, down
4096 x 12800) for --rows rows: the blocked kernel (pangu_bf16w_gemm), widened slices into BLAS
(`widened_mm`), and float32 BLAS on weights widened beforehand (twice the memory; the ceiling
BLAS sets), in GFLOPS, medians of interleaved rounds.

Usage:
    .venv/bin/python benchmarks/bf16_weights.py [--rounds 3] [--threads 2] [--layers 26] [--compiled]
    .venv/bin/python benchmarks/bf16_weights.py --products [--rows 64,128,512] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_tokenizer import build_pangu_tokenizer  # noqa: E402  (works without pytest)

from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.bench import weight_bytes_per_token  # noqa: E402
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, write_checkpoint  # noqa: E402
from pangu_infer.models import bf16_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache_dtype import decode_rate  # noqa: E402  (tokens/s once every prompt has its first token)

VOCAB = 153376  # openPangu-Embedded's


def prefill_rate(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    return len(prompt) / (time.perf_counter() - start)


SHAPES_7B = {"q/k/v": (6144, 4096), "o": (4096, 4096), "gate/up": (25600, 4096), "down": (4096, 12800)}


def products(rows: list[int], rounds: int) -> None:
    """--products: see the module docstring."""
    g = torch.Generator().manual_seed(0)
    print(f"many-row products at the 7B's shapes, GFLOPS, {torch.get_num_threads()} threads, medians of {rounds} interleaved rounds")
    print(f"{'rows':>5s} {'product':>8s} {'blocked kernel':>15s} {'widened slices':>15s} {'float32 BLAS':>13s}")
    for m in rows:
        for name, (n, k) in SHAPES_7B.items():
            w = torch.randn(n, k, generator=g).to(torch.bfloat16)
            wide = w.float()
            x = torch.randn(m, k, generator=g)
            fns = {
                "blocked": lambda: bf16_weights.kernel_mm(x, w, blocked=True),
                "widened": lambda: bf16_weights.widened_mm(x, w),
                "float32": lambda: torch.mm(x, wide.t()),
            }
            times: dict[str, list[float]] = {k_: [] for k_ in fns}
            for fn in fns.values():
                fn()
            for _ in range(rounds):
                for k_, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[k_].append(time.perf_counter() - start)
            gf = {k_: 2 * m * n * k / statistics.median(t) / 1e9 for k_, t in times.items()}
            print(f"{m:5d} {name:>8s} {gf['blocked']:15.1f} {gf['widened']:15.1f} {gf['float32']:13.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--compiled", action="store_true", help="wait for and time the compiled decode steps")
    ap.add_argument("--products", action="store_true", help="time the many-row products alone (see above)")
    ap.add_argument("--rows", default="64,128,512", help="--products: rows of x, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.products:
        if bf16_weights.library() is None:
            raise SystemExit("the bf16-weight kernel does not run here (x86 with AVX2, FMA and F16C and a C compiler)")
        products([int(r) for r in args.rows.split(",")], args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_pangu_tokenizer(root / "tokenizer")
        cfg = pangu_dense_config(
            vocab_size=VOCAB, hidden_size=1536, num_hidden_layers=args.layers, num_attention_heads=12,
            num_key_value_heads=6, intermediate_size=4800, max_position_embeddings=4096,
        )
        model_dir = root / "pangu-1b-bf16"
        write_checkpoint(str(model_dir), cfg, random_state_dict(cfg, dtype=torch.bfloat16))
        for f in (root / "tokenizer").iterdir():
            (model_dir / f.name).write_bytes(f.read_bytes())
        llms = {}
        for name, keep in (("float32 weights (peer)", "0"), ("bf16 weights (default)", "")):
            os.environ[bf16_weights.ENV] = keep
            start = time.perf_counter()
            llms[name] = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 30, enforce_eager=not args.compiled)
            print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        os.environ.pop(bf16_weights.ENV, None)
        if args.compiled:
            for llm in llms.values():
                llm.wait_compiled()
        g = torch.Generator().manual_seed(0)
        short = [torch.randint(100, 1000, (64,), generator=g).tolist() for _ in range(8)]
        logits = [llm.logits(short[0][:32]) for llm in llms.values()]  # (before the third row's alias)
        widened = "bf16, prefill widened (before)"
        llms[widened] = llms["bf16 weights (default)"]  # the same model, its many-row products as before
        rows: dict[str, dict[str, list[float]]] = {n: {"decode": [], "8-way": [], "prefill": []} for n in llms}
        chosen = bf16_weights.blocked_chosen
        for r in range(args.rounds):
            for name, llm in llms.items():
                bf16_weights.blocked_chosen = (lambda: False) if name == widened else chosen
                try:
                    rows[name]["decode"].append(decode_rate(llm, short[:1], args.decode_tokens))
                    rows[name]["8-way"].append(decode_rate(llm, short, args.decode_tokens))
                    # a new prompt each time: the rows sharing one model would find it in the prefix cache
                    prompt = torch.randint(100, 1000, (args.prompt_len,), generator=g).tolist()
                    rows[name]["prefill"].append(prefill_rate(llm, prompt))
                finally:
                    bf16_weights.blocked_chosen = chosen
            print(f"round {r + 1}: " + "; ".join(f"{n}: {', '.join(f'{k} {v[-1]:.2f}' for k, v in rows[n].items())}" for n in rows), flush=True)
        peer = next(iter(rows))
        med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in rows.items()}
        print(f"\n{args.layers} layers, {args.threads} threads, {'compiled' if args.compiled else 'eager'} decode, medians of {args.rounds} interleaved rounds")
        print(f"{'weights':26s} {'GB/token':>9s} {'decode':>14s} {'8-way':>14s} {'prefill':>14s}")
        for name, llm in llms.items():
            gb = weight_bytes_per_token(llm.model) / 1e9
            cells = [f"{med[name][k]:6.2f} ({med[name][k] / med[peer][k]:.2f}x)" for k in ("decode", "8-way", "prefill")]
            print(f"{name:26s} {gb:9.2f} " + " ".join(f"{c:>14s}" for c in cells))
        print(f"max |logit difference| {(logits[0] - logits[1]).abs().max().item():.2e} (logits up to {logits[0].abs().max().item():.1f})")


if __name__ == "__main__":
    main()
