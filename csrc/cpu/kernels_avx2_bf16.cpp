// bfloat16 products with float32 sums on AVX2 + FMA, in the layout of AVX512-BF16's dot
// products: W packed with the pairs of k side by side, [block][k / 2][gate][L][2] (L = 8), so
// that one 32-byte load holds a gate's 8 lanes for two k. A bfloat16 is the high half of a
// float32, so the pair in a 32-bit lane splits into two exact float32 vectors with one shift
// (k even, the low half) and one mask (k odd), and two FMAs add both products, the odd k first,
// as vdpbf16ps orders them. The weights stay bfloat16 in memory: half the bytes of float32
// copies, which is what bounds small batches and single steps.
//
// Register tile: 2 rows x 4 gates of accumulators (8 ymm), each row's split pair (2 x 2), and
// the weights' split pair (2) fit AVX2's 16 registers, so each split is shared by every gate
// or row that uses it.
#include "kernels.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

namespace lstm_fused {
namespace cpu {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_bf16 {

constexpr int64_t kLanes = 8;
constexpr int kTileRows = 2;

// The float32 values of the low (k even) and high (k odd) bfloat16 of each 32-bit lane.
inline __attribute__((always_inline)) __m256 even(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
}
inline __attribute__((always_inline)) __m256 odd(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int32_t(0xffff0000u))));
}

// R rows from row r0 of unit block u, pairs [p0, p1) of the inner index.
template <int R>
inline __attribute__((always_inline)) void tile(const GatesProduct<uint16_t, float>& p,
                                                int64_t u, int64_t r0, int64_t p0, int64_t p1,
                                                bool accumulate) {
  const int64_t pairs = (p.k + 1) / 2, whole = p.k / 2;
  const uint16_t* block = p.packed + u * pairs * 4 * kLanes * 2;
  const uint16_t* a = p.a + r0 * p.lda;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_ps();
  }
  auto multiply = [&](const uint16_t* wp, const __m256 (&a_even)[R], const __m256 (&a_odd)[R]) {
    for (int q = 0; q < 4; ++q) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 2 * kLanes));
      const __m256 w_even = even(w), w_odd = odd(w);
      for (int r = 0; r < R; ++r) {
        acc[r][q] = _mm256_fmadd_ps(a_odd[r], w_odd, acc[r][q]);
        acc[r][q] = _mm256_fmadd_ps(a_even[r], w_even, acc[r][q]);
      }
    }
  };
  const int64_t end = p1 < whole ? p1 : whole;
  for (int64_t kp = p0; kp < end; ++kp) {
    __m256 a_even[R], a_odd[R];
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * p.lda + 2 * kp, sizeof(pair));
      const __m256i ar = _mm256_set1_epi32(pair);
      a_even[r] = even(ar);
      a_odd[r] = odd(ar);
    }
    multiply(block + kp * 4 * kLanes * 2, a_even, a_odd);
  }
  if (whole < pairs && p0 <= whole && whole < p1) {  // odd K: the last k pairs with a zero
    __m256 a_even[R], a_odd[R];
    for (int r = 0; r < R; ++r) {
      a_even[r] = even(_mm256_set1_epi32(static_cast<int32_t>(a[r * p.lda + 2 * whole])));
      a_odd[r] = _mm256_setzero_ps();
    }
    multiply(block + whole * 4 * kLanes * 2, a_even, a_odd);
  }
  const int64_t unit0 = u * kLanes;
  const int64_t units = p.hidden - unit0 < kLanes ? p.hidden - unit0 : kLanes;
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      float* out = p.out + (r0 + r) * p.ldo + q * p.hidden + unit0;
      if (units == kLanes) {
        const __m256 sum = accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[r][q]) : acc[r][q];
        _mm256_storeu_ps(out, sum);
      } else {
        float lanes[kLanes];
        _mm256_storeu_ps(lanes, acc[r][q]);
        for (int64_t l = 0; l < units; ++l) out[l] = accumulate ? out[l] + lanes[l] : lanes[l];
      }
    }
  }
}

#include "kernels_bf16_pairs.h"

}  // namespace avx2_bf16
#pragma GCC pop_options

extern const Bfloat16Dot kAvx2Bfloat16Dot{avx2_bf16::kLanes, false, &avx2_bf16::pack_gates,
                                          &avx2_bf16::gates_product};

}  // namespace cpu
}  // namespace lstm_fused
#endif
