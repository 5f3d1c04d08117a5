// CPU kernels for ueguard, registered as PyTorch operators in the `ueguard` namespace.
//
// The PyTorch references in ueguard/kernels/project.py are the specification; these kernels
// perform the same float32 operations in the same order, so their outputs are bitwise equal to
// the references (the build passes -ffp-contract=off so that a*b+c is never fused into an FMA,
// which would round once instead of twice).
//
// Parallelism: at::parallel_for, which with PyTorch's OpenMP backend is an `omp parallel`
// region sized by torch.get_num_threads() (and runs inline when already inside a parallel
// region or below the grain size). Inner loops are `omp simd` so the compiler vectorises them
// for whatever ISA the build targets, without -march flags.
//
// Loading the module `ueguard._C` registers the operators:
//   torch.ops.ueguard.project_step_linf(delta, grad, x, step_size, eps, direction) -> Tensor
//   torch.ops.ueguard.apply_quantize_u8(image_u8, delta) -> (out_u8, linf, sq_err)

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

// The round-to-nearest-even trick below needs every float expression rounded to float.
static_assert(FLT_EVAL_METHOD == 0, "ueguard kernels require FLT_EVAL_METHOD == 0 (no excess precision)");

namespace ueguard {
namespace {

// clamp(v, lo, hi) with torch.clamp's semantics: NaN propagates (both comparisons are false).
inline float clamp(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

void check_cpu_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
}

// One signed-gradient step on the perturbation followed by projection onto
//   { d : ||d||_inf <= eps } ∩ { d : 0 <= x + d <= 1 }:
//   d   = clamp(delta - direction * step_size * sign(grad), -eps, eps)
//   out = clamp(x + d, 0, 1) - x
// direction = +1 descends the loss (error-minimising noise), -1 ascends it. sign(0) = sign(NaN) = 0
// as in torch.sign; NaN in delta or x propagates to the output.
at::Tensor project_step_linf_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                                 double step_size, double eps, double direction) {
  constexpr const char* op = "ueguard::project_step_linf";
  check_cpu_tensor(delta, op, "delta", at::kFloat);
  check_cpu_tensor(grad, op, "grad", at::kFloat);
  check_cpu_tensor(x, op, "x", at::kFloat);
  check_same_shape(grad, delta, op, "grad", "delta");
  check_same_shape(x, delta, op, "x", "delta");
  TORCH_CHECK(std::isfinite(step_size) && step_size >= 0.0, op, ": step_size must be finite and >= 0, got ",
              step_size);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(direction), op, ": direction must be finite, got ", direction);

  const at::Tensor delta_c = delta.contiguous();
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor x_c = x.contiguous();
  at::Tensor out = at::empty(delta.sizes(), delta.options().memory_format(at::MemoryFormat::Contiguous));

  // The reference multiplies sign(grad) by the Python float direction*step_size, which PyTorch
  // rounds to float32 once; the product with a sign in {-1, 0, 1} is then exact.
  const float step = static_cast<float>(direction * step_size);
  const float bound = static_cast<float>(eps);
  const float* dp = delta_c.const_data_ptr<float>();
  const float* gp = grad_c.const_data_ptr<float>();
  const float* xp = x_c.const_data_ptr<float>();
  float* op_out = out.mutable_data_ptr<float>();

  at::parallel_for(0, delta_c.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = gp[i];
      const float s = static_cast<float>((g > 0.0f) - (g < 0.0f));
      const float d = clamp(dp[i] - step * s, -bound, bound);
      const float xi = xp[i];
      op_out[i] = clamp(xi + d, 0.0f, 1.0f) - xi;
    }
  });
  return out;
}

// Elements per reduction task of apply_quantize_u8. Each sample is split into tasks of this size
// so that a batch of one large image still spreads over all threads; per-task partial results are
// integers, so the final reduction is exact and independent of the thread count.
constexpr int64_t kQuantizeChunk = 1 << 14;

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

  const int64_t chunks = std::max<int64_t>(1, (per_sample + kQuantizeChunk - 1) / kQuantizeChunk);
  const int64_t n_tasks = n_samples * chunks;
  std::vector<int32_t> task_max(n_tasks);
  std::vector<int64_t> task_sq(n_tasks);

  const uint8_t* ip = image_c.const_data_ptr<uint8_t>();
  const float* dp = delta_c.const_data_ptr<float>();
  uint8_t* op_out = out.mutable_data_ptr<uint8_t>();
  const int64_t task_elems = std::max<int64_t>(1, std::min(per_sample, kQuantizeChunk));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / task_elems);

  at::parallel_for(0, n_tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t sample = task / chunks;
      const int64_t lo = sample * per_sample + (task % chunks) * kQuantizeChunk;
      const int64_t hi = std::min(lo + kQuantizeChunk, (sample + 1) * per_sample);
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
  m.def("apply_quantize_u8(Tensor image_u8, Tensor delta) -> (Tensor out_u8, Tensor linf, Tensor sq_err)");
}

TORCH_LIBRARY_IMPL(ueguard, CPU, m) {
  m.impl("project_step_linf", &project_step_linf_cpu);
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
