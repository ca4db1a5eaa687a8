"""GGUF files stay quantized: each block type checked against the gguf package's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_gguf import _tiny, one_tensor_gguf, passage_perplexity
from pangu_infer.loader import load_model
from pangu_infer.loader.gguf_tensors import convert, kept_method
from pangu_infer.quant.formats import QuantizationConfig, dequantize
from pangu_infer.quant.modules import PackedWeight, QuantizedEmbedding, QuantizedLinear

CPU = torch.device("cpu")
BF16_REL = 2.0**-8  # a value rounded to bf16 moves by at most half its last place: 2^-9 relative (2^-8 with margin)
N, K = 40, 512  # rows, columns: K a multiple of the K-quants' 256


def _random_blocks(qtype, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a type without a quantizer in gguf (the K-quants), with sane f16 scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    Q = gguf.GGMLQuantizationType
    f16 = lambda n: rng.uniform(0.001, 0.02, size=(rows, k // block, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[..., 0:4] = f16(2)  # d, dmin
    elif qtype == Q.Q6_K:
        raw[..., size - 2 :] = f16(1)  # d comes last
    return raw.reshape(rows, -1)


def _gguf_tensor(tmp_path, qtype_name: str, seed: int = 0):
    """One [N, K] tensor of this type written with gguf's writer and read back with its reader."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * 0.05 + rng.uniform(-0.02, 0.02, size=(N, 1))).astype(np.float32)
    try:
        data = gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        data = _random_blocks(qtype, N, K, rng)
    t = one_tensor_gguf(tmp_path / f"{qtype_name}.gguf", data, qtype)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(N, K)
    return t, ref


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_blocks_load_as_int4_with_only_the_bf16_rounding_of_scales(tmp_path, qtype):
    """Q4 codes go in unchanged: the only difference from gguf's dequantization is the scale and zero
    rounded to bf16, at most 8 |scale| + |zero| times 2^-9 per weight (a code off by one is |scale|)."""
    t, ref = _gguf_tensor(tmp_path, qtype)
    assert kept_method(t.tensor_type) == "int4"
    qt = convert(t, QuantizationConfig("int4", 32))
    assert qt.method == "int4" and qt.group_size == 32 and qt.shape == (N, K)
    got = dequantize(qt)
    scale = qt.scale.float().repeat_interleave(32, -1)
    zero = qt.zero.float().repeat_interleave(32, -1)
    bound = (8 * scale.abs() + zero.abs()) * BF16_REL + 1e-7
    err = (got - ref).abs()
    assert (err <= bound).all(), float((err - bound).max())
    live = bound < scale.abs() / 4  # where the rounding is below a quarter step, so is the error:
    assert live.float().mean() > 0.5 and (err[live] < scale[live].abs() / 4).all()  # every code is the file's own


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_other_block_types_load_as_int8_within_half_a_step(tmp_path, qtype):
    t, ref = _gguf_tensor(tmp_path, qtype)
    assert kept_method(t.tensor_type) == "int8"
    qt = convert(t, QuantizationConfig("int8"))
    assert qt.method == "int8" and qt.qweight.dtype == torch.int8 and qt.shape == (N, K)
    step = ref.abs().amax(-1, keepdim=True) / 127
    err = (dequantize(qt) - ref).abs()
    assert (err <= 0.5 * step * (1 + 2**-6) + 1e-7).all()  # the stored scale: rounded up one bf16 step
    assert err.max() > 0  # re-rounded, as documented


def test_any_type_converts_to_int4_when_asked(tmp_path):
    """--quantization int4 on a Q8_0 file: dequantized by gguf, re-quantized into int4 groups of 32."""
    t, ref = _gguf_tensor(tmp_path, "Q8_0")
    qt = convert(t, QuantizationConfig("int4", 32))
    groups = ref.reshape(N, K // 32, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (dequantize(qt) - ref).reshape(N, K // 32, 32).abs()
    assert (err <= (0.5 * step * (1 + 2**-6))[..., None] + 1e-6).all()


# ----------------------------------------------------------------------------- whole files


def _kernels(model) -> dict[str, str]:
    return {n: m.method for n, m in model.named_modules() if isinstance(m, PackedWeight)}


@pytest.fixture(scope="module")
def tiny_q4_1_llama(tmp_path_factory, tiny_sentencepiece_vocab):
    """llama arch (Q/K rows permuted by the converter) with every matrix Q4_1."""
    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "llama", "Q4_1")


