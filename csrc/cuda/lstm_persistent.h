// The persistent LSTM kernels for CUDA: a whole sequence in one cooperative launch. Launchers on
// raw pointers and a stream, no torch headers, so that plain nvcc compiles them anywhere.
//
// Forward: each block owns a slice of the hidden units of one direction and keeps its four gates'
// rows of W_hh on chip (registers and shared memory) for all T steps. Per step it reads h_{t-1}
// (from L2), computes its gates, updates c in registers, writes its slice of h_t, then waits at a
// grid-wide barrier. With a projection a second phase follows: each block owns a slice of the
// outputs, keeps its rows of W_hr on chip and maps o * tanh(c_t) to h_t, then another barrier.
// Backward: one launch back in time; each block owns columns of W_hh (the same units), so that
// dL/dh_{t-1} of its units is one product with dL/dz_t and needs no cross-block reduction and no
// atomics; with a projection, a first phase owns columns of W_hh by output and a second the
// columns of W_hr by unit. Both directions of a bidirectional layer can share one launch (half
// of the blocks each). Fixed summation orders: identical inputs give bitwise identical results.
//
// Shapes (T steps, B rows, H hidden units, P = proj_size or H), per direction; y and grad_y may
// hold both directions side by side (row stride 2P), see y_ld.
#pragma once

#include <cstdint>

#include "lstm_kernels.h"

