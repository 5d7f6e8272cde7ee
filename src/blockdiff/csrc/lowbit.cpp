// y = x W^T for weights held as 4-bit or 8-bit codes per group of 32 with a float32 step and offset
// per group (SmolLM2's Q4_1 projections, its Q8_0 embedding as the LM head): the kernel of
// narrow forwards (a few rows), where reading and decoding the weights is the whole cost.
//
// Why not torch's int4 kernel: it rounds every output to bfloat16 and decodes each weight into a
// float FMA'd with its step; a Q8_0 matrix needs two of its 4-bit planes. Here a code c becomes the
// float (base + c) by OR-ing its bits into a float's mantissa (base = 128 for 4 bits, 256 for 8;
// two integer operations per 16 weights, exact), a group's dot product with x is summed in float32
// and scaled once: y = sum_g step_g * sum_j (base + c_j) x_j + offset'_g * sum_j x_j, with
// offset' = offset - base * step. Row m of x is computed by the same operations whatever the
// number of rows, so a row's numbers never depend on its batch.
//
// Layout (per weight row; K padded to a multiple of 64 with zero weights): chunks of 128 weights,
// the last one of 64 when K % 128 == 64. A chunk holds 16 lanes x 8 values (a tail: x 4); lane i
// belongs to the group slot i % 4 (a tail's groups g take slots 2g and 2g + 1), so that a vector
// of 16 lanes times a vector of steps [s0 s1 s2 s3] x 4 scales every value by its own group's step.
// Value (p, i) of a chunk is weight 32 (i % 4) + i / 4 + 4 p (a tail: 32 g + (i % 4) % 2 +
// 2 (i / 4) + 8 p with g = (i % 4) / 2), stored at bits 4p of little-endian 32-bit lane i (4 bits;
// a tail: bits 4p of 16-bit lane i) or at byte p % 4 of 32-bit lane i of the (p / 4)-th 64 bytes
// (8 bits; a tail: byte p of lane i).
#include "lowbit.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <utility>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lowbit {
namespace {

using blockdiff::bf16;
using blockdiff::f32;

constexpr int64_t CHUNK = 128, LANES = 16;

struct Shape {
  int64_t k, kp, full, chunks, slots, row_bytes;
  bool tail;
  Shape(int64_t k_, int64_t bits) : k(k_) {
    kp = (k + 63) / 64 * 64;
    full = kp / CHUNK;
    tail = kp % CHUNK != 0;
    chunks = full + tail;
    slots = 4 * chunks;
    row_bytes = kp * bits / 8;
  }
};

// The weight index within its chunk of value (p, i), and the group slot of lane i's step.
inline int64_t weight_of(bool tail, int p, int i) {
  if (!tail) return 32 * (i % 4) + i / 4 + 4 * p;
  return 32 * ((i % 4) / 2) + (i % 4) % 2 + 2 * (i / 4) + 8 * p;
}

// Where value (p, i) of a chunk is stored: byte offset in the chunk, and bit shift in that byte.
inline std::pair<int64_t, int> place(int64_t bits, bool tail, int p, int i) {
  if (bits == 4) return tail ? std::pair<int64_t, int>{2 * i + p / 2, 4 * (p % 2)} : std::pair<int64_t, int>{4 * i + p / 2, 4 * (p % 2)};
  return tail ? std::pair<int64_t, int>{4 * i + p, 0} : std::pair<int64_t, int>{64 * (p / 4) + 4 * i + p % 4, 0};
}

// For each value slot of a row's chunks [chunks, 8, 16], the weight it holds (-1: none: padding,
// a tail's unused values); for each lane [chunks, 16], its group and its share of the group's sum
// (a full chunk's group has 4 lanes, a tail's 8). One table per K, made once.
struct Table {
  std::vector<int32_t> weight, group;
  std::vector<float> share;
};

const Table& table(const Shape& sh) {
  thread_local std::deque<std::pair<int64_t, Table>> made;  // a model has a few K (stable references)
  for (const auto& [k, t] : made)
    if (k == sh.k) return t;
  Table t;
  t.weight.assign(sh.chunks * 8 * LANES, -1);
  t.group.assign(sh.chunks * LANES, 0);
  t.share.assign(sh.chunks * LANES, 0.f);
  for (int64_t c = 0; c < sh.chunks; ++c) {
    const bool tail = sh.tail && c == sh.full;
    for (int p = 0; p < (tail ? 4 : 8); ++p)
      for (int i = 0; i < LANES; ++i)
        if (const int64_t w = c * CHUNK + weight_of(tail, p, i); w < sh.k) t.weight[(c * 8 + p) * LANES + i] = int32_t(w);
    for (int i = 0; i < LANES; ++i) {
      const int64_t g = c * 4 + (tail ? (i % 4) / 2 : i % 4);
      t.group[c * LANES + i] = int32_t(std::min(g, sh.k / 32 - 1));
      t.share[c * LANES + i] = g < sh.k / 32 ? (tail ? 1.f / 8.f : 1.f / 4.f) : 0.f;
    }
  }
  made.emplace_back(sh.k, std::move(t));
  return made.back().second;
}

// x in the chunks' value order [chunks, 8, 16], and each lane's share of its group's sum of x
// [chunks, 16], for one row of x.
template <typename X>
void arrange(const X* x, const Shape& sh, const Table& t, float* xv, float* xs, float* sums) {
  const int64_t n = sh.chunks * 8 * LANES, groups = sh.k / 32;
  for (int64_t i = 0; i < n; ++i) xv[i] = t.weight[i] >= 0 ? f32(x[t.weight[i]]) : 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float a = 0.f;
    for (int64_t j = 0; j < 32; ++j) a += f32(x[32 * g + j]);
    sums[g] = a;
  }
  for (int64_t i = 0; i < sh.chunks * LANES; ++i) xs[i] = sums[t.group[i]] * t.share[i];
}

