// The body of the CPU kernels, compiled once per instruction set: each kernels_<isa>.cpp includes
// this file inside its own namespace, after its target pragma and after every standard header,
// with kVectorBytes (the vector width) and kTileRows (rows of a register tile) defined. So every
// function here is built for that instruction set, and no symbol is shared between two builds.
//
// The products keep a tile of kTileRows rows x 4 gates x L units of accumulators in registers
// (L = kVectorBytes / sizeof(Acc)): 6 x 4 zmm with AVX-512's 32 registers, 3 x 4 ymm or xmm with
// the 16 of AVX2 and SSE2. No atomics and a fixed order of operations: identical inputs give
// identical results on a given machine and instruction set.

#if defined(__GNUC__)
#define LSTM_FUSED_INLINE inline __attribute__((always_inline))
#else
#define LSTM_FUSED_INLINE inline
#endif

// ---- Scalars: activations and storage types -------------------------------------------------

// Cephes expf's range reduction and polynomial, on a float or a vector of floats: x clamped,
// n = round(x / ln 2) (as a float), and e^(x - n ln 2).
template <typename T>
LSTM_FUSED_INLINE T exp_reduced(T x, T& n) {
  x = x < -87.3f ? T{} - 87.3f : x;
  x = x > 88.3f ? T{} + 88.3f : x;
  n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  T r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp written with plain arithmetic (Cephes expf, within 2 ulp) so that loops over it vectorise.
LSTM_FUSED_INLINE float exp_(float x) {
  float n;
  const float p = exp_reduced(x, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LSTM_FUSED_INLINE float sigmoid_(float x) { return 1.0f / (1.0f + exp_(-x)); }

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
  const float e = exp_(-2.0f * ax);
  const float magnitude = (1.0f - e) / (1.0f + e);
  const float far = x < 0.0f ? -magnitude : magnitude;
  return ax < 0.625f ? near_zero : far;
}

LSTM_FUSED_INLINE double sigmoid_(double x) { return 1.0 / (1.0 + std::exp(-x)); }
LSTM_FUSED_INLINE double tanh_(double x) { return std::tanh(x); }

LSTM_FUSED_INLINE float bfloat16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even; NaN becomes the canonical quiet NaN, as c10::BFloat16 does.
LSTM_FUSED_INLINE uint16_t float_to_bfloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
}

LSTM_FUSED_INLINE float float16_to_float(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, sizeof(h));
  return static_cast<float>(h);
}

LSTM_FUSED_INLINE uint16_t float_to_float16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t v;
  std::memcpy(&v, &h, sizeof(h));
  return v;
}

// How a dtype is stored (Type) and converted to and from its arithmetic type. The half types are
// tags over their 16-bit patterns, so that loops over them vectorise.
struct Bfloat16 {};
struct Float16 {};

template <typename Tag>
struct Storage {
  using Type = Tag;
  static LSTM_FUSED_INLINE Tag load(Tag v) { return v; }
  static LSTM_FUSED_INLINE Tag store(Tag v) { return v; }
};
template <>
struct Storage<Bfloat16> {
  using Type = uint16_t;
  static LSTM_FUSED_INLINE float load(uint16_t v) { return bfloat16_to_float(v); }
  static LSTM_FUSED_INLINE uint16_t store(float v) { return float_to_bfloat16(v); }
};
template <>
struct Storage<Float16> {
  using Type = uint16_t;
  static LSTM_FUSED_INLINE float load(uint16_t v) { return float16_to_float(v); }
  static LSTM_FUSED_INLINE uint16_t store(float v) { return float_to_float16(v); }
};

