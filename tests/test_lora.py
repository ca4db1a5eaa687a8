"""LoRA adapters (PEFT folders) served beside the base model: every token checked against PEFT's own
model (tests/fixtures_lora.py), with adapters and the base model sharing batches, chunked prefill,
the prefix cache and quantized base weights; and every bad adapter or request a ValueError."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from fixtures_lora import make_peft_adapter
from pangu_infer import LLM, LoRARequest, SamplingParams
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, transformers_llama

PROMPTS = [
    [1, 5, 9, 33, 7],
    [1, 44, 2, 9, 100, 3, 17, 17, 17, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20],
    list(range(3, 43)),  # 40 tokens: two full blocks of 16 for the prefix cache
]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def base_reference(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


@pytest.fixture(scope="module")
def lora_llm(tiny_dense_dir):
    return LLM(
        str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, max_num_batched_tokens=16,
        enable_lora=True, max_loras=2,
    )


def requests(adapters) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(a.path)) for i, (name, a) in enumerate(sorted(adapters.items()))}


def base_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_adapters_and_the_base_model_in_one_batch_match_peft(lora_llm, lora_adapters, base_reference):
    """Six requests in one batch, two per adapter and two on the base model, prefilled in chunks of
    16 beside each other's decodes: each continuation is PEFT's (or transformers', for the base)."""
    reqs = requests(lora_adapters)
    plan = [("full", 0), ("attn", 1), (None, 2), ("attn", 0), ("full", 2), (None, 1)]
    outs = lora_llm.generate(
        [{"prompt_token_ids": PROMPTS[p]} for _, p in plan], GREEDY,
        lora_request=[reqs[name] if name else None for name, _ in plan], use_tqdm=False,
    )
    for (name, p), out in zip(plan, outs):
        want = lora_adapters[name].greedy(PROMPTS[p], 8) if name else base_greedy(base_reference, PROMPTS[p], 8)
        assert out.outputs[0].token_ids == want, (name, p)
    # the adapters change the answers (else the test above would hold with LoRA ignored)
    assert outs[0].outputs[0].token_ids != base_greedy(base_reference, PROMPTS[0], 8)
    assert outs[3].outputs[0].token_ids != base_greedy(base_reference, PROMPTS[0], 8)


def test_an_adapter_applies_while_another_thread_compiles(lora_llm, lora_adapters, compiling_elsewhere):
    """A server compiles its decode step on a background thread while it serves eagerly: the eager
    steps apply the live adapters then too, not the switch the graph being traced reads (off while
    the base variant, traced without them, compiles: engine/compiled.py)."""
    reqs = requests(lora_adapters)
    lora = lora_llm.engine.runner.lora
    lora.in_graph = False
    try:
        out = lora_llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY, lora_request=[reqs["full"]], use_tqdm=False)
    finally:
        lora.in_graph = True
    assert out[0].outputs[0].token_ids == lora_adapters["full"].greedy(PROMPTS[1], 8)


def test_prompt_logprobs_under_an_adapter_are_pefts(lora_llm, lora_adapters):
    reqs = requests(lora_adapters)
    ids = PROMPTS[2]
    out = lora_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=reqs["attn"], use_tqdm=False)[0]
    ref = lora_adapters["attn"].logits(ids).log_softmax(-1)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (got - want).abs().max().item() <= 1e-4


