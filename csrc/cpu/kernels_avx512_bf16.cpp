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
// Pairs of k per pass over the rows: one slice of a block, [pairs, 4, 16, 2], stays in L1.
constexpr int64_t kPairSlice = 32768 / (4 * kLanes * 2 * 2);

void pack_gates(const Matrix& w, uint16_t* out) {
  const int64_t H = w.rows / 4, K = w.cols, pairs = (K + 1) / 2;
  const int64_t blocks = (H + kLanes - 1) / kLanes;
  const uint16_t* src = static_cast<const uint16_t*>(w.data);
  for (int64_t u = 0; u < blocks; ++u) {
    uint16_t* block = out + u * pairs * 4 * kLanes * 2;
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t unit = u * kLanes + l;
        const uint16_t* row = unit < H ? src + (q * H + unit) * w.ld : nullptr;
        uint16_t* column = block + (q * kLanes + l) * 2;
        for (int64_t k = 0; k < 2 * pairs; ++k) {
          column[(k / 2) * 4 * kLanes * 2 + k % 2] = row && k < K ? row[k] : uint16_t(0);
        }
      }
    }
  }
}

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

template <int R>
inline __attribute__((always_inline)) void tile_rows(const GatesProduct<uint16_t, float>& p,
                                                     int64_t u, int64_t r0, int64_t rows,
                                                     int64_t p0, int64_t p1, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(p, u, r0, rows, p0, p1, accumulate);
  }
  tile<R>(p, u, r0, p0, p1, accumulate);
}

void gates_product(const GatesProduct<uint16_t, float>& p, int64_t u0, int64_t u1) {
  const int64_t pairs = (p.k + 1) / 2;
  const int64_t slice = p.rows > kTileRows ? kPairSlice : (pairs > 0 ? pairs : 1);
  for (int64_t u = u0; u < u1; ++u) {
    if (pairs == 0) {
      for (int64_t r0 = 0; !p.accumulate && r0 < p.rows; r0 += kTileRows) {
        const int64_t rows = p.rows - r0 < kTileRows ? p.rows - r0 : kTileRows;
        tile_rows<kTileRows>(p, u, r0, rows, 0, 0, false);  // stores zeros
      }
      continue;
    }
    for (int64_t p0 = 0; p0 < pairs; p0 += slice) {
      const int64_t p1 = p0 + slice < pairs ? p0 + slice : pairs;
      for (int64_t r0 = 0; r0 < p.rows; r0 += kTileRows) {
        const int64_t rows = p.rows - r0 < kTileRows ? p.rows - r0 : kTileRows;
        tile_rows<kTileRows>(p, u, r0, rows, p0, p1, p.accumulate || p0 > 0);
      }
    }
  }
}

const Bfloat16Dot kDot{kLanes, &pack_gates, &gates_product};

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
