// CPU implementation of the lstm_fused ops: checks, buffers, the one path choice, the cache of
// packed weights and the sequence of steps, around the torch-free kernels of kernels.h.
//
// Forward: the input projection of every step as one product (a BLAS GEMM, or our kernels or
// oneDNN's brgemm for half types, which keep float32 sums), then per step the recurrent part of
// all four gates and the biases, nonlinearities and cell update, fused: each thread owns blocks
// of hidden units, step after step, and computes them from W_hh packed once (cached while the
// weight is unchanged). A single step (T = 1, streaming) does the input part in the same pass.
// The brgemm forward (no projection) keeps oneDNN's tiles instead: the input part of a chunk of
// steps, then per step h_{t-1} W_hh^T added in and the update straight from the tiles.
// Backward: one pass back in time (fused gate gradients, then dh_{t-1} from W_hh packed by
// column blocks, or by brgemm; the threads split the batch while W_hh fits in L2, else each
// step's units and columns), then dx, dW_ih, dW_hh, db and dW_hr as large GEMMs over all
// steps.
// No atomics and a fixed reduction order: identical inputs give identical results.
#include "../lstm.h"
#include "../step_order.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/StorageImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// oneDNN's brgemm micro-kernels through ATen (PyTorch >= 2.5 defines these macros).
#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(CPUBLAS_BRGEMM_BF16BF16F32) && \
    defined(CPUBLAS_BRGEMM_F16F16F32)
#define LSTM_FUSED_HAVE_BRGEMM 1
#else
#define LSTM_FUSED_HAVE_BRGEMM 0
#endif

namespace lstm_fused {
namespace {

using cpu::Isa;

// ---- Which path and instruction set --------------------------------------------------------

// How each step's recurrent product is computed:
//   fused:  our register-blocked kernels, each thread owning blocks of hidden units;
//   brgemm: oneDNN's brgemm micro-kernel (AMX for bfloat16 where the CPU has it) per block of
//           16 units, then our fused update on the same block; backward, our fused update,
//           then dh_{t-1} by brgemm per block of 64 columns;
//   gemm:   one BLAS GEMM per step, then the fused elementwise pass.
enum class Path : int { kAuto = 0, kFused, kBrgemm, kGemm };
constexpr const char* kPathNames[] = {"auto", "fused", "brgemm", "gemm"};

// What lstm_fused.force_path / force_isa or the environment (LSTM_FUSED_PATH, LSTM_FUSED_ISA)
// force, read from the names that lstm.cpp holds for every device (forced_names).
struct Forced {
  Path path = Path::kAuto;
  int isa = -1;  // -1: the best this CPU supports
};

std::string supported_isa_list() {
  std::string names;
  for (int i = cpu::kIsaCount - 1; i >= 0; --i) {
    if (!cpu::isa_supported(static_cast<Isa>(i))) continue;
    names += (names.empty() ? "" : ", ") + std::string(cpu::isa_name(static_cast<Isa>(i)));
  }
  return names;
}

Path parse_path(const std::string& name) {
  if (name.empty()) return Path::kAuto;
  for (int p = 0; p < 4; ++p) {
    if (name == kPathNames[p]) return static_cast<Path>(p);
  }
  TORCH_CHECK(false, "lstm_fused: the forced path (LSTM_FUSED_PATH or lstm_fused.force_path) ",
              "must be auto, fused, brgemm or gemm on the CPU, got '", name, "'");
}

int parse_isa(const std::string& name) {
  if (name.empty() || name == "auto") return -1;
  for (int i = 0; i < cpu::kIsaCount; ++i) {
    if (name != cpu::isa_name(static_cast<Isa>(i))) continue;
    TORCH_CHECK(cpu::isa_supported(static_cast<Isa>(i)), "lstm_fused: the forced instruction ",
                "set (LSTM_FUSED_ISA or lstm_fused.force_isa) '", name, "' is not supported ",
                "by this CPU or build; supported: ", supported_isa_list());
    return i;
  }
  TORCH_CHECK(false, "lstm_fused: the forced instruction set (LSTM_FUSED_ISA or ",
              "lstm_fused.force_isa) must be auto, avx512_bf16, avx512, avx2 or baseline, got '",
              name, "'");
}

Forced forced_now() {
  const ForcedNames names = forced_names();
  return {parse_path(names.path), parse_isa(names.isa)};
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int i = cpu::kIsaCount - 1; i >= 0; --i) {
    if (cpu::isa_supported(static_cast<Isa>(i))) names.emplace_back(cpu::isa_name(static_cast<Isa>(i)));
  }
  return names;
}

std::vector<std::string> cpu_paths() {
  if (LSTM_FUSED_HAVE_BRGEMM) return {"fused", "brgemm", "gemm"};
  return {"fused", "gemm"};
}

bool brgemm_packs(at::ScalarType dtype) {
#if LSTM_FUSED_HAVE_BRGEMM
  return at::native::cpublas::could_pack(dtype);
#else
  (void)dtype;
  return false;
#endif
}

// How the operands of the products are held:
//   same:    in x's dtype (float32, float64, or the half type for brgemm);
//   convert: half types as float32 copies (exact), multiplied by float32 kernels;
//   bf16_dot: bfloat16, multiplied as pairs of k with float32 sums (AVX512-BF16's vdpbf16ps,
//             or AVX2's emulation of it, whose weights stay bfloat16 too).
enum class Operands { kSame, kConvert, kBf16Dot };

struct Plan {
  Path path;
  Isa isa;
  Operands operands;
  // The input part x_t W_ih^T inside the step kernel (a single step of the fused path).
  bool fuse_input;
  // brgemm forward: the pre-activations of a chunk of steps in oneDNN's tile layout
  // [block][chunk][B][64], their input part first, then each step adds h_{t-1} W_hh^T into its
  // tiles and updates from them (no scatter into the gate layout).
  bool tiles;
};

bool is_half(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// Above this batch a BLAS GEMM per step is as fast as the fused step (measured on 2-core AVX2
// and AVX-512 machines).
constexpr int64_t kFusedMaxBatch = 128;

// The one place that picks the CPU path and instruction set for a call. training: a training
// forward or its backward (backward implies it).
Plan choose_plan(const LstmSizes& s, at::ScalarType dtype, bool training, bool backward,
                 bool has_proj) {
  const Forced forced = forced_now();
  const Isa isa = forced.isa >= 0 ? static_cast<Isa>(forced.isa) : cpu::best_isa();
  Path path = forced.path;
  if (path == Path::kAuto) {
    // float32: oneDNN's brgemm beats our kernels at the measured shapes (B = 4-64, H = 128-512,
    // forward and backward) with AVX-512; with AVX2 (a 2-core Zen 3) in inference from B = 16
    // (0.91-1.3x the fused path at B = 16-128, 1.0x or more on most rows; at B = 4-8 0.87-1.01x,
    // 0.92x at (8, 256, 512, 512)), never in training (0.89-1.01x at B = 4-128, 0.89x at
    // (64, 64, 512, 512)); with a projection it is unmeasured.
    const bool brgemm_float =
        dtype == at::kFloat && !has_proj && LSTM_FUSED_HAVE_BRGEMM &&
        (isa >= Isa::kAvx512 || (isa == Isa::kAvx2 && !training && s.batch >= 16));
    if (s.batch > kFusedMaxBatch) {
      path = Path::kGemm;
    } else if (s.batch >= 4 && ((dtype == at::kBFloat16 && brgemm_packs(dtype)) ||  // AMX
                                brgemm_float)) {
      path = Path::kBrgemm;
    } else {
      path = Path::kFused;
    }
  }
  // brgemm has no float64.
  if (path == Path::kBrgemm && (!LSTM_FUSED_HAVE_BRGEMM || dtype == at::kDouble)) {
    path = Path::kFused;
  }
  Operands operands = Operands::kSame;
  if (is_half(dtype) && path != Path::kBrgemm) {
    // AVX2's emulated dot products (2-row register tiles) are slower than float32 copies'
    // (3 rows) where the arithmetic bounds the step, faster where reading the weights does: at
    // batch 4 and less, or where their float32 copies would not stay in the last-level cache
    // (measured on a 2-core Zen 3 with 32 MB of L3: 1.1-2.4x at B = 1-4 or H = 1024, 0.92-0.95x
    // at B = 6-64 with H <= 512).
    const cpu::Bfloat16Dot* k = cpu::kernels_for(isa)->bf16_dot;
    const int64_t float_weight_bytes = 16 * s.hidden_size * (s.input_size + s.output_size);
    const bool dot = dtype == at::kBFloat16 && path == Path::kFused && !backward && k &&
                     (k->native || s.batch <= 4 || float_weight_bytes >= (int64_t(16) << 20));
    operands = dot ? Operands::kBf16Dot : Operands::kConvert;
  }
  const bool fuse_input = !backward && path == Path::kFused && s.seq_len == 1;
  const bool tiles = !backward && path == Path::kBrgemm && !has_proj;
  return {path, isa, operands, fuse_input, tiles};
}

// ---- Cache of packed weights ----------------------------------------------------------------

// Packed forms of a weight.
enum class Layout : int { kGates, kBf16Gates, kColumns, kFloatCopy, kBrgemmTiles, kBrgemmColumns };

// Inference calls keep packed copies of their weights, used while the weight is unchanged: its
// version counter (bumped by in-place updates: optimizer steps, load_state_dict, copy_ under
// no_grad) and a sample of its values (which catches updates through .data, such as
// p.data -= lr * p.grad, that bypass the counter) are as they were. .to() and .data = ... give
// a new storage, hence a new entry. An entry lives as long as the weight's storage: lookups drop
// the entries of freed weights first. Training calls pack afresh, as their weights change.
constexpr int kSamples = 16;

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  Layout layout;
  int64_t variant;
  int64_t version;
  std::array<uint64_t, kSamples> sample;
  at::Tensor packed;
};

struct WeightCache {
  std::mutex mutex;
  std::vector<CacheEntry> entries;
};

WeightCache& weight_cache() {
  static WeightCache* cache = new WeightCache();  // never destroyed: used until exit
  return *cache;
}

constexpr size_t kMaxCacheEntries = 256;

void drop_dead_entries(std::vector<CacheEntry>& entries) {
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [](const CacheEntry& e) { return e.storage.expired(); }),
                entries.end());
}

