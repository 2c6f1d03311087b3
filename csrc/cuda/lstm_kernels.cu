// The fused LSTM step kernels (see lstm_kernels.h for the contract of every argument).
//
// A block computes its share of a step's recurrent product out[b, column] = sum_k a[b, k] *
// w[row(column), k] for BM batch rows and GATES x UNITS columns (the four gates of a hidden unit
// are four columns of the same block), then passes each (row, unit) with its GATES sums to the
// kernel's epilogue. K is staged through shared memory in tiles of KT by a 2-3 stage pipeline of
// asynchronous copies (cp.async, 16 bytes per copy where rows are 16-byte aligned), so that the
// loads of the next tiles overlap the arithmetic of the current one. The arithmetic is either
// scalar FMAs (ScalarTile; its threads may also split K, with their partial sums added in a fixed
// order) or wmma on tensor cores (TensorTile). With gridDim.z > 1 blocks also split K: each
// writes its partial sums to a workspace and the last to arrive adds them, in the order of
// blockIdx.z, and runs the epilogue.
#include "lstm_kernels.h"

#include "lstm_device_math.cuh"

#ifndef LSTM_FUSED_EMULATE_CUDA
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

#include <algorithm>
#include <type_traits>
#include <utility>

namespace lstm_fused {
namespace cuda {
namespace {

using math::ceil_div;
using math::max_of;
using math::min_of;
using math::store;
using math::tanh_of;
using math::to_acc;

template <typename T>
constexpr bool kHalfType = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Two stages for float64 (its tiles are twice the bytes), three for the others: the static
// shared memory of every tile stays under 48 KiB.
template <typename T>
constexpr int kStages = sizeof(T) > 4 ? 2 : 3;

// A block of ROW_GROUPS x COLUMN_GROUPS x KSPLIT threads; each owns TM rows x TU units x GATES
// gates of partial sums over every KSPLIT-th k of a tile.
template <int BM_, int UNITS_, int TM_, int TU_, int KSPLIT_, int KT_, int STAGES_>
struct ScalarTile {
  static constexpr int BM = BM_;          // batch rows per block
  static constexpr int UNITS = UNITS_;    // hidden units (backward: columns) per block
  static constexpr int TM = TM_;          // rows per thread
  static constexpr int TU = TU_;          // units per thread
  static constexpr int KSPLIT = KSPLIT_;  // threads sharing one (rows, units) micro-tile
  static constexpr int KT = KT_;          // K staged per shared-memory tile
  static constexpr int STAGES = STAGES_;
  static constexpr int ROW_GROUPS = BM / TM;
  static constexpr int COLUMN_GROUPS = UNITS / TU;
  static constexpr int THREADS = ROW_GROUPS * COLUMN_GROUPS * KSPLIT;
  static constexpr int PAIRS = BM * UNITS;  // (row, unit) pairs of the block
  static_assert(BM % TM == 0 && UNITS % TU == 0 && KT % KSPLIT == 0, "tile does not divide");
  static_assert(KSPLIT == 1 || (THREADS % PAIRS == 0 && KSPLIT % max_of(THREADS / PAIRS, 1) == 0),
                "the K reduction gives every thread an equal share");
  static_assert(THREADS <= 1024, "too many threads");
  static constexpr bool kTensorCores = false;
  // Two blocks per multiprocessor bound the registers (128 per thread for 256 threads); float64's
  // twice-wide accumulators would spill there.
  static constexpr int MIN_BLOCKS = STAGES > 2 ? 2 : 1;
  __host__ __device__ static constexpr int units(int /*gates*/) { return UNITS; }
};

// Four warps, each multiplying RF 16-row fragments by one 16-column fragment of the weights with
// wmma (float accumulators): 64 columns, 16 units x 4 gates forward, 64 columns backward.
template <int RF_, int KT_, int STAGES_>
struct TensorTile {
  static constexpr int RF = RF_;  // row fragments per warp
  static constexpr int BM = 16 * RF;
  static constexpr int KT = KT_;  // K staged per shared-memory tile, a multiple of 16
  static constexpr int STAGES = STAGES_;
  static constexpr int COLUMNS = 64;
  static constexpr int THREADS = 128;
  static_assert(KT % 16 == 0, "tile does not divide");
  static constexpr bool kTensorCores = true;
  static constexpr int MIN_BLOCKS = 2;
  __host__ __device__ static constexpr int units(int gates) { return COLUMNS / gates; }
};

// 8 rows, 4 or 2 units, 256 threads splitting K 64 or 128 ways: batch <= 8, where a step reads
// W_hh once and does little arithmetic on it, so narrow blocks spread it over every
// multiprocessor.
template <typename T, int UNITS>
using SmallTile = ScalarTile<8, UNITS, 8, 1, 256 / UNITS,
                             max_of(256 / UNITS, 512 / static_cast<int>(sizeof(T))), kStages<T>>;
template <typename T>
using MediumTile = ScalarTile<16, 16, 4, 2, 8, 32, kStages<T>>;  // 256 threads
template <typename T>
using LargeTile = ScalarTile<64, 32, 8, 2, 1, 64 / static_cast<int>(sizeof(T)),
                             kStages<T>>;  // 128 threads, 8 x 2 x 4 gates in registers
using MediumTensorTile = TensorTile<1, 32, 3>;  // 16 rows
using LargeTensorTile = TensorTile<2, 32, 3>;   // 32 rows

// The GATES sums of one (row, unit), passed by value so that they stay in registers.
template <typename Acc, int GATES>
struct Sums {
  Acc value[GATES];
};

__device__ __forceinline__ bool is_padding(const int64_t* lengths, int64_t t, int row) {
  return lengths != nullptr && t >= lengths[row];
}

// ---- Staging K tiles through shared memory ------------------------------------------------------

// The operands of a block's product: a [rows, k_size] row-major; w's rows along k, column
// (q, unit) of the block at row q * gate_stride + unit. vector: every row starts 16-byte aligned
// (k_size a multiple of 16 bytes, aligned bases), so that 16-byte copies can be used.
template <typename T>
struct Operands {
  const T* a;
  const T* w;
  int k_size;
  int rows;
  int row0;
  int64_t gate_stride;
  int columns;
  int column0;
  bool vector;
};

// The shared-memory layout of a tile's pipeline: STAGES tiles of a ([BM][LDK]), then STAGES of w
// ([COLUMNS][LDK]), rows padded by 16 bytes (different banks; 16-byte aligned destinations).
template <class Cfg, int GATES, typename T>
struct Pipeline {
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));
  static constexpr int LDK = Cfg::KT + PAD;
  static constexpr int UNITS = Cfg::units(GATES);
  static constexpr int COLUMNS = GATES * UNITS;
  static constexpr int A_ELEMENTS = Cfg::BM * LDK;
  static constexpr int W_ELEMENTS = COLUMNS * LDK;
  static constexpr int BYTES =
      Cfg::STAGES * (A_ELEMENTS + W_ELEMENTS) * static_cast<int>(sizeof(T));
};

template <typename T>
__device__ __forceinline__ void copy_element(T* destination, const T* source, bool valid) {
  if constexpr (sizeof(T) >= 4) {
    if (valid) {
      __pipeline_memcpy_async(destination, source, sizeof(T));
    } else {
      *destination = T{};
    }
  } else {  // no 2-byte asynchronous copy: a synchronous one
    *destination = valid ? *source : T{};
  }
}

// ROWS rows of KT elements from k0 of source rows row_of(r) (negative: outside, zero-filled),
// elements at k >= k_end zero-filled too, into tile[r * LDK + k].
template <int ROWS, int KT, int LDK, int THREADS, typename T, typename RowOf>
__device__ __forceinline__ void copy_rows(T* tile, const T* source, int k_size, int k0, int k_end,
                                          bool vector, RowOf&& row_of) {
  if (vector) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    constexpr int PER_ROW = KT / V, CHUNKS = ROWS * PER_ROW;
    constexpr int ROUNDS = (CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
    for (int i = 0; i < ROUNDS; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * THREADS;
      if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
      const int r = c / PER_ROW, k = c % PER_ROW * V;
      const int64_t row = row_of(r);
      T* const destination = tile + r * LDK + k;
      if (row >= 0 && k0 + k < k_end) {
        __pipeline_memcpy_async(destination, source + row * k_size + k0 + k, 16);
      } else {
        *reinterpret_cast<int4*>(destination) = make_int4(0, 0, 0, 0);
      }
    }
  } else {
    constexpr int ELEMENTS = ROWS * KT;
    constexpr int ROUNDS = (ELEMENTS + THREADS - 1) / THREADS;
#pragma unroll 1
    for (int i = 0; i < ROUNDS; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * THREADS;
      if (ELEMENTS % THREADS != 0 && e >= ELEMENTS) break;
      const int r = e / KT, k = e % KT;
      const int64_t row = row_of(r);
      const bool valid = row >= 0 && k0 + k < k_end;
      copy_element(tile + r * LDK + k, valid ? source + row * k_size + k0 + k : source, valid);
    }
  }
}

// Runs compute(a_tile, w_tile) on each K tile of the block's share of K (all of it, or its
// blockIdx.z-th of gridDim.z chunks), pipelined STAGES deep. Every thread must call it; it ends
// with a barrier, after which the pipeline's shared memory may be reused.
template <class Cfg, int GATES, typename T, typename Compute>
__device__ __forceinline__ void pipelined_product(T* shared, const Operands<T>& op,
                                                  Compute&& compute) {
  using P = Pipeline<Cfg, GATES, T>;
  constexpr int KT = Cfg::KT, STAGES = Cfg::STAGES;
  const int chunk = ceil_div(ceil_div(op.k_size, static_cast<int>(gridDim.z)), KT) * KT;
  const int k_begin = min_of(op.k_size, static_cast<int>(blockIdx.z) * chunk);
  const int k_end = min_of(op.k_size, k_begin + chunk);
  const int tiles = ceil_div(k_end - k_begin, KT);
  T* const a_tiles = shared;
  T* const w_tiles = shared + STAGES * P::A_ELEMENTS;
  auto load = [&](int tile) {
    const int stage = tile % STAGES, k0 = k_begin + tile * KT;
    copy_rows<Cfg::BM, KT, P::LDK, Cfg::THREADS>(
        a_tiles + stage * P::A_ELEMENTS, op.a, op.k_size, k0, k_end, op.vector,
        [&](int r) -> int64_t { return op.row0 + r < op.rows ? op.row0 + r : -1; });
    copy_rows<P::COLUMNS, KT, P::LDK, Cfg::THREADS>(
        w_tiles + stage * P::W_ELEMENTS, op.w, op.k_size, k0, k_end, op.vector,
        [&](int r) -> int64_t {
          const int column = op.column0 + r % P::UNITS;
          return column < op.columns ? (r / P::UNITS) * op.gate_stride + column : -1;
        });
  };
#pragma unroll
  for (int tile = 0; tile < STAGES - 1; ++tile) {
    if (tile < tiles) load(tile);
    __pipeline_commit();
  }
  for (int tile = 0; tile < tiles; ++tile) {
    __pipeline_wait_prior(STAGES - 2);  // this thread's copies of `tile` have landed
    __syncthreads();  // everyone's have, and everyone is done with the stage refilled next
    if (tile + STAGES - 1 < tiles) load(tile + STAGES - 1);
    __pipeline_commit();
    const int stage = tile % STAGES;
    compute(a_tiles + stage * P::A_ELEMENTS, w_tiles + stage * P::W_ELEMENTS);
  }
  __pipeline_wait_prior(0);
  __syncthreads();
}

// ---- Finishing a tile: the epilogue, after the split-K reduction --------------------------------

// for_each_pair(f) calls f(row, column, sums) for the block's in-range pairs this thread owns,
// sums holding the block's GATES products (of its share of K). Without a split each pair goes to
// the epilogue; with one, to the workspace, and the last block of the tile to arrive adds the
// partial sums of every block of the tile in the order of blockIdx.z and runs the epilogue.
// Every thread must call it.
template <int GATES, typename Acc, typename ForEachPair, typename Epilogue>
__device__ __forceinline__ void finish_tile(const SplitWorkspace& workspace, int rows, int columns,
                                            ForEachPair&& for_each_pair, Epilogue&& epilogue) {
  const int splits = static_cast<int>(gridDim.z);
  Acc* const partial = static_cast<Acc*>(workspace.partial_sums);
  const int64_t slice = static_cast<int64_t>(rows) * GATES * columns;
  auto at = [&](int row, int q, int column) {
    return (static_cast<int64_t>(row) * GATES + q) * columns + column;
  };
  const int tile = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x);
  if (splits > 1) {
    for_each_pair([&](int row, int column, const Sums<Acc, GATES>& sums) {
#pragma unroll
      for (int q = 0; q < GATES; ++q) {
        partial[blockIdx.z * slice + at(row, q, column)] = sums.value[q];
      }
    });
    __threadfence();  // the partial sums are visible before the counter says so
    __syncthreads();
    __shared__ int arrived_last;
    if (threadIdx.x == 0) {
      arrived_last = atomicAdd(workspace.counters + tile, 1) == splits - 1;
    }
    __syncthreads();
    if (!arrived_last) return;
    __threadfence();
  }
  // One call site of the epilogue, so that it is inlined once.
  for_each_pair([&](int row, int column, const Sums<Acc, GATES>& own) {
    Sums<Acc, GATES> sums = own;
    if (splits > 1) {
#pragma unroll
      for (int q = 0; q < GATES; ++q) {
        sums.value[q] = Acc(0);
        for (int z = 0; z < splits; ++z) {
          sums.value[q] += __ldcg(partial + z * slice + at(row, q, column));
        }
      }
    }
    epilogue(row, column, sums);
  });
  if (splits > 1 && threadIdx.x == 0) workspace.counters[tile] = 0;  // ready for the next launch
}

