"""vLLM's --gpu-memory-utilization: the share of a GPU's whole memory the engine fills (weights,
activations, KV cache); the KV cache gets what the weights and an activation reserve leave.
The arithmetic is checked here; the device reads (torch.cuda.mem_get_info, memory_reserved) need a
GPU, which this machine lacks."""

from __future__ import annotations

import pytest

from pangu_infer import LLM
from pangu_infer.cli import build_parser, llm_kwargs
from pangu_infer.engine.engine import EngineConfig, utilization_kv_budget

GIB = 1 << 30


def test_the_kv_cache_gets_the_share_left_after_weights_and_activations():
    # 80 GiB device; the engine holds 16 GiB of weights; another process holds 4 GiB
    budget = utilization_kv_budget(0.9, 80 * GIB, 60 * GIB, 16 * GIB, 2 * GIB)
    assert budget == int(0.9 * 80 * GIB) - 16 * GIB - 2 * GIB


def test_a_share_other_processes_already_hold_names_the_most_that_fits():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.9 asks for 72\.0 GiB of the device's 80\.0 GiB, "
                                         r"but other processes hold 44\.0 GiB of it: lower it to at most 0\.45"):
        utilization_kv_budget(0.9, 80 * GIB, 20 * GIB, 16 * GIB, GIB)


def test_a_share_the_weights_fill_asks_for_more():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.2 gives this engine 16\.0 GiB, and the weights "
                                         r"already hold 16\.0 GiB .* nothing is left for the KV cache; raise it"):
        utilization_kv_budget(0.2, 80 * GIB, 64 * GIB, 16 * GIB, GIB)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
def test_a_utilization_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=.* must be a fraction in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=value)


def test_it_and_kv_cache_memory_cannot_both_size_the_cache():
    with pytest.raises(ValueError, match="both size the KV cache: give one"):
        EngineConfig(gpu_memory_utilization=0.9, kv_cache_memory=1 << 30)


def test_on_the_cpu_it_points_at_kv_cache_memory(tiny_dense_dir):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.9 takes a share of a GPU's memory.*--kv-cache-memory"):
        LLM(str(tiny_dense_dir), dtype="float32", device="cpu", gpu_memory_utilization=0.9, enforce_eager=True)


def test_the_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--gpu-memory-utilization", "0.85"])
    assert llm_kwargs(args)["gpu_memory_utilization"] == 0.85