bool same_weight(const CacheEntry& e, const at::Tensor& w, const c10::StorageImpl* storage,
                 Layout layout, int64_t variant) {
  return e.layout == layout && e.variant == variant && e.data == w.data_ptr() &&
         e.dtype == w.scalar_type() && e.storage._unsafe_get_target() == storage &&
         w.sizes().equals(e.sizes) && w.strides().equals(e.strides);
}

// The bits of kSamples elements spread over the 2-D weight w.
std::array<uint64_t, kSamples> sample_of(const at::Tensor& w) {
  std::array<uint64_t, kSamples> sample{};
  const int64_t numel = w.numel(), cols = w.size(1);
  const size_t element = w.element_size();
  const char* base = static_cast<const char*>(w.data_ptr());
  for (int i = 0; numel > 0 && i < kSamples; ++i) {
    const int64_t index = (numel - 1) * i / (kSamples - 1);
    const int64_t offset = (index / cols) * w.stride(0) + (index % cols) * w.stride(1);
    std::memcpy(&sample[i], base + offset * static_cast<int64_t>(element), element);
  }
  return sample;
}

template <typename Pack>
at::Tensor packed_weight(const at::Tensor& w, bool cache_it, Layout layout, int64_t variant,
                         const Pack& pack) {
  // Inference tensors have no version counter to trust.
  if (!cache_it || w.is_inference() || !w.has_storage() || w.dim() != 2) return pack();
  const c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
  const int64_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  const auto sample = sample_of(w);
  WeightCache& cache = weight_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    drop_dead_entries(cache.entries);
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
      if (!same_weight(*it, w, storage, layout, variant)) continue;
      if (it->version == version && it->sample == sample) return it->packed;
      cache.entries.erase(it);  // stale
      break;
    }
  }
  at::Tensor packed = pack();
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (cache.entries.size() >= kMaxCacheEntries) cache.entries.erase(cache.entries.begin());
  cache.entries.push_back({w.storage().getWeakStorageImpl(), w.data_ptr(), w.sizes().vec(),
                           w.strides().vec(), w.scalar_type(), layout, variant, version, sample,
                           packed});
  return packed;
}

// [entries, bytes] of the cache, after dropping the entries of freed weights; clears it first
// when asked.
std::vector<int64_t> weight_cache_info(bool clear) {
  WeightCache& cache = weight_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (clear) cache.entries.clear();
  drop_dead_entries(cache.entries);
  int64_t bytes = 0;
  for (const auto& e : cache.entries) bytes += e.packed.nbytes();
  return {static_cast<int64_t>(cache.entries.size()), bytes};
}

cpu::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cpu::DType::kFloat;
    case at::kDouble: return cpu::DType::kDouble;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kHalf;
    default: TORCH_CHECK(false, "lstm_fused: unsupported dtype ", dtype);
  }
}

cpu::Matrix matrix_of(const at::Tensor& w) {
  return {w.data_ptr(), kernel_dtype(w.scalar_type()), w.size(0), w.size(1), w.stride(0)};
}

// w with unit stride along its rows, as the packing reads it.
at::Tensor row_major(const at::Tensor& w) { return w.stride(1) == 1 ? w : w.contiguous(); }

template <typename Acc>
const cpu::KernelSet<Acc>& kernel_set(const cpu::Kernels& k);
template <>
const cpu::KernelSet<float>& kernel_set<float>(const cpu::Kernels& k) { return k.f32; }
template <>
const cpu::KernelSet<double>& kernel_set<double>(const cpu::Kernels& k) { return k.f64; }

template <typename Acc>
at::ScalarType acc_scalar_type() {
  return std::is_same<Acc, double>::value ? at::kDouble : at::kFloat;
}

// W [4H, K] in the gate layout of kernels ks: [ceil(H/L)][K][4][L] of Acc.
template <typename Acc>
at::Tensor packed_gates(const at::Tensor& w, bool cache, const cpu::KernelSet<Acc>& ks) {
  return packed_weight(w, cache, Layout::kGates, ks.lanes * 8 + sizeof(Acc), [&] {
    const at::Tensor src = row_major(w);
    at::Tensor out = at::empty({cpu::packed_gates_size(w.size(0) / 4, w.size(1), ks.lanes)},
                               w.options().dtype(acc_scalar_type<Acc>()));
    ks.pack_gates(matrix_of(src), out.data_ptr<Acc>());
    return out;
  });
}

// W [4H, K] bfloat16 in the pair layout of AVX512-BF16's dot product.
at::Tensor packed_bf16_gates(const at::Tensor& w, bool cache, const cpu::Bfloat16Dot& dot) {
  return packed_weight(w, cache, Layout::kBf16Gates, dot.lanes, [&] {
    const at::Tensor src = row_major(w);
    at::Tensor out =
        at::empty({cpu::packed_bf16_gates_size(w.size(0) / 4, w.size(1), dot.lanes)}, w.options());
    dot.pack_gates(matrix_of(src), reinterpret_cast<uint16_t*>(out.data_ptr()));
    return out;
  });
}

// W [4H, P] in column blocks of 4L for the hidden-state gradient.
template <typename Acc>
at::Tensor packed_columns(const at::Tensor& w, bool cache, const cpu::KernelSet<Acc>& ks) {
  return packed_weight(w, cache, Layout::kColumns, ks.lanes * 8 + sizeof(Acc), [&] {
    const at::Tensor src = row_major(w);
    at::Tensor out = at::empty({cpu::packed_columns_size(w.size(0), w.size(1), ks.lanes)},
                               w.options().dtype(acc_scalar_type<Acc>()));
    ks.pack_columns(matrix_of(src), out.data_ptr<Acc>());
    return out;
  });
}

// A float32 copy of a half-type weight (its values are exact in float32).
at::Tensor float_copy(const at::Tensor& w, bool cache) {
  return packed_weight(w, cache, Layout::kFloatCopy, 0, [&] { return w.to(at::kFloat).contiguous(); });
}

// ---- brgemm ---------------------------------------------------------------------------------

constexpr int64_t kBrgemmUnits = 16;               // hidden units per block
constexpr int64_t kBrgemmCols = 4 * kBrgemmUnits;  // N of one product: 4 gates x 16 units
constexpr int64_t kBrgemmRows = 64;                // M per product, at most

int64_t padded_inner(int64_t k, bool vnni) { return vnni ? (k + 1) / 2 * 2 : k; }

// Elements of each per-thread buffer kept between calls (see Scratch).
constexpr int64_t kScratchKept = int64_t(1) << 18;

// Steps of the brgemm forward whose input parts are projected at once: as many as the kept
// buffer holds (there the tiles stay in cache, and small calls allocate nothing).
int64_t tile_chunk_steps(const LstmSizes& s) {
  const int64_t blocks = (s.hidden_size + kBrgemmUnits - 1) / kBrgemmUnits;
  const int64_t fit = kScratchKept / std::max<int64_t>(1, blocks * s.batch * kBrgemmCols);
  return std::max<int64_t>(1, std::min(fit, s.seq_len));
}

