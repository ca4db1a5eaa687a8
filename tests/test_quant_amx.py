"""quant/amx.py: int4 (cpu_int4's layout) and int8 products of many rows read by an AMX kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures_gguf import passage_perplexity, tiny_q6_k_gguf
from pangu_infer.engine.compiled import compile_problem
from pangu_infer.loader import load_model
from pangu_infer.quant import amx, cpu_int4, cpu_int8, prefill, tuning
from pangu_infer.quant.formats import QuantizationConfig, dequantize, quantize
from pangu_infer.quant.modules import PackedWeight, QuantizedLinear, prepare_prefill

CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.skipif(amx.library() is None, reason="no AMX-BF16, no C compiler or no AMX tile state here"),
    pytest.mark.skipif(cpu_int4.library() is None, reason="cpu_int4's layout needs AVX-512 VNNI"),
]


def _int4(n: int, k: int, group: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 0.1
    data, sz = cpu_int4.pack(q, scale, zero)
    return data, sz, cpu_int4.dequantize_t(data, sz, group).t()  # the bf16 weight [N, K] the packed path multiplies


def _codes(bits: int, n: int, k: int, seed: int = 0):
    """5- or 6-bit codes in cpu_int4's layout with their high bits (GGUF's Q5 blocks: groups of 32 with
    zeros; Q6_K: groups of 16, scales only): (data, sz, the bf16 weight [N, K], hb, group)."""
    g = torch.Generator().manual_seed(seed)
    group = 32 if bits == 5 else 16
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    zero = (torch.rand(n, k // group, generator=g) - 0.5) * 0.1 if bits == 5 else None
    data, hb, sz = (cpu_int4.pack5 if bits == 5 else cpu_int4.pack6)(q, scale, zero)
    return data, sz, cpu_int4.dequantize_t(data, sz, group, hb).t(), hb, group


def _weight(kind: str, n: int, k: int):
    return {"int4": _int4, "int8": _int8}[kind](n, k) if kind in ("int4", "int8") else _codes(int(kind[3]), n, k)


def _int8(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    return w8, s8, w8.float() * s8.float()[:, None]  # the float weight q * s


def _product(kind: str, x: torch.Tensor, w: tuple) -> torch.Tensor:
    if kind == "int8":
        return amx.int8_product(x, w[0], w[1])
    return amx.int4_product(x, w[0], w[1], 32) if kind == "int4" else amx.int4_product(x, w[0], w[1], w[4], w[3])


def _close_to_bf16_weight(y: torch.Tensor, x: torch.Tensor, w_bf16: torch.Tensor) -> None:
    """int4: within the output's bf16 rounding (and fp32 sums in another order) of x times the bf16
    weight the packed path would multiply, row by row."""
    ref = x.float() @ w_bf16.float().t()
    err = (y.float() - ref).abs()
    bound = 2**-8 * ref.abs() + 1e-4 * ref.abs().amax(dim=1, keepdim=True)
    assert (err <= bound).all(), float((err - bound).max())


def _int8_right(y: torch.Tensor, x: torch.Tensor, w: tuple) -> None:
    """int8: bit for bit the decode kernel's product (quant/cpu_int8.py: each row of x in integers of
    16 bits, exact integer sums, scaled in double) rounded to bf16; and, in float64, within that
    quantization's bound of x times the float weight: per row, half a step (max|x| / 32767) times
    sum |w| per output, plus the output's bf16 rounding."""
    assert torch.equal(y, cpu_int8.matmul(x, w[0], w[1]).to(torch.bfloat16))
    xd, wd = x.double(), w[2].double()
    ref = xd @ wd.t()
    half_step = xd.abs().amax(dim=1, keepdim=True) / 32767 / 2
    bound = 2**-8 * ref.abs() + half_step * (1 + 2**-20) * wd.abs().sum(dim=1) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), float(((y.double() - ref).abs() - bound).max())


