"""`pangu-infer plan`: parameters, weight and KV bytes, and the context that fits, from a config alone
or a .gguf file's header. The tests that check bfloat16 figures ask for --dtype bfloat16: the default
(auto) is what this machine's engine picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pangu_infer.cli import main
from pangu_infer.config import ModelConfig
from pangu_infer.loader.random import pangu_dense_config, pangu_moge_config
from pangu_infer.models.registry import build_model_on_meta, count_parameters
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
    rc, out, _ = _plan(capsys, "--model", str(PRO_MOE_72B), "--dtype", "bfloat16")
    assert rc == 0
    assert "71.99 B total, 16.50 B active (64 experts in 8 groups, 8 active per token)" in out
    assert f"{2 * PRO_MOE_72B_PARAMS / 1e9:.2f} GB (bfloat16)" in out
    assert f"{PRO_MOE_72B_KV_BF16:,} bytes per token = 192.0 KiB (bfloat16)" in out
    assert "context" not in out  # the fit table needs --memory-gb


def test_plan_accepts_a_config_json_path(capsys, monkeypatch):
    from pangu_infer.models import bf16_weights

    monkeypatch.setenv(bf16_weights.ENV, "0")  # float32 loads widen 16-bit matrices
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B / "config.json"), "--dtype", "float32")
    assert rc == 0
    assert "8.03 B total, 8.03 B active" in out
    assert "32.12 GB (float32)" in out
    assert f"{2 * 34 * 8 * 128 * 4:,} bytes per token" in out


def test_a_float32_cpu_load_keeps_the_bf16_matrices_its_config_names(capsys, monkeypatch):
    """Where a float32 CPU load keeps a bf16 checkpoint's matrices bf16 (load_serving_model), a plan
    from its config.json alone counts them so (torch_dtype says how the checkpoint stores them)."""
    from pangu_infer.models import bf16_weights

    if bf16_weights.library() is None:
        pytest.skip("the bf16-weight kernel needs x86 with AVX2 and FMA and a C compiler")
    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: torch.device("cpu"))
    monkeypatch.setenv(bf16_weights.ENV, "1")
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--dtype", "float32")
    assert rc == 0 and "16.06 GB (float32; the matrices kept in bfloat16, as its config's torch_dtype says)" in out


@pytest.mark.parametrize("packs", [False, True])
def test_a_bf16_plan_counts_the_tied_heads_packed_copy_where_a_load_packs(capsys, monkeypatch, tmp_path, packs):
    """Where load_serving_model packs bf16 linears for oneDNN (device.can_pack: an AVX-512 BF16 or AMX
    CPU), a tied LM head gets a packed copy of the embedding: the weights line and the bfloat16 row
    of a config.json alone count it (vocab x hidden x 2 bytes; the widths here are multiples of
    oneDNN's blocks, 64 rows x 32 columns on an AVX-512 BF16 EPYC, so nothing else is padded)."""
    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: torch.device("cpu"))
    monkeypatch.setattr("pangu_infer.device.can_pack", lambda device, dtype: packs and device.type == "cpu" and dtype == torch.bfloat16)
    monkeypatch.setattr("pangu_infer.models.packed.packed_blocks", lambda: (64, 32))
    config = pangu_dense_config(vocab_size=1024, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc, out, _ = _plan(capsys, "--model", str(tmp_path), "--dtype", "bfloat16", "--memory-gb", "0.001")
    assert rc == 0
    params = count_parameters(build_model_on_meta(ModelConfig.from_file(str(tmp_path))))
    head = 1024 * 64 * 2 if packs else 0
    weights = _weights_line_bytes(out)
    assert weights == 2 * params + head
    kv = ModelConfig.from_file(str(tmp_path)).kv_bytes_per_token(torch.bfloat16)
    assert _table(out)["bfloat16"].endswith(f"{(10**6 - weights) // kv:,}")
    assert _table(out)["float32"].endswith(f"{(10**6 - 4 * params) // (2 * kv):,}")  # a float32 load packs nothing


def test_plan_memory_budget_shows_context_that_fits_per_precision(capsys):
    rc, out, _ = _plan(capsys, "--model", str(PRO_MOE_72B), "--memory-gb", "160", "--dtype", "bfloat16")
    assert rc == 0
    # Where a bf16 CPU load packs the linears, oneDNN pads the head's 153,376 rows to its blocks.
    weights = _weights_line_bytes(out)
    assert 2 * PRO_MOE_72B_PARAMS <= weights <= 2 * PRO_MOE_72B_PARAMS + 64 * 5120 * 2
    tokens = (160 * 10**9 - weights) // PRO_MOE_72B_KV_BF16
    assert f"= {tokens:,} tokens of context" in out
    table = _table(out)
    assert "does not fit" in table["float32"] and "384.0 KiB" in table["float32"]
    assert table["bfloat16"].endswith(f"{tokens:,}")
    int8_tokens = int(table["int8"].rsplit(" ", 1)[1].replace(",", ""))
    int4_tokens = int(table["int4"].rsplit(" ", 1)[1].replace(",", ""))
    assert tokens < int8_tokens < int4_tokens


def test_plan_says_when_the_weights_do_not_fit(capsys):
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--memory-gb", "16", "--quantization", "int8", "--dtype", "bfloat16")
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
    assert rc == 2 and f"--model {str(weights)!r} is a file but neither a config.json nor a .gguf file" in err


def test_plan_names_an_unsupported_config(capsys, tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["GPT2LMHeadModel"]}')
    rc, _, err = _plan(capsys, "--model", str(path))
    assert rc == 2 and f"--model {str(path)!r}: unsupported architecture ['GPT2LMHeadModel']" in err


def test_plan_reads_the_quantization_of_a_pre_quantized_checkpoint(capsys, tmp_path: Path):
    config = pangu_moge_config(vocab_size=100, quantization_config=QuantizationConfig("int8").to_hf())
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc, out, _ = _plan(capsys, "--model", str(tmp_path), "--dtype", "bfloat16")
    assert rc == 0 and "(int8, float parts in bfloat16)" in out
    rc, _, err = _plan(capsys, "--model", str(tmp_path), "--quantization", "int4")
    assert rc == 2 and "quantization='int4' was asked for, but the checkpoint is pre-quantized with 'int8'" in err


def test_plan_takes_the_quantization_words_that_generate_and_serve_take(capsys, tmp_path: Path):
    """`auto` and `none` (generate's and serve's choices) keep a float checkpoint float and a
    pre-quantized one as stored; int4 quantizes the float one."""
    bf16 = ("--dtype", "bfloat16")
    rc, default, _ = _plan(capsys, "--model", str(EMBEDDED_7B), *bf16)
    assert rc == 0 and "(bfloat16)" in default
    for word in ("auto", "none"):
        rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--quantization", word, *bf16)
        assert rc == 0 and out == default
    rc, out, _ = _plan(capsys, "--model", str(EMBEDDED_7B), "--quantization", "int4", *bf16)
    assert rc == 0 and "(int4, float parts in bfloat16)" in out
    config = pangu_moge_config(vocab_size=100, quantization_config=QuantizationConfig("int8").to_hf())
    (tmp_path / "config.json").write_text(json.dumps(config))
    for word in ("auto", "none"):
        rc, out, _ = _plan(capsys, "--model", str(tmp_path), "--quantization", word, *bf16)
        assert rc == 0 and "(int8, float parts in bfloat16)" in out


# ------------------------------------------------------------------ .gguf files: the header alone


CPU = torch.device("cpu")


def _line(out: str, head: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(head))


def _weights_line_bytes(out: str) -> int:
    """The exact bytes at the end of the `weights` line."""
    return int(_line(out, "weights ").rsplit("= ", 1)[1].removesuffix(" bytes").replace(",", ""))


def _held(model) -> int:
    """Bytes of the loaded model's parameters and buffers (each tensor once); a oneDNN-packed weight
    as oneDNN allocated it (its blocked layout, padded: mkldnn._nbytes)."""
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta}
    return sum(_nbytes(t) for t in seen.values())


