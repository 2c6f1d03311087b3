// Op schemas of the lstm_fused namespace and the input checks every implementation shares.
#include "lstm.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace lstm_fused {
namespace {

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "lstm_fused: ", name, " must have shape ", expected,
              ", got ", shape_of(t));
}

void check_like_x(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lstm_fused: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; input, state and weights must share one dtype");
  TORCH_CHECK(t.device() == x.device(), "lstm_fused: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; input, state and weights must be on one device");
}

}  // namespace

LstmSizes check_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh,
                             const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, "lstm_fused: x must be 3-D [T, B, input_size], got ", x.dim(),
              "-D with shape ", shape_of(x));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lstm_fused: x must have a floating-point dtype, got ", x.scalar_type());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "lstm_fused: w_ih must be 2-D [4 * hidden_size, input_size], got shape ",
              shape_of(w_ih));
  LstmSizes s{x.size(0), x.size(1), x.size(2), w_ih.size(0) / 4, w_ih.size(0) / 4};
  TORCH_CHECK(w_ih.size(1) == s.input_size, "lstm_fused: w_ih has ", w_ih.size(1),
              " input columns but x has input_size ", s.input_size);
  if (w_hr.has_value()) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == s.hidden_size && w_hr->size(0) > 0,
                "lstm_fused: w_hr must be 2-D [proj_size > 0, hidden_size=", s.hidden_size,
                "], got shape ", shape_of(*w_hr), " (without a projection, pass no w_hr)");
    s.output_size = w_hr->size(0);
    check_like_x(x, *w_hr, "w_hr");
  }
  TORCH_CHECK(s.batch <= kMaxIndexedSize && 4 * s.hidden_size <= kMaxIndexedSize &&
                  s.output_size <= kMaxIndexedSize && s.input_size <= kMaxIndexedSize,
              "lstm_fused: batch (", s.batch, "), 4 * hidden_size (", 4 * s.hidden_size,
              "), the output size (", s.output_size, ") and input_size (", s.input_size,
              ") must each be at most ", kMaxIndexedSize,
              ": the kernels index rows and columns with 32-bit integers");
  check_shape(w_hh, {4 * s.hidden_size, s.output_size}, "w_hh");
  check_shape(h0, {s.batch, s.output_size}, "h0");
  check_shape(c0, {s.batch, s.hidden_size}, "c0");
  check_like_x(x, w_ih, "w_ih");
  check_like_x(x, w_hh, "w_hh");
  check_like_x(x, h0, "h0");
  check_like_x(x, c0, "c0");
  if (b_ih.has_value()) {
    check_shape(*b_ih, {4 * s.hidden_size}, "b_ih");
    check_like_x(x, *b_ih, "b_ih");
  }
  if (b_hh.has_value()) {
    check_shape(*b_hh, {4 * s.hidden_size}, "b_hh");
    check_like_x(x, *b_hh, "b_hh");
  }
  if (lengths.has_value()) {
    check_shape(*lengths, {s.batch}, "lengths");
    TORCH_CHECK(lengths->scalar_type() == at::kLong, "lstm_fused: lengths must be int64, got ",
                lengths->scalar_type());
    TORCH_CHECK(lengths->device() == x.device(), "lstm_fused: lengths is on ", lengths->device(),
                " but x is on ", x.device());
    // Values are checked where they can be read without a device synchronisation.
    if (lengths->is_cpu() && s.batch > 0) {
      const auto lo = lengths->min().item<int64_t>();
      const auto hi = lengths->max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= s.seq_len, "lstm_fused: lengths must lie in [0, T=", s.seq_len,
                  "], got values in [", lo, ", ", hi, "]");
    }
  }
  return s;
}

LstmSizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, const at::Tensor& x,
                              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                              const at::Tensor& gates, const at::Tensor& cells) {
  const LstmSizes s = check_forward_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr,
                                         lengths);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  check_shape(grad_y, {T, B, P}, "grad_y");
  check_shape(grad_h_n, {B, P}, "grad_h_n");
  check_shape(grad_c_n, {B, H}, "grad_c_n");
  check_shape(y, {T, B, P}, "y");
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({T, B, 4 * H}) &&
                  cells.sizes() == at::IntArrayRef({T, B, H}),
              "lstm_fused: backward needs the gates [T, B, 4H] and cells [T, B, H] that forward "
              "saves with training=True; got gates ", shape_of(gates), " and cells ",
              shape_of(cells), " (was forward called with training=False?)");
  check_like_x(x, grad_y, "grad_y");
  check_like_x(x, grad_h_n, "grad_h_n");
  check_like_x(x, grad_c_n, "grad_c_n");
  check_like_x(x, y, "y");
  // Half types keep their state in float32.
  const bool reduced = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto saved_dtype = reduced ? at::kFloat : x.scalar_type();
  TORCH_CHECK(gates.scalar_type() == saved_dtype && cells.scalar_type() == saved_dtype,
              "lstm_fused: saved gates and cells must have dtype ", saved_dtype, ", got ",
              gates.scalar_type(), " and ", cells.scalar_type());
  TORCH_CHECK(gates.device() == x.device() && cells.device() == x.device(),
              "lstm_fused: saved gates and cells must be on x's device");
  return s;
}

ForwardResult forward_result(const LstmSizes& s, at::Tensor y, at::Tensor cells, at::Tensor gates,
                             const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             bool reverse, bool training) {
  const int64_t T = s.seq_len;
  const int64_t last = reverse ? 0 : T - 1;
  at::Tensor h_n = T > 0 ? y.select(0, last).clone() : h0.clone(at::MemoryFormat::Contiguous);
  at::Tensor c_n = T > 0 ? cells.select(0, training ? last : (T - 1) % 2)
                               .to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                         : c0.clone(at::MemoryFormat::Contiguous);
  if (!training) {
    gates = at::empty({0}, x.options());
    cells = at::empty({0}, x.options());
  }
  return {y, h_n, c_n, gates, cells};
}

BackwardResult gradients_over_steps(const LstmSizes& s, const at::Tensor& grad_gates,
                                    const at::Tensor& x, const at::Tensor& h0,
                                    const at::Tensor& w_ih, const at::Tensor& y,
                                    const at::Tensor& grad_proj_out, const at::Tensor& hidden_all,
                                    at::Tensor grad_h0, at::Tensor grad_c0, bool reverse,
                                    bool has_bias, const Matmul& matmul) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const auto options = x.options();
  auto product = [&](at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    if (matmul) {
      matmul(out, a, b, accumulate);
    } else if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  };
  const at::Tensor grad_gates_2d = grad_gates.reshape({T * B, 4 * H});
  at::Tensor grad_x = at::empty({T * B, s.input_size}, options);
  product(grad_x, grad_gates_2d, w_ih, false);
  at::Tensor grad_w_ih = at::empty({4 * H, s.input_size}, options);
  product(grad_w_ih, grad_gates_2d.t(), x.reshape({T * B, s.input_size}), false);
  // Step t started from y[t -/+ 1], or from h0 for the first step processed.
  at::Tensor grad_w_hh = at::zeros({4 * H, P}, options);
  if (T > 0) {
    const int64_t first = reverse ? T - 1 : 0;
    product(grad_w_hh, grad_gates.select(0, first).t(), h0, true);
    if (T > 1) {
      const at::Tensor later_gates = reverse ? grad_gates.narrow(0, 0, T - 1)
                                             : grad_gates.narrow(0, 1, T - 1);
      const at::Tensor previous_y = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
      product(grad_w_hh, later_gates.reshape({-1, 4 * H}).t(), previous_y.reshape({-1, P}), true);
    }
  }
  at::Tensor grad_bias = has_bias ? grad_gates_2d.sum(0) : at::empty({0}, options);
  at::Tensor grad_w_hr = at::empty({0}, options);
  if (grad_proj_out.defined()) {
    grad_w_hr = at::empty({P, H}, options);
    product(grad_w_hr, grad_proj_out.reshape({T * B, P}).t(), hidden_all.reshape({T * B, H}),
            false);
  }
  return {grad_x.view({T, B, s.input_size}), grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias,
          grad_w_hr};
}

