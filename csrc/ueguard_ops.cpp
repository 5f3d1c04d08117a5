// CPU kernels for ueguard's perturbation ops, registered as PyTorch operators in the `ueguard`
// namespace (csrc/augment.cpp adds the augmentation ops to the same namespace).
//
// The PyTorch references in ueguard/kernels/project.py are the specification; the element-wise
// kernels perform the same float32 operations in the same order, so their outputs are bitwise
// equal to the references (the build passes -ffp-contract=off so that a*b+c is never fused into an
// FMA, which would round once instead of twice). The L2 step's per-sample norms are reductions,
// accumulated here in float64 and in float32 by the reference, so it agrees to rounding only.
//
// Parallelism: at::parallel_for, which with PyTorch's OpenMP backend is an `omp parallel`
// region sized by torch.get_num_threads() (and runs inline when already inside a parallel
// region or below the grain size). Inner loops are `omp simd` so the compiler vectorises them
// for whatever ISA the build targets, without -march flags.
//
// Loading the module `ueguard._C` registers the operators:
//   torch.ops.ueguard.project_step_linf(delta, grad, x, step_size, eps, direction) -> Tensor
//   torch.ops.ueguard.project_step_linf_next(..., input_dtype, input_channels_last) -> (Tensor, Tensor)
//   torch.ops.ueguard.project_step_l2(delta, grad, x, step_size, eps, direction) -> Tensor
//   torch.ops.ueguard.project_step_l2_next(..., input_dtype, input_channels_last) -> (Tensor, Tensor)
//   torch.ops.ueguard.apply_quantize_u8(image_u8, delta) -> (out_u8, linf, sq_err)
//   torch.ops.ueguard.augment_forward / augment_backward (csrc/augment.cpp)

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"

// The round-to-nearest-even trick below needs every float expression rounded to float.
static_assert(FLT_EVAL_METHOD == 0, "ueguard kernels require FLT_EVAL_METHOD == 0 (no excess precision)");

namespace ueguard {
namespace {

using detail::check_cpu_tensor;
using detail::check_same_shape;
using detail::clamp;

// Elements per reduction task (per-sample norms, quantisation statistics). Each sample is split
// into tasks of this size so that a batch of one large image still spreads over all threads;
// partial results are combined in a fixed order, so they do not depend on the thread count.
constexpr int64_t kChunk = 1 << 14;

// The optional second output of a projection step: x + delta' (the next forward's input) in dtype
// T, either in the tensors' own (contiguous NCHW) order or channels-last (NHWC) for 4-D tensors.
template <typename T>
struct NextInput {
  T* data = nullptr;  // null: not requested
  bool channels_last = false;
  int64_t channels = 1;
  int64_t plane = 1;  // H * W
};

// Runs `elem(i, sample)` for every flat (contiguous NCHW) index i, where elem writes the step's
// delta output at i and returns x[i] + delta'[i]; that value is stored, converted to T, in the
// next-input tensor when one is requested. The range is cut into segments that stay within one
// sample (and within one channel plane for a channels-last destination), so the inner loops are
// plain strided loops the compiler vectorises.
template <typename T, typename Elem>
void run_elementwise(int64_t numel, int64_t per_sample, const NextInput<T>& next, const Elem& elem) {
  if (numel == 0) return;
  const bool planes = next.data != nullptr && next.channels_last;
  const int64_t seg = planes ? next.plane : per_sample;
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t lo = begin; lo < end;) {
      const int64_t hi = std::min(end, (lo / seg + 1) * seg);
      const int64_t sample = lo / per_sample;
      if (next.data == nullptr) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) elem(i, sample);
      } else if (!planes) {
        T* dst = next.data;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) dst[i] = static_cast<T>(elem(i, sample));
      } else {
        // Plane p = n*C + c holds NCHW indices [p*HW, (p+1)*HW); NHWC puts (n, c, hw) at
        // n*C*HW + hw*C + c.
        const int64_t plane = lo / seg, n = plane / next.channels, c = plane % next.channels;
        T* dst = next.data + n * next.channels * next.plane + c;
        const int64_t first = plane * next.plane, stride = next.channels;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) dst[(i - first) * stride] = static_cast<T>(elem(i, sample));
      }
      lo = hi;
    }
  });
}

