// The library's C interface (called through ctypes): CPU features, the per-type table, GGUF
// blocks -> tiles, tiles -> floats, and the mat-mul driver that quantizes activations and
// hands work items to the pool. Compiled for the baseline x86-64: no instruction here needs
// more, and the ISA-specific code is only reached after the CPU said it has it.
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "gx.h"
#include "pool.h"

#define GX_EXPORT extern "C" __attribute__((visibility("default")))

namespace gx {

TypeInfo type_info(int type) {
  switch (type) {
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q2_K: return {256, 84};
    case Q3_K: return {256, 110};
    case Q6_K: return {256, 210};
    case IQ4_NL: return {32, 18};
    case IQ4_XS: return {256, 136};
    default: return {0, 0};
  }
}

namespace {

enum Isa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

int cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return kAvx2;
  return kNone;
}

// The library's one pool and scratch space, behind one lock: calls from several Python threads
// (ctypes releases the GIL) take turns.
struct State {
  Pool pool;
  std::mutex mu;
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  std::vector<int32_t> s16, s32;
  std::vector<float> partial;
};

State& state() {
  static State* s = new State;  // never destroyed: workers may outlive static destructors at exit
  return *s;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t load16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
float fp16(const uint8_t* p) { return half_to_float(load16(p)); }

// ---- GGUF block -> tile (row r of a tile block) and back ----------------------------------------

// 4 nibble chunks for 32 inputs: byte 4r+j of chunk c = input 8c+j (low) | 8c+4+j (high)
// (written by put_nib_word below, straight from GGUF's nibbles)
void get_nibbles(const uint8_t* chunks, int r, uint8_t* codes) {
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 4; ++j) {
      const uint8_t v = chunks[64 * c + 4 * r + j];
      codes[8 * c + j] = v & 15;
      codes[8 * c + 4 + j] = v >> 4;
    }
}

// bit 4 of each code: two 64-bit masks per chunk, bit 4r+j
__attribute__((always_inline)) inline void put_bit4(uint8_t* masks, int r, const uint8_t* codes) {
  // the 4 bits of row r sit side by side (bits 4r..4r+3): one nibble per mask, OR-ed once
  for (int c = 0; c < 4; ++c)
    for (int half = 0; half < 2; ++half) {
      int nib = 0;
      for (int j = 0; j < 4; ++j) nib |= ((codes[8 * c + 4 * half + j] >> 4) & 1) << j;
      masks[16 * c + 8 * half + r / 2] |= static_cast<uint8_t>(nib << (4 * (r % 2)));
    }
}
void get_bit4(const uint8_t* masks, int r, uint8_t* codes) {
  for (int c = 0; c < 4; ++c)
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 4; ++j) {
        const int bit = 4 * r + j;
        codes[8 * c + 4 * half + j] |= static_cast<uint8_t>(((masks[16 * c + 8 * half + bit / 8] >> (bit % 8)) & 1) << 4);
      }
}

// bits 4-5 of each code (Q6_K): two 16-byte groups per chunk; chunk byte v = 16L + b sits in
// bits 2L..2L+1 of group byte b
__attribute__((always_inline)) inline void put_hi2(uint8_t* groups, int r, const uint8_t* codes) {
  // row r's 4 bytes v = 4r..4r+3 share one shift 2(v / 16) and sit at group bytes v % 16
  const int shift = 2 * (4 * r / 16);
  for (int c = 0; c < 4; ++c)
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 4; ++j)
        groups[32 * c + 16 * half + (4 * r + j) % 16] |= static_cast<uint8_t>(((codes[8 * c + 4 * half + j] >> 4) & 3) << shift);
}
void get_hi2(const uint8_t* groups, int r, uint8_t* codes) {
  for (int c = 0; c < 4; ++c)
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 4; ++j) {
        const int v = 4 * r + j;
        const int hi = (groups[32 * c + 16 * half + v % 16] >> (2 * (v / 16))) & 3;
        codes[8 * c + 4 * half + j] |= static_cast<uint8_t>(hi << 4);
      }
}

// Four nibble-chunk bytes of row r straight from GGUF's nibbles, a 32-bit word at a time: byte j
// = nibble (at `shift`) of q[j] | that of q[4 + j] << 4, as put_nibbles lays out codes.
__attribute__((always_inline)) inline void put_nib_word(uint8_t* dst, const uint8_t* q, int shift) {
  uint32_t lo, hi;
  std::memcpy(&lo, q, 4);
  std::memcpy(&hi, q + 4, 4);
  const uint32_t word = ((lo >> shift) & 0x0F0F0F0Fu) | ((hi >> shift) & 0x0F0F0F0Fu) << 4;
  std::memcpy(dst, &word, 4);
}

// GGUF's 16 nibble bytes of 32 inputs (low nibbles 0-15, high 16-31; Q4_0..Q5_1) -> 4 chunks
__attribute__((always_inline)) inline void put_q4_nibbles(uint8_t* chunks, int r, const uint8_t* qs) {
  for (int c = 0; c < 4; ++c) put_nib_word(chunks + 64 * c + 4 * r, qs + 8 * (c % 2), 4 * (c / 2));
}

// 32 inputs whose nibbles sit at `shift` of 32 consecutive bytes (K-quants' halves) -> 4 chunks
__attribute__((always_inline)) inline void put_k_nibbles(uint8_t* chunks, int r, const uint8_t* q, int shift) {
  for (int c = 0; c < 4; ++c) put_nib_word(chunks + 64 * c + 4 * r, q + 8 * c, shift);
}

