"""The compiled weight conversions of quantized products with many rows (pangu_infer.quant.prefill)."""

from __future__ import annotations


import pytest
import torch

from fixtures_gguf import passage_perplexity
from pangu_infer.engine.compiled import compile_problem
from pangu_infer.loader import load_model
from pangu_infer.quant import cpu_int8, prefill
from pangu_infer.quant.formats import QuantizationConfig, dequantize, quantize
from pangu_infer.quant.modules import PackedWeight, prepare_prefill

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(compile_problem(CPU) is not None, reason="no C++ compiler for inductor here")


@pytest.fixture(scope="module", autouse=True)
def built():
    before = prefill._lib
    assert prefill.prepare() is None
    assert prefill.ready()
    yield
    prefill._lib = before  # other test files see the process as they found it


def _packed_int4(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = (torch.randn(k // group, n, 2, generator=g) * 0.05).to(torch.bfloat16)
    return data, scales


@pytest.mark.parametrize("n, k, group", [(64, 64, 32), (192, 576, 32), (320, 256, 64), (128, 512, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int4_conversion_equals_the_eager_one(n, k, group, threads):
    data, scales = _packed_int4(n, k, group)
    want = prefill._int4_eager(data, group, scales)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = prefill.int4_to_bf16(data, group, scales)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (k, n) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_the_conversions_run_their_loops_while_another_thread_compiles(monkeypatch, compiling_elsewhere):
    """The engine compiles its decode step on a background thread while requests prefill eagerly:
    those prefills convert through the loops, not the formulas kept for a graph being traced."""
    def eager(*a, **k):
        raise AssertionError("the eager formula ran in a thread that is not tracing")

    monkeypatch.setattr(prefill, "_int8_eager", eager)
    monkeypatch.setattr(prefill, "_int4_eager", eager)
    g = torch.Generator().manual_seed(3)
    w8 = torch.randint(-128, 128, (64, 64), dtype=torch.int8, generator=g)
    s8 = (torch.rand(64, generator=g) * 0.02).to(torch.bfloat16)
    assert torch.equal(prefill.int8_to_bf16(w8, s8), (w8.float() * s8.float()[:, None]).to(torch.bfloat16))
    data, scales = _packed_int4(64, 64, 32)
    assert prefill.int4_to_bf16(data, 32, scales).shape == (64, 64)


@pytest.mark.parametrize("n, k", [(64, 64), (208, 576), (200, 576), (7, 48)])
def test_int8_conversion_folds_the_scale_rounding_once(n, k):
    g = torch.Generator().manual_seed(1)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) * 0.02).to(torch.bfloat16)
    got = prefill.int8_to_bf16(w8, s8)
    assert torch.equal(got, (w8.float() * s8.float()[:, None]).to(torch.bfloat16))
    assert torch.equal(got, prefill._int8_eager(w8, s8))
    w_t = torch.empty(k, n, dtype=torch.bfloat16)
    if prefill._lib[2](w8.data_ptr(), s8.data_ptr(), w_t.data_ptr(), n, k, 1):  # AVX-512, n % 16 == 0
        assert n % 16 == 0 and torch.equal(w_t, got.t())
    x = torch.randn(33, k, dtype=torch.bfloat16)
    ref = x.float() @ got.float().t()
    assert torch.allclose(prefill.int8_product(x, w8, s8).float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_many_row_products_match_the_dequantized_weight_and_the_eager_conversion(monkeypatch, method):
    w = torch.randn(192, 256)
    qt = quantize(w, QuantizationConfig(method, 32))
    packed = PackedWeight(qt, CPU)
    packed.convert_min_rows = 16
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    y = packed(x)
    ref = x.float() @ dequantize(qt).T
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    monkeypatch.setenv(prefill.ENV, "0")  # the eager conversion: the same weight, so the same product
    assert torch.equal(packed(x), y)


def test_two_weights_of_one_shape_each_get_their_own_numbers():
    """The converted weight lives in a buffer shared by the shape; each product reads its own."""
    a, b = (PackedWeight(quantize(torch.randn(128, 128) * s, QuantizationConfig("int4", 32)), CPU) for s in (1, 3))
    a.convert_min_rows = b.convert_min_rows = 1
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    ya, yb = a(x), b(x)
    assert not torch.equal(ya, yb)
    assert torch.equal(a(x), ya) and torch.equal(b(x), yb)


def test_turned_off_or_unbuilt_runs_the_eager_conversion(monkeypatch):
    data, scales = _packed_int4(64, 64, 32)

    def boom(*args):
        raise AssertionError("the compiled conversion ran")

    monkeypatch.setattr(prefill, "_lib", (boom, boom))
    monkeypatch.setenv(prefill.ENV, "0")
    assert torch.equal(prefill.int4_to_bf16(data, 32, scales), prefill._int4_eager(data, 32, scales))
    assert prefill.prepare() == f"{prefill.ENV}=0"
    monkeypatch.delenv(prefill.ENV)
    with pytest.raises(AssertionError, match="compiled conversion ran"):
        prefill.int4_to_bf16(data, 32, scales)
    monkeypatch.setattr(prefill, "_lib", None)
    assert torch.equal(prefill.int4_to_bf16(data, 32, scales), prefill._int4_eager(data, 32, scales))


@pytest.mark.parametrize("int4_kernel", ["aten", "own"])
def test_demo_model_perplexity_with_compiled_conversions_is_within_1_percent_of_bf16(monkeypatch, smollm2_gguf_path, int4_kernel):
    """Every product of the passage converts (int4 linears, the int8 tied head) through the loops:
    from aten's int4 layout, or from cpu_int4's where that kernel runs (its library's C loop)."""
    from pangu_infer.quant import cpu_int4

    if int4_kernel == "own" and cpu_int4.library() is None:
        pytest.skip("no AVX-512 VNNI or AVX2, or no C compiler: cpu_int4 does not run here")
    from pangu_infer.quant import tuning

    monkeypatch.setenv(cpu_int4.ENV, int4_kernel)
    cpu_int4.library.cache_clear()
    cpu_int4.chosen.cache_clear()
    monkeypatch.setenv("PANGU_INFER_AMX_PREFILL", "0")  # the conversions, not quant/amx.py's kernel (tests/test_quant_amx.py)
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT4", "16")
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT4_VNNI", "16")
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT8", "16")
    calls = []
    for name in ("int4_to_bf16", "int8_to_bf16", "int8_product"):
        real = getattr(prefill, name)
        monkeypatch.setattr(prefill, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    real_vnni = cpu_int4.to_bf16_t
    monkeypatch.setattr(cpu_int4, "to_bf16_t", lambda *a: calls.append("int4_to_bf16") or real_vnni(*a))
    real_packed = prefill.int4_vnni_packed_product

    def packed(*a):
        y = real_packed(*a)
        calls.append("int4_to_bf16" if y is None else "int4_into_packed")
        return y

    import pangu_infer.quant.modules as modules

    monkeypatch.setattr(modules, "int4_to_bf16", prefill.int4_to_bf16)
    monkeypatch.setattr(prefill, "int4_vnni_packed_product", packed)  # what prefill.int4_vnni_product calls
    monkeypatch.setattr(modules, "int8_product", prefill.int8_product)
    out = {}
    for q in ("auto", "none"):
        loaded = load_model(str(smollm2_gguf_path), torch.bfloat16, CPU, quantization=q)
        assert prepare_prefill(loaded.model) is None
        out[q] = passage_perplexity(loaded)
    assert "int8_product" in calls
    # cpu_int4's layout converts into oneDNN's packed layout where that layout is checked here
    int4_calls = {"int4_into_packed"} if int4_kernel == "own" and prefill.packed_layout_ok(576, 576) else {"int4_to_bf16"}
    if int4_kernel == "aten" and not tuning.int4_cpu_layout_ok():
        int4_calls = set()  # aten's int4 layout of this ISA is not the one the loop reads: the kernel runs instead
    assert int4_calls <= set(calls), calls
    assert abs(out["auto"] / out["none"] - 1) < 0.01, out
    cpu_int4.library.cache_clear()
    cpu_int4.chosen.cache_clear()


def test_prepare_sets_the_rows_measured_for_the_compiled_conversion(tmp_path, monkeypatch):
    from pangu_infer.quant import cpu_int4, tuning

    monkeypatch.setenv(cpu_int4.ENV, "aten")  # int4 weights in aten's layout (the one prefill.py converts)
    cpu_int4.library.cache_clear()
    cpu_int4.chosen.cache_clear()
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "measure", lambda kind: {"int4": 48, "int8": 80}[kind])
    model = torch.nn.ModuleList(
        PackedWeight(quantize(torch.randn(n, 64), QuantizationConfig(m, 32)), CPU)
        for n, m in ((128, "int4"), (40, "int4"), (64, "int8"))
    )
    assert prepare_prefill(model) is None
    # 40 rows: not whole 64-row blocks; none where aten's int4 layout on this ISA is not the one converted
    layout_ok = tuning.int4_cpu_layout_ok()
    assert [w.convert_min_rows for w in model] == [48 if layout_ok else tuning.NEVER, tuning.NEVER, 80]
    cpu_int4.library.cache_clear()
    cpu_int4.chosen.cache_clear()
    stored = (tmp_path / "kernels.json").read_text()
    # (kept apart for quant/cpu_int8.py's kernel where it runs the few-row products here)
    assert ("int8_own_convert_min_rows_compiled" if cpu_int8.usable(tuning.BENCH_K) else "int8_convert_min_rows_compiled") in stored
    assert ("int4_convert_min_rows_compiled" in stored) == layout_ok


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_traced_many_row_product_uses_the_eager_formula(method):
    """Dynamo cannot trace the ctypes call: a compiled graph with many rows (a big decode batch)
    takes the eager conversion, whole (fullgraph), with the same numbers."""
    packed = PackedWeight(quantize(torch.randn(128, 64), QuantizationConfig(method, 32)), CPU)
    packed.convert_min_rows = 16
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = packed(x)
        got = torch.compile(packed, fullgraph=True, dynamic=False)(x)
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("compiled", [True, False])
def test_a_conversion_buffer_made_in_inference_mode_is_not_reused_outside_it(compiled, monkeypatch):
    """The per-shape buffer of a conversion is written in place: one made under inference_mode
    (the engine's steps) must not be handed to a product run outside it (a user's own call),
    where the eager conversion's in-place write would raise."""
    if not compiled:
        monkeypatch.setenv(prefill.ENV, "0")
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=g)
    s8 = (torch.rand(64, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(40, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        inside = prefill.int8_product(x, w8, s8)
    outside = prefill.int8_product(x, w8, s8)
    assert torch.equal(inside, outside)


# ---------------------------------------------------------------------------------- into oneDNN's packed layout


def _vnni_weight(n: int, k: int, group: int, seed: int = 0):
    from pangu_infer.quant import cpu_int4

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    data, sz = cpu_int4.pack(q, torch.rand(n, k // group, generator=g) * 0.05, torch.rand(n, k // group, generator=g) * 0.05 - 0.025)
    return data, sz, cpu_int4.dequantize_t(data, sz, group).t().contiguous()  # W [n, k] bf16


def _int8_weight(n: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) * 0.02).to(torch.bfloat16)
    return w8, s8, prefill._int8_eager(w8, s8)


def _bf16_peer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bf16 model's product: the same weight laid out by oneDNN at load (models/packed.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")


SHAPES = [(32, 64), (32, 96), (96, 576), (192, 576), (64, 1536)]  # 96: the 64-column steps and a 32-column tail
needs_packed = pytest.mark.skipif(not prefill.packed_layout_ok(32, 64), reason="oneDNN's packed bf16 layout is not the one checked here")


@needs_packed
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_conversions_into_the_packed_layout_write_what_onednn_reorder_writes(n, k, threads):
    """Bitwise: the loops' output is oneDNN's own reorder of the eager conversion."""
    rb = prefill.packed_rows(n, k)
    data, sz, w4 = _vnni_weight(n, k, 32)
    got4 = prefill._to_packed_raw(prefill._lib[3], (data, sz, 32), n, k, rb, threads)
    assert torch.equal(got4.view(torch.int16), prefill._mkldnn_raw(torch.ops.mkldnn._reorder_linear_weight(w4)).view(torch.int16))
    w8, s8, w8b = _int8_weight(n, k)
    got8 = prefill._to_packed_raw(prefill._lib[4], (w8, s8), n, k, rb, threads)
    assert torch.equal(got8.view(torch.int16), prefill._mkldnn_raw(torch.ops.mkldnn._reorder_linear_weight(w8b)).view(torch.int16))


@needs_packed
@pytest.mark.parametrize("n, k", SHAPES)
def test_packed_products_equal_the_bf16_peer_on_the_same_weight(n, k):
    """The same additions as the bf16 model's product (bitwise); against the plain-weight product
    they were before (oneDNN re-laid the weight: other blocking, other order of additions), within
    bf16 rounding of the output."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(67, k, generator=g).to(torch.bfloat16)
    data, sz, w4 = _vnni_weight(n, k, 32)
    y4 = prefill.int4_vnni_packed_product(x, data, sz, 32)
    w8, s8, w8b = _int8_weight(n, k)
    y8 = prefill.int8_packed_product(x, w8, s8)
    assert y4 is not None and y8 is not None
    for y, w in ((y4, w4), (y8, w8b)):
        assert torch.equal(y, _bf16_peer(x, w))
        plain = torch.nn.functional.linear(x, w).float()
        assert torch.allclose(y.float(), plain, rtol=2**-7, atol=2**-7 * plain.abs().max().item())
    assert torch.equal(prefill.int8_product(x, w8, s8), y8)  # int8 products take it


@needs_packed
def test_packed_path_turned_off_or_layout_unchecked_falls_back_to_plain_wt(monkeypatch):
    from pangu_infer.quant import cpu_int4

    w = torch.randn(192, 256)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    for method in ("int4", "int8"):
        weight = PackedWeight(quantize(w, QuantizationConfig(method, 32)), CPU)
        if weight.kernel not in ("int8", "int4_vnni"):
            continue
        weight.convert_min_rows = 16
        y = weight(x)
        if weight.kernel == "int8":
            w_bf16 = prefill._int8_eager(weight.data, weight.scales)
        else:
            w_bf16 = cpu_int4.dequantize_t(weight.data, weight.scales, 32).t()[: weight.out_features]
        assert torch.equal(y, _bf16_peer(x, w_bf16.contiguous()))
        for env, value in ((prefill.PACKED_ENV, "0"), (prefill.ENV, "0")):
            monkeypatch.setenv(env, value)
            assert prefill.int8_packed_product(x, *_int8_weight(192, 256)[:2]) is None
            off = weight(x)
            assert torch.allclose(off.float(), y.float(), rtol=2**-7, atol=2**-7 * y.float().abs().max().item())
            monkeypatch.delenv(env)
        monkeypatch.setattr(prefill, "packed_rows", lambda n, k: 0)  # a oneDNN laying weights out otherwise
        assert prefill.int8_packed_product(x, *_int8_weight(192, 256)[:2]) is None
        assert torch.allclose(weight(x).float(), y.float(), rtol=2**-7, atol=2**-7 * y.float().abs().max().item())
        monkeypatch.undo()


@pytest.mark.parametrize("n, k", [(32, 64), (96, 576), (64, 1536)])
def test_many_row_int4_products_of_a_scales_only_weight_give_its_2_value_forms_bits(n, k):
    """cpu_int4's layout with scales only (zeros all 0, GGUF's Q4_0) converted for a product of many
    rows (into oneDNN's packed layout where checked, else W^T by the library's C loop): bitwise what
    the same weight with its zeros stored gives, and so is the packed conversion itself."""
    from pangu_infer.quant import cpu_int4

    if cpu_int4.library() is None:
        pytest.skip("no AVX-512 VNNI or AVX2, or no C compiler: cpu_int4 does not run here")
    ready = prefill.prepare() is None
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.05
    data, sz = cpu_int4.pack(q, scale, None)
    _, sz2 = cpu_int4.pack(q, scale, torch.zeros_like(scale))
    assert sz.shape[2] == 1 and sz2.shape[2] == 2
    x = torch.randn(67, k, generator=g).to(torch.bfloat16)
    assert torch.equal(prefill.int4_vnni_product(x, data, sz, 32), prefill.int4_vnni_product(x, data, sz2, 32))
    if ready and prefill.packed_layout_ok(n, k):
        rb = prefill.packed_rows(n, k)
        for threads in (1, 2):
            got, want = (prefill._to_packed_raw(prefill._lib[3], (data, s, 32), n, k, rb, threads) for s in (sz, sz2))
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_packed_layout_check_refuses_a_layout_it_does_not_write(monkeypatch):
    prefill.packed_rows.cache_clear()
    try:
        monkeypatch.setattr(prefill, "_PACKED_ROW_BLOCKS", (64,))  # not what oneDNN writes for 32 rows
        assert prefill.packed_rows(32, 64) == 0
        assert not prefill.packed_layout_ok(48, 64)  # 48 rows: padded by oneDNN, never written
    finally:
        prefill.packed_rows.cache_clear()


@needs_packed
@pytest.mark.parametrize("kb", ["8", "0"])
def test_a_weight_bigger_than_a_slice_is_converted_and_multiplied_slice_by_slice(monkeypatch, kb):
    """Slices of at most PANGU_INFER_PACKED_SLICE_KB (here 8 KB; 96 x 576 bf16 is 108 KB, so
    slices of one 32-row block each, the smallest whole block) give each output column the bf16
    peer's product of that slice's weights; 0 converts the weight whole."""
    monkeypatch.setenv(prefill.SLICE_ENV, kb)
    n, k = 96, 576
    g = torch.Generator().manual_seed(3)
    x = torch.randn(45, k, generator=g).to(torch.bfloat16)
    data, sz, w4 = _vnni_weight(n, k, 32)
    w8, s8, w8b = _int8_weight(n, k)
    step = prefill._slice_rows(n, k, prefill.packed_rows(n, k))
    assert (step < n) == (kb != "0")
    calls = []
    real = prefill._packed_linear
    monkeypatch.setattr(prefill, "_packed_linear", lambda *a: calls.append(1) or real(*a))
    for y, w in ((prefill.int4_vnni_packed_product(x, data, sz, 32), w4), (prefill.int8_packed_product(x, w8, s8), w8b)):
        assert y is not None and y.shape == (45, n)
        want = torch.cat([_bf16_peer(x, w[a : a + step].contiguous()) for a in range(0, n, step)], 1)
        assert torch.equal(y, want)
        plain = torch.nn.functional.linear(x, w).float()
        assert torch.allclose(y.float(), plain, rtol=2**-7, atol=2**-7 * plain.abs().max().item())
    assert len(calls) == 2 * -(-n // step)