// Steps of the fused forward whose input parts are projected at once, each thread its own unit
// blocks, in inference without a projection (0: all steps before the first, by one product).
// A chunk the kept buffer holds stays in cache until its steps add h_{t-1} W_hh^T to it, where
// all steps' pre-activations [T, B, 4H] would go to memory and back, with a page fault per 4 KB
// on their first touch (measured: a third of a (64, 64, 512, 512) bfloat16 call on Zen 4).
// Chunks for AVX512-BF16's products, which project with our kernels either way, and for float32
// on AVX2 (on a 2-core Zen 3, chunks against one BLAS product: 1.0-1.1x at B = 2-15, H = 256-2048,
// median 1.03x, e.g. (4, 128, 128, 256) 1.02-1.06x, (8, 128, 256, 256) 1.07-1.10x,
// (4, 32, 2048, 2048) 1.09x, (8, 256, 512, 512) 0.98-1.02x). The other operands keep one BLAS
// product unless a single chunk holds every step (with the AVX2 kernels forced on Zen 4, whose
// BLAS uses AVX-512, several chunks were slower than BLAS at (8, 256, 512, 512) and
// (64, 16, 128, 128), faster at (4, 128, 128, 256) and (32, 35, 256, 256)).
int64_t input_chunk_steps(const LstmSizes& s, const Plan& plan, at::ScalarType dtype,
                          bool training, bool has_proj) {
  if (training || has_proj || plan.path != Path::kFused || plan.fuse_input) return 0;
  const int64_t per_step = std::max<int64_t>(1, s.batch * 4 * s.hidden_size);
  const int64_t chunk = std::max<int64_t>(1, std::min(s.seq_len, kScratchKept / per_step));
  const bool chunked = plan.operands == Operands::kBf16Dot ||
                       (plan.isa == Isa::kAvx2 && dtype == at::kFloat) || chunk == s.seq_len;
  return chunked ? chunk : 0;
}

// out[u][k][q * 16 + l] = w[(q * H + u * 16 + l) * ld + k * kstride], zeros past H and K (Kp >=
// K), for elements of E's size.
template <typename E>
void gate_tiles_of(const E* w, int64_t ld, int64_t kstride, int64_t H, int64_t K, int64_t Kp,
                   E* out) {
  const int64_t blocks = (H + kBrgemmUnits - 1) / kBrgemmUnits;
  constexpr int64_t kSlice = 64 / sizeof(E);  // elements of k in a cache line
  at::parallel_for(0, blocks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      E* tile = out + u * Kp * kBrgemmCols;
      if (Kp > K) std::memset(tile + K * kBrgemmCols, 0, sizeof(E) * (Kp - K) * kBrgemmCols);
      // A slice of k at a time: a cache line of each of the 64 rows of w read, the slice's
      // rows of the tile (4 KB) written while they stay in L1. Writing whole columns of a
      // float32 tile (each element 256 bytes apart, 64 KB in all) went to L2 and back for
      // every element: 4.3x slower for a [1024, 256] weight on one core of an AVX-512 Xeon
      // (440 against 100 us; slices of 2-8 lines 106-116 us), where a training call, which
      // packs afresh, spent half of a (32, 1, 256, 256) forward packing.
      for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
        const int64_t k1 = std::min(K, k0 + kSlice);
        for (int64_t n = 0; n < kBrgemmCols; ++n) {
          const int64_t unit = u * kBrgemmUnits + n % kBrgemmUnits;
          E* column = tile + n;
          if (unit >= H) {
            for (int64_t k = k0; k < k1; ++k) column[k * kBrgemmCols] = E(0);
            continue;
          }
          const E* row = w + (n / kBrgemmUnits * H + unit) * ld;
          for (int64_t k = k0; k < k1; ++k) column[k * kBrgemmCols] = row[k * kstride];
        }
      }
    }
  });
}

// W [4H, K] as one B matrix [Kp, 64] per block of 16 units, its columns gate-major (q * 16 +
// l), zeros past H and K, packed for oneDNN where it wants that (VNNI pairs for half types).
at::Tensor brgemm_tiles(const at::Tensor& w, bool cache, bool vnni) {
  return packed_weight(w, cache, Layout::kBrgemmTiles, vnni, [&] {
    const int64_t H = w.size(0) / 4, K = w.size(1), Kp = padded_inner(K, vnni);
    const int64_t blocks = (H + kBrgemmUnits - 1) / kBrgemmUnits;
    // [block][k][gate][unit], in one pass (a permuted copy of a padded tensor is much slower)
    at::Tensor tiles = at::empty({blocks, Kp, kBrgemmCols}, w.options());
    if (w.element_size() == 2) {
      gate_tiles_of(static_cast<const uint16_t*>(w.data_ptr()), w.stride(0), w.stride(1), H, K,
                    Kp, static_cast<uint16_t*>(tiles.data_ptr()));
    } else {
      gate_tiles_of(static_cast<const uint32_t*>(w.data_ptr()), w.stride(0), w.stride(1), H, K,
                    Kp, static_cast<uint32_t*>(tiles.data_ptr()));
    }
    if (!vnni) return tiles;
#if LSTM_FUSED_HAVE_BRGEMM
    at::Tensor out = at::empty_like(tiles);
    const int64_t tile = Kp * kBrgemmCols;
    for (int64_t u = 0; u < blocks; ++u) {
      at::native::cpublas::pack(Kp, kBrgemmCols, kBrgemmCols, kBrgemmCols, w.scalar_type(),
                                w.scalar_type(), static_cast<const char*>(tiles.data_ptr()) +
                                                     u * tile * w.element_size(),
                                static_cast<char*>(out.data_ptr()) + u * tile * w.element_size());
    }
    return out;
#else
    return tiles;
#endif
  });
}

// W [4H, P] as one B matrix [4H, 64] per block of 64 columns, zeros past P, packed for oneDNN
// where it wants that: the hidden-state gradient's dh_{t-1} = grad_gates_t W (4H is even).
at::Tensor brgemm_columns(const at::Tensor& w, bool vnni) {
  return packed_weight(w, false, Layout::kBrgemmColumns, vnni, [&] {
    const int64_t G = w.size(0), P = w.size(1);
    const int64_t blocks = (P + kBrgemmCols - 1) / kBrgemmCols;
    const at::Tensor rows = row_major(w);
    const size_t element = w.element_size();
    // [block][n][64]
    at::Tensor tiles = at::empty({blocks, G, kBrgemmCols}, w.options());
    at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t cols = std::min(kBrgemmCols, P - c * kBrgemmCols);
        for (int64_t n = 0; n < G; ++n) {
          char* dst = static_cast<char*>(tiles.data_ptr()) + (c * G + n) * kBrgemmCols * element;
          std::memcpy(dst, static_cast<const char*>(rows.data_ptr()) +
                               (n * rows.stride(0) + c * kBrgemmCols) * element, cols * element);
          std::memset(dst + cols * element, 0, (kBrgemmCols - cols) * element);
        }
      }
    });
    if (!vnni) return tiles;
#if LSTM_FUSED_HAVE_BRGEMM
    at::Tensor out = at::empty_like(tiles);
    const int64_t tile = G * kBrgemmCols * w.element_size();
    for (int64_t c = 0; c < blocks; ++c) {
      at::native::cpublas::pack(G, kBrgemmCols, kBrgemmCols, kBrgemmCols, w.scalar_type(),
                                w.scalar_type(), static_cast<const char*>(tiles.data_ptr()) + c * tile,
                                static_cast<char*>(out.data_ptr()) + c * tile);
    }
    return out;
#else
    return tiles;
#endif
  });
}

// c[m, 64] (+)= a[m, Kp] tile[Kp, 64] with oneDNN's brgemm (float32 sums), a of the tile's dtype.
void brgemm_tile(at::ScalarType dtype, bool vnni, int64_t m, int64_t Kp, const void* a,
                 int64_t lda, const void* tile, float* c, bool add) {
#if LSTM_FUSED_HAVE_BRGEMM
  namespace blas = at::native::cpublas;
  if (dtype == at::kFloat) {
    blas::brgemm(m, kBrgemmCols, Kp, lda, kBrgemmCols, kBrgemmCols, add,
                 static_cast<const float*>(a), static_cast<const float*>(tile), c, vnni);
  } else if (dtype == at::kBFloat16) {
    blas::brgemm(m, kBrgemmCols, Kp, lda, kBrgemmCols, kBrgemmCols, add,
                 static_cast<const at::BFloat16*>(a), static_cast<const at::BFloat16*>(tile), c,
                 vnni);
  } else {
    blas::brgemm(m, kBrgemmCols, Kp, lda, kBrgemmCols, kBrgemmCols, add,
                 static_cast<const at::Half*>(a), static_cast<const at::Half*>(tile), c, vnni);
  }
#else
  (void)dtype, (void)vnni, (void)m, (void)Kp, (void)a, (void)lda, (void)tile, (void)c, (void)add;
  TORCH_CHECK(false, "lstm_fused: this PyTorch has no brgemm");
#endif
}

