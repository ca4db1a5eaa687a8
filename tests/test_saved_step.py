"""Saved compiled decode steps (engine/saved_step.py): what the key holds and what it ignores,
that it reads the same in every process, and that any file it cannot trust is a quiet miss.
(A second start loading the saved graphs: tests/test_compiled.py.)"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from pangu_infer import LLM
from pangu_infer.engine import saved_step

OPTIONS = {"cpp_wrapper": True, "size_asserts": False}


@pytest.fixture(scope="module")
def llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)


def _key(llm) -> dict:
    runner = llm.engine.runner
    return saved_step.step_key(runner.model, runner.k_caches[0], (1, 16), OPTIONS)


@pytest.mark.parametrize("kind", ["dense", "moge"])
def test_the_key_reads_the_same_in_every_process(kind, request, tmp_path):
    """Two processes with different string hashing (sets of names print in another order) compute
    one key for one model: a key that moved between processes would never find its file. (MoGE:
    each MoE block's handle for pangu_infer::moe_dispatch is in the key too.)"""
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    script = (
        "import json; from pangu_infer import LLM; from pangu_infer.engine import saved_step\n"
        f"llm = LLM({str(path)!r}, dtype='float32', device='cpu', kv_cache_memory=4 << 20, enforce_eager=True)\n"
        "r = llm.engine.runner\n"
        f"print(json.dumps(saved_step.step_key(r.model, r.k_caches[0], (1, 16), {OPTIONS!r})))\n"
    )
    keys = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, XDG_CACHE_HOME=str(tmp_path))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        keys.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert keys[0] == keys[1]
    assert keys[0]["graph"] == [1, 16] and keys[0]["kv_cache"][1] == "torch.float32"


def test_the_key_follows_what_a_trace_bakes_in_and_not_the_weights_values(llm, monkeypatch):
    model = llm.engine.runner.model
    base = _key(llm)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_up_proj.weight.add_(1.0)  # values: read at each call
    assert _key(llm) == base
    norm = model.model.layers[1].input_layernorm
    old_eps = norm.eps
    norm.eps = old_eps * 2  # a plain attribute: a constant of the graph
    try:
        assert _key(llm)["model"] != base["model"]
    finally:
        norm.eps = old_eps
    assert _key(llm) == base
    runner = llm.engine.runner
    other = saved_step.step_key(model, runner.k_caches[0][:-16], (1, 16), OPTIONS)  # another cache shape
    assert other != base
    assert saved_step.step_key(model, runner.k_caches[0], (2, 16), OPTIONS) != base  # another graph
    assert saved_step.step_key(model, runner.k_caches[0], (1, 16), {**OPTIONS, "cpp_wrapper": False}) != base
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert _key(llm) != base
    finally:
        torch.set_num_threads(threads)
    # an engine setting is in the key; the switch of the eager decode step, which no graph holds, is not
    monkeypatch.setenv("PANGU_INFER_EAGER_STEP", "0")
    assert _key(llm) == base
    monkeypatch.setenv("PANGU_INFER_DECODE_ATTENTION", "torch")
    assert _key(llm) != base


def _write(key: dict, choices: dict, header_key=None, body: bytes = b"not a compiled function") -> None:
    path = saved_step.step_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps({"key": header_key or key, "choices": choices}).encode() + b"\n" + body)


def test_a_file_it_cannot_trust_is_a_quiet_miss(llm, tmp_path, monkeypatch, caplog):
    """No file, another key behind the name, kernel choices that kernels.json no longer holds, a
    body torch cannot read: each is None (built again by the caller), logged at INFO, never raised."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    key = _key(llm)
    caplog.set_level(logging.INFO, logger="pangu_infer.engine")
    assert saved_step.load(key) is None  # nothing saved
    _write(key, {}, header_key={**key, "graph": [9, 9]})  # (a name is a hash of its key)
    assert saved_step.load(key) is None
    assert "for another key" in caplog.text
    from pangu_infer import machine

    _write(key, {machine.machine_key(): {"no such choice": 1}})
    assert saved_step.load(key) is None
    assert "other kernel choices (no such choice)" in caplog.text
    _write(key, {})
    assert saved_step.load(key) is None
    assert "could not be loaded" in caplog.text


def test_old_files_are_pruned_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setattr(saved_step, "KEEP", 3)
    for i in range(5):
        f = tmp_path / f"{i}.step"
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))
    os.utime(tmp_path / "0.step", (2000, 2000))  # used recently (a load touches it)
    saved_step._prune(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.step")) == ["0.step", "3.step", "4.step"]


def test_a_graph_that_cannot_be_written_leaves_no_file_and_raises_nothing(llm, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    class Unwritable:  # serializes to something a file cannot take: fails after the header is written
        @classmethod
        def serialize(cls, fn):
            return type("Result", (), {"serialized_data": object()})()

    caplog.set_level(logging.INFO, logger="pangu_infer.engine")
    key = _key(llm)
    saved_step.save(Unwritable(), key)
    assert "could not save the compiled decode step" in caplog.text
    assert list(saved_step.steps_dir().iterdir()) == []
    assert saved_step.load(key) is None


def test_a_trace_dynamo_asks_to_restart_is_traced_again(caplog):
    """aot_compile passes up dynamo's TensorifyScalarRestartAnalysis (a float scalar to specialize,
    recorded process-wide) where torch.compile's own path traces again; whether it is raised depends
    on earlier compiles in the process (a MoGE step's save fell back to the regular path in one test
    order). The build traces again, as dynamo would, and gives up only after a few attempts."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    from pangu_infer.engine.compiled import _aot_compile

    class Flaky:
        def __init__(self, failures: int):
            self.failures, self.calls = failures, 0

        def aot_compile(self, inputs):
            self.calls += 1
            if self.calls <= self.failures:
                raise TensorifyScalarRestartAnalysis
            return ("graph", inputs)

    caplog.set_level(logging.INFO, logger="pangu_infer.engine")
    once = Flaky(1)
    assert _aot_compile(once, (1, 2)) == ("graph", ((1, 2), {})) and once.calls == 2
    assert "tracing the decode step again" in caplog.text
    always = Flaky(10)
    with pytest.raises(TensorifyScalarRestartAnalysis):
        _aot_compile(always, (1,))
    assert always.calls == 4
