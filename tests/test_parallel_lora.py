"""LoRA adapters under tensor parallelism (2 CPU ranks over gloo, and 4 for replicated KV heads)
against one process: each rank holds its shard of every adapter, cut as the base weights are, and
every rank's step adds the same adapters to the same rows. One process's adapters are checked
against PEFT's own model in test_lora.py; here the reference is one process.

Each (model, world size) workload runs once per module; one TP run at a time (1 thread per rank).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import save_file

from fixtures_lora import ALL_PROJECTIONS, make_peft_adapter
from fixtures_server import running_server
from pangu_infer import LLM, LoRARequest, SamplingParams
from pangu_infer.engine.compiled import LoRAVariants
from test_lora import write_gguf_adapter
import test_server_lora
from test_server_lora import API_KEY, SERVED, SMALL, _check_choice, _complete, _post

# the server tests' fixtures: the prompts and PEFT's greedy tokens for them
prompts, expected = test_server_lora.prompts, test_server_lora.expected
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [list(range(5, 17)), list(range(40, 75)), [1, 44, 2, 9, 100, 3, 17, 17]]
LOGIT_IDS = list(range(3, 30))
# Every request's (adapter, prompt): two adapters and the base model share the first batch; then
# the other two adapters, which with max_loras=2 take the first two's slots (the workers must
# install them in the same slots, in the same order).
FIRST = [("full", 0), (None, 1), ("wide", 2), ("full", 1), (None, 0), ("wide", 0)]
SECOND = [("attn", 0), ("gguf", 1), (None, 2), ("gguf", 2)]


@pytest.fixture(scope="module")
def dense_adapters(tmp_path_factory, lora_adapters, tiny_dense_config) -> dict[str, Path]:
    """PEFT's "full" (rank 8, alpha 16) and "attn" (rsLoRA, rank_pattern); "wide": rank 32 on every
    projection, wider than a rank's share of the KV heads (16 rows) and of the heads (32 rows);
    "gguf": "full" as llama.cpp's converter writes it (q/k rows in its order, its alpha)."""
    root = tmp_path_factory.mktemp("tp_lora")
    wide = make_peft_adapter(root / "wide", tiny_dense_config, 5, r=32, lora_alpha=8, target_modules=ALL_PROJECTIONS)
    gguf = write_gguf_adapter(root / "full.gguf", lora_adapters["full"], tiny_dense_config, "llama")
    return {"full": lora_adapters["full"].path, "attn": lora_adapters["attn"].path, "wide": wide.path, "gguf": gguf}


