// The decoder layers of a prepared model for forwards of at most a few tokens per sequence over a
// KV cache (one-token AR steps, spec's verify, the server's batched steps): the same computation as
// runtime.decoder_stack, in one C++ call. The matrix products are the kernels `quant.project` calls
// (ATen's, lowbit.cpp's for 4-/8-bit codes); RMSNorm, RoPE, attention, SiLU·up and the cache writes
// are loops over a few hundred
// numbers here, where each was an operator call of ~1-20 us (allocation, dispatch, TorchScript's
// interpreter). Elementwise steps round to the activation dtype where the Python ops do; sums
// (norm, attention, the low-rank delta) run in float32 in their own order, so results equal the
// Python loop's to rounding, not bit for bit (tests/test_native.py, tests/test_runtime.py).
// Built once per machine by blockdiff.native.
#include <ATen/core/dispatch/Dispatcher.h>
#include "common.h"
#include "attention.h"
#include "lowbit.h"
#include "tiles.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <bit>
#include <climits>
#include <cstring>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

using namespace blockdiff;

template <typename T>
void rms_norm(const T* x, const T* w, T* y, int64_t n, int64_t d, float eps) {
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss = std::fma(f32(xr[i]), f32(xr[i]), ss);
    const float inv = 1.f / std::sqrt(ss / float(d) + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = to<T>(f32(w[i]) * f32(to<T>(f32(xr[i]) * inv)));
  }
}

// x*cos + roll(x, hd/2)*sin per head (the sin's first half negated: model.rope_cos_sin), in place
// on the first `heads` heads of each row.
template <typename T>
void rope(T* h, const T* cos, const T* sin, int64_t b, int64_t q, int64_t cb, int64_t heads, int64_t hd,
          int64_t stride) {
  const int64_t half = hd / 2;
  at::parallel_for(0, b * q, b * q * heads * hd >= (1 << 14) ? 1 : b * q, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {  // rows: several tokens
      const int64_t bi = row / q, t = row % q;
      const T* c = cos + ((cb > 1 ? bi : 0) * q + t) * hd;
      const T* s = sin + ((cb > 1 ? bi : 0) * q + t) * hd;
      for (int64_t hh = 0; hh < heads; ++hh) {
        T* x = h + (bi * q + t) * stride + hh * hd;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = f32(x[i]), x2 = f32(x[i + half]);
          x[i] = to<T>(f32(to<T>(x1 * f32(c[i]))) + f32(to<T>(x2 * f32(s[i]))));
          x[i + half] = to<T>(f32(to<T>(x2 * f32(c[i + half]))) + f32(to<T>(x1 * f32(s[i + half]))));
        }
      }
    }
  });
}

// silu(gate) * up, rounded after each as torch's two operations.
template <typename T>
void silu_mul(const T* gu, T* out, int64_t n, int64_t f) {
  at::parallel_for(0, n, n * f >= (1 << 14) ? 1 : n, [&](int64_t lo, int64_t hi) {  // rows: several tokens
  for (int64_t r = lo; r < hi; ++r) {
    const T* g = gu + r * 2 * f;
    const T* u = g + f;
    T* o = out + r * f;
#pragma omp simd
    for (int64_t i = 0; i < f; ++i) {
      const float v = f32(g[i]);
      o[i] = to<T>(f32(to<T>(v / (1.f + exp_approx(-v)))) * f32(u[i]));
    }
  }
  });
}