// out[r, q*H + u*16 + l] (+)= (a W^T)[r, ...] for rows r < rows and blocks [u0, u1), with oneDNN's
// brgemm on the tiles of brgemm_tiles. a: [rows, lda] of the weight's dtype, K used columns
// (Kp when vnni pads: the column K must then hold a zero). scratch: kBrgemmRows * 64 floats.
void brgemm_gates(const cpu::Kernels& kernels, at::ScalarType dtype, bool vnni, int64_t rows,
                  int64_t H, int64_t K, const void* a, int64_t lda, const at::Tensor& tiles,
                  float* out, int64_t ldo, int64_t u0, int64_t u1, bool accumulate,
                  float* scratch) {
#if LSTM_FUSED_HAVE_BRGEMM
  const int64_t Kp = padded_inner(K, vnni);
  const size_t element = at::elementSize(dtype);
  for (int64_t u = u0; u < u1; ++u) {
    const char* tile = static_cast<const char*>(tiles.data_ptr()) + u * Kp * kBrgemmCols * element;
    const int64_t unit0 = u * kBrgemmUnits, units = std::min(kBrgemmUnits, H - unit0);
    for (int64_t r0 = 0; r0 < rows; r0 += kBrgemmRows) {
      const int64_t m = std::min(kBrgemmRows, rows - r0);
      const char* a_rows = static_cast<const char*>(a) + r0 * lda * element;
      brgemm_tile(dtype, vnni, m, Kp, a_rows, lda, tile, scratch, false);
      kernels.gate_tile(scratch, m, H, unit0, units, out + r0 * ldo, ldo, accumulate);
    }
  }
#else
  (void)kernels, (void)dtype, (void)vnni, (void)rows, (void)H, (void)K, (void)a, (void)lda, (void)tiles,
      (void)out, (void)ldo, (void)u0, (void)u1, (void)accumulate, (void)scratch;
  TORCH_CHECK(false, "lstm_fused: this PyTorch has no brgemm");
#endif
}

void brgemm_release(bool vnni) {
#if LSTM_FUSED_HAVE_BRGEMM
  at::native::cpublas::brgemm_release(vnni);
#else
  (void)vnni;
#endif
}

// ---- Threads --------------------------------------------------------------------------------

// Items per task so that one task has about `work` multiply-adds or elementwise updates.
int64_t grain(int64_t work_per_item, int64_t work = 32768) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, work_per_item));
}

// Runs body(step, phase, begin, end) for every step and each of its phases, phase p covering
// items [0, phase_items[p]), then finish() on every thread that ran a part. With enough work per
// step, all steps run in one parallel region: each thread takes the same slice of each phase at
// every step (so its blocks of W_hh stay in its cache), with a barrier after each phase instead
// of a fork and join. Otherwise (small work: no fork at all) it runs on the calling thread.
template <typename F, typename Finish>
void run_steps(int64_t steps, const std::vector<int64_t>& phase_items, int64_t work_per_step,
               const F& body, const Finish& finish) {
#ifdef _OPENMP
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), work_per_step / 32768);
  if (tasks > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(tasks)
    {
      const int64_t threads = omp_get_num_threads();
      const int64_t thread = omp_get_thread_num();
      bool ran = false;
      for (int64_t step = 0; step < steps; ++step) {
        for (size_t phase = 0; phase < phase_items.size(); ++phase) {
          const int64_t items = phase_items[phase];
          const int64_t chunk = (items + threads - 1) / threads;
          const int64_t begin = std::min(items, thread * chunk);
          const int64_t end = std::min(items, begin + chunk);
          if (begin < end) {
            body(step, phase, begin, end);
            ran = true;
          }
#pragma omp barrier
        }
      }
      if (ran) finish();
    }
    return;
  }
#endif
  for (int64_t step = 0; step < steps; ++step) {
    for (size_t phase = 0; phase < phase_items.size(); ++phase) {
      body(step, phase, 0, phase_items[phase]);
    }
  }
  finish();
}

// ---- Forward --------------------------------------------------------------------------------

template <typename Acc>
struct ForwardPass {
  LstmSizes s;
  Plan plan;
  const cpu::Kernels* kernels;
  at::ScalarType dtype;
  bool training, reverse, has_proj;
  const int64_t* lengths;
  at::Tensor x, h0, w_ih, w_hh;  // x, h0 contiguous in x's dtype
  std::optional<at::Tensor> w_hr;
  at::Tensor y;                  // [T, B, P]
  at::Tensor gates;              // [T, B, 4H] of Acc, where a tensor is needed
  Acc* gates_data;               // gates, or [B, 4H] of scratch for a single inference step, or
                                 // the tiles of brgemm
  Acc* kept_gates;               // training: the activated gates [T, B, 4H] (gates), else null
  Acc* cells_data;               // [T, B, H] when training, else [2, B, H] used in turn
  int64_t input_chunk;           // input_chunk_steps: gates_data holds [input_chunk, B, 4H]
  at::Tensor c0;                 // [B, H] of Acc
  std::vector<Acc> bias;         // [4H]: b_ih + b_hh
};

