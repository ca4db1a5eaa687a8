"""GGUF loading: config, dequantized HF tensors (Q/K un-permuted where llama.cpp permutes), tokenizer."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fixtures_gguf import PANGU_SPECIAL_PIECES, write_gguf
from pangu_infer.config import ModelConfig
from pangu_infer.loader.gguf import GGUFError, build_gguf_tokenizer, llama3_rope_scaling, read_gguf

TEXTS = [
    "Hello world! How are you?",
    "def f(x):\n    return x**2  # square",
    "I love 🦙 and 😀, café déjà vu.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces  and\ttabs, trailing  ",
    "Chinese 中文 and numbers 3.14159 and 2024",
]


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    return read_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2_pass(smollm2):
    """One pass over all tensors: every shape and dtype, and the tensors the tests compare."""
    shapes, kept = {}, {}
    for name, t in smollm2.tensors():
        assert t.dtype == torch.float32, name
        shapes[name] = tuple(t.shape)
        if ".q_proj." in name or ".k_proj." in name or "embed" in name:
            kept[name] = t
    return shapes, kept


# ------------------------------------------------------------------------------- SmolLM2 (real)


def test_smollm2_config_is_the_published_one(smollm2):
    c = smollm2.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (9, 3)
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"] is True
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert c["attention_bias"] is False and "rope_scaling" not in c
    cfg = ModelConfig.from_hf_dict(c)
    assert cfg.head_dim == 64 and cfg.tie_word_embeddings


def test_smollm2_every_tensor_dequantizes_to_its_hf_shape(smollm2, smollm2_pass):
    c = smollm2.config
    h, i, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_key_value_heads"] * 64
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }  # fmt: skip
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    expected |= {f"model.layers.{n}.{k}": s for n in range(30) for k, s in per_layer.items()}
    shapes, _ = smollm2_pass
    assert shapes == expected
    assert smollm2.tensor_names() == list(shapes)


def test_smollm2_tensors_equal_transformers_gguf_code(smollm2, smollm2_pass):
    """transformers' GGUF code, independent of ours: its torch dequantizer (integrations/gguf) and
    the Q/K un-permute of its GGUF loader (LlamaTensorProcessor). Its end-to-end entry point,
    from_pretrained(gguf_file=...), wants `accelerate`, which this environment does not have."""
    from transformers.integrations.gguf.dequant import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    gguf_names = {hf: g for g, hf in smollm2.hf_names.items()}
    raw = {t.name: t for t in smollm2.reader.tensors}
    _, kept = smollm2_pass
    assert len(kept) == 2 * 30 + 1  # every q/k (Q4_1), the embedding (Q8_0)
    for name, t in kept.items():
        r = raw[gguf_names[name]]
        values = dequantize(torch.from_numpy(np.array(r.data)).flatten(), int(r.tensor_type)).reshape(t.shape)
        ref = processor.process(weights=values.numpy(), name=r.name).weights
        assert torch.equal(t, torch.from_numpy(np.ascontiguousarray(ref))), name


def _rope_pairs(x: torch.Tensor, pos: int, theta: float, interleaved: bool) -> torch.Tensor:
    """RoPE on [heads, head_dim]: llama.cpp NORM pairs (2j, 2j+1); HF rotate-half pairs (j, j + d/2)."""
    d = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten(-2) if interleaved else torch.cat([ra, rb], -1)


def test_smollm2_unpermuted_qk_give_llama_cpp_attention_scores(smollm2, smollm2_pass):
    """llama.cpp ropes the GGUF rows as adjacent pairs; HF ropes our rows rotate-half: same q.k."""
    from gguf.quants import dequantize

    raw = {t.name: t for t in smollm2.reader.tensors}
    theta, x = smollm2.config["rope_theta"], torch.randn(576, dtype=torch.float64)
    gguf_q = torch.from_numpy(dequantize(raw["blk.3.attn_q.weight"].data, raw["blk.3.attn_q.weight"].tensor_type))
    gguf_k = torch.from_numpy(dequantize(raw["blk.3.attn_k.weight"].data, raw["blk.3.attn_k.weight"].tensor_type))
    hf_q = smollm2_pass[1]["model.layers.3.self_attn.q_proj.weight"]
    hf_k = smollm2_pass[1]["model.layers.3.self_attn.k_proj.weight"]
    assert not torch.equal(gguf_q, hf_q)  # the file really is permuted

    def scores(wq, wk, interleaved):
        q = (wq.double() @ x).reshape(9, 64)[::3]  # GQA: query heads 0, 3, 6 use kv heads 0, 1, 2
        k = (wk.double() @ x).reshape(3, 64)
        return (_rope_pairs(q, 7, theta, interleaved) * _rope_pairs(k, 2, theta, interleaved)).sum(-1)

    torch.testing.assert_close(scores(hf_q, hf_k, False), scores(gguf_q, gguf_k, True))


def test_smollm2_tokenizer_encodes_like_transformers(smollm2_gguf_path, smollm2):
    """transformers' GGUF tokenizer builder, which AutoTokenizer.from_pretrained(gguf_file=...) runs
    (called directly: the AutoTokenizer wrapper parses the whole file a second time for a config)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, spec, _ = get_gguf_tokenizer(str(smollm2_gguf_path))
    ref, _ = convert_gguf_tokenizer(arch, spec)
    tok = build_gguf_tokenizer(smollm2.tokenizer_spec)
    for text in TEXTS:
        assert tok.tokenizer.encode(text).ids == ref.encode(text, add_special_tokens=False).ids, text
    ids = tok.tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids == [1, 4093, 198, 6004, 2]
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_smollm2_tokenizer_splits_digits_first_like_llama_cpp_smollm(smollm2):
    """tokenizer.ggml.pre "smollm": llama.cpp splits on \\p{N} before the GPT-2 regex (as SmolLM2's
    own tokenizer.json does with Digits(individual_digits)). transformers ignores the pre type, so
    for whitespace before a digit it differs: "\\n\\n" stays one token (1116 = "ĊĊ") here."""
    tok = build_gguf_tokenizer(smollm2.tokenizer_spec).tokenizer
    assert tok.encode("Hello world! 123").ids == [19556, 905, 17, 216, 33, 34, 35]
    assert tok.encode("tabs\n\n123").ids == tok.encode("tabs\n\n").ids + [33, 34, 35]
    assert tok.token_to_id("ĊĊ") == 1116 and 1116 in tok.encode("tabs\n\n1").ids


