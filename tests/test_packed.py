"""oneDNN-prepacked bf16 linears (pangu_infer.models.packed): same products, swapped in by LLM on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pangu_infer import LLM, SamplingParams
from pangu_infer.loader import load_model
from pangu_infer.models import packed
from pangu_infer.models.packed import PackedLinear, can_pack, has_packed_linears, pack_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not can_pack(CPU, torch.bfloat16), reason="this CPU's oneDNN has no bf16 linear")


@pytest.mark.parametrize("layout", packed.LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(shape, bias, layout, monkeypatch):
    monkeypatch.setenv(packed.LAYOUT_ENV, layout)
    packed.packed_layout.cache_clear()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(130, 96, generator=g).bfloat16()
    b = torch.randn(130, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, generator=g).bfloat16()
    got = PackedLinear(w, b)(x)
    assert got.shape == (*shape[:-1], 130)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)


def test_only_plain_bf16_linears_are_packed():
    class Custom(nn.Linear):  # other subclasses keep their own forward
        pass

    m = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8), Custom(8, 8).bfloat16())
    assert pack_linears(m) == 1
    assert [type(c) for c in m] == [PackedLinear, nn.Linear, Custom]
    assert not can_pack(CPU, torch.float32) and not can_pack(torch.device("meta"), torch.bfloat16)


def test_a_row_parallel_linear_is_packed_inside_its_reduction():
    """A tensor-parallel rank's o_proj / down_proj: the packed product, then its all-reduce and bias
    (reduce=False here: rank 0's partial sum with the bias, nothing to reduce with)."""
    from pangu_infer.parallel.state import ParallelState, RowParallelLinear, RowParallelProduct

    row = RowParallelLinear(64, 32, True, ParallelState(0, 2), reduce=False).bfloat16()
    m = nn.Sequential(row)
    x = torch.randn(3, 64).bfloat16()
    want = F.linear(x, row.weight) + row.bias
    assert pack_linears(m) == 1
    assert type(m[0]) is RowParallelProduct and type(m[0].product) is PackedLinear
    assert m[0].product.bias is None and m[0].bias is row.bias
    torch.testing.assert_close(m(x), want, rtol=0, atol=2e-2)


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


def test_llm_packs_bf16_on_cpu(tiny_dense_dir):
    llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    assert has_packed_linears(llm.model)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert not has_packed_linears(LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True).model)


def test_packed_linear_compiles_as_an_opaque_kernel():
    """torch.compile cannot take the packed tensor; the pangu_infer::packed_linear operator hides it, so a
    compiled graph calls the same kernel and gives the same bits."""
    g = torch.Generator().manual_seed(1)
    lin = PackedLinear(torch.randn(48, 32, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16())
    head = PackedLinear(torch.randn(32, 48, generator=g).bfloat16(), None)

    def f(x):
        return head(torch.nn.functional.silu(lin(x)))

    compiled = torch.compile(f, dynamic=True)
    with torch.inference_mode():
        for rows in (1, 5, 9):
            x = torch.randn(rows, 32, generator=g).bfloat16()
            assert torch.equal(compiled(x), f(x))


def test_packed_weights_leave_the_operator_table_with_their_module():
    from pangu_infer.models import packed

    lin = PackedLinear(torch.randn(8, 8).bfloat16(), None)
    handle = int(lin.handle)
    assert handle in packed._WEIGHTS
    del lin
    import gc

    gc.collect()
    assert handle not in packed._WEIGHTS


def test_compiled_decode_runs_on_packed_weights(tiny_dense_dir):
    """The whole path: bf16 LLM (packed linears) with compiled decode steps at batch 3, 2 and 1.
    Each step's logprobs are those of the plain (unpacked, eager) bf16 model's full forward over the
    same tokens, within bf16 rounding: bits may differ, because the compiled graph fuses norms,
    rotary and SiLU in fp32 where eager rounds each op to bf16 (logits of ~3 have a bf16 step of
    1/64). Greedy tokens must be the reference's argmax wherever its top two are clearly apart."""
    tol = 0.05
    llm = LLM(str(tiny_dense_dir), dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20)  # compiled: the default
    assert llm.wait_compiled()
    assert has_packed_linears(llm.model)
    plain = load_model(str(tiny_dense_dir), torch.bfloat16, CPU, load_tokenizer=False).model
    calls = []
    runner = llm.engine.runner
    compiled = runner.decode_forward
    runner.decode_forward = lambda *a: calls.append(len(a[0])) or compiled(*a)
    prompts = [list(range(3, 3 + n)) for n in (4, 9, 30)]
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=3, ignore_eos=True) for n in (3, 5, 8)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert sorted(set(calls)) == [1, 2, 3]  # decode-only steps went through the compiled forward
    clear = 0
    for prompt, out in zip(prompts, outs):
        comp = out.outputs[0]
        ids = torch.tensor(prompt + comp.token_ids)
        with torch.inference_mode():
            ref = torch.log_softmax(plain.compute_logits(plain(ids, torch.arange(len(ids)))), dim=-1)
        for lp, row in zip(comp.logprobs[1:], ref[len(prompt) :]):  # the first token came from the prefill
            assert max(abs(v - row[t].item()) for t, v in lp.top + [(lp.token_id, lp.logprob)]) <= tol
            best, second = row.topk(2).values.tolist()
            if best - second > 2 * tol:
                assert lp.token_id == int(row.argmax())
                clear += 1
    assert clear >= 5  # enough steps with a clear greedy choice to test the tokens


