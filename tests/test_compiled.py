"""The default compiled decode path: compiled at load, never in a request; one progress line; a
persistent cache that a second start reads; eager with one line saying why where it cannot be."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pangu_infer import LLM, SamplingParams
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
    err = capfd.readouterr().err
    assert llm.engine.runner.decode_forward is None
    assert err.count("\n") == 1 and "compiled decode off: no C++ compiler found" in err
    eager = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))


def test_a_failing_compile_falls_back_to_eager_with_one_line_saying_why(
    tmp_path, tiny_dense_config, pangu_tokenizer_dir, capfd
):
    """A compiler that answers --version but fails every build: inductor really fails (on a model
    of its own shape, so no cached kernel hides the failure), and the engine decodes eagerly."""
    import torch._inductor.config as inductor_config
    from fixtures_models import build_tiny_model

    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "broken 1.0" && exit 0\necho "no" >&2\nexit 1\n')
    broken.chmod(0o755)
    config = dict(tiny_dense_config, intermediate_size=tiny_dense_config["intermediate_size"] + 24)
    path = build_tiny_model(tmp_path / "model", config, pangu_tokenizer_dir, seed=7)
    with inductor_config.patch({"cpp.cxx": (str(broken),)}):
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    err = capfd.readouterr().err
    assert llm.engine.runner.decode_forward is None
    lines = err.strip().splitlines()
    assert "compiling the decode step" in lines[0]
    assert len(lines) == 2 and "compiled decode off: compiling failed" in lines[1] and "decoding eagerly" in lines[1]
    eager = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))


def test_the_cache_lives_under_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "pangu-infer" / "torchinductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache_dir() == Path.home() / ".cache" / "pangu-infer" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_a_second_start_reads_the_compiled_graphs_from_the_persistent_cache(tmp_path, tiny_moge_dir):
    """Two `pangu-infer generate` processes with no flags and an empty cache folder: the first
    compiles at startup (one progress line) and fills ~/.cache/pangu-infer (here $XDG_CACHE_HOME);
    the second compiles nothing new (inductor finds every graph in the cache). --stats prints
    the load time. (The tiny MoGE model: its graphs are the cheapest to build.)"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pangu_infer.cli", "generate", "--model", str(tiny_moge_dir), "--dtype", "float32",
           "--prompt", "hello", "--max-tokens", "3", "--temperature", "0", "--max-model-len", "128",
           "--kv-cache-memory", "4MiB", "--stats"]
    graphs = tmp_path / "pangu-infer" / "torchinductor" / "fxgraph"

    def start() -> tuple[str, set[Path]]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr, set(graphs.rglob("*"))

    out1, err1, files1 = start()
    assert "pangu-infer: compiling the decode step (2 graphs" in err1 and " done in " in err1
    assert "[loaded in " in err1 and "of it compiling]" in err1
    assert any(f.is_file() for f in files1)
    out2, err2, files2 = start()
    assert files2 == files1  # nothing new compiled
    assert out2 == out1


def test_no_request_waits_for_a_compile(tiny_dense_dir):
    """The graphs a decode will use (batch 1, batch 1 past the unmasked-SDPA limit, larger
    batches) are compiled at load: generating afterwards compiles no frame."""
    from torch._dynamo.utils import counters

    from pangu_infer.models.layers import UNMASKED_SDPA_MAX_CONTEXT as limit

    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=limit + 64)
    assert llm.engine.runner.decode_forward is not None
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
    cache with no value tensor) build the compiled step by default and decode as eager does."""
    path = str(request.getfixturevalue(f"tiny_{kind}_dir"))
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    assert llm.engine.runner.decode_forward is not None, capfd.readouterr().err
    eager = LLM(path, dtype="float32", device="cpu", kv_cache_memory=16 << 20, enforce_eager=True)
    assert _token_ids(llm.generate(PROMPTS, GREEDY)) == _token_ids(eager.generate(PROMPTS, GREEDY))
