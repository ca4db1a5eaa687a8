"""The eager steps' RMSNorm and rotary loops (pangu_infer.models.norm_rope) against the torch forms
they replace (layers.RMSNorm's and layers.apply_rotary's own operators, written out here)."""

from __future__ import annotations

import pytest
import torch

from pangu_infer.models import layers, norm_rope

pytestmark = pytest.mark.skipif(norm_rope.library() is None, reason="no AVX2/FMA x86 CPU or no C compiler here")


def _torch_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _torch_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, heads, dim, width", [(1, 12, 128, 3072), (7, 6, 64, 1000), (300, 12, 128, 3072), (33, 4, 16, 64)])
def test_rotary_gives_the_torch_forms_bits(dtype, t, heads, dim, width):
    """Rows of a fused q/k/v product (a strided view, as Attention.forward passes them), values from
    1e-3 to 1e3: every output equals the torch form's, bf16 rounding each product and the sum, fp32
    with no fused multiply-add."""
    g = torch.Generator().manual_seed(t + dim)
    base = torch.randn(t, width, generator=g) * torch.exp(torch.randn(t, width, generator=g) * 2)
    x = base.to(dtype)[:, : heads * dim].view(t, heads, dim)
    angle = torch.randn(t, dim, generator=g) * 50
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    y = norm_rope.rotary(x, cos, sin)
    assert y is not None and y.is_contiguous()
    assert torch.equal(_bits(y), _bits(_torch_rotary(x, cos, sin)))
    assert torch.equal(_bits(layers.apply_rotary(x, cos, sin)), _bits(y))  # the layer takes the loop


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t, n", [(1, 1536), (9, 576), (300, 1536), (5, 64), (2048, 1536)])
def test_rms_norm_gives_the_torch_forms_bits(dtype, t, n):
    """Rows of widely different sizes: every output equals the torch form's (the mean of squares is
    torch's own reduction; the rest one pass with the same roundings), alone or among other rows,
    and the layer takes the loop outside autograd."""
    g = torch.Generator().manual_seed(t * n)
    x = (torch.randn(t, n, generator=g) * torch.exp(torch.randn(t, 1, generator=g) * 3)).to(dtype)
    weight = torch.randn(n, generator=g).to(dtype)
    before = x.clone()
    y = norm_rope.rms_norm(x, weight, 1e-6)
    assert y is not None
    assert torch.equal(_bits(x), _bits(before))  # not squared in place (in fp32 x.float() is x itself)
    assert torch.equal(_bits(y), _bits(_torch_rms_norm(x, weight, 1e-6)))
    alone = torch.cat([norm_rope.rms_norm(x[i : i + 1], weight, 1e-6) for i in range(min(t, 9))])
    assert torch.equal(_bits(alone), _bits(y[:9]))
    m = layers.RMSNorm(n, 1e-6).to(dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        assert torch.equal(_bits(m(x)), _bits(y))


def test_operands_it_does_not_take_are_left_to_the_torch_forms(monkeypatch):
    x = torch.randn(4, 2, 64)
    cos = sin = torch.ones(4, 64)
    assert norm_rope.rotary(x.half(), cos.half(), sin.half()) is None  # float16
    assert norm_rope.rotary(torch.randn(4, 2, 24), torch.ones(4, 24), torch.ones(4, 24)) is None  # width not a multiple of 16
    assert norm_rope.rotary(x.transpose(1, 2), cos, sin) is None  # values not contiguous
    assert norm_rope.rms_norm(torch.randn(3, 12), torch.ones(12), 1e-6) is None  # width not a multiple of 8
    assert norm_rope.rms_norm(torch.randn(3, 16).bfloat16(), torch.ones(16), 1e-6) is None  # weight of another dtype
    w = torch.ones(16, requires_grad=True)
    with torch.enable_grad():
        assert norm_rope.rms_norm(torch.randn(3, 16), w, 1e-6) is None  # autograd records the torch form
        y = layers.RMSNorm(16, 1e-6)(torch.randn(3, 16))
        assert y.requires_grad
    monkeypatch.setenv(norm_rope.ENV, "torch")
    norm_rope.library.cache_clear()
    try:
        assert norm_rope.rotary(x, cos, sin) is None
    finally:
        monkeypatch.delenv(norm_rope.ENV)
        norm_rope.library.cache_clear()
    assert norm_rope.rotary(x, cos, sin) is not None


def test_a_traced_graph_keeps_the_torch_forms():
    """Inside torch.compile the loops are not called (no ctypes in a graph): one whole graph."""
    x = torch.randn(5, 2, 32).bfloat16()
    angle = torch.randn(5, 32)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    m = layers.RMSNorm(64, 1e-6).bfloat16()

    def f(x, cos, sin):
        return m(layers.apply_rotary(x, cos, sin).reshape(5, 64))

    with torch.no_grad():
        compiled = torch.compile(f, backend="eager", fullgraph=True)
        y = compiled(x, cos, sin)
        assert torch.equal(layers.apply_rotary(x, cos, sin), _torch_rotary(x, cos, sin))
        assert (y.float() - f(x, cos, sin).float()).abs().max().item() <= 2**-6 * y.float().abs().max().item()
