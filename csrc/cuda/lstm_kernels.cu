// The fused LSTM step kernels (see lstm_kernels.h for the contract of every argument).
//
// One template, tile_product, computes a block's share of a step's recurrent product
// a[B, K] x w for BM batch rows and BU columns (times GATES: the four gates of a hidden unit
// are four columns owned by the same thread), staging K in tiles of KT through shared memory.
// With KSPLIT > 1 the threads of a block also split K, for small batches where rows x units
// alone leave too few threads busy; their partial sums are added in a fixed order. Each kernel
// passes an epilogue that receives, for every (row, unit) of the block, the finished sums.
#include "lstm_kernels.h"

#ifndef LSTM_FUSED_EMULATE_CUDA
#include <mma.h>
#endif

#include <type_traits>
#include <utility>

namespace lstm_fused {
namespace cuda {
namespace {

template <int BM_, int BU_, int TM_, int TU_, int KSPLIT_, int KT_>
struct Tile {
  static constexpr int BM = BM_;          // batch rows per block
  static constexpr int BU = BU_;          // columns (hidden units) per block
  static constexpr int TM = TM_;          // rows per thread
  static constexpr int TU = TU_;          // columns per thread
  static constexpr int KSPLIT = KSPLIT_;  // threads sharing one (rows, columns) micro-tile
  static constexpr int KT = KT_;          // K staged per shared-memory tile
  static constexpr int ROW_GROUPS = BM / TM;
  static constexpr int COLUMN_GROUPS = BU / TU;
  static constexpr int THREADS = ROW_GROUPS * COLUMN_GROUPS * KSPLIT;
  static_assert(BM % TM == 0 && BU % TU == 0 && KT % KSPLIT == 0, "tile does not divide");
  static_assert(KSPLIT == 1 || BM * BU <= THREADS, "the K reduction gives a thread one pair");
  static_assert(THREADS <= 1024, "too many threads");
  // Row padding of the shared tiles, so that the threads of a warp reading down a column hit
  // different banks: with a K split of 2-16 lanes, a stride of 8 (mod 32) words; else odd.
  static constexpr int PAD = (KSPLIT > 1 && KSPLIT < 32) ? 8 : 1;
  static constexpr bool kTensorCores = false;
  static constexpr int units_per_block(int /*gates*/) { return BU; }
};

// Tensor-core tiles (float16/bfloat16, and float32 as TF32 where allowed, on sm_80+): four warps,
// each multiplying RF 16-row fragments by one 16-column fragment of the weights with wmma (float
// accumulators).
// The 64 columns of a block are 16 units x 4 gates forward, 64 units backward.
template <int RF_, int KT_>
struct TensorTile {
  static constexpr int RF = RF_;   // row fragments per warp
  static constexpr int BM = 16 * RF;
  static constexpr int KT = KT_;   // K staged per shared-memory tile, a multiple of 16
  static constexpr int COLUMNS = 64;
  static constexpr int THREADS = 128;
  static_assert(KT % 16 == 0 && (BM * KT) % THREADS == 0, "tile does not divide");
  static constexpr bool kTensorCores = true;
  static constexpr int units_per_block(int gates) { return COLUMNS / gates; }
};

using SmallTile = Tile<4, 4, 4, 1, 64, 64>;     // 256 threads
using MediumTile = Tile<16, 16, 4, 2, 8, 32>;   // 256 threads
using LargeTile = Tile<64, 32, 8, 2, 1, 16>;    // 128 threads, 8 x 2 x 4 gates in registers
using MediumTensorTile = TensorTile<1, 32>;     // 16 rows
using LargeTensorTile = TensorTile<2, 32>;      // 32 rows

// The tiles behind step_small, step_medium and step_large.
struct ScalarTiles {
  using Small = SmallTile;
  using Medium = MediumTile;
  using Large = LargeTile;
};
struct TensorTiles {
  using Small = SmallTile;  // at batch <= 4 a step is bound by reading W_hh, not by arithmetic
  using Medium = MediumTensorTile;
  using Large = LargeTensorTile;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// An element of a tensor-core operand from float: rounded to nearest even for the half types,
// to TF32 for float.
template <typename T>
__device__ __forceinline__ T tensor_operand(float v) {
  if constexpr (std::is_same_v<T, float>) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    return nvcuda::wmma::__float_to_tf32(v);
#else
    return v;
#endif
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}
template <typename T, typename U>
__device__ __forceinline__ std::enable_if_t<!std::is_same_v<U, float>, T> tensor_operand(U v) {
  return v;  // a half type, staged as it is
}

// Accurate library functions, not the fast intrinsics: results are compared with nn.LSTM.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Where element e of a block's K tile starting at k0 lies in global memory, in the order in which
// consecutive threads read; false where it lies outside (it counts as zero).
//   a [rows, k_size]: along k of one row.
//   weights, GATES x UNITS columns: along k of one weight row when kWeightRowsAlongK (forward:
//   row q * gate_stride + column of W_hh), else along the columns of row k (backward: w[k, column]).
template <int KT>
__device__ __forceinline__ bool a_element(int e, int k0, int k_size, int row0, int rows,
                                          int64_t* at) {
  const int row = row0 + e / KT, k = k0 + e % KT;
  *at = static_cast<int64_t>(row) * k_size + k;
  return row < rows && k < k_size;
}

template <int KT, int GATES, int UNITS, bool kWeightRowsAlongK>
__device__ __forceinline__ bool weight_element(int e, int k0, int k_size, int column0,
                                               int columns, int64_t ldw, int64_t gate_stride,
                                               int64_t* at) {
  int column, k;
  if constexpr (kWeightRowsAlongK) {
    const int n = e / KT;
    column = column0 + n % UNITS;
    k = k0 + e % KT;
    *at = ((n / UNITS) * gate_stride + column) * ldw + k;
  } else {
    column = column0 + e % (GATES * UNITS);
    k = k0 + e / (GATES * UNITS);
    *at = static_cast<int64_t>(k) * ldw + column;
  }
  return column < columns && k < k_size;
}

// For rows [row0, row0 + BM) and columns [column0, column0 + BU) of the block, times GATES:
//   sum[r][c][q] = sum_{k < k_size} a[row, k] * w(q, column, k)
// where w(q, column, k) is w[(q * gate_stride + column) * ldw + k] when kWeightRowsAlongK (the
// rows of W_hh, forward), else w[k * ldw + column] (GATES == 1: columns of W_hh or W_hr,
// backward). Rows >= rows and columns >= columns count as zero and reach no epilogue. Then calls
// epilogue(row, column, sums) once for each (row, column) in range, sums holding GATES values.
// Every thread of the block must call it (it synchronises the block).
template <class Cfg, int GATES, bool kWeightRowsAlongK, typename Acc, typename TA, typename TW,
          typename Epilogue>
__device__ __forceinline__ void tile_product(const TA* __restrict__ a, int k_size, int rows,
                                             int row0, const TW* __restrict__ w, int64_t ldw,
                                             int64_t gate_stride, int columns, int column0,
                                             Epilogue&& epilogue) {
  __shared__ Acc a_tile[Cfg::BM][Cfg::KT + Cfg::PAD];
  __shared__ Acc w_tile[GATES * Cfg::BU][Cfg::KT + Cfg::PAD];
  const int tid = threadIdx.x;
  const int ks = tid % Cfg::KSPLIT;
  const int column_group = (tid / Cfg::KSPLIT) % Cfg::COLUMN_GROUPS;
  const int row_group = tid / (Cfg::KSPLIT * Cfg::COLUMN_GROUPS);

  Acc acc[Cfg::TM][Cfg::TU][GATES];
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
      for (int q = 0; q < GATES; ++q) acc[i][j][q] = Acc(0);

  // Each K tile is fetched into registers while the previous one is multiplied, then stored to
  // shared memory: the global loads of tile n + 1 overlap the arithmetic of tile n.
  constexpr int kALoads = (Cfg::BM * Cfg::KT + Cfg::THREADS - 1) / Cfg::THREADS;
  constexpr int kWLoads = (GATES * Cfg::BU * Cfg::KT + Cfg::THREADS - 1) / Cfg::THREADS;
  Acc a_next[kALoads];
  Acc w_next[kWLoads];
  auto fetch = [&](int k0) {
    int64_t at;
#pragma unroll
    for (int r = 0; r < kALoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      a_next[r] = e < Cfg::BM * Cfg::KT && a_element<Cfg::KT>(e, k0, k_size, row0, rows, &at)
                      ? static_cast<Acc>(to_acc(a[at]))
                      : Acc(0);
    }
#pragma unroll
    for (int r = 0; r < kWLoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      w_next[r] = e < GATES * Cfg::BU * Cfg::KT &&
                          weight_element<Cfg::KT, GATES, Cfg::BU, kWeightRowsAlongK>(
                              e, k0, k_size, column0, columns, ldw, gate_stride, &at)
                      ? static_cast<Acc>(to_acc(w[at]))
                      : Acc(0);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int r = 0; r < kALoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      if (e < Cfg::BM * Cfg::KT) a_tile[e / Cfg::KT][e % Cfg::KT] = a_next[r];
    }
#pragma unroll
    for (int r = 0; r < kWLoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      if (e >= GATES * Cfg::BU * Cfg::KT) continue;
      if (kWeightRowsAlongK) {
        w_tile[e / Cfg::KT][e % Cfg::KT] = w_next[r];
      } else {
        w_tile[e % Cfg::BU][e / Cfg::BU] = w_next[r];
      }
    }
  };

  if (k_size > 0) fetch(0);
  for (int k0 = 0; k0 < k_size; k0 += Cfg::KT) {
    stash();
    __syncthreads();
    if (k0 + Cfg::KT < k_size) fetch(k0 + Cfg::KT);
#pragma unroll 4
    for (int kk = ks; kk < Cfg::KT; kk += Cfg::KSPLIT) {
      Acc a_reg[Cfg::TM];
      Acc w_reg[Cfg::TU][GATES];
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i) a_reg[i] = a_tile[row_group * Cfg::TM + i][kk];
#pragma unroll
      for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
        for (int q = 0; q < GATES; ++q)
          w_reg[j][q] = w_tile[q * Cfg::BU + column_group + Cfg::COLUMN_GROUPS * j][kk];
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
          for (int q = 0; q < GATES; ++q) acc[i][j][q] += a_reg[i] * w_reg[j][q];
    }
    __syncthreads();
  }

