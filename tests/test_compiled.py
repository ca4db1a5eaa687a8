"""The default compiled decode path: built on a background thread from load on, while steps run
eagerly (nothing waits for it, a process that is done exits without it, its warm-up never touches a
live KV cache), then used between steps with the eager tokens; one progress line; a persistent
cache that a second start reads; eager with one line saying why where it cannot be."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine import saved_step
from pangu_infer.engine.compiled import compile_cache_dir

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (4, 9, 30)]


def _token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_enforce_eager_is_a_flag_of_every_model_command_and_compiling_is_the_default():
    from pangu_infer.cli import add_model_arguments, build_parser, llm_kwargs

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert llm_kwargs(p.parse_args([]))["enforce_eager"] is False
    assert llm_kwargs(p.parse_args(["--enforce-eager"]))["enforce_eager"] is True
    parser = build_parser()
    for command in ("generate --prompt x", "chat", "serve", "bench"):
        args = parser.parse_args([*command.split(), "--enforce-eager"])
        assert args.enforce_eager is True, command


def test_a_missing_cxx_compiler_means_eager_with_one_line_saying_why(tiny_dense_dir, capfd):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/no/such/c++",)}):
        llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    assert llm.wait_compiled() is False  # the build thread took the caller's settings
    err = capfd.readouterr().err
    assert llm.engine.runner.decode_forward is None
    assert err.count("\n") == 1 and "compiled decode off: no C++ compiler found" in err
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))


def test_a_failing_compile_falls_back_to_eager_with_one_line_saying_why(tmp_path, tiny_dense_config, pangu_tokenizer_dir):
    """A compiler that answers --version but fails every build: inductor really fails (on a model
    of its own shape, so no cached kernel hides the failure), and the engine decodes eagerly with
    the eager tokens. In a process of its own: inductor keeps what it learnt about the compiler
    (its kind, its precompiled header) for the process, which would break later compiles here."""
    from fixtures_models import build_tiny_model

    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "broken 1.0" && exit 0\necho "no" >&2\nexit 1\n')
    broken.chmod(0o755)
    config = dict(tiny_dense_config, intermediate_size=tiny_dense_config["intermediate_size"] + 24)
    path = build_tiny_model(tmp_path / "model", config, pangu_tokenizer_dir, seed=7)
    script = (
        "import sys, torch._inductor.config as inductor_config\n"
        "from pangu_infer import LLM, SamplingParams\n"
        f"with inductor_config.patch({{'cpp.cxx': ({str(broken)!r},)}}):\n"
        f"    llm = LLM({str(path)!r}, dtype='float32', device='cpu', kv_cache_memory=4 << 20, max_model_len=256)\n"
        "assert llm.wait_compiled() is False and llm.engine.runner.decode_forward is None\n"
        "prompts = [{'prompt_token_ids': list(range(3, 3 + n))} for n in (4, 9, 30)]\n"
        "greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)\n"
        "print([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "compiling the decode step in the background" in lines[0]
    assert len(lines) == 2 and "compiled decode off: compiling failed" in lines[1] and "decoding eagerly" in lines[1]
    eager = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert proc.stdout.strip() == str(_token_ids(eager.generate(PROMPTS, GREEDY)))


def test_the_cache_lives_under_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "pangu-infer" / "torchinductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache_dir() == Path.home() / ".cache" / "pangu-infer" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_a_saved_step_loads_without_inductors_header_preprocessing(monkeypatch, tmp_path):
    """Inductor runs the preprocessor over its C++ wrapper's header before it looks for a built
    library (0.17 s a graph); a saved step's libraries are built: loaded with that step off."""
    import io

    from torch._inductor import config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = {"format": saved_step.FORMAT, "graph": [1, 16]}
    path = saved_step.step_file(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(json.dumps({"key": key, "choices": {}}).encode() + b"\n" + b"graph bytes")
    seen = []

    def load(f: io.BytesIO):
        seen.append((f.read(), inductor_config.cpp_cache_precompile_headers))
        return "graph"

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load)
    assert inductor_config.cpp_cache_precompile_headers
    assert saved_step.load(key) == "graph"
    assert seen == [(b"graph bytes", False)] and inductor_config.cpp_cache_precompile_headers


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="inductor probes x86 sets on Linux")
def test_inductors_instruction_set_probes_run_once_per_machine(tmp_path):
    """Inductor builds a test library per vector instruction set and loads each in a child Python in
    every process (1.5 s); the answer is kept per machine and a second process takes it unprobed,
    with the same list."""
    from pangu_infer.native import cxx_compiler

    if cxx_compiler() is None:
        pytest.skip("no C++ compiler")
    script = (
        "import json\n"
        "from torch._inductor import cpu_vec_isa\n"
        "from pangu_infer import native\n"
        "probes, real = [], cpu_vec_isa.VecISA._probe_load\n"
        "cpu_vec_isa.VecISA._probe_load = lambda self, path: probes.append(str(self)) or real(self, path)\n"
        "native.known_vec_isa()\n"
        "flags = cpu_vec_isa.x86_isa_checker()\n"
        "listed = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]\n"
        "print(json.dumps({'probes': probes, 'isa': [str(i) for i in cpu_vec_isa.valid_vec_isa_list()], 'listed': listed}))\n"
    )
    env = {**os.environ, "PANGU_INFER_KERNEL_CACHE": str(tmp_path / "kernels.json")}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["probes"] and first["isa"]  # probed, and what loaded kept
    stored = json.loads((tmp_path / "kernels.json").read_text())
    assert [len(v["inductor_vec_isa"]["loaded"]) > 0 for v in stored.values()] == [True]
    second = run()
    assert second["isa"] == first["isa"]
    if first["isa"] == first["listed"]:  # every set the CPU lists loaded: no probe the second time
        assert second["probes"] == []
    else:  # a set that failed here is probed each time, as inductor does
        assert 0 < len(second["probes"]) < len(first["probes"])


