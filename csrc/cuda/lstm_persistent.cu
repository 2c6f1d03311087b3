// The persistent LSTM kernels (see lstm_persistent.h for the contract of every argument).
//
// Mapping. A launch has `blocks_per_direction` blocks per direction, 256 threads each, one block
// per multiprocessor at most. Block `slice` of a direction owns `block_columns` consecutive
// columns of each phase: hidden units (their four gate rows of W_hh forward; their columns of
// W_hh, or of W_hr with a projection, backward) or projection outputs (rows of W_hr forward,
// columns of W_hh backward). The block's slice R [m x K] of the weights is loaded once and stays on
// chip: on tensor cores in 16 x FK fragments (FK = 16, or 8 for TF32), the first
// 16 (backward 12) of each warp's fragments in registers and the rest in shared memory; on the
// scalar path row by row in shared memory. Per phase of a step a block multiplies R by the
// operand X [B x K] (h_{t-1}, o * tanh(c_t), dL/dz or grad_y + dL/dh) that the previous phase of
// every block left in an exchange buffer in global memory, into partial sums in shared memory
// [splits][rows][m]; then each thread updates the (row, column) pairs it owns for the whole
// sequence (up to kCells of them, their cell state and carried values in registers), writes its
// outputs and its part of the next operand, and the grid waits at a barrier.
//
// Products. Tensor cores: warps split m into 16-row fragments and, when there are fewer
// fragments than warps, K too; each warp multiplies its fragments by X's 16-row fragments loaded
// straight from the exchange buffer (L2), with wmma (float accumulators). Scalar: a thread owns
// items of (one row of R, four batch rows) and k_split threads share an item along K in 16-byte
// chunks; X is first staged in shared memory. Each partial sum has its fixed place and the
// epilogue adds them in a fixed order: no atomics, bitwise reproducible.
//
// Precision: as the fused-step kernels. Half types and TF32 round the operands that enter the
// tensor cores (h_t and dL/dz to the half type or to TF32), exactly where the step kernels do;
// arithmetic, the cell state and the saved activations are float32 (float64 for double).
#include "lstm_persistent.h"

#include "lstm_device_math.cuh"

#ifndef LSTM_FUSED_EMULATE_CUDA
#include <cooperative_groups.h>
#include <mma.h>
#endif

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

