// CPU implementation of the lstm_fused ops.
//
// Forward: one GEMM for the input projection of every step (biases folded in), then per step one
// GEMM for the recurrent part of all four gates and one fused, multithreaded pass for the
// nonlinearities and the cell update. Backward: one pass back in time (fused gate gradients, one
// GEMM for dh_{t-1}), then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs over all steps.
// No atomics and a fixed reduction order: identical inputs give identical results.
#include "../lstm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace lstm_fused {
namespace {

// The row loops are compiled twice on x86-64 Linux, for AVX2 and for the baseline, and the loader
// picks one. FMA stays off in both, so both give bitwise the same results.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LSTM_FUSED_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
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

// Hidden units [j0, j1) of one row of the forward update. gates: [4H] pre-activations in,
// activations out; c_prev, c_next, hidden: [H].
template <typename T>
LSTM_FUSED_INLINE void forward_row_impl(int64_t H, int64_t j0, int64_t j1, T* __restrict gates,
                                        const T* __restrict c_prev, T* __restrict c_next,
                                        T* __restrict hidden) {
  for (int64_t j = j0; j < j1; ++j) {
    const T i = sigmoid(gates[j]);
    const T f = sigmoid(gates[H + j]);
    const T g = tanh_(gates[2 * H + j]);
    const T o = sigmoid(gates[3 * H + j]);
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

// The recurrent part of the four gates of hidden units [j0, j1), for rows b < B:
//   gates[b, q*H + j] += sum_k h[b, k] * w_cols[k, q*H + j]
// h: [B, P]; w_cols: [P, 4H] (W_hh transposed); gates: [B, 4H]. A thread that owns a range of
// units reads only its columns of W_hh, which stay in its core's cache from step to step.
template <typename T>
LSTM_FUSED_INLINE void recurrent_gates_impl(int64_t B, int64_t H, int64_t P, int64_t j0,
                                            int64_t j1, const T* __restrict h,
                                            const T* __restrict w_cols, T* __restrict gates) {
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    const T* h_b = h + b * P;
    for (int64_t q = 0; q < 4; ++q) {
      T* out = gates + b * G + q * H;
      const T* w = w_cols + q * H;
      int64_t k = 0;
      for (; k + 4 <= P; k += 4) {
        const T h0 = h_b[k], h1 = h_b[k + 1], h2 = h_b[k + 2], h3 = h_b[k + 3];
        const T* w0 = w + k * G;
        const T* w1 = w0 + G;
        const T* w2 = w1 + G;
        const T* w3 = w2 + G;
        for (int64_t j = j0; j < j1; ++j) {
          out[j] += (h0 * w0[j] + h1 * w1[j]) + (h2 * w2[j] + h3 * w3[j]);
        }
      }
      for (; k < P; ++k) {
        const T h_k = h_b[k];
        const T* w_k = w + k * G;
        for (int64_t j = j0; j < j1; ++j) out[j] += h_k * w_k[j];
      }
    }
  }
}

// Columns [k0, k1) of dL/dh_{t-1} for rows b < B:  grad_h[b, k] = sum_n grad_gates[b, n] * w[n, k]
// grad_gates: [B, G = 4H]; w: [G, P] (W_hh); grad_h: [B, P].
template <typename T>
LSTM_FUSED_INLINE void hidden_grad_impl(int64_t B, int64_t G, int64_t P, int64_t k0, int64_t k1,
                                        const T* __restrict grad_gates, const T* __restrict w,
                                        T* __restrict grad_h) {
  for (int64_t b = 0; b < B; ++b) {
    const T* dg = grad_gates + b * G;
    T* out = grad_h + b * P;
    for (int64_t k = k0; k < k1; ++k) out[k] = T(0);
    int64_t n = 0;
    for (; n + 4 <= G; n += 4) {
      const T d0 = dg[n], d1 = dg[n + 1], d2 = dg[n + 2], d3 = dg[n + 3];
      const T* w0 = w + n * P;
      const T* w1 = w0 + P;
      const T* w2 = w1 + P;
      const T* w3 = w2 + P;
      for (int64_t k = k0; k < k1; ++k) {
        out[k] += (d0 * w0[k] + d1 * w1[k]) + (d2 * w2[k] + d3 * w3[k]);
      }
    }
    for (; n < G; ++n) {
      const T d = dg[n];
      const T* w_n = w + n * P;
      for (int64_t k = k0; k < k1; ++k) out[k] += d * w_n[k];
    }
  }
}

// float: compiled for AVX2 and for the baseline; double: the baseline only.
LSTM_FUSED_SIMD_CLONES
void forward_row(int64_t H, int64_t j0, int64_t j1, float* gates, const float* c_prev,
                 float* c_next, float* hidden) {
  forward_row_impl<float>(H, j0, j1, gates, c_prev, c_next, hidden);
}
void forward_row(int64_t H, int64_t j0, int64_t j1, double* gates, const double* c_prev,
                 double* c_next, double* hidden) {
  forward_row_impl<double>(H, j0, j1, gates, c_prev, c_next, hidden);
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
void recurrent_gates(int64_t B, int64_t H, int64_t P, int64_t j0, int64_t j1, const float* h,
                     const float* w_cols, float* gates) {
  recurrent_gates_impl<float>(B, H, P, j0, j1, h, w_cols, gates);
}
void recurrent_gates(int64_t B, int64_t H, int64_t P, int64_t j0, int64_t j1, const double* h,
                     const double* w_cols, double* gates) {
  recurrent_gates_impl<double>(B, H, P, j0, j1, h, w_cols, gates);
}
LSTM_FUSED_SIMD_CLONES
void hidden_grad(int64_t B, int64_t G, int64_t P, int64_t k0, int64_t k1, const float* grad_gates,
                 const float* w, float* grad_h) {
  hidden_grad_impl<float>(B, G, P, k0, k1, grad_gates, w, grad_h);
}
void hidden_grad(int64_t B, int64_t G, int64_t P, int64_t k0, int64_t k1,
                 const double* grad_gates, const double* w, double* grad_h) {
  hidden_grad_impl<double>(B, G, P, k0, k1, grad_gates, w, grad_h);
}

// The one place that picks the CPU path for each step's recurrent product:
//   "fused": our kernels above, split by hidden unit across threads (the default up to batch 4);
//   "gemm":  one GEMM per step (MKL/OpenBLAS through ATen), then the fused elementwise pass.
// The environment variable LSTM_FUSED_PATH forces one (lstm_fused.force_path sets it).
constexpr int64_t kFusedRecurrenceMaxBatch = 4;

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
void forward_steps(const LstmSizes& s, at::Tensor& gates, at::Tensor& y, at::Tensor& cells,
                   bool training, const at::Tensor& h0, const at::Tensor& c0,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                   const int64_t* lengths, bool reverse) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr.has_value();
  const bool fused_recurrence = use_fused_recurrence(B);
  const at::Tensor w_hh_t = w_hh.t();
  const at::Tensor w_hh_cols = fused_recurrence ? w_hh_t.contiguous() : at::Tensor();  // [P, 4H]
  const at::Tensor w_hr_t = has_proj ? w_hr->t() : at::Tensor();
  // With a projection the fused pass writes o * tanh(c) here and a GEMM maps it to y[t].
  at::Tensor hidden = has_proj ? at::empty({B, H}, y.options()) : at::Tensor();
  const int64_t out_stride = has_proj ? H : P;
  at::Tensor h_prev = h0;
  const scalar_t* c_prev = c0.data_ptr<scalar_t>();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    at::Tensor gates_t = gates.select(0, t);
    at::Tensor y_t = y.select(0, t);
    scalar_t* g = gates_t.data_ptr<scalar_t>();
    scalar_t* c_next = cells.select(0, training ? t : step % 2).data_ptr<scalar_t>();
    scalar_t* out = has_proj ? hidden.data_ptr<scalar_t>() : y_t.data_ptr<scalar_t>();
    const scalar_t* h_prev_data = h_prev.data_ptr<scalar_t>();
    // Units [j0, j1) of row b: the cell update, or past the end of sequence b, the carried state.
    auto update = [&](int64_t b, int64_t j0, int64_t j1) {
      if (lengths && t >= lengths[b]) {
        copy_row(c_next + b * H + j0, c_prev + b * H + j0, j1 - j0);
        if (!has_proj) copy_row(out + b * P + j0, h_prev_data + b * P + j0, j1 - j0);
        return;
      }
      forward_row(H, j0, j1, g + b * 4 * H, c_prev + b * H, c_next + b * H,
                  out + b * out_stride);
    };
    if (fused_recurrence) {
      const scalar_t* w = w_hh_cols.data_ptr<scalar_t>();
      at::parallel_for(0, H, grain(4 * P * B), [&](int64_t j0, int64_t j1) {
        recurrent_gates(B, H, P, j0, j1, h_prev_data, w, g);
        for (int64_t b = 0; b < B; ++b) update(b, j0, j1);
      });
    } else {
      gates_t.addmm_(h_prev, w_hh_t);
      at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) update(b, 0, H);
      });
    }
    if (has_proj) {
      at::mm_out(y_t, hidden, w_hr_t);
      scalar_t* y_data = y_t.data_ptr<scalar_t>();
      for (int64_t b = 0; lengths && b < B; ++b) {
        if (t >= lengths[b]) copy_row(y_data + b * P, h_prev_data + b * P, P);
      }
    }
    h_prev = y_t;
    c_prev = c_next;
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
    return {y.to(dtype), h_n.to(dtype), c_n.to(dtype), gates, cells};
  }
  check_cpu_dtype(x);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto options = x.options();

  // The input projection of all steps at once; gates[t] then receives the recurrent part.
  at::Tensor gates = at::empty({T, B, 4 * H}, options);
  at::Tensor gates_2d = gates.view({T * B, 4 * H});
  const at::Tensor x_2d = x.reshape({T * B, s.input_size});
  if (b_ih.has_value() || b_hh.has_value()) {
    const at::Tensor bias = b_ih.has_value() && b_hh.has_value() ? *b_ih + *b_hh
                            : b_ih.has_value()                  ? *b_ih
                                                                : *b_hh;
    at::addmm_out(gates_2d, bias, x_2d, w_ih.t());
  } else {
    at::mm_out(gates_2d, x_2d, w_ih.t());
  }

  at::Tensor y = at::empty({T, B, P}, options);
  // Training keeps every cell state for backward; inference alternates between two buffers.
  at::Tensor cells = at::empty({training ? T : 2, B, H}, options);
  const at::Tensor h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* lengths_data = lengths.has_value() ? lengths_c.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_fused_forward_cpu", [&] {
    forward_steps<scalar_t>(s, gates, y, cells, training, h0_c, c0_c, w_hh, w_hr, lengths_data,
                            reverse);
  });

  const int64_t last = reverse ? 0 : T - 1;
  at::Tensor h_n = T > 0 ? y.select(0, last).clone() : h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_n = T > 0 ? cells.select(0, training ? last : (T - 1) % 2).clone()
                         : c0.clone(at::MemoryFormat::Contiguous);
  if (!training) {
    gates = at::empty({0}, options);
    cells = at::empty({0}, options);
  }
  return {y, h_n, c_n, gates, cells};
}

