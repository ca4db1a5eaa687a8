"""The int4 decode kernel of pangu_infer.quant.cpu_int4 (x86 CPUs with AVX-512 VNNI, or AVX2 and FMA):
layout and numbers against the dequantized weight and aten's kernel, odd shapes, experts, the switch,
compiled, and the AVX2 build's bits against the AVX-512 build's."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import native_ops
from pangu_infer.quant import cpu_int4
from pangu_infer.quant.formats import QuantizationConfig, dequantize, quantize, unpack_int4
from pangu_infer.quant.modules import PackedWeight

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_int4.library() is None, reason="no AVX-512 VNNI or AVX2, or no C compiler here")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _use_levels(monkeypatch, levels: int) -> None:
    """The kernel built with its activations in `levels` int8 levels from now on (the test's end
    rebuilds the default: see _default_build)."""
    monkeypatch.setenv(cpu_int4.ACTIVATIONS_ENV, {1: "int8", 2: "int8x2"}[levels])
    cpu_int4.library.cache_clear()
    assert cpu_int4.library().pangu_int4_levels() == levels


@pytest.fixture(autouse=True)
def _default_build():
    yield
    cpu_int4.library.cache_clear()  # the next library() reads the environment as the test left it


@pytest.fixture(params=[2, 1], ids=["int8x2", "int8"])
def levels(request, monkeypatch):
    _use_levels(monkeypatch, request.param)
    return request.param


def test_layout_round_trips_and_dequantizes_to_the_stored_numbers():
    qt = quantize(torch.randn(48, 96), QuantizationConfig("int4", 32))
    data, sz = cpu_int4.pack(unpack_int4(qt.qweight), qt.scale, qt.zero)
    assert data.shape == (3, 12, 64) and sz.shape == (3, 3, 2, 16)
    assert torch.equal(cpu_int4.unpack_codes(data), unpack_int4(qt.qweight))
    # scale and zero rounded to bf16, as aten's qScaleAndZeros: then within one bf16 step of the weight
    ref = dequantize(qt)
    assert torch.allclose(cpu_int4.dequantize_t(data, sz, 32).float().t(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


@pytest.mark.parametrize(
    "shape, group, rows",
    [((40, 64), 32, 1), ((40, 64), 32, 4), ((200, 1536), 128, 3), ((17, 256), 64, 9), ((1000, 2048), 128, 5), ((16, 96), 128, 2),
     ((176, 256), 32, 67)],  # many chunks of rows over tiles of the weight, the last tile short
)
def test_products_match_the_dequantized_weight_on_odd_shapes(shape, group, rows, levels):
    g = torch.Generator().manual_seed(sum(shape) + rows)
    w = torch.randn(*shape, generator=g)
    qt = quantize(w, QuantizationConfig("int4", group))
    packed = PackedWeight(qt, CPU)
    assert packed.kernel == "int4_vnni"
    packed.convert_min_rows = 1 << 30  # the kernel at every row count (not the conversion of many-row products)
    x = torch.randn(rows, shape[1], generator=g) * torch.linspace(0.01, 30, shape[1])  # outlier-like columns
    with torch.inference_mode():
        y = packed(x.bfloat16())
    ref = x.bfloat16().double() @ dequantize(qt).double().T
    assert y.shape == (rows, shape[0]) and y.dtype == torch.bfloat16
    # two levels: the activations' int8 rounding (~2^-16 of a group's largest value) stays far below
    # the bf16 rounding of the output (2^-9); one level: llama.cpp's Q8_0 rounding (~2^-8 of it)
    assert _rel(y, ref) < (4e-3 if levels == 2 else 3e-2)
    # each row as if alone: the same bits (decode batches and prefill chunks agree)
    with torch.inference_mode():
        alone = torch.cat([packed(x[i : i + 1].bfloat16()) for i in range(rows)])
    assert torch.equal(alone, y)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("zeros", [True, False], ids=["scale_zero", "scales_only"])
def test_many_rows_give_each_rows_own_bits(zeros, group, levels):
    """Groups of 32 (GGUF's Q4_0 and Q4_1 blocks), 64 and 128 (this engine's default): products of 2
    to 9 rows (every count of rows in a chunk of the AVX2 build's one-level pass of many rows, and
    chunks over tiles of the weight), one thread and two, are bitwise the products of each row alone
    (the one-row path), with zero points and with the scales only; and, one row at a time in
    float64, within the kernel's rounding."""
    g = torch.Generator().manual_seed(54 + zeros + group)
    n, k = 1024, 4096  # many groups and outputs: a changed float step shows in some bf16 output
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 0.02 if zeros else None
    data, sz = cpu_int4.pack(q, scale, zero)
    assert cpu_int4.zero_values(sz) == (2 if zeros else 1)
    x = (torch.randn(9, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
    x[3, :group] = 0  # a group of zeros (step 0) in one row
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            alone = torch.cat([cpu_int4.matmul(x[i : i + 1], data, sz, group) for i in range(9)])
            for rows in range(2, 10):
                y = cpu_int4.matmul(x[:rows].contiguous(), data, sz, group)
                assert torch.equal(y, alone[:rows]), (threads, rows, (y.float() - alone[:rows].float()).abs().max())
    finally:
        torch.set_num_threads(before)
    s = scale.bfloat16().double().repeat_interleave(group, 1)
    z = zero.bfloat16().double().repeat_interleave(group, 1) if zeros else torch.zeros_like(s)
    ref = x.double() @ ((q.double() - 8) * s + z).T
    assert _rel(alone, ref) < (4e-3 if levels == 2 else 3e-2)


def test_agrees_with_atens_kernel_at_least_as_well_as_it_agrees_with_the_exact_product(monkeypatch):
    """With two levels of int8 activations (finer than the bf16 activations aten's kernel takes)."""
    _use_levels(monkeypatch, 2)
    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(512, 1024, generator=g), QuantizationConfig("int4", 64))
    x = torch.randn(2, 1024, generator=g).bfloat16()
    ref = x.double() @ dequantize(qt).double().T
    ours = PackedWeight(qt, CPU)
    monkeypatch.setattr(cpu_int4, "usable", lambda *a: False)
    aten = PackedWeight(qt, CPU)
    assert (ours.kernel, aten.kernel) == ("int4_vnni", "int4_cpu")
    with torch.inference_mode():
        e_ours, e_aten = _rel(ours(x), ref), _rel(aten(x), ref)
    assert e_ours <= e_aten * 1.5 + 1e-4
    assert _rel(ours(x), aten(x).double()) < 5e-3


@pytest.mark.parametrize("k, group", [(64, 8), (96, 16), (1536, 32), (4800, 32), (576, 64), (256, 128)])
def test_the_activations_quantization_is_its_definition_bit_for_bit(levels, k, group):
    """The kernel's rounding of a product's activations (vectorized, eight values a step) against its
    definition in torch, per row and group of the bf16 x: the step d = amax / 127 and 1 / d (0 where d
    is 0) in fp32, a = round(x / d) halves to even, the fine level round((x / d - a) 254), and the sum
    that the zero point multiplies: with two levels x's own fp32 sum, left to right; with one, d times
    the sum of a. Every value bit for bit, rows with a group of zeros, values from 1e-30 to 1e30."""
    lib = cpu_int4.library()
    g = torch.Generator().manual_seed(k + group)
    rows = 4
    x = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, k, generator=g) * 8)
    x[1, :group] = 0.0
    x[2, group : 2 * group] = -0.0
    x[3, 0] = 1e30
    x = x.bfloat16()
    ng = k // group
    xq = torch.zeros(2, 4, k, dtype=torch.int8)
    dx = torch.zeros(2, 4, ng)
    assert lib.pangu_int4_quantize(x.data_ptr(), xq.data_ptr(), dx.data_ptr(), rows, k, group) == 0
    xf = x.float().view(rows, ng, group)
    d = xf.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
    v = xf * inv[..., None]
    a = torch.round(v)
    if levels == 2:
        total = torch.zeros(rows, ng)
        for i in range(group):
            total = total + xf[..., i]
    else:
        total = d * a.sum(-1)
    bits = lambda t: t.contiguous().view(torch.int32)
    assert torch.equal(xq[0, :rows], a.view(rows, k).to(torch.int8))
    assert torch.equal(bits(dx[0, :rows]), bits(d))
    assert torch.equal(bits(dx[1, :rows]), bits(total))
    if levels == 2:
        assert torch.equal(xq[1, :rows], torch.round((v - a) * 254.0).view(rows, k).to(torch.int8))
    assert lib.pangu_int4_quantize(x.data_ptr(), xq.data_ptr(), dx.data_ptr(), 5, k, group) == 1  # more rows than a chunk