#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsteps(const float* s) { return _mm512_broadcast_f32x4(_mm_loadu_ps(s)); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }

// (field & mask) | exponent, the field first moved to the mantissa's place: the float base + code.
template <int SHIFT>
inline Vec field(__m512i w, __m512i mask, __m512i exponent) {
  const __m512i s = SHIFT > 0 ? _mm512_slli_epi32(w, SHIFT) : SHIFT < 0 ? _mm512_srli_epi32(w, -SHIFT) : w;
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(s, mask, exponent, 0xEA));
}

template <int BITS>
inline void decode(const uint8_t* chunk, bool tail, Vec* a) {
  if constexpr (BITS == 4) {  // nibble p at bits 4p -> bits 16..19 of 128.0f
    const __m512i m = _mm512_set1_epi32(0x000F0000), e = _mm512_set1_epi32(0x43000000);
    const __m512i w = tail ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)chunk))
                           : _mm512_loadu_si512(chunk);
    a[0] = field<16>(w, m, e), a[1] = field<12>(w, m, e), a[2] = field<8>(w, m, e), a[3] = field<4>(w, m, e);
    if (tail) return;
    a[4] = field<0>(w, m, e), a[5] = field<-4>(w, m, e), a[6] = field<-8>(w, m, e), a[7] = field<-12>(w, m, e);
  } else {  // byte b at bits 8b -> bits 15..22 of 256.0f
    const __m512i m = _mm512_set1_epi32(0x007F8000), e = _mm512_set1_epi32(0x43800000);
    for (int h = 0; h < (tail ? 1 : 2); ++h) {
      const __m512i w = _mm512_loadu_si512(chunk + 64 * h);
      a[4 * h] = field<15>(w, m, e), a[4 * h + 1] = field<7>(w, m, e);
      a[4 * h + 2] = field<-1>(w, m, e), a[4 * h + 3] = field<-9>(w, m, e);
    }
  }
}
#else  // portable: the same arithmetic over 16-lane arrays
struct Vec {
  float v[LANES];
};
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < LANES; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < LANES; ++i) a.v[i] *= b.v[i];
  return a;
}
inline Vec vadd(Vec a, Vec b) {
  for (int i = 0; i < LANES; ++i) a.v[i] += b.v[i];
  return a;
}
inline Vec vsteps(const float* s) {
  Vec r;
  for (int i = 0; i < LANES; ++i) r.v[i] = s[i % 4];
  return r;
}
inline float vsum(Vec a) {
  float s = 0.f;
  for (int i = 0; i < LANES; ++i) s += a.v[i];
  return s;
}
template <int BITS>
inline void decode(const uint8_t* chunk, bool tail, Vec* a) {
  for (int p = 0; p < (tail ? 4 : 8); ++p)
    for (int i = 0; i < LANES; ++i) {
      const auto [byte, shift] = place(BITS, tail, p, i);
      a[p].v[i] = float((BITS == 4 ? 128 : 256) + ((chunk[byte] >> shift) & (BITS == 4 ? 0xF : 0xFF)));
    }
}
#endif

