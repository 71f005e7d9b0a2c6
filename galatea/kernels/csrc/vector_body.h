// Small float32 helpers of a decoding step, written once for every instruction set: included by
// each ISA file inside its namespace, after `struct V`. n is a multiple of V::kLanes.

// x <- x * w / sqrt(mean(x^2) + eps), in place (a head of q or k: Qwen3's and Gemma 3's norms).
void rms_norm_row(float* x, int64_t n, const float* w, float eps) {
  F ss = V::zerof();
  for (int64_t i = 0; i < n; i += V::kLanes) {
    const F v = V::loadu(x + i);
    ss = V::fma(v, v, ss);
  }
  const F scale = V::set1(1.f / std::sqrt(V::reduce(ss) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += V::kLanes) V::storeu(x + i, V::mul(V::mul(V::loadu(x + i), scale), V::loadu(w + i)));
}

// out[e] = x . w[e] for `rows` rows of w (k floats each): a router's scores for one token.
void dots(const float* x, const float* w, int64_t rows, int64_t k, float* out) {
  for (int64_t e = 0; e < rows; ++e) {
    const float* we = w + e * k;
    F a0 = V::zerof(), a1 = V::zerof();
    int64_t i = 0;
    for (; i + 2 * V::kLanes <= k; i += 2 * V::kLanes) {
      a0 = V::fma(V::loadu(x + i), V::loadu(we + i), a0);
      a1 = V::fma(V::loadu(x + i + V::kLanes), V::loadu(we + i + V::kLanes), a1);
    }
    for (; i < k; i += V::kLanes) a0 = V::fma(V::loadu(x + i), V::loadu(we + i), a0);
    out[e] = V::reduce(V::add(a0, a1));
  }
}