  if constexpr (Cfg::KSPLIT == 1) {
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
      for (int j = 0; j < Cfg::TU; ++j) {
        const int row = row0 + row_group * Cfg::TM + i;
        const int column = column0 + column_group + Cfg::COLUMN_GROUPS * j;
        if (row < rows && column < columns) epilogue(row, column, acc[i][j]);
      }
    }
  } else {
    // Thread `tid` adds the KSPLIT partial sums of pair tid (one gate at a time, to bound the
    // shared memory), in the order of ks.
    __shared__ Acc partial[Cfg::BM * Cfg::BU][Cfg::KSPLIT + 1];
    Acc sums[GATES];
#pragma unroll
    for (int q = 0; q < GATES; ++q) {
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TU; ++j)
          partial[(row_group * Cfg::TM + i) * Cfg::BU + column_group + Cfg::COLUMN_GROUPS * j]
                 [ks] = acc[i][j][q];
      __syncthreads();
      Acc sum = Acc(0);
      if (tid < Cfg::BM * Cfg::BU) {
        for (int s = 0; s < Cfg::KSPLIT; ++s) sum += partial[tid][s];
      }
      sums[q] = sum;
      __syncthreads();
    }
    if (tid < Cfg::BM * Cfg::BU) {
      const int row = row0 + tid / Cfg::BU, column = column0 + tid % Cfg::BU;
      if (row < rows && column < columns) epilogue(row, column, sums);
    }
  }
}

// tile_product's contract, computed with tensor cores and float accumulation. T is the operands'
// type in shared memory: __half or __nv_bfloat16 (backward rounds dL/dz to it when staging, as a
// cuDNN half RNN does; wmma 16 x 16 x 16), or float rounded to TF32 (wmma 16 x 16 x 8).
// Columns per block: 64 / GATES units x GATES.
template <class Cfg, int GATES, bool kWeightRowsAlongK, typename Acc, typename TA, typename T,
          typename Epilogue>
__device__ __forceinline__ void tensor_tile_product(const TA* __restrict__ a, int k_size, int rows,
                                                    int row0, const T* __restrict__ w,
                                                    int64_t ldw, int64_t gate_stride,
                                                    int columns, int column0,
                                                    Epilogue&& epilogue) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int FK = kTf32 ? 8 : 16;  // K of one wmma
  using Operand = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  constexpr int UNITS = Cfg::COLUMNS / GATES;
  // Leading dimensions padded by 16 bytes (8 half elements, 4 floats): rows fall in different
  // banks, and every fragment starts on the 32-byte boundary wmma requires.
  constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  constexpr int LDA = Cfg::KT + PAD;
  constexpr int LDW = kWeightRowsAlongK ? Cfg::KT + PAD : Cfg::COLUMNS + PAD;
  constexpr int W_ROWS = kWeightRowsAlongK ? Cfg::COLUMNS : Cfg::KT;
  constexpr int LDO = Cfg::COLUMNS + 8;
  __shared__ __align__(32) T a_tile[Cfg::BM * LDA];
  __shared__ __align__(32) T w_tile[W_ROWS * LDW];
  __shared__ __align__(32) float out_tile[Cfg::BM * LDO];
  const int tid = threadIdx.x, warp = tid / 32;

