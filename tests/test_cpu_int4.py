"""The int4 decode kernel of pangu_infer.quant.cpu_int4 (x86 CPUs with AVX-512 VNNI): layout and
numbers against the dequantized weight and aten's kernel, odd shapes, experts, the switch, compiled."""

from __future__ import annotations

import pytest
import torch

from pangu_infer.quant import cpu_int4
from pangu_infer.quant.formats import QuantizationConfig, dequantize, quantize, unpack_int4
from pangu_infer.quant.modules import PackedWeight

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_int4.library() is None, reason="no AVX-512 VNNI or no C compiler here")


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


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
    [((40, 64), 32, 1), ((40, 64), 32, 4), ((200, 1536), 128, 3), ((17, 256), 64, 9), ((1000, 2048), 128, 5), ((16, 96), 128, 2)],
)
def test_products_match_the_dequantized_weight_on_odd_shapes(shape, group, rows):
    g = torch.Generator().manual_seed(sum(shape) + rows)
    w = torch.randn(*shape, generator=g)
    qt = quantize(w, QuantizationConfig("int4", group))
    packed = PackedWeight(qt, CPU)
    assert packed.kernel == "int4_vnni"
    x = torch.randn(rows, shape[1], generator=g) * torch.linspace(0.01, 30, shape[1])  # outlier-like columns
    with torch.inference_mode():
        y = packed(x.bfloat16())
    ref = x.bfloat16().double() @ dequantize(qt).double().T
    assert y.shape == (rows, shape[0]) and y.dtype == torch.bfloat16
    # the activations' two-level int8 rounding (~2^-16 of a group's largest value) stays far below
    # the bf16 rounding of the output (2^-9)
    assert _rel(y, ref) < 4e-3
    # each row as if alone: the same bits (decode batches and prefill chunks agree)
    with torch.inference_mode():
        alone = torch.cat([packed(x[i : i + 1].bfloat16()) for i in range(rows)])
    assert torch.equal(alone, y)


def test_agrees_with_atens_kernel_at_least_as_well_as_it_agrees_with_the_exact_product(monkeypatch):
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


def test_experts_stacked_each_expert_its_own_product():
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(5, 48, 128, generator=g), QuantizationConfig("int4", 32))
    packed = PackedWeight(qt, CPU)
    assert packed.kernel == "int4_vnni" and packed.data.shape[0] == 5
    x = torch.randn(1, 128, generator=g).bfloat16()
    deq = dequantize(qt).double()
    for e in range(5):
        assert _rel(packed(x, e), x.double() @ deq[e].T) < 4e-3


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
        assert json.loads(cache.read_text())[tuning.machine_key()]["int4_decode_kernel"] == "aten"
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
