// bfloat16 products with float32 accumulation in hardware: AVX512-BF16's vdpbf16ps multiplies
// pairs of bfloat16 (two consecutive k) and adds both products to a float32 lane. W is packed
// with the pairs of k side by side, [block][k / 2][gate][L][2]; a row's pair (a_k, a_k+1) is
// broadcast as one 32-bit value. The float32 and float64 kernels are AVX-512's.
#include "kernels.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

namespace lstm_fused {
namespace cpu {

const Kernels* avx512_kernels();

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace avx512_bf16 {

constexpr int64_t kLanes = 16;
constexpr int kTileRows = 6;  // 24 accumulators, 4 weight vectors, a broadcast

inline __attribute__((always_inline)) __m512 dot(__m512 acc, __m512i a, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w);
}

// R rows from row r0 of unit block u, pairs [p0, p1) of the inner index.
template <int R>
inline __attribute__((always_inline)) void tile(const GatesProduct<uint16_t, float>& p,
                                                int64_t u, int64_t r0, int64_t p0, int64_t p1,
                                                bool accumulate) {
  const int64_t pairs = (p.k + 1) / 2, whole = p.k / 2;
  const uint16_t* block = p.packed + u * pairs * 4 * kLanes * 2;
  const uint16_t* a = p.a + r0 * p.lda;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  const int64_t end = p1 < whole ? p1 : whole;
  for (int64_t kp = p0; kp < end; ++kp) {
    const uint16_t* wp = block + kp * 4 * kLanes * 2;
    const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 32);
    const __m512i w2 = _mm512_loadu_si512(wp + 64), w3 = _mm512_loadu_si512(wp + 96);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * p.lda + 2 * kp, sizeof(pair));
      const __m512i ar = _mm512_set1_epi32(pair);
      acc[r][0] = dot(acc[r][0], ar, w0);
      acc[r][1] = dot(acc[r][1], ar, w1);
      acc[r][2] = dot(acc[r][2], ar, w2);
      acc[r][3] = dot(acc[r][3], ar, w3);
    }
  }
  if (whole < pairs && p0 <= whole && whole < p1) {  // odd K: the last k pairs with a zero
    const uint16_t* wp = block + whole * 4 * kLanes * 2;
    const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 32);
    const __m512i w2 = _mm512_loadu_si512(wp + 64), w3 = _mm512_loadu_si512(wp + 96);
    for (int r = 0; r < R; ++r) {
      const __m512i ar = _mm512_set1_epi32(static_cast<int32_t>(a[r * p.lda + 2 * whole]));
      acc[r][0] = dot(acc[r][0], ar, w0);
      acc[r][1] = dot(acc[r][1], ar, w1);
      acc[r][2] = dot(acc[r][2], ar, w2);
      acc[r][3] = dot(acc[r][3], ar, w3);
    }
  }
  const int64_t unit0 = u * kLanes;
  const int64_t units = p.hidden - unit0 < kLanes ? p.hidden - unit0 : kLanes;
  const __mmask16 mask = static_cast<__mmask16>((1u << units) - 1u);
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      float* out = p.out + (r0 + r) * p.ldo + q * p.hidden + unit0;
      const __m512 sum = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), acc[r][q])
                                    : acc[r][q];
      _mm512_mask_storeu_ps(out, mask, sum);
    }
  }
}

#include "kernels_bf16_pairs.h"

const Bfloat16Dot kDot{kLanes, true, &pack_gates, &gates_product};

}  // namespace avx512_bf16
#pragma GCC pop_options

const Kernels* avx512_bf16_kernels() {
  const Kernels* base = avx512_kernels();
  static const Kernels table{Isa::kAvx512Bf16, base->f32, base->f64, &avx512_bf16::kDot,
                             base->gate_tile, base->tile_update};
  return &table;
}

}  // namespace cpu
}  // namespace lstm_fused

#else
namespace lstm_fused {
namespace cpu {
const Kernels* avx512_bf16_kernels() { return nullptr; }  // only built with GCC for x86-64
}  // namespace cpu
}  // namespace lstm_fused
#endif
