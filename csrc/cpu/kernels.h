// The CPU kernels of lstm_fused on raw pointers: packing, the register-blocked products and the
// fused elementwise updates, each built once per instruction set (kernels_<isa>.cpp) and picked
// at run time. No torch headers: the torch glue is lstm_cpu.cpp.
//
// Shapes as in ../lstm.h: B rows (batch), H hidden units, P = proj_size or H, K the inner size
// of a product (I for the input part, P for the recurrent part). Gate order i, f, g, o.
// Acc is the arithmetic type: double for float64, float for every other dtype (float16 and
// bfloat16 values are multiplied exactly in float32 and summed in float32).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lstm_fused {
namespace cpu {

// The instruction sets the kernels are built for, from the least to the most capable.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kIsaCount = 4;

const char* isa_name(Isa isa);
// Whether this build has kernels for isa and this CPU (and its OS) can run them.
bool isa_supported(Isa isa);
// The most capable supported instruction set.
Isa best_isa();

// Element types of tensors the kernels read or write.
enum class DType : int { kFloat, kDouble, kBFloat16, kHalf };

// A row-major matrix W [rows, cols] with row stride ld, of any DType.
struct Matrix {
  const void* data;
  DType dtype;
  int64_t rows, cols, ld;
};

// gates product: out[r, q*H + u*L + l] (+)= sum_k a[r*lda + k] * W[q*H + u*L + l, k] for rows
// r < rows and unit blocks u in [u0, u1), W packed by pack_gates (Operand = the packed type).
template <typename Operand, typename Acc>
struct GatesProduct {
  int64_t rows, hidden, k;
  const Operand* a;
  int64_t lda;
  const Operand* packed;
  Acc* out;
  int64_t ldo;
  bool accumulate;  // else store
};

// The forward update of one row's units [j0, j1): from the pre-activations without bias in
// gates (the activated gates written back when keep_gates), c_t = f c_{t-1} + i g and
// o tanh(c_t) into hidden_out (dtype hidden_dtype) and, when given, into hidden_acc as Acc (the
// same values, rounded to hidden_dtype).
// A row past the end of its sequence (t >= lengths[row]) carries c_{t-1} and, when h_prev is
// given, h_{t-1} instead.
template <typename Acc>
struct ForwardUpdate {
  int64_t hidden;
  Acc* gates;          // [B, 4H]
  bool keep_gates;     // training: backward reads the activated gates
  const Acc* bias;     // [4H]: b_ih + b_hh (zeros without bias)
  const Acc* c_prev;   // [B, H]
  Acc* c_next;         // [B, H]
  void* hidden_out;    // [B, hidden_out_stride]
  int64_t hidden_out_stride;
  DType hidden_dtype;
  Acc* hidden_acc;     // [B, hidden_acc_stride] or nullptr
  int64_t hidden_acc_stride;
  const int64_t* lengths;  // [B] or nullptr
  int64_t t;
  const void* h_prev;      // [B, hidden_out_stride] of hidden_dtype, or nullptr
  const Acc* h_prev_acc;   // [B, hidden_acc_stride] or nullptr
};

// The backward update of one row's units [j0, j1): dL/d(o tanh c_t) = grad_hidden (+
// grad_hidden_extra), then the pre-activation gate gradients, dL/dc_{t-1} and, when hidden_out is
// given, o tanh(c_t). A row past the end of its sequence passes dL/dc through and gets zero gate
// gradients (and zero hidden). With grad_gates_copy, the gate gradients also go there, rounded
// to copy_dtype (the operand of the half-type products that follow).
template <typename Acc>
struct BackwardUpdate {
  int64_t hidden;
  const Acc* gates;              // [B, 4H] activated gates of step t
  const Acc* cell;               // [B, H] c_t
  const Acc* c_prev;             // [B, H] c_{t-1}
  const Acc* grad_hidden;        // [B, grad_hidden_stride]
  int64_t grad_hidden_stride;
  const Acc* grad_hidden_extra;  // [B, grad_hidden_stride] or nullptr
  const Acc* grad_c_next;        // [B, H] dL/dc_t
  Acc* grad_gates;               // [B, 4H]
  Acc* grad_c_prev;              // [B, H]
  Acc* hidden_out;               // [B, H] o tanh(c_t), or nullptr
  const int64_t* lengths;
  int64_t t;
  void* grad_gates_copy;         // [B, 4H] of copy_dtype, or nullptr
  DType copy_dtype;
};

// grad_h[r, c] = sum_n grad_gates[r, n] * W[n, c] (n < G = 4H) for rows r < rows and column
// blocks [c0, c1) of 4L columns, W packed by pack_columns.
template <typename Acc>
struct HiddenGrad {
  int64_t rows, gates, cols;  // B, 4H, P
  const Acc* grad_gates;      // [B, 4H]
  const Acc* packed;
  Acc* grad_h;                // [B, P]
};

template <typename Acc>
struct KernelSet {
  int64_t lanes;  // L: hidden units per block of the gate layout
  // W [4H, K] -> [ceil(H/L)][K][4][L] of Acc, zeros past H.
  void (*pack_gates)(const Matrix& w, Acc* out);
  // W [4H, P] -> [ceil(P/4L)][4H][4L] of Acc, zeros past P.
  void (*pack_columns)(const Matrix& w, Acc* out);
  void (*gates_product)(const GatesProduct<Acc, Acc>& p, int64_t u0, int64_t u1);
  void (*forward_update)(const ForwardUpdate<Acc>& s, int64_t row, int64_t j0, int64_t j1);
  void (*backward_update)(const BackwardUpdate<Acc>& s, int64_t row, int64_t j0, int64_t j1);
  void (*hidden_grad)(const HiddenGrad<Acc>& s, int64_t c0, int64_t c1);
};

// Products of bfloat16 operands with float32 accumulation, as pairs of k: in hardware
// (AVX512-BF16's vdpbf16ps) or emulated with float32 FMAs (AVX2).
struct Bfloat16Dot {
  int64_t lanes;  // L
  bool native;    // vdpbf16ps: faster than float32 products; else only where weights' bytes bound
  // W [4H, K] bfloat16 -> [ceil(H/L)][ceil(K/2)][4][L][2], pairs of k side by side, zeros past
  // H and K.
  void (*pack_gates)(const Matrix& w, uint16_t* out);
  void (*gates_product)(const GatesProduct<uint16_t, float>& p, int64_t u0, int64_t u1);
};

// out[r, q*H + unit0 + l] (+)= tile[r, q*16 + l] for r < rows, l < units (<= 16): one block of
// 16 units' four gates, as oneDNN's brgemm computes them, into the gates' layout.
using GateTileFn = void (*)(const float* tile, int64_t rows, int64_t hidden, int64_t unit0,
                            int64_t units, float* out, int64_t ldo, bool accumulate);

// The forward update of one block of 16 units for rows r < rows, straight from oneDNN's output
// tile (row r: the pre-activations of gate q, unit l at tile[r * 64 + q * 16 + l], bias not yet
// added), as ForwardUpdate does for units [unit0, unit0 + units) of the rows row0 + r: c_t into
// c_next, o tanh(c_t) into hidden_out, the activated gates into kept_gates when given. The
// other arrays are indexed as in ForwardUpdate, by batch row and unit.
struct TileUpdate {
  const float* tile;        // [rows][64]
  int64_t rows, row0, hidden, unit0, units;
  const float* bias;        // [64]: b_ih + b_hh of the block, as the tile's columns
  const float* c_prev;      // [B, hidden]
  float* c_next;            // [B, hidden]
  void* hidden_out;         // [B, hidden_out_stride] of hidden_dtype
  int64_t hidden_out_stride;
  DType hidden_dtype;
  float* kept_gates;        // [B, 4 * hidden] or nullptr
  const int64_t* lengths;   // [B] or nullptr: rows with t >= lengths carry their state
  int64_t t;
  const void* h_prev;       // [B, hidden_out_stride] of hidden_dtype
};
using TileUpdateFn = void (*)(const TileUpdate& s);

struct Kernels {
  Isa isa;
  KernelSet<float> f32;
  KernelSet<double> f64;
  const Bfloat16Dot* bf16_dot;  // AVX512-BF16's, AVX2's emulation of it, or nullptr
  GateTileFn gate_tile;
  TileUpdateFn tile_update;
};

// The kernels for isa (nullptr if this build has none).
const Kernels* kernels_for(Isa isa);

// Sizes, in elements, of the packed layouts.
inline int64_t packed_gates_size(int64_t hidden, int64_t k, int64_t lanes) {
  return (hidden + lanes - 1) / lanes * k * 4 * lanes;
}
inline int64_t packed_bf16_gates_size(int64_t hidden, int64_t k, int64_t lanes) {
  return (hidden + lanes - 1) / lanes * ((k + 1) / 2) * 4 * lanes * 2;
}
inline int64_t packed_columns_size(int64_t gates, int64_t cols, int64_t lanes) {
  return (cols + 4 * lanes - 1) / (4 * lanes) * gates * 4 * lanes;
}

}  // namespace cpu
}  // namespace lstm_fused