// Q3_K's 16 codes (0..7) of one 16-input group of row r: a crumb chunk (64 bytes: byte 4r+j holds
// the low 2 bits of inputs j, 4+j, 8+j, 12+j at bits 0-1, 2-3, 4-5, 6-7) and four 8-byte masks
// of bit 2 (mask t: bit 4r+j for input 4t+j).
__attribute__((always_inline)) inline void put_q3(uint8_t* crumbs, uint8_t* masks, int r, const uint8_t* codes) {
  for (int j = 0; j < 4; ++j) {
    uint8_t byte = 0;
    for (int t = 0; t < 4; ++t) byte = static_cast<uint8_t>(byte | (codes[4 * t + j] & 3) << (2 * t));
    crumbs[4 * r + j] = byte;
  }
  if (!masks) return;  // Q2_K: 2-bit codes, no third bit
  for (int t = 0; t < 4; ++t) {
    int nib = 0;
    for (int j = 0; j < 4; ++j) nib |= ((codes[4 * t + j] >> 2) & 1) << j;
    masks[8 * t + r / 2] = static_cast<uint8_t>(masks[8 * t + r / 2] | nib << (4 * (r % 2)));
  }
}
void get_q3(const uint8_t* crumbs, const uint8_t* masks, int r, uint8_t* codes) {
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < 4; ++j)
      codes[4 * t + j] = static_cast<uint8_t>(((crumbs[4 * r + j] >> (2 * t)) & 3) |
                                              (masks ? ((masks[8 * t + r / 2] >> (4 * (r % 2) + j)) & 1) << 2 : 0));
}

// Q3_K's sixteen 6-bit scales from its 12 packed bytes (ggml's unpacking), each minus 32.
void q3_scales(const uint8_t* b, int* sc) {
  for (int k = 0; k < 4; ++k) {
    sc[k] = ((b[k] & 15) | ((b[8 + k] & 3) << 4)) - 32;
    sc[4 + k] = ((b[4 + k] & 15) | (((b[8 + k] >> 2) & 3) << 4)) - 32;
    sc[8 + k] = ((b[k] >> 4) | (((b[8 + k] >> 4) & 3) << 4)) - 32;
    sc[12 + k] = ((b[4 + k] >> 4) | (((b[8 + k] >> 6) & 3) << 4)) - 32;
  }
}

// One GGUF block of row r -> its place in the (zeroed) tile block `t`; get_block reads it back
// (tested against gguf-py's dequantization of the same blocks). Codes (0..63) exist only for the
// high bits of Q5/Q6 types; the nibbles move as they are.
__attribute__((always_inline)) inline void put_block(int type, const uint8_t* blk, int r, uint8_t* t) {
  uint8_t high[32];  // bits 4-5 of 32 codes, for put_bit4 / put_hi2
  switch (type) {
    case Q4_0: case IQ4_NL: std::memcpy(t + 2 * r, blk, 2); put_q4_nibbles(t + 32, r, blk + 2); break;
    case IQ4_XS:  // d, scales_h (2 bytes), scales_l (4 bytes), then 16 nibble bytes per sub-block
      std::memcpy(t + 2 * r, blk, 2);
      std::memcpy(t + 32 + 2 * r, blk + 2, 2);
      for (int p = 0; p < 4; ++p) t[64 + 16 * p + r] = blk[4 + p];
      for (int j = 0; j < 8; ++j) put_q4_nibbles(t + 128 + 256 * j, r, blk + 8 + 16 * j);
      break;
    case Q4_1: std::memcpy(t + 2 * r, blk, 2); std::memcpy(t + 32 + 2 * r, blk + 2, 2); put_q4_nibbles(t + 64, r, blk + 4); break;
    case Q5_0: case Q5_1: {
      const int at = type == Q5_0 ? 2 : 4;  // Q5_1 has m after d
      std::memcpy(t + 2 * r, blk, 2);
      if (type == Q5_1) std::memcpy(t + 32 + 2 * r, blk + 2, 2);
      uint32_t qh;
      std::memcpy(&qh, blk + at, 4);
      for (int i = 0; i < 32; ++i) high[i] = static_cast<uint8_t>(((qh >> i) & 1) << 4);
      put_bit4(t + (type == Q5_0 ? 32 : 64), r, high);
      put_q4_nibbles(t + (type == Q5_0 ? 96 : 128), r, blk + at + 4);
      break;
    }
    case Q8_0:
      std::memcpy(t + 2 * r, blk, 2);
      for (int c = 0; c < 8; ++c) std::memcpy(t + 32 + 64 * c + 4 * r, blk + 2 + 4 * c, 4);
      break;
    case Q4_K: case Q5_K: {
      const bool five = type == Q5_K;
      const uint8_t* qs = blk + (five ? 48 : 16);
      std::memcpy(t + 2 * r, blk, 2);
      std::memcpy(t + 32 + 2 * r, blk + 2, 2);
      for (int p = 0; p < 12; ++p) t[64 + 16 * p + r] = blk[4 + p];
      for (int s = 0; s < 8; ++s) {  // sub-block s: bytes 32(s / 2).. at nibble s % 2; bit s of qh
        if (five) {
          for (int i = 0; i < 32; ++i) high[i] = static_cast<uint8_t>(((blk[16 + i] >> s) & 1) << 4);
          put_bit4(t + 256 + 64 * s, r, high);
        }
        put_k_nibbles(t + (five ? 768 : 256) + 256 * s, r, qs + 32 * (s / 2), 4 * (s % 2));
      }
      break;
    }
    case Q2_K: {  // scales[16] (4-bit scale | 4-bit min << 4, per 16 inputs), qs[64], d, dmin
      std::memcpy(t + 2 * r, blk + 80, 2);
      std::memcpy(t + 32 + 2 * r, blk + 82, 2);
      for (int u = 0; u < 16; ++u) t[64 + 16 * u + r] = blk[u];
      uint8_t codes[256];
      for (int x = 0; x < 256; ++x) codes[x] = static_cast<uint8_t>((blk[16 + 32 * (x / 128) + x % 32] >> (2 * ((x % 128) / 32))) & 3);
      for (int u = 0; u < 16; ++u) put_q3(t + 320 + 64 * u, nullptr, r, codes + 16 * u);
      break;
    }
    case Q3_K: {  // hmask[32], qs[64], scales[12], d: code x = 2 bits of qs | its hmask bit << 2
      std::memcpy(t + 2 * r, blk + 108, 2);
      for (int p = 0; p < 12; ++p) t[32 + 16 * p + r] = blk[96 + p];
      uint8_t codes[256];
      for (int x = 0; x < 256; ++x) {
        const int n = x / 128, j = (x % 128) / 32, l = x % 32;
        codes[x] = static_cast<uint8_t>(((blk[32 + 32 * n + l] >> (2 * j)) & 3) | ((blk[l] >> (4 * n + j)) & 1) << 2);
      }
      for (int u = 0; u < 16; ++u) put_q3(t + 224 + 64 * u, t + 1248 + 32 * u, r, codes + 16 * u);
      break;
    }
    case Q6_K:
      std::memcpy(t + 2 * r, blk + 208, 2);
      for (int s = 0; s < 16; ++s) t[32 + 16 * s + r] = blk[192 + s];
      for (int j = 0; j < 8; ++j) {  // sub-block j: half h = j / 4 of ql and qh
        const int h = j / 4;
        for (int i = 0; i < 32; ++i) high[i] = static_cast<uint8_t>(((blk[128 + 32 * h + i] >> (2 * (j % 4))) & 3) << 4);
        put_hi2(t + 288 + 128 * j, r, high);
        put_k_nibbles(t + 1312 + 256 * j, r, blk + 64 * h + 32 * (j % 2), 4 * ((j % 4) / 2));
      }
      break;
    default: break;
  }
}