namespace lstm_fused {
namespace cuda {
namespace {

using math::ceil_div;
using math::max_of;
using math::min_of;
using math::from_acc;
using math::round_up;
using math::tanh_of;
using math::to_acc;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCells = 8;               // (row, column) pairs a thread owns per phase
constexpr int kBatchGroup = 4;          // scalar: batch rows sharing one weight load
// Tensor cores: a warp's weight fragments held in registers (4 registers each), fewer backward,
// whose per-pair state takes more.
constexpr int kForwardRegisterFragments = 16;
constexpr int kBackwardRegisterFragments = 12;
constexpr int kPaddedFragmentRowBytes = 48;  // 16 halves or 8 floats and 16 bytes of padding
constexpr int kFragmentBytes = 16 * kPaddedFragmentRowBytes;  // the largest
constexpr int kAlign = 128;

template <typename T>
constexpr bool kTensorCoreType = std::is_same_v<T, float> || std::is_same_v<T, __half> ||
                                 std::is_same_v<T, __nv_bfloat16>;
template <typename T>
constexpr int kFragmentK = std::is_same_v<T, float> ? 8 : 16;

// The element type of the exchange buffers: what the next product multiplies.
template <typename T, bool kTensorCores>
using operand_t = std::conditional_t<kTensorCores, T, acc_t<T>>;

__host__ __device__ __forceinline__ int exchange_ld(int k) { return round_up(k, 16); }

// ---- Memory ------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned char* dynamic_shared() {
#ifdef LSTM_FUSED_EMULATE_CUDA
  return ::cuda_emulation::dynamic_shared_memory();
#else
  extern __shared__ __align__(128) unsigned char shared_storage[];
  return shared_storage;
#endif
}

// The grid-wide barrier between phases. cooperative_groups' grid sync is a barrier of every
// thread of the grid with device-scope release/acquire ordering: each thread's global-memory
// writes before it (h_t, o * tanh(c_t), dL/dz_t in the exchange buffers) happen before every
// thread's reads after it. The exchange buffers are read with ordinary (coherent) loads, never
// through the read-only path (no __ldg, no const __restrict__ on them), which is not coherent
// with writes of the same kernel. Two slots alternate by step for what a phase both reads and
// writes (h, dL/dz): reading slot (n - 1) % 2 while writing slot n % 2 needs no second barrier.
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

template <typename E, int N>
struct alignas(16) Vec {
  E v[N];
};

// N elements from a 16-byte-aligned address, with 16-byte loads.
template <typename E, int N>
__device__ __forceinline__ Vec<E, N> load_vec(const E* p) {
  return *reinterpret_cast<const Vec<E, N>*>(p);
}

// What the next product multiplies: on tensor cores v in T (TF32 for float), else as computed.
template <bool kTensorCores, typename T>
__device__ __forceinline__ operand_t<T, kTensorCores> operand(T v) {
  if constexpr (kTensorCores) {
    return math::tensor_operand(v);
  } else {
    return to_acc(v);
  }
}
template <bool kTensorCores, typename T>
__device__ __forceinline__ operand_t<T, kTensorCores> operand_from_acc(acc_t<T> v) {
  if constexpr (kTensorCores) {
    return math::tensor_operand(from_acc<T>(v));
  } else {
    return v;
  }
}

// ---- Resident weights --------------------------------------------------------------------------

// Where a phase's weight slice comes from: R[m][k] is a row of w (forward) or a column (backward).
template <typename T>
struct WeightSource {
  const T* w;
  int64_t ld;       // elements between rows of w
  bool by_column;   // R's rows are columns of w
  int count;        // columns of the phase per direction: H or P (gate q's rows start at q * count)
  int column0;      // the block's first column
  int columns;      // the block's columns
};

// R[m][k], zero beyond the block's columns and beyond K.
template <typename T>
__device__ __forceinline__ T weight_at(const WeightSource<T>& src, const PersistentPhase& ph,
                                       int m, int k) {
  const T zero = from_acc<T>(acc_t<T>(0));
  if (k >= ph.k) return zero;
  int gate = 0, column = m;
  if (ph.gates > 1) {
    gate = m / ph.block_columns;
    column = m % ph.block_columns;
    if (gate >= ph.gates) return zero;
  }
  if (column >= src.columns) return zero;
  const int64_t c = src.column0 + column;
  return src.by_column ? src.w[static_cast<int64_t>(k) * src.ld + c]
                       : src.w[(gate * static_cast<int64_t>(src.count) + c) * src.ld + k];
}

struct NoRegisters {};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// Tensor cores: item i of warp w is fragment (mf, kf) of R; false beyond the warp's items.
__device__ __forceinline__ bool fragment_of(const PersistentPhase& ph, int warp, int i, int* mf,
                                            int* kf) {
  if (ph.m_fragments <= kWarps) {
    *mf = warp / ph.warp_k_split;
    *kf = (warp % ph.warp_k_split) * ph.warp_fragments + i;
    return *mf < ph.m_fragments && i < ph.warp_fragments && *kf < ph.k_fragments;
  }
  *mf = warp + kWarps * (i / ph.k_fragments);
  *kf = i % ph.k_fragments;
  return *mf < ph.m_fragments;
}

namespace wmma = nvcuda::wmma;
template <typename T>
struct TensorTypes {
  using Element = T;
};
template <>
struct TensorTypes<float> {
  using Element = wmma::precision::tf32;
};
template <typename T>
using FragmentA = wmma::fragment<wmma::matrix_a, 16, 16, kFragmentK<T>,
                                 typename TensorTypes<T>::Element, wmma::row_major>;
template <typename T>
using FragmentB = wmma::fragment<wmma::matrix_b, 16, 16, kFragmentK<T>,
                                 typename TensorTypes<T>::Element, wmma::col_major>;
template <typename T>
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, kFragmentK<T>, float>;

// The weight fragments a warp keeps in registers for the whole sequence.
template <typename T, int N>
struct TensorRegisters {
  static constexpr int kCount = N;
  FragmentA<T> a[N];
};
#else
template <typename T, int N>
struct TensorRegisters {};  // no tensor-core code below sm_80: the launchers never pick it
#endif

// Loads a phase's weight slice into shared memory (and, for the first phase on tensor cores,
// registers). Every thread of the block must call it.
template <typename T, bool kTensorCores, bool kWithRegisters, typename Registers>
__device__ void load_resident(const PersistentPhase& ph, const PersistentLayout& layout,
                              unsigned char* smem, Registers& registers,
                              const WeightSource<T>& src) {
  if constexpr (!kTensorCores) {
    T* const r = reinterpret_cast<T*>(smem + ph.resident_offset);
    const int ld = ph.resident_ld;
    const int total = ph.m * ld;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      // Consecutive threads read consecutive addresses of w.
      const int m = src.by_column ? e % ph.m : e / ld;
      const int k = src.by_column ? e / ph.m : e % ld;
      r[m * ld + k] = weight_at(src, ph, m, k);
    }
    __syncthreads();
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr int FK = kFragmentK<T>;
    const int LDF = ph.fragment_ld;
    const T zero = from_acc<T>(0.0f);
    T* const base = reinterpret_cast<T*>(smem + ph.resident_offset);
    const int in_shared = ph.warp_fragments - ph.register_fragments;
    const int warps = ph.m_fragments <= kWarps ? ph.m_fragments * ph.warp_k_split : kWarps;
    const int total = warps * in_shared * 16 * FK;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int f = e / (16 * FK), r = e % (16 * FK) / FK, c = e % FK;
      int mf, kf;
      const bool used = fragment_of(ph, f / in_shared, f % in_shared + ph.register_fragments,
                                    &mf, &kf);
      base[f * 16 * LDF + r * LDF + c] =
          used ? math::tensor_operand(weight_at(src, ph, mf * 16 + r, kf * FK + c)) : zero;
    }
    if constexpr (kWithRegisters) {
      // Through a per-warp scratch fragment (the partial sums' space, unused until the first
      // product) into registers.
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      T* const scratch =
          reinterpret_cast<T*>(smem + layout.partial_offset) + warp * 16 * LDF;
#pragma unroll
      for (int i = 0; i < Registers::kCount; ++i) {
        if (i < ph.register_fragments) {
          int mf, kf;
          const bool used = fragment_of(ph, warp, i, &mf, &kf);
          for (int e = lane; e < 16 * FK; e += 32) {
            const int r = e / FK, c = e % FK;
            scratch[r * LDF + c] =
                used ? math::tensor_operand(weight_at(src, ph, mf * 16 + r, kf * FK + c)) : zero;
          }
          __syncthreads();
          wmma::load_matrix_sync(registers.a[i], scratch, LDF);
          __syncthreads();
        }
      }
    }
    __syncthreads();
#else
    __trap();
#endif
  }
}

// ---- Products ----------------------------------------------------------------------------------

// partial[s][b][m] = sum over split s's share of k of R[m][k] * X[b][k], for b < batch.
template <typename T>
__device__ void scalar_product(const PersistentPhase& ph, const PersistentLayout& layout,
                               unsigned char* smem, const acc_t<T>* x, int x_ld, int batch) {
  using Acc = acc_t<T>;
  constexpr int V = 16 / static_cast<int>(sizeof(T));  // weights per 16-byte chunk
  const T* const r = reinterpret_cast<const T*>(smem + ph.resident_offset);
  Acc* const stage = reinterpret_cast<Acc*>(smem + layout.stage_offset);
  Acc* const partial = reinterpret_cast<Acc*>(smem + layout.partial_offset);
  const int chunks = ceil_div(ph.k, V), k_padded = chunks * V;
  const int split = ph.k_split;
  const int ks = threadIdx.x % split, group = threadIdx.x / split, groups = kThreads / split;
  for (int b0 = 0; b0 < batch; b0 += layout.staged_rows) {
    const int rows = min_of(layout.staged_rows, batch - b0);
    for (int e = threadIdx.x; e < rows * k_padded; e += kThreads) {
      const int row = e / k_padded, k = e % k_padded;
      stage[row * layout.stage_ld + k] =
          k < ph.k ? x[static_cast<int64_t>(b0 + row) * x_ld + k] : Acc(0);
    }
    __syncthreads();
    const int items = ph.m * ceil_div(rows, kBatchGroup);
    for (int item = group; item < items; item += groups) {
      const int m = item % ph.m, first = item / ph.m * kBatchGroup;
      const int count = min_of(kBatchGroup, rows - first);
      Acc acc[kBatchGroup];
#pragma unroll
      for (int bb = 0; bb < kBatchGroup; ++bb) acc[bb] = Acc(0);
      const T* const w = r + m * ph.resident_ld;
      const Acc* const xs = stage + first * layout.stage_ld;
      for (int c = ks; c < chunks; c += split) {
        const Vec<T, V> wv = load_vec<T, V>(w + c * V);
#pragma unroll
        for (int bb = 0; bb < kBatchGroup; ++bb) {
          if (bb < count) {
            const Vec<Acc, V> xv = load_vec<Acc, V>(xs + bb * layout.stage_ld + c * V);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[bb] += to_acc(wv.v[v]) * xv.v[v];
          }
        }
      }
      for (int bb = 0; bb < count; ++bb) {
        partial[(static_cast<int64_t>(ks) * layout.batch_padded + b0 + first + bb) *
                    layout.partial_ld + m] = acc[bb];
      }
    }
    __syncthreads();
  }
}

