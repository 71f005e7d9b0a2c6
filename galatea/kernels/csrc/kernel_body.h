// The mat-mul kernels, written once for every instruction set. Included by each ISA file inside
// its own namespace, after it defines `struct V` (its vector operations, see matmul_avx512.cpp).
//
// V's vectors hold kLanes output rows (16 for AVX-512, 8 for AVX2: then a 16-row tile is done
// in two halves, h = 0 and 1, reading the other half of each 64-byte chunk from L1). For up to
// kMR activation rows at once each chunk of codes is unpacked once and used for every row:
// the weights come from memory once per call, whatever M is.
//
// Per block of 32 inputs and activation row the integer dot product D = sum(q * xq) becomes
//   out += D * (d * dx)                 with the offset (Q4_0 8, Q5_0 16, Q6_K 32) folded
//                                       into D's start value: -offset * sum(xq)
//   out += m * (dx * sum(xq))           for the types with a min (Q4_1, Q5_1; K-quants: -dmin m)
// using the *quantized* activations' sum, as llama.cpp does (the exact float sum would not
// cancel the rounding of xq and doubled the error in the prototype).

// Bytes ahead of the weight stream to prefetch: the hardware prefetcher falls behind once the
// loop does real work for several rows (2-3x at M >= 4 in the prototype; neutral at M = 1).
constexpr int kPrefetch = 8192;

static inline void prefetch(const uint8_t* p, int bytes) {
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + o), _MM_HINT_T0);
}

// ---- simple types: blocks of 32 --------------------------------------------------------------

template <int T>
struct Simple {
  static constexpr bool nibbles = T != Q8_0;
  static constexpr bool has_min = T == Q4_1 || T == Q5_1;
  static constexpr bool bit4 = T == Q5_0 || T == Q5_1;
  static constexpr bool book = T == IQ4_NL;  // codes index kIq4Values: signed bytes, as Q8_0's
  static constexpr int offset = T == Q4_0 ? 8 : T == Q5_0 ? 16 : T == Q8_0 || book ? V::kQ8Offset : 0;
  static constexpr int masks = 32 + (has_min ? 32 : 0);    // where the bit-4 masks start
  static constexpr int codes = masks + (bit4 ? 64 : 0);    // where the code chunks start
  static constexpr int bytes = codes + (nibbles ? 256 : 512);
};

template <int T, int MR>
static void simple_tile(const uint8_t* w, int64_t nb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  using S = Simple<T>;
  const int64_t kb = a.k / 32;
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t b = 0; b < nb; ++b, w += S::bytes) {
    if (pf) prefetch(w, S::bytes);
    I acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = V::seti(S::offset ? -S::offset * a.s32[(m + i) * kb + b] : 0);
    const uint8_t* codes = w + S::codes;
    if constexpr (S::nibbles) {
      for (int c = 0; c < 4; ++c) {
        I v = V::codes(codes + 64 * c + h * V::kLanes * 4);
        I lo = V::lo4(v), hi = V::hi4(v);
        if constexpr (S::bit4) {
          lo = V::bit4(lo, w + S::masks + 16 * c, h);
          hi = V::bit4(hi, w + S::masks + 16 * c + 8, h);
        }
        if constexpr (S::book) {
          lo = V::iq4(lo);
          hi = V::iq4(hi);
          for (int i = 0; i < MR; ++i) {
            const int8_t* x = a.q + (m + i) * a.k + 32 * b + 8 * c;
            acc[i] = V::dot_q8(V::dot_q8(acc[i], lo, x), hi, x + 4);
          }
          continue;
        }
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = a.q + (m + i) * a.k + 32 * b + 8 * c;
          acc[i] = V::dot(V::dot(acc[i], lo, x), hi, x + 4);
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        I v = V::q8(V::codes(codes + 64 * c + h * V::kLanes * 4));
        for (int i = 0; i < MR; ++i) acc[i] = V::dot_q8(acc[i], v, a.q + (m + i) * a.k + 32 * b + 4 * c);
      }
    }
    const F d = V::f16(w + h * V::kLanes * 2);
    for (int i = 0; i < MR; ++i) out[i] = V::fma(V::cvt(acc[i]), V::mul(d, V::set1(a.d[(m + i) * kb + b])), out[i]);
    if constexpr (S::has_min) {
      const F mn = V::f16(w + 32 + h * V::kLanes * 2);
      for (int i = 0; i < MR; ++i) out[i] = V::fma(mn, V::set1(a.ds[(m + i) * kb + b]), out[i]);
    }
  }
}