// Row r of tile block `t` -> `block` floats, computed as gguf-py's dequantize computes them.
void get_block(int type, const uint8_t* t, int r, float* out) {
  uint8_t codes[256] = {0};
  switch (type) {
    case Q4_0: case Q5_0: {
      const bool five = type == Q5_0;
      if (five) get_bit4(t + 32, r, codes);
      uint8_t lo[32];
      get_nibbles(t + (five ? 96 : 32), r, lo);
      const float d = fp16(t + 2 * r);
      for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>((lo[i] | codes[i]) - (five ? 16 : 8));
      break;
    }
    case Q4_1: case Q5_1: {
      const bool five = type == Q5_1;
      if (five) get_bit4(t + 64, r, codes);
      uint8_t lo[32];
      get_nibbles(t + (five ? 128 : 64), r, lo);
      const float d = fp16(t + 2 * r), m = fp16(t + 32 + 2 * r);
      for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(lo[i] | codes[i]) + m;
      break;
    }
    case IQ4_NL: {
      uint8_t q[32];
      get_nibbles(t + 32, r, q);
      const float d = fp16(t + 2 * r);
      for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(kIq4Values[q[i]]);
      break;
    }
    case IQ4_XS: {
      const float d = fp16(t + 2 * r);
      const int high = load16(t + 32 + 2 * r);
      for (int j = 0; j < 8; ++j) {
        const int ls = ((t[64 + 16 * (j / 2) + r] >> (4 * (j % 2))) & 15) | ((high >> (2 * j)) & 3) << 4;
        const float dl = d * static_cast<float>(ls - 32);
        uint8_t q[32];
        get_nibbles(t + 128 + 256 * j, r, q);
        for (int i = 0; i < 32; ++i) out[32 * j + i] = dl * static_cast<float>(kIq4Values[q[i]]);
      }
      break;
    }
    case Q8_0: {
      const float d = fp16(t + 2 * r);
      for (int c = 0; c < 8; ++c)
        for (int j = 0; j < 4; ++j) out[4 * c + j] = static_cast<float>(static_cast<int8_t>(t[32 + 64 * c + 4 * r + j])) * d;
      break;
    }
    case Q4_K: case Q5_K: {
      const bool five = type == Q5_K;
      const float d = fp16(t + 2 * r), dmin = fp16(t + 32 + 2 * r);
      uint8_t p[12];
      for (int i = 0; i < 12; ++i) p[i] = t[64 + 16 * i + r];
      for (int s = 0; s < 8; ++s) {
        const int sc = s < 4 ? p[s] & 63 : (p[s + 4] & 15) | ((p[s - 4] >> 6) << 4);
        const int mn = s < 4 ? p[s + 4] & 63 : (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
        uint8_t lo[32], hb[32] = {0};
        if (five) get_bit4(t + 256 + 64 * s, r, hb);
        get_nibbles(t + (five ? 768 : 256) + 256 * s, r, lo);
        const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(mn);
        for (int i = 0; i < 32; ++i) out[32 * s + i] = ds * static_cast<float>(lo[i] | hb[i]) - dm;
      }
      break;
    }
    case Q2_K: {
      const float d = fp16(t + 2 * r), dmin = fp16(t + 32 + 2 * r);
      for (int u = 0; u < 16; ++u) {
        const uint8_t sm = t[64 + 16 * u + r];
        uint8_t q[16];
        get_q3(t + 320 + 64 * u, nullptr, r, q);
        const float dl = d * static_cast<float>(sm & 15), ml = dmin * static_cast<float>(sm >> 4);
        for (int i = 0; i < 16; ++i) out[16 * u + i] = dl * static_cast<float>(q[i]) - ml;
      }
      break;
    }
    case Q3_K: {
      const float d = fp16(t + 2 * r);
      uint8_t packed[12];
      for (int p = 0; p < 12; ++p) packed[p] = t[32 + 16 * p + r];
      int sc[16];
      q3_scales(packed, sc);
      for (int u = 0; u < 16; ++u) {
        uint8_t q[16];
        get_q3(t + 224 + 64 * u, t + 1248 + 32 * u, r, q);
        for (int i = 0; i < 16; ++i) out[16 * u + i] = d * static_cast<float>(sc[u]) * static_cast<float>(q[i] - 4);
      }
      break;
    }
    case Q6_K: {
      const float d = fp16(t + 2 * r);
      for (int j = 0; j < 8; ++j) {
        uint8_t lo[32], hb[32] = {0};
        get_hi2(t + 288 + 128 * j, r, hb);
        get_nibbles(t + 1312 + 256 * j, r, lo);
        for (int i = 0; i < 32; ++i) {
          const float ds = d * static_cast<float>(static_cast<int8_t>(t[32 + 16 * (2 * j + i / 16) + r]));
          out[32 * j + i] = ds * static_cast<float>((lo[i] | hb[i]) - 32);
        }
      }
      break;
    }
    default: break;
  }
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

bool valid_shape(int type, int64_t n, int64_t k) {
  const TypeInfo ti = type_info(type);
  return ti.block != 0 && n > 0 && k > 0 && k % ti.block == 0;
}

// ---- the mat-mul driver ------------------------------------------------------------------------

struct MatmulCall {
  int isa;
  MatmulJob job;
  const std::vector<Item>* items;
  const void* x;
  int xdtype;
  int64_t ldx, m, rows_per_task;
  PreOp pre;
  Acts acts;
};

void run_item(void* ctx, int64_t i) {
  const MatmulCall& c = *static_cast<const MatmulCall*>(ctx);
  if (c.isa == kAvx512) gx_avx512::matmul_item(c.job, (*c.items)[i]);
  else gx_avx2::matmul_item(c.job, (*c.items)[i]);
}

void run_quantize(void* ctx, int64_t i) {
  const MatmulCall& c = *static_cast<const MatmulCall*>(ctx);
  const int64_t m0 = i * c.rows_per_task, m1 = m0 + c.rows_per_task < c.m ? m0 + c.rows_per_task : c.m;
  auto fn = c.isa == kAvx512 ? gx_avx512::quantize_rows : gx_avx2::quantize_rows;
  fn(c.x, c.xdtype, c.ldx, m0, m1, c.pre, c.acts);
}

// Activation rows per pass over the weights: their int8 copy (64 x 11008 bytes) stays in L2
// while every tile streams past it.
constexpr int64_t kRowChunk = 64;

// Work items: runs of whole tiles of about `target` bytes, so that a thread reads one sequential
// stream per item and there are enough items to balance threads on a busy machine.
std::vector<Item> plan_items(const Segment* segs, int nseg, int64_t k, int64_t m, int threads) {
  int64_t total = 0;
  for (int s = 0; s < nseg; ++s) {
    const TypeInfo ti = type_info(segs[s].type);
    total += (segs[s].n + kTileRows - 1) / kTileRows * (k / ti.block) * kTileRows * ti.gguf_bytes;
  }
  const int64_t target = total / (8 * threads) > (32 << 10) ? total / (8 * threads) : (32 << 10);
  std::vector<Item> items;
  auto add = [&](int s, int64_t m0, int64_t m1) {
    const TypeInfo ti = type_info(segs[s].type);
    const int64_t tiles = (segs[s].n + kTileRows - 1) / kTileRows;
    const int64_t tile_bytes = (k / ti.block) * kTileRows * ti.gguf_bytes;
    int64_t per = (target + tile_bytes - 1) / tile_bytes;
    if (per < 1) per = 1;
    for (int64_t t = 0; t < tiles; t += per) items.push_back({s, t, t + per < tiles ? t + per : tiles, m0, m1});
  };
  bool ranged = false;
  for (int s = 0; s < nseg; ++s) ranged = ranged || segs[s].m1 > 0;
  if (!ranged) {  // every segment reads every row: a chunk of rows stays in L2 while all segments pass
    for (int64_t m0 = 0; m0 < m; m0 += kRowChunk) {
      for (int s = 0; s < nseg; ++s) add(s, m0, m0 + kRowChunk < m ? m0 + kRowChunk : m);
    }
    return items;
  }
  for (int s = 0; s < nseg; ++s) {  // each expert's tiles pass once per chunk of its own rows
    const int64_t lo = segs[s].m1 > 0 ? segs[s].m0 : 0, hi = segs[s].m1 > 0 ? segs[s].m1 : m;
    for (int64_t m0 = lo; m0 < hi; m0 += kRowChunk) add(s, m0, m0 + kRowChunk < hi ? m0 + kRowChunk : hi);
  }
  return items;
}

// Attention for several sequences at once (one query each): every (sequence, key/value head,
// run of positions) is a work item.
struct AttnCall {
  int isa;
  std::vector<AttnJob> jobs;
  std::vector<std::pair<int, int64_t>> items;  // (sequence, item within it)
};

void run_attend(void* ctx, int64_t i) {
  const AttnCall& c = *static_cast<const AttnCall*>(ctx);
  const auto [row, item] = c.items[i];
  if (c.isa == kAvx512) gx_avx512::attend_item(c.jobs[row], item);
  else gx_avx2::attend_item(c.jobs[row], item);
}

// Runs of positions per head, at fixed absolute boundaries (every kAttnRun positions): a query's
// result then depends only on its position and the cached keys/values, never on how many
// queries share the call, how long the longest is or how many threads run it - so a prompt read
// in any chunking, or found in the cache, gives the same numbers (greedy replies reproduce).
constexpr int64_t kAttnRun = 256;  // keys/values of a run stay in L2 while several queries read them
constexpr int kAttnQueries = 64;  // queries per attend() call: bounds the partial results' memory

void plan_chunks(AttnJob& j) {
  j.chunk = kAttnRun;
  j.nchunks = (j.length + kAttnRun - 1) / kAttnRun;
}

// Run the jobs (their `partial` set by this function), then merge each head's runs into out
// (query r of job i at outs[i] + r * out_stride): rescale every run to the head's overall maximum.
void attend(int isa, std::vector<AttnJob>& jobs, float* const* outs, int64_t out_stride) {
  State& st = state();
  AttnCall call{isa, {}, {}};
  size_t total = 0;
  for (auto& j : jobs) {
    plan_chunks(j);
    total += static_cast<size_t>(j.nq) * j.heads * j.nchunks * (j.d + 2);
  }
  st.partial.resize(total);
  size_t at = 0;
  for (size_t r = 0; r < jobs.size(); ++r) {
    jobs[r].partial = st.partial.data() + at;
    at += static_cast<size_t>(jobs[r].nq) * jobs[r].heads * jobs[r].nchunks * (jobs[r].d + 2);
    for (int64_t i = 0; i < jobs[r].kv_heads * jobs[r].nchunks; ++i) call.items.emplace_back(static_cast<int>(r), i);
  }
  call.jobs = jobs;
  st.pool.run(static_cast<int64_t>(call.items.size()), run_attend, &call);
  for (size_t r = 0; r < jobs.size(); ++r) {
    const AttnJob& j = jobs[r];
    for (int h = 0; h < j.nq * j.heads; ++h) {  // (query, head) pairs
      const float* part = j.partial + static_cast<size_t>(h) * j.nchunks * (j.d + 2);
      float mx = -INFINITY, den = 0.f;
      for (int64_t c = 0; c < j.nchunks; ++c) mx = part[c * (j.d + 2)] > mx ? part[c * (j.d + 2)] : mx;
      float* o = outs[r] + (h / j.heads) * out_stride + static_cast<size_t>(h % j.heads) * j.d;
      for (int i = 0; i < j.d; ++i) o[i] = 0.f;
      for (int64_t c = 0; c < j.nchunks; ++c) {
        const float* pc = part + c * (j.d + 2);
        const float w = std::exp(pc[0] - mx);
        den += w * pc[1];
        for (int i = 0; i < j.d; ++i) o[i] += w * pc[2 + i];
      }
      for (int i = 0; i < j.d; ++i) o[i] /= den;
    }
  }
}

struct RepackCall {
  int type;
  const uint8_t* blocks;
  const int64_t* rows;
  int64_t n, k;
  uint8_t* tiles;
};

// One tile of kTileRows rows; TYPE is a template argument so that put_block's switch and its
// loops are resolved at compile time (the generic call ran at ~0.5 GB/s, a 7B took 3.4 s).
template <int TYPE>
void repack_tile(void* ctx, int64_t t) {
  const RepackCall& c = *static_cast<const RepackCall*>(ctx);
  const TypeInfo ti = type_info(TYPE);
  const int64_t nb = c.k / ti.block, tb = int64_t{kTileRows} * ti.gguf_bytes;
  uint8_t* tile = c.tiles + t * nb * tb;
  const uint8_t* src[kTileRows];
  int rows = 0;
  for (; rows < kTileRows && t * kTileRows + rows < c.n; ++rows) {
    const int64_t row = t * kTileRows + rows;
    src[rows] = c.blocks + (c.rows ? c.rows[row] : row) * nb * ti.gguf_bytes;
  }
  // block by block, all rows of a tile block at once: its tb bytes are written while in cache
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* out = tile + b * tb;
    std::memset(out, 0, tb);
    for (int r = 0; r < rows; ++r) put_block(TYPE, src[r] + b * ti.gguf_bytes, r, out);
  }
}

using TileFn = void (*)(void*, int64_t);

TileFn repack_fn(int type) {
  switch (type) {
    case Q4_0: return repack_tile<Q4_0>;
    case Q4_1: return repack_tile<Q4_1>;
    case Q5_0: return repack_tile<Q5_0>;
    case Q5_1: return repack_tile<Q5_1>;
    case Q8_0: return repack_tile<Q8_0>;
    case Q4_K: return repack_tile<Q4_K>;
    case Q5_K: return repack_tile<Q5_K>;
    case Q6_K: return repack_tile<Q6_K>;
    case Q2_K: return repack_tile<Q2_K>;
    case Q3_K: return repack_tile<Q3_K>;
    case IQ4_NL: return repack_tile<IQ4_NL>;
    case IQ4_XS: return repack_tile<IQ4_XS>;
    default: return nullptr;
  }
}


}  // namespace
}  // namespace gx