def test_smollm2_tokenizer_spec(smollm2):
    spec = smollm2.tokenizer_spec
    assert (spec["model"], spec["pre"]) == ("gpt2", "smollm")
    assert spec["add_bos"] is False and spec["add_eos"] is False
    assert spec["chat_template"].startswith("{% for message in messages %}")
    tok = build_gguf_tokenizer(spec)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.special_token_ids == set(range(17))  # <|endoftext|> ... <empty_output>
    assert tok.tokenizer.get_vocab_size() == 49152


# ------------------------------------------------------------------------------- tiny Pangu files


def test_tiny_pangu_f32_round_trip_is_exact(tiny_pangu_gguf):
    """pangu-embedded: the converter writes Q/K as they are (no permute), so nothing is undone."""
    ckpt = read_gguf(tiny_pangu_gguf.path)
    got = dict(ckpt.tensors())
    assert set(got) == set(tiny_pangu_gguf.tensors)
    for name, t in tiny_pangu_gguf.tensors.items():
        assert torch.equal(got[name], t), name


def test_tiny_llama_with_biases_undoes_the_qk_permutation(tiny_llama_bias_gguf):
    """llama: the converter permutes Q/K weights and biases; reading undoes both, exactly."""
    ckpt = read_gguf(tiny_llama_bias_gguf.path)
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in ckpt.reader.tensors}
    hf = tiny_llama_bias_gguf.tensors
    assert not torch.equal(raw["blk.0.attn_q.bias"], hf["model.layers.0.self_attn.q_proj.bias"])
    assert not torch.equal(raw["blk.1.attn_k.weight"], hf["model.layers.1.self_attn.k_proj.weight"])
    got = dict(ckpt.tensors())
    assert set(got) == set(hf)
    for name, t in hf.items():
        assert torch.equal(got[name], t), name
    assert ckpt.config["attention_bias"] is True and ModelConfig.from_hf_dict(ckpt.config).o_bias


