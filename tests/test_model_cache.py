"""The converted-model cache (loader/model_cache.py): used on the next start, bitwise the same model,
invalidated by a changed file, a corrupt file ignored with one warning, off when asked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

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


@pytest.mark.parametrize("bits", [5, 6])
def test_a_q5_files_five_bit_layout_round_trips(tmp_path_factory, tiny_sentencepiece_vocab, cache_dir, monkeypatch, bits):
    """Q5_1 weights kept with 5-bit codes (the int4 layout, its bit plane and scale-and-zero), or Q6_K
    ones with 6-bit codes (the 2 high bits, scales per 16): the cached model reads back with that
    layout and kernel, bitwise, the high bits mapped from the file."""
    from fixtures_gguf import tiny_q6_k_gguf
    from pangu_infer.quant import cpu_int4

    if cpu_int4.library() is None or not cpu_int4.usable(256, 16):
        pytest.skip("the own int4 kernel does not run here")
    env, chosen = (cpu_int4.FIVE_BIT_ENV, cpu_int4.five_bit_chosen) if bits == 5 else (cpu_int4.SIX_BIT_ENV, cpu_int4.six_bit_chosen)
    monkeypatch.setenv(env, "1")
    chosen.cache_clear()
    try:
        if bits == 5:
            path = _tiny(tmp_path_factory, tiny_sentencepiece_vocab, "llama", "Q5_1").path
        else:
            path = tiny_q6_k_gguf(tmp_path_factory.mktemp("q6_k") / "tiny-q6_k.gguf", tiny_sentencepiece_vocab)
        first = LLM(str(path), enforce_eager=True)
        (written,) = _files(cache_dir)
        calls = _conversions(monkeypatch)
        second = LLM(str(path), enforce_eager=True)
        assert calls == [] and model_cache.same_model(first.model, second.model) is None
        kept = [m for m in second.model.modules() if type(m).__name__ == "PackedWeight" and m.kernel == f"int{bits}"]
        assert kept and all(m.hb.shape[-1] == 16 * (bits - 4) for m in kept)
        assert _mapped_from(kept[0].hb.data_ptr()) == str(written)
        assert torch.equal(_answer(first)[0], _answer(second)[0])
    finally:
        chosen.cache_clear()


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


def _linear_key(cache_dir, n: int = 2048):
    """A key for a bare Linear model of n x n float32 weights (a fake source file)."""
    source = cache_dir.parent / "weights.gguf"
    source.write_bytes(b"GGUF")
    return model_cache.cache_key(str(source), torch.float32, torch.device("cpu"), "auto")


def _meta_linear(n: int = 2048):
    return lambda extras: torch.nn.Linear(n, n, bias=False, device="meta")


def test_the_read_back_check_reads_the_file_through_one_buffer_not_the_mapping(cache_dir, monkeypatch):
    """store() checks the file it wrote against the model: read() maps it (its tensors views of the
    file), and the bytes are read from the disk through one buffer of DIRECT_CHUNK: the copy's mapping
    never becomes resident, so a first load never holds a second model (its peak RSS)."""
    monkeypatch.setattr(model_cache, "DIRECT_CHUNK", 256 << 10)
    model = torch.nn.Linear(2048, 2048, bias=False)  # a 16 MiB weight: 64 buffers' worth
    key = _linear_key(cache_dir)
    resident: list[int] = []
    real_same_bytes = model_cache._same_bytes

    def same_bytes(path, expected, writing, compared):
        assert compared is None
        return real_same_bytes(path, expected, writing, lambda: resident.append(_resident_bytes_of(str(path))))

    monkeypatch.setattr(model_cache, "_same_bytes", same_bytes)
    written = model_cache.store(model, key, _meta_linear())
    assert written is not None and written.is_file()
    assert len(resident) >= 64
    assert max(resident) <= 1 << 20, resident  # (the header and extras pages, at most)


def test_a_written_byte_that_differs_is_caught_and_nothing_is_kept(cache_dir, monkeypatch, capsys):
    model = torch.nn.Linear(2048, 2048, bias=False)
    key = _linear_key(cache_dir)
    real_write_file = model_cache._write_file

    def write_file(path, *args, **kwargs):
        real_write_file(path, *args, **kwargs)
        with open(path, "r+b") as f:  # one byte in the middle of the weight
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))

    monkeypatch.setattr(model_cache, "_write_file", write_file)
    assert model_cache.store(model, key, _meta_linear()) is None
    assert "tensor 'weight' differs" in capsys.readouterr().err
    assert not _files(cache_dir)


def test_a_tensor_the_read_back_does_not_take_from_the_file_is_caught(cache_dir, monkeypatch, capsys):
    """The bytes are compared at the header's offsets: a copy whose tensor is not the view of those
    bytes (here an equal tensor in memory) fails the check, though its values are the same."""
    model = torch.nn.Linear(2048, 2048, bias=False)
    key = _linear_key(cache_dir)
    real_read = model_cache.read

    def read(*args, **kwargs):
        copy, extras = real_read(*args, **kwargs)
        copy.weight = torch.nn.Parameter(copy.weight.detach().clone(), requires_grad=copy.weight.requires_grad)
        return copy, extras

    monkeypatch.setattr(model_cache, "read", read)
    assert model_cache.store(model, key, _meta_linear()) is None
    assert "tensor 'weight' is not read from its place in the file" in capsys.readouterr().err
    assert not _files(cache_dir)


def test_a_file_system_without_o_direct_gets_the_same_file_by_plain_writes(cache_dir, monkeypatch):
    """O_DIRECT (the default where the file system takes it) and plain buffered writes give the same
    bytes; a file system that refuses O_DIRECT at the first write (EINVAL) gets the plain ones."""
    import errno
    import fcntl

    model = torch.nn.Linear(1000, 999, bias=True)  # sizes off every alignment: a padded, cut tail
    key = _linear_key(cache_dir)
    build = lambda extras: torch.nn.Linear(1000, 999, bias=True, device="meta")  # noqa: E731
    direct = model_cache.store(model, key, build)
    assert direct is not None
    direct_bytes = direct.read_bytes()
    direct.unlink()
    real_write, refused = os.write, []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    plain = model_cache.store(model, key, build)
    assert refused and plain is not None and plain.read_bytes() == direct_bytes
    monkeypatch.undo()
    monkeypatch.delattr(os, "O_DIRECT")  # (no such flag: macOS)
    plain.unlink()
    assert model_cache.store(model, key, build).read_bytes() == direct_bytes


def test_the_temporary_file_of_a_process_that_died_mid_write_is_removed(cache_dir):
    model = torch.nn.Linear(64, 64, bias=False)
    key = _linear_key(cache_dir)
    target = model_cache.cache_file(key)
    cache_dir.mkdir(parents=True)
    dead = 2**22 + 12345  # above the largest pid Linux gives (pid_max <= 2^22)
    old = time.time() - model_cache.ABANDONED_SECONDS - 60
    abandoned = cache_dir / f"{target.name}.{dead}.x1.tmp"
    live = cache_dir / f"{target.name}.{os.getpid()}.x2.tmp"  # a running process: maybe still writing
    fresh = cache_dir / f"{target.name}.{dead}.x3.tmp"  # touched lately: maybe another machine's process
    forgotten = cache_dir / f"{target.name}.{os.getpid()}.x4.tmp"  # a day old: its pid reused since
    for tmp in (abandoned, live, fresh, forgotten):
        tmp.write_bytes(b"partial")
    os.utime(abandoned, (old, old))
    os.utime(live, (old, old))
    older = time.time() - model_cache.FORGOTTEN_SECONDS - 60
    os.utime(forgotten, (older, older))
    assert model_cache.store(model, key, _meta_linear(64)) == target
    assert not abandoned.exists() and live.exists() and fresh.exists() and not forgotten.exists()


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


# ------------------------------------------------------------------ writing in the background
@pytest.fixture
def held_writes(monkeypatch):
    """From now on every model's cache is written in the background (BACKGROUND_BYTES 0), and each
    background write waits for the event before it starts."""
    monkeypatch.setattr(model_cache, "BACKGROUND_BYTES", 0)
    go = threading.Event()
    real = model_cache._store

    def store(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            assert go.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_cache, "_store", store)
    yield go
    go.set()
    assert model_cache.wait(timeout=120)


def test_a_large_models_cache_is_written_after_the_load_returns_as_the_model_was_loaded(
    tiny_file, cache_dir, monkeypatch, held_writes, capsys
):
    """Above BACKGROUND_BYTES the load returns before the file is written (a 7B's write takes as long
    as its conversion); the engine serves meanwhile, and the file holds the model as the load left
    it, whatever the runner replaces afterwards."""
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    ref_logits, ref_tokens = _answer(LLM(str(tiny_file), enforce_eager=True))
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "1")
    capsys.readouterr()
    first = LLM(str(tiny_file), enforce_eager=True)
    assert "in the background" in capsys.readouterr().err
    assert not _files(cache_dir) and not model_cache.wait(timeout=0)  # not written yet
    logits, tokens = _answer(first)
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    for name, _ in list(first.model.named_children()):  # after the load: modules replaced
        setattr(first.model, name, torch.nn.Identity())
    held_writes.set()
    assert model_cache.wait(timeout=120)
    (written,) = _files(cache_dir)
    assert not list(cache_dir.glob("*.tmp"))
    calls = _conversions(monkeypatch)
    second = LLM(str(tiny_file), enforce_eager=True)
    assert calls == []
    logits, tokens = _answer(second)
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens


def test_a_load_of_the_same_file_waits_for_the_write_in_flight(tiny_file, cache_dir, monkeypatch, held_writes):
    LLM(str(tiny_file), enforce_eager=True)
    calls = _conversions(monkeypatch)
    threading.Timer(0.5, held_writes.set).start()
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []  # mapped from the file the first load's write left, not converted again
    assert len(_files(cache_dir)) == 1


_EXIT_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))  # (the cache key holds the thread count: the test process's)
from pangu_infer import LLM
from pangu_infer.loader import model_cache
model_cache.BACKGROUND_BYTES = 0
real = model_cache._write_file

def slow(path, head, writes, bar, writing, direct):
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline and not writing.cancel.is_set():
        time.sleep(0.02)
    return real(path, head, writes, bar, writing, direct)

model_cache._write_file = slow
LLM(sys.argv[1], enforce_eager=True)
print("loaded", flush=True)
"""