def test_the_prefix_cache_keeps_each_adapters_blocks_apart(tiny_dense_dir, lora_adapters, base_reference):
    """A prompt cached by the base model is computed again under an adapter (its keys and values
    differ), and is then served from the cache to that adapter's next request."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True)
    reqs = requests(lora_adapters)
    prompt = {"prompt_token_ids": PROMPTS[2]}
    base = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert base.outputs[0].token_ids == base_greedy(base_reference, PROMPTS[2], 8)
    first = llm.generate(prompt, GREEDY, lora_request=reqs["full"], use_tqdm=False)[0]
    assert first.metrics["num_cached_tokens"] == 0
    assert first.outputs[0].token_ids == lora_adapters["full"].greedy(PROMPTS[2], 8)
    again = llm.generate(prompt, GREEDY, lora_request=reqs["full"], use_tqdm=False)[0]
    assert again.metrics["num_cached_tokens"] == 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.generate(prompt, GREEDY, lora_request=reqs["attn"], use_tqdm=False)[0]
    assert other.metrics["num_cached_tokens"] == 0
    assert other.outputs[0].token_ids == lora_adapters["attn"].greedy(PROMPTS[2], 8)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_adapters_apply_over_quantized_base_weights(tiny_dense_dir, lora_adapters, quantization):
    """LoRA adds to whatever module holds the base weight: over int8/int4 weights the prompt's
    logprobs are far closer to PEFT's (fp32 base) than the base model's are (an adapter left out
    of the quantized modules would leave them as far)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20,
              quantization=quantization, enable_lora=True)
    reqs = requests(lora_adapters)
    ids = PROMPTS[1]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    with_lora, plain = llm.generate([{"prompt_token_ids": ids}] * 2, params, lora_request=[reqs["full"], None], use_tqdm=False)
    ref = lora_adapters["full"].logits(ids).log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor([e.logprob for e in with_lora.prompt_logprobs[1:]])
    base = torch.tensor([e.logprob for e in plain.prompt_logprobs[1:]])
    err = (got - ref).abs().max().item()
    # int4 here: 4-bit random weights, and activations rounded to int8 by the CPU kernel
    assert err < {"int8": 0.1, "int4": 0.5}[quantization] * (base - ref).abs().max().item(), err


def test_max_loras_evicts_the_least_recently_used_idle_adapter_and_requests_wait_for_a_free_one(tiny_dense_dir, lora_adapters, base_reference):
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True, max_loras=1)
    reqs = requests(lora_adapters)
    for name in ("full", "attn", "full"):
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=reqs[name], use_tqdm=False)[0]
        assert out.outputs[0].token_ids == lora_adapters[name].greedy(PROMPTS[0], 8)
        assert [r.lora_name for r in llm.engine.list_loras()] == [name]
    # at once, with a base request and another of the loaded adapter: "attn" waits until no request
    # runs with "full" (one adapter at a time in a batch), then loads; every answer is still right
    plan = ["full", "attn", None, "full", "attn"]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * len(plan), GREEDY, lora_request=[reqs[n] if n else None for n in plan], use_tqdm=False)
    for name, out in zip(plan, outs):
        if name:
            assert out.outputs[0].token_ids == lora_adapters[name].greedy(PROMPTS[0], 8), name
    assert outs[2].outputs[0].token_ids == base_greedy(base_reference, PROMPTS[0], 8)
    assert [r.lora_name for r in llm.engine.list_loras()] == ["attn"]
    assert not llm.engine.has_unfinished_requests()


def test_a_request_waiting_for_its_adapter_can_be_aborted_and_a_bad_one_fails_at_once(tiny_dense_dir, lora_adapters):
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True, max_loras=1)
    engine, reqs = llm.engine, requests(lora_adapters)
    engine.add_request("running", PROMPTS[0], GREEDY, lora_request=reqs["full"])
    engine.add_request("waiting", PROMPTS[0], GREEDY, lora_request=reqs["attn"])
    with pytest.raises(ValueError, match="no adapter_config.json"):  # read at once, not when a slot frees
        engine.add_request("bad", PROMPTS[0], GREEDY, lora_request=LoRARequest("bad", 3, str(tiny_dense_dir)))
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["running"]
    out = engine.abort_request("waiting")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert [r.lora_name for r in engine.list_loras()] == ["full"]  # "attn" never loaded


