"""Startup details: the background compile's lower CPU priority, garbage collection around imports,
no torch._dynamo in an eager start, LLM arguments refused before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from pangu_infer.engine.runner import COMPILE_NICE, _lower_thread_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_compile_thread_runs_at_a_lower_priority_and_the_rest_does_not(monkeypatch):
    monkeypatch.delenv("PANGU_INFER_COMPILE_NICE", raising=False)
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def body():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        _lower_thread_priority()
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        seen["child"] = int(subprocess.run(["sh", "-c", "ps -o ni= -p $$"], capture_output=True, text=True).stdout)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["delta"] == min(COMPILE_NICE, 19 - main_before)
    assert seen["child"] == main_before + seen["delta"]  # the compilers it starts inherit it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_importing_the_package_leaves_garbage_collection_as_it_was():
    code = "import gc; gc.{}(); import pangu_infer; print(gc.isenabled())"
    for switch, expected in (("enable", "True"), ("disable", "False")):
        out = subprocess.run([sys.executable, "-c", code.format(switch)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_an_eager_start_never_imports_torch_dynamo(tiny_dense_dir):
    """torch._dynamo costs an eager start about 1-2 s of imports: the package, the CLI and an
    `--enforce-eager` load and answer leave it unimported (the compile thread imports it when it
    builds). A decorator such as `torch.compiler.assume_constant_result` at import time pulls it in."""
    code = (
        "import sys; import pangu_infer.cli; from pangu_infer import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_dense_dir)!r}, dtype='float32', kv_cache_memory=4 << 20, enforce_eager=True)\n"
        "llm.generate('hello', SamplingParams(max_tokens=2), use_tqdm=False)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(device=3), r"device=3 must be a string: cpu, cuda or npu \(optionally with :index\)"),
    (dict(device="cpu:x"), r"unknown device 'cpu:x': expected cpu, cuda or npu \(optionally with :index\)"),
    (dict(device="cpu:-1"), r"unknown device 'cpu:-1'"),
    (dict(offload_experts="no"), r"offload_experts='no' must be True or False"),
])
def test_a_bad_device_or_flag_is_named_before_any_model_loads(kwargs, message):
    """device 3 was an AttributeError ('int' object has no attribute 'split'), "cpu:x" torch's
    RuntimeError (--device cpu:x: a traceback); offload_experts "no" was read as True."""
    from pangu_infer import LLM

    with pytest.raises(ValueError, match=message):
        LLM("no-such-model-is-loaded", **kwargs)


def test_a_torch_device_is_taken_as_its_name():
    import torch

    from pangu_infer.device import resolve_device

    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