def write_adapter(directory: Path, shapes: dict[str, tuple[int, int]], r: int, alpha: float, seed: int) -> Path:
    """An adapter in PEFT's files (adapter_config.json, adapter_model.safetensors) with random A
    and B on the given projections (HF module name -> (in, out))."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_in, n_out) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.2
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.2
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.rsplit(".", 1)[1] for m in shapes})}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _requests(paths: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(sorted(paths.items()))}


def _generate(llm: LLM, reqs: dict[str, LoRARequest], plan: list) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for _, p in plan], GREEDY,
                        lora_request=[reqs[name] if name else None for name, _ in plan], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _single_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spawned ranks copy this: the ranks must not fight over 2 cores
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _dense_workload(model_dir: Path, paths: dict[str, Path], world_size: int, broken: Path) -> dict:
    def run() -> dict:
        llm = LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=world_size, kv_cache_memory=1 << 24,
                  enforce_eager=True, enable_lora=True, max_loras=2, max_lora_rank=32)
        try:
            reqs = _requests(paths)
            out = {"first": _generate(llm, reqs, FIRST), "second": _generate(llm, reqs, SECOND)}
            out["logits"] = {name: llm.logits(LOGIT_IDS, lora_request=reqs[name] if name else None)
                             for name in ("wide", None, "full")}
            # a predicted output (its draft tokens verified beside the adapter's rows on every rank)
            want = out["first"][0]
            predicted = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(**{**GREEDY.__dict__, "prediction": want}),
                                     lora_request=reqs["full"], use_tqdm=False)[0]
            out["predicted"] = (predicted.outputs[0].token_ids, predicted.metrics["accepted_prediction_tokens"])
            # An adapter that was fine when rank 0 read it, gone before the other ranks read it
            # (a path not readable on every rank): its load fails on rank 0's call, no rank changes.
            bad = LoRARequest("broken", 99, str(broken))
            out["before_failure"] = sorted(r.lora_name for r in llm.engine.list_loras())
            adapter = llm.engine.read_lora(bad)
            (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
            try:
                llm.engine.add_lora(bad, adapter)
                out["failure"] = None
            except ValueError as e:
                out["failure"] = str(e)
            out["after_failure"] = (sorted(r.lora_name for r in llm.engine.list_loras()), _generate(llm, reqs, SECOND))
        finally:
            llm.shutdown()
        return out

    return _single_thread(run)


@pytest.fixture(scope="module")
def dense_run(tiny_dense_dir, dense_adapters, tmp_path_factory):
    cache: dict[int, dict] = {}

    def get(world_size: int) -> dict:
        if world_size not in cache:
            broken = tmp_path_factory.mktemp("broken") / "adapter"
            shutil.copytree(dense_adapters["attn"], broken)
            cache[world_size] = _dense_workload(tiny_dense_dir, dense_adapters, world_size, broken)
        return cache[world_size]

    return get


def test_two_adapters_and_base_rows_in_one_batch_match_one_process(dense_run, tiny_dense_config):
    got, want = dense_run(2), dense_run(1)
    assert got["first"] == want["first"]
    assert got["second"] == want["second"]
    base = {p: tokens for (name, p), tokens in zip(FIRST, want["first"]) if name is None}
    # the adapters change the tokens (else LoRA ignored on every rank would pass)
    for (name, p), tokens in zip(FIRST + SECOND, want["first"] + want["second"]):
        if name is not None and p in base:
            assert tokens != base[p], (name, p)


def test_adapter_logits_match_one_process(dense_run):
    got, want = dense_run(2)["logits"], dense_run(1)["logits"]
    for name in want:
        assert (got[name] - want[name]).abs().max().item() < 1e-4, name
    assert (want["wide"] - want[None]).abs().max().item() > 1e-2  # the rank-32 adapter counts


def test_a_predicted_output_under_an_adapter_is_verified_on_every_rank(dense_run):
    tokens, accepted = dense_run(2)["predicted"]
    assert tokens == dense_run(1)["first"][0] and accepted >= GREEDY.max_tokens - 1


def test_an_adapter_that_fails_on_a_worker_rank_fails_the_load_and_changes_no_rank(dense_run):
    got, want = dense_run(2), dense_run(1)
    assert want["failure"] is None  # one process installs what it read
    assert got["failure"] is not None
    assert "'broken'" in got["failure"] and "tensor-parallel rank 1 of 2" in got["failure"]
    assert "adapter_model.safetensors is not a readable safetensors file" in got["failure"]
    names, tokens = got["after_failure"]
    assert names == got["before_failure"] == want["before_failure"]  # the adapter it would replace stays too
    # every rank still holds the same adapters in the same slots: the tokens are one process's
    assert tokens == want["second"]


def test_four_ranks_with_replicated_kv_heads_match_one_process(tiny_dense_dir, dense_adapters, dense_run):
    """4 ranks over 2 KV heads: two ranks share each KV head, and each keeps all of that head's rows
    of k/v's B (as of the weights)."""
    def run() -> dict:
        llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", tensor_parallel_size=4, kv_cache_memory=1 << 24,
                  enforce_eager=True, enable_lora=True, max_loras=2, max_lora_rank=32)
        try:
            return _generate(llm, _requests(dense_adapters), FIRST)
        finally:
            llm.shutdown()

    assert _single_thread(run) == dense_run(1)["first"]


def test_compiled_decode_with_and_without_adapter_rows_matches_one_process(tiny_dense_dir, dense_adapters, dense_run):
    """Compiled decode on both ranks (two graphs each: with the adapters' products and without):
    a batch with an adapter row and a base row, then one with base rows alone."""
    def run() -> tuple:
        llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_memory=1 << 24,
                  enable_lora=True, max_loras=2, max_lora_rank=32)
        try:
            assert llm.wait_compiled(timeout=540), llm.engine.runner.compile_error
            assert isinstance(llm.engine.runner.decode_forward, LoRAVariants)  # both graphs built
            before = llm.parallel.wait_compiled(0)
            reqs = _requests(dense_adapters)
            mixed = _generate(llm, reqs, FIRST[:3])
            base = _generate(llm, reqs, [(None, 0), (None, 2)])
            after = llm.parallel.wait_compiled(0)
        finally:
            llm.shutdown()
        return mixed, base, before, after

    mixed, base, before, after = _single_thread(run)
    want = dense_run(1)["first"]
    assert mixed == want[:3]
    assert base == [want[4], _base_of(dense_run(1), 2)]
    (ready, done_before), = before
    assert ready and after == [(True, done_before + 2 * (GREEDY.max_tokens - 1))]