LSTM_FUSED_INLINE int64_t min_(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- Vectors --------------------------------------------------------------------------------

// GCC/Clang vector extensions: one register of the instruction set. Only pointers cross
// function boundaries, never vectors.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(float);
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(double);
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

// The first `count` lanes of v stored to (or added to) p[0..count).
template <typename V, typename T>
LSTM_FUSED_INLINE void put_lanes(T* p, const V& v, int64_t count, bool accumulate) {
  T lanes[sizeof(V) / sizeof(T)];
  std::memcpy(lanes, &v, sizeof(V));
  for (int64_t l = 0; l < count; ++l) p[l] = accumulate ? p[l] + lanes[l] : lanes[l];
}

// ---- Packing --------------------------------------------------------------------------------

template <typename Acc, typename Source>
void pack_gates_from(const Matrix& w, Acc* out) {
  constexpr int64_t L = Simd<Acc>::kLanes;
  const int64_t H = w.rows / 4, K = w.cols;
  const int64_t blocks = (H + L - 1) / L;
  using Stored = typename Storage<Source>::Type;
  const Stored* src = static_cast<const Stored*>(w.data);
  // A slice of k at a time, a cache line of each of the block's 4L rows of w: the slice's rows
  // of the block stay in L1 while they are written (whole columns, each element a line apart,
  // went to L2 and back for every element: see gate_tiles_of in lstm_cpu.cpp).
  constexpr int64_t kSlice = 64 / sizeof(Stored);
  for (int64_t u = 0; u < blocks; ++u) {
    Acc* block = out + u * K * 4 * L;
    for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
      const int64_t k1 = min_(K, k0 + kSlice);
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t l = 0; l < L; ++l) {
          const int64_t unit = u * L + l;
          Acc* column = block + q * L + l;
          if (unit >= H) {
            for (int64_t k = k0; k < k1; ++k) column[k * 4 * L] = Acc(0);
            continue;
          }
          const Stored* row = src + (q * H + unit) * w.ld;
          for (int64_t k = k0; k < k1; ++k) column[k * 4 * L] = Storage<Source>::load(row[k]);
        }
      }
    }
  }
}

template <typename Acc>
void pack_gates(const Matrix& w, Acc* out) {
  switch (w.dtype) {
    case DType::kFloat: return pack_gates_from<Acc, float>(w, out);
    case DType::kDouble: return pack_gates_from<Acc, double>(w, out);
    case DType::kBFloat16: return pack_gates_from<Acc, Bfloat16>(w, out);
    case DType::kHalf: return pack_gates_from<Acc, Float16>(w, out);
  }
}

template <typename Acc, typename Source>
void pack_columns_from(const Matrix& w, Acc* out) {
  constexpr int64_t W = 4 * Simd<Acc>::kLanes;
  const int64_t G = w.rows, P = w.cols;
  const int64_t blocks = (P + W - 1) / W;
  using Stored = typename Storage<Source>::Type;
  const Stored* src = static_cast<const Stored*>(w.data);
  for (int64_t c = 0; c < blocks; ++c) {
    const int64_t col0 = c * W, cols = min_(W, P - col0);
    for (int64_t n = 0; n < G; ++n) {
      Acc* dst = out + (c * G + n) * W;
      const Stored* row = src + n * w.ld + col0;
      for (int64_t v = 0; v < cols; ++v) dst[v] = Storage<Source>::load(row[v]);
      for (int64_t v = cols; v < W; ++v) dst[v] = Acc(0);
    }
  }
}

template <typename Acc>
void pack_columns(const Matrix& w, Acc* out) {
  switch (w.dtype) {
    case DType::kFloat: return pack_columns_from<Acc, float>(w, out);
    case DType::kDouble: return pack_columns_from<Acc, double>(w, out);
    case DType::kBFloat16: return pack_columns_from<Acc, Bfloat16>(w, out);
    case DType::kHalf: return pack_columns_from<Acc, Float16>(w, out);
  }
}

// ---- Products -------------------------------------------------------------------------------

// acc[r][v] (+)= sum_{k in [k0, k1)} a[r * lda + k] * block[k, v, :]: R rows times a packed block
// [K, 4, L], in registers.
template <typename T, int R>
LSTM_FUSED_INLINE void multiply_block(int64_t k0, int64_t k1, const T* __restrict a, int64_t lda,
                                      const T* __restrict block,
                                      typename Simd<T>::V (&acc)[R][4]) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = V{};
  }
  for (int64_t k = k0; k < k1; ++k) {
    const T* w = block + k * 4 * L;
    const V w0 = load<V>(w), w1 = load<V>(w + L), w2 = load<V>(w + 2 * L), w3 = load<V>(w + 3 * L);
    for (int r = 0; r < R; ++r) {
      const T a_rk = a[r * lda + k];
      acc[r][0] += a_rk * w0;
      acc[r][1] += a_rk * w1;
      acc[r][2] += a_rk * w2;
      acc[r][3] += a_rk * w3;
    }
  }
}

