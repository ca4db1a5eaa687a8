"""oneDNN-prepacked bf16 linears (pangu.models.packed): same products, swapped in by LLM on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pangu import LLM, SamplingParams
from pangu.engine.runner import compiled_forward
from pangu.loader import load_model
from pangu.models.packed import PackedLinear, can_pack, has_packed_linears, pack_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bf16 linear")


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(130, 96, generator=g).bfloat16()
    b = torch.randn(130, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, generator=g).bfloat16()
    got = PackedLinear(w, b)(x)
    assert got.shape == (*shape[:-1], 130)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)


def test_only_plain_bf16_linears_are_packed():
    class RowParallel(nn.Linear):  # subclasses (tensor-parallel linears) keep their own forward
        pass

    m = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8), RowParallel(8, 8).bfloat16())
    assert pack_linears(m) == 1
    assert [type(c) for c in m] == [PackedLinear, nn.Linear, RowParallel]
    assert not can_pack(CPU, torch.float32) and not can_pack(torch.device("meta"), torch.bfloat16)


def test_packed_model_gives_the_plain_model_logits(tiny_dense_dir):
    plain = load_model(str(tiny_dense_dir), torch.bfloat16, CPU, load_tokenizer=False).model
    packed = load_model(str(tiny_dense_dir), torch.bfloat16, CPU, load_tokenizer=False).model
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    assert pack_linears(packed) == linears + (packed.config.tie_word_embeddings and 1)
    ids = torch.arange(3, 40)
    with torch.inference_mode():
        a = plain.compute_logits(plain(ids, torch.arange(len(ids))))
        b = packed.compute_logits(packed(ids, torch.arange(len(ids))))
    torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_llm_packs_bf16_on_cpu_unless_the_decode_step_is_compiled(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20)
    assert has_packed_linears(llm.model)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="compile_decode=True on a model with oneDNN-packed weights"):
        compiled_forward(llm.model)
    assert not has_packed_linears(LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20).model)
