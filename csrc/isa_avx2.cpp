// The kernels of kernels_impl.h compiled for AVX2 (see kernels.h); all headers are included before
// the target pragma so that no shared inline function is compiled for AVX2.
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define UEGUARD_ISA avx2_isa
#include "kernels_impl.h"
#pragma GCC pop_options

namespace ueguard::isa {
const Kernels* kernels_avx2() { return &avx2_isa::table("avx2"); }
}  // namespace ueguard::isa
#else
namespace ueguard::isa {
const Kernels* kernels_avx2() { return nullptr; }
}  // namespace ueguard::isa
#endif
