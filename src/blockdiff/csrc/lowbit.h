// Matrix products over weights stored as 4-bit or 8-bit codes per group of 32 (lowbit.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace lowbit {

// codes [N, K] (0..15 or 0..255), step and offset [N, K/32] float32 with weight = offset + step * code
// -> {codes in the kernel's order [N, Kp * bits / 8] uint8, steps [N, slots], offsets [N, slots]}.
std::vector<at::Tensor> pack(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& offset,
                             int64_t bits);

// x [M, K] (float32 or bfloat16) times the packed weights' transpose -> [M, N] in x's dtype.
at::Tensor mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& steps, const at::Tensor& offsets,
              int64_t bits, int64_t k);

}  // namespace lowbit
