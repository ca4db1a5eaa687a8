"""The converted-model cache (loader/model_cache.py): used on the next start, bitwise the same model,
invalidated by a changed file, a corrupt file ignored with one warning, off when asked."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fixtures_gguf import _tiny
from pangu_infer import LLM, SamplingParams
from pangu_infer.device import default_dtype
from pangu_infer.loader import gguf as gguf_loader
from pangu_infer.loader import gguf_tensors, model_cache

PROMPT = "hello world, this is a test"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "1")
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0"])
def tiny_source(request, tmp_path_factory, tiny_sentencepiece_vocab):
    return _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "llama", request.param).path


@pytest.fixture
def tiny_file(tmp_path, tiny_source):
    """A private copy: the tests change its time stamp."""
    path = tmp_path / tiny_source.name
    shutil.copy(tiny_source, path)
    return path


def _conversions(monkeypatch) -> list:
    """Calls of the GGUF converter and header reader from now on."""
    calls: list = []
    real_iter, real_read = gguf_tensors.iter_weights, gguf_loader.read_gguf

    def iter_weights(*a, **k):
        calls.append("convert")
        return real_iter(*a, **k)

    def read_gguf(*a, **k):
        calls.append("header")
        return real_read(*a, **k)

    monkeypatch.setattr(gguf_tensors, "iter_weights", iter_weights)
    monkeypatch.setattr(gguf_loader, "read_gguf", read_gguf)
    return calls


def _answer(llm: LLM) -> tuple[torch.Tensor, list[int]]:
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    return llm.logits(ids), list(out)


def _files(folder) -> list:
    return sorted(folder.glob("*.safetensors")) if folder.exists() else []


def test_second_load_maps_the_cache_and_is_bitwise_the_same(tiny_file, cache_dir, monkeypatch):
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    ref_logits, ref_tokens = _answer(LLM(str(tiny_file), enforce_eager=True))
    assert not _files(cache_dir)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "1")
    first = LLM(str(tiny_file), enforce_eager=True)
    (written,) = _files(cache_dir)
    calls = _conversions(monkeypatch)
    second = LLM(str(tiny_file), enforce_eager=True)
    assert calls == []  # neither the converter nor the GGUF header: all from the cache
    assert model_cache.same_model(first.model, second.model) is None
    assert repr(first.model) == repr(second.model)
    logits, tokens = _answer(second)
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    assert second.tokenizer.encode(PROMPT) == first.tokenizer.encode(PROMPT)
    # Mapped from the file, not copied: the weights' bytes live inside the file's mapping.
    linear = next(m for m in second.model.modules() if type(m).__name__ == "PackedWeight")
    assert _mapped_from(linear.data.data_ptr()) == str(written)


def test_a_q4_0_files_scales_only_layout_round_trips(tmp_path_factory, tiny_sentencepiece_vocab, cache_dir, monkeypatch):
    """Q4_0's int4 weights in the own kernel's layout keep one value per group (no zeros): the cached
    model reads back with that layout, bitwise."""
    from pangu_infer.quant import cpu_int4

    if cpu_int4.library() is None:
        pytest.skip("the own int4 kernel does not run here")
    monkeypatch.setenv(cpu_int4.ENV, "own")
    cpu_int4.chosen.cache_clear()
    try:
        path = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "llama", "Q4_0").path
        first = LLM(str(path), enforce_eager=True)
        calls = _conversions(monkeypatch)
        second = LLM(str(path), enforce_eager=True)
        assert calls == [] and model_cache.same_model(first.model, second.model) is None
        own = [m for m in second.model.modules() if type(m).__name__ == "PackedWeight" and m.kernel == "int4_vnni"]
        assert own and all(m.scales.shape[-2] == 1 for m in own)
        assert torch.equal(_answer(first)[0], _answer(second)[0])
    finally:
        cpu_int4.chosen.cache_clear()  # the next test measures or reads its choice again


def _mapped_from(address: int):
    """The file whose mapping holds `address` (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def test_the_memory_check_reads_the_header_once_and_a_cache_hit_by_its_file(tiny_file, cache_dir, monkeypatch):
    """The check before a load (loader.check_weights_fit) costs a start no second header read: on a
    miss it counts the header the load reads, on a hit the converted model's file (no header at
    all); either way a model that does not fit is refused."""
    from pangu_infer import memory

    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    assert calls.count("header") == 1 and "convert" in calls
    (written,) = _files(cache_dir)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: written.stat().st_size // 2)
    calls.clear()
    with pytest.raises(ValueError, match="needs about .* GiB of memory for its weights"):
        LLM(str(tiny_file), enforce_eager=True)
    assert "convert" not in calls  # (the refusal reads the header for its hints)
    calls.clear()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: written.stat().st_size * 2)
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []


def test_a_changed_file_invalidates_its_cache(tiny_file, cache_dir, monkeypatch):
    LLM(str(tiny_file), enforce_eager=True)
    (old,) = _files(cache_dir)
    st = os.stat(tiny_file)
    os.utime(tiny_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched
    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    assert "convert" in calls
    (new,) = _files(cache_dir)  # the new version's file replaced the old one
    assert new != old


def test_caches_of_other_settings_stay_side_by_side(tiny_file, cache_dir, monkeypatch):
    # The other setting is a dtype that is not this CPU's default (float32 is the default where
    # bf16 is only emulated, bfloat16 elsewhere).
    other = "bfloat16" if default_dtype(torch.device("cpu")) == torch.float32 else "float32"
    LLM(str(tiny_file), enforce_eager=True)
    LLM(str(tiny_file), enforce_eager=True, dtype=other)
    assert len(_files(cache_dir)) == 2
    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    LLM(str(tiny_file), enforce_eager=True, dtype=other)
    assert calls == []


def test_kernel_choices_measured_elsewhere_leave_the_cache_valid_and_a_changed_one_converts_again(
    tiny_file, cache_dir, monkeypatch, tmp_path
):
    """The per-machine kernel choices (kernels.json) decide a converted model's layout. A choice
    added later (another model's shapes, another process, a test beside this one) must not throw
    the cache away; a choice the writing process had made that now reads otherwise (measured
    again, or the file deleted) must convert again, and the rewritten file is used next time."""
    from pangu_infer import machine

    kernels = tmp_path / "kernels.json"
    if os.path.exists(machine.cache_path()):
        shutil.copy(machine.cache_path(), kernels)
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(kernels))
    monkeypatch.setattr(machine, "_MADE", {})
    assert machine.cached_choice("test_layout", lambda: "a", lambda v: v in ("a", "b")) == "a"
    LLM(str(tiny_file), enforce_eager=True)
    (written,) = _files(cache_dir)

    def edit(**entries) -> None:  # what another process's cached_choice does to the file
        stored = json.loads(kernels.read_text())
        stored[machine.machine_key()] |= entries
        kernels.write_text(json.dumps(stored))

    calls = _conversions(monkeypatch)
    edit(test_other_shapes=123)
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []
    edit(test_layout="b")
    monkeypatch.setattr(machine, "_MADE", {})  # as a process started now: it lays weights out by "b"
    assert machine.cached_choice("test_layout", lambda: "a", lambda v: v in ("a", "b")) == "b"
    LLM(str(tiny_file), enforce_eager=True)
    assert "convert" in calls
    assert _files(cache_dir) == [written]  # rewritten in place, under the same key
    calls.clear()
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []  # the rewritten file holds "b"
    kernels.unlink()
    LLM(str(tiny_file), enforce_eager=True)
    assert "convert" in calls


@pytest.mark.parametrize("damage", ["truncate", "header", "key"])
def test_a_corrupt_cache_is_ignored_with_one_warning_and_rewritten(tiny_file, cache_dir, monkeypatch, capsys, damage):
    ref_logits, ref_tokens = _answer(LLM(str(tiny_file), enforce_eager=True))
    (path,) = _files(cache_dir)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
    else:  # a valid file written for another key under this name
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        key = json.loads(header["__metadata__"]["key"])
        header["__metadata__"]["key"] = json.dumps(key | {"size": key["size"] + 1}, sort_keys=True)
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :])
    capsys.readouterr()
    calls = _conversions(monkeypatch)
    logits, tokens = _answer(LLM(str(tiny_file), enforce_eager=True))
    warned = [line for line in capsys.readouterr().err.splitlines() if "model cache" in line]
    assert len(warned) == 1 and "ignoring" in warned[0] and "normally" in warned[0], warned
    assert "convert" in calls
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    calls.clear()
    LLM(str(tiny_file), enforce_eager=True)  # the normal load rewrote it
    assert calls == []


def test_the_cache_is_off_when_asked(tiny_file, cache_dir, monkeypatch):
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    LLM(str(tiny_file), enforce_eager=True)
    assert not _files(cache_dir)


def test_the_cache_file_is_safetensors_with_aligned_tensors(tiny_file, cache_dir):
    from safetensors import safe_open

    llm = LLM(str(tiny_file), enforce_eager=True)
    (path,) = _files(cache_dir)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert (8 + n) % model_cache.ALIGN == 0
    assert all(v["data_offsets"][0] % model_cache.ALIGN == 0 for k, v in header.items() if not k.startswith(("__metadata__", "__pad__")))
    state = dict(llm.model.state_dict())
    with safe_open(str(path), "pt") as f:
        names = [k for k in f.keys() if not k.startswith("__pad__")]
        assert names
        for name in names:
            if name in state:
                assert torch.equal(f.get_tensor(name), state[name]), name


