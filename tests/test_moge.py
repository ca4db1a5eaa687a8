"""Pangu Pro MoE (Mixture of Grouped Experts): parity with the specification, router properties,
cached generation, the real 72B config, and the load statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures_models import build_tiny_model, random_moge_block
from pangu_infer import LLM, SamplingParams
from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.loader import load_model
from pangu_infer.loader.random import pangu_moge_config, random_state_dict, transformers_llama, write_checkpoint
from pangu_infer.models.moge import IMBALANCE_DEVICES, MoGEBlock, moge_route
from pangu_infer.models.registry import build_model_on_meta, count_active_parameters, count_parameters

REAL_72B_CONFIG = Path(__file__).resolve().parent / "data" / "models" / "pangu-pro-moe-72b" / "config.json"
NUM_GROUPS = 8  # fixed by the architecture: 8 groups of consecutive experts
KV_BYTES = 64 << 20  # tiny models need a tiny KV pool


# ---------------------------------------------------------------------------------------------
# The reference: the specification (docs/pangu-models.md, section 2) in plain torch ops, one token
# at a time through the MoGE layer, straight from the HF state dict.


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) layout over the full head_dim; x: [heads, T, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _expert(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (F.silu(gate) * up) @ sd[prefix + "down_proj.weight"].T


def _reference_moge(x: torch.Tensor, sd: dict, p: str, num_experts: int) -> torch.Tensor:
    per_group = num_experts // NUM_GROUPS
    scale = sd[p + "router_scale"][0]
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        xt = x[t]
        probs = torch.exp((xt @ sd[p + "gate.weight"].T).float())
        probs = probs / probs.sum()  # softmax over all experts, in fp32
        y = torch.zeros_like(xt)
        for g in range(NUM_GROUPS):
            group = probs[g * per_group : (g + 1) * per_group].tolist()
            e = g * per_group + group.index(max(group))  # list.index: the first maximum wins a tie
            w = probs[e].to(x.dtype)  # the release casts the raw probability to the activation dtype
            y = y + w * scale[e] * _expert(xt, sd, f"{p}experts.{e}.")
        out[t] = y + _expert(xt, sd, p + "shared_expert.")
    return out


def reference_logits(sd: dict, config: dict, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of Pangu Pro MoE, computed in the dtype of the state dict."""
    dtype = sd["model.embed_tokens.weight"].dtype
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, eps, n = hidden // heads, config["rms_norm_eps"], len(ids)
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1).float()
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)

        def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
            a = f"{p}self_attn.{name}_proj."
            return inp @ sd[a + "weight"].T + sd[a + "bias"]

        q = _rotate(proj("q", h).view(n, heads, head_dim).transpose(0, 1), cos, sin)
        k = _rotate(proj("k", h).view(n, kv_heads, head_dim).transpose(0, 1), cos, sin)
        v = proj("v", h).view(n, kv_heads, head_dim).transpose(0, 1)
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
        # Scores, softmax and the weighted sum in fp32, as fused attention kernels accumulate.
        scores = (q.float() @ k.float().transpose(1, 2)) * head_dim**-0.5
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v.float()
        x = x + proj("o", attn.to(dtype).transpose(0, 1).reshape(n, hidden))
        x = x + _reference_moge(
            _rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps), sd, p + "mlp.", config["num_experts"]
        )
    x = _rms_norm(x, sd["model.norm.weight"], eps)
    return (x @ sd["lm_head.weight"].T).float()


def reference_greedy(sd: dict, config: dict, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding by full forwards of the growing sequence, no cache."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(reference_logits(sd, config, ids)[-1].argmax()))
    return ids[len(prompt) :]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def moge_llm(tiny_moge_dir: Path) -> LLM:
    return LLM(str(tiny_moge_dir), dtype="float32", device="cpu", kv_cache_memory=KV_BYTES, enforce_eager=True)


@pytest.fixture(scope="module")
def bf16_sharded_moge_dir(tmp_path_factory, tiny_moge_config: dict, pangu_tokenizer_dir: Path) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny_moge_bf16"),
        tiny_moge_config,
        pangu_tokenizer_dir,
        num_shards=3,
        dtype=torch.bfloat16,
    )


