// CUDA implementation of the lstm_fused ops: checks, allocation, device guard, current stream,
// dtype dispatch and the sequence of launches; the kernels are in lstm_kernels.cu.
//
// Forward: the input projection of every step as one GEMM, then per step one fused kernel
// (recurrent product, biases, nonlinearities, cell update). With a projection the kernel writes
// o * tanh(c_t) and a GEMM per step maps it to y[t] (the projection needs every unit of h_t,
// which no block has on its own); with lengths too, a small kernel then copies the carried state
// into the padded rows of y[t], as the CPU op does.
// Backward: per step one fused kernel (dL/dh_t from the previous kernel's dL/dz, then the gate
// gradients; with a projection a first kernel forms dL/dh_t, a second one the gate gradients),
// then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs over all steps (gradients_over_steps).
//
// Precision: float32 and float64 are computed in their own type, float16 and bfloat16 with float32
// arithmetic, float32 cell state and float32 saved gates and cells. For float32 every product,
// the step kernels' and the GEMMs', uses TF32 exactly when nn.LSTM's cuDNN may: when cuDNN's RNN
// setting allows it (torch.backends.cudnn.allow_tf32, the default, or
// torch.backends.cudnn.rnn.fp32_precision), whatever torch.backends.cuda.matmul says. The GEMMs
// call cuBLAS with that choice made explicit per call, changing no global setting.
//
// Capture-safe: no host synchronisation, every allocation from the caching allocator before the
// step loop, every launch on the current stream.
#include "../lstm.h"
#include "lstm_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#ifdef LSTM_FUSED_EMULATE_CUDA
// The CPU-emulated test build: CPU tensors, kernels run by the emulator, no device or stream.
#define LSTM_FUSED_OPS lstm_fused_emulated
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define LSTM_FUSED_OPS lstm_fused
#endif

namespace lstm_fused {
namespace {

using cuda::acc_t;
using cuda::BackwardMode;
using cuda::StepTile;

template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T, typename U>
T* pointer(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<U>());
}

#ifdef LSTM_FUSED_EMULATE_CUDA
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
// An H100's or H200's 132 multiprocessors, so that the automatic choice is the one made there;
// LSTM_FUSED_EMULATED_MULTIPROCESSORS sets another count, for tests of the choice.
cuda::DeviceTraits device_traits() {
  const char* count = std::getenv("LSTM_FUSED_EMULATED_MULTIPROCESSORS");
  const int multiprocessors = count != nullptr && count[0] != '\0' ? std::atoi(count) : 132;
  TORCH_CHECK(multiprocessors > 0,
              "lstm_fused: LSTM_FUSED_EMULATED_MULTIPROCESSORS must be a positive integer");
  return {multiprocessors, true, false};
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

cuda::DeviceTraits device_traits() {
  static std::mutex mutex;
  static std::unordered_map<int, cuda::DeviceTraits> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  int multiprocessors = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const cuda::DeviceTraits traits{multiprocessors, major >= 8 && cuda::tensor_core_kernels_built(),
                                  false};
  known.emplace(device, traits);
  return traits;
}
#endif

// torch.backends.cudnn's TF32 setting for RNNs, the one nn.LSTM follows, across the three forms
// of at::Context::allowTF32CuDNN in the supported PyTorch releases: no argument, an operator
// name, an operator enum.
template <typename Op>
struct RnnOp;
template <typename Enum>
struct RnnOp<std::optional<Enum>> {
  static constexpr Enum value = Enum::RNN;
};
template <typename Context, typename Parameter>
bool rnn_allows_tf32(const Context& context, bool (Context::*)(Parameter) const) {
  if constexpr (std::is_convertible_v<const char*, Parameter>) {
    return context.allowTF32CuDNN("rnn");
  } else {
    return context.allowTF32CuDNN(RnnOp<std::decay_t<Parameter>>::value);
  }
}
template <typename Context>
bool rnn_allows_tf32(const Context& context, bool (Context::*)() const) {
  return context.allowTF32CuDNN();
}

template <typename scalar_t>
bool allow_tf32() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return rnn_allows_tf32(at::globalContext(), &at::Context::allowTF32CuDNN);
  } else {
    return false;
  }
}