// partial[s][b][m] = sum over warp split s's fragments of R[m][k] * X[b][k], for every b of the
// padded batch; X's fragments straight from the exchange buffer.
template <typename T, bool kWithRegisters, typename Registers>
__device__ void tensor_product(const PersistentPhase& ph, const PersistentLayout& layout,
                               unsigned char* smem, const Registers& registers, const T* x,
                               int x_ld) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int FK = kFragmentK<T>;
  const int LDF = ph.fragment_ld;
  const int warp = threadIdx.x / 32;
  float* const partial = reinterpret_cast<float*>(smem + layout.partial_offset);
  const int in_shared = ph.warp_fragments - ph.register_fragments;
  const T* const fragments =
      reinterpret_cast<const T*>(smem + ph.resident_offset) + warp * in_shared * 16 * LDF;
  const int n_fragments = layout.batch_padded / 16;
  if (ph.m_fragments <= kWarps) {
    const int mf = warp / ph.warp_k_split, split = warp % ph.warp_k_split;
    if (mf >= ph.m_fragments) return;
    const int k_begin = split * ph.warp_fragments;
    const int count = max_of(0, min_of(ph.warp_fragments, ph.k_fragments - k_begin));
    for (int nf = 0; nf < n_fragments; ++nf) {
      Accumulator<T> acc;
      wmma::fill_fragment(acc, 0.0f);
      const T* const xn = x + static_cast<int64_t>(nf) * 16 * x_ld + k_begin * FK;
      if constexpr (kWithRegisters) {
#pragma unroll
        for (int i = 0; i < Registers::kCount; ++i) {
          if (i < ph.register_fragments && i < count) {
            FragmentB<T> b;
            wmma::load_matrix_sync(b, xn + i * FK, x_ld);
            wmma::mma_sync(acc, registers.a[i], b, acc);
          }
        }
      }
      for (int i = ph.register_fragments; i < count; ++i) {
        FragmentA<T> a;
        FragmentB<T> b;
        wmma::load_matrix_sync(a, fragments + (i - ph.register_fragments) * 16 * LDF, LDF);
        wmma::load_matrix_sync(b, xn + i * FK, x_ld);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(
          partial + static_cast<int64_t>(split * layout.batch_padded + nf * 16) *
                        layout.partial_ld + mf * 16,
          acc, layout.partial_ld, wmma::mem_col_major);
    }
  } else {
    for (int nf = 0; nf < n_fragments; ++nf) {
      for (int local = 0; warp + kWarps * local < ph.m_fragments; ++local) {
        const int mf = warp + kWarps * local;
        Accumulator<T> acc;
        wmma::fill_fragment(acc, 0.0f);
        const T* const xn = x + static_cast<int64_t>(nf) * 16 * x_ld;
        for (int kf = 0; kf < ph.k_fragments; ++kf) {
          FragmentA<T> a;
          FragmentB<T> b;
          wmma::load_matrix_sync(a, fragments + (local * ph.k_fragments + kf) * 16 * LDF, LDF);
          wmma::load_matrix_sync(b, xn + kf * FK, x_ld);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(
            partial + static_cast<int64_t>(nf * 16) * layout.partial_ld + mf * 16, acc,
            layout.partial_ld, wmma::mem_col_major);
      }
    }
  }
#else
  __trap();
#endif
}

// One phase's product into the partial sums, visible to the whole block when it returns.
template <typename T, bool kTensorCores, bool kWithRegisters, typename Registers>
__device__ __forceinline__ void phase_product(const PersistentPhase& ph,
                                              const PersistentLayout& layout, unsigned char* smem,
                                              const Registers& registers,
                                              const operand_t<T, kTensorCores>* x, int x_ld,
                                              int batch) {
  if constexpr (kTensorCores) {
    tensor_product<T, kWithRegisters>(ph, layout, smem, registers, x, x_ld);
    __syncthreads();
  } else {
    scalar_product<T>(ph, layout, smem, x, x_ld, batch);
  }
}

// The finished sum for output row m of batch row b: the partial sums added in split order.
template <typename Acc>
__device__ __forceinline__ Acc partial_sum(const PersistentPhase& ph,
                                           const PersistentLayout& layout,
                                           const unsigned char* smem, int b, int m) {
  const Acc* const partial = reinterpret_cast<const Acc*>(smem + layout.partial_offset);
  Acc sum = partial[static_cast<int64_t>(b) * layout.partial_ld + m];
  for (int s = 1; s < ph.partial_splits; ++s) {
    sum += partial[(static_cast<int64_t>(s) * layout.batch_padded + b) * layout.partial_ld + m];
  }
  return sum;
}

// Calls f(j, b, column) for the pairs this thread owns among batch x columns: pair
// threadIdx.x + j * kThreads, for the whole sequence (so that f keeps its state in registers j).
template <typename F>
__device__ __forceinline__ void for_each_pair(int batch, int columns, F&& f) {
#pragma unroll
  for (int j = 0; j < kCells; ++j) {
    const int p = threadIdx.x + j * kThreads;
    if (p < batch * columns) f(j, p / columns, p % columns);
  }
}

// Whether step t is padding for batch row b (t >= lengths[b]).
__device__ __forceinline__ bool is_padding(const int64_t* lengths, int b, int t) {
  return lengths != nullptr && t >= lengths[b];
}

// Bit j of a mask: pair j of this thread (see for_each_pair).
__device__ __forceinline__ bool bit(unsigned mask, int j) { return ((mask >> j) & 1u) != 0; }
static_assert(kCells <= 32, "a pair's padding is a bit of one mask");

// ---- Forward -----------------------------------------------------------------------------------

template <typename T>
struct ForwardLaunch {
  PersistentForward<T> args;
  PersistentLayout layout;
};

template <typename T, bool kTensorCores, typename Registers>
__device__ __forceinline__ void forward_body(const ForwardLaunch<T>& launch) {
  using Acc = acc_t<T>;
  using Op = operand_t<T, kTensorCores>;
  const PersistentForward<T>& a = launch.args;
  const PersistentLayout& layout = launch.layout;
  unsigned char* const smem = dynamic_shared();
  const int slice = blockIdx.x % layout.blocks_per_direction;
  // Copied by value: a run-time index into the launch's parameters would go through local memory.
  PersistentForwardDirection<T> d = a.direction[0];
  if (blockIdx.x >= layout.blocks_per_direction) d = a.direction[1];
  const int B = a.batch, H = a.hidden_size, P = a.output_size, steps = a.seq_len;
  const bool projection = layout.phases == 2;
  const PersistentPhase gate_phase = layout.phase[0];
  const PersistentPhase proj_phase = layout.phase[1];
  const int unit0 = slice * gate_phase.block_columns;
  const int units = max_of(0, min_of(gate_phase.block_columns, H - unit0));
  const int out0 = projection ? slice * proj_phase.block_columns : 0;
  const int outs = projection ? max_of(0, min_of(proj_phase.block_columns, P - out0)) : 0;
  const int ld_p = exchange_ld(P), ld_h = exchange_ld(H);
  const int64_t slot = static_cast<int64_t>(layout.batch_padded) * ld_p;
  Op* const h_exchange = static_cast<Op*>(d.h_exchange);
  Op* const hidden_exchange = static_cast<Op*>(d.hidden_exchange);

  Registers registers;
  load_resident<T, kTensorCores, true>(gate_phase, layout, smem, registers,
                                       WeightSource<T>{d.w_hh, P, false, H, unit0, units});
  if (projection) {
    load_resident<T, kTensorCores, false>(proj_phase, layout, smem, registers,
                                          WeightSource<T>{d.w_hr, H, false, P, out0, outs});
  }

  // Per unit pair: c, h (carried through padded steps, without a projection), x_t W_ih^T + b,
  // and (a bit each) whether the step is padding. Per output pair (with a projection): h.
  Acc cell[kCells], carried[kCells], pre[kCells][4], carried_out[kCells];
  unsigned padded = 0, padded_out = 0;
  for_each_pair(B, units, [&](int j, int b, int u) {
    const int column = unit0 + u;
    cell[j] = d.c0[static_cast<int64_t>(b) * H + column];
    if (!projection) {
      const T h = d.h0[static_cast<int64_t>(b) * P + column];
      carried[j] = to_acc(h);
      h_exchange[slot + static_cast<int64_t>(b) * ld_p + column] = operand<kTensorCores>(h);
    }
  });
  for_each_pair(B, outs, [&](int j, int b, int p) {
    const int column = out0 + p;
    const T h = d.h0[static_cast<int64_t>(b) * P + column];
    carried_out[j] = to_acc(h);
    h_exchange[slot + static_cast<int64_t>(b) * ld_p + column] = operand<kTensorCores>(h);
  });
  // The input part of step t's gates and its padding, loaded while the previous step finishes.
  auto prefetch = [&](int t) {
    padded = padded_out = 0;
    for_each_pair(B, outs, [&](int j, int b, int) {
      padded_out |= static_cast<unsigned>(is_padding(a.lengths, b, t)) << j;
    });
    for_each_pair(B, units, [&](int j, int b, int u) {
      const int column = unit0 + u;
      padded |= static_cast<unsigned>(is_padding(a.lengths, b, t)) << j;
      const T* const x_part = d.input_gates + (static_cast<int64_t>(t) * B + b) * 4 * H + column;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        pre[j][q] = to_acc(x_part[q * H]) + (d.bias != nullptr ? d.bias[q * H + column] : Acc(0));
      }
    });
  };
  prefetch(d.reverse ? steps - 1 : 0);
  grid_sync();  // h_0 is in the exchange buffer

  for (int n = 0; n < steps; ++n) {
    const int t = d.reverse ? steps - 1 - n : n;
    const int write_slot = n & 1;
    Op* const h_next = h_exchange + write_slot * slot;
    phase_product<T, kTensorCores, true>(gate_phase, layout, smem, registers,
                                         h_exchange + (write_slot ^ 1) * slot, ld_p, B);
    for_each_pair(B, units, [&](int j, int b, int u) {
      const int column = unit0 + u;
      const int64_t row = static_cast<int64_t>(t) * B + b;
      Acc* const gates = d.gates != nullptr ? d.gates + row * 4 * H + column : nullptr;
      if (bit(padded, j)) {  // padding: c and h carried
        if (gates != nullptr) {
#pragma unroll
          for (int q = 0; q < 4; ++q) gates[q * H] = Acc(0);
        }
        if (a.training) d.cells[row * H + column] = cell[j];
        if (projection) {
          hidden_exchange[static_cast<int64_t>(b) * ld_h + column] =
              operand<kTensorCores>(from_acc<T>(Acc(0)));
        } else {
          const T h = from_acc<T>(carried[j]);
          d.y[row * a.y_ld + column] = h;
          h_next[static_cast<int64_t>(b) * ld_p + column] = operand<kTensorCores>(h);
        }
        return;
      }
      Acc z[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        z[q] = partial_sum<Acc>(gate_phase, layout, smem, b, q * gate_phase.block_columns + u) +
               pre[j][q];
      }
      const math::CellForward<Acc> next = math::cell_forward(z, cell[j]);
      cell[j] = next.c;
      const T h = from_acc<T>(next.h);
      if (a.training) d.cells[row * H + column] = cell[j];
      if (gates != nullptr) {
        gates[0] = next.i;
        gates[H] = next.f;
        gates[2 * H] = next.g;
        gates[3 * H] = next.o;
      }
      if (projection) {
        hidden_exchange[static_cast<int64_t>(b) * ld_h + column] = operand<kTensorCores>(h);
      } else {
        d.y[row * a.y_ld + column] = h;
        carried[j] = to_acc(h);
        h_next[static_cast<int64_t>(b) * ld_p + column] = operand<kTensorCores>(h);
      }
    });
    const unsigned padded_now = padded_out;
    if (n + 1 < steps) prefetch(d.reverse ? t - 1 : t + 1);
    if (projection) {
      grid_sync();  // o * tanh(c_t) of every unit is in the exchange buffer
      phase_product<T, kTensorCores, false>(proj_phase, layout, smem, registers, hidden_exchange,
                                            ld_h, B);
      for_each_pair(B, outs, [&](int j, int b, int p) {
        const int column = out0 + p;
        const int64_t row = static_cast<int64_t>(t) * B + b;
        const Acc value = bit(padded_now, j)
                              ? carried_out[j]
                              : partial_sum<Acc>(proj_phase, layout, smem, b, p);
        const T h = from_acc<T>(value);
        d.y[row * a.y_ld + column] = h;
        carried_out[j] = to_acc(h);
        h_next[static_cast<int64_t>(b) * ld_p + column] = operand<kTensorCores>(h);
      });
    }
    if (n + 1 < steps) grid_sync();  // h_t of every block is in the exchange buffer
  }
  if (!a.training) {  // c_n, where the step kernels' alternating buffers leave it
    const int64_t last = static_cast<int64_t>((steps - 1) % 2) * B;
    for_each_pair(B, units, [&](int j, int b, int u) {
      d.cells[(last + b) * H + unit0 + u] = cell[j];
    });
  }
}

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(const ForwardLaunch<T> launch) {
  if constexpr (kTensorCores) {
    forward_body<T, true, TensorRegisters<T, kForwardRegisterFragments>>(launch);
  } else {
    forward_body<T, false, NoRegisters>(launch);
  }
}