def _routes(block: MoGEBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return moge_route(block.gate(x), block.num_groups)


# ---------------------------------------------------------------------------------------------
# Parity with the specification


def test_fp32_logits_match_the_specification(moge_llm: LLM, tiny_moge_config: dict):
    sd = random_state_dict(tiny_moge_config)  # the fixture checkpoint's tensors (seed 0)
    ids = [1, 17, 230, 5, 999, 42, 8, 300, 77, 12, 3]
    got = moge_llm.logits(ids)
    want = reference_logits(sd, tiny_moge_config, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def _moge_that_is_a_dense_llama(config: dict, seed: int) -> tuple[dict, dict]:
    """(MoGE state dict, dense Llama state dict) of one function: a zero router ties all experts, so
    each group's first expert wins with the raw probability 1/num_experts, which router_scale undoes;
    those experts hold slices of a dense SwiGLU and the shared expert holds the rest. The other
    experts are random, with other scales: only the first of each group may contribute."""
    moge = random_state_dict(config, seed=seed)
    dense = {k: v for k, v in moge.items() if ".mlp." not in k}
    num_experts, per_group = config["num_experts"], config["num_experts"] // NUM_GROUPS
    shared, inter = config["shared_expert_intermediate_size"], config["moe_intermediate_size"]
    hidden, width = config["hidden_size"], shared + NUM_GROUPS * inter
    g = torch.Generator().manual_seed(seed + 1)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        gate, up = (torch.randn(width, hidden, generator=g) / hidden**0.5 for _ in range(2))
        down = torch.randn(hidden, width, generator=g) / width**0.5
        dense.update({p + "gate_proj.weight": gate, p + "up_proj.weight": up, p + "down_proj.weight": down})
        moge[p + "gate.weight"] = torch.zeros(num_experts, hidden)
        moge[p + "router_scale"][0, ::per_group] = float(num_experts)
        pieces = [(p + "shared_expert.", slice(0, shared))]
        pieces += [(f"{p}experts.{grp * per_group}.", slice(shared + grp * inter, shared + (grp + 1) * inter)) for grp in range(NUM_GROUPS)]
        for prefix, cols in pieces:
            moge[prefix + "gate_proj.weight"] = gate[cols].clone()
            moge[prefix + "up_proj.weight"] = up[cols].clone()
            moge[prefix + "down_proj.weight"] = down[:, cols].clone()
    return moge, dense


def test_moge_built_as_a_dense_mlp_gives_transformers_llama_logits(tmp_path: Path, tiny_moge_config: dict):
    """A reference nobody here wrote: transformers' LlamaForCausalLM (q/k/v/o biases, as Pangu Pro
    MoE's attention has) on the dense weights. This pins the router's tie rule (lowest index wins),
    the raw unrenormalised weights and router_scale, and the attention, against the whole model."""
    moge, dense = _moge_that_is_a_dense_llama(tiny_moge_config, seed=11)
    write_checkpoint(str(tmp_path), tiny_moge_config, moge)
    model = load_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False).model
    width = tiny_moge_config["shared_expert_intermediate_size"] + NUM_GROUPS * tiny_moge_config["moe_intermediate_size"]
    reference = transformers_llama(dict(tiny_moge_config, intermediate_size=width), dense)
    g = torch.Generator().manual_seed(12)
    lengths = (1, 7, 90)
    for n in lengths:
        ids = torch.randint(3, tiny_moge_config["vocab_size"], (n,), generator=g)
        with torch.inference_mode():
            ours = model.compute_logits(model(ids, torch.arange(n)))
            ref = reference(ids[None]).logits[0]
        err = (ours - ref).abs().max().item()
        assert err <= 1e-4, f"{n} tokens: logits differ by up to {err:.3g}"
    expected = torch.zeros(tiny_moge_config["num_experts"], dtype=torch.long)
    expected[:: tiny_moge_config["num_experts"] // NUM_GROUPS] = sum(lengths)  # every token, each group's first expert
    assert all(torch.equal(block.load.moge_counts, expected) for block in model.moe_layers())


def test_sharded_bf16_checkpoint_loads_every_expert(bf16_sharded_moge_dir: Path, tiny_moge_config: dict):
    assert len(list(bf16_sharded_moge_dir.glob("model-*-of-00003.safetensors"))) == 3
    # As loaded, before LLM packs the bf16 experts for oneDNN (opaque: no rows to compare)
    model = load_model(str(bf16_sharded_moge_dir), torch.bfloat16, torch.device("cpu"), load_tokenizer=False).model
    sd = random_state_dict(tiny_moge_config, dtype=torch.bfloat16)
    inter = tiny_moge_config["moe_intermediate_size"]
    for layer, block in enumerate(model.moe_layers()):
        p = f"model.layers.{layer}.mlp."
        assert block.experts.w13.dtype == torch.bfloat16
        for e in (0, 9, 63):
            w13 = block.experts.w13[e]
            assert torch.equal(w13[:inter], sd[f"{p}experts.{e}.gate_proj.weight"])
            assert torch.equal(w13[inter:], sd[f"{p}experts.{e}.up_proj.weight"])
            assert torch.equal(block.experts.w2[e], sd[f"{p}experts.{e}.down_proj.weight"])
        assert torch.equal(block.router_scale, sd[p + "router_scale"])


def test_bf16_greedy_generation_matches_the_bf16_specification(bf16_sharded_moge_dir: Path, tiny_moge_config: dict):
    llm = LLM(str(bf16_sharded_moge_dir), dtype="bfloat16", device="cpu", kv_cache_memory=KV_BYTES, enforce_eager=True)
    sd = random_state_dict(tiny_moge_config, dtype=torch.bfloat16)
    prompt = [1, 250, 31, 7, 640]
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )[0]
    assert out.outputs[0].token_ids == reference_greedy(sd, tiny_moge_config, prompt, 20)


# ---------------------------------------------------------------------------------------------
# The router


def test_moge_picks_exactly_one_expert_per_group():
    logits = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    ids, _ = moge_route(logits, NUM_GROUPS)
    assert ids.shape == (50, NUM_GROUPS) and ids.dtype == torch.long
    assert torch.equal(ids // 8, torch.arange(NUM_GROUPS).expand(50, -1))


def test_moge_weights_are_raw_global_probabilities_of_the_best_expert_per_group():
    logits = torch.randn(20, 64, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    ids, weights = moge_route(logits, NUM_GROUPS)
    probs = torch.softmax(logits.float(), dim=-1)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, probs.gather(1, ids))  # no renormalisation over the chosen 8
    assert torch.equal(weights, probs.view(20, NUM_GROUPS, 8).amax(-1))
    assert (weights.sum(-1) < 1).all()


def test_moge_router_ties_go_to_the_lowest_expert_index():
    logits = torch.zeros(3, 64)
    logits[1, [3, 5]] = 2.0  # a tie inside group 0
    logits[1, [62, 63]] = 1.0  # a tie inside group 7
    ids, weights = moge_route(logits, NUM_GROUPS)
    first = torch.arange(0, 64, 8)
    assert torch.equal(ids[0], first) and torch.equal(ids[2], first)
    assert ids[1].tolist() == [3, 8, 16, 24, 32, 40, 48, 62]
    assert torch.allclose(weights[0], torch.full((NUM_GROUPS,), 1 / 64))


def test_moge_block_sends_tied_tokens_to_the_first_expert_of_each_group():
    block = random_moge_block()
    with torch.no_grad():
        block.gate.weight.zero_()  # every router logit 0: a 64-way tie
    block(torch.randn(6, 64))
    expected = torch.zeros(64, dtype=torch.long)
    expected[::8] = 6
    assert torch.equal(block.load.moge_counts, expected)


def test_moge_block_weights_each_expert_by_probability_times_router_scale():
    block = random_moge_block(seed=3)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    ids, probs = _routes(block, x)
    e = int(ids[:, 2].mode().values)  # an expert of group 2 that receives tokens
    with torch.no_grad():
        keep_w13, keep_w2 = block.experts.w13[e].clone(), block.experts.w2[e].clone()
        block.experts.w13.zero_()
        block.experts.w2.zero_()
        block.experts.w13[e], block.experts.w2[e] = keep_w13, keep_w2
        block.shared_expert.down_proj.weight.zero_()
        out = block(x)
        routed = (ids == e).any(-1)
        weight = probs[:, 2] * block.router_scale[0, e]
        want = weight[:, None] * block.experts.expert(e, x)
    assert 0 < routed.sum() < len(x)
    torch.testing.assert_close(out[routed], want[routed])
    assert (out[~routed] == 0).all()


def test_changing_one_expert_changes_only_the_tokens_routed_to_it():
    block = random_moge_block(seed=5)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
    ids, _ = _routes(block, x)
    e = int(ids[:, 5].mode().values)
    routed = (ids == e).any(-1)
    assert 0 < routed.sum() < len(x)
    with torch.no_grad():
        before = block(x)
        block.experts.w13[e] += 0.5
        block.experts.w2[e] *= -2.0
        after = block(x)
    assert torch.equal(after[~routed], before[~routed])
    assert ((after[routed] - before[routed]).abs().amax(-1) > 1e-3).all()


# ---------------------------------------------------------------------------------------------
# Cached generation


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 8], ids=["whole-prefill", "chunked-prefill"])
def test_cached_batched_generation_equals_full_forward_argmax(
    tiny_moge_dir: Path, moge_llm: LLM, max_num_batched_tokens: int
):
    llm = LLM(
        str(tiny_moge_dir),
        dtype="float32",
        device="cpu",
        kv_cache_memory=KV_BYTES,
        block_size=4,
        max_num_batched_tokens=max_num_batched_tokens,
        enforce_eager=True,
    )
    prompts = [[1, 44], [1, 300, 12, 7, 95, 640, 2, 18, 77], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(moge_llm.logits(ids)[-1].argmax()))
        assert out.outputs[0].token_ids == ids[len(prompt) :]