namespace lstm_fused {
namespace cuda {

// What the persistent path needs to know of the device.
struct PersistentDevice {
  int multiprocessors;
  int shared_bytes_per_block;  // the opt-in maximum of dynamic shared memory per block
  bool cooperative_launch;     // cudaDevAttrCooperativeLaunch
};

// Reads the device's attributes (cudaDeviceGetAttribute).
cudaError_t query_persistent_device(int device, PersistentDevice* out);

// The recurrence a persistent launch is planned for.
struct PersistentProblem {
  int seq_len;      // T (the cost model's only use of it: one launch's fixed costs per sequence)
  int batch;        // B
  int hidden_size;  // H
  int output_size;  // P
  int directions;   // 1, or 2: both directions of a layer in one launch
  bool projection;  // w_hr given: two phases per step
  bool backward;    // the backward recurrence, else the forward one
  bool tensor_cores;  // products on tensor cores: float16/bfloat16, and float32 as TF32
};

// One phase of a step: the product of a block's resident weight slice R [m x K] with an operand X
// [B x K] read from global memory (h_{t-1}, o * tanh(c_t), dL/dz or dL/dh), then an update of
// the (row, column) pairs the block owns. Columns are hidden units or projection outputs.
struct PersistentPhase {
  int columns;          // of the phase per direction: H or P
  int block_columns;    // per block (the last block of a direction may have fewer)
  int gates;            // rows per column: 4 (the forward gate phase: row q * block_columns + u
                        // is gate q of column u), else 1
  int k;                // K of the product
  int m;                // rows of R: gates * block_columns, padded to 16 on tensor cores
  int resident_offset;  // bytes into the block's dynamic shared memory
  // Scalar products: R row-major with resident_ld elements per row; the K split.
  int resident_ld;
  int k_split;          // threads sharing one (row, 4 batch rows) item along K
  // Tensor cores: 16-row fragments along m, FK-deep (16, or 8 for TF32) along K.
  int m_fragments;
  int k_fragments;
  int warp_k_split;     // warps sharing one m-fragment along K (1 when m_fragments >= warps)
  int warp_fragments;   // (m, k) fragments per warp
  int register_fragments;  // of them held in registers for the whole sequence
  int fragment_ld;      // elements per fragment row in shared memory: FK, or FK and 16 bytes of
                        // padding (free of bank conflicts) where that still fits
  int partial_splits;   // partial sums added per output: k_split or warp_k_split
};

// Where everything lies in a block's dynamic shared memory, and how the work is split: what the
// kernels need of the plan.
struct PersistentLayout {
  bool tensor_cores;
  int blocks_per_direction;
  int blocks;           // directions * blocks_per_direction
  int phases;           // 1, or 2 with a projection
  PersistentPhase phase[2];
  int batch_padded;     // rows of the operands in the exchange buffers: B, padded to 16 on tensor
                        // cores (the padding rows stay zero)
  int staged_rows;      // scalar: operand rows staged in shared memory at once
  int stage_ld;         // scalar: elements per staged row
  int stage_offset;     // scalar: bytes into shared memory
  int partial_offset;   // bytes into shared memory of the partial sums [splits][rows][partial_ld]
  int partial_ld;
  int shared_bytes;     // dynamic shared memory per block
};

struct PersistentPlan {
  bool feasible;
  char reason[256];     // why not, when infeasible
  PersistentLayout layout;
  double estimated_step_us;  // the cost model's time per step (see cost in lstm_kernels.h)
};

// The layout of the launch for `problem` on `device`, or why there is none (W_hh beyond the
// device's on-chip memory, more (row, column) pairs per block than its threads hold, no
// cooperative launch, too few multiprocessors). Chooses the block count by the cost model.
template <typename T>
PersistentPlan plan_persistent(const PersistentProblem& problem, const PersistentDevice& device);

// The exchange buffers through which blocks pass h_t, dL/dz_t (and with a projection o * tanh(c_t)
// or grad_y[t] + dL/dh_t) from one phase to the next: per direction [layout.batch_padded]
// [persistent_exchange_ld(K)] elements of persistent_operand_bytes each (T on tensor cores, else
// the arithmetic type), two such slots where the layout says [2, ...], zero-filled by the caller.
int persistent_exchange_ld(int k);
template <typename T>
int persistent_operand_bytes(bool tensor_cores);

// One direction of a forward launch.
template <typename T>
struct PersistentForwardDirection {
  const T* input_gates;      // [T, B, 4H] x_t W_ih^T of every step
  const acc_t<T>* bias;      // [4H] b_ih + b_hh, or null
  const T* w_hh;             // [4H, P]
  const T* w_hr;             // [P, H], or null
  const T* h0;               // [B, P]
  const acc_t<T>* c0;        // [B, H]
  T* y;                      // [T, B, y_ld]: h_t of every step (the carried state where padded)
  acc_t<T>* cells;           // training: [T, B, H] c_t; else [2, B, H], c_n left at (T - 1) % 2
  acc_t<T>* gates;           // [T, B, 4H] activated i, f, g, o, or null (not training)
  void* h_exchange;          // [2, batch_padded, ld(P)] h_t for the next step, zero-filled
  void* hidden_exchange;     // with a projection: [batch_padded, ld(H)] o * tanh(c_t), zero-filled
  bool reverse;
};

template <typename T>
struct PersistentForward {
  int seq_len;               // T
  int batch;                 // B
  int hidden_size;           // H
  int output_size;           // P
  int64_t y_ld;              // elements between rows of y: P, or 2P for both directions in one y
  const int64_t* lengths;    // [B] or null: rows with t >= lengths[b] carry h and c unchanged
  bool training;
  PersistentForwardDirection<T> direction[2];
};

// One direction of a backward launch (the semantics of the fused-step backward, see BackwardStep).
template <typename T>
struct PersistentBackwardDirection {
  const T* w_hh;             // [4H, P]
  const T* w_hr;             // [P, H], or null
  const T* grad_y;           // [T, B, y_ld] dL/dy_t
  const acc_t<T>* gates;     // [T, B, 4H] saved activated gates
  const acc_t<T>* cells;     // [T, B, H] saved c_t
  const acc_t<T>* c0;        // [B, H]
  acc_t<T>* grad_h;          // [B, P] in: dL/dh_n, out: dL/dh_0
  acc_t<T>* grad_c;          // [B, H] in: dL/dc_n, out: dL/dc_0
  T* grad_gates;             // [T, B, 4H] dL/dz_t, written (in T, as the weight GEMMs take it)
  T* grad_proj_out;          // with a projection: [T, B, P] grad_y[t] + dL/dh_t, written
  T* hidden_all;             // with a projection: [T, B, H] o * tanh(c_t), written
  void* gate_exchange;       // [2, batch_padded, ld(4H)] dL/dz for the next step, zero-filled
  void* total_exchange;      // with a projection: [batch_padded, ld(P)], zero-filled
  bool reverse;
};

template <typename T>
struct PersistentBackward {
  int seq_len;
  int batch;
  int hidden_size;
  int output_size;
  int64_t y_ld;              // elements between rows of grad_y
  const int64_t* lengths;
  PersistentBackwardDirection<T> direction[2];
};

// One cooperative launch on `stream` per call; returns its error (cudaSuccess if none). A launch
// that the device refuses (cudaErrorCooperativeLaunchTooLarge where fewer blocks fit at once than
// the occupancy promised, as under an MPS limit) returns before anything is written, and the
// error is cleared: the caller may run the fused-step kernels instead.
template <typename T>
cudaError_t launch_persistent_forward(const PersistentForward<T>& args,
                                      const PersistentLayout& layout, cudaStream_t stream);
template <typename T>
cudaError_t launch_persistent_backward(const PersistentBackward<T>& args,
                                       const PersistentLayout& layout, cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