// ---- Backward ----------------------------------------------------------------------------------

template <typename T>
struct BackwardLaunch {
  PersistentBackward<T> args;
  PersistentLayout layout;
};

template <typename T, bool kTensorCores, typename Registers>
__device__ __forceinline__ void backward_body(const BackwardLaunch<T>& launch) {
  using Acc = acc_t<T>;
  using Op = operand_t<T, kTensorCores>;
  const PersistentBackward<T>& a = launch.args;
  const PersistentLayout& layout = launch.layout;
  unsigned char* const smem = dynamic_shared();
  const int slice = blockIdx.x % layout.blocks_per_direction;
  PersistentBackwardDirection<T> d = a.direction[0];
  if (blockIdx.x >= layout.blocks_per_direction) d = a.direction[1];
  const int B = a.batch, H = a.hidden_size, P = a.output_size, steps = a.seq_len;
  const bool projection = layout.phases == 2;
  // Phase 0: dL/dh received through W_hh, by column of W_hh (a hidden unit, or with a projection
  // an output). The gate gradients of the units: phase 0 too, or with a projection phase 1, whose
  // product is (grad_y + dL/dh) W_hr.
  const PersistentPhase hidden_phase = layout.phase[0];
  const PersistentPhase gate_phase = layout.phase[projection ? 1 : 0];
  const int column0 = slice * hidden_phase.block_columns;
  const int columns = max_of(0, min_of(hidden_phase.block_columns, P - column0));
  const int unit0 = slice * gate_phase.block_columns;
  const int units = max_of(0, min_of(gate_phase.block_columns, H - unit0));
  const int ld_gates = exchange_ld(4 * H), ld_p = exchange_ld(P);
  const int64_t slot = static_cast<int64_t>(layout.batch_padded) * ld_gates;
  Op* const gate_exchange = static_cast<Op*>(d.gate_exchange);
  Op* const total_exchange = static_cast<Op*>(d.total_exchange);

  Registers registers;
  load_resident<T, kTensorCores, true>(hidden_phase, layout, smem, registers,
                                       WeightSource<T>{d.w_hh, P, true, P, column0, columns});
  if (projection) {
    load_resident<T, kTensorCores, false>(gate_phase, layout, smem, registers,
                                          WeightSource<T>{d.w_hr, H, true, H, unit0, units});
  }

  // Per column pair: dL/dh received (G), grad_y of this step and of the one processed before, and
  // (a bit each) whether this step and the one processed before are padding.
  Acc received[kCells], grad_y[kCells], last_grad_y[kCells], grad_hidden[kCells];
  unsigned padded_h = 0, padded_h_before = 0;
  for_each_pair(B, columns, [&](int j, int b, int c) {
    received[j] = d.grad_h[static_cast<int64_t>(b) * P + column0 + c];
    last_grad_y[j] = Acc(0);
  });
  // Per unit pair: dL/dc, step t's saved gates, c_t and c_{t-1}, and whether t is padding.
  Acc grad_c[kCells], saved[kCells][6];
  unsigned padded = 0;
  for_each_pair(B, units, [&](int j, int b, int u) {
    grad_c[j] = d.grad_c[static_cast<int64_t>(b) * H + unit0 + u];
  });
  auto prefetch = [&](int t) {
    const bool from_initial = d.reverse ? t == steps - 1 : t == 0;
    const int t_prev = d.reverse ? t + 1 : t - 1;
    padded_h = padded = 0;
    for_each_pair(B, columns, [&](int j, int b, int c) {
      grad_y[j] = to_acc(d.grad_y[(static_cast<int64_t>(t) * B + b) * a.y_ld + column0 + c]);
      padded_h |= static_cast<unsigned>(is_padding(a.lengths, b, t)) << j;
    });
    for_each_pair(B, units, [&](int j, int b, int u) {
      const int column = unit0 + u;
      padded |= static_cast<unsigned>(is_padding(a.lengths, b, t)) << j;
      const Acc* const gates = d.gates + (static_cast<int64_t>(t) * B + b) * 4 * H + column;
#pragma unroll
      for (int q = 0; q < 4; ++q) saved[j][q] = gates[q * H];
      saved[j][4] = d.cells[(static_cast<int64_t>(t) * B + b) * H + column];
      saved[j][5] = from_initial ? d.c0[static_cast<int64_t>(b) * H + column]
                                 : d.cells[(static_cast<int64_t>(t_prev) * B + b) * H + column];
    });
  };
  const Op zero = operand_from_acc<kTensorCores, T>(Acc(0));
  prefetch(d.reverse ? 0 : steps - 1);

  // Step n processes t (from the last step of the forward order to the first); n = steps only
  // finishes dL/dh_0. The received product at n uses dL/dz of the step processed at n - 1.
  for (int n = 0; n <= steps; ++n) {
    const int t = d.reverse ? n : steps - 1 - n;
    const int write_slot = n & 1;
    if (n > 0) {
      phase_product<T, kTensorCores, true>(hidden_phase, layout, smem, registers,
                                           gate_exchange + (write_slot ^ 1) * slot, ld_gates, B);
    }
    for_each_pair(B, columns, [&](int j, int b, int c) {
      const int column = column0 + c;
      Acc g = received[j];
      if (n > 0) {
        const Acc product = partial_sum<Acc>(hidden_phase, layout, smem, b, c);
        // After a padded step the state was carried: so is its whole dL/dh.
        g = bit(padded_h_before, j) ? product + (last_grad_y[j] + received[j]) : product;
      }
      received[j] = g;
      if (n == steps) {
        d.grad_h[static_cast<int64_t>(b) * P + column] = g;
        return;
      }
      last_grad_y[j] = grad_y[j];
      const Acc total = grad_y[j] + g;
      if (projection) {
        d.grad_proj_out[(static_cast<int64_t>(t) * B + b) * P + column] = from_acc<T>(total);
        total_exchange[static_cast<int64_t>(b) * ld_p + column] =
            operand_from_acc<kTensorCores, T>(total);
      } else {
        grad_hidden[j] = total;
      }
    });
    if (n == steps) break;
    if (projection) {
      grid_sync();  // grad_y[t] + dL/dh_t of every output is in the exchange buffer
      phase_product<T, kTensorCores, false>(gate_phase, layout, smem, registers, total_exchange,
                                            ld_p, B);
    }
    Op* const gates_next = gate_exchange + write_slot * slot;
    for_each_pair(B, units, [&](int j, int b, int u) {
      const int column = unit0 + u;
      const int64_t row = static_cast<int64_t>(t) * B + b;
      const Acc dh = projection ? partial_sum<Acc>(gate_phase, layout, smem, b, u) : grad_hidden[j];
      T* const grad_gates = d.grad_gates + row * 4 * H + column;
      Op* const exchange = gates_next + static_cast<int64_t>(b) * ld_gates + column;
      if (bit(padded, j)) {  // padding: the state was carried, and so is dL/dc
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          grad_gates[q * H] = from_acc<T>(Acc(0));
          exchange[q * H] = zero;
        }
        if (projection) d.hidden_all[row * H + column] = from_acc<T>(Acc(0));
        return;
      }
      const Acc i = saved[j][0], f = saved[j][1], g = saved[j][2], o = saved[j][3];
      const Acc tc = tanh_of(saved[j][4]);
      const math::CellBackward<Acc> grad =
          math::cell_backward(i, f, g, o, tc, saved[j][5], dh, grad_c[j]);
      grad_c[j] = grad.grad_c_prev;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        grad_gates[q * H] = from_acc<T>(grad.dz[q]);
        exchange[q * H] = operand_from_acc<kTensorCores, T>(grad.dz[q]);
      }
      if (projection) d.hidden_all[row * H + column] = from_acc<T>(o * tc);
    });
    padded_h_before = padded_h;
    if (n + 1 < steps) prefetch(d.reverse ? t + 1 : t - 1);
    grid_sync();  // dL/dz_t of every unit is in the exchange buffer
  }
  for_each_pair(B, units, [&](int j, int b, int u) {
    d.grad_c[static_cast<int64_t>(b) * H + unit0 + u] = grad_c[j];
  });
}

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_kernel(const BackwardLaunch<T> launch) {
  if constexpr (kTensorCores) {
    backward_body<T, true, TensorRegisters<T, kBackwardRegisterFragments>>(launch);
  } else {
    backward_body<T, false, NoRegisters>(launch);
  }
}

