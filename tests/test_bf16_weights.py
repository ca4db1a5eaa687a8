"""A bf16 checkpoint in a float32 model keeps its bf16 matrices (models/bf16_weights.py): the same
logits and tokens as the same model with its weights widened to float32, half the weight memory."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pangu_infer import LLM, SamplingParams
from pangu_infer.models import bf16_weights
from pangu_infer.models.bf16_weights import Bf16Embedding, Bf16Experts, Bf16WeightLinear

pytestmark = pytest.mark.skipif(bf16_weights.library() is None, reason="the bf16-weight kernel needs x86 with AVX2 and FMA and a C compiler")

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(5, 17))}, {"prompt_token_ids": list(range(40, 95))}]


def as_bf16(src, dst, dtype=torch.bfloat16):
    """The checkpoint in `src` with every tensor stored in bf16 (as the released checkpoints are), or `dtype`."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.to(dtype) for k, v in load_file(f).items()}, f)
    return dst


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory, tiny_dense_dir, tiny_moge_dir, tiny_r72b_dir, tiny_ultra_dir):
    root = tmp_path_factory.mktemp("bf16")
    sources = {"dense": tiny_dense_dir, "moge": tiny_moge_dir, "r72b": tiny_r72b_dir, "ultra": tiny_ultra_dir}
    dirs = {kind: as_bf16(src, root / kind) for kind, src in sources.items()}
    dirs["dense-fp16"] = as_bf16(tiny_dense_dir, root / "dense-fp16", torch.float16)
    return dirs


@pytest.fixture(scope="module")
def half_ggufs(tmp_path_factory, tiny_sentencepiece_vocab):
    from fixtures_gguf import _tiny

    return {kind: _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", kind).path for kind in ("F16", "BF16")}


def _run(path, monkeypatch, keep: bool, **kwargs) -> dict:
    monkeypatch.setenv(bf16_weights.ENV, "1" if keep else "0")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, **kwargs)
    if not kwargs.get("enforce_eager"):
        assert llm.wait_compiled(600)
    model = llm.model
    out = {
        "logits": llm.logits(list(range(3, 40))),
        "greedy": [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)],
        "kept": sum(isinstance(m, Bf16WeightLinear) for m in model.modules()),
        "experts": sum(isinstance(m, Bf16Experts) for m in model.modules()),
        "linears": sum(type(m) is nn.Linear for m in model.modules()),
        "bf16_bytes": sum(t.numel() * 2 for t in model.buffers() if t.dtype == torch.bfloat16),
        "half_dtypes": {t.dtype for t in model.buffers() if t.dtype in (torch.bfloat16, torch.float16)},
        # dtypes of every float tensor outside the modules that keep bf16 weights
        "others": {
            t.dtype for m in model.modules() if not isinstance(m, (Bf16WeightLinear, Bf16Embedding, Bf16Experts))
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t is not None and t.is_floating_point()
        },
        "embedding": type(model.model.embed_tokens),
        "compiled": llm.engine.runner.decode_forward is not None,
    }
    return out


@pytest.mark.parametrize("kind", ["dense", "moge", "r72b", "ultra", "dense-fp16", "F16.gguf", "BF16.gguf"])
def test_bf16_matrices_give_the_float32_models_logits_and_tokens(kind, bf16_dirs, half_ggufs, monkeypatch):
    path = half_ggufs[kind.removesuffix(".gguf")] if kind.endswith(".gguf") else bf16_dirs[kind]
    kept = _run(path, monkeypatch, True, enforce_eager=True)
    wide = _run(path, monkeypatch, False, enforce_eager=True)
    assert kept["half_dtypes"] == {torch.float16 if kind in ("dense-fp16", "F16.gguf") else torch.bfloat16}
    assert kept["kept"] > 0 and kept["embedding"] is Bf16Embedding and kept["others"] == {torch.float32}
    assert (kept["experts"] > 0) == (kind in ("moge", "r72b", "ultra"))
    assert wide["kept"] == 0 and wide["linears"] > 0 and wide["embedding"] is nn.Embedding
    scale = wide["logits"].abs().max().item()
    assert (kept["logits"] - wide["logits"]).abs().max().item() <= 1e-4 * scale
    assert kept["greedy"] == wide["greedy"]


