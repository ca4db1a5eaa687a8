"""batch_invariant=True: a request's tokens and logprobs are bitwise the same whatever else is in
the batch (bf16, dense and MoGE): alone, then among 1, 3, 16 and 64 requests arriving at random
steps, with prefix-cache hits, with forced preemption (a small KV pool), eager and compiled, and
through the server under concurrent clients. Plus the pieces: row-tiled linears of every module
type at the row counts the engine uses, the per-query attention, block-aligned prefill chunks."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import torch
from torch import nn

from fixtures_server import running_server
from pangu_infer import LLM, SamplingParams
from pangu_infer.engine.engine import EngineConfig, LLMEngine
from pangu_infer.models import batch_invariant as bi
from pangu_infer.models.packed import PackedLinear, can_pack

MAX_TOKENS = 10
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)


def _prompts(n: int, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    """n prompts of 3..150 tokens; every fourth shares a 48-token prefix (three KV blocks) with the first."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(48)]
    out = []
    for i in range(n):
        own = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 150))]
        out.append(shared + own[:20] if i % 4 == 0 else own)
    return out


def _result(out) -> tuple:
    o = out.outputs[0]
    return tuple(o.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in o.logprobs)


def _alone(engine: LLMEngine, prompt: list[int], params: SamplingParams, rid: str) -> tuple:
    engine.add_request(rid, prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return _result(final)


def _mixed(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], rng: random.Random, tag: str) -> list[tuple]:
    """All prompts through one engine, each added at a random step while the others run."""
    pending = list(range(len(prompts)))
    rng.shuffle(pending)
    results: dict[int, tuple] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4) if engine.has_unfinished_requests() else 1):
            if pending:
                i = pending.pop()
                engine.add_request(f"{tag}-{i}", prompts[i], params[i])
        for out in engine.step():
            if out.finished:
                results[int(out.request_id.rsplit("-", 1)[1])] = _result(out)
    return [results[i] for i in range(len(prompts))]


def _engine(llm: LLM, **overrides) -> LLMEngine:
    config = dict(enforce_eager=True, batch_invariant=True, max_num_seqs=64)
    config.update(overrides)
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(**config), llm.generation_config)


@pytest.fixture(scope="module", params=["dense", "moge"])
def bf16_llm(request, tiny_dense_dir, tiny_moge_dir):
    path = tiny_dense_dir if request.param == "dense" else tiny_moge_dir
    return LLM(str(path), dtype="bfloat16", device="cpu", enforce_eager=True, batch_invariant=True, max_num_seqs=64)


