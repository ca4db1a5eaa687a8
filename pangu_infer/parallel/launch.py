"""Multi-process tensor parallelism: rank 0 runs the engine, the other ranks replay its forwards.

Rank 0 holds the real LLMEngine. Its runner's `mirror` broadcasts each forward's inputs (input ids,
positions, attention metadata, as tensors: messages.py) over a control group; every other rank runs
the same forward on its shard with its own KV-cache shard, so the collectives inside the layers match.

Two ways in:
- spawned: `LLM(model, tensor_parallel_size=N)` in a plain process starts ranks 1..N-1 itself
  (`python -m pangu_infer.parallel.worker`, one machine); they report load errors to rank 0 through a
  socket pair, and exit when it closes (rank 0 gone).
- torchrun: every rank runs the same command (`RANK`/`WORLD_SIZE` set by torchrun, one or many
  machines); on ranks != 0 `LLM(...)` serves rank 0's steps, then ends the process.

This module is rank 0's side (starting the ranks, then driving them); worker.py is the workers'
loop, group.py the process groups both sides join, messages.py what travels between them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from pangu_infer import memory
from pangu_infer.device import distributed_backend, rank_device
from pangu_infer.errors import short_repr
from pangu_infer.loader import LoadedModel, check_weights_fit, read_config, resolve_model_path
from pangu_infer.parallel.errors import ParallelStartupError
from pangu_infer.parallel import messages
from pangu_infer.parallel.group import LOAD_TIMEOUT_S, join_group
from pangu_infer.parallel.state import ParallelState, building_shard, check_parallel_config
from pangu_infer.parallel.worker import ShardLoad, WorkerArgs, serve

if TYPE_CHECKING:
    from pangu_infer.engine.runner import ModelRunner

logger = logging.getLogger("pangu_infer.parallel")


def launched_by_torchrun() -> bool:
    """True in a process torchrun started as one rank of a group of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


# vLLM's distributed_executor_backend values: how the tensor-parallel ranks start
EXECUTOR_BACKENDS = ("mp", "uni", "external_launcher", "ray")


def check_executor_backend(backend: Optional[str], tensor_parallel_size: int, cli: bool = False) -> None:
    """vLLM's distributed_executor_backend (--distributed-executor-backend where `cli`) against how this
    engine runs its ranks: ValueError where the two differ. mp: processes this one starts (the
    default here); external_launcher: torchrun started them; uni: one process; Ray is not used."""
    if backend is None:
        return
    name, tp = ("--distributed-executor-backend ", "--tensor-parallel-size ") if cli else ("distributed_executor_backend=", "tensor_parallel_size=")
    shown = backend if cli else short_repr(backend)
    if backend not in EXECUTOR_BACKENDS:
        raise ValueError(f"{name}{shown} must be one of {', '.join(EXECUTOR_BACKENDS)}")
    if backend == "ray":
        raise ValueError(f"{name}{shown}: this engine's tensor-parallel ranks are processes it starts "
                         "itself (mp, the default) or torchrun's (external_launcher); Ray is not used")
    if backend == "uni" and tensor_parallel_size > 1:
        raise ValueError(f"{name}{shown} runs one process: {tp}{tensor_parallel_size} needs mp")
    if backend == "external_launcher" and not launched_by_torchrun():
        raise ValueError(f"{name}{shown}: start each rank with torchrun "
                         "(torchrun --nproc-per-node N -m pangu_infer.cli serve ...), or leave it out to start them here")
    if backend == "mp" and launched_by_torchrun():
        raise ValueError(f"{name}{shown}: this process was started by torchrun (external_launcher)")


def load_tensor_parallel(
    model: Optional[str],
    world_size: int,
    dtype: torch.dtype,
    device: torch.device,
    quantization: Any = None,
    offload_experts: bool = False,
    bf16_weights: bool = True,
    load_tokenizer: bool = True,
    dummy: bool = False,
) -> tuple[LoadedModel, "TensorParallelDriver"]:
    """Load rank 0's shard with every other rank loading its own; returns once all ranks joined.

    Every rank loads as `load_serving_model` does in one process: quantized while loading (or kept
    quantized, a GGUF file's blocks), bf16 linears packed on CPU, experts offloaded if asked.
    Under torchrun this returns only on rank 0: the other ranks serve rank 0's steps and exit.
    """
    path = resolve_model_path(model, weights=not dummy)
    check_parallel_config(read_config(path), world_size)
    load = ShardLoad(path, dtype, quantization, offload_experts, bf16_weights, load_tokenizer, dummy)
    if launched_by_torchrun():
        return _load_torchrun(load, world_size, device)
    check_fits(load, world_size, device)  # before any rank is started: spawned ranks all share this host
    return _load_spawned(load, world_size, device)


