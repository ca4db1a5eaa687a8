"""Pangu 7B dense / Llama: parity with transformers, weight loading, config errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pangu_infer import LLM, SamplingParams
from pangu_infer.config import ConfigError, ModelConfig
from pangu_infer.loader import ModelNotFoundError, WeightError, load_model
from pangu_infer.loader.random import pangu_dense_config, random_state_dict, transformers_llama, write_checkpoint
from pangu_infer.models.registry import build_model_on_meta, count_parameters
from fixtures_models import build_tiny_model

RELEASE_MODELS = Path(__file__).resolve().parent / "data" / "models"
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 90)), [1, 999, 3], list(range(2, 130))]


@pytest.fixture(scope="module")
def dense_llm(tiny_dense_dir):
    return LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def dense_reference(tiny_dense_config):
    return transformers_llama(tiny_dense_config, random_state_dict(tiny_dense_config))


def test_dense_logits_match_transformers_llama_with_biases(dense_llm, dense_reference):
    for ids in PROMPTS:
        ours = dense_llm.logits(ids)
        with torch.no_grad():
            ref = dense_reference(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-4


def test_cached_decoding_equals_argmax_of_full_forwards(dense_llm):
    outs = dense_llm.generate(
        [{"prompt_token_ids": ids} for ids in PROMPTS],
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        use_tqdm=False,
    )
    for ids, out in zip(PROMPTS, outs):
        seq = list(ids)
        for _ in range(10):
            seq.append(int(dense_llm.logits(seq)[-1].argmax()))
        assert out.outputs[0].token_ids == seq[len(ids) :]
        assert out.outputs[0].finish_reason == "length"


def _greedy(reference, ids: list[int], steps: int):
    """transformers' greedy continuation and its per-step logits (eos never ends or is suppressed)."""
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits)


def _confident(reference, ids: list[int], steps: int, margin: float) -> bool:
    """True when the fp32 greedy path never has a near-tie: two correct bf16 implementations may
    legitimately pick different tokens at a tie closer than bf16 rounding (about 0.04 here)."""
    _, logits = _greedy(reference, ids, steps)
    top2 = logits.float().topk(2, dim=-1).values
    return bool(((top2[:, 0] - top2[:, 1]) >= margin).all())


def test_bf16_greedy_continuations_match_transformers_for_20_tokens(tmp_path, tiny_dense_config, pangu_tokenizer_dir):
    # A random model predicts nearly uniformly; bias the head towards a fixed successor of the
    # current token (as trained models are peaked) so greedy paths have real margins.
    state = random_state_dict(tiny_dense_config, seed=3)
    perm = torch.randperm(tiny_dense_config["vocab_size"], generator=torch.Generator().manual_seed(0))
    state["lm_head.weight"] += 0.3 * state["model.embed_tokens.weight"][perm]
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    write_checkpoint(str(tmp_path), tiny_dense_config, state)
    for f in pangu_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True)
    ref = transformers_llama(tiny_dense_config, state, torch.bfloat16)
    ref32 = transformers_llama(tiny_dense_config, {k: v.float() for k, v in state.items()})
    g = torch.Generator().manual_seed(1)
    candidates = [[1] + torch.randint(3, 900, (n,), generator=g).tolist() for n in (3, 9, 17, 30, 45, 60)]
    prompts = [ids for ids in candidates if _confident(ref32, ids, steps=20, margin=0.15)]
    assert len(prompts) >= 3, "the peaked test model should give several confident greedy paths"
    for ids in prompts:
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == _greedy(ref, ids, 20)[0]


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny_dense_config, pangu_tokenizer_dir, dense_llm):
    build_tiny_model(tmp_path, tiny_dense_config, pangu_tokenizer_dir, num_shards=3)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = LLM(str(tmp_path), dtype="float32", device="cpu", kv_cache_memory=1 << 20, enforce_eager=True)
    assert torch.equal(sharded.logits(PROMPTS[0]), dense_llm.logits(PROMPTS[0]))


