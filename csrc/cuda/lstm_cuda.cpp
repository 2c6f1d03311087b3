// CUDA implementation of the lstm_fused ops: checks, allocation, device guard, current stream,
// dtype dispatch, the one choice of kernel path (choose_path) and the sequence of launches; the
// kernels are in lstm_kernels.cu (fused steps) and lstm_persistent.cu (a sequence per launch).
//
// Forward: the input projection of every step as one GEMM (cuBLAS through ATen), then per step one
// fused kernel (recurrent product, biases, nonlinearities, cell update). With a projection the
// kernel writes o * tanh(c_t) and a GEMM per step maps it to y[t] (the projection needs every
// unit of h_t, which no block has on its own).
// Backward: per step one fused kernel (dL/dh_t from the previous kernel's dL/dz, then the gate
// gradients; with a projection a first kernel forms dL/dh_t, a second one the gate gradients),
// then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs over all steps (gradients_over_steps).
//
// The persistent kernel replaces the per-step launches, forward and backward, by one cooperative
// launch where the weights fit on chip and the cost model expects it to be faster; the
// two-direction ops (bidirectional_forward, bidirectional_backward) run both directions of a
// layer in one such launch where they fit together, else one direction after the other.
//
// Precision: float32 and float64 are computed in their own type, float16 and bfloat16 with float32
// arithmetic, float32 cell state and float32 saved gates and cells. The step kernels use TF32 for
// float32 exactly when nn.LSTM does: when cuDNN may use TF32 for RNNs
// (torch.backends.cudnn.allow_tf32, the default, or torch.backends.cudnn.rnn.fp32_precision).
// The GEMMs over all steps are ATen matmuls and follow torch.backends.cuda.matmul.allow_tf32.
#include "../lstm.h"
#include "lstm_kernels.h"
#include "lstm_persistent.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#ifdef LSTM_FUSED_EMULATE_CUDA
// The CPU-emulated test build: CPU tensors, kernels run by the emulator, no device or stream.
#define LSTM_FUSED_OPS lstm_fused_emulated
#define LSTM_FUSED_OPS_NAME "lstm_fused_emulated"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define LSTM_FUSED_OPS lstm_fused
#define LSTM_FUSED_OPS_NAME "lstm_fused"
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

// The path the environment variable LSTM_FUSED_PATH (set by lstm_fused.force_path) forces.
enum class ForcedPath { kAuto, kStepSmall, kStepMedium, kStepLarge, kPersistent };

ForcedPath forced_path() {
  const char* forced = std::getenv("LSTM_FUSED_PATH");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    return ForcedPath::kAuto;
  }
  if (std::strcmp(forced, "step_small") == 0) return ForcedPath::kStepSmall;
  if (std::strcmp(forced, "step_medium") == 0) return ForcedPath::kStepMedium;
  if (std::strcmp(forced, "step_large") == 0) return ForcedPath::kStepLarge;
  if (std::strcmp(forced, "persistent") == 0) return ForcedPath::kPersistent;
  TORCH_CHECK(false, "lstm_fused: LSTM_FUSED_PATH must be auto, step_small, step_medium, ",
              "step_large or persistent on CUDA, got '", forced, "'");
}

// The fused-step kernels' tile: forced, else their own choice by batch and size (also where the
// persistent kernel was forced but cannot run).
StepTile step_tile() {
  switch (forced_path()) {
    case ForcedPath::kStepSmall:
      return StepTile::kSmall;
    case ForcedPath::kStepMedium:
      return StepTile::kMedium;
    case ForcedPath::kStepLarge:
      return StepTile::kLarge;
    default:
      return StepTile::kAuto;
  }
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

// ---- The kernel path ---------------------------------------------------------------------------

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "lstm_fused: ", what, " failed: ", cudaGetErrorString(error));
}

int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Tensor cores from this batch on, as in the step kernels' own choice (their small scalar tile up
// to batch 4, where a step is bound by reading W_hh, not by arithmetic).
constexpr int64_t kTensorCoreMinBatch = 5;