// R rows from row r0 of one unit block u, inner indices [k0, k1).
template <typename T, int R>
LSTM_FUSED_INLINE void gates_tile(const GatesProduct<T, T>& p, int64_t u, int64_t r0, int64_t k0,
                                  int64_t k1, bool accumulate) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t unit0 = u * L, units = min_(L, p.hidden - unit0);
  V acc[R][4];
  multiply_block<T, R>(k0, k1, p.a + r0 * p.lda, p.lda, p.packed + u * p.k * 4 * L, acc);
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      T* out = p.out + (r0 + r) * p.ldo + q * p.hidden + unit0;
      if (units == L) {
        store(out, accumulate ? load<V>(out) + acc[r][q] : acc[r][q]);
      } else {
        put_lanes(out, acc[r][q], units, accumulate);
      }
    }
  }
}

template <typename T, int R>
LSTM_FUSED_INLINE void gates_tile_rows(const GatesProduct<T, T>& p, int64_t u, int64_t r0,
                                       int64_t rows, int64_t k0, int64_t k1, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return gates_tile_rows<T, R - 1>(p, u, r0, rows, k0, k1, accumulate);
  }
  gates_tile<T, R>(p, u, r0, k0, k1, accumulate);
}

// Inner sizes per pass over the rows: one slice of a block, [kc, 4, L], stays in L1 while every
// row tile uses it.
template <typename T>
constexpr int64_t inner_slice() {
  return 32768 / (4 * Simd<T>::kLanes * static_cast<int64_t>(sizeof(T)));
}

// An empty product (K = 0) stores zeros.
template <typename T>
void gates_tile_rows_zero(const GatesProduct<T, T>& p, int64_t u) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t unit0 = u * L, units = min_(L, p.hidden - unit0);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t q = 0; q < 4; ++q) {
      T* out = p.out + r * p.ldo + q * p.hidden + unit0;
      for (int64_t l = 0; l < units; ++l) out[l] = T(0);
    }
  }
}

template <typename T>
void gates_product(const GatesProduct<T, T>& p, int64_t u0, int64_t u1) {
  const int64_t slice = p.rows > kTileRows ? inner_slice<T>() : (p.k > 0 ? p.k : 1);
  for (int64_t u = u0; u < u1; ++u) {
    if (p.k == 0) {  // leaves the sums as they are, or stores zeros
      if (!p.accumulate) gates_tile_rows_zero(p, u);
      continue;
    }
    for (int64_t k0 = 0; k0 < p.k; k0 += slice) {
      const int64_t k1 = min_(p.k, k0 + slice);
      const bool accumulate = p.accumulate || k0 > 0;
      for (int64_t r0 = 0; r0 < p.rows; r0 += kTileRows) {
        gates_tile_rows<T, kTileRows>(p, u, r0, min_(kTileRows, p.rows - r0), k0, k1, accumulate);
      }
    }
  }
}

// ---- Hidden-state gradient ------------------------------------------------------------------

// One block of 4L columns of dL/dh_{t-1} for R rows:
//   grad_h[r, col0 + l] = sum_n grad_gates[r, n] * block[n, l]
template <typename T, int R>
LSTM_FUSED_INLINE void hidden_grad_tile(const HiddenGrad<T>& s, int64_t c, int64_t r0) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t col0 = c * 4 * L, cols = min_(4 * L, s.cols - col0);
  V acc[R][4];
  multiply_block<T, R>(0, s.gates, s.grad_gates + r0 * s.gates, s.gates,
                       s.packed + c * s.gates * 4 * L, acc);
  for (int r = 0; r < R; ++r) {
    T* out = s.grad_h + (r0 + r) * s.cols + col0;
    for (int v = 0; v < 4; ++v) {
      const int64_t lanes = min_(L, cols - v * L);
      if (lanes == L) {
        store(out + v * L, acc[r][v]);
      } else if (lanes > 0) {
        put_lanes(out + v * L, acc[r][v], lanes, false);
      }
    }
  }
}