def _q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The one-level kernel's product in float64, written from its definition: the activations as
    llama.cpp's Q8_0 rounds them (per row and group of the bf16 x [M, K], the step d = amax / 127
    and a = round(x / d), fp32, halves to even) times the weight (q - 8) scale + zero, with codes
    q [N, K] and the bf16-rounded scale and zero [N, K/G]. (The rounded activations' own sum goes
    with the zero point, as llama.cpp's Q8_1 does: the rounding's error is then sum(e w), not
    sum(e (w - zero')), which for Q4_1-style weights is about 2.5x larger and shifts every output of
    a row along the scales.)"""
    rows, k = x.shape
    xg = x.float().view(rows, k // group, group)
    d = xg.abs().amax(-1, keepdim=True) / 127.0
    a = torch.round(xg * torch.where(d > 0, 1.0 / d, torch.zeros_like(d)))
    s, z = scale.bfloat16().double().repeat_interleave(group, 1), zero.bfloat16().double().repeat_interleave(group, 1)
    return (a.double() * d.double()).view(rows, k) @ ((q.double() - 8) * s + z).T


@pytest.mark.parametrize("n, k, group, rows", [(64, 256, 32, 1), (160, 1536, 32, 3), (48, 1024, 128, 6)])
def test_one_level_is_the_product_of_the_q8_0_rounded_activations(monkeypatch, n, k, group, rows):
    """One level: the product of llama.cpp's Q8_0 rounding of the activations, to the output's bf16
    rounding; two levels: several times closer to the exact product than that rounding."""
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale, zero = torch.rand(n, k // group, generator=g) * 0.02, (torch.rand(n, k // group, generator=g) - 0.5) * 0.02
    data, sz = cpu_int4.pack(q, scale, zero)
    x = (torch.randn(rows, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
    q8 = _q8_reference(x, q, scale, zero, group)
    s, z = scale.bfloat16().double().repeat_interleave(group, 1), zero.bfloat16().double().repeat_interleave(group, 1)
    exact = x.double() @ ((q.double() - 8) * s + z).T
    _use_levels(monkeypatch, 1)
    y = cpu_int4.matmul(x, data, sz, group).double()
    assert torch.allclose(y, q8, rtol=2**-8, atol=2**-14 * q8.abs().max().item())
    _use_levels(monkeypatch, 2)
    y = cpu_int4.matmul(x, data, sz, group).double()
    assert _rel(y, exact) * 2 < _rel(q8, exact)
    assert not torch.allclose(y, q8, rtol=2**-8, atol=2**-14 * q8.abs().max().item())


def test_one_level_products_of_many_rows_convert_in_bf16_models_only(monkeypatch):
    """With activations in one int8 level a bf16 model's products convert the weight from
    Q8_KERNEL_MAX_ROWS rows whatever was measured (the one-level rounding costs a bf16 model more
    than its weight in bf16); a float32 model's follow the measurement, as two levels do."""
    from pangu_infer.quant import tuning

    monkeypatch.delenv("PANGU_INFER_KERNEL_ROWS_INT4_VNNI", raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    monkeypatch.setattr(tuning, "cached_choice", lambda name, compute, valid: tuning.NEVER)  # "the kernel wins at every row"
    _use_levels(monkeypatch, 1)
    assert tuning.convert_min_rows("int4_vnni", torch.bfloat16) == tuning.Q8_KERNEL_MAX_ROWS
    assert tuning.convert_min_rows("int4_vnni", torch.float32) == tuning.NEVER
    tuning._cache.clear()
    _use_levels(monkeypatch, 2)
    assert tuning.convert_min_rows("int4_vnni", torch.bfloat16) == tuning.NEVER
    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(32, 64, generator=g), QuantizationConfig("int4", 32))
    tuning._cache.clear()
    _use_levels(monkeypatch, 1)
    assert PackedWeight(qt, CPU, torch.bfloat16).convert_min_rows == tuning.Q8_KERNEL_MAX_ROWS
    assert PackedWeight(qt, CPU, torch.float32).convert_min_rows == tuning.NEVER


def test_an_unknown_activation_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_int4.ACTIVATIONS_ENV, "int4")
    cpu_int4.library.cache_clear()
    with pytest.raises(ValueError, match="PANGU_INFER_INT4_ACTIVATIONS='int4'"):
        cpu_int4.library()


def test_experts_stacked_each_expert_its_own_product():
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(5, 48, 128, generator=g), QuantizationConfig("int4", 32))
    packed = PackedWeight(qt, CPU)
    assert packed.kernel == "int4_vnni" and packed.data.shape[0] == 5
    x = torch.randn(1, 128, generator=g).bfloat16()
    deq = dequantize(qt).double()
    bound = 4e-3 if cpu_int4.library().pangu_int4_levels() == 2 else 2e-2  # Q8_0-rounded activations: ~1% here
    for e in range(5):
        assert _rel(packed(x, e), x.double() @ deq[e].T) < bound