cuda::PersistentDevice persistent_device() {
  const int device = current_device();
#ifdef LSTM_FUSED_EMULATE_CUDA  // tests change the emulated device: read it every time
  cuda::PersistentDevice info{};
  check_cuda(cuda::query_persistent_device(device, &info), "reading the device's attributes");
  return info;
#else
  static std::mutex mutex;
  static std::unordered_map<int, cuda::PersistentDevice> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  cuda::PersistentDevice info{};
  check_cuda(cuda::query_persistent_device(device, &info), "reading the device's attributes");
  known.emplace(device, info);
  return info;
#endif
}

// Why no cooperative launch may go on the current stream now, or empty if one may: a stream being
// captured into a CUDA graph takes one only from CUDA 12 on (runtime and driver), as a
// cooperative kernel node.
std::string capture_forbids_cooperative_launch() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(current_stream(), &status), "cudaStreamIsCapturing");
  if (status == cudaStreamCaptureStatusNone) return "";
  int runtime = 0, driver = 0;
  check_cuda(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  check_cuda(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  if (runtime >= 12000 && driver >= 12000) return "";
  return c10::str("the stream is being captured into a CUDA graph, which takes cooperative "
                  "launches from CUDA 12.0 on (runtime ", runtime / 1000, ".",
                  runtime % 1000 / 10, ", driver ", driver / 1000, ".", driver % 1000 / 10, ")");
}

// The persistent kernel's plan for a problem on the current device, computed once per problem.
template <typename T>
cuda::PersistentPlan persistent_plan(const cuda::PersistentProblem& problem,
                                     const cuda::PersistentDevice& device) {
  using Key = std::tuple<int, int, int, int, int, bool, bool, bool, int, int, bool>;
  static std::mutex mutex;
  static std::map<Key, cuda::PersistentPlan> plans;
  const Key key{current_device(), problem.batch, problem.hidden_size, problem.output_size,
                problem.directions, problem.projection, problem.backward, problem.tensor_cores,
                device.multiprocessors, device.shared_bytes_per_block, device.cooperative_launch};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = plans.find(key);
  if (found != plans.end()) return found->second;
  const cuda::PersistentPlan plan = cuda::plan_persistent<T>(problem, device);
  plans.emplace(key, plan);
  return plan;
}

// The kernel path of one recurrence (of one or both directions of a layer).
struct CudaPath {
  bool persistent = false;
  cuda::PersistentLayout layout{};
};

// The one place that picks the CUDA kernel path: the persistent kernel (one launch for the whole
// sequence) where it can run and lstm_persistent.cu's cost model expects it to beat the fused-step
// kernels, else those (with step_tile()'s tile). LSTM_FUSED_PATH forces either, for tests and
// benchmarks: a forced persistent kernel that cannot run here (the weights beyond the device's
// on-chip memory, no cooperative launches, graph capture on CUDA 11) is an error that says why,
// rather than a measurement of another kernel under its name. For both directions at once a
// persistent kernel that cannot hold them falls back to one direction at a time, each of which
// chooses (and errs) by itself.
template <typename scalar_t>
CudaPath choose_path(const LstmSizes& s, int directions, bool backward, bool projection,
                     bool has_lengths) {
  using T = typename KernelType<scalar_t>::type;
  CudaPath path;
  const ForcedPath forced = forced_path();
  if (forced != ForcedPath::kAuto && forced != ForcedPath::kPersistent) return path;
  const bool is_forced = forced == ForcedPath::kPersistent;
  // One step is one launch on either path.
  if (s.seq_len == 0 || s.batch == 0 || (!is_forced && s.seq_len < 2)) return path;
  constexpr bool kHalfType =
      std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  const cuda::DeviceTraits traits = device_traits();
  const bool tensor_cores = traits.tensor_cores && s.batch >= kTensorCoreMinBatch &&
                            (kHalfType || allow_tf32<scalar_t>());
  const cuda::PersistentProblem problem{
      static_cast<int>(std::min<int64_t>(s.seq_len, std::numeric_limits<int>::max())),
      static_cast<int>(s.batch), static_cast<int>(s.hidden_size),
      static_cast<int>(s.output_size), directions, projection, backward, tensor_cores};
  const cuda::PersistentDevice device = persistent_device();
  std::string why = s.seq_len > std::numeric_limits<int>::max()
                        ? std::string("more than 2^31 - 1 steps")
                        : capture_forbids_cooperative_launch();
  cuda::PersistentPlan plan{};
  if (why.empty()) {
    plan = persistent_plan<T>(problem, device);
    if (!plan.feasible) why = plan.reason;
  }
  if (!why.empty()) {
    TORCH_CHECK(!is_forced || directions == 2,
                "lstm_fused: the persistent kernel was forced (LSTM_FUSED_PATH=persistent) but "
                "cannot run here: ", why, ". Force a step_* path, or use auto, which picks the "
                "fused-step kernels here");
    return path;
  }
  if (!is_forced && !(plan.estimated_step_us <
                      cuda::estimate_step_kernels_us(problem, device, sizeof(T), has_lengths))) {
    return path;
  }
  path.persistent = true;
  path.layout = plan.layout;
  return path;
}

// After the device refused a persistent launch (cudaErrorCooperativeLaunchTooLarge: fewer of its
// blocks fit at once than the occupancy promised, as under an MPS limit on multiprocessors): the
// fused-step kernels run instead, with a warning (once), or an error where the kernel was forced.
// Both directions at once fall back to one at a time silently (each chooses by itself).
void persistent_refused(int directions) {
  constexpr const char* kWhy =
      "the device refused the cooperative launch of the persistent kernel (fewer of its blocks "
      "fit on the device at once than its occupancy promises, as under an MPS limit on the "
      "multiprocessors a process may use)";
  if (directions == 2) return;
  TORCH_CHECK(forced_path() != ForcedPath::kPersistent,
              "lstm_fused: the persistent kernel was forced (LSTM_FUSED_PATH=persistent) but ",
              kWhy);
  TORCH_WARN_ONCE("lstm_fused: ", kWhy, "; the fused-step kernels run instead");
}

// ---- One direction's buffers -------------------------------------------------------------------

// A forward pass's inputs, prepared, and its saved-state buffers, for one direction.
struct ForwardDirection {
  at::Tensor input_gates;  // [T, B, 4H] x_t W_ih^T in x's dtype (the kernels add the biases)
  at::Tensor bias;         // [4H] b_ih + b_hh in the arithmetic type, or undefined
  at::Tensor h0, c0;       // contiguous; c0 in the arithmetic type
  at::Tensor w_hh, w_hr;   // contiguous; w_hr undefined without a projection
  at::Tensor cells;        // [T, B, H] (training), else [2, B, H]: filled by the pass
  at::Tensor gates;        // [T, B, 4H] (training), else undefined
  bool reverse;
};

ForwardDirection forward_direction(const LstmSizes& s, const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& w_hr, bool reverse,
                                   bool training) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  const auto acc_options = x.options().dtype(accumulate_type(x));
  ForwardDirection d;
  // The input projection of all steps at once, in x's dtype.
  d.input_gates = at::mm(x.reshape({T * B, s.input_size}), w_ih.t()).view({T, B, 4 * H});
  if (b_ih.has_value() || b_hh.has_value()) {
    d.bias = at::zeros({4 * H}, acc_options);
    if (b_ih.has_value()) d.bias.add_(*b_ih);
    if (b_hh.has_value()) d.bias.add_(*b_hh);
  }
  d.h0 = h0.contiguous();
  d.c0 = c0.to(acc_options).contiguous();
  d.w_hh = w_hh.contiguous();
  if (w_hr.has_value()) d.w_hr = w_hr->contiguous();
  d.cells = at::empty({training ? T : 2, B, H}, acc_options);
  if (training) d.gates = at::empty({T, B, 4 * H}, acc_options);
  d.reverse = reverse;
  return d;
}

