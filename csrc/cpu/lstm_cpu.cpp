// CPU implementation of the lstm_fused ops.
//
// Forward: one GEMM for the input projection of every step, then per step the recurrent part of
// all four gates and the nonlinearities, biases and cell update, fused: each thread owns blocks of
// hidden units and computes them from a packed W_hh in registers (above batch 128, a GEMM per
// step and a fused elementwise pass). Backward: one pass back in time (fused gate gradients, then
// dh_{t-1} from W_hh packed by column blocks), then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs
// over all steps.
// No atomics and a fixed reduction order: identical inputs give identical results.
#include "../lstm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lstm_fused {
namespace {

// The kernels are compiled twice on x86-64 Linux, for AVX2+FMA (x86-64-v3) and for the baseline,
// and the loader picks one by the CPU's features. Results are deterministic on a given machine;
// FMA rounds differently, so machines with and without it may differ in the last bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 12
#define LSTM_FUSED_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LSTM_FUSED_SIMD_CLONES
#endif
// Inlined into each clone, so that the loops are vectorised for that clone's instruction set.
#if defined(__GNUC__)
#define LSTM_FUSED_INLINE inline __attribute__((always_inline))
#else
#define LSTM_FUSED_INLINE inline
#endif

// exp written with plain arithmetic (Cephes expf, within 2 ulp) so that loops over it vectorise.
LSTM_FUSED_INLINE float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LSTM_FUSED_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// Cephes tanhf: an odd polynomial near zero, (1 - e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere.
LSTM_FUSED_INLINE float tanh_(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float near_zero = x + x * z * p;
  const float e = exp_f32(-2.0f * ax);
  const float magnitude = (1.0f - e) / (1.0f + e);
  const float far = x < 0.0f ? -magnitude : magnitude;
  return ax < 0.625f ? near_zero : far;
}

LSTM_FUSED_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
LSTM_FUSED_INLINE double tanh_(double x) { return std::tanh(x); }

// Hidden units [j0, j1) of one row of the forward update. gates: [4H] pre-activations without
// bias in, activations out; bias: [4H] (b_ih + b_hh, or zeros); c_prev, c_next, hidden: [H].
template <typename T>
LSTM_FUSED_INLINE void forward_row_impl(int64_t H, int64_t j0, int64_t j1, T* __restrict gates,
                                        const T* __restrict bias, const T* __restrict c_prev,
                                        T* __restrict c_next, T* __restrict hidden) {
  for (int64_t j = j0; j < j1; ++j) {
    const T i = sigmoid(gates[j] + bias[j]);
    const T f = sigmoid(gates[H + j] + bias[H + j]);
    const T g = tanh_(gates[2 * H + j] + bias[2 * H + j]);
    const T o = sigmoid(gates[3 * H + j] + bias[3 * H + j]);
    const T c = f * c_prev[j] + i * g;
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = g;
    gates[3 * H + j] = o;
    c_next[j] = c;
    hidden[j] = o * tanh_(c);
  }
}

// Hidden units [j0, j1) of one row of the backward update. dL/d(o*tanh c) is grad_hidden, plus
// grad_hidden_extra when kTwoGradients; writes the pre-activation gate gradients [4H],
// dL/dc_{t-1} and, when kWriteHidden, o * tanh(c). The choices are template arguments so that the
// loop has no branches.
template <typename T, bool kTwoGradients, bool kWriteHidden>
LSTM_FUSED_INLINE void backward_row_impl(int64_t H, int64_t j0, int64_t j1,
                                         const T* __restrict gates, const T* __restrict cell,
                                         const T* __restrict c_prev,
                                         const T* __restrict grad_hidden,
                                         const T* __restrict grad_hidden_extra,
                                         const T* __restrict grad_c_next,
                                         T* __restrict grad_gates, T* __restrict grad_c_prev,
                                         T* __restrict hidden) {
  for (int64_t j = j0; j < j1; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const T tc = tanh_(cell[j]);
    const T dh = kTwoGradients ? grad_hidden[j] + grad_hidden_extra[j] : grad_hidden[j];
    const T dc = grad_c_next[j] + dh * o * (T(1) - tc * tc);
    grad_gates[j] = dc * g * i * (T(1) - i);
    grad_gates[H + j] = dc * c_prev[j] * f * (T(1) - f);
    grad_gates[2 * H + j] = dc * i * (T(1) - g * g);
    grad_gates[3 * H + j] = dh * tc * o * (T(1) - o);
    grad_c_prev[j] = dc * f;
    if (kWriteHidden) hidden[j] = o * tc;
  }
}

template <typename T>
LSTM_FUSED_INLINE void backward_row_dispatch(int64_t H, int64_t j0, int64_t j1, const T* gates,
                                             const T* cell, const T* c_prev,
                                             const T* grad_hidden, const T* grad_hidden_extra,
                                             const T* grad_c_next, T* grad_gates,
                                             T* grad_c_prev, T* hidden) {
  if (grad_hidden_extra && hidden) {
    backward_row_impl<T, true, true>(H, j0, j1, gates, cell, c_prev, grad_hidden,
                                     grad_hidden_extra, grad_c_next, grad_gates, grad_c_prev,
                                     hidden);
  } else if (grad_hidden_extra) {
    backward_row_impl<T, true, false>(H, j0, j1, gates, cell, c_prev, grad_hidden,
                                      grad_hidden_extra, grad_c_next, grad_gates, grad_c_prev,
                                      hidden);
  } else if (hidden) {
    backward_row_impl<T, false, true>(H, j0, j1, gates, cell, c_prev, grad_hidden,
                                      grad_hidden_extra, grad_c_next, grad_gates, grad_c_prev,
                                      hidden);
  } else {
    backward_row_impl<T, false, false>(H, j0, j1, gates, cell, c_prev, grad_hidden,
                                       grad_hidden_extra, grad_c_next, grad_gates, grad_c_prev,
                                       hidden);
  }
}

// 32-byte vectors (GCC/Clang vector extensions): one AVX2 register in the x86-64-v3 clone, two
// SSE registers in the baseline. Only pointers cross function boundaries, never vectors.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 8;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 4;
};

