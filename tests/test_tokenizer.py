import io
import json
import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import sentencepiece
import tokenizers

from pangu_infer.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

from fixtures_tokenizer import PANGU_UNUSED_TOKENS, build_pangu_tokenizer, tokenizer_corpus

MIXED_TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "盘古大模型是华为发布的开源语言模型。",
    "I love 北京 and 上海 😀 🎉!",
    "Unseen characters fall back to bytes: 🦙 龘 Ω ß",
    "tabs\tand\nnewlines\n\n  indented",
    "数字 12345 and 3.14",
    "👍🏽 skin tone and 👨‍👩‍👧 family emoji",
    "x",
    "",
]


@pytest.fixture(scope="module")
def sp(pangu_tokenizer_dir: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(pangu_tokenizer_dir / "tokenizer.model"))


def reference_encode(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """The released slow tokenizer's rule, spelled out: split on special tokens, encode each fragment."""
    specials = ["<unk>", "<s>", "</s>", *PANGU_UNUSED_TOKENS]
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    ids = [sp.piece_to_id("<s>")]
    for fragment in re.split(pattern, text):
        if fragment in specials:
            ids.append(sp.piece_to_id(fragment))
        elif fragment:
            ids.extend(sp.encode(fragment))
    return ids


def test_tiny_pangu_tokenizer_has_release_special_ids(pangu_tokenizer: Tokenizer, tmp_path: Path) -> None:
    info = build_pangu_tokenizer(tmp_path)
    assert info == {"vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 13, "pad_token_id": 0}
    assert pangu_tokenizer.vocab_size == 1000
    assert (pangu_tokenizer.bos_token_id, pangu_tokenizer.eos_token_id, pangu_tokenizer.pad_token_id) == (1, 13, 0)
    assert pangu_tokenizer.eos_token == "[unused10]"
    assert pangu_tokenizer.all_special_ids == set(range(21))


def test_special_tokens_encode_as_single_ids(pangu_tokenizer: Tokenizer) -> None:
    for token in ["<s>", "</s>", "<unk>", *PANGU_UNUSED_TOKENS]:
        token_id = pangu_tokenizer.token_to_id(token)
        assert token_id is not None
        assert pangu_tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert pangu_tokenizer.convert_ids_to_tokens([token_id]) == [token]
    ids = pangu_tokenizer.encode("a[unused16]b[unused17]c", add_special_tokens=False)
    assert ids.count(pangu_tokenizer.token_to_id("[unused16]")) == 1
    assert ids.count(pangu_tokenizer.token_to_id("[unused17]")) == 1


def test_bos_is_added_and_eos_never(pangu_tokenizer: Tokenizer) -> None:
    ids = pangu_tokenizer.encode("你好 world")
    assert ids[0] == pangu_tokenizer.bos_token_id
    assert pangu_tokenizer.eos_token_id not in ids
    assert pangu_tokenizer.encode("你好 world", add_special_tokens=False) == ids[1:]


def test_encoding_splits_on_special_tokens_then_encodes_each_fragment(pangu_tokenizer: Tokenizer, sp) -> None:
    prompt = "[unused9]系统：[unused10][unused9]用户：Hello 北京 😀 /no_think[unused10][unused9]助手："
    ids = pangu_tokenizer.encode(prompt)
    assert ids == reference_encode(sp, prompt)
    # The fragment after a special token starts a new word, as in the released slow tokenizer.
    assert pangu_tokenizer.convert_ids_to_tokens(ids[:4]) == ["<s>", "[unused9]", "▁系统", "："]
    assert ids != [sp.piece_to_id("<s>")] + sp.encode(prompt)  # one SentencePiece call would differ
    for text in MIXED_TEXTS:
        mixed = f"[unused16]{text}[unused17]{text}</s>{text}"
        assert pangu_tokenizer.encode(mixed) == reference_encode(sp, mixed)


def test_round_trip_on_mixed_chinese_english_emoji(pangu_tokenizer: Tokenizer) -> None:
    for text in MIXED_TEXTS:
        assert pangu_tokenizer.decode(pangu_tokenizer.encode(text)) == text
        with_markers = f"[unused9]用户：{text}[unused10][unused16]{text}[unused17]"
        ids = pangu_tokenizer.encode(with_markers, add_special_tokens=False)
        assert pangu_tokenizer.decode(ids, skip_special_tokens=False) == with_markers


def test_decode_agrees_with_sentencepiece(pangu_tokenizer: Tokenizer, sp) -> None:
    for text in MIXED_TEXTS + tokenizer_corpus(60):
        ids = sp.encode(text)
        assert pangu_tokenizer.decode(ids) == sp.decode(ids)


def test_model_without_dummy_prefix_keeps_leading_spaces(pangu_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(300)), model_writer=model, model_type="bpe", vocab_size=600,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=PANGU_UNUSED_TOKENS, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_bytes((pangu_tokenizer_dir / "tokenizer_config.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    for text in [" the world", "[unused16] the world[unused17]", *MIXED_TEXTS]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(sp.encode(" the world")) == sp.decode(sp.encode(" the world")) == " the world"


def test_byte_fallback_pieces_decode_to_bytes(pangu_tokenizer: Tokenizer) -> None:
    ids = pangu_tokenizer.encode("🦙", add_special_tokens=False)
    pieces = pangu_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert pangu_tokenizer.decode(ids) == "🦙"
    assert pangu_tokenizer.decode(ids[:-1]) == "\ufffd"  # a cut character is replaced, not raised


def test_skip_special_tokens_drops_special_tokens_only_when_asked(pangu_tokenizer: Tokenizer) -> None:
    ids = pangu_tokenizer.encode("[unused16]想一想[unused17]答案[unused10]")
    assert pangu_tokenizer.decode(ids) == "想一想答案"
    assert pangu_tokenizer.decode(ids, skip_special_tokens=False) == "<s>[unused16]想一想[unused17]答案[unused10]"


def test_token_to_id_answers_none_for_unknown_text(pangu_tokenizer: Tokenizer) -> None:
    assert pangu_tokenizer.token_to_id("[unused16]") == 19
    assert pangu_tokenizer.token_to_id("<0x41>") is not None
    assert pangu_tokenizer.token_to_id("[unused99]") is None


def test_an_id_past_the_tokenizers_pieces_decodes_as_empty_text(pangu_tokenizer, llama_tokenizer, llama_tokenizer_dir) -> None:
    """A model's vocabulary may be wider than its tokenizer (an embedding padded to a multiple of 64,
    or a GGUF's rows past its tokens): a sampled id without a piece is empty text, as transformers
    decodes it, not a failed request. A negative id is still an error."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    assert llama_tokenizer.decode([5, 5000]) == reference.decode([5, 5000]) == reference.decode([5])
    for tok in (pangu_tokenizer, llama_tokenizer):
        assert tok.decode([5, 5000, 6]) == tok.decode([5, 6]) and tok.decode([5000]) == ""
        assert tok.convert_ids_to_tokens([5000]) == [""]
        with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
            tok.decode([5, -1])


@pytest.mark.parametrize("name", ["pangu_tokenizer", "llama_tokenizer"])
def test_a_text_with_a_lone_surrogate_is_a_value_error(name, request) -> None:
    """A str Python builds from JSON's "\\ud800" (LLM.generate, a prediction, bad_words): SentencePiece
    raised a RuntimeError about a C++ cast, tokenizers a TypeError."""
    tok = request.getfixturevalue(name)
    with pytest.raises(ValueError, match=r"lone UTF-16 surrogate at character 3 \('\\udc00'\)"):
        tok.encode("abc\udc00def")
    assert tok.encode("abc\U0001F600def") == tok.encode("abc\ud83d\ude00def".encode("utf-16", "surrogatepass").decode("utf-16"))


def test_load_tokenizer_names_the_folder_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def _config_with(**fields):
    return lambda config: json.dumps(dict(config, **fields))


# (case, file, its new content: bytes, text, or a function of tokenizer_config.json's dict; the message)
BROKEN_FILES = [
    ("junk-sentencepiece", "tokenizer.model", b"junk", r"tokenizer\.model'? is not a SentencePiece model"),
    ("empty-sentencepiece", "tokenizer.model", b"", r"tokenizer\.model'? is not a SentencePiece model"),
    ("config-a-list", "tokenizer_config.json", "[]", r"tokenizer_config\.json'? must hold a JSON object, not list"),
    ("special-map-a-list", "special_tokens_map.json", "[1]", r"special_tokens_map\.json'? must hold a JSON object"),
    ("added-token-without-content", "tokenizer_config.json", _config_with(added_tokens_decoder={"5": {}}), r"added_tokens_decoder\['5'\]"),
    ("added-token-a-string", "tokenizer_config.json", _config_with(added_tokens_decoder={"5": "a"}), r"added_tokens_decoder\['5'\]"),
    ("added-token-id-not-a-number", "tokenizer_config.json", _config_with(added_tokens_decoder={"x": {"content": "a"}}),
     r"added_tokens_decoder has the key 'x'"),
    ("added-tokens-a-list", "tokenizer_config.json", _config_with(added_tokens_decoder=[1]), r"added_tokens_decoder=\[1\] must be an object"),
    ("named-template-without-name", "tokenizer_config.json", _config_with(chat_template=[{"template": "x"}]), r"chat_template\[0\]"),
    ("named-template-a-number", "tokenizer_config.json", _config_with(chat_template=[5]), r"chat_template\[0\]"),
    ("bos-token-a-number", "tokenizer_config.json", _config_with(bos_token=5), r"bos_token=5"),
    ("additional-special-token-a-number", "tokenizer_config.json", _config_with(additional_special_tokens=[5]),
     r"additional_special_tokens"),
    ("additional-special-tokens-a-string", "tokenizer_config.json", _config_with(additional_special_tokens="abc"),
     r"additional_special_tokens"),
]


@pytest.mark.parametrize(("file", "content", "message"), [c[1:] for c in BROKEN_FILES], ids=[c[0] for c in BROKEN_FILES])
def test_a_broken_tokenizer_file_is_a_value_error_naming_it(pangu_tokenizer_dir: Path, tmp_path: Path, file, content, message) -> None:
    """Each was sentencepiece's RuntimeError, an AttributeError, KeyError or TypeError (the CLI's
    traceback), or an unnamed int() ValueError; a string of additional special tokens made each
    of its characters one."""
    folder = tmp_path / "model"
    shutil.copytree(pangu_tokenizer_dir, folder)
    if callable(content):
        content = content(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")))
    (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as caught:
        load_tokenizer(folder)
    assert file in str(caught.value)


@pytest.mark.parametrize("content", ["{", "[]", "{}"])
def test_a_broken_tokenizer_json_is_a_value_error_naming_it(llama_tokenizer_dir: Path, tmp_path: Path, content) -> None:
    """tokenizers' own Exception (not a ValueError: the CLI's traceback)."""
    folder = tmp_path / "model"
    shutil.copytree(llama_tokenizer_dir, folder)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json'? is not a tokenizers tokenizer file"):
        load_tokenizer(folder)


def test_model_without_chat_template_cannot_render_chat(pangu_tokenizer_dir: Path, tmp_path: Path) -> None:
    config = json.loads((pangu_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "tokenizer.model").write_bytes((pangu_tokenizer_dir / "tokenizer.model").read_bytes())
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="has no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_gets_transformers_helpers(pangu_tokenizer: Tokenizer) -> None:
    tok = Tokenizer.from_tokenizers(
        tokenizers.Tokenizer(tokenizers.models.BPE()), bos_token_id=None, eos_token_id=None, add_bos=False,
        chat_template="{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}|{{ extra }}",
        special_token_ids=set(),
    )
    rendered = tok.apply_chat_template([{"role": "user", "content": "<你好>"}], extra=7)
    assert rendered == '[{"role": "user", "content": "<你好>"}]|4||7'
    failing = Tokenizer.from_tokenizers(
        tokenizers.Tokenizer(tokenizers.models.BPE()), bos_token_id=None, eos_token_id=None, add_bos=False,
        chat_template="{{ raise_exception('roles must alternate') }}", special_token_ids=set(),
    )
    with pytest.raises(ValueError, match="roles must alternate"):
        failing.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer.from_tokenizers(
        tokenizers.Tokenizer(tokenizers.models.BPE()), bos_token_id=None, eos_token_id=None, add_bos=False,
        chat_template="{% for m in messages %}", special_token_ids=set(), name="broken-model",
    )
    with pytest.raises(ValueError, match="chat template of tokenizer broken-model failed"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_llama_tokenizer_json_backend(llama_tokenizer: Tokenizer) -> None:
    tok = llama_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.all_special_ids == {0, 1, 2}
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    prompt = "<|im_start|>user\nHello 北京 🦙<|im_end|>\n"
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1  # add_bos_token is false
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "user\nHello 北京 🦙\n"
    for text in MIXED_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_from_tokenizers_adds_bos_when_asked(llama_tokenizer_dir: Path) -> None:
    tk = tokenizers.Tokenizer.from_file(str(llama_tokenizer_dir / "tokenizer.json"))
    tok = Tokenizer.from_tokenizers(
        tk, bos_token_id=0, eos_token_id=2, add_bos=True, chat_template=None, special_token_ids={0, 1, 2}
    )
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.pad_token_id is None and tok.chat_template is None
    assert tok.decode(tok.encode("<|im_start|>hi")) == "hi"


def stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip_special_tokens: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas, pos = [], 0
    while pos < len(ids):
        size = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.step(ids[pos:pos + size]))
        pos += size
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("backend", ["pangu_tokenizer", "llama_tokenizer"])
def test_streamed_detokenization_equals_full_decode(backend: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(backend)
    rng = random.Random(0)
    marker = "[unused16]" if backend == "pangu_tokenizer" else "<|im_end|>"
    texts = MIXED_TEXTS + [f"{marker}思考 think{marker}Answer: 👍🏽 龘🦙 and more words here."]
    for text in texts:
        ids = tok.encode(text)
        for skip in (True, False):
            for _ in range(5):
                deltas = stream(tok, ids, rng, skip)
                assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
                assert all("\ufffd" not in d for d in deltas)  # never a broken character


def test_streamed_detokenization_keeps_word_start_spaces(pangu_tokenizer: Tokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog 你好 世界"
    detok = IncrementalDetokenizer(pangu_tokenizer)
    deltas = [detok.step([i]) for i in pangu_tokenizer.encode(text)]
    assert "".join(deltas) == text
    assert deltas[:3] == ["", "the", " quick"]  # bos, then the dummy prefix dropped, then a real space


def test_detokenizer_flush_releases_a_truncated_character(pangu_tokenizer: Tokenizer) -> None:
    ids = pangu_tokenizer.encode("ok 🦙", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(pangu_tokenizer)
    streamed = "".join(detok.step([i]) for i in ids)
    assert streamed == "ok "
    assert detok.flush() == "\ufffd"


def test_detokenizer_gives_no_text_for_ids_past_the_tokenizer_vocabulary(pangu_tokenizer: Tokenizer) -> None:
    # Models often pad their embedding past the tokenizer; a sampled padding id must not break a stream.
    ids = pangu_tokenizer.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(pangu_tokenizer)
    text = "".join(detok.step([i]) for i in [ids[0], pangu_tokenizer.vocab_size + 5, *ids[1:]])
    assert text == pangu_tokenizer.decode(ids)


def test_detokenizer_keeps_the_first_word_space_with_prompt_context(pangu_tokenizer: Tokenizer) -> None:
    prompt = pangu_tokenizer.encode("hello")
    word = pangu_tokenizer.encode("world", add_special_tokens=False)  # "▁world": a word start
    detok = IncrementalDetokenizer(pangu_tokenizer, prompt_ids=prompt)
    assert "".join(detok.step([i]) for i in word) == " world"


@pytest.mark.parametrize("name", ["pangu_tokenizer", "llama_tokenizer"])  # SentencePiece; HF tokenizers
def test_encoding_a_long_text_lets_the_other_threads_run(name, request):
    """A server tokenizes prompts on a worker thread; the engine thread must keep stepping meanwhile.
    tokenizers' Tokenizer.encode holds the GIL nearly throughout (a prompt of 8 MB stalled every
    stream for 11 s): a Python loop beside it ran at 4% of its speed alone, against 55% beside
    encode_batch (and 80-110% beside SentencePiece)."""
    tok = request.getfixturevalue(name)
    text = "the weather in the city 我们今天, " * 40000

    def loop_rate(busy: threading.Thread) -> float:
        busy.start()
        n, t = 0, time.perf_counter()
        while busy.is_alive():
            n += 1
        return n / (time.perf_counter() - t)

    alone = loop_rate(threading.Thread(target=time.sleep, args=(0.5,)))
    took = []
    beside = loop_rate(threading.Thread(target=lambda: took.append(timed(tok.encode, text))))
    assert took[0] > 0.2, f"encoding took {took[0]:.3f} s: too short for this test to tell anything"
    assert beside > 0.2 * alone, f"a Python loop ran at {beside / alone:.0%} of its speed while another thread encoded: the GIL was held"


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t
