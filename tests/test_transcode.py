"""pangu_infer.quant.transcode: the C repacking of 4-bit weights gives the very bytes of the Python it
replaces, for GGUF Q4_0 / Q4_1 blocks (every f16 scale value) and for the int4 kernel's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_gguf import one_tensor_gguf
from pangu_infer.loader import load_model
from pangu_infer.loader import gguf_tensors
from pangu_infer.quant import cpu_int4, transcode
from pangu_infer.quant.formats import QuantizationConfig, QuantizedTensor, pack_int4
from pangu_infer.quant.modules import PackedWeight

pytestmark = pytest.mark.skipif(transcode.library() is None, reason="no C compiler: the Python repacking runs")


def _python(monkeypatch):
    """transcode's library switched off for the rest of the test (the Python path)."""
    monkeypatch.setenv(transcode.ENV, "0")
    transcode.library.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_library():
    transcode.library.cache_clear()
    yield
    transcode.library.cache_clear()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _blocks_with_every_f16(qtype_name: str, rows: int = 512):
    """Random block bytes of this type, 65,536 blocks whose f16 scales (d) run through every bit
    pattern (subnormals, infinities and NaNs included), and whose second f16 (Q4_1's and Q5_1's m, Q4_K's and Q5_K's dmin)
    through them all shuffled. Returns (bytes [rows, row bytes], K)."""
    import gguf

    weights, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    per_row = (1 << 16) // rows
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(rows, per_row, size), dtype=np.uint8)
    every_f16 = np.arange(1 << 16, dtype=np.uint16).reshape(rows, per_row).view(np.uint8).reshape(rows, per_row, 2)
    d_at = size - 2 if qtype_name == "Q6_K" else 0  # Q6_K keeps d last
    blocks[..., d_at : d_at + 2] = every_f16
    if qtype_name in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"):
        blocks[..., 2:4] = rng.permutation(every_f16.reshape(-1, 2), axis=0).reshape(rows, per_row, 2)
    return blocks.reshape(rows, -1), per_row * weights


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_blocks_give_the_python_paths_bytes_for_every_f16_scale(tmp_path, monkeypatch, qtype_name):
    """Random codes (and Q4_K's 6-bit scales and mins), every f16 scale: the same codes, scales and
    zeros as the numpy path."""
    from gguf import GGMLQuantizationType as Q

    raw, k = _blocks_with_every_f16(qtype_name)
    t = one_tensor_gguf(tmp_path / "t.gguf", raw, Q[qtype_name])
    setting = QuantizationConfig("int4", 32)
    fast = gguf_tensors.convert(t, setting)
    _python(monkeypatch)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, as in C
        slow = gguf_tensors.convert(t, setting)
    assert fast.qweight.shape == (raw.shape[0], k // 2) and torch.equal(fast.qweight, slow.qweight)
    assert _same_bits(fast.scale, slow.scale)
    nan = slow.zero.isnan()  # inf - inf and NaN payloads: a NaN either way, its bits the hardware's
    assert torch.equal(fast.zero.isnan(), nan) and _same_bits(fast.zero[~nan], slow.zero[~nan])
    assert nan.any() == (qtype_name != "Q4_0")


@pytest.mark.parametrize("qtype_name", ["Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantized_blocks_are_ggufs_own_values_for_every_f16_scale(qtype_name):
    """The types kept as int8 are dequantized first: the C pass gives gguf's numpy values bit for bit."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    raw, k = _blocks_with_every_f16(qtype_name)
    fast = transcode.dequantize(raw, qtype_name)
    with np.errstate(invalid="ignore", over="ignore"):
        want = torch.from_numpy(dequantize(raw, Q[qtype_name]))
    assert fast.shape == want.shape == (raw.shape[0], k)
    nan = want.isnan()
    assert torch.equal(fast.isnan(), nan) and _same_bits(fast[~nan], want[~nan])
    assert transcode.dequantize(raw, "Q2_K") is None  # other types: gguf's dequantizer runs


@pytest.mark.parametrize("rows", [16, 40, 61])
def test_kernel_layout_gives_the_python_paths_bytes(monkeypatch, rows):
    """Whole blocks of 16 rows and a padded last block; with zeros (2 values per group) and without."""
    if not cpu_int4.usable(256, 32):
        pytest.skip("the own int4 kernel's layout is not used here")
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (2, rows, 256), dtype=torch.uint8, generator=g)  # two experts
    scale = torch.rand(2, rows, 8, generator=g).to(torch.bfloat16)
    for zero in (torch.rand(2, rows, 8, generator=g).to(torch.bfloat16), torch.zeros(2, rows, 8, dtype=torch.bfloat16)):
        qt = QuantizedTensor("int4", pack_int4(q), scale, zero)
        fast = PackedWeight(qt, torch.device("cpu"))
        with monkeypatch.context() as m:
            _python(m)
            slow = PackedWeight(qt, torch.device("cpu"))
        assert fast.kernel == slow.kernel == "int4_vnni"
        assert torch.equal(fast.data, slow.data) and _same_bits(fast.scales, slow.scales)
        transcode.library.cache_clear()


def _layout_kernel_here(k: int = 256) -> None:
    if not cpu_int4.usable(k, 32):
        pytest.skip("the own int4 kernel's layout is not used here")


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_blocks_laid_out_directly_give_the_portable_paths_layout_for_every_f16_scale(tmp_path, qtype_name):
    """to_layout (Q4 blocks straight into the kernel's layout) against the blocks converted to the
    portable format and packed from it (PackedWeight), every f16 scale and zero; NaN stays NaN."""
    from gguf import GGMLQuantizationType as Q

    raw, k = _blocks_with_every_f16(qtype_name)
    _layout_kernel_here(k)
    t = one_tensor_gguf(tmp_path / "t.gguf", raw, Q[qtype_name])
    with np.errstate(invalid="ignore", over="ignore"):
        want = PackedWeight(gguf_tensors.convert(t, QuantizationConfig("int4", 32)), torch.device("cpu"))
    blocks = transcode.Q4Blocks(np.ascontiguousarray(raw), qtype_name, None, materialize=None)
    assert blocks.shape == (raw.shape[0], k)
    layout = cpu_int4.Layout(raw.shape[0], k, 32, blocks.zero_values)
    assert blocks.lay_out(0, layout.data, layout.sz)
    assert torch.equal(layout.data, want.data)
    nan = want.scales.isnan()
    assert layout.sz.shape == want.scales.shape and torch.equal(layout.sz.isnan(), nan)
    assert torch.equal(_bits(layout.sz[~nan]), _bits(want.scales[~nan]))


@pytest.mark.parametrize("rows", [40, 61])
def test_pieces_laid_out_at_any_row_in_any_order_give_the_packed_whole(rows):
    """A fused weight's pieces written one after another at rows that are not multiples of 16 (a
    block of the layout shared by two pieces), one piece's rows reordered (llama.cpp's permuted q/k),
    a padded last block, and a piece with zeros after pieces without (the layout widened): the same
    bytes as the whole weight packed from the portable format."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    _layout_kernel_here()
    g = np.random.default_rng(rows)
    kinds = [("Q4_0", 0, 21), ("Q4_0", 21, 30), ("Q4_1", 30, rows)]
    w = g.standard_normal((rows, 256)).astype(np.float32)
    parts = [gguf.quants.quantize(w[a:b], Q[kind]) for kind, a, b in kinds]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(rows))  # piece 2's row i is its row order[i]
    layout = cpu_int4.Layout(rows, 256, 32, 1)
    for i, ((kind, a, b), part) in enumerate(zip(kinds, parts)):
        blocks = transcode.Q4Blocks(part, kind, order if i == 1 else None, materialize=None)
        if blocks.zero_values > layout.zero_values:
            layout.with_zeros()
        assert blocks.lay_out(a, layout.data, layout.sz)
    # the reference: every piece in portable form (C pairs), rows reordered, stacked, packed
    portable = []
    for i, ((kind, a, b), part) in enumerate(zip(kinds, parts)):
        packed = torch.empty(b - a, 128, dtype=torch.uint8)
        sc, ze = transcode.q4_to_pairs(part, kind, packed)
        qt = QuantizedTensor("int4", packed, sc.to(torch.bfloat16), ze.to(torch.bfloat16))
        portable.append(qt[order] if i == 1 else qt)
    want = PackedWeight(QuantizedTensor.cat(portable), torch.device("cpu"))
    assert layout.zero_values == 2 and torch.equal(layout.data, want.data) and torch.equal(_bits(layout.sz), _bits(want.scales))
    x = torch.randn(3, 256)
    assert torch.equal(PackedWeight(layout, torch.device("cpu"))(x), want(x))


def _mixed_tiny(tmp_path, vocab, arch: str, qtype_name: str, narrow_kv: bool, odd: str = "k"):
    """The tiny Pangu as a GGUF file of `arch`; narrow_kv: 8 heads of 8 and one of key/value (k and v
    take 8 rows each: v starts at row 72 of q/k/v, inside a block of 16) and one layer's k (or `odd`)
    in Q4_1 among the others (a fused weight of two types)."""
    import gguf

    from fixtures_gguf import tiny_pangu_config, tiny_pangu_tensors, write_gguf

    config = tiny_pangu_config(vocab)
    if arch == "llama":
        config = {k: v for k, v in config.items() if k != "bias"}
        config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True}
    qtypes = {}
    if narrow_kv:
        config |= {"num_attention_heads": 8, "num_key_value_heads": 1}
        qtypes = {f"model.layers.1.self_attn.{odd}_proj.weight": gguf.GGMLQuantizationType.Q4_1}
    path = tmp_path / f"tiny-{arch}-{qtype_name}.gguf"
    write_gguf(path, arch=arch, config=config, tensors=tiny_pangu_tensors(config), vocab=vocab,
               qtype=gguf.GGMLQuantizationType[qtype_name], qtypes=qtypes)
    return path