// ---- Plan --------------------------------------------------------------------------------------

// The persistent kernel's side of the cost model (see cost in lstm_kernels.h): per step, the
// measured floors and estimates of the rates a block reaches.
using cost::kFmaPerUsPerSm;
using cost::kL2BytesPerUs;
using cost::kTensorMacsPerUsPerSm;
constexpr double kGridBarrierUs = 1.3;      // a cooperative grid sync, any block count (measured)
constexpr double kPhaseLatencyUs = 0.6;     // L2 round trips per phase: operand, then outputs
constexpr double kL2BytesPerUsPerSm = 1.0e5;      // one multiprocessor's share
constexpr double kSharedBytesPerUsPerSm = 2.0e5;  // 128 bytes per cycle

template <typename T>
double fma_rate() {
  return kFmaPerUsPerSm / (std::is_same_v<T, double> ? 2.0 : 1.0);
}
template <typename T>
double tensor_rate() {
  return kTensorMacsPerUsPerSm / (std::is_same_v<T, float> ? 2.0 : 1.0);  // TF32: half rate
}

template <typename T>
double estimate_persistent_us(const PersistentLayout& layout, int batch) {
  const bool tc = layout.tensor_cores;
  const double operand_bytes = tc ? sizeof(T) : sizeof(acc_t<T>);
  double total = 0;
  for (int p = 0; p < layout.phases; ++p) {
    const PersistentPhase& ph = layout.phase[p];
    const double x_bytes = static_cast<double>(layout.batch_padded) * ph.k * operand_bytes;
    const double aggregate = layout.blocks * x_bytes / kL2BytesPerUs;
    double compute, shared;
    if (tc) {
      const double n_fragments = layout.batch_padded / 16;
      compute = static_cast<double>(ph.m) * layout.batch_padded * ph.k / tensor_rate<T>();
      // Unpadded fragment rows are read with two-way bank conflicts.
      const double conflicts = ph.fragment_ld == kFragmentK<T> ? 2.0 : 1.0;
      shared = static_cast<double>(ph.m) * ph.k * sizeof(T) * n_fragments * conflicts *
               (1.0 - static_cast<double>(ph.register_fragments) /
                          std::max(1, ph.warp_fragments)) / kSharedBytesPerUsPerSm;
    } else {
      const double groups = ceil_div(batch, kBatchGroup);
      compute = static_cast<double>(ph.m) * batch * ph.k / fma_rate<T>();
      // Each weight chunk once per batch group; the staged operand once per row of R, but
      // broadcast to the 32 / k_split rows that a warp's lanes read at once.
      shared = (static_cast<double>(ph.m) * ph.k * sizeof(T) * groups +
                static_cast<double>(ph.m) * batch * ph.k * sizeof(acc_t<T>) * ph.k_split / 32) /
               kSharedBytesPerUsPerSm;
    }
    const int stages = tc ? 1 : ceil_div(batch, std::max(1, layout.staged_rows));
    const double block = x_bytes / kL2BytesPerUsPerSm + std::max(compute, shared) +
                         (stages - 1) * kPhaseLatencyUs;
    total += kGridBarrierUs + kPhaseLatencyUs + std::max(aggregate, block);
  }
  return total;
}

