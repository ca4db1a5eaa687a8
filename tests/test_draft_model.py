"""Speculative decoding with a draft model: the target's own greedy text, its distribution when
sampling, the draft's KV cache kept in step with the target's, and the ways a draft is refused."""

from __future__ import annotations

import functools
import itertools
import re
import subprocess
import sys

import pytest
import torch

from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine
from pangu_infer.engine.spec_decode import speculative_settings
from pangu_infer.loader import load_model
from fixtures_models import add_mlp_noise, build_tiny_model
from test_spec_decode import CYCLIC_SAMPLES, assert_samples_follow_the_target, write_cyclic_model

PROMPTS = [
    {"prompt_token_ids": [5, 17, 300, 42, 9, 120, 77, 8, 64, 900] * 3},
    {"prompt_token_ids": [11, 12, 13]},
    {"prompt_token_ids": list(range(100, 190))},  # several prefill chunks at max_num_batched_tokens=32
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
KW = dict(dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 24, enforce_eager=True)


@pytest.fixture(scope="module")
def noisy_draft_dir(tmp_path_factory, tiny_dense_config, pangu_tokenizer_dir):
    """The target's weights with noise on its MLPs: a draft that agrees with the target often, not always."""
    directory = tmp_path_factory.mktemp("noisy_draft")
    return add_mlp_noise(build_tiny_model(directory, tiny_dense_config, pangu_tokenizer_dir))


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory, tiny_dense_config, pangu_tokenizer_dir):
    """Another random model of the same tokenizer: its drafts are nearly always rejected."""
    return build_tiny_model(tmp_path_factory.mktemp("other_draft"), tiny_dense_config, pangu_tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def plain(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), **KW)


def _tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("draft", ["self", "noisy", "other"])
def test_greedy_text_is_the_targets_whatever_the_draft(plain, tiny_dense_dir, noisy_draft_dir, other_draft_dir, draft):
    """A draft equal to the target (every draft accepted: its cache must follow the target's through
    chunked prefills and bonus tokens), a draft that agrees in part, and one that never does: the
    tokens are always those of plain greedy decoding."""
    path = {"self": tiny_dense_dir, "noisy": noisy_draft_dir, "other": other_draft_dir}[draft]
    spec = LLM(str(tiny_dense_dir), speculative_model=str(path), num_speculative_tokens=3, **KW)
    assert _tokens(spec) == _tokens(plain)
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0
    rate = stats["spec_acceptance_rate"]
    if draft == "self":
        assert rate == 1.0, stats  # a stale draft cache would show as a rejected token
    elif draft == "noisy":
        assert 0.1 < rate < 1.0, stats
    else:
        assert rate < 0.5, stats


def test_self_draft_takes_fewer_steps(plain, tiny_dense_dir):
    spec = LLM(str(tiny_dense_dir), speculative_config={"model": str(tiny_dense_dir), "num_speculative_tokens": 4}, **KW)
    before_plain = plain.engine.num_steps
    want = _tokens(plain, PROMPTS[:1])
    plain_steps = plain.engine.num_steps - before_plain
    assert _tokens(spec, PROMPTS[:1]) == want
    # 1 prefill step, then 40 tokens at up to 5 per step
    assert spec.engine.num_steps <= 1 + 40 // 5 + 1 < plain_steps


