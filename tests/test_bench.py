"""`pangu-infer bench`: what it prints, how it counts weight bytes, how it rejects bad flags."""

from __future__ import annotations

import random
import re

import pytest

from pangu_infer.bench import REPEAT_PERIOD, make_prompt, percentile, weight_bytes_per_token
from pangu_infer.cli import main
from pangu_infer.config import ModelConfig
from pangu_infer.loader import load_model
from pangu_infer.models.registry import count_active_parameters

FAST = ["--prompt-len", "64", "--output-len", "6", "--num-iters", "1", "--concurrency", "3",
        "--bandwidth-buffer", "64MiB", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB",
        "--enforce-eager"]


def _value(text: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}\s+([0-9.]+)", text, re.M)
    assert match, f"{label!r} missing from:\n{text}"
    return float(match.group(1))


def test_bench_prints_latency_bandwidth_and_throughput(tiny_dense_dir, capsys):
    assert main(["bench", "--model", str(tiny_dense_dir), *FAST]) == 0
    out = capsys.readouterr().out
    for label in ("prefill", "decode (1 stream)", "weights read per token", "achieved bandwidth", "memory bandwidth"):
        assert _value(out, label) > 0
    assert re.search(r"^TTFT median / p90\s+[0-9.]+ / [0-9.]+ ms", out, re.M)
    assert re.search(r"^TPOT median / p90\s+[0-9.]+ / [0-9.]+ ms", out, re.M)
    assert re.search(r"^throughput @3\s+[0-9.]+ tokens/s \(18 tokens in", out, re.M)
    assert "decode reaches" in out
    assert "draft acceptance" not in out  # speculation is off by default


def test_bench_header_counts_the_parameters_of_quantized_models_too(tiny_dense_dir, tiny_dense_config, capsys):
    from pangu_infer.models.registry import build_model_on_meta, count_parameters

    expected = count_parameters(build_model_on_meta(ModelConfig.from_hf_dict(tiny_dense_config)))
    argv = ["bench", "--model", str(tiny_dense_dir), *FAST, "--mode", "latency"]
    assert main([*argv, "--quantization", "int4"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"{expected / 1e6:.1f} M parameters" in header and "int4" in header


def test_bench_of_a_dummy_load_says_its_weights_are_random(tiny_dense_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "config_only"
    shutil.copytree(tiny_dense_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["bench", "--model", str(folder), *FAST, "--mode", "latency", "--load-format", "dummy", "--quantization", "int4"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "int4, random weights (--load-format dummy)" in header


def test_bench_reports_draft_acceptance_with_prompt_lookup(tiny_dense_dir, capsys):
    argv = ["bench", "--model", str(tiny_dense_dir), *FAST, "--mode", "latency",
            "--prompt-kind", "repeat", "--num-speculative-tokens", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert 0 <= _value(out, "draft acceptance") <= 100
    assert "throughput @" not in out  # latency mode only


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt-len", "0"], "--prompt-len 0"),
        (["--concurrency", "-2"], "--concurrency -2"),
        (["--prompt-kind", "repeat", "--prompt-len", "40"], "--prompt-len 40"),
        (["--bandwidth-buffer", "1KiB"], "--bandwidth-buffer 1024"),
    ],
)
def test_bench_rejects_bad_sizes_naming_the_flag(tiny_dense_dir, capsys, flags, message):
    assert main(["bench", "--model", str(tiny_dense_dir), *flags]) == 2
    assert message in capsys.readouterr().err


def test_weight_bytes_skip_the_untied_embedding_table(tiny_dense_dir, tiny_dense_config):
    import torch

    model = load_model(str(tiny_dense_dir), torch.float32, torch.device("cpu"), load_tokenizer=False).model
    cfg = ModelConfig.from_hf_dict(tiny_dense_config)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())  # the rotary frequencies
    assert weight_bytes_per_token(model) == 4 * (params + buffers - cfg.vocab_size * cfg.hidden_size)


def test_weight_bytes_count_one_expert_per_group_for_moge(tiny_moge_dir, tiny_moge_config):
    import torch

    model = load_model(str(tiny_moge_dir), torch.bfloat16, torch.device("cpu"), load_tokenizer=False).model
    cfg = ModelConfig.from_hf_dict(tiny_moge_config)
    active = count_active_parameters(model) - cfg.vocab_size * cfg.hidden_size
    rotary = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes_per_token(model) == 2 * active + rotary


def test_repeat_prompts_repeat_one_block():
    prompt = make_prompt("repeat", 3 * REPEAT_PERIOD + 5, vocab=1000, rng=random.Random(0))
    assert len(prompt) == 3 * REPEAT_PERIOD + 5
    assert prompt[:REPEAT_PERIOD] == prompt[REPEAT_PERIOD : 2 * REPEAT_PERIOD]
    assert all(2 <= t < 1000 for t in prompt)


def test_percentile_interpolates_between_samples():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0


def test_bench_runs_every_request_with_a_lora_adapter(tiny_dense_dir, lora_adapters, capsys, monkeypatch):
    """`bench --lora PATH`: every request (latency, warm-up and throughput) runs with the adapter,
    and the weights read per token count its slots (the decode step reads them)."""
    from pangu_infer.engine.engine import LLMEngine

    seen, real = [], LLMEngine.add_request
    monkeypatch.setattr(LLMEngine, "add_request", lambda self, rid, ids, params, *a, **kw: seen.append(kw.get("lora_request")) or real(self, rid, ids, params, *a, **kw))
    assert main(["bench", "--model", str(tiny_dense_dir), *FAST]) == 0
    plain = _value(capsys.readouterr().out, "weights read per token")
    seen.clear()
    path = str(lora_adapters["full"].path)
    assert main(["bench", "--model", str(tiny_dense_dir), *FAST, "--lora", path]) == 0
    out = capsys.readouterr().out
    assert f"LoRA adapter {path}" in out
    assert len(seen) == 2 + 3 + 2 and all(r is not None and r.lora_path == path for r in seen)
    assert _value(out, "weights read per token") > plain