// ---- The two kinds of block product -------------------------------------------------------------

template <class Cfg, int GATES, typename Acc, typename T, typename Epilogue>
__device__ __forceinline__ void scalar_tile_product(const Operands<T>& op,
                                                    const SplitWorkspace& workspace,
                                                    Epilogue&& epilogue) {
  using P = Pipeline<Cfg, GATES, T>;
  constexpr int UNITS = Cfg::UNITS, KSPLIT = Cfg::KSPLIT, LDK = P::LDK;
  constexpr int REDUCTION_BYTES =
      KSPLIT > 1 ? Cfg::PAIRS * (KSPLIT + 1) * static_cast<int>(sizeof(Acc)) : 0;
  __shared__ __align__(128) unsigned char shared[max_of(P::BYTES, REDUCTION_BYTES)];
  const int tid = static_cast<int>(threadIdx.x);
  const int ks = tid % KSPLIT;
  const int column_group = (tid / KSPLIT) % Cfg::COLUMN_GROUPS;
  const int row_group = tid / (KSPLIT * Cfg::COLUMN_GROUPS);

  Acc acc[Cfg::TM][Cfg::TU][GATES];
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
      for (int q = 0; q < GATES; ++q) acc[i][j][q] = Acc(0);

  pipelined_product<Cfg, GATES>(
      reinterpret_cast<T*>(shared), op, [&](const T* a_tile, const T* w_tile) {
#pragma unroll
        for (int kk = ks; kk < Cfg::KT; kk += KSPLIT) {
          Acc a_reg[Cfg::TM];
          Acc w_reg[Cfg::TU][GATES];
#pragma unroll
          for (int i = 0; i < Cfg::TM; ++i) {
            a_reg[i] = static_cast<Acc>(to_acc(a_tile[(row_group * Cfg::TM + i) * LDK + kk]));
          }
#pragma unroll
          for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
            for (int q = 0; q < GATES; ++q)
              w_reg[j][q] = static_cast<Acc>(
                  to_acc(w_tile[(q * UNITS + column_group + Cfg::COLUMN_GROUPS * j) * LDK + kk]));
#pragma unroll
          for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::TU; ++j)
#pragma unroll
              for (int q = 0; q < GATES; ++q) acc[i][j][q] += a_reg[i] * w_reg[j][q];
        }
      });

  if constexpr (KSPLIT == 1) {
    finish_tile<GATES, Acc>(workspace, op.rows, op.columns, [&](auto&& f) {
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TU; ++j) {
          const int row = op.row0 + row_group * Cfg::TM + i;
          const int column = op.column0 + column_group + Cfg::COLUMN_GROUPS * j;
          if (row < op.rows && column < op.columns) {
            Sums<Acc, GATES> sums;
#pragma unroll
            for (int q = 0; q < GATES; ++q) sums.value[q] = acc[i][j][q];
            f(row, column, sums);
          }
        }
    }, epilogue);
  } else {
    // The KSPLIT partial sums of each pair, one gate at a time (the shared memory holds one):
    // CHUNKS threads per pair add KSPLIT / CHUNKS each, then one thread adds those, in order.
    constexpr int CHUNKS = Cfg::THREADS / Cfg::PAIRS, PER_CHUNK = KSPLIT / CHUNKS;
    constexpr int LDR = KSPLIT + 1;
    Acc* const partial = reinterpret_cast<Acc*>(shared);
    const int pair = tid / CHUNKS, chunk = tid % CHUNKS;
    Sums<Acc, GATES> sums;
#pragma unroll
    for (int q = 0; q < GATES; ++q) {
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::TU; ++j)
          partial[((row_group * Cfg::TM + i) * UNITS + column_group + Cfg::COLUMN_GROUPS * j) *
                      LDR + ks] = acc[i][j][q];
      __syncthreads();
      Acc part = Acc(0);
      for (int s = 0; s < PER_CHUNK; ++s) part += partial[pair * LDR + chunk * PER_CHUNK + s];
      if constexpr (CHUNKS > 1) {
        __syncthreads();
        partial[pair * LDR + chunk] = part;
        __syncthreads();
        part = Acc(0);
        if (tid < Cfg::PAIRS) {
          for (int c = 0; c < CHUNKS; ++c) part += partial[tid * LDR + c];
        }
      }
      sums.value[q] = part;
      __syncthreads();
    }
    finish_tile<GATES, Acc>(workspace, op.rows, op.columns, [&](auto&& f) {
      if (tid < Cfg::PAIRS) {
        const int row = op.row0 + tid / UNITS, column = op.column0 + tid % UNITS;
        if (row < op.rows && column < op.columns) f(row, column, sums);
      }
    }, epilogue);
  }
  __syncthreads();  // the shared memory is written again by the next row tile
}

