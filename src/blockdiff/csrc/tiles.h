// Matrix products over 4-/8-bit codes on AMX tiles (tiles.cpp): forwards of several tokens.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace tiles {

// Whether this build and CPU run the tile kernel: AMX-BF16 compiled in and present, the OS's
// permission for tile data granted, and `BLOCKDIFF_TILES` not 0.
bool usable();

// codes [N, K] (0..15 or 0..255), step and offset [N, K/32] float32 with weight = offset + step * code
// -> {codes in the tiles' order [ceil(N/16), K/32, bits * 64] uint8, scales [ceil(N/16), K/32, 2, 16]
// float32 (steps, then offsets less base x step)}.
std::vector<at::Tensor> pack(const at::Tensor& codes, const at::Tensor& step, const at::Tensor& offset,
                             int64_t bits);

// x [M, K] bfloat16 times the packed weights' transpose -> [M, N] bfloat16.
at::Tensor mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t n);

// Dense bfloat16 weights [N, K] as the tile multiply's B operands [ceil(N/16), ceil(K/32), 512]
// (zeros padding both), and x [M, K'] (bfloat16, K' = K padded) times them -> [M, N] float32:
// the low-rank delta of several rows.
at::Tensor pack_dense(const at::Tensor& w);
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, int64_t n);

}  // namespace tiles