def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_int4.ENV, "aten")
    cpu_int4.library.cache_clear()
    try:
        assert cpu_int4.library() is None
        assert PackedWeight(quantize(torch.randn(32, 64), QuantizationConfig("int4", 32)), CPU).kernel == "int4_cpu"
    finally:
        monkeypatch.delenv(cpu_int4.ENV)
        cpu_int4.library.cache_clear()
    assert cpu_int4.library() is not None


def test_inside_a_compiled_function_it_is_the_custom_op():
    qt = quantize(torch.randn(40, 64), QuantizationConfig("int4", 32))
    packed = PackedWeight(qt, CPU)
    x = torch.randn(1, 64).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: packed(t) * 2, fullgraph=True)  # fullgraph: no break at the C call
    with torch.inference_mode():
        assert torch.equal(compiled(x), packed(x) * 2)


def test_the_kernel_is_chosen_by_a_measurement_kept_per_machine(monkeypatch, tmp_path):
    import json

    from pangu_infer.quant import tuning

    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(cache))
    monkeypatch.delenv(cpu_int4.ENV, raising=False)
    calls = []
    monkeypatch.setattr(cpu_int4, "measure", lambda: calls.append(1) or {"own": 2.0, "aten": 1.0})
    cpu_int4.chosen.cache_clear()
    try:
        assert not cpu_int4.chosen()  # aten measured faster: aten's kernel
        assert PackedWeight(quantize(torch.randn(32, 64), QuantizationConfig("int4", 32)), CPU).kernel == "int4_cpu"
        assert json.loads(cache.read_text())[tuning.machine_key()]["int4_decode_kernel" + cpu_int4.tag()] == "aten"
        cpu_int4.chosen.cache_clear()
        monkeypatch.setattr(cpu_int4, "measure", lambda: calls.append(1) or {"own": 1.0, "aten": 2.0})
        assert not cpu_int4.chosen() and len(calls) == 1  # the kept choice, not measured again
        monkeypatch.setenv(cpu_int4.ENV, "own")
        cpu_int4.chosen.cache_clear()
        assert cpu_int4.chosen()  # forced
    finally:
        cpu_int4.chosen.cache_clear()


@pytest.mark.parametrize("shape, group", [((48, 64), 32), ((4800, 1536), 32), ((160, 256), 128), ((2, 16, 96), 32)])
def test_the_c_conversion_equals_the_eager_one_bit_for_bit(shape, group):
    """to_bf16_t (the library's C loop, for products of many rows) gives dequantize_t's W^T exactly,
    with one thread and two, dense and per expert."""
    g = torch.Generator().manual_seed(1)
    *lead, n, k = shape
    q = torch.randint(0, 16, (*lead, n, k), dtype=torch.uint8, generator=g).view(-1, n, k)
    for i in range(q.shape[0]):
        data, sz = cpu_int4.pack(q[i], torch.rand(n, k // group, generator=g) * 0.02, torch.randn(n, k // group, generator=g) * 0.01)
        want = cpu_int4.dequantize_t(data, sz, group)
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = cpu_int4.to_bf16_t(data, sz, group)
            finally:
                torch.set_num_threads(before)
            assert got.shape == (k, n) and torch.equal(got, want)


# ------------------------------------------------------------------ routed experts of one token


def _quantized_moge_block(seed: int, dtype: torch.dtype, group: int, hidden: int = 64, inter: int = 32, fused: bool = True):
    """A MoGEBlock (64 experts in 8 groups) with random weights and its routed experts in int4."""
    from fixtures_models import random_moge_block
    from pangu_infer.quant.modules import QuantizedExperts

    block = random_moge_block(seed, hidden_size=hidden, moe_intermediate_size=inter, shared_expert_intermediate_size=2 * inter)
    block.to(dtype)
    config = QuantizationConfig("int4", group)
    w13 = PackedWeight(quantize(block.experts.w13.detach().float(), config), CPU)
    w2 = PackedWeight(quantize(block.experts.w2.detach().float(), config), CPU)
    assert w13.kernel == w2.kernel == "int4_vnni"
    block.experts.impl = QuantizedExperts(w13, w2, inter)
    block.experts.impl.fused = fused
    del block.experts.w13, block.experts.w2
    return block


def _routing(block, x):
    ids, weights = block.route(x, block.gate(x))
    return ids.flatten(), weights.flatten()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden, inter, group", [(64, 32, 32), (288, 96, 32), (384, 128, 128)])
def test_fused_experts_of_one_token_equal_the_expert_loop_bit_for_bit(dtype, hidden, inter, group):
    """One op for the token's 8 experts (cpu_int4.experts_one_token) gives MoEBlock._one_token's
    bits: each expert's output rounded, weighted and summed in fp32 in ascending expert id; groups
    of 32 and 128, one thread and two, activations of several magnitudes."""
    block = _quantized_moge_block(hidden + inter, dtype, group, hidden, inter)
    g = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    with torch.inference_mode():
        for i in range(12):
            x = (torch.randn(1, hidden, generator=g) * (1 + 10 * (i % 3))).to(dtype)
            ids, weights = _routing(block, x)
            shuffle = torch.randperm(8, generator=g)  # as a top-k router gives them (MoGE's ascend)
            ids, weights = ids[shuffle], weights[shuffle]
            want = block._one_token(x, ids, weights)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                try:
                    got = block.experts.impl.one_token(x, ids, weights)
                finally:
                    torch.set_num_threads(before)
                assert got.dtype == want.dtype == dtype and got.shape == (1, hidden)
                assert torch.equal(got, want), (i, threads, (got.float() - want.float()).abs().max())


def test_the_block_takes_the_fused_path_at_batch_1_and_the_switch_turns_it_off(monkeypatch):
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    monkeypatch.setenv(cpu_int4.FUSED_ENV, "off")
    off = _quantized_moge_block(5, torch.bfloat16, 32)
    from pangu_infer.quant.modules import QuantizedExperts

    assert not QuantizedExperts(off.experts.impl.w13, off.experts.impl.w2, 32).fused  # read at load
    off.experts.impl.fused = False
    calls = []
    gate_up = off.experts.gate_up
    off.experts.gate_up = lambda e, t: calls.append(e) or gate_up(e, t)
    on = _quantized_moge_block(5, torch.bfloat16, 32)
    on.experts.gate_up = on.experts.expert = lambda e, t: pytest.fail("the fused path calls no expert one by one")
    with torch.inference_mode():
        assert torch.equal(on(x), off(x))
    assert len(calls) == 8
    # batch 2 is the general path (sorted, one product per expert)
    del on.experts.gate_up, on.experts.expert, off.experts.gate_up
    with torch.inference_mode():
        assert torch.equal(on(x.repeat(2, 1)), off(x.repeat(2, 1)))


def test_fused_experts_refuse_an_expert_id_out_of_range():
    block = _quantized_moge_block(6, torch.bfloat16, 32)
    x = torch.randn(1, 64).bfloat16()
    ids, weights = _routing(block, x)
    ids = ids.clone()
    ids[3] = 64
    with pytest.raises(RuntimeError, match="refused"):
        block.experts.impl.one_token(x, ids, weights)


def test_fused_experts_inside_a_compiled_step_no_graph_break_same_bits_same_load_counts():
    """torch.compile(fullgraph=True) of the op gives the eager bits; of the whole MoE block at
    batch 1 (router, load counters, fused experts, shared expert) it compiles without a graph
    break, and the load counters it keeps equal the eager block's."""
    from pangu_infer.models.layers import disable_compile_on_marked_methods

    block = _quantized_moge_block(7, torch.bfloat16, 32)
    eager = _quantized_moge_block(7, torch.bfloat16, 32)
    disable_compile_on_marked_methods(block)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 64, generator=g).bfloat16() for _ in range(6)]
    torch._dynamo.reset()
    op = torch.compile(lambda x, ids, w: block.experts.impl.one_token(x, ids, w), fullgraph=True)
    whole = torch.compile(block, fullgraph=True)
    with torch.inference_mode():
        for x in xs:
            ids, weights = _routing(block, x)
            assert torch.equal(op(x, ids, weights), block._one_token(x, ids, weights))
            got, want = whole(x), eager(x)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # inductor's softmax/SiLU round apart
    ours, theirs = block.load.as_dict(8), eager.load.as_dict(8)
    assert ours["steps"] == theirs["steps"] == 6 and ours["tokens"] == 6
    assert ours["expert_tokens"] == theirs["expert_tokens"] and sum(ours["expert_tokens"]) == 48
    assert ours["global_topk_expert_tokens"] == theirs["global_topk_expert_tokens"]
    assert ours["global_topk_imbalance_score"] == pytest.approx(theirs["global_topk_imbalance_score"])


