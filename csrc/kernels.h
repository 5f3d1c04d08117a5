// The element-wise and per-sample CPU kernels of ueguard's perturbation ops, compiled once per
// instruction set and chosen at run time (the way ATen's own CPU kernels are dispatched).
//
// The extension is built for the architecture's baseline ISA (no -march: the wheel must run on any
// x86-64 CPU), which leaves SSE2's 4-wide vectors; PyTorch's eager kernels, our references, are
// dispatched to AVX2 / AVX-512 at run time. So the loop bodies in kernels_impl.h are compiled three
// times on x86-64 with GCC: isa_default.cpp (baseline), isa_avx2.cpp and isa_avx512.cpp (each under
// `#pragma GCC target`, inside its own namespace so no inline function is shared between ISAs), and
// ueguard_ops.cpp picks the widest one the CPU supports. Elsewhere only the baseline is built.
//
// Every ISA performs the same float32 operations in the same order (the build passes
// -ffp-contract=off, so no FMA contraction), so element-wise outputs are bitwise identical across
// ISAs; per-sample float64 sums are re-associated by vector width and agree to rounding.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The round-to-nearest-even trick in kernels_impl.h needs every float expression rounded to float.
static_assert(FLT_EVAL_METHOD == 0, "ueguard kernels require FLT_EVAL_METHOD == 0 (no excess precision)");

namespace ueguard {
namespace isa {

enum class NextType { None, Float, BFloat16, Half };

// The optional second output of a projection step: x + delta' (the next forward's input) in
// `type`, in the tensors' own (contiguous NCHW) order or channels-last (NHWC) for 4-D tensors.
struct NextInput {
  void* data = nullptr;
  NextType type = NextType::None;
  bool channels_last = false;
  int64_t channels = 1;
  int64_t plane = 1;  // H * W
};

// delta, grad, x, out: contiguous float32 with `numel` elements; samples of `per_sample` elements.
using LinfStep = void (*)(const float* delta, const float* grad, const float* x, float* out, int64_t numel,
                          float step, float bound, const NextInput& next);
using L2Step = void (*)(const float* delta, const float* grad, const float* x, float* out, int64_t n_samples,
                        int64_t per_sample, float step, float bound, const NextInput& next);
// out = clamp(round(image + 255 delta), 0, 255); linf[n], sq_err[n]: see ueguard_ops.cpp.
using Quantize = void (*)(const uint8_t* image, const float* delta, uint8_t* out, int64_t n_samples,
                          int64_t per_sample, float* linf, double* sq_err);

struct Kernels {
  const char* name;
  LinfStep linf_step;
  L2Step l2_step;
  Quantize quantize;
};

// Each returns null when that ISA was not compiled into this build.
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

}  // namespace isa
}  // namespace ueguard