// ---- Q4_K, Q5_K: super-blocks of 256, sub-blocks of 32 with 6-bit scales and mins ------------

template <int T, int MR>
static void k45_tile(const uint8_t* w, int64_t nsb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  constexpr bool five = T == Q5_K;
  constexpr int planes = 64, masks = planes + 192, codes = masks + (five ? 512 : 0);
  constexpr int bytes = codes + 2048;
  const int64_t kb = a.k / 32;
  const int lanes = h * V::kLanes;
  alignas(64) float fs[8][V::kLanes], fm[8][V::kLanes];  // d*sc and dmin*m per sub-block
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t sb = 0; sb < nsb; ++sb, w += bytes) {
    const F d = V::f16(w + lanes * 2), dmin = V::f16(w + 32 + lanes * 2);
    auto plane = [&](int p) { return V::u8(w + planes + 16 * p + lanes); };
    for (int j = 0; j < 4; ++j) {  // scales/mins 0-3: low 6 bits of bytes 0-3 / 4-7
      V::storef(fs[j], V::mul(d, V::cvt(V::andi(plane(j), 63))));
      V::storef(fm[j], V::mul(dmin, V::cvt(V::andi(plane(j + 4), 63))));
    }
    for (int j = 4; j < 8; ++j) {  // 4-7: a nibble of bytes 8-11, top 2 bits from bytes 0-3 / 4-7
      const I lo = plane(j + 4);
      const I sc = V::ori(V::andi(lo, 15), V::slli<4>(V::srli<6>(plane(j - 4))));
      const I mn = V::ori(V::srli<4>(lo), V::slli<4>(V::srli<6>(plane(j))));
      V::storef(fs[j], V::mul(d, V::cvt(sc)));
      V::storef(fm[j], V::mul(dmin, V::cvt(mn)));
    }
    for (int j = 0; j < 8; ++j) {
      // an eighth of the super-block per sub-block: a whole one at once is more lines than a
      // core can have in flight, and the prefetches past that are dropped
      if (pf) prefetch(w + j * (bytes / 8), bytes / 8);
      const int64_t b = sb * 8 + j;
      I acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = V::seti(0);
      for (int c = 0; c < 4; ++c) {
        I v = V::codes(w + codes + 256 * j + 64 * c + lanes * 4);
        I lo = V::lo4(v), hi = V::hi4(v);
        if constexpr (five) {
          lo = V::bit4(lo, w + masks + 64 * j + 16 * c, h);
          hi = V::bit4(hi, w + masks + 64 * j + 16 * c + 8, h);
        }
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = a.q + (m + i) * a.k + 32 * b + 8 * c;
          acc[i] = V::dot(V::dot(acc[i], lo, x), hi, x + 4);
        }
      }
      const F s = V::loadf(fs[j]), mn = V::loadf(fm[j]);
      for (int i = 0; i < MR; ++i) {
        out[i] = V::fma(V::cvt(acc[i]), V::mul(s, V::set1(a.d[(m + i) * kb + b])), out[i]);
        out[i] = V::fnma(mn, V::set1(a.ds[(m + i) * kb + b]), out[i]);
      }
    }
  }
}

// ---- Q6_K: super-blocks of 256, int8 scales per 16 inputs, codes 0..63 (offset 32) ----------

