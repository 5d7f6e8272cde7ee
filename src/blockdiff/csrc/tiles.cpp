// y = x W^T on AMX tiles for weights held as 4-bit or 8-bit codes per group of 32 (the same weights
// as lowbit.cpp's): the kernel of forwards of several tokens, where lowbit's cost grows with every
// row and a tile multiply takes up to 16 rows of x at once for nearly the price of one.
//
// Exact products: a code c is the bfloat16 number 128 + c (4 bits: its bits OR-ed into 128's
// mantissa; 8 bits: two nibble planes, below), x is bfloat16, and `tdpbf16ps` sums their
// products in float32. Per group of 32 the tile's 16 x 16 float32 result is scaled by the group's
// steps (one per weight row) and the offset enters through the group's sum of x, as in lowbit:
// y = sum_g step_g * sum_j (base + c_j) x_j + (offset_g - base * step_g) * sum_j x_j.
// A row of x is computed by the same operations whatever the number of rows (tile rows are
// independent), so a row's numbers never depend on its batch.
//
// Layout, per 16 weight rows (a "column tile", N padded with zero codes) and group: the 16 x 32
// weights as the tile multiply's B operand wants them (pairs of K per weight row: B[p][2j + h] =
// w[j][2p + h]). 4 bits: four 64-byte quads; word j of quad q holds code (j, 2(4q + i) + h) at bits
// 4i + 16h, so B row 4q + i is ((word >> 4i) & 0x000F000F) | 0x43004300. 8 bits: the codes' high
// nibbles in that layout, then their low nibbles; the high plane decodes with 0x4500 (16 (128 + h),
// exact) and both planes multiply into one result tile: sum x (2176 + c), base 2176.
//
// Also a plain bfloat16 product on tiles (pack_dense, dense_mm; one float32 sum over all of K): the
// low-rank delta beside the codes in forwards of several tokens.
#include "tiles.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define BLOCKDIFF_TILES 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tiles {
namespace {

using blockdiff::bf16;

constexpr int64_t ROWS = 16;  // weight rows per column tile, and x rows per tile multiply

inline int64_t block_bytes(int64_t bits) { return bits * 64; }  // one column tile's group

// Where code (j, k) of a column tile's group (j < 16 weight rows, k < 32) is stored: byte, shift.
inline std::pair<int64_t, int> place(int64_t j, int64_t k) {
  const int64_t p = k / 2, h = k % 2, q = p / 4, i = p % 4, bit = 4 * i + 16 * h;
  return {64 * q + 4 * j + bit / 8, int(bit % 8)};
}

#if BLOCKDIFF_TILES
struct Config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0, 1: x (m rows of 32 bfloat16) for two groups; 2, 3 and 6, 7: their weights (16 pairs of
// rows; 8 bits: two planes each); 4, 5: results (m x 16).
void configure(int64_t m) {
  alignas(64) Config c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = uint8_t(t == 0 || t == 1 || t == 4 || t == 5 ? m : ROWS);
  }
  _tile_loadconfig(&c);
}

// One group's weights of a column tile as B operands [planes, 16, 32] bfloat16: 4-bit codes
// (a plane of 8-bit codes' high or low nibbles) OR-ed into the mantissa of `e` (128 + c; the high
// plane 16 (128 + h), exact: its mantissa's step is 16).
inline void nibbles(const uint8_t* codes, bf16* b, int e16) {
  const __m512i m = _mm512_set1_epi32(0x000F000F), e = _mm512_set1_epi32(e16 * 0x10001);
  for (int q = 0; q < 4; ++q) {
    const __m512i w = _mm512_loadu_si512(codes + 64 * q);
    _mm512_store_si512(b + (4 * q + 0) * 32, _mm512_ternarylogic_epi32(w, m, e, 0xEA));
    _mm512_store_si512(b + (4 * q + 1) * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 4), m, e, 0xEA));
    _mm512_store_si512(b + (4 * q + 2) * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 8), m, e, 0xEA));
    _mm512_store_si512(b + (4 * q + 3) * 32, _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 12), m, e, 0xEA));
  }
}

