// The CPU kernels for any CPU: 16-byte vectors (SSE2 on x86-64), 3-row register tiles.
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace lstm_fused {
namespace cpu {
namespace baseline {
constexpr int kVectorBytes = 16;
constexpr int kTileRows = 3;
#include "kernels_impl.h"
const Kernels kTable{Isa::kBaseline, kernel_set<float>(), kernel_set<double>(), nullptr,
                     &gate_tile, &tile_update};
}  // namespace baseline

const Kernels* baseline_kernels() { return &baseline::kTable; }

}  // namespace cpu
}  // namespace lstm_fused
