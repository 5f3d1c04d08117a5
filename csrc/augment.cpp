// CPU kernels of the training augmentation op (ueguard/kernels/augmentation.py is the specification):
// per-sample random crop with zero or reflect padding, horizontal flip, uint8 -> float conversion
// and per-channel normalisation in one gather pass, and its exact adjoint for gradients that flow
// back through the augmentation to a float input.
//
// For output pixel (n, c, i, j) with offsets (oy, ox) in [0, 2*pad] and flip bit f:
//   r = i + oy - pad,  q = (f ? W-1-j : j) + ox - pad            (source coordinates)
//   v = x[n, c, r, q] (/ 255 for uint8 input), or the padding value: 0 outside the image with zero
//       padding; with reflect padding r -> -r below 0 and 2(H-1) - r above H-1 (pad < H), same for q
//   out = (v - mean[c]) / std[c]   (when normalising)
// The crop is injective on the padded image, so each output pixel reads one padded pixel; the
// adjoint therefore gathers, for each source pixel, the (at most 3 x 3 with reflect padding, at
// most 1 with zero padding) output pixels that read it: no atomics, deterministic.
//
// Tensors are addressed through their strides, so contiguous and channels-last inputs are read in
// place and the output takes the input's memory format.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace ueguard {
namespace {

using detail::check_cpu_tensor;

struct Geometry {
  int64_t n, c, h, w;
};

// Validate offsets/flips/pad/mean/std against a 4-D N×C×H×W tensor; returns its geometry.
Geometry check_params(const char* op, const at::Tensor& t, const at::Tensor& offsets, const at::Tensor& flips,
                      int64_t pad, bool reflect, const std::optional<at::Tensor>& mean,
                      const std::optional<at::Tensor>& std) {
  TORCH_CHECK(t.dim() == 4, op, ": expected an N×C×H×W tensor, got shape ", t.sizes());
  const Geometry g{t.size(0), t.size(1), t.size(2), t.size(3)};
  check_cpu_tensor(offsets, op, "offsets", at::kLong);
  check_cpu_tensor(flips, op, "flips", at::kBool);
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == g.n && offsets.size(1) == 2, op,
              ": offsets must have shape [", g.n, ", 2], got ", offsets.sizes());
  TORCH_CHECK(flips.dim() == 1 && flips.size(0) == g.n, op, ": flips must have shape [", g.n, "], got ",
              flips.sizes());
  TORCH_CHECK(pad >= 0, op, ": pad must be >= 0, got ", pad);
  TORCH_CHECK(!reflect || (pad < g.h && pad < g.w), op, ": reflect padding needs pad < H and pad < W, got pad ",
              pad, " for ", g.h, "x", g.w);
  if (g.n > 0) {
    const auto [lo, hi] = at::aminmax(offsets);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= 2 * pad, op, ": offsets must lie in [0, 2*pad] = [0, ",
                2 * pad, "], got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  TORCH_CHECK(mean.has_value() == std.has_value(), op, ": pass both mean and std, or neither");
  for (const auto* stat : {&mean, &std}) {
    if (!stat->has_value()) continue;
    check_cpu_tensor(**stat, op, stat == &mean ? "mean" : "std", at::kFloat);
    TORCH_CHECK((*stat)->dim() == 1 && (*stat)->size(0) == g.c, op, ": mean and std must have shape [", g.c,
                "], got ", (*stat)->sizes());
  }
  return g;
}

inline float to_unit(uint8_t v) { return static_cast<float>(v) / 255.0f; }
inline float to_unit(float v) { return v; }

// The source index along one axis of size `size` for padded coordinate p (reflect: pad < size).
inline int64_t reflect_index(int64_t p, int64_t size) {
  p = p < 0 ? -p : p;
  return p >= size ? 2 * (size - 1) - p : p;
}

template <typename S, bool Reflect, bool Normalise>
void augment_forward_kernel(const at::Tensor& x, at::Tensor& out, const int64_t* offsets, const bool* flips,
                            int64_t pad, const float* mean, const float* std, const Geometry& g) {
  const S* xp = x.const_data_ptr<S>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t xs_n = x.stride(0), xs_c = x.stride(1), xs_h = x.stride(2), xs_w = x.stride(3);
  const int64_t os_n = out.stride(0), os_c = out.stride(1), os_h = out.stride(2), os_w = out.stride(3);
  const int64_t rows = g.n * g.c * g.h;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, g.w));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % g.h, c = (row / g.h) % g.c, n = row / (g.h * g.c);
      const int64_t oy = offsets[2 * n], ox = offsets[2 * n + 1];
      const bool flip = flips[n];
      // q(j) = first + dir * j in source coordinates.
      const int64_t dir = flip ? -1 : 1;
      const int64_t first = (flip ? g.w - 1 : 0) + ox - pad;
      int64_t r = i + oy - pad;
      const bool row_inside = Reflect || (r >= 0 && r < g.h);
      if (Reflect) r = reflect_index(r, g.h);
      const S* src = xp + n * xs_n + c * xs_c + (row_inside ? r : 0) * xs_h;
      float* dst = op + n * os_n + c * os_c + i * os_h;
      const float m = Normalise ? mean[c] : 0.0f, s = Normalise ? std[c] : 1.0f;