void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, "lstm_fused: launching the CUDA ", kernel, " failed: ",
              cudaGetErrorString(error));
}

// ---- GEMMs -----------------------------------------------------------------------------------

// A matrix in memory: element (r, c) at data[r * row_stride + c * column_stride].
template <typename scalar_t>
struct MatrixRef {
  scalar_t* data;
  int64_t rows, columns, row_stride, column_stride;
};

template <typename scalar_t>
MatrixRef<scalar_t> matrix_of(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<scalar_t>>(), t.size(0), t.size(1), t.stride(0),
          t.stride(1)};
}

#ifdef LSTM_FUSED_EMULATE_CUDA
// Rounded to TF32 (10 explicit mantissa bits), to nearest, ties away from zero, as the
// emulator's tensor cores round; infinities and NaN unchanged.
at::Tensor round_to_tf32(const at::Tensor& x) {
  const at::Tensor finite = x.isfinite();
  const at::Tensor bits = at::where(finite, x, at::zeros_like(x)).contiguous().view(at::kInt);
  const at::Tensor rounded = bits.add(0x1000).bitwise_and(~0x1fff).view(at::kFloat);
  return at::where(finite, rounded.view(x.sizes()), x);
}
#endif

// A tensor over a matrix's memory, on the device of `options`.
template <typename scalar_t>
at::Tensor tensor_of(const MatrixRef<scalar_t>& m, const at::TensorOptions& options) {
  return at::from_blob(const_cast<std::remove_const_t<scalar_t>*>(m.data), {m.rows, m.columns},
                       {m.row_stride, m.column_stride},
                       options.dtype(c10::CppTypeToScalarType<std::remove_const_t<scalar_t>>()));
}

// out = a b (+ out when accumulate); out [m, n] with unit column stride, all on the device of
// `options`. float32 multiplies in TF32 exactly when `tf32`; the other dtypes as ATen's matmuls.
template <typename scalar_t>
void gemm(const MatrixRef<scalar_t>& out, const MatrixRef<const scalar_t>& a,
          const MatrixRef<const scalar_t>& b, bool accumulate, bool tf32,
          const at::TensorOptions& options) {
  const int64_t m = out.rows, n = out.columns, k = a.columns;
  TORCH_INTERNAL_ASSERT(a.rows == m && b.rows == k && b.columns == n && out.column_stride == 1);
  if (m == 0 || n == 0) return;
#ifdef LSTM_FUSED_EMULATE_CUDA
  constexpr bool kCublas = false;
#else
  constexpr bool kCublas = std::is_same_v<scalar_t, float>;
#endif
  if constexpr (!kCublas) {
    at::Tensor result = tensor_of(out, options);
    at::Tensor left = tensor_of(a, options), right = tensor_of(b, options);
#ifdef LSTM_FUSED_EMULATE_CUDA
    if (tf32 && std::is_same_v<scalar_t, float>) {  // what TF32 tensor cores multiply
      left = round_to_tf32(left);
      right = round_to_tf32(right);
    }
#endif
    if (accumulate) {
      result.addmm_(left, right);
    } else {
      at::mm_out(result, left, right);
    }
  } else {
#ifndef LSTM_FUSED_EMULATE_CUDA
    if (k == 0) {
      if (!accumulate) tensor_of(out, options).zero_();
      return;
    }
    // cuBLAS is column-major: out^T [n, m] = b^T a^T. A row-major operand (unit column stride)
    // is its own transpose in column-major order (op N); a column-major one is op T.
    auto layout = [](const auto& x, int64_t min_ld) {
      const bool row_major =
          x.column_stride == 1 && x.row_stride >= std::max<int64_t>(1, x.columns);
      return std::make_pair(row_major ? CUBLAS_OP_N : CUBLAS_OP_T,
                            row_major ? x.row_stride : std::max(x.column_stride, min_ld));
    };
    const auto [op_b, ld_b] = layout(b, k);
    const auto [op_a, ld_a] = layout(a, m);
    const int64_t ld_out = std::max<int64_t>(1, out.row_stride);
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    // The handle is the calling thread's own (ATen keeps a pool per thread), bound to the current
    // stream, with ATen's workspace (capture-safe); the compute type and the math mode, restored
    // after the call, state TF32 or not for this call alone, whatever the global flags say.
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
    cublasMath_t saved = CUBLAS_DEFAULT_MATH;
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &saved));
    TORCH_CUDABLAS_CHECK(
        cublasSetMathMode(handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    const cublasStatus_t status = cublasGemmEx(
        handle, op_b, op_a, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &one,
        b.data, CUDA_R_32F, static_cast<int>(ld_b), a.data, CUDA_R_32F, static_cast<int>(ld_a),
        &beta, out.data, CUDA_R_32F, static_cast<int>(ld_out),
        tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, saved));
    TORCH_CUDABLAS_CHECK(status);
#endif
  }
}