@pytest.mark.parametrize(
    "arch, qtype_name, narrow_kv, odd",
    [
        ("pangu-embedded", "Q4_0", False, ""), ("llama", "Q4_1", False, ""), ("llama", "Q4_0", True, "k"),
        ("pangu-embedded", "Q8_0", False, ""), ("llama", "Q8_0", True, "k"), ("llama", "Q8_0", True, "q"),
    ],
)
def test_a_gguf_file_loads_to_the_same_tensors_either_way(tmp_path, tiny_sentencepiece_vocab, monkeypatch, arch, qtype_name, narrow_kv, odd):
    """The C passes (Q4 blocks written straight into the int4 kernel's layout, Q8_0 rows straight
    into the int8 weight) against the Python conversion: every buffer and parameter bit for bit,
    llama's permuted q/k and a fused weight of two types included (Q4_0 and Q4_1 in one layout; a
    Q4_1 piece of an int8 q/k/v in the portable form, after or before the rows written in place);
    and no tensor took the portable form but the int4 embedding and those Q4_1 pieces."""
    path = _mixed_tiny(tmp_path, tiny_sentencepiece_vocab, arch, qtype_name, narrow_kv, odd)
    converted: list[str] = []
    real_convert = gguf_tensors.convert

    def convert(t, setting):
        converted.append(t.name)
        return real_convert(t, setting)

    monkeypatch.setattr(gguf_tensors, "convert", convert)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    fast = load_model(str(path), torch.float32, torch.device("cpu"), load_tokenizer=False)
    if qtype_name.startswith("Q4") and cpu_int4.usable(64, 32):
        assert converted == ["token_embd.weight"]
    if qtype_name == "Q8_0":
        assert converted == ([f"blk.1.attn_{odd}.weight"] if narrow_kv else [])
    _python(monkeypatch)
    slow = load_model(str(path), torch.float32, torch.device("cpu"), load_tokenizer=False)
    a, b = _tensors(fast.model), _tensors(slow.model)
    assert a.keys() == b.keys() and any(isinstance(m, PackedWeight) for m in fast.model.modules())
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_bits(a[name]), _bits(b[name])), name
    ids = torch.tensor([1, 5, 9, 4])

    def logits(m):
        return m.compute_logits(m(ids, torch.arange(4)))

    assert torch.equal(logits(fast.model), logits(slow.model))