def _nbytes(t: torch.Tensor) -> int:
    return torch.ops.mkldnn._nbytes(t) if t.layout == torch._mkldnn else t.numel() * t.element_size()


@pytest.fixture(scope="module")
def tiny_f16_gguf(tmp_path_factory, tiny_sentencepiece_vocab) -> Path:
    """The tiny Pangu with its matrices F16, written as llama.cpp's converter writes them."""
    from fixtures_gguf import _tiny

    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", "F16").path


@pytest.mark.parametrize(
    "which, quantization",
    [("demo", "auto"), ("demo", "int8"), ("demo", "none"), ("q8_0", "auto"), ("f16", "auto")],
)
def test_plan_of_a_gguf_file_prints_the_weights_its_load_holds(
    capsys, monkeypatch, which, quantization, smollm2_gguf_path, tiny_pangu_gguf_q8_0, tiny_f16_gguf
):
    """The weights line is what load_serving_model (generate's and serve's load, on this machine's
    default dtype) holds: Q4_1 kept int4, Q8_0 int8, F16 as the loader keeps it, "none" float."""
    from pangu_infer.device import default_dtype
    from pangu_infer.loader import load_serving_model

    path = {"demo": smollm2_gguf_path, "q8_0": tiny_pangu_gguf_q8_0.path, "f16": tiny_f16_gguf}[which]
    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: CPU)  # loaded below on the CPU
    rc, out, err = _plan(capsys, "--model", str(path), "--quantization", quantization)
    assert rc == 0, err
    assert "(GGUF header)" in out.splitlines()[0]
    dtype = default_dtype(CPU)
    assert _line(out, "dtype ").startswith(f"dtype       {str(dtype).removeprefix('torch.')}, KV cache ")
    planned = _weights_line_bytes(out)
    held = _held(load_serving_model(str(path), dtype, CPU, load_tokenizer=False, quantization=quantization).model)
    assert abs(planned - held) <= 0.01 * held, (planned, held)
    if which == "demo" and quantization == "auto":
        assert "(as loaded: Q4_1 as int4 in groups of 32, F32 as " in out and "Q8_0 as int8" in out
    if which == "q8_0":
        assert "Q8_0 as int8" in out


