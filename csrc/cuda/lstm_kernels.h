// The fused LSTM step kernels for CUDA: launchers on raw pointers and a stream, no torch headers,
// so that plain nvcc compiles them anywhere.
//
// One launch per time step. A block owns a tile of batch rows and hidden units and computes the
// recurrent product for them, then the nonlinearities and the cell update (forward) or the gate
// gradients (backward) in registers: no pre-activation is written to global memory and no block
// needs another block's results within a step, except that a product may be split along K over
// a few blocks (split-K), whose partial sums the last of them adds in a fixed order before the
// epilogue. No floating-point atomics: identical inputs give bitwise identical results.
//
// Every product is out[b, column] = sum_k a[b, k] * w[row(column), k] with the rows of w
// contiguous along k: the forward reads W_hh [4H, P] as it is, the backward reads transposed
// copies W_hh^T [P, 4H] and W_hr^T [H, P] that the caller makes once per call.
//
// Shapes for one step (B rows, H hidden units, P = proj_size or H). T is the storage type (float,
// double, __half, __nv_bfloat16); acc_t<T> the type of the arithmetic and of the saved state:
// double for double, float otherwise.
#pragma once

#include <cstdint>

#ifdef LSTM_FUSED_EMULATE_CUDA
#include "cuda_emulation.h"  // runs the kernels on the CPU, for tests on machines without a GPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