def test_weights_of_a_mapped_checkpoint_are_recognised(tmp_path):
    """pack_linears drops the pages of plain weights that are views of a memory-mapped checkpoint
    (they would stay resident beside the packed copy); it must recognise exactly those."""
    from safetensors.torch import save_file

    from pangu_infer.loader.safetensors import iter_safetensors
    from pangu_infer.memory import file_backed_ranges, is_file_backed

    save_file({"w": torch.randn(256, 256).bfloat16()}, str(tmp_path / "m.safetensors"))
    (name, mapped), = list(iter_safetensors([str(tmp_path / "m.safetensors")]))
    ranges = file_backed_ranges()
    assert is_file_backed(mapped, ranges)
    assert not is_file_backed(torch.randn(256, 256).bfloat16(), ranges)


def test_a_packed_tied_head_is_counted_once_in_the_bytes_per_token(smollm2_gguf_path):
    """SmolLM2 ties its head to the embedding; packing adds a copy for the head, and decode reads
    that copy instead of the table: the bytes a token reads stay the same."""
    from pangu_infer.bench import weight_bytes_per_token

    model = load_model(str(smollm2_gguf_path), torch.bfloat16, CPU, load_tokenizer=False, quantization="none").model
    assert model.config.tie_word_embeddings and model.lm_head is None
    before = weight_bytes_per_token(model)
    pack_linears(model)
    assert weight_bytes_per_token(model) == before


