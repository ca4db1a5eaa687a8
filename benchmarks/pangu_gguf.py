"""Build issue 13's openPangu-Embedded-shaped GGUF the way a llama.cpp user would make one.

A random model of the openPangu-Embedded 1B width (hidden 1536, 26 layers, 12/6 heads of 128,
MLP 4800, q/k/v/o biases) is written as an HF folder (Llama architecture with `attention_bias`,
the layout llama.cpp reads Pangu's weights in), with the demo model's tokenizer (SmolLM2's
49152-token BPE, taken from its GGUF by transformers): 0.91 B parameters with the untied
head (0.77 B without embedding and head); or
`--vocab 153376` for the real vocabulary's size with a word-level tokenizer. Then llama.cpp's own
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
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, write_checkpoint  # noqa: E402

SHAPE = dict(hidden_size=1536, num_hidden_layers=26, num_attention_heads=12, num_key_value_heads=6, intermediate_size=4800)
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def write_hf_folder(out: Path, vocab: int) -> None:
    """The random Pangu-shaped checkpoint as an HF Llama folder (q/k/v/o biases), with a tokenizer."""
    if vocab == 0:  # the demo model's tokenizer, exported by transformers from its GGUF
        from transformers import AutoTokenizer

        demo = Path(demo_model_path())
        tok = AutoTokenizer.from_pretrained(demo.parent, gguf_file=demo.name)
        tok.save_pretrained(out)
        vocab, eos = len(tok), tok.eos_token_id
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from throughput import write_wordlevel_tokenizer

        write_wordlevel_tokenizer(out, vocab)
        eos = 2
    config = pangu_dense_config(vocab_size=vocab, eos_token_id=eos, max_position_embeddings=4096, **SHAPE)
    tensors = random_state_dict(config, seed=0, dtype=torch.bfloat16)
    write_checkpoint(str(out), config, tensors)
    # llama.cpp's converter knows Pangu's dense layout as Llama with attention biases.
    config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    n = sum(t.numel() for t in tensors.values())
    print(f"HF folder: {n / 1e9:.2f} B parameters, vocab {vocab}", file=sys.stderr)


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
    ap.add_argument("--vocab", type=int, default=0, help="0: the demo model's tokenizer (49152); else a word-level vocabulary this size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    converter = args.llama_cpp_src / "convert_hf_to_gguf.py"
    if not converter.is_file():
        ap.error(f"--llama-cpp-src {args.llama_cpp_src}: no convert_hf_to_gguf.py there")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:
        hf, f16 = Path(tmp) / "hf", Path(tmp) / "model.f16.gguf"
        hf.mkdir()
        write_hf_folder(hf, args.vocab)
        subprocess.run([sys.executable, str(converter), str(hf), "--outfile", str(f16), "--outtype", "f16"], check=True)
        quantize(f16, args.out, args.type, args.threads)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