def _waiting_for_a_slot(policy, lora_adapters, tiny_dense_dir, plan):
    """max_loras=1 held by a running "full" request; `plan` [(request id, adapter name, priority)]
    then waits. Returns the engine one step after "running" ended, and who the scheduler holds then."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True,
              max_loras=1, scheduling_policy=policy)
    engine, reqs = llm.engine, requests(lora_adapters)
    folders = {"attn": reqs["attn"].lora_path, "attn2": reqs["attn"].lora_path, "full2": reqs["full"].lora_path}
    engine.add_request("running", PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), lora_request=reqs["full"])
    for i, (rid, name, priority) in enumerate(plan):
        engine.add_request(rid, PROMPTS[0], GREEDY, lora_request=LoRARequest(name, 10 + i, folders[name]), priority=priority)
    while "running" in engine.requests:
        engine.step()
    engine.step()  # the slot "running" held is free: waiting requests are admitted at the step's start
    admitted = [s.request_id for s in list(engine.scheduler.running) + list(engine.scheduler.waiting)]
    return engine, admitted


def test_requests_waiting_for_an_adapter_are_admitted_by_priority(tiny_dense_dir, lora_adapters):
    engine, admitted = _waiting_for_a_slot("priority", lora_adapters, tiny_dense_dir,
                                           [("low", "attn", 5), ("high", "attn2", -1)])
    assert admitted == ["high"] and [r.lora_name for r in engine.list_loras()] == ["attn2"]
    _, admitted = _waiting_for_a_slot("priority", lora_adapters, tiny_dense_dir, [("first", "attn", 0), ("second", "attn2", 0)])
    assert admitted == ["first"]  # equal priorities: arrival order


def test_a_request_blocked_on_a_slot_does_not_hold_back_one_whose_adapter_loaded(tiny_dense_dir, lora_adapters):
    """w1 loads "attn" when the slot frees; w2 ("attn2") still finds the slot busy; w3, also "attn",
    runs beside w1 instead of waiting behind w2 (and then behind w2's own turn)."""
    engine, admitted = _waiting_for_a_slot("fcfs", lora_adapters, tiny_dense_dir,
                                           [("w1", "attn", 0), ("w2", "attn2", 0), ("w3", "attn", 0)])
    assert sorted(admitted) == ["w1", "w3"]
    assert [w[0].request_id for w in engine._lora_waiting] == ["w2"]
    while engine.has_unfinished_requests():
        engine.step()
    assert [r.lora_name for r in engine.list_loras()] == ["attn2"]


def test_llm_logits_take_an_adapter_and_never_the_last_steps(tiny_dense_dir, lora_adapters, base_reference):
    """LLM.logits: PEFT's logits with lora_request, transformers' base logits without, whatever
    adapters the last engine step ran with (its rows' slots are still in the slot table)."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True, max_loras=2)
    reqs = requests(lora_adapters)
    ids = PROMPTS[0]
    with torch.no_grad():
        base = base_reference(torch.tensor([ids])).logits[0].float()
    with_full = lora_adapters["full"].logits(ids)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=2), lora_request=reqs["full"], use_tqdm=False)
    torch.testing.assert_close(llm.logits(ids), base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(llm.logits(ids, lora_request=reqs["full"]), with_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(llm.logits(ids), base, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20).logits(ids, lora_request=reqs["full"])


def test_remove_lora(lora_llm, lora_adapters):
    engine = lora_llm.engine
    reqs = requests(lora_adapters)
    engine.add_lora(reqs["attn"])
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=reqs["attn"])
    with pytest.raises(ValueError, match="'attn' is in use"):
        engine.remove_lora("attn")
    engine.abort_request("busy")
    assert engine.remove_lora("attn") is True
    assert engine.remove_lora("attn") is False
    assert "attn" not in [r.lora_name for r in engine.list_loras()]


def test_a_name_already_loaded_from_another_folder_is_refused(lora_llm, lora_adapters):
    reqs = requests(lora_adapters)
    lora_llm.engine.add_lora(reqs["full"])
    with pytest.raises(ValueError, match="'full' is loaded from"):
        lora_llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=LoRARequest("full", 1, str(lora_adapters["attn"].path)), use_tqdm=False)


def _edited_adapter(tmp_path, source, **changes):
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    cfg = json.loads((target / "adapter_config.json").read_text())
    cfg.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"r": 0}, "r=0"),
        ({"r": 16}, "has rank 8, its config says r=16"),
        ({"lora_alpha": "x"}, "lora_alpha='x'"),
    ],
)
def test_bad_adapter_configs_are_value_errors_naming_the_field(tmp_path, lora_llm, lora_adapters, changes, message):
    path = _edited_adapter(tmp_path, lora_adapters["full"].path, **changes)
    with pytest.raises(ValueError, match=message):
        lora_llm.engine.add_lora(LoRARequest("bad", 9, str(path)))
    assert "bad" not in [r.lora_name for r in lora_llm.engine.list_loras()]


def test_bad_adapter_folders_are_value_errors(tmp_path, tiny_dense_config, lora_llm, lora_adapters):
    engine = lora_llm.engine
    with pytest.raises(ValueError, match="no such folder"):
        engine.add_lora(LoRARequest("x", 9, str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        engine.add_lora(LoRARequest("x", 9, str(tmp_path / "empty")))
    broken = _edited_adapter(tmp_path, lora_adapters["full"].path)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        engine.add_lora(LoRARequest("x", 9, str(broken)))
    # an adapter of another model: wider hidden size
    wide = pangu_dense_config(**{**tiny_dense_config, "hidden_size": 2 * tiny_dense_config["hidden_size"]})
    other = make_peft_adapter(tmp_path / "other", wide, 3, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"is the adapter for another model"):
        engine.add_lora(LoRARequest("x", 9, str(other.path)))
    head = make_peft_adapter(tmp_path / "head", tiny_dense_config, 3, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"targets 'lm_head', which this engine cannot apply LoRA to"):
        engine.add_lora(LoRARequest("x", 9, str(head.path)))


def test_rank_above_max_lora_rank_and_lora_off_are_value_errors(tiny_dense_dir, lora_adapters):
    small = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=4 << 20, enable_lora=True, max_lora_rank=4)
    with pytest.raises(ValueError, match=r"rank 8 of .* is above max_lora_rank=4"):
        small.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=LoRARequest("full", 1, str(lora_adapters["full"].path)), use_tqdm=False)
    off = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=4 << 20)
    with pytest.raises(ValueError, match=r"start it with enable_lora=True"):
        off.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=LoRARequest("full", 1, str(lora_adapters["full"].path)), use_tqdm=False)
    with pytest.raises(ValueError, match=r"lora_int_id=0 must be a positive integer"):
        LoRARequest("full", 0, "x")
    with pytest.raises(ValueError, match=r"2 LoRA requests for 1 prompts"):
        off.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=[None, None], use_tqdm=False)


def test_engine_buffers_past_memory_are_a_value_error_naming_the_sizes(tiny_dense_dir):
    """max_num_batched_tokens 10**12 with LoRA on sized the adapters' per-row slots for 10**12 rows:
    torch's RuntimeError "DefaultCPUAllocator: can't allocate memory" (8 TB), a traceback."""
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=1000000000000.*more memory than there is.*can't allocate memory"):
        LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=4 << 20, enable_lora=True,
            max_num_batched_tokens=10**12)


