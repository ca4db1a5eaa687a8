"""C text shared by the engine's C kernels (pangu_infer.quant.cpu_int4's library, pangu_infer.quant.
prefill's conversion loops, pangu_infer.quant.amx's kernel, pangu_infer.models.bf16_weights',
bi_attention_kernel's and norm_rope's kernels are built as separate libraries; each source includes
what it uses of these)."""

# 16 rows of 64 int8 weights (row i at base + i * ld) as 32-bit words transposed: v[j], lane r, holds
# row r's bytes 4j .. 4j + 3. One 64-byte load per row instead of a gather per 4 columns. AVX-512F.
TRANSPOSE16_EPI32 = r"""
static inline void transpose16_epi32(const int8_t* base, int64_t ld, __m512i v[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i++) t[i] = _mm512_loadu_si512((const void*)(base + i * ld));
  for (int i = 0; i < 8; i++) {
    u[2 * i] = _mm512_unpacklo_epi32(t[2 * i], t[2 * i + 1]);
    u[2 * i + 1] = _mm512_unpackhi_epi32(t[2 * i], t[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    t[4 * i] = _mm512_unpacklo_epi64(u[4 * i], u[4 * i + 2]);
    t[4 * i + 1] = _mm512_unpackhi_epi64(u[4 * i], u[4 * i + 2]);
    t[4 * i + 2] = _mm512_unpacklo_epi64(u[4 * i + 1], u[4 * i + 3]);
    t[4 * i + 3] = _mm512_unpackhi_epi64(u[4 * i + 1], u[4 * i + 3]);
  }
  for (int q = 0; q < 4; q++) {
    const __m512i a = _mm512_shuffle_i32x4(t[q], t[4 + q], 0x88), bb = _mm512_shuffle_i32x4(t[q], t[4 + q], 0xdd);
    const __m512i d = _mm512_shuffle_i32x4(t[8 + q], t[12 + q], 0x88), e = _mm512_shuffle_i32x4(t[8 + q], t[12 + q], 0xdd);
    v[q] = _mm512_shuffle_i32x4(a, d, 0x88);
    v[8 + q] = _mm512_shuffle_i32x4(a, d, 0xdd);
    v[4 + q] = _mm512_shuffle_i32x4(bb, e, 0x88);
    v[12 + q] = _mm512_shuffle_i32x4(bb, e, 0xdd);
  }
}
"""

# An 8 x 8 block of floats transposed in registers: r[i] lane j <- r[j] lane i. AVX.
TRANSPOSE8 = r"""
static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
"""

# bf16 <-> fp32, 16 lanes at a time. AVX-512F. bf16x16: 16 bf16 values at p widened (exact).
# round_bf16x16: 16 fp32 lanes rounded to bf16 to nearest even, as torch rounds them (a NaN stays a
# quiet NaN: its top bits with the quiet bit set), the bits in the low 16 of each 32-bit lane (
# _mm512_cvtepi32_epi16 packs them); round_bf16x16_finite: the same for lanes known finite (weights
# dequantized from finite scales), without the NaN test; round_bf16x16_top: its bits in the top 16 of
# each lane (the low 16 not cleared). BF16_AVX2's, 16 lanes wide.
BF16_AVX512 = r"""
static inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)p)), 16));
}
static inline __m512i round_bf16x16_top(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
}
static inline __m512i round_bf16x16_finite(__m512 v) { return _mm512_srli_epi32(round_bf16x16_top(v), 16); }
static inline __m512i round_bf16x16(__m512 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(round_bf16x16_finite(v), nan,
                               _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(64)));
}
"""

# One octet of pangu_infer.quant.cpu_int4's int4 layout dequantized in fp32. p: its 64 bytes, 16 rows x
# 4 bytes (byte j of a row: column j in the low nibble, column 4 + j in the high one); s: the group's
# bf16 scales [16], then where zs == 2 its zeros [16] (zs == 1: scales only, every zero 0). lo[j] =
# column j, hi[j] = column 4 + j, lane r = row r; the weight is q * scale + (zero - 8 scale), one fused
# multiply-add (with zero 0 the same bits as a stored zero of 0). Inlined: a caller whose zs is a
# constant tests it once, not per octet. group_off16: a group's zero - o scale for its 16 rows, o the
# codes' offset (8, 16, 32 for 4-, 5-, 6-bit codes), sc its scales (bf16x16(s)); cpu_int4's AVX2 build
# has group_off for 8. AVX-512F; after BF16_AVX512 (bf16x16).
INT4_OCTET = r"""
static inline __m512 group_off16(__m512 sc, const uint16_t* s, int64_t zs, float o) {
  return _mm512_fnmadd_ps(_mm512_set1_ps(o), sc, zs == 2 ? bf16x16(s + 16) : _mm512_setzero_ps());
}
static inline __attribute__((always_inline)) void int4_octet(const uint8_t* p, const uint16_t* s, int64_t zs, __m512 lo[4], __m512 hi[4]) {
  const __m512i byte_mask = _mm512_set1_epi32(0xFF), nib = _mm512_set1_epi32(15);
  const __m512 sc = bf16x16(s), off = group_off16(sc, s, zs, 8.0f);
  const __m512i v = _mm512_loadu_si512((const void*)p);
  for (int j = 0; j < 4; j++) {
    const __m512i bytes = _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), byte_mask);
    lo[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, nib)), sc, off);
    hi[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), sc, off);
  }
}
"""

# The 5-bit codes' plane of one octet as one AVX2 register (cpu_int4's _INT5 layout: pack_plane). AVX2.
PLANE_WORD = r"""
/* The 5-bit codes' plane (_INT5) of one octet of a block, 16 bytes at p, as one register whose bit 4 +
   r of each byte is the 5th bit for nibble register r (0: lo of rows 0-7, 1: hi of rows 0-7, 2: lo of
   rows 8-15, 3: hi of rows 8-15) once shifted right by r: plane byte 4e + j holds in bit r row e's
   (register r's half) column, in bit 4 + r row 4 + e's; both 128-bit halves load the 16 bytes, the
   low one (lanes e = 0..3) shifted left by 4 (bit 8j + r -> 8j + 4 + r), the high one (lanes 4 + e)
   as it is. */
static inline __m256i plane_word(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(const void*)p));
  return _mm256_sllv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0));
}
"""

# bf16 <-> fp32, 8 lanes at a time. AVX2. bf8: 8 bf16 values at p widened (exact). round_bf16: 8 fp32
# lanes rounded to bf16 to nearest even, as torch rounds them (a NaN stays a quiet NaN: its top bits
# with the quiet bit set), the bits in the low 16 of each 32-bit lane; round_bf16_finite: the same for
# lanes known finite (weights dequantized from finite scales), without the NaN test.
BF16_AVX2 = r"""
static inline __m256 bf8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(const void*)p)), 16));
}
static inline __m256i round_bf16_finite(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                            _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
}
static inline __m256i round_bf16(__m256 v) {
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(round_bf16_finite(v), _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(64)), nan);
}
"""