def test_a_process_that_ends_during_the_write_finishes_it_first(tiny_file, cache_dir, monkeypatch):
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tiny_file), "1.5", str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loaded" in proc.stdout and "finishing the write of" in proc.stderr
    assert len(_files(cache_dir)) == 1 and not list(cache_dir.glob("*.tmp"))
    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []


def test_ctrl_c_while_the_exit_waits_for_the_write_keeps_nothing(tiny_file, cache_dir):
    proc = subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT, str(tiny_file), "120", str(torch.get_num_threads())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "finishing the write of" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = "".join(lines) + rest
    assert "not cached (interrupted)" in err, err
    assert "Traceback" not in err and "terminate called" not in err and proc.returncode == 0, (proc.returncode, err)
    assert not _files(cache_dir) and not list(cache_dir.glob("*.tmp"))


def test_a_forked_child_does_not_wait_for_its_parents_write(tiny_file, cache_dir, held_writes):
    """The writing thread stays in the parent: a child forked meanwhile ends at once."""
    LLM(str(tiny_file), enforce_eager=True)  # its write held by the fixture
    pid = os.fork()
    if pid == 0:  # the child: exit through the interpreter's own shutdown (atexit handlers run)
        code = 0 if model_cache.wait(timeout=0) and not model_cache._WRITES else 1
        model_cache.finish_writes()
        os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the forked child waited for its parent's write")
    assert os.waitstatus_to_exitcode(status) == 0


