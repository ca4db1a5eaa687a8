"""A model whose weights cannot fit in the memory left is refused before loading, with what it needs,
what there is and what would fit (the kernel would otherwise kill the process part way, silently)."""

from __future__ import annotations

import os

import pytest
import torch

from pangu_infer import LLM
from pangu_infer import memory
from pangu_infer.loader import load_serving_model, weights_bytes
from pangu_infer.quant import cpu_int4

CPU = torch.device("cpu")


def test_weights_that_do_not_fit_are_refused_with_what_would_fit(tiny_moge_dir, monkeypatch):
    need = weights_bytes(str(tiny_moge_dir), torch.float32, "auto", False)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: need // 2)
    with pytest.raises(ValueError) as e:
        LLM(str(tiny_moge_dir), dtype="float32", device="cpu")
    message = str(e.value)
    assert repr(str(tiny_moge_dir)) in message and "float32" in message
    assert f"{need / 2**30:.1f} GiB of memory for its weights" in message
    assert "--quantization int8 (about" in message and "--quantization int4 (about" in message
    assert "--offload-experts (about" in message and "PANGU_INFER_MEMORY_CHECK=0" in message
    # what the hints promise is smaller
    for method in ("int8", "int4"):
        assert weights_bytes(str(tiny_moge_dir), torch.float32, method, False) < need // 2
    monkeypatch.setenv("PANGU_INFER_MEMORY_CHECK", "0")
    assert load_serving_model(str(tiny_moge_dir), torch.float32, CPU, load_tokenizer=False).model is not None


@pytest.mark.parametrize("quantization", ["auto", "int8", "int4"])
def test_the_estimate_is_what_a_load_holds(tiny_moge_dir, quantization):
    from pangu_infer.bench import _weights

    loaded = load_serving_model(str(tiny_moge_dir), torch.float32, CPU, load_tokenizer=False, quantization=quantization)
    held = sum(t.numel() * t.element_size() for t in _weights(loaded.model))
    estimate = weights_bytes(str(tiny_moge_dir), torch.float32, quantization, False)
    assert 0.9 * held <= estimate <= 1.1 * held


def test_a_gguf_file_kept_quantized_needs_about_its_size(smollm2_gguf_path, monkeypatch):
    size = smollm2_gguf_path.stat().st_size  # Q4_1: int4 groups of 32 with a bf16 scale and zero, as large
    assert 0.9 * size <= weights_bytes(str(smollm2_gguf_path), torch.float32, "auto", False) <= size
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: size // 2)
    with pytest.raises(ValueError, match=r"needs about 0\.1 GiB of memory for its weights"):
        LLM(str(smollm2_gguf_path), device="cpu")


# ------------------------------------------------------------------ GGUF: counted from the header


def _tiny_gguf(tmp_path_factory, vocab, qtype: str):
    from fixtures_gguf import _tiny

    return str(_tiny(tmp_path_factory, vocab, "pangu-embedded", qtype).path)


def _held(model) -> int:
    from pangu_infer.bench import _weights

    return sum(t.numel() * t.element_size() for t in _weights(model) if not t.is_meta)  # parameters and buffers


@pytest.mark.parametrize(
    "qtype, dtype, kept_16_bit",
    [
        ("F16", "float32", False),  # widened to float32: twice the file
        ("BF16", "float32", False),
        ("F16", "float32", True),  # kept 16-bit under float32 activations: the file
        ("F32", "bfloat16", False),  # narrowed to bf16: half the file
        ("BF16", "bfloat16", False),
        ("Q4_0", "float32", False),  # int4 groups of 32: about the file
        ("Q4_1", "bfloat16", False),
        ("Q5_0", "float32", False),  # int8 rows: more than the file's 5.5 bits a weight
        ("Q5_1", "float32", False),
        ("Q8_0", "float32", False),
    ],
    ids=lambda v: {True: "kept16", False: "widened"}.get(v, v) if isinstance(v, bool) else v,
)
def test_a_gguf_estimate_is_what_its_load_holds(tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch, qtype, dtype, kept_16_bit):
    from pangu_infer.models import bf16_weights

    dtype = getattr(torch, dtype)

    if kept_16_bit and bf16_weights.library() is None:
        pytest.skip("the bf16-weight kernel needs x86 with AVX2 and FMA and a C compiler")
    monkeypatch.setenv(bf16_weights.ENV, "1" if kept_16_bit else "0")
    path = _tiny_gguf(tmp_path_factory, tiny_sentencepiece_vocab, qtype)
    estimate = weights_bytes(path, dtype, "auto", False, keep_half=True)
    held = _held(load_serving_model(path, dtype, CPU, load_tokenizer=False).model)
    assert 0.9 * held <= estimate <= 1.1 * held, (estimate, held)


