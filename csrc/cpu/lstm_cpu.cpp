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

// One row of the forward update. gates: [4H] pre-activations in, activations out.
template <typename T>
LSTM_FUSED_INLINE void forward_row_impl(int64_t H, T* __restrict gates, const T* __restrict c_prev,
                             T* __restrict c_next, T* __restrict hidden) {
  for (int64_t j = 0; j < H; ++j) {
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

// One row of the backward update. dL/d(o*tanh c) is grad_hidden, plus grad_hidden_extra when
// kTwoGradients; writes the pre-activation gate gradients, dL/dc_{t-1} and, when kWriteHidden,
// o * tanh(c). The choices are template arguments so that the loop has no branches.
template <typename T, bool kTwoGradients, bool kWriteHidden>
LSTM_FUSED_INLINE void backward_row_impl(int64_t H, const T* __restrict gates,
                                         const T* __restrict cell, const T* __restrict c_prev,
                                         const T* __restrict grad_hidden,
                                         const T* __restrict grad_hidden_extra,
                                         const T* __restrict grad_c_next,
                                         T* __restrict grad_gates, T* __restrict grad_c_prev,
                                         T* __restrict hidden) {
  for (int64_t j = 0; j < H; ++j) {
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
LSTM_FUSED_INLINE void backward_row_dispatch(int64_t H, const T* gates, const T* cell,
                                             const T* c_prev, const T* grad_hidden,
                                             const T* grad_hidden_extra, const T* grad_c_next,
                                             T* grad_gates, T* grad_c_prev, T* hidden) {
  if (grad_hidden_extra && hidden) {
    backward_row_impl<T, true, true>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                     grad_c_next, grad_gates, grad_c_prev, hidden);
  } else if (grad_hidden_extra) {
    backward_row_impl<T, true, false>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                      grad_c_next, grad_gates, grad_c_prev, hidden);
  } else if (hidden) {
    backward_row_impl<T, false, true>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                      grad_c_next, grad_gates, grad_c_prev, hidden);
  } else {
    backward_row_impl<T, false, false>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                       grad_c_next, grad_gates, grad_c_prev, hidden);
  }
}

LSTM_FUSED_SIMD_CLONES
void forward_row(int64_t H, float* gates, const float* c_prev, float* c_next, float* hidden) {
  forward_row_impl<float>(H, gates, c_prev, c_next, hidden);
}
void forward_row(int64_t H, double* gates, const double* c_prev, double* c_next, double* hidden) {
  forward_row_impl<double>(H, gates, c_prev, c_next, hidden);
}
LSTM_FUSED_SIMD_CLONES
void backward_row(int64_t H, const float* gates, const float* cell, const float* c_prev,
                  const float* grad_hidden, const float* grad_hidden_extra,
                  const float* grad_c_next, float* grad_gates, float* grad_c_prev, float* hidden) {
  backward_row_dispatch<float>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                               grad_c_next, grad_gates, grad_c_prev, hidden);
}
void backward_row(int64_t H, const double* gates, const double* cell, const double* c_prev,
                  const double* grad_hidden, const double* grad_hidden_extra,
                  const double* grad_c_next, double* grad_gates, double* grad_c_prev,
                  double* hidden) {
  backward_row_dispatch<double>(H, gates, cell, c_prev, grad_hidden, grad_hidden_extra,
                                grad_c_next, grad_gates, grad_c_prev, hidden);
}

// Rows per task so that one task has enough elementwise work to be worth a thread.
int64_t row_grain(int64_t hidden_size) { return std::max<int64_t>(1, 16384 / (4 * hidden_size)); }

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
  const at::Tensor w_hh_t = w_hh.t();
  const at::Tensor w_hr_t = has_proj ? w_hr->t() : at::Tensor();
  // With a projection the fused pass writes o * tanh(c) here and a GEMM maps it to y[t].
  at::Tensor hidden = has_proj ? at::empty({B, H}, y.options()) : at::Tensor();
  at::Tensor h_prev = h0;
  const scalar_t* c_prev = c0.data_ptr<scalar_t>();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = reverse ? T - 1 - step : step;
    at::Tensor gates_t = gates.select(0, t);
    gates_t.addmm_(h_prev, w_hh_t);
    at::Tensor y_t = y.select(0, t);
    scalar_t* g = gates_t.data_ptr<scalar_t>();
    scalar_t* c_next = training ? cells.select(0, t).data_ptr<scalar_t>()
                                : cells.select(0, step % 2).data_ptr<scalar_t>();
    scalar_t* out = has_proj ? hidden.data_ptr<scalar_t>() : y_t.data_ptr<scalar_t>();
    const int64_t out_stride = has_proj ? H : P;
    const scalar_t* h_prev_data = h_prev.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (lengths && t >= lengths[b]) {  // past the end of sequence b: carry the state
          copy_row(c_next + b * H, c_prev + b * H, H);
          if (!has_proj) copy_row(out + b * P, h_prev_data + b * P, P);
          continue;
        }
        forward_row(H, g + b * 4 * H, c_prev + b * H, c_next + b * H, out + b * out_stride);
      }
    });
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
    at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (lengths && t >= lengths[b]) {  // a carried step: gradients pass through unchanged
          std::fill_n(dg + b * 4 * H, 4 * H, scalar_t(0));
          copy_row(dc_out + b * H, dc_in + b * H, H);
          if (hidden) std::fill_n(hidden + b * H, H, scalar_t(0));
          continue;
        }
        backward_row(H, g + b * 4 * H, cell + b * H, c_prev + b * H, grad_main + b * main_stride,
                     grad_extra ? grad_extra + b * P : nullptr, dc_in + b * H, dg + b * 4 * H,
                     dc_out + b * H, hidden ? hidden + b * H : nullptr);
      }
    });
    at::mm_out(grad_h_next, grad_gates_t, w_hh);
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
    backward_steps<scalar_t>(s, grad_y.contiguous(), grad_h, grad_c, c0.contiguous(), w_hh, w_hr,
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