#pragma omp simd
      for (int64_t j = 0; j < g.w; ++j) {
        int64_t q = first + dir * j;
        float v;
        if (Reflect) {
          v = to_unit(src[reflect_index(q, g.w) * xs_w]);
        } else {
          const bool inside = row_inside && q >= 0 && q < g.w;
          v = inside ? to_unit(src[(inside ? q : 0) * xs_w]) : 0.0f;
        }
        if (Normalise) v = (v - m) / s;
        dst[j * os_w] = v;
      }
    }
  });
}

at::Tensor augment_forward_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& flips, int64_t pad,
                               bool reflect, const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& std) {
  constexpr const char* op = "ueguard::augment_forward";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kFloat, op,
              ": x must be uint8 or float32, got ", x.scalar_type());
  const Geometry g = check_params(op, x, offsets, flips, pad, reflect, mean, std);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat).memory_format(x.suggest_memory_format()));
  if (out.numel() == 0) return out;
  const at::Tensor off = offsets.contiguous(), fl = flips.contiguous();
  const at::Tensor mean_c = mean ? mean->contiguous() : at::Tensor(), std_c = std ? std->contiguous() : at::Tensor();
  const int64_t* op_off = off.const_data_ptr<int64_t>();
  const bool* op_fl = fl.const_data_ptr<bool>();
  const float* mp = mean ? mean_c.const_data_ptr<float>() : nullptr;
  const float* sp = std ? std_c.const_data_ptr<float>() : nullptr;
  const bool normalise = mean.has_value();
  auto run = [&](auto tag) {
    using S = decltype(tag);
    if (reflect && normalise) augment_forward_kernel<S, true, true>(x, out, op_off, op_fl, pad, mp, sp, g);
    else if (reflect) augment_forward_kernel<S, true, false>(x, out, op_off, op_fl, pad, mp, sp, g);
    else if (normalise) augment_forward_kernel<S, false, true>(x, out, op_off, op_fl, pad, mp, sp, g);
    else augment_forward_kernel<S, false, false>(x, out, op_off, op_fl, pad, mp, sp, g);
  };
  if (x.scalar_type() == at::kByte) run(uint8_t{});
  else run(float{});
  return out;
}

// The output positions along one axis that read source coordinate `src`: up to three padded
// coordinates map to it (itself, and its mirror images across 0 and size-1 with reflect padding);
// output index = padded - offset0 where offset0 = offset - pad, flipped when `flip`. Returns the count.
template <bool Reflect>
inline int readers(int64_t src, int64_t size, int64_t shift, bool flip, int64_t* out) {
  int count = 0;
  auto add = [&](int64_t padded) {
    int64_t k = padded - shift;
    k = flip ? size - 1 - k : k;
    if (k >= 0 && k < size) out[count++] = k;
  };
  add(src);
  if (Reflect) {
    if (src > 0) add(-src);
    if (src < size - 1) add(2 * (size - 1) - src);
  }
  return count;
}