def test_where_the_own_int4_kernel_is_not_used_q4_blocks_go_the_portable_way(tmp_path, tiny_sentencepiece_vocab, monkeypatch):
    """No cpu_int4 kernel here (not chosen, or PANGU_INFER_INT4_KERNEL=aten): the hook does not lay
    the blocks out, they are converted to the portable format and packed for aten's kernel, and the
    model gives the logits of a float model of the same dequantized weights."""
    path = _mixed_tiny(tmp_path, tiny_sentencepiece_vocab, "llama", "Q4_0", narrow_kv=True, odd="k")
    monkeypatch.setattr(cpu_int4, "chosen", lambda: False)
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    converted: list[str] = []
    real_convert = gguf_tensors.convert
    monkeypatch.setattr(gguf_tensors, "convert", lambda t, setting: converted.append(t.name) or real_convert(t, setting))
    kept = load_model(str(path), torch.float32, torch.device("cpu"), load_tokenizer=False)
    kernels = {m.kernel for m in kept.model.modules() if isinstance(m, PackedWeight) and m.method == "int4"}
    assert kernels and "int4_vnni" not in kernels
    assert "blk.0.attn_q.weight" in converted and "blk.1.ffn_down.weight" in converted
    plain = load_model(str(path), torch.float32, torch.device("cpu"), load_tokenizer=False, quantization="none")
    ids = torch.tensor([1, 5, 9, 4])
    got, want = (m.compute_logits(m(ids, torch.arange(4))) for m in (kept.model, plain.model))
    assert torch.allclose(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("qtype_name", ["Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_int8_from_blocks_in_one_pass_is_the_quantized_dequantized_rows(qtype_name):
    """dequantize_int8 (Q8_0 / Q6_K blocks to int8 rows and bf16 scales, no float copy) gives
    _quantize_int8 of gguf's dequantized rows, every f16 scale; a row with a NaN: scale NaN, codes 0."""
    from pangu_infer.quant.formats import _quantize_int8

    import gguf

    raw, k = _blocks_with_every_f16(qtype_name)
    # and the same blocks with every f16 finite (the high byte of each kept below the infinities')
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]][1]
    tame = raw.reshape(raw.shape[0], -1, size).copy()
    for at in (size - 1,) if qtype_name == "Q6_K" else (1, 3) if qtype_name in ("Q4_K", "Q5_K", "Q5_1") else (1,):
        tame[..., at] &= 0xBB
    for blocks in (raw, tame.reshape(raw.shape)):
        w = transcode.dequantize(blocks, qtype_name)
        want_q, want_s = _quantize_int8(w)
        q = torch.empty(blocks.shape[0], k, dtype=torch.int8)
        scale = torch.empty(blocks.shape[0], dtype=torch.bfloat16)
        assert transcode.dequantize_int8(blocks, qtype_name, q, scale)
        finite = torch.isfinite(w).all(1)
        assert finite.any()
        assert torch.equal(q[finite], want_q[finite]) and torch.equal(_bits(scale[finite]), _bits(want_s[finite]))
        nan = w.isnan().any(1)
        assert scale[nan].isnan().all() and not q[nan].any()
    assert finite.all()  # (the tame blocks)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers()) | dict(model.named_parameters())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="pairs_to_octets"):
        transcode.pairs_to_octets(torch.zeros(16, 8, dtype=torch.uint8), torch.zeros(1, 1, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="q4_to_pairs"):
        transcode.q4_to_pairs(np.zeros((2, 18), dtype=np.uint8), "Q4_0", torch.zeros(2, 8, dtype=torch.uint8))
    data, sz = torch.zeros(1, 4, 64, dtype=torch.uint8), torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="to_layout: Q4_0 rows"):  # 17 rows into one block of 16
        transcode.to_layout(np.zeros((17, 18), dtype=np.uint8), "Q4_0", None, 0, data, sz)
    with pytest.raises(ValueError, match="to_layout: Q4_0 rows"):  # a source row out of range
        transcode.to_layout(np.zeros((2, 18), dtype=np.uint8), "Q4_0", torch.tensor([0, 2]), 0, data, sz)
    with pytest.raises(ValueError, match="zeros"):  # Q4_1's zeros have no room
        transcode.to_layout(np.zeros((2, 20), dtype=np.uint8), "Q4_1", None, 0, data, sz)
    with pytest.raises(ValueError, match="dequantize_int8"):
        transcode.dequantize_int8(np.zeros((2, 34), dtype=np.uint8), "Q8_0", torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dequantize_int8"):  # a source row out of range
        transcode.dequantize_int8(np.zeros((2, 34), dtype=np.uint8), "Q8_0", torch.zeros(2, 32, dtype=torch.int8), torch.zeros(2, dtype=torch.bfloat16), torch.tensor([1, 2]))


@pytest.mark.parametrize("rows", [32, 40])
def test_a_given_up_weight_is_rearranged_in_its_own_storage(rows):
    """consume=True (the loader's own copy): the same layout as a new tensor, in the pairs' storage
    where no row is padded (32), in a new tensor where the last block is (40)."""
    if not cpu_int4.usable(256, 32):
        pytest.skip("the own int4 kernel's layout is not used here")
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (3, rows, 256), dtype=torch.uint8, generator=g)  # three experts
    qt = QuantizedTensor("int4", pack_int4(q), torch.rand(3, rows, 8, generator=g).to(torch.bfloat16), torch.zeros(3, rows, 8, dtype=torch.bfloat16))
    want = PackedWeight(qt, torch.device("cpu"))
    given = QuantizedTensor("int4", qt.qweight.clone(), qt.scale, qt.zero)
    got = PackedWeight(given, torch.device("cpu"), consume=True)
    assert torch.equal(got.data, want.data) and _same_bits(got.scales, want.scales)
    assert (got.data.data_ptr() == given.qweight.data_ptr()) == (rows % 16 == 0)
    x = torch.randn(2, 256).to(torch.bfloat16)
    assert torch.equal(got(x, expert=1), want(x, expert=1))


# ------------------------------------------------------------------ Q5 blocks into the 5-bit layout


def _q5_reference(raw: np.ndarray, kind: str):
    """Q5_0 / Q5_1 / Q5_K blocks [rows, bytes] read from GGML's block layout in numpy: the 5-bit codes
    uint8 [rows, K], and per group of 32 the scale and zero of w = (q - 16) scale + zero as float32
    (the C pass's arithmetic: Q5_1 m + 16 d, Q5_K 16 d sc - dmin m; Q5_0 no zero: None)."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    if kind in ("Q5_0", "Q5_1"):
        head = 2 if kind == "Q5_0" else 4
        b = raw.reshape(rows, -1, head + 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qh = b[..., head : head + 4].copy().view(np.uint32)[..., 0]
        qs = b[..., head + 4 :]
        low = np.concatenate((qs & 15, qs >> 4), axis=-1)  # columns 0-15, 16-31
        high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = (low | (high << 4)).reshape(rows, -1)
        if kind == "Q5_0":
            return codes, d, None
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            return codes, d, m + np.float32(16) * d
    b = raw.reshape(rows, -1, 176)
    nb = b.shape[1]
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))  # (the same 6-bit packing as Q5_K's)
    sc, mn = sc.reshape(rows, nb, 8).astype(np.float32), mn.reshape(rows, nb, 8).astype(np.float32)
    qh = b[..., 16:48]
    qs = b[..., 48:].reshape(rows, nb, 4, 1, 32)
    low = np.concatenate((qs & 15, qs >> 4), axis=3).reshape(rows, nb, 8, 32)  # sub-block 2c: low nibbles of chunk c
    high = (qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    with np.errstate(invalid="ignore", over="ignore"):
        scale = d * sc
        zero = np.float32(16) * scale - dmin * mn
    return (low | (high << 4)).reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)


def _five_bit_kernel_here(k: int = 256) -> None:
    if not cpu_int4.usable(k, 32):
        pytest.skip("the own int4 kernel's layout is not used here")


@pytest.mark.parametrize("qtype_name", ["Q5_0", "Q5_1", "Q5_K"])
def test_q5_blocks_laid_out_directly_give_the_codes_and_scales_of_the_blocks_for_every_f16_scale(qtype_name):
    """to_layout (Q5 blocks into the 5-bit layout) against the blocks read in numpy and packed by cpu_int4.pack5: the same codes
    (low 4 bits and the bit plane) and bf16 scales and zeros, every f16 scale and zero; NaN stays NaN."""
    raw, k = _blocks_with_every_f16(qtype_name)
    _five_bit_kernel_here(k)
    codes, scale, zero = _q5_reference(raw, qtype_name)
    want = cpu_int4.pack5(torch.from_numpy(codes), torch.from_numpy(scale), None if zero is None else torch.from_numpy(zero))
    blocks = transcode.Q5Blocks(np.ascontiguousarray(raw), qtype_name, None, materialize=None)
    assert blocks.shape == (raw.shape[0], k) and blocks.zero_values == (1 if qtype_name == "Q5_0" else 2)
    layout = cpu_int4.Layout(raw.shape[0], k, 32, blocks.zero_values, bits=5)
    assert blocks.lay_out(0, layout.data, layout.sz, layout.hb)
    assert torch.equal(layout.data, want[0]) and torch.equal(layout.hb, want[1])
    nan = want[2].isnan()
    assert layout.sz.shape == want[2].shape and torch.equal(layout.sz.isnan(), nan)
    assert torch.equal(_bits(layout.sz[~nan]), _bits(want[2][~nan]))


@pytest.mark.parametrize("rows", [40, 61])
def test_q5_pieces_laid_out_at_any_row_in_any_order_give_the_packed_whole(rows):
    """A fused weight's Q5 pieces at rows that are not multiples of 16 (a block's bit plane shared by
    two pieces: each keeps the other's bits), one reordered, a padded last block, Q5_1 zeros after
    Q5_0 pieces (the layout widened): the bytes of the whole weight packed by pack5, and its products
    those of that weight."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    _five_bit_kernel_here()
    g = np.random.default_rng(rows)
    kinds = [("Q5_0", 0, 21), ("Q5_0", 21, 30), ("Q5_1", 30, rows)]
    w = g.standard_normal((rows, 256)).astype(np.float32)
    parts = [gguf.quants.quantize(w[a:b], Q[kind]) for kind, a, b in kinds]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(rows))
    layout = cpu_int4.Layout(rows, 256, 32, 1, bits=5)
    layout.hb.fill_(0xFF)  # (whatever an empty tensor held: every row's bits are written)
    layout.hb[-1].zero_()
    for i, ((kind, a, b), part) in enumerate(zip(kinds, parts)):
        blocks = transcode.Q5Blocks(part, kind, order if i == 1 else None, materialize=None)
        if blocks.zero_values > layout.zero_values:
            layout.with_zeros()
        assert blocks.lay_out(a, layout.data, layout.sz, layout.hb)
    codes, scales, zeros = [], [], []
    for i, ((kind, a, b), part) in enumerate(zip(kinds, parts)):
        c, s, z = _q5_reference(part, kind)
        z = np.zeros_like(s) if z is None else z
        pick = order.numpy() if i == 1 else slice(None)
        codes.append(c[pick]), scales.append(s[pick]), zeros.append(z[pick])
    pad = -rows % 16
    cat = lambda xs: torch.nn.functional.pad(torch.from_numpy(np.concatenate(xs)), (0, 0, 0, pad))  # noqa: E731
    want = cpu_int4.pack5(cat(codes), cat(scales), cat(zeros))
    assert layout.zero_values == 2
    assert torch.equal(layout.data, want[0]) and torch.equal(layout.hb, want[1]) and torch.equal(_bits(layout.sz), _bits(want[2]))
    x = torch.randn(2, 256).bfloat16()
    y = PackedWeight(layout, torch.device("cpu"))(x)
    assert torch.equal(y, cpu_int4.matmul5(x, *want, 32)[:, :rows])