def _assert_same_weights(kept, plain, method: str) -> None:
    """Every quantized linear, read back through its kernel (x = identity, so y = W^T in bf16),
    equals the float model's weight (gguf's own dequantization) within the stated rounding."""
    plain_modules = dict(plain.named_modules())
    checked = 0
    for name, m in kept.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        ref = plain_modules[name].weight.float()
        with torch.inference_mode():
            got = m.weight(torch.eye(ref.shape[1])).t().float()
        row_max = ref.abs().amax(-1, keepdim=True)
        # int4 / int5 / int6: bf16 scale/zero and the bf16 output; int8: half a step of the row's max, re-rounded
        tol = row_max * (2**-6 if method in ("int4", "int5", "int6") else 1 / 254 * (1 + 2**-6)) + ref.abs() * 2**-8
        assert (got - ref).abs().le(tol).all(), name
        checked += 1
    assert checked


@pytest.mark.parametrize("qtype,method", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q8_0", "int8")])
def test_tiny_file_stays_quantized_by_default_and_matches_its_dequantized_self(
    tmp_path_factory, tiny_sentencepiece_vocab, qtype, method
):
    tiny = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", qtype)
    kept = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False)  # no quantization argument
    plain = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    kinds = _kernels(kept.model)
    assert kinds and set(kinds.values()) == {method}
    assert len(kinds) == 4 * 2 + 1  # qkv, o, gate_up, down per layer, and the untied head
    assert isinstance(kept.model.model.embed_tokens, QuantizedEmbedding)
    assert not _kernels(plain.model)
    _assert_same_weights(kept.model, plain.model, method)


def test_q4_0_weights_keep_only_their_scales_in_the_own_kernels_layout(tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch):
    """Q4_0 (w = (q - 8) d: every zero 0) packs 1 value per group and row for the own int4 kernel
    (Q4_1: scale and zero, 2), and its products still match gguf's dequantization."""
    from pangu_infer.quant import cpu_int4

    if cpu_int4.library() is None:
        pytest.skip("the own int4 kernel does not run here")
    monkeypatch.setenv(cpu_int4.ENV, "own")
    cpu_int4.chosen.cache_clear()
    try:
        for qtype, values in (("Q4_0", 1), ("Q4_1", 2)):
            tiny = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", qtype)
            kept = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False)
            own = [m for m in kept.model.modules() if isinstance(m, PackedWeight) and m.kernel == "int4_vnni"]
            assert len(own) == 4 * 2 + 1 and all(m.scales.shape[-2:] == (values, 16) for m in own), qtype
            plain = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False, quantization="none")
            _assert_same_weights(kept.model, plain.model, "int4")
    finally:
        cpu_int4.chosen.cache_clear()


def _codes_here(monkeypatch, bits: int, on: bool) -> None:
    """5-bit codes for Q5 blocks (bits 5: PANGU_INFER_INT5) or 6-bit ones for Q6_K blocks (6:
    PANGU_INFER_INT6) chosen (=1, unmeasured) or not (=0) from now on."""
    from pangu_infer.quant import cpu_int4

    if on and (cpu_int4.library() is None or not cpu_int4.usable(256, 16)):
        pytest.skip("the own int4 kernel does not run here")
    monkeypatch.setenv(cpu_int4.FIVE_BIT_ENV if bits == 5 else cpu_int4.SIX_BIT_ENV, "1" if on else "0")
    (cpu_int4.five_bit_chosen if bits == 5 else cpu_int4.six_bit_chosen).cache_clear()