template <typename V, typename T>
LSTM_FUSED_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
LSTM_FUSED_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Adds the first `count` lanes of v to p[0..count).
template <typename V, typename T>
LSTM_FUSED_INLINE void add_lanes(T* p, const V& v, int64_t count) {
  T lanes[sizeof(V) / sizeof(T)];
  std::memcpy(lanes, &v, sizeof(V));
  for (int64_t l = 0; l < count; ++l) p[l] += lanes[l];
}

// acc[r][v] = sum_k a[r * a_stride + k] * block[k, v, :] for k < K: R rows of a times a packed
// block [K, 4, L], in registers (12 accumulators for R = 3). Both recurrent products use it.
template <typename T, int R>
LSTM_FUSED_INLINE void multiply_block(int64_t K, const T* __restrict a, int64_t a_stride,
                                      const T* __restrict block,
                                      typename Simd<T>::V (&acc)[R][4]) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* w = block + k * 4 * L;
    const V w0 = load<V>(w), w1 = load<V>(w + L), w2 = load<V>(w + 2 * L), w3 = load<V>(w + 3 * L);
    for (int r = 0; r < R; ++r) {
      const T a_rk = a[r * a_stride + k];
      acc[r][0] += a_rk * w0;
      acc[r][1] += a_rk * w1;
      acc[r][2] += a_rk * w2;
      acc[r][3] += a_rk * w3;
    }
  }
}

// The recurrent part of the four gates of one block of L units for R rows:
//   gates[r, q*H + unit0 + l] += sum_k h[r, k] * block[k, q, l]
// h: R rows of stride P; block: [P, 4, L], one block of W_hh packed by pack_for_gates; gates: R
// rows of stride 4H; `units` (<= L) of the block's lanes are real units.
template <typename T, int R>
LSTM_FUSED_INLINE void recurrent_block(int64_t H, int64_t P, int64_t unit0, int64_t units,
                                       const T* __restrict h, const T* __restrict block,
                                       T* __restrict gates) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  V acc[R][4];
  multiply_block<T, R>(P, h, P, block, acc);
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      T* g = gates + r * 4 * H + q * H + unit0;
      if (units == L) {
        store(g, load<V>(g) + acc[r][q]);
      } else {
        add_lanes(g, acc[r][q], units);
      }
    }
  }
}