// A float fragment as the tensor cores take it: every element rounded to TF32.
template <typename Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& fragment) {
#pragma unroll
  for (int i = 0; i < fragment.num_elements; ++i) {
    fragment.x[i] = math::tensor_operand(fragment.x[i]);
  }
}

// The product on tensor cores: __half/__nv_bfloat16 (wmma 16 x 16 x 16) or float as TF32
// (16 x 16 x 8), float accumulators, through a shared-memory tile to the epilogue's threads.
template <class Cfg, int GATES, typename Acc, typename T, typename Epilogue>
__device__ __forceinline__ void tensor_tile_product(const Operands<T>& op,
                                                    const SplitWorkspace& workspace,
                                                    Epilogue&& epilogue) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using P = Pipeline<Cfg, GATES, T>;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int FK = kTf32 ? 8 : 16;  // K of one wmma
  using Operand = std::conditional_t<kTf32, wmma::precision::tf32, T>;
  constexpr int UNITS = P::UNITS, LDK = P::LDK;
  constexpr int LDO = Cfg::COLUMNS + 8;
  constexpr int OUT_BYTES = Cfg::BM * LDO * static_cast<int>(sizeof(float));
  // The pipeline's tiles, then the accumulators on their way to the epilogue: every fragment
  // starts on the 32-byte boundary wmma requires (LDK and LDO are 16-byte multiples, the tiles
  // 16-row multiples).
  __shared__ __align__(128) unsigned char shared[max_of(P::BYTES, OUT_BYTES)];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32;

  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[Cfg::RF];
