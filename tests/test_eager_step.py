"""engine/eager_step.py: eager decode steps without the modules' Python give the same bits as the
modules (models/dense.py's forward), on the kernels' every kind of weight it calls straight."""

from __future__ import annotations

import time

import pytest

import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine import eager_step
from pangu_infer.quant import cpu_int4

# No prefix cache: a prompt's second request would read its first one's blocks (other bits in the
# prefill, whichever decode step runs).
ARGS = dict(enforce_eager=True, max_model_len=256, enable_prefix_caching=False)
PROMPTS = [
    "Once upon a time, there was a dragon who",
    "The capital of France is",
    # a longer context than the others: decode attention splits the batch into two groups
    "Here is a long list of numbers: " + ", ".join(str(i) for i in range(60)),
]


def _generate(llm: LLM, lean: bool, calls: list) -> list:
    runner = llm.engine.runner
    step = runner.eager_step

    def counted(*args):
        calls.append(args[0].shape[0])
        return step(*args)

    runner.eager_step = counted if lean else None
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
        out = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        runner.eager_step = step
    return [(o.outputs[0].token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in o.outputs[0].logprobs]) for o in out]


def _same_as_modules(llm: LLM, direct_kinds: set[str]) -> None:
    step = llm.engine.runner.eager_step
    assert step is not None, "the eager step should take this model"
    # the quantized linears of the C kernels' kinds are called straight, not as modules
    linears = [c for layer in step.layers for c in (layer[1], layer[8], *getattr(layer[11], "linears", ()))]
    direct = [c for c in linears if getattr(c, "direct", False)]
    kinds = {m.kernel for m in llm.engine.model.modules() if type(m).__name__ == "PackedWeight"}
    if direct_kinds and direct_kinds <= kinds and cpu_int4.library() is not None:
        assert direct, f"no linear called straight ({kinds})"
    calls: list = []
    lean = _generate(llm, True, calls)
    assert calls and max(calls) == len(PROMPTS), "the decode steps should have run through the eager step"
    modules = _generate(llm, False, [])
    assert lean == modules


def test_demo_model_int4(smollm2_gguf_path):
    llm = LLM(str(smollm2_gguf_path), **ARGS)
    _same_as_modules(llm, {"int4_vnni"})


def test_float32_activations(smollm2_gguf_path):
    # the default on a CPU without native bf16 (AVX2-only x86): int4 products of float32 activations
    llm = LLM(str(smollm2_gguf_path), **ARGS, dtype="float32")
    assert llm.engine.model.model.norm.weight.dtype == torch.float32
    _same_as_modules(llm, {"int4_vnni"})


def test_float32_cache(smollm2_gguf_path):
    llm = LLM(str(smollm2_gguf_path), **ARGS, kv_cache_dtype="float32")
    assert llm.engine.runner.k_caches[0].dtype == torch.float32
    _same_as_modules(llm, {"int4_vnni"})


def test_biases_int4(tiny_pangu_gguf):
    # Pangu-Embedded's q/k/v/o biases, weights quantized to int4 while loading
    llm = LLM(str(tiny_pangu_gguf.path), **ARGS, quantization="int4")
    assert llm.engine.model.model.layers[0].self_attn.qkv_proj.bias is not None
    _same_as_modules(llm, {"int4_vnni"})


def test_six_bit_codes(tmp_path, tiny_sentencepiece_vocab):
    from fixtures_gguf import tiny_q6_k_gguf

    path = tiny_q6_k_gguf(tmp_path / "q6k.gguf", tiny_sentencepiece_vocab)
    llm = LLM(str(path), **ARGS)
    _same_as_modules(llm, {"int6"})


def test_not_taken(smollm2_gguf_path, monkeypatch):
    # the batch-invariant mode runs its own kernels
    llm = LLM(str(smollm2_gguf_path), **ARGS, batch_invariant=True)
    assert llm.engine.runner.eager_step is None
    llm.shutdown()
    monkeypatch.setenv(eager_step.ENV, "0")
    llm = LLM(str(smollm2_gguf_path), **ARGS)
    assert llm.engine.runner.eager_step is None


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_moge(tiny_moge_dir, quantization, monkeypatch):
    # MoGE's block runs as a module (routing, experts, load counters); the attention half inline
    llm = LLM(str(tiny_moge_dir), **{**ARGS, "max_model_len": 512}, dtype="bfloat16", quantization=quantization)
    assert type(llm.engine.model).__name__ == "PanguProMoEForCausalLM"
    counted = []
    real = eager_step.EagerDecodeStep.__call__

    def step_and_count(self, *args):
        out = real(self, *args)
        counted.append([layer["tokens"] for layer in llm.moe_stats()["layers"]])
        return out

    monkeypatch.setattr(eager_step.EagerDecodeStep, "__call__", step_and_count)
    _same_as_modules(llm, {"int4_vnni"} if quantization == "int4" else set())
    # every eager step's tokens (a row per prompt) reached the experts' load counters of every layer
    assert len(counted) >= 10
    assert all(b[0] - a[0] == len(PROMPTS) and len(set(b)) == 1 for a, b in zip(counted, counted[1:]))


