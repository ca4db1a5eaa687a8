"""Build issue 13's openPangu-Embedded-shaped GGUF the way a llama.cpp user would make one.

A random model of the openPangu-Embedded 1B width (hidden 1536, 26 layers, 12/6 heads of 128,
MLP 4800, q/k/v/o biases) is written as an HF folder (Llama architecture with `attention_bias`,
the layout llama.cpp reads Pangu's weights in), with the demo model's tokenizer (SmolLM2's
49152-token BPE, taken from its GGUF by transformers): 0.91 B parameters with the untied
head (0.77 B without embedding and head); `--vocab 153376` pads the embedding and head to the real
vocabulary's size (llama.cpp's converter fills the ids past the tokenizer with unused [PAD] tokens). `--shape 7b` takes
openPangu-Embedded-7B's own widths (hidden 4096, 34 layers, 32/8 heads, MLP 12800: 8.0 B
parameters with `--vocab 153376`; the F16 file needs 16 GB of disk beside the output). Then llama.cpp's own
`convert_hf_to_gguf.py` writes an F16 GGUF and llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, from llama-cpp-python) turns it into --type (Q4_0 by default).

    .venv/bin/python benchmarks/pangu_gguf.py --llama-cpp-src DIR --out pangu-0.9b.Q4_0.gguf

DIR is a llama.cpp source tree with convert_hf_to_gguf.py, e.g. `vendor/llama.cpp` of the
llama-cpp-python sdist (`pip download --no-deps --no-binary :all: llama-cpp-python`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer.loader import demo_model_path  # noqa: E402
from pangu_infer.loader.random import pangu_dense_config, random_tensors  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=1536, num_hidden_layers=26, num_attention_heads=12, num_key_value_heads=6, intermediate_size=4800,
               max_position_embeddings=4096),
    # openPangu-Embedded-7B's own config.json: 6.8 B parameters besides embedding and head
    "7b": dict(hidden_size=4096, num_hidden_layers=34, num_attention_heads=32, num_key_value_heads=8, intermediate_size=12800,
               max_position_embeddings=32768),
}
SHARD_BYTES = 2 << 30
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def write_hf_folder(out: Path, vocab: int, shape: str = "1b") -> dict:
    """The random Pangu-shaped checkpoint as an HF Llama folder (q/k/v/o biases), with a tokenizer;
    written shard by shard, never held whole (the 7B's is 16 GB). Returns the Pangu config."""
    # the demo model's tokenizer, exported by transformers from its GGUF; a larger --vocab pads the
    # embedding and head (llama.cpp's converter names the ids past the tokenizer's [PAD<id>], unused)
    from transformers import AutoTokenizer

    demo = Path(demo_model_path())
    tok = AutoTokenizer.from_pretrained(demo.parent, gguf_file=demo.name)
    tok.save_pretrained(out)
    if vocab and vocab < len(tok):
        raise SystemExit(f"--vocab {vocab}: at least the demo tokenizer's {len(tok)}")
    vocab, eos = max(vocab, len(tok)), tok.eos_token_id
    config = pangu_dense_config(vocab_size=vocab, eos_token_id=eos, **SHAPES[shape])
    n, shards, part, size = 0, [], {}, 0
    for name, t in random_tensors(config, seed=0, dtype=torch.bfloat16):
        part[name], size, n = t, size + t.numel() * t.element_size(), n + t.numel()
        if size >= SHARD_BYTES:
            shards.append(list(part))
            save_file(part, str(out / f"part-{len(shards)}.safetensors"))
            part, size = {}, 0
    if part:
        shards.append(list(part))
        save_file(part, str(out / f"part-{len(shards)}.safetensors"))
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / fname)
        weight_map |= dict.fromkeys(names, fname)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    # llama.cpp's converter knows Pangu's dense layout as Llama with attention biases.
    llama = config | {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(llama, indent=2))
    print(f"HF folder: {n / 1e9:.2f} B parameters, vocab {vocab}", file=sys.stderr)
    return config | {"torch_dtype": "bfloat16"}


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed on {src}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", required=True, type=Path, help="llama.cpp source tree with convert_hf_to_gguf.py")
    ap.add_argument("--out", required=True, type=Path, help="the quantized GGUF to write")
    ap.add_argument("--type", default="Q4_0", choices=sorted(QUANT_TYPES), help="llama.cpp quantization (default Q4_0)")
    ap.add_argument("--vocab", type=int, default=0, help="0: the demo tokenizer's 49152; more: the embedding and head padded to this many ids")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES),
                    help="1b: issue 13's 0.9 B openPangu-Embedded-shaped model; 7b: openPangu-Embedded-7B's own widths (use --vocab 153376)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-hf", type=Path, default=None, metavar="DIR",
                    help="also keep the safetensors checkpoint in DIR, with openPangu-Embedded's own config.json (as a user downloads it)")
    args = ap.parse_args()
    converter = args.llama_cpp_src / "convert_hf_to_gguf.py"
    if not converter.is_file():
        ap.error(f"--llama-cpp-src {args.llama_cpp_src}: no convert_hf_to_gguf.py there")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        hf, f16 = args.keep_hf or Path(tmp) / "hf", Path(tmp) / "model.f16.gguf"
        hf.mkdir(parents=True, exist_ok=True)
        pangu_config = write_hf_folder(hf, args.vocab, args.shape)
        subprocess.run([sys.executable, str(converter), str(hf), "--outfile", str(f16), "--outtype", "f16"], check=True)
        if args.keep_hf:
            (hf / "config.json").write_text(json.dumps(pangu_config, indent=2))
        quantize(f16, args.out, args.type, args.threads)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
