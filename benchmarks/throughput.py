"""Aggregate throughput: this engine (continuous batching, paged KV) against HF transformers `generate`.

64 requests (prompts of 32 to 512 tokens, 128 output tokens each, greedy, ignore_eos) on a random
Pangu-7B-shaped model scaled to about 100 M parameters, on the same weights:

- this engine: `LLM.generate` with max_num_seqs 32;
- transformers: `LlamaForCausalLM(attention_bias=True)` (the Pangu 7B layout) loaded with the same
  state dict, `generate` in padded batches of 32 (left padding, as HF recommends for decoders).

Prints aggregate output tokens/s for both and their ratio, and the engine's TTFT / TPOT
percentiles (RequestOutput.metrics). Usage:

    .venv/bin/python benchmarks/throughput.py [--num-requests 64] [--output-len 128] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.bench import percentile  # noqa: E402
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, transformers_llama, write_checkpoint  # noqa: E402

# Pangu 7B's proportions (GQA 4:1, MLP 3.125 x hidden, q/k/v/o biases, theta 1.6e7) at ~106 M parameters.
MODEL_100M = dict(
    vocab_size=32000,
    hidden_size=768,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=3,
    intermediate_size=2400,
    max_position_embeddings=2048,
    eos_token_id=2,
)


def write_wordlevel_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer.json with one word per id, so any id decodes (the engine detokenizes outputs)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


def build_random_model(directory: Path, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Write the checkpoint (with a word-level tokenizer) and return its state dict."""
    tensors = random_state_dict(config, seed=0, dtype=dtype)
    write_checkpoint(str(directory), config, tensors)
    write_wordlevel_tokenizer(directory, config["vocab_size"])
    return tensors


@torch.inference_mode()
def hf_generate_padded(model, prompts: list[list[int]], output_len: int, batch_size: int) -> tuple[int, float]:
    """Left-padded batches of `batch_size`, greedy; returns (generated tokens, seconds)."""
    total = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False
        )
        total += (out.shape[1] - width) * len(chunk)
    return total, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32, help="engine max_num_seqs and HF batch size")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--compile-decode", action="store_true",
        help="also run the engine with its default torch.compile'd decode steps (compiled at engine start, untimed); without this flag the engine runs with enforce_eager=True",
    )
    args = ap.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt:
        ap.error(f"--min-prompt {args.min_prompt} / --max-prompt {args.max_prompt}: expected 1 <= min <= max")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = pangu_dense_config(**MODEL_100M)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, config["vocab_size"]) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.num_requests)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        tensors = build_random_model(Path(root), config, dtype)
        engine_runs = {}
        for compiled in (False, True) if args.compile_decode else (False,):
            llm = LLM(
                root, dtype=args.dtype, device="cpu", max_num_seqs=args.concurrency, kv_cache_memory=2 << 30,
                enforce_eager=not compiled,
            )
            llm.wait_compiled()  # the compiled step builds in the background: figures are compiled ones
            if not engine_runs:
                n_params = sum(p.numel() for p in llm.model.parameters())
                print(
                    f"model: random PanguEmbedded, {n_params / 1e6:.1f} M parameters, {args.dtype}: vocab {config['vocab_size']}, "
                    f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']}/"
                    f"{config['num_key_value_heads']} heads, MLP {config['intermediate_size']}, q/k/v/o biases"
                )
                print(
                    f"workload: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens "
                    f"(mean {sum(map(len, prompts)) / len(prompts):.0f}), {args.output_len} output tokens, greedy, "
                    f"ignore_eos, concurrency {args.concurrency}, {args.threads} threads"
                )
            # Warm-up, untimed: one prompt alone and a few of different lengths together, so that a
            # compiled engine has built its graphs (batch 1 and batched) beforehand.
            warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            llm.generate([{"prompt_token_ids": prompts[0][:16]}], warm, use_tqdm=False)
            llm.generate([{"prompt_token_ids": p[: 16 * (i + 1)]} for i, p in enumerate(prompts[:4])], warm, use_tqdm=False)
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            engine_runs[compiled] = (
                sum(o.num_generated_tokens for o in outs),
                elapsed,
                [o.metrics["ttft"] for o in outs],
                [o.metrics["tpot"] for o in outs if o.metrics["tpot"] is not None],
            )
            if compiled:
                same = sum(o.outputs[0].token_ids == e for o, e in zip(outs, eager_tokens))
            else:
                eager_tokens = [o.outputs[0].token_ids for o in outs]
            del llm, outs

        model = transformers_llama(config, tensors, dtype)
        hf_generate_padded(model, [prompts[0][:16]], 2, 1)  # warm-up
        hf_tokens, hf_s = hf_generate_padded(model, prompts, args.output_len, args.concurrency)

    hf_tps = hf_tokens / hf_s
    print()
    print(f"{'':40s}{'tokens':>8s}{'seconds':>9s}{'tokens/s':>10s}{'ratio':>7s}")
    print(f"{'transformers generate, padded':40s}{hf_tokens:8d}{hf_s:9.1f}{hf_tps:10.1f}{1.0:7.2f}")
    for compiled, (tokens, seconds, _, _) in engine_runs.items():
        name = "pangu-infer LLM.generate" + (", compiled decode" if compiled else "")
        print(f"{name:40s}{tokens:8d}{seconds:9.1f}{tokens / seconds:10.1f}{tokens / seconds / hf_tps:7.2f}")
    if True in engine_runs:
        print(f"compiled decode: {same}/{len(prompts)} greedy completions identical to eager (compiled kernels sum in"
              " another order; in bf16 that flips near-tied tokens of this random model; fp32 ones match"
              " exactly, tests/test_engine.py)")
    target = 5.0
    for compiled, (tokens, seconds, ttft, tpot) in engine_runs.items():
        print()
        print(f"engine{' (compiled decode)' if compiled else ''} per request   p50       p90       p99")
        print(f"TTFT (s)        {percentile(ttft, 50):8.2f}  {percentile(ttft, 90):8.2f}  {percentile(ttft, 99):8.2f}")
        print(f"TPOT (ms)       {1e3 * percentile(tpot, 50):8.1f}  {1e3 * percentile(tpot, 90):8.1f}  {1e3 * percentile(tpot, 99):8.1f}")
    best = max(tokens / seconds for tokens, seconds, _, _ in engine_runs.values()) / hf_tps
    verdict = "meets" if best >= target else "misses"
    print(f"\ntarget: at least {target:.0f}x transformers at {args.concurrency} concurrent: {verdict} ({best:.2f}x)")


if __name__ == "__main__":
    main()