// Per sample, the float64 sum of value(i, sample)^2 over its elements, accumulated per task of
// kChunk elements and combined in task order (deterministic for any thread count).
template <typename Value>
std::vector<double> per_sample_sum_sq(int64_t n_samples, int64_t per_sample, const Value& value) {
  std::vector<double> sums(n_samples, 0.0);
  if (n_samples == 0 || per_sample == 0) return sums;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  std::vector<double> partial(n_samples * chunks);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::min(per_sample, kChunk));
  at::parallel_for(0, n_samples * chunks, grain, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t sample = task / chunks;
      const int64_t lo = sample * per_sample + (task % chunks) * kChunk;
      const int64_t hi = std::min(lo + kChunk, (sample + 1) * per_sample);
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = lo; i < hi; ++i) {
        const double v = value(i, sample);
        sum += v * v;
      }
      partial[task] = sum;
    }
  });
  for (int64_t sample = 0; sample < n_samples; ++sample)
    for (int64_t c = 0; c < chunks; ++c) sums[sample] += partial[sample * chunks + c];
  return sums;
}

struct StepArgs {
  at::Tensor delta, grad, x;  // contiguous float32
  float step, bound;
};

StepArgs check_step_args(const char* op, const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                         double step_size, double eps, double direction) {
  check_cpu_tensor(delta, op, "delta", at::kFloat);
  check_cpu_tensor(grad, op, "grad", at::kFloat);
  check_cpu_tensor(x, op, "x", at::kFloat);
  check_same_shape(grad, delta, op, "grad", "delta");
  check_same_shape(x, delta, op, "x", "delta");
  TORCH_CHECK(std::isfinite(step_size) && step_size >= 0.0, op, ": step_size must be finite and >= 0, got ",
              step_size);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(direction), op, ": direction must be finite, got ", direction);
  // The reference multiplies by the Python float direction*step_size, which PyTorch rounds to
  // float32 once; in the L-inf step the product with a sign in {-1, 0, 1} is then exact.
  return {delta.contiguous(), grad.contiguous(), x.contiguous(), static_cast<float>(direction * step_size),
          static_cast<float>(eps)};
}