def test_decode_steps_with_adapters_run_compiled(tiny_dense_dir, lora_adapters, base_reference):
    """The compiled decode step is traced twice: with the adapters' slots in it, which steps with an
    adapter row run (adapter requests, and adapter and base requests mixed), and without them, which
    steps of base requests alone run (the adapters' products cost them more than a small 4-bit
    model's weights); transformers' and PEFT's tokens either way. An adapter loaded after the build
    (written into its slot) is used by the same graph."""
    from pangu_infer.engine.compiled import LoRAVariants

    llm = LLM(str(tiny_dense_dir), dtype="float32", kv_cache_memory=8 << 20, max_model_len=128, enable_lora=True, max_loras=2)
    assert llm.wait_compiled(), llm.engine.runner.compile_error
    step = llm.engine.runner.decode_forward
    assert isinstance(step, LoRAVariants)
    calls = []
    with_lora, base_graph = step.with_lora, step.base
    step.with_lora = lambda *a: calls.append(("lora", len(a[0]))) or with_lora(*a)
    step.base = lambda *a: calls.append(("base", len(a[0]))) or base_graph(*a)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    base = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in base] == [base_greedy(base_reference, p, 8) for p in PROMPTS[:2]]
    assert calls == [("base", 2)] * 7  # every decode step of the two ran compiled, without the adapters
    reqs = requests(lora_adapters)
    for plan in (["full", None], ["attn", "full"], ["attn", "attn"]):
        calls.clear()
        mixed = llm.generate(prompts, GREEDY, lora_request=[reqs[n] if n else None for n in plan], use_tqdm=False)
        for name, ids, out in zip(plan, PROMPTS[:2], mixed):
            want = lora_adapters[name].greedy(ids, 8) if name else base_greedy(base_reference, ids, 8)
            assert out.outputs[0].token_ids == want, (plan, name)
        assert calls == [("lora", 2)] * 7, plan
    calls.clear()
    after = llm.generate(prompts, GREEDY, use_tqdm=False)  # base requests again, after the adapters
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in base]
    assert calls == [("base", 2)] * 7
    # The base graph has no adapter products in it: given rows of an installed adapter's slot, it
    # computes what the adapters' graph computes for rows with none, and not what it computes for them.
    from pangu_infer.engine.compiled import _dummy_step

    runner, lora = llm.engine.runner, llm.engine.runner.lora
    total = runner.k_caches[0].shape[0]
    slot = llm.engine.loras.add(reqs["full"])[1]
    with runner.bind(), torch.inference_mode():  # (the graphs' guards hold their inputs' dispatch keys)
        inputs = _dummy_step(2, 2, runner.device, range(total - runner.block_size, total))
        lora.slot_ids[:2] = slot
        lora.in_graph = False
        without = base_graph(*inputs)
        lora.in_graph = True
        applied = with_lora(*inputs)
        lora.slot_ids[:2] = -1
        zeros = with_lora(*inputs)
    assert not base_graph.missed and not with_lora.missed  # graphs ran, not the eager fallback
    assert torch.allclose(without, zeros, atol=1e-5) and not torch.allclose(without, applied, atol=1e-3)


