// Attention for one query per sequence (decoding), written once for every instruction set:
// included by each ISA file inside its namespace, after `struct V` (which adds exp, reduce and
// the cache loads to what the mat-mul uses).
//
// The cache is read once, as stored (float32, float16 or bfloat16). Work items are (key/value
// head, run of `chunk` positions); each keeps a running max and sum (online softmax) and writes
// its partial result, and the caller merges the runs (split-K, as flash-decoding does), so
// long contexts use every thread even with few heads.

// Scores of positions [p, p+n) for one query head, n <= kLanes.
static inline void scores(const AttnJob& j, const float* q, int64_t g, int64_t p, int n, float* s) {
  const int nd = j.d / V::kLanes;
  for (int t = 0; t < n; ++t) {
    const int64_t row = g * j.head_stride + (p + t) * j.pos_stride;
    F acc = V::zerof();
    for (int i = 0; i < nd; ++i) acc = V::fma(V::loadu(q + i * V::kLanes), V::load_kv(j.k, j.kv_dtype, row + i * V::kLanes), acc);
    s[t] = V::reduce(acc) * j.scale;
    if (j.softcap > 0.f) s[t] = j.softcap * std::tanh(s[t] / j.softcap);
  }
}

void attend_item(const AttnJob& j, int64_t item) {
  const int64_t g = item / j.nchunks, c = item % j.nchunks;
  const int64_t p0 = c * j.chunk, p1 = p0 + j.chunk < j.length ? p0 + j.chunk : j.length;
  const int nd = j.d / V::kLanes, group = j.heads / j.kv_heads;
  // Queries after the first re-read this run of keys/values from L2, not memory.
  for (int r = 0; r < j.nq; ++r) {
    const int64_t last = j.length - j.nq + r;  // the last position query r sees
    const int64_t end = p1 < last + 1 ? p1 : last + 1;
    const int64_t first = j.window > 0 && last + 1 > j.window ? last + 1 - j.window : 0;  // the first
    const int64_t begin = p0 > first ? p0 : first;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const float* q = j.q + r * j.q_stride + h * j.d;
      F acc[kMaxHeadDim / V::kLanes];
      for (int i = 0; i < nd; ++i) acc[i] = V::zerof();
      float m = -INFINITY, l = 0.f;
      alignas(64) float s[V::kLanes];
      for (int64_t p = begin; p < end; p += V::kLanes) {
        const int n = end - p < V::kLanes ? static_cast<int>(end - p) : V::kLanes;
        scores(j, q, g, p, n, s);
        float mb = s[0];
        for (int t = 1; t < n; ++t) mb = s[t] > mb ? s[t] : mb;
        for (int t = n; t < V::kLanes; ++t) s[t] = -INFINITY;  // exp() of these is 0
        if (mb > m) {  // rescale what was summed so far to the new maximum
          const float alpha = std::exp(m - mb);
          l *= alpha;
          for (int i = 0; i < nd; ++i) acc[i] = V::mul(acc[i], V::set1(alpha));
          m = mb;
        }
        V::storef(s, V::exp(V::sub(V::loadf(s), V::set1(m))));
        for (int t = 0; t < n; ++t) {
          l += s[t];
          const F w = V::set1(s[t]);
          const int64_t row = g * j.head_stride + (p + t) * j.pos_stride;
          for (int i = 0; i < nd; ++i) acc[i] = V::fma(w, V::load_kv(j.v, j.kv_dtype, row + i * V::kLanes), acc[i]);
        }
      }
      // a run wholly after this query's position leaves max -inf and sum 0: it weighs nothing
      float* out = j.partial + ((r * j.heads + h) * j.nchunks + c) * (j.d + 2);
      out[0] = m;
      out[1] = l;
      for (int i = 0; i < nd; ++i) V::storeu(out + 2 + i * V::kLanes, acc[i]);
    }
  }
}

// Rotate-half RoPE of `heads` vectors of d values in place (HF's layout; cos/sin: this
// position's table rows): x[i] cos[i] - x[i+d/2] sin[i], x[i+d/2] cos[i+d/2] + x[i] sin[i+d/2].
void rope(float* x, int heads, int d, const float* cos, const float* sin) {
  const int half = d / 2;
  for (int h = 0; h < heads; ++h, x += d) {
    int i = 0;
    for (; i + V::kLanes <= half; i += V::kLanes) {
      const F a = V::loadu(x + i), b = V::loadu(x + i + half);
      V::storeu(x + i, V::fnma(b, V::loadu(sin + i), V::mul(a, V::loadu(cos + i))));
      V::storeu(x + i + half, V::fma(a, V::loadu(sin + i + half), V::mul(b, V::loadu(cos + i + half))));
    }
    for (; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// n float32 values into a cache at element `at`, converted to its dtype (round to nearest even;
// Q8_0 as llama.cpp's reference quantizer: d = amax / 127, q = round(x / d), per block of 32).
void store_kv(void* cache, int kv_dtype, int64_t at, const float* src, int n) {
  if (kv_dtype == KV_Q8) {
    for (int b = 0; b < n; b += 32) {
      uint8_t* blk = static_cast<uint8_t*>(cache) + (at + b) / 32 * kQ8Bytes;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::fabs(src[b + i]) > amax ? std::fabs(src[b + i]) : amax;
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const uint16_t dh = static_cast<uint16_t>(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
      std::memcpy(blk, &dh, 2);
      for (int i = 0; i < 32; ++i) blk[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(std::round(src[b + i] * id)));
    }
    return;
  }
  int i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) V::store_kv(cache, kv_dtype, at + i, V::loadu(src + i));
  for (; i < n; ++i) V::store_kv1(cache, kv_dtype, at + i, src[i]);
}

// One head's keys moved from positions [src, src+n) to [dst, dst+n) (element offsets of the first
// position; positions d apart) and rotated by RoPE's angle for the distance moved (cos/sin: that
// distance's table row, sin negated for a move down), which is exactly the key computed at its
// new position. Positions are taken in the order that never overwrites one not yet read.
void move_keys(void* cache, int kv_dtype, int64_t src, int64_t dst, int64_t n, int d, const float* cos,
               const float* sin) {
  alignas(64) float buf[kMaxHeadDim];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = dst < src ? i : n - 1 - i;
    for (int j = 0; j < d; j += V::kLanes) V::storeu(buf + j, V::load_kv(cache, kv_dtype, src + t * d + j));
    rope(buf, 1, d, cos, sin);
    store_kv(cache, kv_dtype, dst + t * d, buf, d);
  }
}