def test_the_compiled_step_runs_the_kernel(bf16_dirs, monkeypatch):
    compiled = _run(bf16_dirs["dense"], monkeypatch, True)
    eager = _run(bf16_dirs["dense"], monkeypatch, True, enforce_eager=True)
    assert compiled["compiled"] and compiled["kept"] > 0
    assert compiled["greedy"] == eager["greedy"]
    from pangu_infer import native_ops

    assert native_ops.connected("bf16w") == native_ops.load()  # the C++ operator where it is built


def test_a_float32_checkpoint_and_a_quantized_load_stay_as_they_were(tiny_dense_dir, bf16_dirs, monkeypatch):
    plain = _run(tiny_dense_dir, monkeypatch, True, enforce_eager=True)  # fp32 matrices: nothing to keep
    assert plain["kept"] == 0 and plain["bf16_bytes"] == 0
    quantized = _run(bf16_dirs["dense"], monkeypatch, True, enforce_eager=True, quantization="int8")
    assert quantized["kept"] == 0


@pytest.mark.parametrize("rows", [1, 3, 48, 49, 130])
def test_the_product_equals_float32s_for_few_and_many_rows(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 96, generator=g).to(torch.bfloat16)  # 70 rows: tiles and a ragged end
    x = torch.randn(rows, 96, generator=g)
    want = x.double() @ w.double().T
    got = bf16_weights.matmul(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 70)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # the kernel's outputs for a row depend on that row of x only (batch invariance)
    assert torch.equal(bf16_weights.kernel_mm(x[-1:], w), bf16_weights.kernel_mm(x, w)[-1:])
    # the C++ operator compiled graphs call gives the same numbers, where it is built
    if bf16_weights.native_op():
        native = torch.ops.pangu_infer.bf16w_native_mm(x, w, bf16_weights.KERNEL_MAX_ROWS, bf16_weights.SLICE_ELEMENTS)
        assert torch.equal(native, got)
        sliced = torch.ops.pangu_infer.bf16w_native_mm(x, w, 0, 96 * 16)  # widened 16 rows at a time
        torch.testing.assert_close(sliced.double(), want, rtol=1e-5, atol=1e-4)