def test_alone_equals_batches_of_1_3_16_64_with_random_arrival_and_prefix_hits(bf16_llm):
    prompts = _prompts(64)
    params = [SEEDED if i % 5 == 1 else PARAMS for i in range(len(prompts))]
    alone_engine = _engine(bf16_llm, enable_prefix_caching=False)
    alone = [_alone(alone_engine, p, sp, f"alone-{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
    engine = _engine(bf16_llm)  # prefix caching on: the shared prefixes hit
    rng = random.Random(1)
    for size in (1, 3, 16, 64):
        picked = rng.sample(range(len(prompts)), size)
        got = _mixed(engine, [prompts[i] for i in picked], [params[i] for i in picked], rng, f"b{size}")
        mismatches = [i for i, g in zip(picked, got) if g != alone[i]]
        assert not mismatches, f"batch of {size}: prompts {mismatches} differ from alone"
    assert engine.pool.prefix_hits > 0


def test_forced_preemption_and_recompute_change_nothing(bf16_llm):
    prompts = _prompts(16, seed=3)
    alone_engine = _engine(bf16_llm)
    alone = [_alone(alone_engine, p, PARAMS, f"alone-{i}") for i, p in enumerate(prompts)]
    # 12 blocks of 16 tokens: 16 sequences of up to 160 tokens cannot all fit; small chunks too
    per_block = 16 * bf16_llm.config.kv_bytes_per_token(torch.bfloat16)
    small = _engine(bf16_llm, kv_cache_memory=12 * per_block, max_num_batched_tokens=48)
    got = _mixed(small, prompts, [PARAMS] * len(prompts), random.Random(5), "pre")
    assert small.scheduler.num_preemptions > 0
    assert [i for i, (g, a) in enumerate(zip(got, alone)) if g != a] == []


def test_default_path_does_vary_with_the_batch(tiny_moge_dir, monkeypatch):
    """The reason for the mode: in bf16 the default path changes replies or logprobs under load
    (if this ever passes with 0 differences, the mode's cost may no longer be needed). Decode
    attention in its gathered form (padded to the batch's longest context): the C kernel form,
    the default where it runs and is faster, reads each query alone, and on a CPU whose bf16
    products do not vary with the row count either (Zen 1 up to 64 rows) nothing varies."""
    from pangu_infer.models.layers import DECODE_ATTENTION_ENV

    monkeypatch.setenv(DECODE_ATTENTION_ENV, "torch")
    llm = LLM(str(tiny_moge_dir), dtype="bfloat16", device="cpu", enforce_eager=True, max_num_seqs=64)
    prompts = _prompts(24, seed=2)
    alone = [_result(llm.generate([{"prompt_token_ids": p}], PARAMS, use_tqdm=False)[0]) for p in prompts]
    batched = [_result(o) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)]
    assert sum(a != b for a, b in zip(alone, batched)) > 0


def test_compiled_decode_alone_equals_batched_and_eager(tiny_dense_dir):
    """One small compiled case (compiling costs minutes): the compiled batch-1 and batched graphs
    and the eager forward compute the same bits (what preemption needs: it recomputes a compiled
    sequence's tokens with the eager prefill)."""
    llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", batch_invariant=True, max_num_seqs=16)
    assert llm.wait_compiled()  # built in the background
    prompts = _prompts(6, seed=4)
    alone = [_alone(llm.engine, p, PARAMS, f"alone-{i}") for i, p in enumerate(prompts)]
    got = _mixed(llm.engine, prompts, [PARAMS] * len(prompts), random.Random(2), "mix")
    assert got == alone
    eager = _engine(llm, max_num_seqs=16)
    assert [_alone(eager, p, PARAMS, f"eager-{i}") for i, p in enumerate(prompts)] == alone


def test_server_load_zero_mismatches(tiny_dense_dir, tmp_path):
    """16 concurrent clients, 48 greedy requests: every reply equals the same request sent alone."""
    prompts = [" ".join(random.Random(i).choice("the a fox city 盘古 模型 天气 hello world".split()) for _ in range(3 + i % 20)) for i in range(48)]

    async def ask(client, url, prompt):
        r = await client.post(f"{url}/v1/completions", json={
            "model": str(tiny_dense_dir), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    async def run(url):
        async with httpx.AsyncClient(timeout=300) as client:
            alone = [await ask(client, url, p) for p in prompts]
            sem = asyncio.Semaphore(16)

            async def limited(p):
                async with sem:
                    return await ask(client, url, p)

            loaded = await asyncio.gather(*(limited(p) for p in prompts))
            return alone, loaded

    with running_server(tiny_dense_dir, "--dtype", "bfloat16", "--batch-invariant", log_dir=tmp_path) as server:
        alone, loaded = asyncio.run(run(server.url))
    assert [i for i, (a, b) in enumerate(zip(alone, loaded)) if a != b] == []


# ---------------------------------------------------------------------- the pieces

def _linear_modules() -> dict[str, nn.Module]:
    from pangu_infer.quant.formats import parse_quantization, quantize
    from pangu_infer.quant.modules import PackedWeight, QuantizedLinear

    torch.manual_seed(0)
    w = torch.randn(576, 1536) * 0.05
    mods = {"nn.Linear fp32": nn.Linear(1536, 576, bias=False), "nn.Linear bf16": nn.Linear(1536, 576, bias=True).bfloat16()}
    mods["nn.Linear fp32"].weight.data = w.clone()
    if can_pack(torch.device("cpu"), torch.bfloat16):
        mods["PackedLinear"] = PackedLinear(w.bfloat16(), None)
    for method in ("int8", "int4"):
        mods[f"QuantizedLinear {method}"] = QuantizedLinear(PackedWeight(quantize(w, parse_quantization(method)), torch.device("cpu")), None)
    return mods


@pytest.mark.parametrize("name", list(_linear_modules()))
def test_row_tiled_linear_rows_do_not_depend_on_the_row_count(name):
    """Every linear the engine can hold, wrapped as make_batch_invariant wraps it: row i of an
    M-row product equals the row alone, at the row counts of decode batches and prefill chunks."""
    inner = _linear_modules()[name]
    model = nn.Sequential(inner)
    assert bi.make_batch_invariant(model) == 1
    wrapped = model[0]
    assert isinstance(wrapped, bi.RowTiledLinear)
    dtype = torch.float32 if "fp32" in name else torch.bfloat16
    x = torch.randn(520, 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(x.shape[0])])
        for m in (2, 3, 9, 16, 33, 64, 100, 257, 520):
            assert torch.equal(wrapped(x[:m]), alone[:m]), f"{name}: {m} rows"


class RowCountDependentLinear(nn.Module):
    """A linear whose kernel changes its rounding from `switch` rows on (as oneDNN's and MKL's do)."""

    def __init__(self, switch: int):
        super().__init__()
        self.in_features, self.out_features, self.switch = 64, 32, switch
        self.weight = nn.Parameter(torch.randn(32, 64), requires_grad=False)

    def forward(self, x):
        y = (x.double() @ self.weight.double().t()).float()  # fp64 sums: no row-count effect survives the cast
        return y * (1 + 2**-20) if x.shape[0] >= self.switch else y


@pytest.mark.parametrize("switch", [2, 5, 40, 1000])
def test_free_tiles_are_measured_and_stay_below_the_kernel_switch(switch, tmp_path, monkeypatch):
    """A kernel measured row-invariant up to T rows runs in unpadded tiles of at most T rows; one
    that varies from 2 rows on (the same kernel for every 2..64 rows here) runs in calls of 2..64
    rows, a one-row call padded to 2. Either way rows equal the row alone."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(bi, "_tiles", {})
    RowCountDependentLinear.__name__ = f"RowCountDependent{switch}Linear"  # its own cache entry
    inner = RowCountDependentLinear(switch)
    model = nn.Sequential(inner)
    bi.make_batch_invariant(model, torch.float32)
    wrapped = model[0]
    expected = max([t for t in bi.FREE_TILES if t < switch], default=None)
    assert (wrapped.min_rows, wrapped.tile) == ((1, expected) if expected else (2, 64))
    x = torch.randn(150, 64)
    with torch.inference_mode():
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(len(x))])
        for m in (2, 4, 5, 8, 39, 40, 64, 65, 150):
            assert torch.equal(wrapped(x[:m]), alone[:m]), m
    with monkeypatch.context() as env:  # turned off: padded tiles, nothing measured
        env.setenv(bi.MEASURE_ENV, "0")
        model = nn.Sequential(RowCountDependentLinear(switch))
        bi.make_batch_invariant(model, torch.float32)
        assert (model[0].min_rows, model[0].tile) == (bi.PAD_TILE, bi.PAD_TILE)


class OneRowApartLinear(nn.Module):
    """A bf16 linear whose one-row product alone rounds otherwise than at any other row count, in
    a few outputs only (one fp32 ulp before the bf16 rounding: 4 outputs of the 228 x 576 that
    the measurement computes, none in its first 64 rows), as oneDNN's bf16 products over 1536
    inputs on a Zen 4 EPYC (about 1 in 7,000; RESULTS.md), which a measurement on 64 rows missed."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 64, 576
        self.weight = nn.Parameter(torch.randn(576, 64, generator=torch.Generator().manual_seed(5)), requires_grad=False)

    def forward(self, x):
        y = x.double() @ self.weight.double().t()
        return (y.float() * (1 + 2**-23) if x.shape[0] == 1 else y).to(x.dtype)


def test_a_one_row_product_that_rarely_differs_runs_padded_to_two_rows(tmp_path, monkeypatch):
    """The measurement compares every row at every row count (the wrapper's own calls, the last
    tile included) on enough rows to see rare differences, and a kernel that differs at one row
    only runs in calls of 2..64 rows, a one-row call padded to 2: rows equal the row alone."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(bi, "_tiles", {})
    inner = OneRowApartLinear()
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.inference_mode():
        assert not torch.equal(torch.cat([inner(x[i : i + 1]) for i in range(len(x))]), inner(x))  # the kernel does differ
        model = nn.Sequential(inner)
        bi.make_batch_invariant(model, torch.bfloat16)
        wrapped = model[0]
        assert (wrapped.min_rows, wrapped.tile) == (2, 64), wrapped.extra_repr()
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(len(x))])
        for m in (2, 3, 9, 33, 64, 65, 129, 300):
            assert torch.equal(wrapped(x[:m]), alone[:m]), m


def test_cached_tiles_of_the_old_measurement_or_format_are_measured_again(tmp_path, monkeypatch):
    """A cache file written by the earlier measurement (batch_invariant_free_rows: 64 rows, first
    rows only, which claimed invariance up to 14 rows for a kernel that differs at one row) or
    holding a value of another form is measured again; a valid entry is taken as it is."""
    import json

    from pangu_infer.machine import machine_key

    path = tmp_path / "kernels.json"
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(path))
    signature = bi._signature(OneRowApartLinear(), 64, 576, torch.bfloat16)
    key = f"{bi.TILES_KEY}|{signature}"
    path.write_text(json.dumps({machine_key(): {f"batch_invariant_free_rows|{signature}": 64, key: 64}}))

    def wrapped_tiles():
        monkeypatch.setattr(bi, "_tiles", {})
        model = nn.Sequential(OneRowApartLinear())
        bi.make_batch_invariant(model, torch.bfloat16)
        return model[0].min_rows, model[0].tile

    assert wrapped_tiles() == (2, 64)
    assert json.loads(path.read_text())[machine_key()][key] == [2, 64]
    path.write_text(json.dumps({machine_key(): {key: [1, 16]}}))
    assert wrapped_tiles() == (1, 16)
    for wrong in ([2, 4], [1, 1], [3, 64], [True, 64], "1,64"):  # not a choice the measurement makes
        path.write_text(json.dumps({machine_key(): {key: wrong}}))
        assert wrapped_tiles() == (2, 64), wrong


@pytest.fixture(params=["kernel", "torch"])
def attention_form(request, monkeypatch):
    """bi.attention by the C kernel (models/bi_attention_kernel.py) or by its torch form."""
    from pangu_infer.models import bi_attention_kernel as kernel

    if request.param == "kernel" and not kernel.available():
        pytest.skip("no C compiler or AVX-512 here: the kernel does not run")
    if request.param == "torch":
        monkeypatch.setattr(kernel, "available", lambda: False)
    return request.param


def test_attention_of_a_query_does_not_depend_on_padding_or_the_other_queries(attention_form):
    torch.manual_seed(0)
    hkv, g, d, slots = 2, 3, 32, 400
    k_cache = torch.randn(slots, hkv, d).bfloat16()
    v_cache = torch.randn(slots, hkv, d).bfloat16()
    order = torch.randperm(slots)[:300]  # a sequence's slots, scattered over the cache
    q = torch.randn(300, hkv * g, d).bfloat16()
    # the chunk of queries 250..299 as a prefill, against each as a one-query decode
    chunk = bi.prefill_attention(q[250:], k_cache, v_cache, order, 300, 0.2)
    for i in (250, 263, 299):
        ctx = i + 1
        length = -(-ctx // bi.KV_SPLIT) * bi.KV_SPLIT + bi.KV_SPLIT  # one more chunk of padding
        padded = torch.cat((order[:ctx], order[:1].expand(length - ctx)))
        valid = torch.arange(length)[None, :] < ctx
        one = bi.attention(q[i : i + 1], k_cache, v_cache, padded[None], valid, 0.2)
        assert torch.equal(one[0], chunk[i - 250])
    # and it is attention: close to SDPA in fp32
    keys, vals = k_cache[order].float(), v_cache[order].float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[250:].float().transpose(0, 1), keys.repeat_interleave(g, 1).transpose(0, 1),
        vals.repeat_interleave(g, 1).transpose(0, 1), attn_mask=torch.ones(50, 300, dtype=torch.bool).tril(250), scale=0.2,
    ).transpose(0, 1)
    assert torch.allclose(chunk.float(), ref, atol=2e-2)


def test_prefill_chunks_end_on_block_boundaries(bf16_llm):
    engine = _engine(bf16_llm, max_num_batched_tokens=40)
    engine.add_request("a", list(range(3, 100)), PARAMS)
    engine.add_request("b", list(range(3, 70)), PARAMS)
    ends = []
    for _ in range(6):
        batch = engine.scheduler.schedule()
        for seq, n in zip(batch.seqs, batch.num_tokens):
            end = seq.num_computed_tokens + n
            ends.append(end)
            assert end % 16 == 0 or end == seq.num_tokens, (seq.request_id, seq.num_computed_tokens, n)
            seq.num_computed_tokens = end
    assert any(e % 16 == 0 for e in ends)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_invariant"):
        EngineConfig(batch_invariant="yes")
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        EngineConfig(batch_invariant=True, max_num_batched_tokens=8, block_size=16)


def test_cli_flag_reaches_the_engine():
    import argparse

    from pangu_infer.cli import add_model_arguments, llm_kwargs

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert llm_kwargs(p.parse_args(["--batch-invariant"]))["batch_invariant"] is True
    assert llm_kwargs(p.parse_args([]))["batch_invariant"] is False


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", "int8")])
def test_fp32_and_quantized_linears_alone_equal_batched(tiny_dense_dir, dtype, quantization):
    """int8 weight-only linears (bf16): bitwise. fp32 (MKL products vary at every row count > 1):
    token ids equal; logprobs were bitwise on an Intel Xeon (AMX) but differed in the last bits on
    an AMD EPYC (2 of 16 prompts, about 1e-6, source not located; README, RESULTS.md), so they are
    held to 1e-5 here."""
    llm = LLM(str(tiny_dense_dir), dtype=dtype, device="cpu", enforce_eager=True, batch_invariant=True,
              quantization=quantization, max_num_seqs=16)
    prompts = _prompts(16, seed=6)
    alone = [_alone(llm.engine, p, PARAMS, f"alone-{i}") for i, p in enumerate(prompts)]
    got = _mixed(llm.engine, prompts, [PARAMS] * 16, random.Random(3), "mix")
    if dtype == "bfloat16":
        assert got == alone
        return
    assert [g[0] for g in got] == [a[0] for a in alone]
    for g, a in zip(got, alone):
        assert [x[1] for x in g[1]] == pytest.approx([x[1] for x in a[1]], abs=1e-5)



@pytest.mark.parametrize("kind", ["r72b", "ultra"])
def test_sink_and_mla_attention_refuse_the_mode_by_name(kind, request):
    """The mode's attention has no sinks and no MLA latent: those models say so instead of
    computing something else."""
    path = str(request.getfixturevalue(f"tiny_{kind}_dir"))
    with pytest.raises(ValueError, match=r"batch_invariant=True is not supported for Pangu(ProMoEV2|UltraMoE)ForCausalLM"):
        LLM(path, dtype="float32", device="cpu", enforce_eager=True, batch_invariant=True)


class _CountingLinear(nn.Module):
    """Stands in for a wrapped linear in the row_tiled_linear callback's table: counts the calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("name", ["PackedLinear", "QuantizedLinear int4", "QuantizedLinear int8", "nn.Linear bf16"])
def test_compiled_linears_inline_their_kernel_and_equal_the_eager_tiles(name, monkeypatch):
    """Where a product's free tile covers the rows, a compiled step traces the wrapped module's own
    kernel op instead of calling back into Python, and computes the eager tiles' bits at every
    row count (one graph with dynamic rows, compiled as the engine compiles its step); past the
    tile, and for a module inductor may lower to other code (plain nn.Linear), the callback."""
    mods = _linear_modules()
    if name not in mods:
        pytest.skip(f"no {name} on this machine")
    model = nn.Sequential(mods[name])
    bi.make_batch_invariant(model, torch.bfloat16)
    wrapped = model[0]
    if name == "nn.Linear bf16":
        assert wrapped.inline_rows == 0
    else:
        if (wrapped.min_rows, wrapped.tile) == (bi.PAD_TILE, bi.PAD_TILE):
            pytest.skip(f"{name}: measured not row-invariant at 1..2 or 2..{bi.PAD_TILE} rows here ({wrapped.extra_repr()})")
        # On a Zen 4 EPYC the packed product of one row alone differs from the row among others:
        # tiles of 2..64 rows there, a one-row call padded to 2 (in the compiled graph too)
        assert wrapped.min_rows < wrapped.tile and wrapped.inline_rows >= 2, wrapped.extra_repr()
        if name == "QuantizedLinear int4":
            assert wrapped.inner.weight.kernel == "int4_vnni" or wrapped.inline_rows == 0
    counting = _CountingLinear(wrapped.inner)
    monkeypatch.setitem(bi._MODULES, wrapped.handle, (counting, wrapped.tile, wrapped.min_rows))
    torch._dynamo.reset()
    step = torch.compile(lambda x: wrapped(x), options={"emulate_precision_casts": True, "cpp_wrapper": True})
    x = torch.randn(2 * max(wrapped.tile, 8) + 3, 1536, generator=torch.Generator().manual_seed(2)).bfloat16()
    rows = sorted({1, 2, 3, max(wrapped.inline_rows, 1), wrapped.inline_rows + 1, x.shape[0]} - {0})
    with torch.inference_mode():
        for m in rows:
            xm = x[:m].clone()
            torch._dynamo.maybe_mark_dynamic(xm, 0)
            before = counting.calls
            got = step(xm)
            assert torch.equal(got, bi.row_tiled(wrapped.inner, x[:m], wrapped.tile, wrapped.min_rows)), f"{name}: {m} rows"
            called_back = counting.calls > before
            assert called_back == (m > wrapped.inline_rows), f"{name}: {m} rows, called back {called_back}"
        # Every row alone (the one-row graph again): where a row alone is padded (min_rows 2), a
        # kernel that rounds a row alone otherwise does so in a few rows only
        for i in range(x.shape[0]):
            assert torch.equal(step(x[i : i + 1].clone()), bi.row_tiled(wrapped.inner, x[i : i + 1], wrapped.tile, wrapped.min_rows)), f"{name}: row {i} alone"
    torch._dynamo.reset()


@pytest.mark.parametrize("quantization,max_num_seqs", [
    ("int4", 16),  # biases, an int4 embedding; was xfail before the convert floor and the fixed-order sums
    ("int8", 24),
])
def test_compiled_quantized_decode_inlined_equals_alone_and_eager(tiny_dense_dir, quantization, max_num_seqs, monkeypatch):
    """Quantized linears traced inline in the compiled step (the same kernel op as the eager
    tiles): alone, all at once and eager compute the same bits. int8 with 24 sequences: the int8
    products are inlined up to 8 or 16 rows (below the conversion row count, 32 here as measured on
    the machine of RESULTS.md; a CPU that only emulates bf16 measures it much higher), so the
    bigger batches take the graph with the callback, which the engine warmed up as well."""
    from pangu_infer.engine.compiled import inline_bounds

    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT8", "32")

    llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", batch_invariant=True, quantization=quantization,
              max_num_seqs=max_num_seqs)
    wrapped = [m for m in llm.model.modules() if isinstance(m, bi.RowTiledLinear)]
    assert wrapped and all(m.inline_rows > 0 for m in wrapped), [m.extra_repr() for m in wrapped]
    if quantization == "int8":
        # Some batch up to max_num_seqs takes the graph with the callback: the int8 products are
        # inlined below their conversion row count, which is measured per machine (16 or 32 rows
        # on the machine of RESULTS.md, so inlined up to 8 or 16 rows).
        assert any(b < max_num_seqs for b in inline_bounds(llm.model, max_num_seqs))
    from torch._dynamo.utils import counters

    assert llm.wait_compiled()
    compiled_before = dict(counters["stats"])  # every graph a batch up to max_num_seqs takes is warmed up
    prompts = _prompts(max_num_seqs, seed=8)
    alone = [_alone(llm.engine, p, PARAMS, f"alone-{i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):  # all at once: decode steps of max_num_seqs rows
        llm.engine.add_request(f"all-{i}", p, PARAMS)
    results = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                results[int(out.request_id.rsplit("-", 1)[1])] = _result(out)
    assert [results[i] for i in range(len(prompts))] == alone
    assert dict(counters["stats"]) == compiled_before
    eager = _engine(llm, max_num_seqs=max_num_seqs)
    assert [_alone(eager, p, PARAMS, f"eager-{i}") for i, p in enumerate(prompts[:4])] == alone[:4]


@pytest.mark.parametrize("name", ["QuantizedLinear int8", "QuantizedLinear int4"])
def test_quantized_weights_retuned_later_never_convert_within_a_tile(name, monkeypatch):
    """The compile thread retunes a quantized weight's conversion row count after the engine
    wrapped it (quant.modules.prepare_prefill); where the new count was at or below the tile (32
    and 32 on the machine of RESULTS.md), a prefill's full tiles converted the weight to bf16 while
    a token alone ran the kernel: the tiny int4 model's alone and batched replies differed. The
    wrapper's floor keeps every tile on the kernel its rows were measured with."""
    from pangu_infer.quant import modules, prefill

    model = nn.Sequential(_linear_modules()[name])
    bi.make_batch_invariant(model, torch.bfloat16)
    wrapped = model[0]
    weight = wrapped.inner.weight
    monkeypatch.setattr(prefill, "prepare", lambda: None)
    monkeypatch.setattr(prefill, "packed_layout_ok", lambda *a: False)
    monkeypatch.setattr(modules, "convert_min_rows", lambda kind, activations=None: 2)  # a retune that says "convert from 2 rows"
    assert modules.prepare_prefill(model) is None
    assert weight.convert_min_rows > wrapped.tile, (weight.convert_min_rows, wrapped.extra_repr())
    x = torch.randn(2 * wrapped.tile + 1, 1536, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([wrapped(x[i : i + 1]) for i in range(x.shape[0])])
        assert torch.equal(wrapped(x), alone)


def test_compiled_norm_and_attention_sums_equal_eager():
    """RMSNorm's mean square and the attention's chunk sums, compiled as the engine compiles its
    step, are the eager forward's bits: inductor's own reductions sum in another order than
    eager's (most fp32 row sums of 64 differ in the last bit), so the mode sums them in a fixed
    pairwise order (bi.fixed_order_sum) that both compute alike."""
    from pangu_infer.models.layers import RMSNorm

    opts = {"emulate_precision_casts": True, "cpp_wrapper": True}
    gen = torch.Generator().manual_seed(5)
    torch._dynamo.reset()
    with torch.inference_mode():
        for width, dtype in ((64, torch.bfloat16), (4608, torch.bfloat16), (64, torch.float32)):
            norm = RMSNorm(width, 1e-6).to(dtype)
            norm.weight.data = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
            norm.batch_invariant = True
            x = (torch.randn(2000, width, generator=gen) * torch.rand(2000, 1, generator=gen).mul(4).add(0.1)).to(dtype)
            compiled = torch.compile(lambda t: norm(t), options=opts, dynamic=True)
            assert torch.equal(compiled(x), norm(x)), (width, dtype)
        n, h, hkv, d, slots = 200, 4, 2, 16, 4 * bi.KV_SPLIT
        q = torch.randn(n, h, d, generator=gen)
        k_cache, v_cache = torch.randn(slots, hkv, d, generator=gen), torch.randn(slots, hkv, d, generator=gen)
        order = torch.stack([torch.randperm(slots, generator=gen)[: 2 * bi.KV_SPLIT] for _ in range(n)])
        valid = torch.arange(2 * bi.KV_SPLIT)[None, :] <= torch.randint(0, 2 * bi.KV_SPLIT, (n, 1), generator=gen)
        compiled = torch.compile(bi.attention, options=opts, dynamic=True)
        assert torch.equal(compiled(q, k_cache, v_cache, order, valid, 0.25), bi.attention(q, k_cache, v_cache, order, valid, 0.25))
    torch._dynamo.reset()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kernel_equals_the_torch_form_within_rounding_whatever_the_batch_or_threads(dtype, d):
    """The C kernel: attention within rounding of the torch form (and of SDPA), and a query's bits
    the same alone, among other queries of other lengths, as one of a prefill chunk (slots shared),
    and at 1 or 2 threads. Head widths 64 and 128 (Pangu's: the value pass's sums then go 8 vectors
    at a time in registers, on AVX-512)."""
    from pangu_infer.models import bi_attention_kernel as kernel

    if not kernel.available():
        pytest.skip("no C compiler or AVX-512 here: the kernel does not run")
    gen = torch.Generator().manual_seed(3)
    hkv, g, slots, n = 2, 4, 1000, 40
    k_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(slots, hkv, d, generator=gen).to(dtype)
    order = torch.randperm(slots, generator=gen)[:768]
    q = torch.randn(n, hkv * g, d, generator=gen).to(dtype)
    ctx = torch.randint(1, 700, (n,), generator=gen)
    length = -(-int(ctx.max()) // bi.KV_SPLIT) * bi.KV_SPLIT
    valid = torch.arange(length)[None, :] < ctx[:, None]
    rows = torch.where(valid, order[:length][None, :], order[:1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = bi.attention(q, k_cache, v_cache, rows, valid, 0.125)
        torch.set_num_threads(2)
        assert torch.equal(bi.attention(q, k_cache, v_cache, rows, valid, 0.125), batch)
    finally:
        torch.set_num_threads(threads)
    ref = bi.torch_attention(q, k_cache, v_cache, rows, valid, 0.125)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(batch.float(), ref.float(), atol=tol), float((batch.float() - ref.float()).abs().max())
    shared = bi.attention(q, k_cache, v_cache, order[:length][None, :], valid, 0.125)  # one slot row for all
    assert torch.equal(shared, batch)
    for i in (0, 7, n - 1):
        c = int(ctx[i])
        own = -(-c // bi.KV_SPLIT) * bi.KV_SPLIT + bi.KV_SPLIT  # its own padding, one chunk more
        alone = bi.attention(q[i : i + 1], k_cache, v_cache, torch.cat((order[:c], order[:1].expand(own - c)))[None], torch.arange(own)[None, :] < c, 0.125)
        assert torch.equal(alone[0], batch[i]), i
        chunk = bi.prefill_attention(q[i : i + 1].expand(3, -1, -1), k_cache, v_cache, order, c + 2, 0.125)
        assert torch.equal(chunk[0], batch[i]), i
    bad = rows.clone()
    bad[3, 0] = slots  # a valid key's slot past the cache: refused, not read
    with pytest.raises(RuntimeError, match="refused"):
        bi.attention(q, k_cache, v_cache, bad, valid, 0.125)


def test_compiled_moge_router_equals_eager_in_the_mode():
    """The MoGE router's softmax in the mode (bi.softmax: exp2, fixed-order sum), compiled with
    dynamic rows as the engine compiles its step, is bitwise the eager forward's, alone or batched;
    torch.softmax compiled is not (most fp32 rows differ in the last bits)."""
    from pangu_infer.models.moge import moge_route

    opts = {"emulate_precision_casts": True, "cpp_wrapper": True}
    gen = torch.Generator().manual_seed(11)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            for fixed in (True, False):
                route = torch.compile(lambda t, f=fixed: moge_route(t, 8, fixed_order=f), options=opts)
                x = (torch.randn(300, 64, generator=gen) * 3).bfloat16()
                torch._dynamo.maybe_mark_dynamic(x, 0)
                ids, weights = moge_route(x, 8, fixed_order=fixed)
                got_ids, got = route(x)
                assert torch.equal(got_ids, ids)
                if fixed:
                    assert torch.equal(got, weights)
                    alone = torch.cat([moge_route(x[i : i + 1], 8, fixed_order=True)[1] for i in range(x.shape[0])])
                    assert torch.equal(alone, weights)
                else:
                    assert not torch.equal(got, weights)  # what the fixed order is for
    finally:
        torch._dynamo.reset()