def test_tiny_pangu_q8_0_is_within_quantization_error(tiny_pangu_gguf_q8_0):
    got = dict(read_gguf(tiny_pangu_gguf_q8_0.path).tensors())
    for name, t in tiny_pangu_gguf_q8_0.tensors.items():
        if t.dim() == 1:
            assert torch.equal(got[name], t), name
            continue
        blocks, err = t.reshape(-1, 32), (got[name] - t).reshape(-1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127  # Q8_0: one fp16 scale per 32 values
        assert (err.abs() <= 0.57 * scale).all(), name  # half a step, plus the fp16 scale's rounding
        assert err.abs().max() > 0, name  # it really was quantized


def test_tiny_pangu_config(tiny_pangu_gguf):
    c = read_gguf(tiny_pangu_gguf.path).config
    expected = tiny_pangu_gguf.config
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "tie_word_embeddings", "bias",
                "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"):  # fmt: skip
        assert c[key] == expected[key], key
    assert c["head_dim"] == 16
    cfg = ModelConfig.from_hf_dict(c)
    assert cfg.qkv_bias and cfg.o_bias and not cfg.tie_word_embeddings


def test_tensors_converts_dtype_lazily(tiny_pangu_gguf):
    ckpt = read_gguf(tiny_pangu_gguf.path)
    it = ckpt.tensors(dtype=torch.bfloat16)
    name, t = next(it)
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, tiny_pangu_gguf.tensors[name].bfloat16())


def _sentencepiece_reference(sp, text: str) -> list[int]:
    """The released tokenizer's rule: split on special pieces, SentencePiece-encode each fragment."""
    ids = []
    for frag in re.split(r"(\[unused\d+\])", text):
        if frag in PANGU_SPECIAL_PIECES:
            ids.append(sp.piece_to_id(frag))
        elif frag:
            ids += sp.encode(frag)
    return ids


def test_tiny_pangu_tokenizer_encodes_like_sentencepiece(tiny_pangu_gguf):
    spec = read_gguf(tiny_pangu_gguf.path).tokenizer_spec
    tok = build_gguf_tokenizer(spec)
    sp = tiny_pangu_gguf.vocab.sp
    texts = TEXTS + [
        "[unused9]用户：你好！ How are you?[unused10][unused9]助手：",
        " leading space, then [unused16] thinking [unused17]",
        "[unused9] after special",
        "unknown chars ÆØÅ ß 🦙 fall back to bytes",
        "The quick brown fox jumps over the lazy dog. 我们今天去公园散步。",
    ]
    for text in texts:
        assert tok.tokenizer.encode(text).ids == _sentencepiece_reference(sp, text), text
    assert tok.tokenizer.decode(sp.encode("Hello world, 你好 🦙")) == "Hello world, 你好 🦙"
    assert (spec["model"], spec["add_bos"], spec["add_space_prefix"]) == ("llama", True, True)
    assert tok.eos_token_id == sp.piece_to_id("[unused10]") and tok.bos_token_id == 1
    assert {sp.piece_to_id(p) for p in PANGU_SPECIAL_PIECES} | {0, 1, 2} == tok.special_token_ids