def test_real_7b_config_builds_on_meta_with_8_03b_parameters():
    cfg = ModelConfig.from_file(RELEASE_MODELS / "openpangu-embedded-7b" / "config.json")
    model = build_model_on_meta(cfg)
    assert f"{count_parameters(model) / 1e9:.2f}" == "8.03"
    assert cfg.qkv_bias and cfg.o_bias and cfg.head_dim == 128
    index = json.loads((RELEASE_MODELS / "openpangu-embedded-7b" / "model.safetensors.index.json").read_text())
    names = {n for n in index["weight_map"] if not n.endswith("rotary_emb.inv_freq")}
    assert names == set(model.expected_weight_names())
    params = dict(model.named_parameters())
    for name in names:
        target, _ = model.map_weight_name(name)
        assert target in params, name


# ---------------------------------------------------------------------- bad checkpoints


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tmp_path, tiny_dense_dir):
    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    _edit_weights(d, lambda t: t.pop("model.layers.1.self_attn.o_proj.bias"))
    with pytest.raises(WeightError, match=r"missing.*model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)


def test_unexpected_tensor_is_named(tmp_path, tiny_dense_dir):
    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    _edit_weights(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(WeightError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)


def test_wrongly_shaped_tensor_is_named(tmp_path, tiny_dense_dir):
    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    _edit_weights(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(5, 64)))
    with pytest.raises(WeightError, match=r"k_proj\.weight' has shape \(5, 64\), expected \(32, 64\)"):
        load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)


@pytest.mark.parametrize("kind", [torch.int32, torch.bool, torch.uint8])
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_tensor_that_is_not_floating_point_is_named(tmp_path, tiny_dense_dir, kind, quantization):
    """An int32, bool or uint8 weight loaded as its numbers cast to float: a corrupt checkpoint that
    generated, silently."""
    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_weights(d, lambda t: t.__setitem__(name, (t[name] * 10).to(kind)))
    with pytest.raises(WeightError, match=rf"tensor '{re.escape(name)}' has dtype {kind}, expected a floating-point weight"):
        load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False, quantization=quantization)


def _never_built(cfg):
    raise AssertionError(f"a model of {cfg.num_hidden_layers} layers was built")


@pytest.mark.parametrize("layers", [1_000_000, 1, 3])
def test_config_layers_not_the_checkpoints_are_refused_before_building(tmp_path, tiny_dense_dir, monkeypatch, layers):
    """num_hidden_layers against the checkpoint's model.layers.N names (headers only), before the
    model or the memory check's meta model is built: a million layers took minutes and 24 GiB."""
    import pangu_infer.loader as loader
    from pangu_infer.loader import load_serving_model

    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers)))
    monkeypatch.setattr(loader, "build_model_on_meta", _never_built)
    message = rf"config field num_hidden_layers={layers} does not match the checkpoint: .* holds 2 layers \(model\.layers\.0 to model\.layers\.1\)"
    with pytest.raises(WeightError, match=message):
        load_serving_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)  # the memory check first
    with pytest.raises(WeightError, match=message):
        load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)


@pytest.mark.parametrize("change,message", [
    (dict(eos_token_id=["a"]), r"generation_config\.json field eos_token_id=\['a'\] must be a token id or a list of token ids"),
    (dict(bos_token_id="1"), r"generation_config\.json field bos_token_id='1' must be a token id"),
    (dict(temperature=-1), r"generation_config\.json field temperature=-1 is out of range: expected a finite number >= 0"),
    (dict(top_p=float("nan")), r"generation_config\.json field top_p=nan is out of range"),
    (dict(temperature="0.7"), r"generation_config\.json field temperature='0\.7' must be a number"),
    (dict(top_k=2.5), r"generation_config\.json field top_k=2\.5 must be an integer"),
    (dict(do_sample="no"), r"generation_config\.json field do_sample='no' must be true or false"),
])
def test_bad_generation_config_values_are_named_as_the_model_loads(tmp_path, tiny_dense_dir, change, message):
    """The model's generation_config.json: an ill-typed eos was skipped (or a TypeError), one
    outside the vocabulary ended nothing, an ill-typed sampling value was dropped, an out-of-range
    one failed every request that omitted it, naming a field the request never gave. Its sampling
    values are the defaults LLM uses: with generation_config 'vllm' (none of them) the model loads."""
    from pangu_infer import LLM

    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(dict(gen, **change)))
    kwargs = dict(dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    with pytest.raises(ValueError, match=message) as info:
        LLM(str(d), **kwargs)
    if "token_id" in str(change):  # the eos ends sequences whatever the sampling defaults
        with pytest.raises(ValueError, match=message):
            load_model(str(d), torch.float32, torch.device("cpu"), load_tokenizer=False)
    else:
        assert "--generation-config vllm" in str(info.value)
        llm = LLM(str(d), generation_config="vllm", **kwargs)
        assert llm.default_sampling_params().temperature == 1.0


def test_missing_shard_is_named(tmp_path, tiny_dense_config):
    build_tiny_model(tmp_path, tiny_dense_config, num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False)


@pytest.mark.parametrize("weight_map", [[], {"model.norm.weight": 5}, "x"])
def test_an_index_whose_weight_map_is_not_names_to_files_is_named(tmp_path, tiny_dense_config, weight_map):
    """A list was an AttributeError ('list' object has no attribute 'values'), a number for a file a
    TypeError from os.path.join: tracebacks."""
    build_tiny_model(tmp_path, tiny_dense_config, num_shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightError, match=r"model\.safetensors\.index\.json is not a valid safetensors index \(weight_map must map"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False)


def test_folder_without_weights_is_an_error(tmp_path, tiny_dense_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_dense_config))
    with pytest.raises(WeightError, match="no safetensors weights"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), load_tokenizer=False)