def _base_of(results: dict, prompt: int) -> list[int]:
    return next(t for (name, p), t in zip(SECOND, results["second"]) if name is None and p == prompt)


def _moge_workload(model_dir: Path, world_size: int, adapters: list[Path]) -> dict:
    def run() -> dict:
        llm = LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=world_size, kv_cache_memory=1 << 24,
                  enforce_eager=True, enable_lora=True, max_loras=2, max_lora_rank=16)
        try:
            reqs = [LoRARequest(f"moge{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
            plan = [(reqs[0], 0), (None, 0), (reqs[1], 0), (reqs[0], 1), (None, 1)]
            outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for _, p in plan], GREEDY,
                                lora_request=[r for r, _ in plan], use_tqdm=False)
            return {"tokens": [o.outputs[0].token_ids for o in outs],
                    "logits": [llm.logits(LOGIT_IDS, lora_request=r) for r in (reqs[1], None)]}
        finally:
            llm.shutdown()

    return _single_thread(run)


def test_moge_shared_expert_and_attention_adapters_match_one_process(tiny_moge_dir, tmp_path):
    """Pro MoE (MoGE): adapters on attention and the shared expert (the routed experts take none),
    whose down_proj's partial sum is reduced with the experts' in one all-reduce."""
    one = LLM(str(tiny_moge_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 24, enforce_eager=True,
              enable_lora=True, max_loras=2, max_lora_rank=16)
    shapes = one.engine.loras.state.shapes()
    del one
    assert any(".shared_expert." in m for m in shapes) and not any(".experts." in m for m in shapes)
    adapters = [write_adapter(tmp_path / "a", shapes, 8, 16, 1),
                write_adapter(tmp_path / "b", {m: s for m, s in shapes.items() if "shared_expert" in m or "o_proj" in m}, 16, 8, 2)]
    got, want = _moge_workload(tiny_moge_dir, 2, adapters), _moge_workload(tiny_moge_dir, 1, adapters)
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logits"], want["logits"], strict=True):
        assert (a - b).abs().max().item() < 1e-4
    # each adapter changes the tokens of the prompt it shares with a base row
    assert want["tokens"][0] != want["tokens"][1] and want["tokens"][2] != want["tokens"][1]
    assert want["tokens"][3] != want["tokens"][4]
    assert (want["logits"][0] - want["logits"][1]).abs().max().item() > 1e-2


def test_a_tensor_parallel_server_loads_uses_and_unloads_adapters_at_runtime(tiny_dense_dir, lora_adapters, tmp_path,
                                                                           prompts, expected, pangu_tokenizer):
    """`serve --tensor-parallel-size 2 --lora-modules ... --enable-runtime-lora-updates`: a startup
    adapter, one loaded at runtime and the base model answer side by side with PEFT's tokens; the
    runtime one swapped in place, unloaded, and a folder that is no adapter refused with a 400."""
    with running_server(tiny_dense_dir, *SMALL, "--tensor-parallel-size", "2", "--threads", "2",
                        "--lora-modules", f"full={lora_adapters['full'].path}", "--enable-runtime-lora-updates",
                        api_key=API_KEY, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        attn = str(lora_adapters["attn"].path)
        loaded = _post(server, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": attn})
        assert loaded.status_code == 200, loaded.text
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda model: _complete(client, model, prompts[1]), ["attn", SERVED, "full"]))
        for model, out in zip(["attn", SERVED, "full"], outs):
            _check_choice(out.choices[0], prompts[1], expected[model][1], pangu_tokenizer, model)
        swapped = _post(server, "/v1/load_lora_adapter",
                        {"lora_name": "attn", "lora_path": str(lora_adapters["full"].path), "load_inplace": True})
        assert swapped.status_code == 200, swapped.text
        _check_choice(_complete(client, "attn", prompts[0]).choices[0], prompts[0], expected["full"][0], pangu_tokenizer, "swapped")
        assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"}).status_code == 200
        with pytest.raises(openai.NotFoundError, match="attn"):
            _complete(client, "attn", prompts[0])
        bad = _post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tiny_dense_dir)})
        assert bad.status_code == 400 and str(tiny_dense_dir) in bad.json()["error"]["message"], bad.text
        _check_choice(_complete(client, "full", prompts[2]).choices[0], prompts[2], expected["full"][2], pangu_tokenizer, "full")