def test_the_gguf_table_quantizes_as_the_loader_quantizes_that_file(capsys, smollm2_gguf_path):
    """The int8 and int4 rows of a .gguf file are what --quantization int8 / int4 load (int4 in groups of 32)."""
    rc, out, _ = _plan(capsys, "--model", str(smollm2_gguf_path), "--memory-gb", "1")
    assert rc == 0
    table = _table(out)
    for method in ("int8", "int4"):
        rc, asked, _ = _plan(capsys, "--model", str(smollm2_gguf_path), "--quantization", method)
        assert rc == 0 and f"{_weights_line_bytes(asked) / 10**6:.2f} MB" in table[method]
    assert "int4 in groups of 32" in asked


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_the_plans_dtype_and_kv_bytes_are_what_the_engine_allocates(capsys, monkeypatch, dtype, smollm2_gguf_path):
    """No --dtype: the model dtype and KV-cache dtype LLM picks with none given (float32 and a bf16
    cache on a CPU without native bf16); a dtype given is both. The KV bytes per token are the
    engine's cache bytes over its slots."""
    from pangu_infer import LLM

    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: CPU)  # the LLM below runs on the CPU
    rc, out, _ = _plan(capsys, "--model", str(smollm2_gguf_path), *(() if dtype is None else ("--dtype", dtype)))
    assert rc == 0
    llm = LLM(str(smollm2_gguf_path), device="cpu", kv_cache_memory=1 << 22, enforce_eager=True,
              **({} if dtype is None else {"dtype": dtype}))
    runner = llm.engine.runner
    caches = [c for c in runner.k_caches + runner.v_caches if c is not None]
    per_token = sum(c.numel() * c.element_size() for c in caches) // runner.k_caches[0].shape[0]
    name = str(llm.engine.dtype).removeprefix("torch."), str(llm.engine.kv_dtype).removeprefix("torch.")
    why = "auto: what generate and serve pick on this machine (cpu) when given no --dtype" if dtype is None else f"--dtype {dtype}"
    assert _line(out, "dtype ") == f"dtype       {name[0]}, KV cache {name[1]} ({why})"
    assert _line(out, "KV cache ").startswith(f"KV cache    {per_token:,} bytes per token")
    assert llm.config.kv_bytes_per_token(llm.engine.kv_dtype) == per_token


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2", "float32"])
def test_a_kv_cache_dtype_asked_is_what_the_engine_allocates(capsys, monkeypatch, kv, smollm2_gguf_path):
    """--kv-cache-dtype as generate and serve take it: the plan's bytes per token are the engine's
    cache bytes over its slots, and every row of the fit table counts them."""
    from pangu_infer import LLM

    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: CPU)
    rc, out, _ = _plan(capsys, "--model", str(smollm2_gguf_path), "--kv-cache-dtype", kv, "--memory-gb", "1")
    assert rc == 0
    runner = LLM(str(smollm2_gguf_path), device="cpu", kv_cache_memory=1 << 22, enforce_eager=True, kv_cache_dtype=kv).engine.runner
    per_token = sum(c.numel() * c.element_size() for c in runner.k_caches + runner.v_caches) // runner.k_caches[0].shape[0]
    name = str(runner.k_caches[0].dtype).removeprefix("torch.")
    assert _line(out, "KV cache ").startswith(f"KV cache    {per_token:,} bytes per token") and f"({name})" in _line(out, "KV cache ")
    assert f"--kv-cache-dtype {kv}" in _line(out, "dtype ")
    assert all(f"{per_token / 1024:>6.1f} KiB" in row for row in _table(out).values())