template <int MR>
static void q6k_tile(const uint8_t* w, int64_t nsb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  constexpr int scales = 32, groups = scales + 256, codes = groups + 1024, bytes = codes + 2048;
  const int64_t kb = a.k / 32, k16 = a.k / 16;
  const int lanes = h * V::kLanes;
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t sb = 0; sb < nsb; ++sb, w += bytes) {
    const F d = V::f16(w + lanes * 2);
    for (int j = 0; j < 8; ++j) {
      if (pf) prefetch(w + j * (bytes / 8), bytes / 8);  // spread, as in k45_tile
      const int64_t b = sb * 8 + j;
      F dd[MR];
      for (int i = 0; i < MR; ++i) dd[i] = V::mul(d, V::set1(a.d[(m + i) * kb + b]));
      for (int half = 0; half < 2; ++half) {  // the two 16-input sub-blocks of this block of 32
        const I s = V::s8(w + scales + 16 * (2 * j + half) + lanes);
        I acc[MR];
        for (int i = 0; i < MR; ++i) acc[i] = V::seti(-32 * a.s16[(m + i) * k16 + 2 * b + half]);
        for (int c = 2 * half; c < 2 * half + 2; ++c) {
          I v = V::codes(w + codes + 256 * j + 64 * c + lanes * 4);
          const uint8_t* g = w + groups + 128 * j + 32 * c;
          I lo = V::hi2(V::lo4(v), g, h), hi = V::hi2(V::hi4(v), g + 16, h);
          for (int i = 0; i < MR; ++i) {
            const int8_t* x = a.q + (m + i) * a.k + 32 * b + 8 * c;
            acc[i] = V::dot(V::dot(acc[i], lo, x), hi, x + 4);
          }
        }
        for (int i = 0; i < MR; ++i) out[i] = V::fma(V::cvt(V::mullo(acc[i], s)), dd[i], out[i]);
      }
    }
  }
}

// ---- Q3_K: super-blocks of 256, a 6-bit scale (offset 32) per 16 inputs, codes 0..7 (offset 4) --

template <int MR>
static void q3k_tile(const uint8_t* w, int64_t nsb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  constexpr int planes = 32, crumbs = planes + 192, masks = crumbs + 1024, bytes = masks + 512;
  const int64_t kb = a.k / 32, k16 = a.k / 16;
  const int lanes = h * V::kLanes;
  alignas(64) float fs[16][V::kLanes];  // d * (scale - 32) per 16 inputs
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t sb = 0; sb < nsb; ++sb, w += bytes) {
    const F d = V::f16(w + lanes * 2);
    auto plane = [&](int p) { return V::u8(w + planes + 16 * p + lanes); };
    const F thirty_two = V::set1(32.f);
    for (int k = 0; k < 4; ++k) {  // ggml's unpacking of the 12 scale bytes, lane by lane
      const I lo = plane(k), mid = plane(4 + k), hi = plane(8 + k);
      const I s0 = V::ori(V::andi(lo, 15), V::slli<4>(V::andi(hi, 3)));
      const I s1 = V::ori(V::andi(mid, 15), V::slli<4>(V::andi(V::srli<2>(hi), 3)));
      const I s2 = V::ori(V::srli<4>(lo), V::slli<4>(V::andi(V::srli<4>(hi), 3)));
      const I s3 = V::ori(V::srli<4>(mid), V::slli<4>(V::srli<6>(hi)));
      V::storef(fs[k], V::mul(d, V::sub(V::cvt(s0), thirty_two)));
      V::storef(fs[4 + k], V::mul(d, V::sub(V::cvt(s1), thirty_two)));
      V::storef(fs[8 + k], V::mul(d, V::sub(V::cvt(s2), thirty_two)));
      V::storef(fs[12 + k], V::mul(d, V::sub(V::cvt(s3), thirty_two)));
    }
    for (int u = 0; u < 16; ++u) {
      if (pf && u % 2 == 0) prefetch(w + (u / 2) * (bytes / 8), bytes / 8);  // spread, as in k45_tile
      const int64_t g = sb * 16 + u;  // this 16-input group, over the whole row
      I acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = V::seti(-4 * a.s16[(m + i) * k16 + g]);
      const I v = V::codes(w + crumbs + 64 * u + lanes * 4);
      for (int t = 0; t < 4; ++t) {
        const I c = V::bits(V::crumb(v, t), w + masks + 32 * u + 8 * t, h, 4);
        for (int i = 0; i < MR; ++i) acc[i] = V::dot(acc[i], c, a.q + (m + i) * a.k + 16 * g + 4 * t);
      }
      const F s = V::loadf(fs[u]);
      for (int i = 0; i < MR; ++i) out[i] = V::fma(V::cvt(acc[i]), V::mul(s, V::set1(a.d[(m + i) * kb + g / 2])), out[i]);
    }
  }
}