namespace lstm_fused {
namespace cuda {

template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// The row height of a step kernel's block tile; its width and any split of K over blocks are
// chosen for the device (see StepPlan). Auto also picks the height.
enum class StepTile : int {
  kAuto = 0,
  kSmall = 1,   // 8 rows, CUDA cores, 4 or 2 hidden units per block, K split 64-128 ways within
                // the block: batch <= 8
  kMedium = 2,  // 16 rows: tensor cores (64 columns) where the dtype allows, else CUDA cores
  kLarge = 3,   // 32 rows on tensor cores (64 columns), 64 rows x 32 units on CUDA cores
};

// What the launchers need to know of the device.
struct DeviceTraits {
  int multiprocessors;  // the tile choice gives every one of them a block
  bool tensor_cores;    // sm_80+ device and code: float16/bfloat16 medium and large tiles use wmma
  bool allow_tf32;      // and so do float32's, in TF32
};

// Scratch of the split-K products: partial sums and one counter per output tile, which must be
// zero before the first launch and which every launch leaves zero.
struct SplitWorkspace {
  void* partial_sums;  // acc_t<T>[StepPlan::partial_sums]
  int* counters;       // [StepPlan::counters]
};

// How a step kernel runs: the block tile, the split of K and the grid.
struct StepPlan {
  int rows;              // batch rows per block
  int columns;           // product columns per block (4 gates x units forward)
  bool tensor_cores;
  int split;             // blocks sharing one output tile along K (1: no split)
  int64_t blocks;        // the whole grid
  int64_t partial_sums;  // workspace elements needed (0 without a split)
  int64_t counters;
  double estimated_us;   // the cost model's time of the launch
};

// The cost model that the dispatch compares the kernel paths by (the step kernels' plans here,
// the persistent kernel's in lstm_persistent.cu): per-launch and per-multiprocessor rates of an
// H100, the same chip as an H200's. Only the comparison matters; benchmarks/bench_lstm.py times
// both paths for calibration.
namespace cost {
constexpr double kLaunchUs = 4.0;                // an empty kernel launch back to back (measured)
constexpr double kL2BytesPerUs = 5.0e6;          // aggregate L2 bandwidth
constexpr double kFmaPerUsPerSm = 5.0e4;         // float32 multiply-adds of one 256-thread block
constexpr double kTensorMacsPerUsPerSm = 5.0e5;  // half-type tensor-core multiply-adds, one block
}  // namespace cost

// Forward step t: z = x_t W_ih^T + b + h_{t-1} W_hh^T; i, f, g, o = σ, σ, tanh, σ of z;
// c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
template <typename T>
struct ForwardStep {
  int batch;                 // B
  int hidden_size;           // H
  int output_size;           // P
  const T* h_prev;           // [B, P] h_{t-1}
  const acc_t<T>* c_prev;    // [B, H] c_{t-1}
  const T* w_hh;             // [4H, P]
  const T* input_gates;      // [B, 4H] x_t W_ih^T
  const acc_t<T>* bias;      // [4H] b_ih + b_hh, or null
  acc_t<T>* c_next;          // [B, H] c_t, written
  T* hidden_out;             // without projection: y[t] [B, P]; with one: o tanh(c_t) [B, H]
  acc_t<T>* gates;           // [B, 4H] activated i, f, g, o, written when not null (training)
  const int64_t* lengths;    // [B] or null: rows with t >= lengths[b] carry h and c unchanged
                             // (with a projection their hidden_out is zero and
                             // launch_carry_padded_rows copies h after the projection)
  int64_t t;
  bool has_projection;
  SplitWorkspace workspace;  // for a plan with split > 1
};

// Backward step kernels, run from the last step processed to the first. G_t is dL/dh_t received
// from the step processed after t (t_next): for its first step, dL/dh_n; after a step t_next that
// was padding for row b, grad_y[t_next] + G_{t_next}; else dL/dz_{t_next} W_hh.
enum class BackwardMode : int {
  // Without a projection (P == H): G_t from the product of a = dL/dz_{t_next} [B, 4H] with
  // w = W_hh^T [H, 4H], then the gate gradients with dL/dh_t = grad_y[t] + G_t.
  kFused = 0,
  // G_t only, from a = dL/dz_{t_next} [B, 4H] and w = W_hh^T [P, 4H]: with a projection, before
  // the gate kernel; for every model, once more after the last step, giving dL/dh_0.
  kHiddenGrad = 1,
  // With a projection: the gate gradients with dL/d(o tanh c_t) = the product of
  // a = grad_y[t] + G_t [B, P] with w = W_hr^T [H, P].
  kGates = 2,
};

template <typename T>
struct BackwardStep {
  int batch;                  // B
  int hidden_size;            // H
  int output_size;            // P
  const T* a;                 // [B, K] left operand of the product; null: no product (first step)
  int k;                      // K
  const T* w;                 // [columns, K] right operand, rows along K: columns H, or P in
                              // kHiddenGrad
  const T* grad_y;            // [B, P] grad_y[t]
  const T* grad_y_next;       // [B, P] grad_y[t_next], or null at the first step processed
  acc_t<T>* grad_h;           // [B, P] in: G_{t_next} (or dL/dh_n), out: G_t (kFused, kHiddenGrad)
  T* grad_total;              // [B, P] grad_y[t] + G_t, written when not null (kHiddenGrad)
  const acc_t<T>* gates;      // [B, 4H] activated gates of step t
  const acc_t<T>* cell;       // [B, H] c_t
  const acc_t<T>* c_prev;     // [B, H] c_{t-1}
  acc_t<T>* grad_c;           // [B, H] in: dL/dc_t, out: dL/dc_{t-1} (in place)
  T* grad_gates;              // [B, 4H] dL/dz_t, written (in T: the next step's operand)
  T* hidden_out;              // [B, H] o tanh(c_t), written when not null (for dL/dW_hr)
  const int64_t* lengths;     // [B] or null: steps t >= lengths[b] were padding for row b
  int64_t t;
  int64_t t_next;
  bool first;                 // t is the first step processed: G_t = grad_h as given
  SplitWorkspace workspace;   // for a plan with split > 1
};

// Whether the tensor-core tiles were compiled for the current device (sm_80+ code that it runs).
bool tensor_core_kernels_built();

// The plan a launch with these sizes (pointers are not read) would follow; the workspace the
// caller provides must hold what it names.
template <typename T>
StepPlan forward_step_plan(const ForwardStep<T>& step, StepTile tile, const DeviceTraits& device);
template <typename T>
StepPlan backward_step_plan(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                            const DeviceTraits& device);

// Each launches one kernel on `stream` and returns the launch's error (cudaSuccess if none).
template <typename T>
cudaError_t launch_forward_step(const ForwardStep<T>& step, StepTile tile,
                                const DeviceTraits& device, cudaStream_t stream);

template <typename T>
cudaError_t launch_backward_step(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                                 const DeviceTraits& device, cudaStream_t stream);

// y_t[b] = h_prev[b] for the rows b with t >= lengths[b] (y_t, h_prev: [B, P]): the carried
// state of padded steps, after the projection of a step has written every row.
template <typename T>
cudaError_t launch_carry_padded_rows(T* y_t, const T* h_prev, const int64_t* lengths, int64_t t,
                                     int batch, int output_size, cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