def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(capsys, smollm2_gguf_path, monkeypatch):
    import pangu_infer.device as device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: torch.device("cpu"))
    rc, out, _ = _plan(capsys, "--model", str(smollm2_gguf_path))
    assert rc == 0 and _line(out, "dtype ").startswith("dtype       bfloat16, KV cache bfloat16 (auto:")
    assert f"{30 * 2 * 3 * 64 * 2:,} bytes per token" in out  # SmolLM2-135M: 30 layers, 3 KV heads of 64


def test_plan_names_a_gguf_file_it_cannot_read(capsys, tmp_path: Path, smollm2_gguf_path):
    """Not GGUF, a header cut short, tensor data cut short, no such file: one line naming the file, exit 2,
    as the other plan errors."""
    from pangu_infer.loader.gguf_index import read_gguf_index

    data_offset = read_gguf_index(smollm2_gguf_path).data_offset
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(data_offset + 4096)  # the header and the start of the first tensor
    cases = {
        "magic.gguf": (b"GGML" + head[4:4096], "is not a GGUF file (it starts with b'GGML'"),
        "short.gguf": (b"GG", "is not a GGUF file"),
        "header.gguf": (head[:1000], "cannot read GGUF file: a string at byte"),
        "data.gguf": (head, "runs past the end of the file (truncated?)"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        rc, out, err = _plan(capsys, "--model", str(path))
        assert rc == 2 and out == "", name
        assert len(err.strip().splitlines()) == 1 and str(path) in err and message in err, (name, err)
        assert err.count(str(path)) == 1, err  # named once
    missing = tmp_path / "missing.gguf"
    rc, _, err = _plan(capsys, "--model", str(missing))
    assert rc == 2 and f"--model {str(missing)!r}: no such .gguf file" in err


@pytest.mark.parametrize("qtype, chosen", [("Q5_0", "1"), ("Q5_0", "0"), ("Q6_K", "1"), ("Q6_K", "0")])
def test_plan_of_a_q5_or_q6_k_file_names_the_codes_a_cpu_load_keeps(capsys, monkeypatch, tmp_path_factory, tiny_sentencepiece_vocab, qtype, chosen):
    """Q5 blocks kept with their 5-bit codes, Q6_K ones with their 6-bit codes (where the CPU kernel
    runs and that form is chosen), or as int8 rows: the plan says which, and its weights line is what
    the load holds (Q5_0 and Q6_K: the scales alone)."""
    from fixtures_gguf import _tiny, tiny_q6_k_gguf
    from pangu_infer.device import default_dtype
    from pangu_infer.loader import load_serving_model
    from pangu_infer.quant import cpu_int4

    if chosen == "1" and not cpu_int4.usable(256, 16):
        pytest.skip("the own int4 kernel does not run here")
    five = qtype == "Q5_0"
    monkeypatch.setenv(cpu_int4.FIVE_BIT_ENV if five else cpu_int4.SIX_BIT_ENV, chosen)
    cpu_int4.five_bit_chosen.cache_clear()
    cpu_int4.six_bit_chosen.cache_clear()
    try:
        if five:
            path = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", "Q5_0").path
        else:
            path = tiny_q6_k_gguf(tmp_path_factory.mktemp("q6_k") / "tiny-q6_k.gguf", tiny_sentencepiece_vocab)
        monkeypatch.setattr("pangu_infer.plan.resolve_device", lambda _: CPU)
        rc, out, err = _plan(capsys, "--model", str(path))
        assert rc == 0, err
        codes = "5-bit codes in groups of 32" if five else "6-bit codes in groups of 16"
        assert (f"{qtype} as int8 or {codes}," if chosen == "1" else f"{qtype} as int8,") in out
        planned = _weights_line_bytes(out)
        held = _held(load_serving_model(str(path), default_dtype(CPU), CPU, load_tokenizer=False).model)
        assert abs(planned - held) <= 0.01 * held, (planned, held)
    finally:
        cpu_int4.five_bit_chosen.cache_clear()
        cpu_int4.six_bit_chosen.cache_clear()