// A backward pass's inputs, prepared, and its results, for one direction.
struct BackwardDirection {
  at::Tensor w_hh, w_hr, gates, cells, c0;  // contiguous; w_hr undefined without a projection
  at::Tensor grad_h, grad_c;  // [B, P], [B, H] in: dL/dh_n, dL/dc_n; out: dL/dh_0, dL/dc_0
  at::Tensor grad_gates;      // [T, B, 4H] dL/dz_t
  at::Tensor grad_proj_out;   // with a projection: [T, B, P] grad_y[t] + dL/dh_t, else undefined
  at::Tensor hidden_all;      // with a projection: [T, B, H] o * tanh(c_t), else undefined
  bool reverse;
};

BackwardDirection backward_direction(const LstmSizes& s, const at::Tensor& x,
                                     const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                     const at::Tensor& c0, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& w_hr,
                                     const at::Tensor& gates, const at::Tensor& cells,
                                     bool reverse) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto acc_options = x.options().dtype(accumulate_type(x));
  BackwardDirection d;
  d.w_hh = w_hh.contiguous();
  if (w_hr.has_value()) d.w_hr = w_hr->contiguous();
  d.gates = gates.contiguous();
  d.cells = cells.contiguous();
  d.c0 = c0.to(acc_options).contiguous();
  d.grad_h = grad_h_n.to(acc_options, false, true).contiguous();
  d.grad_c = grad_c_n.to(acc_options, false, true).contiguous();
  d.grad_gates = at::empty({T, B, 4 * H}, acc_options);
  if (w_hr.has_value()) {
    d.grad_proj_out = at::empty({T, B, P}, acc_options);
    d.hidden_all = at::empty({T, B, H}, x.options());
  }
  d.reverse = reverse;
  return d;
}