// ---- Q2_K: super-blocks of 256, a 4-bit scale and min per 16 inputs, codes 0..3 ---------------

template <int MR>
static void q2k_tile(const uint8_t* w, int64_t nsb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  constexpr int scales = 64, crumbs = scales + 256, bytes = crumbs + 1024;
  const int64_t kb = a.k / 32, k16 = a.k / 16;
  const int lanes = h * V::kLanes;
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t sb = 0; sb < nsb; ++sb, w += bytes) {
    const F d = V::f16(w + lanes * 2), dmin = V::f16(w + 32 + lanes * 2);
    for (int u = 0; u < 16; ++u) {
      if (pf && u % 2 == 0) prefetch(w + (u / 2) * (bytes / 8), bytes / 8);  // spread, as in k45_tile
      const int64_t g = sb * 16 + u;  // this 16-input group, over the whole row
      const I sm = V::u8(w + scales + 16 * u + lanes);
      const F s = V::mul(d, V::cvt(V::andi(sm, 15))), mn = V::mul(dmin, V::cvt(V::srli<4>(sm)));
      I acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = V::seti(0);
      const I v = V::codes(w + crumbs + 64 * u + lanes * 4);
      for (int t = 0; t < 4; ++t) {
        const I c = V::crumb(v, t);
        for (int i = 0; i < MR; ++i) acc[i] = V::dot(acc[i], c, a.q + (m + i) * a.k + 16 * g + 4 * t);
      }
      for (int i = 0; i < MR; ++i) {
        const float dx = a.d[(m + i) * kb + g / 2];
        out[i] = V::fma(V::cvt(acc[i]), V::mul(s, V::set1(dx)), out[i]);
        // the min times the group's (quantized) activations, as llama.cpp takes it
        out[i] = V::fnma(mn, V::set1(dx * static_cast<float>(a.s16[(m + i) * k16 + g])), out[i]);
      }
    }
  }
}

// ---- IQ4_XS: super-blocks of 256, a 6-bit scale (offset 32) per 32, IQ4_NL's code book -----

template <int MR>
static void iq4xs_tile(const uint8_t* w, int64_t nsb, const Acts& a, int64_t m, int h, F* out, bool pf) {
  constexpr int highs = 32, planes = 64, codes = 128, bytes = codes + 2048;
  const int64_t kb = a.k / 32;
  const int lanes = h * V::kLanes;
  for (int i = 0; i < MR; ++i) out[i] = V::zerof();
  for (int64_t sb = 0; sb < nsb; ++sb, w += bytes) {
    const F d = V::f16(w + lanes * 2);
    const I high = V::u16(w + highs + lanes * 2);  // bits 2j..2j+1: the top of sub-block j's scale
    for (int j = 0; j < 8; ++j) {
      if (pf) prefetch(w + j * (bytes / 8), bytes / 8);  // spread, as in k45_tile
      const int64_t b = sb * 8 + j;
      const I low = V::u8(w + planes + 16 * (j / 2) + lanes);
      const I ls = V::ori(V::andi(V::srl(low, 4 * (j % 2)), 15), V::slli<4>(V::andi(V::srl(high, 2 * j), 3)));
      const F s = V::mul(d, V::sub(V::cvt(ls), V::set1(32.f)));
      I acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = V::seti(-V::kQ8Offset * a.s32[(m + i) * kb + b]);
      for (int c = 0; c < 4; ++c) {
        const I v = V::codes(w + codes + 256 * j + 64 * c + lanes * 4);
        const I lo = V::iq4(V::lo4(v)), hi = V::iq4(V::hi4(v));
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = a.q + (m + i) * a.k + 32 * b + 8 * c;
          acc[i] = V::dot_q8(V::dot_q8(acc[i], lo, x), hi, x + 4);
        }
      }
      for (int i = 0; i < MR; ++i) out[i] = V::fma(V::cvt(acc[i]), V::mul(s, V::set1(a.d[(m + i) * kb + b])), out[i]);
    }
  }
}