using namespace gx;

GX_EXPORT int gx_version() { return 1; }

// 2: AVX-512 VNNI, 1: AVX2 + FMA + F16C, 0: neither (the torch fallback runs)
GX_EXPORT int gx_cpu_isa() { return cpu_isa(); }

GX_EXPORT int gx_type_block(int type) { return type_info(type).block; }
GX_EXPORT int gx_type_bytes(int type) { return type_info(type).gguf_bytes; }

GX_EXPORT int64_t gx_tiles_bytes(int type, int64_t n, int64_t k) {
  if (!valid_shape(type, n, k)) return -1;
  const TypeInfo ti = type_info(type);
  return (n + kTileRows - 1) / kTileRows * (k / ti.block) * kTileRows * ti.gguf_bytes;
}

GX_EXPORT void gx_set_threads(int n) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().pool.resize(n);
}
GX_EXPORT int gx_threads() { return state().pool.threads(); }
GX_EXPORT void gx_set_spin_us(int us) { state().pool.set_spin_us(us); }

// GGUF blocks of an [n, k] tensor (row `rows[i]` of the file becomes row i; rows may be null)
// -> tiles (gx_tiles_bytes bytes).
GX_EXPORT int gx_repack(int type, const uint8_t* blocks, int64_t n, int64_t k, const int64_t* rows, uint8_t* tiles) {
  if (!valid_shape(type, n, k)) return -1;
  RepackCall call{type, blocks, rows, n, k, tiles};
  std::lock_guard<std::mutex> lock(state().mu);
  state().pool.run((n + kTileRows - 1) / kTileRows, repack_fn(type), &call);
  return 0;
}