def _build_start_recorded(monkeypatch) -> list:
    """ModelRunner._wait_while_busy's return times (time.monotonic), the build stopped right there;
    every step made at least 10 ms long (runs of a known least length on any machine)."""
    from pangu_infer.engine import runner as runner_module

    run = runner_module.ModelRunner._run
    monkeypatch.setattr(runner_module.ModelRunner, "_run", lambda self, *a: time.sleep(0.01) or run(self, *a))
    ends = []
    wait = runner_module.ModelRunner._wait_while_busy

    def recorded(self, deadline):
        wait(self, deadline)
        ends.append(time.monotonic())
        self.stop_compile()  # (nothing compiled by these tests)

    monkeypatch.setattr(runner_module.ModelRunner, "_wait_while_busy", recorded)
    return ends


def _run_with_grace(path, monkeypatch, grace: float, max_tokens: int, max_model_len: int) -> tuple[float, float, list]:
    """One greedy run of max_tokens steps (each at least 10 ms) with the build's grace `grace`: its
    start and end (time.monotonic) and when the build's wait returned (_build_start_recorded)."""
    from pangu_infer.engine import runner as runner_module

    monkeypatch.setattr(runner_module, "BUSY_GRACE_S", grace)
    ends = _build_start_recorded(monkeypatch)
    llm = LLM(str(path), max_model_len=max_model_len, enable_prefix_caching=False)
    begun = time.monotonic()
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    done = time.monotonic()
    assert not llm.wait_compiled(timeout=30)
    return begun, done, ends


def test_build_waits_while_steps_run(smollm2_gguf_path, monkeypatch):
    # A run shorter than the grace ends before the background build starts; the build starts once
    # the engine is idle.
    from pangu_infer.engine import runner as runner_module

    begun, done, ends = _run_with_grace(smollm2_gguf_path, monkeypatch, 60.0, 150, 256)
    assert done - begun > 1.4 * runner_module.FIRST_STEP_GRACE_S  # (a run longer than the first step's wait)
    assert len(ends) == 1 and done <= ends[0] < done + 10 * runner_module.IDLE_GAP_S + 5


def test_build_starts_after_the_grace(smollm2_gguf_path, monkeypatch):
    # ... and a run longer than the grace has the build start during it.
    _, done, ends = _run_with_grace(smollm2_gguf_path, monkeypatch, 0.3, 150, 512)
    assert len(ends) == 1 and ends[0] < done - 0.5  # (the run: at least 1.5 s)


def test_build_starts_at_once_for_a_run_longer_than_the_grace(smollm2_gguf_path, monkeypatch):
    # A run whose tokens left, at its steps' pace, end after the grace would only put the compiled
    # steps off by waiting: the build starts at its first decode steps.
    begun, done, ends = _run_with_grace(smollm2_gguf_path, monkeypatch, 2.5, 300, 512)
    assert done - begun > 3.0  # (300 steps of at least 10 ms)
    assert len(ends) == 1 and ends[0] < begun + 1.0


def test_lora_not_taken(tiny_dense_dir):
    # the adapters' products ride on the modules (models/lora.py): their eager steps run the modules
    args = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory=8 << 20)
    assert LLM(str(tiny_dense_dir), **args).engine.runner.eager_step is not None
    assert LLM(str(tiny_dense_dir), **args, enable_lora=True).engine.runner.eager_step is None


def test_tensor_parallel_not_taken(smollm2_gguf_path, monkeypatch):
    # a rank's shard needs the all-reduces inside the modules
    from types import SimpleNamespace

    llm = LLM(str(smollm2_gguf_path), **ARGS)
    runner, model = llm.engine.runner, llm.engine.model
    args = (model, runner.decode_kernel, runner.k_caches, runner.v_caches)
    assert eager_step.build(*args) is not None
    monkeypatch.setattr(model, "parallel", SimpleNamespace(world_size=2, rank=0))
    assert eager_step.build(*args) is None