_CLI_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from pangu_infer import cli
from pangu_infer.loader import model_cache
model_cache.BACKGROUND_BYTES = 0
real = model_cache._write_file

def slow(*args, **kwargs):
    time.sleep(1.5)
    return real(*args, **kwargs)

model_cache._write_file = slow
cli.main(["generate", "--model", sys.argv[1], "--prompt", "hi", "--max-tokens", "2", "--enforce-eager"], exit_when_done=True)
"""


def test_the_one_shot_cli_finishes_the_write_before_it_ends_the_process(tiny_file, cache_dir, monkeypatch):
    """`pangu-infer generate` ends with os._exit (no interpreter teardown, no atexit): it waits for
    the first load's cache write first, or every later run would convert the file again."""
    proc = subprocess.run([sys.executable, "-c", _CLI_SCRIPT, str(tiny_file), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "finishing the write of" in proc.stderr
    assert len(_files(cache_dir)) == 1 and not list(cache_dir.glob("*.tmp"))
    calls = _conversions(monkeypatch)
    LLM(str(tiny_file), enforce_eager=True)
    assert calls == []


def test_the_servers_shutdown_finishes_the_write(tiny_file, cache_dir, held_writes):
    """uvicorn re-raises the signal that stopped it once the app has shut down, and the process ends
    without atexit: the app's shutdown waits for the write instead."""
    from fastapi.testclient import TestClient

    from pangu_infer.server.app import create_app

    llm = LLM(str(tiny_file), enforce_eager=True)
    with TestClient(create_app(llm, served_model_name=["tiny"])):
        assert not _files(cache_dir)  # held
        threading.Timer(0.5, held_writes.set).start()
    assert len(_files(cache_dir)) == 1 and model_cache.wait(timeout=0)
