// Run-time choice between the CPU kernels compiled for different instruction sets.
#include <cstdlib>
#include <cstring>

#include "flowsteer/sde_args.h"

namespace flowsteer {
namespace cpu {

#define FLOWSTEER_DECLARE_CPU_KERNELS(isa)                                  \
  namespace isa {                                                          \
  void sde_forward(const SdeForwardArgs& a);                               \
  void sde_backward(const SdeBackwardArgs& a);                             \
  void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset); \
  }
FLOWSTEER_DECLARE_CPU_KERNELS(generic)
#ifdef FLOWSTEER_HAVE_AVX2
FLOWSTEER_DECLARE_CPU_KERNELS(avx2)
#endif

namespace {
// AVX2 where the processor has it, unless FLOWSTEER_CPU_ISA=generic asks for the baseline build.
bool use_avx2() {
#ifdef FLOWSTEER_HAVE_AVX2
  static const bool yes = [] {
    const char* forced = std::getenv("FLOWSTEER_CPU_ISA");
    if (forced && std::strcmp(forced, "generic") == 0) return false;
    return bool(__builtin_cpu_supports("avx2"));
  }();
  return yes;
#else
  return false;
#endif
}
}  // namespace

const char* isa() { return use_avx2() ? "avx2" : "generic"; }

#ifdef FLOWSTEER_HAVE_AVX2
#define FLOWSTEER_DISPATCH(call) return use_avx2() ? avx2::call : generic::call
#else
#define FLOWSTEER_DISPATCH(call) return generic::call
#endif

void sde_forward(const SdeForwardArgs& a) { FLOWSTEER_DISPATCH(sde_forward(a)); }
void sde_backward(const SdeBackwardArgs& a) { FLOWSTEER_DISPATCH(sde_backward(a)); }
void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  FLOWSTEER_DISPATCH(philox_normal(out, n, seed, offset));
}

}  // namespace cpu
}  // namespace flowsteer