def test_nonexistent_model_path_is_named():
    with pytest.raises(ModelNotFoundError, match="no-such-dir"):
        load_model("./no-such-dir", torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------------- config


def _cfg(**changes) -> dict:
    d = pangu_dense_config(vocab_size=100)
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def test_unknown_architecture_is_named():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_dict(_cfg(architectures=["GPT2LMHeadModel"], model_type="gpt2"))


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(_cfg(hidden_size=None))


def test_hidden_not_divisible_by_heads_is_rejected():
    with pytest.raises(ConfigError, match=r"hidden_size=66.*num_attention_heads=4"):
        ModelConfig.from_hf_dict(_cfg(hidden_size=66))


def test_heads_not_divisible_by_kv_heads_is_rejected():
    with pytest.raises(ConfigError, match=r"num_key_value_heads=3.*num_attention_heads=4"):
        ModelConfig.from_hf_dict(_cfg(num_key_value_heads=3))


def test_unsupported_rope_scaling_is_rejected():
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf_dict(_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("change,message", [
    (dict(rms_norm_eps=-1), r"config field rms_norm_eps=-1\.0 must be a finite positive number"),
    (dict(rms_norm_eps=float("nan")), r"config field rms_norm_eps=nan must be a finite positive number"),
    (dict(rms_norm_eps=0), r"config field rms_norm_eps=0\.0 must be a finite positive number"),
    (dict(rope_theta=float("inf")), r"config field rope_theta=inf must be a finite positive number"),
    (dict(rope_theta=-10000.0), r"config field rope_theta=-10000\.0 must be a finite positive number"),
    (dict(rope_scaling={"rope_type": "linear", "factor": float("nan")}), r"rope_scaling\.factor=nan must be a positive number"),
    (dict(rope_scaling=dict(_LLAMA3, low_freq_factor=-1.0)), r"rope_scaling\.low_freq_factor=-1\.0 must be a positive number"),
    (dict(rope_scaling=dict(_LLAMA3, high_freq_factor=1.0)), r"rope_scaling\.high_freq_factor=1\.0 must exceed low_freq_factor=1\.0"),
])
def test_negative_zero_or_non_finite_numbers_are_named(change, message):
    """A negative or NaN epsilon loaded and gave NaN logits; the others NaN or inf frequencies."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(_cfg(**change))


@pytest.mark.parametrize("change,message", [
    (dict(eos_token_id=["a"]), r"config field eos_token_id=\['a'\] must be a token id or a list of token ids"),
    (dict(eos_token_id="2"), r"config field eos_token_id='2' must be a token id or a list of token ids"),
    (dict(eos_token_id=True), r"config field eos_token_id=True must be a token id"),
    (dict(bos_token_id=1.0), r"config field bos_token_id=1\.0 must be a token id \(an integer\)"),
    (dict(pad_token_id="x"), r"config field pad_token_id='x' must be a token id \(an integer\)"),
])
def test_token_ids_that_are_not_ids_of_the_vocabulary_are_named(change, message):
    """eos_token_id ["a"] was a TypeError in the engine's sort; 10**9 loaded and never ended anything."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(_cfg(**change))


def test_token_ids_outside_the_vocabulary_load_with_one_warning_each_and_are_read_as_none(caplog, monkeypatch):
    """transformers loads such a config (its generate never meets that eos) and llama.cpp warns of a
    GGUF's and goes on: an eos no token can be ends nothing, and the model still runs (it was
    refused). One warning per id, however often the config is read."""
    import pangu_infer.config as config_module

    monkeypatch.setattr(config_module, "_warned", set())
    with caplog.at_level("WARNING"):
        for _ in range(2):
            cfg = ModelConfig.from_hf_dict(_cfg(eos_token_id=[2, 100, 1_000_000_000], bos_token_id=-3))
    assert (cfg.eos_token_ids, cfg.bos_token_id) == ([2], None)
    assert [r.getMessage() for r in caplog.records] == [
        "config field eos_token_id=100 is outside the vocabulary (vocab_size=100): ignored (no token of the model can be it)",
        "config field eos_token_id=1000000000 is outside the vocabulary (vocab_size=100): ignored (no token of the model can be it)",
        "config field bos_token_id=-3 is outside the vocabulary (vocab_size=100): ignored",
    ]
    assert ModelConfig.from_hf_dict(_cfg(eos_token_id=100)).eos_token_ids == []


def test_a_generation_config_eos_outside_the_vocabulary_loads_and_ends_nothing(tmp_path, tiny_dense_dir, caplog):
    from pangu_infer import LLM, SamplingParams

    d = _copy_model(tiny_dense_dir, tmp_path / "m")
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[gen["eos_token_id"], 1_000_000_000])))
    with caplog.at_level("WARNING"):
        llm = LLM(str(d), dtype="float32", kv_cache_memory=8 << 20, enforce_eager=True)
    assert [r.getMessage() for r in caplog.records if "1000000000" in r.getMessage()] == [
        f"{d / 'generation_config.json'} field eos_token_id=1000000000 is outside the vocabulary "
        f"(vocab_size={llm.config.vocab_size}): ignored (no token of the model can be it)"
    ]
    assert llm.engine.eos_token_ids == {gen["eos_token_id"]}
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, min_tokens=1, temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_token_ids_are_read():
    cfg = ModelConfig.from_hf_dict(_cfg(eos_token_id=[2, 99], bos_token_id=0, pad_token_id=-1))
    assert (cfg.eos_token_ids, cfg.bos_token_id, cfg.pad_token_id) == ([2, 99], 0, None)  # -1: older Llama ports' "none"
    # a pad token added to the tokenizer past the embedding (the engine uses no pad id): loads
    cfg = ModelConfig.from_hf_dict(_cfg(pad_token_id=cfg.vocab_size))
    assert cfg.pad_token_id is None
    for d in (json.loads((RELEASE_MODELS / name / "config.json").read_text()) for name in ("openpangu-embedded-7b", "pangu-pro-moe-72b")):
        assert ModelConfig.from_hf_dict(d).eos_token_ids == [45892]