def test_q5_blocks_that_do_not_fit_are_refused():
    data, hb, sz = torch.zeros(1, 4, 64, dtype=torch.uint8), torch.zeros(1, 4, 16, dtype=torch.uint8), torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="to_layout: Q5_0 rows"):  # 17 rows into one block of 16
        transcode.to_layout(np.zeros((17, 22), dtype=np.uint8), "Q5_0", None, 0, data, sz, hb)
    with pytest.raises(ValueError, match="zeros"):  # Q5_1's zeros have no room
        transcode.to_layout(np.zeros((2, 24), dtype=np.uint8), "Q5_1", None, 0, data, sz, hb)
    with pytest.raises(ValueError, match="bit plane"):
        transcode.to_layout(np.zeros((2, 22), dtype=np.uint8), "Q5_0", None, 0, data, sz, hb[:, :2])
    with pytest.raises(ValueError, match="bit plane none"):  # 5-bit codes need their plane
        transcode.to_layout(np.zeros((2, 22), dtype=np.uint8), "Q5_0", None, 0, data, sz)
    with pytest.raises(ValueError, match="bit plane"):  # and Q4 blocks have none
        transcode.to_layout(np.zeros((2, 18), dtype=np.uint8), "Q4_0", None, 0, data, sz, hb)