def test_a_second_start_reads_the_compiled_graphs_from_the_persistent_cache(tmp_path, tiny_moge_dir):
    """Two processes with an empty cache folder, each loading with compiled decode on and waiting
    for it: the first compiles (one progress line) and fills ~/.cache/pangu-infer (here
    $XDG_CACHE_HOME); the second compiles nothing new (inductor finds every graph in the cache).
    --stats prints the load time and where the compiled step stands. (The tiny MoGE model: its
    graphs are the cheapest to build. Saved steps off: this is torch.compile's own path, which
    CUDA, the batch-invariant mode and a failed save take; the saved one is the test below.)"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "PANGU_INFER_SAVED_STEPS": "0"}
    script = (
        "import sys; from pangu_infer import LLM, SamplingParams; from pangu_infer.cli import load_line\n"
        f"llm = LLM({str(tiny_moge_dir)!r}, dtype='float32', max_model_len=128, kv_cache_memory=4 << 20)\n"
        "print(load_line(llm), file=sys.stderr); assert llm.wait_compiled(); print(load_line(llm), file=sys.stderr)\n"
        "print(llm.generate('hello', SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids)\n"
    )
    graphs = tmp_path / "pangu-infer" / "torchinductor" / "fxgraph"

    def start() -> tuple[str, set[Path]]:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr, set(graphs.rglob("*"))

    out1, err1, files1 = start()
    assert err1.count("pangu-infer: compiling the decode step in the background") == 1
    assert "compiled decode building in the background]" in err1 and "compiled decode ready after " in err1
    assert any(f.is_file() for f in files1)
    out2, err2, files2 = start()
    assert files2 == files1  # nothing new compiled
    assert out2 == out1


def test_a_second_start_loads_the_saved_decode_step_instead_of_tracing_the_model(tmp_path, tiny_dense_dir):
    """A dense model's compiled step is saved whole (engine/saved_step.py): two processes with an
    empty cache folder, each waiting for the compiled step; the first traces and saves one file per
    graph, the second loads every graph from those files and dynamo traces no frame at all. Both
    decode the eager engine's greedy tokens (several context lengths and batch sizes: the batch-1
    and the dynamic-batch graphs)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = (
        "import json; from pangu_infer import LLM, SamplingParams\n"
        "from torch._dynamo.utils import counters\n"
        f"llm = LLM({str(tiny_dense_dir)!r}, dtype='float32', max_model_len=128, kv_cache_memory=4 << 20)\n"
        "assert llm.wait_compiled(), llm.engine.runner.compile_error\n"
        "step = llm.engine.runner.decode_forward\n"
        f"prompts = {PROMPTS!r}\n"
        "one = [llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids for p in prompts]\n"
        "many = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]\n"
        "print(json.dumps({'loaded': step.loaded, 'built': step.built, 'frames': counters['frames']['total'], 'one': one, 'many': many}))\n"
    )
    steps = tmp_path / "pangu-infer" / "torchinductor" / "pangu-infer-steps"

    def start() -> dict:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = start()
    saved = {f: f.stat().st_size for f in steps.glob("*.step")}
    assert first["built"] == len(saved) >= 2 and first["loaded"] == 0  # batch 1 and the dynamic batch
    second = start()
    assert second["loaded"] == len(saved) and second["built"] == 0
    assert second["frames"] == 0  # nothing traced
    assert {f: f.stat().st_size for f in steps.glob("*.step")} == saved
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=128, enforce_eager=True)
    expected = _token_ids(eager.generate(PROMPTS, GREEDY))
    assert first["one"] == first["many"] == second["one"] == second["many"] == expected