def test_a_gguf_estimate_counts_what_the_loader_turns_the_file_into(tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch):
    from pangu_infer.models import bf16_weights

    monkeypatch.setenv(bf16_weights.ENV, "0")  # 16-bit matrices widened to float32
    monkeypatch.setenv(cpu_int4.FIVE_BIT_ENV, "0")  # Q5 blocks as int8 rows (5-bit codes: below)
    cpu_int4.five_bit_chosen.cache_clear()
    size = {}
    for qtype in ("F16", "Q4_0", "Q5_0", "Q8_0"):
        path = _tiny_gguf(tmp_path_factory, tiny_sentencepiece_vocab, qtype)
        size[qtype] = os.path.getsize(path), weights_bytes(path, torch.float32, "auto", False, keep_half=True)
    # The file also holds the vocabulary (a few KiB of the tiny model's ~270 KiB in F16).
    file, estimate = size["F16"]
    assert 1.8 * file <= estimate <= 2 * file  # F16 widened to float32
    file, estimate = size["Q4_0"]
    assert 0.9 * file <= estimate <= file  # int4 in groups of 32 with a bf16 scale: Q4_0's 4.5 bits
    int8 = size["Q8_0"][1]  # the int8 rows Q8_0's blocks become: every weight a byte, a scale per row
    file, estimate = size["Q5_0"]
    assert estimate == int8 and estimate >= 1.25 * file  # Q5_0: 5.5 bits a weight in the file, 8 loaded
    if cpu_int4.usable(64, 32):  # where the 5-bit kernel is chosen: the file's 5.5 bits
        monkeypatch.setenv(cpu_int4.FIVE_BIT_ENV, "1")
        cpu_int4.five_bit_chosen.cache_clear()
        path = _tiny_gguf(tmp_path_factory, tiny_sentencepiece_vocab, "Q5_0")
        five = weights_bytes(path, torch.float32, "auto", False, keep_half=True)
        assert 0.9 * file <= five <= 1.1 * file < int8
        assert weights_bytes(path, torch.float32, "int8", False, keep_half=True) == int8  # asked for int8: int8 rows
    cpu_int4.five_bit_chosen.cache_clear()
    # the estimate the check compares: an F16 file that fits by its size but not widened is refused
    f16 = _tiny_gguf(tmp_path_factory, tiny_sentencepiece_vocab, "F16")
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int(1.5 * os.path.getsize(f16)))
    with pytest.raises(ValueError) as e:
        load_serving_model(f16, torch.float32, CPU, load_tokenizer=False)
    assert repr(f16) in str(e.value) and "needs about" in str(e.value)


