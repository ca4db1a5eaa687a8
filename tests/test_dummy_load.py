"""vLLM's load_format "dummy" (`--load-format dummy`, LLM(load_format="dummy")): a model folder's
config.json alone, with random weights, for timing a model without its weights. The weights are
loader.random's of seed 0, which the tiny test checkpoints hold too: a dummy load of a checkpoint's
config must then run exactly as the checkpoint does (whose own tests check it against transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pangu_infer import LLM, SamplingParams
from pangu_infer.loader.random import pangu_dense_config

ARGS = dict(dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
PROMPT = [{"prompt_token_ids": [5, 17, 42, 9]}]


def _without_weights(model_dir: Path, to: Path) -> Path:
    """The model folder's files but its weights (and a weights index naming shards that are not there)."""
    to.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, to / f.name)
    (to / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "model-00001-of-00009.safetensors"}}')
    return to


def _run(model: str, **kwargs) -> tuple[list[int], list[float]]:
    out = LLM(model, **{**ARGS, **kwargs}).generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [lp.logprob for lp in out.logprobs]


@pytest.mark.parametrize("quantization", ["none", "int4"])
@pytest.mark.parametrize("kind", ["dense", "moge"])
def test_a_dummy_load_of_a_checkpoints_config_runs_as_the_checkpoint(tmp_path, request, kind, quantization):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    config_only = _without_weights(model_dir, tmp_path / "config_only")
    with pytest.raises(ValueError, match="missing"):  # (nothing else to read there)
        LLM(str(config_only), **ARGS)
    real = _run(str(model_dir), quantization=quantization)
    assert _run(str(config_only), quantization=quantization, load_format="dummy") == real


def test_what_a_dummy_load_cannot_take_is_a_value_error_naming_it(tmp_path, tiny_moge_dir, smollm2_gguf_path):
    with pytest.raises(ValueError, match=r"load_format dummy: model '.*\.gguf' is a \.gguf file"):
        LLM(str(smollm2_gguf_path), load_format="dummy", **ARGS)
    with pytest.raises(ValueError, match=r"load_format dummy: the demo model is a \.gguf file"):
        LLM(load_format="dummy", **ARGS)
    with pytest.raises(ValueError, match=r"offload_experts=True .* load_format='dummy'"):
        LLM(str(tiny_moge_dir), load_format="dummy", offload_experts=True, **ARGS)
    with pytest.raises(ValueError, match=r"load_format='pt' must be one of auto, safetensors, gguf, dummy"):
        LLM(str(tiny_moge_dir), load_format="pt", **ARGS)
    with pytest.raises(ValueError, match=r"config file not found"):
        LLM(str(tmp_path), load_format="dummy", **ARGS)


def test_the_memory_check_reads_the_config(tmp_path, pangu_tokenizer_dir, monkeypatch):
    # a config far past this machine's memory is refused from the config alone, before anything is built
    import json

    from pangu_infer import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 30)
    model = tmp_path / "big"
    shutil.copytree(pangu_tokenizer_dir, model)
    (model / "config.json").write_text(json.dumps(pangu_dense_config(vocab_size=1000, hidden_size=4096, num_hidden_layers=32,
                                                                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=12800)))
    with pytest.raises(ValueError, match=r"needs about 23\.8 GiB of memory .* has 1\.0 GiB available: use --quantization int8 "
                                         r"\(about 5\.9 GiB\), or --quantization int4 \(about 3\.2 GiB\)"):
        LLM(str(model), load_format="dummy", **ARGS)


def test_a_hub_model_downloads_its_config_and_tokenizer_alone(monkeypatch, tmp_path, tiny_dense_dir):
    import huggingface_hub

    config_only = _without_weights(tiny_dense_dir, tmp_path / "config_only")
    patterns = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        patterns.append(allow_patterns)
        return str(tiny_dense_dir if "*.safetensors" in allow_patterns else config_only)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    real = _run("someone/tiny")
    assert _run("someone/tiny", load_format="dummy") == real
    from fnmatch import fnmatch

    def fetched(name: str, which: list[str]) -> bool:
        return any(fnmatch(name, p) for p in which)

    assert fetched("model-00001-of-00002.safetensors", patterns[0]) and not fetched("model-00001-of-00002.safetensors", patterns[1])
    assert all(fetched(name, patterns[1]) for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"))


def test_the_cli_flag(tmp_path, tiny_dense_dir, capsys):
    from pangu_infer.cli import build_parser, llm_kwargs, main

    config_only = _without_weights(tiny_dense_dir, tmp_path / "config_only")
    assert llm_kwargs(build_parser().parse_args(["serve", str(config_only), "--load-format", "dummy"]))["load_format"] == "dummy"
    assert main(["generate", "--model", str(config_only), "--load-format", "dummy", "--prompt", "hi", "--max-tokens", "3",
                 "--enforce-eager", "--kv-cache-memory", "4MiB", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_dummy_load_keeps_16_bit_matrices_as_its_checkpoint_would(tmp_path, tiny_dense_config, pangu_tokenizer_dir):
    # a float32 load of a checkpoint stored in bf16 keeps its matrices bf16 where that kernel is chosen
    # (models/bf16_weights.py): a dummy load of its config does the same, from the config's torch_dtype
    import torch

    from fixtures_models import build_tiny_model
    from pangu_infer.loader import kept_half_dtype

    config = {**tiny_dense_config, "torch_dtype": "bfloat16"}
    model_dir = build_tiny_model(tmp_path / "bf16", config, pangu_tokenizer_dir, dtype=torch.bfloat16)
    config_only = _without_weights(model_dir, tmp_path / "config_only")
    cpu = torch.device("cpu")
    kept = kept_half_dtype(str(model_dir), torch.float32, cpu, None, False)
    assert kept_half_dtype(str(config_only), torch.float32, cpu, None, False, dummy=True) == kept
    assert _run(str(config_only), load_format="dummy") == _run(str(model_dir))


def test_every_tensor_parallel_rank_builds_the_same_weights(tmp_path, tiny_moge_dir):
    # each rank draws the whole model's weights from the same seed and keeps its shard of them
    config_only = _without_weights(tiny_moge_dir, tmp_path / "config_only")
    llm = LLM(str(config_only), load_format="dummy", tensor_parallel_size=2, device="cpu", **ARGS)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPT, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == [_run(str(tiny_moge_dir))[0]]
