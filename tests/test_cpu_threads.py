"""CPU threads: --threads / LLM(threads=), and the default cut to a cgroup CPU quota (cpu_threads.py)."""

import os
import subprocess
import sys
import uuid

import pytest
import torch

from pangu_infer import cpu_threads
from pangu_infer.cpu_threads import check_threads, configure_threads, cpu_quota
from pangu_infer.parallel.launch import rank_threads


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _write(path, name, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text)


def test_cgroup_v2_quota_is_the_tightest_of_the_group_and_those_above(tmp_path):
    v2 = tmp_path / "v2"
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("0::/kubepods/pod1/ctr\n")
    _write(v2, "cpu.max", "max 100000\n")  # the root: none
    _write(v2 / "kubepods", "cpu.max", "max 100000\n")
    _write(v2 / "kubepods" / "pod1", "cpu.max", "250000 100000\n")  # the pod's limit: 2.5 CPUs
    _write(v2 / "kubepods" / "pod1" / "ctr", "cpu.max", "max 100000\n")
    assert cpu_quota(str(v2), str(tmp_path / "v1"), str(self_cgroup)) == 2.5
    _write(v2 / "kubepods" / "pod1" / "ctr", "cpu.max", "50000 50000\n")  # the container's own: 1 CPU
    assert cpu_quota(str(v2), str(tmp_path / "v1"), str(self_cgroup)) == 1.0


def test_cgroup_v1_quota_counts_and_minus_one_is_none(tmp_path):
    v1 = tmp_path / "v1"
    self_cgroup = tmp_path / "self"
    self_cgroup.write_text("4:memory:/other\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    for group in (v1, v1 / "docker", v1 / "docker" / "abc"):
        _write(group, "cpu.cfs_quota_us", "-1\n")
        _write(group, "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(str(tmp_path / "v2"), str(v1), str(self_cgroup)) is None
    _write(v1 / "docker" / "abc", "cpu.cfs_quota_us", "300000\n")  # docker run --cpus=3
    assert cpu_quota(str(tmp_path / "v2"), str(v1), str(self_cgroup)) == 3.0
    assert cpu_quota(str(tmp_path / "none"), str(tmp_path / "none"), str(tmp_path / "none")) is None


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_threads_are_refused_naming_them(bad):
    from pangu_infer import LLM

    with pytest.raises(ValueError, match=r"threads must be a positive integer.*" + repr(bad).replace(".", r"\.")):
        LLM("no-such-model-is-loaded", threads=bad)


@pytest.mark.parametrize("many", [513, 10**6])
def test_more_threads_than_llama_cpps_limit_are_refused_before_torch_sees_them(keep_threads, many):
    """-t 1000000 was a segmentation fault in torch.set_num_threads (65536: libgomp's abort, "Thread
    creation failed"): the process died without a word. Held to llama.cpp's GGML_MAX_N_THREADS."""
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=rf"threads={many} is more than 512"):
        configure_threads(many)
    assert torch.get_num_threads() == before
    assert check_threads(512) == 512


def test_threads_given_are_set(keep_threads):
    assert configure_threads(3) == 3 and torch.get_num_threads() == 3


def test_the_default_is_cut_to_the_quota_unless_the_environment_chooses(keep_threads, monkeypatch):
    torch.set_num_threads(4)
    for var in cpu_threads.THREAD_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 2.5)
    assert configure_threads() == 2 and torch.get_num_threads() == 2  # floor(2.5)
    torch.set_num_threads(4)
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 0.5)
    assert configure_threads() == 1  # at least one
    torch.set_num_threads(4)
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 16.0)
    assert configure_threads() == 4  # a quota above the cores changes nothing
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: None)
    assert configure_threads() == 4
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 1.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert configure_threads() == 4 and torch.get_num_threads() == 4  # the user's OMP_NUM_THREADS stands
    assert configure_threads(2) == 2  # --threads wins over everything


def test_cli_threads_reach_the_llm():
    from pangu_infer.cli import build_parser, llm_kwargs

    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "-t", "3"])
    assert llm_kwargs(args)["threads"] == 3
    args = build_parser().parse_args(["serve", "--model", "m", "--threads", "5"])
    assert llm_kwargs(args)["threads"] == 5


def test_cpu_tensor_parallel_ranks_share_the_threads(keep_threads):
    torch.set_num_threads(4)
    assert rank_threads(torch.device("cpu"), 2) == 2 and torch.get_num_threads() == 2
    torch.set_num_threads(3)
    assert rank_threads(torch.device("cpu"), 4) == 1
    torch.set_num_threads(4)
    assert rank_threads(torch.device("cuda"), 2) == 4 and torch.get_num_threads() == 4


def _cpu_cgroup_root():
    root = cpu_threads.V1_CPU_ROOT
    if os.geteuid() != 0 or not os.path.exists(f"{root}/cpu.cfs_quota_us") or not os.access(root, os.W_OK):
        return None
    return root


@pytest.mark.skipif(_cpu_cgroup_root() is None, reason="needs root and a writable cgroup v1 cpu hierarchy")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to see a quota cut threads")
def test_a_real_cgroup_quota_cuts_the_default_threads():
    """The kernel's own files: a process in a group with a 1-CPU quota starts with 1 thread."""
    group = f"{_cpu_cgroup_root()}/pangu-infer-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(group)
    try:
        with open(f"{group}/cpu.cfs_period_us", "w") as f:
            f.write("100000")
        with open(f"{group}/cpu.cfs_quota_us", "w") as f:
            f.write("100000")
        code = "import torch; from pangu_infer.cpu_threads import configure_threads as c; " \
               "print(torch.get_num_threads(), c())"
        env = {k: v for k, v in os.environ.items() if k not in cpu_threads.THREAD_ENV}
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        ).stdout.split()
        assert int(out[0]) >= 2 and out[1] == "1"
    finally:
        os.rmdir(group)
