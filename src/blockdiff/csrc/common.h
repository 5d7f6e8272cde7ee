// bfloat16 as its bits, and conversions as torch's (shared by step.cpp and lowbit.cpp).
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace blockdiff {

using bf16 = uint16_t;  // bfloat16 as its bits: loops over a struct type do not vectorise

// bfloat16 is the top half of a float, rounded to nearest even (NaN kept a NaN), written as
// integer arithmetic so that loops over it vectorise.
inline float f32(float v) { return v; }
inline float f32(bf16 v) { return std::bit_cast<float>(uint32_t(v) << 16); }
template <typename T> inline T to(float v);
template <> inline float to<float>(float v) { return v; }
template <> inline bf16 to<bf16>(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const bf16 r = bf16((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return v != v ? bf16(0x7FC0) : r;
}
template <typename T> inline T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// e^x to ~2 ulp in float32 (Cephes' polynomial): std::exp does not vectorise here; attention and
// SiLU take ~10^5 exponentials per forward.
inline float exp_approx(float x) {
  x = std::clamp(x, -87.0f, 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
}

}  // namespace blockdiff