def test_the_background_build_warms_up_every_graph_a_request_uses(tiny_dense_dir):
    """The graphs a decode will use (batch 1, batch 1 past the unmasked-SDPA limit, larger
    batches) are all compiled by the background build: once it is ready, generating compiles no
    frame."""
    from torch._dynamo.utils import counters

    from pangu_infer.models.layers import UNMASKED_SDPA_MAX_CONTEXT as limit

    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=limit + 64)
    assert llm.wait_compiled() and llm.engine.runner.decode_forward is not None
    before = dict(counters["stats"])
    long_prompt = {"prompt_token_ids": [5] * (limit + 2)}
    llm.generate(PROMPTS, GREEDY)
    llm.generate(PROMPTS[:1], GREEDY)
    llm.generate(long_prompt, GREEDY)
    assert dict(counters["stats"]) == before
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS + [long_prompt], GREEDY)) == _token_ids(eager.generate(PROMPTS + [long_prompt], GREEDY))


@pytest.mark.parametrize("kind", ["r72b", "ultra"])
def test_the_pangu_moe_family_decodes_compiled_like_eager(kind, request, capfd):
    """R-72B-2512 (sinks beside the cache, K/V of two widths) and Ultra-MoE (MLA over a latent
    cache with no value tensor) build the compiled step by default, one graph saved whole (the
    expert dispatch is an operator inside it), and decode as eager does."""
    path = str(request.getfixturevalue(f"tiny_{kind}_dir"))
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    assert llm.wait_compiled(), capfd.readouterr().err
    assert isinstance(llm.engine.runner.decode_forward, saved_step.SavedStep)  # one graph, saved whole
    eager = LLM(path, dtype="float32", device="cpu", kv_cache_memory=16 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))


def test_requests_run_eagerly_while_compiling_and_switch_to_compiled_between_steps(tiny_dense_dir, monkeypatch):
    """The compiled step builds on a background thread (held back here until released): requests
    issued meanwhile are served eagerly with the eager tokens; a request decoding when it becomes
    ready switches to it at its next step and still gets the eager tokens; the build's warm-up
    leaves every slot the block pool hands out as it was (it runs beside live steps)."""
    import threading

    import pangu_infer.engine.runner as runner_module

    gate, real = threading.Event(), runner_module.build_decode_step
    monkeypatch.setattr(runner_module, "build_decode_step", lambda *a, **k: gate.wait(600) and real(*a, **k))
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    runner = llm.engine.runner
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    long_params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _token_ids(eager.generate(PROMPTS, GREEDY))
    expected_long = eager.generate(PROMPTS[2], long_params)[0].outputs[0].token_ids

    assert runner.compiling and runner.decode_forward is None
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == expected  # served eagerly meanwhile
    assert runner.compiling and not runner.wait_compiled(timeout=0.01)

    stream = llm.stream(PROMPTS[2], long_params)
    first = [next(stream) for _ in range(6)]  # prefill and 5 eager decode steps
    live = llm.engine.pool.num_blocks * llm.engine.pool.block_size  # the scratch block follows
    # As bytes: slots no sequence wrote yet hold whatever torch.empty found (NaN != NaN).
    before = [c[:live].view(torch.uint8).clone() for c in runner.k_caches + runner.v_caches]
    gate.set()
    assert llm.wait_compiled() and not runner.compiling
    assert all(torch.equal(c[:live].view(torch.uint8), b) for c, b in zip(runner.k_caches + runner.v_caches, before))
    compiled, calls = runner.decode_forward, []
    runner.decode_forward = lambda *a: calls.append(len(a[0])) or compiled(*a)
    last = list(stream)[-1]
    assert len(first) == 6 and calls == [1] * (24 - 6)  # the rest of the request ran compiled
    assert last.outputs[0].token_ids == expected_long
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == expected


