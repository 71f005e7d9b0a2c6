// Galatea's quantized CPU kernels: what every translation unit shares.
//
// Weights are GGUF blocks repacked into *tiles* of 16 output rows (see layout.md beside this
// file): for each block of inputs, the 16 rows' scales, then their codes interleaved so that one
// 32-bit lane of a vector holds 4 consecutive inputs of one row. One `vpdpbusd` (or its AVX2
// emulation) with 4 activation bytes broadcast then advances all 16 rows at once, with no
// horizontal sums. A tile block holds exactly the bytes of the 16 GGUF blocks it came from, so
// a model takes the memory its file takes.
//
// Activations are quantized once per call to int8 in blocks of 32 (scale = amax / 127), keeping
// the sum of each 16 and 32 quantized values for the types' offset and min terms.
//
// Nothing here names an instruction set: the ISA files (matmul_avx512.cpp, matmul_avx2.cpp) are
// compiled with their own -m flags and their symbols live in their own namespaces, so no
// AVX-512 code can leak into the AVX2 path through an inline function the linker merged.
#pragma once
#include <cstddef>
#include <cstdint>

namespace gx {

constexpr int kTileRows = 16;

// GGML type ids (ggml.h): the kernels' type ids are the file's own.
enum Type : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20,
  IQ4_XS = 23
};

// IQ4_NL's and IQ4_XS's non-linear code book: a 4-bit code q stands for kIq4Values[q] (ggml's
// kvalues_iq4nl).
alignas(16) constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                               1,    13,   25,  38,  53,  69,  89,  113};

struct TypeInfo {
  int block;       // inputs per GGUF block (32, or 256 for K-quants)
  int gguf_bytes;  // bytes of one GGUF block; a tile block is 16 of them
};

// The per-type table; {0, 0} for a type the kernels do not hold.
TypeInfo type_info(int type);

// Quantized activations for one call: M rows of K inputs.
struct Acts {
  int8_t* q;     // [M][K] int8
  float* d;      // [M][K/32] scale per block of 32
  float* ds;     // [M][K/32] d * (sum of the block's 32 quantized values)
  int32_t* s16;  // [M][K/16] sum of each 16 quantized values
  int32_t* s32;  // [M][K/32] sum of each 32
  int64_t k;
};

// What is applied to each input row before it is quantized, so that the normalized or gated
// activations never exist as a tensor: RMSNorm (x * w / sqrt(mean(x^2) + eps), the input of
// q/k/v, gate/up and the output head), SwiGLU (silu(x[:K]) * x[K:2K], the input of down) or
// GeGLU (gelu_tanh(x[:K]) * x[K:2K], Gemma's).
enum PreKind : int { PRE_NONE = 0, PRE_RMSNORM = 1, PRE_SWIGLU = 2, PRE_GEGLU = 3 };
struct PreOp {
  int32_t kind;
  float eps;
  const float* weight;  // RMSNorm's [K] float32
};

// One matrix of a (possibly fused) linear layer: its rows are output columns col0..col0+n-1.
struct Segment {
  int32_t type;
  int32_t _pad;
  const uint8_t* tiles;
  int64_t n;       // output rows (the last tile may be partly padding)
  int64_t col0;    // first output column it writes
  int64_t m0, m1;  // m1 > 0: only activation rows [m0, m1) (a mixture of experts: each its own rows)
};

// Where results go: out[m * ldo + col], float32 or bfloat16, stored or added to what is there.
enum DType : int { F32 = 0, BF16 = 1 };
struct Out {
  void* ptr;
  int64_t ldo;
  int32_t dtype;
  int32_t accumulate;
};

// One unit of work: tiles [t0, t1) of one segment, for activation rows [m0, m1).
struct Item {
  int32_t seg;
  int64_t t0, t1, m0, m1;
};

struct MatmulJob {
  const Segment* segs;
  const Acts* acts;
  Out out;
  bool prefetch;
};

// nq queries per head against one cache: query r (at position length - nq + r) sees positions
// [0, length - nq + r], so the rows of one sequence verifying drafts read the cache once. Keys/
// values element (head g, position p, dim i) at g * head_stride + p * pos_stride + i, in kv_dtype
// (F32, BF16, F16, or Q8_0: blocks of 32 elements, an fp16 scale then 32 int8, 34 bytes, so
// element i is byte 34 (i / 32) + 2 + i % 32; head sizes and strides are multiples of 32).
enum KvType : int { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_Q8 = 3 };
constexpr int kQ8Bytes = 34;
// Bytes that `elements` cache elements take (a multiple of 32 for KV_Q8).
constexpr int64_t kv_bytes(int kv_dtype, int64_t elements) {
  return kv_dtype == KV_Q8 ? elements / 32 * kQ8Bytes : elements * (kv_dtype == KV_F32 ? 4 : 2);
}
constexpr int kMaxHeadDim = 256;
struct AttnJob {
  const float* q;  // query r's heads at q + r * q_stride: [heads][d]
  const void* k;
  const void* v;
  int kv_dtype;
  int heads, kv_heads, d, nq;
  int64_t q_stride, head_stride, pos_stride, length, chunk, nchunks;
  float scale;
  float* partial;  // [nq][heads][nchunks][d + 2]: running max, sum, then the weighted values
  float softcap = 0.f;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
  int64_t window = 0;  // > 0: a query sees only its last `window` positions, itself included
};

// Each instruction set provides these (namespaces gx_avx512, gx_avx2).
#define GX_ISA_API                                                                          \
  void quantize_rows(const void* x, int dtype, int64_t ldx, int64_t m0, int64_t m1,         \
                     const PreOp& pre, const Acts& out);                                    \
  void matmul_item(const MatmulJob& job, const Item& item);                                 \
  void attend_item(const AttnJob& job, int64_t item);                                        \
  void rope(float* x, int heads, int d, const float* cos, const float* sin);                  \
  void store_kv(void* cache, int kv_dtype, int64_t at, const float* src, int n);                \
  void move_keys(void* cache, int kv_dtype, int64_t src, int64_t dst, int64_t n, int d,        \
                 const float* cos, const float* sin);                                       \
  void rms_norm_row(float* x, int64_t n, const float* w, float eps);                         \
  void dots(const float* x, const float* w, int64_t rows, int64_t k, float* out);

}  // namespace gx

namespace gx_avx512 { using namespace gx; GX_ISA_API }
namespace gx_avx2 { using namespace gx; GX_ISA_API }