// The shapes of a problem's phases: columns, gate rows per column, K.
struct PhaseShape {
  int columns, gates, k;
};

int phase_shapes(const PersistentProblem& pr, PhaseShape (&shapes)[2]) {
  const int H = pr.hidden_size, P = pr.output_size;
  if (!pr.backward) {
    shapes[0] = {H, 4, P};  // the gates: rows of W_hh
    shapes[1] = {P, 1, H};  // the projection: rows of W_hr
  } else if (pr.projection) {
    shapes[0] = {P, 1, 4 * H};  // dL/dh by output: columns of W_hh
    shapes[1] = {H, 1, P};      // the gate gradients: columns of W_hr
  } else {
    shapes[0] = {H, 1, 4 * H};  // dL/dh and the gate gradients by unit: columns of W_hh
  }
  return pr.projection ? 2 : 1;
}

void set_reason(char (&reason)[256], const char* format, ...) {
  va_list arguments;
  va_start(arguments, format);
  std::vsnprintf(reason, sizeof reason, format, arguments);
  va_end(arguments);
}

// The layout with `blocks` blocks per direction; false (and why) if it does not fit.
// Layouts: scalar, or on tensor cores with padded or (denser, slower) unpadded fragment rows.
enum class Storage { kScalar, kPaddedFragments, kDenseFragments };

