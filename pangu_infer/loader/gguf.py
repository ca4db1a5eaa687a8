"""Read llama.cpp GGUF files (architectures `llama` and `pangu-embedded`): HF config, HF tensors, tokenizer.

    ckpt = read_gguf("model.gguf")          # metadata only; the file stays memory-mapped
    ckpt.config                             # HF config.json-style dict
    for name, t in ckpt.tensors():          # HF names and layout, dequantized one at a time
        ...
    tok = load_gguf_tokenizer(ckpt)         # pangu_infer.tokenizer.Tokenizer

Q/K row order. llama.cpp's HF->GGUF converter (`convert_hf_to_gguf.py`) reorders the rows of
q_proj/k_proj for some architectures so that llama.cpp can apply RoPE to adjacent pairs
(2i, 2i+1) ("NORM" rope) instead of HF's rotate-half pairs (i, i + head_dim/2) ("NEOX" rope):

- `llama`: `LlamaModel.undo_permute = True`; `modify_tensors` applies `LlamaModel.permute` to
  `q_proj.weight`/`q_proj.bias` (with n_head) and `k_proj.weight`/`k_proj.bias` (with
  n_head_kv): rows viewed as [heads, 2, head_dim/2] become [heads, head_dim/2, 2]. llama.cpp
  runs the arch with LLAMA_ROPE_TYPE_NORM. We undo it, biases included (a Llama re-alias of
  Pangu 7B, `LlamaForCausalLM` + `attention_bias`, has permuted biases).
- `pangu-embedded`: `PanguEmbeddedModel` derives from `TextModel`, not `LlamaModel`; its
  `modify_tensors` only drops a tied `lm_head` and writes every tensor as is. llama.cpp runs the
  arch with LLAMA_ROPE_TYPE_NEOX, i.e. HF's rotate-half on HF row order. Nothing to undo.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch

from pangu_infer.config import ConfigError, ModelConfig, warn_once

if TYPE_CHECKING:
    import tokenizers

    from pangu_infer.tokenizer import Tokenizer

# GGUF general.architecture -> (HF architectures[0], HF model_type, q/k rows permuted by the converter)
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "pangu-embedded": ("PanguEmbeddedForCausalLM", "PanguEmbedded", False),
}

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<gguf module> -> (model.layers.N.<HF module>, suffixes the HF module can have)
BLOCK_TENSORS = {
    "attn_norm": ("input_layernorm", ("weight",)),
    "attn_q": ("self_attn.q_proj", ("weight", "bias")),
    "attn_k": ("self_attn.k_proj", ("weight", "bias")),
    "attn_v": ("self_attn.v_proj", ("weight", "bias")),
    "attn_output": ("self_attn.o_proj", ("weight", "bias")),
    "ffn_norm": ("post_attention_layernorm", ("weight",)),
    "ffn_gate": ("mlp.gate_proj", ("weight", "bias")),
    "ffn_up": ("mlp.up_proj", ("weight", "bias")),
    "ffn_down": ("mlp.down_proj", ("weight", "bias")),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# The converter writes llama3 rope scaling as per-frequency factors, not as metadata.
ROPE_FREQS = "rope_freqs.weight"

# SentencePiece / llama.cpp token types (5 = unused and 6 = <0xXX> byte pieces need no handling)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes llama.cpp (src/llama-vocab.cpp) splits with, applied in turn
BPE_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **{pre: (_GPT2_SPLIT,) for pre in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    **{
        pre: (r"\p{N}", _GPT2_SPLIT)
        for pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    **{
        pre: (_LLAMA3_SPLIT,)
        for pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe")
    },
    **{pre: (_QWEN2_SPLIT,) for pre in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"),
}
# llama.cpp sets these for the llama3 pre-tokenizers: a word that is already a token is not merged
# from pieces, and BOS is added unless the file says otherwise.
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")


class GGUFError(ConfigError):
    """A GGUF file this engine cannot load; the message names the file and the offending key or tensor."""


@dataclass
class GGUFCheckpoint:
    """A memory-mapped GGUF file seen as an HF checkpoint: config dict, tokenizer spec, lazy tensors."""

    path: str
    config: dict
    tokenizer_spec: dict
    reader: Any = field(repr=False)
    # GGUF tensor name -> HF tensor name, for every tensor that tensors() yields
    hf_names: dict[str, str] = field(repr=False)
    permuted_qk: bool = False
    # config field -> the GGUF metadata key it was read from (an error about a field names the key)
    config_keys: dict[str, str] = field(default_factory=dict, repr=False)

    def model_config(self) -> ModelConfig:
        """ModelConfig.from_hf_dict of this file's config; a ConfigError about a field read from
        the metadata names the GGUF key too (the file has no config.json to look the field up in)."""
        try:
            return ModelConfig.from_hf_dict(self.config)
        except ConfigError as e:
            found = _FIELD_IN_ERROR.search(str(e))
            key = self.config_keys.get(found.group(1)) if found else None
            if key is None:
                raise
            raise GGUFError(f"{self.path}: {e} (read from the GGUF metadata key {key})") from None

    def tensor_names(self) -> list[str]:
        return list(self.hf_names.values())

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in HF layout), dequantized and converted to `dtype`, one at a time."""
        heads = self.config["num_attention_heads"]
        kv_heads = self.config["num_key_value_heads"]
        for t in self.reader.tensors:
            hf_name = self.hf_names.get(t.name)
            if hf_name is None:
                continue
            x = _dequantize(t, self.path)
            if self.permuted_qk and ".self_attn.q_proj." in hf_name:
                x = unpermute_rows(x, heads)
            elif self.permuted_qk and ".self_attn.k_proj." in hf_name:
                x = unpermute_rows(x, kv_heads)
            yield hf_name, x.to(dtype)


def unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute`: per head, rows [head_dim/2, 2] -> [2, head_dim/2]."""
    rows = x.shape[0]
    assert rows % (2 * n_head) == 0, (tuple(x.shape), n_head)
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read metadata and the tensor index of a GGUF file; tensor data stays on disk until tensors()."""
    from pangu_infer.loader.gguf_index import read_gguf_index

    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = read_gguf_index(path)  # gguf.GGUFReader's tensors, its metadata parsed in one struct pass
    except ValueError as e:  # (the index's messages start with the path: named once)
        raise GGUFError(f"{path}: cannot read GGUF file: {str(e).removeprefix(path + ': ')}") from None
    md = _Metadata(reader.metadata, path)
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {arch!r} (general.architecture); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    n_layers = md.int(f"{arch}.block_count")
    _check_block_count(n_layers, tensors, arch, path)
    hf_names = {name: _hf_name(name, arch, n_layers, path) for name in tensors if name != ROPE_FREQS}
    special = _special_token_ids(md)
    config = _hf_config(md, arch, tensors, path, special)
    return GGUFCheckpoint(
        path=path,
        config=config,
        tokenizer_spec=_tokenizer_spec(md, special),
        reader=reader,
        hf_names=hf_names,
        permuted_qk=ARCHITECTURES[arch][2],
        config_keys=_config_keys(arch),
    )


# ---------------------------------------------------------------------------------------- metadata


class _Metadata:
    """Typed access to GGUF key/values; a missing required key is an error that names it."""

    _REQUIRED = object()

    def __init__(self, metadata: dict[str, Any], path: str):
        self.fields = metadata
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.fields:
            if default is self._REQUIRED:
                raise GGUFError(f"{self.path}: missing GGUF metadata key {key!r}")
            return default
        return self.fields[key]

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.get(key, default)
        if v is not default and (isinstance(v, (list, bool)) or not isinstance(v, (int, np.integer))):
            raise GGUFError(f"{self.path}: GGUF metadata {key}={v!r} must be a single integer")
        return v if v is default else int(v)

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.get(key, default)
        if v is default:
            return v
        if isinstance(v, (list, bool, str)):
            raise GGUFError(f"{self.path}: GGUF metadata {key}={v!r} must be a number")
        return _shortest_float32(v)


def _shortest_float32(v: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; give the shortest decimal it stands for."""
    return float(str(np.float32(v)))


def _check_block_count(n_layers: int, tensors: dict[str, Any], arch: str, path: str) -> None:
    """The blocks block_count names are the blocks the file's tensors hold (blk.0 to blk.N-1), checked
    before anything is built from it: a larger count would build every block first (a million take
    minutes and tens of GiB) only to find its tensors missing."""
    held = {int(m.group(1)) for m in map(_BLOCK_RE.fullmatch, tensors) if m is not None}
    count = max(held) + 1 if held else 0
    if n_layers != count:
        holds = f"the tensors of {count} blocks (blk.0 to blk.{count - 1})" if held else "no blk.N tensors"
        raise GGUFError(f"{path}: GGUF metadata {arch}.block_count={n_layers} (num_hidden_layers) but the file holds {holds}")


def _hf_name(name: str, arch: str, n_layers: int, path: str) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in BLOCK_TENSORS and int(m.group(1)) < n_layers:
        hf_module, suffixes = BLOCK_TENSORS[m.group(2)]
        if m.group(3) in suffixes:
            return f"model.layers.{m.group(1)}.{hf_module}.{m.group(3)}"
    known = ", ".join([*GLOBAL_TENSORS, ROPE_FREQS] + [f"blk.N.{k}" for k in BLOCK_TENSORS])
    raise GGUFError(
        f"{path}: unknown tensor {name!r} for GGUF architecture {arch!r} with {n_layers} blocks; known: {known}"
    )


_FIELD_IN_ERROR = re.compile(r"\bfield (\w+)")


def _config_keys(arch: str) -> dict[str, str]:
    """The GGUF metadata key each config field _hf_config fills is read from."""
    return {
        "vocab_size": f"{arch}.vocab_size (or the rows of token_embd.weight)",
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_hidden_layers": f"{arch}.block_count",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "rope_theta": f"{arch}.rope.freq_base",
        "max_position_embeddings": f"{arch}.context_length",
        "rope_scaling": f"{arch}.rope.scaling.*",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
    }


_SPECIAL_KEYS = ("bos", "eos", "unknown", "padding")


def _special_token_ids(md: _Metadata) -> dict[str, Optional[int]]:
    """tokenizer.ggml.{bos,eos,unknown,padding}_token_id as the file gives them (None: absent).
    One outside the file's tokenizer.ggml.tokens is read as absent with one warning, as llama.cpp
    reads it ("bad special token ..., using default id": _tokenizer_spec gives llama.cpp's
    defaults of an absent id), where the model still runs; the padding id without a warning."""
    n_tokens = len(md.get("tokenizer.ggml.tokens"))
    ids: dict[str, Optional[int]] = {}
    for kind in _SPECIAL_KEYS:
        key = f"tokenizer.ggml.{kind}_token_id"
        value = md.int(key, None)
        if value is not None and not 0 <= value < n_tokens:
            if kind != "padding":
                warn_once(f"{md.path}: {key}={value} is outside the vocabulary of {n_tokens} tokens: read as absent "
                          "(llama.cpp's bad special token, which takes the default id)")
            value = None
        ids[kind] = value
    return ids


def _check_vocabulary(md: _Metadata, arch: str, tensors: dict[str, Any], path: str) -> int:
    """The model's vocabulary (token_embd.weight's rows) against {arch}.vocab_size and the tokenizer's
    tokens (llama.cpp builds the embedding of n_tokens rows, and refuses any other shape). More
    tokens than rows: an error naming both counts (the tokenizer would give ids the model has no
    row for); fewer: one warning, and the ids without a piece decode as empty text (as a
    transformers tokenizer decodes the padded rows of many HF checkpoints). The rows."""
    rows = int(tensors["token_embd.weight"].shape[1])
    stated = md.int(f"{arch}.vocab_size", None)
    if stated is not None and stated != rows:
        raise GGUFError(f"{path}: {arch}.vocab_size={stated} but token_embd.weight has {rows} rows")
    output = tensors.get("output.weight")
    if output is not None and len(output.shape) == 2 and int(output.shape[1]) != rows:
        raise GGUFError(f"{path}: output.weight has {int(output.shape[1])} rows but token_embd.weight {rows}: "
                        "the model's input and output vocabularies differ")
    n_tokens = len(md.get("tokenizer.ggml.tokens"))
    if n_tokens > rows:
        raise GGUFError(
            f"{path}: the tokenizer has {n_tokens} tokens (tokenizer.ggml.tokens) but the model's vocabulary "
            f"only {rows} (the rows of token_embd.weight): token ids {rows} to {n_tokens - 1} would have no "
            "embedding (llama.cpp refuses this file too)"
        )
    if n_tokens < rows:
        warn_once(f"{path}: the model's vocabulary has {rows} rows (token_embd.weight) but the tokenizer only {n_tokens} "
                  f"tokens: ids {n_tokens} to {rows - 1}, if sampled, decode as empty text")
    return rows


def _hf_config(md: _Metadata, arch: str, tensors: dict[str, Any], path: str, special: dict[str, Optional[int]]) -> dict:
    hf_arch, model_type, _ = ARCHITECTURES[arch]
    hidden = md.int(f"{arch}.embedding_length")
    heads = md.int(f"{arch}.attention.head_count")
    kv_heads = md.int(f"{arch}.attention.head_count_kv", heads)
    head_dim = md.int(f"{arch}.attention.key_length", None)
    value_dim = md.int(f"{arch}.attention.value_length", head_dim)
    if head_dim != value_dim:
        raise GGUFError(
            f"{path}: {arch}.attention.key_length={head_dim} differs from value_length={value_dim}; "
            "Llama-style attention needs them equal"
        )
    rope_dim = md.int(f"{arch}.rope.dimension_count", None)
    full_dim = head_dim or (hidden // heads if heads else 0)
    if rope_dim is not None and rope_dim != full_dim:
        raise GGUFError(
            f"{path}: {arch}.rope.dimension_count={rope_dim} but head_dim is {full_dim}; "
            "partial rotary embeddings are not supported"
        )
    rope_theta = md.float(f"{arch}.rope.freq_base", 10000.0)
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: the tensor 'token_embd.weight' is missing")
    vocab = _check_vocabulary(md, arch, tensors, path)

    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": md.int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": md.int(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": md.float(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "max_position_embeddings": md.int(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["padding"],
        "torch_dtype": _torch_dtype(tensors),
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim

    has_bias = {m: f"blk.0.{m}.bias" in tensors for m in ("attn_q", "attn_k", "attn_v", "attn_output")}
    if len(set(has_bias.values())) > 1:
        raise GGUFError(
            f"{path}: attention biases on {[m for m, b in has_bias.items() if b]} but not on "
            f"{[m for m, b in has_bias.items() if not b]}; Llama/Pangu attention has all four or none"
        )
    cfg["attention_bias"] = has_bias["attn_q"]
    if arch == "pangu-embedded":
        cfg["bias"] = has_bias["attn_q"]  # the key PanguEmbedded's config.json uses
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors

    rope_scaling = _rope_scaling(md, arch, tensors, rope_theta, full_dim, path)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def _torch_dtype(tensors: dict[str, Any]) -> str:
    """The dtype the weights are meant to run in: the file's float type, bfloat16 for quantized files."""
    from gguf import GGMLQuantizationType as Q

    kinds = {t.tensor_type for t in tensors.values() if len(t.shape) == 2}
    if kinds <= {Q.F32}:
        return "float32"
    if kinds <= {Q.F32, Q.F16}:
        return "float16"
    return "bfloat16"  # BF16 files, and quantized ones (most quantized models were trained in bf16)


def _rope_scaling(
    md: _Metadata, arch: str, tensors: dict, theta: float, head_dim: int, path: str
) -> Optional[dict]:
    kind = md.get(f"{arch}.rope.scaling.type", None)
    if kind is None and f"{arch}.rope.scale_linear" in md:  # the key of older files
        return {"rope_type": "linear", "factor": md.float(f"{arch}.rope.scale_linear")}
    if kind in ("linear", "yarn"):
        out = {"rope_type": kind, "factor": md.float(f"{arch}.rope.scaling.factor")}
        original = md.int(f"{arch}.rope.scaling.original_context_length", None)
        if original is not None:
            out["original_max_position_embeddings"] = original
        return out
    if kind not in (None, "none"):
        raise GGUFError(f"{path}: unsupported {arch}.rope.scaling.type={kind!r}; supported: linear, yarn, none")
    if ROPE_FREQS in tensors:
        factors = _dequantize(tensors[ROPE_FREQS], path).double()
        return llama3_rope_scaling(factors, theta, head_dim, path)
    return None


def llama3_rope_scaling(
    factors: torch.Tensor, theta: float, head_dim: int, path: str = "GGUF"
) -> Optional[dict]:
    """Recover HF's llama3 `rope_scaling` from the per-frequency divisors llama.cpp stores as rope_freqs.

    Per frequency the divisor is 1 (short wavelengths), `factor` (long ones) or, in between,
    1 / ((1 - s) / factor + s) with s = (orig / wavelen - low) / (high - low) = a / wavelen - b.
    The curve depends only on (factor, a, b), so low = 1 loses nothing; a and b are fitted
    on the in-between frequencies, and the result is checked against every stored divisor.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if factors.shape != inv_freq.shape:
        raise GGUFError(f"{path}: {ROPE_FREQS} has shape {tuple(factors.shape)}, expected ({head_dim // 2},)")
    factor = float(factors.max())
    if math.isclose(factor, 1.0, rel_tol=1e-6) and torch.allclose(factors, torch.ones_like(factors)):
        return None
    inv_wavelen = inv_freq / (2 * math.pi)
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = [(1.0, 4.0, 8192)]  # Llama 3.1/3.2's values, for curves with too few in-between points
    if int(mid.sum()) >= 2:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        x = inv_wavelen[mid]
        a, b = np.polyfit(x.numpy(), s.numpy(), 1)
        b = -b
        if a > 0 and b > 0:
            candidates.insert(0, (1.0, 1.0 + 1.0 / b, a / b))
    for low, high, original in candidates:
        divisors = _llama3_divisors(inv_wavelen, factor, low, high, original)
        if torch.allclose(divisors, factors, rtol=1e-4, atol=1e-6):
            return {
                "rope_type": "llama3",
                "factor": _shortest_float32(factor),
                "low_freq_factor": _shortest_float32(low),
                "high_freq_factor": _shortest_float32(high),
                "original_max_position_embeddings": int(round(original)),
            }
    raise GGUFError(
        f"{path}: {ROPE_FREQS} does not follow llama3 rope scaling; other per-frequency scalings are not supported"
    )


def _llama3_divisors(
    inv_wavelen: torch.Tensor, factor: float, low: float, high: float, original: float
) -> torch.Tensor:
    s = ((original * inv_wavelen - low) / (high - low)).clamp(0, 1)
    return 1 / ((1 - s) / factor + s)


# ------------------------------------------------------------------------------------------ tensors


def _dequantize(t: Any, path: str) -> torch.Tensor:
    """One GGUF tensor as a float tensor in torch (= reversed GGUF) dim order; F32/F16/BF16 stay exact."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == Q.F32:
        x = torch.from_numpy(np.array(t.data, dtype=np.float32))
    elif t.tensor_type == Q.F16:
        x = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif t.tensor_type == Q.BF16:
        x = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
    else:
        try:
            x = torch.from_numpy(dequantize(t.data, t.tensor_type))
        except NotImplementedError:
            raise GGUFError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                "cannot dequantize (float and block-quantized types are supported)"
            ) from None
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------- tokenizer


def _tokenizer_spec(md: _Metadata, special: dict[str, Optional[int]]) -> dict:
    model = md.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise GGUFError(
            f"{md.path}: unsupported tokenizer.ggml.model={model!r}; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)"
        )
    tokens = md.get("tokenizer.ggml.tokens")

    def special_id(kind: str, spm_default: int) -> Optional[int]:  # llama.cpp's default for an absent id
        if special[kind] is not None:
            return special[kind]
        return spm_default if model == "llama" and spm_default < len(tokens) else None

    pre = md.get("tokenizer.ggml.pre", None) if model == "gpt2" else None
    if model == "llama":
        add_bos_default = True
    else:
        add_bos_default = pre in _LLAMA3_PRES
    return {
        "model": model,
        "pre": pre,
        "tokens": tokens,
        "token_types": md.get("tokenizer.ggml.token_type", None) or [TOKEN_NORMAL] * len(tokens),
        "scores": md.get("tokenizer.ggml.scores", None) if model == "llama" else None,
        "merges": md.get("tokenizer.ggml.merges") if model == "gpt2" else None,
        # llama.cpp's defaults for a SentencePiece vocabulary that names no ids
        "bos_token_id": special_id("bos", 1),
        "eos_token_id": special_id("eos", 2),
        "unk_token_id": special_id("unknown", 0),
        "pad_token_id": special["padding"],
        "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(md.get("tokenizer.ggml.add_space_prefix", model == "llama")),
        "chat_template": md.get("tokenizer.chat_template", None),
    }


@dataclass
class GGUFTokenizer:
    """A `tokenizers.Tokenizer` that adds no BOS/EOS itself, plus what a caller needs to add them."""

    tokenizer: "tokenizers.Tokenizer"
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]
    special_token_ids: set[int]


def build_gguf_tokenizer(spec: dict) -> GGUFTokenizer:
    """Build a tokenizer that encodes like llama.cpp does from a GGUF tokenizer spec.

    Control, unknown and user-defined tokens are added tokens, so text is split on them first and
    each stays one id (as llama.cpp with parse_special); control and unknown ones are special
    (skipped when decoding with skip_special_tokens), user-defined ones decode as text.
    """
    from tokenizers import AddedToken

    tokens, types = spec["tokens"], spec["token_types"]
    if spec["model"] == "gpt2":
        tk = _byte_level_bpe(spec)
    elif spec["model"] == "llama":
        tk = _sentencepiece_bpe(spec)
    else:
        raise GGUFError(f"unsupported tokenizer model {spec['model']!r}; supported: 'gpt2', 'llama'")
    special = [i for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [i for i, ty in enumerate(types) if ty == TOKEN_USER_DEFINED]
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    for i in special + user:
        got = tk.token_to_id(tokens[i])
        if got != i:
            raise GGUFError(f"token {tokens[i]!r} appears twice in the vocabulary (ids {got} and {i})")
    return GGUFTokenizer(
        tokenizer=tk,
        bos_token_id=spec["bos_token_id"],
        eos_token_id=spec["eos_token_id"],
        pad_token_id=spec["pad_token_id"],
        add_bos=spec["add_bos"],
        add_eos=spec["add_eos"],
        chat_template=spec["chat_template"],
        special_token_ids=set(special),
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


def _byte_level_bpe(spec: dict) -> "tokenizers.Tokenizer":
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = spec["pre"] or "default"
    if pre not in BPE_PRE_SPLITS:
        raise GGUFError(
            f"unsupported tokenizer.ggml.pre={pre!r} for a byte-level BPE vocabulary; "
            f"supported: {', '.join(sorted(BPE_PRE_SPLITS))}"
        )
    merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
    tk = Tokenizer(models.BPE(_vocab(spec["tokens"]), merges, ignore_merges=pre in _LLAMA3_PRES))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in BPE_PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(spec: dict) -> "tokenizers.Tokenizer":
    """llama.cpp's SentencePiece tokenizer: repeatedly merge the adjacent pair whose joined piece
    scores highest, fall back to <0xXX> byte pieces, ' ' spelled '▁', '▁' prepended to every
    fragment between added tokens. As BPE: merges ordered by the score of the piece they make."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, types, scores = spec["tokens"], spec["token_types"], spec["scores"]
    if scores is None:
        raise GGUFError("a SentencePiece ('llama') GGUF vocabulary needs tokenizer.ggml.scores")
    unk_id = spec["unk_token_id"]
    vocab = _vocab(tokens)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for piece, i in mergeable.items():
        if types[i] != TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], -scores[mergeable[left]], -scores[mergeable[right]], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # A normalizer, not the Metaspace pre-tokenizer: Metaspace adds no '▁' to a fragment that
    # already starts with a space, llama.cpp and SentencePiece do (" hi" -> "▁▁hi").
    steps_in = [normalizers.Prepend("▁")] if spec["add_space_prefix"] else []
    tk.normalizer = normalizers.Sequence(steps_in + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_space_prefix"]:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def load_gguf_tokenizer(ckpt: GGUFCheckpoint) -> "Tokenizer":
    """The project's Tokenizer for a GGUF checkpoint."""
    return tokenizer_from_spec(ckpt.tokenizer_spec, ckpt.path)


def tokenizer_from_spec(spec: dict, path: str) -> "Tokenizer":
    """The project's Tokenizer from a GGUF tokenizer spec (`GGUFCheckpoint.tokenizer_spec`)."""
    from pangu_infer.tokenizer import Tokenizer

    built = build_gguf_tokenizer(spec)
    return Tokenizer.from_tokenizers(
        built.tokenizer,
        bos_token_id=built.bos_token_id,
        eos_token_id=built.eos_token_id,
        pad_token_id=built.pad_token_id,
        add_bos=built.add_bos,
        chat_template=built.chat_template,
        special_token_ids=built.special_token_ids,
        name=os.path.basename(path),
    )


__all__ = [
    "ARCHITECTURES",
    "GGUFCheckpoint",
    "GGUFError",
    "GGUFTokenizer",
    "build_gguf_tokenizer",
    "llama3_rope_scaling",
    "load_gguf_tokenizer",
    "read_gguf",
    "tokenizer_from_spec",
    "unpermute_rows",
]