@pytest.fixture
def _codes_default():
    from pangu_infer.quant import cpu_int4

    yield
    cpu_int4.five_bit_chosen.cache_clear()
    cpu_int4.six_bit_chosen.cache_clear()


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_q5_files_keep_their_5_bit_codes_with_only_the_bf16_rounding_of_scales(tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch, _codes_default, qtype):
    """Where the 5-bit kernel is chosen, every Q5 linear keeps the file's codes (cpu_int4's 5-bit
    layout, kernel "int5"): read back through the kernel it is gguf's dequantization within the bf16
    rounding of scale and zero (as Q4 files); with PANGU_INFER_INT5=0 the same file loads as int8 rows,
    as before."""
    from pangu_infer.quant import cpu_int4

    _codes_here(monkeypatch, 5, True)
    tiny = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", qtype)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    kept = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False)
    plain = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    kinds = {n: m.kernel for n, m in kept.model.named_modules() if isinstance(m, PackedWeight)}
    assert len(kinds) == 4 * 2 + 1 and set(kinds.values()) == {"int5"}
    assert all(m.hb.shape == (*m.data.shape[:2], 16) for m in kept.model.modules() if isinstance(m, PackedWeight))
    assert all(m.scales.shape[-2] == (1 if qtype == "Q5_0" else 2) for m in kept.model.modules() if isinstance(m, PackedWeight))
    _assert_same_weights(kept.model, plain.model, "int5")
    _codes_here(monkeypatch, 5, False)
    rows = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False)
    assert set(_kernels(rows.model).values()) == {"int8"}
    # the logits of both within the quantizations' error of the dequantized model's (this random tiny
    # model amplifies each product's bf16 rounding, about 0.3%, to about 5% of its logits)
    ids = torch.tensor([1, 5, 9, 4, 7])
    with torch.inference_mode():
        want, five, eight = (m.compute_logits(m(ids, torch.arange(5))).double() for m in (plain.model, kept.model, rows.model))
    for got in (five, eight):
        assert ((got - want).norm() / want.norm()).item() < 0.1
    assert cpu_int4.five_bit_chosen() is False