#ifndef LSTM_FUSED_EMULATE_CUDA
namespace {

bool needs_grad(std::initializer_list<const at::Tensor*> tensors,
                std::initializer_list<const std::optional<at::Tensor>*> optional_tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->requires_grad()) return true;
  }
  for (const std::optional<at::Tensor>* t : optional_tensors) {
    if (t->has_value() && (*t)->requires_grad()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  static const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("lstm_fused::forward", "");
  static const auto forward =
      handle.typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 bool, bool)>();
  const bool training = needs_grad({&x, &h0, &c0, &w_ih, &w_hh}, {&b_ih, &b_hh, &w_hr});
  if (training && !handle.hasKernelForDispatchKey(c10::DispatchKey::Autograd)) {
    // forward's autograd formula is registered from Python (lstm_fused/ops.py). Without it, as in
    // a LibTorch program, the layer runs for inference, below autograd.
    TORCH_WARN_ONCE(
        "lstm_fused: no autograd formula is registered for lstm_fused::forward (the Python "
        "package registers it), so lstm_fused layers run for inference and pass no gradient");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, gates, cells] =
        forward.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, false);
    return {y, h_n, c_n};
  }
  if (!training) {
    // No gradient can flow: skip forward's autograd formula, a Python function that would only
    // pass the call on (a large share of a single step's time on the CPU).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h_n, c_n, gates, cells] =
        forward.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, false);
    return {y, h_n, c_n};
  }
  auto [y, h_n, c_n, gates, cells] =
      forward.call(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, training);
  return {y, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layers(const at::Tensor& input, at::TensorList hx,
                                                      at::TensorList params, bool has_biases,
                                                      int64_t num_layers, double dropout,
                                                      bool train, bool batch_first) {
  const int64_t count = static_cast<int64_t>(params.size());
  const int64_t plain = has_biases ? 4 : 2;  // per layer, without a projection
  TORCH_CHECK(num_layers >= 1 && count % num_layers == 0 &&
                  (count / num_layers == plain || count / num_layers == plain + 1),
              "lstm_fused::layers: params must hold ", plain, " or ", plain + 1,
              " tensors per layer (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "",
              "[, w_hr]) for ", num_layers, " layers, got ", count);
  TORCH_CHECK(hx.size() == 2, "lstm_fused::layers: hx must be (h0, c0), got ", hx.size(),
              " tensors");
  TORCH_CHECK(input.dim() == 3, "lstm_fused::layers: input must be 3-D, got ", shape_of(input));
  const int64_t batch = input.size(batch_first ? 0 : 1);
  for (const at::Tensor& state : hx) {
    TORCH_CHECK(state.dim() == 3 && state.size(0) == num_layers && state.size(1) == batch,
                "lstm_fused::layers: h0 and c0 must be [", num_layers, ", ", batch,
                ", size] for ", num_layers, " layers and batch ", batch, ", got ",
                shape_of(state));
  }
  const int64_t per_layer = count / num_layers;
  const bool has_proj = per_layer == plain + 1;
  // Where no gradient can flow, the views below (the layers' states, the results' layer
  // dimension) skip autograd's view tracking, which nothing would read: through it the four
  // views of a one-layer call cost more instructions than the op's own CPU work (callgrind,
  // T = B = H = 1). Each layer still checks for itself (layer()).
  const auto requires_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  const bool grad = at::GradMode::is_enabled() &&
                    (input.requires_grad() || std::any_of(hx.begin(), hx.end(), requires_grad) ||
                     std::any_of(params.begin(), params.end(), requires_grad));
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!grad) below_autograd.emplace();
  at::Tensor sequence = batch_first ? input.transpose(0, 1) : input;
  std::vector<at::Tensor> h_n, c_n;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = params.data() + l * per_layer;
    std::optional<at::Tensor> b_ih, b_hh, w_hr;
    if (has_biases) {
      b_ih = w[2];
      b_hh = w[3];
    }
    if (has_proj) w_hr = w[plain];
    auto [y, h, c] = layer(sequence, hx[0].select(0, l), hx[1].select(0, l), w[0], w[1], b_ih,
                           b_hh, w_hr, std::nullopt, false);
    sequence = dropout > 0 && train && l + 1 < num_layers ? at::dropout(y, dropout, true) : y;
    h_n.push_back(std::move(h));
    c_n.push_back(std::move(c));
  }
  if (batch_first) sequence = sequence.transpose(0, 1);
  if (num_layers == 1) return {sequence, h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)};  // no copy
  return {sequence, at::stack(h_n), at::stack(c_n)};
}

}  // namespace
#endif