template <typename T, int R>
LSTM_FUSED_INLINE void hidden_grad_rows(const HiddenGrad<T>& s, int64_t c, int64_t r0,
                                        int64_t rows) {
  if constexpr (R > 1) {
    if (rows < R) return hidden_grad_rows<T, R - 1>(s, c, r0, rows);
  }
  hidden_grad_tile<T, R>(s, c, r0);
}

template <typename T>
void hidden_grad(const HiddenGrad<T>& s, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r0 = 0; r0 < s.rows; r0 += kTileRows) {
      hidden_grad_rows<T, kTileRows>(s, c, r0, min_(kTileRows, s.rows - r0));
    }
  }
}

// ---- Elementwise updates --------------------------------------------------------------------

template <typename Acc, typename Out, bool kWriteAcc, bool kKeepGates>
LSTM_FUSED_INLINE void forward_row(int64_t H, int64_t j0, int64_t j1, Acc* __restrict gates,
                                   const Acc* __restrict bias, const Acc* __restrict c_prev,
                                   Acc* __restrict c_next,
                                   typename Storage<Out>::Type* __restrict hidden,
                                   Acc* __restrict hidden_acc) {
  for (int64_t j = j0; j < j1; ++j) {
    const Acc i = sigmoid_(gates[j] + bias[j]);
    const Acc f = sigmoid_(gates[H + j] + bias[H + j]);
    const Acc g = tanh_(gates[2 * H + j] + bias[2 * H + j]);
    const Acc o = sigmoid_(gates[3 * H + j] + bias[3 * H + j]);
    const Acc c = f * c_prev[j] + i * g;
    if (kKeepGates) {
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
    }
    c_next[j] = c;
    const auto h = Storage<Out>::store(o * tanh_(c));
    hidden[j] = h;
    if (kWriteAcc) hidden_acc[j] = Storage<Out>::load(h);
  }
}

template <typename Acc, typename Out>
LSTM_FUSED_INLINE void forward_update_as(const ForwardUpdate<Acc>& s, int64_t b, int64_t j0,
                                         int64_t j1) {
  const int64_t H = s.hidden;
  using Stored = typename Storage<Out>::Type;
  Stored* const out = static_cast<Stored*>(s.hidden_out) + b * s.hidden_out_stride;
  Acc* const out_acc = s.hidden_acc ? s.hidden_acc + b * s.hidden_acc_stride : nullptr;
  if (s.lengths && s.t >= s.lengths[b]) {  // past the end of the sequence: carry the state
    std::memcpy(s.c_next + b * H + j0, s.c_prev + b * H + j0, sizeof(Acc) * (j1 - j0));
    if (s.h_prev) {
      const Stored* h_prev = static_cast<const Stored*>(s.h_prev) + b * s.hidden_out_stride;
      std::memcpy(out + j0, h_prev + j0, sizeof(Stored) * (j1 - j0));
    }
    if (out_acc && s.h_prev_acc) {
      std::memcpy(out_acc + j0, s.h_prev_acc + b * s.hidden_acc_stride + j0,
                  sizeof(Acc) * (j1 - j0));
    }
    return;
  }
  Acc* const gates = s.gates + b * 4 * H;
  const Acc* const c_prev = s.c_prev + b * H;
  Acc* const c_next = s.c_next + b * H;
  if (out_acc && s.keep_gates) {
    forward_row<Acc, Out, true, true>(H, j0, j1, gates, s.bias, c_prev, c_next, out, out_acc);
  } else if (out_acc) {
    forward_row<Acc, Out, true, false>(H, j0, j1, gates, s.bias, c_prev, c_next, out, out_acc);
  } else if (s.keep_gates) {
    forward_row<Acc, Out, false, true>(H, j0, j1, gates, s.bias, c_prev, c_next, out, nullptr);
  } else {
    forward_row<Acc, Out, false, false>(H, j0, j1, gates, s.bias, c_prev, c_next, out, nullptr);
  }
}