def test_a_fused_weight_with_a_piece_of_another_type_keeps_int8_rows(tmp_path, tiny_sentencepiece_vocab, monkeypatch, _codes_default):
    """Q5_0 q and k beside a Q8_0 v (as Q5_K_M files keep some v in Q6_K): that layer's q/k/v is one
    int8 weight (no piece laid out with 5-bit codes), every other linear keeps 5-bit codes."""
    import gguf

    from fixtures_gguf import tiny_pangu_config, tiny_pangu_tensors, write_gguf

    _codes_here(monkeypatch, 5, True)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    config = tiny_pangu_config(tiny_sentencepiece_vocab)
    Q = gguf.GGMLQuantizationType
    path = write_gguf(tmp_path / "mixed.gguf", arch="pangu-embedded", config=config, tensors=tiny_pangu_tensors(config),
                      vocab=tiny_sentencepiece_vocab, qtype=Q.Q5_0, qtypes={"model.layers.1.self_attn.v_proj.weight": Q.Q8_0})
    kept = load_model(str(path), torch.float32, CPU, load_tokenizer=False)
    kinds = {n: m.kernel for n, m in kept.model.named_modules() if isinstance(m, PackedWeight)}
    assert {n for n, k in kinds.items() if k != "int5"} == {"model.layers.1.self_attn.qkv_proj.weight"}
    assert kinds["model.layers.1.self_attn.qkv_proj.weight"] == "int8"
    plain = load_model(str(path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    ids = torch.tensor([1, 5, 9, 4, 7])
    with torch.inference_mode():
        got, want = (m.compute_logits(m(ids, torch.arange(5))).double() for m in (kept.model, plain.model))
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_llama_qk_unpermute_applies_to_quantized_rows(tiny_q4_1_llama):
    kept = load_model(str(tiny_q4_1_llama.path), torch.float32, CPU, load_tokenizer=False)
    plain = load_model(str(tiny_q4_1_llama.path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    qkv = kept.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.method == "int4"
    _assert_same_weights(kept.model, plain.model, "int4")


def test_bad_quantization_names_the_value(tiny_q4_1_llama):
    with pytest.raises(ValueError, match="'fp8'"):
        load_model(str(tiny_q4_1_llama.path), torch.float32, CPU, load_tokenizer=False, quantization="fp8")


def test_demo_model_perplexity_as_loaded_is_within_1_percent_of_bf16(smollm2_gguf_path):
    """SmolLM2 Q4_1 (its embedding Q8_0) kept quantized vs dequantized to bf16, on real text."""
    out = {}
    for q in ("auto", "none"):
        loaded = load_model(str(smollm2_gguf_path), torch.bfloat16, CPU, quantization=q)
        out[q] = passage_perplexity(loaded)
        if q == "auto":
            assert set(_kernels(loaded.model).values()) == {"int4", "int8"}  # Q4_1 linears, Q8_0 tied head
    assert abs(out["auto"] / out["none"] - 1) < 0.01, out


def test_q5_blocks_take_int8_rows_where_the_measurement_chose_them(tmp_path_factory, tiny_sentencepiece_vocab, monkeypatch, tmp_path, _codes_default):
    """Where int8 rows measured faster than the 5-bit product (kept per machine, measured once), a Q5
    file loads as int8 rows, and its memory estimate counts them so; where 5-bit codes won, as them."""
    import json

    from pangu_infer.loader import weights_bytes
    from pangu_infer.quant import cpu_int4, tuning

    if cpu_int4.library() is None or not cpu_int4.usable(64, 32):
        pytest.skip("the own int4 kernel does not run here")
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(cache))
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    monkeypatch.delenv(cpu_int4.FIVE_BIT_ENV, raising=False)
    tiny = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", "Q5_1")
    calls, held, estimate = [], {}, {}
    for own, kernel in ((2.0, "int8"), (1.0, "int5")):
        monkeypatch.setattr(cpu_int4, "measure_five_bit", lambda own=own: calls.append(1) or {"own": own, "aten": 1.5})
        cpu_int4.five_bit_chosen.cache_clear()
        cache.unlink(missing_ok=True)
        kept = load_model(str(tiny.path), torch.float32, CPU, load_tokenizer=False)
        assert set(_kernels(kept.model).values()) == {kernel}
        held[kernel] = sum(t.nbytes for m in kept.model.modules() if isinstance(m, PackedWeight) for t in m.buffers())
        estimate[kernel] = weights_bytes(str(tiny.path), torch.float32, "auto", False)
        assert json.loads(cache.read_text())[tuning.machine_key()]["int5_decode_kernel" + cpu_int4.tag()] == ("own" if kernel == "int5" else "aten")
    assert len(calls) == 2  # once per measurement kept, not per load or estimate
    saved = held["int8"] - held["int5"]
    assert saved > 0 and abs((estimate["int8"] - estimate["int5"]) - saved) <= 0.1 * saved


# ------------------------------------------------------------------ Q6_K files (6-bit codes)


from fixtures_gguf import tiny_q6_k_gguf  # noqa: E402


def test_q6_k_files_keep_their_6_bit_codes_with_only_the_bf16_rounding_of_scales(tmp_path, tiny_sentencepiece_vocab, monkeypatch, _codes_default):
    """Where the 6-bit form is chosen, every Q6_K linear (the head included) keeps the file's codes
    (cpu_int4's 6-bit layout, groups of 16, scales only; kernel "int6"): read back through the kernel
    it is gguf's dequantization within the bf16 rounding of the scales; the memory estimate counts
    those bytes; with PANGU_INFER_INT6=0 the same file loads as int8 rows, as before."""
    from pangu_infer.loader import weights_bytes
    from pangu_infer.quant import cpu_int4

    _codes_here(monkeypatch, 6, True)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    path = tiny_q6_k_gguf(tmp_path / "tiny-q6_k.gguf", tiny_sentencepiece_vocab)
    kept = load_model(str(path), torch.float32, CPU, load_tokenizer=False)
    plain = load_model(str(path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    packed = {n: m for n, m in kept.model.named_modules() if isinstance(m, PackedWeight)}
    assert len(packed) == 4 * 2 + 1 and {m.kernel for m in packed.values()} == {"int6"}
    assert all(m.hb.shape == (*m.data.shape[:2], 32) and m.scales.shape[-2] == 1 and m.group_size == 16 for m in packed.values())
    _assert_same_weights(kept.model, plain.model, "int6")
    held = {"int6": sum(t.nbytes for m in packed.values() for t in m.buffers())}
    estimate = {"int6": weights_bytes(str(path), torch.float32, "auto", False)}
    _codes_here(monkeypatch, 6, False)
    rows = load_model(str(path), torch.float32, CPU, load_tokenizer=False)
    assert set(_kernels(rows.model).values()) == {"int8"}
    held["int8"] = sum(t.nbytes for m in rows.model.modules() if isinstance(m, PackedWeight) for t in m.buffers())
    estimate["int8"] = weights_bytes(str(path), torch.float32, "auto", False)
    saved = held["int8"] - held["int6"]
    assert saved > 0 and abs((estimate["int8"] - estimate["int6"]) - saved) <= 0.1 * saved
    ids = torch.tensor([1, 5, 9, 4, 7])
    with torch.inference_mode():
        want, six, eight = (m.compute_logits(m(ids, torch.arange(5))).double() for m in (plain.model, kept.model, rows.model))
    # the logits within the quantizations' error of the dequantized model's (amplified by this random
    # model, as for Q5 files); the 6-bit form, the file's own codes, closer than int8 rows re-rounded
    # from them (0.070 against 0.103 here)
    six_err, eight_err = (((got - want).norm() / want.norm()).item() for got in (six, eight))
    assert six_err < 0.1 and six_err < eight_err < 0.15
    assert cpu_int4.six_bit_chosen() is False


def test_a_fused_weight_with_a_q6_k_piece_among_q4_ones_keeps_int8_rows(tmp_path, tiny_sentencepiece_vocab, monkeypatch, _codes_default):
    """Q4_0 q and k beside a Q6_K v (llama.cpp's Q4_K_M has Q4_K ones there; gguf-py cannot write
    Q4_K): that q/k/v is one int8 weight; the Q6_K down projections and head alone keep 6-bit codes,
    the Q4 linears int4."""
    import gguf

    Q = gguf.GGMLQuantizationType
    _codes_here(monkeypatch, 6, True)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    q4 = {f"model.layers.{i}.{n}.weight": Q.Q4_0 for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    q4["model.layers.1.self_attn.v_proj.weight"] = Q.Q4_0
    q4["model.embed_tokens.weight"] = Q.Q4_0
    path = tiny_q6_k_gguf(tmp_path / "tiny-q6_k.gguf", tiny_sentencepiece_vocab, qtypes=q4)
    kept = load_model(str(path), torch.float32, CPU, load_tokenizer=False)
    kinds = {n: m.kernel for n, m in kept.model.named_modules() if isinstance(m, PackedWeight)}
    assert kinds["model.layers.0.self_attn.qkv_proj.weight"] == "int8"  # Q4_0 q, k and a Q6_K v
    assert kinds["model.layers.1.self_attn.qkv_proj.weight"] == "int4_vnni"
    assert {n for n, k in kinds.items() if k == "int6"} == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"}
    plain = load_model(str(path), torch.float32, CPU, load_tokenizer=False, quantization="none")
    ids = torch.tensor([1, 5, 9, 4, 7])
    with torch.inference_mode():
        got, want = (m.compute_logits(m(ids, torch.arange(5))).double() for m in (kept.model, plain.model))
    assert ((got - want).norm() / want.norm()).item() < 0.1