def test_inductors_process_wide_fx_trace_never_runs_beside_an_eager_step(tiny_dense_dir, slow_fx_trace_build):
    """torch.fx's symbolic tracing replaces nn.Module.__call__ for the whole process while it runs;
    inductor traces one placeholder function that way once per process, in the middle of the
    background compile (loop_body.InterpreterShim._dummy_gm), and an eager step on the engine thread
    at that moment failed its request ("module is not installed as a submodule": a 500). Here that
    trace takes 1.5 s and the build does nothing else: every request served while it runs succeeds."""
    import time

    built = slow_fx_trace_build
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    expected = _token_ids(eager.generate(PROMPTS, GREEDY))
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    served = 0
    deadline = time.monotonic() + 120
    while not built.is_set() and time.monotonic() < deadline:  # from before the build starts to its end
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].finish_reason for o in outs] == ["length"] * len(PROMPTS)
        assert _token_ids(outs) == expected
        served += 1
    assert built.is_set() and served >= 1


def test_a_process_that_is_done_exits_while_the_compile_still_runs(tmp_path, tiny_dense_dir):
    """A short `LLM.generate` in a process with an empty compile cache: it answers while the
    compiled step is still building and exits right after, without waiting for the build, with
    no error on the way out. The build is stopped before the interpreter finalizes: a daemon
    thread still inside torch then is ended by CPython from within torch's C++ destructors, which
    aborted larger models' processes (exit status 134). The script's own exit handler, registered
    before the engine's and so run after it, sees the compile thread already ended."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    script = (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('alive at exit:', [t.name for t in threading.enumerate() if t.name == 'pangu-infer-compile'], flush=True))\n"
        "from pangu_infer import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_dense_dir)!r}, dtype='float32', max_model_len=2048, kv_cache_memory=4 << 20)\n"
        "out = llm.generate('hello', SamplingParams(temperature=0, max_tokens=2))[0]\n"
        "print(len(out.outputs[0].token_ids), llm.engine.runner.compiling, time.time(), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    import time

    ended = time.time()
    assert proc.returncode == 0, proc.stderr
    first, at_exit = proc.stdout.splitlines()
    tokens, compiling, done = first.split()
    assert (tokens, compiling) == ("2", "True")  # answered, eagerly, with the build still running
    assert at_exit == "alive at exit: []"  # stopped by the engine's exit handler
    assert ended - float(done) < 10  # no wait for the build (a cold one takes minutes here)
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_a_kv_cache_sized_from_free_memory_keeps_its_shape_when_free_memory_moves_a_little(tiny_dense_dir, monkeypatch):
    """The KV cache's shape is static in the compiled graphs: a default cache (a share of free
    memory) must not change shape with the few percent free memory moves between two starts, or
    every start compiles anew instead of reading the compile cache."""
    import pangu_infer.engine.engine as engine_module

    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    shapes = []
    for free in (15.0 * 2**30, 15.3 * 2**30, 15.6 * 2**30):
        monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device, free=free: int(free))
        config = engine_module.EngineConfig(enforce_eager=True, max_num_seqs=65536)
        engine = engine_module.LLMEngine(llm.model, llm.tokenizer, config, llm.generation_config)
        shapes.append(tuple(engine.runner.k_caches[0].shape))
        del engine
    assert len(set(shapes)) == 1, shapes
    assert shapes[0][0] < -(-llm.config.max_position_embeddings // 16) * 65536 * 16  # free memory decided it
    per_token = llm.config.kv_bytes_per_token(torch.float32)
    assert shapes[0][0] * per_token >= 15.0 * 2**30 // 4 * 7 / 8 - 16 * per_token  # at most 1/8 given up


def test_a_moge_step_is_one_graph_with_every_layer_in_it(tiny_moge_dir, caplog):
    """On CPU a MoGE step's expert dispatch is the opaque operator pangu_infer::moe_dispatch, so the
    whole step (every layer, the router, the load counters) is one graph, saved whole like a dense
    model's: no graph break at batch 1 or in the dynamic batch. (Before it, the dispatch broke the
    graph in every layer: dynamo compiled each layer's frame apart, with all guards on the modules,
    and a second start traced the model again.) Batches of 1 and 3: the eager tokens and expert
    counts."""
    model_dir = tiny_moge_dir
    kw = dict(dtype="float32", max_model_len=64, kv_cache_memory=4 << 20)
    caplog.set_level(logging.INFO, logger="pangu_infer.engine")
    llm = LLM(str(model_dir), **kw)
    assert llm.wait_compiled(), llm.engine.runner.compile_error
    step = llm.engine.runner.decode_forward
    # saved whole (built with fullgraph=True: a graph break would have raised): batch 1 and the dynamic batch
    assert isinstance(step, saved_step.SavedStep), caplog.text[-4000:]
    assert step.built + step.loaded >= 2
    warm = llm.moe_stats()["layers"]
    eager = LLM(str(model_dir), enforce_eager=True, **kw)
    for group in (PROMPTS[:1], PROMPTS):
        assert _token_ids(llm.generate(group, GREEDY)) == _token_ids(eager.generate(group, GREEDY))
    ours, theirs = llm.moe_stats()["layers"], eager.moe_stats()["layers"]
    for o, w, t in zip(ours, warm, theirs):  # the warm-up's dummy steps are counted too
        assert [a - b for a, b in zip(o["expert_tokens"], w["expert_tokens"])] == t["expert_tokens"]


def test_a_moge_model_of_the_same_shape_loads_the_saved_step_and_dispatches_its_own_experts(
    tmp_path, tiny_moge_dir, tiny_moge_config, pangu_tokenizer_dir,
):
    """The dispatch operator finds its block by a handle passed as a tensor (a graph input), not
    baked into the graph: a second MoGE model of the same shape in the process (other weights, other
    handles) loads the first one's saved step instead of compiling its own, and that step runs the
    second model's experts: each model decodes its own eager tokens, and they differ."""
    from fixtures_models import build_tiny_model

    other_dir = build_tiny_model(tmp_path / "other", tiny_moge_config, pangu_tokenizer_dir, seed=1)
    kw = dict(dtype="float32", max_model_len=64, kv_cache_memory=4 << 20)
    first = LLM(str(tiny_moge_dir), **kw)
    assert first.wait_compiled(), first.engine.runner.compile_error
    second = LLM(str(other_dir), **kw)
    assert second.wait_compiled(), second.engine.runner.compile_error
    step = second.engine.runner.decode_forward
    assert isinstance(step, saved_step.SavedStep) and step.built == 0 and step.loaded >= 2
    got = []
    for path, llm in ((tiny_moge_dir, first), (other_dir, second)):
        eager = LLM(str(path), enforce_eager=True, **kw)
        got.append(_token_ids(llm.generate(PROMPTS, GREEDY)))
        assert got[-1] == _token_ids(eager.generate(PROMPTS, GREEDY))
    assert got[0] != got[1]


