"""The fast GGUF header reader (loader/gguf_index.py) reads what `gguf.GGUFReader` reads: every
metadata value (as `ReaderField.contents()` gives it, with its Python type) and every tensor record
(type, shape, sizes, offset, the data view's dtype, shape and bytes), on the real demo file, on
files of every value type in both byte orders, and on quantized tensors."""

from __future__ import annotations

import numpy as np
import pytest

from pangu_infer.loader.gguf import GGUFError, read_gguf
from pangu_infer.loader.gguf_index import GGUFIndexError, read_gguf_index


def assert_same_as_gguf_reader(path) -> None:
    from gguf import GGUFReader

    ours = read_gguf_index(path)
    ref = GGUFReader(path)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        got = ours.metadata[key]
        assert got == value and type(got) is type(value), key
        if isinstance(value, list) and value:
            assert [type(v) for v in got] == [type(v) for v in value], key
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset) == (
            a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset
        )
        assert b.shape.tolist() == a.shape.tolist()
        assert b.data.dtype == a.data.dtype and b.data.shape == a.data.shape, a.name
        assert np.array_equal(b.data, a.data, equal_nan=a.data.dtype.kind == "f"), a.name


def test_the_demo_file_reads_as_gguf_reader_reads_it(smollm2_gguf_path):
    assert_same_as_gguf_reader(smollm2_gguf_path)


def test_quantized_tensors_read_as_gguf_reader_reads_them(tiny_pangu_gguf_q8_0, tiny_llama_bias_gguf):
    assert_same_as_gguf_reader(tiny_pangu_gguf_q8_0.path)
    assert_same_as_gguf_reader(tiny_llama_bias_gguf.path)


@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
def test_every_value_type_in_either_byte_order(tmp_path, big_endian):
    import gguf

    path = tmp_path / "kinds.gguf"
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_uint8("u8", 200)
    w.add_int8("i8", -100)
    w.add_uint16("u16", 60000)
    w.add_int16("i16", -30000)
    w.add_uint32("u32", 4_000_000_000)
    w.add_int32("i32", -2_000_000_000)
    w.add_uint64("u64", 2**63 + 5)
    w.add_int64("i64", -(2**62))
    w.add_float32("f32", 1e-5)
    w.add_float64("f64", 1.0 / 3)
    w.add_bool("yes", True)
    w.add_bool("no", False)
    w.add_string("text", "中文 ✓ and \x00 inside")
    w.add_string("empty", "")
    w.add_array("strings", ["a", "", "▁b", "<0x0A>", "漢字"])
    w.add_array("ints", [1, -2, 3])
    w.add_array("floats", [0.5, -1.25])
    w.add_array("bools", [True, False])
    w.add_array("none", [])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    w.add_tensor("i32", np.arange(5, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_reader(path)
    md = read_gguf_index(path).metadata
    assert md["u64"] == 2**63 + 5 and md["i8"] == -100 and md["text"] == "中文 ✓ and \x00 inside"


def test_a_truncated_or_foreign_file_is_an_error_naming_it(tmp_path, tiny_pangu_gguf_path):
    raw = tiny_pangu_gguf_path.read_bytes()
    for cut in (10, 200, len(raw) // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(raw[:cut])
        with pytest.raises(GGUFIndexError, match=str(bad)):
            read_gguf_index(bad)
        with pytest.raises(GGUFError, match="cannot read GGUF file"):
            read_gguf(bad)
    # cut inside the vocabulary's string array, at each of 48 bytes in a row: some cut falls in (or
    # at the start of) a token's 8-byte length, which was struct.error (not a ValueError: a traceback)
    start = raw.index(b"tokenizer.ggml.tokens") + 200
    for cut in range(start, start + 48):
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(raw[:cut])
        with pytest.raises(GGUFIndexError, match=f"{bad}: a string at byte \\d+ runs past the end of the file"):
            read_gguf_index(bad)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(32))
    with pytest.raises(GGUFIndexError, match="version 7"):
        read_gguf_index(other)