template <int BITS>
inline void decode(const uint8_t* codes, bf16* b) {
  if constexpr (BITS == 4) {
    nibbles(codes, b, 0x4300);
  } else {
    nibbles(codes, b, 0x4500);
    nibbles(codes + 256, b + 512, 0x4300);
  }
}

// acc[m] += C[m] * steps + sum_g(x[m]) * offsets for one group's result tile C (in memory).
template <int MB>
inline void scale(__m512* acc, const float* c, const float* sc, const float* xsum, int64_t groups) {
  const __m512 s = _mm512_loadu_ps(sc), z = _mm512_loadu_ps(sc + ROWS);
  for (int m = 0; m < MB; ++m) {
    acc[m] = _mm512_fmadd_ps(_mm512_load_ps(c + ROWS * m), s, acc[m]);
    acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups]), z, acc[m]);
  }
}

// Up to MB rows of x (at x, rows configured) against one column tile, two groups in flight, each
// in its own result tile. Its weights are decoded group by group as they are needed (`codes`):
// into two slots when x is one chunk of rows (they stay in L1), else into `b` for every group,
// which the later chunks read (`codes` null).
template <int MB, int BITS>
void chunk(const bf16* x, int64_t k, const uint8_t* codes, bool keep, bf16* b, const float* sc, const float* xsum,
           int64_t groups, float* c, __m512* acc) {
  constexpr int P = BITS / 4, GB = P * 512;  // planes, bfloat16 per decoded group
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  auto weights = [&](int64_t g, int slot) {
    bf16* d = b + GB * (keep ? g : slot);
    if (codes) decode<BITS>(codes + block_bytes(BITS) * g, d);
    return d;
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const bf16 *b0 = weights(g, 0), *b1 = weights(g + 1, 1);
    _tile_loadd(0, x + 32 * g, 2 * k);
    _tile_loadd(1, x + 32 * (g + 1), 2 * k);
    _tile_loadd(2, b0, 64);
    _tile_loadd(6, b1, 64);
    _tile_zero(4);
    _tile_zero(5);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 1, 6);
    if constexpr (P == 2) {
      _tile_loadd(3, b0 + 512, 64);
      _tile_loadd(7, b1 + 512, 64);
      _tile_dpbf16ps(4, 0, 3);
      _tile_dpbf16ps(5, 1, 7);
    }
    _tile_stored(4, c, 64);
    _tile_stored(5, c + 256, 64);
    scale<MB>(acc, c, sc + 32 * g, xsum + g, groups);
    scale<MB>(acc, c + 256, sc + 32 * (g + 1), xsum + g + 1, groups);
  }
  if (g < groups) {
    const bf16* b0 = weights(g, 0);
    _tile_loadd(0, x + 32 * g, 2 * k);
    _tile_loadd(2, b0, 64);
    _tile_zero(4);
    _tile_dpbf16ps(4, 0, 2);
    if constexpr (P == 2) {
      _tile_loadd(3, b0 + 512, 64);
      _tile_dpbf16ps(4, 0, 3);
    }
    _tile_stored(4, c, 64);
    scale<MB>(acc, c, sc + 32 * g, xsum + g, groups);
  }
}

template <int BITS, typename... A>
int rows_of(int64_t mr, A... a) {
  if (mr == 1) return chunk<1, BITS>(a...), 1;
  if (mr == 2) return chunk<2, BITS>(a...), 2;
  if (mr <= 4) return chunk<4, BITS>(a...), 4;
  if (mr <= 8) return chunk<8, BITS>(a...), 8;
  return chunk<16, BITS>(a...), 16;
}