@pytest.mark.parametrize("field", ["tie_word_embeddings", "bias", "mlp_bias"])
@pytest.mark.parametrize("value", ["yes", "false", 1, 0])
def test_boolean_fields_must_be_true_or_false(field, value):
    """tie_word_embeddings "yes" (and "false") loaded as true through bool()."""
    with pytest.raises(ConfigError, match=rf"config field {field}={value!r} must be true or false"):
        ModelConfig.from_hf_dict(_cfg(**{field: value}))
    llama = dict(_cfg(architectures=["LlamaForCausalLM"], model_type="llama", bias=None), attention_bias=value)
    with pytest.raises(ConfigError, match=rf"config field attention_bias={value!r} must be true or false"):
        ModelConfig.from_hf_dict(llama)


@pytest.mark.parametrize("change,message", [
    (dict(intermediate_size=0), r"config field intermediate_size=0 must be positive"),
    (dict(intermediate_size=-128), r"config field intermediate_size=-128 must be positive"),
    (dict(head_dim=-4), r"config field head_dim=-4 must be positive"),
])
def test_sizes_that_are_not_positive_are_named(change, message):
    """intermediate_size 0 was a WeightError about a tensor's shape; head_dim -4 built a model."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(_cfg(**change))


@pytest.mark.parametrize("act", ["gelu", "relu", "junk", 5])
@pytest.mark.parametrize("arch", ["PanguEmbeddedForCausalLM", "LlamaForCausalLM"])
def test_an_activation_other_than_silu_is_refused(arch, act):
    """hidden_act "gelu" loaded and ran SiLU (the MLP's only activation): another model's outputs,
    silently. transformers' "swish" is SiLU too; the top-k family's configs already refused it."""
    with pytest.raises(ConfigError, match=rf"config field hidden_act={act!r}: only silu is supported"):
        ModelConfig.from_hf_dict(_cfg(architectures=[arch], hidden_act=act))
    for same in ("silu", "swish", None):
        ModelConfig.from_hf_dict(_cfg(architectures=[arch], hidden_act=same))


@pytest.mark.parametrize("change", [dict(hidden_size=10**12), dict(intermediate_size=10**19)])
def test_sizes_past_any_tensor_are_named_not_torchs_overflow(change):
    """hidden_size 10**12 (a [2e12, 1e12] projection) was torch's RuntimeError "Storage size
    calculation overflowed" from the build on meta that sizes the weights (LLM() and plan alike),
    where a size short of that overflow is the memory check's clear refusal."""
    (field, value), = change.items()
    with pytest.raises(ConfigError, match=rf"too large for any tensor.*{field}={value}"):
        build_model_on_meta(ModelConfig.from_hf_dict(_cfg(**change)))


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_torch_dtype_must_be_a_torch_dtype(key):
    """torch_dtype "float99" loaded silently (plan reads it as the checkpoint's dtype)."""
    with pytest.raises(ConfigError, match=rf"config field {key}='float99' is not a torch dtype"):
        ModelConfig.from_hf_dict(_cfg(**{"torch_dtype": None, key: "float99"}))
    for value, read in (("torch.bfloat16", "bfloat16"), ("float16", "float16"), ("auto", "auto")):
        assert ModelConfig.from_hf_dict(_cfg(**{"torch_dtype": None, key: value})).torch_dtype == read


def test_llama_fields_are_read():
    d = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32, "attention_bias": False,
        "mlp_bias": True, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.head_dim, cfg.qkv_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (32, False, True, True)
    assert cfg.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pangu_infer.models.layers import rope_inv_freq

    d = _cfg(rope_scaling=scaling, rope_theta=10000.0)
    ours = rope_inv_freq(ModelConfig.from_hf_dict(d))
    hc = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0, rope_scaling=dict(scaling), max_position_embeddings=2048)
    ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hc, "cpu")
    assert torch.allclose(ours, ref.float(), rtol=1e-5)