# ---------------------------------------------------------------------------------------------
# The real 72B config and config errors


def test_real_72b_config_builds_on_meta_with_the_papers_parameter_counts():
    cfg = ModelConfig.from_file(REAL_72B_CONFIG)
    model = build_model_on_meta(cfg)
    assert (cfg.num_experts, cfg.num_expert_groups, cfg.experts_per_group) == (64, 8, 8)
    assert all(p.is_meta for p in model.parameters())
    assert round(count_parameters(model) / 1e9, 2) == 71.99
    assert round(count_active_parameters(model) / 1e9, 2) == 16.50
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 192 * 1024


def test_groups_that_do_not_divide_the_experts_are_rejected_naming_both_fields():
    with pytest.raises(ConfigError, match=r"num_experts=64.*num_expert_groups=3"):
        ModelConfig.from_hf_dict(pangu_moge_config(vocab_size=128, num_expert_groups=3, num_experts_per_tok=3))


def test_experts_per_token_other_than_one_per_group_is_rejected_naming_both_fields():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=4.*num_expert_groups=8"):
        ModelConfig.from_hf_dict(pangu_moge_config(vocab_size=128, num_experts_per_tok=4))


@pytest.mark.parametrize("field", ["num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"])
@pytest.mark.parametrize("value", [0, -8])
def test_moe_sizes_that_are_not_positive_are_named(field, value):
    """num_experts 0 passed the groups check (0 divides into 8 groups)."""
    with pytest.raises(ConfigError, match=rf"config field {field}={value} must be positive"):
        ModelConfig.from_hf_dict(pangu_moge_config(vocab_size=128, **{field: value}))