@pytest.mark.parametrize("seeded", [False, True])
def test_draft_cache_survives_preemption_prefix_hits_and_n(plain, tiny_dense_dir, noisy_draft_dir, seeded):
    """A KV pool so small that sequences are preempted and recomputed, prompts served from the
    prefix cache the second time, and n=2 forks that share their prompt's blocks: the text stays
    the target's (greedy, or seeded sampling's), and a greedy draft equal to the target is still
    accepted every time."""
    params = SamplingParams(temperature=0.8 if seeded else 0, max_tokens=48, ignore_eos=True, n=2, seed=77 if seeded else None)
    want = [[c.token_ids for c in o.outputs] for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    cpu = torch.device("cpu")
    target = load_model(str(tiny_dense_dir), torch.float32, cpu, load_tokenizer=False).model
    for draft in (tiny_dense_dir, noisy_draft_dir):
        draft_model = load_model(str(draft), torch.float32, cpu, load_tokenizer=False).model
        # 60 blocks of 4 tokens for the target's and the draft's caches: less than the 6 sequences need
        per_token = target.config.kv_bytes_per_token(torch.float32) + draft_model.config.kv_bytes_per_token(torch.float32)
        cfg = EngineConfig(max_num_seqs=6, max_num_batched_tokens=32, block_size=4, num_speculative_tokens=3,
                           kv_cache_memory=60 * 4 * per_token, enforce_eager=True)
        engine = LLMEngine(target, None, cfg, plain.generation_config, draft_model=draft_model)
        assert engine.pool.num_blocks == 60
        for round_ in range(2):
            assert _run_engine(engine, PROMPTS, params, f"r{round_}") == want
        stats = engine.stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
        if draft == tiny_dense_dir and not seeded:
            assert stats["spec_acceptance_rate"] == 1.0, stats


def _run_engine(engine, prompts, params, tag):
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p["prompt_token_ids"], params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
    return [done[f"{tag}-{i}"] for i in range(len(prompts))]


def test_a_failed_draft_forward_only_costs_the_drafts(plain, tiny_dense_dir, monkeypatch, caplog):
    """The draft's forward raising (a bug, a device fault) leaves the step without drafts; the text is
    the target's, and the draft cache catches up afterwards (drafts are accepted again)."""
    spec = LLM(str(tiny_dense_dir), speculative_model=str(tiny_dense_dir), num_speculative_tokens=3, **KW)
    runner = spec.engine.speculator.runner
    real = runner.run
    calls = itertools.count()

    def flaky(batch, drafts=None):
        if 3 <= next(calls) < 6:
            raise RuntimeError("injected draft failure")
        return real(batch, drafts)

    monkeypatch.setattr(runner, "run", flaky)
    assert _tokens(spec) == _tokens(plain)
    assert "the draft model's forward failed" in caplog.text
    assert spec.engine.stats()["spec_acceptance_rate"] == 1.0  # caught up: nothing stale was drafted from


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_requests_follow_the_target_distribution(tmp_path, seeded):
    """600 sampled completions of 4 tokens with 2-token drafts from another random model (accepted,
    rejected and bonus tokens all occur) follow the target's joint distribution of those 4 tokens,
    computed exactly from full forwards (as tests/test_spec_decode.py does for prompt lookup);
    seeded ones (drafts racing with the target's noise, spec_decode.verify_seeded) too."""
    model = write_cyclic_model(tmp_path / "target", seed=5)
    draft = write_cyclic_model(tmp_path / "draft", seed=6)
    cfg = EngineConfig(max_num_seqs=256, num_speculative_tokens=2, seed=0, kv_cache_memory=16 << 20, enforce_eager=True)
    stats = assert_samples_follow_the_target(LLMEngine(model, None, cfg, draft_model=draft), model, seeded)
    assert stats["spec_draft_tokens"] >= CYCLIC_SAMPLES and 0.1 < stats["spec_acceptance_rate"] < 0.9, stats


def test_moge_target_with_a_dense_draft(tiny_moge_dir, tiny_dense_dir):
    """Pangu Pro MoE drafted by a dense Pangu model of the same tokenizer, as a 72B MoE would be by
    a 1B or 7B: the MoE's own greedy text."""
    kw = dict(KW, max_num_seqs=3)
    want = _tokens(LLM(str(tiny_moge_dir), **kw), PROMPTS[:2])
    spec = LLM(str(tiny_moge_dir), speculative_model=str(tiny_dense_dir), num_speculative_tokens=2, **kw)
    assert _tokens(spec, PROMPTS[:2]) == want
    assert spec.engine.stats()["spec_draft_tokens"] > 0


@pytest.mark.parametrize("draft", ["self", "noisy"])
def test_compiled_draft_and_target_keep_the_text(plain, tiny_dense_dir, noisy_draft_dir, draft):
    """Both decode steps compiled: after the prompt's step, every draft forward (the first one too,
    catching up two tokens after a wholly accepted draft) and every verification runs compiled."""
    path = tiny_dense_dir if draft == "self" else noisy_draft_dir
    spec = LLM(str(tiny_dense_dir), speculative_model=str(path), num_speculative_tokens=3,
               **dict(KW, enforce_eager=False))
    assert spec.wait_compiled()
    speculator = spec.engine.speculator
    counted = {}
    for name, runner in (("draft", speculator.runner), ("target", spec.engine.runner)):
        step, calls = runner.decode_forward, counted.setdefault(name, [])
        runner.decode_forward = functools.partial(lambda step, calls, *a: calls.append(1) or step(*a), step, calls)
    forwards, steps = speculator.num_draft_forwards, spec.engine.num_steps
    assert _tokens(spec, PROMPTS[:1]) == _tokens(plain, PROMPTS[:1])
    forwards, steps = speculator.num_draft_forwards - forwards, spec.engine.num_steps - steps
    assert len(counted["draft"]) == forwards - 1  # all but the prompt's
    assert len(counted["target"]) == steps - 1
    if draft == "self":
        assert spec.engine.stats()["spec_acceptance_rate"] == 1.0


# ---------------------------------------------------------------------------- refused drafts, config


def test_a_draft_of_another_tokenizer_is_refused(tiny_dense_dir):
    from pangu_infer.loader import demo_model_path

    try:
        demo = demo_model_path()
    except Exception:
        pytest.skip("demo model not installed")
    with pytest.raises(ValueError, match="speculative draft model .*tokenizer differs"):
        LLM(str(tiny_dense_dir), speculative_model=demo, **KW)


def test_a_draft_with_a_shorter_context_is_refused(tmp_path, tiny_dense_dir, tiny_dense_config, pangu_tokenizer_dir):
    short = dict(tiny_dense_config, max_position_embeddings=64)
    build_tiny_model(tmp_path, short, pangu_tokenizer_dir)
    with pytest.raises(ValueError, match="context \\(64 tokens\\) is shorter"):
        LLM(str(tiny_dense_dir), speculative_model=str(tmp_path), **KW)
    LLM(str(tiny_dense_dir), speculative_model=str(tmp_path), **dict(KW, max_model_len=64))  # fits


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "eagle", "model": "x"}, "method 'eagle' is not supported"),
        ({"model": "x", "num_speculative_tokens": 0}, "num_speculative_tokens 0 must be a positive integer"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "method 'ngram' takes no model"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model"),
        ({"model": "x", "draft_model_revision": "main"}, "unknown key 'draft_model_revision'"),
        ({"model": "x", "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size 2 is not supported: the draft model runs whole on rank 0"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "draft_tensor_parallel_size applies to a draft model"),
        ({"model": "x", "prompt_lookup_max": 3}, "prompt_lookup_max applies to prompt lookup"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min 4 exceeds"),
        ({"model": "x", "quantization": "fp8"}, "quantization 'fp8'"),
        ("x", "must be a dict"),
    ],
)
def test_bad_speculative_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        speculative_settings(config)


def test_speculative_config_forms():
    s = speculative_settings({"model": "d.gguf"})
    assert (s.draft_model, s.num_tokens) == ("d.gguf", 4)  # a draft model's default draft length
    s = speculative_settings({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    assert (s.draft_model, s.num_tokens, s.ngram_max, s.ngram_min) == (None, 5, 4, 2)
    s = speculative_settings({"model": "d", "draft_tensor_parallel_size": 1})  # vLLM's spelling of how it runs here
    assert (s.draft_model, s.num_tokens) == ("d", 4)
    s = speculative_settings(None, speculative_model="d", num_speculative_tokens=2)
    assert (s.draft_model, s.num_tokens) == ("d", 2)
    with pytest.raises(ValueError, match="num_speculative_tokens 3 differs from num_speculative_tokens=2"):
        speculative_settings({"model": "d", "num_speculative_tokens": 3}, num_speculative_tokens=2)


def test_prompt_lookup_min_is_honoured(tiny_dense_dir):
    """prompt_lookup_min: a one-token match no longer drafts."""
    from pangu_infer.engine.spec_decode import propose_ngram_draft

    tokens = [2, 3, 4, 3, 7, 9, 3]
    assert propose_ngram_draft(tokens, max_ngram=2, num_tokens=1) == [7]
    assert propose_ngram_draft(tokens, max_ngram=2, num_tokens=1, min_ngram=2) == []
    llm = LLM(str(tiny_dense_dir), speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 3}, **KW)
    assert (llm.engine.speculator.max_ngram, llm.engine.speculator.min_ngram) == (3, 2)


def test_draft_model_needs_tokens_and_no_batch_invariance(tiny_dense_dir):
    cpu = torch.device("cpu")
    model = load_model(str(tiny_dense_dir), torch.float32, cpu, load_tokenizer=False).model
    with pytest.raises(ValueError, match="needs num_speculative_tokens >= 1"):
        LLMEngine(model, None, EngineConfig(enforce_eager=True, kv_cache_memory=1 << 20), draft_model=model)
    with pytest.raises(ValueError, match="batch_invariant=True"):
        LLMEngine(model, None, EngineConfig(enforce_eager=True, kv_cache_memory=1 << 20, num_speculative_tokens=2, batch_invariant=True), draft_model=model)
    # LLM refuses the pair before it loads anything: the draft's path is not even looked at (and,
    # under tensor parallelism, no worker rank is started only to be stopped again)
    with pytest.raises(ValueError, match="batch_invariant=True"):
        LLM(str(tiny_dense_dir), speculative_model="/nonexistent/draft", batch_invariant=True, enforce_eager=True)


def test_cli_generate_with_a_draft_model(tiny_dense_dir):
    out = subprocess.run(
        [sys.executable, "-m", "pangu_infer", "generate", "--model", str(tiny_dense_dir), "--prompt", "Hello",
         "--max-tokens", "8", "--temperature", "0", "--enforce-eager", "--dtype", "float32",
         "--speculative-model", str(tiny_dense_dir), "--num-speculative-tokens", "3", "--stats"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"8 tokens in .* drafts accepted \d+/\d+ \(\d+%\)\]", out.stderr), out.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "pangu_infer", "generate", "--model", str(tiny_dense_dir), "--prompt", "Hello",
         "--max-tokens", "8", "--temperature", "0", "--enforce-eager", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.stdout == plain.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pangu_infer", "generate", "--model", str(tiny_dense_dir), "--prompt", "Hello",
         "--enforce-eager", "--speculative-config", '{"method": "medusa"}'],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "method 'medusa' is not supported" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "pangu_infer", "generate", "--model", str(tiny_dense_dir), "--prompt", "Hello",
         "--enforce-eager", "--speculative-model", str(tiny_dense_dir / "nowhere")],
        capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0 and "speculative draft model" in missing.stderr and "nowhere" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_server_with_a_draft_model(plain, tiny_dense_dir, tmp_path):
    """`serve --speculative-config` (vLLM's flag): the openai client gets the target's greedy
    completion, and /metrics counts the draft tokens proposed and accepted."""
    import json

    import httpx
    import openai
    from fixtures_server import metric_value, running_server

    prompt = [5, 17, 300, 42, 9, 120, 77, 8]
    want = plain.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    config = json.dumps({"model": str(tiny_dense_dir), "num_speculative_tokens": 3})
    with running_server(tiny_dense_dir, "--speculative-config", config, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        got = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert got.choices[0].text == want.outputs[0].text
    drafted = metric_value(metrics, "pangu_spec_decode_num_draft_tokens_total")
    accepted = metric_value(metrics, "pangu_spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and accepted == drafted  # the draft is the target itself


def test_rejection_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    """Drafts drawn from a q far from p (a draft model's distribution): accepted with probability
    min(1, p/q), replaced from max(p - q, 0) when not; the first token still follows p."""
    from pangu_infer.engine.spec_decode import target_probs, verify

    g = torch.Generator().manual_seed(99)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.9)
    p = target_probs(logits[:1], params)[0]
    q = torch.tensor([0.05, 0.05, 0.1, 0.6, 0.2])  # favours what p finds unlikely
    trials = 4000
    counts = torch.zeros(5)
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[verify(logits, [d], params, g, q[None])[0]] += 1
    tolerance = 4.5 * (p * (1 - p) / trials).sqrt()
    assert torch.all((counts / trials - p).abs() <= tolerance), (counts / trials, p)


def test_sampled_requests_draw_their_drafts_from_the_draft_model(plain, tiny_dense_dir):
    """At temperature 1 a draft equal to the target, drawing its drafts from its own distribution,
    is accepted (nearly) every time; drafting its argmax instead would be accepted only as often
    as the target happens to sample its argmax."""
    spec = LLM(str(tiny_dense_dir), speculative_model=str(tiny_dense_dir), num_speculative_tokens=3, **KW)
    params = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=3)
    spec.generate(PROMPTS, params, use_tqdm=False)
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 50 and stats["spec_acceptance_rate"] > 0.97, stats


def test_inductors_process_wide_fx_trace_never_runs_beside_a_draft_forward(plain, tiny_dense_dir, slow_fx_trace_build, caplog):
    """torch.fx's symbolic tracing replaces nn.Module.__call__ for the whole process while it runs;
    inductor traces one placeholder that way once per process, mid-compile, and the compile thread
    traces it first under the lock every step's forward holds (engine/runner.py). A draft model is
    a model of its own, with its own lock: its forward on the engine thread during that trace failed
    ("module is not installed as a submodule": the step lost its drafts, or, had the draft's compile
    traced it, the target's step its requests). Here the trace takes 1.5 s and the builds do nothing
    else: every request served meanwhile keeps the target's tokens and no draft forward fails."""
    import time

    built = slow_fx_trace_build
    want = _tokens(plain, PROMPTS[:2])
    spec = LLM(str(tiny_dense_dir), speculative_model=str(tiny_dense_dir), num_speculative_tokens=3,
               **dict(KW, enforce_eager=False, max_model_len=256))
    # The draft's forward made slow (its final norm sleeps), so that the engine thread is mostly in
    # one when the trace begins, its later module calls inside the trace.
    norm = spec.engine.speculator.model.model.norm
    norm.forward = functools.partial(lambda f, x: time.sleep(0.05) or f(x), norm.forward)
    served = 0
    deadline = time.monotonic() + 120
    while not built.is_set() and time.monotonic() < deadline:  # from before the builds start to the trace's end
        assert _tokens(spec, PROMPTS[:2]) == want
        served += 1
    assert built.is_set() and served >= 1
    assert "the draft model's forward failed" not in caplog.text
    assert spec.engine.stats()["spec_acceptance_rate"] == 1.0


def test_a_seeded_sampled_request_gives_the_same_text_every_time(plain, tiny_dense_dir, noisy_draft_dir):
    """vLLM's per-request seed: the same seeded sampled request gives the same tokens whatever happens
    around it. Here the second run hits the prefix cache (only its last prompt token is computed, and
    drafted from), the third shares its steps (and their token budget) with other requests, the
    fourth is a fresh engine's: all four are the same, and they are the text the request gets
    without a draft model."""
    spec = LLM(str(tiny_dense_dir), speculative_model=str(noisy_draft_dir), num_speculative_tokens=3, **KW)
    seeded = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True, seed=1234)
    other = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": ([5, 17, 300, 42, 9, 120, 77, 8, 64, 900] * 2)[:17]}  # a block of 16 tokens, and 1 more
    first = _tokens(spec, [prompt], seeded)[0]
    hits = spec.engine.stats()["prefix_cache_hits"]
    again = _tokens(spec, [prompt], seeded)[0]
    assert spec.engine.stats()["prefix_cache_hits"] > hits
    # beside prompts whose prefill chunks take the steps' token budget (no room for drafts) or part of it
    others = [{"prompt_token_ids": list(range(200 + 50 * i, 250 + 50 * i))} for i in range(6)]
    batched = _tokens(spec, [prompt] + others, [seeded] + [other] * 6)[0]
    fresh = _tokens(LLM(str(tiny_dense_dir), speculative_model=str(noisy_draft_dir), num_speculative_tokens=3, **KW), [prompt], seeded)[0]
    assert spec.engine.stats()["spec_acceptance_rate"] > 0.3
    alone = _tokens(plain, [prompt], seeded)[0]
    same = {"prefix hit": again == first, "batched": batched == again, "fresh engine": fresh == first, "no draft": alone == first}
    assert all(same.values()), same