def test_int4_moge_decodes_compiled_at_batch_1_through_the_fused_expert_op_like_eager(tiny_moge_dir, capfd):
    """With int4 experts on the own CPU kernel, a compiled batch-1 step runs each MoE layer as one
    op (no graph break, load counters added in the graph): the same tokens and expert counts as eager."""
    from pangu_infer.quant import cpu_int4
    from pangu_infer.quant.formats import QuantizationConfig
    from pangu_infer.quant.modules import QuantizedExperts

    if cpu_int4.library() is None:
        pytest.skip("no AVX-512 VNNI or no C compiler here")
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=16 << 20, quantization=QuantizationConfig("int4", 32))
    llm = LLM(str(tiny_moge_dir), **kw)
    assert llm.wait_compiled(), capfd.readouterr().err
    experts = [m for m in llm.engine.model.modules() if isinstance(m, QuantizedExperts)]
    if not experts or experts[0].w13.kernel != "int4_vnni":
        pytest.skip("the own int4 kernel is not chosen on this machine")
    eager = LLM(str(tiny_moge_dir), **kw, enforce_eager=True)
    # The warm-up's dummy steps are counted too (as they were when the counters ran eagerly): compare what came after.
    warm = llm.moe_stats()["layers"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt in PROMPTS[:2]:  # one request at a time: batch-1 steps
        assert _token_ids(llm.generate([prompt], params)) == _token_ids(eager.generate([prompt], params))
    ours, theirs = llm.moe_stats()["layers"], eager.moe_stats()["layers"]
    for o, w, t in zip(ours, warm, theirs):
        assert [a - b for a, b in zip(o["expert_tokens"], w["expert_tokens"])] == t["expert_tokens"]
        assert o["steps"] - w["steps"] == t["steps"] and o["tokens"] - w["tokens"] == t["tokens"]


def test_a_compiled_decode_calls_the_attention_kernel_through_its_cpp_operator(tiny_dense_dir, monkeypatch):
    """Where decode attention is the C kernel, the background build connects its C++ operator
    (pangu_infer.native_ops) before tracing: the compiled steps never enter the Python operator
    (broken here once the build is done) and give the eager tokens."""
    from pangu_infer import native_ops
    from pangu_infer.models import bi_attention_kernel
    from pangu_infer.models.layers import DECODE_ATTENTION_ENV
    from pangu_infer.native import cxx_compiler

    if cxx_compiler() is None or bi_attention_kernel.library() is None:
        pytest.skip("no C++ compiler, or the attention kernel does not run here")
    monkeypatch.setenv(DECODE_ATTENTION_ENV, "kernel")
    monkeypatch.delenv(native_ops.ENV, raising=False)
    monkeypatch.setitem(native_ops._connected, "attention", False)  # as in a new process: the build connects it
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    expected = _token_ids(eager.generate(PROMPTS, GREEDY))
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    assert llm.wait_compiled() and llm.engine.runner.decode_forward is not None
    assert all(llm.engine.runner.decode_kernel) and native_ops.connected("attention")

    def broken(*a, **k):
        raise AssertionError("the Python operator ran")

    monkeypatch.setattr(bi_attention_kernel, "run", broken)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == expected


def test_two_models_loaded_at_once_both_decode_compiled(tiny_dense_dir, tiny_moge_dir):
    """Two LLMs in one process build their compiled steps one after the other: built at once, one
    of them failed in dynamo ("using FX to symbolically trace a dynamo-optimized function") and
    decoded eagerly for the rest of the process."""
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=128)
    first, second = LLM(str(tiny_dense_dir), **kwargs), LLM(str(tiny_moge_dir), **kwargs)
    assert first.wait_compiled(), first.engine.runner.compile_error
    assert second.wait_compiled(), second.engine.runner.compile_error
    for path, llm in ((tiny_dense_dir, first), (tiny_moge_dir, second)):
        eager = LLM(str(path), enforce_eager=True, **kwargs)
        assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))


