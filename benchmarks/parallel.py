"""MoGE tensor/expert parallel on CPU processes (gloo): step times, collective time, imbalance.

1. Engine steps. A random Pangu Pro MoE checkpoint (real tensor names, pangu_infer.loader.random) is
   loaded with `LLM(..., tensor_parallel_size=N)` for N = 1, 2, 4 in turn (one process group per
   process, so the sizes cannot interleave step by step; instead the whole N = 1, 2, 4 sequence
   repeats for --rounds rounds and each ratio is taken within its round). Timed: `LLMEngine.step()`
   for a prefill step (one prompt of --prompt-len tokens, prefix caching off) and for decode steps
   (--batch sequences, one token each). Broken out on rank 0: time inside the model's all-reduces
   (waiting for the slowest rank included) and time broadcasting each step's inputs to the workers.
   Every rank runs 1 thread, so N ranks use N cores: on this 2-core machine N = 4 oversubscribes.
   `--modes eager,compiled` times each size both ways: compiled decode steps on every rank (the
   default of a start with no flags; waited for before timing) against eager ones (--enforce-eager).
   `--steps-as tensors,pickled` times each both ways: the steps' inputs sent to the workers as
   tensors (the default, parallel/messages.py) against pickled (the driver's pickled_steps).
2. The combine collective of the MoGE layer, alone: each rank holds a partial [T, H] output (its
   expert groups plus its slice of the shared expert) and every rank needs the sum. Compared:
   all_reduce, reduce_scatter + all_gather, and all_to_all + local sum + all_gather.
3. Imbalance score IS = (max - min tokens per device) / tokens, per step, mean over steps and
   layers: MoGE routing against a plain global top-8 on the same router probabilities.

    .venv/bin/python benchmarks/parallel.py
    .venv/bin/python benchmarks/parallel.py --world-sizes 1,2 --modes eager,compiled --dtype auto --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_tokenizer import build_pangu_tokenizer  # noqa: E402  (works without pytest)

from pangu_infer import LLM, SamplingParams  # noqa: E402
from pangu_infer.loader.random import pangu_moge_config, random_state_dict, write_checkpoint  # noqa: E402


def build_model(directory: Path, args: argparse.Namespace) -> None:
    special = build_pangu_tokenizer(directory)
    cfg = pangu_moge_config(
        vocab_size=special["vocab_size"],
        eos_token_id=special["eos_token_id"],
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        moe_intermediate_size=args.hidden // 4,
        shared_expert_intermediate_size=args.hidden,
        torch_dtype="bfloat16",
    )
    write_checkpoint(str(directory), cfg, random_state_dict(cfg, dtype=torch.bfloat16))


def time_steps(model_dir: Path, world_size: int, args: argparse.Namespace, mode: str = "eager", steps_as: str = "tensors") -> dict:
    llm = LLM(
        str(model_dir), dtype=None if args.dtype == "auto" else args.dtype, device="cpu", tensor_parallel_size=world_size,
        enable_prefix_caching=False, kv_cache_memory=256 << 20, max_num_batched_tokens=args.prompt_len,
        enforce_eager=mode == "eager",
    )
    if mode == "compiled" and not llm.wait_compiled():  # every rank's compiled decode step
        raise SystemExit(f"compiled decode did not build: {llm.engine.runner.compile_error}")
    if llm.parallel:
        llm.parallel.pickled_steps = steps_as == "pickled"
    engine = llm.engine
    state = llm.parallel.state if llm.parallel else None
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 2, ignore_eos=True)

    def measure(step_kind: str) -> tuple[float, float, float]:
        comm0 = state.collective_seconds if state else 0.0
        bcast0 = llm.parallel.broadcast_seconds if llm.parallel else 0.0
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        comm = (state.collective_seconds - comm0) if state else 0.0
        bcast = (llm.parallel.broadcast_seconds - bcast0) if llm.parallel else 0.0
        return wall, comm, bcast

    prefill = []
    for i in range(args.prefill_reps):
        ids = [(7 * i + j) % 900 + 21 for j in range(args.prompt_len)]
        engine.add_request(f"p{i}", ids, SamplingParams(temperature=0.0, max_tokens=1))
        prefill.append(measure("prefill"))
        while engine.has_unfinished_requests():
            engine.step()
    for b in range(args.batch):
        engine.add_request(f"d{b}", [(13 * b + j) % 900 + 21 for j in range(32)], params)
    engine.step()  # the batch's prefill
    decode = [measure("decode") for _ in range(args.decode_steps)]
    while engine.has_unfinished_requests():
        engine.step()
    stats = llm.moe_stats()
    llm.shutdown()

    def med(rows, i):
        return statistics.median(r[i] for r in rows) * 1e3

    return {
        "prefill": (med(prefill, 0), med(prefill, 1), med(prefill, 2)),
        "decode": (med(decode, 0), med(decode, 1), med(decode, 2)),
        "stats": stats,
    }


def _combine_worker(rank: int, world: int, port: int, shapes: list, reps: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    for t, h in shapes:
        partial = torch.randn(t, h, dtype=torch.bfloat16)
        want = partial.clone()
        dist.all_reduce(want)

        def all_reduce():
            y = partial.clone()
            dist.all_reduce(y)
            return y

        def rs_ag():
            mine = torch.empty(t // world, h, dtype=partial.dtype)
            dist.reduce_scatter_single(mine, partial)
            y = torch.empty_like(partial)
            dist.all_gather_single(y, mine)
            return y

        def a2a_ag():
            received = torch.empty_like(partial)  # row block r of every rank's partial goes to rank r
            dist.all_to_all_single(received, partial)
            mine = received.view(world, t // world, h).sum(0)
            y = torch.empty_like(partial)
            dist.all_gather_single(y, mine)
            return y

        for name, fn in (("all_reduce", all_reduce), ("reduce_scatter+all_gather", rs_ag), ("all_to_all+all_gather", a2a_ag)):
            torch.testing.assert_close(fn(), want, atol=0.1, rtol=0.05)  # same sum up to bf16 order
            times = []
            for _ in range(reps):
                dist.barrier()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            results[(t, h, name)] = statistics.median(times) * 1e6
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def time_combine(world: int, shapes: list, reps: int) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_combine_worker, args=(world, port, shapes, reps, out), nprocs=world)
        return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per decode step")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prefill-reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--combine-reps", type=int, default=30)
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (auto: the engine's default for this CPU)")
    p.add_argument("--world-sizes", default="1,2,4", help="rank counts, the first the reference (step ms vs it)")
    p.add_argument("--modes", default="eager", help="eager and/or compiled (the compiled decode step on every rank, "
                   "waited for before timing), the first the reference of 'vs eager'")
    p.add_argument("--steps-as", default="tensors", help="tensors and/or pickled: how rank 0 sends each step's inputs "
                   "to the workers (parallel/messages.py); each a table of its own")
    args = p.parse_args()
    torch.set_num_threads(1)  # workers copy rank 0's thread count: one core per rank

    sizes = [int(n) for n in args.world_sizes.split(",")]
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        build_model(model_dir, args)
        ways = args.steps_as.split(",")
        rounds = [{(n, m, w): time_steps(model_dir, n, args, m, w) for n in sizes for m in modes for w in ways}
                  for _ in range(args.rounds)]

    print(f"MoGE model: hidden {args.hidden}, {args.layers} layers, 64 experts of width {args.hidden // 4} in 8 groups, "
          f"shared expert {args.hidden}, 8/4 heads, {args.dtype}; decode batch {args.batch}, prefill {args.prompt_len} tokens")
    for w in ways:
        if len(ways) > 1:
            print(f"\nsteps' inputs sent as {w}:")
        print(f"{'step':8} {'ranks':>5} {'mode':>8} {'step ms':>9} {'vs 1 rank':>9} {'vs eager':>9} {'all-reduce ms':>14} {'broadcast ms':>13}")
        for kind in ("prefill", "decode"):
            for n in sizes:
                for m in modes:
                    walls = [r[n, m, w][kind][0] for r in rounds]
                    ratio = statistics.median(r[n, m, w][kind][0] / r[sizes[0], m, w][kind][0] for r in rounds)
                    vs_eager = statistics.median(r[n, m, w][kind][0] / r[n, modes[0], w][kind][0] for r in rounds)
                    comm = statistics.median(r[n, m, w][kind][1] for r in rounds)
                    bcast = statistics.median(r[n, m, w][kind][2] for r in rounds)
                    print(f"{kind:8} {n:>5} {m:>8} {statistics.median(walls):9.2f} {ratio:9.2f} {vs_eager:9.2f} {comm:14.2f} {bcast:13.2f}")
    if len(ways) > 1:
        print(f"\nstep ms {ways[1]} / {ways[0]}, median of the rounds' ratios:")
        for kind in ("prefill", "decode"):
            for n in sizes[1:] if sizes[0] == 1 else sizes:
                for m in modes:
                    ratio = statistics.median(r[n, m, ways[1]][kind][0] / r[n, m, ways[0]][kind][0] for r in rounds)
                    print(f"{kind:8} {n:>5} {m:>8} {ratio:9.2f}")
    if 4 not in sizes:
        return

    stats = rounds[0][4, modes[0], ways[0]]["stats"]
    ranks = stats["ranks"]
    print("\nimbalance score (mean over steps and layers), same router probabilities:")
    print(f"{'devices':>7} {'MoGE':>6} {'global top-8':>13}")
    for d in (2, 4, 8):
        print(f"{d:>7} {stats['imbalance_score'][d]:6.3f} {stats['global_topk_imbalance_score'][d]:13.3f}")
    print(f"tokens per rank at 4 ranks, layer 0, whole run: MoGE {ranks['rank_tokens'][0]} "
          f"(counted on each rank), global top-8 {ranks['global_topk_rank_tokens'][0]}")

    shapes = [(8, args.hidden), (args.prompt_len, args.hidden)]
    print("\ncombine collective alone (bf16 [T, H] partial sums -> the sum on every rank), median us:")
    print(f"{'ranks':>5} {'T':>5} {'all_reduce':>11} {'reduce_scatter+all_gather':>26} {'all_to_all+all_gather':>22}")
    for n in (2, 4):
        res = time_combine(n, shapes, args.combine_reps)
        for t, h in shapes:
            row = [res[(t, h, name)] for name in ("all_reduce", "reduce_scatter+all_gather", "all_to_all+all_gather")]
            print(f"{n:>5} {t:>5} {row[0]:11.0f} {row[1]:26.0f} {row[2]:22.0f}")


if __name__ == "__main__":
    main()