def check_fits(load: ShardLoad, world_size: int, device: torch.device, ranks: Optional[range] = None,
               available: Optional[int] = None) -> None:
    """The memory check of a tensor-parallel start (loader.check_weights_fit): the ranks on one host
    hold their shards side by side, so one check counts them together, each shard as its rank
    builds it (the embedding on every rank), against the host's whole memory, before any rank
    loads; the ranks themselves do not check (each would see the others' loads filling memory).
    Spawned ranks: all of them, here, before any is started. torchrun: this host's ranks
    (`ranks`), on each of them, with memory measured before the group formed (`available`)."""
    check_weights_fit(load.path, load.dtype, device, load.quantization, load.offload_experts,
                      keep_half=True,  # as ShardLoad.run loads (load_serving_model's default)
                      tensor_parallel_size=world_size, ranks=ranks, available=available, dummy=load.dummy)


# ---------------------------------------------------------------------- rank 0
class TensorParallelDriver:
    """Rank 0's side: sends each forward's inputs, the KV-cache shape and shutdown to the workers."""

    def __init__(
        self,
        state: ParallelState,
        control: dist.ProcessGroup,
        device: torch.device,
        procs: Optional[list[subprocess.Popen]] = None,
        pipes: Optional[list[Connection]] = None,
    ):
        self.state = state
        self.control = control
        self.device = device
        self.procs = procs or []
        # Held open while rank 0 lives: a worker whose socket closes knows rank 0 is gone and exits.
        self.pipes = pipes or []
        self.broadcast_seconds = 0.0  # time spent sending step inputs to the workers
        # Steps' inputs pickled, as every message was before they went as tensors (messages.py):
        # benchmarks/parallel.py --steps-as compares the two.
        self.pickled_steps = False
        self._lora: Any = None  # rank 0's LoRA slots' state (models/lora.py), with enable_lora
        self._closed = False

    def attach(self, runner: "ModelRunner") -> None:
        """Give every worker a runner like rank 0's (its KV cache, and a compiled decode step of its
        own where rank 0 builds one), then mirror each forward `runner` runs, eager or compiled.
        With LoRA adapters: the workers' slots first (so that their compiled steps have both graphs),
        then every adapter rank 0 installs, and each step's rows with its inputs."""
        self._lora = runner.lora
        if self._lora is not None:
            s = self._lora
            self._send(("lora_enable", s.slots, s.max_rank, len(s.slot_ids), s.dtype))
            s.on_install = self._install_lora
        self._send(("runner", runner.num_blocks, runner.block_size, runner.k_caches[0].dtype,
                    runner.compiles, runner.max_model_len, runner.batch_invariant, runner.max_num_seqs))
        runner.mirror = self._mirror
        self.state.gather_counts = self._gather_expert_tokens

    def _mirror(self, kind: str, inputs: tuple) -> None:
        # The rows' adapter slots rank 0's step runs with (LoRAState.set_rows, called just before):
        # the workers set the same, so that every rank adds the same adapters to the same rows and
        # a compiled step picks the same graph (compiled.LoRAVariants).
        rows = None if self._lora is None else self._lora.rows
        self._send((kind, inputs, rows))

    def _install_lora(self, slot: int, request: Any, adapter: Any) -> None:
        """Before rank 0 installs `adapter` (read from `request`'s path) into `slot`: every worker
        reads it from the same path itself and reports; all of them install their shard only if all
        read it, else no rank changes and this raises a ValueError naming the adapter and the rank."""
        gathered = self._ask(("lora_read", slot, request.lora_path))
        failed = [(rank, error) for rank, error in enumerate(gathered) if rank and error is not None]
        self._send(("lora_install", not failed))
        if failed:
            rank, error = failed[0]
            raise ValueError(
                f"LoRA adapter {request.lora_name!r} ({request.lora_path}) could not be loaded on tensor-parallel rank "
                f"{rank} of {self.state.world_size} (every rank reads it from the same path): {error}"
            )

    def wait_compiled(self, timeout: Optional[float]) -> list[tuple[bool, int]]:
        """Each worker rank's (compiled step ready, compiled steps run so far), after waiting for its
        build at most `timeout` seconds (call from the thread that runs the steps)."""
        return [tuple(g) for g in self._ask(("compiled", timeout))[1:]]

    def _gather_expert_tokens(self, local: list[int]) -> list[list[int]]:
        """[layer][rank] token-expert pairs each rank's experts computed, as each rank counted them."""
        return [list(per_layer) for per_layer in zip(*self._ask(("expert_tokens",), local))]

    def _ask(self, message: tuple, own: Any = None) -> list[Any]:
        """Send `message`, then gather every rank's answer (rank 0's: `own`), in rank order."""
        self._send(message)
        gathered: list[Any] = [None] * self.state.world_size
        dist.gather_object(own, gathered, dst=0, group=self.control)
        return gathered

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise RuntimeError("the tensor-parallel workers were shut down; create a new LLM")
        start = time.perf_counter()
        messages.send(message, self.control, pickled=self.pickled_steps)
        self.broadcast_seconds += time.perf_counter() - start

    def shutdown(self) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        if self._closed:
            return
        try:
            self._send(("shutdown",))
            dist.barrier(group=self.control)  # every rank leaves its loop before any group is torn down
        except Exception as e:  # a dead worker: terminate below
            logger.warning("tensor-parallel shutdown message failed: %s", e)
        self._closed = True
        _stop(self.procs, grace_s=10.0)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- spawned workers
