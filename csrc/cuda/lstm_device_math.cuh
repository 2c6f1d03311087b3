// Element conversions and the LSTM nonlinearities for the CUDA kernels, the same in every kernel
// so that their results agree: accurate library functions, not the fast intrinsics, since results
// are compared with nn.LSTM.
#pragma once

#include <type_traits>

#ifdef LSTM_FUSED_EMULATE_CUDA
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace lstm_fused {
namespace cuda {
namespace math {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// v rounded to T (to nearest even for the half types).
template <typename T>
__device__ __forceinline__ T from_acc(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "a storage type");
    return __float2bfloat16_rn(v);
  }
}
template <typename T>
__device__ __forceinline__ std::enable_if_t<std::is_same_v<T, double>, T> from_acc(double v) {
  return v;
}

// *p = v rounded to p's type.
template <typename T, typename Acc>
__device__ __forceinline__ void store(T* p, Acc v) {
  *p = from_acc<T>(v);
}

// An element of a tensor-core operand: float rounded to TF32 (nearest, ties away, as
// __float_to_tf32), the half types as they are.
template <typename T>
__device__ __forceinline__ T tensor_operand(T v) {
  if constexpr (std::is_same_v<T, float>) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    return nvcuda::wmma::__float_to_tf32(v);
#else
    return v;
#endif
  } else {
    return v;
  }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

// One (row, unit) of a forward step from its gates' pre-activations z (i, f, g, o) and c_{t-1}:
// i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of z; c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
template <typename Acc>
struct CellForward {
  Acc i, f, g, o, c, h;
};

template <typename Acc>
__device__ __forceinline__ CellForward<Acc> cell_forward(const Acc (&z)[4], Acc c_prev) {
  CellForward<Acc> s;
  s.i = sigmoid(z[0]);
  s.f = sigmoid(z[1]);
  s.g = tanh_of(z[2]);
  s.o = sigmoid(z[3]);
  s.c = s.f * c_prev + s.i * s.g;
  s.h = s.o * tanh_of(s.c);
  return s;
}

// One (row, unit) of a backward step: from the saved gates, tanh(c_t), c_{t-1}, dL/dh_t and the
// dL/dc_t carried from step t + 1, the gate gradients dL/dz_t (i, f, g, o) and dL/dc_{t-1}.
template <typename Acc>
struct CellBackward {
  Acc dz[4];
  Acc grad_c_prev;
};

template <typename Acc>
__device__ __forceinline__ CellBackward<Acc> cell_backward(Acc i, Acc f, Acc g, Acc o, Acc tanh_c,
                                                           Acc c_prev, Acc grad_h, Acc grad_c) {
  CellBackward<Acc> s;
  const Acc dc = grad_c + grad_h * o * (Acc(1) - tanh_c * tanh_c);
  s.dz[0] = dc * g * i * (Acc(1) - i);
  s.dz[1] = dc * c_prev * f * (Acc(1) - f);
  s.dz[2] = dc * i * (Acc(1) - g * g);
  s.dz[3] = grad_h * tanh_c * o * (Acc(1) - o);
  s.grad_c_prev = dc * f;
  return s;
}

__host__ __device__ __forceinline__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ constexpr int round_up(int a, int b) {
  return ceil_div(a, b) * b;
}
// std::min and std::max are host functions (constexpr, usable on the device only with nvcc's
// --expt-relaxed-constexpr).
__host__ __device__ __forceinline__ constexpr int min_of(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ constexpr int max_of(int a, int b) { return a > b ? a : b; }

}  // namespace math
}  // namespace cuda
}  // namespace lstm_fused
