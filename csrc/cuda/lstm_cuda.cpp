// CUDA implementation of the lstm_fused ops: checks, allocation, device guard, current stream,
// dtype dispatch and the sequence of launches; the kernels are in lstm_kernels.cu.
//
// Forward: the input projection of every step as one GEMM (cuBLAS through ATen), then per step one
// fused kernel (recurrent product, biases, nonlinearities, cell update). With a projection the
// kernel writes o * tanh(c_t) and a GEMM per step maps it to y[t] (the projection needs every
// unit of h_t, which no block has on its own).
// Backward: per step one fused kernel (dL/dh_t from the previous kernel's dL/dz, then the gate
// gradients; with a projection a first kernel forms dL/dh_t, a second one the gate gradients),
// then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs over all steps (gradients_over_steps).
//
// Precision: float32 and float64 are computed in their own type, float16 and bfloat16 with float32
// arithmetic, float32 cell state and float32 saved gates and cells. The step kernels use TF32 for
// float32 exactly when nn.LSTM does: when cuDNN may use TF32 for RNNs
// (torch.backends.cudnn.allow_tf32, the default, or torch.backends.cudnn.rnn.fp32_precision).
// The GEMMs over all steps are ATen matmuls and follow torch.backends.cuda.matmul.allow_tf32.
#include "../lstm.h"
#include "lstm_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

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
// An H100's, so that the automatic tile choice is the one made there.
cuda::DeviceTraits device_traits() { return {132, true, false}; }
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

// The one place that picks the CUDA step kernel's tile (the environment variable LSTM_FUSED_PATH,
// set by lstm_fused.force_path, forces one; auto chooses by batch and size).
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

// [T, B] true where step t is padding for row b.
at::Tensor padding_mask(const at::Tensor& lengths, int64_t T) {
  return at::arange(T, lengths.options()).unsqueeze(1) >= lengths.unsqueeze(0);
}

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
  const at::Tensor w_hr_t = has_proj ? w_hr->t() : at::Tensor();
  const at::Tensor padded =
      has_proj && lengths.defined() ? padding_mask(lengths, T_) : at::Tensor();

  // Raw pointers per step, from the step's index alone; tensor views only where a GEMM needs one
  // (making a view costs about as much host time as launching a small step).
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
      at::Tensor y_t = y.select(0, t);
      at::mm_out(y_t, hidden, w_hr_t);
      if (padded.defined()) {
        const at::Tensor h_prev = n == 0 ? h0 : y.select(0, t_prev);
        y_t.copy_(at::where(padded.select(0, t).unsqueeze(1), h_prev, y_t));
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

  // The input projection of all steps at once, in x's dtype; the biases are added in the kernel.
  const at::Tensor input_gates =
      at::mm(x.reshape({T * B, s.input_size}), w_ih.t()).view({T, B, 4 * H});
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
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_forward_cuda", [&] {
    forward_steps<scalar_t>(s, input_gates, bias, h0_c, c0_acc, w_hh_c, w_hr, lengths_c, reverse,
                            y, cells, gates);
  });

  return forward_result(s, y, cells, gates, x, h0, c0, reverse, training);
}

template <typename scalar_t>
void backward_steps(const LstmSizes& s, const at::Tensor& grad_y, const at::Tensor& c0,
                    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& lengths,
                    bool reverse, at::Tensor& grad_h, at::Tensor& grad_c, at::Tensor& grad_gates,
                    at::Tensor& grad_proj_out, at::Tensor& hidden_all) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int64_t T_ = s.seq_len, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr.has_value();
  const StepTile tile = step_tile();
  cuda::DeviceTraits device = device_traits();
  device.allow_tf32 = allow_tf32<scalar_t>();
  const cudaStream_t stream = current_stream();

  // Raw pointers per step, from the step's index alone (see forward_steps).
  const int64_t B = s.batch;
  const T* const grad_y_data = pointer<const T, scalar_t>(grad_y);
  const Acc* const gates_data = gates.data_ptr<Acc>();
  const Acc* const cells_data = cells.data_ptr<Acc>();
  Acc* const grad_gates_data = grad_gates.data_ptr<Acc>();
  Acc* const grad_total_data = has_proj ? grad_proj_out.data_ptr<Acc>() : nullptr;
  T* const hidden_data = has_proj ? pointer<T, scalar_t>(hidden_all) : nullptr;
  const T* const w_hh_data = pointer<const T, scalar_t>(w_hh);
  const T* const w_hr_data = has_proj ? pointer<const T, scalar_t>(*w_hr) : nullptr;
  cuda::BackwardStep<T> step{};
  step.batch = static_cast<int>(B);
  step.hidden_size = static_cast<int>(H);
  step.output_size = static_cast<int>(P);
  step.grad_h = grad_h.data_ptr<Acc>();
  step.grad_c = grad_c.data_ptr<Acc>();
  step.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  // G_t: dL/dh_t received from step t_next (or as given at the first step), into grad_h; the
  // product's operands are dL/dz_{t_next} and W_hh.
  auto set_received = [&](int64_t t_next, bool first) {
    step.a = first ? nullptr : grad_gates_data + t_next * B * 4 * H;
    step.k = static_cast<int>(4 * H);
    step.w = w_hh_data;
    step.t_next = t_next;
    step.first = first;
    step.grad_y_next = first ? nullptr : grad_y_data + t_next * B * P;
  };
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
      step.w = w_hr_data;
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

  at::Tensor grad_gates = at::empty({T, B, 4 * H}, acc_options);
  at::Tensor grad_proj_out = has_proj ? at::empty({T, B, P}, acc_options) : at::Tensor();
  at::Tensor hidden_all = has_proj ? at::empty({T, B, H}, x.options()) : at::Tensor();
  at::Tensor grad_h = grad_h_n.to(acc_options, false, true).contiguous();
  at::Tensor grad_c = grad_c_n.to(acc_options, false, true).contiguous();
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const std::optional<at::Tensor> w_hr_c =
      has_proj ? std::optional<at::Tensor>(w_hr->contiguous()) : std::nullopt;

  if (T > 0 && B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_fused_backward_cuda",
                                    [&] {
      backward_steps<scalar_t>(s, grad_y.contiguous(), c0.to(acc_options).contiguous(),
                               w_hh.contiguous(), w_hr_c, gates.contiguous(), cells.contiguous(),
                               lengths_c, reverse, grad_h, grad_c, grad_gates, grad_proj_out,
                               hidden_all);
    });
  }
  // The GEMMs over all steps run in x's dtype (float32 accumulation inside cuBLAS).
  return gradients_over_steps(s, grad_gates.to(dtype), x, h0, w_ih, y,
                              has_proj ? grad_proj_out.to(dtype) : at::Tensor(), hidden_all,
                              grad_h.to(dtype), grad_c.to(dtype), reverse, has_bias);
}

}  // namespace
}  // namespace lstm_fused

#ifdef LSTM_FUSED_EMULATE_CUDA
TORCH_LIBRARY(lstm_fused_emulated, m) {
  m.def(lstm_fused::kForwardSchema);
  m.def(lstm_fused::kBackwardSchema);
  // Kernel launches so far on this thread, so that tests can count launches per step.
  m.def("launch_count() -> int",
        []() -> int64_t { return static_cast<int64_t>(cuda_emulation::launch_count()); });
}
TORCH_LIBRARY_IMPL(lstm_fused_emulated, CPU, m) {
#else
TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
#endif
  m.impl("forward", &lstm_fused::forward_cuda);
  m.impl("backward", &lstm_fused::backward_cuda);
}