// Rows n0 .. n0 + R of the weights against MB rows of x (arranged): y[m, n] in T.
template <int BITS, int MB, int R, typename T>
void block(const uint8_t* codes, const float* steps, const float* offs, const float* xv, const float* xs, T* y,
           int64_t n0, int64_t ldy, const Shape& sh) {
  Vec acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = vzero();
  const int64_t chunk_bytes = 16 * BITS;
  for (int64_t c = 0; c < sh.chunks; ++c) {
    const bool tail = sh.tail && c == sh.full;
    for (int r = 0; r < R; ++r) {
      Vec a[8];
      decode<BITS>(codes + (n0 + r) * sh.row_bytes + c * chunk_bytes, tail, a);
      const Vec s = vsteps(steps + (n0 + r) * sh.slots + 4 * c), o = vsteps(offs + (n0 + r) * sh.slots + 4 * c);
      for (int m = 0; m < MB; ++m) {
        const float* xm = xv + (m * sh.chunks + c) * 8 * LANES;
        Vec d0 = vmul(a[0], vload(xm)), d1 = vmul(a[1], vload(xm + LANES));
        d0 = vfma(a[2], vload(xm + 2 * LANES), d0);
        d1 = vfma(a[3], vload(xm + 3 * LANES), d1);
        if (!tail) {
          d0 = vfma(a[4], vload(xm + 4 * LANES), d0);
          d1 = vfma(a[5], vload(xm + 5 * LANES), d1);
          d0 = vfma(a[6], vload(xm + 6 * LANES), d0);
          d1 = vfma(a[7], vload(xm + 7 * LANES), d1);
        }
        acc[r][m] = vfma(vadd(d0, d1), s, acc[r][m]);
        acc[r][m] = vfma(o, vload(xs + (m * sh.chunks + c) * LANES), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[m * ldy + n0 + r] = blockdiff::to<T>(vsum(acc[r][m]));
}

// Rows [lo, hi) of the weights against MB rows of x: blocks of 4 weight rows (2 when MB > 2:
// registers), the remainder one at a time.
template <int BITS, int MB, typename T>
void rows(const uint8_t* codes, const float* steps, const float* offs, const float* xv, const float* xs, T* y,
          int64_t lo, int64_t hi, int64_t ldy, const Shape& sh) {
  constexpr int R = MB > 2 ? 2 : 4;
  int64_t n = lo;
  for (; n + R <= hi; n += R) block<BITS, MB, R>(codes, steps, offs, xv, xs, y, n, ldy, sh);
  for (; n < hi; ++n) block<BITS, MB, 1>(codes, steps, offs, xv, xs, y, n, ldy, sh);
}

template <int BITS, typename T>
void run(const float* xv, const float* xs, int64_t m_rows, const uint8_t* codes, const float* steps,
         const float* offs, T* y, int64_t n_out, const Shape& sh) {
  // blocks of 4 weight rows per task; in parallel past ~2^15 weights (below, starting threads costs more)
  const int64_t blocks = (n_out + 3) / 4, grain = n_out * sh.kp >= (1 << 15) ? 1 : blocks;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t lo = 4 * b0, hi = std::min(n_out, 4 * b1);
    for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {  // the weights of a block stay in L1 across these
      const float* xm = xv + m0 * sh.chunks * 8 * LANES;
      const float* sm = xs + m0 * sh.chunks * LANES;
      T* ym = y + m0 * n_out;
      switch (std::min<int64_t>(4, m_rows - m0)) {
        case 1: rows<BITS, 1>(codes, steps, offs, xm, sm, ym, lo, hi, n_out, sh); break;
        case 2: rows<BITS, 2>(codes, steps, offs, xm, sm, ym, lo, hi, n_out, sh); break;
        case 3: rows<BITS, 3>(codes, steps, offs, xm, sm, ym, lo, hi, n_out, sh); break;
        default: rows<BITS, 4>(codes, steps, offs, xm, sm, ym, lo, hi, n_out, sh);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> pack(const at::Tensor& codes_in, const at::Tensor& step_in, const at::Tensor& offset_in,
                             int64_t bits) {
  const auto [codes, step, offset, n_out, k, groups] = blockdiff::checked_codes(codes_in, step_in, offset_in, bits);
  const int64_t base = bits == 4 ? 128 : 256;
  const Shape sh(k, bits);
  at::Tensor out = at::zeros({n_out, sh.row_bytes}, at::kByte);
  at::Tensor steps = at::zeros({n_out, sh.slots}), offs = at::zeros({n_out, sh.slots});
  const int64_t* q = codes.data_ptr<int64_t>();
  const float *s = step.data_ptr<float>(), *z = offset.data_ptr<float>();
  for (int64_t n = 0; n < n_out; ++n) {
    uint8_t* row = out.data_ptr<uint8_t>() + n * sh.row_bytes;
    float *sr = steps.data_ptr<float>() + n * sh.slots, *zr = offs.data_ptr<float>() + n * sh.slots;
    for (int64_t c = 0; c < sh.chunks; ++c) {
      const bool tail = sh.tail && c == sh.full;
      for (int slot = 0; slot < 4; ++slot)
        if (const int64_t g = c * 4 + (tail ? slot / 2 : slot); g < groups) {
          sr[c * 4 + slot] = s[n * groups + g];
          zr[c * 4 + slot] = z[n * groups + g] - float(base) * s[n * groups + g];
        }
      for (int p = 0; p < (tail ? 4 : 8); ++p)
        for (int i = 0; i < LANES; ++i)
          if (const int64_t w = c * CHUNK + weight_of(tail, p, i); w < k) {
            const auto [byte, shift] = place(bits, tail, p, i);
            row[c * 16 * bits + byte] |= uint8_t(q[n * k + w] << shift);
          }
    }
  }
  return {out, steps, offs};
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& steps, const at::Tensor& offsets,
              int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "codes of 4 or 8 bits");
  const Shape sh(k, bits);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x [M, ", k, "] of float32 or bfloat16 on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == sh.row_bytes && steps.scalar_type() == at::kFloat && steps.is_contiguous() &&
                  offsets.scalar_type() == at::kFloat && offsets.is_contiguous() && steps.dim() == 2 &&
                  steps.sizes() == offsets.sizes() && steps.size(0) == codes.size(0) && steps.size(1) == sh.slots,
              "packed weights as lowbit.pack makes them for K = ", k);
  const at::Tensor xc = x.contiguous();
  const int64_t m_rows = x.size(0), n_out = codes.size(0);
  thread_local std::vector<float> xv, xs, sums;  // x arranged: reused, a step makes ~120 of these calls
  xv.resize(m_rows * sh.chunks * 8 * LANES);
  xs.resize(m_rows * sh.chunks * LANES);
  sums.resize(k / 32);
  const Table& t = table(sh);
  for (int64_t m = 0; m < m_rows; ++m) {
    float* v = xv.data() + m * sh.chunks * 8 * LANES;
    float* s = xs.data() + m * sh.chunks * LANES;
    if (x.scalar_type() == at::kFloat)
      arrange(xc.data_ptr<float>() + m * k, sh, t, v, s, sums.data());
    else
      arrange(blockdiff::ptr<bf16>(xc) + m * k, sh, t, v, s, sums.data());
  }
  at::Tensor y = at::empty({m_rows, n_out}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *sp = steps.data_ptr<float>(), *op = offsets.data_ptr<float>();
  auto go = [&](auto* yp) {
    using T = std::remove_pointer_t<decltype(yp)>;
    if (bits == 4)
      run<4, T>(xv.data(), xs.data(), m_rows, cp, sp, op, yp, n_out, sh);
    else
      run<8, T>(xv.data(), xs.data(), m_rows, cp, sp, op, yp, n_out, sh);
  };
  if (x.scalar_type() == at::kFloat)
    go(y.data_ptr<float>());
  else
    go(blockdiff::ptr<bf16>(y));
  return y;
}

}  // namespace lowbit