def test_load_gguf_tokenizer_builds_the_project_tokenizer(tiny_pangu_gguf):
    from pangu_infer.loader.gguf import load_gguf_tokenizer
    from pangu_infer.tokenizer import Tokenizer

    tok = load_gguf_tokenizer(read_gguf(tiny_pangu_gguf.path))
    assert isinstance(tok, Tokenizer)
    sp = tiny_pangu_gguf.vocab.sp
    text = "[unused9]用户：hi[unused10]"
    assert tok.encode(text) == [1] + _sentencepiece_reference(sp, text)  # add_bos from the file
    assert tok.eos_token_id == sp.piece_to_id("[unused10]")


# ------------------------------------------------------------------------------- rope scaling


def _llama3_factors(head_dim, theta, factor, low, high, original):
    """What convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors writes as rope_freqs."""
    out = []
    for inv in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / inv
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            s = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, original",
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
        (128, 10000.0, 4.0, 2.0, 8.0, 4096),  # made up: the parameters are fitted, not guessed
    ],
)
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(head_dim, theta, factor, low, high, original):
    factors = torch.from_numpy(_llama3_factors(head_dim, theta, factor, low, high, original)).double()
    rs = llama3_rope_scaling(factors, theta, head_dim)
    assert rs["rope_type"] == "llama3" and rs["factor"] == factor
    again = _llama3_factors(head_dim, theta, rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                            rs["original_max_position_embeddings"])  # fmt: skip
    np.testing.assert_allclose(again, factors.numpy(), rtol=1e-4)
    if (low, high, original) == (1.0, 4.0, 8192):
        got = (rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"])
        assert got == (1.0, 4.0, 8192)


def test_rope_freqs_tensor_becomes_rope_scaling(tmp_path, tiny_llama_bias_gguf):
    t = tiny_llama_bias_gguf
    freqs = _llama3_factors(16, t.config["rope_theta"], 8.0, 1.0, 4.0, 8192)
    path = write_gguf(tmp_path / "rope.gguf", arch="llama", config=t.config, tensors=t.tensors, vocab=t.vocab,
                      extra_tensors={"rope_freqs.weight": freqs})  # fmt: skip
    ckpt = read_gguf(path)
    assert ckpt.config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in ckpt.tensor_names() and len(ckpt.tensor_names()) == len(t.tensors)


# ------------------------------------------------------------------------------- errors


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFError, match=r"model\.gguf is not a GGUF file"):
        read_gguf(path)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path, tiny_pangu_gguf):
    import gguf

    path = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"'qwen2'.*supported: llama, pangu-embedded"):
        read_gguf(path)


def test_missing_metadata_key_is_named(tmp_path, tiny_pangu_gguf):
    t = tiny_pangu_gguf
    path = write_gguf(tmp_path / "m.gguf", arch=t.arch, config=t.config, tensors=t.tensors, vocab=t.vocab,
                      omit_keys=("pangu-embedded.attention.layer_norm_rms_epsilon",))  # fmt: skip
    key = r"'pangu-embedded\.attention\.layer_norm_rms_epsilon'"
    with pytest.raises(GGUFError, match=r"missing GGUF metadata key " + key):
        read_gguf(path)


def test_unknown_tensor_is_named(tmp_path, tiny_pangu_gguf):
    t = tiny_pangu_gguf
    path = write_gguf(tmp_path / "u.gguf", arch=t.arch, config=t.config, tensors=t.tensors, vocab=t.vocab,
                      extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})  # fmt: skip
    with pytest.raises(GGUFError, match=r"unknown tensor 'blk\.0\.attn_q_norm\.weight'"):
        read_gguf(path)


@pytest.mark.parametrize("blocks", [1_000_000, 1, 3])
def test_block_count_not_the_files_blocks_is_named(tmp_path, tiny_pangu_gguf, blocks):
    """block_count against the file's blk.N tensors, in the header: a million blocks were built
    (minutes, tens of GiB) before any tensor was matched."""
    t = tiny_pangu_gguf
    path = write_gguf(tmp_path / "b.gguf", arch=t.arch, config=t.config, tensors=t.tensors, vocab=t.vocab,
                      metadata={f"{t.arch}.block_count": ("uint32", blocks)})  # fmt: skip
    with pytest.raises(GGUFError, match=rf"pangu-embedded\.block_count={blocks} \(num_hidden_layers\) but the file holds "
                                        r"the tensors of 2 blocks \(blk\.0 to blk\.1\)"):
        read_gguf(path)