// The weight gradients and dx of one direction from its pass back in time (the GEMMs run in x's
// dtype, float32 accumulation inside cuBLAS).
BackwardResult backward_result(const LstmSizes& s, const BackwardDirection& d, const at::Tensor& x,
                               const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& y,
                               bool has_bias) {
  const auto dtype = x.scalar_type();
  return gradients_over_steps(s, d.grad_gates.to(dtype), x, h0, w_ih, y,
                              d.grad_proj_out.defined() ? d.grad_proj_out.to(dtype) : at::Tensor(),
                              d.hidden_all, d.grad_h.to(dtype), d.grad_c.to(dtype), d.reverse,
                              has_bias);
}

// ---- The persistent kernel ---------------------------------------------------------------------

// Zero-filled exchange buffers for `directions` launches' worth of parts, each 128-byte aligned.
int64_t exchange_bytes(const cuda::PersistentLayout& layout, int slots, int64_t k, int operand) {
  const int64_t bytes = slots * static_cast<int64_t>(layout.batch_padded) *
                        cuda::persistent_exchange_ld(static_cast<int>(k)) * operand;
  return (bytes + 127) / 128 * 128;
}

// The forward recurrence of the directions in one persistent launch into y (rows y_ld apart,
// direction d's columns from d * P); false if the device refused the launch (nothing written).
template <typename scalar_t>
bool run_persistent_forward(const LstmSizes& s, const cuda::PersistentLayout& layout,
                            const std::vector<ForwardDirection>& directions, at::Tensor& y,
                            int64_t y_ld, const at::Tensor& lengths, bool training) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int operand = cuda::persistent_operand_bytes<T>(layout.tensor_cores);
  const bool projection = layout.phases == 2;
  const int64_t h_bytes = exchange_bytes(layout, 2, s.output_size, operand);
  const int64_t hidden_bytes = projection ? exchange_bytes(layout, 1, s.hidden_size, operand) : 0;
  const int64_t per_direction = h_bytes + hidden_bytes;
  at::Tensor exchange = at::zeros({static_cast<int64_t>(directions.size()) * per_direction},
                                  y.options().dtype(at::kByte));
  cuda::PersistentForward<T> args{};
  args.seq_len = static_cast<int>(s.seq_len);
  args.batch = static_cast<int>(s.batch);
  args.hidden_size = static_cast<int>(s.hidden_size);
  args.output_size = static_cast<int>(s.output_size);
  args.y_ld = y_ld;
  args.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  args.training = training;
  for (size_t i = 0; i < directions.size(); ++i) {
    const ForwardDirection& in = directions[i];
    cuda::PersistentForwardDirection<T>& out = args.direction[i];
    out.input_gates = pointer<const T, scalar_t>(in.input_gates);
    out.bias = in.bias.defined() ? in.bias.data_ptr<Acc>() : nullptr;
    out.w_hh = pointer<const T, scalar_t>(in.w_hh);
    out.w_hr = in.w_hr.defined() ? pointer<const T, scalar_t>(in.w_hr) : nullptr;
    out.h0 = pointer<const T, scalar_t>(in.h0);
    out.c0 = in.c0.data_ptr<Acc>();
    out.y = pointer<T, scalar_t>(y) + static_cast<int64_t>(i) * s.output_size;
    out.cells = in.cells.data_ptr<Acc>();
    out.gates = in.gates.defined() ? in.gates.data_ptr<Acc>() : nullptr;
    uint8_t* const base = exchange.data_ptr<uint8_t>() + i * per_direction;
    out.h_exchange = base;
    out.hidden_exchange = projection ? base + h_bytes : nullptr;
    out.reverse = in.reverse;
  }
  if (directions.size() == 1) args.direction[1] = args.direction[0];
  const cudaError_t error = cuda::launch_persistent_forward<T>(args, layout, current_stream());
  if (error == cudaErrorCooperativeLaunchTooLarge) return false;
  check_launch(error, "persistent forward kernel");
  return true;
}

