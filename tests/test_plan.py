"""`pangu-infer plan`: parameters, weight and KV bytes, and the context that fits, from a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pangu_infer.cli import main
from pangu_infer.config import ModelConfig
from pangu_infer.loader.random import pangu_dense_config, pangu_moge_config
from pangu_infer.models.registry import build_model_on_meta
from pangu_infer.plan import weight_bytes
from pangu_infer.quant.formats import QuantizationConfig

MODELS = Path(__file__).resolve().parent / "data" / "models"
PRO_MOE_72B = MODELS / "pangu-pro-moe-72b"
EMBEDDED_7B = MODELS / "openpangu-embedded-7b"
PRO_MOE_72B_PARAMS = 71_988_781_056
PRO_MOE_72B_KV_BF16 = 192 * 1024


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["plan", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _table(out: str) -> dict[str, str]:
    """precision -> its row of the fit table."""
    rows = {}
    for line in out.splitlines():
        first = line.split(" ", 1)[0]
        if first in ("float32", "bfloat16", "int8", "int4"):
            rows[first] = line
    return rows


def test_plan_prints_the_72b_parameters_weights_and_kv_bytes(capsys):
    rc, out, _ = _plan(capsys, "--model", str(PRO_MOE_72B))
    assert rc == 0
    assert "71.99 B total, 16.50 B active (64 experts in 8 groups, 8 active per token)" in out
    assert f"{2 * PRO_MOE_72B_PARAMS / 1e9:.2f} GB (bfloat16)" in out
    assert f"{PRO_MOE_72B_KV_BF16:,} bytes per token = 192.0 KiB (bfloat16)" in out
    assert "context" not in out  # the fit table needs --memory-gb


def test_plan_accepts_a_config_json_path(capsys):
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B / "config.json"), "--dtype", "float32")
    assert rc == 0
    assert "8.03 B total, 8.03 B active" in out
    assert "32.12 GB (float32)" in out
    assert f"{2 * 34 * 8 * 128 * 4:,} bytes per token" in out


def test_plan_memory_budget_shows_context_that_fits_per_precision(capsys):
    rc, out, _ = _plan(capsys, "--model", str(PRO_MOE_72B), "--memory-gb", "160")
    assert rc == 0
    tokens = (160 * 10**9 - 2 * PRO_MOE_72B_PARAMS) // PRO_MOE_72B_KV_BF16
    assert f"= {tokens:,} tokens of context" in out
    table = _table(out)
    assert "does not fit" in table["float32"] and "384.0 KiB" in table["float32"]
    assert table["bfloat16"].endswith(f"{tokens:,}")
    int8_tokens = int(table["int8"].rsplit(" ", 1)[1].replace(",", ""))
    int4_tokens = int(table["int4"].rsplit(" ", 1)[1].replace(",", ""))
    assert tokens < int8_tokens < int4_tokens


def test_plan_says_when_the_weights_do_not_fit(capsys):
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--memory-gb", "16", "--quantization", "int8")
    assert rc == 0
    assert "(int8, float parts in bfloat16)" in out
    table = _table(out)
    assert "does not fit" in table["bfloat16"]
    assert "does not fit" not in table["int8"]


def _int8_bytes(shapes: list[tuple[int, ...]]) -> int:
    """One byte per weight plus a bf16 scale per output row (per expert for stacked experts)."""
    total = 0
    for shape in shapes:
        rows = 1
        for d in shape[:-1]:
            rows *= d
        total += rows * shape[-1] + 2 * rows
    return total


def test_weight_bytes_of_a_float_model_is_parameters_times_element_size():
    model = build_model_on_meta(ModelConfig.from_hf_dict(pangu_moge_config(vocab_size=100)))
    n = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model, torch.float32, None) == 4 * n
    assert weight_bytes(model, torch.bfloat16, None) == 2 * n


def test_int8_weight_bytes_quantize_linears_and_experts_but_keep_router_norms_and_biases_float():
    vocab, hidden, layers, experts, inter, shared = 100, 64, 2, 64, 32, 64
    cfg = pangu_moge_config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_experts=experts,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared,
    )
    model = build_model_on_meta(ModelConfig.from_hf_dict(cfg))
    qkv = hidden + 2 * 2 * 16  # 4 query heads and 2 kv heads of 16
    per_layer = [
        (qkv, hidden),  # qkv_proj
        (hidden, hidden),  # o_proj
        (experts, 2 * inter, hidden),  # w13
        (experts, hidden, inter),  # w2
        (2 * shared, hidden),  # shared expert gate_up
        (hidden, shared),  # shared expert down
    ]
    quantized = _int8_bytes([(vocab, hidden), (vocab, hidden)] + per_layer * layers)  # embedding, lm_head
    float_per_layer = 2 * hidden + qkv + hidden + experts * hidden + experts  # norms, biases, router, scale
    floats = layers * float_per_layer + hidden  # + the final norm
    assert weight_bytes(model, torch.bfloat16, "int8") == quantized + 2 * floats


def test_int4_weights_are_smaller_than_int8_and_smaller_groups_cost_more():
    model = build_model_on_meta(ModelConfig.from_hf_dict(pangu_dense_config(vocab_size=256, hidden_size=256)))
    int8 = weight_bytes(model, torch.bfloat16, "int8")
    assert weight_bytes(model, torch.bfloat16, "int4", 128) < weight_bytes(model, torch.bfloat16, "int4", 32) < int8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory-gb", "0"], "invalid --memory-gb '0': expected a positive number of GB"),
        (["--memory-gb", "lots"], "invalid --memory-gb 'lots'"),
        (["--quantization", "int3"], "invalid choice: 'int3'"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
    ],
)
def test_plan_rejects_bad_flags_naming_the_value(capsys, args: list[str], message: str):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", str(PRO_MOE_72B), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_rejects_a_group_size_without_int4(capsys):
    rc, _, err = _plan(capsys, "--model", str(PRO_MOE_72B), "--quantization", "int8", "--group-size", "64")
    assert rc == 2
    assert "--group-size 64 applies to --quantization int4 only, got --quantization int8" in err


def test_plan_names_a_missing_or_wrong_model_path(capsys, tmp_path: Path, tiny_dense_dir: Path):
    rc, _, err = _plan(capsys, "--model", str(tmp_path / "nowhere"))
    assert rc == 2 and f"config file not found: {tmp_path / 'nowhere'}" in err
    weights = tiny_dense_dir / "model.safetensors"
    rc, _, err = _plan(capsys, "--model", str(weights))
    assert rc == 2 and f"--model {str(weights)!r} is a file but not a config.json" in err


def test_plan_names_an_unsupported_config(capsys, tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["GPT2LMHeadModel"]}')
    rc, _, err = _plan(capsys, "--model", str(path))
    assert rc == 2 and f"--model {str(path)!r}: unsupported architecture ['GPT2LMHeadModel']" in err


def test_plan_reads_the_quantization_of_a_pre_quantized_checkpoint(capsys, tmp_path: Path):
    config = pangu_moge_config(vocab_size=100, quantization_config=QuantizationConfig("int8").to_hf())
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc, out, _ = _plan(capsys, "--model", str(tmp_path))
    assert rc == 0 and "(int8, float parts in bfloat16)" in out
    rc, _, err = _plan(capsys, "--model", str(tmp_path), "--quantization", "int4")
    assert rc == 2 and "quantization='int4' was asked for, but the checkpoint is pre-quantized with 'int8'" in err


def test_plan_takes_the_quantization_words_that_generate_and_serve_take(capsys, tmp_path: Path):
    """`auto` and `none` (generate's and serve's choices) keep a float checkpoint float and a
    pre-quantized one as stored; int4 quantizes the float one."""
    rc, default, _ = _plan(capsys, "--model", str(EMBEDDED_7B))
    assert rc == 0 and "(bfloat16)" in default
    for word in ("auto", "none"):
        rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--quantization", word)
        assert rc == 0 and out == default
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--quantization", "int4")
    assert rc == 0 and "(int4, float parts in bfloat16)" in out
    config = pangu_moge_config(vocab_size=100, quantization_config=QuantizationConfig("int8").to_hf())
    (tmp_path / "config.json").write_text(json.dumps(config))
    for word in ("auto", "none"):
        rc, out, _ = _plan(capsys, "--model", str(tmp_path), "--quantization", word)
        assert rc == 0 and "(int8, float parts in bfloat16)" in out
