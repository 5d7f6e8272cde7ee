// bfloat16 as its bits, conversions as torch's, and what the kernels share (step.cpp, lowbit.cpp,
// tiles.cpp).
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

// Codes [N, K] (0 .. 2^bits - 1), a step and an offset [N, K/32] per group of 32, as the packers
// read them (int64 codes, float32 steps and offsets), checked: a wrong argument is an error.
struct Codes {
  at::Tensor codes, step, offset;
  int64_t n, k, groups;
};
inline Codes checked_codes(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& offset, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "codes of 4 or 8 bits");
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) % 32 == 0, "codes [N, K] with K a multiple of 32");
  Codes c{codes.to(at::kLong).contiguous(), step.to(at::kFloat).contiguous(), offset.to(at::kFloat).contiguous(),
          codes.size(0), codes.size(1), codes.size(1) / 32};
  TORCH_CHECK(c.step.sizes() == c.offset.sizes() && c.step.dim() == 2 && c.step.size(0) == c.n &&
                  c.step.size(1) == c.groups,
              "a step and an offset [N, K/32] per group");
  TORCH_CHECK(c.codes.numel() == 0 ||
                  (c.codes.min().item<int64_t>() >= 0 && c.codes.max().item<int64_t>() < (int64_t(1) << bits)),
              "codes out of range for ", bits, " bits");
  return c;
}

}  // namespace blockdiff