at::Tensor empty_next(const at::Tensor& like, at::ScalarType dtype, bool channels_last, const char* op) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": input_dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(!channels_last || like.dim() == 4, op, ": input_channels_last needs 4-D N×C×H×W tensors, got shape ",
              like.sizes());
  return at::empty(like.sizes(), like.options().dtype(dtype).memory_format(
                                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

// Calls fn(NextInput<T>) with T matching next's dtype, or fn(NextInput<float>{}) when next is undefined.
template <typename Fn>
void with_next(const at::Tensor& next, bool channels_last, const Fn& fn) {
  if (!next.defined()) return fn(NextInput<float>{});
  const int64_t channels = next.dim() == 4 ? next.size(1) : 1;
  const int64_t plane = next.dim() == 4 ? next.size(2) * next.size(3) : 1;
  switch (next.scalar_type()) {
    case at::kFloat:
      return fn(NextInput<float>{next.mutable_data_ptr<float>(), channels_last, channels, plane});
    case at::kBFloat16:
      return fn(NextInput<c10::BFloat16>{next.mutable_data_ptr<c10::BFloat16>(), channels_last, channels, plane});
    case at::kHalf:
      return fn(NextInput<c10::Half>{next.mutable_data_ptr<c10::Half>(), channels_last, channels, plane});
    default:
      TORCH_CHECK(false, "ueguard: unsupported next-input dtype ", next.scalar_type());
  }
}

// One signed-gradient step on the perturbation followed by projection onto
//   { d : ||d||_inf <= eps } ∩ { d : 0 <= x + d <= 1 }:
//   d   = clamp(delta - direction * step_size * sign(grad), -eps, eps)
//   out = clamp(x + d, 0, 1) - x
// direction = +1 descends the loss (error-minimising noise), -1 ascends it. sign(0) = sign(NaN) = 0
// as in torch.sign; NaN in delta or x propagates to the output. `next`, when defined, receives
// x + out (converted to its dtype, in its memory format).
void project_step_linf_into(const StepArgs& a, at::Tensor& out, const at::Tensor& next, bool channels_last) {
  const float step = a.step, bound = a.bound;
  const float* dp = a.delta.const_data_ptr<float>();
  const float* gp = a.grad.const_data_ptr<float>();
  const float* xp = a.x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t numel = out.numel();
  with_next(next, channels_last, [&](const auto& dst) {
    run_elementwise(numel, numel, dst, [=](int64_t i, int64_t) {
      const float g = gp[i];
      const float s = static_cast<float>((g > 0.0f) - (g < 0.0f));
      const float d = clamp(dp[i] - step * s, -bound, bound);
      const float xi = xp[i];
      const float r = clamp(xi + d, 0.0f, 1.0f) - xi;
      o[i] = r;
      return xi + r;
    });
  });
}

at::Tensor project_step_linf_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                                 double step_size, double eps, double direction) {
  const StepArgs a = check_step_args("ueguard::project_step_linf", delta, grad, x, step_size, eps, direction);
  at::Tensor out = at::empty(delta.sizes(), a.delta.options());
  project_step_linf_into(a, out, at::Tensor(), false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_step_linf_next_cpu(const at::Tensor& delta, const at::Tensor& grad,
                                                              const at::Tensor& x, double step_size, double eps,
                                                              double direction, at::ScalarType input_dtype,
                                                              bool input_channels_last) {
  constexpr const char* op = "ueguard::project_step_linf_next";
  const StepArgs a = check_step_args(op, delta, grad, x, step_size, eps, direction);
  at::Tensor out = at::empty(delta.sizes(), a.delta.options());
  at::Tensor next = empty_next(a.delta, input_dtype, input_channels_last, op);
  project_step_linf_into(a, out, next, input_channels_last);
  return {out, next};
}

// One normalised-gradient step on an L2-bounded perturbation, per sample n (the first dimension):
//   scale_n = direction * step_size / ||grad_n||_2          (0 where the gradient is 0)
//   d_n     = delta_n - scale_n * grad_n
//   d_n     = d_n * min(1, eps / ||d_n||_2)                 (projection onto the L2 ball)
//   out     = clamp(x + d, 0, 1) - x                        (valid image range)
// The norms are accumulated in float64 and rounded to float32 once.
void project_step_l2_into(const StepArgs& a, at::Tensor& out, const at::Tensor& next, bool channels_last) {
  const float* dp = a.delta.const_data_ptr<float>();
  const float* gp = a.grad.const_data_ptr<float>();
  const float* xp = a.x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t numel = out.numel();
  const int64_t n_samples = out.size(0);
  if (numel == 0) return;
  const int64_t per_sample = numel / n_samples;

  const std::vector<double> grad_sq = per_sample_sum_sq(n_samples, per_sample, [=](int64_t i, int64_t) { return gp[i]; });
  std::vector<float> scale(n_samples);
  for (int64_t n = 0; n < n_samples; ++n) {
    const float norm = static_cast<float>(std::sqrt(grad_sq[n]));
    scale[n] = norm > 0.0f ? a.step / norm : 0.0f;
  }
  const float* sp = scale.data();
  const std::vector<double> step_sq =
      per_sample_sum_sq(n_samples, per_sample, [=](int64_t i, int64_t n) { return dp[i] - sp[n] * gp[i]; });
  std::vector<float> factor(n_samples);
  for (int64_t n = 0; n < n_samples; ++n) {
    const float norm = static_cast<float>(std::sqrt(step_sq[n]));
    factor[n] = norm > a.bound ? a.bound / norm : 1.0f;
  }
  const float* fp = factor.data();
  with_next(next, channels_last, [&](const auto& dst) {
    run_elementwise(numel, per_sample, dst, [=](int64_t i, int64_t n) {
      const float d = (dp[i] - sp[n] * gp[i]) * fp[n];
      const float xi = xp[i];
      const float r = clamp(xi + d, 0.0f, 1.0f) - xi;
      o[i] = r;
      return xi + r;
    });
  });
}

StepArgs check_l2_args(const char* op, const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                       double step_size, double eps, double direction) {
  const StepArgs a = check_step_args(op, delta, grad, x, step_size, eps, direction);
  TORCH_CHECK(delta.dim() >= 2, op, ": the L2 step needs a batch dimension (N×...), got shape ", delta.sizes());
  return a;
}

at::Tensor project_step_l2_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                               double step_size, double eps, double direction) {
  const StepArgs a = check_l2_args("ueguard::project_step_l2", delta, grad, x, step_size, eps, direction);
  at::Tensor out = at::empty(delta.sizes(), a.delta.options());
  project_step_l2_into(a, out, at::Tensor(), false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> project_step_l2_next_cpu(const at::Tensor& delta, const at::Tensor& grad,
                                                            const at::Tensor& x, double step_size, double eps,
                                                            double direction, at::ScalarType input_dtype,
                                                            bool input_channels_last) {
  constexpr const char* op = "ueguard::project_step_l2_next";
  const StepArgs a = check_l2_args(op, delta, grad, x, step_size, eps, direction);
  at::Tensor out = at::empty(delta.sizes(), a.delta.options());
  at::Tensor next = empty_next(a.delta, input_dtype, input_channels_last, op);
  project_step_l2_into(a, out, next, input_channels_last);
  return {out, next};
}

// Adding then subtracting 1.5 * 2^23 rounds a float in [-2^22, 2^22] to the nearest integer,
// ties to even (the IEEE default rounding of the addition, where one ulp is 1). It matches
// torch.round / std::nearbyint and, unlike them, vectorises on baseline x86-64 (SSE2).
constexpr float kRoundMagic = 12582912.0f;

// Writes the perturbed image in the uint8 codomain of the saved files and measures what the
// quantisation left of the perturbation:
//   out[n]    = clamp(round_half_even(image[n] + 255 * delta[n]), 0, 255)        (uint8)
//   linf[n]   = max_i |out[n,i] - image[n,i]|           in integer levels, float32
//   sq_err[n] = sum_i ((out[n,i] - image[n,i]) / 255)^2 in [0, 1] units,   float64
// sq_err is an exact int64 sum of squared level differences divided once by 255^2, so it is the
// correctly rounded float64 value whatever the thread count. image is N×C×H×W or C×H×W (N = 1);
// delta must be finite.
std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_quantize_u8_cpu(const at::Tensor& image_u8,
                                                                    const at::Tensor& delta) {
  constexpr const char* op = "ueguard::apply_quantize_u8";
  check_cpu_tensor(image_u8, op, "image_u8", at::kByte);
  check_cpu_tensor(delta, op, "delta", at::kFloat);
  TORCH_CHECK(image_u8.dim() == 4 || image_u8.dim() == 3, op,
              ": image_u8 must be NxCxHxW or CxHxW, got shape ", image_u8.sizes());
  check_same_shape(delta, image_u8, op, "delta", "image_u8");

  const at::Tensor image_c = image_u8.contiguous();
  const at::Tensor delta_c = delta.contiguous();
  const int64_t n_samples = image_u8.dim() == 4 ? image_u8.size(0) : 1;
  const int64_t per_sample = n_samples == 0 ? 0 : image_u8.numel() / n_samples;

  at::Tensor out = at::empty(image_u8.sizes(), image_u8.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor linf = at::empty({n_samples}, delta.options());
  at::Tensor sq_err = at::empty({n_samples}, delta.options().dtype(at::kDouble));

  const int64_t chunks = std::max<int64_t>(1, (per_sample + kChunk - 1) / kChunk);
  const int64_t n_tasks = n_samples * chunks;
  std::vector<int32_t> task_max(n_tasks);
  std::vector<int64_t> task_sq(n_tasks);

  const uint8_t* ip = image_c.const_data_ptr<uint8_t>();
  const float* dp = delta_c.const_data_ptr<float>();
  uint8_t* op_out = out.mutable_data_ptr<uint8_t>();
  const int64_t task_elems = std::max<int64_t>(1, std::min(per_sample, kChunk));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / task_elems);

  at::parallel_for(0, n_tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t sample = task / chunks;
      const int64_t lo = sample * per_sample + (task % chunks) * kChunk;
      const int64_t hi = std::min(lo + kChunk, (sample + 1) * per_sample);
      int32_t max_diff = 0;
      int64_t sum_sq = 0;
#pragma omp simd reduction(max : max_diff) reduction(+ : sum_sq)
      for (int64_t i = lo; i < hi; ++i) {
        const int32_t level = ip[i];
        // round(clamp(v, 0, 255)) == clamp(round(v), 0, 255) because the bounds are integers.
        const float v = clamp(static_cast<float>(level) + 255.0f * dp[i], 0.0f, 255.0f);
        const int32_t q = static_cast<int32_t>((v + kRoundMagic) - kRoundMagic);
        op_out[i] = static_cast<uint8_t>(q);
        const int32_t diff = q - level;
        const int32_t abs_diff = diff < 0 ? -diff : diff;
        max_diff = abs_diff > max_diff ? abs_diff : max_diff;
        sum_sq += static_cast<int64_t>(diff * diff);
      }
      task_max[task] = max_diff;
      task_sq[task] = sum_sq;
    }
  });

  float* linf_p = linf.mutable_data_ptr<float>();
  double* sq_p = sq_err.mutable_data_ptr<double>();
  for (int64_t sample = 0; sample < n_samples; ++sample) {
    int32_t max_diff = 0;
    int64_t sum_sq = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      max_diff = std::max(max_diff, task_max[sample * chunks + c]);
      sum_sq += task_sq[sample * chunks + c];
    }
    linf_p[sample] = static_cast<float>(max_diff);
    sq_p[sample] = static_cast<double>(sum_sq) / (255.0 * 255.0);
  }
  return {out, linf, sq_err};
}

}  // namespace