template <typename T>
bool make_layout(const PersistentProblem& pr, int blocks, Storage storage,
                 const PersistentDevice& device, PersistentLayout* out, char (&reason)[256]) {
  const bool tc = storage != Storage::kScalar;
  using Acc = acc_t<T>;
  PersistentLayout layout{};
  layout.tensor_cores = tc;
  layout.blocks_per_direction = blocks;
  layout.blocks = blocks * pr.directions;
  PhaseShape shapes[2];
  layout.phases = phase_shapes(pr, shapes);
  layout.batch_padded = tc ? round_up(pr.batch, 16) : pr.batch;
  int offset = 0, max_m = 0, max_k = 0, max_splits = 1;
  for (int p = 0; p < layout.phases; ++p) {
    PersistentPhase& ph = layout.phase[p];
    ph.columns = shapes[p].columns;
    ph.block_columns = ceil_div(ph.columns, blocks);
    ph.gates = shapes[p].gates;
    ph.k = shapes[p].k;
    if (static_cast<int64_t>(pr.batch) * ph.block_columns > int64_t{kThreads} * kCells) {
      set_reason(reason,
                 "batch %d x %d columns per block (at %d blocks per direction) exceeds the %d "
                 "(row, column) pairs whose state a block keeps in registers",
                 pr.batch, ph.block_columns, blocks, kThreads * kCells);
      return false;
    }
    ph.m = ph.gates * ph.block_columns;
    int bytes;
    if (tc) {
      ph.m = round_up(ph.m, 16);
      ph.m_fragments = ph.m / 16;
      ph.k_fragments = ceil_div(ph.k, kFragmentK<T>);
      int warps;
      if (ph.m_fragments <= kWarps) {
        ph.warp_k_split = std::max(1, std::min(kWarps / ph.m_fragments, ph.k_fragments));
        ph.warp_fragments = ceil_div(ph.k_fragments, ph.warp_k_split);
        const int registers = pr.backward ? kBackwardRegisterFragments : kForwardRegisterFragments;
        ph.register_fragments = p == 0 ? std::min(registers, ph.warp_fragments) : 0;
        warps = ph.m_fragments * ph.warp_k_split;
      } else {
        ph.warp_k_split = 1;
        ph.warp_fragments = ceil_div(ph.m_fragments, kWarps) * ph.k_fragments;
        ph.register_fragments = 0;
        warps = kWarps;
      }
      ph.partial_splits = ph.warp_k_split;
      ph.fragment_ld = storage == Storage::kPaddedFragments
                           ? kPaddedFragmentRowBytes / static_cast<int>(sizeof(T))
                           : kFragmentK<T>;
      bytes = warps * (ph.warp_fragments - ph.register_fragments) * 16 * ph.fragment_ld *
              static_cast<int>(sizeof(T));
    } else {
      constexpr int V = 16 / static_cast<int>(sizeof(T));
      const int chunks = ceil_div(ph.k, V);
      const int items = ph.m * ceil_div(pr.batch, kBatchGroup);
      int split = 1;
      while (split < 32 && 2 * split * items <= kThreads && 2 * split <= chunks) split *= 2;
      ph.k_split = split;
      ph.partial_splits = split;
      // Rows 16 * split bytes apart (mod 128) keep a warp's 16-byte loads free of bank conflicts.
      int row_bytes = round_up(ph.k * static_cast<int>(sizeof(T)), 16);
      if (split < 8) {
        while (row_bytes % 128 != (16 * split) % 128) row_bytes += 16;
      }
      ph.resident_ld = row_bytes / static_cast<int>(sizeof(T));
      bytes = ph.m * row_bytes;
    }
    ph.resident_offset = offset;
    offset += round_up(bytes, kAlign);
    max_m = std::max(max_m, ph.m);
    max_k = std::max(max_k, ph.k);
    max_splits = std::max(max_splits, ph.partial_splits);
  }
  layout.partial_ld = tc ? max_m + 4 : max_m;
  int partial_bytes = max_splits * layout.batch_padded * layout.partial_ld *
                      static_cast<int>(tc ? sizeof(float) : sizeof(Acc));
  if (tc) partial_bytes = std::max(partial_bytes, kWarps * kFragmentBytes);  // the fill's scratch
  layout.partial_offset = offset;
  offset += round_up(partial_bytes, kAlign);
  if (!tc) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    layout.stage_ld = round_up(round_up(max_k, V), 16 / static_cast<int>(sizeof(Acc)));
    const int row_bytes = layout.stage_ld * static_cast<int>(sizeof(Acc));
    const int left = device.shared_bytes_per_block - offset;
    layout.staged_rows = std::min(pr.batch, std::max(0, left / row_bytes));
    layout.stage_offset = offset;
    offset += round_up(std::max(1, layout.staged_rows) * row_bytes, kAlign);
  }
  layout.shared_bytes = offset;
  if (offset > device.shared_bytes_per_block) {
    set_reason(reason,
               "the weights need %d KiB of shared memory per block at %d blocks per direction "
               "(%d columns each%s), above the device's %d KiB per block",
               ceil_div(offset, 1024), blocks, layout.phase[0].block_columns,
               tc ? ", beyond what registers hold" : "",
               device.shared_bytes_per_block / 1024);
    return false;
  }
  *out = layout;
  return true;
}

template <typename Launch>
cudaError_t blocks_per_multiprocessor(void (*kernel)(Launch), int shared_bytes, int* blocks) {
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (error == cudaSuccess) {
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, shared_bytes);
  }
  return error;
}