def test_the_packed_layout_is_measured_once_per_machine_and_can_be_set(monkeypatch, tmp_path):
    """Which oneDNN layout packs bf16 weights is timed once, kept in the per-machine cache file
    (a second process reads it, measuring nothing), and PANGU_INFER_PACKED_LAYOUT overrides it."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv(packed.LAYOUT_ENV, raising=False)
    calls = []

    def measure():
        calls.append(1)
        return "general"

    monkeypatch.setattr(packed, "measure_layouts", measure)
    packed.packed_layout.cache_clear()
    assert packed.packed_layout() == "general" and len(calls) == 1
    packed.packed_layout.cache_clear()  # as a new process would: read from the file
    assert packed.packed_layout() == "general" and len(calls) == 1
    assert '"packed_bf16_layout": "general"' in (tmp_path / "kernels.json").read_text()
    monkeypatch.setenv(packed.LAYOUT_ENV, "decode")
    packed.packed_layout.cache_clear()
    assert packed.packed_layout() == "decode" and len(calls) == 1
    monkeypatch.setenv(packed.LAYOUT_ENV, "fast")
    packed.packed_layout.cache_clear()
    with pytest.raises(ValueError, match="PANGU_INFER_PACKED_LAYOUT='fast': expected one of decode, general"):
        packed.packed_layout()
    packed.packed_layout.cache_clear()


def test_the_layout_measurement_returns_a_layout():
    assert packed.measure_layouts(n_weights=2, size=256) in packed.LAYOUTS


def test_a_model_of_the_same_shape_loads_the_saved_step_and_multiplies_by_its_own_packed_weights(
    tmp_path, tiny_dense_dir, tiny_dense_config, pangu_tokenizer_dir,
):
    """A packed linear's handle reaches pangu_infer::packed_linear as a tensor (a graph input), not an
    int baked into the graph: a second bf16 model of the same shape in the process (other weights,
    other handles) loads the first one's saved step instead of tracing and compiling its own, and
    that step multiplies by the second model's weights. Checked on logprobs: each model's compiled
    greedy tokens score, under its own plain eager forward, what the step reported (within bf16
    rounding), and far from what the other model gives them."""
    from fixtures_models import build_tiny_model

    from pangu_infer.engine import saved_step

    other_dir = build_tiny_model(tmp_path / "other", tiny_dense_config, pangu_tokenizer_dir, seed=1)
    kw = dict(dtype="bfloat16", device="cpu", max_model_len=64, kv_cache_memory=4 << 20)
    first = LLM(str(tiny_dense_dir), **kw)
    assert first.wait_compiled(), first.engine.runner.compile_error
    second = LLM(str(other_dir), **kw)
    assert second.wait_compiled(), second.engine.runner.compile_error
    step = second.engine.runner.decode_forward
    assert has_packed_linears(second.model)
    assert isinstance(step, saved_step.SavedStep) and step.built == 0 and step.loaded >= 2
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    prompt = list(range(3, 12))
    refs = [load_model(str(d), torch.bfloat16, CPU, load_tokenizer=False).model for d in (tiny_dense_dir, other_dir)]
    for i, llm in enumerate((first, second)):
        out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
        ids = torch.tensor(prompt + out.token_ids)
        got = torch.tensor([lp.logprob for lp in out.logprobs[1:]])  # decode steps (the first came from the prefill)
        for j, ref in enumerate(refs):
            with torch.inference_mode():
                rows = torch.log_softmax(ref.compute_logits(ref(ids, torch.arange(len(ids)))).float(), dim=-1)
            want = rows[len(prompt) : len(ids) - 1].gather(1, ids[len(prompt) + 1 :, None]).squeeze(1)
            gap = (got - want).abs().max().item()
            assert gap <= 0.05 if i == j else gap > 0.3, (i, j, gap)


@pytest.mark.parametrize("layout", packed.LAYOUTS)
def test_the_bytes_a_packed_weight_holds_are_known_before_packing(layout, monkeypatch):
    """oneDNN's blocked layout pads a packed weight to its blocks: packed_bytes (what the memory
    estimate counts) is what oneDNN allocates, odd shapes included."""
    monkeypatch.setenv(packed.LAYOUT_ENV, layout)
    packed.packed_layout.cache_clear()
    for n, k in [(3, 5000), (1000, 777), (130, 96), (1536, 576), (7, 64)]:
        weight = PackedLinear(torch.zeros(n, k, dtype=torch.bfloat16), None).weight
        assert packed.packed_bytes(n, k) == torch.ops.mkldnn._nbytes(weight), (n, k)
    assert packed.packed_bytes(3, 5000) > 10 * 3 * 5000 * 2  # padded rows, many times the weight
    packed.packed_layout.cache_clear()


def test_the_memory_estimate_is_what_a_packed_bf16_load_holds(tmp_path):
    """A bf16 load that packs (a tied MoGE model whose widths are not multiples of oneDNN's blocks:
    every packed linear and expert padded, and the tied head's packed copy) holds what
    loader.weights_bytes counts, each packed weight as oneDNN allocated it."""
    from fixtures_models import build_tiny_model

    from pangu_infer.loader import load_serving_model, weights_bytes
    from pangu_infer.loader.random import pangu_moge_config

    config = pangu_moge_config(vocab_size=1000, hidden_size=48, num_experts=16, moe_intermediate_size=40,
                               shared_expert_intermediate_size=40, tie_word_embeddings=True)
    path = str(build_tiny_model(tmp_path, config))
    model = load_serving_model(path, torch.bfloat16, CPU, load_tokenizer=False).model
    assert model.lm_head is not None and model.lm_head is not model.model.embed_tokens
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    held = sum(torch.ops.mkldnn._nbytes(t) if t.layout == torch._mkldnn else t.numel() * t.element_size() for t in tensors)
    estimate = weights_bytes(path, torch.bfloat16, None, False, True, CPU)
    assert abs(estimate - held) <= 0.001 * held, (estimate, held)
    assert estimate > weights_bytes(path, torch.bfloat16, None, False, True, torch.device("meta")) * 1.2  # packing counts