// Unit blocks [u0, u1) (L units each) of every row b < B: gates[b] += h[b] W_hh^T, four gates.
// h: [B, P]; packed: [ceil(H/L), P, 4, L] from pack_for_gates; gates: [B, 4H].
template <typename T>
LSTM_FUSED_INLINE void recurrent_gates_impl(int64_t B, int64_t H, int64_t P, int64_t u0,
                                            int64_t u1, const T* h, const T* packed, T* gates) {
  constexpr int64_t L = Simd<T>::kLanes;
  constexpr int kRows = 3;  // 12 accumulators: as many rows as the 16 vector registers allow
  for (int64_t u = u0; u < u1; ++u) {
    const T* block = packed + u * P * 4 * L;
    const int64_t unit0 = u * L, units = std::min(L, H - unit0);
    int64_t b = 0;
    for (; b + kRows <= B; b += kRows) {
      recurrent_block<T, kRows>(H, P, unit0, units, h + b * P, block, gates + b * 4 * H);
    }
    if (B - b == 2) recurrent_block<T, 2>(H, P, unit0, units, h + b * P, block, gates + b * 4 * H);
    if (B - b == 1) recurrent_block<T, 1>(H, P, unit0, units, h + b * P, block, gates + b * 4 * H);
  }
}

// One block of 4L columns of dL/dh_{t-1} for R rows:
//   grad_h[r, col0 + l] = sum_n grad_gates[r, n] * block[n, l]
// grad_gates: R rows of stride G = 4H; block: [G, 4L] from pack_for_hidden_grad; grad_h: R rows of
// stride P; `cols` (<= 4L) of the block's lanes are real columns.
template <typename T, int R>
LSTM_FUSED_INLINE void hidden_grad_block(int64_t G, int64_t P, int64_t col0, int64_t cols,
                                         const T* __restrict grad_gates,
                                         const T* __restrict block, T* __restrict grad_h) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  V acc[R][4];
  multiply_block<T, R>(G, grad_gates, G, block, acc);
  for (int r = 0; r < R; ++r) {
    T* out = grad_h + r * P + col0;
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = std::min(L, cols - v * L);
      if (lanes == L) {
        store(out + v * L, acc[r][v]);
      } else if (lanes > 0) {
        std::fill(out + v * L, out + v * L + lanes, T(0));
        add_lanes(out + v * L, acc[r][v], lanes);
      }
    }
  }
}

// Column blocks [c0, c1) (4L columns each) of dL/dh_{t-1} for every row b < B.
template <typename T>
LSTM_FUSED_INLINE void hidden_grad_impl(int64_t B, int64_t G, int64_t P, int64_t c0, int64_t c1,
                                        const T* grad_gates, const T* packed, T* grad_h) {
  constexpr int64_t L4 = 4 * Simd<T>::kLanes;
  constexpr int kRows = 3;  // 12 accumulators
  for (int64_t c = c0; c < c1; ++c) {
    const T* block = packed + c * G * L4;
    const int64_t col0 = c * L4, cols = std::min(L4, P - col0);
    int64_t b = 0;
    for (; b + kRows <= B; b += kRows) {
      hidden_grad_block<T, kRows>(G, P, col0, cols, grad_gates + b * G, block, grad_h + b * P);
    }
    const T* dg = grad_gates + b * G;
    T* out = grad_h + b * P;
    if (B - b == 2) hidden_grad_block<T, 2>(G, P, col0, cols, dg, block, out);
    if (B - b == 1) hidden_grad_block<T, 1>(G, P, col0, cols, dg, block, out);
  }
}