// gemm on tensors (any strides for a and b), for gradients_over_steps.
template <typename scalar_t>
Matmul matmul_for(bool tf32) {
  return [tf32](at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    // Row-major or column-major with a leading dimension cuBLAS accepts, else a copy.
    auto usable = [](const at::Tensor& t) {
      const bool row_major = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1));
      const bool column_major =
          t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0));
      return row_major || column_major ? t : t.contiguous();
    };
    TORCH_INTERNAL_ASSERT(out.stride(1) == 1 || out.size(1) <= 1);
    MatrixRef<scalar_t> out_ref = matrix_of<scalar_t>(out);
    out_ref.column_stride = 1;
    gemm<scalar_t>(out_ref, matrix_of<const scalar_t>(usable(a)),
                   matrix_of<const scalar_t>(usable(b)), accumulate, tf32, out.options());
  };
}

// ---- Tiles, workspace --------------------------------------------------------------------------

// The one place that picks the CUDA step kernel's tile (the environment variable LSTM_FUSED_PATH,
// set by lstm_fused.force_path, forces a tile height; auto chooses by batch and size; the width
// and the split of K follow the device, in the kernels' launcher).
StepTile step_tile() {
  const char* forced = std::getenv("LSTM_FUSED_PATH");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    return StepTile::kAuto;
  }
  if (std::strcmp(forced, "step_small") == 0) return StepTile::kSmall;
  if (std::strcmp(forced, "step_medium") == 0) return StepTile::kMedium;
  if (std::strcmp(forced, "step_large") == 0) return StepTile::kLarge;
  TORCH_CHECK(false, "lstm_fused: LSTM_FUSED_PATH must be auto, step_small, step_medium or ",
              "step_large on CUDA, got '", forced, "'");
}

void check_cuda_sizes(const LstmSizes& s) {
  constexpr int64_t kMax = std::numeric_limits<int>::max() / 4;
  TORCH_CHECK(s.batch <= kMax && 4 * s.hidden_size <= kMax && s.output_size <= kMax,
              "lstm_fused: batch, 4 * hidden_size and proj_size must be below ", kMax,
              " on CUDA");
}

at::ScalarType accumulate_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The split-K scratch for a call's launches: big enough for every plan given, allocated once
// before the step loop (counters zeroed; every launch leaves them zero).
struct Workspace {
  at::Tensor partial_sums, counters;

  Workspace(std::initializer_list<cuda::StepPlan> plans, const at::TensorOptions& acc_options) {
    int64_t partials = 0, count = 0;
    for (const cuda::StepPlan& plan : plans) {
      partials = std::max(partials, plan.partial_sums);
      count = std::max(count, plan.counters);
    }
    if (count > 0) {
      partial_sums = at::empty({partials}, acc_options);
      counters = at::zeros({count}, acc_options.dtype(at::kInt));
    }
  }