template <typename T>
cudaError_t occupancy_of(const PersistentLayout& layout, bool backward, int* blocks) {
  if constexpr (kTensorCoreType<T>) {
    if (layout.tensor_cores) {
      return backward ? blocks_per_multiprocessor(persistent_backward_kernel<T, true>,
                                                  layout.shared_bytes, blocks)
                      : blocks_per_multiprocessor(persistent_forward_kernel<T, true>,
                                                  layout.shared_bytes, blocks);
    }
  }
  return backward ? blocks_per_multiprocessor(persistent_backward_kernel<T, false>,
                                              layout.shared_bytes, blocks)
                  : blocks_per_multiprocessor(persistent_forward_kernel<T, false>,
                                              layout.shared_bytes, blocks);
}

template <typename Launch>
cudaError_t launch(void (*kernel)(Launch), const Launch& arguments, const PersistentLayout& layout,
                   cudaStream_t stream) {
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           layout.shared_bytes);
  if (error != cudaSuccess) return error;
#ifdef LSTM_FUSED_EMULATE_CUDA
  error = ::cuda_emulation::launch_cooperative(kernel, dim3(layout.blocks), dim3(kThreads),
                                               layout.shared_bytes, stream, arguments);
#else
  void* parameters[] = {const_cast<Launch*>(&arguments)};
  error = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(layout.blocks),
                                      dim3(kThreads), parameters, layout.shared_bytes, stream);
#endif
  if (error == cudaErrorCooperativeLaunchTooLarge) cudaGetLastError();  // not sticky: cleared
  return error;
}

}  // namespace

cudaError_t query_persistent_device(int device, PersistentDevice* out) {
  int multiprocessors = 0, shared = 0, cooperative = 0;
  cudaError_t error = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount,
                                             device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  }
  *out = PersistentDevice{multiprocessors, shared, cooperative != 0};
  return error;
}

int persistent_exchange_ld(int k) { return exchange_ld(k); }

template <typename T>
int persistent_operand_bytes(bool tensor_cores) {
  return tensor_cores ? static_cast<int>(sizeof(T)) : static_cast<int>(sizeof(acc_t<T>));
}

template <typename T>
PersistentPlan plan_persistent(const PersistentProblem& pr, const PersistentDevice& device) {
  PersistentPlan plan{};
  plan.feasible = false;
  if (!device.cooperative_launch) {
    set_reason(plan.reason, "the device does not support cooperative launches");
    return plan;
  }
  const int per_direction = device.multiprocessors / std::max(1, pr.directions);
  if (per_direction < 1 || pr.batch < 1 || pr.hidden_size < 1) {
    set_reason(plan.reason, "%d multiprocessors for %d directions", device.multiprocessors,
               pr.directions);
    return plan;
  }
  // Where tensor cores may be used, the scalar layout (exact float32 for TF32) is the fallback
  // for weights beyond what the tensor-core layouts hold; the cost model picks among those that
  // fit (the last one's reason says why none does).
  const bool tc = pr.tensor_cores && kTensorCoreType<T>;
  const Storage storages[] = {Storage::kPaddedFragments, Storage::kDenseFragments,
                              Storage::kScalar};
  const int widest = std::max(pr.hidden_size, pr.projection ? pr.output_size : 0);
  double best = std::numeric_limits<double>::infinity();
  for (int option = tc ? 0 : 2; option < 3; ++option) {
    const Storage storage = storages[option];
    if (storage == Storage::kScalar && tc && best < std::numeric_limits<double>::infinity()) {
      break;  // tensor cores fit: no need of the scalar layout
    }
    for (int blocks = 1; blocks <= std::min(per_direction, widest); ++blocks) {
      PersistentLayout layout;
      if (!make_layout<T>(pr, blocks, storage, device, &layout, plan.reason)) continue;
      const double estimate = estimate_persistent_us<T>(layout, pr.batch);
      if (estimate < best) {
        best = estimate;
        plan.layout = layout;
      }
    }
  }
  if (best == std::numeric_limits<double>::infinity()) return plan;  // reason: the widest grid's
  int per_multiprocessor = 0;
  const cudaError_t error = occupancy_of<T>(plan.layout, pr.backward, &per_multiprocessor);
  if (error != cudaSuccess) {
    cudaGetLastError();
    set_reason(plan.reason, "the occupancy query failed: %s", cudaGetErrorString(error));
    return plan;
  }
  if (static_cast<int64_t>(per_multiprocessor) * device.multiprocessors < plan.layout.blocks) {
    set_reason(plan.reason,
               "%d blocks of %d KiB of shared memory do not fit on the device at once (%d per "
               "multiprocessor, %d multiprocessors)",
               plan.layout.blocks, ceil_div(plan.layout.shared_bytes, 1024), per_multiprocessor,
               device.multiprocessors);
    return plan;
  }
  plan.feasible = true;
  plan.reason[0] = '\0';
  plan.estimated_step_us = best;
  return plan;
}

template <typename T>
cudaError_t launch_persistent_forward(const PersistentForward<T>& args,
                                      const PersistentLayout& layout, cudaStream_t stream) {
  const ForwardLaunch<T> arguments{args, layout};
  if constexpr (kTensorCoreType<T>) {
    if (layout.tensor_cores) {
      return launch(persistent_forward_kernel<T, true>, arguments, layout, stream);
    }
  }
  return launch(persistent_forward_kernel<T, false>, arguments, layout, stream);
}

template <typename T>
cudaError_t launch_persistent_backward(const PersistentBackward<T>& args,
                                       const PersistentLayout& layout, cudaStream_t stream) {
  const BackwardLaunch<T> arguments{args, layout};
  if constexpr (kTensorCoreType<T>) {
    if (layout.tensor_cores) {
      return launch(persistent_backward_kernel<T, true>, arguments, layout, stream);
    }
  }
  return launch(persistent_backward_kernel<T, false>, arguments, layout, stream);
}

#define LSTM_FUSED_INSTANTIATE(T)                                                              \
  template int persistent_operand_bytes<T>(bool);                                             \
  template PersistentPlan plan_persistent<T>(const PersistentProblem&, const PersistentDevice&); \
  template cudaError_t launch_persistent_forward<T>(const PersistentForward<T>&,               \
                                                    const PersistentLayout&, cudaStream_t);    \
  template cudaError_t launch_persistent_backward<T>(const PersistentBackward<T>&,             \
                                                     const PersistentLayout&, cudaStream_t);

LSTM_FUSED_INSTANTIATE(float)
LSTM_FUSED_INSTANTIATE(double)
LSTM_FUSED_INSTANTIATE(__half)
LSTM_FUSED_INSTANTIATE(__nv_bfloat16)

#undef LSTM_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace lstm_fused
