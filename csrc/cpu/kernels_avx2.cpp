// The CPU kernels for AVX2 + FMA (x86-64-v3): 32-byte vectors, 3-row register tiles (16 ymm).
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace lstm_fused {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
extern const Bfloat16Dot kAvx2Bfloat16Dot;  // kernels_avx2_bf16.cpp

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe")
namespace avx2 {
constexpr int kVectorBytes = 32;
constexpr int kTileRows = 3;
#include "kernels_impl.h"
const Kernels kTable{Isa::kAvx2, kernel_set<float>(), kernel_set<double>(), &kAvx2Bfloat16Dot,
                     &gate_tile, &tile_update};
}  // namespace avx2
#pragma GCC pop_options

const Kernels* avx2_kernels() { return &avx2::kTable; }
#else
const Kernels* avx2_kernels() { return nullptr; }  // only built with GCC for x86-64
#endif

}  // namespace cpu
}  // namespace lstm_fused
