// Attention of a few fed tokens over a KV cache, for the native step (step.cpp).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace blockdiff {

// Softmax of one query's scores in place (a masked key: exactly 0); returns 1 / their sum (0 when
// every key is masked).
inline float softmax(float* sc, const bool* m, int64_t tk) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < tk; ++j) {
    if (m && !m[j]) sc[j] = -INFINITY;
    mx = std::max(mx, sc[j]);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < tk; ++j) {
    sc[j] = sc[j] == -INFINITY ? 0.f : exp_approx(sc[j] - mx);
    sum += sc[j];
  }
  return sum > 0.f ? 1.f / sum : 0.f;
}

// Several queries of one head at once, over keys as float32 columns kt [HD, tkp] and values as
// float32 rows vf [tk, HD]: QB independent sums in registers (the loops' trip counts are
// constants), so the multiply-adds run at throughput, not at the latency of one chain.
template <int HD>
void attend_block(const float* qf, int64_t nq, const float* kt, const float* vf, int64_t tk, int64_t tkp,
                  const bool* const* masks, float* sc, float* outf) {
  constexpr int QS = 8, QV = HD >= 256 ? 1 : 256 / HD;  // queries per block: scores, values
  for (int64_t t0 = 0; t0 < nq; t0 += QS)
    for (int64_t j0 = 0; j0 < tkp; j0 += 16) {
      float s[QS][16] = {};
      for (int e = 0; e < HD; ++e) {
        const float* kr = kt + e * tkp + j0;
        for (int t = 0; t < QS; ++t) {
          const float qe = qf[(t0 + t) * HD + e];  // (rows past nq: zeros, never read)
#pragma omp simd
          for (int i = 0; i < 16; ++i) s[t][i] = std::fma(qe, kr[i], s[t][i]);
        }
      }
      for (int t = 0; t < QS; ++t) std::memcpy(sc + (t0 + t) * tkp + j0, s[t], sizeof s[t]);
    }
  std::vector<float> inv(nq);
  for (int64_t t = 0; t < nq; ++t) inv[t] = softmax(sc + t * tkp, masks[t], tk);
  for (int64_t t0 = 0; t0 < nq; t0 += QV) {
    float a[QV][HD] = {};
    for (int64_t j = 0; j < tk; ++j) {
      const float* vr = vf + j * HD;
      for (int t = 0; t < QV; ++t) {
        const float pj = sc[(t0 + t) * tkp + j];  // a masked key's 0 adds nothing
#pragma omp simd
        for (int e = 0; e < HD; ++e) a[t][e] = std::fma(pj, vr[e], a[t][e]);
      }
    }
    for (int t = 0; t < QV && t0 + t < nq; ++t)
#pragma omp simd
      for (int e = 0; e < HD; ++e) outf[(t0 + t) * HD + e] = a[t][e] * inv[t0 + t];
  }
}

