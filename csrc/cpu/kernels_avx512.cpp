// The CPU kernels for AVX-512 (F, BW, VL, DQ; x86-64-v4): 64-byte vectors, 6-row register tiles
// (24 of the 32 zmm registers hold accumulators).
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace lstm_fused {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,prefer-vector-width=512")
namespace avx512 {
constexpr int kVectorBytes = 64;
constexpr int kTileRows = 6;
#include "kernels_impl.h"
const Kernels kTable{Isa::kAvx512, kernel_set<float>(), kernel_set<double>(), nullptr,
                     &gate_tile, &tile_update};
}  // namespace avx512
#pragma GCC pop_options

const Kernels* avx512_kernels() { return &avx512::kTable; }
#else
const Kernels* avx512_kernels() { return nullptr; }  // only built with GCC for x86-64
#endif

}  // namespace cpu
}  // namespace lstm_fused