  // Register prefetch of the next K tile, as in tile_product.
  constexpr int kALoads = Cfg::BM * Cfg::KT / Cfg::THREADS;
  constexpr int kWLoads = Cfg::COLUMNS * Cfg::KT / Cfg::THREADS;
  T a_next[kALoads];
  T w_next[kWLoads];
  auto fetch = [&](int k0) {
    int64_t at;
#pragma unroll
    for (int r = 0; r < kALoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      a_next[r] = a_element<Cfg::KT>(e, k0, k_size, row0, rows, &at)
                      ? tensor_operand<T>(a[at])
                      : tensor_operand<T>(0.0f);
    }
#pragma unroll
    for (int r = 0; r < kWLoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      w_next[r] = weight_element<Cfg::KT, GATES, UNITS, kWeightRowsAlongK>(
                      e, k0, k_size, column0, columns, ldw, gate_stride, &at)
                      ? tensor_operand<T>(w[at])
                      : tensor_operand<T>(0.0f);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int r = 0; r < kALoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      a_tile[(e / Cfg::KT) * LDA + e % Cfg::KT] = a_next[r];
    }
#pragma unroll
    for (int r = 0; r < kWLoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      if (kWeightRowsAlongK) {  // w_tile[n][k]: the weights as a column-major K x N matrix
        w_tile[(e / Cfg::KT) * LDW + e % Cfg::KT] = w_next[r];
      } else {  // w_tile[k][n]: row-major K x N
        w_tile[(e / Cfg::COLUMNS) * LDW + e % Cfg::COLUMNS] = w_next[r];
      }
    }
  };