  cuda::SplitWorkspace view() const {
    if (!counters.defined()) return {nullptr, nullptr};
    return {partial_sums.data_ptr(), counters.data_ptr<int>()};
  }
};

template <typename scalar_t>
void forward_steps(const LstmSizes& s, const at::Tensor& input_gates, const at::Tensor& bias,
                   const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, const at::Tensor& lengths, bool reverse,
                   at::Tensor& y, at::Tensor& cells, at::Tensor& gates) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int64_t T_ = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool training = gates.defined(), has_proj = w_hr.has_value();
  const StepTile tile = step_tile();
  cuda::DeviceTraits device = device_traits();
  device.allow_tf32 = allow_tf32<scalar_t>();
  const cudaStream_t stream = current_stream();
  at::Tensor hidden = has_proj ? at::empty({B, H}, y.options()) : at::Tensor();

  // Raw pointers per step, from the step's index alone: no tensor is made in the step loop.
  T* const y_data = pointer<T, scalar_t>(y);
  const T* const input_gates_data = pointer<const T, scalar_t>(input_gates);
  Acc* const cells_data = cells.data_ptr<Acc>();
  Acc* const gates_data = training ? gates.data_ptr<Acc>() : nullptr;
  cuda::ForwardStep<T> step{};
  step.batch = static_cast<int>(B);
  step.hidden_size = static_cast<int>(H);
  step.output_size = static_cast<int>(P);
  step.w_hh = pointer<const T, scalar_t>(w_hh);
  step.bias = bias.defined() ? bias.data_ptr<Acc>() : nullptr;
  step.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  step.has_projection = has_proj;
  if (has_proj) step.hidden_out = pointer<T, scalar_t>(hidden);
  const Workspace workspace({cuda::forward_step_plan<T>(step, tile, device)},
                            cells.options());
  step.workspace = workspace.view();
  // y[t] = hidden W_hr^T, per step (W_hr^T: a column-major view of W_hr).
  const MatrixRef<const scalar_t> hidden_ref =
      has_proj ? matrix_of<const scalar_t>(hidden) : MatrixRef<const scalar_t>{};
  MatrixRef<const scalar_t> w_hr_t{};
  if (has_proj) w_hr_t = {w_hr->data_ptr<scalar_t>(), H, P, 1, H};
  for (int64_t n = 0; n < T_; ++n) {
    const int64_t t = reverse ? T_ - 1 - n : n;
    const int64_t t_prev = reverse ? t + 1 : t - 1;
    // Training keeps every cell state; inference alternates between two buffers.
    const int64_t slot = training ? t : n % 2, slot_prev = training ? t_prev : (n - 1) % 2;
    step.t = t;
    step.h_prev = n == 0 ? pointer<const T, scalar_t>(h0) : y_data + t_prev * B * P;
    step.c_prev = n == 0 ? c0.data_ptr<Acc>() : cells_data + slot_prev * B * H;
    step.c_next = cells_data + slot * B * H;
    step.input_gates = input_gates_data + t * B * 4 * H;
    if (!has_proj) step.hidden_out = y_data + t * B * P;
    step.gates = training ? gates_data + t * B * 4 * H : nullptr;
    check_launch(cuda::launch_forward_step<T>(step, tile, device, stream),
                 "forward step kernel");
    if (has_proj) {
      T* const y_t = y_data + t * B * P;
      gemm<scalar_t>({reinterpret_cast<scalar_t*>(y_t), B, P, P, 1}, hidden_ref, w_hr_t, false,
                     device.allow_tf32, y.options());
      if (step.lengths != nullptr) {
        check_launch(cuda::launch_carry_padded_rows<T>(y_t, step.h_prev, step.lengths, t,
                                                       step.batch, step.output_size, stream),
                     "padded-row kernel");
      }
    }
  }
}