template <typename Acc>
void run_forward(ForwardPass<Acc>& f) {
  const LstmSizes& s = f.s;
  const Plan& plan = f.plan;
  const int64_t T = s.seq_len, B = s.batch, I = s.input_size, H = s.hidden_size,
                P = s.output_size;
  const cpu::KernelSet<Acc>& ks = kernel_set<Acc>(*f.kernels);
  const bool convert = plan.operands == Operands::kConvert;
  const bool dot = plan.operands == Operands::kBf16Dot;
  const bool brgemm = plan.path == Path::kBrgemm;
  const bool vnni = brgemm && brgemm_packs(f.dtype);
  const auto acc_options = f.y.options().dtype(acc_scalar_type<Acc>());
  const int64_t G = 4 * H;
  const bool cache = !f.training;  // training calls pack afresh
  const bool input_vnni = LSTM_FUSED_HAVE_BRGEMM && is_half(f.dtype) && brgemm_packs(f.dtype);

  // The operands of the products: x and h in x's dtype, or float32 copies (convert).
  const at::Tensor x_operand = convert ? f.x.to(at::kFloat) : f.x;
  const at::Tensor h0_operand = convert ? f.h0.to(at::kFloat) : f.h0;
  // convert: h_t as float32 too, alternating between two buffers.
  at::Tensor h_acc = convert ? at::empty({2, B, P}, acc_options) : at::Tensor();

  // The input projection of all steps at once, unless the step kernel does it.
  const int64_t input_chunk = f.input_chunk;
  if (!plan.tiles && !plan.fuse_input && input_chunk == 0 && T * B > 0) {
    at::Tensor gates_2d = f.gates.view({-1, G});
    // oneDNN's brgemm: for every path where it packs for AMX, else on the brgemm path
    const bool brgemm_input = input_vnni || (!dot && brgemm && is_half(f.dtype));
    if (brgemm_input) {
      const at::Tensor tiles = brgemm_tiles(f.w_ih, cache, input_vnni);
      const int64_t Kp = padded_inner(I, input_vnni);
      const at::Tensor x_padded =
          Kp == I ? f.x : at::constant_pad_nd(f.x.view({T * B, I}), {0, Kp - I}).contiguous();
      const int64_t blocks = (H + kBrgemmUnits - 1) / kBrgemmUnits;
      at::parallel_for(0, blocks, grain(kBrgemmCols * I * T * B), [&](int64_t u0, int64_t u1) {
        std::vector<float> scratch(kBrgemmRows * kBrgemmCols);
        brgemm_gates(*f.kernels, f.dtype, input_vnni, T * B, H, I, x_padded.data_ptr(), Kp, tiles,
                     reinterpret_cast<float*>(gates_2d.data_ptr()), G, u0, u1, false,
                     scratch.data());
        brgemm_release(input_vnni);
      });
    } else if (dot) {
      const at::Tensor packed_ih = packed_bf16_gates(f.w_ih, cache, *f.kernels->bf16_dot);
      const cpu::GatesProduct<uint16_t, float> p{
          T * B, H, I, reinterpret_cast<const uint16_t*>(f.x.data_ptr()), I,
          reinterpret_cast<const uint16_t*>(packed_ih.data_ptr()),
          reinterpret_cast<float*>(gates_2d.data_ptr()), G, false};
      const int64_t blocks = (H + f.kernels->bf16_dot->lanes - 1) / f.kernels->bf16_dot->lanes;
      at::parallel_for(0, blocks, grain(4 * f.kernels->bf16_dot->lanes * I * T * B),
                       [&](int64_t u0, int64_t u1) { f.kernels->bf16_dot->gates_product(p, u0, u1); });
    } else if (convert) {
      at::mm_out(gates_2d, x_operand.view({T * B, I}), float_copy(f.w_ih, cache).t());
    } else {
      at::mm_out(gates_2d, f.x.view({T * B, I}), f.w_ih.t());
    }
  }

  // Packed weights, from the cache when unchanged.
  at::Tensor packed_hh, packed_ih, w_hh_gemm;
  int64_t lanes = ks.lanes;
  if (plan.path == Path::kFused) {
    if (dot) {
      lanes = f.kernels->bf16_dot->lanes;
      packed_hh = packed_bf16_gates(f.w_hh, cache, *f.kernels->bf16_dot);
      if (plan.fuse_input || input_chunk) {
        packed_ih = packed_bf16_gates(f.w_ih, cache, *f.kernels->bf16_dot);
      }
    } else {
      packed_hh = packed_gates<Acc>(f.w_hh, cache, ks);
      if (plan.fuse_input || input_chunk) packed_ih = packed_gates<Acc>(f.w_ih, cache, ks);
    }
  } else if (brgemm) {
    lanes = kBrgemmUnits;
    packed_hh = brgemm_tiles(f.w_hh, cache, vnni);
    if (plan.tiles) packed_ih = brgemm_tiles(f.w_ih, cache, vnni);
  } else {
    w_hh_gemm = convert ? float_copy(f.w_hh, cache).t() : f.w_hh.t();
  }
  const int64_t blocks = (H + lanes - 1) / lanes;
  const int64_t Pp = padded_inner(P, vnni);
  const bool pad_h = brgemm && Pp != P;  // oneDNN's VNNI layout needs an even K
  // The biases in the tiles' layout [block][gate][16].
  std::vector<Acc> bias_tiles(plan.tiles ? blocks * kBrgemmCols : 0, Acc(0));
  for (int64_t u = 0; plan.tiles && u < blocks; ++u) {
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t l = 0; l < kBrgemmUnits && u * kBrgemmUnits + l < H; ++l) {
        bias_tiles[u * kBrgemmCols + q * kBrgemmUnits + l] = f.bias[q * H + u * kBrgemmUnits + l];
      }
    }
  }

  at::Tensor hidden = f.has_proj ? at::empty({B, H}, f.y.options()) : at::Tensor();
  const at::Tensor w_hr_t = f.has_proj ? f.w_hr->t() : at::Tensor();
  const int64_t out_stride = f.has_proj ? H : P;

  Acc* const gates_data = f.gates_data;
  Acc* const cells_data = f.cells_data;
  const Acc* const c0_data = f.c0.template data_ptr<Acc>();
  const size_t element = f.y.element_size();
  char* const y_data = static_cast<char*>(f.y.data_ptr());
  const char* const h0_data = static_cast<const char*>(f.h0.data_ptr());
  Acc* const h_acc_data = convert ? h_acc.template data_ptr<Acc>() : nullptr;
  const Acc* const h0_acc_data = convert ? h0_operand.template data_ptr<Acc>() : nullptr;

  // The brgemm forward keeps the pre-activations of `chunk` steps as tiles [block][chunk][B][64],
  // the chunked fused forward as [chunk][B][4H]. The steps n0 = n - n % chunk, ... take the times
  // [t0, t0 + steps) (in reverse when reverse).
  const int64_t chunk = plan.tiles ? tile_chunk_steps(s) : std::max<int64_t>(1, input_chunk);
  auto chunk_times = [&](int64_t n, int64_t& t0, int64_t& steps) {
    const int64_t n0 = n - n % chunk;
    steps = std::min(chunk, T - n0);
    t0 = f.reverse ? T - n0 - steps : n0;
  };
  struct Step {
    ForwardStepOrder order;
    Acc* gates;            // [B, 4H]
    const void* h_prev;    // h_{t-1} in x's dtype
    const Acc* h_prev_acc; // convert: h_{t-1} as float32
    Acc* h_acc;            // convert: h_t as float32, written
    cpu::ForwardUpdate<Acc> update;
  };
  auto step_at = [&](int64_t n) {
    Step st;
    st.order = forward_step_order(n, T, f.reverse, f.training);
    const ForwardStepOrder& o = st.order;
    int64_t t0 = 0, steps = 0;
    if (input_chunk) chunk_times(n, t0, steps);
    st.gates = gates_data + (plan.fuse_input ? 0 : o.t - t0) * B * G;
    st.h_prev = o.first ? static_cast<const void*>(h0_data)
                        : static_cast<const void*>(y_data + o.t_prev * B * P * element);
    st.h_prev_acc = convert ? (o.first ? h0_acc_data : h_acc_data + ((n + 1) % 2) * B * P)
                            : nullptr;
    st.h_acc = convert ? h_acc_data + (n % 2) * B * P : nullptr;
    cpu::ForwardUpdate<Acc>& u = st.update;
    u.hidden = H;
    u.gates = st.gates;
    u.keep_gates = f.training;
    u.bias = f.bias.data();
    u.c_prev = o.first ? c0_data : cells_data + o.slot_prev * B * H;
    u.c_next = cells_data + o.slot * B * H;
    u.hidden_out = f.has_proj ? hidden.data_ptr() : y_data + o.t * B * P * element;
    u.hidden_out_stride = out_stride;
    u.hidden_dtype = kernel_dtype(f.dtype);
    u.hidden_acc = f.has_proj ? nullptr : st.h_acc;
    u.hidden_acc_stride = P;
    u.lengths = f.lengths;
    u.t = o.t;
    u.h_prev = f.has_proj ? nullptr : st.h_prev;
    u.h_prev_acc = f.has_proj ? nullptr : st.h_prev_acc;
    return st;
  };

  // The products of one step for unit blocks [u0, u1): the input part (a single step), then the
  // recurrent part. scratch: brgemm's output tile and padded h_{t-1}.
  auto products = [&](const Step& st, int64_t u0, int64_t u1, std::vector<float>& scratch) {
    if (dot) {
      const auto* k = f.kernels->bf16_dot;
      if (plan.fuse_input) {
        k->gates_product({B, H, I, reinterpret_cast<const uint16_t*>(f.x.data_ptr()), I,
                          reinterpret_cast<const uint16_t*>(packed_ih.data_ptr()),
                          reinterpret_cast<float*>(st.gates), G, false}, u0, u1);
      }
      k->gates_product({B, H, P, static_cast<const uint16_t*>(st.h_prev), P,
                        reinterpret_cast<const uint16_t*>(packed_hh.data_ptr()),
                        reinterpret_cast<float*>(st.gates), G, true}, u0, u1);
    } else if (brgemm) {
      const void* a = st.h_prev;
      if (pad_h) {  // h_{t-1} with a zero column
        auto* padded = reinterpret_cast<uint16_t*>(scratch.data() + kBrgemmRows * kBrgemmCols);
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(padded + b * Pp, static_cast<const char*>(a) + b * P * element, P * element);
          padded[b * Pp + P] = 0;
        }
        a = padded;
      }
      brgemm_gates(*f.kernels, f.dtype, vnni, B, H, P, a, Pp, packed_hh, reinterpret_cast<float*>(st.gates),
                   G, u0, u1, true, scratch.data());
    } else {
      const Acc* x_rows = x_operand.template data_ptr<Acc>();
      if (plan.fuse_input) {
        ks.gates_product({B, H, I, x_rows, I, packed_ih.template data_ptr<Acc>(), st.gates, G,
                          false}, u0, u1);
      }
      const Acc* h_rows = convert ? st.h_prev_acc : static_cast<const Acc*>(st.h_prev);
      ks.gates_product({B, H, P, h_rows, P, packed_hh.template data_ptr<Acc>(), st.gates, G,
                        true}, u0, u1);
    }
  };
  // The chunked fused forward: x_t W_ih^T of the chunk that starts at step n, blocks [u0, u1).
  auto project_inputs = [&](int64_t n, int64_t u0, int64_t u1) {
    int64_t t0, steps;
    chunk_times(n, t0, steps);
    if (dot) {
      f.kernels->bf16_dot->gates_product(
          {steps * B, H, I, reinterpret_cast<const uint16_t*>(f.x.data_ptr()) + t0 * B * I, I,
           reinterpret_cast<const uint16_t*>(packed_ih.data_ptr()),
           reinterpret_cast<float*>(gates_data), G, false}, u0, u1);
    } else {
      ks.gates_product({steps * B, H, I, x_operand.template data_ptr<Acc>() + t0 * B * I, I,
                        packed_ih.template data_ptr<Acc>(), gates_data, G, false}, u0, u1);
    }
  };
  auto update_rows = [&](const Step& st, int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < B; ++b) ks.forward_update(st.update, b, j0, j1);
  };
  const int64_t Ip = padded_inner(I, vnni);
  const at::Tensor x_tiles =
      !plan.tiles || Ip == I ? f.x
                             : at::constant_pad_nd(f.x.view({T * B, I}), {0, Ip - I}).contiguous();
  const size_t weight_element = at::elementSize(f.dtype);
  // x_t W_ih^T of the chunk that starts at step n, blocks [u0, u1), into its tiles.
  auto project_chunk = [&](int64_t n, int64_t u0, int64_t u1) {
    int64_t t0, steps;
    chunk_times(n, t0, steps);
    const int64_t rows = steps * B;
    for (int64_t u = u0; u < u1; ++u) {
      float* const out = reinterpret_cast<float*>(gates_data) + u * chunk * B * kBrgemmCols;
      if (Ip == 0) {
        std::fill(out, out + rows * kBrgemmCols, 0.0f);
        continue;
      }
      const char* tile = static_cast<const char*>(packed_ih.data_ptr()) +
                         u * Ip * kBrgemmCols * weight_element;
      const char* x_rows =
          static_cast<const char*>(x_tiles.data_ptr()) + t0 * B * Ip * weight_element;
      for (int64_t r0 = 0; r0 < rows; r0 += kBrgemmRows) {
        brgemm_tile(f.dtype, vnni, std::min(kBrgemmRows, rows - r0), Ip,
                    x_rows + r0 * Ip * weight_element, Ip, tile, out + r0 * kBrgemmCols, false);
      }
    }
  };
  // The brgemm forward, blocks [u0, u1) of step n: its input part projected with its chunk's, then
  // h_{t-1} W_hh^T added into its tiles, then the update of each row straight from them.
  auto tile_step = [&](int64_t n, const Step& st, int64_t u0, int64_t u1,
                       std::vector<float>& scratch) {
    if (n % chunk == 0) project_chunk(n, u0, u1);  // the thread's own blocks: no barrier needed
    int64_t t0, steps;
    chunk_times(n, t0, steps);
    const void* h = st.h_prev;
    if (pad_h) {  // h_{t-1} with a zero column
      auto* padded = reinterpret_cast<uint16_t*>(scratch.data() + kBrgemmRows * kBrgemmCols);
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(padded + b * Pp, static_cast<const char*>(h) + b * P * element, P * element);
        padded[b * Pp + P] = 0;
      }
      h = padded;
    }
    for (int64_t u = u0; u < u1; ++u) {
      const char* hh = static_cast<const char*>(packed_hh.data_ptr()) +
                       u * Pp * kBrgemmCols * weight_element;
      float* const tiles = reinterpret_cast<float*>(gates_data) +
                           (u * chunk + st.order.t - t0) * B * kBrgemmCols;
      const int64_t unit0 = u * kBrgemmUnits, units = std::min(kBrgemmUnits, H - unit0);
      for (int64_t r0 = 0; r0 < B; r0 += kBrgemmRows) {
        const int64_t m = std::min(kBrgemmRows, B - r0);
        float* const tile_out = tiles + r0 * kBrgemmCols;
        brgemm_tile(f.dtype, vnni, m, Pp, static_cast<const char*>(h) + r0 * Pp * element, Pp,
                    hh, tile_out, true);
        cpu::TileUpdate update;
        update.tile = tile_out;
        update.rows = m;
        update.row0 = r0;
        update.hidden = H;
        update.unit0 = unit0;
        update.units = units;
        update.bias = reinterpret_cast<const float*>(bias_tiles.data() + u * kBrgemmCols);
        update.c_prev = reinterpret_cast<const float*>(st.update.c_prev);
        update.c_next = reinterpret_cast<float*>(st.update.c_next);
        update.hidden_out = st.update.hidden_out;
        update.hidden_out_stride = st.update.hidden_out_stride;
        update.hidden_dtype = st.update.hidden_dtype;
        update.kept_gates = f.kept_gates ? reinterpret_cast<float*>(f.kept_gates) +
                                               st.order.t * B * G
                                         : nullptr;
        update.lengths = st.update.lengths;
        update.t = st.update.t;
        update.h_prev = st.update.h_prev;
        f.kernels->tile_update(update);
      }
    }
  };
  auto scratch_size = [&] {
    return brgemm ? kBrgemmRows * kBrgemmCols + (pad_h ? (B * Pp + 1) / 2 + 1 : 0) : 0;
  };
  const int64_t work = 4 * H * (P + (plan.fuse_input ? I : 0)) * B;

  if (plan.path != Path::kGemm && !f.has_proj) {  // the whole sequence in one parallel region
    run_steps(
        T, {blocks}, work,
        [&](int64_t n, size_t, int64_t u0, int64_t u1) {
          thread_local std::vector<float> scratch;
          if (brgemm && static_cast<int64_t>(scratch.size()) < scratch_size()) {
            scratch.resize(scratch_size());
          }
          const Step st = step_at(n);
          if (plan.tiles) {
            tile_step(n, st, u0, u1, scratch);
            return;
          }
          // each thread projects its own blocks: no barrier needed
          if (input_chunk && n % chunk == 0) project_inputs(n, u0, u1);
          products(st, u0, u1, scratch);
          update_rows(st, u0 * lanes, std::min(H, u1 * lanes));
        },
        [&] {
          if (brgemm) brgemm_release(vnni);
        });
    return;
  }
  std::vector<float> serial_scratch;
  for (int64_t n = 0; n < T; ++n) {
    const Step st = step_at(n);
    if (plan.path == Path::kGemm) {
      at::Tensor gates_t = f.gates.select(0, plan.fuse_input ? 0 : st.order.t);
      const at::Tensor h_prev =
          convert ? (st.order.first ? h0_operand : h_acc.select(0, (n + 1) % 2))
                  : (st.order.first ? f.h0 : f.y.select(0, st.order.t_prev));
      gates_t.addmm_(h_prev, w_hh_gemm);
      at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) ks.forward_update(st.update, b, 0, H);
      });
    } else {
      at::parallel_for(0, blocks, grain(4 * lanes * (P + I) * B), [&](int64_t u0, int64_t u1) {
        thread_local std::vector<float> scratch;
        if (brgemm && static_cast<int64_t>(scratch.size()) < scratch_size()) {
          scratch.resize(scratch_size());
        }
        products(st, u0, u1, scratch);
        update_rows(st, u0 * lanes, std::min(H, u1 * lanes));
        if (brgemm) brgemm_release(vnni);
      });
    }
    if (f.has_proj) {
      at::Tensor y_t = f.y.select(0, st.order.t);
      at::mm_out(y_t, hidden, w_hr_t);
      for (int64_t b = 0; f.lengths && b < B; ++b) {
        if (st.order.t >= f.lengths[b]) {
          std::memcpy(y_data + (st.order.t * B + b) * P * element,
                      static_cast<const char*>(st.h_prev) + b * P * element, P * element);
        }
      }
      if (convert) h_acc.select(0, n % 2).copy_(y_t);
    }
  }
}

