// The fused LSTM step kernels for CUDA: launchers on raw pointers and a stream, no torch headers,
// so that plain nvcc compiles them anywhere.
//
// One launch per time step. A block owns a tile of hidden units (BU) and of batch rows (BM) and
// computes the recurrent product for them, then the nonlinearities and the cell update (forward)
// or the gate gradients (backward) in registers: no pre-activation is written to global memory
// and no block needs another block's results within a step. No atomics: fixed summation orders,
// so identical inputs give bitwise identical results.
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

// The block tile of a step kernel. Auto picks by batch size and block count.
enum class StepTile : int {
  kAuto = 0,
  kSmall = 1,   // 4 rows x 4 units, the product split 64 ways along K: batch <= 4
  kMedium = 2,  // 16 rows x 16 units, split 8 ways along K; on tensor cores: 16 rows
  kLarge = 3,   // 64 rows x 32 units, 8 x 2 units per thread; on tensor cores: 32 rows;
                // chosen when it gives every multiprocessor a block
};

// What the launchers need to know of the device.
struct DeviceTraits {
  int multiprocessors;  // guides the automatic tile choice
  bool tensor_cores;    // sm_80+ device and code: float16/bfloat16 medium and large tiles use wmma
  bool allow_tf32;      // and so do float32's, in TF32
};

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
                             // (with a projection their hidden_out is zero; the caller copies h)
  int64_t t;
  bool has_projection;
};

// Backward step kernels, run from the last step processed to the first. G_t is dL/dh_t received
// from the step processed after t (t_next): for its first step, dL/dh_n; after a step t_next that
// was padding for row b, grad_y[t_next] + G_{t_next}; else dL/dz_{t_next} W_hh.
enum class BackwardMode : int {
  // Without a projection (P == H): G_t from the product of a = dL/dz_{t_next} [B, 4H] with
  // w = W_hh [4H, H], then the gate gradients with dL/dh_t = grad_y[t] + G_t.
  kFused = 0,
  // G_t only, from a = dL/dz_{t_next} [B, 4H] and w = W_hh [4H, P]: with a projection, before
  // the gate kernel; for every model, once more after the last step, giving dL/dh_0.
  kHiddenGrad = 1,
  // With a projection: the gate gradients with dL/d(o tanh c_t) = the product of
  // a = grad_y[t] + G_t [B, P] with w = W_hr [P, H].
  kGates = 2,
};

template <typename T>
struct BackwardStep {
  int batch;                  // B
  int hidden_size;            // H
  int output_size;            // P
  const acc_t<T>* a;          // [B, K] left operand of the product; null: no product (first step)
  int k;                      // K
  const T* w;                 // [K, columns] right operand: columns H, or P in kHiddenGrad
  const T* grad_y;            // [B, P] grad_y[t]
  const T* grad_y_next;       // [B, P] grad_y[t_next], or null at the first step processed
  acc_t<T>* grad_h;           // [B, P] in: G_{t_next} (or dL/dh_n), out: G_t (kFused, kHiddenGrad)
  acc_t<T>* grad_total;       // [B, P] grad_y[t] + G_t, written when not null (kHiddenGrad)
  const acc_t<T>* gates;      // [B, 4H] activated gates of step t
  const acc_t<T>* cell;       // [B, H] c_t
  const acc_t<T>* c_prev;     // [B, H] c_{t-1}
  acc_t<T>* grad_c;           // [B, H] in: dL/dc_t, out: dL/dc_{t-1} (in place)
  acc_t<T>* grad_gates;       // [B, 4H] dL/dz_t, written
  T* hidden_out;              // [B, H] o tanh(c_t), written when not null (for dL/dW_hr)
  const int64_t* lengths;     // [B] or null: steps t >= lengths[b] were padding for row b
  int64_t t;
  int64_t t_next;
  bool first;                 // t is the first step processed: G_t = grad_h as given
};

// Whether the tensor-core tiles were compiled for the current device (sm_80+ code that it runs).
bool tensor_core_kernels_built();

// Each launches one kernel on `stream` and returns the launch's error (cudaSuccess if none).
template <typename T>
cudaError_t launch_forward_step(const ForwardStep<T>& step, StepTile tile,
                                const DeviceTraits& device, cudaStream_t stream);

template <typename T>
cudaError_t launch_backward_step(const BackwardStep<T>& step, BackwardMode mode, StepTile tile,
                                 const DeviceTraits& device, cudaStream_t stream);

}  // namespace cuda
}  // namespace lstm_fused
