// AVX2 + FMA + F16C (Haswell and later, Zen 1 and later: most laptops): compiled with -mavx2
// -mfma -mf16c; called only when the CPU reports all three.
//
// A vector holds 8 rows, so each 16-row tile is done in two halves. AVX2 has no byte dot
// product: `vpmaddubsw` (unsigned x signed bytes -> pairs of int16, saturating) then `vpmaddwd`
// by ones gives the same 4-product sums. The int16 pairs cannot saturate for codes up to 63
// (2 x 63 x 127 < 32767); Q8_0's signed codes go through llama.cpp's sign trick instead: |w|
// times x with w's sign (2 x 128 x 127 < 32767).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "gx.h"

namespace gx_avx2 {

static inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct V {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8, kHalves = 2, kMR = 4, kQ8Offset = 0;

  static I codes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I lo4(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  static I hi4(I v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
  static I bit4(I v, const uint8_t* mask, int h) { return bits(v, mask, h, 0x10); }
  // 2-bit field t of each byte (Q3_K's crumbs)
  static I crumb(I v, int t) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
  }
  // `value` set in the bytes whose bit is set in this half's 32 bits of the mask (bit 4r+j: byte
  // j of row r; the bytes it sets are clear, so or-ing adds it)
  static I bits(I v, const uint8_t* mask, int h, char value) {
    uint32_t bits;
    std::memcpy(&bits, mask + 4 * h, 4);
    // byte i of `set` is 0xFF when bit i is: spread byte i/8 of the mask, test bit i%8
    const I spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                         _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                            0x0303030303030303));
    const I sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
    const I set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
    return _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(value)));
  }
  static I hi2(I v, const uint8_t* g, int h) {
    // this half's two 16-byte lanes are group lanes 2h and 2h+1: shift their bits to 4-5
    const I b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    const I t = h == 0 ? _mm256_sllv_epi32(b, _mm256_setr_epi32(4, 4, 4, 4, 2, 2, 2, 2))
                       : _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    return _mm256_or_si256(v, _mm256_and_si256(t, _mm256_set1_epi8(0x30)));
  }
  static I q8(I v) { return v; }
  // 4-bit codes -> IQ4 book values (signed, as Q8_0's codes: dot_q8's sign trick takes them)
  static I iq4(I v) {
    const __m128i book = _mm_load_si128(reinterpret_cast<const __m128i*>(gx::kIq4Values));
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(book), v);
  }
  static I dot(I acc, I w, const int8_t* x) {
    int32_t x4;
    std::memcpy(&x4, x, 4);
    const I p = _mm256_maddubs_epi16(w, _mm256_set1_epi32(x4));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I dot_q8(I acc, I w, const int8_t* x) {
    int32_t x4;
    std::memcpy(&x4, x, 4);
    const I p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(x4), w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  static I seti(int32_t v) { return _mm256_set1_epi32(v); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I andi(I a, int c) { return _mm256_and_si256(a, _mm256_set1_epi32(c)); }
  static I ori(I a, I b) { return _mm256_or_si256(a, b); }
  template <int n> static I srli(I a) { return _mm256_srli_epi32(a, n); }
  template <int n> static I slli(I a) { return _mm256_slli_epi32(a, n); }
  static I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I u16(const uint8_t* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }

  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F loadf(const float* p) { return _mm256_load_ps(p); }
  static void storef(float* p, F v) { _mm256_store_ps(p, v); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float reduce(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static F load_kv(const void* base, int dtype, int64_t i) {
    if (dtype == KV_Q8) {  // i: a multiple of 8, so the lanes lie in one block
      const uint8_t* blk = static_cast<const uint8_t*>(base) + (i >> 5) * kQ8Bytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + (i & 31)));
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(_cvtsh_ss(dh)));
    }
    if (dtype == KV_F32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if (dtype == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store_kv(void* base, int dtype, int64_t i, F v) {
    if (dtype == KV_F32) return _mm256_storeu_ps(static_cast<float*>(base) + i, v);
    uint16_t* p = static_cast<uint16_t*>(base) + i;
    if (dtype == KV_F16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int j = 0; j < 8; ++j) p[j] = to_bf16(tmp[j]);
  }
  static void store_kv1(void* base, int dtype, int64_t i, float x) {
    if (dtype == KV_F32) return void(static_cast<float*>(base)[i] = x);
    static_cast<uint16_t*>(base)[i] = dtype == KV_F16 ? static_cast<uint16_t>(_cvtss_sh(x, 0)) : to_bf16(x);
  }
  // exp(x) for x <= 0 (Cephes' expf: 2^n exp(r), |r| <= ln2/2, relative error ~1e-7)
  static F exp(F x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    F p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }

  static F loadx(const void* x, int dtype, int64_t i) {
    if (dtype == F32) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F abs(F v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static F maxf(F a, F b) { return _mm256_max_ps(a, b); }
  static float reduce_max(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static I round(F v) { return _mm256_cvtps_epi32(v); }  // nearest even (MXCSR default)
  static int32_t reduce_i(I v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
  static void store_i8(int8_t* p, I v) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
  static F sigmoid(F g) {  // exp of -|g| only: no overflow
    const F t = exp(_mm256_sub_ps(_mm256_setzero_ps(), abs(g)));
    const F s = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), t));
    return _mm256_blendv_ps(s, _mm256_mul_ps(s, t), _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
  }

  static void store_out(const Out& o, int64_t row, int64_t col, F v, int n) {
    if (o.dtype == F32) {
      float* p = static_cast<float*>(o.ptr) + row * o.ldo + col;
      if (n == 8) {
        _mm256_storeu_ps(p, o.accumulate ? _mm256_add_ps(v, _mm256_loadu_ps(p)) : v);
        return;
      }
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, v);
      for (int j = 0; j < n; ++j) p[j] = o.accumulate ? p[j] + tmp[j] : tmp[j];
      return;
    }
    uint16_t* p = static_cast<uint16_t*>(o.ptr) + row * o.ldo + col;
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int j = 0; j < n; ++j) p[j] = to_bf16(o.accumulate ? from_bf16(p[j]) + tmp[j] : tmp[j]);
  }
};

using I = V::I;
using F = V::F;

#include "quantize_body.h"
#include "kernel_body.h"
#include "attention_body.h"
#include "vector_body.h"

}  // namespace gx_avx2