def _load_spawned(load: ShardLoad, world_size: int, device: torch.device) -> tuple[LoadedModel, TensorParallelDriver]:
    if dist.is_initialized():
        raise RuntimeError(
            "a tensor-parallel LLM is already running in this process: call its shutdown() first "
            "(torch.distributed holds one process group per process)"
        )
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    threads = rank_threads(device, world_size)
    procs, conns = [], []
    try:
        for rank in range(1, world_size):
            proc, conn = _start_worker(WorkerArgs(rank, world_size, load, device, init_method, threads))
            procs.append(proc)
            conns.append(conn)
        state = ParallelState(0, world_size)
        dev = rank_device(device, 0)
        with building_shard(state):
            loaded = load.run(dev, load_tokenizer=True)
        _wait_until_loaded(procs, conns)
        control = join_group(distributed_backend(dev), init_method, 0, world_size)
    except BaseException:
        _stop(procs, grace_s=0.0)
        raise
    return loaded, TensorParallelDriver(state, control, dev, procs, conns)


def rank_threads(device: torch.device, world_size: int) -> int:
    """Each spawned rank's torch threads, rank 0 (this process) set to it too: on the CPU the ranks
    share this host's cores, so the thread count (--threads, or the default) is split between them
    (two ranks of 2 threads each on 2 cores wait on each other's paused threads); on GPUs, unchanged."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = max(1, threads // world_size)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    return threads


def _start_worker(args: WorkerArgs) -> tuple[subprocess.Popen, Connection]:
    """A fresh interpreter (nothing of the caller's __main__ re-imported), linked by a socket pair."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pangu_infer.parallel.worker", str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env
        )
    conn = Connection(ours.detach())
    conn.send(args)
    return proc, conn


def _wait_until_loaded(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    """Wait for every worker's "loaded" or error; a crash or a silent worker fails the start."""
    world = len(procs) + 1
    index = {conn: (rank, proc) for rank, (conn, proc) in enumerate(zip(conns, procs), start=1)}
    pending = set(conns)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            ranks = sorted(index[c][0] for c in pending)
            raise ParallelStartupError(f"tensor-parallel rank(s) {ranks} of {world} did not load within {LOAD_TIMEOUT_S:.0f} s")
        for conn in wait(list(pending), timeout=left):
            rank, proc = index[conn]
            try:
                kind, detail = conn.recv()
            except EOFError:  # the worker died before it could report (its end of the socket closed)
                raise ParallelStartupError(
                    f"tensor-parallel rank {rank} of {world} exited with code {proc.wait(5.0)} while loading "
                    f"(killed for lack of memory? its stderr is above)"
                ) from None
            if kind == "error":
                raise ParallelStartupError(f"tensor-parallel rank {rank} of {world} failed at startup: {detail}")
            pending.discard(conn)


# ---------------------------------------------------------------------- torchrun
def _load_torchrun(load: ShardLoad, world_size: int, device: torch.device) -> tuple[LoadedModel, TensorParallelDriver]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise ValueError(
            f"torchrun started WORLD_SIZE={world} ranks but tensor_parallel_size={world_size}: pass "
            f"--tensor-parallel-size {world} (one rank per tensor-parallel shard)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = rank_device(device, local_rank)
    # This host's ranks (torchrun numbers each host's ranks in a row), and its memory measured before
    # the group forms: until every rank has joined, none has started loading.
    host_ranks = range(rank - local_rank, rank - local_rank + int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    available = memory.available_memory_bytes() if dev.type == "cpu" else None
    control = join_group(distributed_backend(dev), "env://", rank, world)
    state = ParallelState(rank, world)
    error = None
    try:
        check_fits(load, world, dev, host_ranks, available)
        with building_shard(state):
            loaded = load.run(dev, load_tokenizer=rank == 0)
    except Exception as e:  # reported to every rank below, then raised
        error = f"{type(e).__name__}: {e}"
    dist.monitored_barrier(group=control, timeout=timedelta(seconds=LOAD_TIMEOUT_S))
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error, group=control)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        dist.destroy_process_group()
        r, e = failed[0]
        raise ParallelStartupError(f"tensor-parallel rank {r} of {world} failed at startup: {e}")
    if rank != 0:
        serve(loaded.model, control, dev)
        dist.destroy_process_group()
        raise SystemExit(0)
    return loaded, TensorParallelDriver(state, control, dev)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