// y += T(x A B) (A [K, r], B [r, N] in bfloat16, summed in float32): a low-rank delta
// beside 4-bit weights. Loops rather than two GEMMs: each was an operator call (6 per delta with
// the conversions) for a few thousand multiply-adds, and a row's numbers never depend on the rows
// beside it.
template <typename X, typename Y>
void low_rank(const X* x, const bf16* a, const bf16* bm, const int64_t* cols, Y* y, int64_t n, int64_t k, int64_t r,
              int64_t nn) {
  std::vector<float> t(n * r, 0.f);
  for (int64_t i = 0; i < k; ++i) {  // x A: r sums over K per row, the rows side by side
    const bf16* ar = a + i * r;      // (independent chains; each row's sums in the same order)
    for (int64_t row = 0; row < n; ++row) {
      const float xv = f32(x[row * k + i]);
      float* tr = t.data() + row * r;
#pragma omp simd
      for (int64_t j = 0; j < r; ++j) tr[j] = std::fma(xv, f32(ar[j]), tr[j]);
    }
  }
  // (x A) B by blocks of columns, in parallel even for one row (B is most of the bytes), each
  // row of B read once for all rows; a column's sum runs over the rank in one order, whatever
  // the split or the rows
  at::parallel_for(0, nn, n * nn * r >= (1 << 15) ? 128 : nn, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<float> u(n * w, 0.f);
    for (int64_t j = 0; j < r; ++j) {
      const int64_t lo = std::max(c0, cols[2 * j]) - c0, hi = std::min(c1, cols[2 * j + 1]) - c0;  // in [0, w]
      const bf16* br = bm + j * nn + c0;
      for (int64_t row = 0; row < n; ++row) {
        const float tj = t[row * r + j];
        float* ur = u.data() + row * w;
#pragma omp simd
        for (int64_t c = lo; c < hi; ++c) ur[c] = std::fma(tj, f32(br[c]), ur[c]);  // B's nonzeros
      }
    }
    for (int64_t row = 0; row < n; ++row) {
      Y* yr = y + row * nn + c0;
      const float* ur = u.data() + row * w;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) yr[c] = to<Y>(f32(yr[c]) + f32(to<Y>(ur[c])));
    }
  });
}

// From this many tokens per sequence, 4-/8-bit codes are multiplied on tiles (quant.TILE_TOKENS),
// and from DELTA_TILE_TOKENS their low-rank delta too (measured: even at 4, faster past it,
// slower below: benchmarks/batch_step.py, BENCHMARKS.md).
constexpr int64_t TILE_TOKENS = 2, DELTA_TILE_TOKENS = 4;