  using WeightLayout = std::conditional_t<kWeightRowsAlongK, wmma::col_major, wmma::row_major>;
  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[Cfg::RF];
#pragma unroll
  for (int r = 0; r < Cfg::RF; ++r) wmma::fill_fragment(acc[r], 0.0f);
  if (k_size > 0) fetch(0);
  for (int k0 = 0; k0 < k_size; k0 += Cfg::KT) {
    stash();
    __syncthreads();
    if (k0 + Cfg::KT < k_size) fetch(k0 + Cfg::KT);
#pragma unroll
    for (int kk = 0; kk < Cfg::KT; kk += FK) {
      wmma::fragment<wmma::matrix_b, 16, 16, FK, Operand, WeightLayout> b;
      wmma::load_matrix_sync(b, kWeightRowsAlongK ? w_tile + warp * 16 * LDW + kk
                                                  : w_tile + kk * LDW + warp * 16,
                             LDW);
#pragma unroll
      for (int r = 0; r < Cfg::RF; ++r) {
        wmma::fragment<wmma::matrix_a, 16, 16, FK, Operand, wmma::row_major> a_fragment;
        wmma::load_matrix_sync(a_fragment, a_tile + r * 16 * LDA + kk, LDA);
        wmma::mma_sync(acc[r], a_fragment, b, acc[r]);
      }
    }
    __syncthreads();
  }
  // Through shared memory to the threads of the epilogue: each gets all GATES of its pairs.
#pragma unroll
  for (int r = 0; r < Cfg::RF; ++r) {
    wmma::store_matrix_sync(out_tile + r * 16 * LDO + warp * 16, acc[r], LDO,
                            wmma::mem_row_major);
  }
  __syncthreads();
  for (int p = tid; p < Cfg::BM * UNITS; p += Cfg::THREADS) {
    const int m = p / UNITS, u = p % UNITS;
    const int row = row0 + m, column = column0 + u;
    if (row >= rows || column >= columns) continue;
    Acc sums[GATES];
#pragma unroll
    for (int q = 0; q < GATES; ++q) sums[q] = static_cast<Acc>(out_tile[m * LDO + q * UNITS + u]);
    epilogue(row, column, sums);
  }
  __syncthreads();  // out_tile is written again by the next row tile
#else
  __trap();  // unreachable: the launchers use these tiles only where sm_80 code was built
#endif
}