# ------------------------------------------------------------------ Q6_K blocks into the 6-bit layout


def _q6k_reference(raw: np.ndarray):
    """Q6_K blocks [rows, bytes] -> their 6-bit codes uint8 [rows, K], read by gguf's own dequantizer
    from a copy with d = 1 and every sub-block's scale 1 (then it gives q - 32), and the scales d sc_j
    float32 [rows, K/16] (f16 d times the int8 scale, as the C pass computes them)."""
    import gguf

    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 210)
    d = b[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, nb]
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [rows, nb, 16]
    unit = b.copy()
    unit[..., 192:208] = 1
    unit[..., 208:210] = np.array([1.0], dtype=np.float16).view(np.uint8)
    codes = gguf.quants.dequantize(unit.reshape(rows, -1), gguf.GGMLQuantizationType.Q6_K) + 32
    assert codes.min() >= 0 and codes.max() <= 63
    with np.errstate(invalid="ignore", over="ignore"):
        scale = d[..., None] * sc
    return codes.astype(np.uint8), scale.reshape(rows, -1)


def test_q6_k_blocks_laid_out_directly_give_the_codes_and_scales_of_the_blocks_for_every_f16_scale():
    """to_layout (Q6_K blocks into the 6-bit layout, groups of 16) against the blocks read by gguf's
    dequantizer and packed by cpu_int4.pack6: the same codes (low 4 bits and both planes) and bf16
    scales d sc_j, every f16 d; NaN stays NaN."""
    raw, k = _blocks_with_every_f16("Q6_K")
    _five_bit_kernel_here(k)
    codes, scale = _q6k_reference(raw)
    want = cpu_int4.pack6(torch.from_numpy(codes), torch.from_numpy(scale), None)
    blocks = transcode.Q6Blocks(np.ascontiguousarray(raw), "Q6_K", None, materialize=None)
    assert blocks.shape == (raw.shape[0], k) and blocks.zero_values == 1 and blocks.group_size == 16 and blocks.bits == 6
    layout = cpu_int4.Layout(raw.shape[0], k, 16, 1, bits=6)
    assert blocks.lay_out(0, layout.data, layout.sz, layout.hb)
    assert torch.equal(layout.data, want[0]) and torch.equal(layout.hb, want[1])
    nan = want[2].isnan()
    assert layout.sz.shape == want[2].shape and torch.equal(layout.sz.isnan(), nan)
    assert torch.equal(_bits(layout.sz[~nan]), _bits(want[2][~nan]))