void check_cpu_dtype(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || is_half(dtype),
              "lstm_fused: the CPU kernels support float32, float64, float16 and bfloat16, got ",
              dtype);
}

// Buffers that a call needs only while it runs, kept per thread between calls (up to a size) so
// that small calls allocate nothing.
template <typename Acc>
struct Scratch {
  static constexpr int64_t kMaxKept = kScratchKept;
  std::vector<Acc> kept[2];
  // Buffer `which` of at least size elements, or nullptr if that is more than is kept.
  Acc* get(int which, int64_t size) {
    if (size > kMaxKept) return nullptr;
    if (static_cast<int64_t>(kept[which].size()) < size) kept[which].resize(size);
    return kept[which].data();
  }
};

template <typename Acc>
Scratch<Acc>& thread_scratch() {
  thread_local Scratch<Acc> scratch;
  return scratch;
}

// t (contiguous, x's dtype) = values of Acc.
template <typename Acc>
void store_as(at::Tensor& t, const Acc* values) {
  const int64_t n = t.numel();
  switch (t.scalar_type()) {
    case at::kBFloat16: {
      auto* out = t.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(values[i]);
      break;
    }
    case at::kHalf: {
      auto* out = t.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(values[i]);
      break;
    }
    default:
      std::memcpy(t.data_ptr(), values, n * sizeof(Acc));
  }
}

// A CPU tensor allocated as ATen's own CPU kernels allocate their outputs, without a trip through
// the dispatcher: a single step allocates five, and at::empty's dispatch cost twice the
// allocation (callgrind, T = B = H = 1).
at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// t contiguous in dtype; no dispatcher call where it is already (Tensor::to always makes one).
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t.contiguous() : t.to(dtype).contiguous();
}

template <typename Acc>
std::vector<Acc> summed_bias(int64_t G, const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh) {
  std::vector<Acc> bias(G, Acc(0));
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!b->has_value()) continue;
    const at::Tensor values = contiguous_as(**b, acc_scalar_type<Acc>());
    const Acc* v = values.data_ptr<Acc>();
    for (int64_t n = 0; n < G; ++n) bias[n] += v[n];
  }
  return bias;
}