def test_two_tensor_parallel_ranks_keep_bf16_matrices_inside_their_reductions(bf16_dirs, monkeypatch):
    from pangu_infer.parallel.state import RowParallelProduct

    one = _run(bf16_dirs["dense"], monkeypatch, True, enforce_eager=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned rank copies this
    try:
        monkeypatch.setenv(bf16_weights.ENV, "1")  # the spawned rank reads it too
        llm = LLM(str(bf16_dirs["dense"]), dtype="float32", device="cpu", kv_cache_memory=4 << 20, tensor_parallel_size=2)
        logits = llm.logits(list(range(3, 40)))
        greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        rows = [m.product for m in llm.model.modules() if isinstance(m, RowParallelProduct)]
        llm.shutdown()
    finally:
        torch.set_num_threads(threads)
    assert rows and all(isinstance(p, Bf16WeightLinear) for p in rows)
    assert (logits - one["logits"]).abs().max().item() <= 1e-4 * one["logits"].abs().max().item()
    assert greedy == one["greedy"]


def _measured_once(monkeypatch, tmp_path, measure: str, own: float, choice, cached) -> bool:
    """choice() with bf16_weights.<measure> timing "own" at `own` against 1.0 for "aten", in an empty
    per-machine cache: measured once, then read back from the file as a new process would."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv(bf16_weights.ENV, raising=False)
    calls = []
    monkeypatch.setattr(bf16_weights, measure, lambda: calls.append(1) or {"own": own, "aten": 1.0})
    cached.cache_clear()
    try:
        first = choice()
        cached.cache_clear()
        assert choice() is first and len(calls) == 1
        return first
    finally:
        cached.cache_clear()


@pytest.mark.parametrize("own,kept", [(1.2, True), (1.3, False)])
def test_bf16_weights_stay_unless_measured_clearly_slower(own, kept, monkeypatch, tmp_path):
    """Measured once per machine and kept in the per-machine cache; at equal speed half the memory wins."""
    assert _measured_once(monkeypatch, tmp_path, "measure", own, bf16_weights.chosen, bf16_weights._measured_faster) is kept
    monkeypatch.setenv(bf16_weights.ENV, "0")
    assert not bf16_weights.chosen()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(49, 70, 96), (150, 33, 1032), (300, 16, 8), (7, 17, 520)])
def test_the_blocked_product_equals_float64s_and_each_row_is_its_own(rows, n, k, dtype):
    """The many-row kernel (pangu_bf16w_gemm): blocks of rows (150 > GEMM_MC), of columns (1032 >
    GEMM_KC, with a ragged last block), a last panel of weight rows short of 16, register tiles of
    fewer than 6 rows; each output row depends on its row of x only, bit for bit."""
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g)
    want = x.double() @ w.double().T
    got = bf16_weights.kernel_mm(x, w, blocked=True)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * k ** 0.5)
    assert torch.equal(bf16_weights.kernel_mm(x[-5:], w, blocked=True), got[-5:])
    assert torch.equal(bf16_weights.kernel_mm(x[1:2], w, blocked=True), got[1:2])
    if bf16_weights.native_op():  # the C++ operator: `slice` 0 asks for the blocked product
        assert torch.equal(torch.ops.pangu_infer.bf16w_native_mm(x, w, 0, 0), got)


@pytest.mark.parametrize("blocked", [True, False])
def test_many_rows_take_the_blocked_kernel_or_widened_slices_as_chosen(blocked, monkeypatch):
    monkeypatch.setattr(bf16_weights, "blocked_chosen", lambda: blocked)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(bf16_weights.KERNEL_MAX_ROWS + 1, 64, generator=g)
    want = bf16_weights.kernel_mm(x, w, blocked=True) if blocked else bf16_weights.widened_mm(x, w)
    assert torch.equal(bf16_weights.matmul(x, w), want)
    few = x[: bf16_weights.KERNEL_MAX_ROWS]
    assert torch.equal(bf16_weights.matmul(few, w), bf16_weights.kernel_mm(few, w))  # few rows: the one-row kernel either way


@pytest.mark.parametrize("own,blocked", [(0.9, True), (1.1, False)])
def test_the_blocked_kernel_is_chosen_where_measured_faster(own, blocked, monkeypatch, tmp_path):
    """Measured once per machine against widened slices into BLAS (an AVX-512 CPU's BLAS may win)
    and kept in the per-machine cache; PANGU_INFER_BF16_WEIGHTS=1 takes it unmeasured."""
    chosen = _measured_once(monkeypatch, tmp_path, "measure_blocked", own, bf16_weights.blocked_chosen, bf16_weights.blocked_chosen)
    assert chosen is blocked
    monkeypatch.setenv(bf16_weights.ENV, "1")
    try:
        assert bf16_weights.blocked_chosen()
    finally:
        bf16_weights.blocked_chosen.cache_clear()


def test_measuring_the_blocked_kernel_times_both():
    times = bf16_weights.measure_blocked()
    assert set(times) == {"own", "aten"} and all(t > 0 for t in times.values())


@pytest.mark.parametrize("kind", ["dense", "moge", "r72b", "ultra"])
def test_fused_matrices_are_the_checkpoints_pieces_mapped_not_copied(bf16_dirs, monkeypatch, kind):
    """q/k/v and gate/up stay the checkpoint's own tensors (views of the memory-mapped safetensors
    file, one product each) instead of copies joined into one fused matrix: a released 7B's load
    held 8.9 GB of such copies (benchmarks/RESULTS.md, stop 46). So do a MoGE layer's routed
    experts, each expert's gate, up and down (Pro MoE's are most of the model)."""
    from pangu_infer.memory import file_backed_ranges, is_file_backed

    monkeypatch.setenv(bf16_weights.ENV, "1")
    llm = LLM(str(bf16_dirs[kind]), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    ranges = file_backed_ranges()
    if kind in ("r72b", "ultra"):  # (attention: no fused pieces in these checkpoints) the routed experts
        experts = [m for m in llm.model.modules() if isinstance(m, Bf16Experts)]
        assert experts and all(m.pieces == [2] * llm.model.config.num_experts for m in experts)
        assert all(is_file_backed(b, ranges) for m in experts for b in m.buffers())
        assert "fused_pieces" not in llm.model.__dict__
        return
    attn = llm.model.model.layers[0].self_attn
    mlp = llm.model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, Bf16WeightLinear) and attn.qkv_proj.pieces == 3
    assert attn.qkv_proj.out_features == attn.q_size + 2 * attn.kv_size
    fused = [attn.qkv_proj]
    if kind == "moge":
        experts = mlp.experts.impl
        n = llm.model.config.num_experts
        assert isinstance(experts, Bf16Experts) and experts.pieces == [2] * n and len(list(experts.buffers())) == 3 * n
        assert isinstance(mlp.shared_expert.gate_up_proj, Bf16WeightLinear) and mlp.shared_expert.gate_up_proj.pieces == 2
        fused += [experts, mlp.shared_expert.gate_up_proj]
    else:
        assert isinstance(mlp.gate_up_proj, Bf16WeightLinear) and mlp.gate_up_proj.pieces == 2
        fused += [mlp.gate_up_proj]
    pieces = [b for m in fused for b in m.buffers()]
    assert pieces and all(is_file_backed(b, ranges) for b in pieces)
    assert "fused_pieces" not in llm.model.__dict__  # all taken


@pytest.mark.parametrize("kind", ["dense", "moge"])
def test_pieces_no_kept_linear_takes_are_joined(bf16_dirs, monkeypatch, kind):
    """Where the kernel takes no linear (here: widths it does not take), the pieces become the fused
    parameter (or the stacked experts) as before, widened to float32 with the rest: the float32
    model's logits."""
    monkeypatch.setattr(bf16_weights, "COLUMNS", 1 << 20)
    kept = _run(bf16_dirs[kind], monkeypatch, True, enforce_eager=True)
    plain = _run(bf16_dirs[kind], monkeypatch, False, enforce_eager=True)
    assert kept["kept"] == 0 and kept["experts"] == 0 and kept["others"] == {torch.float32}
    assert torch.equal(kept["logits"], plain["logits"]) and kept["greedy"] == plain["greedy"]