// float: compiled for AVX2 and for the baseline; double: the baseline only.
LSTM_FUSED_SIMD_CLONES
void forward_row(int64_t H, int64_t j0, int64_t j1, float* gates, const float* bias,
                 const float* c_prev, float* c_next, float* hidden) {
  forward_row_impl<float>(H, j0, j1, gates, bias, c_prev, c_next, hidden);
}
void forward_row(int64_t H, int64_t j0, int64_t j1, double* gates, const double* bias,
                 const double* c_prev, double* c_next, double* hidden) {
  forward_row_impl<double>(H, j0, j1, gates, bias, c_prev, c_next, hidden);
}
LSTM_FUSED_SIMD_CLONES
void backward_row(int64_t H, int64_t j0, int64_t j1, const float* gates, const float* cell,
                  const float* c_prev, const float* grad_hidden, const float* grad_hidden_extra,
                  const float* grad_c_next, float* grad_gates, float* grad_c_prev, float* hidden) {
  backward_row_dispatch<float>(H, j0, j1, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                               grad_c_next, grad_gates, grad_c_prev, hidden);
}
void backward_row(int64_t H, int64_t j0, int64_t j1, const double* gates, const double* cell,
                  const double* c_prev, const double* grad_hidden,
                  const double* grad_hidden_extra, const double* grad_c_next, double* grad_gates,
                  double* grad_c_prev, double* hidden) {
  backward_row_dispatch<double>(H, j0, j1, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                grad_c_next, grad_gates, grad_c_prev, hidden);
}
LSTM_FUSED_SIMD_CLONES
void recurrent_gates(int64_t B, int64_t H, int64_t P, int64_t u0, int64_t u1, const float* h,
                     const float* packed, float* gates) {
  recurrent_gates_impl<float>(B, H, P, u0, u1, h, packed, gates);
}
void recurrent_gates(int64_t B, int64_t H, int64_t P, int64_t u0, int64_t u1, const double* h,
                     const double* packed, double* gates) {
  recurrent_gates_impl<double>(B, H, P, u0, u1, h, packed, gates);
}
LSTM_FUSED_SIMD_CLONES
void hidden_grad(int64_t B, int64_t G, int64_t P, int64_t c0, int64_t c1, const float* grad_gates,
                 const float* packed, float* grad_h) {
  hidden_grad_impl<float>(B, G, P, c0, c1, grad_gates, packed, grad_h);
}
void hidden_grad(int64_t B, int64_t G, int64_t P, int64_t c0, int64_t c1,
                 const double* grad_gates, const double* packed, double* grad_h) {
  hidden_grad_impl<double>(B, G, P, c0, c1, grad_gates, packed, grad_h);
}

// W_hh [4H, P] -> [ceil(H/L), P, 4, L]: block u, row k holds the four gates' weights from input
// k to units u*L .. u*L+L-1 (zeros past H), in the order recurrent_block reads them.
at::Tensor pack_for_gates(const at::Tensor& w_hh, int64_t H, int64_t P, int64_t L) {
  const int64_t blocks = (H + L - 1) / L;
  at::Tensor w = w_hh.reshape({4, H, P});
  if (blocks * L != H) w = at::constant_pad_nd(w, {0, 0, 0, blocks * L - H});
  return w.reshape({4, blocks, L, P}).permute({1, 3, 0, 2}).contiguous();
}

// W_hh [4H, P] -> [ceil(P/width), 4H, width]: block c holds columns c*width .. (zeros past P).
at::Tensor pack_for_hidden_grad(const at::Tensor& w_hh, int64_t P, int64_t width) {
  const int64_t blocks = (P + width - 1) / width;
  at::Tensor w = blocks * width != P ? at::constant_pad_nd(w_hh, {0, blocks * width - P}) : w_hh;
  return w.reshape({w.size(0), blocks, width}).permute({1, 0, 2}).contiguous();
}

// The one place that picks the CPU path for each step's recurrent product:
//   "fused": our kernels above, split by hidden unit across threads (the default up to batch 128);
//   "gemm":  one GEMM per step (MKL/OpenBLAS through ATen), then the fused elementwise pass.
// The environment variable LSTM_FUSED_PATH forces one (lstm_fused.force_path sets it).
// Measured on a 2-core AVX2 machine: the fused step is ahead of the GEMM up to batch 64 and ties
// with it at 128-256.
constexpr int64_t kFusedRecurrenceMaxBatch = 128;

bool use_fused_recurrence(int64_t batch) {
  const char* forced = std::getenv("LSTM_FUSED_PATH");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    return batch <= kFusedRecurrenceMaxBatch;
  }
  if (std::strcmp(forced, "fused") == 0) return true;
  if (std::strcmp(forced, "gemm") == 0) return false;
  TORCH_CHECK(false, "lstm_fused: LSTM_FUSED_PATH must be auto, fused or gemm on the CPU, got '",
              forced, "'");
}

// Items per task so that one task has about `work` multiply-adds or elementwise updates.
int64_t grain(int64_t work_per_item, int64_t work = 32768) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, work_per_item));
}

