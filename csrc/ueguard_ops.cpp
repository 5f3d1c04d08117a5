// CPU kernels for ueguard's perturbation ops, registered as PyTorch operators in the `ueguard`
// namespace (csrc/augment.cpp adds the augmentation ops to the same namespace).
//
// The PyTorch references in ueguard/kernels/project.py are the specification; the element-wise
// kernels perform the same float32 operations in the same order, so their outputs are bitwise
// equal to the references (the build passes -ffp-contract=off so that a*b+c is never fused into an
// FMA, which would round once instead of twice). The L2 step's per-sample norms are reductions,
// summed here in float32 lanes flushed to float64 and by the reference in its own float32 order, so
// it agrees to rounding only.
//
// This file checks arguments, allocates outputs and registers the operators; the loops themselves
// are in kernels_impl.h, compiled once per instruction set (baseline, AVX2, AVX-512) and chosen at
// run time (kernels.h explains why).
//
// Loading the module `ueguard._C` registers the operators:
//   torch.ops.ueguard.project_step_linf(delta, grad, x, step_size, eps, direction) -> Tensor
//   torch.ops.ueguard.project_step_linf_next(..., input_dtype, input_channels_last) -> (Tensor, Tensor)
//   torch.ops.ueguard.project_step_l2(delta, grad, x, step_size, eps, direction) -> Tensor
//   torch.ops.ueguard.project_step_l2_next(..., input_dtype, input_channels_last) -> (Tensor, Tensor)
//   torch.ops.ueguard.apply_quantize_u8(image_u8, delta) -> (out_u8, linf, sq_err)
//   torch.ops.ueguard.augment_forward / augment_backward (csrc/augment.cpp)
//   torch.ops.ueguard.cpu_isa() / cpu_isas() / set_cpu_isa(name): the kernels' instruction set

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace ueguard {
namespace {

using detail::check_cpu_tensor;
using detail::check_same_shape;

// ---- Instruction-set dispatch -------------------------------------------------------------------
// The widest compiled ISA the CPU supports, unless UEGUARD_CPU_ISA (default|avx2|avx512) or
// ueguard::set_cpu_isa asks for another; see kernels.h.

bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (name == "avx2") return __builtin_cpu_supports("avx2");
#endif
  return name == "default";
}

const isa::Kernels* compiled(const std::string& name) {
  if (name == "avx512") return isa::kernels_avx512();
  if (name == "avx2") return isa::kernels_avx2();
  if (name == "default") return isa::kernels_default();
  return nullptr;
}

// Widest first.
const std::vector<std::string>& isa_names() {
  static const std::vector<std::string> names{"avx512", "avx2", "default"};
  return names;
}

std::vector<std::string> usable_isas() {
  std::vector<std::string> out;
  for (const auto& name : isa_names())
    if (compiled(name) != nullptr && cpu_supports(name)) out.push_back(name);
  return out;
}

const isa::Kernels* usable(const std::string& name, const char* source) {
  TORCH_CHECK(compiled(name) != nullptr || name == "default", source, ": unknown or uncompiled CPU ISA '", name,
              "'; this build and CPU can run: ", c10::Join(", ", usable_isas()));
  TORCH_CHECK(cpu_supports(name), source, ": this CPU does not support '", name,
              "'; it can run: ", c10::Join(", ", usable_isas()));
  return compiled(name);
}

const isa::Kernels* initial_kernels() {
  const char* env = std::getenv("UEGUARD_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::string(env) != "auto") return usable(env, "UEGUARD_CPU_ISA");
  return compiled(usable_isas().front());
}

std::atomic<const isa::Kernels*>& active_slot() {
  static std::atomic<const isa::Kernels*> slot{initial_kernels()};
  return slot;
}

const isa::Kernels& kernels() { return *active_slot().load(std::memory_order_relaxed); }

std::string cpu_isa() { return kernels().name; }

// Switches the kernels' ISA for the process (tests and benchmarks); returns the previous one.
std::string set_cpu_isa(const std::string& name) {
  const isa::Kernels* next = name == "auto" ? compiled(usable_isas().front()) : usable(name, "ueguard::set_cpu_isa");
  return active_slot().exchange(next)->name;
}

std::vector<std::string> cpu_isas() { return usable_isas(); }

// ---- Argument checks and output allocation ------------------------------------------------------

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

// Describes `next` (undefined: not requested) for the kernels.
isa::NextInput describe_next(const at::Tensor& next, bool channels_last) {
  isa::NextInput out;
  if (!next.defined()) return out;
  out.data = next.data_ptr();
  out.channels_last = channels_last;
  out.channels = next.dim() == 4 ? next.size(1) : 1;
  out.plane = next.dim() == 4 ? next.size(2) * next.size(3) : 1;
  switch (next.scalar_type()) {
    case at::kFloat: out.type = isa::NextType::Float; break;
    case at::kBFloat16: out.type = isa::NextType::BFloat16; break;
    case at::kHalf: out.type = isa::NextType::Half; break;
    default: TORCH_CHECK(false, "ueguard: unsupported next-input dtype ", next.scalar_type());
  }
  return out;
}

enum class Norm { Linf, L2 };

// One projection step, checked and allocated here and run by the active ISA's kernel:
//
// L-inf: one signed-gradient step on the perturbation, then projection onto
//   { d : ||d||_inf <= eps } ∩ { d : 0 <= x + d <= 1 }:
//     d   = clamp(delta - direction * step_size * sign(grad), -eps, eps)
//     out = clamp(x + d, 0, 1) - x
//   direction = +1 descends the loss (error-minimising noise), -1 ascends it. sign(0) = sign(NaN) = 0
//   as in torch.sign; NaN in delta or x propagates to the output.
// L2: one normalised-gradient step per sample n (the first dimension):
//     scale_n = direction * step_size / ||grad_n||_2          (0 where the gradient is 0)
//     d_n     = delta_n - scale_n * grad_n
//     d_n     = d_n * min(1, eps / ||d_n||_2)                 (projection onto the L2 ball)
//     out     = clamp(x + d, 0, 1) - x                        (valid image range)
//   The norms are summed in float32 lanes flushed to float64 (kernels_impl.h) and rounded to float32 once.
//
// With `input_dtype`, the second output is x + out in that dtype and memory format (the next
// forward's input); without it the second output is undefined.
template <Norm norm>
std::tuple<at::Tensor, at::Tensor> project_step(const char* op, const at::Tensor& delta, const at::Tensor& grad,
                                                const at::Tensor& x, double step_size, double eps, double direction,
                                                std::optional<at::ScalarType> input_dtype, bool channels_last) {
  const StepArgs a = check_step_args(op, delta, grad, x, step_size, eps, direction);
  if constexpr (norm == Norm::L2) {
    TORCH_CHECK(delta.dim() >= 2, op, ": the L2 step needs a batch dimension (N×...), got shape ", delta.sizes());
  }
  at::Tensor out = at::empty(delta.sizes(), a.delta.options());
  const at::Tensor next = input_dtype ? empty_next(a.delta, *input_dtype, channels_last, op) : at::Tensor();
  const isa::NextInput dst = describe_next(next, channels_last);
  const float* dp = a.delta.const_data_ptr<float>();
  const float* gp = a.grad.const_data_ptr<float>();
  const float* xp = a.x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  if constexpr (norm == Norm::Linf) {
    kernels().linf_step(dp, gp, xp, o, out.numel(), a.step, a.bound, dst);
  } else {
    const int64_t n_samples = out.size(0);
    const int64_t per_sample = n_samples == 0 ? 0 : out.numel() / n_samples;
    kernels().l2_step(dp, gp, xp, o, n_samples, per_sample, a.step, a.bound, dst);
  }
  return {out, next};
}

at::Tensor project_step_linf_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                                 double step_size, double eps, double direction) {
  return std::get<0>(project_step<Norm::Linf>("ueguard::project_step_linf", delta, grad, x, step_size, eps,
                                              direction, std::nullopt, false));
}

std::tuple<at::Tensor, at::Tensor> project_step_linf_next_cpu(const at::Tensor& delta, const at::Tensor& grad,
                                                              const at::Tensor& x, double step_size, double eps,
                                                              double direction, at::ScalarType input_dtype,
                                                              bool input_channels_last) {
  return project_step<Norm::Linf>("ueguard::project_step_linf_next", delta, grad, x, step_size, eps, direction,
                                  input_dtype, input_channels_last);
}

at::Tensor project_step_l2_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x,
                               double step_size, double eps, double direction) {
  return std::get<0>(project_step<Norm::L2>("ueguard::project_step_l2", delta, grad, x, step_size, eps, direction,
                                            std::nullopt, false));
}

std::tuple<at::Tensor, at::Tensor> project_step_l2_next_cpu(const at::Tensor& delta, const at::Tensor& grad,
                                                            const at::Tensor& x, double step_size, double eps,
                                                            double direction, at::ScalarType input_dtype,
                                                            bool input_channels_last) {
  return project_step<Norm::L2>("ueguard::project_step_l2_next", delta, grad, x, step_size, eps, direction,
                                input_dtype, input_channels_last);
}

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

  kernels().quantize(image_c.const_data_ptr<uint8_t>(), delta_c.const_data_ptr<float>(),
                     out.mutable_data_ptr<uint8_t>(), n_samples, per_sample, linf.mutable_data_ptr<float>(),
                     sq_err.mutable_data_ptr<double>());
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
  // The instruction set the kernels above run with (see kernels.h): the active one, every one this
  // build and CPU can run (widest first), and a switch that returns the previous one.
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("set_cpu_isa(str name) -> str", &set_cpu_isa);
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