@pytest.mark.parametrize("levels", [2, 1])
def test_the_avx2_build_gives_the_avx512_builds_bits(levels):
    """Where the CPU has AVX-512 VNNI, the AVX2 build (what an AVX2-only CPU such as AMD Zen 1-3
    runs) built beside it gives the same bits, with activations in one int8 level or two: products
    of 1 to 7 rows, groups of 32 and 128, one thread and two, the conversion to W^T and the fused
    experts, with zeros stored and scales only."""
    from pangu_infer.native import c_compiler, cpu_flags

    if not {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma"} <= cpu_flags():
        pytest.skip("needs a CPU with AVX-512 VNNI to compare the two builds")
    suffix = "" if levels == 2 else "_q8"
    wide = cpu_int4.load(cpu_int4.level_source(cpu_int4.SOURCE, levels), "int4_vnni" + suffix, c_compiler())
    narrow = cpu_int4.load(cpu_int4.level_source(cpu_int4.SOURCE_AVX2, levels), "int4_avx2" + suffix, c_compiler())
    assert wide.pangu_int4_levels() == narrow.pangu_int4_levels() == levels
    g = torch.Generator().manual_seed(5)
    for n, k, group in ((48, 256, 32), (160, 1024, 128), (512, 1536, 32)):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // group, generator=g) * 0.02
        data, sz = cpu_int4.pack(q, scale, (torch.rand(n, k // group, generator=g) - 0.5) * 0.02)
        sym = cpu_int4.pack(q, scale, None)[1]  # scales only (zeros all 0)
        for s in (sz, sym):
            zs = s.shape[2]
            for rows in (1, 2, 3, 4, 5, 7):
                x = (torch.randn(rows, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
                for threads in (1, 2):
                    ys = []
                    for lib in (wide, narrow):
                        y = torch.empty(rows, n, dtype=torch.bfloat16)
                        assert lib.pangu_int4_mm(x.data_ptr(), data.data_ptr(), s.data_ptr(), y.data_ptr(), rows, n, k, group, zs, threads) == 0
                        ys.append(y)
                    assert torch.equal(ys[0], ys[1]), (n, k, group, zs, rows, threads)
            ts = []
            for lib in (wide, narrow):
                t = torch.empty(k, n, dtype=torch.bfloat16)
                assert lib.pangu_int4_to_bf16_t(data.data_ptr(), s.data_ptr(), t.data_ptr(), n, k, group, zs, 2) == 0
                ts.append(t)
            assert torch.equal(ts[0], ts[1])
            experts = torch.stack([data, data.roll(1, 0)]), torch.stack([s, s.roll(1, 0)])
            ids = torch.tensor([1, 0, 1], dtype=torch.int64)
            x = torch.randn(1, k, generator=g).bfloat16()
            outs = []
            for lib in (wide, narrow):
                y = torch.empty(3, n, dtype=torch.bfloat16)
                assert lib.pangu_int4_experts_mm(x.data_ptr(), ids.data_ptr(), 3, experts[0].data_ptr(), experts[1].data_ptr(), y.data_ptr(), 2, n, k, group, zs, 1) == 0
                outs.append(y)
            assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bits", [5, 6])
def test_the_avx2_build_gives_the_avx512_builds_bits_with_5_and_6_bit_codes(levels, bits):
    """The same for the codes with bit planes (GGUF's Q5 blocks and Q6_K), whose products of 2-4 rows
    per chunk the AVX-512 build runs with both halves of a block in one register: 1 to 9 rows (chunks
    of 4, the last one shorter), groups of 16, 32 and 128, zeros stored and scales only, one thread
    and two."""
    from pangu_infer.native import c_compiler, cpu_flags

    if not {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma"} <= cpu_flags():
        pytest.skip("needs a CPU with AVX-512 VNNI to compare the two builds")
    suffix = "" if levels == 2 else "_q8"
    wide = cpu_int4.load(cpu_int4.level_source(cpu_int4.SOURCE, levels), "int4_vnni" + suffix, c_compiler())
    narrow = cpu_int4.load(cpu_int4.level_source(cpu_int4.SOURCE_AVX2, levels), "int4_avx2" + suffix, c_compiler())
    pack = cpu_int4.pack5 if bits == 5 else cpu_int4.pack6
    g = torch.Generator().manual_seed(bits)
    for n, k, group in ((48, 256, 16), (160, 1024, 128), (96, 1536, 32)):
        q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // group, generator=g) * 0.02
        for zero in ((torch.rand(n, k // group, generator=g) - 0.5) * 0.02, None):
            data, hb, sz = pack(q, scale, zero)
            for rows in (1, 2, 3, 4, 5, 6, 9):
                x = (torch.randn(rows, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
                for threads in (1, 2):
                    ys = []
                    for lib in (wide, narrow):
                        y = torch.empty(rows, n, dtype=torch.bfloat16)
                        assert lib.pangu_int5_mm(x.data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(),
                                                 rows, n, k, group, sz.shape[2], bits - 4, threads) == 0
                        ys.append(y)
                    assert torch.equal(ys[0], ys[1]), (n, k, group, zero is None, rows, threads)


def _native_or_skip() -> None:
    from pangu_infer.native import cxx_compiler

    if cxx_compiler() is None:
        pytest.skip("no C++ compiler here")
    assert cpu_int4.native_op()  # built and loaded where a compiler is


def test_the_cpp_operator_gives_the_python_operators_bits(monkeypatch):
    monkeypatch.delenv(native_ops.ENV, raising=False)
    _native_or_skip()
    g = torch.Generator().manual_seed(6)
    for n, k, group in ((48, 256, 32), (160, 1536, 128)):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        data, sz = cpu_int4.pack(q, torch.rand(n, k // group, generator=g) * 0.02, (torch.rand(n, k // group, generator=g) - 0.5) * 0.02)
        for rows in (0, 1, 3, 6):
            x = torch.randn(rows, k, generator=g).bfloat16()
            ours = torch.ops.pangu_infer.int4_native_mm(x, data, sz, group)
            assert torch.equal(ours, torch.ops.pangu_infer.int4_vnni_mm(x, data, sz, group)) and ours.shape == (rows, n)
        t = torch.randn(k, 2, generator=g).bfloat16().t()  # not contiguous: taken contiguous, as the Python operator does
        assert torch.equal(torch.ops.pangu_infer.int4_native_mm(t, data, sz, group), cpu_int4.matmul(t.contiguous(), data, sz, group))
    with pytest.raises(RuntimeError, match="int4 kernel: unexpected operands x"):
        torch.ops.pangu_infer.int4_native_mm(torch.randn(1, 100).bfloat16(), data, sz, group)
    with pytest.raises(RuntimeError, match="int4 kernel: scales"):
        torch.ops.pangu_infer.int4_native_mm(torch.randn(1, k).bfloat16(), data, sz, 64)


def test_a_compiled_graph_calls_the_cpp_operator_without_python(monkeypatch):
    """With the C++ operator loaded, a compiled product never enters the Python operator (its
    Python body broken here); without it the Python operator is traced again."""
    monkeypatch.delenv(native_ops.ENV, raising=False)
    _native_or_skip()
    packed = PackedWeight(quantize(torch.randn(40, 64), QuantizationConfig("int4", 32)), CPU)
    x = torch.randn(1, 64).bfloat16()
    with torch.inference_mode():
        want = packed(x) * 2

    def broken(*a, **k):
        raise AssertionError("the Python operator ran")

    monkeypatch.setattr(cpu_int4, "matmul", broken)
    torch._dynamo.reset()
    with torch.inference_mode():
        assert torch.equal(torch.compile(lambda t: packed(t) * 2, fullgraph=True)(x), want)
    monkeypatch.setitem(native_ops._connected, "int4", False)
    torch._dynamo.reset()
    with torch.inference_mode(), pytest.raises(Exception, match="the Python operator ran"):
        torch.compile(lambda t: packed(t) * 2, fullgraph=True)(x)
    torch._dynamo.reset()


def test_the_switch_and_a_failed_cpp_build_leave_the_python_operator(monkeypatch, tmp_path, caplog):
    from pangu_infer import native

    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\necho "no" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.delenv(native_ops.ENV, raising=False)
    monkeypatch.setattr(native, "cxx_compiler", lambda: str(broken))
    monkeypatch.setitem(native_ops._connected, "int4", False)
    monkeypatch.setitem(native_ops._state, "loaded", None)
    monkeypatch.setenv(native_ops.ENV, "0")
    assert cpu_int4.native_op() is False and "C++ operators" not in caplog.text  # off: not even built
    monkeypatch.delenv(native_ops.ENV)
    with caplog.at_level("INFO"):
        assert cpu_int4.native_op() is False
    assert "C++ operators not built" in caplog.text
    packed = PackedWeight(quantize(torch.randn(40, 64), QuantizationConfig("int4", 32)), CPU)
    x = torch.randn(1, 64).bfloat16()
    torch._dynamo.reset()
    with torch.inference_mode():
        assert torch.equal(torch.compile(lambda t: packed(t) * 2, fullgraph=True)(x), packed(x) * 2)
    torch._dynamo.reset()


# ------------------------------------------------------------------ symmetric groups: scales only


def _symmetric_pair(n: int, k: int, group: int, g: torch.Generator):
    """One weight whose zeros are all 0 (GGUF's Q4_0: w = (q - 8) scale), laid out twice: scales only
    (pack's zero None) and with its zeros stored (the 2-value form)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    return cpu_int4.pack(q, scale, None), cpu_int4.pack(q, scale, torch.zeros_like(scale))


def _with_zeros(sz: torch.Tensor) -> torch.Tensor:
    """A scales-only layout [..., K/G, 1, 16] with its (zero) zeros stored: [..., K/G, 2, 16]."""
    return torch.cat((sz, torch.zeros_like(sz)), dim=-2).contiguous()


@pytest.mark.parametrize("n, k, group", [(48, 256, 32), (160, 1024, 128), (272, 1536, 32)])
def test_a_symmetric_pack_keeps_the_scales_only_and_gives_the_2_value_forms_bits(n, k, group, levels):
    """Products of 1 to 19 rows (a block pair and a last odd block, row chunks over weight tiles),
    one thread and two, and the conversion to W^T: bitwise those of the same weight with its zeros."""
    g = torch.Generator().manual_seed(n + k)
    (data, sz), (data2, sz2) = _symmetric_pair(n, k, group, g)
    assert torch.equal(data, data2)
    assert sz.shape == (n // 16, k // group, 1, 16) and sz2.shape == (n // 16, k // group, 2, 16)
    assert torch.equal(sz, sz2[:, :, :1]) and torch.equal(_with_zeros(sz), sz2)
    before = torch.get_num_threads()
    for rows in (1, 2, 3, 4, 5, 16, 19):
        x = (torch.randn(rows, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                y, y2 = cpu_int4.matmul(x, data, sz, group), cpu_int4.matmul(x, data2, sz2, group)
            finally:
                torch.set_num_threads(before)
            assert torch.equal(y, y2), (rows, threads, (y.float() - y2.float()).abs().max())
    want = cpu_int4.dequantize_t(data2, sz2, group)
    assert torch.equal(cpu_int4.dequantize_t(data, sz, group), want)
    assert torch.equal(cpu_int4.to_bf16_t(data, sz, group).clone(), want)  # the library's C loop


def test_a_layout_of_another_value_count_is_refused():
    (data, sz), _ = _symmetric_pair(32, 64, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unexpected operands"):
        cpu_int4.matmul(torch.randn(1, 64).bfloat16(), data, torch.cat((sz, sz, sz), 2).contiguous(), 32)


def test_a_weight_whose_zeros_are_all_0_packs_its_scales_only(levels):
    """PackedWeight: zeros all 0 -> scales only (experts stacked, rows padded to 16), any zero not 0
    -> the 2-value form; the products equal the 2-value form's bitwise and the dequantized weight's
    within the kernel's rounding."""
    from pangu_infer.quant.formats import QuantizedTensor

    g = torch.Generator().manual_seed(8)
    qt = quantize(torch.randn(3, 40, 256, generator=g), QuantizationConfig("int4", 32))
    sym = QuantizedTensor("int4", qt.qweight, qt.scale, torch.zeros_like(qt.zero))
    packed = PackedWeight(sym, CPU)
    assert packed.kernel == "int4_vnni" and packed.scales.shape == (3, 3, 8, 1, 16)
    one_off = sym.zero.clone()
    one_off[2, 39, 7] = 2.0**-20
    assert PackedWeight(QuantizedTensor("int4", qt.qweight, qt.scale, one_off), CPU).scales.shape == (3, 3, 8, 2, 16)
    packed.convert_min_rows = 1 << 30
    deq = dequantize(sym).double()
    bound = 4e-3 if levels == 2 else 3e-2
    for e in range(3):
        for rows in (1, 3, 17):
            x = torch.randn(rows, 256, generator=g).bfloat16()
            with torch.inference_mode():
                y = packed(x, e)
            assert torch.equal(y, cpu_int4.matmul(x, packed.data[e], _with_zeros(packed.scales[e]), 32)[:, :40])
            assert _rel(y, x.double() @ deq[e].T) < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_experts_take_either_form_with_the_2_value_forms_bits(dtype):
    """experts_one_token with the gate/up and down weights each scales-only or not (a GGUF file may
    mix Q4_0 and Q4_K): the bits of both weights with their zeros stored."""
    g = torch.Generator().manual_seed(9)
    e, hidden, inter, group = 4, 96, 64, 32
    pairs13 = [_symmetric_pair(2 * inter, hidden, group, g) for _ in range(e)]
    pairs2 = [_symmetric_pair(hidden, inter, group, g) for _ in range(e)]

    def stacked(pairs, form):
        return torch.stack([p[form][0] for p in pairs]), torch.stack([p[form][1] for p in pairs])

    ids = torch.tensor([3, 0, 2], dtype=torch.int64)
    weights = torch.rand(3, generator=g).to(dtype)
    for i in range(4):
        x = (torch.randn(1, hidden, generator=g) * (1 + 10 * i)).to(dtype)
        want = cpu_int4.experts_one_token(x, ids, weights, *stacked(pairs13, 1), group, *stacked(pairs2, 1), group, inter, hidden)
        for f13, f2 in ((0, 0), (0, 1), (1, 0)):
            got = cpu_int4.experts_one_token(x, ids, weights, *stacked(pairs13, f13), group, *stacked(pairs2, f2), group, inter, hidden)
            assert torch.equal(got, want), (i, f13, f2)


def test_the_cpp_operator_takes_the_scales_only_layout(monkeypatch):
    monkeypatch.delenv(native_ops.ENV, raising=False)
    _native_or_skip()
    g = torch.Generator().manual_seed(10)
    for n, k, group in ((48, 256, 32), (160, 1536, 128)):
        (data, sz), (_, sz2) = _symmetric_pair(n, k, group, g)
        for rows in (1, 3, 6):
            x = torch.randn(rows, k, generator=g).bfloat16()
            ours = torch.ops.pangu_infer.int4_native_mm(x, data, sz, group)
            assert torch.equal(ours, torch.ops.pangu_infer.int4_vnni_mm(x, data, sz2, group))
    with pytest.raises(RuntimeError, match="int4 kernel: scales"):
        torch.ops.pangu_infer.int4_native_mm(torch.randn(1, k).bfloat16(), data, torch.cat((sz, sz, sz), 2).contiguous(), group)


# ------------------------------------------- 5- and 6-bit codes (GGUF's Q5 blocks, Q6_K blocks)


def _five_bit_weight(g, n: int, k: int, group: int, zeros: bool, bits: int = 5):
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 0.02 if zeros else None
    return q, scale, zero


def _pack(bits: int, q, scale, zero):
    return (cpu_int4.pack5 if bits == 5 else cpu_int4.pack6)(q, scale, zero)


def _five_bit_reference(x: torch.Tensor, q, scale, zero, group: int, bits: int = 5) -> torch.Tensor:
    s = scale.bfloat16().double().repeat_interleave(group, 1)
    z = zero.bfloat16().double().repeat_interleave(group, 1) if zero is not None else torch.zeros_like(s)
    return x.double() @ ((q.double() - (1 << (bits - 1))) * s + z).T


@pytest.mark.parametrize("bits, group", [(5, 32), (6, 16), (6, 32)])
def test_the_five_bit_layout_round_trips_and_converts_to_the_stored_numbers(bits, group):
    """pack5 / pack6: the codes' low 4 bits in the int4 layout, the 5th (and 6th) in the bit planes
    (unpack_high gives them back); W^T in bf16 from the C loop and from the traceable formula bit for
    bit, and each the stored w = (q - 16) scale + zero (6 bits: q - 32) rounded once to bf16."""
    g = torch.Generator().manual_seed(5)
    for zeros in (True, False):
        q, scale, zero = _five_bit_weight(g, 48, 256, group, zeros, bits)
        data, hb, sz = _pack(bits, q, scale, zero)
        assert data.shape == (3, 32, 64) and hb.shape == (3, 32, 16 * (bits - 4)) and sz.shape == (3, 256 // group, 2 if zeros else 1, 16)
        assert cpu_int4.planes(hb) == bits - 4
        assert torch.equal(cpu_int4.unpack_codes(data) | (cpu_int4.unpack_high(hb) << 4), q)
        c, t = cpu_int4.to_bf16_t(data, sz, group, hb), cpu_int4.dequantize_t(data, sz, group, hb)
        s = scale.bfloat16().float().repeat_interleave(group, 1)
        z = zero.bfloat16().float().repeat_interleave(group, 1) if zeros else torch.zeros_like(s)
        want = torch.addcmul(z - (1 << (bits - 1)) * s, q.float(), s).bfloat16().t()
        assert torch.equal(c, t) and torch.equal(c, want)


@pytest.mark.parametrize(
    "n, k, group, rows, bits",
    [
        (48, 256, 32, 1, 5), (160, 1536, 32, 3, 5), (64, 512, 64, 4, 5), (96, 128, 32, 9, 5), (1024, 2048, 32, 6, 5),
        (48, 256, 16, 1, 6), (160, 1536, 16, 3, 6), (64, 512, 32, 4, 6), (96, 128, 16, 9, 6), (1024, 2048, 16, 6, 6),
    ],
)
def test_five_bit_products_match_the_stored_weight_and_each_row_alone(n, k, group, rows, bits, levels):
    """matmul5 with 5- or 6-bit codes (one row: the one-pass block; more: halves of blocks, chunks of
    4 rows over tiles of the weight, one thread and two): within the activations' rounding of the
    exact product of the stored weight (one level: llama.cpp's Q8_0 rounding, the product of those
    rounded activations to the output's bf16 rounding), and each row's bits those of the row alone."""
    g = torch.Generator().manual_seed(n + k + rows)
    for zeros in (True, False):
        q, scale, zero = _five_bit_weight(g, n, k, group, zeros, bits)
        data, hb, sz = _pack(bits, q, scale, zero)
        x = (torch.randn(rows, k, generator=g) * torch.linspace(0.01, 30, k)).bfloat16()
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                y = cpu_int4.matmul5(x, data, hb, sz, group)
                alone = torch.cat([cpu_int4.matmul5(x[i : i + 1], data, hb, sz, group) for i in range(rows)])
                assert y.shape == (rows, n) and torch.equal(y, alone), threads
        finally:
            torch.set_num_threads(before)
        exact = _five_bit_reference(x, q, scale, zero, group, bits)
        if levels == 1:
            # (q - offset + 8) - 8 = q - 16 (5 bits) or q - 32 (6 bits)
            q8 = _q8_reference(x, q.int() - (1 << (bits - 1)) + 8, scale, zero if zeros else torch.zeros_like(scale), group)
            assert torch.allclose(y.double(), q8, rtol=2**-8, atol=2**-14 * q8.abs().max().item())
        else:
            assert _rel(y, exact) < 4e-3


def test_five_bit_operands_that_do_not_fit_are_refused():
    q, scale, zero = _five_bit_weight(torch.Generator().manual_seed(1), 32, 64, 32, True)
    data, hb, sz = cpu_int4.pack5(q, scale, zero)
    with pytest.raises(ValueError, match="int5 kernel: unexpected operands"):
        cpu_int4.matmul5(torch.randn(1, 64).bfloat16(), data, hb[:, :4], sz, 32)
    with pytest.raises(ValueError, match="int5 kernel: unexpected operands"):
        cpu_int4.matmul5(torch.randn(1, 96).bfloat16(), data, hb, sz, 32)
    with pytest.raises(ValueError, match=r"int7 kernel: unexpected operands .* plane \(2, 8, 48\)"):  # three planes: no such form
        cpu_int4.matmul5(torch.randn(1, 64).bfloat16(), data, torch.cat((hb, hb, hb), -1), sz, 32)


def test_the_five_bit_cpp_operator_gives_the_python_operators_bits(monkeypatch):
    monkeypatch.delenv(native_ops.ENV, raising=False)
    _native_or_skip()
    g = torch.Generator().manual_seed(7)
    for n, k, group, zeros, bits in ((48, 256, 32, True, 5), (160, 1536, 32, False, 5), (48, 256, 16, False, 6), (64, 512, 32, True, 6)):
        data, hb, sz = _pack(bits, *_five_bit_weight(g, n, k, group, zeros, bits))
        for rows in (0, 1, 3, 6):
            x = torch.randn(rows, k, generator=g).bfloat16()
            ours = torch.ops.pangu_infer.int5_native_mm(x, data, hb, sz, group)
            assert torch.equal(ours, torch.ops.pangu_infer.int5_vnni_mm(x, data, hb, sz, group)) and ours.shape == (rows, n)
    with pytest.raises(RuntimeError, match="int5 kernel: bit plane"):
        torch.ops.pangu_infer.int5_native_mm(torch.randn(1, k).bfloat16(), data, hb[:, :8].contiguous(), sz, group)
    with pytest.raises(RuntimeError, match="int5 kernel: scales"):
        torch.ops.pangu_infer.int5_native_mm(torch.randn(1, k).bfloat16(), data, hb, sz, 64)


@pytest.mark.parametrize("bits, group", [(5, 32), (6, 16)])
def test_a_five_bit_layout_is_a_packed_weight_of_its_own_kernel_at_every_row_count(bits, group):
    """A loader's 5- or 6-bit cpu_int4.Layout (padded rows zeroed) becomes PackedWeight kernel "int5" /
    "int6": few rows through matmul5, many through the bf16 conversion, both close to the stored
    weight's product; inside a compiled function the product is an operator (no graph break)."""
    g = torch.Generator().manual_seed(9)
    n, k = 40, 256  # 3 blocks, the last padded
    q, scale, zero = _five_bit_weight(g, 48, k, group, True, bits)
    q[n:], scale[n:], zero[n:] = 0, 0, 0
    layout = cpu_int4.Layout(n, k, group, 2, bits=bits)
    assert layout.method == f"int{bits}" and not (layout.data[2].any() or layout.hb[2].any() or layout.sz[2].any())  # padded block: zeros
    data, hb, sz = _pack(bits, q, scale, zero)
    layout.data.copy_(data), layout.hb.copy_(hb), layout.sz.copy_(sz)  # (as a loader writes it)
    packed = PackedWeight(layout, CPU)
    assert packed.kernel == f"int{bits}" and packed.method == f"int{bits}" and packed.out_features == n
    x = (torch.randn(40, k, generator=g)).bfloat16()
    exact = _five_bit_reference(x, q[:n], scale[:n], zero[:n], group, bits)
    with torch.inference_mode():
        for m in (1, 3, 40):
            packed.convert_min_rows = 8
            y = packed(x[:m])
            assert y.shape == (m, n) and _rel(y, exact[:m]) < 3e-2
        packed.convert_min_rows = 1 << 30
        few = packed(x[:2])
        compiled = torch.compile(lambda t: packed(t), fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x[:2]), few)


def test_five_bit_products_convert_from_the_row_count_measured_for_them(monkeypatch):
    """A 5-bit weight's products of many rows convert it to bf16 from its own kind's row count
    (tuning.convert_min_rows("int5"), PANGU_INFER_KERNEL_ROWS_INT5 overriding the measurement): below
    it matmul5 runs, from it the C conversion, each close to the stored weight's product."""
    from pangu_infer.quant import tuning

    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT5", "8")
    g = torch.Generator().manual_seed(11)
    q, scale, zero = _five_bit_weight(g, 64, 256, 32, True)
    layout = cpu_int4.Layout(64, 256, 32, 2, bits=5)
    for t, v in zip((layout.data, layout.hb, layout.sz), cpu_int4.pack5(q, scale, zero)):
        t.copy_(v)
    packed = PackedWeight(layout, CPU, torch.float32)
    assert tuning.convert_min_rows("int5") == 8 == packed.convert_min_rows
    calls = []
    real = cpu_int4.to_bf16_t
    monkeypatch.setattr(cpu_int4, "to_bf16_t", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(9, 256, generator=g)
    exact = _five_bit_reference(x.bfloat16(), q, scale, zero, 32)
    with torch.inference_mode():
        few, many = packed(x[:7]), packed(x)
    assert len(calls) == 1 and _rel(few, exact[:7]) < 3e-2 and _rel(many, exact) < 3e-2


def test_a_compiled_graph_calls_the_five_bit_cpp_operator_without_python(monkeypatch):
    """A 5-bit weight in a compiled graph: with the C++ operator connected (native_op connects both
    forms) the graph never enters the Python operator; without it the Python operator is traced."""
    monkeypatch.delenv(native_ops.ENV, raising=False)
    _native_or_skip()
    g = torch.Generator().manual_seed(12)
    layout = cpu_int4.Layout(48, 64, 32, 2, bits=5)
    for t, v in zip((layout.data, layout.hb, layout.sz), cpu_int4.pack5(*_five_bit_weight(g, 48, 64, 32, True))):
        t.copy_(v)
    packed = PackedWeight(layout, CPU)
    x = torch.randn(1, 64, generator=g).bfloat16()
    with torch.inference_mode():
        want = packed(x) * 2

    def broken(*a, **k):
        raise AssertionError("the Python operator ran")

    monkeypatch.setattr(cpu_int4, "matmul5", broken)
    torch._dynamo.reset()
    with torch.inference_mode():
        assert torch.equal(torch.compile(lambda t: packed(t) * 2, fullgraph=True)(x), want)
    monkeypatch.setitem(native_ops._connected, "int5", False)
    torch._dynamo.reset()
    with torch.inference_mode(), pytest.raises(Exception, match="the Python operator ran"):
        torch.compile(lambda t: packed(t) * 2, fullgraph=True)(x)
    torch._dynamo.reset()


@pytest.mark.parametrize("build", ["native", "avx2"])
@pytest.mark.parametrize("bits", [4, 5, 6])
def test_a_row_holding_nan_or_infinity_gives_nan_outputs_and_leaves_the_other_rows(bits, build, levels):
    """A model's overflow must not turn into plausible numbers: a row of x with one NaN or one
    infinity (in one group) gives NaN in every output of that row, as the product of the dequantized
    weight does (the one-level rounding had dropped a NaN into a huge finite sum), with zeros stored
    and scales only, one row and chunks of several, in each build; the other rows keep their bits."""
    from pangu_infer.native import c_compiler, cpu_flags

    source = cpu_int4.SOURCE if build == "native" else cpu_int4.SOURCE_AVX2
    if build == "native" and not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        pytest.skip("the AVX-512 build needs AVX-512 VNNI")
    suffix = "" if levels == 2 else "_q8"
    lib = cpu_int4.load(cpu_int4.level_source(source, levels), ("int4_vnni" if build == "native" else "int4_avx2") + suffix, c_compiler())
    g = torch.Generator().manual_seed(bits)
    n, k, group = 64, 512, 32
    for zeros in (True, False):
        q, scale, zero = _five_bit_weight(g, n, k, group, zeros, bits)
        packed = cpu_int4.pack(q, scale, zero) if bits == 4 else _pack(bits, q, scale, zero)
        data, sz = packed[0], packed[-1]
        zs = sz.shape[2]

        def mm(x):
            y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
            if bits == 4:
                rc = lib.pangu_int4_mm(x.data_ptr(), data.data_ptr(), sz.data_ptr(), y.data_ptr(), x.shape[0], n, k, group, zs, 2)
            else:
                hb = packed[1]
                rc = lib.pangu_int5_mm(x.data_ptr(), data.data_ptr(), hb.data_ptr(), sz.data_ptr(), y.data_ptr(), x.shape[0], n, k, group, zs, bits - 4, 2)
            assert rc == 0
            return y

        x = (torch.randn(6, k, generator=g) * 3).bfloat16()
        clean = mm(x)
        assert clean.isfinite().all()
        for bad in (float("nan"), float("inf"), float("-inf")):
            for col in (0, 37, k - 1):
                xb = x.clone()
                xb[1, col] = bad
                xb[4, (col + 100) % k] = bad
                for rows, nan_rows in ((xb[1:2], {0}), (xb[:3], {1}), (xb, {1, 4})):
                    y = mm(rows.contiguous())
                    for i in range(rows.shape[0]):
                        if i in nan_rows:
                            assert y[i].isnan().all(), (bad, col, i, y[i, :4])
                        else:
                            assert torch.equal(y[i], clean[i]), (bad, col, i)