// Runs body(step, phase, begin, end) for every step and each of its phases, phase p covering
// items [0, phase_items[p]). With enough work per step, all steps run in one parallel region:
// each thread takes the same slice of each phase at every step (so its blocks of W_hh stay in its
// cache), with a barrier after each phase instead of a fork and join. Otherwise it runs serially.
template <typename F>
void run_steps(int64_t steps, const std::vector<int64_t>& phase_items, int64_t work_per_step,
               const F& body) {
#ifdef _OPENMP
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), work_per_step / 32768);
  if (tasks > 1 && !at::in_parallel_region()) {
#pragma omp parallel
    {
      const int64_t threads = std::min<int64_t>(omp_get_num_threads(), tasks);
      const int64_t thread = omp_get_thread_num();
      for (int64_t step = 0; step < steps; ++step) {
        for (size_t phase = 0; phase < phase_items.size(); ++phase) {
          const int64_t items = phase_items[phase];
          const int64_t chunk = (items + threads - 1) / threads;
          const int64_t begin = std::min(items, thread * chunk);
          const int64_t end = std::min(items, begin + chunk);
          if (thread < threads && begin < end) body(step, phase, begin, end);
#pragma omp barrier
        }
      }
    }
    return;
  }
#endif
  for (int64_t step = 0; step < steps; ++step) {
    for (size_t phase = 0; phase < phase_items.size(); ++phase) {
      body(step, phase, 0, phase_items[phase]);
    }
  }
}

template <typename T>
void copy_row(T* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, sizeof(T) * n);
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstm_fused: the CPU kernels support float32, float64, float16 and bfloat16, got ",
              x.scalar_type());
}

bool is_reduced_precision(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

at::Tensor to_float(const at::Tensor& t) { return t.to(at::kFloat); }

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

template <typename scalar_t>
void forward_steps(const LstmSizes& s, at::Tensor& gates, const at::Tensor& bias, at::Tensor& y,
                   at::Tensor& cells, bool training, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                   const int64_t* lengths, bool reverse) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr.has_value();
  const bool fused_recurrence = use_fused_recurrence(B);
  const at::Tensor w_hh_t = w_hh.t();
  constexpr int64_t L = Simd<scalar_t>::kLanes;
  const at::Tensor w_packed = fused_recurrence ? pack_for_gates(w_hh, H, P, L) : at::Tensor();
  const at::Tensor w_hr_t = has_proj ? w_hr->t() : at::Tensor();
  // With a projection the fused pass writes o * tanh(c) here and a GEMM maps it to y[t].
  at::Tensor hidden = has_proj ? at::empty({B, H}, y.options()) : at::Tensor();
  const int64_t out_stride = has_proj ? H : P;
  // Raw pointers per step, derived from the step's index alone; tensor views only where a GEMM
  // needs one (making views costs a large share of a small step).
  const scalar_t* const h0_data = h0.data_ptr<scalar_t>();
  const scalar_t* const c0_data = c0.data_ptr<scalar_t>();
  const scalar_t* const bias_data = bias.data_ptr<scalar_t>();
  scalar_t* const gates_data = gates.data_ptr<scalar_t>();
  scalar_t* const y_data = y.data_ptr<scalar_t>();
  scalar_t* const cells_data = cells.data_ptr<scalar_t>();
  scalar_t* const hidden_data = has_proj ? hidden.data_ptr<scalar_t>() : nullptr;
  struct Step {
    int64_t t;
    scalar_t* g;             // gates[t]
    scalar_t* y;             // y[t]
    scalar_t* c_next;        // the cell state written
    const scalar_t* h_prev;  // h_{t-1}
    const scalar_t* c_prev;  // c_{t-1}
  };
  auto step_at = [&](int64_t step) {
    const int64_t t = reverse ? T - 1 - step : step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;
    const int64_t slot = training ? t : step % 2, slot_prev = training ? t_prev : (step - 1) % 2;
    return Step{t, gates_data + t * B * 4 * H, y_data + t * B * P, cells_data + slot * B * H,
                step == 0 ? h0_data : y_data + t_prev * B * P,
                step == 0 ? c0_data : cells_data + slot_prev * B * H};
  };
  // Units [j0, j1) of row b: the cell update, or past the end of sequence b, the carried state.
  auto update = [&](const Step& st, int64_t b, int64_t j0, int64_t j1) {
    scalar_t* out = has_proj ? hidden_data : st.y;
    if (lengths && st.t >= lengths[b]) {
      copy_row(st.c_next + b * H + j0, st.c_prev + b * H + j0, j1 - j0);
      if (!has_proj) copy_row(out + b * P + j0, st.h_prev + b * P + j0, j1 - j0);
      return;
    }
    forward_row(H, j0, j1, st.g + b * 4 * H, bias_data, st.c_prev + b * H, st.c_next + b * H,
                out + b * out_stride);
  };
  const int64_t blocks = (H + L - 1) / L;
  // Each task owns blocks of L hidden units: all four gates of them, then their cell update.
  auto fused_step = [&](const Step& st, int64_t u0, int64_t u1) {
    recurrent_gates(B, H, P, u0, u1, st.h_prev, w_packed.data_ptr<scalar_t>(), st.g);
    for (int64_t b = 0; b < B; ++b) update(st, b, u0 * L, std::min(H, u1 * L));
  };
  if (fused_recurrence && !has_proj) {  // the whole sequence in one parallel region
    run_steps(T, {blocks}, 4 * H * P * B, [&](int64_t step, size_t, int64_t u0, int64_t u1) {
      fused_step(step_at(step), u0, u1);
    });
    return;
  }
  for (int64_t step = 0; step < T; ++step) {
    const Step st = step_at(step);
    if (fused_recurrence) {
      at::parallel_for(0, blocks, grain(4 * L * P * B), [&](int64_t u0, int64_t u1) {
        fused_step(st, u0, u1);
      });
    } else {
      const at::Tensor h_prev = step == 0 ? h0 : y.select(0, reverse ? st.t + 1 : st.t - 1);
      gates.select(0, st.t).addmm_(h_prev, w_hh_t);
      at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) update(st, b, 0, H);
      });
    }
    if (has_proj) {
      at::Tensor y_view = y.select(0, st.t);
      at::mm_out(y_view, hidden, w_hr_t);
      for (int64_t b = 0; lengths && b < B; ++b) {
        if (st.t >= lengths[b]) copy_row(st.y + b * P, st.h_prev + b * P, P);
      }
    }
  }
}

