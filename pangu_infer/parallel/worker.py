"""A tensor-parallel worker (ranks 1..N-1): load this rank's shard, then replay rank 0's forwards
(with each step's LoRA rows), and install each LoRA adapter rank 0 installs, in the same slot.

Spawned: `python -m pangu_infer.parallel.worker FD`, where FD is this process's end of a socket pair
with rank 0 (see launch.py). Under torchrun, launch.py calls `serve` on ranks != 0 directly.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from pangu_infer.device import distributed_backend, rank_device
from pangu_infer.loader import LoadedModel, load_serving_model
from pangu_infer.lora import read_lora_adapter
from pangu_infer.models.dense import DecoderForCausalLM
from pangu_infer.models.lora import enable_lora
from pangu_infer.parallel import messages
from pangu_infer.parallel.group import join_group
from pangu_infer.parallel.state import ParallelState, building_shard


@dataclass(frozen=True)
class ShardLoad:
    """What every rank loads, and how: the same on all of them (each keeps its own shard)."""

    path: str
    dtype: torch.dtype
    quantization: Any = None  # as LLM(quantization=...): "auto" keeps a GGUF file's blocks quantized
    offload_experts: bool = False
    bf16_weights: bool = True  # False with batch_invariant, as in one process (LLM.__init__)
    tokenizer: bool = True  # False where LLM(tokenizer=...) names another: the model's own is never read
    dummy: bool = False  # load_format "dummy": random weights from the config (the same on every rank)

    def run(self, device: torch.device, load_tokenizer: bool = False) -> LoadedModel:
        """This rank's shard (call inside `building_shard`)."""
        return load_serving_model(
            self.path, self.dtype, device, load_tokenizer and self.tokenizer, quantization=self.quantization, offload_experts=self.offload_experts,
            bf16_weights=self.bf16_weights, dummy=self.dummy,
        )


@dataclass
class WorkerArgs:
    rank: int
    world_size: int
    load: ShardLoad
    device: torch.device
    init_method: str
    num_threads: int


def run_spawned_worker(conn: Connection) -> None:
    """The body of `python -m pangu_infer.parallel.worker`: load this rank's shard, report, serve."""
    args: WorkerArgs = conn.recv()
    torch.set_num_threads(args.num_threads)
    state = ParallelState(args.rank, args.world_size)
    try:
        device = rank_device(args.device, args.rank)
        with building_shard(state):
            loaded = args.load.run(device)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    conn.send(("loaded", None))
    threading.Thread(target=_exit_when_parent_dies, args=(conn,), daemon=True).start()
    control = join_group(distributed_backend(device), args.init_method, args.rank, args.world_size)
    serve(loaded.model, control, device)
    dist.destroy_process_group()


def _exit_when_parent_dies(conn: Connection) -> None:
    try:
        conn.recv()  # rank 0 never writes: this returns only when its end closes
    except EOFError:
        pass
    os._exit(1)


@torch.inference_mode()
def serve(model: DecoderForCausalLM, control: dist.ProcessGroup, device: torch.device) -> None:
    """A worker's loop: run each forward rank 0 runs, on this rank's shard, until shutdown."""
    from pangu_infer.engine.runner import ModelRunner

    runner = None
    compiled_steps = 0
    lora = None  # the LoRA slots' state (models/lora.py), once rank 0 turns adapters on
    pending = None  # (slot, this rank's reading of an adapter) until rank 0 says whether to install it
    while True:
        kind, *body = messages.receive(control, device)  # its tensors on this rank's device
        if kind in ("forward", "decode"):
            args = body[0]
            assert runner is not None, "rank 0 sends its runner's settings before any forward"
            # "decode": rank 0 runs its compiled step; this rank its own, or the eager forward until
            # its own build is done (the same collectives in the same order either way)
            step = runner.decode_forward if kind == "decode" else None
            with runner.bind():
                if lora is not None:  # each row's adapter slot, as rank 0 set them for this step
                    lora.set_rows(body[1])
                (model if step is None else step)(*args)
            compiled_steps += step is not None
        elif kind == "copy":  # KV slots copied between blocks (a beam search's partial blocks)
            runner.copy_slots(*body[0])
        elif kind == "runner":  # rank 0's KV cache shape, compile and batch-invariant settings
            num_blocks, block_size, kv_dtype, compiles, max_model_len, batch_invariant, max_num_seqs = body
            runner = ModelRunner(model, num_blocks, block_size, kv_dtype, device, enforce_eager=not compiles,
                                 max_model_len=max_model_len, batch_invariant=batch_invariant, max_num_seqs=max_num_seqs)
        elif kind == "lora_enable":  # rank 0's LoRA slots (before "runner": its compiled step has both graphs)
            slots, max_rank, rows, dtype = body
            lora = enable_lora(model, slots, max_rank, rows, dtype, device)
        elif kind == "lora_read":  # an adapter rank 0 is about to install: read here, then report
            slot, path = body
            pending, error = None, None
            try:
                pending = (slot, read_lora_adapter(path, lora.shapes(), lora.max_rank, lora.dtype, lora.device, lora.heads))
            except (ValueError, OSError) as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001  (reported to rank 0, whose call fails with it)
                error = f"{type(e).__name__}: {e}"
            dist.gather_object(error, None, dst=0, group=control)
        elif kind == "lora_install":  # every rank read it (True): install this rank's shard; else drop it
            if body[0] and pending is not None:
                lora.install(pending[0], pending[1].modules)
            pending = None
        elif kind == "compiled":
            ready = runner is not None and runner.wait_compiled(body[0])
            dist.gather_object((ready, compiled_steps), None, dst=0, group=control)
        elif kind == "expert_tokens":
            dist.gather_object([m.local_expert_tokens for m in model.moe_layers()], None, dst=0, group=control)
        elif kind == "shutdown":
            runner = None  # its KV cache leaves the layers with it
            dist.barrier(group=control)
            return
        else:
            raise AssertionError(f"unknown control message {kind!r}")


if __name__ == "__main__":
    run_spawned_worker(Connection(int(sys.argv[1])))