def test_unknown_bpe_pre_tokenizer_is_named(smollm2):
    spec = dict(smollm2.tokenizer_spec, pre="no-such-pre")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre='no-such-pre'.*smollm"):
        build_gguf_tokenizer(spec)


@pytest.mark.parametrize("key, value, says", [
    ("attention.layer_norm_rms_epsilon", ("float32", -1.0), r"rms_norm_eps=-1\.0 must be a finite positive number"),
    ("rope.freq_base", ("float32", 0.0), r"rope_theta=0\.0 must be a finite positive number"),
    ("feed_forward_length", ("uint32", 0), r"intermediate_size=0 must be positive"),
])
def test_a_bad_metadata_value_names_its_gguf_key(tmp_path, tiny_pangu_gguf, key, value, says):
    """A GGUF file has no config.json: an error about a config field read from its metadata names
    the key it was read from, for LLM as for plan."""
    from pangu_infer.cli import main
    from pangu_infer.loader import load_model

    t = tiny_pangu_gguf
    path = write_gguf(tmp_path / "m.gguf", arch=t.arch, config=t.config, tensors=t.tensors, vocab=t.vocab,
                      metadata={f"{t.arch}.{key}": value})
    message = rf"{says} \(read from the GGUF metadata key pangu-embedded\.{re.escape(key)}\)"
    with pytest.raises(GGUFError, match=message):
        load_model(str(path), torch.float32, torch.device("cpu"), load_tokenizer=False)
    assert main(["plan", "--model", str(path)]) == 2


# ------------------------------------------------------------------- the tokenizer against the model's rows
def _resized(t, rows: int, n_tokens: int, tmp_path, name: str, **metadata):
    """The tiny Pangu GGUF with `rows` embedding and output rows and the tokenizer's first
    `n_tokens` tokens (past its own, pieces as llama.cpp's converter pads them: [PADi], UNUSED)."""
    from dataclasses import replace

    from fixtures_gguf import tiny_pangu_tensors

    n = len(t.vocab.tokens)
    pad = range(n, max(n, n_tokens))
    vocab = replace(t.vocab, tokens=(t.vocab.tokens + [f"[PAD{i}]" for i in pad])[:n_tokens],
                    scores=(t.vocab.scores + [-1000.0 for _ in pad])[:n_tokens],
                    token_types=(t.vocab.token_types + [5 for _ in pad])[:n_tokens])
    config = dict(t.config, vocab_size=rows)
    return write_gguf(tmp_path / name, arch=t.arch, config=config, tensors=tiny_pangu_tensors(config), vocab=vocab,
                      metadata=metadata)


@pytest.mark.parametrize("rows, n_tokens", [(412, 420), (420, 428)])
def test_a_tokenizer_with_more_tokens_than_the_models_rows_is_refused_naming_both(tmp_path, tiny_pangu_gguf, rows, n_tokens):
    """The tokenizer could give ids the embedding has no row for (an IndexError mid-request, or a
    400 for a text prompt); llama.cpp refuses such a file ("tensor 'token_embd.weight' has wrong
    shape")."""
    from pangu_infer import LLM

    path = _resized(tiny_pangu_gguf, rows, n_tokens, tmp_path, "m.gguf")
    says = rf"{re.escape(str(path))}: the tokenizer has {n_tokens} tokens \(tokenizer\.ggml\.tokens\) but the model's vocabulary only {rows}"
    with pytest.raises(GGUFError, match=says):
        read_gguf(path)
    with pytest.raises(ValueError, match=says):
        LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True)
    stated = write_gguf(tmp_path / "s.gguf", arch=tiny_pangu_gguf.arch, config=tiny_pangu_gguf.config, tensors=tiny_pangu_gguf.tensors,
                        vocab=tiny_pangu_gguf.vocab, metadata={"pangu-embedded.vocab_size": ("uint32", 500)})
    with pytest.raises(GGUFError, match=r"s\.gguf: pangu-embedded\.vocab_size=500 but token_embd\.weight has 420 rows"):
        read_gguf(stated)