// The backward recurrence of the directions in one persistent launch (grad_y's rows y_ld apart,
// direction d's columns from d * P); false if the device refused the launch (nothing written).
template <typename scalar_t>
bool run_persistent_backward(const LstmSizes& s, const cuda::PersistentLayout& layout,
                             std::vector<BackwardDirection>& directions, const at::Tensor& grad_y,
                             int64_t y_ld, const at::Tensor& lengths) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int operand = cuda::persistent_operand_bytes<T>(layout.tensor_cores);
  const bool projection = layout.phases == 2;
  const int64_t gate_bytes = exchange_bytes(layout, 2, 4 * s.hidden_size, operand);
  const int64_t total_bytes = projection ? exchange_bytes(layout, 1, s.output_size, operand) : 0;
  const int64_t per_direction = gate_bytes + total_bytes;
  at::Tensor exchange = at::zeros({static_cast<int64_t>(directions.size()) * per_direction},
                                  grad_y.options().dtype(at::kByte));
  cuda::PersistentBackward<T> args{};
  args.seq_len = static_cast<int>(s.seq_len);
  args.batch = static_cast<int>(s.batch);
  args.hidden_size = static_cast<int>(s.hidden_size);
  args.output_size = static_cast<int>(s.output_size);
  args.y_ld = y_ld;
  args.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  for (size_t i = 0; i < directions.size(); ++i) {
    BackwardDirection& in = directions[i];
    cuda::PersistentBackwardDirection<T>& out = args.direction[i];
    out.w_hh = pointer<const T, scalar_t>(in.w_hh);
    out.w_hr = in.w_hr.defined() ? pointer<const T, scalar_t>(in.w_hr) : nullptr;
    out.grad_y = pointer<const T, scalar_t>(grad_y) + static_cast<int64_t>(i) * s.output_size;
    out.gates = in.gates.data_ptr<Acc>();
    out.cells = in.cells.data_ptr<Acc>();
    out.c0 = in.c0.data_ptr<Acc>();
    out.grad_h = in.grad_h.data_ptr<Acc>();
    out.grad_c = in.grad_c.data_ptr<Acc>();
    out.grad_gates = in.grad_gates.data_ptr<Acc>();
    out.grad_proj_out = projection ? in.grad_proj_out.data_ptr<Acc>() : nullptr;
    out.hidden_all = projection ? pointer<T, scalar_t>(in.hidden_all) : nullptr;
    uint8_t* const base = exchange.data_ptr<uint8_t>() + i * per_direction;
    out.gate_exchange = base;
    out.total_exchange = projection ? base + gate_bytes : nullptr;
    out.reverse = in.reverse;
  }
  if (directions.size() == 1) args.direction[1] = args.direction[0];
  const cudaError_t error = cuda::launch_persistent_backward<T>(args, layout, current_stream());
  if (error == cudaErrorCooperativeLaunchTooLarge) return false;
  check_launch(error, "persistent backward kernel");
  return true;
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
  const ForwardDirection d =
      forward_direction(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training);
  at::Tensor y = at::empty({s.seq_len, s.batch, s.output_size}, x.options());
  at::Tensor cells = d.cells, gates = d.gates;
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_forward_cuda", [&] {
    const CudaPath path =
        choose_path<scalar_t>(s, 1, /*backward=*/false, w_hr.has_value(), lengths.has_value());
    bool done = false;
    if (path.persistent) {
      done = run_persistent_forward<scalar_t>(s, path.layout, {d}, y, s.output_size, lengths_c,
                                              training);
      if (!done) persistent_refused(1);
    }
    if (!done) {
      forward_steps<scalar_t>(s, d.input_gates, d.bias, d.h0, d.c0, d.w_hh, w_hr, lengths_c,
                              reverse, y, cells, gates);
    }
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
  std::vector<BackwardDirection> d{
      backward_direction(s, x, grad_h_n, grad_c_n, c0, w_hh, w_hr, gates, cells, reverse)};
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  if (s.seq_len > 0 && s.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "lstm_fused_backward_cuda", [&] {
      const at::Tensor grad_y_c = grad_y.contiguous();
      const CudaPath path =
          choose_path<scalar_t>(s, 1, /*backward=*/true, w_hr.has_value(), lengths.has_value());
      bool done = false;
      if (path.persistent) {
        done = run_persistent_backward<scalar_t>(s, path.layout, d, grad_y_c, s.output_size,
                                                 lengths_c);
        if (!done) persistent_refused(1);
      }
      if (!done) {
        const std::optional<at::Tensor> w_hr_c =
            w_hr.has_value() ? std::optional<at::Tensor>(d[0].w_hr) : std::nullopt;
        backward_steps<scalar_t>(s, grad_y_c, d[0].c0, d[0].w_hh, w_hr_c, d[0].gates, d[0].cells,
                                 lengths_c, reverse, d[0].grad_h, d[0].grad_c, d[0].grad_gates,
                                 d[0].grad_proj_out, d[0].hidden_all);
      }
    });
  }
  return backward_result(s, d[0], x, h0, w_ih, y, has_bias);
}