template <typename Acc>
void forward_update(const ForwardUpdate<Acc>& s, int64_t b, int64_t j0, int64_t j1) {
  if constexpr (sizeof(Acc) == sizeof(double)) {
    forward_update_as<Acc, double>(s, b, j0, j1);
  } else {
    switch (s.hidden_dtype) {
      case DType::kBFloat16: return forward_update_as<Acc, Bfloat16>(s, b, j0, j1);
      case DType::kHalf: return forward_update_as<Acc, Float16>(s, b, j0, j1);
      default: return forward_update_as<Acc, float>(s, b, j0, j1);
    }
  }
}

// The choices are template arguments so that the loop has no branches.
template <typename T, bool kTwoGradients, bool kWriteHidden>
LSTM_FUSED_INLINE void backward_row(int64_t H, int64_t j0, int64_t j1, const T* __restrict gates,
                                    const T* __restrict cell, const T* __restrict c_prev,
                                    const T* __restrict grad_hidden,
                                    const T* __restrict grad_hidden_extra,
                                    const T* __restrict grad_c_next, T* __restrict grad_gates,
                                    T* __restrict grad_c_prev, T* __restrict hidden) {
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

// Row b's gate gradients, units [j0, j1) of each gate, rounded into grad_gates_copy.
template <typename T, typename Out>
LSTM_FUSED_INLINE void copy_grad_gates(const BackwardUpdate<T>& s, int64_t b, int64_t j0,
                                       int64_t j1) {
  const int64_t H = s.hidden;
  const T* __restrict from = s.grad_gates + b * 4 * H;
  auto* __restrict to = static_cast<typename Storage<Out>::Type*>(s.grad_gates_copy) + b * 4 * H;
  for (int64_t q = 0; q < 4; ++q) {
    for (int64_t j = q * H + j0; j < q * H + j1; ++j) to[j] = Storage<Out>::store(from[j]);
  }
}

template <typename T>
void backward_update_row(const BackwardUpdate<T>& s, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = s.hidden;
  T* const grad_gates = s.grad_gates + b * 4 * H;
  T* const hidden = s.hidden_out ? s.hidden_out + b * H : nullptr;
  if (s.lengths && s.t >= s.lengths[b]) {  // a carried step: gradients pass through
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t j = j0; j < j1; ++j) grad_gates[q * H + j] = T(0);
    }
    std::memcpy(s.grad_c_prev + b * H + j0, s.grad_c_next + b * H + j0, sizeof(T) * (j1 - j0));
    for (int64_t j = j0; hidden && j < j1; ++j) hidden[j] = T(0);
    return;
  }
  const T* gates = s.gates + b * 4 * H;
  const T* cell = s.cell + b * H;
  const T* c_prev = s.c_prev + b * H;
  const T* grad_hidden = s.grad_hidden + b * s.grad_hidden_stride;
  const T* extra = s.grad_hidden_extra ? s.grad_hidden_extra + b * s.grad_hidden_stride : nullptr;
  const T* grad_c_next = s.grad_c_next + b * H;
  T* grad_c_prev = s.grad_c_prev + b * H;
  if (extra && hidden) {
    backward_row<T, true, true>(H, j0, j1, gates, cell, c_prev, grad_hidden, extra, grad_c_next,
                                grad_gates, grad_c_prev, hidden);
  } else if (extra) {
    backward_row<T, true, false>(H, j0, j1, gates, cell, c_prev, grad_hidden, extra, grad_c_next,
                                 grad_gates, grad_c_prev, hidden);
  } else if (hidden) {
    backward_row<T, false, true>(H, j0, j1, gates, cell, c_prev, grad_hidden, extra, grad_c_next,
                                 grad_gates, grad_c_prev, hidden);
  } else {
    backward_row<T, false, false>(H, j0, j1, gates, cell, c_prev, grad_hidden, extra,
                                  grad_c_next, grad_gates, grad_c_prev, hidden);
  }
}