// x W^T for a projection stored as `kind` (quant.project's kinds: 0 dense, 1 int8, 2/3 int4 in
// one/two planes, 5/6 4-/8-bit codes in lowbit's layout and the tiles' (codes, steps, offsets,
// tile codes, tile scales; the last two empty where the CPU has no tiles), 7/8 the same on tiles
// at every width, each of these with an optional low-rank delta; 4 bfloat16 in oneDNN's layout).
// `tokens`: fed per sequence (from TILE_TOKENS the codes run on tiles, as quant.project's `tiled`;
// from DELTA_TILE_TOKENS their delta too, below which its loops are faster).
Tensor project(const Tensor& x, int64_t kind, int64_t out, const std::vector<Tensor>& ts, int64_t tokens) {
  const size_t need = kind == 0 || kind == 4 ? 1 : kind == 3 ? 4 : kind >= 5 ? 5 : 2;
  TORCH_CHECK(kind >= 0 && kind <= 8 && ts.size() >= need, "projection kind ", kind, " with ", ts.size(), " tensors");
  if (kind == 0) return at::linear(x, ts[0]);
  if (kind == 4) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, ts[0], c10::IValue(), c10::IValue("none"),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue("")};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
  Tensor y;
  size_t used = 3;
  bool on_tiles = false;
  if (kind >= 5) {
    used = 5;
    const int64_t bits = kind % 2 == 1 ? 4 : 8;  // 7, 8: on tiles at every width
    on_tiles = (tokens >= TILE_TOKENS || kind >= 7) && ts[3].numel() > 0 && x.scalar_type() == at::kBFloat16;
    if (on_tiles)
      y = tiles::mm(x, ts[3], ts[4], bits, out);
    else
      y = lowbit::mm(x, ts[0], ts[1], ts[2], bits, x.size(1));
  } else {
    const Tensor& flat = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
    if (kind == 1) return at::_weight_int8pack_mm(flat, ts[0], ts[1]);
    const int64_t planes = kind - 1;
    used = 2 * planes;
    y = at::_weight_int4pack_mm_for_cpu(flat, ts[0], 32, ts[1]);
    if (planes == 2) y.add_(at::_weight_int4pack_mm_for_cpu(flat, ts[2], 32, ts[3]));
    if (y.size(1) != out) y = y.narrow(1, 0, out).contiguous();  // the kernel packs rows in sixteens
  }
  TORCH_CHECK(y.dim() == 2 && y.size(1) == out, "a projection ", out, " wide");
  if (ts.size() > used) {
    const Tensor &a = ts[used], &bm = ts[used + 1], &cols = ts.size() > used + 2 ? ts[used + 2] : Tensor();
    TORCH_CHECK(a.scalar_type() == at::kBFloat16 && bm.scalar_type() == at::kBFloat16 && a.is_contiguous() &&
                    bm.is_contiguous() && y.is_contiguous() && x.is_contiguous() && x.dim() == 2 &&
                    a.dim() == 2 && bm.dim() == 2 && a.size(0) == x.size(1) && bm.size(0) == a.size(1) &&
                    bm.size(1) == out && (ts.size() == used + 3 || ts.size() == used + 5) &&
                    cols.scalar_type() == at::kLong && cols.is_contiguous() && cols.dim() == 2 &&
                    cols.size(0) == a.size(1) && cols.size(1) == 2,
                "a low-rank delta: bfloat16 A [K, r] and B [r, N], and B's nonzero columns [r, 2]");
    // (the columns are not range-checked here, on every call: low_rank clips them to its block)
    const int64_t rows = x.size(0), k = x.size(1), r = a.size(1);
    if (on_tiles && tokens >= DELTA_TILE_TOKENS && ts.size() == used + 5 && ts[used + 3].numel() > 0) {
      // the codes ran on tiles: so does the delta, x A (float32 sums) rounded to bfloat16, then B
      const Tensor t = tiles::dense_mm(x, ts[used + 3], r);
      Tensor tb = at::zeros({rows, ts[used + 4].size(1) * 32}, x.options());
      tb.narrow(1, 0, r).copy_(t);
      const Tensor u = tiles::dense_mm(tb, ts[used + 4], out);
      const float* up = u.data_ptr<float>();
      bf16* yp = ptr<bf16>(y);
#pragma omp simd
      for (int64_t i = 0; i < rows * out; ++i) yp[i] = to<bf16>(f32(yp[i]) + f32(to<bf16>(up[i])));
      return y;
    }
    auto delta = [&](auto* xp) {
      if (y.scalar_type() == at::kFloat)
        low_rank(xp, ptr<bf16>(a), ptr<bf16>(bm), cols.data_ptr<int64_t>(), ptr<float>(y), rows, k, r, out);
      else
        low_rank(xp, ptr<bf16>(a), ptr<bf16>(bm), cols.data_ptr<int64_t>(), ptr<bf16>(y), rows, k, r, out);
    };
    if (x.scalar_type() == at::kFloat)
      delta(ptr<float>(x));
    else
      delta(ptr<bf16>(x));
  }
  return y;
}

