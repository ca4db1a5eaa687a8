"""What LoRA adapters cost: the demo model (SmolLM2-135M-Instruct Q4_1 GGUF, as loaded by default)
with no adapter, against the same model started with enable_lora=True, running requests with no
adapter, with one adapter, and with two adapters and the base model mixed in one batch.

The adapters are written here in PEFT's format (adapter_config.json + adapter_model.safetensors),
random, of rank --rank on all seven projections of every layer (q/k/v/o, gate/up/down).

Measured in interleaved rounds, medians:
    decode      tokens/s of one greedy request (--decode-tokens tokens after a short prompt);
    16-way      tokens/s of 16 requests at once (--batch-tokens tokens each; "mixed": adapter a,
                adapter b and the base model in turn);
    prefill     tokens/s of one prompt of --prefill-tokens tokens (a new prompt each round).

Usage:
    .venv/bin/python benchmarks/lora.py [--rounds 3] [--rank 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer import LLM, LoRARequest, SamplingParams  # noqa: E402

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(directory: Path, llm: LLM, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter over every projection of `llm`'s model."""
    cfg = llm.config
    g = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    widths = {
        "q_proj": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
        "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
        "o_proj": (cfg.num_attention_heads * head_dim, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for block, names in PROJECTIONS.items():
            for name in names:
                n_in, n_out = widths[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.02
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [n for v in PROJECTIONS.values() for n in v]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def decode_rate(llm: LLM, loras: list, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 504, 3458, 282, 260, 1431, 30]} for _ in loras]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def prefill_rate(llm: LLM, lora, tokens: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)  # a prompt of its own: never in the prefix cache
    ids = torch.randint(100, 40000, (tokens,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=1)
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, params, lora_request=lora, use_tqdm=False)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plain = LLM()
    lora = LLM(enable_lora=True, max_loras=2)
    for llm in (plain, lora):
        llm.wait_compiled()  # figures are compiled ones where steps run compiled
        assert llm.engine.runner.decode_forward is not None, llm.engine.runner.compile_error
    with tempfile.TemporaryDirectory() as tmp:
        a = LoRARequest("a", 1, str(write_adapter(Path(tmp) / "a", lora, args.rank, 1)))
        b = LoRARequest("b", 2, str(write_adapter(Path(tmp) / "b", lora, args.rank, 2)))
        lora.engine.add_lora(a)
        lora.engine.add_lora(b)
        cases = {
            "no LoRA (default engine)": (plain, None),
            "enable_lora, base requests": (lora, None),
            "enable_lora, one adapter": (lora, a),
            "enable_lora, two adapters + base mixed": (lora, "mixed"),
        }
        results: dict[str, dict[str, list[float]]] = {k: {"decode": [], "16-way": [], "prefill": []} for k in cases}
        for r in range(args.rounds):
            for c, (name, (llm, which)) in enumerate(cases.items()):
                one = [a] if which == "mixed" else [which]
                sixteen = [[a, b, None][i % 3] for i in range(16)] if which == "mixed" else [which] * 16
                results[name]["decode"].append(decode_rate(llm, one, args.decode_tokens))
                results[name]["16-way"].append(decode_rate(llm, sixteen, args.batch_tokens))
                results[name]["prefill"].append(prefill_rate(llm, one[0], args.prefill_tokens, 1000 + 10 * r + c))
        base = {k: statistics.median(v) for k, v in results["no LoRA (default engine)"].items()}
        print(f"rank {args.rank}, all 7 projections of {lora.config.num_hidden_layers} layers; medians of {args.rounds} rounds, tokens/s (ratio to no LoRA)")
        print("| case | decode | 16-way | prefill (%d) |" % args.prefill_tokens)
        print("|---|---|---|---|")
        for name, res in results.items():
            cells = [f"{statistics.median(res[k]):.1f} ({statistics.median(res[k]) / base[k]:.2f}x)" for k in ("decode", "16-way", "prefill")]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