template <bool Reflect, bool Normalise>
void augment_backward_kernel(const at::Tensor& grad_out, at::Tensor& grad_in, const int64_t* offsets,
                             const bool* flips, int64_t pad, const float* std, const Geometry& g) {
  const float* gp = grad_out.const_data_ptr<float>();
  float* ip = grad_in.mutable_data_ptr<float>();
  const int64_t gs_n = grad_out.stride(0), gs_c = grad_out.stride(1), gs_h = grad_out.stride(2),
                gs_w = grad_out.stride(3);
  const int64_t is_n = grad_in.stride(0), is_c = grad_in.stride(1), is_h = grad_in.stride(2),
                is_w = grad_in.stride(3);
  const int64_t rows = g.n * g.c * g.h;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, g.w));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t r = row % g.h, c = (row / g.h) % g.c, n = row / (g.h * g.c);
      const int64_t oy = offsets[2 * n], ox = offsets[2 * n + 1];
      const bool flip = flips[n];
      const float s = Normalise ? std[c] : 1.0f;
      int64_t out_rows[3];
      const int n_rows = readers<Reflect>(r, g.h, oy - pad, false, out_rows);
      const float* src = gp + n * gs_n + c * gs_c;
      float* dst = ip + n * is_n + c * is_c + r * is_h;
      for (int64_t q = 0; q < g.w; ++q) {
        int64_t out_cols[3];
        const int n_cols = readers<Reflect>(q, g.w, ox - pad, flip, out_cols);
        // d out / d v = 1 / std per output pixel; the adjoint of the gather sums over readers.
        float sum = 0.0f;
        for (int a = 0; a < n_rows; ++a)
          for (int b = 0; b < n_cols; ++b) {
            const float v = src[out_rows[a] * gs_h + out_cols[b] * gs_w];
            sum += Normalise ? v / s : v;
          }
        dst[q * is_w] = sum;
      }
    }
  });
}

at::Tensor augment_backward_cpu(const at::Tensor& grad_out, const at::Tensor& offsets, const at::Tensor& flips,
                                int64_t pad, bool reflect, const std::optional<at::Tensor>& std) {
  constexpr const char* op = "ueguard::augment_backward";
  check_cpu_tensor(grad_out, op, "grad_out", at::kFloat);
  const std::optional<at::Tensor> mean_like = std;  // std alone drives the backward
  const Geometry g = check_params(op, grad_out, offsets, flips, pad, reflect, mean_like, std);
  at::Tensor grad_in = at::empty(grad_out.sizes(), grad_out.options().memory_format(grad_out.suggest_memory_format()));
  if (grad_in.numel() == 0) return grad_in;
  const at::Tensor off = offsets.contiguous(), fl = flips.contiguous();
  const at::Tensor std_c = std ? std->contiguous() : at::Tensor();
  const int64_t* op_off = off.const_data_ptr<int64_t>();
  const bool* op_fl = fl.const_data_ptr<bool>();
  const float* sp = std ? std_c.const_data_ptr<float>() : nullptr;
  if (reflect && sp) augment_backward_kernel<true, true>(grad_out, grad_in, op_off, op_fl, pad, sp, g);
  else if (reflect) augment_backward_kernel<true, false>(grad_out, grad_in, op_off, op_fl, pad, sp, g);
  else if (sp) augment_backward_kernel<false, true>(grad_out, grad_in, op_off, op_fl, pad, sp, g);
  else augment_backward_kernel<false, false>(grad_out, grad_in, op_off, op_fl, pad, sp, g);
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ueguard, m) {
  m.def(
      "augment_forward(Tensor x, Tensor offsets, Tensor flips, int pad, bool reflect, Tensor? mean, Tensor? std) "
      "-> Tensor");
  m.def("augment_backward(Tensor grad_out, Tensor offsets, Tensor flips, int pad, bool reflect, Tensor? std) -> Tensor");
}

TORCH_LIBRARY_IMPL(ueguard, CPU, m) {
  m.impl("augment_forward", &augment_forward_cpu);
  m.impl("augment_backward", &augment_backward_cpu);
}

}  // namespace ueguard