def test_prompt_logprobs_match_transformers_through_chunks_prefix_cache_and_n(tiny_dense_dir, dense_reference):
    """Prompt logprobs (vLLM's prompt_logprobs) of prompts cut into chunks of 16 tokens, with a
    prefix already cached and n=2, equal the log_softmax of transformers' logits."""
    llm = LLM(str(tiny_dense_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20, enforce_eager=True, max_num_batched_tokens=16)
    long = PROMPTS[3]
    llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=1), use_tqdm=False)  # now cached
    prompts = [{"prompt_token_ids": ids} for ids in (long, PROMPTS[1], PROMPTS[0])]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, n=2, temperature=0, prompt_logprobs=3), use_tqdm=False)
    for ids, out in zip((long, PROMPTS[1], PROMPTS[0]), outs):
        with torch.no_grad():
            ref = dense_reference(torch.tensor([ids])).logits[0].log_softmax(-1)
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        assert [e.token_id for e in lps[1:]] == ids[1:]
        got = torch.tensor([e.logprob for e in lps[1:]])
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert (got - want).abs().max().item() <= 1e-4
        top_values, top_ids = ref[:-1].topk(3, dim=-1)
        assert [[t for t, _ in e.top] for e in lps[1:]] == top_ids.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in e.top] for e in lps[1:]]), top_values, atol=1e-4)
    assert outs[0].metrics["num_cached_tokens"] == 0  # scoring the prompt computes it whole
    plain = llm.generate({"prompt_token_ids": long}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.metrics["num_cached_tokens"] > 0
