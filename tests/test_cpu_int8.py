"""The int8 kernel of pangu_infer.quant.cpu_int8 (x86 CPUs with AVX2): exact integer sums (no overflow
at the extremes), the float64 product of the dequantized weight, batch invariance, NaN rows, bf16
and float32 inputs, the switch, and a compiled call."""

from __future__ import annotations

import pytest
import torch

from pangu_infer.quant import cpu_int8, tuning
from pangu_infer.quant.formats import QuantizationConfig, dequantize, quantize
from pangu_infer.quant.modules import PackedWeight

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_int8.library() is None, reason="no AVX2 or no C compiler here")


def _exact(a: torch.Tensor, w: torch.Tensor, step: float, scales: torch.Tensor) -> torch.Tensor:
    """What the kernel promises for activations that are integers times a power of two: the integer
    dot products times step and scale in double, rounded once to float32."""
    sums = a.long() @ w.long().T
    return (sums.double() * step * scales.double()).float()


@pytest.mark.parametrize("m, n, k", [(1, 37, 48), (2, 64, 1024), (3, 33, 3072), (5, 100, 1040), (16, 4, 16)])
def test_integer_activations_give_the_exact_sums(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    a = torch.randint(-32767, 32768, (m, k), generator=g)
    a[:, 0] = 32767  # each row's largest magnitude is exactly the top level: x / d is a
    step = 2.0**-10
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    y = cpu_int8.matmul((a * step).float(), w, scales)
    assert y.dtype == torch.float32
    assert torch.equal(y, _exact(a, w, step, scales))


def test_the_largest_sums_do_not_overflow():
    # every product at its largest, all of one sign: a lane's int32 sum over a chunk is at its bound
    k = 4096
    a = torch.full((2, k), 32767)
    a[1] = -32767
    w = torch.full((8, k), -128, dtype=torch.int8)
    scales = torch.ones(8, dtype=torch.bfloat16)
    y = cpu_int8.matmul(a.float(), w, scales)
    assert torch.equal(y, _exact(a, w, 1.0, scales))
    assert y[0, 0].item() == -32767 * 128 * k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_the_dequantized_weight(dtype):
    g = torch.Generator().manual_seed(1)
    qt = quantize(torch.randn(300, 1536, generator=g), QuantizationConfig("int8"))
    scales = qt.scale.to(torch.bfloat16)
    x = torch.randn(7, 1536, generator=g).to(dtype)
    ref = x.double() @ (qt.qweight.double() * scales.double()[:, None]).T
    y = cpu_int8.matmul(x, qt.qweight, scales)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel  # 16-bit activations: about 2^-16 of each row's largest value
    # aten's kernel (bf16 activations and outputs) is 30x or more further from the same reference
    aten = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), qt.qweight, scales)
    assert ((aten.double() - ref).norm() / ref.norm()).item() > 10 * rel


def test_each_row_is_the_same_alone_or_in_a_batch_and_bf16_input_equals_its_float32():
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-127, 128, (70, 512), dtype=torch.int8, generator=g)
    scales = (torch.rand(70, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(9, 512, generator=g)
    y = cpu_int8.matmul(x, w, scales)
    for i in range(9):
        assert torch.equal(cpu_int8.matmul(x[i : i + 1], w, scales)[0], y[i])
    xb = x.bfloat16()
    assert torch.equal(cpu_int8.matmul(xb, w, scales), cpu_int8.matmul(xb.float(), w, scales))


def test_a_row_with_nan_or_infinity_gives_nan_and_leaves_the_others_alone():
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (20, 64), dtype=torch.int8, generator=g)
    scales = torch.ones(20, dtype=torch.bfloat16)
    x = torch.randn(4, 64, generator=g)
    clean = cpu_int8.matmul(x, w, scales)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y = cpu_int8.matmul(x, w, scales)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[0], clean[0]) and torch.equal(y[3], clean[3])
    assert torch.equal(cpu_int8.matmul(torch.zeros(1, 64), w, scales), torch.zeros(1, 20))


def test_shapes_it_does_not_take_are_refused_by_name():
    w = torch.zeros(8, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"weight \(8, 40\)"):
        cpu_int8.matmul(torch.zeros(1, 40), w, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x \\(1, 32\\)"):
        cpu_int8.matmul(torch.zeros(1, 32), torch.zeros(8, 48, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))


@pytest.fixture
def fresh_choice():
    cpu_int8.library.cache_clear()
    cpu_int8.chosen.cache_clear()
    yield
    cpu_int8.library.cache_clear()
    cpu_int8.chosen.cache_clear()


def test_quantized_linears_run_it_where_chosen_and_the_switch_turns_it_off(monkeypatch, fresh_choice):
    g = torch.Generator().manual_seed(4)
    qt = quantize(torch.randn(96, 256, generator=g), QuantizationConfig("int8"))
    x = torch.randn(3, 256, generator=g)
    monkeypatch.setenv(cpu_int8.ENV, "own")
    pw = PackedWeight(qt, CPU, torch.float32)
    assert pw.own_int8 and pw.kernel == "int8"
    with torch.inference_mode():
        own = pw(x)
    assert torch.equal(own, cpu_int8.matmul(x, pw.data, pw.scales))
    monkeypatch.setenv(cpu_int8.ENV, "aten")
    cpu_int8.library.cache_clear()
    cpu_int8.chosen.cache_clear()
    off = PackedWeight(qt, CPU, torch.float32)
    assert not off.own_int8
    with torch.inference_mode():
        aten = off(x)
    assert torch.equal(aten, torch.ops.aten._weight_int8pack_mm(x.bfloat16(), off.data, off.scales).float())
    ref = x.double() @ dequantize(qt).double().T
    assert (own.double() - ref).norm() < (aten.double() - ref).norm()


def test_a_compiled_call_gives_the_eager_numbers(monkeypatch, fresh_choice):
    monkeypatch.setenv(cpu_int8.ENV, "own")
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (64, 128), dtype=torch.int8, generator=g)
    scales = (torch.rand(64, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(4, 128, generator=g)

    def f(x):
        return cpu_int8.product(x * 2, w, scales) + 1

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), f(x))


def test_the_conversion_threshold_is_kept_apart_for_this_kernel(monkeypatch, tmp_path, fresh_choice):
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv("PANGU_INFER_KERNEL_ROWS_INT8", raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    seen = []
    monkeypatch.setattr(tuning, "measure", lambda kind: seen.append(cpu_int8.usable(tuning.BENCH_K)) or 100)
    for value in ("own", "aten"):
        monkeypatch.setenv(cpu_int8.ENV, value)
        cpu_int8.library.cache_clear()
        cpu_int8.chosen.cache_clear()
        assert tuning.convert_min_rows("int8") == 100
    assert seen == [True, False]  # measured once per kernel, not read back from the other's entry
