"""A quantized GGUF kept quantized at load (the default) against the same file dequantized to bf16.

Four measurements on one GGUF file (the demo model's SmolLM2-135M Q4_1 by default, `--gguf PATH`
for another; `--make-pangu-q4_0 OUT` first writes an openPangu-Embedded-1B-shaped Q4_0 file with
the gguf package's own writer and Q4_0 quantizer, `--layers` deep):

- load: wall time and peak RSS of `load_model` in a fresh process, `--quantization auto` (kept;
  with the converted-model cache off, then a first and a second load with it on, in a fresh cache
  folder) and `none` (dequantized to bf16), with the RSS of the same process after its imports
  (baseline); the ratio reported is (peak - baseline) / file size;
- perplexity of pangu_infer/data/alice_ch1.txt, kept vs dequantized, bf16 activations;
- prefill of --prompt-len tokens (one forward of the whole prompt, as the engine's prefill step
  runs it; bf16 weights oneDNN-packed as LLM packs them; the quantized weights' prefill
  conversions compiled as LLM's background compile does, unless --eager-convert): kept int4 (and
  `int8`, re-quantized per row) against bf16, alternating rounds, medians, and their ratio;
  `--plain-too` / `--amx-too` add the same quantized models on the plain-W^T path / with
  quant/amx.py's AMX kernel forced on and off.

    .venv/bin/python benchmarks/gguf_quant.py
    .venv/bin/python benchmarks/gguf_quant.py --make-pangu-q4_0 /tmp/pangu-q4_0.gguf --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PASSAGE = ROOT / "pangu_infer" / "data" / "alice_ch1.txt"


def _load_child(path: str, quantization: str) -> None:
    """Run in a fresh process: print one JSON line with load seconds and RSS figures."""
    import resource

    import torch

    from pangu_infer.loader import load_model

    def rss_now() -> int:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    base = rss_now()
    t = time.perf_counter()
    load_model(path, torch.bfloat16, torch.device("cpu"), load_tokenizer=False, quantization=quantization)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, "base": base, "after": rss_now()}))


def measure_load(path: str, quantization: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child-load", path, "--quantization", quantization],
        check=True, capture_output=True, text=True, env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def perplexity(loaded) -> float:
    import torch

    ids = torch.tensor(loaded.tokenizer.encode(PASSAGE.read_text()))
    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None))
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:]).exp())


def make_pangu_q4_0(out: str, layers: int) -> None:
    """openPangu-Embedded-1B shapes (hidden 1536, MLP 4800, 12/6 heads, q/k/v/o biases), random
    weights, every matrix Q4_0 (gguf's quantizer) except the head, Q8_0 (llama.cpp's Q4_0 files keep
    the head at 6 bits), with the demo model's vocabulary."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import gguf

    from fixtures_gguf import write_gguf  # noqa: F401  (the same writer as the tests)
    from pangu_infer.loader import demo_model_path
    from pangu_infer.loader.gguf import read_gguf

    demo = read_gguf(demo_model_path())
    h, inter, heads, kv, hd = 1536, 4800, 12, 6, 128
    vocab = demo.config["vocab_size"]
    g = torch.Generator().manual_seed(0)
    w = gguf.GGUFWriter(out, "pangu-embedded")
    arch = "pangu-embedded"
    for key, value in {
        "context_length": 4096, "embedding_length": h, "block_count": layers, "feed_forward_length": inter,
        "attention.head_count": heads, "attention.head_count_kv": kv, "rope.dimension_count": hd,
        "attention.key_length": hd, "attention.value_length": hd, "vocab_size": vocab,
    }.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 16000000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    spec = demo.tokenizer_spec
    w.add_string("tokenizer.ggml.model", spec["model"])
    w.add_string("tokenizer.ggml.pre", spec["pre"] or "default")
    w.add_array("tokenizer.ggml.tokens", spec["tokens"])
    w.add_array("tokenizer.ggml.token_type", list(spec["token_types"]))
    w.add_array("tokenizer.ggml.merges", spec["merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", spec["bos_token_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", spec["eos_token_id"])

    def mat(n: int, k: int, qtype) -> None:
        x = (torch.randn(n, k, generator=g) / k**0.5).numpy()
        return gguf.quants.quantize(x, qtype)

    Q = gguf.GGMLQuantizationType
    w.add_tensor("token_embd.weight", mat(vocab, h, Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    w.add_tensor("output.weight", mat(vocab, h, Q.Q8_0), raw_dtype=Q.Q8_0)
    for i in range(layers):
        for name, (n, k) in {"attn_q": (heads * hd, h), "attn_k": (kv * hd, h), "attn_v": (kv * hd, h),
                             "attn_output": (h, heads * hd), "ffn_gate": (inter, h), "ffn_up": (inter, h),
                             "ffn_down": (h, inter)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", mat(n, k, Q.Q4_0), raw_dtype=Q.Q4_0)
            if name.startswith("attn_"):
                w.add_tensor(f"blk.{i}.{name}.bias", np.zeros(n, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the demo model)")
    p.add_argument("--make-pangu-q4_0", default=None, metavar="OUT", help="write a Pangu-1B-shaped Q4_0 file first and use it")
    p.add_argument("--layers", type=int, default=4, help="layers of the file --make-pangu-q4_0 writes")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--dtype", default="auto", help="activations (and the unquantized peer's weights): auto = LLM's default here")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: load, ppl, prefill")
    p.add_argument("--plain-too", action="store_true",
                   help="also time each quantized model with PANGU_INFER_PACKED_PREFILL=0 (products on a plain W^T), interleaved")
    p.add_argument("--amx-too", action="store_true",
                   help="also time each quantized model with PANGU_INFER_AMX_PREFILL=1 and =0 (quant/amx.py's kernel on and off), interleaved")
    p.add_argument("--eager-convert", action="store_true",
                   help="leave the prefill conversions of quantized weights eager (as before quant/prefill.py)")
    p.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_load:
        _load_child(args.child_load, args.quantization)
        return 0

    import torch

    from pangu_infer.device import resolve_dtype
    from pangu_infer.loader import demo_model_path, load_model
    from pangu_infer.models.packed import can_pack, pack_linears
    from pangu_infer.quant import amx
    from pangu_infer.quant.modules import prepare_prefill
    from pangu_infer.quant.tuning import convert_min_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make_pangu_q4_0:
        t = time.perf_counter()
        make_pangu_q4_0(args.make_pangu_q4_0, args.layers)
        print(f"wrote {args.make_pangu_q4_0} in {time.perf_counter() - t:.0f} s")
    path = args.make_pangu_q4_0 or args.gguf or demo_model_path()
    skip = set(filter(None, args.skip.split(",")))
    size = os.path.getsize(path)
    print(f"file {path}: {size / 1e6:.1f} MB; {torch.get_num_threads()} threads; "
          f"int4 converts from {convert_min_rows('int4')} rows, int8 from {convert_min_rows('int8')} (this machine)")

    if "load" not in skip:
        print("| load | seconds | peak RSS MB | RSS after imports MB | (peak - imports) / file |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as folder:
            cache_on = {"PANGU_INFER_MODEL_CACHE": "1", "PANGU_INFER_MODEL_CACHE_DIR": folder}
            for label, q, env in (
                ("auto, model cache off", "auto", {"PANGU_INFER_MODEL_CACHE": "0"}),
                ("auto, first load (converts, writes and checks the model cache: the default)", "auto", cache_on),
                ("auto, second load (maps the model cache)", "auto", cache_on),
                ("none (bf16)", "none", {"PANGU_INFER_MODEL_CACHE": "0"}),
            ):
                r = measure_load(path, q, env)
                print(f"| {label} | {r['seconds']:.1f} | {r['peak'] / 1e6:.0f} | {r['base'] / 1e6:.0f} | "
                      f"{(r['peak'] - r['base']) / size:.2f}x |")

    if {"ppl", "prefill"} <= skip:
        return 0
    cpu = torch.device("cpu")

    def amx_shapes(model) -> str:
        """The weight shapes whose many-row products run quant/amx.py's kernel (measured per machine)."""
        from pangu_infer.quant.modules import PackedWeight

        ws = [m for m in model.modules() if isinstance(m, PackedWeight) and m.kernel in ("int8", "int4_vnni")]
        chosen = sorted({f"{m.method} {m.out_features}x{m.in_features}" for m in ws if amx.use(m.amx_prefill)})
        return f"{len([m for m in ws if amx.use(m.amx_prefill)])} of {len(ws)} weights ({', '.join(chosen) or 'none'})"

    models = {}
    # the activations' dtype LLM picks on this machine (bf16, or fp32 where the CPU only emulates bf16),
    # and the same file dequantized to it as the peer
    dtype = resolve_dtype(args.dtype, cpu)
    NONE = f"{str(dtype).replace('torch.', '').replace('bfloat16', 'bf16')} (none)"
    for name, q in (("kept (auto)", "auto"), ("int8", "int8"), (NONE, "none")):
        loaded = load_model(path, dtype, cpu, load_tokenizer=True, quantization=q)
        if can_pack(cpu, dtype):
            pack_linears(loaded.model)  # what LLM does after loading
        if not args.eager_convert:  # what LLM's background compile does (quant/prefill.py)
            t = time.perf_counter()
            why = prepare_prefill(loaded.model)
            print(f"{name}: prefill conversions compiled in {time.perf_counter() - t:.1f} s"
                  + (f" ({why})" if why else "") + f"; AMX kernel (quant/amx.py) chosen for {amx_shapes(loaded.model)}; int4 converts from {convert_min_rows('int4')} rows, "
                  f"int8 from {convert_min_rows('int8')}")
        models[name] = loaded

    if "ppl" not in skip:
        ppl = {name: perplexity(m) for name, m in models.items()}
        base = ppl[NONE]
        print(f"| weights | perplexity (alice_ch1) | vs {NONE} |")
        print("|---|---|---|")
        for name, v in ppl.items():
            print(f"| {name} | {v:.3f} | {100 * (v / base - 1):+.2f}% |")

    if "prefill" not in skip:
        ids = torch.randint(2, 30000, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(args.prompt_len)
        # Each quantized model also runs with its many-row products converting to a plain W^T
        # (--plain-too: PANGU_INFER_PACKED_PREFILL=0, the path before the packed one) and with
        # quant/amx.py's kernel forced on and off (--amx-too), interleaved in the same rounds, so
        # that the paths are compared under the same load.
        from pangu_infer.quant import amx as _amx
        from pangu_infer.quant import prefill as _prefill

        runs = []
        for name, m in models.items():
            runs.append((name, m, {}))
            if args.plain_too and name != NONE:
                runs.append((f"{name}, plain W^T", m, {_prefill.PACKED_ENV: "0", _amx.ENV: "0"}))
            if args.amx_too and name != NONE:
                runs.append((f"{name}, AMX kernel", m, {_amx.ENV: "1"}))
                runs.append((f"{name}, packed", m, {_amx.ENV: "0"}))
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        before = {k: os.environ.get(k) for k in (_prefill.PACKED_ENV, _amx.ENV)}

        def packed_env(env):
            for k, v in before.items():
                value = env.get(k, v)
                os.environ.pop(k, None) if value is None else os.environ.__setitem__(k, value)

        with torch.inference_mode():
            for _, m, env in runs:
                packed_env(env)
                m.model(ids, pos, None)  # warm-up
            for _ in range(args.rounds):
                for name, m, env in runs:
                    packed_env(env)
                    t = time.perf_counter()
                    m.model(ids, pos, None)
                    times[name].append(time.perf_counter() - t)
            packed_env({})
        med = {name: statistics.median(v) for name, v in times.items()}
        base = med[NONE]
        print(f"| prefill {args.prompt_len} tokens | median s ({args.rounds} alternating rounds) | tokens/s | vs {NONE} |")
        print("|---|---|---|---|")
        for name, v in med.items():
            print(f"| {name} | {v:.3f} | {args.prompt_len / v:.0f} | {base / v:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