LstmSizes check_bidirectional_args(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == 2 && c0.dim() == 3 && c0.size(0) == 2,
              "lstm_fused: the two-direction ops take h0 [2, B, P] and c0 [2, B, H] (the forward "
              "direction's state first), got shapes ", shape_of(h0), " and ", shape_of(c0));
  TORCH_CHECK(w_hr.has_value() == w_hr_reverse.has_value(),
              "lstm_fused: both directions must have a projection (w_hr) or neither");
  const LstmSizes s = check_forward_args(x, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  const LstmSizes r = check_forward_args(x, h0[1], c0[1], w_ih_reverse, w_hh_reverse, b_ih_reverse,
                                         b_hh_reverse, w_hr_reverse, std::nullopt);
  TORCH_CHECK(r.hidden_size == s.hidden_size && r.output_size == s.output_size,
              "lstm_fused: the reverse direction has hidden_size ", r.hidden_size,
              " and output size ", r.output_size, ", the forward direction ", s.hidden_size,
              " and ", s.output_size);
  return s;
}

namespace {

using ForwardOp = ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, bool, bool);
using BackwardOp = BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, bool, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* ops, const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(ops) + "::" + name).c_str(), "")
      .typed<Signature>();
}

}  // namespace

BidirectionalForwardResult bidirectional_forward_by_direction(
    const char* ops, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths,
    bool training) {
  check_bidirectional_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse,
                           b_ih_reverse, b_hh_reverse, w_hr_reverse, lengths);
  const auto forward = find_op<ForwardOp>(ops, "forward");
  auto [y, h_n, c_n, gates, cells] =
      forward.call(x, h0[0], c0[0], w_ih, w_hh, b_ih, b_hh, w_hr, lengths, false, training);
  auto [y_r, h_n_r, c_n_r, gates_r, cells_r] =
      forward.call(x, h0[1], c0[1], w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse,
                   w_hr_reverse, lengths, true, training);
  return {at::cat({y, y_r}, 2), at::stack({h_n, h_n_r}), at::stack({c_n, c_n_r}), gates, cells,
          gates_r, cells_r};
}

BidirectionalBackwardResult bidirectional_backward_by_direction(
    const char* ops, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths,
    const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells,
    const at::Tensor& gates_reverse, const at::Tensor& cells_reverse, bool has_bias) {
  const LstmSizes s =
      check_bidirectional_args(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr,
                               w_ih_reverse, w_hh_reverse, std::nullopt, std::nullopt,
                               w_hr_reverse, lengths);
  const int64_t P = s.output_size;
  check_shape(grad_y, {s.seq_len, s.batch, 2 * P}, "grad_y");
  check_shape(y, {s.seq_len, s.batch, 2 * P}, "y");
  TORCH_CHECK(grad_h_n.dim() == 3 && grad_h_n.size(0) == 2 && grad_c_n.dim() == 3 &&
                  grad_c_n.size(0) == 2,
              "lstm_fused: the two-direction backward takes grad_h_n [2, B, P] and grad_c_n "
              "[2, B, H], got shapes ", shape_of(grad_h_n), " and ", shape_of(grad_c_n));
  const auto backward = find_op<BackwardOp>(ops, "backward");
  auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = backward.call(
      grad_y.narrow(2, 0, P), grad_h_n[0], grad_c_n[0], x, h0[0], c0[0], w_ih, w_hh, w_hr,
      lengths, y.narrow(2, 0, P), gates, cells, false, has_bias);
  auto [grad_x_r, grad_h0_r, grad_c0_r, grad_w_ih_r, grad_w_hh_r, grad_bias_r, grad_w_hr_r] =
      backward.call(grad_y.narrow(2, P, P), grad_h_n[1], grad_c_n[1], x, h0[1], c0[1],
                    w_ih_reverse, w_hh_reverse, w_hr_reverse, lengths, y.narrow(2, P, P),
                    gates_reverse, cells_reverse, true, has_bias);
  return {grad_x.add_(grad_x_r), at::stack({grad_h0, grad_h0_r}), at::stack({grad_c0, grad_c0_r}),
          grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_w_ih_r, grad_w_hh_r, grad_bias_r,
          grad_w_hr_r};
}