template <typename T>
Tensor run(const Tensor& x_in, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& mask,
           const std::vector<Tensor>& ks, const std::vector<Tensor>& vs, int64_t span,
           const std::optional<Tensor>& slots, const std::vector<Tensor>& norms, const std::vector<int64_t>& kinds,
           const std::vector<int64_t>& outs, const std::vector<std::vector<Tensor>>& parts, int64_t nh, int64_t nkv,
           int64_t hd, double eps) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu(), "x [b, q, d] on the CPU");
  const int64_t b = x_in.size(0), q = x_in.size(1), d = x_in.size(2), n = b * q;
  const auto dt = x_in.scalar_type();
  Tensor x = x_in.reshape({n, d}).clone();
  Tensor hn = at::empty_like(x), att = at::empty({n, nh * hd}, x.options());
  Tensor c = cos.contiguous(), s = sin.contiguous();
  Tensor m = mask ? mask->contiguous() : Tensor();
  const bool cached = !ks.empty();
  const int64_t tk = span + q, layers_n = norms.size() / 2;
  // Every index below is checked here: a wrong argument is an error, never a stray read or write.
  TORCH_CHECK(norms.size() % 2 == 0 && (int64_t)kinds.size() == 4 * layers_n && outs.size() == kinds.size() &&
                  parts.size() == kinds.size(), "two norms and four projections per layer");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0 && hd % 2 == 0, "heads and head size");
  for (const auto& w : norms)
    TORCH_CHECK(w.scalar_type() == dt && w.is_contiguous() && w.numel() == d && w.device().is_cpu(), "norm gains [d]");
  TORCH_CHECK(c.sizes() == s.sizes() && c.scalar_type() == dt && s.scalar_type() == dt && c.device().is_cpu() &&
                  s.device().is_cpu() && c.dim() == 4 && c.size(1) == 1 && c.size(2) == q && c.size(3) == hd &&
                  (c.size(0) == 1 || c.size(0) == b),
              "cos/sin [b|1, 1, q, hd] in the activations' dtype");
  TORCH_CHECK(cached || (span == 0 && !slots), "a span or slots without a cache");
  TORCH_CHECK(ks.size() == vs.size() && (!cached || (int64_t)ks.size() == layers_n), "one cache per layer");
  int64_t cap_min = INT64_MAX;
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK(ks[i].dim() == 4 && ks[i].size(0) == b && ks[i].size(1) == nkv && ks[i].size(3) == hd &&
                    vs[i].sizes() == ks[i].sizes() && ks[i].scalar_type() == dt && vs[i].scalar_type() == dt &&
                    ks[i].is_contiguous() && vs[i].is_contiguous() && ks[i].device().is_cpu() &&
                    vs[i].device().is_cpu() && ks[i].size(2) >= (slots ? span : tk),
                "cache buffers [b, kv heads, capacity, head size]: contiguous, the activations' dtype, room "
                "for the fed tokens");
    cap_min = std::min(cap_min, ks[i].size(2));
  }
  if (slots) {
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->device().is_cpu() &&
                    slots->dim() == 2 && slots->size(0) == b && slots->size(1) <= q,
                "slots [b, n <= q] of int64 over a cache");
    if (slots->numel())
      TORCH_CHECK(slots->min().item<int64_t>() >= 0 && slots->max().item<int64_t>() < cap_min, "slot out of the cache");
  }
  if (m.defined())
    TORCH_CHECK(m.scalar_type() == at::kBool && m.device().is_cpu() && m.dim() == 4 && m.size(1) == 1 &&
                    (m.size(0) == 1 || m.size(0) == b) && m.size(2) == q && m.size(3) == tk,
                "mask [b|1, 1, q, span+q] of bools");
  auto checked = [&](Tensor y, int64_t cols) {  // a projection's output, as the loops read it
    TORCH_CHECK(y.scalar_type() == dt && y.dim() == 2 && y.size(0) == n && (cols < 0 || y.size(1) == cols),
                "a projection's output: [rows, ", cols, "] in the activations' dtype");
    return y.contiguous();
  };
  for (size_t i = 0; i < norms.size() / 2; ++i) {
    const size_t j = 4 * i;
    rms_norm(ptr<T>(x), ptr<T>(norms[2 * i]), ptr<T>(hn), n, d, (float)eps);
    Tensor qkv = checked(project(hn, kinds[j], outs[j], parts[j], q), (nh + 2 * nkv) * hd);
    T* h = ptr<T>(qkv);
    const int64_t stride = (nh + 2 * nkv) * hd;
    rope(h, ptr<T>(c), ptr<T>(s), b, q, c.size(0), nh + nkv, hd, stride);
    const T* kc = cached ? ptr<T>(ks[i]) : nullptr;
    const T* vc = cached ? ptr<T>(vs[i]) : nullptr;
    const int64_t cap = cached ? ks[i].size(2) : 0;
    attend(h, kc, vc, cap, m.defined() ? m.data_ptr<bool>() : nullptr, m.defined() ? m.size(0) : 1, b, q,
           cached ? span : 0, nh, nkv, hd, ptr<T>(att));
    if (cached) {  // store the fed keys and values: after the span, or the first n at per-row slots
      T* kw = ptr<T>(ks[i]);
      T* vw = ptr<T>(vs[i]);
      const int64_t nw = slots ? slots->size(1) : q;
      const int64_t* sl = slots ? slots->data_ptr<int64_t>() : nullptr;
      for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t t = 0; t < nw; ++t) {
          const int64_t slot = sl ? sl[bi * nw + t] : span + t;
          const T* row = h + (bi * q + t) * stride;
          for (int64_t g = 0; g < nkv; ++g) {
            std::memcpy(kw + ((bi * nkv + g) * cap + slot) * hd, row + (nh + g) * hd, hd * sizeof(T));
            std::memcpy(vw + ((bi * nkv + g) * cap + slot) * hd, row + (nh + nkv + g) * hd, hd * sizeof(T));
          }
        }
    }
    x.add_(checked(project(att, kinds[j + 1], outs[j + 1], parts[j + 1], q), d));
    rms_norm(ptr<T>(x), ptr<T>(norms[2 * i + 1]), ptr<T>(hn), n, d, (float)eps);
    Tensor gu = checked(project(hn, kinds[j + 2], outs[j + 2], parts[j + 2], q), -1);
    TORCH_CHECK(gu.size(1) % 2 == 0, "gate|up: an even width");
    const int64_t f = gu.size(1) / 2;
    Tensor act = at::empty({n, f}, x.options());
    silu_mul(ptr<T>(gu), ptr<T>(act), n, f);
    x.add_(checked(project(act, kinds[j + 3], outs[j + 3], parts[j + 3], q), d));
  }
  return x.view({b, q, d});
}

}  // namespace