ForwardResult forward_cpu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh,
                          const std::optional<at::Tensor>& w_hr,
                          const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LstmSizes s = check_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  if (is_reduced_precision(x)) {  // computed in float32; gates and cells are saved in float32
    auto [y, h_n, c_n, gates, cells] =
        forward_cpu(to_float(x), to_float(h0), to_float(c0), to_float(w_ih), to_float(w_hh),
                    to_float(b_ih), to_float(b_hh), to_float(w_hr), lengths, reverse, training);
    const auto dtype = x.scalar_type();
    // Saved activations stay float32; the empty placeholders of inference take x's dtype.
    if (!training) {
      gates = at::empty({0}, x.options());
      cells = at::empty({0}, x.options());
    }
    return {y.to(dtype), h_n.to(dtype), c_n.to(dtype), gates, cells};
  }
  check_cpu_dtype(x);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto options = x.options();

  // The input projection of all steps at once; gates[t] then receives the recurrent part, and
  // the biases are added in the elementwise pass.
  at::Tensor gates = at::empty({T, B, 4 * H}, options);
  at::Tensor gates_2d = gates.view({T * B, 4 * H});
  at::mm_out(gates_2d, x.reshape({T * B, s.input_size}), w_ih.t());
  at::Tensor bias = at::zeros({4 * H}, options);
  if (b_ih.has_value()) bias.add_(*b_ih);
  if (b_hh.has_value()) bias.add_(*b_hh);

  at::Tensor y = at::empty({T, B, P}, options);
  // Training keeps every cell state for backward; inference alternates between two buffers.
  at::Tensor cells = at::empty({training ? T : 2, B, H}, options);
  const at::Tensor h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* lengths_data = lengths.has_value() ? lengths_c.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fused_forward_cpu", [&] {
    forward_steps<scalar_t>(s, gates, bias, y, cells, training, h0_c, c0_c, w_hh, w_hr,
                            lengths_data, reverse);
  });

  return forward_result(s, y, cells, gates, x, h0, c0, reverse, training);
}