// Rows `rows[0..nrows)` of a tiled [n, k] weight as floats: out[i * k + j], float32 or bfloat16.
GX_EXPORT int gx_dequantize(int type, const uint8_t* tiles, int64_t n, int64_t k, const int64_t* rows, int64_t nrows,
                            void* out, int odtype) {
  if (!valid_shape(type, n, k)) return -1;
  const TypeInfo ti = type_info(type);
  const int64_t nb = k / ti.block, tb = int64_t{kTileRows} * ti.gguf_bytes;
  std::vector<float> buf(ti.block);
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t row = rows[i];
    if (row < 0 || row >= n) return -2;
    const uint8_t* tile = tiles + row / kTileRows * nb * tb;
    for (int64_t b = 0; b < nb; ++b) {
      get_block(type, tile + b * tb, static_cast<int>(row % kTileRows), buf.data());
      for (int j = 0; j < ti.block; ++j) {
        const int64_t at = i * k + b * ti.block + j;
        if (odtype == F32) static_cast<float*>(out)[at] = buf[j];
        else static_cast<uint16_t*>(out)[at] = to_bf16(buf[j]);
      }
    }
  }
  return 0;
}

// out[m, col0 + i] (=|+=) sum_j pre(x[m])[j] * W_seg[i, j] for every segment, M rows of x.
// pre_kind: PRE_NONE, PRE_RMSNORM (pre_weight [k] float32, eps), PRE_SWIGLU or PRE_GEGLU (x rows
// hold 2k: the gate, then the up projection).
namespace {

int check_matmul(int isa, const Segment* segs, int nseg, int64_t k, int64_t m, int pre_kind, const float* pre_weight) {
  if ((isa != kAvx512 && isa != kAvx2) || isa > cpu_isa()) return -3;
  if (k <= 0 || k % 32 || m <= 0 || nseg <= 0) return -1;
  if (pre_kind < PRE_NONE || pre_kind > PRE_GEGLU || (pre_kind == PRE_RMSNORM && !pre_weight)) return -1;
  for (int s = 0; s < nseg; ++s) {
    if (!valid_shape(segs[s].type, segs[s].n, k)) return -1;
    if (segs[s].m1 > 0 && (segs[s].m0 < 0 || segs[s].m0 >= segs[s].m1 || segs[s].m1 > m)) return -1;
  }
  return 0;
}

// The mat-mul, its arguments checked and the state's lock held by the caller.
void matmul_locked(int isa, const Segment* segs, int nseg, int64_t k, const void* x, int xdtype, int64_t ldx,
                   int64_t m, void* out, int odtype, int64_t ldo, int accumulate, int pre_kind,
                   const float* pre_weight, float eps) {
  State& st = state();
  st.q.resize(m * k);
  st.d.resize(m * k / 32);
  st.ds.resize(m * k / 32);
  st.s32.resize(m * k / 32);
  st.s16.resize(m * k / 16);
  MatmulCall call;
  call.isa = isa;
  call.acts = Acts{st.q.data(), st.d.data(), st.ds.data(), st.s16.data(), st.s32.data(), k};
  call.x = x;
  call.xdtype = xdtype;
  call.ldx = ldx;
  call.m = m;
  call.pre = PreOp{pre_kind, eps, pre_weight};
  const int threads = st.pool.threads();
  call.rows_per_task = m < 4 * threads ? m : (m + 4 * threads - 1) / (4 * threads);
  st.pool.run((m + call.rows_per_task - 1) / call.rows_per_task, run_quantize, &call);
  const std::vector<Item> items = plan_items(segs, nseg, k, m, threads);
  call.items = &items;
  call.job = MatmulJob{segs, &call.acts, Out{out, ldo, odtype, accumulate}, true};
  st.pool.run(static_cast<int64_t>(items.size()), run_item, &call);
}

}  // namespace