template <typename T>
void backward_update(const BackwardUpdate<T>& s, int64_t b, int64_t j0, int64_t j1) {
  backward_update_row(s, b, j0, j1);
  if constexpr (sizeof(T) == sizeof(float)) {
    if (s.grad_gates_copy == nullptr) return;
    switch (s.copy_dtype) {
      case DType::kBFloat16: return copy_grad_gates<T, Bfloat16>(s, b, j0, j1);
      case DType::kHalf: return copy_grad_gates<T, Float16>(s, b, j0, j1);
      default: return copy_grad_gates<T, float>(s, b, j0, j1);
    }
  }
}

void gate_tile(const float* __restrict tile, int64_t rows, int64_t H, int64_t unit0,
               int64_t units, float* __restrict out, int64_t ldo, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < 4; ++q) {
      float* dst = out + r * ldo + q * H + unit0;
      const float* src = tile + r * 64 + q * 16;
      if (units == 16 && accumulate) {
        for (int64_t l = 0; l < 16; ++l) dst[l] += src[l];
      } else if (units == 16) {
        for (int64_t l = 0; l < 16; ++l) dst[l] = src[l];
      } else {
        for (int64_t l = 0; l < units; ++l) dst[l] = accumulate ? dst[l] + src[l] : src[l];
      }
    }
  }
}

