// The kernels of kernels_impl.h compiled for AVX-512 (F, BW, VL, DQ; see kernels.h); all headers are
// included before the target pragma so that no shared inline function is compiled for AVX-512.
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define UEGUARD_ISA avx512_isa
#include "kernels_impl.h"
#pragma GCC pop_options

namespace ueguard::isa {
const Kernels* kernels_avx512() { return &avx512_isa::table("avx512"); }
}  // namespace ueguard::isa
#else
namespace ueguard::isa {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace ueguard::isa
#endif
