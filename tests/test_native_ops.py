"""pangu_infer.native_ops: the C kernels' C++ operators give the Python operators' bits, refuse what
those refuse, and are what a compiled graph calls once connected (no Python in between).
(int4's operator: tests/test_cpu_int4.py.)"""

from __future__ import annotations

import pytest
import torch

from pangu_infer import native_ops
from pangu_infer.models import bi_attention_kernel
from pangu_infer.native import cxx_compiler
from pangu_infer.quant import cpu_int8

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler here")


@pytest.fixture
def native(monkeypatch):
    monkeypatch.delenv(native_ops.ENV, raising=False)


def _attention_or_skip() -> None:
    if bi_attention_kernel.library() is None:
        pytest.skip("the attention kernel does not run here")
    assert bi_attention_kernel.native_op()


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
def test_attention_operator_gives_the_python_operators_bits(native, q_dtype, kv_dtype):
    _attention_or_skip()
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, slots_n = 8, 2, 64, 300
    k_cache = torch.randn(slots_n, kv_heads, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(slots_n, kv_heads, d, generator=g).to(kv_dtype)
    for n, length, rows in ((1, 37, 1), (3, 50, 3), (4, 20, 1), (0, 5, 1)):
        q = torch.randn(n, heads, d, generator=g).to(q_dtype)
        slots = torch.randint(0, slots_n, (rows, length), generator=g)
        valid = torch.rand(n, length, generator=g) > 0.2
        want = torch.ops.pangu_infer.bi_attention(q, k_cache, v_cache, slots, valid, 0.125)
        got = torch.ops.pangu_infer.bi_attention_native(q, k_cache, v_cache, slots, valid, 0.125)
        assert got.dtype == want.dtype == q_dtype and torch.equal(got, want)
        # int32 slots, a [N, 1, 1, L] mask and strided queries are taken as the Python operator takes them
        strided = torch.randn(heads, n, d, generator=g).to(q_dtype).transpose(0, 1)
        assert torch.equal(
            torch.ops.pangu_infer.bi_attention_native(strided, k_cache, v_cache, slots.int(), valid[:, None, None, :], 0.125),
            bi_attention_kernel.run(strided, k_cache, v_cache, slots, valid, 0.125),
        )


def test_attention_operator_refuses_what_the_kernel_does_not_take(native):
    _attention_or_skip()
    k_cache = torch.randn(16, 2, 64)
    q = torch.randn(1, 8, 64)
    slots, valid = torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="kernel refused q"):  # 3 query heads over 2 KV heads
        torch.ops.pangu_infer.bi_attention_native(torch.randn(1, 3, 64), k_cache, k_cache, slots, valid, 0.125)
    with pytest.raises(RuntimeError, match="caches"):
        torch.ops.pangu_infer.bi_attention_native(q, k_cache, k_cache.bfloat16(), slots, valid, 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        wide = torch.randn(16, 2, 128)[..., :64]
        torch.ops.pangu_infer.bi_attention_native(q, wide, wide, slots, valid, 0.125)


def _int8_operator_or_skip(seed: int):
    """The int8 operator connected, and a generator, an int8 weight [48, 64] and its scales."""
    if cpu_int8.library() is None:
        pytest.skip("the int8 kernel does not run here")
    assert cpu_int8.native_op()
    g = torch.Generator().manual_seed(seed)
    return g, torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=g), (torch.rand(48, generator=g) * 0.01).bfloat16()


def test_int8_operator_gives_the_kernels_bits_and_refuses_by_shape(native):
    g, w, scales = _int8_operator_or_skip(4)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (0, 1, 5):
            x = torch.randn(rows, 64, generator=g).to(dtype)
            got = torch.ops.pangu_infer.int8_native_mm(x, w, scales)
            assert got.dtype == torch.float32 and torch.equal(got, torch.ops.pangu_infer.int8_own_mm(x, w, scales))
    with pytest.raises(RuntimeError, match="int8 kernel: unexpected operands x"):
        torch.ops.pangu_infer.int8_native_mm(torch.randn(1, 60), w, scales)


def _compiled_calls_no_python(monkeypatch, module, name: str, kernel: str, call, args) -> None:
    """Compiled with the operator connected, `call(*args)` never enters the module's Python
    function `name` (broken here) and gives the eager bits; with it disconnected it does enter."""
    with torch.inference_mode():
        want = call(*args) * 2

    def broken(*a, **k):
        raise AssertionError("the Python operator ran")

    monkeypatch.setattr(module, name, broken)
    torch._dynamo.reset()
    with torch.inference_mode():
        assert torch.equal(torch.compile(lambda *a: call(*a) * 2, fullgraph=True)(*args), want)
    monkeypatch.setitem(native_ops._connected, kernel, False)
    torch._dynamo.reset()
    with torch.inference_mode(), pytest.raises(Exception, match="the Python operator ran"):
        torch.compile(lambda *a: call(*a) * 2, fullgraph=True)(*args)
    torch._dynamo.reset()


def test_a_compiled_graph_calls_the_attention_operator_without_python(native, monkeypatch):
    _attention_or_skip()
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(64, 2, 32, generator=g), torch.randn(64, 2, 32, generator=g)
    args = (torch.randn(2, 4, 32, generator=g), k_cache, v_cache, torch.randint(0, 64, (2, 9), generator=g), torch.rand(2, 9, generator=g) > 0.3)
    _compiled_calls_no_python(
        monkeypatch, bi_attention_kernel, "run", "attention",
        lambda q, k, v, s, m: bi_attention_kernel.attention(q, k, v, s, m, 0.25), args,
    )


def test_a_compiled_graph_calls_the_int8_operator_without_python(native, monkeypatch):
    g, w, scales = _int8_operator_or_skip(6)
    _compiled_calls_no_python(monkeypatch, cpu_int8, "matmul", "int8", cpu_int8.product, (torch.randn(1, 64, generator=g), w, scales))


def test_the_switch_and_a_failed_build_leave_the_python_operators(native, monkeypatch, tmp_path, caplog):
    """PANGU_INFER_NATIVE_OPS=0 builds nothing; a build that fails is logged once, not retried,
    and compiled graphs call the Python operators."""
    from pangu_infer import native

    if bi_attention_kernel.library() is None:
        pytest.skip("the attention kernel does not run here")
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\necho "no" >&2\nexit 1\n')
    broken.chmod(0o755)
    runs = []
    monkeypatch.setattr(native, "cxx_compiler", lambda: runs.append(1) or str(broken))
    monkeypatch.setitem(native_ops._connected, "attention", False)
    monkeypatch.setitem(native_ops._state, "loaded", None)
    monkeypatch.setenv(native_ops.ENV, "0")
    assert bi_attention_kernel.native_op() is False and runs == []  # off: not even built
    monkeypatch.delenv(native_ops.ENV)
    with caplog.at_level("INFO"):
        assert bi_attention_kernel.native_op() is False
        assert bi_attention_kernel.native_op() is False
    assert caplog.text.count("C++ operators not built") == 1 and runs == [1]
    args = (torch.randn(1, 4, 32), torch.randn(64, 2, 32), torch.randn(64, 2, 32), torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool))
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(lambda *a: bi_attention_kernel.attention(*a, 0.25) * 2, fullgraph=True)
        assert torch.equal(compiled(*args), bi_attention_kernel.run(*args, 0.25) * 2)
    torch._dynamo.reset()