def test_rows_without_a_piece_load_with_one_warning_and_decode_as_empty_text(tmp_path, tiny_pangu_gguf, caplog):
    """An embedding wider than the tokenizer (8 rows past its 420 tokens): the model loads (one
    warning naming the file and both counts) and a reply that samples those ids is empty text where
    they stand, logprobs and /detokenize included, instead of a failed request."""
    from fastapi.testclient import TestClient

    from pangu_infer import LLM
    from pangu_infer.server.app import create_app

    path = _resized(tiny_pangu_gguf, 428, 420, tmp_path, "wide.gguf")
    with caplog.at_level("WARNING"):
        llm = LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True)
    said = [r.getMessage() for r in caplog.records if "rows" in r.getMessage()]
    assert said == [f"{path}: the model's vocabulary has 428 rows (token_embd.weight) but the tokenizer only 420 tokens: "
                    "ids 420 to 427, if sampled, decode as empty text"]
    assert llm.config.vocab_size == 428 and llm.tokenizer.vocab_size == 420
    word = llm.tokenizer.encode("Hello", add_special_tokens=False)
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    with TestClient(create_app(llm, served_model_name="m")) as http:
        # every token forced to a padded id: 200, empty text and empty token strings
        forced = http.post("/v1/completions", json={**body, "logit_bias": {"425": 100}}).json()
        assert forced["choices"][0]["text"] == "" and forced["choices"][0]["logprobs"]["tokens"] == [""] * 4
        assert forced["usage"]["completion_tokens"] == 4
        assert http.post("/detokenize", json={"model": "m", "tokens": [425, *word]}).json()["prompt"] == "Hello"
        assert http.post("/detokenize", json={"model": "m", "tokens": [428]}).status_code == 400
        chat = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                       "temperature": 0, "logit_bias": {"426": 100}, "stream": True})
        assert chat.status_code == 200 and '"finish_reason":"length"' in chat.text.replace(" ", "")


def test_a_special_token_id_outside_the_vocabulary_is_read_as_absent_as_llama_cpp_does(tmp_path, tiny_pangu_gguf, caplog):
    """llama.cpp: "bad special token: 'tokenizer.ggml.eos_token_id' = N, using default id 2" (a
    SentencePiece vocabulary's defaults: bos 1, eos 2), and the model runs; it was refused here.
    One warning per key, however often the header is read."""
    from pangu_infer import LLM, SamplingParams

    t = tiny_pangu_gguf
    path = write_gguf(tmp_path / "bad.gguf", arch=t.arch, config=t.config, tensors=t.tensors, vocab=t.vocab,
                      metadata={"tokenizer.ggml.eos_token_id": ("uint32", 10**6), "tokenizer.ggml.bos_token_id": ("uint32", 420)})
    with caplog.at_level("WARNING"):
        ckpt = read_gguf(path)
        read_gguf(path)
        llm = LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, enforce_eager=True)
    said = sorted(r.getMessage() for r in caplog.records if "outside the vocabulary" in r.getMessage())
    assert said == [f"{path}: tokenizer.ggml.{key} is outside the vocabulary of 420 tokens: read as absent "
                    "(llama.cpp's bad special token, which takes the default id)"
                    for key in ("bos_token_id=420", "eos_token_id=1000000")]
    assert (ckpt.config["bos_token_id"], ckpt.config["eos_token_id"]) == (None, None)
    assert (llm.tokenizer.bos_token_id, llm.tokenizer.eos_token_id) == (1, 2)
    assert llm.engine.eos_token_ids == {2}
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, logit_bias={2: 100}), use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 1 and out.outputs[0].token_ids == [2] and out.outputs[0].finish_reason == "stop"
