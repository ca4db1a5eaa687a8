"""A model whose weights cannot fit in the memory left is refused before loading, with what it needs,
what there is and what would fit (the kernel would otherwise kill the process part way, silently)."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM
from pangu_infer import memory
from pangu_infer.loader import load_serving_model, weights_bytes

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
    size = smollm2_gguf_path.stat().st_size
    assert weights_bytes(str(smollm2_gguf_path), torch.float32, "auto", False) == size
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: size // 2)
    with pytest.raises(ValueError, match=r"needs about 0\.1 GiB of memory for its weights"):
        LLM(str(smollm2_gguf_path), device="cpu")


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
    groups = memory._cgroup_groups(str(tmp_path), str(tmp_path / "none"))
    assert groups == [str(tmp_path)]  # no /proc/self/cgroup: the root alone
    (tmp_path / "self").write_text("0::/system.slice/pangu.service\n")
    assert memory._cgroup_groups(str(tmp_path), str(tmp_path / "self")) == [
        f"{tmp_path}/system.slice/pangu.service", f"{tmp_path}/system.slice", str(tmp_path)]
    unit = tmp_path / "system.slice" / "pangu.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text("2147483648\n")
    (unit / "memory.current").write_text("1073741824\n")
    (unit / "memory.stat").write_text("file 0\n")
    assert memory._cgroup_available(str(unit)) == 1 << 30
    assert memory._cgroup_available(str(tmp_path / "system.slice")) is None  # no limit file there