def test_a_one_token_prompt_chunk_beside_decodes_is_not_sampled_by_the_compiled_step(tiny_dense_dir):
    """A step budget of 3 tokens: two sequences decode while the third's prompt goes in one token at
    a time. Those one-token prompt chunks are no decodes: the compiled step (which samples every row)
    must not take that step, or the third sequence's first token comes from the middle of its prompt."""
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_num_batched_tokens=3)
    llm = LLM(str(tiny_dense_dir), **kw)
    assert llm.wait_compiled()
    prompts = [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8]}, {"prompt_token_ids": list(range(10, 20))}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = _token_ids(LLM(str(tiny_dense_dir), **kw, enforce_eager=True).generate(prompts, params))
    assert _token_ids(llm.generate(prompts, params)) == want


def test_speculative_drafts_are_verified_by_the_compiled_step(tiny_dense_dir):
    """A decode step with prompt-lookup drafts runs compiled: each drafted sequence's last token and
    draft tokens are rows of the decode step, and the text is the eager plain engine's."""
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    llm = LLM(str(tiny_dense_dir), **kw, num_speculative_tokens=3)
    assert llm.wait_compiled()
    runner = llm.engine.runner
    compiled, calls = runner.decode_forward, []
    runner.decode_forward = lambda *a: calls.append(len(a[0])) or compiled(*a)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 6}, {"prompt_token_ids": [9, 10, 11]}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _token_ids(LLM(str(tiny_dense_dir), **kw, enforce_eager=True).generate(prompts, params))
    assert _token_ids(llm.generate(prompts, params)) == want
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    assert any(rows > 2 for rows in calls)  # steps with drafts ran compiled


