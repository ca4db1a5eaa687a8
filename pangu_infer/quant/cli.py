"""`pangu-infer quantize --model DIR --out DIR --method int8|int4 [--group-size N]`: write a pre-quantized checkpoint."""

from __future__ import annotations

import argparse
import sys
import time

from pangu_infer.quant.formats import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, METHODS, QuantizationConfig, QuantizationError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="safetensors model folder to quantize")
    p.add_argument("--out", required=True, help="new (or empty) folder for the quantized checkpoint")
    p.add_argument("--method", required=True, choices=METHODS, help="int8: per output channel; int4: grouped, with zero points")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help=f"int4 weights per scale and zero: {', '.join(map(str, INT4_GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    from pangu_infer.quant.checkpoint import write_quantized_checkpoint

    if args.method == "int8" and args.group_size is not None:
        raise QuantizationError(f"--group-size {args.group_size} applies to int4 only; int8 has one scale per output channel")
    config = QuantizationConfig(args.method, DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size)
    start = time.perf_counter()
    writer = write_quantized_checkpoint(args.model, args.out, config)
    print(
        f"wrote {args.out}: {writer.quantized} weights as {config.method}"
        + (f" (group size up to {config.group_size})" if config.method == "int4" else "")
        + f", {writer.total_bytes / 2**20:.1f} MiB in {len(writer.shards)} shard(s), {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0