// ---- Both directions of a layer ----------------------------------------------------------------

BidirectionalForwardResult bidirectional_forward_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths,
    bool training) {
  const LstmSizes s =
      check_bidirectional_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse,
                               w_hh_reverse, b_ih_reverse, b_hh_reverse, w_hr_reverse, lengths);
  check_cuda_sizes(s);
  DeviceGuard guard(x.device());
  const int64_t P = s.output_size;
  std::optional<BidirectionalForwardResult> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_bidirectional_forward_cuda", [&] {
    const CudaPath path =
        choose_path<scalar_t>(s, 2, /*backward=*/false, w_hr.has_value(), lengths.has_value());
    if (!path.persistent) return;
    const std::vector<ForwardDirection> d{
        forward_direction(s, x, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, w_hr, false, training),
        forward_direction(s, x, h0[1], c0[1], w_ih_reverse, w_hh_reverse, b_ih_reverse,
                          b_hh_reverse, w_hr_reverse, true, training)};
    at::Tensor y = at::empty({s.seq_len, s.batch, 2 * P}, x.options());
    const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
    if (!run_persistent_forward<scalar_t>(s, path.layout, d, y, 2 * P, lengths_c, training)) {
      persistent_refused(2);
      return;
    }
    auto [y_f, h_n, c_n, gates, cells] = forward_result(s, y.narrow(2, 0, P), d[0].cells,
                                                        d[0].gates, x, h0[0], c0[0], false,
                                                        training);
    auto [y_r, h_n_r, c_n_r, gates_r, cells_r] = forward_result(
        s, y.narrow(2, P, P), d[1].cells, d[1].gates, x, h0[1], c0[1], true, training);
    result = BidirectionalForwardResult{y, at::stack({h_n, h_n_r}), at::stack({c_n, c_n_r}),
                                        gates, cells, gates_r, cells_r};
  });
  if (result.has_value()) return *result;
  return bidirectional_forward_by_direction(LSTM_FUSED_OPS_NAME, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            w_hr, w_ih_reverse, w_hh_reverse, b_ih_reverse,
                                            b_hh_reverse, w_hr_reverse, lengths, training);
}