template <int BITS>
void run(const bf16* xp, const float* xs, int64_t m_rows, int64_t k, const uint8_t* cp, const float* sp, bf16* yp,
         int64_t n_out) {
  const int64_t groups = k / 32, nt = (n_out + ROWS - 1) / ROWS, gb = BITS / 4 * 512;
  at::parallel_for(0, nt, nt * ROWS * k >= (1 << 15) ? 1 : nt, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> store(std::max<int64_t>(groups, 2) * gb + 32);
    bf16* b = (bf16*)(((uintptr_t)store.data() + 63) & ~uintptr_t(63));
    alignas(64) float c[2 * 256] = {};  // rows past a chunk's are read, never used
    alignas(64) float out[ROWS * ROWS];
    __m512 acc[ROWS];
    int64_t configured = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* codes = cp + t * groups * block_bytes(BITS);
      const int64_t cols = std::min(ROWS, n_out - t * ROWS);
      for (int64_t m0 = 0; m0 < m_rows; m0 += ROWS) {
        const int64_t mr = std::min(ROWS, m_rows - m0);
        if (mr != configured) configure(mr), configured = mr;
        const int mb = rows_of<BITS>(mr, xp + m0 * k, k, m0 == 0 ? codes : nullptr, m_rows > ROWS, b,
                                     sp + t * groups * 2 * ROWS, xs + m0 * groups, groups, c, acc);
        for (int m = 0; m < mb; ++m) _mm512_store_ps(out + ROWS * m, acc[m]);
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t j = 0; j < cols; ++j)
            yp[(m0 + m) * n_out + t * ROWS + j] = blockdiff::to<bf16>(out[ROWS * m + j]);
      }
    }
    _tile_release();
  });
}

// y [M, N] float32 = x [M, K] times bfloat16 weights packed as B operands [column tiles, groups,
// 16, 32] (pack_dense): one sum over all of K per output in two result tiles (even and odd
// groups, added at the end: two products in flight).
void dense_run(const bf16* xp, int64_t m_rows, int64_t k, const bf16* wp, float* yp, int64_t n_out) {
  const int64_t groups = k / 32, nt = (n_out + ROWS - 1) / ROWS;
  at::parallel_for(0, nt, nt * ROWS * k * m_rows >= (1 << 16) ? 1 : nt, [&](int64_t t0, int64_t t1) {
    alignas(64) float c[2 * 256];
    int64_t configured = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* w = wp + t * groups * 512;
      const int64_t cols = std::min(ROWS, n_out - t * ROWS);
      for (int64_t m0 = 0; m0 < m_rows; m0 += ROWS) {
        const int64_t mr = std::min(ROWS, m_rows - m0);
        if (mr != configured) configure(mr), configured = mr;
        const bf16* x = xp + m0 * k;
        _tile_zero(4);
        _tile_zero(5);
        int64_t g = 0;
        for (; g + 2 <= groups; g += 2) {
          _tile_loadd(0, x + 32 * g, 2 * k);
          _tile_loadd(1, x + 32 * (g + 1), 2 * k);
          _tile_loadd(2, w + 512 * g, 64);
          _tile_loadd(6, w + 512 * (g + 1), 64);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 1, 6);
        }
        if (g < groups) {
          _tile_loadd(0, x + 32 * g, 2 * k);
          _tile_loadd(2, w + 512 * g, 64);
          _tile_dpbf16ps(4, 0, 2);
        }
        _tile_stored(4, c, 64);
        _tile_stored(5, c + 256, 64);
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t j = 0; j < cols; ++j)
            yp[(m0 + m) * n_out + t * ROWS + j] = c[ROWS * m + j] + c[256 + ROWS * m + j];
      }
    }
    _tile_release();
  });
}

bool granted() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

}  // namespace

bool usable() {
#if BLOCKDIFF_TILES
  static const bool ok = [] {
    const char* env = std::getenv("BLOCKDIFF_TILES");
    return !(env && std::string(env) == "0") && granted();
  }();
  return ok;
#else
  return false;
#endif
}