template <typename scalar_t>
void backward_steps(const LstmSizes& s, const at::Tensor& grad_y, at::Tensor& grad_h,
                    at::Tensor& grad_c, const at::Tensor& c0, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                    const at::Tensor& cells, const int64_t* lengths, bool reverse,
                    at::Tensor& grad_gates, at::Tensor& grad_proj_out, at::Tensor& hidden_all) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr.has_value();
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, grad_h.options()) : at::Tensor();
  const bool fused_recurrence = use_fused_recurrence(B);
  constexpr int64_t L4 = 4 * Simd<scalar_t>::kLanes;
  const at::Tensor w_packed = fused_recurrence ? pack_for_hidden_grad(w_hh, P, L4) : at::Tensor();
  // dL/dh and dL/dc alternate between two buffers, step by step; grad_h and grad_c hold the
  // incoming gradients now and the outgoing ones at the end.
  at::Tensor grad_h_other = at::empty_like(grad_h), grad_c_other = at::empty_like(grad_c);
  scalar_t* const grad_h_buffers[2] = {grad_h.data_ptr<scalar_t>(),
                                       grad_h_other.data_ptr<scalar_t>()};
  scalar_t* const grad_c_buffers[2] = {grad_c.data_ptr<scalar_t>(),
                                       grad_c_other.data_ptr<scalar_t>()};
  // Raw pointers per step, derived from the step's index alone; tensor views only where a GEMM
  // needs one.
  const scalar_t* const grad_y_data = grad_y.data_ptr<scalar_t>();
  const scalar_t* const gates_data = gates.data_ptr<scalar_t>();
  const scalar_t* const cells_data = cells.data_ptr<scalar_t>();
  const scalar_t* const c0_data = c0.data_ptr<scalar_t>();
  scalar_t* const grad_gates_data = grad_gates.data_ptr<scalar_t>();
  scalar_t* const hidden_data = has_proj ? hidden_all.data_ptr<scalar_t>() : nullptr;
  scalar_t* const grad_hidden_data = has_proj ? grad_hidden.data_ptr<scalar_t>() : nullptr;
  struct Step {
    int64_t t;
    const scalar_t* c_prev;   // c_{t-1}
    const scalar_t* grad_y;   // grad_y[t]
    const scalar_t* g;        // gates[t]
    const scalar_t* cell;     // cells[t]
    scalar_t* grad_gates;     // grad_gates[t]
    scalar_t* hidden;         // o * tanh(c_t), kept for dW_hr (projection only)
    const scalar_t* grad_h;   // dL/dh_t from step t+1
    scalar_t* grad_h_prev;    // dL/dh_{t-1}, written
    const scalar_t* grad_c;   // dL/dc_t from step t+1
    scalar_t* grad_c_prev;    // dL/dc_{t-1}, written
  };
  auto step_at = [&](int64_t step) {
    const int64_t t = reverse ? step : T - 1 - step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step whose state t started from
    const bool from_initial = reverse ? t_prev >= T : t_prev < 0;
    const int64_t in = step % 2, out = 1 - in;
    return Step{t, from_initial ? c0_data : cells_data + t_prev * B * H,
                grad_y_data + t * B * P, gates_data + t * B * 4 * H, cells_data + t * B * H,
                grad_gates_data + t * B * 4 * H, has_proj ? hidden_data + t * B * H : nullptr,
                grad_h_buffers[in], grad_h_buffers[out], grad_c_buffers[in], grad_c_buffers[out]};
  };
  // Units [j0, j1) of row b: gate gradients, or for a carried step, gradients passed through.
  // dL/d(o tanh c_t) is grad_y[t] + dL/dh_t from step t+1, added in the pass; with a projection
  // it is grad_hidden, computed by a GEMM before.
  auto update = [&](const Step& st, int64_t b, int64_t j0, int64_t j1) {
    if (lengths && st.t >= lengths[b]) {
      for (int64_t q = 0; q < 4; ++q) {
        scalar_t* gate = st.grad_gates + b * 4 * H + q * H;
        std::fill(gate + j0, gate + j1, scalar_t(0));
      }
      copy_row(st.grad_c_prev + b * H + j0, st.grad_c + b * H + j0, j1 - j0);
      if (st.hidden) std::fill(st.hidden + b * H + j0, st.hidden + b * H + j1, scalar_t(0));
      return;
    }
    backward_row(H, j0, j1, st.g + b * 4 * H, st.cell + b * H, st.c_prev + b * H,
                 has_proj ? grad_hidden_data + b * H : st.grad_y + b * P,
                 has_proj ? nullptr : st.grad_h + b * P, st.grad_c + b * H,
                 st.grad_gates + b * 4 * H, st.grad_c_prev + b * H,
                 st.hidden ? st.hidden + b * H : nullptr);
  };
  // Past the end of sequence b the state was carried: so is its gradient.
  auto carry = [&](const Step& st, int64_t b) {
    if (!lengths || st.t < lengths[b]) return;
    for (int64_t j = 0; j < P; ++j) {
      st.grad_h_prev[b * P + j] = st.grad_y[b * P + j] + st.grad_h[b * P + j];
    }
  };
  const int64_t blocks = (P + L4 - 1) / L4;
  const scalar_t* w = fused_recurrence ? w_packed.data_ptr<scalar_t>() : nullptr;
  if (fused_recurrence && !has_proj) {  // the whole sequence in one parallel region
    std::vector<int64_t> phases = {H, blocks};  // gate gradients by unit, dh_{t-1} by column
    if (lengths) phases.push_back(B);           // carried rows
    run_steps(T, phases, 4 * H * P * B, [&](int64_t step, size_t phase, int64_t lo, int64_t hi) {
      const Step st = step_at(step);
      if (phase == 0) {
        for (int64_t b = 0; b < B; ++b) update(st, b, lo, hi);
      } else if (phase == 1) {
        hidden_grad(B, 4 * H, P, lo, hi, st.grad_gates, w, st.grad_h_prev);
      } else {
        for (int64_t b = lo; b < hi; ++b) carry(st, b);
      }
    });
  } else {
    for (int64_t step = 0; step < T; ++step) {
      const Step st = step_at(step);
      if (has_proj) {
        at::Tensor grad_h_total = grad_proj_out.select(0, st.t);
        at::add_out(grad_h_total, grad_y.select(0, st.t), step % 2 ? grad_h_other : grad_h);
        at::mm_out(grad_hidden, grad_h_total, *w_hr);
      }
      if (fused_recurrence) {
        at::parallel_for(0, H, grain(4 * B), [&](int64_t j0, int64_t j1) {
          for (int64_t b = 0; b < B; ++b) update(st, b, j0, j1);
        });
        at::parallel_for(0, blocks, grain(4 * H * L4 * B), [&](int64_t first, int64_t last) {
          hidden_grad(B, 4 * H, P, first, last, st.grad_gates, w, st.grad_h_prev);
        });
      } else {
        at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) update(st, b, 0, H);
        });
        at::Tensor grad_h_prev = step % 2 ? grad_h : grad_h_other;
        at::mm_out(grad_h_prev, grad_gates.select(0, st.t), w_hh);
      }
      for (int64_t b = 0; b < B; ++b) carry(st, b);
    }
  }
  if (T % 2 == 1) {
    std::swap(grad_h, grad_h_other);
    std::swap(grad_c, grad_c_other);
  }
}