BidirectionalBackwardResult bidirectional_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const at::Tensor& w_ih_reverse,
    const at::Tensor& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
    const std::optional<at::Tensor>& lengths, const at::Tensor& y, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& gates_reverse, const at::Tensor& cells_reverse,
    bool has_bias) {
  const LstmSizes s = check_bidirectional_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt,
                                               w_hr, w_ih_reverse, w_hh_reverse, std::nullopt,
                                               std::nullopt, w_hr_reverse, lengths);
  const int64_t P = s.output_size;
  // The checks of each direction's backward (the shapes of the gradients and the saved state).
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(2) == 2 * P && y.dim() == 3 && y.size(2) == 2 * P &&
                  grad_h_n.dim() == 3 && grad_h_n.size(0) == 2 && grad_c_n.dim() == 3 &&
                  grad_c_n.size(0) == 2,
              "lstm_fused: the two-direction backward takes grad_y and y [T, B, 2P], grad_h_n "
              "[2, B, P] and grad_c_n [2, B, H], got shapes ", grad_y.sizes(), ", ", y.sizes(),
              ", ", grad_h_n.sizes(), " and ", grad_c_n.sizes());
  check_backward_args(grad_y.narrow(2, 0, P), grad_h_n[0], grad_c_n[0], x, h0[0], c0[0], w_ih,
                      w_hh, w_hr, lengths, y.narrow(2, 0, P), gates, cells);
  check_backward_args(grad_y.narrow(2, P, P), grad_h_n[1], grad_c_n[1], x, h0[1], c0[1],
                      w_ih_reverse, w_hh_reverse, w_hr_reverse, lengths, y.narrow(2, P, P),
                      gates_reverse, cells_reverse);
  check_cuda_sizes(s);
  DeviceGuard guard(x.device());
  std::optional<BidirectionalBackwardResult> result;
  if (s.seq_len > 0 && s.batch > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "lstm_fused_bidirectional_backward_cuda", [&] {
      const CudaPath path =
          choose_path<scalar_t>(s, 2, /*backward=*/true, w_hr.has_value(), lengths.has_value());
      if (!path.persistent) return;
      std::vector<BackwardDirection> d{
          backward_direction(s, x, grad_h_n[0], grad_c_n[0], c0[0], w_hh, w_hr, gates, cells,
                             false),
          backward_direction(s, x, grad_h_n[1], grad_c_n[1], c0[1], w_hh_reverse, w_hr_reverse,
                             gates_reverse, cells_reverse, true)};
      const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
      if (!run_persistent_backward<scalar_t>(s, path.layout, d, grad_y.contiguous(), 2 * P,
                                             lengths_c)) {
        persistent_refused(2);
        return;
      }
      auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
          backward_result(s, d[0], x, h0[0], w_ih, y.narrow(2, 0, P), has_bias);
      auto [grad_x_r, grad_h0_r, grad_c0_r, grad_w_ih_r, grad_w_hh_r, grad_bias_r, grad_w_hr_r] =
          backward_result(s, d[1], x, h0[1], w_ih_reverse, y.narrow(2, P, P), has_bias);
      result = BidirectionalBackwardResult{
          grad_x.add_(grad_x_r), at::stack({grad_h0, grad_h0_r}), at::stack({grad_c0, grad_c0_r}),
          grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_w_ih_r, grad_w_hh_r, grad_bias_r,
          grad_w_hr_r};
    });
  }
  if (result.has_value()) return *result;
  return bidirectional_backward_by_direction(LSTM_FUSED_OPS_NAME, grad_y, grad_h_n, grad_c_n, x,
                                             h0, c0, w_ih, w_hh, w_hr, w_ih_reverse, w_hh_reverse,
                                             w_hr_reverse, lengths, y, gates, cells, gates_reverse,
                                             cells_reverse, has_bias);
}

}  // namespace
}  // namespace lstm_fused