ForwardResult forward_cuda(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                           const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh,
                           const std::optional<at::Tensor>& w_hr,
                           const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LstmSizes s = check_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cuda_sizes(s);
  DeviceGuard guard(x.device());
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto options = x.options();
  const auto acc_options = options.dtype(accumulate_type(x));

  at::Tensor bias;
  if (b_ih.has_value() || b_hh.has_value()) {
    bias = at::zeros({4 * H}, acc_options);
    if (b_ih.has_value()) bias.add_(*b_ih);
    if (b_hh.has_value()) bias.add_(*b_hh);
  }
  at::Tensor y = at::empty({T, B, P}, options);
  at::Tensor cells = at::empty({training ? T : 2, B, H}, acc_options);
  at::Tensor gates = training ? at::empty({T, B, 4 * H}, acc_options) : at::Tensor();
  const at::Tensor h0_c = h0.contiguous(), c0_acc = c0.to(acc_options).contiguous();
  const at::Tensor w_hh_c = w_hh.contiguous();
  const std::optional<at::Tensor> w_hr_c =
      w_hr.has_value() ? std::optional<at::Tensor>(w_hr->contiguous()) : std::nullopt;
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_forward_cuda", [&] {
    // The input projection of all steps at once, in x's dtype; the biases are added in the
    // kernel.
    at::Tensor input_gates = at::empty({T * B, 4 * H}, options);
    matmul_for<scalar_t>(allow_tf32<scalar_t>())(input_gates, x.reshape({T * B, s.input_size}),
                                                 w_ih.t(), false);
    forward_steps<scalar_t>(s, input_gates, bias, h0_c, c0_acc, w_hh_c, w_hr_c, lengths_c,
                            reverse, y, cells, gates);
  });

  return forward_result(s, y, cells, gates, x, h0, c0, reverse, training);
}

