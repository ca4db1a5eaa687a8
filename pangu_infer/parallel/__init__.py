"""Tensor parallelism (attention heads, MLP columns) and MoGE expert parallelism over torch.distributed.

state.py     which shard a process holds, the collectives the layers call, row-parallel linears
sharding.py  which slice of each checkpoint tensor a rank keeps
launch.py    starting the ranks (spawned or torchrun), rank 0's driver; worker.py the workers' step loop
group.py     the process groups every rank joins
messages.py  what rank 0 sends the workers: each step's inputs as tensors, control messages pickled
expert_load.py per-rank MoGE load counters against global top-k
errors.py    ParallelStartupError (imported by the CLI without torch)
"""

from pangu_infer.parallel.errors import ParallelStartupError

__all__ = ["ParallelStartupError"]