def test_a_moge_models_compiled_step_runs_the_experts_pieces(bf16_dirs, monkeypatch):
    """The routed experts kept as the checkpoint's pieces inside a compiled decode step: the eager
    step's tokens."""
    compiled = _run(bf16_dirs["moge"], monkeypatch, True)
    eager = _run(bf16_dirs["moge"], monkeypatch, True, enforce_eager=True)
    assert compiled["compiled"] and compiled["experts"] > 0
    assert compiled["greedy"] == eager["greedy"]


def test_adapters_apply_over_kept_pieces(bf16_dirs, lora_adapters, monkeypatch):
    """A LoRA adapter on q/k/v and gate/up adds to the pieces' product as to a fused weight: the same
    greedy tokens and prompt logprobs as over the same weights widened to float32."""
    from pangu_infer import LoRARequest

    ids = list(range(3, 30))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    outs = {}
    for keep in (True, False):
        monkeypatch.setenv(bf16_weights.ENV, "1" if keep else "0")
        llm = LLM(str(bf16_dirs["dense"]), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True,
                  enable_lora=True)
        qkv = llm.model.model.layers[0].self_attn.qkv_proj  # a LoRALinear around the base module
        assert (isinstance(qkv.base, Bf16WeightLinear) and qkv.base.pieces == 3) is keep
        request = LoRARequest("full", 1, str(lora_adapters["full"].path))
        out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=request, use_tqdm=False)[0]
        outs[keep] = (out.outputs[0].token_ids, torch.tensor([e.logprob for e in out.prompt_logprobs[1:]]))
    assert outs[True][0] == outs[False][0]
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=0, atol=1e-4)
