"""vLLM's load arguments: tokenizer= and --tokenizer (a model folder holding only its weights and
config runs with the tokenizer of another folder, the model's own tokenizer files never read),
skip_tokenizer_init, revision and download_dir (--revision, --download-dir) for a hub model, and
trust_remote_code taken as vLLM's calls pass it; each bad value a ValueError naming it."""

from __future__ import annotations

import json
import shutil

import pytest

from pangu_infer import LLM, SamplingParams
from pangu_infer.cli import main
from pangu_infer.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SMALL = dict(enforce_eager=True, kv_cache_memory=4 << 20)


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory, tiny_dense_dir):
    """The tiny model's weights, config and generation config, without its tokenizer files."""
    folder = tmp_path_factory.mktemp("weights_only")
    for f in tiny_dense_dir.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            shutil.copy(f, folder / f.name)
    assert not any(folder.glob("tokenizer*"))
    return folder


def test_a_weights_only_folder_runs_with_the_tokenizer_of_another(weights_only, tiny_dense_dir, pangu_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        LLM(str(weights_only), **SMALL)  # what the argument is for
    llm = LLM(str(weights_only), tokenizer=str(pangu_tokenizer_dir), trust_remote_code=True, **SMALL)
    whole = LLM(str(tiny_dense_dir), **SMALL)
    text = "hello world, the tokenizer of another folder"
    assert llm.get_tokenizer().encode(text) == load_tokenizer(pangu_tokenizer_dir).encode(text)
    got, want = (m.generate([text], GREEDY, use_tqdm=False)[0] for m in (llm, whole))
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.outputs[0].text == want.outputs[0].text


def test_the_given_tokenizer_replaces_the_models_own_and_brings_its_chat_template(tmp_path, tiny_dense_dir, pangu_tokenizer_dir):
    other = tmp_path / "tok"
    shutil.copytree(pangu_tokenizer_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM(str(tiny_dense_dir), tokenizer=str(other), **SMALL)
    assert llm.render_chat([{"role": "user", "content": "hi"}]) == "<<hi>>"
    assert LLM(str(tiny_dense_dir), **SMALL).render_chat([{"role": "user", "content": "hi"}]) != "<<hi>>"


def test_bad_tokenizer_arguments_are_value_errors_naming_it(tmp_path, tiny_dense_dir, pangu_tokenizer_dir):
    with pytest.raises(ValueError, match=r"tokenizer='/no/such/folder': no such folder"):
        LLM(str(tiny_dense_dir), tokenizer="/no/such/folder", **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"tokenizer='.*empty': no tokenizer in"):
        LLM(str(tiny_dense_dir), tokenizer=str(empty), **SMALL)
    file = tmp_path / "tokenizer.json"
    file.write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer='.*tokenizer.json' is a file: pass the folder"):
        LLM(str(tiny_dense_dir), tokenizer=str(file), **SMALL)
    with pytest.raises(ValueError, match=r"tokenizer=5 must be a folder or a hub id"):
        LLM(str(tiny_dense_dir), tokenizer=5, **SMALL)
    with pytest.raises(ValueError, match=r"trust_remote_code='yes' must be True or False"):
        LLM(str(tiny_dense_dir), trust_remote_code="yes", **SMALL)
    # a tokenizer with more tokens than the model's vocabulary would produce ids the model has no row for
    vocab = json.loads((tiny_dense_dir / "config.json").read_text())["vocab_size"]
    larger = tmp_path / "larger"
    shutil.copytree(pangu_tokenizer_dir, larger)
    config = json.loads((larger / "tokenizer_config.json").read_text())
    config.setdefault("added_tokens_decoder", {})[str(vocab + 9)] = {"content": "<|extra|>", "special": True}
    (larger / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"has {vocab + 10} tokens, more than the model's vocabulary \(vocab_size {vocab}\)"):
        LLM(str(tiny_dense_dir), tokenizer=str(larger), **SMALL)


def test_a_tokenizer_larger_than_a_local_models_vocabulary_is_refused_before_its_weights_load(tmp_path, tiny_dense_dir, pangu_tokenizer_dir, monkeypatch):
    """A local folder's (or GGUF file's) vocabulary is in its config: the refusal comes before the weights
    load (a 7B load is a minute without the model cache), for a folder and for the demo GGUF file."""
    import pangu_infer.llm as llm_module

    vocab = json.loads((tiny_dense_dir / "config.json").read_text())["vocab_size"]
    larger = tmp_path / "larger"
    shutil.copytree(pangu_tokenizer_dir, larger)
    config = json.loads((larger / "tokenizer_config.json").read_text())
    config.setdefault("added_tokens_decoder", {})["60000"] = {"content": "<|extra|>", "special": True}
    (larger / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(llm_module, "load_serving_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(ValueError, match=rf"has 60001 tokens, more than the model's vocabulary \(vocab_size {vocab}\)"):
        LLM(str(tiny_dense_dir), tokenizer=str(larger), **SMALL)
    with pytest.raises(ValueError, match=r"has 60001 tokens, more than the model's vocabulary \(vocab_size 49152\)"):
        LLM(tokenizer=str(larger), **SMALL)  # the demo model, a GGUF file


def test_the_cli_takes_tokenizer(weights_only, pangu_tokenizer_dir, capsys):
    argv = ["generate", "--model", str(weights_only), "--tokenizer", str(pangu_tokenizer_dir), "--prompt", "hello",
            "--max-tokens", "3", "--temperature", "0", "--enforce-eager", "--kv-cache-memory", "4MiB", "--trust-remote-code"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_skip_tokenizer_init_runs_token_ids_without_any_tokenizer(weights_only, tiny_dense_dir):
    """vLLM's skip_tokenizer_init: nothing tokenizes (a folder without tokenizer files loads), token
    ids in and out with empty texts; what needs a tokenizer is a ValueError saying so."""
    llm = LLM(str(weights_only), skip_tokenizer_init=True, **SMALL)
    whole = LLM(str(tiny_dense_dir), **SMALL)
    ids = [5, 6, 7, 8]
    got, want = (m.generate([ids], GREEDY, use_tqdm=False)[0] for m in (llm, whole))
    assert llm.get_tokenizer() is None
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.outputs[0].text == ""
    for call, what in (
        (lambda: llm.generate("hello", GREEDY, use_tqdm=False), r"prompts\[0\], a text, needs the model's tokenizer"),
        (lambda: llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False), r"a chat needs the model's tokenizer"),
        (lambda: llm.encode_prompt("hi"), r"encode_prompt\(\) needs the model's tokenizer"),
        (lambda: llm.generate([ids], SamplingParams(max_tokens=3, stop=["x"]), use_tqdm=False), r"stop strings need the model's tokenizer"),
        (lambda: llm.generate([ids], SamplingParams(max_tokens=3, bad_words=["x"]), use_tqdm=False), r"bad_words needs the model's tokenizer"),
    ):
        with pytest.raises(ValueError, match=what):
            call()
    assert llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want.outputs[0].token_ids  # still serving
    with pytest.raises(ValueError, match=r"skip_tokenizer_init=True and tokenizer='.*': give one"):
        LLM(str(weights_only), skip_tokenizer_init=True, tokenizer=str(tiny_dense_dir), **SMALL)
    with pytest.raises(ValueError, match=r"skip_tokenizer_init=1 must be True or False"):
        LLM(str(weights_only), skip_tokenizer_init=1, **SMALL)


def test_a_hub_model_is_downloaded_at_the_revision_into_the_download_dir(monkeypatch, tmp_path, tiny_dense_dir, pangu_tokenizer_dir, capsys):
    """vLLM's revision and download_dir (--revision, --download-dir) reach huggingface_hub's download
    of a model named by its hub id (the hub itself is out of reach here: the download is a stand-in);
    so does tokenizer= as a hub id. For a local path they name nothing: a ValueError."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, cache_dir))
        return str(pangu_tokenizer_dir if repo_id == "someone/tok" else tiny_dense_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    llm = LLM("someone/tiny", revision="v1.1", download_dir=str(tmp_path / "dl"), tokenizer="someone/tok", **SMALL)
    assert calls == [("someone/tok", None, None), ("someone/tiny", "v1.1", str(tmp_path / "dl"))]
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    calls.clear()
    LLM("someone/tiny", **SMALL)
    assert calls == [("someone/tiny", None, None)]
    calls.clear()
    assert main(["generate", "--model", "someone/tiny", "--revision", "abc123", "--download-dir", str(tmp_path), "--prompt", "hi",
                 "--max-tokens", "2", "--enforce-eager", "--kv-cache-memory", "4MiB"]) == 0
    assert calls == [("someone/tiny", "abc123", str(tmp_path))]
    with pytest.raises(ValueError, match=r"revision='v1' applies to a model on the hub; '.*' is a local path"):
        LLM(str(tiny_dense_dir), revision="v1", **SMALL)
    with pytest.raises(ValueError, match=r"download_dir='' must be a non-empty string"):
        LLM("someone/tiny", download_dir="", **SMALL)


def test_the_tokenizer_revision_reaches_the_tokenizers_download(monkeypatch, tmp_path, tiny_dense_dir, pangu_tokenizer_dir):
    """vLLM's tokenizer_revision (--tokenizer-revision): the revision of tokenizer='s hub id, or, with
    no tokenizer given, of the model's own tokenizer on the hub (downloaded apart from the weights,
    which stay at --revision); for a local folder or file it names nothing: a ValueError naming it."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, "tokenizer*" in (allow_patterns or [])))
        return str(pangu_tokenizer_dir if repo_id == "someone/tok" else tiny_dense_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    LLM("someone/tiny", tokenizer="someone/tok", tokenizer_revision="t1", **SMALL)
    assert calls == [("someone/tok", "t1", True), ("someone/tiny", None, False)]
    calls.clear()
    llm = LLM("someone/tiny", revision="v2", tokenizer_revision="t2", **SMALL)
    assert calls == [("someone/tiny", "t2", True), ("someone/tiny", "v2", False)]
    assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    calls.clear()
    assert main(["generate", "--model", "someone/tiny", "--tokenizer-revision", "t3", "--prompt", "hi",
                 "--max-tokens", "2", "--enforce-eager", "--kv-cache-memory", "4MiB"]) == 0
    assert calls == [("someone/tiny", "t3", True), ("someone/tiny", None, False)]
    calls.clear()
    for kwargs, message in (
        (dict(model=str(tiny_dense_dir)), r"tokenizer_revision='t' applies to a tokenizer on the hub; '.*' is a local path"),
        (dict(model=None), r"tokenizer_revision='t' applies to a tokenizer on the hub; the demo model is a local file"),
        (dict(model="someone/tiny", tokenizer=str(pangu_tokenizer_dir)), r"tokenizer_revision='t' applies to a tokenizer on the hub; '.*' is a local folder"),
        (dict(model="someone/tiny", skip_tokenizer_init=True), r"skip_tokenizer_init=True and tokenizer_revision='t': give one"),
    ):
        with pytest.raises(ValueError, match=message):
            LLM(tokenizer_revision="t", **kwargs, **SMALL)
    with pytest.raises(ValueError, match=r"tokenizer_revision=' ' must be a non-empty string"):
        LLM("someone/tiny", tokenizer_revision=" ", **SMALL)
    assert calls == []  # every refusal before any download


def test_distributed_executor_backend_is_taken_as_vllms_llm_takes_it(tiny_dense_dir):
    """LLM(distributed_executor_backend=...) as vLLM's: mp and uni run one process here at
    tensor_parallel_size=1; what this engine does not do is a ValueError naming it, before loading."""
    for backend in ("mp", "uni", None):
        llm = LLM(str(tiny_dense_dir), distributed_executor_backend=backend, **SMALL)
        assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    refused = {
        "ray": r"distributed_executor_backend='ray': .*Ray is not used",
        "external_launcher": r"distributed_executor_backend='external_launcher': start each rank with torchrun",
        "threads": r"distributed_executor_backend='threads' must be one of mp, uni, external_launcher, ray",
    }
    for backend, message in refused.items():
        with pytest.raises(ValueError, match=message):
            LLM("/no/such/model", distributed_executor_backend=backend, **SMALL)  # refused before any load
    with pytest.raises(ValueError, match=r"distributed_executor_backend='uni' runs one process: tensor_parallel_size=2 needs mp"):
        LLM("/no/such/model", distributed_executor_backend="uni", tensor_parallel_size=2, **SMALL)


def test_the_model_argument_is_a_path_or_a_hub_id(tiny_dense_dir):
    """LLM(model) takes a str or an os.PathLike (a pathlib.Path); anything else is a ValueError naming
    it (it was a TypeError from deep in the loader)."""
    from pathlib import Path

    for bad in (5, ["x"], b"folder"):
        with pytest.raises(ValueError, match=r"model=.* must be a model folder, a .gguf file or a hub id"):
            LLM(bad, **SMALL)
    llm = LLM(Path(tiny_dense_dir), **SMALL)
    assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_every_llm_argument_of_a_wrong_kind_is_a_value_error(tiny_dense_dir):
    """Each keyword of LLM given a value of another kind (a string, a negative, a fraction, a list, a dict,
    a bool, NaN) is taken or is a ValueError naming it: never a TypeError or another exception from deep
    in the loader (dtype=[...] was 'unhashable type')."""
    import inspect
    import math

    odd = ["x", -1, 1.5, [1], {"a": 1}, True, math.nan]
    for name, p in inspect.signature(LLM.__init__).parameters.items():
        if name in ("self", "model") or name in SMALL:
            continue
        for value in odd:
            if value is p.default:
                continue
            try:
                LLM(str(tiny_dense_dir), **{**SMALL, name: value})
            except ValueError:
                pass
            except Exception as e:  # noqa: BLE001 (what the test is about)
                pytest.fail(f"LLM({name}={value!r}): {type(e).__name__}: {e}")