GX_EXPORT int gx_matmul(int isa, const Segment* segs, int nseg, int64_t k, const void* x, int xdtype, int64_t ldx,
                        int64_t m, void* out, int odtype, int64_t ldo, int accumulate, int pre_kind,
                        const float* pre_weight, float eps) {
  if (const int rc = check_matmul(isa, segs, nseg, k, m, pre_kind, pre_weight)) return rc;
  std::lock_guard<std::mutex> lock(state().mu);
  matmul_locked(isa, segs, nseg, k, x, xdtype, ldx, m, out, odtype, ldo, accumulate, pre_kind, pre_weight, eps);
  return 0;
}

namespace {

struct RouteCall {
  int isa;
  const float* xn;
  const float* router;
  int experts;
  int64_t k;
  float* scores;
};

void run_route(void* ctx, int64_t r) {
  const RouteCall& c = *static_cast<const RouteCall*>(ctx);
  auto dots = c.isa == kAvx512 ? gx_avx512::dots : gx_avx2::dots;
  dots(c.xn + r * c.k, c.router, c.experts, c.k, c.scores + r * c.experts);
}

}  // namespace

// A mixture of experts' layer on m rows of x (float32, ldx apart), added into x:
//   xn = rmsnorm(x) * norm; p = softmax(xn . router^T) over the experts (float32); each row's top_k
//   experts, their weights renormalised to sum 1 when `renorm`; x += sum over them of w * expert(xn),
//   expert(v) = down(act(gate v) * (up v)), act by pre_kind (PRE_SWIGLU or PRE_GEGLU).
// The rows are gathered by expert, so each chosen expert multiplies only its own rows and its
// weights are read once for all of them: gate/up of every chosen expert in one mat-mul, down in
// another. gate_up: experts x n_gu segments (each expert's, columns 0..2*width), down: experts x
// n_down (columns 0..k). Transformers' order of operations (Mixtral, Qwen3-MoE).
GX_EXPORT int gx_moe(int isa, float* x, int64_t ldx, int64_t m, int64_t k, const float* norm, float eps,
                     const float* router, int experts, int top_k, int renorm, const Segment* gate_up, int n_gu,
                     const Segment* down, int n_down, int64_t width, int pre_kind) {
  if ((isa != kAvx512 && isa != kAvx2) || isa > cpu_isa()) return -3;
  if (m <= 0 || k <= 0 || k % 32 || width <= 0 || width % 32 || experts <= 0 || top_k <= 0 || top_k > experts ||
      n_gu <= 0 || n_down <= 0 || (pre_kind != PRE_SWIGLU && pre_kind != PRE_GEGLU))
    return -1;
  for (int i = 0; i < experts * n_gu; ++i)
    if (!valid_shape(gate_up[i].type, gate_up[i].n, k)) return -1;
  for (int i = 0; i < experts * n_down; ++i)
    if (!valid_shape(down[i].type, down[i].n, width)) return -1;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  auto norm_row = isa == kAvx512 ? gx_avx512::rms_norm_row : gx_avx2::rms_norm_row;
  std::vector<float> xn(static_cast<size_t>(m * k)), scores(static_cast<size_t>(m * experts));
  for (int64_t r = 0; r < m; ++r) {
    std::memcpy(xn.data() + r * k, x + r * ldx, static_cast<size_t>(k) * sizeof(float));
    norm_row(xn.data() + r * k, k, norm, eps);
  }
  RouteCall route{isa, xn.data(), router, experts, k, scores.data()};
  st.pool.run(m, run_route, &route);
  // each row's top_k experts and weights, then the (row, weight) pairs grouped by expert
  const int64_t n = m * top_k;
  std::vector<int> chosen(static_cast<size_t>(n));
  std::vector<float> weight(static_cast<size_t>(n));
  std::vector<int64_t> count(experts + 1, 0);
  for (int64_t r = 0; r < m; ++r) {
    float* p = scores.data() + r * experts;
    float mx = p[0];
    for (int e = 1; e < experts; ++e) mx = p[e] > mx ? p[e] : mx;
    float sum = 0.f;
    for (int e = 0; e < experts; ++e) sum += (p[e] = std::exp(p[e] - mx));
    float kept = 0.f;
    for (int j = 0; j < top_k; ++j) {  // the largest left, first of equals first (top_k is small)
      int best = -1;
      for (int e = 0; e < experts; ++e) {
        bool taken = false;
        for (int i = 0; i < j && !taken; ++i) taken = chosen[r * top_k + i] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      chosen[r * top_k + j] = best;
      weight[r * top_k + j] = p[best] / sum;
      kept += p[best] / sum;
      ++count[best + 1];
    }
    if (renorm)
      for (int j = 0; j < top_k; ++j) weight[r * top_k + j] /= kept;
  }
  for (int e = 0; e < experts; ++e) count[e + 1] += count[e];  // count[e]: where expert e's rows begin
  std::vector<int64_t> at(count.begin(), count.end() - 1), row_of(static_cast<size_t>(n));
  std::vector<float> w_of(static_cast<size_t>(n)), xg(static_cast<size_t>(n * k));
  for (int64_t r = 0; r < m; ++r)
    for (int j = 0; j < top_k; ++j) {
      const int64_t g = at[chosen[r * top_k + j]]++;
      row_of[g] = r;
      w_of[g] = weight[r * top_k + j];
      std::memcpy(xg.data() + g * k, xn.data() + r * k, static_cast<size_t>(k) * sizeof(float));
    }
  std::vector<Segment> gu_segs, down_segs;
  for (int e = 0; e < experts; ++e) {
    if (count[e + 1] == count[e]) continue;  // no row chose it: its weights are not read
    for (int i = 0; i < n_gu; ++i) {
      Segment s = gate_up[e * n_gu + i];
      s.m0 = count[e], s.m1 = count[e + 1];
      gu_segs.push_back(s);
    }
    for (int i = 0; i < n_down; ++i) {
      Segment s = down[e * n_down + i];
      s.m0 = count[e], s.m1 = count[e + 1];
      down_segs.push_back(s);
    }
  }
  std::vector<float> gu(static_cast<size_t>(n * 2 * width)), y(static_cast<size_t>(n * k));
  matmul_locked(isa, gu_segs.data(), static_cast<int>(gu_segs.size()), k, xg.data(), F32, k, n, gu.data(), F32,
                2 * width, 0, PRE_NONE, nullptr, 0.f);
  matmul_locked(isa, down_segs.data(), static_cast<int>(down_segs.size()), width, gu.data(), F32, 2 * width, n,
                y.data(), F32, k, 0, pre_kind, nullptr, 0.f);
  for (int64_t g = 0; g < n; ++g) {
    float* dst = x + row_of[g] * ldx;
    const float* src = y.data() + g * k;
    for (int64_t i = 0; i < k; ++i) dst[i] += w_of[g] * src[i];
  }
  return 0;
}


// A cache dtype the attention kernels read, for head size d (Q8_0's blocks of 32 need d % 32 == 0).
static bool valid_kv(int kv_dtype, int d) {
  return kv_dtype == KV_F32 || kv_dtype == KV_BF16 || kv_dtype == KV_F16 || (kv_dtype == KV_Q8 && d % 32 == 0);
}

// Attention of one query per head: out[h] = softmax(q[h] . K_g^T * scale) V_g (g: h's key/value
// head) over cache positions [0, length). q, out: float32 [heads][d].
GX_EXPORT int gx_attention(int isa, const float* q, int heads, int kv_heads, int d, const void* k, const void* v,
                           int kv_dtype, int64_t head_stride, int64_t pos_stride, int64_t length, float scale,
                           float* out) {
  if ((isa != kAvx512 && isa != kAvx2) || isa > cpu_isa()) return -3;
  if (d % 16 || d > kMaxHeadDim || kv_heads <= 0 || heads % kv_heads || length <= 0) return -1;
  if (!valid_kv(kv_dtype, d)) return -1;
  std::lock_guard<std::mutex> lock(state().mu);
  std::vector<AttnJob> jobs{AttnJob{q, k, v, kv_dtype, heads, kv_heads, d, 1, 0, head_stride, pos_stride, length, 0,
                                    0, scale, nullptr}};
  attend(isa, jobs, &out, 0);
  return 0;
}

// One decoding step's attention for `rows` sequences. Row r's qkv[r * ldqkv ...] holds q (heads
// x d), k and v (kv_heads x d each) for position pos[r], float32: q and k are rotated there in
// place, k and v written into the row's cache (kcache[r], vcache[r]: this layer's [kv_heads]
// [positions][d] in kv_dtype, head_stride[r] apart), and q attends to positions 0..pos[r].
// cos/sin: rotary tables [positions][d] float32. out[r * ldo ...]: float32 [heads x d].
// softcap > 0: scores capped by softcap * tanh(score / softcap); window > 0: each query sees its
// last `window` positions only; q_norm/k_norm (float32 [d], or null): each head of q and k is
// RMS-normalised with them (eps norm_eps) before it is rotated (Qwen3, Gemma 3).
GX_EXPORT int gx_step_attention(int isa, float* qkv, int64_t ldqkv, int rows, const int64_t* pos,
                                void* const* kcache, void* const* vcache, const int64_t* head_stride,
                                int64_t pos_stride, int kv_dtype, int heads, int kv_heads, int d, const float* cos,
                                const float* sin, float scale, float softcap, int64_t window, const float* q_norm,
                                const float* k_norm, float norm_eps, float* out, int64_t ldo) {
  if ((isa != kAvx512 && isa != kAvx2) || isa > cpu_isa()) return -3;
  if (d % 16 || d > kMaxHeadDim || kv_heads <= 0 || heads % kv_heads || rows <= 0) return -1;
  if (!valid_kv(kv_dtype, d)) return -1;
  std::lock_guard<std::mutex> lock(state().mu);
  std::vector<AttnJob> jobs;
  std::vector<float*> outs;
  for (int r = 0; r < rows; ++r) {
    float* q = qkv + r * ldqkv;
    float *k = q + static_cast<int64_t>(heads) * d, *v = k + static_cast<int64_t>(kv_heads) * d;
    auto rope = isa == kAvx512 ? gx_avx512::rope : gx_avx2::rope;
    auto store = isa == kAvx512 ? gx_avx512::store_kv : gx_avx2::store_kv;
    if (q_norm && k_norm) {
      auto norm_row = isa == kAvx512 ? gx_avx512::rms_norm_row : gx_avx2::rms_norm_row;
      for (int h = 0; h < heads; ++h) norm_row(q + h * d, d, q_norm, norm_eps);
      for (int g = 0; g < kv_heads; ++g) norm_row(k + g * d, d, k_norm, norm_eps);
    }
    rope(q, heads + kv_heads, d, cos + pos[r] * d, sin + pos[r] * d);  // q and k are adjacent
    for (int g = 0; g < kv_heads; ++g) {
      store(kcache[r], kv_dtype, g * head_stride[r] + pos[r] * pos_stride, k + g * d, d);
      store(vcache[r], kv_dtype, g * head_stride[r] + pos[r] * pos_stride, v + g * d, d);
    }
    // rows of one cache at consecutive positions (drafts being verified) share one job
    const bool joins = r > 0 && kcache[r] == kcache[r - 1] && vcache[r] == vcache[r - 1] &&
                       head_stride[r] == head_stride[r - 1] && pos[r] == pos[r - 1] + 1;
    if (joins) {
      jobs.back().nq += 1;
      jobs.back().length += 1;
      continue;
    }
    jobs.push_back(AttnJob{q, kcache[r], vcache[r], kv_dtype, heads, kv_heads, d, 1, ldqkv, head_stride[r],
                           pos_stride, pos[r] + 1, 0, 0, scale, nullptr, softcap, window});
    outs.push_back(out + r * ldo);
  }
  // A prompt's rows in pieces of kAttnQueries queries (the same results: runs are absolute).
  std::vector<AttnJob> batch;
  std::vector<float*> batch_outs;
  int queries = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const AttnJob& j = jobs[i];
    for (int q0 = 0; q0 < j.nq; q0 += kAttnQueries) {
      AttnJob piece = j;
      piece.q = j.q + q0 * j.q_stride;
      piece.nq = j.nq - q0 < kAttnQueries ? j.nq - q0 : kAttnQueries;
      piece.length = j.length - j.nq + q0 + piece.nq;
      batch.push_back(piece);
      batch_outs.push_back(outs[i] + q0 * ldo);
      queries += piece.nq;
      if (queries >= kAttnQueries) {
        attend(isa, batch, batch_outs.data(), ldo);
        batch.clear();
        batch_outs.clear();
        queries = 0;
      }
    }
  }
  if (!batch.empty()) attend(isa, batch, batch_outs.data(), ldo);
  return 0;
}

