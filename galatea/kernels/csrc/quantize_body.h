// Activations -> int8 blocks of 32 (scale amax/127, round to nearest even, with the sums of
// each 16 and 32 codes), after the row's pre-op. Written once for every instruction set:
// included by each ISA file inside its namespace, after `struct V`.

void quantize_rows(const void* x, int dtype, int64_t ldx, int64_t m0, int64_t m1, const PreOp& pre, const Acts& a) {
  constexpr int nv = 32 / V::kLanes;  // vectors per block
  const int64_t k = a.k, kb = k / 32;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t row = m * ldx;
    F scale = V::set1(1.f);
    if (pre.kind == PRE_RMSNORM) {
      F ss = V::zerof();
      for (int64_t i = 0; i < k; i += V::kLanes) {
        const F v = V::loadx(x, dtype, row + i);
        ss = V::fma(v, v, ss);
      }
      scale = V::set1(1.f / std::sqrt(V::reduce(ss) / static_cast<float>(k) + pre.eps));
    }
    for (int64_t b = 0; b < kb; ++b) {
      F v[nv];
      F amax = V::zerof();
      for (int j = 0; j < nv; ++j) {
        const int64_t i = 32 * b + j * V::kLanes;
        v[j] = V::loadx(x, dtype, row + i);
        if (pre.kind == PRE_RMSNORM) v[j] = V::mul(V::mul(v[j], scale), V::loadu(pre.weight + i));
        else if (pre.kind == PRE_SWIGLU) v[j] = V::mul(V::mul(v[j], V::sigmoid(v[j])), V::loadx(x, dtype, row + k + i));
        else if (pre.kind == PRE_GEGLU) {  // gelu_tanh(g) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))
          const F g = v[j], z = V::mul(V::set1(1.5957691216f), V::fma(V::mul(V::mul(g, g), g), V::set1(0.044715f), g));
          v[j] = V::mul(V::mul(g, V::sigmoid(z)), V::loadx(x, dtype, row + k + i));
        }
        amax = V::maxf(amax, V::abs(v[j]));
      }
      const float mx = V::reduce_max(amax);
      const F id = V::set1(mx > 0.f ? 127.f / mx : 0.f);
      int32_t sums[2] = {0, 0};
      for (int j = 0; j < nv; ++j) {
        const I qi = V::round(V::mul(v[j], id));
        V::store_i8(a.q + m * k + 32 * b + j * V::kLanes, qi);
        sums[j * V::kLanes / 16] += V::reduce_i(qi);
      }
      const int64_t o = m * kb + b;
      a.s16[2 * o] = sums[0];
      a.s16[2 * o + 1] = sums[1];
      a.s32[o] = sums[0] + sums[1];
      a.d[o] = mx / 127.f;
      a.ds[o] = a.d[o] * static_cast<float>(sums[0] + sums[1]);
    }
  }
}