namespace {

struct Forcing {
  std::mutex mutex;
  ForcedNames names;
};

Forcing& forcing() {
  static Forcing* state = [] {
    auto* f = new Forcing();  // never destroyed: read until exit
    const char* path = std::getenv("LSTM_FUSED_PATH");
    const char* isa = std::getenv("LSTM_FUSED_ISA");
    f->names = {path ? path : "", isa ? isa : ""};
    return f;
  }();
  return *state;
}

}  // namespace

ForcedNames forced_names() {
  Forcing& f = forcing();
  std::lock_guard<std::mutex> lock(f.mutex);
  return f.names;
}

void set_forced_names(const std::string& path, const std::string& isa) {
  Forcing& f = forcing();
  std::lock_guard<std::mutex> lock(f.mutex);
  f.names = {path, isa};
}

void define_forcing_ops(torch::Library& m) {
  m.def("_force(str path, str isa) -> ()", &set_forced_names);
  m.def("_forced() -> str[]", []() -> std::vector<std::string> {
    const ForcedNames names = forced_names();
    return {names.path, names.isa};
  });
}

}  // namespace lstm_fused

#ifndef LSTM_FUSED_EMULATE_CUDA  // the emulated CUDA test build registers its own namespace
TORCH_LIBRARY(lstm_fused, m) {
  m.def(lstm_fused::kForwardSchema);
  m.def(lstm_fused::kBackwardSchema);
  m.def(lstm_fused::kBidirectionalForwardSchema);
  m.def(lstm_fused::kBidirectionalBackwardSchema);
  m.def(lstm_fused::kLayerSchema);
  m.def(lstm_fused::kLayersSchema);
  lstm_fused::define_forcing_ops(m);
}

// On the CPU both directions run one after the other, each by the one-direction ops.
TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("bidirectional_forward",
         [](const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
            const at::Tensor& w_ih, const at::Tensor& w_hh,
            const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
            const std::optional<at::Tensor>& w_hr, const at::Tensor& w_ih_reverse,
            const at::Tensor& w_hh_reverse, const std::optional<at::Tensor>& b_ih_reverse,
            const std::optional<at::Tensor>& b_hh_reverse,
            const std::optional<at::Tensor>& w_hr_reverse,
            const std::optional<at::Tensor>& lengths, bool training) {
           return lstm_fused::bidirectional_forward_by_direction(
               "lstm_fused", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse,
               b_ih_reverse, b_hh_reverse, w_hr_reverse, lengths, training);
         });
  m.impl("bidirectional_backward",
         [](const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
            const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
            const at::Tensor& w_ih, const at::Tensor& w_hh,
            const std::optional<at::Tensor>& w_hr, const at::Tensor& w_ih_reverse,
            const at::Tensor& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
            const std::optional<at::Tensor>& lengths, const at::Tensor& y,
            const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& gates_reverse,
            const at::Tensor& cells_reverse, bool has_bias) {
           return lstm_fused::bidirectional_backward_by_direction(
               "lstm_fused", grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
               w_ih_reverse, w_hh_reverse, w_hr_reverse, lengths, y, gates, cells, gates_reverse,
               cells_reverse, has_bias);
         });
}

TORCH_LIBRARY_IMPL(lstm_fused, CompositeImplicitAutograd, m) {
  m.impl("layer", &lstm_fused::layer);
  m.impl("layers", &lstm_fused::layers);
}

// The library holds no Python: Python loads it with torch.ops.load_library, as a LibTorch program
// does with dlopen. This stub only satisfies linkers that expect a Python extension's entry point.
extern "C" void* PyInit__C(void) { return nullptr; }
#endif