def test_a_containers_memory_limit_counts(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    (tmp_path / "memory.stat").write_text("anon 400000000\nfile 104857600\nkernel 1\n")
    assert memory._cgroup_available(str(tmp_path)) == 1073741824 - 536870912 + 104857600
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_available(str(tmp_path)) is None
    assert memory._cgroup_available(str(tmp_path / "none")) is None


def test_a_nested_cgroups_limit_and_the_ones_above_it_count(tmp_path):
    """A systemd unit's or a Slurm job's group, with no cgroup namespace: /proc/self/cgroup names it."""
    groups = memory.cgroup_groups(str(tmp_path), str(tmp_path / "none"))
    assert groups == [str(tmp_path)]  # no /proc/self/cgroup: the root alone
    (tmp_path / "self").write_text("0::/system.slice/pangu.service\n")
    assert memory.cgroup_groups(str(tmp_path), str(tmp_path / "self")) == [
        f"{tmp_path}/system.slice/pangu.service", f"{tmp_path}/system.slice", str(tmp_path)]
    unit = tmp_path / "system.slice" / "pangu.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text("2147483648\n")
    (unit / "memory.current").write_text("1073741824\n")
    (unit / "memory.stat").write_text("file 0\n")
    assert memory._cgroup_available(str(unit)) == 1 << 30
    assert memory._cgroup_available(str(tmp_path / "system.slice")) is None  # no limit file there


# ------------------------------------------------------------------ tensor parallelism: one host


def test_tensor_parallel_ranks_are_checked_together_before_any_rank_starts(tiny_dense_dir, monkeypatch):
    from pangu_infer.loader import check_weights_fit
    from pangu_infer.parallel import launch

    path = str(tiny_dense_dir)
    one = weights_bytes(path, torch.float32, None, False, keep_half=True)
    two = weights_bytes(path, torch.float32, None, False, keep_half=True, tensor_parallel_size=2)
    assert two > one  # every rank holds the embedding
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: (one + two) // 2)
    check_weights_fit(path, torch.float32, CPU, None, False, keep_half=True)  # one process would fit
    started = []
    monkeypatch.setattr(launch, "_start_worker", lambda args: started.append(args) or pytest.fail("a rank was started"))
    with pytest.raises(ValueError) as e:
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    message = str(e.value)
    assert repr(path) in message and "tensor_parallel_size=2" in message and "2 tensor-parallel ranks" in message
    assert f"needs about {two / 2**30:.1f} GiB" in message and "PANGU_INFER_MEMORY_CHECK=0" in message
    assert not started
    monkeypatch.setenv("PANGU_INFER_MEMORY_CHECK", "0")
    launch.check_fits(launch.ShardLoad(path, torch.float32), 2, CPU)  # skipped


@pytest.mark.parametrize("kind, quantization", [("dense", None), ("moge", None), ("moge", "int8"), ("Q5_0", "auto"), ("F16", "auto")])
def test_the_tensor_parallel_estimate_is_what_the_ranks_hold(kind, quantization, tiny_dense_dir, tiny_moge_dir,
                                                             tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch):
    from pangu_infer.models import bf16_weights
    from pangu_infer.parallel.state import ParallelState, building_shard

    monkeypatch.setenv(bf16_weights.ENV, "0")
    dirs = {"dense": tiny_dense_dir, "moge": tiny_moge_dir}
    path = str(dirs[kind]) if kind in dirs else _tiny_gguf(tmp_path_factory, tiny_sentencepiece_vocab, kind)
    held = []
    for rank in range(2):
        with building_shard(ParallelState(rank, 2)):  # each rank's shard, loaded here (no collectives)
            held.append(_held(load_serving_model(path, torch.float32, CPU, False, quantization).model))
    estimate = [weights_bytes(path, torch.float32, quantization, False, True, CPU, 2, [rank]) for rank in range(2)]
    assert sum(estimate) == weights_bytes(path, torch.float32, quantization, False, True, CPU, 2)
    for e, h in zip(estimate, held):
        assert 0.9 * h <= e <= 1.1 * h, (estimate, held)


# ------------------------------------------------------------------ cgroup v1


NO_LIMIT_V1 = (1 << 63) - 4096  # what cgroup v1 shows without a limit (4 KiB pages)


def _v1_group(folder, limit: int, usage: int, stat: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(stat)


def test_a_cgroup_v1_memory_limit_counts(tmp_path):
    stat = "cache 4096\nrss 400000000\ninactive_file 4096\nhierarchical_memory_limit 1073741824\ntotal_cache 104857600\ntotal_inactive_file 52428800\n"
    _v1_group(tmp_path, 1 << 30, 512 << 20, stat)
    assert memory._cgroup_v1_available(str(tmp_path)) == (1 << 30) - (512 << 20) + (100 << 20)  # page cache counts as free
    (tmp_path / "memory.stat").write_text("cache 1048576\nrss 1\n")  # no hierarchical totals: the group's own
    assert memory._cgroup_v1_available(str(tmp_path)) == (1 << 30) - (512 << 20) + (1 << 20)
    (tmp_path / "memory.usage_in_bytes").write_text(f"{2 << 30}\n")
    assert memory._cgroup_v1_available(str(tmp_path)) == 0
    for no_limit in (NO_LIMIT_V1, (1 << 63) - 65536):  # 4 KiB and 64 KiB pages
        (tmp_path / "memory.limit_in_bytes").write_text(f"{no_limit}\n")
        assert memory._cgroup_v1_available(str(tmp_path)) is None
    assert memory._cgroup_v1_available(str(tmp_path / "none")) is None


def test_a_nested_cgroup_v1_group_and_the_ones_above_it_count(tmp_path, monkeypatch):
    """/proc/self/cgroup of a hybrid host (as this one): memory on a v1 hierarchy, `0::/` for v2."""
    v1 = tmp_path / "memory"
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("9:name=systemd:/\n5:cpuacct,cpu:/\n4:memory:/process_api/job7\n1:cpuset:/\n0::/\n")
    assert memory.cgroup_groups(str(v1), str(self_cgroup), "memory") == [f"{v1}/process_api/job7", f"{v1}/process_api", str(v1)]
    assert memory.cgroup_groups(str(tmp_path / "v2"), str(self_cgroup)) == [str(tmp_path / "v2")]
    self_cgroup.write_text("4:memory,hugetlb:/slurm/uid_1/job_2\n")  # co-mounted controllers
    assert memory.cgroup_groups(str(v1), str(self_cgroup), "memory")[0] == f"{v1}/slurm/uid_1/job_2"
    self_cgroup.write_text("4:memory:/process_api/job7\n0::/\n")
    _v1_group(v1, NO_LIMIT_V1, 8 << 30, "total_cache 0\n")  # the root: no limit
    _v1_group(v1 / "process_api", 4 << 30, 3 << 30, "total_cache 0\n")
    _v1_group(v1 / "process_api" / "job7", 2 << 30, 1 << 30, "total_cache 268435456\n")
    monkeypatch.setattr(memory, "V1_ROOT", str(v1))
    monkeypatch.setattr(memory, "V2_ROOT", str(tmp_path / "v2"))  # no v2 memory controller here
    monkeypatch.setattr(memory, "SELF_CGROUP", str(self_cgroup))
    assert memory.available_memory_bytes() == 1 << 30  # process_api's: 4 - 3 GiB, tighter than job7's 1.25


# ------------------------------------------------------------------ bf16 packed for oneDNN

DEMO_HEAD_BYTES = 49152 * 576 * 2  # SmolLM2-135M's vocabulary x hidden size, bf16


def _packing(monkeypatch, packs: bool) -> None:
    """As on a CPU whose oneDNN has the bf16 linear (an AVX-512 BF16 EPYC: blocks of 64 rows x 32
    columns) or one without it, whatever this CPU is."""
    monkeypatch.setattr("pangu_infer.device.can_pack", lambda device, dtype: packs and device.type == "cpu" and dtype == torch.bfloat16)
    monkeypatch.setattr("pangu_infer.models.packed.packed_blocks", lambda: (64, 32))


def test_a_bf16_load_that_packs_needs_the_tied_heads_packed_copy(smollm2_gguf_path, monkeypatch):
    """load_serving_model packs a bf16 CPU load's linears where oneDNN has the bf16 linear, and gives
    a tied LM head a packed copy of the embedding (the lookup keeps the rows): the demo model
    (SmolLM2-135M, tied) holds vocab x hidden x 2 bytes more, on every tensor-parallel rank (none of
    them owns a head of its own), and the memory check asks for them."""
    from pangu_infer.loader import check_weights_fit

    path = str(smollm2_gguf_path)
    need = {}
    for packs in (False, True):
        _packing(monkeypatch, packs)
        need[packs] = [weights_bytes(path, torch.bfloat16, "none", False, True, CPU, world) for world in (1, 2)]
    # Its sizes are multiples of the blocks: the linears take no padding, only the copy is new.
    assert need[True][0] - need[False][0] == DEMO_HEAD_BYTES
    assert need[True][1] - need[False][1] == 2 * DEMO_HEAD_BYTES
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: need[False][0] + DEMO_HEAD_BYTES // 2)
    _packing(monkeypatch, False)
    check_weights_fit(path, torch.bfloat16, CPU, "none", False, keep_half=True)  # fits where nothing packs
    _packing(monkeypatch, True)
    with pytest.raises(ValueError, match=rf"needs about {need[True][0] / 2**30:.1f} GiB of memory for its weights \(bfloat16"):
        check_weights_fit(path, torch.bfloat16, CPU, "none", False, keep_half=True)
    # Kept quantized (Q4_1 as int4, Q8_0 as int8), nothing is packed: the int4 head's copy is counted once, as before.
    auto = weights_bytes(path, torch.bfloat16, "auto", False, True, CPU)
    _packing(monkeypatch, False)
    assert weights_bytes(path, torch.bfloat16, "auto", False, True, CPU) == auto