def test_demo_model_from_the_cache_gives_bitwise_the_same_logits(smollm2_gguf_path, tmp_path, cache_dir, monkeypatch):
    """The demo (Q4_1 blocks as int4, the tied Q8_0 embedding and head as int8): cached load == fresh load."""
    path = tmp_path / smollm2_gguf_path.name
    os.symlink(smollm2_gguf_path, path)
    fresh = LLM(str(path), enforce_eager=True)
    ids = fresh.tokenizer.encode(PROMPT)
    ref = fresh.logits(ids)
    calls = _conversions(monkeypatch)
    cached = LLM(str(path), enforce_eager=True)
    assert calls == []
    assert torch.equal(cached.logits(ids), ref)
    emb, head = cached.model.model.embed_tokens, cached.model.lm_head
    if hasattr(emb, "qweight") and head.weight.method == "int8":  # the tied int8 head shares the embedding's bytes
        assert head.weight.data.data_ptr() == emb.qweight.data_ptr()


def test_the_cli_flag_turns_the_cache_off(tiny_file, cache_dir, monkeypatch, capsys):
    from pangu_infer import cli

    argv = ["generate", "--model", str(tiny_file), "--prompt", "hi", "--max-tokens", "1", "--enforce-eager"]
    assert cli.main(argv + ["--no-model-cache"]) == 0
    assert not _files(cache_dir)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "1")
    assert cli.main(argv) == 0
    assert len(_files(cache_dir)) == 1


def test_a_float_load_is_not_cached(tiny_file, cache_dir):
    LLM(str(tiny_file), enforce_eager=True, quantization="none")
    assert not _files(cache_dir)


def test_a_new_engine_version_replaces_the_old_files(tiny_file, cache_dir, monkeypatch):
    LLM(str(tiny_file), enforce_eager=True)
    (old,) = _files(cache_dir)
    monkeypatch.setattr(model_cache, "source_hash", lambda: "another-version")
    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    assert "convert" in calls
    (new,) = _files(cache_dir)
    assert new != old


def _resident_bytes_of(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                current = len(parts) > 5 and parts[5] == path
            elif current and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


def test_the_read_back_check_keeps_one_slice_of_the_copy_resident(cache_dir, monkeypatch):
    """store() reads the written file back to compare it: each slice of the mapped copy is given back
    once compared, so a first load never holds a second resident model (its peak RSS)."""
    slice_bytes = 256 << 10
    monkeypatch.setattr(model_cache, "COMPARE_BYTES", slice_bytes)
    model = torch.nn.Linear(2048, 2048, bias=False)  # a 16 MiB weight: 64 slices
    source = cache_dir.parent / "weights.gguf"
    source.write_bytes(b"GGUF")
    key = model_cache.cache_key(str(source), torch.float32, torch.device("cpu"), "auto")
    resident: list[int] = []
    real_same = model_cache.same_model

    def same_model(a, b, compared=None):
        def watch(t):
            compared(t)
            resident.append(_resident_bytes_of(str(model_cache.cache_file(key))))

        return real_same(a, b, compared=watch)

    monkeypatch.setattr(model_cache, "same_model", same_model)
    written = model_cache.store(model, key, lambda extras: torch.nn.Linear(2048, 2048, bias=False, device="meta"))
    assert written is not None and written.is_file()
    assert len(resident) >= 64
    # Never the whole copy (16 MiB): a slice, plus what the kernel maps around a fault (fault-around,
    # readahead) of a file whose pages are all in the page cache, having just been written.
    assert max(resident) <= 4 << 20, resident


def _mapped_files() -> set:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return {parts[5] for parts in (line.split() for line in f) if len(parts) > 5}


def test_a_large_files_first_load_shows_its_conversion_and_cache_write(tiny_file, cache_dir, monkeypatch, capsys):
    """Files above loader.PROGRESS_BYTES (here: every file) get a bar for each half of a first load
    (a 7B's conversion and its cache write take over ten seconds each); the cached load shows none."""
    import pangu_infer.loader as loader

    monkeypatch.setattr(loader, "PROGRESS_BYTES", 0)
    for f in _files(cache_dir):
        f.unlink()
    capsys.readouterr()
    LLM(str(tiny_file), enforce_eager=True)
    err = capsys.readouterr().err
    assert "converting weights" in err and "100%" in err and "writing the model cache" in err
    LLM(str(tiny_file), enforce_eager=True)
    err = capsys.readouterr().err
    assert "converting weights" not in err and "writing the model cache" not in err
    monkeypatch.setattr(loader, "PROGRESS_BYTES", 256 << 20)
    for f in _files(cache_dir):
        f.unlink()
    LLM(str(tiny_file), enforce_eager=True)
    err = capsys.readouterr().err
    assert "converting weights" not in err and "writing the model cache" not in err  # a small file: quiet
