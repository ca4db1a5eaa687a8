"""Structured outputs (xgrammar): decode speed of constrained vs unconstrained requests, schema
compile time, and the compiled-grammar cache hit.

    .venv/bin/python benchmarks/structured.py [--model PATH] [--concurrency 16] [--max-tokens 64] [--rounds 3] [--enforce-eager]

Each round runs `concurrency` unconstrained requests and then the same number constrained to a
JSON schema (an order list whose minimum length keeps every request decoding to max_tokens), all
greedy, through `LLM.generate` (one engine, continuous batching). Rounds alternate the order.
Tokens/s of each side are compared within a round, and the median ratio over rounds is reported
(the target is constrained >= 0.9x unconstrained). Compile times are measured on the engine's
own grammar cache: the first compile (which builds xgrammar's tokenizer info), then distinct
schemas (cache misses), then a repeated schema (cache hits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pangu_infer import LLM, SamplingParams
from pangu_infer.sampling_params import StructuredOutputsParams

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "minItems": 30,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "size": {"enum": ["S", "M", "L", "XL"]},
                },
                "required": ["name", "quantity", "size"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
    "additionalProperties": False,
}
PROMPTS = [
    "Write the order of a customer who buys clothes, as JSON.",
    "List what a family ordered from a clothing shop, as JSON.",
    "Give me a JSON order for a football team's kit.",
    "A shop order with many lines, in JSON, please.",
]


def typical_schema(i: int) -> dict:
    """A typical tool/response schema (nested object, array, enum), distinct per i (so a cache miss)."""
    return {
        "title": f"Person{i}",
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "email": {"type": "string"},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                          "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                        "required": ["street", "city"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
    }


def run(llm: LLM, n: int, max_tokens: int, constrained: bool) -> tuple[float, int]:
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (#{i})" for i in range(n)]
    if constrained:
        params = SamplingParams(temperature=0, max_tokens=max_tokens,
                                structured_outputs=StructuredOutputsParams(json=ORDER_SCHEMA))
    else:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, enforce_eager=args.enforce_eager, max_num_seqs=max(args.concurrency, 16))
    llm.wait_compiled()  # measure the compiled step, not the eager steps run while it builds
    grammars = llm.engine.grammars

    # compile times on the engine's own cache
    start = time.perf_counter()
    grammars.compile(StructuredOutputsParams(json=typical_schema(0)))
    first = time.perf_counter() - start
    misses, hits = [], []
    for i in range(1, 6):
        spec = StructuredOutputsParams(json=typical_schema(i))
        start = time.perf_counter()
        grammars.compile(spec)
        misses.append(time.perf_counter() - start)
        start = time.perf_counter()
        grammars.compile(StructuredOutputsParams(json=json.dumps(typical_schema(i))))  # same schema, as JSON text
        hits.append(time.perf_counter() - start)

    vocab = llm.config.vocab_size
    print(f"schema compile, vocabulary {vocab}: first (builds the tokenizer info) {first * 1e3:.1f} ms; "
          f"distinct schemas median {statistics.median(misses) * 1e3:.1f} ms (min {min(misses) * 1e3:.1f}, max {max(misses) * 1e3:.1f}); "
          f"cache hit median {statistics.median(hits) * 1e6:.1f} us", flush=True)
    print(f"model {llm.loaded.source}, {llm.engine.dtype}, {'eager' if args.enforce_eager else 'compiled decode'}; "
          f"{args.concurrency} concurrent greedy requests x {args.max_tokens} tokens", flush=True)
    run(llm, 2, 4, True)  # warm-up of both paths
    run(llm, 2, 4, False)
    print("round  unconstrained tok/s  constrained tok/s  ratio  tokens (u/c)", flush=True)
    rows = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        result = {}
        for constrained in order:
            seconds, tokens = run(llm, args.concurrency, args.max_tokens, constrained)
            result[constrained] = (seconds, tokens)
        (su, tu), (sc, tc) = result[False], result[True]
        rows.append((tu / su, tc / sc, (tc / sc) / (tu / su), tu, tc))
        u, c, ratio, tu, tc = rows[-1]
        print(f"{r:5d}  {u:19.1f}  {c:17.1f}  {ratio:5.2f}  {tu}/{tc}", flush=True)
    print(f"median ratio constrained / unconstrained: {statistics.median(r[2] for r in rows):.3f} (target >= 0.9)")
    print("grammar cache:", grammars.stats())


if __name__ == "__main__":
    main()