#ifdef LSTM_FUSED_EMULATE_CUDA
TORCH_LIBRARY(lstm_fused_emulated, m) {
  m.def(lstm_fused::kForwardSchema);
  m.def(lstm_fused::kBackwardSchema);
  m.def(lstm_fused::kBidirectionalForwardSchema);
  m.def(lstm_fused::kBidirectionalBackwardSchema);
  // The emulated device that the persistent kernel is planned for and launched on.
  m.def("set_emulated_device(int multiprocessors, int shared_bytes_per_block, "
        "bool cooperative_launch, int coresident_block_limit, bool capturing, "
        "int runtime_version) -> ()",
        [](int64_t multiprocessors, int64_t shared_bytes_per_block, bool cooperative_launch,
           int64_t coresident_block_limit, bool capturing, int64_t runtime_version) {
          cuda_emulation::DeviceModel& model = cuda_emulation::device_model();
          model.multiprocessors = static_cast<int>(multiprocessors);
          model.shared_bytes_per_block_optin = static_cast<int>(shared_bytes_per_block);
          model.cooperative_launch = cooperative_launch;
          model.coresident_block_limit = static_cast<int>(coresident_block_limit);
          model.capturing = capturing;
          model.runtime_version = static_cast<int>(runtime_version);
        });
  // The persistent kernel's plan on the emulated device, and the cost model's estimates.
  m.def("persistent_plan(ScalarType dtype, int batch, int hidden_size, int output_size, "
        "int directions, bool projection, bool backward, bool tensor_cores) -> (bool feasible, "
        "str reason, int blocks_per_direction, int staged_rows, int shared_bytes, "
        "float estimated_step_us, float step_kernels_us)",
        [](at::ScalarType dtype, int64_t batch, int64_t hidden_size, int64_t output_size,
           int64_t directions, bool projection, bool backward, bool tensor_cores) {
          const lstm_fused::cuda::PersistentProblem problem{
              2, static_cast<int>(batch), static_cast<int>(hidden_size),
              static_cast<int>(output_size), static_cast<int>(directions), projection, backward,
              tensor_cores};
          const lstm_fused::cuda::PersistentDevice device = lstm_fused::persistent_device();
          lstm_fused::cuda::PersistentPlan plan{};
          int element_bytes = 0;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_plan", [&] {
            using T = typename lstm_fused::KernelType<scalar_t>::type;
            plan = lstm_fused::cuda::plan_persistent<T>(problem, device);
            element_bytes = sizeof(T);
          });
          return std::make_tuple(plan.feasible, std::string(plan.reason),
                                 static_cast<int64_t>(plan.layout.blocks_per_direction),
                                 static_cast<int64_t>(plan.layout.staged_rows),
                                 static_cast<int64_t>(plan.layout.shared_bytes),
                                 plan.estimated_step_us,
                                 lstm_fused::cuda::estimate_step_kernels_us(problem, device,
                                                                            element_bytes, false));
        });
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
  m.impl("bidirectional_forward", &lstm_fused::bidirectional_forward_cuda);
  m.impl("bidirectional_backward", &lstm_fused::bidirectional_backward_cuda);
}