@pytest.mark.parametrize("experts", [1_000_000, 56])
def test_experts_not_the_checkpoints_are_refused_naming_num_experts(tmp_path: Path, tiny_moge_config: dict, experts: int):
    """num_experts against the checkpoint's mlp.experts.E names (headers only), before the memory
    check: a million experts on a 64-expert checkpoint was reported as a 46 GiB shortage."""
    from pangu_infer.errors import WeightError
    from pangu_infer.loader import load_serving_model

    c = tiny_moge_config
    write_checkpoint(str(tmp_path), dict(c, num_experts=experts), random_state_dict(c, seed=0))
    message = rf"config field num_experts={experts} does not match the checkpoint: .* holds 64 routed experts"
    with pytest.raises(WeightError, match=message):
        load_serving_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False)
    with pytest.raises(WeightError, match=message):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False)


# ---------------------------------------------------------------------------------------------
# Load statistics


def test_moe_stats_show_zero_imbalance_for_moge_and_positive_for_global_top8(moge_llm: LLM):
    prompts = [{"prompt_token_ids": [1] + [(37 * i + j) % 900 + 3 for j in range(15)]} for i in range(4)]
    moge_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    stats = moge_llm.moe_stats()
    assert (stats["num_experts"], stats["num_groups"]) == (64, 8)
    assert stats["imbalance_score"] == {d: 0.0 for d in IMBALANCE_DEVICES}
    top8 = stats["global_topk_imbalance_score"]
    assert top8[1] == 0.0  # one device holds every expert
    assert all(top8[d] > 0 for d in (2, 4, 8))
    for layer in stats["layers"]:
        assert layer["tokens"] > 0
        assert layer["group_tokens"] == [layer["tokens"]] * NUM_GROUPS
        assert sum(layer["expert_tokens"]) == sum(layer["global_topk_expert_tokens"]) == 8 * layer["tokens"]