#pragma unroll
  for (int r = 0; r < Cfg::RF; ++r) wmma::fill_fragment(acc[r], 0.0f);
  pipelined_product<Cfg, GATES>(
      reinterpret_cast<T*>(shared), op, [&](const T* a_tile, const T* w_tile) {
#pragma unroll
        for (int kk = 0; kk < Cfg::KT; kk += FK) {
          // w_tile[n][k]: the weights as a column-major K x N matrix.
          wmma::fragment<wmma::matrix_b, 16, 16, FK, Operand, wmma::col_major> b;
          wmma::load_matrix_sync(b, w_tile + warp * 16 * LDK + kk, LDK);
          if constexpr (kTf32) round_to_tf32(b);
#pragma unroll
          for (int r = 0; r < Cfg::RF; ++r) {
            wmma::fragment<wmma::matrix_a, 16, 16, FK, Operand, wmma::row_major> a_fragment;
            wmma::load_matrix_sync(a_fragment, a_tile + r * 16 * LDK + kk, LDK);
            if constexpr (kTf32) round_to_tf32(a_fragment);
            wmma::mma_sync(acc[r], a_fragment, b, acc[r]);
          }
        }
      });
  float* const out = reinterpret_cast<float*>(shared);
#pragma unroll
  for (int r = 0; r < Cfg::RF; ++r) {
    wmma::store_matrix_sync(out + r * 16 * LDO + warp * 16, acc[r], LDO, wmma::mem_row_major);
  }
  __syncthreads();
  finish_tile<GATES, Acc>(workspace, op.rows, op.columns, [&](auto&& f) {
    for (int p = tid; p < Cfg::BM * UNITS; p += Cfg::THREADS) {
      const int m = p / UNITS, u = p % UNITS;
      const int row = op.row0 + m, column = op.column0 + u;
      if (row >= op.rows || column >= op.columns) continue;
      Sums<Acc, GATES> sums;
#pragma unroll
      for (int q = 0; q < GATES; ++q) {
        sums.value[q] = static_cast<Acc>(out[m * LDO + q * UNITS + u]);
      }
      f(row, column, sums);
    }
  }, epilogue);
  __syncthreads();  // the shared memory is written again by the next row tile
