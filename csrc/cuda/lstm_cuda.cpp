// CUDA implementation of the lstm_fused ops: checks, allocation, device guard, current stream,
// dtype dispatch, the one choice of kernel path (choose_path) and the sequence of launches; the
// kernels are in lstm_kernels.cu (fused steps) and lstm_persistent.cu (a sequence per launch).
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
// The persistent kernel replaces the per-step launches, forward and backward, by one cooperative
// launch where the weights fit on chip and the cost model expects it to beat the step kernels'
// plan; the two-direction ops (bidirectional_forward, bidirectional_backward) run both directions
// of a layer in one such launch where they fit together, else one direction after the other. The
// GEMMs before and after it are the same as the step kernels'.
//
// Precision: float32 and float64 are computed in their own type, float16 and bfloat16 with float32
// arithmetic, float32 cell state and float32 saved gates and cells. For float32 every product,
// the kernels' (step or persistent) and the GEMMs', uses TF32 exactly when nn.LSTM's cuDNN may:
// when cuDNN's RNN setting allows it (torch.backends.cudnn.allow_tf32, the default, or
// torch.backends.cudnn.rnn.fp32_precision), whatever torch.backends.cuda.matmul says. The GEMMs
// call cuBLAS with that choice made explicit per call, changing no global setting.
//
// Capture-safe: no host synchronisation, every allocation from the caching allocator before the
// step loop (or the persistent launch), every launch on the current stream; the persistent kernel
// only where the stream may take a cooperative launch.
#include "../lstm.h"
#include "../step_order.h"
#include "lstm_kernels.h"
#include "lstm_persistent.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
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
#include <ATen/cuda/CUDAContext.h>
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

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "lstm_fused: ", what, " failed: ", cudaGetErrorString(error));
}

int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// What the kernels' plans need of the device: the step kernels' traits (allow_tf32 is set per
// call) and the persistent kernel's limits.
struct DeviceInfo {
  cuda::DeviceTraits steps;
  cuda::PersistentDevice persistent;
};

DeviceInfo read_device_info(int device) {
  DeviceInfo info{};
  int major = 0;
  check_cuda(cuda::query_persistent_device(device, &info.persistent),
             "reading the device's attributes");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "reading the device's compute capability");
  info.steps = {info.persistent.multiprocessors, major >= 8 && cuda::tensor_core_kernels_built(),
                false};
  return info;
}

#ifdef LSTM_FUSED_EMULATE_CUDA
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
// The emulated device (tests change it between calls: set_emulated_device), read every time.
DeviceInfo device_info() { return read_device_info(current_device()); }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

