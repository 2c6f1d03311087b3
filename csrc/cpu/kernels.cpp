// Which of the per-instruction-set kernel builds this CPU can run.
#include "kernels.h"

namespace lstm_fused {
namespace cpu {

const Kernels* baseline_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* avx512_bf16_kernels();

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc also checks that the OS saves the vector registers (XCR0).
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    case Isa::kAvx512:
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
    case Isa::kAvx512Bf16:
      return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

}  // namespace

const Kernels* kernels_for(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return baseline_kernels();
    case Isa::kAvx2: return avx2_kernels();
    case Isa::kAvx512: return avx512_kernels();
    case Isa::kAvx512Bf16: return avx512_bf16_kernels();
  }
  return nullptr;
}

bool isa_supported(Isa isa) {
  static const bool supported[kIsaCount] = {
      kernels_for(Isa::kBaseline) && cpu_has(Isa::kBaseline),
      kernels_for(Isa::kAvx2) && cpu_has(Isa::kAvx2),
      kernels_for(Isa::kAvx512) && cpu_has(Isa::kAvx512),
      kernels_for(Isa::kAvx512Bf16) && cpu_has(Isa::kAvx512Bf16)};
  return supported[static_cast<int>(isa)];
}

Isa best_isa() {
  for (int i = kIsaCount - 1; i > 0; --i) {
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  }
  return Isa::kBaseline;
}

}  // namespace cpu
}  // namespace lstm_fused