#else
  __trap();  // unreachable: the launchers use these tiles only where sm_80 code was built
#endif
}

// The block's product with its tile's method: tensor cores or scalar FMAs.
template <class Cfg, int GATES, typename Acc, typename T, typename Epilogue>
__device__ __forceinline__ void block_product(const Operands<T>& op,
                                              const SplitWorkspace& workspace,
                                              Epilogue&& epilogue) {
  if constexpr (Cfg::kTensorCores) {
    tensor_tile_product<Cfg, GATES, Acc>(op, workspace, epilogue);
  } else {
    scalar_tile_product<Cfg, GATES, Acc>(op, workspace, epilogue);
  }
}

// ---- The kernels --------------------------------------------------------------------------------

template <class Cfg, typename T>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    forward_step_kernel(const ForwardStep<T> s, const bool vector) {
  using Acc = acc_t<T>;
  const int64_t H = s.hidden_size, P = s.output_size;
  const int64_t out_stride = s.has_projection ? H : P;
  auto update = [&](int b, int u, const Sums<Acc, 4>& z) {
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
      pre[q] = z.value[q] + static_cast<Acc>(to_acc(x_part[q * H + u]));
      if (s.bias) pre[q] += s.bias[q * H + u];
    }
    const math::CellForward<Acc> cell = math::cell_forward(pre, s.c_prev[row * H + u]);
    s.c_next[row * H + u] = cell.c;
    store(s.hidden_out + row * out_stride + u, cell.h);
    if (gates) {
      gates[u] = cell.i;
      gates[H + u] = cell.f;
      gates[2 * H + u] = cell.g;
      gates[3 * H + u] = cell.o;
    }
  };
  const int column0 = static_cast<int>(blockIdx.x) * Cfg::units(4);
  for (int row0 = static_cast<int>(blockIdx.y) * Cfg::BM; row0 < s.batch;
       row0 += static_cast<int>(gridDim.y) * Cfg::BM) {
    const Operands<T> op{s.h_prev, s.w_hh, s.output_size, s.batch, row0,
                         H, s.hidden_size, column0, vector};
    block_product<Cfg, 4, Acc>(op, s.workspace, update);
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
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    backward_step_kernel(const BackwardStep<T> s, const bool vector) {
  using Acc = acc_t<T>;
  const int64_t H = s.hidden_size, P = s.output_size;
  auto update = [&](int b, int n, const Sums<Acc, 1>& product) {
    const int64_t row = static_cast<int64_t>(b);
    Acc grad_hidden;
    if constexpr (kMode == BackwardMode::kGates) {
      grad_hidden = product.value[0];
    } else {
      const Acc received = received_hidden_grad(s, b, n, product.value[0]);
      s.grad_h[row * P + n] = received;
      if (kMode == BackwardMode::kHiddenGrad) {
        if (s.grad_total) {
          store(s.grad_total + row * P + n,
                static_cast<Acc>(to_acc(s.grad_y[row * P + n])) + received);
        }
        return;
      }
      grad_hidden = static_cast<Acc>(to_acc(s.grad_y[row * P + n])) + received;
    }
    // The gate gradients of unit u = n.
    const int u = n;
    T* grad_gates = s.grad_gates + row * 4 * H;
    if (is_padding(s.lengths, s.t, b)) {  // the state was carried: so is dL/dc
      for (int q = 0; q < 4; ++q) store(grad_gates + q * H + u, Acc(0));
      if (s.hidden_out) store(s.hidden_out + row * H + u, Acc(0));
      return;
    }
    const Acc* gates = s.gates + row * 4 * H;
    const Acc i = gates[u], f = gates[H + u], g = gates[2 * H + u], o = gates[3 * H + u];
    const Acc tc = tanh_of(s.cell[row * H + u]);
    const math::CellBackward<Acc> grad =
        math::cell_backward(i, f, g, o, tc, s.c_prev[row * H + u], grad_hidden,
                            s.grad_c[row * H + u]);
    for (int q = 0; q < 4; ++q) store(grad_gates + q * H + u, grad.dz[q]);
    s.grad_c[row * H + u] = grad.grad_c_prev;
    if (s.hidden_out) store(s.hidden_out + row * H + u, o * tc);
  };
  const int columns = kMode == BackwardMode::kHiddenGrad ? s.output_size : s.hidden_size;
  const int k_size = s.a ? s.k : 0;
  const int column0 = static_cast<int>(blockIdx.x) * Cfg::units(1);
  for (int row0 = static_cast<int>(blockIdx.y) * Cfg::BM; row0 < s.batch;
       row0 += static_cast<int>(gridDim.y) * Cfg::BM) {
    const Operands<T> op{s.a, s.w, k_size, s.batch, row0, 0, columns, column0, vector};
    block_product<Cfg, 1, Acc>(op, s.workspace, update);
  }
}

template <typename T>
__global__ void carry_padded_rows_kernel(T* y_t, const T* h_prev, const int64_t* lengths,
                                         int64_t t, int batch, int output_size) {
  const int64_t total = static_cast<int64_t>(batch) * output_size;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    if (t >= lengths[e / output_size]) y_t[e] = h_prev[e];
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

// ---- Choosing the tile and the split ------------------------------------------------------------

template <class... Cfgs>
struct TileList {};

template <class A, class B>
struct Concat;
template <class... A, class... B>
struct Concat<TileList<A...>, TileList<B...>> {
  using type = TileList<A..., B...>;
};

// One step's product: `units` output units of `gates` columns each, over K.
struct Problem {
  int batch;
  int units;
  int gates;
  int k;
  int multiprocessors;
  int element_bytes;  // of T
  int acc_bytes;      // of acc_t<T>
};

constexpr int kMaxGridY = 65535;  // rows beyond are looped over inside the kernel
constexpr int kMaxSplit = 16;
// What a split costs beyond its traffic, in bytes of L2 traffic: about a microsecond for the
// partial sums' round trip and the last block's reduction.
constexpr double kSplitPenaltyBytes = 2.0e6;

struct Choice {
  int index = -1;
  int split = 1;
  int64_t blocks = 0;
  double cost = 0;
};

// Considers tile `index` (BM rows, `units` units per block, K tiles of KT) with every split.
// Among the choices that give every multiprocessor a block, the one that reads the fewest bytes
// (operands re-read by every block, plus a split's partial sums and penalty) wins; if none does,
// the one with the most blocks.
inline void consider(const Problem& p, int index, int bm, int units_per_block, int kt,
                     Choice& best) {
  const int64_t row_tiles = ceil_div(p.batch, bm);
  const int64_t column_tiles = ceil_div(p.units, units_per_block);
  const int64_t tiles = row_tiles * column_tiles;
  const double operand_bytes =
      (static_cast<double>(p.batch) * column_tiles + static_cast<double>(p.gates) * p.units *
       row_tiles) * p.k * p.element_bytes;
  for (int split = 1; split <= kMaxSplit; ++split) {
    if (split > 1 && (p.k == 0 || row_tiles > kMaxGridY)) break;
    const int chunk = p.k == 0 ? 0 : ceil_div(ceil_div(p.k, split), kt) * kt;
    if (split > 1 && ceil_div(p.k, chunk) != split) continue;  // some block would have no K
    Choice choice{index, split, tiles * split, operand_bytes};
    if (split > 1) {
      choice.cost += kSplitPenaltyBytes + 2.0 * split * p.batch * p.gates * p.units * p.acc_bytes;
    }
    const bool fills = choice.blocks >= p.multiprocessors;
    const bool best_fills = best.index >= 0 && best.blocks >= p.multiprocessors;
    const bool better = best.index < 0 || (fills && !best_fills) ||
                        (fills && best_fills && choice.cost < best.cost) ||
                        (!fills && !best_fills &&
                         (choice.blocks > best.blocks ||
                          (choice.blocks == best.blocks && choice.cost < best.cost)));
    if (better) best = choice;
    if (fills) break;  // more splits only cost more
  }
}

// The cost model's time of a launch by `choice`: the launch, then the slower of its operands'
// traffic and its arithmetic, by as many blocks at once as the multiprocessors run (two blocks'
// CUDA-core arithmetic each, one block's tensor-core arithmetic).
inline double launch_us(const Problem& p, const Choice& choice, bool tensor_cores) {
  const double macs = static_cast<double>(p.batch) * p.units * p.gates * p.k;
  // TF32 at half the half types' rate, float64 at half float32's.
  const double per_block =
      tensor_cores ? cost::kTensorMacsPerUsPerSm / (p.element_bytes == 4 ? 2 : 1)
                   : cost::kFmaPerUsPerSm / (p.acc_bytes == 8 ? 2 : 1);
  const double at_once = std::max(
      1.0, std::min(static_cast<double>(choice.blocks),
                    static_cast<double>(tensor_cores ? 1 : 2) * p.multiprocessors));
  return cost::kLaunchUs +
         std::max(choice.cost / cost::kL2BytesPerUs, macs / (per_block * at_once));
}

template <class... Cfgs>
Choice choose(TileList<Cfgs...>, const Problem& p) {
  Choice best;
  int index = 0;
  (consider(p, index++, Cfgs::BM, Cfgs::units(p.gates), Cfgs::KT, best), ...);
  return best;
}

template <class... Cfgs, typename Launch>
cudaError_t with_tile_at(TileList<Cfgs...>, int index, Launch&& launch_tile) {
  cudaError_t error = cudaErrorInvalidValue;
  int i = 0;
  ((i++ == index ? (error = launch_tile(Cfgs{}), true) : false) || ...);
  return error;
}

template <class... Cfgs>
bool tensor_cores_at(TileList<Cfgs...>, int index) {
  bool tensor = false;
  int i = 0;
  ((i++ == index ? (tensor = Cfgs::kTensorCores, true) : false) || ...);
  return tensor;
}

template <class... Cfgs>
int bm_at(TileList<Cfgs...>, int index) {
  int bm = 0;
  int i = 0;
  ((i++ == index ? (bm = Cfgs::BM, true) : false) || ...);
  return bm;
}

template <class... Cfgs>
int units_at(TileList<Cfgs...>, int index, int gates) {
  int units = 0;
  int i = 0;
  ((i++ == index ? (units = Cfgs::units(gates), true) : false) || ...);
  return units;
}

// The candidate tiles of each row height, widest first.
template <typename T>
struct ScalarTiles {
  using Small = TileList<SmallTile<T, 4>, SmallTile<T, 2>>;
  using Medium = TileList<MediumTile<T>>;
  using Large = TileList<LargeTile<T>>;
};
template <typename T>
struct TensorTiles {
  using Small = TileList<SmallTile<T, 4>, SmallTile<T, 2>>;  // batch <= 8: bound by reading W
  using Medium = TileList<MediumTensorTile>;
  using Large = TileList<LargeTensorTile>;
};

// The one place that picks a step kernel's tile and split: the height from `tile` (auto: small
// up to batch 8, else large or medium), the width and split by `choose`. Calls
// launch_tile(Cfg{}, plan) with the tile's configuration.
template <class Tiles, typename Launch>
cudaError_t with_plan_in(StepTile tile, const Problem& p, Launch&& launch_tile) {
  using Small = typename Tiles::Small;
  using Medium = typename Tiles::Medium;
  using Large = typename Tiles::Large;
  using Wide = typename Concat<Large, Medium>::type;
  auto run = [&](auto list) {
    const Choice choice = choose(list, p);
    if (choice.index < 0) return cudaErrorInvalidValue;
    const int bm = bm_at(list, choice.index), units = units_at(list, choice.index, p.gates);
    const int64_t row_tiles = ceil_div(p.batch, bm), column_tiles = ceil_div(p.units, units);
    const bool tensor_cores = tensor_cores_at(list, choice.index);
    StepPlan plan{bm,           units * p.gates, tensor_cores, choice.split,
                  choice.blocks, 0,              0,            launch_us(p, choice, tensor_cores)};
    if (choice.split > 1) {
      plan.partial_sums = static_cast<int64_t>(choice.split) * p.batch * p.gates * p.units;
      plan.counters = row_tiles * column_tiles;
    }
    return with_tile_at(list, choice.index, [&](auto config) { return launch_tile(config, plan); });
  };
  switch (tile) {
    case StepTile::kAuto:
      return p.batch <= bm_at(Small{}, 0) ? run(Small{}) : run(Wide{});
    case StepTile::kSmall:
      return run(Small{});
    case StepTile::kMedium:
      return run(Medium{});
    case StepTile::kLarge:
      return run(Large{});
  }
  return cudaErrorInvalidValue;
}

// Half types use the tensor-core tiles where the device has them (sm_80+), float32 too where
// TF32 is allowed.
template <typename T, typename Launch>
cudaError_t with_plan(StepTile tile, const Problem& p, const DeviceTraits& device,
                      Launch&& launch_tile) {
  if constexpr (kHalfType<T> || std::is_same_v<T, float>) {
    if (device.tensor_cores && (kHalfType<T> || device.allow_tf32)) {
      return with_plan_in<TensorTiles<T>>(tile, p, launch_tile);
    }
  }
  return with_plan_in<ScalarTiles<T>>(tile, p, launch_tile);
}

template <typename T>
Problem forward_problem(const ForwardStep<T>& step, const DeviceTraits& device) {
  return {step.batch, step.hidden_size, 4, step.output_size, device.multiprocessors,
          static_cast<int>(sizeof(T)), static_cast<int>(sizeof(acc_t<T>))};
}

template <typename T>
Problem backward_problem(const BackwardStep<T>& step, BackwardMode mode,
                         const DeviceTraits& device) {
  const int columns = mode == BackwardMode::kHiddenGrad ? step.output_size : step.hidden_size;
  return {step.batch, columns, 1, step.a ? step.k : 0, device.multiprocessors,
          static_cast<int>(sizeof(T)), static_cast<int>(sizeof(acc_t<T>))};
}

dim3 grid_of(const StepPlan& plan, const Problem& p) {
  const int row_tiles = ceil_div(p.batch, plan.rows);
  return dim3(static_cast<unsigned>(ceil_div(p.units, plan.columns / p.gates)),
              static_cast<unsigned>(min_of(row_tiles, kMaxGridY)),
              static_cast<unsigned>(plan.split));
}

// 16-byte copies need every row of both operands to start 16-byte aligned.
template <typename T>
bool rows_aligned(const T* a, const T* w, int k) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return (static_cast<int64_t>(k) * sizeof(T)) % 16 == 0 && (a == nullptr || aligned(a)) &&
         aligned(w);
}

bool workspace_holds(const SplitWorkspace& workspace, const StepPlan& plan) {
  return plan.split == 1 || (workspace.partial_sums != nullptr && workspace.counters != nullptr);
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
StepPlan forward_step_plan(const ForwardStep<T>& step, StepTile tile, const DeviceTraits& device) {
  StepPlan result{};
  if (step.batch == 0 || step.hidden_size == 0) return result;
  with_plan<T>(tile, forward_problem(step, device), device, [&](auto, const StepPlan& plan) {
    result = plan;
    return cudaSuccess;
  });
  return result;
}

template <typename T>
StepPlan backward_step_plan(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                            const DeviceTraits& device) {
  StepPlan result{};
  if (step.batch == 0 || step.hidden_size == 0) return result;
  with_plan<T>(tile, backward_problem(step, mode, device), device,
               [&](auto, const StepPlan& plan) {
                 result = plan;
                 return cudaSuccess;
               });
  return result;
}

template <typename T>
cudaError_t launch_forward_step(const ForwardStep<T>& step, StepTile tile,
                                const DeviceTraits& device, cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  const Problem problem = forward_problem(step, device);
  const bool vector = rows_aligned(step.h_prev, step.w_hh, step.output_size);
  return with_plan<T>(tile, problem, device, [&](auto config, const StepPlan& plan) {
    using Cfg = decltype(config);
    if (!workspace_holds(step.workspace, plan)) return cudaErrorInvalidValue;
    return launch(forward_step_kernel<Cfg, T>, grid_of(plan, problem), dim3(Cfg::THREADS),
                  stream, step, vector);
  });
}

template <typename T>
cudaError_t launch_backward_step(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                                 const DeviceTraits& device, cudaStream_t stream) {
  if (step.batch == 0 || step.hidden_size == 0) return cudaSuccess;
  const Problem problem = backward_problem(step, mode, device);
  const bool vector = rows_aligned(step.a, step.w, step.k);
  return with_plan<T>(tile, problem, device, [&](auto config, const StepPlan& plan) {
    using Cfg = decltype(config);
    if (!workspace_holds(step.workspace, plan)) return cudaErrorInvalidValue;
    const dim3 grid = grid_of(plan, problem), block(Cfg::THREADS);
    switch (mode) {
      case BackwardMode::kFused:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kFused>, grid, block, stream,
                      step, vector);
      case BackwardMode::kHiddenGrad:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kHiddenGrad>, grid, block,
                      stream, step, vector);
      case BackwardMode::kGates:
        return launch(backward_step_kernel<Cfg, T, BackwardMode::kGates>, grid, block, stream,
                      step, vector);
    }
    return cudaErrorInvalidValue;
  });
}