def test_generate_and_chat_take_an_adapter_with_lora(tiny_dense_dir, lora_adapters, lora_llm, capsys):
    """`pangu-infer generate --lora PATH` answers with the adapter (the Python API's text, checked
    against PEFT above); a folder that is no adapter is one line and exit status 2."""
    from pangu_infer.cli import main

    common = ["--model", str(tiny_dense_dir), "--dtype", "float32", "--enforce-eager", "--kv-cache-memory", "8MiB",
              "--temperature", "0", "--max-tokens", "8"]
    path = str(lora_adapters["full"].path)
    want = lora_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8), lora_request=LoRARequest("full", 1, path), use_tqdm=False)[0]
    base = lora_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert want.outputs[0].text != base.outputs[0].text
    capsys.readouterr()
    assert main(["generate", *common, "--prompt", "Hello there", "--lora", path]) == 0
    assert capsys.readouterr().out == want.outputs[0].text + "\n"
    assert main(["chat", *common, "--lora", path, "--message", "Hi"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", *common, "--prompt", "Hello there", "--lora", str(tiny_dense_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter_config.json" in err


def test_async_engine_reads_an_adapter_it_does_not_hold_off_the_engine_thread(tiny_dense_dir, lora_adapters):
    """An adapter the engine does not hold (never loaded, or made room for) is read on a worker
    thread before its request is queued: the engine thread, stepping everyone's requests, never
    reads adapter files. A folder that is no adapter is the request's RequestError."""
    import asyncio
    import threading

    from pangu_infer.engine.async_engine import AsyncEngine
    from pangu_infer.errors import RequestError

    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True, max_loras=1)
    reads, real = [], llm.engine.read_lora
    llm.engine.read_lora = lambda req: reads.append((req.lora_name, threading.current_thread().name)) or real(req)
    engine = AsyncEngine.from_llm(llm)
    reqs = requests(lora_adapters)

    async def run(name, lora):
        async for out in engine.generate(PROMPTS[0], GREEDY, name, lora_request=lora):
            last = out
        return last.outputs[0].token_ids

    try:
        for name in ("full", "attn", "full"):
            assert asyncio.run(run(f"r-{len(reads)}", reqs[name])) == lora_adapters[name].greedy(PROMPTS[0], 8)
        assert [n for n, _ in reads] == ["full", "attn", "full"]
        assert all(t != "pangu-engine" and t != threading.current_thread().name for _, t in reads)
        with pytest.raises(RequestError, match="no adapter_config.json"):
            asyncio.run(run("bad", LoRARequest("bad", 9, str(tiny_dense_dir))))
    finally:
        engine.shutdown()


def test_a_saved_decode_step_applies_the_adapters_loaded_after_it(tmp_path, tiny_dense_dir, lora_adapters, base_reference):
    """The second process loads the compiled step saved by the first (engine/saved_step.py) and its
    adapters, loaded after that, are read from their slots at each call: PEFT's tokens in both."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    reqs = requests(lora_adapters)
    script = (
        "import json; from pangu_infer import LLM, LoRARequest, SamplingParams\n"
        f"llm = LLM({str(tiny_dense_dir)!r}, dtype='float32', max_model_len=128, kv_cache_memory=8 << 20, enable_lora=True, max_loras=2)\n"
        "assert llm.wait_compiled(), llm.engine.runner.compile_error\n"
        "step = llm.engine.runner.decode_forward\n"
        f"loras = [LoRARequest(*r) if r else None for r in {[(r.lora_name, r.lora_int_id, r.lora_path) for r in (reqs['full'], reqs['attn'])] + [None]!r}]\n"
        f"prompts = [{{'prompt_token_ids': {PROMPTS[0]!r}}}] * 3\n"
        "outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), lora_request=loras, use_tqdm=False)\n"
        "base = llm.generate(prompts[2:], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)\n"
        "graphs = (step.with_lora, step.base)\n"
        "print(json.dumps({'loaded': sum(g.loaded for g in graphs), 'built': sum(g.built for g in graphs), "
        "'tokens': [o.outputs[0].token_ids for o in outs + base]}))\n"
    )

    def start() -> dict:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    want = [lora_adapters["full"].greedy(PROMPTS[0], 8), lora_adapters["attn"].greedy(PROMPTS[0], 8), base_greedy(base_reference, PROMPTS[0], 8)]
    want.append(want[-1])  # a base request alone: the graph without the adapters' products
    first = start()
    assert first["built"] >= 4 and first["loaded"] == 0 and first["tokens"] == want
    second = start()
    assert second["loaded"] == first["built"] and second["built"] == 0
    assert second["tokens"] == want


def test_an_adapter_on_pangu_pro_moe_equals_its_weights_merged_into_the_checkpoint(tmp_path, tiny_moge_dir):
    """MoGE (Pangu Pro MoE): an adapter on attention and the shared expert, in PEFT's file layout,
    served at run time gives the tokens and prompt logprobs of a checkpoint with W + (alpha/r) B A
    written into those weights (PEFT's merge), compiled decode included."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_moge_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    rank, alpha = 4, 8
    adapter, merged = {}, dict(weights)
    for name, w in weights.items():
        m = re.match(r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.shared_expert\.(gate|up|down)_proj))\.weight$", name)
        if m is None:
            continue
        a = torch.randn(rank, w.shape[1], generator=g) * 0.3
        b = torch.randn(w.shape[0], rank, generator=g) * 0.3
        adapter[f"base_model.model.{m.group(1)}.lora_A.weight"] = a
        adapter[f"base_model.model.{m.group(1)}.lora_B.weight"] = b
        merged[name] = w + (alpha / rank) * (b @ a)
    assert len(adapter) == 2 * 7 * 2  # 7 projections in each of the 2 layers
    (tmp_path / "adapter").mkdir()
    save_file(adapter, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha}))
    shutil.copytree(tiny_moge_dir, tmp_path / "merged")
    save_file(merged, str(tmp_path / "merged" / "model.safetensors"))

    kwargs = dict(dtype="float32", kv_cache_memory=8 << 20, max_model_len=128)
    served = LLM(str(tiny_moge_dir), enable_lora=True, **kwargs)
    reference = LLM(str(tmp_path / "merged"), enforce_eager=True, **kwargs)
    assert served.wait_compiled(), served.engine.runner.compile_error
    lora = LoRARequest("moe", 1, str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    got = served.generate(prompts, params, lora_request=lora, use_tqdm=False)
    want = reference.generate(prompts, params, use_tqdm=False)
    base = served.generate(prompts, params, use_tqdm=False)
    for g_out, w_out, b_out in zip(got, want, base):
        assert g_out.outputs[0].token_ids == w_out.outputs[0].token_ids
        lp = [(x.logprob, y.logprob) for x, y in zip(g_out.prompt_logprobs[1:], w_out.prompt_logprobs[1:])]
        assert max(abs(x - y) for x, y in lp) <= 1e-4
    assert [o.outputs[0].token_ids for o in base] != [o.outputs[0].token_ids for o in want]


def test_adapters_with_speculative_decoding_and_n_keep_pefts_tokens(tiny_dense_dir, lora_adapters):
    """Prompt-lookup drafts are verified through the adapter (draft rows take their sequence's slot),
    and n=2 forks share their parent's adapter and its salted prompt blocks."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", enforce_eager=True, kv_cache_memory=8 << 20, enable_lora=True,
              num_speculative_tokens=3, speculative_ngram=1)
    reqs = requests(lora_adapters)
    repetitive = list(range(3, 300))  # most tokens the model writes are in it: the lookup proposes their followers
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    outs = llm.generate([{"prompt_token_ids": repetitive}] * 2, params, lora_request=[reqs["full"], reqs["attn"]], use_tqdm=False)
    for name, out in zip(("full", "attn"), outs):
        want = lora_adapters[name].greedy(repetitive, 12)
        assert [c.token_ids for c in out.outputs] == [want, want], name
    assert llm.engine.stats()["spec_draft_tokens"] > 0


def test_an_adapter_path_that_is_a_hub_id_is_downloaded(monkeypatch, lora_llm, lora_adapters, tmp_path):
    """As vLLM resolves a lora_path: org/name that is no local folder is fetched with
    huggingface_hub (only the adapter's two files); a failed download is a ValueError naming it."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        if repo_id == "someone/missing":
            raise RuntimeError("404 Client Error: Repository Not Found")
        return str(lora_adapters["attn"].path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = lora_llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, lora_request=LoRARequest("hub", 7, "someone/attn-lora"), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == lora_adapters["attn"].greedy(PROMPTS[0], 8)
    assert calls == [("someone/attn-lora", ["adapter_config.json", "adapter_model.safetensors"])]
    with pytest.raises(ValueError, match=r"'someone/missing' is not a local folder and could not be downloaded from the hub: 404"):
        lora_llm.engine.add_lora(LoRARequest("gone", 8, "someone/missing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass the adapter's folder"):
        lora_llm.engine.add_lora(LoRARequest("file", 9, str(tmp_path / "file.txt")))
    assert lora_llm.engine.remove_lora("hub")


# ---------------------------------------------------------------------------- GGUF adapters (llama.cpp's)

_GGUF_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_adapter(path, adapter, config: dict, arch: str, qtype=None, extra=None):
    """A PEFT adapter written as llama.cpp's convert_lora_to_gguf.py writes it: general.type
    "adapter", adapter.type "lora", adapter.lora.alpha, and per projection
    blk.N.<tensor>.weight.lora_a (A) / .lora_b (B); for GGUF architecture `llama` the q/k B rows in
    the converter's order (LlamaModel.permute, as it reorders the base weights' rows)."""
    import gguf
    from safetensors.torch import load_file

    from fixtures_gguf import llama_cpp_permute

    lora_config = json.loads((adapter.path / "adapter_config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_config["lora_alpha"]))
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, t in load_file(str(adapter.path / "adapter_model.safetensors")).items():
        m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight", name)
        x = t.float()
        if arch == "llama" and m[3] == "B" and m[2] in ("q_proj", "k_proj"):
            x = llama_cpp_permute(x, config["num_attention_heads"] if m[2] == "q_proj" else config["num_key_value_heads"])
        arr = x.numpy()
        gguf_name = f"blk.{m[1]}.{_GGUF_MODULES[m[2]]}.weight.lora_{m[3].lower()}"
        try:
            if qtype is None:
                raise gguf.QuantError("f32")
            w.add_tensor(gguf_name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        except gguf.QuantError:  # rows shorter than a block (B's rank): the converter falls back to f16 there
            w.add_tensor(gguf_name, arr.astype(np.float16) if qtype is not None else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "pangu-embedded"])
def test_a_gguf_adapter_as_llama_cpp_writes_it_matches_peft(tmp_path, lora_llm, lora_adapters, tiny_dense_config, arch):
    """PEFT's "full" adapter converted to a GGUF file (llama.cpp's layout, q/k rows reordered for
    `llama`) gives PEFT's tokens and prompt logprobs, as llama.cpp's `--lora` would apply it."""
    path = write_gguf_adapter(tmp_path / f"full-{arch}.gguf", lora_adapters["full"], tiny_dense_config, arch)
    req = LoRARequest(f"gguf-{arch}", 50 + len(arch), str(path))
    outs = lora_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=req, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [lora_adapters["full"].greedy(p, 8) for p in PROMPTS]
    ids = PROMPTS[2]
    out = lora_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=req, use_tqdm=False)[0]
    ref = lora_adapters["full"].logits(ids).log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (torch.tensor([e.logprob for e in out.prompt_logprobs[1:]]) - ref).abs().max().item() <= 1e-4
    lora_llm.engine.remove_lora(req.lora_name)


def test_a_q8_0_gguf_adapter_is_close_to_peft(tmp_path, lora_llm, lora_adapters, tiny_dense_config):
    """convert_lora_to_gguf.py --outtype q8_0: the blocks are dequantized as gguf does."""
    import gguf

    path = write_gguf_adapter(tmp_path / "full-q8.gguf", lora_adapters["full"], tiny_dense_config, "llama", gguf.GGMLQuantizationType.Q8_0)
    req = LoRARequest("gguf-q8", 60, str(path))
    ids = PROMPTS[2]
    out = lora_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), lora_request=req, use_tqdm=False)[0]
    ref = lora_adapters["full"].logits(ids).log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    moved = (torch.tensor([e.logprob for e in out.prompt_logprobs[1:]]) - ref).abs()
    # Q8_0's rounding of these large random A matrices (B, of rank 8, stays f16): hundredths
    assert moved.mean().item() <= 0.03 and moved.max().item() <= 0.25, moved
    lora_llm.engine.remove_lora(req.lora_name)


def test_bad_gguf_adapters_are_value_errors_naming_the_file(tmp_path, lora_llm, lora_adapters, tiny_dense_config):
    import gguf

    def refused(path, message):
        with pytest.raises(ValueError, match=message):
            lora_llm.engine.read_lora(LoRARequest("bad", 70, str(path)))

    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("blk.0.attn_q.weight", torch.zeros(64, 64).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    refused(model, "general.type=None: a GGUF model, not an adapter")
    alora = write_gguf_adapter(tmp_path / "alora.gguf", lora_adapters["full"], tiny_dense_config, "llama",
                               extra={"adapter.alora.invocation_tokens": "x"})
    refused(alora, "activated LoRA")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    refused(tmp_path / "junk.gguf", "junk.gguf.*not GGUF")
    other = tmp_path / "other.gguf"
    bigger = dict(tiny_dense_config, hidden_size=128, intermediate_size=256)
    big_adapter = make_peft_adapter(tmp_path / "big", bigger, 3, r=4, lora_alpha=8, target_modules=["v_proj"])
    write_gguf_adapter(other, big_adapter, bigger, "pangu-embedded")
    refused(other, "another model")
