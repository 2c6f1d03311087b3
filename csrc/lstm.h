// The lstm_fused op boundary: one LSTM layer in one direction.
//
// Shapes (time-major; T steps, B sequences, I inputs, H hidden units, P = proj_size or H):
//   x: [T, B, I]   h0: [B, P]   c0: [B, H]
//   w_ih: [4H, I]  w_hh: [4H, P]  b_ih, b_hh: [4H] (optional)  w_hr: [P, H] (optional)
//   lengths: [B] int64 (optional): sequence b runs steps t < lengths[b] (with reverse, from
//            lengths[b] - 1 down to 0)
//   y: [T, B, P]   h_n: [B, P]   c_n: [B, H]
//   gates: [T, B, 4H] activated gates i, f, g, o   cells: [T, B, H] cell states c_t
//   (gates and cells are returned only when training; else they are empty)
//
// Padded steps (t >= lengths[b]), on every device: sequence b carries its state through them
// unchanged, so y[t, b] holds the carried h and cells[t, b] the carried c (h_n, c_n are the state
// after its last real step, or h0, c0 for an empty one); gates[t, b] is unspecified and never
// read. backward reads y and cells there as the state a later step started from, and passes the
// gradient of a padded step straight through (dL/dh_{t-1} = grad_y[t] + dL/dh_t). The caller
// masks the outputs: lstm_fused.lstm returns zeros at padded steps (lstm_fused/_padding.py), as
// torch.nn.LSTM does, so its grad_y is zero there.
//
// Sizes: batch, 4 * hidden_size, P and input_size are at most kMaxIndexedSize, as the
// kernels index rows and columns with 32-bit integers (element offsets are 64-bit).
//
// Gate order and math are torch.nn.LSTM's:
//   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
//   c_t = f * c_{t-1} + i * g      h_t = o * tanh(c_t)   (then h_t = h_t W_hr^T with a projection)
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

namespace torch {
class Library;
}

namespace lstm_fused {

constexpr int64_t kMaxIndexedSize = (int64_t{1} << 31) / 4 - 1;

struct LstmSizes {
  int64_t seq_len;      // T
  int64_t batch;        // B
  int64_t input_size;   // I
  int64_t hidden_size;  // H
  int64_t output_size;  // P: proj_size if there is a projection, else H
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The one set of input checks, shared by every device: ranks, shapes, dtypes, devices.
LstmSizes check_forward_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh,
                             const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& lengths);

// check_forward_args plus the shapes of the incoming gradients and of what forward saved.
LstmSizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                              const at::Tensor& grad_c_n, const at::Tensor& x,
                              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& lengths, const at::Tensor& y,
                              const at::Tensor& gates, const at::Tensor& cells);

// The forward op's result from the buffers its pass filled: h_n and c_n copied out of y and cells
// (cells holds every step when training, else the last two steps in turn; c_n gets x's dtype),
// and empty gates and cells when not training.
ForwardResult forward_result(const LstmSizes& s, at::Tensor y, at::Tensor cells, at::Tensor gates,
                             const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             bool reverse, bool training);

// The matrix products of gradients_over_steps: out = a b, plus out's old value when accumulate
// (out: a [rows, columns] tensor with unit column stride; a, b: any strides).
using Matmul = std::function<void(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                  bool accumulate)>;

// What backward computes after the pass back in time, the same on every device: dx, dW_ih, dW_hh,
// the bias gradient and dW_hr as large GEMMs over all T * B rows (by `matmul`, else ATen's), from
//   grad_gates: [T, B, 4H] dL/dz, the pre-activation gate gradients of every step
//   grad_proj_out, hidden_all: [T, B, P] dL/dy_t in total and [T, B, H] o * tanh(c_t) (with a
//   projection; else undefined)
// all of x's dtype. grad_h0 and grad_c0 are passed through into the result.
BackwardResult gradients_over_steps(const LstmSizes& s, const at::Tensor& grad_gates,
                                    const at::Tensor& x, const at::Tensor& h0,
                                    const at::Tensor& w_ih, const at::Tensor& y,
                                    const at::Tensor& grad_proj_out, const at::Tensor& hidden_all,
                                    at::Tensor grad_h0, at::Tensor grad_c0, bool reverse,
                                    bool has_bias, const Matmul& matmul = {});