@pytest.mark.parametrize("rows", [40, 61])
def test_q6_k_pieces_laid_out_at_any_row_in_any_order_give_the_packed_whole(rows):
    """A fused weight's Q6_K pieces at rows that are not multiples of 16 (a block's two planes shared
    by two pieces: each keeps the other's bits), one reordered, a padded last block: the bytes of the
    whole weight packed by pack6, and its products those of that weight."""
    from fixtures_gguf import quantize_q6_k

    _five_bit_kernel_here()
    g = np.random.default_rng(rows)
    cuts = [(0, 21), (21, 30), (30, rows)]
    w = g.standard_normal((rows, 512)).astype(np.float32)
    parts = [quantize_q6_k(w[a:b]) for a, b in cuts]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(rows))
    layout = cpu_int4.Layout(rows, 512, 16, 1, bits=6)
    layout.hb.fill_(0xFF)  # (whatever an empty tensor held: every row's bits are written)
    layout.hb[-1].zero_()
    for i, ((a, b), part) in enumerate(zip(cuts, parts)):
        blocks = transcode.Q6Blocks(part, "Q6_K", order if i == 1 else None, materialize=None)
        assert blocks.lay_out(a, layout.data, layout.sz, layout.hb)
    codes, scales = [], []
    for i, part in enumerate(parts):
        c, s = _q6k_reference(part)
        pick = order.numpy() if i == 1 else slice(None)
        codes.append(c[pick]), scales.append(s[pick])
    pad = -rows % 16
    cat = lambda xs: torch.nn.functional.pad(torch.from_numpy(np.concatenate(xs)), (0, 0, 0, pad))  # noqa: E731
    want = cpu_int4.pack6(cat(codes), cat(scales), None)
    assert torch.equal(layout.data, want[0]) and torch.equal(layout.hb, want[1]) and torch.equal(_bits(layout.sz), _bits(want[2]))
    x = torch.randn(2, 512).bfloat16()
    y = PackedWeight(layout, torch.device("cpu"))(x)
    assert torch.equal(y, cpu_int4.matmul5(x, *want, 16)[:, :rows])


def test_q6_k_blocks_that_do_not_fit_are_refused():
    data, sz = torch.zeros(1, 32, 64, dtype=torch.uint8), torch.zeros(1, 16, 1, 16, dtype=torch.bfloat16)
    hb = torch.zeros(1, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="to_layout: Q6_K rows"):  # 17 rows into one block of 16
        transcode.to_layout(np.zeros((17, 210), dtype=np.uint8), "Q6_K", None, 0, data, sz, hb)
    with pytest.raises(ValueError, match="to_layout: Q6_K rows"):  # scales of groups of 32: Q6_K's are 16 wide
        transcode.to_layout(np.zeros((2, 210), dtype=np.uint8), "Q6_K", None, 0, data, sz[:, :8].contiguous(), hb)
    with pytest.raises(ValueError, match="bit plane"):  # one plane: the 5-bit form's
        transcode.to_layout(np.zeros((2, 210), dtype=np.uint8), "Q6_K", None, 0, data, sz, hb[..., :16].contiguous())
    with pytest.raises(ValueError, match="bit plane none"):
        transcode.to_layout(np.zeros((2, 210), dtype=np.uint8), "Q6_K", None, 0, data, sz)