TORCH_LIBRARY(ueguard, m) {
  m.def("project_step_linf(Tensor delta, Tensor grad, Tensor x, float step_size, float eps, float direction) -> Tensor");
  m.def(
      "project_step_linf_next(Tensor delta, Tensor grad, Tensor x, float step_size, float eps, float direction, "
      "ScalarType input_dtype, bool input_channels_last) -> (Tensor delta_out, Tensor next_input)");
  m.def("project_step_l2(Tensor delta, Tensor grad, Tensor x, float step_size, float eps, float direction) -> Tensor");
  m.def(
      "project_step_l2_next(Tensor delta, Tensor grad, Tensor x, float step_size, float eps, float direction, "
      "ScalarType input_dtype, bool input_channels_last) -> (Tensor delta_out, Tensor next_input)");
  m.def("apply_quantize_u8(Tensor image_u8, Tensor delta) -> (Tensor out_u8, Tensor linf, Tensor sq_err)");
}

TORCH_LIBRARY_IMPL(ueguard, CPU, m) {
  m.impl("project_step_linf", &project_step_linf_cpu);
  m.impl("project_step_linf_next", &project_step_linf_next_cpu);
  m.impl("project_step_l2", &project_step_l2_cpu);
  m.impl("project_step_l2_next", &project_step_l2_next_cpu);
  m.impl("apply_quantize_u8", &apply_quantize_u8_cpu);
}

}  // namespace ueguard

// `import ueguard._C` only has to load this library so that the static registrations above run;
// the module itself is empty (the operators live under torch.ops.ueguard).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "ueguard._C",
                                   "Registers the torch.ops.ueguard CPU operators.", -1, nullptr};
  return PyModule_Create(&module_def);
}