// Both directions of a bidirectional layer in one op (so that the CUDA persistent kernel can run
// them in one launch). h0 [2, B, P] and c0 [2, B, H] stack the directions' states; the reverse
// direction's weights are the *_reverse arguments. Returns
//   y: [T, B, 2P] both directions' outputs side by side (forward first, as nn.LSTM's)
//   h_n: [2, B, P]   c_n: [2, B, H]
//   gates, cells and gates_reverse, cells_reverse: what each direction's forward saves
using BidirectionalForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_x, grad_h0 [2, B, P], grad_c0 [2, B, H], then grad_w_ih, grad_w_hh, grad_bias, grad_w_hr
// of the forward direction and of the reverse one.
using BidirectionalBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The two-direction ops computed one direction at a time by `ops`::forward and ::backward
// (through the dispatcher, so on any device): their CPU implementation, and the CUDA one where
// one launch cannot hold both directions.
BidirectionalForwardResult bidirectional_forward_by_direction(
    const char* ops, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths,
    bool training);
BidirectionalBackwardResult bidirectional_backward_by_direction(
    const char* ops, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths,
    const at::Tensor& y, const at::Tensor& gates, const at::Tensor& cells,
    const at::Tensor& gates_reverse, const at::Tensor& cells_reverse, bool has_bias);

// The checks of the two-direction ops beyond each direction's own: the stacked states' shapes,
// and that both directions agree in sizes and in having a projection. Returns the sizes.
LstmSizes check_bidirectional_args(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& w_hr_reverse, const std::optional<at::Tensor>& lengths);

// The op schemas, shared by the registration of the ops and of their CPU-emulated CUDA test build.
constexpr const char* kForwardSchema =
    "forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool training) "
    "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)";
// forward's y, h_n and c_n, with training decided when it runs: autograd on and any input needing
// a gradient. Composite (it calls forward), so a TorchScript trace or script records this op and
// each replay decides for itself. Where forward has no autograd formula (it is registered from
// Python), as in a LibTorch program, it runs below autograd, for inference.
constexpr const char* kLayerSchema =
    "layer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
    "Tensor? w_hr, Tensor? lengths, bool reverse) -> (Tensor y, Tensor h_n, Tensor c_n)";
// A unidirectional stack of num_layers layers in one call, as lstm_fused.LSTM runs it in eager
// mode (where a single step's time is mostly the Python and dispatch around each op): nn.LSTM's
// aten::lstm arguments, less bidirectional. hx = (h0 [L, B, P], c0 [L, B, H]); params per layer
// w_ih, w_hh[, b_ih, b_hh][, w_hr] (a projection where there is one more); dropout on each
// layer's output but the last when train. Composite: each layer runs as `layer`.
constexpr const char* kLayersSchema =
    "layers(Tensor input, Tensor[] hx, Tensor[] params, bool has_biases, int num_layers, "
    "float dropout, bool train, bool batch_first) -> (Tensor output, Tensor h_n, Tensor c_n)";
constexpr const char* kBackwardSchema =
    "backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0, "
    "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor y, Tensor gates, "
    "Tensor cells, bool reverse, bool has_bias) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
    "Tensor grad_bias, Tensor grad_w_hr)";
constexpr const char* kBidirectionalForwardSchema =
    "bidirectional_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor? w_hr, Tensor w_ih_reverse, Tensor w_hh_reverse, "
    "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? lengths, "
    "bool training) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, "
    "Tensor gates_reverse, Tensor cells_reverse)";
constexpr const char* kBidirectionalBackwardSchema =
    "bidirectional_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor w_ih_reverse, "
    "Tensor w_hh_reverse, Tensor? w_hr_reverse, Tensor? lengths, Tensor y, Tensor gates, "
    "Tensor cells, Tensor gates_reverse, Tensor cells_reverse, bool has_bias) "
    "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
    "Tensor grad_bias, Tensor grad_w_hr, Tensor grad_w_ih_reverse, Tensor grad_w_hh_reverse, "
    "Tensor grad_bias_reverse, Tensor grad_w_hr_reverse)";

// What lstm_fused.force_path and force_isa force (through the op _force), or before their first
// use the environment variables LSTM_FUSED_PATH and LSTM_FUSED_ISA, read once: names only ("" =
// the default choice), held here for the CPU and CUDA glue alike, each of which reads the path
// as one of its own and reports a name it does not know.
struct ForcedNames {
  std::string path;
  std::string isa;
};
ForcedNames forced_names();
void set_forced_names(const std::string& path, const std::string& isa);
// Defines _force(path, isa) and _forced() in an op namespace (ours, or the emulated CUDA build's).
void define_forcing_ops(torch::Library& m);

}  // namespace lstm_fused