// Attention of the fed rows over the cache's `span` slots, then the fed keys themselves (read
// from the projection's output). A masked key weighs exactly 0; a row with every key masked
// gives 0, as torch's CPU kernel. One fed token per sequence reads each key once, as it is; from
// two (and a head size of 16, 32, 64 or 128), a head's keys are first turned into float32 columns
// and its values into float32 rows, and its queries go in blocks (attend_block): the choice reads
// the tokens per sequence, never the batch.
template <typename T>
void attend(const T* qkv, const T* kc, const T* vc, int64_t cap, const bool* mask, int64_t mb, int64_t b,
            int64_t q, int64_t span, int64_t nh, int64_t nkv, int64_t hd, T* out) {
  const int64_t stride = (nh + 2 * nkv) * hd, tk = span + q, group = nh / nkv, tkp = (tk + 15) / 16 * 16;
  const float scale = 1.f / std::sqrt(float(hd));
  const bool blocks = q >= 2 && (hd == 16 || hd == 32 || hd == 64 || hd == 128);
  const int64_t qp = (q + 15) / 16 * 16;  // queries padded to whole blocks
  // In parallel (torch's threads) past ~2^15 multiply-adds (one token over ~60 keys): below that,
  // starting threads costs more.
  at::parallel_for(0, b * nh, b * nh * q * tk * hd >= (1 << 15) ? 1 : b * nh, [&](int64_t lo, int64_t hi) {
    std::vector<float> qf((blocks ? qp : 1) * hd, 0.f), sc((blocks ? qp : 1) * tkp), acc(q * hd);
    std::vector<float> kt(blocks ? hd * tkp : 0, 0.f), vf(blocks ? tk * hd : 0);
    std::vector<const bool*> masks(q);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t bi = p / nh, hh = p % nh, g = hh / group;
      auto key = [&](int64_t j) {
        return j < span ? kc + ((bi * nkv + g) * cap + j) * hd : qkv + (bi * q + j - span) * stride + (nh + g) * hd;
      };
      auto value = [&](int64_t j) {
        return j < span ? vc + ((bi * nkv + g) * cap + j) * hd : qkv + (bi * q + j - span) * stride + (nh + nkv + g) * hd;
      };
      for (int64_t t = 0; t < q; ++t) masks[t] = mask ? mask + ((mb > 1 ? bi : 0) * q + t) * tk : nullptr;
      if (blocks) {
        for (int64_t j = 0; j < tk; ++j) {
          const T *kr = key(j), *vr = value(j);
          for (int64_t e = 0; e < hd; ++e) kt[e * tkp + j] = f32(kr[e]);
#pragma omp simd
          for (int64_t e = 0; e < hd; ++e) vf[j * hd + e] = f32(vr[e]);
        }
        for (int64_t t = 0; t < q; ++t) {
          const T* qr = qkv + (bi * q + t) * stride + hh * hd;
#pragma omp simd
          for (int64_t e = 0; e < hd; ++e) qf[t * hd + e] = f32(qr[e]) * scale;
        }
        const float* k = kt.data();
        if (hd == 16) attend_block<16>(qf.data(), q, k, vf.data(), tk, tkp, masks.data(), sc.data(), acc.data());
        if (hd == 32) attend_block<32>(qf.data(), q, k, vf.data(), tk, tkp, masks.data(), sc.data(), acc.data());
        if (hd == 64) attend_block<64>(qf.data(), q, k, vf.data(), tk, tkp, masks.data(), sc.data(), acc.data());
        if (hd == 128) attend_block<128>(qf.data(), q, k, vf.data(), tk, tkp, masks.data(), sc.data(), acc.data());
      }
      for (int64_t t = 0; t < q; ++t) {
        float* at = acc.data() + t * hd;
        if (!blocks) {
          const T* qr = qkv + (bi * q + t) * stride + hh * hd;
#pragma omp simd
          for (int64_t e = 0; e < hd; ++e) qf[e] = f32(qr[e]) * scale;
          for (int64_t j = 0; j < tk; ++j) {
            if (masks[t] && !masks[t][j]) continue;
            const T* kr = key(j);
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t e = 0; e < hd; ++e) s = std::fma(qf[e], f32(kr[e]), s);
            sc[j] = s;
          }
          const float inv = softmax(sc.data(), masks[t], tk);
          std::fill(at, at + hd, 0.f);
          for (int64_t j = 0; j < tk; ++j) {
            const float pj = sc[j];
            if (pj == 0.f) continue;  // masked (or too small to count in float32)
            const T* vr = value(j);
#pragma omp simd
            for (int64_t e = 0; e < hd; ++e) at[e] = std::fma(pj, f32(vr[e]), at[e]);
          }
#pragma omp simd
          for (int64_t e = 0; e < hd; ++e) at[e] *= inv;
        }
        T* o = out + (bi * q + t) * nh * hd + hh * hd;
#pragma omp simd
        for (int64_t e = 0; e < hd; ++e) o[e] = to<T>(at[e]);
      }
    }
  });
}

}  // namespace blockdiff