DeviceInfo device_info() {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> known;
  const int device = current_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  const DeviceInfo info = read_device_info(device);
  known.emplace(device, info);
  return info;
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

// gemm on tensors (any strides for a and b): the input projection and gradients_over_steps.
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

// ---- The kernel path ---------------------------------------------------------------------------

// The path lstm_fused.force_path or LSTM_FUSED_PATH forces (forced_names, lstm.h).
enum class ForcedPath { kAuto, kStepSmall, kStepMedium, kStepLarge, kPersistent };

ForcedPath forced_path() {
  const std::string forced = forced_names().path;
  if (forced.empty() || forced == "auto") return ForcedPath::kAuto;
  if (forced == "step_small") return ForcedPath::kStepSmall;
  if (forced == "step_medium") return ForcedPath::kStepMedium;
  if (forced == "step_large") return ForcedPath::kStepLarge;
  if (forced == "persistent") return ForcedPath::kPersistent;
  TORCH_CHECK(false, "lstm_fused: the forced path (LSTM_FUSED_PATH or lstm_fused.force_path) ",
              "must be auto, step_small, step_medium, step_large or persistent on CUDA, got '",
              forced, "'");
}

// The step kernels' tile height: forced, else their own choice (kAuto, also where the persistent
// kernel was forced but the two-direction op falls back to one direction at a time).
StepTile step_tile_of(ForcedPath forced) {
  switch (forced) {
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

// The step kernels' launches of one step of a recurrence, as lstm_kernels.cu plans them: forward
// the step kernel; backward the fused kernel, or with a projection the hidden-gradient and the
// gate kernels; and backward the hidden-gradient kernel after the last step, giving dL/dh_0.
struct StepLaunches {
  cuda::StepPlan each_step[2];
  int count;
  cuda::StepPlan last;  // backward only
};

template <typename T>
StepLaunches step_launches(const LstmSizes& s, bool backward, bool projection, StepTile tile,
                           const cuda::DeviceTraits& device) {
  StepLaunches launches{};
  const int B = static_cast<int>(s.batch), H = static_cast<int>(s.hidden_size),
            P = static_cast<int>(s.output_size);
  if (!backward) {
    cuda::ForwardStep<T> step{};
    step.batch = B;
    step.hidden_size = H;
    step.output_size = P;
    launches.each_step[0] = cuda::forward_step_plan<T>(step, tile, device);
    launches.count = 1;
    return launches;
  }
  cuda::BackwardStep<T> step{};
  step.batch = B;
  step.hidden_size = H;
  step.output_size = P;
  step.a = reinterpret_cast<const T*>(alignof(T));  // a plan reads sizes only; non-null: a product
  step.k = 4 * H;
  launches.last = cuda::backward_step_plan<T>(step, BackwardMode::kHiddenGrad, tile, device);
  if (projection) {
    cuda::BackwardStep<T> gate_step = step;
    gate_step.k = P;
    launches.each_step[0] = launches.last;
    launches.each_step[1] =
        cuda::backward_step_plan<T>(gate_step, BackwardMode::kGates, tile, device);
    launches.count = 2;
  } else {
    launches.each_step[0] = cuda::backward_step_plan<T>(step, BackwardMode::kFused, tile, device);
    launches.count = 1;
  }
  return launches;
}

// The cost model's time of one step on the step kernels' path: their launches, and forward with
// a projection the GEMM that maps o * tanh(c_t) to y[t] (and with lengths the padded-row kernel).
double step_kernels_us(const StepLaunches& launches, const LstmSizes& s, bool backward,
                       bool projection, bool has_lengths, int multiprocessors) {
  double total = 0;
  for (int i = 0; i < launches.count; ++i) total += launches.each_step[i].estimated_us;
  if (!backward && projection) {
    const double macs = static_cast<double>(s.batch) * s.hidden_size * s.output_size;
    const double rate = (launches.each_step[0].tensor_cores ? cuda::cost::kTensorMacsPerUsPerSm
                                                            : 2 * cuda::cost::kFmaPerUsPerSm) *
                        std::max(1, multiprocessors);
    total += cuda::cost::kLaunchUs + macs / rate + (has_lengths ? cuda::cost::kLaunchUs : 0.0);
  }
  return total;
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
  cuda::PersistentLayout layout{};  // the persistent kernel's
  StepTile tile = StepTile::kAuto;  // else the step kernels', with their plans
  cuda::DeviceTraits device{};      // what those plans were made for (TF32 included)
  StepLaunches steps{};
};

// The one place that picks the CUDA kernel path. The step kernels' plans for the call come from
// lstm_kernels.cu's tile choice (with_plan_in), and so does the persistent kernel's use of tensor
// cores (exactly where the step kernels use them, so that both paths round alike). The
// persistent kernel (one launch for the whole sequence) runs where it can and the cost model
// expects it to beat those plans, else the step kernels. LSTM_FUSED_PATH forces a step tile or
// the persistent kernel, for tests and benchmarks: a forced persistent kernel that cannot run
// here (the weights beyond the device's on-chip memory, no cooperative launches, graph capture
// on CUDA 11) is an error that says why, rather than a measurement of another kernel under its
// name. For both directions at once a persistent kernel that cannot hold them falls back to one
// direction at a time, each of which chooses (and errs) by itself.
template <typename scalar_t>
CudaPath choose_path(const LstmSizes& s, int directions, bool backward, bool projection,
                     bool has_lengths) {
  using T = typename KernelType<scalar_t>::type;
  const ForcedPath forced = forced_path();
  const DeviceInfo info = device_info();
  CudaPath path;
  path.tile = step_tile_of(forced);
  path.device = info.steps;
  path.device.allow_tf32 = allow_tf32<scalar_t>();
  path.steps = step_launches<T>(s, backward, projection, path.tile, path.device);
  if (forced != ForcedPath::kAuto && forced != ForcedPath::kPersistent) return path;
  const bool is_forced = forced == ForcedPath::kPersistent;
  // One step is one launch on either path.
  if (s.seq_len == 0 || s.batch == 0 || (!is_forced && s.seq_len < 2)) return path;
  const cuda::PersistentProblem problem{
      static_cast<int>(std::min<int64_t>(s.seq_len, std::numeric_limits<int>::max())),
      static_cast<int>(s.batch),
      static_cast<int>(s.hidden_size),
      static_cast<int>(s.output_size),
      directions,
      projection,
      backward,
      path.steps.each_step[0].tensor_cores};
  std::string why = s.seq_len > std::numeric_limits<int>::max()
                        ? std::string("more than 2^31 - 1 steps")
                        : capture_forbids_cooperative_launch();
  cuda::PersistentPlan plan{};
  if (why.empty()) {
    plan = persistent_plan<T>(problem, info.persistent);
    if (!plan.feasible) why = plan.reason;
  }
  if (!why.empty()) {
    TORCH_CHECK(!is_forced || directions == 2,
                "lstm_fused: the persistent kernel was forced (LSTM_FUSED_PATH=persistent) but "
                "cannot run here: ", why, ". Force a step_* path, or use auto, which picks the "
                "fused-step kernels here");
    return path;
  }
  const double steps_us = directions * step_kernels_us(path.steps, s, backward, projection,
                                                       has_lengths, info.steps.multiprocessors);
  if (!is_forced && !(plan.estimated_step_us < steps_us)) return path;
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

// The split-K scratch of the step kernels' launches of a call: big enough for every plan,
// allocated once before the step loop (counters zeroed; every launch leaves them zero).
struct Workspace {
  at::Tensor partial_sums, counters;

  Workspace(const StepLaunches& launches, const at::TensorOptions& acc_options) {
    int64_t partials = launches.last.partial_sums, count = launches.last.counters;
    for (int i = 0; i < launches.count; ++i) {
      partials = std::max(partials, launches.each_step[i].partial_sums);
      count = std::max(count, launches.each_step[i].counters);
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

template <typename scalar_t>
ForwardDirection forward_direction(const LstmSizes& s, const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& c0, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& w_hr, bool reverse,
                                   bool training) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size;
  const auto acc_options = x.options().dtype(accumulate_type(x));
  ForwardDirection d;
  // The input projection of all steps at once, in x's dtype (TF32 as the kernels).
  d.input_gates = at::empty({T * B, 4 * H}, x.options());
  matmul_for<scalar_t>(allow_tf32<scalar_t>())(d.input_gates, x.reshape({T * B, s.input_size}),
                                               w_ih.t(), false);
  d.input_gates = d.input_gates.view({T, B, 4 * H});
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
  // In x's dtype, the GEMMs' operands (and the step kernels' next product operand):
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
  d.grad_gates = at::empty({T, B, 4 * H}, x.options());
  if (w_hr.has_value()) {
    d.grad_proj_out = at::empty({T, B, P}, x.options());
    d.hidden_all = at::empty({T, B, H}, x.options());
  }
  d.reverse = reverse;
  return d;
}

// The weight gradients and dx of one direction from its pass back in time: GEMMs in x's dtype,
// float32 as TF32 exactly where the kernels use it.
template <typename scalar_t>
BackwardResult backward_result(const LstmSizes& s, const BackwardDirection& d, const at::Tensor& x,
                               const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& y,
                               bool has_bias) {
  const auto dtype = x.scalar_type();
  return gradients_over_steps(s, d.grad_gates, x, h0, w_ih, y, d.grad_proj_out, d.hidden_all,
                              d.grad_h.to(dtype), d.grad_c.to(dtype), d.reverse, has_bias,
                              matmul_for<scalar_t>(allow_tf32<scalar_t>()));
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
    out.grad_gates = pointer<T, scalar_t>(in.grad_gates);
    out.grad_proj_out = projection ? pointer<T, scalar_t>(in.grad_proj_out) : nullptr;
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

// ---- The step kernels --------------------------------------------------------------------------

template <typename scalar_t>
void forward_steps(const LstmSizes& s, const CudaPath& path, const ForwardDirection& d,
                   const at::Tensor& lengths, at::Tensor& y) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int64_t T_ = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool training = d.gates.defined(), has_proj = d.w_hr.defined(), reverse = d.reverse;
  const cudaStream_t stream = current_stream();
  at::Tensor hidden = has_proj ? at::empty({B, H}, y.options()) : at::Tensor();

  // Raw pointers per step, from the step's index alone: no tensor is made in the step loop.
  T* const y_data = pointer<T, scalar_t>(y);
  const T* const input_gates_data = pointer<const T, scalar_t>(d.input_gates);
  Acc* const cells_data = d.cells.data_ptr<Acc>();
  Acc* const gates_data = training ? d.gates.data_ptr<Acc>() : nullptr;
  cuda::ForwardStep<T> step{};
  step.batch = static_cast<int>(B);
  step.hidden_size = static_cast<int>(H);
  step.output_size = static_cast<int>(P);
  step.w_hh = pointer<const T, scalar_t>(d.w_hh);
  step.bias = d.bias.defined() ? d.bias.data_ptr<Acc>() : nullptr;
  step.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  step.has_projection = has_proj;
  if (has_proj) step.hidden_out = pointer<T, scalar_t>(hidden);
  const Workspace workspace(path.steps, d.cells.options());
  step.workspace = workspace.view();
  // y[t] = hidden W_hr^T, per step (W_hr^T: a column-major view of W_hr).
  const MatrixRef<const scalar_t> hidden_ref =
      has_proj ? matrix_of<const scalar_t>(hidden) : MatrixRef<const scalar_t>{};
  MatrixRef<const scalar_t> w_hr_t{};
  if (has_proj) w_hr_t = {d.w_hr.data_ptr<scalar_t>(), H, P, 1, H};
  for (int64_t n = 0; n < T_; ++n) {
    // Training keeps every cell state; inference alternates between two buffers.
    const auto [t, t_prev, first, slot, slot_prev] = forward_step_order(n, T_, reverse, training);
    step.t = t;
    step.h_prev = first ? pointer<const T, scalar_t>(d.h0) : y_data + t_prev * B * P;
    step.c_prev = first ? d.c0.data_ptr<Acc>() : cells_data + slot_prev * B * H;
    step.c_next = cells_data + slot * B * H;
    step.input_gates = input_gates_data + t * B * 4 * H;
    if (!has_proj) step.hidden_out = y_data + t * B * P;
    step.gates = training ? gates_data + t * B * 4 * H : nullptr;
    check_launch(cuda::launch_forward_step<T>(step, path.tile, path.device, stream),
                 "forward step kernel");
    if (has_proj) {
      T* const y_t = y_data + t * B * P;
      gemm<scalar_t>({reinterpret_cast<scalar_t*>(y_t), B, P, P, 1}, hidden_ref, w_hr_t, false,
                     path.device.allow_tf32, y.options());
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
  at::Tensor y = at::empty({s.seq_len, s.batch, s.output_size}, x.options());
  at::Tensor cells, gates;
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_forward_cuda", [&] {
    const CudaPath path =
        choose_path<scalar_t>(s, 1, /*backward=*/false, w_hr.has_value(), lengths.has_value());
    const ForwardDirection d = forward_direction<scalar_t>(s, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                           w_hr, reverse, training);
    cells = d.cells;
    gates = d.gates;
    bool done = false;
    if (path.persistent) {
      done = run_persistent_forward<scalar_t>(s, path.layout, {d}, y, s.output_size, lengths_c,
                                              training);
      if (!done) persistent_refused(1);
    }
    if (!done) forward_steps<scalar_t>(s, path, d, lengths_c, y);
  });

  return forward_result(s, y, cells, gates, x, h0, c0, reverse, training);
}

// The pass back in time by the step kernels; w_hh_t, w_hr_t: W_hh^T and W_hr^T, contiguous.
template <typename scalar_t>
void backward_steps(const LstmSizes& s, const CudaPath& path, const at::Tensor& grad_y,
                    const at::Tensor& w_hh_t, const at::Tensor& w_hr_t,
                    const at::Tensor& lengths, BackwardDirection& d) {
  using T = typename KernelType<scalar_t>::type;
  using Acc = acc_t<T>;
  const int64_t T_ = s.seq_len, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr_t.defined(), reverse = d.reverse;
  const cudaStream_t stream = current_stream();

  // Raw pointers per step, from the step's index alone (see forward_steps).
  const int64_t B = s.batch;
  const T* const grad_y_data = pointer<const T, scalar_t>(grad_y);
  const Acc* const gates_data = d.gates.data_ptr<Acc>();
  const Acc* const cells_data = d.cells.data_ptr<Acc>();
  T* const grad_gates_data = pointer<T, scalar_t>(d.grad_gates);
  T* const grad_total_data = has_proj ? pointer<T, scalar_t>(d.grad_proj_out) : nullptr;
  T* const hidden_data = has_proj ? pointer<T, scalar_t>(d.hidden_all) : nullptr;
  const T* const w_hh_t_data = pointer<const T, scalar_t>(w_hh_t);
  const T* const w_hr_t_data = has_proj ? pointer<const T, scalar_t>(w_hr_t) : nullptr;
  cuda::BackwardStep<T> step{};
  step.batch = static_cast<int>(B);
  step.hidden_size = static_cast<int>(H);
  step.output_size = static_cast<int>(P);
  step.grad_h = d.grad_h.data_ptr<Acc>();
  step.grad_c = d.grad_c.data_ptr<Acc>();
  step.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const Workspace workspace(path.steps, d.cells.options());
  step.workspace = workspace.view();
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
  auto launch = [&](BackwardMode mode, const char* kernel) {
    check_launch(cuda::launch_backward_step<T>(step, mode, path.tile, path.device, stream),
                 kernel);
  };
  for (int64_t n = 0; n < T_; ++n) {
    const BackwardStepOrder order = backward_step_order(n, T_, reverse);
    const int64_t t = order.t, t_prev = order.t_prev, t_next = order.t_next;
    const bool from_initial = order.from_initial;
    step.t = t;
    step.grad_y = grad_y_data + t * B * P;
    step.gates = gates_data + t * B * 4 * H;
    step.cell = cells_data + t * B * H;
    step.c_prev = from_initial ? d.c0.data_ptr<Acc>() : cells_data + t_prev * B * H;
    step.grad_gates = grad_gates_data + t * B * 4 * H;
    set_received(t_next, order.last);
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
  set_received(first_step_time(T_, reverse), false);
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

  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "lstm_fused_backward_cuda", [&] {
    const CudaPath path =
        choose_path<scalar_t>(s, 1, /*backward=*/true, w_hr.has_value(), lengths.has_value());
    if (s.seq_len > 0 && s.batch > 0) {
      const at::Tensor grad_y_c = grad_y.contiguous();
      bool done = false;
      if (path.persistent) {
        done = run_persistent_backward<scalar_t>(s, path.layout, d, grad_y_c, s.output_size,
                                                 lengths_c);
        if (!done) persistent_refused(1);
      }
      if (!done) {
        // The step kernels' products read the weights' columns along K: transposed copies, once.
        const at::Tensor w_hh_t = d[0].w_hh.t().contiguous();
        const at::Tensor w_hr_t = w_hr.has_value() ? d[0].w_hr.t().contiguous() : at::Tensor();
        backward_steps<scalar_t>(s, path, grad_y_c, w_hh_t, w_hr_t, lengths_c, d[0]);
      }
    }
    result = backward_result<scalar_t>(s, d[0], x, h0, w_ih, y, has_bias);
  });
  return result;
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
        forward_direction<scalar_t>(s, x, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, w_hr, false,
                                    training),
        forward_direction<scalar_t>(s, x, h0[1], c0[1], w_ih_reverse, w_hh_reverse,
                                    b_ih_reverse, b_hh_reverse, w_hr_reverse, true, training)};
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
          backward_result<scalar_t>(s, d[0], x, h0[0], w_ih, y.narrow(2, 0, P), has_bias);
      auto [grad_x_r, grad_h0_r, grad_c0_r, grad_w_ih_r, grad_w_hh_r, grad_bias_r, grad_w_hr_r] =
          backward_result<scalar_t>(s, d[1], x, h0[1], w_ih_reverse, y.narrow(2, P, P), has_bias);
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

#ifdef LSTM_FUSED_EMULATE_CUDA
// The step plans of a call's launches at these sizes, for tests of the tile choice: per launch
// kind (forward; backward kFused, or kHiddenGrad and kGates with a projection; the last
// kHiddenGrad) rows, columns, tensor cores, split, blocks.
std::vector<int64_t> step_plans(int64_t batch, int64_t hidden_size, int64_t proj_size,
                                at::ScalarType dtype, bool allow_tf32) {
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "step_plans", [&] {
    using T = typename KernelType<scalar_t>::type;
    cuda::DeviceTraits device = device_info().steps;
    device.allow_tf32 = allow_tf32 && std::is_same_v<scalar_t, float>;
    LstmSizes s{};
    s.batch = batch;
    s.hidden_size = hidden_size;
    s.output_size = proj_size > 0 ? proj_size : hidden_size;
    const StepTile tile = step_tile_of(forced_path());
    auto add = [&](const cuda::StepPlan& plan) {
      out.insert(out.end(), {plan.rows, plan.columns, plan.tensor_cores ? 1 : 0, plan.split,
                             plan.blocks});
    };
    add(step_launches<T>(s, false, proj_size > 0, tile, device).each_step[0]);
    const StepLaunches backward = step_launches<T>(s, true, proj_size > 0, tile, device);
    for (int i = 0; i < backward.count; ++i) add(backward.each_step[i]);
    add(backward.last);
  });
  return out;
}

// The persistent kernel's plan on the emulated device, and the cost model's estimates per step
// of it and of the step kernels' plans, for tests of the capacity and of the dispatch.
std::tuple<bool, std::string, int64_t, int64_t, int64_t, double, double> persistent_plan_of(
    at::ScalarType dtype, int64_t batch, int64_t hidden_size, int64_t output_size,
    int64_t directions, bool projection, bool backward, bool tensor_cores) {
  const cuda::PersistentProblem problem{
      2, static_cast<int>(batch), static_cast<int>(hidden_size), static_cast<int>(output_size),
      static_cast<int>(directions), projection, backward, tensor_cores};
  const DeviceInfo info = device_info();
  cuda::PersistentPlan plan{};
  double steps_us = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "persistent_plan", [&] {
    using T = typename KernelType<scalar_t>::type;
    plan = cuda::plan_persistent<T>(problem, info.persistent);
    LstmSizes s{};
    s.seq_len = 2;
    s.batch = batch;
    s.hidden_size = hidden_size;
    s.output_size = output_size;
    cuda::DeviceTraits device = info.steps;
    device.allow_tf32 = tensor_cores && std::is_same_v<scalar_t, float>;
    const StepLaunches launches =
        step_launches<T>(s, backward, projection, StepTile::kAuto, device);
    steps_us = directions * step_kernels_us(launches, s, backward, projection, false,
                                            device.multiprocessors);
  });
  return {plan.feasible, std::string(plan.reason), plan.layout.blocks_per_direction,
          plan.layout.staged_rows, plan.layout.shared_bytes, plan.estimated_step_us, steps_us};
}
#endif

}  // namespace
}  // namespace lstm_fused

#ifdef LSTM_FUSED_EMULATE_CUDA
TORCH_LIBRARY(lstm_fused_emulated, m) {
  m.def(lstm_fused::kForwardSchema);
  m.def(lstm_fused::kBackwardSchema);
  m.def(lstm_fused::kBidirectionalForwardSchema);
  m.def(lstm_fused::kBidirectionalBackwardSchema);
  lstm_fused::define_forcing_ops(m);  // steered by lstm_fused.force_path too (see the tests)
  // The emulated device that every kernel is planned for and launched on.
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
  m.def("persistent_plan(ScalarType dtype, int batch, int hidden_size, int output_size, "
        "int directions, bool projection, bool backward, bool tensor_cores) -> (bool feasible, "
        "str reason, int blocks_per_direction, int staged_rows, int shared_bytes, "
        "float estimated_step_us, float step_kernels_us)",
        &lstm_fused::persistent_plan_of);
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
  m.impl("bidirectional_forward", &lstm_fused::bidirectional_forward_cuda);
  m.impl("bidirectional_backward", &lstm_fused::bidirectional_backward_cuda);
}