// The block's product with its tile's method: tensor cores or scalar FMAs.
template <class Cfg, int GATES, bool kWeightRowsAlongK, typename Acc, typename TA, typename TW,
          typename Epilogue>
__device__ __forceinline__ void block_product(const TA* a, int k_size, int rows, int row0,
                                              const TW* w, int64_t ldw, int64_t gate_stride,
                                              int columns, int column0, Epilogue&& epilogue) {
  if constexpr (Cfg::kTensorCores) {
    tensor_tile_product<Cfg, GATES, kWeightRowsAlongK, Acc>(a, k_size, rows, row0, w, ldw,
                                                            gate_stride, columns, column0,
                                                            epilogue);
  } else {
    tile_product<Cfg, GATES, kWeightRowsAlongK, Acc>(a, k_size, rows, row0, w, ldw, gate_stride,
                                                     columns, column0, epilogue);
  }
}

__device__ __forceinline__ bool is_padding(const int64_t* lengths, int64_t t, int row) {
  return lengths != nullptr && t >= lengths[row];
}

template <class Cfg, typename T>
__global__ void __launch_bounds__(Cfg::THREADS) forward_step_kernel(const ForwardStep<T> s) {
  using Acc = acc_t<T>;
  const int64_t H = s.hidden_size, P = s.output_size;
  const int64_t out_stride = s.has_projection ? H : P;
  auto update = [&](int b, int u, const Acc (&z)[4]) {
    const int64_t row = static_cast<int64_t>(b);
    Acc* gates = s.gates ? s.gates + row * 4 * H : nullptr;
    if (is_padding(s.lengths, s.t, b)) {
      s.c_next[row * H + u] = s.c_prev[row * H + u];
      if (s.has_projection) {
        store(s.hidden_out + row * out_stride + u, Acc(0));
      } else {
        s.hidden_out[row * out_stride + u] = s.h_prev[row * P + u];
      }
      if (gates) {
        for (int q = 0; q < 4; ++q) gates[q * H + u] = Acc(0);
      }
      return;
    }
    const T* x_part = s.input_gates + row * 4 * H;
    Acc pre[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      pre[q] = z[q] + static_cast<Acc>(to_acc(x_part[q * H + u]));
      if (s.bias) pre[q] += s.bias[q * H + u];
    }
    const Acc i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanh_of(pre[2]),
              o = sigmoid(pre[3]);
    const Acc c = f * s.c_prev[row * H + u] + i * g;
    s.c_next[row * H + u] = c;
    store(s.hidden_out + row * out_stride + u, o * tanh_of(c));
    if (gates) {
      gates[u] = i;
      gates[H + u] = f;
      gates[2 * H + u] = g;
      gates[3 * H + u] = o;
    }
  };
  const int column0 = blockIdx.x * Cfg::units_per_block(4);
  for (int row0 = blockIdx.y * Cfg::BM; row0 < s.batch; row0 += gridDim.y * Cfg::BM) {
    block_product<Cfg, 4, true, Acc>(s.h_prev, s.output_size, s.batch, row0, s.w_hh, P, H, s.hidden_size,
                                    column0, update);
  }
}

