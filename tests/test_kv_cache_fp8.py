"""vLLM's fp8 KV cache (`--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`): keys and values stored in one
byte each (scale 1, torch's saturating cast), read back into the model's dtype for attention. The
reference is transformers' own model of the same random checkpoint, its keys (after rotary) and values
rounded through the same fp8 format: decode steps read every position from the cache, so each
generated token after the first (which the prompt's own attention gives) must score as there."""

from __future__ import annotations

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.loader.random import random_state_dict, transformers_llama

PROMPT = [5, 17, 42, 9, 300, 12, 77]
FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.fixture(scope="module")
def hf_model(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


def _reference_logprobs(model, prompt: list[int], tokens: list[int], fp8) -> torch.Tensor:
    """transformers' log-softmax after the prompt and after each of `tokens` but the last, decoded
    one token at a time with its KV cache holding keys (after rotary) and values rounded through `fp8`
    (None: not rounded), as the engine's cache holds them: the prompt's own attention reads its fresh
    keys and values (the engine's prefill), each decode step the cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    update = DynamicLayer.update

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return x if fp8 is None else x.to(fp8).to(x.dtype)

    def rounded_update(self, keys, values, *args, **kwargs):
        held = update(self, rounded(keys), rounded(values), *args, **kwargs)
        return (keys, values) if keys.shape[-2] > 1 else held

    DynamicLayer.update = rounded_update
    try:
        cache = DynamicCache(config=model.config)
        rows = []
        with torch.no_grad():
            for ids in [prompt] + [[t] for t in tokens[:-1]]:
                rows.append(model(torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1].float().log_softmax(-1))
        return torch.stack(rows)
    finally:
        DynamicLayer.update = update


def _generate(llm: LLM) -> tuple[list[int], list[float]]:
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=12, temperature=0, logprobs=0), use_tqdm=False)
    comp = out[0].outputs[0]
    return list(comp.token_ids), [lp.logprob for lp in comp.logprobs]


def _check_against_transformers(llm: LLM, hf_model, fp8) -> None:
    tokens, logprobs = _generate(llm)
    want = _reference_logprobs(hf_model, PROMPT, tokens, fp8)
    plain = _reference_logprobs(hf_model, PROMPT, tokens, None)
    rows, targets = torch.arange(len(tokens)), torch.tensor(tokens)
    got = torch.tensor(logprobs)
    assert got.tolist() == pytest.approx(want[rows, targets].tolist(), abs=1e-4)
    # (the cache really rounds: without the rounding the same tokens score measurably otherwise)
    assert (got - plain[rows, targets]).abs().max() > 2e-3
    assert tokens == want.argmax(-1).tolist()  # greedy: each the likeliest under the rounded reference


@pytest.mark.parametrize("form", ["kernel", "torch"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fp8_caches_score_as_transformers_with_rounded_keys_and_values(tiny_dense_dir, hf_model, name, form, monkeypatch):
    # decode attention by the C kernel (the default on CPU: it widens the cache's bytes as it reads
    # them; with it the eager decode step) or by gathered copies widened for torch's products
    from pangu_infer.models import bi_attention_kernel

    if form == "kernel" and not bi_attention_kernel.available():
        pytest.skip("no C kernel here")
    monkeypatch.setenv("PANGU_INFER_DECODE_ATTENTION", form)
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype=name, kv_cache_memory=8 << 20, enforce_eager=True)
    runner = llm.engine.runner
    assert {c.dtype for c in runner.k_caches + runner.v_caches} == {FORMATS[name]}
    assert all(runner.decode_kernel) == (form == "kernel") and (runner.eager_step is not None) == (form == "kernel")
    _check_against_transformers(llm, hf_model, FORMATS[name])


def test_the_compiled_decode_step_reads_an_fp8_cache_too(tiny_dense_dir, hf_model):
    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory=8 << 20)
    assert llm.wait_compiled(timeout=600), llm.engine.runner.compile_error
    calls = []
    step = llm.engine.runner.decode_forward
    llm.engine.runner.decode_forward = lambda *a: (calls.append(1), step(*a))[1]
    _check_against_transformers(llm, hf_model, torch.float8_e4m3fn)
    assert len(calls) >= 10  # (every decode step compiled)


def test_an_fp8_cache_holds_twice_the_tokens_of_a_bf16_one(tiny_dense_dir):
    blocks = {kv: LLM(str(tiny_dense_dir), dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory=4 << 20, enforce_eager=True)
              .engine.runner.num_blocks for kv in ("bfloat16", "fp8")}
    assert blocks["fp8"] == 2 * blocks["bfloat16"]


def test_what_an_fp8_cache_cannot_take_is_a_value_error(tiny_dense_dir):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' with batch_invariant=True"):
        LLM(str(tiny_dense_dir), kv_cache_dtype="fp8", batch_invariant=True, enforce_eager=True)
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e3m4' is not supported: expected one of .*fp8_e5m2"):
        LLM(str(tiny_dense_dir), kv_cache_dtype="fp8_e3m4", enforce_eager=True)
    from pangu_infer.cli import build_parser, llm_kwargs

    assert llm_kwargs(build_parser().parse_args(["serve", str(tiny_dense_dir), "--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_kernel_widens_every_fp8_code_as_torch_does(fp8):
    from pangu_infer.models import bi_attention_kernel as kernel

    if not kernel.available():
        pytest.skip("no C kernel here")
    # one valid key per query, its value row 16 of the 256 codes: the output is the row, widened
    codes = torch.arange(256, dtype=torch.uint8).view(fp8).view(16, 1, 16)
    zeros = torch.zeros(16, 1, 16, dtype=fp8)
    out = kernel.run(torch.zeros(16, 1, 16), zeros, codes, torch.arange(16).view(16, 1), torch.ones(16, 1, dtype=torch.bool), 1.0)
    want = codes.float()
    assert ((out == want) | (out.isnan() & want.isnan())).all()
    # and a whole attention over an fp8 cache is the kernel's over the same cache widened to fp32, bit for bit
    g = torch.Generator().manual_seed(0)
    k, v = ((torch.randn(512, 4, 64, generator=g) * 3).to(fp8) for _ in range(2))
    q = torch.randn(3, 16, 64, generator=g)
    slots, valid = torch.randint(0, 512, (3, 100), generator=g), torch.rand(3, 100, generator=g) > 0.2
    assert torch.equal(kernel.run(q, k, v, slots, valid, 0.125), kernel.run(q, k.float(), v.float(), slots, valid, 0.125))


def test_tensor_parallel_ranks_hold_fp8_shards(tiny_moge_dir):
    # every rank's cache shard is fp8 (the runner message carries the dtype): one process's logprobs,
    # not those of a float32 cache
    args = dict(dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True, device="cpu")
    prompts = [{"prompt_token_ids": PROMPT}]
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=0)

    def logprobs(llm: LLM) -> torch.Tensor:
        return torch.tensor([lp.logprob for lp in llm.generate(prompts, greedy, use_tqdm=False)[0].outputs[0].logprobs])

    one, wide = (logprobs(LLM(str(tiny_moge_dir), kv_cache_dtype=kv, **args)) for kv in ("fp8", "float32"))
    llm = LLM(str(tiny_moge_dir), tensor_parallel_size=2, kv_cache_dtype="fp8", **args)
    try:
        split = logprobs(llm)
    finally:
        llm.shutdown()
    assert split.tolist() == pytest.approx(one.tolist(), abs=1e-4)
    assert (split - wide).abs().max() > 1e-3
