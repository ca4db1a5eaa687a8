"""Per-machine choices (pangu_infer.machine): processes measuring at once agree and lose nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD = r"""
import os, sys, time
from pathlib import Path
from pangu_infer import machine
i, folder = int(sys.argv[1]), Path(sys.argv[2])
(folder / f"ready{i}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
# Each process measures "shared" (slowly, all at once) and gets another answer: its own number.
shared = machine.cached_choice("shared", lambda: time.sleep(0.5) or 1000 + i, lambda v: isinstance(v, int))
own = machine.cached_choice(f"own{i}", lambda: i, lambda v: isinstance(v, int))
print(shared, own, machine.choices_made()[machine.machine_key()]["shared"])
"""


def test_processes_measuring_at_once_store_one_answer_and_keep_each_others_entries(tmp_path):
    kernels = tmp_path / "kernels.json"
    env = dict(os.environ, PANGU_INFER_KERNEL_CACHE=str(kernels), OMP_NUM_THREADS="1")
    n = 4
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    shared = {int(o[0]) for o in outs}
    assert len(shared) == 1, outs  # one answer per machine, whichever process stored first
    assert all(int(o[2]) == int(o[0]) for o in outs)  # and each process remembers that one
    (entry,) = json.loads(kernels.read_text()).values()
    assert entry["shared"] in shared
    assert {entry[f"own{i}"] for i in range(n)} == set(range(n))  # nobody's entry lost to a rewrite
