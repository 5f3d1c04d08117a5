// The kernels of kernels_impl.h for the baseline ISA of the build (see kernels.h).
#include "kernels.h"

#define UEGUARD_ISA default_isa
#include "kernels_impl.h"

namespace ueguard::isa {
const Kernels* kernels_default() { return &default_isa::table("default"); }
}  // namespace ueguard::isa
