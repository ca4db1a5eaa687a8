"""Startup details: the background compile's lower CPU priority, garbage collection around imports."""

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
