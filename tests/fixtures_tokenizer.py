"""Tiny tokenizers for tests, trained here in well under a second.

`build_pangu_tokenizer(dir)` writes a Pangu-style SentencePiece folder (tokenizer.model, the real
tokenizer_config.json format with the real chat template, special_tokens_map.json);
`build_llama_tokenizer(dir)` writes a byte-level BPE tokenizer.json with a ChatML template. Both
work without pytest (benchmarks, tiny model folders); the fixtures below build each once per session.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pangu_infer.tokenizer import Tokenizer, load_tokenizer

# The released openPangu-Embedded-7B tokenizer files (tests/data/README.md says where they come
# from); tests read the real chat template from here.
REAL_PANGU_DIR = Path(__file__).resolve().parent / "data" / "models" / "openpangu-embedded-7b"

PANGU_VOCAB_SIZE = 1000
PANGU_UNUSED_TOKENS = [f"[unused{i}]" for i in range(18)]

_EN_WORDS = (
    "the quick brown fox jumps over lazy dog hello world this is a tiny tokenizer for tests model language large "
    "open source weights inference engine token text stream answer question reasoning tool call function weather "
    "city today tomorrow please tell me about how what why when where who can you help write code python data "
    "number time and or but with without from into under between sentence word piece byte space cache memory "
    "speed fast slow think"
).split()
_ZH_WORDS = (
    "我们 今天 去 公园 散步 天气 很好 盘古 大模型 是 华为 发布 的 开源 语言 模型 你好 世界 请 告诉 我 北京 上海 明天 会 "
    "下雨 吗 谢谢 问题 回答 思考 工具 调用 系统 用户 助手 方法 中文 英文 句子 测试 分词器 推理 引擎 速度 很快 学习 数据"
).split()
_EMOJI = ["😀", "🎉", "👍", "🚀", "❤️"]
_PUNCT_EN = [".", "?", "!", ","]
_PUNCT_ZH = ["。", "？", "！", "，", "："]


def tokenizer_corpus(n: int = 1500) -> list[str]:
    """Deterministic mixed English / Chinese / emoji sentences to train the tiny tokenizers on."""
    rng = random.Random(0)
    corpus = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            words = " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(4, 12)))
            corpus.append(words.capitalize() + rng.choice(_PUNCT_EN))
        elif kind == 1:
            corpus.append("".join(rng.choice(_ZH_WORDS) for _ in range(rng.randint(3, 9))) + rng.choice(_PUNCT_ZH))
        else:
            en = " ".join(rng.choice(_EN_WORDS) for _ in range(3))
            zh = "".join(rng.choice(_ZH_WORDS) for _ in range(3))
            corpus.append(f"{en} {zh}：{rng.choice(_EMOJI)} {rng.randint(0, 9999)}")
    return corpus


def real_pangu_dir() -> Path:
    """The folder with the released openPangu-Embedded-7B config files."""
    return REAL_PANGU_DIR


def real_pangu_tokenizer_config() -> dict[str, Any]:
    return json.loads((real_pangu_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))


def build_pangu_tokenizer(directory: str | Path) -> dict[str, int]:
    """Write a tiny Pangu-style tokenizer into `directory`; return its size and special ids.

    Pieces: <unk>=0, <s>=1, </s>=2, [unused0]..[unused17]=3..20 (user-defined), 256 byte-fallback
    pieces, then BPE pieces up to 1000. eos is [unused10]=13 and pad is <unk>=0, as in the release.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=PANGU_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=PANGU_UNUSED_TOKENS,
        # Llama-style normalisation: keep text as is, dummy prefix on.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,  # deterministic ids across runs
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.get_piece_size() == PANGU_VOCAB_SIZE

    real = real_pangu_tokenizer_config()
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(sp.piece_to_id(t)): {"content": t, **entry} for t in ["<unk>", "<s>", "</s>", *PANGU_UNUSED_TOKENS]}
    config = {**real, "added_tokens_decoder": added}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    special_map = (real_pangu_dir() / "special_tokens_map.json").read_text(encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(special_map, encoding="utf-8")
    return {
        "vocab_size": PANGU_VOCAB_SIZE,
        "bos_token_id": sp.piece_to_id("<s>"),
        "eos_token_id": sp.piece_to_id("[unused10]"),
        "pad_token_id": sp.piece_to_id("<unk>"),
    }


LLAMA_VOCAB_SIZE = 1000
LLAMA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML as SmolLM2 uses it, plus the Qwen3-style `enable_thinking` switch so pass-through is testable.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def build_llama_tokenizer(directory: str | Path) -> dict[str, int]:
    """Write a tiny byte-level BPE tokenizer.json + ChatML tokenizer_config.json; return size and ids.

    Ids: <|endoftext|>=0 (pad), <|im_start|>=1 (bos, not added to prompts), <|im_end|>=2 (eos).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB_SIZE,
        special_tokens=LLAMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(tokenizer_corpus(), trainer)
    tk.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "chat_template": LLAMA_CHAT_TEMPLATE,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {
        "vocab_size": tk.get_vocab_size(with_added_tokens=True),
        "bos_token_id": tk.token_to_id("<|im_start|>"),
        "eos_token_id": tk.token_to_id("<|im_end|>"),
        "pad_token_id": tk.token_to_id("<|endoftext|>"),
    }


@pytest.fixture(scope="session")
def pangu_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny Pangu SentencePiece tokenizer (see build_pangu_tokenizer)."""
    directory = tmp_path_factory.mktemp("pangu_tokenizer")
    build_pangu_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny byte-level BPE tokenizer.json and a ChatML template."""
    directory = tmp_path_factory.mktemp("llama_tokenizer")
    build_llama_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def pangu_tokenizer(pangu_tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(pangu_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(llama_tokenizer_dir)