ForwardResult forward_cpu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh,
                          const std::optional<at::Tensor>& w_hr,
                          const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LstmSizes s = check_forward_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_cpu_dtype(x);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const at::ScalarType dtype = x.scalar_type();
  const Plan plan = choose_plan(s, dtype, training, false, w_hr.has_value());
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();

  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    const auto acc_options = x.options().dtype(acc_scalar_type<Acc>());
    ForwardPass<Acc> f;
    f.s = s;
    f.plan = plan;
    f.kernels = cpu::kernels_for(plan.isa);
    f.dtype = dtype;
    f.training = training;
    f.reverse = reverse;
    f.input_chunk = input_chunk_steps(s, plan, dtype, training, w_hr.has_value());
    f.has_proj = w_hr.has_value();
    f.lengths = lengths.has_value() ? lengths_c.data_ptr<int64_t>() : nullptr;
    f.x = x.contiguous();
    f.h0 = h0.contiguous();
    f.w_ih = w_ih;
    f.w_hh = w_hh;
    f.w_hr = w_hr;
    f.y = empty_cpu({T, B, P}, dtype);
    // Training keeps every step's gates and cell state for backward; inference alternates
    // between two cell-state buffers, and a single inference step keeps its gates in scratch.
    at::Tensor gates, cells;
    Scratch<Acc>& scratch = thread_scratch<Acc>();
    f.cells_data = training ? nullptr : scratch.get(0, 2 * B * H);
    if (!f.cells_data) {
      cells = at::empty({training ? T : 2, B, H}, acc_options);
      f.cells_data = cells.template data_ptr<Acc>();
    }
    at::Tensor tiles;
    f.gates_data = nullptr;
    if (plan.tiles) {  // [block][chunk][B][64]
      const int64_t size = (H + kBrgemmUnits - 1) / kBrgemmUnits * tile_chunk_steps(s) * B *
                           kBrgemmCols;
      f.gates_data = scratch.get(1, size);
      if (!f.gates_data) {
        tiles = at::empty({size}, acc_options);
        f.gates_data = tiles.template data_ptr<Acc>();
      }
    } else if (!training && plan.fuse_input) {
      f.gates_data = scratch.get(1, B * 4 * H);
    } else if (f.input_chunk > 0) {
      f.gates_data = scratch.get(1, f.input_chunk * B * 4 * H);
      if (!f.gates_data) {
        gates = at::empty({f.input_chunk, B, 4 * H}, acc_options);
        f.gates_data = gates.template data_ptr<Acc>();
      }
    }
    f.kept_gates = nullptr;
    if (training || !f.gates_data) {
      gates = at::empty({T, B, 4 * H}, acc_options);
      if (training) f.kept_gates = gates.template data_ptr<Acc>();
      if (!f.gates_data) f.gates_data = gates.template data_ptr<Acc>();
    }
    f.gates = gates;
    f.c0 = contiguous_as(c0, acc_scalar_type<Acc>());
    f.bias = summed_bias<Acc>(4 * H, b_ih, b_hh);
    run_forward<Acc>(f);

    // h_n and c_n: the state after the last step processed (the initial state for T = 0).
    at::Tensor h_n = empty_cpu({B, P}, dtype), c_n = empty_cpu({B, H}, dtype);
    if (T == 0) {
      h_n.copy_(h0);
      c_n.copy_(c0);
    } else {
      const int64_t last = last_step_time(T, reverse);
      std::memcpy(h_n.data_ptr(), static_cast<const char*>(f.y.data_ptr()) +
                                      last * B * P * f.y.element_size(), h_n.nbytes());
      const Acc* c_last = f.cells_data + (training ? last : (T - 1) % 2) * B * H;
      store_as(c_n, c_last);
    }
    if (!training) {
      gates = empty_cpu({0}, dtype);
      cells = empty_cpu({0}, dtype);
    }
    return ForwardResult{f.y, h_n, c_n, gates, cells};
  };
  return dtype == at::kDouble ? run(double()) : run(float());
}

// ---- Backward -------------------------------------------------------------------------------

// Whether the backward's pass back in time splits the batch between threads, each running
// every step for its own rows, rather than each step's units, then its columns (two barriers a
// step, and each thread's products read the gate gradients of every unit, half of them written
// by the other core). The batch split has each thread read all of W_hh at every step: it wins
// while W_hh stays in each core's L2, even at one row a thread. In-process A/B of a training
// call on a 2-core AVX-512 Xeon (2 MB L2 a core), float32 / bfloat16: (64, 16, 128, 128)
// 1.09x / 1.13x, (32, 35, 256, 256) 1.04x / 1.17x, (16, 16, 128, 128) 1.07x / 1.22x,
// (2, 64, 128, 128) 1.11x / 1.09x, (4, 128, 128, 256) 1.03x / 1.03x; where W_hh outgrows it,
// (64, 64, 512, 512) 0.98x / 1.01x, (32, 35, 512, 512) 0.98x / 1.00x. The per-element and
// per-row arithmetic is the same either way: so are the results, to the bit.
bool backward_by_rows(const LstmSizes& s, int64_t packed_w_hh_bytes) {
  static const int64_t l2_bytes = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? int64_t(bytes) : int64_t(512) << 10;
  }();
  const int64_t threads = at::get_num_threads();
  return threads > 1 && s.batch >= threads && 2 * packed_w_hh_bytes <= l2_bytes;
}