namespace {

struct MoveCall {
  int isa, kv_dtype, d;
  void *k, *v;
  int64_t head_stride, src, dst, n;
  const float *cos, *sin;
};

void run_move(void* ctx, int64_t h) {
  const MoveCall& c = *static_cast<const MoveCall*>(ctx);
  auto move = c.isa == kAvx512 ? gx_avx512::move_keys : gx_avx2::move_keys;
  move(c.k, c.kv_dtype, h * c.head_stride + c.src * c.d, h * c.head_stride + c.dst * c.d, c.n, c.d, c.cos, c.sin);
  char* v = static_cast<char*>(c.v) + kv_bytes(c.kv_dtype, h * c.head_stride);
  std::memmove(v + kv_bytes(c.kv_dtype, c.dst * c.d), v + kv_bytes(c.kv_dtype, c.src * c.d),
               static_cast<size_t>(kv_bytes(c.kv_dtype, c.n * c.d)));
}

}  // namespace

// Context shift and chunk reuse: in each of `heads` head rows (head_stride elements apart; each
// row's positions contiguous, d elements each) move positions [src, src+n) to [dst, dst+n),
// values as they are and keys re-rotated to their new positions (cos/sin: float32 [d], RoPE's
// table row for |dst - src|, sin negated when dst < src). The rows are independent work items.
GX_EXPORT int gx_kv_move(int isa, void* k, void* v, int kv_dtype, int64_t heads, int64_t head_stride, int d,
                         int64_t src, int64_t dst, int64_t n, const float* cos, const float* sin) {
  if ((isa != kAvx512 && isa != kAvx2) || isa > cpu_isa()) return -3;
  if (d % 16 || d > kMaxHeadDim || heads <= 0 || n < 0 || src < 0 || dst < 0) return -1;
  if ((src > dst ? src : dst) + n > head_stride / d) return -1;
  if (!valid_kv(kv_dtype, d)) return -1;
  if (n == 0 || src == dst) return 0;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  MoveCall call{isa, kv_dtype, d, k, v, head_stride, src, dst, n, cos, sin};
  st.pool.run(heads, run_move, &call);
  return 0;
}