def test_a_compile_on_another_thread_beside_the_background_build_fails_neither(tiny_dense_dir, monkeypatch):
    """Inductor's TritonBundler holds one process-wide list of the compile in progress and asserts
    it empty when a compile begins: a compile of the user's own on another thread (a test's, seen in
    CI) beside the engine's background build failed one of them. Another thread's compile in
    progress is held open here while an LLM builds its step: the build succeeds."""
    from torch._inductor.triton_bundler import TritonBundler

    if not TritonBundler.is_enabled():
        pytest.skip("inductor's Triton bundling is off in this environment")
    monkeypatch.setenv("PANGU_INFER_SAVED_STEPS", "0")  # inductor's compile runs, even on its caches' hits (no saved step)
    TritonBundler.begin_compile()  # another thread's compile, in progress
    try:
        llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 22)
        assert llm.wait_compiled(timeout=540), llm.engine.runner.compile_error
    finally:
        TritonBundler.end_compile()


def test_no_module_asks_torchs_process_wide_compiling_flag():
    """torch.compiler.is_compiling() is True for the whole process while any thread compiles, so
    the eager steps served beside the background build took the graph's forms (tests/test_lora.py
    and tests/test_quant_prefill.py show two such bugs): the package asks device.tracing() instead."""
    import pangu_infer
    from pangu_infer.device import tracing

    root = Path(pangu_infer.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if "is_compiling(" in p.read_text()]
    assert users == [], users
    assert tracing() is False and torch.compile(lambda x: x + int(tracing()), fullgraph=True, backend="eager")(torch.zeros(1)).item() == 1


def _waiting_build(tiny_dense_dir):
    """An LLM whose background build waits for the process's compile lock (another model's build)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=4 << 20)
    assert llm.engine.runner.compiling
    return llm


def test_a_collected_llm_lets_its_background_build_go_and_its_model_with_it(tiny_dense_dir):
    """`del llm` while its decode step is still to be built (here: waiting behind another model's
    build) ends the build thread, which then no longer holds the model's memory nor keeps the
    lock's next waiter behind it."""
    import gc
    import time
    import weakref

    from pangu_infer.engine import runner as runner_module

    with runner_module._COMPILE_LOCK:  # another model's build, as long as this test needs
        llm = _waiting_build(tiny_dense_dir)
        model, done = weakref.ref(llm.model), llm.engine.runner._compiled_done
        del llm
        gc.collect()
        assert done.wait(20), "the build still waits for the lock with its LLM gone"
        deadline = time.monotonic() + 20
        while model() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        assert model() is None, "the model outlived its LLM"


def test_shutdown_lets_the_background_build_go_and_steps_run_eagerly(tiny_dense_dir):
    from pangu_infer.engine import runner as runner_module

    with runner_module._COMPILE_LOCK:
        llm = _waiting_build(tiny_dense_dir)
        want = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        llm.shutdown()
        assert not llm.wait_compiled(20)
        assert not llm.engine.runner.compiling and "stopped" in llm.engine.runner.compile_error
        got = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