template <typename scalar_t>
void backward_steps(const LstmSizes& s, const at::Tensor& grad_y, const at::Tensor& c0,
                    const at::Tensor& w_hh_t, const at::Tensor& w_hr_t, const at::Tensor& gates,
                    const at::Tensor& cells, const at::Tensor& lengths, bool reverse,
                    at::Tensor& grad_h, at::Tensor& grad_c, at::Tensor& grad_gates,
                    at::Tensor& grad_proj_out, at::Tensor& hidden_all) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int64_t T_ = s.seq_len, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr_t.defined();
  const StepTile tile = step_tile();
  cuda::DeviceTraits device = device_traits();
  device.allow_tf32 = allow_tf32<scalar_t>();
  const cudaStream_t stream = current_stream();

  // Raw pointers per step, from the step's index alone (see forward_steps).
  const int64_t B = s.batch;
  const T* const grad_y_data = pointer<const T, scalar_t>(grad_y);
  const Acc* const gates_data = gates.data_ptr<Acc>();
  const Acc* const cells_data = cells.data_ptr<Acc>();
  T* const grad_gates_data = pointer<T, scalar_t>(grad_gates);
  T* const grad_total_data = has_proj ? pointer<T, scalar_t>(grad_proj_out) : nullptr;
  T* const hidden_data = has_proj ? pointer<T, scalar_t>(hidden_all) : nullptr;
  const T* const w_hh_t_data = pointer<const T, scalar_t>(w_hh_t);
  const T* const w_hr_t_data = has_proj ? pointer<const T, scalar_t>(w_hr_t) : nullptr;
  cuda::BackwardStep<T> step{};
  step.batch = static_cast<int>(B);
  step.hidden_size = static_cast<int>(H);
  step.output_size = static_cast<int>(P);
  step.grad_h = grad_h.data_ptr<Acc>();
  step.grad_c = grad_c.data_ptr<Acc>();
  step.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  // G_t: dL/dh_t received from step t_next (or as given at the first step), into grad_h; the
  // product's operands are dL/dz_{t_next} and W_hh^T.
  auto set_received = [&](int64_t t_next, bool first) {
    step.a = first ? nullptr : grad_gates_data + t_next * B * 4 * H;
    step.k = static_cast<int>(4 * H);
    step.w = w_hh_t_data;
    step.t_next = t_next;
    step.first = first;
    step.grad_y_next = first ? nullptr : grad_y_data + t_next * B * P;
  };
  // Every kind of launch of the call, with a product, for the workspace.
  set_received(0, false);
  cuda::BackwardStep<T> gate_step = step;
  gate_step.a = grad_total_data;
  gate_step.k = static_cast<int>(P);
  const Workspace workspace(
      {cuda::backward_step_plan<T>(step, BackwardMode::kHiddenGrad, tile, device),
       has_proj ? cuda::backward_step_plan<T>(gate_step, BackwardMode::kGates, tile, device)
                : cuda::backward_step_plan<T>(step, BackwardMode::kFused, tile, device)},
      cells.options());
  step.workspace = workspace.view();
  auto launch = [&](BackwardMode mode, const char* kernel) {
    check_launch(cuda::launch_backward_step<T>(step, mode, tile, device, stream), kernel);
  };
  for (int64_t n = 0; n < T_; ++n) {
    const int64_t t = reverse ? n : T_ - 1 - n;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step whose state t started from
    const int64_t t_next = reverse ? t - 1 : t + 1;  // the step that started from t
    const bool from_initial = reverse ? t_prev >= T_ : t_prev < 0;
    step.t = t;
    step.grad_y = grad_y_data + t * B * P;
    step.gates = gates_data + t * B * 4 * H;
    step.cell = cells_data + t * B * H;
    step.c_prev = from_initial ? c0.data_ptr<Acc>() : cells_data + t_prev * B * H;
    step.grad_gates = grad_gates_data + t * B * 4 * H;
    set_received(t_next, n == 0);
    if (has_proj) {
      // First G_t and grad_y[t] + G_t, then the gate gradients from (grad_y[t] + G_t) W_hr.
      step.grad_total = grad_total_data + t * B * P;
      launch(BackwardMode::kHiddenGrad, "backward hidden-gradient kernel");
      step.a = step.grad_total;
      step.k = static_cast<int>(P);
      step.w = w_hr_t_data;
      step.hidden_out = hidden_data + t * B * H;
      launch(BackwardMode::kGates, "backward gate kernel");
    } else {
      launch(BackwardMode::kFused, "backward step kernel");
    }
  }
  // dL/dh_0: what the first step processed sends back.
  const int64_t t_first = reverse ? T_ - 1 : 0;
  set_received(t_first, false);
  step.grad_total = nullptr;
  launch(BackwardMode::kHiddenGrad, "backward hidden-gradient kernel");
}

BackwardResult backward_cuda(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                             const at::Tensor& grad_c_n, const at::Tensor& x,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                             const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                             bool has_bias) {
  const LstmSizes s = check_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                                          lengths, y, gates, cells);
  check_cuda_sizes(s);
  DeviceGuard guard(x.device());
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto dtype = x.scalar_type();
  const auto acc_options = x.options().dtype(accumulate_type(x));
  const bool has_proj = w_hr.has_value();

  // dL/dz and grad_y + G_t in x's dtype: the next step's product operand and the GEMMs' input.
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, x.options());
  at::Tensor grad_proj_out = has_proj ? at::empty({T, B, P}, x.options()) : at::Tensor();
  at::Tensor hidden_all = has_proj ? at::empty({T, B, H}, x.options()) : at::Tensor();
  at::Tensor grad_h = grad_h_n.to(acc_options, false, true).contiguous();
  at::Tensor grad_c = grad_c_n.to(acc_options, false, true).contiguous();
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_fused_backward_cuda",
                                  [&] {
    if (T > 0 && B > 0) {
      // The backward products read the weights' columns along K: transposed copies, once.
      const at::Tensor w_hh_t = w_hh.t().contiguous();
      const at::Tensor w_hr_t = has_proj ? w_hr->t().contiguous() : at::Tensor();
      backward_steps<scalar_t>(s, grad_y.contiguous(), c0.to(acc_options).contiguous(), w_hh_t,
                               w_hr_t, gates.contiguous(), cells.contiguous(), lengths_c, reverse,
                               grad_h, grad_c, grad_gates, grad_proj_out, hidden_all);
    }
    result = gradients_over_steps(s, grad_gates, x, h0, w_ih, y, grad_proj_out, hidden_all,
                                  grad_h.to(dtype), grad_c.to(dtype), reverse, has_bias,
                                  matmul_for<scalar_t>(allow_tf32<scalar_t>()));
  });
  return result;
}