Tensor layers(const Tensor& x, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& mask,
              const std::vector<Tensor>& ks, const std::vector<Tensor>& vs, int64_t span,
              const std::optional<Tensor>& slots, const std::vector<Tensor>& norms,
              const std::vector<int64_t>& kinds, const std::vector<int64_t>& outs,
              const std::vector<std::vector<Tensor>>& parts, int64_t nh, int64_t nkv, int64_t hd, double eps) {
  if (x.scalar_type() == at::kBFloat16)
    return run<bf16>(x, cos, sin, mask, ks, vs, span, slots, norms, kinds, outs, parts, nh, nkv, hd, eps);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "activations must be float32 or bfloat16");
  return run<float>(x, cos, sin, mask, ks, vs, span, slots, norms, kinds, outs, parts, nh, nkv, hd, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layers", &layers, py::call_guard<py::gil_scoped_release>());
  m.def("lowbit_pack", &lowbit::pack);
  m.def("lowbit_mm", &lowbit::mm, py::call_guard<py::gil_scoped_release>());
  m.attr("TILE_TOKENS") = TILE_TOKENS;
  m.def("tiles_usable", &tiles::usable);
  m.def("tiles_pack", &tiles::pack);
  m.def("tiles_mm", &tiles::mm, py::call_guard<py::gil_scoped_release>());
  m.def("tiles_pack_dense", &tiles::pack_dense);
  m.def("tiles_dense_mm", &tiles::dense_mm, py::call_guard<py::gil_scoped_release>());
}
