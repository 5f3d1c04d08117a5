// Helpers shared by ueguard's CPU kernels (csrc/*.cpp). Header-only, internal linkage.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace ueguard {
namespace detail {

// clamp(v, lo, hi) with torch.clamp's semantics: NaN propagates (both comparisons are false).
inline float clamp(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

inline void check_cpu_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
}

}  // namespace detail
}  // namespace ueguard