std::vector<at::Tensor> pack(const at::Tensor& codes_in, const at::Tensor& step_in, const at::Tensor& offset_in,
                             int64_t bits) {
  const auto [codes, step, offset, n_out, k, groups] = blockdiff::checked_codes(codes_in, step_in, offset_in, bits);
  const int64_t nt = (n_out + ROWS - 1) / ROWS;
  const float base = bits == 4 ? 128.f : 16.f * 128.f + 128.f;  // the decoded codes' base
  at::Tensor out = at::zeros({nt, groups, block_bytes(bits)}, at::kByte);
  at::Tensor sc = at::zeros({nt, groups, 2, ROWS});
  const int64_t* q = codes.data_ptr<int64_t>();
  const float *s = step.data_ptr<float>(), *z = offset.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  float* scp = sc.data_ptr<float>();
  for (int64_t n = 0; n < n_out; ++n) {
    const int64_t t = n / ROWS, j = n % ROWS;
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* blk = o + (t * groups + g) * block_bytes(bits);
      for (int64_t kk = 0; kk < 32; ++kk) {
        const auto [byte, shift] = place(j, kk);
        const int64_t code = q[n * k + 32 * g + kk];
        if (bits == 4) {
          blk[byte] |= uint8_t(code << shift);
        } else {  // high nibbles, then low nibbles
          blk[byte] |= uint8_t((code >> 4) << shift);
          blk[256 + byte] |= uint8_t((code & 15) << shift);
        }
      }
      float* sg = scp + ((t * groups + g) * 2) * ROWS;
      sg[j] = s[n * groups + g];
      sg[ROWS + j] = z[n * groups + g] - base * s[n * groups + g];
    }
  }
  return {out, sc};
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t n_out) {
  TORCH_CHECK(usable(), "the tile kernel needs AMX (BLOCKDIFF_TILES=0 or not this CPU)");
  TORCH_CHECK(bits == 4 || bits == 8, "codes of 4 or 8 bits");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "x [M, K] of bfloat16 on the CPU, K a multiple of 32");
  const int64_t m_rows = x.size(0), k = x.size(1), groups = k / 32, nt = (n_out + ROWS - 1) / ROWS;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 && codes.size(0) == nt &&
                  codes.size(1) == groups && codes.size(2) == block_bytes(bits) &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == nt && scales.size(1) == groups && scales.size(2) == 2 && scales.size(3) == ROWS,
              "packed weights as tiles.pack makes them for K = ", k, ", N = ", n_out);
  at::Tensor y = at::empty({m_rows, n_out}, x.options());
#if BLOCKDIFF_TILES
  const at::Tensor xc = x.contiguous();
  const bf16* xp = blockdiff::ptr<bf16>(xc);
  // each row's sum of x per group, for the offsets (padded to whole chunks of 16 rows)
  std::vector<float> xsum((m_rows + ROWS) * groups, 0.f);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int j = 0; j < 32; ++j) a += blockdiff::f32(xp[m * k + 32 * g + j]);
      xsum[m * groups + g] = a;
    }
  if (bits == 4)
    run<4>(xp, xsum.data(), m_rows, k, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), blockdiff::ptr<bf16>(y), n_out);
  else
    run<8>(xp, xsum.data(), m_rows, k, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), blockdiff::ptr<bf16>(y), n_out);
#endif
  return y;
}

at::Tensor pack_dense(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2, "weights [N, K]");
  const int64_t n_out = w_in.size(0), k = w_in.size(1), kp = (k + 31) / 32 * 32, groups = kp / 32;
  const int64_t nt = (n_out + ROWS - 1) / ROWS;
  const at::Tensor w = at::constant_pad_nd(w_in.to(at::kBFloat16), {0, kp - k, 0, nt * ROWS - n_out}).contiguous();
  // B[p][2j + h] = w[16 t + j][32 g + 2 p + h]
  return w.view({nt, ROWS, groups, 16, 2}).permute({0, 2, 3, 1, 4}).contiguous().view({nt, groups, 512});
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w, int64_t n_out) {
  TORCH_CHECK(usable(), "the tile kernel needs AMX (BLOCKDIFF_TILES=0 or not this CPU)");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "x [M, K] of bfloat16 on the CPU, K a multiple of 32");
  const int64_t m_rows = x.size(0), k = x.size(1), nt = (n_out + ROWS - 1) / ROWS;
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 3 && w.size(0) == nt &&
                  w.size(1) == k / 32 && w.size(2) == 512,
              "weights as tiles.pack_dense makes them for K = ", k, ", N = ", n_out);
  at::Tensor y = at::empty({m_rows, n_out}, x.options().dtype(at::kFloat));
#if BLOCKDIFF_TILES
  const at::Tensor xc = x.contiguous();
  dense_run(blockdiff::ptr<bf16>(xc), m_rows, k, blockdiff::ptr<bf16>(w), y.data_ptr<float>(), n_out);
#endif
  return y;
}

}  // namespace tiles
