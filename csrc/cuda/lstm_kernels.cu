// The fused LSTM step kernels (see lstm_kernels.h for the contract of every argument).
//
// One template, tile_product, computes a block's share of a step's recurrent product
// a[B, K] x w for BM batch rows and BU columns (times GATES: the four gates of a hidden unit
// are four columns owned by the same thread), staging K in tiles of KT through shared memory.
// With KSPLIT > 1 the threads of a block also split K, for small batches where rows x units
// alone leave too few threads busy; their partial sums are added in a fixed order. Each kernel
// passes an epilogue that receives, for every (row, unit) of the block, the finished sums.
#include "lstm_kernels.h"

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
};

using SmallTile = Tile<4, 4, 4, 1, 64, 64>;     // 256 threads
using MediumTile = Tile<16, 16, 4, 2, 8, 32>;   // 256 threads
using LargeTile = Tile<64, 32, 8, 2, 1, 16>;    // 128 threads, 8 x 2 x 4 gates in registers

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Accurate library functions, not the fast intrinsics: results are compared with nn.LSTM.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

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
  // +1: rows of the tiles fall in different banks when threads read down a column.
  __shared__ Acc a_tile[Cfg::BM][Cfg::KT + 1];
  __shared__ Acc w_tile[GATES * Cfg::BU][Cfg::KT + 1];
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
#pragma unroll
    for (int r = 0; r < kALoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      const int row = row0 + e / Cfg::KT, k = k0 + e % Cfg::KT;
      a_next[r] = (e < Cfg::BM * Cfg::KT && row < rows && k < k_size)
                      ? static_cast<Acc>(to_acc(a[static_cast<int64_t>(row) * k_size + k]))
                      : Acc(0);
    }
#pragma unroll
    for (int r = 0; r < kWLoads; ++r) {
      const int e = tid + r * Cfg::THREADS;
      bool inside = e < GATES * Cfg::BU * Cfg::KT;
      int64_t at = 0;
      if (kWeightRowsAlongK) {  // consecutive threads read consecutive k of one weight row
        const int n = e / Cfg::KT, k = k0 + e % Cfg::KT;
        const int q = n / Cfg::BU, column = column0 + n % Cfg::BU;
        inside = inside && column < columns && k < k_size;
        at = (q * gate_stride + column) * ldw + k;
      } else {  // consecutive threads read consecutive columns of one weight row
        const int column = column0 + e % Cfg::BU, k = k0 + e / Cfg::BU;
        inside = inside && column < columns && k < k_size;
        at = static_cast<int64_t>(k) * ldw + column;
      }
      w_next[r] = inside ? static_cast<Acc>(to_acc(w[at])) : Acc(0);
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
  const int column0 = blockIdx.x * Cfg::BU;
  for (int row0 = blockIdx.y * Cfg::BM; row0 < s.batch; row0 += gridDim.y * Cfg::BM) {
    tile_product<Cfg, 4, true, Acc>(s.h_prev, s.output_size, s.batch, row0, s.w_hh, P, H, s.hidden_size,
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
  const int column0 = blockIdx.x * Cfg::BU;
  for (int row0 = blockIdx.y * Cfg::BM; row0 < s.batch; row0 += gridDim.y * Cfg::BM) {
    tile_product<Cfg, 1, false, Acc>(s.a, k_size, s.batch, row0, s.w, columns, 0, columns,
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
dim3 grid_for(int columns, int batch) {
  constexpr int kMaxGridY = 65535;  // rows beyond are looped over inside the kernel
  const int row_tiles = ceil_div(batch, Cfg::BM);
  return dim3(ceil_div(columns, Cfg::BU), row_tiles < kMaxGridY ? row_tiles : kMaxGridY);
}

// The one place that picks a step kernel's tile: the small tile for batch <= 4, the large one
// when it still gives every multiprocessor a block, else the medium one.
StepTile choose_tile(StepTile requested, int batch, int columns, int multiprocessors) {
  if (requested != StepTile::kAuto) return requested;
  if (batch <= SmallTile::BM) return StepTile::kSmall;
  const int64_t large_blocks = static_cast<int64_t>(ceil_div(batch, LargeTile::BM)) *
                               ceil_div(columns, LargeTile::BU);
  return large_blocks >= multiprocessors ? StepTile::kLarge : StepTile::kMedium;
}

template <class Cfg, typename T>
cudaError_t forward_with(const ForwardStep<T>& step, cudaStream_t stream) {
  return launch(forward_step_kernel<Cfg, T>, grid_for<Cfg>(step.hidden_size, step.batch),
                dim3(Cfg::THREADS), stream, step);
}

template <class Cfg, typename T>
cudaError_t backward_with(const BackwardStep<T>& step, BackwardMode mode, cudaStream_t stream) {
  const dim3 block(Cfg::THREADS);
  switch (mode) {
    case BackwardMode::kFused:
      return launch(backward_step_kernel<Cfg, T, BackwardMode::kFused>,
                    grid_for<Cfg>(step.hidden_size, step.batch), block, stream, step);
    case BackwardMode::kHiddenGrad:
      return launch(backward_step_kernel<Cfg, T, BackwardMode::kHiddenGrad>,
                    grid_for<Cfg>(step.output_size, step.batch), block, stream, step);
    case BackwardMode::kGates:
      return launch(backward_step_kernel<Cfg, T, BackwardMode::kGates>,
                    grid_for<Cfg>(step.hidden_size, step.batch), block, stream, step);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

template <typename T>
cudaError_t launch_forward_step(const ForwardStep<T>& step, StepTile tile, int multiprocessors,
                                cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  switch (choose_tile(tile, step.batch, step.hidden_size, multiprocessors)) {
    case StepTile::kSmall:
      return forward_with<SmallTile>(step, stream);
    case StepTile::kMedium:
      return forward_with<MediumTile>(step, stream);
    case StepTile::kLarge:
      return forward_with<LargeTile>(step, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_backward_step(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                                 int multiprocessors, cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  const int columns = mode == BackwardMode::kHiddenGrad ? step.output_size : step.hidden_size;
  switch (choose_tile(tile, step.batch, columns, multiprocessors)) {
    case StepTile::kSmall:
      return backward_with<SmallTile>(step, mode, stream);
    case StepTile::kMedium:
      return backward_with<MediumTile>(step, mode, stream);
    case StepTile::kLarge:
      return backward_with<LargeTile>(step, mode, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

#define LSTM_FUSED_INSTANTIATE(T)                                                            \
  template cudaError_t launch_forward_step<T>(const ForwardStep<T>&, StepTile, int,          \
                                              cudaStream_t);                                 \
  template cudaError_t launch_backward_step<T>(const BackwardStep<T>&, BackwardMode,         \
                                               StepTile, int, cudaStream_t);

LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(double)
LSTM_FUSED_INSTANTIATE(__half)
LSTM_FUSED_INSTANTIATE(__nv_bfloat16)

#undef LSTM_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace lstm_fused