template <typename Acc>
void backward_steps(const LstmSizes& s, const Plan& plan, const cpu::Kernels& kernels,
                    const at::Tensor& grad_y, at::Tensor& grad_h, at::Tensor& grad_c,
                    const at::Tensor& c0, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                    const at::Tensor& cells, const int64_t* lengths, bool reverse,
                    at::Tensor& grad_gates, at::Tensor& grad_gates_half, at::Tensor& grad_proj_out,
                    at::Tensor& hidden_all) {
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const cpu::KernelSet<Acc>& ks = kernel_set<Acc>(kernels);
  const bool has_proj = w_hr.has_value();
  const bool fused = plan.path != Path::kGemm;
  const bool brgemm = plan.path == Path::kBrgemm;
  TORCH_INTERNAL_ASSERT(!brgemm || sizeof(Acc) == sizeof(float), "brgemm has no float64");
  const at::ScalarType dtype = w_hh.scalar_type();
  const bool vnni = brgemm && brgemm_packs(dtype);
  // Half types: each step's gate gradients in float32 in grad_gates [1, B, 4H], rounded into
  // grad_gates_half [T, B, 4H], the operand of the products that follow.
  const bool half = grad_gates_half.defined();
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, grad_h.options()) : at::Tensor();
  const at::Tensor w_packed =
      brgemm ? brgemm_columns(w_hh, vnni)
             : (fused ? packed_columns<Acc>(w_hh, false, ks) : at::Tensor());
  const at::Tensor w_hh_acc =
      fused ? at::Tensor() : (is_half(w_hh.scalar_type()) ? float_copy(w_hh, false) : w_hh);
  const at::Tensor w_hr_acc = has_proj ? w_hr->to(acc_scalar_type<Acc>()) : at::Tensor();
  // dL/dh and dL/dc alternate between two buffers, step by step; grad_h and grad_c hold the
  // incoming gradients now and the outgoing ones at the end.
  at::Tensor grad_h_other = at::empty_like(grad_h), grad_c_other = at::empty_like(grad_c);
  Acc* const grad_h_buffers[2] = {grad_h.data_ptr<Acc>(), grad_h_other.data_ptr<Acc>()};
  Acc* const grad_c_buffers[2] = {grad_c.data_ptr<Acc>(), grad_c_other.data_ptr<Acc>()};
  const Acc* const grad_y_data = grad_y.data_ptr<Acc>();
  const Acc* const gates_data = gates.data_ptr<Acc>();
  const Acc* const cells_data = cells.data_ptr<Acc>();
  const Acc* const c0_data = c0.data_ptr<Acc>();
  Acc* const grad_gates_data = grad_gates.data_ptr<Acc>();
  char* const grad_gates_half_data =
      half ? static_cast<char*>(grad_gates_half.data_ptr()) : nullptr;
  const size_t half_element = half ? grad_gates_half.element_size() : 0;
  Acc* const hidden_data = has_proj ? hidden_all.data_ptr<Acc>() : nullptr;
  Acc* const grad_hidden_data = has_proj ? grad_hidden.data_ptr<Acc>() : nullptr;
  struct Step {
    BackwardStepOrder order;
    const Acc* grad_y;    // grad_y[t]
    const Acc* grad_h;    // dL/dh_t from step t_next
    Acc* grad_h_prev;     // dL/dh_{t-1}, written
    cpu::BackwardUpdate<Acc> update;
  };
  auto step_at = [&](int64_t n) {
    Step st;
    st.order = backward_step_order(n, T, reverse);
    const BackwardStepOrder& o = st.order;
    st.grad_y = grad_y_data + o.t * B * P;
    st.grad_h = grad_h_buffers[o.in];
    st.grad_h_prev = grad_h_buffers[o.out];
    cpu::BackwardUpdate<Acc>& u = st.update;
    u.hidden = H;
    u.gates = gates_data + o.t * B * 4 * H;
    u.cell = cells_data + o.t * B * H;
    u.c_prev = o.from_initial ? c0_data : cells_data + o.t_prev * B * H;
    // dL/d(o tanh c_t) is grad_y[t] + dL/dh_t from step t_next, added in the pass; with a
    // projection it is grad_hidden, computed by a GEMM before.
    u.grad_hidden = has_proj ? grad_hidden_data : st.grad_y;
    u.grad_hidden_stride = has_proj ? H : P;
    u.grad_hidden_extra = has_proj ? nullptr : st.grad_h;
    u.grad_c_next = grad_c_buffers[o.in];
    u.grad_gates = grad_gates_data + (half ? 0 : o.t) * B * 4 * H;
    u.grad_c_prev = grad_c_buffers[o.out];
    u.hidden_out = has_proj ? hidden_data + o.t * B * H : nullptr;
    u.lengths = lengths;
    u.t = o.t;
    u.grad_gates_copy = half ? grad_gates_half_data + o.t * B * 4 * H * half_element : nullptr;
    u.copy_dtype = kernel_dtype(dtype);
    return st;
  };
  // Past the end of sequence b the state was carried: so is its gradient.
  auto carry = [&](const Step& st, int64_t b) {
    if (!lengths || st.order.t < lengths[b]) return;
    for (int64_t j = 0; j < P; ++j) {
      st.grad_h_prev[b * P + j] = st.grad_y[b * P + j] + st.grad_h[b * P + j];
    }
  };
  const int64_t L4 = brgemm ? kBrgemmCols : 4 * ks.lanes;
  const int64_t blocks = (P + L4 - 1) / L4;
  // dh_{t-1} = grad_gates_t W_hh for column blocks [c0_, c1_) and rows [r_lo, r_hi).
  auto hidden_grad = [&](const Step& st, int64_t c0_, int64_t c1_, int64_t r_lo, int64_t r_hi) {
    if (!brgemm) {
      ks.hidden_grad({r_hi - r_lo, 4 * H, P, st.update.grad_gates + r_lo * 4 * H,
                      w_packed.data_ptr<Acc>(), st.grad_h_prev + r_lo * P}, c0_, c1_);
      return;
    }
    thread_local std::vector<float> tile(kBrgemmRows * kBrgemmCols);
    const int64_t G = 4 * H;
    const size_t element = half ? half_element : sizeof(Acc);
    const char* a = half ? static_cast<const char*>(st.update.grad_gates_copy)
                         : reinterpret_cast<const char*>(st.update.grad_gates);
    for (int64_t c = c0_; c < c1_; ++c) {
      const char* w = static_cast<const char*>(w_packed.data_ptr()) +
                      c * G * kBrgemmCols * w_packed.element_size();
      const int64_t col0 = c * kBrgemmCols, cols = std::min(kBrgemmCols, P - col0);
      for (int64_t r0 = r_lo; r0 < r_hi; r0 += kBrgemmRows) {
        const int64_t m = std::min(kBrgemmRows, r_hi - r0);
        brgemm_tile(half ? dtype : at::kFloat, vnni, m, G, a + r0 * G * element, G, w,
                    tile.data(), false);
        for (int64_t r = 0; r < m; ++r) {
          std::memcpy(st.grad_h_prev + (r0 + r) * P + col0, tile.data() + r * kBrgemmCols,
                      sizeof(float) * cols);
        }
      }
    }
  };
  const auto release = [&] {
    if (brgemm) brgemm_release(vnni);
  };
  if (fused && !has_proj && backward_by_rows(s, w_packed.nbytes())) {
    // One parallel region; each thread runs every step for its own rows: nothing crosses
    // between cores, no barrier.
    run_steps(
        1, {B}, 4 * H * P * B,
        [&](int64_t, size_t, int64_t lo, int64_t hi) {
          for (int64_t n = 0; n < T; ++n) {
            const Step st = step_at(n);
            for (int64_t b = lo; b < hi; ++b) ks.backward_update(st.update, b, 0, H);
            hidden_grad(st, 0, blocks, lo, hi);
            for (int64_t b = lo; b < hi; ++b) carry(st, b);
          }
        },
        release);
  } else if (fused && !has_proj) {  // one parallel region, each step split by units, then columns
    std::vector<int64_t> phases = {H, blocks};  // gate gradients by unit, dh_{t-1} by column
    if (lengths) phases.push_back(B);           // carried rows
    run_steps(
        T, phases, 4 * H * P * B,
        [&](int64_t n, size_t phase, int64_t lo, int64_t hi) {
          const Step st = step_at(n);
          if (phase == 0) {
            for (int64_t b = 0; b < B; ++b) ks.backward_update(st.update, b, lo, hi);
          } else if (phase == 1) {
            hidden_grad(st, lo, hi, 0, B);
          } else {
            for (int64_t b = lo; b < hi; ++b) carry(st, b);
          }
        },
        release);
  } else {
    for (int64_t n = 0; n < T; ++n) {
      const Step st = step_at(n);
      if (has_proj) {
        at::Tensor grad_h_total = grad_proj_out.select(0, st.order.t);
        at::add_out(grad_h_total, grad_y.select(0, st.order.t), st.order.in ? grad_h_other : grad_h);
        at::mm_out(grad_hidden, grad_h_total, w_hr_acc);
      }
      if (fused) {
        at::parallel_for(0, H, grain(4 * B), [&](int64_t j0, int64_t j1) {
          for (int64_t b = 0; b < B; ++b) ks.backward_update(st.update, b, j0, j1);
        });
        at::parallel_for(0, blocks, grain(4 * H * L4 * B), [&](int64_t first, int64_t last) {
          hidden_grad(st, first, last, 0, B);
          if (brgemm) brgemm_release(vnni);
        });
      } else {
        at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) ks.backward_update(st.update, b, 0, H);
        });
        at::Tensor grad_h_prev = st.order.out ? grad_h_other : grad_h;
        at::mm_out(grad_h_prev, grad_gates.select(0, half ? 0 : st.order.t), w_hh_acc);
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
  check_cpu_dtype(x);
  const int64_t T = s.seq_len, B = s.batch, H = s.hidden_size, P = s.output_size;
  const at::ScalarType dtype = x.scalar_type();
  const Plan plan = choose_plan(s, dtype, true, true, w_hr.has_value());
  const bool has_proj = w_hr.has_value();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = x.options().dtype(acc_type);

  // Half types keep only each step's gate gradients in float32 (see backward_steps).
  at::Tensor grad_gates = at::empty({is_half(dtype) ? 1 : T, B, 4 * H}, acc_options);
  at::Tensor grad_gates_half = is_half(dtype) ? at::empty({T, B, 4 * H}, x.options()) : at::Tensor();
  at::Tensor grad_proj_out = has_proj ? at::empty({T, B, P}, acc_options) : at::Tensor();
  at::Tensor hidden_all = has_proj ? at::empty({T, B, H}, acc_options) : at::Tensor();
  at::Tensor grad_h = grad_h_n.to(acc_options, false, true).contiguous();
  at::Tensor grad_c = grad_c_n.to(acc_options, false, true).contiguous();
  const at::Tensor lengths_c = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const int64_t* lengths_data = lengths.has_value() ? lengths_c.data_ptr<int64_t>() : nullptr;
  const cpu::Kernels& kernels = *cpu::kernels_for(plan.isa);

  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    backward_steps<Acc>(s, plan, kernels, grad_y.to(acc_options).contiguous(), grad_h, grad_c,
                        c0.to(acc_options).contiguous(), w_hh, w_hr,
                        gates.contiguous(), cells.contiguous(), lengths_data, reverse,
                        grad_gates, grad_gates_half, grad_proj_out, hidden_all);
  };
  if (T > 0 && B > 0) {
    if (acc_type == at::kDouble) {
      run(double());
    } else {
      run(float());
    }
  }
  if (!is_half(dtype)) {
    return gradients_over_steps(s, grad_gates, x, h0, w_ih, y, grad_proj_out, hidden_all, grad_h,
                                grad_c, reverse, has_bias);
  }
  // The GEMMs over all steps in the half type (float32 sums inside), as nn.LSTM's.
  return gradients_over_steps(s, grad_gates_half, x, h0, w_ih, y,
                              has_proj ? grad_proj_out.to(dtype) : at::Tensor(),
                              has_proj ? hidden_all.to(dtype) : at::Tensor(), grad_h.to(dtype),
                              grad_c.to(dtype), reverse, has_bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // Helpers of lstm_fused.available_paths / available_isas and of the tests.
  m.def("_cpu_isas() -> str[]", &cpu_isas);
  m.def("_cpu_paths() -> str[]", &cpu_paths);
  m.def("_cpu_weight_cache(bool clear) -> int[]", &weight_cache_info);
  m.def("_cpu_brgemm_packs(ScalarType dtype) -> bool", &brgemm_packs);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace lstm_fused