template <typename T>
cudaError_t launch_carry_padded_rows(T* y_t, const T* h_prev, const int64_t* lengths, int64_t t,
                                     int batch, int output_size, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(batch) * output_size;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(min_of(1024, static_cast<int>((total + kThreads - 1) /
                                                                   kThreads)));
  return launch(carry_padded_rows_kernel<T>, dim3(blocks), dim3(kThreads), stream, y_t, h_prev,
                lengths, t, batch, output_size);
}

#define LSTM_FUSED_INSTANTIATE(T)                                                             \
  template StepPlan forward_step_plan<T>(const ForwardStep<T>&, StepTile, const DeviceTraits&); \
  template StepPlan backward_step_plan<T>(const BackwardStep<T>&, BackwardMode, StepTile,      \
                                          const DeviceTraits&);                                \
  template cudaError_t launch_forward_step<T>(const ForwardStep<T>&, StepTile,                 \
                                              const DeviceTraits&, cudaStream_t);              \
  template cudaError_t launch_backward_step<T>(const BackwardStep<T>&, BackwardMode,           \
                                               StepTile, const DeviceTraits&, cudaStream_t);   \
  template cudaError_t launch_carry_padded_rows<T>(T*, const T*, const int64_t*, int64_t, int, \
                                                   int, cudaStream_t);

LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(double)
LSTM_FUSED_INSTANTIATE(__half)
LSTM_FUSED_INSTANTIATE(__nv_bfloat16)

#undef LSTM_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace lstm_fused
