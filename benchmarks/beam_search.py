"""Beam search (LLM.beam_search, vLLM's) against HF transformers' `generate(num_beams=...)`, on the
demo model (SmolLM2-135M-Instruct, the Q4_1 GGUF), in one process.

Engines and what they run:
- this engine, no flags (`LLM(path)`: the file's int4 blocks kept, compiled decode, waited for);
- this engine on the same file dequantized to float32 (`quantization="none", dtype="float32"`),
  whose beams are compared token for token with transformers' (same weights, same arithmetic
  up to summation order: they agree where no two candidates are near ties);
- transformers, the same file dequantized (`from_pretrained(dir, gguf_file=...)`), float32.

Per engine: seconds for one beam search of --beams beams x --tokens tokens on one prompt (every
beam runs to the end: `ignore_eos`, transformers with no EOS id), and for a greedy generation of
the same length (the cost of one beam); medians of --rounds, the engines alternating each round.

    .venv/bin/python benchmarks/beam_search.py [--beams 4] [--tokens 32] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pangu_infer import LLM, BeamSearchParams, SamplingParams  # noqa: E402
from pangu_infer.loader import demo_model_path  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ours(llm: LLM, ids: list[int], beams: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    start = time.perf_counter()
    out = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=beams, max_tokens=tokens, ignore_eos=True))[0]
    search = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    greedy = time.perf_counter() - start
    return search, greedy, [s.output_token_ids for s in out.sequences]


def transformers_run(model, ids: list[int], beams: int, tokens: int) -> tuple[float, float, list[list[int]]]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(x, num_beams=beams, num_return_sequences=beams, do_sample=False, max_new_tokens=tokens,
                             length_penalty=1.0, eos_token_id=None, pad_token_id=0)
        search = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, do_sample=False, max_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
        greedy = time.perf_counter() - start
    return search, greedy, [row[len(ids):].tolist() for row in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: this engine's choice)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    path = demo_model_path()
    default = LLM(path, threads=args.threads)
    if not default.wait_compiled():
        print(f"compiled decode off: {default.engine.runner.compile_error}", file=sys.stderr)
    exact = LLM(path, quantization="none", dtype="float32", threads=args.threads)
    exact.wait_compiled()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # no beam ends (ours: ignore_eos; a min length would renormalize without EOS)
    ids = default.tokenizer.encode(PROMPT)
    runs: dict[str, list[tuple[float, float]]] = {"this engine, no flags": [], "this engine, float32": [], "transformers, float32": []}
    beams: dict[str, list[list[int]]] = {}
    ours(default, ids, args.beams, 4)  # (first steps: prefill conversions, graphs of every batch size)
    ours(exact, ids, args.beams, 4)
    for _ in range(args.rounds):
        for name, run in (("this engine, no flags", lambda: ours(default, ids, args.beams, args.tokens)),
                          ("this engine, float32", lambda: ours(exact, ids, args.beams, args.tokens)),
                          ("transformers, float32", lambda: transformers_run(hf, ids, args.beams, args.tokens))):
            search, greedy, found = run()
            runs[name].append((search, greedy))
            beams[name] = found
    print(f"demo model (SmolLM2-135M Q4_1), prompt of {len(ids)} tokens, {args.beams} beams x {args.tokens} tokens, "
          f"torch threads {torch.get_num_threads()}, medians of {args.rounds}")
    print(f"{'engine':24} {'beam search s':>14} {'greedy s':>9} {'beam/greedy':>12} {'search vs transformers':>23}")
    hf_search = statistics.median(s for s, _ in runs["transformers, float32"])
    for name, rows in runs.items():
        search, greedy = statistics.median(s for s, _ in rows), statistics.median(g for _, g in rows)
        print(f"{name:24} {search:14.3f} {greedy:9.3f} {search / greedy:12.2f} {search / hf_search:23.2f}")
    same = sum(a == b for a, b in zip(beams["this engine, float32"], beams["transformers, float32"]))
    print(f"float32 beams equal to transformers' (same rank): {same} of {args.beams}")


if __name__ == "__main__":
    main()
