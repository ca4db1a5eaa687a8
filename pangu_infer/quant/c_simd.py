"""C text shared by the engine's C kernels (pangu_infer.quant.prefill's conversion loops and
pangu_infer.quant.amx's kernel are built as separate libraries; each source includes these)."""

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
