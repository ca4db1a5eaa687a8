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
step compiled by torch.compile (`compile_decode=True`). bf16 linears are oneDNN-packed, as `LLM`
does. Ratios are against transformers bf16.

    .venv/bin/python benchmarks/compare.py [--models smollm2,random1b] [--threads 2]
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
        # Each engine binds its own KV cache to the model's attention layers: build one, use it, drop it.
        ec = EngineConfig(
            max_num_seqs=max(args.concurrency, 1), kv_cache_memory=1 << 30, seed=0, compile_decode=compiled, **spec
        )
        return LLMEngine(model, None, ec)

    # Compiled steps build their graphs in the untimed warm-ups of run_latency / run_throughput.
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
        quant = None if label == "bfloat16" else label
        name = "bfloat16" if quant is None else f"{quant} (bf16 activations)"
        rows += pangu_rows(path, name, torch.bfloat16, quant, args, repeat_check=False, compiled=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,random1b", help="comma-separated: smollm2, random1b")
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
    models = [m for m in args.models.split(",") if m]
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

    if "smollm2" in models:
        path = demo_model_path()
        rows = [llama_cpp_row(path, args)]
        rows += hf_gguf_rows(path, args)
        rows += pangu_rows(path, "float32", torch.float32, None, args, repeat_check=False)
        rows += pangu_rows(path, "bfloat16", torch.bfloat16, None, args, repeat_check=True)
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