template <typename scalar_t>
void backward_steps(const LstmSizes& s, const at::Tensor& grad_y, at::Tensor& grad_h,
                    at::Tensor& grad_c, const at::Tensor& c0, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                    const at::Tensor& cells, const int64_t* lengths, bool reverse,
                    at::Tensor& grad_gates, at::Tensor& grad_proj_out, at::Tensor& hidden_all) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const bool has_proj = w_hr.has_value();
  at::Tensor grad_h_next = at::empty_like(grad_h), grad_c_next = at::empty_like(grad_c);
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, grad_h.options()) : at::Tensor();
  const bool fused_recurrence = use_fused_recurrence(B);
  const scalar_t* w = w_hh.data_ptr<scalar_t>();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? step : T - 1 - step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step whose state t started from
    const bool from_initial = reverse ? t_prev >= T : t_prev < 0;
    const scalar_t* c_prev = from_initial ? c0.data_ptr<scalar_t>()
                                          : cells.select(0, t_prev).data_ptr<scalar_t>();
    const at::Tensor grad_y_t = grad_y.select(0, t);
    // grad_h_total: dL/dh_t from the output at t and from step t+1, as one buffer or two.
    const scalar_t* grad_main;
    const scalar_t* grad_extra;
    at::Tensor grad_h_total;
    if (has_proj) {
      grad_h_total = grad_proj_out.select(0, t);
      at::add_out(grad_h_total, grad_y_t, grad_h);
      at::mm_out(grad_hidden, grad_h_total, *w_hr);
      grad_main = grad_hidden.data_ptr<scalar_t>();
      grad_extra = nullptr;
    } else {
      grad_main = grad_y_t.data_ptr<scalar_t>();
      grad_extra = grad_h.data_ptr<scalar_t>();
    }
    const scalar_t* g = gates.select(0, t).data_ptr<scalar_t>();
    const scalar_t* cell = cells.select(0, t).data_ptr<scalar_t>();
    const scalar_t* dc_in = grad_c.data_ptr<scalar_t>();
    scalar_t* dc_out = grad_c_next.data_ptr<scalar_t>();
    at::Tensor grad_gates_t = grad_gates.select(0, t);
    scalar_t* dg = grad_gates_t.data_ptr<scalar_t>();
    scalar_t* hidden = has_proj ? hidden_all.select(0, t).data_ptr<scalar_t>() : nullptr;
    const int64_t main_stride = has_proj ? H : P;
    // Units [j0, j1) of row b: gate gradients, or for a carried step, gradients passed through.
    auto update = [&](int64_t b, int64_t j0, int64_t j1) {
      if (lengths && t >= lengths[b]) {
        for (int64_t q = 0; q < 4; ++q) {
          scalar_t* gate = dg + b * 4 * H + q * H;
          std::fill(gate + j0, gate + j1, scalar_t(0));
        }
        copy_row(dc_out + b * H + j0, dc_in + b * H + j0, j1 - j0);
        if (hidden) std::fill(hidden + b * H + j0, hidden + b * H + j1, scalar_t(0));
        return;
      }
      backward_row(H, j0, j1, g + b * 4 * H, cell + b * H, c_prev + b * H,
                   grad_main + b * main_stride, grad_extra ? grad_extra + b * P : nullptr,
                   dc_in + b * H, dg + b * 4 * H, dc_out + b * H,
                   hidden ? hidden + b * H : nullptr);
    };
    if (fused_recurrence) {
      at::parallel_for(0, H, grain(4 * B), [&](int64_t j0, int64_t j1) {
        for (int64_t b = 0; b < B; ++b) update(b, j0, j1);
      });
      scalar_t* dh_out = grad_h_next.data_ptr<scalar_t>();
      at::parallel_for(0, P, grain(4 * H * B), [&](int64_t k0, int64_t k1) {
        hidden_grad(B, 4 * H, P, k0, k1, dg, w, dh_out);
      });
    } else {
      at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) update(b, 0, H);
      });
      at::mm_out(grad_h_next, grad_gates_t, w_hh);
    }
    if (lengths) {
      scalar_t* dh_out = grad_h_next.data_ptr<scalar_t>();
      const scalar_t* dh_in = grad_h.data_ptr<scalar_t>();
      const scalar_t* dy = grad_y_t.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        if (t < lengths[b]) continue;
        for (int64_t j = 0; j < P; ++j) dh_out[b * P + j] = dy[b * P + j] + dh_in[b * P + j];
      }
    }
    std::swap(grad_h, grad_h_next);
    std::swap(grad_c, grad_c_next);
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

  // Everything that sums over steps, as large GEMMs over all T * B rows.
  const at::Tensor grad_gates_2d = grad_gates.view({T * B, 4 * H});
  at::Tensor grad_x = at::mm(grad_gates_2d, w_ih).view({T, B, s.input_size});
  at::Tensor grad_w_ih = at::mm(grad_gates_2d.t(), x.reshape({T * B, s.input_size}));
  // Step t started from y[t -/+ 1], or from h0 for the first step processed.
  at::Tensor grad_w_hh = at::zeros({4 * H, P}, options);
  if (T > 0) {
    const int64_t first = reverse ? T - 1 : 0;
    grad_w_hh.addmm_(grad_gates.select(0, first).t(), h0);
    if (T > 1) {
      const at::Tensor later_gates = reverse ? grad_gates.narrow(0, 0, T - 1)
                                             : grad_gates.narrow(0, 1, T - 1);
      const at::Tensor previous_y = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
      grad_w_hh.addmm_(later_gates.reshape({-1, 4 * H}).t(), previous_y.reshape({-1, P}));
    }
  }
  at::Tensor grad_bias = has_bias ? grad_gates_2d.sum(0) : at::empty({0}, options);
  at::Tensor grad_w_hr = has_proj ? at::mm(grad_proj_out.view({T * B, P}).t(),
                                           hidden_all.view({T * B, H}))
                                  : at::empty({0}, options);
  return {grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace lstm_fused