// exp_ on vectors of float, with the same arithmetic lane by lane.
template <typename V>
LSTM_FUSED_INLINE V exp_v(V x) {
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  V n;
  const V p = exp_reduced(x, n);
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(x) = small ? near : num / den (tanh_ on vectors), in parts so that the division can be
// shared.
template <typename V>
struct TanhParts {
  V near, num, den;
  decltype(V{} < V{}) small;
};

template <typename V>
LSTM_FUSED_INLINE TanhParts<V> tanh_parts(V x) {
  const V ax = x < 0.0f ? V{} - x : x;
  const V z = x * x;
  V p = V{} - 5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const V e = exp_v(-2.0f * ax);
  const V magnitude = 1.0f - e;
  return {x + x * z * p, x < 0.0f ? V{} - magnitude : magnitude, 1.0f + e, ax < 0.625f};
}

// The lanes of v stored as Out (rounded to nearest even, NaN to the quiet NaN, as the scalar
// Storage<Out>::store).
typedef uint32_t FloatBitsV __attribute__((vector_size(kVectorBytes)));
typedef uint16_t HalfBitsV __attribute__((vector_size(kVectorBytes / 2)));

template <typename Out>
LSTM_FUSED_INLINE void store_as_v(typename Storage<Out>::Type* p, typename Simd<float>::V v) {
  if constexpr (std::is_same<Out, Bfloat16>::value) {
    FloatBitsV bits;
    std::memcpy(&bits, &v, sizeof(v));
    const FloatBitsV rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const FloatBitsV nan = (FloatBitsV)((bits & 0x7fffffffu) > 0x7f800000u);  // ones where NaN
    const FloatBitsV result = (rounded & ~nan) | (nan & 0x7fc0u);
    const HalfBitsV out = __builtin_convertvector(result, HalfBitsV);
    std::memcpy(p, &out, sizeof(out));
  } else if constexpr (std::is_same<Out, Float16>::value) {
    for (int64_t l = 0; l < Simd<float>::kLanes; ++l) p[l] = float_to_float16(v[l]);
  } else {
    std::memcpy(p, &v, sizeof(v));
  }
}

// n of the 16 units of a block: a constant size in the common case of a whole block, so that
// the copy is inlined.
template <typename T>
LSTM_FUSED_INLINE void copy_units(T* to, const T* from, int64_t n) {
  if (n == 16) {
    std::memcpy(to, from, sizeof(T) * 16);
  } else {
    std::memcpy(to, from, sizeof(T) * n);
  }
}

// The 16 units of a tile row in vectors of L floats.
template <typename Out, bool kKeepGates>
LSTM_FUSED_INLINE void tile_update_as(const TileUpdate& s) {
  using V = typename Simd<float>::V;
  constexpr int64_t L = Simd<float>::kLanes;
  using Stored = typename Storage<Out>::Type;
  constexpr int64_t U = 16;
  constexpr int64_t N = U / L;  // vectors per gate
  const int64_t H = s.hidden;
  V bias[4][N];
  for (int64_t q = 0; q < 4; ++q) {
    for (int64_t v = 0; v < N; ++v) bias[q][v] = load<V>(s.bias + q * U + v * L);
  }
  for (int64_t r = 0; r < s.rows; ++r) {
    const int64_t b = s.row0 + r;
    const float* c_prev = s.c_prev + b * H + s.unit0;
    float* c_next = s.c_next + b * H + s.unit0;
    Stored* out = static_cast<Stored*>(s.hidden_out) + b * s.hidden_out_stride + s.unit0;
    if (s.lengths && s.t >= s.lengths[b]) {  // past the end of the sequence: carry the state
      copy_units(c_next, c_prev, s.units);
      copy_units(out, static_cast<const Stored*>(s.h_prev) + b * s.hidden_out_stride + s.unit0,
                 s.units);
      continue;
    }
    // All 16 lanes are computed (the tile and the bias hold zeros past the block's units); only
    // `units` of them are stored.
    const float* g = s.tile + r * 4 * U;
    float c_old[U] = {}, c_new[U], act[4][U];
    Stored h_out[U];
    copy_units(c_old, c_prev, s.units);
    for (int64_t v = 0; v < N; ++v) {
      // Five activations with three divisions: 1 / (a b) gives both 1 / a and 1 / b, for a
      // sigmoid's 1 + e^-x (finite) and a tanh's 1 + e^-2|x| (in [1, 2]), so a b cannot overflow.
      const V a_i = 1.0f + exp_v(V{} - (load<V>(g + v * L) + bias[0][v]));
      const V a_f = 1.0f + exp_v(V{} - (load<V>(g + U + v * L) + bias[1][v]));
      const V a_o = 1.0f + exp_v(V{} - (load<V>(g + 3 * U + v * L) + bias[3][v]));
      const TanhParts<V> t_g = tanh_parts(load<V>(g + 2 * U + v * L) + bias[2][v]);
      const V r_ig = 1.0f / (a_i * t_g.den);
      const V i = t_g.den * r_ig;
      const V z = t_g.small ? t_g.near : t_g.num * a_i * r_ig;
      const V f = 1.0f / a_f;
      const V c = f * load<V>(c_old + v * L) + i * z;
      const TanhParts<V> t_c = tanh_parts(c);
      const V r_oc = 1.0f / (a_o * t_c.den);
      const V o = t_c.den * r_oc;
      const V tanh_c = t_c.small ? t_c.near : t_c.num * a_o * r_oc;
      store(c_new + v * L, c);
      store_as_v<Out>(h_out + v * L, o * tanh_c);
      if (kKeepGates) {
        store(act[0] + v * L, i);
        store(act[1] + v * L, f);
        store(act[2] + v * L, z);
        store(act[3] + v * L, o);
      }
    }
    copy_units(c_next, c_new, s.units);
    copy_units(out, h_out, s.units);
    if (kKeepGates) {
      float* kept = s.kept_gates + b * 4 * H + s.unit0;
      for (int64_t q = 0; q < 4; ++q) copy_units(kept + q * H, act[q], s.units);
    }
  }
}

template <bool kKeepGates>
LSTM_FUSED_INLINE void tile_update_keeping(const TileUpdate& s) {
  switch (s.hidden_dtype) {
    case DType::kBFloat16: return tile_update_as<Bfloat16, kKeepGates>(s);
    case DType::kHalf: return tile_update_as<Float16, kKeepGates>(s);
    default: return tile_update_as<float, kKeepGates>(s);
  }
}

void tile_update(const TileUpdate& s) {
  if (s.kept_gates) return tile_update_keeping<true>(s);
  tile_update_keeping<false>(s);
}

template <typename T>
constexpr KernelSet<T> kernel_set() {
  return {Simd<T>::kLanes, &pack_gates<T>,       &pack_columns<T>, &gates_product<T>,
          &forward_update<T>, &backward_update<T>, &hidden_grad<T>};
}