// ---- the driver: one work item = a run of tiles for a range of activation rows ---------------

template <int MR>
static void tile_rows(int type, const uint8_t* w, int64_t k, const Acts& a, int64_t m, int h, F* out, bool pf) {
  const int64_t nb = k / 32, nsb = k / 256;
  switch (type) {
    case Q4_0: simple_tile<Q4_0, MR>(w, nb, a, m, h, out, pf); break;
    case Q4_1: simple_tile<Q4_1, MR>(w, nb, a, m, h, out, pf); break;
    case Q5_0: simple_tile<Q5_0, MR>(w, nb, a, m, h, out, pf); break;
    case Q5_1: simple_tile<Q5_1, MR>(w, nb, a, m, h, out, pf); break;
    case Q8_0: simple_tile<Q8_0, MR>(w, nb, a, m, h, out, pf); break;
    case Q4_K: k45_tile<Q4_K, MR>(w, nsb, a, m, h, out, pf); break;
    case Q5_K: k45_tile<Q5_K, MR>(w, nsb, a, m, h, out, pf); break;
    case Q6_K: q6k_tile<MR>(w, nsb, a, m, h, out, pf); break;
    case Q3_K: q3k_tile<MR>(w, nsb, a, m, h, out, pf); break;
    case Q2_K: q2k_tile<MR>(w, nsb, a, m, h, out, pf); break;
    case IQ4_NL: simple_tile<IQ4_NL, MR>(w, nb, a, m, h, out, pf); break;
    case IQ4_XS: iq4xs_tile<MR>(w, nsb, a, m, h, out, pf); break;
    default: break;
  }
}

template <int MR>
static void rows_and_store(const MatmulJob& job, const Segment& s, const uint8_t* w, int64_t col, int64_t m, int h,
                           int valid, bool pf) {
  F out[MR];
  tile_rows<MR>(s.type, w, job.acts->k, *job.acts, m, h, out, pf);
  for (int i = 0; i < MR; ++i) V::store_out(job.out, m + i, col, out[i], valid);
}

void matmul_item(const MatmulJob& job, const Item& it) {
  const Segment& s = job.segs[it.seg];
  const TypeInfo ti = type_info(s.type);
  const int64_t tile_bytes = job.acts->k / ti.block * kTileRows * ti.gguf_bytes;
  for (int64_t t = it.t0; t < it.t1; ++t) {
    const uint8_t* w = s.tiles + t * tile_bytes;
    for (int h = 0; h < V::kHalves; ++h) {
      const int64_t row = t * kTileRows + h * V::kLanes;
      const int valid = static_cast<int>(s.n - row < V::kLanes ? s.n - row : V::kLanes);
      if (valid <= 0) break;
      const int64_t col = s.col0 + row;
      // the first pass over the tile streams it from memory; later ones find it in L1/L2
      bool pf = job.prefetch && h == 0;
      int64_t m = it.m0;
      for (; it.m1 - m >= V::kMR; m += V::kMR, pf = false) rows_and_store<V::kMR>(job, s, w, col, m, h, valid, pf);
      if (V::kMR > 4 && it.m1 - m >= 4) { rows_and_store<4>(job, s, w, col, m, h, valid, pf); m += 4; pf = false; }
      if (it.m1 - m >= 2) { rows_and_store<2>(job, s, w, col, m, h, valid, pf); m += 2; pf = false; }
      if (it.m1 - m >= 1) rows_and_store<1>(job, s, w, col, m, h, valid, pf);
    }
  }
}
