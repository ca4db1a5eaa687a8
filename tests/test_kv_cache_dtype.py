"""The KV cache's dtype: `kv_cache_dtype` (vLLM's name) and the default, a bfloat16 cache for a model
that computes in float32 only because the CPU lacks native bf16 products."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, default_kv_cache_dtype
from pangu_infer.models import bi_attention_kernel

KW = dict(device="cpu", kv_cache_memory=1 << 22, enforce_eager=True)
PROMPT = {"prompt_token_ids": [(7 * i) % 900 + 5 for i in range(60)]}
# chunks of 8: every chunk after the first attends to the earlier ones through the cache
SCORED = dict(max_num_batched_tokens=8)

needs_kernel = pytest.mark.skipif(not bi_attention_kernel.available(), reason="the attention kernel is not built on this CPU")


def _prompt_logprobs(llm) -> torch.Tensor:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])


@needs_kernel
def test_the_default_cache_is_bfloat16_and_twice_as_long_where_float32_is_only_for_the_products(tiny_dense_dir):
    """No dtype asked for: on a CPU without native bf16 the model runs in float32 and its cache is
    bfloat16 (twice the tokens in the same memory); with native bf16 both are bfloat16. A dtype
    asked for is the cache's dtype too (vLLM's "auto"), and so is an explicit kv_cache_dtype."""
    default = LLM(str(tiny_dense_dir), **KW)
    assert default.engine.kv_dtype == torch.bfloat16
    assert all(c.dtype == torch.bfloat16 for c in default.engine.runner.k_caches + default.engine.runner.v_caches)
    asked = LLM(str(tiny_dense_dir), dtype="float32", **KW)
    assert asked.engine.kv_dtype == torch.float32
    explicit = LLM(str(tiny_dense_dir), kv_cache_dtype="float32", **KW)
    assert explicit.engine.kv_dtype == torch.float32
    if default.dtype == torch.float32:  # this CPU: no native bf16
        assert default.engine.pool.num_blocks == 2 * explicit.engine.pool.num_blocks


def test_the_default_rule(tiny_dense_dir, tiny_ultra_dir, monkeypatch):
    """bfloat16 only for a float32 model on a CPU without native bf16, where the kernel reading bf16
    caches takes every layer; MLA's latent cache (no value cache) keeps the model's dtype."""
    import pangu_infer.device as device
    from pangu_infer.loader import load_model

    cpu = torch.device("cpu")
    dense = load_model(str(tiny_dense_dir), torch.float32, cpu, load_tokenizer=False).model
    ultra = load_model(str(tiny_ultra_dir), torch.float32, cpu, load_tokenizer=False).model
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert default_kv_cache_dtype(dense, torch.float32, cpu) == "auto"
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert default_kv_cache_dtype(dense, torch.bfloat16, cpu) == "auto"
    assert default_kv_cache_dtype(ultra, torch.float32, cpu) == "auto"
    want = "bfloat16" if bi_attention_kernel.available() else "auto"
    assert default_kv_cache_dtype(dense, torch.float32, cpu) == want
    monkeypatch.setenv("PANGU_INFER_DECODE_ATTENTION", "torch")  # the kernel not chosen: bf16 would be slow
    assert default_kv_cache_dtype(dense, torch.float32, cpu) == "auto"


@pytest.mark.parametrize("kind", ["dense", "moge", "r72b", "ultra"])
def test_a_bfloat16_cache_under_a_float32_model_moves_scores_less_than_a_bfloat16_model(kind, request):
    """Every architecture takes an explicit bfloat16 cache under float32 activations. Prompt
    logprobs through the cache (chunked prefill) move from the float32 cache's less than running
    the whole model in bfloat16 moves them (on the tiny MoE models, expert choices that flip with
    rounding move a few scores by tenths either way)."""
    path = str(request.getfixturevalue(f"tiny_{kind}_dir"))
    f32 = _prompt_logprobs(LLM(path, dtype="float32", kv_cache_dtype="float32", **KW, **SCORED))
    bf = LLM(path, dtype="float32", kv_cache_dtype="bfloat16", **KW, **SCORED)
    assert bf.engine.kv_dtype == torch.bfloat16 and bf.dtype == torch.float32
    kv_moved = (_prompt_logprobs(bf) - f32).abs()
    model_moved = (_prompt_logprobs(LLM(path, dtype="bfloat16", kv_cache_dtype="float32", **KW, **SCORED)) - f32).abs()
    assert 0 < kv_moved.mean() < model_moved.mean(), (kv_moved.mean(), model_moved.mean())  # > 0: the cache really is bf16
    # (the same flipped expert choice can move one score by as much either way)
    assert kv_moved.max() <= 1.5 * model_moved.max(), (kv_moved.max(), model_moved.max())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert len(bf.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids) == 8


@needs_kernel
def test_compiled_decode_over_a_bfloat16_cache_matches_eager(tiny_dense_dir):
    kw = dict(KW, enforce_eager=False)
    compiled = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype="bfloat16", **kw)
    assert compiled.wait_compiled()
    eager = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype="bfloat16", **KW)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [PROMPT, {"prompt_token_ids": [5, 6, 7]}]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params, use_tqdm=False)] == want


def test_bad_kv_cache_dtypes_are_refused_naming_the_value(tiny_dense_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype='float16' is not supported on CPU"):
        LLM(str(tiny_dense_dir), kv_cache_dtype="float16", **KW)
    out = subprocess.run(
        [sys.executable, "-m", "pangu_infer", "generate", "--model", str(tiny_dense_dir), "--prompt", "Hi", "--kv-cache-dtype", "fp4"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0 and "--kv-cache-dtype: invalid choice: 'fp4'" in out.stderr


def test_a_draft_model_shares_the_cache_dtype(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype="bfloat16", speculative_model=str(tiny_dense_dir), **KW)
    speculator = llm.engine.speculator
    assert all(c.dtype == torch.bfloat16 for c in speculator.runner.k_caches)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype="bfloat16", **KW)
    assert llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids == plain.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
