// bfloat16 as its bits, and conversions as torch's (shared by step.cpp and lowbit.cpp).
#pragma once
#include <torch/extension.h>

#include <bit>
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

}  // namespace blockdiff