def _right(kind: str, y: torch.Tensor, x: torch.Tensor, w: tuple) -> None:
    if kind == "int8":
        _int8_right(y, x, w)
    else:  # int4, 5- and 6-bit codes: the bf16 weight the packed path would multiply
        _close_to_bf16_weight(y, x, w[2])


@pytest.mark.parametrize("kind", ["int4", "int5", "int6", "int8"])
@pytest.mark.parametrize(
    "n, k, rows",
    [
        (64, 64, 32),  # one piece, one block of rows
        (48, 256, 7),  # a half piece (N % 32 == 16), fewer rows than a block
        (96, 128, 45),  # odd rows over two blocks
        (320, 576, 100),  # two strips (576 wide: 256 columns each), the second one shorter
        (272, 1536, 33),  # k in six chunks, a half piece in the last strip
        (80, 1536, 300),  # rows in two blocks (256 at K = 1536, amx.row_block), the second one odd
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_products_equal_their_references(kind, n, k, rows, threads):
    w = _weight(kind, n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = _product(kind, x, w)
    finally:
        torch.set_num_threads(old)
    assert y is not None and y.shape == (rows, n) and y.dtype == torch.bfloat16
    _right(kind, y, x, w)


@pytest.mark.parametrize("n, k, rows", [(48, 256, 7), (272, 1536, 33), (80, 2560, 40)])  # 2560: two k panels
def test_int4_scales_only_gives_the_2_value_forms_bits(n, k, rows):
    """cpu_int4's layout with scales only (zeros all 0, GGUF's Q4_0): the products of the same
    weight with its zeros stored, bitwise."""
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    data, sz = cpu_int4.pack(q, scale, None)
    _, sz2 = cpu_int4.pack(q, scale, torch.zeros_like(scale))
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    y = amx.int4_product(x, data, sz, 32)
    assert y is not None and torch.equal(y, amx.int4_product(x, data, sz2, 32))


def _cancelling_rows(rows: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose first 2 x 128 entries cancel against a weight repeating its first 128 columns
    (big fp32 partial sums, a small result): a change in the order of the sums shows in bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 0.01
    big = torch.randn(rows, 128, generator=g) * 100
    x[:, :128], x[:, 128:256] = big, -big
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_row_comes_out_the_same_whatever_rows_run_with_it(kind):
    n, k = 160, 320
    w = _int4(n, k) if kind == "int4" else _int8(n, k)
    if kind == "int4":  # columns 128..255 the same codes, scales and zeros as 0..127 (groups of 32)
        q = cpu_int4.unpack_codes(w[0])
        q[:, 128:256] = q[:, :128]
        sz = w[1].clone()
        sz[:, 4:8] = sz[:, 0:4]
        w = cpu_int4.pack(q, sz[:, :, 0].permute(0, 2, 1).reshape(n, -1).float(), sz[:, :, 1].permute(0, 2, 1).reshape(n, -1).float())
    else:
        w8 = w[0].clone()
        w8[:, 128:256] = w8[:, :128]
        w = (w8, w[1])
    x = _cancelling_rows(77, k, 4)
    full = _product(kind, x, w)
    for rows in (1, 16, 31, 32, 33, 64):
        assert torch.equal(_product(kind, x[:rows].contiguous(), w), full[:rows])
    assert torch.equal(_product(kind, x[40:].contiguous(), w), full[40:])


def test_shapes_it_does_not_take_are_refused(monkeypatch):
    x = torch.randn(40, 48, dtype=torch.bfloat16)
    data, sz, _ = _int4(64, 48, group=16)
    assert amx.int4_product(x, data, sz, 16) is None  # K % 32
    w8, s8, _ = _int8(64, 48)
    assert amx.int8_product(x, w8, s8) is None
    w8, s8, _ = _int8(64, 96)
    assert amx.int8_product(torch.randn(40, 96, dtype=torch.bfloat16), w8, s8) is None  # int8: K % 64
    w8, s8, _ = _int8(40, 64)
    assert amx.int8_product(torch.randn(40, 64, dtype=torch.bfloat16), w8, s8) is None  # N % 16
    assert amx.int8_product(torch.randn(40, 64), *_int8(64, 64)[:2]) is None  # fp32 x
    data, sz, _, hb, group = _codes(6, 64, 256)
    assert amx.int4_product(torch.randn(40, 256, dtype=torch.bfloat16), data, sz, group, hb[:, :, :16].contiguous()) is not None  # 16 bytes: a 5-bit plane
    assert amx.int4_product(torch.randn(40, 256, dtype=torch.bfloat16), data, sz, group, hb[:, :8].contiguous()) is None  # not the weight's octets
    assert amx.int4_product(torch.randn(40, 256, dtype=torch.bfloat16), data, sz, group, hb[:, :, :8].contiguous()) is None  # 8 bytes an octet
    data, sz, _ = _int4(64, 2560)
    assert amx.int4_product(torch.randn(40, 2560, dtype=torch.bfloat16), data, sz, 32) is not None  # any K by default
    monkeypatch.setenv(amx.MAX_K_ENV, "2048")
    assert amx.int4_product(torch.randn(40, 2560, dtype=torch.bfloat16), data, sz, 32) is None  # K > max_k()


@pytest.mark.parametrize("kind", ["int4", "int6", "int8"])
@pytest.mark.parametrize(
    "k, panel, rows, n",
    [
        (2560, None, 300, 80),  # two panels of 1280, rows in two blocks (288 at a 1280 panel)
        (4800, None, 70, 48),  # panels of 1664, 1664 and 1472 (the last one shorter), a half piece
        (2560, "1536", 45, 96),  # panels of 1536 and 1024 set by hand
        (2560, "0", 70, 80),  # no panels: all rows at once, strips sized to L2 (the first loop for wide K)
    ],
)
def test_wide_k_runs_in_k_panels_when_allowed(kind, k, panel, rows, n, monkeypatch):
    """Past amx.max_k() the kernel is refused by default; allowed by hand, K runs in panels of at
    most 2048 with the fp32 sums kept between them (or, with the panels off, the loop over all rows
    at once), and the products are still right."""
    monkeypatch.setenv(amx.MAX_K_ENV, "0")
    if panel is not None:
        monkeypatch.setenv(amx.PANEL_ENV, panel)
    if panel is None:
        assert amx.k_panel(k) == {2560: 1280, 4800: 1664}[k]
    if panel == "0":
        assert amx.k_panel(k) == 0 and amx.row_block(k) == 0
    w = _weight(kind, n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y = _product(kind, x, w)
    assert y is not None
    _right(kind, y, x, w)


@pytest.fixture
def forced_on(monkeypatch):
    monkeypatch.setenv(amx.ENV, "1")
    assert prefill.prepare() is None
    assert amx.prepare()
    assert amx.use(False)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("n, k", [(192, 256), (100, 96), (72, 48)])  # 72 x 48: K % 32, the packed path runs
def test_linear_with_bias_runs_it_and_matches_the_packed_path(forced_on, monkeypatch, method, n, k):
    if method == "int4" and k % 32:
        pytest.skip("int4 groups are 32 to 128 wide: K is a multiple of 32")
    w = torch.randn(n, k)
    qt = quantize(w, QuantizationConfig(method, 32))
    weight = PackedWeight(qt, CPU)
    weight.convert_min_rows = 16
    lin = QuantizedLinear(weight, torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)))
    x = torch.randn(37, k).to(torch.bfloat16)
    calls = []
    for name in ("int4_product", "int8_product"):
        real = getattr(amx, name)
        monkeypatch.setattr(amx, name, lambda *a, _r=real: calls.append(1) or _r(*a))
    with torch.inference_mode():
        got = lin(x)
        monkeypatch.setenv(amx.ENV, "0")
        want = lin(x)
    assert calls, "the AMX kernel was not asked"
    assert got.shape == want.shape == (37, n)
    ref = F.linear(x.float(), dequantize(qt)) + lin.bias.float()  # the quantized weight, in float
    scale = ref.abs().max().item()
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2 * scale)
    took = k % 32 == 0 and (method == "int4" or n % 16 == 0 and k % 64 == 0)  # else the kernel refused: the packed path ran both
    if method == "int4":
        # the same bf16 weight as the packed path: apart only by the order of the sums and the roundings
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=2e-3 * scale)
    elif took:
        # int8: the exact weight (q times the bf16 scale the kernel keeps) and x in integers of 16 bits per
        # row: closer to the exact product than the packed path's bf16(q * s) weight, within the output's
        # roundings (product, then bias)
        exact = F.linear(x.float(), weight.data.float() * weight.scales.float()[:, None]) + lin.bias.float()
        err, err_packed = (got.float() - exact).abs(), (want.float() - exact).abs()
        assert err.mean() <= err_packed.mean()
        bound = 2**-8 * ((exact - lin.bias.float()).abs() + exact.abs()) + 1e-4 * scale
        assert (err <= bound).all(), (float((err - bound).max()), float(err.max()), float(err_packed.max()))
    if not took:
        assert torch.equal(got, want)


def test_chosen_per_kind_where_a_pass_over_the_shapes_measured_faster_and_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("PANGU_INFER_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.delenv(amx.ENV, raising=False)
    monkeypatch.setattr(tuning, "_cache", {})
    measured = []

    def measure(kind, weights):
        measured.append((kind, sorted(tuple(d.shape) for d, _, _, _ in weights)))
        return {"amx": 1.0, "packed": 2.0 if kind == "int8" else 1.0}  # faster for int8 only

    monkeypatch.setattr(tuning, "measure_amx", measure)
    model = torch.nn.ModuleList(
        PackedWeight(quantize(torch.randn(n, 64), QuantizationConfig(m, 32)), CPU)
        for n, m in ((128, "int8"), (64, "int8"), (128, "int8"), (128, "int4"))
    )
    assert not any(w.amx_prefill for w in model)  # nothing chosen before prepare_prefill
    assert prepare_prefill(model) is None
    assert [w.amx_prefill for w in model] == [True, True, True, False]  # int4 within the margin: not taken
    assert measured == [("int4", [(8, 8, 64)]), ("int8", [(64, 64), (128, 64)])]  # one weight of each shape
    stored = (tmp_path / "kernels.json").read_text()
    assert f'"amx_prefill_v{amx.REVISION}_int8_128x64_64x64": true' in stored and f'"amx_prefill_v{amx.REVISION}_int4_128x64g32": false' in stored
    assert prepare_prefill(model) is None and len(measured) == 2  # cached
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    calls = []
    real = amx.int8_product
    monkeypatch.setattr(amx, "int8_product", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    for w in model[:2]:
        w.convert_min_rows = 16
        w(x)
    assert calls == [128, 64]
    monkeypatch.setenv(amx.ENV, "0")
    model[0](x)
    assert calls == [128, 64] and not amx.use(True)
    monkeypatch.setenv(amx.ENV, "1")
    assert amx.use(False)


@pytest.mark.skipif(compile_problem(CPU) is not None, reason="no C++ compiler for inductor here")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_model_prefill_logits_match_the_eager_bf16_dequantized_model(tiny_dense_dir, forced_on, monkeypatch, method):
    """A whole prefill (q/k/v with biases, MLP, head) through the kernel against the same model with
    every quantized product replaced by F.linear on its bf16-dequantized weight, eagerly."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT4_VNNI", "16")
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT8", "16")
    loaded = load_model(str(tiny_dense_dir), torch.bfloat16, CPU, load_tokenizer=False, quantization=method)
    weights = [m for m in loaded.model.modules() if isinstance(m, PackedWeight)]
    assert weights and all(m.kernel in ("int4_vnni", "int8") for m in weights)
    assert prepare_prefill(loaded.model) is None
    assert all(m.convert_min_rows == 16 for m in weights)
    calls = []
    for name in ("int4_product", "int8_product"):
        real = getattr(amx, name)
        monkeypatch.setattr(amx, name, lambda *a, _r=real: calls.append(1) or _r(*a))
    ids = torch.randint(3, 1000, (70,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None)).float()
        assert len(calls) >= len(weights)

        def dequantized(self, x, expert=None):
            if self.kernel == "int4_vnni":
                w = cpu_int4.dequantize_t(self.data, self.scales, self.group_size).t()[: self.out_features]
            else:
                w = (self.data.float() * self.scales.float()[:, None]).to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), w).to(x.dtype)

        monkeypatch.setattr(PackedWeight, "forward", dequantized)
        want = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None)).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.999
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


@pytest.mark.skipif(compile_problem(CPU) is not None, reason="no C++ compiler for inductor here")
def test_demo_model_perplexity_through_the_kernel_is_within_1_percent_of_bf16(smollm2_gguf_path, forced_on, monkeypatch):
    """The demo model kept quantized (int4 in cpu_int4's layout, the Q8_0 head as int8), every
    many-row product through the kernel, against the file dequantized to bf16."""
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT4_VNNI", "16")
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT8", "16")
    calls = []
    for name in ("int4_product", "int8_product"):
        real = getattr(amx, name)
        monkeypatch.setattr(amx, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    out = {}
    for q in ("auto", "none"):
        loaded = load_model(str(smollm2_gguf_path), torch.bfloat16, CPU, quantization=q)
        assert prepare_prefill(loaded.model) is None
        out[q] = passage_perplexity(loaded)
    assert {"int4_product", "int8_product"} <= set(calls), set(calls)
    assert abs(out["auto"] / out["none"] - 1) < 0.01, out


@pytest.mark.skipif(compile_problem(CPU) is not None, reason="no C++ compiler for inductor here")
def test_a_q6_k_files_prefill_through_the_kernel_matches_the_dequantized_codes(tmp_path, tiny_sentencepiece_vocab, forced_on, monkeypatch):
    """A GGUF file whose matrices are Q6_K, kept as 6-bit codes (kernel "int6"): a whole prefill with
    every many-row product through the kernel (the high bits converted with the nibbles) against the
    same model with each product on its codes dequantized to bf16 (cpu_int4.dequantize_t), eagerly."""
    if not cpu_int4.usable(256, 16):
        pytest.skip("the own int4 kernel does not run here")
    monkeypatch.setenv(cpu_int4.SIX_BIT_ENV, "1")
    cpu_int4.six_bit_chosen.cache_clear()
    monkeypatch.setenv("PANGU_INFER_MODEL_CACHE", "0")
    monkeypatch.setenv("PANGU_INFER_KERNEL_ROWS_INT6", "16")
    path = tiny_q6_k_gguf(tmp_path / "tiny-q6_k.gguf", tiny_sentencepiece_vocab)
    loaded = load_model(str(path), torch.bfloat16, CPU, load_tokenizer=False)
    weights = [m for m in loaded.model.modules() if isinstance(m, PackedWeight)]
    assert weights and {m.kernel for m in weights} == {"int6"}
    assert prepare_prefill(loaded.model) is None
    calls = []
    real = amx.int4_product
    monkeypatch.setattr(amx, "int4_product", lambda *a: calls.append(a[4] is not None) or real(*a))
    ids = torch.randint(3, 200, (70,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None)).float()
        assert len(calls) >= len(weights) and all(calls)

        def dequantized(self, x, expert=None):
            w = cpu_int4.dequantize_t(self.data, self.scales, self.group_size, self.hb).t()[: self.out_features]
            return F.linear(x.to(torch.bfloat16), w).to(x.dtype)

        monkeypatch.setattr(PackedWeight, "forward", dequantized)
        want = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), None)).float()
    cpu_int4.six_bit_chosen.cache_clear()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.999