def test_load_statistics_match_a_per_step_count_across_folds():
    block = random_moge_block(seed=7)
    g = torch.Generator().manual_seed(8)
    steps = [torch.randn(int(torch.randint(1, 6, (1,), generator=g)), 64, generator=g) for _ in range(150)]
    moge_counts = torch.zeros(64, dtype=torch.long)
    topk_is = {d: 0.0 for d in IMBALANCE_DEVICES}
    with torch.no_grad():
        for x in steps:
            block(x)
            logits = block.gate(x)
            moge_counts += torch.bincount(moge_route(logits, NUM_GROUPS)[0].flatten(), minlength=64)
            top8 = torch.bincount(torch.softmax(logits, -1).topk(8).indices.flatten(), minlength=64)
            for d in IMBALANCE_DEVICES:
                per_device = top8.view(d, -1).sum(-1)
                topk_is[d] += float(per_device.max() - per_device.min()) / len(x) / len(steps)
    stats = block.load.as_dict(NUM_GROUPS)
    assert stats["steps"] == 150 and stats["tokens"] == sum(len(x) for x in steps)
    assert stats["expert_tokens"] == moge_counts.tolist()
    assert stats["imbalance_score"] == {d: 0.0 for d in IMBALANCE_DEVICES}
    assert stats["global_topk_imbalance_score"] == pytest.approx(topk_is)


def test_one_token_reads_only_its_experts_and_equals_the_batched_dispatch():
    """Decode at batch 1 takes the one-token path: the token's 8 experts, each called once, and the
    same output as the sorted/scattered path gives for that token inside a batch."""
    block = random_moge_block(seed=7)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        batched = block(x)  # 5 tokens: argsort, one product per expert, one scatter
        ids, _ = _routes(block, x[2:3])
        calls = []
        gate_up, down = block.experts.gate_up, block.experts.down
        block.experts.gate_up = lambda e, t: calls.append(e) or gate_up(e, t)
        block.experts.down = lambda e, t: calls.append(e) or down(e, t)
        single = block(x[2:3])
    assert calls == 2 * sorted(ids[0].tolist())  # ascending ids, gate/up products then down ones
    torch.testing.assert_close(single[0], batched[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "bf16-packed", "int8"])
def test_one_token_with_batched_activation_equals_the_expert_loop_bit_for_bit(kind, monkeypatch):
    """_one_token runs the activation, weighting and conversion once over the 8 experts' rows
    (plain, oneDNN-packed and int8 experts): the same bits as calling expert() one by one."""
    from pangu_infer.models.moge import StackedExperts
    from pangu_infer.models.packed import can_pack, pack_linears
    from pangu_infer.quant.formats import QuantizationConfig, quantize
    from pangu_infer.quant.modules import PackedWeight, QuantizedExperts

    block = random_moge_block(seed=11)
    if kind != "fp32":
        block = block.to(torch.bfloat16)
    if kind == "bf16-packed":
        if not can_pack(torch.device("cpu"), torch.bfloat16):
            pytest.skip("this CPU's oneDNN has no bf16 linear")
        pack_linears(block)
    if kind == "int8":
        config = QuantizationConfig("int8")
        w13 = PackedWeight(quantize(block.experts.w13.detach().float(), config), torch.device("cpu"))
        w2 = PackedWeight(quantize(block.experts.w2.detach().float(), config), torch.device("cpu"))
        block.experts.impl = QuantizedExperts(w13, w2, block.experts.inter)
    assert block.experts.split_products
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        xs = [(torch.randn(1, 64, generator=g) * 4).to(block.gate.weight.dtype if hasattr(block.gate, "weight") else torch.bfloat16) for _ in range(8)]
        # slots in a shuffled order, as a top-k router gives them (MoGE's come in ascending id)
        routes = [(ids.flatten()[p], w.flatten()[p]) for x in xs for ids, w, p in [(*_routes(block, x), torch.randperm(8, generator=g))]]
        got = [block._one_token(x, ids.flatten(), w.to(x.dtype).flatten()) for x, (ids, w) in zip(xs, routes)]
        monkeypatch.setattr(StackedExperts, "split_products", property(lambda self: False))
        want = [block._one_token(x, ids.flatten(), w.to(x.dtype).flatten()) for x, (ids, w) in zip(xs, routes)]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bf16_experts_are_packed_for_onednn_and_give_the_same_products():
    from pangu_infer.models.packed import PackedExperts, can_pack, pack_linears

    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16 linear")
    block = random_moge_block(seed=9).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.stack([block.experts.expert(e, x) for e in range(0, 64, 9)])
        pack_linears(block)
        assert isinstance(block.experts.impl, PackedExperts) and not hasattr(block.experts, "w13")
        got = torch.stack([block.experts.expert(e, x) for e in range(0, 64, 9)])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