BackwardResult backward_cpu(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                            const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                            const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                            bool has_bias) {
  const LstmSizes s = check_backward_args(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                                          lengths, y, gates, cells);
  if (is_reduced_precision(x)) {
    auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = backward_cpu(
        to_float(grad_y), to_float(grad_h_n), to_float(grad_c_n), to_float(x), to_float(h0),
        to_float(c0), to_float(w_ih), to_float(w_hh), to_float(w_hr), lengths, to_float(y), gates,
        cells, reverse, has_bias);
    const auto dtype = x.scalar_type();
    return {grad_x.to(dtype), grad_h0.to(dtype), grad_c0.to(dtype), grad_w_ih.to(dtype),
            grad_w_hh.to(dtype), grad_bias.to(dtype), grad_w_hr.to(dtype)};
  }
  check_cpu_dtype(x);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto options = x.options();
  const bool has_proj = w_hr.has_value();

  at::Tensor grad_gates = at::empty({T, B, 4 * H}, options);
  at::Tensor grad_proj_out = has_proj ? at::empty({T, B, P}, options) : at::Tensor();
  at::Tensor hidden_all = has_proj ? at::empty({T, B, H}, options) : at::Tensor();
  at::Tensor grad_h = grad_h_n.clone(at::MemoryFormat::Contiguous);
  at::Tensor grad_c = grad_c_n.clone(at::MemoryFormat::Contiguous);
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* lengths_data = lengths.has_value() ? lengths_c.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fused_backward_cpu", [&] {
    backward_steps<scalar_t>(s, grad_y.contiguous(), grad_h, grad_c, c0.contiguous(),
                             w_hh.contiguous(), w_hr,
                             gates.contiguous(), cells.contiguous(), lengths_data, reverse,
                             grad_gates, grad_proj_out, hidden_all);
  });

  return gradients_over_steps(s, grad_gates, x, h0, w_ih, y, grad_proj_out, hidden_all, grad_h,
                              grad_c, reverse, has_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace lstm_fused
