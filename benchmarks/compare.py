"""This engine against HF transformers and llama.cpp, in one process, on the same model file.

Models:
- smollm2: the real SmolLM2-135M-Instruct Q4_1 GGUF (`pangu_infer.loader.demo_model_path()`).
  llama.cpp runs the Q4_1 file as is (llama-cpp-python, optional); transformers loads the same file
  dequantized (`from_pretrained(dir, gguf_file=...)`); this engine loads it dequantized, in fp32 and
  bf16, and quantized by itself to int8 / int4 (`quantization=`).
- random1b: a random Pangu-7B-shaped model of about 1 B parameters (the 1B sibling's width, real
  vocabulary). llama.cpp is skipped there: it would need a GGUF of these weights.

Per engine: prefill tokens/s (one prompt of --prompt-len), single-stream decode tokens/s
(--output-len greedy tokens), aggregate decode throughput with --concurrency requests at once
(transformers: one batch through `generate`; the prompts share a length, so nothing is padded).
For this engine also prompt-lookup decoding on a prompt that repeats its context, checked to
give the same greedy tokens as plain decoding, and (--compiled) the rows again with the decode
step compiled (the default; the other rows here pass `enforce_eager=True`). bf16 linears are
oneDNN-packed, as `LLM` does. Ratios are against transformers bf16.

--gguf PATH (repeatable): any GGUF file, run by llama.cpp and by this engine exactly as a user
gets it with no flags (`LLM(path)`: default dtype, compiled decode, default KV cache), side by
side: prefill tokens/s (one --prompt-len prompt), decode tokens/s (one stream), and aggregate
tokens/s with --concurrency requests at once. llama.cpp's concurrent figure decodes all the
sequences in one `llama_decode` batch per step (llama-cpp-python's low-level API, one sequence
id per request, as llama.cpp's own server batches them); its high-level API has no batched
generation. The two engines alternate, round by round; each figure is the median of the rounds.

    .venv/bin/python benchmarks/compare.py [--models smollm2,random1b] [--threads 2]
    .venv/bin/python benchmarks/compare.py --gguf FILE.gguf [--gguf OTHER.gguf] --prompt-len 256
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import build_random_model  # noqa: E402

from pangu_infer.bench import make_prompt, measure_memory_bandwidth, run_latency, run_throughput, weight_bytes_per_token  # noqa: E402
from pangu_infer.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from pangu_infer.loader import demo_model_path, load_model  # noqa: E402
from pangu_infer.loader.random import pangu_dense_config, transformers_llama  # noqa: E402
from pangu_infer.models.packed import can_pack, pack_linears  # noqa: E402

# The openPangu-Embedded 1B sibling's width (hidden 1536, 12/6 heads of 128, real vocabulary),
# with 20 layers and MLP 4800: 1.06 B parameters.
MODEL_1B = dict(
    vocab_size=153376,
    hidden_size=1536,
    num_hidden_layers=20,
    num_attention_heads=12,
    num_key_value_heads=6,
    intermediate_size=4800,
    max_position_embeddings=4096,
    eos_token_id=45892,
)


@dataclass
class Row:
    name: str
    prefill: float = float("nan")
    decode: float = float("nan")
    throughput: float = float("nan")
    note: str = ""


# ---------------------------------------------------------------------------------- this engine
def pangu_rows(
    path: str, label: str, dtype: torch.dtype, quantization: Optional[str], args, repeat_check: bool, compiled: bool = False
) -> list[Row]:
    name = f"pangu-infer {label}" + (", compiled decode" if compiled else "")
    try:
        loaded = load_model(path, dtype, torch.device("cpu"), load_tokenizer=False, quantization=quantization)
    except (ValueError, NotImplementedError) as e:
        return [Row(name, note=f"skipped: {e}")]
    model = loaded.model
    # What LLM(...) does: bf16 linears laid out for oneDNN.
    if can_pack(torch.device("cpu"), dtype):
        pack_linears(model)

    def engine(**spec) -> LLMEngine:
        ec = EngineConfig(
            max_num_seqs=max(args.concurrency, 1), kv_cache_memory=1 << 30, seed=0, enforce_eager=not compiled, **spec
        )
        e = LLMEngine(model, None, ec)
        e.runner.wait_compiled()  # the compiled step builds in the background: figures are compiled ones
        return e

    # Compiled steps build their graphs when each engine starts, untimed.
    lat = run_latency(engine(), "random", args.prompt_len, args.output_len, num_iters=2)
    thr = run_throughput(engine(), "random", args.prompt_len, args.output_len, args.concurrency)
    per_token = weight_bytes_per_token(model)
    note = f"{per_token / 1e6:.0f} MB/token, {per_token * lat.decode_tokens_per_s / args.bandwidth:.0%} of bandwidth"
    rows = [Row(name, lat.prefill_tokens_per_s, lat.decode_tokens_per_s, thr.tokens_per_s, note)]
    if repeat_check:
        rows.append(prompt_lookup_row(name, engine, args))
    del model, loaded
    gc.collect()
    return rows


def prompt_lookup_row(name: str, make_engine, args) -> Row:
    """Plain vs prompt-lookup decoding of one prompt that repeats its context: speed-up, same tokens."""
    from pangu_infer.sampling_params import SamplingParams

    prompt = make_prompt("repeat", args.prompt_len, 32000, random.Random(7))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    results = {}
    for label, spec in (("plain", {}), ("lookup", {"num_speculative_tokens": args.num_speculative_tokens})):
        eng = make_engine(**spec)
        eng.add_request("warm", prompt[:16], SamplingParams(temperature=0, max_tokens=2))
        while eng.has_unfinished_requests():
            eng.step()
        eng.add_request("r", prompt, params)
        tokens: list[int] = []
        first = None
        while eng.has_unfinished_requests():
            for out in eng.step():
                if first is None:
                    first = time.perf_counter()
                tokens = out.outputs[0].token_ids
        results[label] = (tokens, (len(tokens) - 1) / (time.perf_counter() - first), eng.stats()["spec_acceptance_rate"])
    plain_ids, lookup_ids = results["plain"][0], results["lookup"][0]
    same = plain_ids == lookup_ids
    # bf16 on a random model: the verify pass (several tokens per product) rounds unlike one-token
    # decode steps, and its near-flat logits turn that into a different argmax now and then.
    pairs = enumerate(zip(plain_ids, lookup_ids))
    diverge = next((i for i, (a, b) in pairs if a != b), min(len(plain_ids), len(lookup_ids)))
    speedup = results["lookup"][1] / results["plain"][1]
    return Row(
        f"{name} + prompt lookup",
        decode=results["lookup"][1],
        note=f"repeating prompt: {speedup:.2f}x plain ({results['plain'][1]:.1f} tok/s), acceptance "
        f"{results['lookup'][2]:.0%}, greedy tokens {'identical' if same else f'DIFFER from token {diverge}'}",
    )


# ---------------------------------------------------------------------------------- transformers
@torch.inference_mode()
def hf_row(model, label: str, vocab: int, args) -> Row:
    rng = random.Random(3)
    prompt = torch.tensor([make_prompt("random", args.prompt_len, vocab, rng)])
    model(prompt[:, :16])  # warm-up
    start = time.perf_counter()
    model(prompt)
    prefill = args.prompt_len / (time.perf_counter() - start)
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    start = time.perf_counter()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)
    total = time.perf_counter() - start
    decode = (args.output_len - 1) / max(total - args.prompt_len / prefill, 1e-9)
    batch = torch.tensor([make_prompt("random", args.prompt_len, vocab, rng) for _ in range(args.concurrency)])
    start = time.perf_counter()
    model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **gen)
    throughput = args.concurrency * args.output_len / (time.perf_counter() - start)
    return Row(f"transformers {label}", prefill, decode, throughput)


def hf_gguf_rows(path: str, args) -> list[Row]:
    from transformers import AutoModelForCausalLM

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        rows.append(hf_row(model, str(dtype).replace("torch.", ""), model.config.vocab_size, args))
        del model
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------- llama.cpp
def llama_cpp_row(path: str, args) -> Row:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return Row("llama.cpp Q4_1", note="skipped: llama-cpp-python is not installed (see benchmarks/README.md)")
    llm = Llama(model_path=path, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=args.prompt_len + args.output_len + 16,
                n_batch=512, verbose=False)
    rng = random.Random(3)
    prefills, decodes = [], []
    for _ in range(3):  # the first run warms up
        prompt = make_prompt("random", args.prompt_len, llm.n_vocab(), rng)
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefills.append(args.prompt_len / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(args.output_len - 1):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        decodes.append((args.output_len - 1) / (time.perf_counter() - start))
    return Row("llama.cpp Q4_1", max(prefills[1:]), max(decodes[1:]), note="no batched generation in llama-cpp-python")


def llama_cpp_batched_tokens_per_s(llm, prompts: list[list[int]], output_len: int, threads: int) -> float:
    """Greedy decoding of every prompt at once: each step is one `llama_decode` over a batch with
    one token per sequence (sequence id = request), like llama.cpp's server; aggregate tokens/s,
    prefills included (as this engine's throughput figure). A context of its own over `llm`'s
    model: the high-level `Llama` makes one-sequence contexts."""
    import ctypes

    import llama_cpp
    import numpy as np

    n, n_vocab = len(prompts), llm.n_vocab()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sum(len(p) + output_len + 16 for p in prompts)
    params.n_batch = params.n_ubatch = max(512, max(map(len, prompts)))
    params.n_seq_max, params.kv_unified = n, True
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(max(max(map(len, prompts)), n), 0, n)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        row = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))))

    try:
        start = time.perf_counter()
        last = []
        for seq, prompt in enumerate(prompts):  # each prompt in one batch of its own, as a server admits them
            decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            last.append(argmax(len(prompt) - 1))
        for step in range(output_len - 1):
            decode([(last[s], len(prompts[s]) + step, s, True) for s in range(n)])
            last = [argmax(i) for i in range(n)]
        return n * output_len / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def gguf_rows(path: str, args) -> tuple[Row, Row]:
    """llama.cpp and this engine with no flags on one GGUF file, alternating round by round."""
    import statistics

    from pangu_infer.llm import LLM

    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        Llama = None
    llm = LLM(path)  # exactly what a user gets: no flags
    llm.wait_compiled()  # decode runs compiled once the background build is ready: measure that
    ours = Row(f"pangu-infer, no flags ({llm.dtype})".replace("torch.", ""), note=f"load {llm.load_seconds:.1f} s "
               f"(compiled step ready {llm.engine.runner.compile_seconds:.1f} s later)")
    theirs = Row("llama.cpp", note="skipped: llama-cpp-python is not installed (see benchmarks/README.md)")
    lcpp = None
    if Llama is not None:
        conc = max(args.concurrency, 1)
        lcpp = Llama(model_path=path, n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
                     n_ctx=args.prompt_len + args.output_len + 16, n_batch=max(512, args.prompt_len))
        theirs.note = f"llama-cpp-python; thr: {conc} sequences per llama_decode batch"
    results: dict[str, list[float]] = {k: [] for k in ("lp", "ld", "lt", "pp", "pd", "pt")}
    rng = random.Random(3)
    if lcpp is not None:  # warm-up
        lcpp.reset()
        lcpp.eval(make_prompt("random", 32, lcpp.n_vocab(), rng))
    for _ in range(args.rounds):
        if lcpp is not None:
            prompt = make_prompt("random", args.prompt_len, lcpp.n_vocab(), rng)
            lcpp.reset()
            start = time.perf_counter()
            lcpp.eval(prompt)
            results["lp"].append(args.prompt_len / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(args.output_len - 1):
                lcpp.eval([int(np.argmax(lcpp.scores[lcpp.n_tokens - 1]))])
            results["ld"].append((args.output_len - 1) / (time.perf_counter() - start))
            prompts = [make_prompt("random", args.prompt_len, lcpp.n_vocab(), rng) for _ in range(args.concurrency)]
            results["lt"].append(llama_cpp_batched_tokens_per_s(lcpp, prompts, args.output_len, args.threads))
        lat = run_latency(llm.engine, "random", args.prompt_len, args.output_len, num_iters=1, seed=rng.randrange(1 << 30))
        results["pp"].append(lat.prefill_tokens_per_s)
        results["pd"].append(lat.decode_tokens_per_s)
        thr = run_throughput(llm.engine, "random", args.prompt_len, args.output_len, args.concurrency, seed=rng.randrange(1 << 30))
        results["pt"].append(thr.tokens_per_s)
    med = {k: statistics.median(v) if v else float("nan") for k, v in results.items()}
    theirs.prefill, theirs.decode, theirs.throughput = med["lp"], med["ld"], med["lt"]
    ours.prefill, ours.decode, ours.throughput = med["pp"], med["pd"], med["pt"]
    del llm, lcpp
    gc.collect()
    return theirs, ours


def print_gguf_table(path: str, theirs: Row, ours: Row, args) -> None:
    print(f"\n{os.path.basename(path)}: {args.threads} threads, prompt {args.prompt_len}, output {args.output_len}, "
          f"{args.concurrency} concurrent, median of {args.rounds} alternating rounds")
    head = f"{'engine':34s}{'prefill':>9s}{'decode':>8s}{'thr@' + str(args.concurrency):>8s}  note"
    print(head)
    print("-" * len(head))
    for r in (theirs, ours):
        print(f"{r.name:34s}{r.prefill:9.1f}{r.decode:8.1f}{r.throughput:8.1f}  {r.note}")
    if theirs.decode == theirs.decode:
        print(f"{'ratio (this engine / llama.cpp)':34s}{ours.prefill / theirs.prefill:8.2f}x{ours.decode / theirs.decode:7.2f}x"
              f"{ours.throughput / theirs.throughput:7.2f}x")


# ---------------------------------------------------------------------------------- report
def print_table(title: str, rows: list[Row], llama_decode: Optional[float], concurrency: int) -> None:
    base = next((r for r in rows if r.name == "transformers bfloat16"), None)
    print(f"\n{title}")
    head = f"{'engine':34s}{'prefill':>9s}{'decode':>8s}{'thr@' + str(concurrency):>8s}{'pre/hf16':>9s}{'dec/hf16':>9s}{'thr/hf16':>9s}{'dec/llama':>10s}  note"
    print(head)
    print("-" * len(head))

    def ratio(a: float, b: Optional[float]) -> str:
        return f"{a / b:.2f}" if b and a == a and b == b else "-"

    def num(x: float, width: int) -> str:
        return f"{x:{width}.1f}" if x == x else f"{'-':>{width}s}"

    for r in rows:
        print(
            f"{r.name:34s}{num(r.prefill, 9)}{num(r.decode, 8)}{num(r.throughput, 8)}"
            f"{ratio(r.prefill, base and base.prefill):>9s}{ratio(r.decode, base and base.decode):>9s}"
            f"{ratio(r.throughput, base and base.throughput):>9s}{ratio(r.decode, llama_decode):>10s}  {r.note}"
        )


def compiled_rows(path: str, args) -> list[Row]:
    rows = []
    for label in [c for c in args.compiled.split(",") if c]:
        quant = "none" if label == "bfloat16" else label  # "none": dequantized to bf16
        name = "bfloat16" if quant == "none" else f"{quant} (bf16 activations)"
        rows += pangu_rows(path, name, torch.bfloat16, quant, args, repeat_check=False, compiled=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated: smollm2, random1b (default: both, none with --gguf)")
    ap.add_argument("--gguf", action="append", default=[], metavar="PATH",
                    help="a GGUF file to run with llama.cpp and with this engine's defaults (repeatable)")
    ap.add_argument("--rounds", type=int, default=3, help="--gguf: alternating rounds per engine (median)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantizations", default="int8,int4", help="this engine's own quantizations to add (empty: none)")
    ap.add_argument(
        "--compiled", default="bfloat16,int8,int4",
        help="this engine's rows to repeat with a torch.compile'd decode step: bfloat16, int8, int4 (empty: none)",
    )
    args = ap.parse_args()
    if args.models is None:
        args.models = "" if args.gguf else "smollm2,random1b"
    models = [m for m in args.models.split(",") if m]
    missing = [g for g in args.gguf if not os.path.isfile(g)]
    if missing:
        ap.error(f"--gguf {missing[0]!r}: no such file")
    unknown = set(models) - {"smollm2", "random1b"}
    if unknown:
        ap.error(f"--models {args.models!r}: unknown {sorted(unknown)}; expected smollm2 and/or random1b")
    if args.prompt_len < 64:
        ap.error(f"--prompt-len {args.prompt_len}: expected at least 64 (the repeat prompt needs two periods)")
    torch.set_num_threads(args.threads)
    args.bandwidth = measure_memory_bandwidth()
    print(f"{args.threads} threads, prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
          f"throughput at {args.concurrency} concurrent; streaming-read bandwidth {args.bandwidth / 1e9:.1f} GB/s")
    quants = [q for q in args.quantizations.split(",") if q]
    bad = set(c for c in args.compiled.split(",") if c) - {"bfloat16", "int8", "int4"}
    if bad:
        ap.error(f"--compiled {args.compiled!r}: unknown {sorted(bad)}; expected bfloat16, int8 and/or int4")

    for path in args.gguf:
        print_gguf_table(path, *gguf_rows(path, args), args)

    if "smollm2" in models:
        path = demo_model_path()
        rows = [llama_cpp_row(path, args)]
        rows += hf_gguf_rows(path, args)
        # "none": the file dequantized (GGUF files stay quantized by default)
        rows += pangu_rows(path, "float32", torch.float32, "none", args, repeat_check=False)
        rows += pangu_rows(path, "bfloat16", torch.bfloat16, "none", args, repeat_check=True)
        for q in quants:
            rows += pangu_rows(path, f"{q} (bf16 activations)", torch.bfloat16, q, args, repeat_check=False)
        rows += compiled_rows(path, args)
        print_table(f"SmolLM2-135M-Instruct ({os.path.basename(path)})", rows, rows[0].decode, args.concurrency)

    if "random1b" in models:
        config = pangu_dense_config(**MODEL_1B)
        with tempfile.TemporaryDirectory() as root:
            tensors = build_random_model(Path(root), config, torch.bfloat16)
            rows = [Row("llama.cpp", note="skipped: no GGUF of these random weights")]
            for dtype in (torch.float32, torch.bfloat16):
                model = transformers_llama(config, tensors, dtype)
                rows.append(hf_row(model, str(dtype).replace("torch.", ""), config["vocab_size"], args))
                del model
                gc.collect()
            del tensors
            rows += pangu_rows(root, "bfloat16", torch.bfloat16, None, args, repeat_check=True)
            for q in quants:
                rows += pangu_rows(root, f"{q} (bf16 activations)", torch.bfloat16, q, args, repeat_check=False)
            rows += compiled_rows(root, args)
        print_table("random Pangu-7B-shaped 1.06 B (hidden 1536, 20 layers, 12/6 heads, MLP 4800, vocab 153376)", rows, None, args.concurrency)


if __name__ == "__main__":
    main()