#ifdef LSTM_FUSED_EMULATE_CUDA
// The plans of a call's step launches at these sizes, for tests of the tile choice: per launch
// kind (forward; backward kFused, or kHiddenGrad and kGates with a projection; the last
// kHiddenGrad) rows, columns, tensor cores, split, blocks.
std::vector<int64_t> step_plans(int64_t batch, int64_t hidden_size, int64_t proj_size,
                                at::ScalarType dtype, bool allow_tf32) {
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "step_plans", [&] {
    using T = typename KernelType<scalar_t>::type;
    cuda::DeviceTraits device = device_traits();
    device.allow_tf32 = allow_tf32 && std::is_same_v<scalar_t, float>;
    const int P = static_cast<int>(proj_size > 0 ? proj_size : hidden_size);
    auto add = [&](const cuda::StepPlan& plan) {
      out.insert(out.end(), {plan.rows, plan.columns, plan.tensor_cores ? 1 : 0, plan.split,
                             plan.blocks});
    };
    cuda::ForwardStep<T> forward{};
    forward.batch = static_cast<int>(batch);
    forward.hidden_size = static_cast<int>(hidden_size);
    forward.output_size = P;
    add(cuda::forward_step_plan<T>(forward, step_tile(), device));
    cuda::BackwardStep<T> backward{};
    backward.batch = forward.batch;
    backward.hidden_size = forward.hidden_size;
    backward.output_size = P;
    backward.a = reinterpret_cast<const T*>(16);  // any non-null operand: a product
    backward.k = static_cast<int>(4 * hidden_size);
    if (proj_size > 0) {
      add(cuda::backward_step_plan<T>(backward, BackwardMode::kHiddenGrad, step_tile(), device));
      cuda::BackwardStep<T> gate_step = backward;
      gate_step.k = P;
      add(cuda::backward_step_plan<T>(gate_step, BackwardMode::kGates, step_tile(), device));
    } else {
      add(cuda::backward_step_plan<T>(backward, BackwardMode::kFused, step_tile(), device));
    }
    add(cuda::backward_step_plan<T>(backward, BackwardMode::kHiddenGrad, step_tile(), device));
  });
  return out;
}
#endif

}  // namespace
}  // namespace lstm_fused

#ifdef LSTM_FUSED_EMULATE_CUDA
TORCH_LIBRARY(lstm_fused_emulated, m) {
  m.def(lstm_fused::kForwardSchema);
  m.def(lstm_fused::kBackwardSchema);
  // Kernel launches so far on this thread, so that tests can count launches per step.
  m.def("launch_count() -> int",
        []() -> int64_t { return static_cast<int64_t>(cuda_emulation::launch_count()); });
  m.def("step_plans(int batch, int hidden_size, int proj_size, ScalarType dtype, bool allow_tf32)"
        " -> int[]",
        &lstm_fused::step_plans);
}
TORCH_LIBRARY_IMPL(lstm_fused_emulated, CPU, m) {
#else
TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
#endif
  m.impl("forward", &lstm_fused::forward_cuda);
  m.impl("backward", &lstm_fused::backward_cuda);
}