@pytest.mark.parametrize("family", ["dense", "moge", "r72b", "ultra"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_family_cuts_adapters_so_the_ranks_add_up_to_the_whole_product(family, world_size):
    """Each rank's model (built on the meta device as that rank builds it) with LoRA turned on: every
    projection an adapter may target is checked against the whole model's shape, and the ranks' cuts
    of a random adapter give its whole product: the column-parallel ones' rows cover every output
    row (a replicated KV head's rows on each rank that shares it), the row-parallel ones' partial
    products, one per rank, sum to x @ A^T @ B^T (each input column on exactly one rank)."""
    from pangu_infer import loader
    from pangu_infer.config import ModelConfig
    from pangu_infer.models.lora import enable_lora
    from pangu_infer.models.registry import build_model_on_meta
    from pangu_infer.parallel.state import ParallelState, building_shard

    cfg = ModelConfig.from_hf_dict(getattr(loader.random, f"pangu_{family}_config")(vocab_size=64))
    meta = torch.device("meta")
    one = enable_lora(build_model_on_meta(cfg), 1, 4, 8, torch.float32, meta)
    whole = one.shapes()
    ranks = []
    for rank in range(world_size):
        with building_shard(ParallelState(rank, world_size)):
            model = build_model_on_meta(cfg)
        ranks.append(enable_lora(model, 1, 4, 8, torch.float32, meta))
    g = torch.Generator().manual_seed(0)
    for name, (n_in, n_out) in whole.items():
        assert all(s.shapes()[name] == (n_in, n_out) for s in ranks), name
        a, b, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, n_in), (n_out, 4), (3, n_in)))
        want = x @ a.T @ b.T
        row_parallel = {s.targets[name][0].row_parallel for s in ranks}
        assert len(row_parallel) == 1, name
        if row_parallel.pop():
            total = torch.zeros_like(want)
            for s in ranks:
                cols, rows = s.shard[name]
                assert rows is None and cols is not None, name  # B whole, A cut
                total += x[:, cols] @ a[:, cols].T @ b.T
            assert torch.allclose(total, want), name
        else:
            covered = torch.zeros(n_out, dtype=torch.bool)
            for s in ranks:
                cols, rows = s.shard[name]
                assert cols is None, name  # A whole
                rows = torch.arange(n_out) if rows is None else rows
                assert len(rows) == s.targets[name][0].slices[s.targets[name][1]][1]
                got = x @ a.T @ b[rows].T
                assert torch.allclose(got, want[:, rows]), name
                covered[rows] = True
            assert covered.all(), name


def test_adapters_over_quantized_base_weights_on_two_ranks(tiny_pangu_gguf_q8_0, tmp_path, monkeypatch):
    """A Q8_0 GGUF model, kept quantized on every rank (the same int8 weights as one process, summed
    in float32: test_parallel_quant.py), with an adapter: its row-parallel products join the
    quantized partial sums (LoRALinear around RowParallelProduct(QuantizedLinear)) before the
    all-reduce, and the tokens are one process's."""
    from pangu_infer.models.lora import LoRALinear
    from pangu_infer.parallel.state import RowParallelProduct
    from pangu_infer.quant.modules import QuantizedLinear

    # as test_parallel_quant.py: every int8 product the kernel's float32 sums, on every rank
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT8", str(1 << 30))
    monkeypatch.setenv("PANGU_INFER_AMX_PREFILL", "0")
    path = str(tiny_pangu_gguf_q8_0.path)

    def run(world_size: int, adapter: Path = None) -> dict:
        llm = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=world_size, kv_cache_memory=1 << 24,
                  enforce_eager=True, enable_lora=True, max_lora_rank=8)
        try:
            if adapter is None:
                return {"shapes": llm.engine.loras.state.shapes()}
            req = LoRARequest("q", 1, str(adapter))
            outs = llm.generate([{"prompt_token_ids": PROMPTS[p]} for p in (0, 0, 1)], GREEDY,
                                lora_request=[req, None, req], use_tqdm=False)
            wrapped = [m.base for m in llm.model.modules() if isinstance(m, LoRALinear) and m.row_parallel]
            return {"tokens": [o.outputs[0].token_ids for o in outs], "logits": llm.logits(LOGIT_IDS, lora_request=req),
                    "row_parallel": wrapped}
        finally:
            llm.shutdown()

    adapter = write_adapter(tmp_path / "q8", run(1)["shapes"], 8, 16, 3)
    want = run(1, adapter)
    got = _single_thread(lambda: run(2, adapter))
    assert got["row_parallel"] and all(isinstance(m, RowParallelProduct) and isinstance(m.product, QuantizedLinear)
                                       for m in got["row_parallel"])
    assert got["tokens"] == want["tokens"] and want["tokens"][0] != want["tokens"][1]
    assert (got["logits"] - want["logits"]).abs().max().item() <= 1e-3 * want["logits"].abs().max().item()
