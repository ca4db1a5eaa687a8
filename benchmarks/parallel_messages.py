"""Sending one step's inputs to the tensor-parallel workers, alone: pickled against tensor frames.

Two CPU processes in a gloo group, as rank 0 and a worker of a tensor-parallel start
(parallel/messages.py). For each step shape, the step's inputs built as ModelRunner builds them
(input ids, positions, AttentionBatch; a compiled decode step's single group of decodes, or one
prefill chunk), sent three ways, interleaved rep by rep:

- broadcast_object_list: the message pickled by torch.distributed, as every message went before;
- pickled frame: messages.send(pickled=True) (the driver's pickled_steps, what benchmarks/parallel.py
  --steps-as pickled runs): the same pickle in the frame (one broadcast where it fits, else two);
- tensor frame: messages.send, the default (one broadcast where the step fits, else two).

Timed per message (median us): rank 0's send (encode + broadcasts), the worker's receive (its
broadcasts + decode, the step's tensors ready), and a round trip (rank 0 sends, the worker receives
and answers with a one-int broadcast, which is timed alone and subtracted).

    .venv/bin/python benchmarks/parallel_messages.py --reps 300
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pangu_infer.models.layers import AttentionBatch, PrefillSlice
from pangu_infer.parallel import messages

CPU = torch.device("cpu")
WAYS = ("broadcast_object_list", "pickled frame", "tensor frame")


def step_inputs(kind: str, rows: int, context: int, block_size: int = 16) -> tuple:
    """(kind, (ids, positions, attn), lora rows) shaped as ModelRunner.run makes them."""
    ids = torch.randint(0, 1000, (rows,))
    if kind == "decode":  # `rows` sequences, each at `context` tokens
        pos = torch.full((rows,), context - 1, dtype=torch.long)
        table = torch.arange(rows * -(-context // block_size)).reshape(rows, -1)
        p = torch.arange(context)
        slots = table[:, p // block_size] * block_size + p % block_size
        valid = p[None, :] < torch.full((rows, 1), context)
        attn = AttentionBatch(slot_mapping=slots[:, -1].clone(), decode_slots=slots, decode_mask=valid[:, None, None, :])
    else:  # one prompt chunk of `rows` tokens
        pos = torch.arange(rows)
        attn = AttentionBatch(slot_mapping=torch.arange(rows))
        attn.prefills.append(PrefillSlice(0, rows, rows, torch.arange(rows), None))
    return (kind, (ids, pos, attn), None)


def _send(way: str, message: tuple, group) -> None:
    if way == "broadcast_object_list":
        dist.broadcast_object_list([message], src=0, group=group)
    else:
        messages.send(message, group, pickled=way == "pickled frame")


def _receive(way: str, group) -> tuple:
    if way == "broadcast_object_list":
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    return messages.receive(group, CPU)


def _worker(rank: int, port: int, shapes: list, reps: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    group = dist.new_group(backend="gloo")
    reply = torch.zeros(1, dtype=torch.int64)
    results: dict = {}
    for shape in shapes:
        message = step_inputs(*shape)
        times = {(way, what): [] for way in WAYS for what in ("send", "receive", "round trip")}
        times["reply", "alone"] = []
        for _ in range(reps):
            for way in WAYS:
                # one-way: the send on rank 0, the receive on the worker (it waits at the barrier first)
                dist.barrier(group=group)
                start = time.perf_counter()
                if rank == 0:
                    _send(way, message, group)
                    times[way, "send"].append(time.perf_counter() - start)
                else:
                    _receive(way, group)
                    times[way, "receive"].append(time.perf_counter() - start)
                # round trip: the worker answers once its step's tensors are ready
                dist.barrier(group=group)
                start = time.perf_counter()
                if rank == 0:
                    _send(way, message, group)
                else:
                    _receive(way, group)
                dist.broadcast(reply, src=1, group=group)
                times[way, "round trip"].append(time.perf_counter() - start)
            dist.barrier(group=group)
            start = time.perf_counter()
            dist.broadcast(reply, src=1, group=group)
            times["reply", "alone"].append(time.perf_counter() - start)
        results[shape] = {k: statistics.median(v) * 1e6 for k, v in times.items() if v}
    gathered = [None, None]
    dist.all_gather_object(gathered, results, group=group)
    if rank == 0:
        for shape in shapes:
            out[shape] = {**gathered[0][shape], **{k: v for k, v in gathered[1][shape].items() if k[1] == "receive"}}
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--context", type=int, default=64, help="decode steps' context (tokens)")
    args = p.parse_args()
    shapes = [("decode", 1, args.context), ("decode", 8, args.context), ("decode", 64, 1024), ("forward", 256, 0)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, shapes, args.reps, out), nprocs=2)
        out = dict(out)
    print(f"one step's inputs, rank 0 -> 1 worker (gloo, 2 processes, 1 thread each), median us of {args.reps}")
    print(f"{'step':24} {'way':>22} {'send':>7} {'receive':>8} {'round trip':>11}")
    for kind, rows, context in shapes:
        r = out[kind, rows, context]
        name = f"decode {rows} x ctx {context}" if kind == "decode" else f"prefill {rows} tokens"
        for way in WAYS:
            trip = r[way, "round trip"] - r["reply", "alone"]
            print(f"{name:24} {way:>22} {r[way, 'send']:7.0f} {r[way, 'receive']:8.0f} {trip:11.0f}")


if __name__ == "__main__":
    main()
