// AVX-512 VNNI (Ice Lake, Sapphire Rapids, Zen 4/5): compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni -mfma -mf16c; called only when the CPU reports all of them.
//
// A vector is one 16-row tile (16 lanes of 32 bits). `vpdpbusd` multiplies unsigned weight
// bytes by signed activation bytes and adds each lane's 4 products into it; Q8_0's signed codes
// are made unsigned by flipping their top bit (q + 128) and the offset goes into the epilogue.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "gx.h"

namespace gx_avx512 {

struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16, kHalves = 1, kMR = 8, kQ8Offset = 128;

  static I codes(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I lo4(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static I hi4(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
  // `value` added to the bytes whose bit is set in the 64-bit mask (bit 4r+j: byte j of row r)
  static I bits(I v, const uint8_t* mask, int, char value) {
    uint64_t set;
    std::memcpy(&set, mask, 8);
    return _mm512_mask_add_epi8(v, _cvtu64_mask64(set), v, _mm512_set1_epi8(value));
  }
  static I bit4(I v, const uint8_t* mask, int h) { return bits(v, mask, h, 0x10); }
  // 2-bit field t of each byte (Q3_K's crumbs)
  static I crumb(I v, int t) {
    return _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(2 * t)), _mm512_set1_epi8(3));
  }
  static I hi2(I v, const uint8_t* g, int) {
    // lane L of the broadcast group rotated so its bits 2L..2L+1 land on bits 4-5 of each byte
    const I b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g)));
    const I rot = _mm512_set_epi32(30, 30, 30, 30, 0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4);
    return _mm512_or_si512(v, _mm512_and_si512(_mm512_rolv_epi32(b, rot), _mm512_set1_epi8(0x30)));
  }
  static I q8(I v) { return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80))); }
  // 4-bit codes -> IQ4 book values + 128 (unsigned, as q8 makes Q8_0's codes), one lookup per lane
  static I iq4(I v) {
    const __m128i book = _mm_add_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(gx::kIq4Values)),
                                      _mm_set1_epi8(static_cast<char>(0x80)));
    return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(book), v);
  }
  static I dot(I acc, I w, const int8_t* x) {
    int32_t x4;
    std::memcpy(&x4, x, 4);
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4));
  }
  static I dot_q8(I acc, I w, const int8_t* x) { return dot(acc, w, x); }
  static I seti(int32_t v) { return _mm512_set1_epi32(v); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I andi(I a, int c) { return _mm512_and_si512(a, _mm512_set1_epi32(c)); }
  static I ori(I a, I b) { return _mm512_or_si512(a, b); }
  template <int n> static I srli(I a) { return _mm512_srli_epi32(a, n); }
  template <int n> static I slli(I a) { return _mm512_slli_epi32(a, n); }
  static I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I u16(const uint8_t* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }

  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F loadf(const float* p) { return _mm512_load_ps(p); }
  static void storef(float* p, F v) { _mm512_store_ps(p, v); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float reduce(F v) { return _mm512_reduce_add_ps(v); }
  static F load_kv(const void* base, int dtype, int64_t i) {
    if (dtype == KV_Q8) {  // i: a multiple of 16, so the lanes lie in one block
      const uint8_t* blk = static_cast<const uint8_t*>(base) + (i >> 5) * kQ8Bytes;
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + (i & 31)));
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(_cvtsh_ss(dh)));
    }
    if (dtype == KV_F32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    if (dtype == KV_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store_kv(void* base, int dtype, int64_t i, F v) {
    if (dtype == KV_F32) return _mm512_storeu_ps(static_cast<float*>(base) + i, v);
    __m256i h;
    if (dtype == KV_F16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      __m512i u = _mm512_castps_si512(v);
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                               _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
      h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
  }
  static void store_kv1(void* base, int dtype, int64_t i, float x) {  // one value: the masked form
    const F v = _mm512_set1_ps(x);
    alignas(64) uint16_t h[32];
    if (dtype == KV_F32) return void(static_cast<float*>(base)[i] = x);
    store_kv(h, dtype, 0, v);
    static_cast<uint16_t*>(base)[i] = h[0];
  }
  // exp(x) for x <= 0 (Cephes' expf: 2^n exp(r), |r| <= ln2/2, relative error ~1e-7)
  static F exp(F x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    F p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
  }

  static F loadx(const void* x, int dtype, int64_t i) {
    if (dtype == F32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F abs(F v) { return _mm512_abs_ps(v); }
  static F maxf(F a, F b) { return _mm512_max_ps(a, b); }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  static I round(F v) { return _mm512_cvtps_epi32(v); }  // nearest even (MXCSR default)
  static int32_t reduce_i(I v) { return _mm512_reduce_add_epi32(v); }
  static void store_i8(int8_t* p, I v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(v)); }
  static F sigmoid(F g) {  // exp of -|g| only: no overflow
    const F t = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const F s = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), t));
    return _mm512_mask_mul_ps(s, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), s, t);
  }

  static void store_out(const Out& o, int64_t row, int64_t col, F v, int n) {
    const __mmask16 k = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    if (o.dtype == F32) {
      float* p = static_cast<float*>(o.ptr) + row * o.ldo + col;
      if (o.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, p));
      _mm512_mask_storeu_ps(p, k, v);
      return;
    }
    uint16_t* p = static_cast<uint16_t*>(o.ptr) + row * o.ldo + col;
    if (o.accumulate) {
      const __m256i old = _mm256_maskz_loadu_epi16(k, p);
      v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
    }
    // float32 -> bfloat16, round to nearest even
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
};

using I = V::I;
using F = V::F;

#include "quantize_body.h"
#include "kernel_body.h"
#include "attention_body.h"
#include "vector_body.h"

}  // namespace gx_avx512