// G_t for (row b, column n) of the backward recurrence (see BackwardMode), given the product.
template <typename T>
__device__ __forceinline__ acc_t<T> received_hidden_grad(const BackwardStep<T>& s, int b, int n,
                                                         acc_t<T> product) {
  using Acc = acc_t<T>;
  const int64_t at = static_cast<int64_t>(b) * s.output_size + n;
  if (s.first) return s.grad_h[at];
  Acc g = product;
  if (is_padding(s.lengths, s.t_next, b)) {
    g += static_cast<Acc>(to_acc(s.grad_y_next[at])) + s.grad_h[at];
  }
  return g;
}

template <class Cfg, typename T, BackwardMode kMode>
__global__ void __launch_bounds__(Cfg::THREADS) backward_step_kernel(const BackwardStep<T> s) {
  using Acc = acc_t<T>;
  const int64_t H = s.hidden_size, P = s.output_size;
  auto update = [&](int b, int n, const Acc (&product)[1]) {
    const int64_t row = static_cast<int64_t>(b);
    Acc grad_hidden;
    if constexpr (kMode == BackwardMode::kGates) {
      grad_hidden = product[0];
    } else {
      const Acc received = received_hidden_grad(s, b, n, product[0]);
      s.grad_h[row * P + n] = received;
      if (kMode == BackwardMode::kHiddenGrad) {
        if (s.grad_total) {
          s.grad_total[row * P + n] = static_cast<Acc>(to_acc(s.grad_y[row * P + n])) + received;
        }
        return;
      }
      grad_hidden = static_cast<Acc>(to_acc(s.grad_y[row * P + n])) + received;
    }
    // The gate gradients of unit u = n.
    const int u = n;
    Acc* grad_gates = s.grad_gates + row * 4 * H;
    if (is_padding(s.lengths, s.t, b)) {  // the state was carried: so is dL/dc
      for (int q = 0; q < 4; ++q) grad_gates[q * H + u] = Acc(0);
      if (s.hidden_out) store(s.hidden_out + row * H + u, Acc(0));
      return;
    }
    const Acc* gates = s.gates + row * 4 * H;
    const Acc i = gates[u], f = gates[H + u], g = gates[2 * H + u], o = gates[3 * H + u];
    const Acc tc = tanh_of(s.cell[row * H + u]);
    const Acc dc = s.grad_c[row * H + u] + grad_hidden * o * (Acc(1) - tc * tc);
    grad_gates[u] = dc * g * i * (Acc(1) - i);
    grad_gates[H + u] = dc * s.c_prev[row * H + u] * f * (Acc(1) - f);
    grad_gates[2 * H + u] = dc * i * (Acc(1) - g * g);
    grad_gates[3 * H + u] = grad_hidden * tc * o * (Acc(1) - o);
    s.grad_c[row * H + u] = dc * f;
    if (s.hidden_out) store(s.hidden_out + row * H + u, o * tc);
  };
  const int columns = kMode == BackwardMode::kHiddenGrad ? s.output_size : s.hidden_size;
  const int k_size = s.a ? s.k : 0;
  const int column0 = blockIdx.x * Cfg::units_per_block(1);
  for (int row0 = blockIdx.y * Cfg::BM; row0 < s.batch; row0 += gridDim.y * Cfg::BM) {
    block_product<Cfg, 1, false, Acc>(s.a, k_size, s.batch, row0, s.w, columns, 0, columns,
                                     column0, update);
  }
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
#ifdef LSTM_FUSED_EMULATE_CUDA
  return ::cuda_emulation::launch(kernel, grid, block, 0, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

template <class Cfg>
dim3 grid_for(int columns, int gates, int batch) {
  constexpr int kMaxGridY = 65535;  // rows beyond are looped over inside the kernel
  const int row_tiles = ceil_div(batch, Cfg::BM);
  return dim3(ceil_div(columns, Cfg::units_per_block(gates)),
              row_tiles < kMaxGridY ? row_tiles : kMaxGridY);
}

// The one place that picks a step kernel's tile: the small tile for batch <= 4, the large one
// when it still gives every multiprocessor a block, else the medium one. Calls
// launch_tile(Cfg{}) with the tile's configuration.
template <class Tiles, typename Launch>
cudaError_t with_tile(StepTile tile, int batch, int columns, int gates, int multiprocessors,
                      Launch&& launch_tile) {
  using Large = typename Tiles::Large;
  if (tile == StepTile::kAuto) {
    const int64_t large_blocks = static_cast<int64_t>(ceil_div(batch, Large::BM)) *
                                 ceil_div(columns, Large::units_per_block(gates));
    tile = batch <= Tiles::Small::BM       ? StepTile::kSmall
           : large_blocks >= multiprocessors ? StepTile::kLarge
                                             : StepTile::kMedium;
  }
  switch (tile) {
    case StepTile::kSmall:
      return launch_tile(typename Tiles::Small{});
    case StepTile::kMedium:
      return launch_tile(typename Tiles::Medium{});
    case StepTile::kLarge:
      return launch_tile(Large{});
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
constexpr bool kHalfType = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Half types use the tensor-core tiles where the device has them (sm_80+), float32 too where
// TF32 is allowed.
template <typename T, typename Launch>
cudaError_t with_tile_for(StepTile tile, int batch, int columns, int gates,
                          const DeviceTraits& device, Launch&& launch_tile) {
  if constexpr (kHalfType<T> || std::is_same_v<T, float>) {
    if (device.tensor_cores && (kHalfType<T> || device.allow_tf32)) {
      return with_tile<TensorTiles>(tile, batch, columns, gates, device.multiprocessors,
                                    launch_tile);
    }
  }
  return with_tile<ScalarTiles>(tile, batch, columns, gates, device.multiprocessors, launch_tile);
}

}  // namespace

bool tensor_core_kernels_built() {
#ifdef LSTM_FUSED_EMULATE_CUDA
  return true;
#else
  // The PTX architecture of the code this device runs: below 8.0 (a build for older GPUs running
  // on a newer one), the tensor-core tiles were compiled empty.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, forward_step_kernel<MediumTensorTile, __half>) !=
      cudaSuccess) {
    cudaGetLastError();  // clears the error: no usable image means no tensor-core tiles
    return false;
  }
  return attributes.ptxVersion >= 80;
#endif
}

template <typename T>
cudaError_t launch_forward_step(const ForwardStep<T>& step, StepTile tile,
                                const DeviceTraits& device, cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  return with_tile_for<T>(tile, step.batch, step.hidden_size, 4, device, [&](auto config) {
    using Cfg = decltype(config);
    return launch(forward_step_kernel<Cfg, T>, grid_for<Cfg>(step.hidden_size, 4, step.batch),
                  dim3(Cfg::THREADS), stream, step);
  });
}

template <typename T>
cudaError_t launch_backward_step(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                                 const DeviceTraits& device, cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  const int columns = mode == BackwardMode::kHiddenGrad ? step.output_size : step.hidden_size;
  return with_tile_for<T>(tile, step.batch, columns, 1, device, [&](auto config) {
    using Cfg = decltype(config);
    const dim3 grid = grid_for<Cfg>(columns, 1, step.batch), block(Cfg::THREADS);
    switch (mode) {
      case BackwardMode::kFused:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kFused>, grid, block, stream,
                      step);
      case BackwardMode::kHiddenGrad:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kHiddenGrad>, grid, block,
                      stream, step);
      case BackwardMode::kGates:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kGates>, grid, block, stream,
                      step);
    }
    return cudaErrorInvalidValue;
  });
}

#define LSTM_FUSED_INSTANTIATE(T)                                                            \
  template cudaError_t launch_forward_step<T>(const ForwardStep<T>&, StepTile,              \
                                              const DeviceTraits&, cudaStream_t);            \
  template cudaError_t launch_backward_step<T>(const BackwardStep<T>&, BackwardMode,         \
                                               StepTile, const DeviceTraits&, cudaStream_t);

LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(double)
LSTM_FUSED_INSTANTIATE(__half)
LSTM_FUSED_INSTANTIATE(__nv_bfloat16)

#undef LSTM_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace lstm_fused
