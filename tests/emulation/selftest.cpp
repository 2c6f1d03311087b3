// Self-test of cuda_emulation.h. Returns 0 when every check passes; prints each failure otherwise.
// With an argument it runs one misuse that must abort (see main): "divergent" (a divergent
// barrier), "misaligned", "misaligned-store", "bad-ldm", "bad-ldm-float", "partial-warp" (wmma
// preconditions), "copy-*" (asynchronous copies), "grid-barrier-missed" (a block returns
// without reaching a grid barrier the others wait at), "grid-barrier-extra" (one block waits at
// one grid barrier more than the others reach), "grid-barrier-mismatched" (threads of a block wait
// at a grid barrier and at __syncthreads() at once), "grid-barrier-divergent" (threads of a block
// return while others wait at a grid barrier), "grid-barrier-outside" (a grid barrier in an
// ordinary launch), "grid-static-shared" (a static __shared__ variable in a cooperative launch of
// several blocks); and, in a build with -fsanitize=address,undefined, "shared-out-of-bounds",
// "global-out-of-bounds", "misaligned-vector" and "dynamic-shared-out-of-bounds" (past a block's
// dynamic shared memory in a cooperative launch), which only the sanitizers catch.
#include "cuda_emulation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

int failures = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++failures;                                                          \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
      std::printf(__VA_ARGS__);                                            \
      std::printf("\n");                                                   \
    }                                                                      \
  } while (0)

constexpr unsigned kBlockX = 32, kBlockY = 8, kThreads = kBlockX * kBlockY, kBlocks = 7;

struct Seen {
  unsigned tx, ty, tz, bx, by, bz, dx, dy, dz, gx, gy, gz;
};

__device__ __forceinline__ float value_of(unsigned block, unsigned thread) {
  return static_cast<float>(block * 1000 + thread);
}

// 1. Shared-memory tree reduction with barriers; records what every thread saw.
__global__ void __launch_bounds__(256) block_sum(const float* __restrict__ scale,
                                                 float* __restrict__ sums, Seen* seen) {
  __shared__ float partial[kThreads];
  const unsigned t = threadIdx.x + threadIdx.y * blockDim.x;
  const unsigned b = blockIdx.x;
  seen[b * kThreads + t] = Seen{threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y,
                                blockIdx.z, blockDim.x, blockDim.y, blockDim.z, gridDim.x,
                                gridDim.y, gridDim.z};
  partial[t] = value_of(b, t) * scale[0];
  __syncthreads();
  for (unsigned stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) sums[b] = partial[0];
}

// 2. Threads loop a different number of times between barriers, but all reach each barrier.
__global__ void uneven(int* out, int rounds) {
  __shared__ int box[64];
  const unsigned t = threadIdx.x;
  int local = 0;
  for (int r = 0; r < rounds; ++r) {
    for (unsigned i = 0; i < (t * 7 + r) % 13; ++i) local += static_cast<int>(i);
    box[t] = local + r;
    __syncthreads();
    // Reads a neighbour's value, which is only correct if the barrier held.
    const int neighbour = box[(t + 1) % blockDim.x];
    __syncthreads();
    local += neighbour & 1;
  }
  out[blockIdx.x * blockDim.x + t] = local;
}

int uneven_expected(unsigned t, unsigned n, int rounds) {
  std::vector<int> local(n, 0);
  for (int r = 0; r < rounds; ++r) {
    std::vector<int> box(n);
    for (unsigned u = 0; u < n; ++u) {
      for (unsigned i = 0; i < (u * 7 + r) % 13; ++i) local[u] += static_cast<int>(i);
      box[u] = local[u] + r;
    }
    for (unsigned u = 0; u < n; ++u) local[u] += box[(u + 1) % n] & 1;
  }
  return local[t];
}

__global__ void nothing() {}

__global__ void barriers(int count, int* sink) {
  for (int i = 0; i < count; ++i) __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) ++sink[0];
}

// Stamps the order in which the threads of a block run between two barriers.
template <typename T>
__global__ void run_order(T* __restrict__ stamps) {
  __shared__ T tile[4][17];
  __shared__ T counter;
  const unsigned t = threadIdx.x + threadIdx.y * blockDim.x;
  if (t == 0) counter = 0;
  __syncthreads();
  tile[threadIdx.y][threadIdx.x] = counter++;
  __syncthreads();
  stamps[blockIdx.x * blockDim.x * blockDim.y + t] = tile[threadIdx.y][threadIdx.x];
}

// Some threads return before a barrier the others wait at.
__global__ void divergent(int* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// ---- wmma ----------------------------------------------------------------------------------
namespace wmma = nvcuda::wmma;

// Each block computes D = alpha * (A B + C) for its own 32 x 32 matrices (A: M x K, B: K x N, C and
// D: M x N, all row-major floats in global memory), staged through shared memory tiles with padded
// leading dimensions: A row-major, B row- or column-major (element (k, n) at b_tile[n * LDB + k]),
// C column-major, D row-major. Each of the 4 warps owns one 16 x 16 tile of D and walks K in
// steps of KF.
constexpr int kWmmaM = 32, kWmmaN = 32, kWmmaK = 32, kWmmaThreads = 128;

template <typename Elem, typename LayoutB, int KF>
__global__ void __launch_bounds__(kWmmaThreads)
    wmma_gemm(const float* __restrict__ a, const float* __restrict__ b,
              const float* __restrict__ c, float* __restrict__ d, float alpha) {
  using AFragment = wmma::fragment<wmma::matrix_a, 16, 16, KF, Elem, wmma::row_major>;
  using BFragment = wmma::fragment<wmma::matrix_b, 16, 16, KF, Elem, LayoutB>;
  using Storage = typename AFragment::storage_element_type;
  constexpr bool kColumnMajorB = std::is_same<LayoutB, wmma::col_major>::value;
  // Padded by 16 bytes: 40 for 16-bit elements, 36 for float.
  constexpr int LDA = kWmmaK + 16 / static_cast<int>(sizeof(Storage));
  constexpr int LDB = (kColumnMajorB ? kWmmaK : kWmmaN) + 16 / static_cast<int>(sizeof(Storage));
  constexpr int LDC = kWmmaM + 4, LDD = kWmmaN + 4;
  __shared__ __align__(32) Storage a_tile[kWmmaM * LDA];
  __shared__ __align__(32) Storage b_tile[(kColumnMajorB ? kWmmaN : kWmmaK) * LDB];
  __shared__ __align__(32) float c_tile[kWmmaN * LDC];
  __shared__ __align__(32) float d_tile[kWmmaM * LDD];

  const int tid = threadIdx.x, warp = tid / 32;
  const int block_offset = blockIdx.x * kWmmaM * kWmmaK;  // all matrices are 32 x 32
  for (int e = tid; e < kWmmaM * kWmmaK; e += kWmmaThreads) {
    const int row = e / 32, column = e % 32;
    a_tile[row * LDA + column] = static_cast<Storage>(a[block_offset + e]);
    if (kColumnMajorB)  // b row-major in global memory: (k, n) = (row, column)
      b_tile[column * LDB + row] = static_cast<Storage>(b[block_offset + e]);
    else
      b_tile[row * LDB + column] = static_cast<Storage>(b[block_offset + e]);
    c_tile[row + column * LDC] = c[block_offset + e];
  }
  __syncthreads();

  const int tile_m = warp / 2 * 16, tile_n = warp % 2 * 16;
  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc;
  wmma::load_matrix_sync(acc, c_tile + tile_m + tile_n * LDC, LDC, wmma::mem_col_major);
  for (int k0 = 0; k0 < kWmmaK; k0 += KF) {
    AFragment a_fragment;
    BFragment b_fragment;
    wmma::load_matrix_sync(a_fragment, a_tile + tile_m * LDA + k0, LDA);
    wmma::load_matrix_sync(b_fragment,
                           kColumnMajorB ? b_tile + tile_n * LDB + k0 : b_tile + k0 * LDB + tile_n,
                           LDB);
    wmma::mma_sync(acc, a_fragment, b_fragment, acc);
  }
  // The same function of every element: independent of the fragment's layout.
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= alpha;
  wmma::store_matrix_sync(d_tile + tile_m * LDD + tile_n, acc, LDD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kWmmaM * kWmmaN; e += kWmmaThreads)
    d[block_offset + e] = d_tile[e / 32 * LDD + e % 32];
}

// One warp: an accumulator loaded row-major and stored column-major (a transpose in memory), and
// fill_fragment followed by mma_sync with a filled a and b.
__global__ void wmma_layouts(const float* __restrict__ in, float* __restrict__ transposed,
                             float* __restrict__ filled) {
  constexpr int LD = 20;
  __shared__ __align__(32) float tile[16 * LD];
  __shared__ __align__(32) float out[16 * LD];
  for (int e = threadIdx.x; e < 256; e += 32) tile[e / 16 * LD + e % 16] = in[e];
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, tile, LD, wmma::mem_row_major);
  wmma::store_matrix_sync(out, acc, LD, wmma::mem_col_major);
  __syncthreads();
  // Column-major memory read as row-major: the transpose.
  for (int e = threadIdx.x; e < 256; e += 32) transposed[e] = out[e / 16 * LD + e % 16];
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
  wmma::fill_fragment(a, __float2bfloat16_rn(0.5f));
  wmma::fill_fragment(b, __float2bfloat16_rn(3.0f));
  wmma::fill_fragment(acc, 1.0f);
  wmma::mma_sync(acc, a, b, acc);  // 1 + 16 * 0.5 * 3 = 25 everywhere
  wmma::store_matrix_sync(out, acc, LD, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < 256; e += 32) filled[e] = out[e / 16 * LD + e % 16];
}

// Violations of wmma's preconditions, one per mode; each must abort.
enum class Misuse { kMisaligned, kMisalignedStore, kBadLdm, kBadLdmFloat, kPartialWarp };

__global__ void wmma_misuse(int mode) {
  __shared__ __align__(32) __half halves[16 * 48];
  __shared__ __align__(32) float floats[16 * 48];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  // A correct load first: only the bad call aborts.
  wmma::load_matrix_sync(a, halves, 40);
  switch (static_cast<Misuse>(mode)) {
    case Misuse::kMisaligned:  // 16 bytes past a 32-byte boundary
      wmma::load_matrix_sync(a, halves + 8, 40);
      break;
    case Misuse::kMisalignedStore:
      wmma::store_matrix_sync(floats + 4, acc, 20, wmma::mem_row_major);
      break;
    case Misuse::kBadLdm:  // 36 __half elements: a multiple of 16 bytes would be 40
      wmma::load_matrix_sync(a, halves, 36);
      break;
    case Misuse::kBadLdmFloat:
      wmma::load_matrix_sync(b, floats, 18);
      break;
    case Misuse::kPartialWarp:  // launched with 48 threads: threads 32..47 abort in fill_fragment
      break;
  }
  floats[threadIdx.x] = acc.x[0];
}

// ---- Cooperative launches -----------------------------------------------------------------
// Every block publishes a value, and after a grid barrier reads its neighbours': right only if the
// barrier held every block back until all had written. Repeated over rounds, each round's values
// depending on the last, in dynamic shared memory of its own per block.
constexpr unsigned kGridThreads = 64;

__global__ void grid_exchange(int* __restrict__ board, int* __restrict__ out, int rounds) {
  unsigned char* const shared = cuda_emulation::dynamic_shared_memory();
  int* const mine = reinterpret_cast<int*>(shared);  // kGridThreads ints of this block's own
  const unsigned b = blockIdx.x, blocks = gridDim.x, t = threadIdx.x;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  mine[t] = static_cast<int>(b * 100 + t);
  __syncthreads();
  for (int r = 0; r < rounds; ++r) {
    board[(r % 2) * blocks * kGridThreads + b * kGridThreads + t] = mine[t];
    grid.sync();
    const int left = board[(r % 2) * blocks * kGridThreads + ((b + blocks - 1) % blocks) * kGridThreads + t];
    const int right = board[(r % 2) * blocks * kGridThreads + ((b + 1) % blocks) * kGridThreads + (kGridThreads - 1 - t)];
    const int next = mine[(t + 1) % kGridThreads];
    __syncthreads();  // every thread of the block has read mine[] of the last round
    mine[t] = next + left - right + r;
    __syncthreads();
  }
  out[b * kGridThreads + t] = mine[t];
}

std::vector<int> grid_exchange_expected(unsigned blocks, int rounds) {
  std::vector<int> mine(blocks * kGridThreads);
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < kGridThreads; ++t) mine[b * kGridThreads + t] = static_cast<int>(b * 100 + t);
  for (int r = 0; r < rounds; ++r) {
    const std::vector<int> board = mine;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < kGridThreads; ++t) {
        const int left = board[((b + blocks - 1) % blocks) * kGridThreads + t];
        const int right = board[((b + 1) % blocks) * kGridThreads + (kGridThreads - 1 - t)];
        mine[b * kGridThreads + t] = board[b * kGridThreads + (t + 1) % kGridThreads] + left - right + r;
      }
  }
  return mine;
}

// Records the dynamic shared memory as the kernel finds it, and the order in which blocks run
// between grid barriers.
__global__ void grid_order(unsigned* __restrict__ first_word, unsigned* __restrict__ order,
                           unsigned* counter, int phases, int* aligned) {
  const unsigned* const shared = reinterpret_cast<const unsigned*>(cuda_emulation::dynamic_shared_memory());
  if (threadIdx.x == 0) first_word[blockIdx.x] = shared[0];
  if (threadIdx.x == 0) aligned[blockIdx.x] = reinterpret_cast<std::uintptr_t>(shared) % 128 == 0;
  for (int p = 0; p < phases; ++p) {
    if (threadIdx.x == 0) order[p * gridDim.x + blockIdx.x] = (*counter)++;
    cooperative_groups::this_grid().sync();
  }
}

// Misuses of the grid barrier, one per mode; each must abort.
enum class GridMisuse { kMissed, kExtra, kMismatched, kDivergent, kStaticShared };

__global__ void grid_misuse(int mode, int* sink) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  grid.sync();  // a correct barrier first
  switch (static_cast<GridMisuse>(mode)) {
    case GridMisuse::kMissed:  // block 1 returns; the others wait forever
      if (blockIdx.x == 1) return;
      grid.sync();
      break;
    case GridMisuse::kExtra:  // the last block waits at a barrier no other block reaches
      if (blockIdx.x == gridDim.x - 1) grid.sync();
      break;
    case GridMisuse::kMismatched:  // half of block 0 at the grid barrier, half at the block's
      if (blockIdx.x == 0 && threadIdx.x < 16) {
        __syncthreads();
      } else {
        grid.sync();
      }
      break;
    case GridMisuse::kDivergent:
      if (blockIdx.x == 0 && threadIdx.x >= 16) return;
      grid.sync();
      break;
    case GridMisuse::kStaticShared: {  // one copy for every block: a value kept across a barrier
      __shared__ int kept;             // would be overwritten by the other blocks
      if (threadIdx.x == 0) kept = static_cast<int>(blockIdx.x);
      grid.sync();
      sink[blockIdx.x] = kept;
      return;
    }
  }
  sink[blockIdx.x] = 1;
}

// Reads one int past the 32 of its block's dynamic shared memory: only AddressSanitizer sees it.
__global__ void past_dynamic_shared(int* sink) {
  const int* const shared = reinterpret_cast<const int*>(cuda_emulation::dynamic_shared_memory());
  cooperative_groups::this_grid().sync();
  if (threadIdx.x == 31) sink[blockIdx.x] = shared[threadIdx.x + 1];
}

__global__ void grid_barrier_in_ordinary_launch() { cooperative_groups::this_grid().sync(); }

void test_cooperative_exchange() {
  for (unsigned blocks : {1u, 2u, 7u}) {
    const int rounds = 9;
    std::vector<int> board(2 * blocks * kGridThreads, -1), out(blocks * kGridThreads, -1);
    const std::uint64_t before = cuda_emulation::launch_count();
    const cudaError_t error = cuda_emulation::launch_cooperative(
        grid_exchange, dim3(blocks), dim3(kGridThreads), kGridThreads * sizeof(int), nullptr,
        board.data(), out.data(), rounds);
    CHECK(error == cudaSuccess, "%u blocks: launch returned %d", blocks, static_cast<int>(error));
    CHECK(cuda_emulation::launch_count() == before + 1, "a cooperative launch is one launch");
    const std::vector<int> expected = grid_exchange_expected(blocks, rounds);
    int wrong = 0;
    for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != expected[i];
    CHECK(wrong == 0, "%u blocks: %d of %zu values wrong (out[0] = %d, expected %d)", blocks, wrong,
          out.size(), out[0], expected[0]);
  }
}

void test_cooperative_order_and_shared_memory() {
  const unsigned blocks = 5;
  const int phases = 4;
  std::vector<unsigned> first(blocks, 0), order(phases * blocks, ~0u);
  std::vector<int> aligned(blocks, 0);
  unsigned counter = 0;
  const cudaError_t error = cuda_emulation::launch_cooperative(
      grid_order, dim3(blocks), dim3(32), 200, nullptr, first.data(), order.data(), &counter,
      phases, aligned.data());
  CHECK(error == cudaSuccess, "launch returned %d", static_cast<int>(error));
  for (unsigned b = 0; b < blocks; ++b)
    CHECK(first[b] == 0xFFFFFFFFu, "block %u found %#x in its shared memory, not the 0xFF fill", b,
          first[b]);
  for (unsigned b = 0; b < blocks; ++b)
    CHECK(aligned[b] == 1, "block %u: its dynamic shared memory is not 128-byte aligned", b);
  // Ascending between the start and the first barrier, descending to the next, and so on.
  for (int p = 0; p < phases; ++p)
    for (unsigned b = 0; b < blocks; ++b) {
      const unsigned expected = p * blocks + (p % 2 == 0 ? b : blocks - 1 - b);
      CHECK(order[p * blocks + b] == expected, "phase %d block %u ran at %u, expected %u", p, b,
            order[p * blocks + b], expected);
    }
  // The emulator's state is reset: an ordinary launch afterwards works.
  int sink = 0;
  CHECK(cuda_emulation::launch(barriers, dim3(3), dim3(64), 0, nullptr, 2, &sink) == cudaSuccess &&
            sink == 3, "ordinary launch after a cooperative one");
}

void test_cooperative_limits() {
  cuda_emulation::DeviceModel& model = cuda_emulation::device_model();
  const cuda_emulation::DeviceModel saved = model;
  std::vector<int> board(2 * 64 * kGridThreads), out(64 * kGridThreads);
  auto launch = [&](unsigned blocks, std::size_t shared) {
    shared = std::max<std::size_t>(shared, kGridThreads * sizeof(int));  // what the kernel uses
    const cudaError_t error = cuda_emulation::launch_cooperative(
        grid_exchange, dim3(blocks), dim3(kGridThreads), shared, nullptr, board.data(),
        out.data(), 1);
    const cudaError_t last = cudaGetLastError();
    CHECK(last == error, "cudaGetLastError %d after a launch returning %d", static_cast<int>(last),
          static_cast<int>(error));
    return error;
  };
  int value = 0;
  CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess &&
            value == model.multiprocessors, "multiprocessors %d", value);
  CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess &&
            value == 227 * 1024, "opt-in shared memory %d", value);
  CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrCooperativeLaunch, 0) == cudaSuccess && value == 1,
        "cooperative launch %d", value);
  // Occupancy: threads, blocks and shared memory each limit it.
  int blocks = -1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_exchange, 1024, 0);
  CHECK(blocks == 2, "1024 threads: %d blocks per multiprocessor", blocks);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_exchange, 32, 0);
  CHECK(blocks == 32, "32 threads: %d blocks per multiprocessor", blocks);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_exchange, 64, 40 * 1024);
  CHECK(blocks == 5, "40 KiB: %d blocks per multiprocessor", blocks);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_exchange, 64, 100 * 1024);
  CHECK(blocks == 0, "100 KiB before the opt-in: %d blocks per multiprocessor", blocks);
  // Above 48 KiB only after cudaFuncSetAttribute, up to the opt-in limit.
  CHECK(launch(2, 100 * 1024) == cudaErrorInvalidValue, "100 KiB without the attribute");
  CHECK(cudaFuncSetAttribute(grid_exchange, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             228 * 1024) == cudaErrorInvalidValue, "attribute above the opt-in");
  CHECK(cudaGetLastError() == cudaErrorInvalidValue, "attribute error recorded");
  CHECK(cudaFuncSetAttribute(grid_exchange, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             227 * 1024) == cudaSuccess, "attribute at the opt-in");
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, grid_exchange, 64, 100 * 1024);
  CHECK(blocks == 2, "100 KiB after the opt-in: %d blocks per multiprocessor", blocks);
  CHECK(launch(16, 100 * 1024) == cudaSuccess, "16 blocks of 100 KiB on 8 multiprocessors");
  CHECK(launch(17, 100 * 1024) == cudaErrorCooperativeLaunchTooLarge, "17 blocks of 100 KiB");
  // A limit on co-resident blocks below the occupancy (as under MPS), a device without cooperative
  // launches.
  model.coresident_block_limit = 3;
  CHECK(launch(3, 0) == cudaSuccess, "3 blocks under a limit of 3");
  CHECK(launch(4, 0) == cudaErrorCooperativeLaunchTooLarge, "4 blocks under a limit of 3");
  model = saved;
  model.cooperative_launch = false;
  CHECK(launch(1, 0) == cudaErrorNotSupported, "no cooperative launch support");
  CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrCooperativeLaunch, 0) == cudaSuccess && value == 0,
        "cooperative launch attribute %d", value);
  model = saved;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusActive;
  CHECK(cudaStreamIsCapturing(nullptr, &status) == cudaSuccess &&
            status == cudaStreamCaptureStatusNone, "not capturing");
  model.capturing = true;
  CHECK(cudaStreamIsCapturing(nullptr, &status) == cudaSuccess &&
            status == cudaStreamCaptureStatusActive, "capturing");
  model = saved;
  int version = 0;
  CHECK(cudaRuntimeGetVersion(&version) == cudaSuccess && version == 13000, "runtime %d", version);
  CHECK(cudaDriverGetVersion(&version) == cudaSuccess && version == 13000, "driver %d", version);
}

// ---- Asynchronous copies ---------------------------------------------------------------------

// Copies n floats through shared memory in tiles of 64 with a two-stage pipeline of 16-byte,
// 8-byte and 4-byte asynchronous copies (per tile: 8 + 4 x 2 + 8 x 1 floats... one size per
// lane group) and zero-filled tails, doubling each value.
constexpr int kCopyTile = 64, kCopyThreads = 16;

__global__ void pipelined_copy(const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ __align__(16) float stage[2][kCopyTile];
  const int t = threadIdx.x;
  const int tiles = (n + kCopyTile - 1) / kCopyTile;
  // Thread t owns floats [4t, 4t + 4) of a tile: threads 0-7 copy them as one 16-byte copy,
  // 8-11 as two 8-byte copies, 12-15 as four 4-byte ones; past n they zero-fill.
  auto issue = [&](int tile) {
    float* const dst = stage[tile % 2] + 4 * t;
    const int first = tile * kCopyTile + 4 * t;
    const int size = t < 8 ? 16 : t < 12 ? 8 : 4;
    const int per = size / 4;
    for (int part = 0; part < 4 / per; ++part) {
      const int at = first + part * per;
      const int valid = at >= n ? 0 : (n - at < per ? n - at : per);
      __pipeline_memcpy_async(dst + part * per, in + (valid ? at : 0), size,
                              static_cast<size_t>((per - valid) * 4));
    }
  };
  issue(0);
  __pipeline_commit();
  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) issue(tile + 1);
    __pipeline_commit();
    __pipeline_wait_prior(1);  // the tile just issued may stay in flight
    __syncthreads();
    // Another thread's share: visible after the wait and the barrier.
    const int reader = (t + 5) % kCopyThreads;
    for (int i = 0; i < 4; ++i) {
      const int at = tile * kCopyTile + 4 * reader + i;
      const float value = stage[tile % 2][4 * reader + i];
      if (at < n) out[at] = 2 * value;
      else if (value != 0.0f) out[0] = -1.0f;  // the zero fill
    }
    __syncthreads();  // the stage is written again two tiles on
  }
  __pipeline_wait_prior(0);
}

// What thread 0 sees of its own copy before waiting, and what thread 1 sees of it after a barrier
// when thread 0 waited only after the barrier (wrong) or before it (right).
__global__ void early_reads(const float* __restrict__ in, float* __restrict__ seen, int wait_first) {
  __shared__ __align__(16) float box[4];
  if (threadIdx.x == 0) {
    __pipeline_memcpy_async(box, in, 16);
    __pipeline_commit();
    seen[0] = box[0];  // before the wait: poison
    if (wait_first) __pipeline_wait_prior(0);
  }
  __syncthreads();
  if (threadIdx.x == 1) seen[1] = box[1];
  __syncthreads();
  if (threadIdx.x == 0 && !wait_first) __pipeline_wait_prior(0);
}

enum class CopyMisuse { kMisaligned, kBadSize, kOverlap, kDestinationWritten, kNeverWaited,
                        kSourceChanged, kZfill };

__global__ void copy_misuse(float* __restrict__ global, int mode) {
  __shared__ __align__(16) float box[8];
  switch (static_cast<CopyMisuse>(mode)) {
    case CopyMisuse::kMisaligned:  // 16 bytes to a 4-byte boundary
      __pipeline_memcpy_async(box + 1, global, 16);
      break;
    case CopyMisuse::kBadSize:
      __pipeline_memcpy_async(box, global, 12);
      break;
    case CopyMisuse::kOverlap:
      __pipeline_memcpy_async(box, global, 16);
      __pipeline_memcpy_async(box + 2, global + 4, 8);
      break;
    case CopyMisuse::kDestinationWritten:
      __pipeline_memcpy_async(box, global, 16);
      __pipeline_commit();
      box[3] = 1.0f;
      break;
    case CopyMisuse::kNeverWaited:
      __pipeline_memcpy_async(box, global, 16);
      __pipeline_commit();
      return;
    case CopyMisuse::kSourceChanged:
      __pipeline_memcpy_async(box, global, 16);
      __pipeline_commit();
      global[1] = 5.0f;
      break;
    case CopyMisuse::kZfill:
      __pipeline_memcpy_async(box, global, 8, 12);
      break;
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// ---- Only the sanitizers catch these -------------------------------------------------------

__global__ void sanitizer_misuse(float* __restrict__ global, int mode) {
  __shared__ float tile[32];
  const int t = threadIdx.x;
  tile[t] = static_cast<float>(t);
  __syncthreads();
  float value = 0.0f;
  if (mode == 0) {
    float* const row = tile;
    value = row[t + 1];  // thread 31 reads past the end of shared memory
  } else if (mode == 1) {
    value = global[t + 1];  // thread 31 reads past the end of a 32-float buffer
  } else {
    const float4* const vectors = reinterpret_cast<const float4*>(global + 1);  // 4-byte aligned
    value = vectors[0].x;
  }
  global[t] = value;
}


void test_async_copies() {
  for (int n : {1, 7, 64, 100, 128, 130}) {
    std::vector<float> in(n), out(n, -7.0f);
    for (int i = 0; i < n; ++i) in[i] = static_cast<float>(i) + 0.25f;
    cuda_emulation::launch(pipelined_copy, dim3(2), dim3(kCopyThreads), 0, nullptr, in.data(),
                           out.data(), n);
    for (int i = 0; i < n; ++i)
      CHECK(out[i] == 2 * in[i], "n %d: out[%d] = %g, expected %g", n, i, out[i], 2 * in[i]);
  }
  alignas(16) float in[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  for (int wait_first : {0, 1}) {
    float seen[2] = {0.0f, 0.0f};
    cuda_emulation::launch(early_reads, dim3(1), dim3(2), 0, nullptr, in, seen, wait_first);
    CHECK(std::isnan(seen[0]), "a read before the wait saw %g, not the in-flight poison", seen[0]);
    if (wait_first)
      CHECK(seen[1] == 2.0f, "after wait and barrier another thread saw %g", seen[1]);
    else
      CHECK(std::isnan(seen[1]), "a read of a copy its issuer had not waited for saw %g",
            seen[1]);
  }
}

void test_reduction() {
  const float scale = 0.5f;
  std::vector<float> sums(kBlocks, -1.0f);
  std::vector<Seen> seen(kBlocks * kThreads);
  std::memset(seen.data(), 0xff, seen.size() * sizeof(Seen));
  const cudaError_t error = cuda_emulation::launch(block_sum, dim3(kBlocks), dim3(kBlockX, kBlockY),
                                                   0, nullptr, &scale, sums.data(), seen.data());
  CHECK(error == cudaSuccess, "launch returned %d", static_cast<int>(error));
  for (unsigned b = 0; b < kBlocks; ++b) {
    double expected = 0;
    for (unsigned t = 0; t < kThreads; ++t) expected += value_of(b, t) * scale;
    CHECK(sums[b] == static_cast<float>(expected), "block %u: sum %.9g, expected %.9g", b, sums[b],
          expected);
    for (unsigned t = 0; t < kThreads; ++t) {
      const Seen& s = seen[b * kThreads + t];
      const bool ok = s.tx == t % kBlockX && s.ty == t / kBlockX && s.tz == 0 && s.bx == b &&
                      s.by == 0 && s.bz == 0 && s.dx == kBlockX && s.dy == kBlockY && s.dz == 1 &&
                      s.gx == kBlocks && s.gy == 1 && s.gz == 1;
      CHECK(ok, "block %u thread %u saw threadIdx (%u,%u,%u) blockIdx (%u,%u,%u) blockDim (%u,%u,%u) "
            "gridDim (%u,%u,%u)", b, t, s.tx, s.ty, s.tz, s.bx, s.by, s.bz, s.dx, s.dy, s.dz,
            s.gx, s.gy, s.gz);
      if (!ok) return;
    }
  }
}

void test_uneven() {
  const unsigned blocks = 3, threads = 64;
  const int rounds = 9;
  std::vector<int> out(blocks * threads, -1);
  // long long converts to the kernel's int parameter.
  const cudaError_t error = cuda_emulation::launch(uneven, dim3(blocks), dim3(threads), 0, nullptr,
                                                   out.data(), static_cast<long long>(rounds));
  CHECK(error == cudaSuccess, "launch returned %d", static_cast<int>(error));
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      const int expected = uneven_expected(t, threads, rounds);
      CHECK(out[b * threads + t] == expected, "block %u thread %u: %d, expected %d", b, t,
            out[b * threads + t], expected);
    }
}

void test_order() {
  const unsigned blocks = 4, threads = 4 * 17;
  std::vector<unsigned> stamps(blocks * threads, ~0u);
  const cudaError_t error = cuda_emulation::launch(run_order<unsigned>, dim3(blocks), dim3(17, 4),
                                                   0, nullptr, stamps.data());
  CHECK(error == cudaSuccess, "launch returned %d", static_cast<int>(error));
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      // Even blocks run their threads in ascending order, odd blocks in descending order.
      const unsigned expected = b % 2 == 0 ? t : threads - 1 - t;
      CHECK(stamps[b * threads + t] == expected, "block %u thread %u ran at %u, expected %u", b, t,
            stamps[b * threads + t], expected);
    }
}

void test_invalid_configurations() {
  CHECK(cudaGetLastError() == cudaSuccess, "no error before any failed launch");
  struct Case {
    dim3 grid, block;
    size_t shared;
  };
  const Case cases[] = {
      {dim3(0), dim3(32), 0},          {dim3(1, 0), dim3(32), 0},     {dim3(1, 1, 0), dim3(32), 0},
      {dim3(1), dim3(0), 0},           {dim3(1), dim3(32, 0), 0},     {dim3(1), dim3(32, 1, 0), 0},
      {dim3(1), dim3(1025), 0},        {dim3(1), dim3(64, 32), 0},    {dim3(1), dim3(1, 1, 65), 0},
      {dim3(1), dim3(32), 16},
  };
  for (const Case& c : cases) {
    const std::uint64_t before = cuda_emulation::launch_count();
    const cudaError_t error = cuda_emulation::launch(nothing, c.grid, c.block, c.shared, nullptr);
    CHECK(error == cudaErrorInvalidConfiguration,
          "grid (%u,%u,%u) block (%u,%u,%u) shared %zu: returned %d", c.grid.x, c.grid.y,
          c.grid.z, c.block.x, c.block.y, c.block.z, c.shared, static_cast<int>(error));
    CHECK(cuda_emulation::launch_count() == before, "a failed launch was counted");
    const cudaError_t last = cudaGetLastError();
    CHECK(last == cudaErrorInvalidConfiguration, "cudaGetLastError returned %d",
          static_cast<int>(last));
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError did not clear the error");
  }
  CHECK(std::strcmp(cudaGetErrorString(cudaErrorInvalidConfiguration),
                    "invalid configuration argument") == 0, "error string");
  // The largest legal blocks run.
  int sink = 0;
  CHECK(cuda_emulation::launch(barriers, dim3(1), dim3(1024), 0, nullptr, 2, &sink) == cudaSuccess,
        "1024 threads");
  CHECK(cuda_emulation::launch(barriers, dim3(2), dim3(1, 16, 64), 0, nullptr, 2, &sink) ==
            cudaSuccess, "block.z = 64");
  CHECK(sink == 3, "sink %d", sink);
  CHECK(cudaGetLastError() == cudaSuccess, "a good launch left an error");
}

void test_launch_count() {
  cuda_emulation::reset_launch_count();
  CHECK(cuda_emulation::launch_count() == 0, "reset");
  for (int i = 0; i < 5; ++i) cuda_emulation::launch(nothing, dim3(2, 2), dim3(3, 2), 0, nullptr);
  CHECK(cuda_emulation::launch_count() == 5, "count %llu",
        static_cast<unsigned long long>(cuda_emulation::launch_count()));
  // Per OS thread: launches on another thread neither count here nor disturb this thread.
  std::uint64_t other = 0;
  std::thread worker([&other] {
    int sink = 0;
    cuda_emulation::launch(barriers, dim3(3), dim3(64), 0, nullptr, 4, &sink);
    other = cuda_emulation::launch_count();
  });
  worker.join();
  CHECK(other == 1, "other thread count %llu", static_cast<unsigned long long>(other));
  CHECK(cuda_emulation::launch_count() == 5, "count after another thread %llu",
        static_cast<unsigned long long>(cuda_emulation::launch_count()));
  cuda_emulation::reset_launch_count();
  CHECK(cuda_emulation::launch_count() == 0, "reset again");
}

void test_half_types() {
  CHECK(__half2float(__float2half_rn(1.0f)) == 1.0f, "half 1.0");
  CHECK(__bfloat162float(__float2bfloat16_rn(1.0f)) == 1.0f, "bfloat16 1.0");
  // The representable neighbours of 0.1: half 0.0999755859375 (0x2E66), bfloat16 0.10009765625.
  CHECK(__half2float(__float2half_rn(0.1f)) == 0.0999755859375f, "half 0.1 -> %.12g",
        __half2float(__float2half_rn(0.1f)));
  CHECK(__bfloat162float(__float2bfloat16_rn(0.1f)) == 0.10009765625f, "bfloat16 0.1 -> %.12g",
        __bfloat162float(__float2bfloat16_rn(0.1f)));
  // Ties go to even: 1 + 2^-11 is half-way between 1 and 1 + 2^-10 in half.
  CHECK(__half2float(__float2half_rn(1.0f + 1.0f / 2048)) == 1.0f, "half tie to even");
  CHECK(__half2float(__float2half_rn(1.0f + 3.0f / 2048)) == 1.0f + 4.0f / 2048,
        "half tie to even (up)");
  CHECK(__bfloat162float(__float2bfloat16_rn(1.0f + 1.0f / 256)) == 1.0f, "bfloat16 tie to even");
  CHECK(std::fabs(expf(1.0f) - 2.7182817f) < 1e-6f && tanhf(0.0f) == 0.0f &&
            fmaf(2.0f, 3.0f, 1.0f) == 7.0f && fma(2.0, 3.0, 1.0) == 7.0 && tanh(0.0) == 0.0 &&
            exp(0.0) == 1.0,
        "math functions");
}

// Small integers, exactly representable in every element type, so that the reference is exact.
float small_integer(unsigned& state, bool nonzero) {
  for (;;) {
    state = state * 1664525u + 1013904223u;
    const int value = static_cast<int>(state >> 28) % 9 - 4;  // -4..4
    if (!nonzero || value != 0) return static_cast<float>(value);
  }
}

template <typename Elem, typename LayoutB, int KF>
void test_wmma_gemm(const char* name) {
  constexpr bool kTf32 = std::is_same<Elem, wmma::precision::tf32>::value;
  const unsigned blocks = 2, size = kWmmaM * kWmmaK;  // every matrix is 32 x 32
  unsigned state = 12345;
  std::vector<float> a(blocks * size), b(blocks * size), c(blocks * size), d(blocks * size, -1.0f);
  std::vector<float> a_exact(a.size()), b_exact(b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    a_exact[i] = small_integer(state, kTf32);
    b_exact[i] = small_integer(state, kTf32);
    c[i] = small_integer(state, false);
    // tf32 operands get 2^-12 more magnitude, which rounding to tf32 on load must remove.
    a[i] = kTf32 ? a_exact[i] + std::copysign(1.0f / 4096, a_exact[i]) : a_exact[i];
    b[i] = kTf32 ? b_exact[i] + std::copysign(1.0f / 4096, b_exact[i]) : b_exact[i];
  }
  const float alpha = 0.5f;
  const cudaError_t error =
      cuda_emulation::launch(wmma_gemm<Elem, LayoutB, KF>, dim3(blocks), dim3(kWmmaThreads), 0,
                             nullptr, a.data(), b.data(), c.data(), d.data(), alpha);
  CHECK(error == cudaSuccess, "%s: launch returned %d", name, static_cast<int>(error));
  int wrong = 0;
  for (unsigned block = 0; block < blocks; ++block)
    for (int m = 0; m < kWmmaM; ++m)
      for (int n = 0; n < kWmmaN; ++n) {
        const std::size_t at = block * size + m * kWmmaN + n;
        float sum = c[at];
        for (int k = 0; k < kWmmaK; ++k)
          sum += a_exact[block * size + m * kWmmaK + k] * b_exact[block * size + k * kWmmaN + n];
        const float expected = alpha * sum;
        if (d[at] != expected && ++wrong <= 5)
          CHECK(d[at] == expected, "%s: block %u d[%d][%d] = %.9g, expected %.9g", name, block, m,
                n, d[at], expected);
      }
  CHECK(wrong == 0, "%s: %d wrong elements", name, wrong);
}

void test_wmma_layouts() {
  std::vector<float> in(256), transposed(256, -1.0f), filled(256, -1.0f);
  for (int i = 0; i < 256; ++i) in[i] = static_cast<float>(i);
  const cudaError_t error = cuda_emulation::launch(wmma_layouts, dim3(1), dim3(32), 0, nullptr,
                                                   in.data(), transposed.data(), filled.data());
  CHECK(error == cudaSuccess, "launch returned %d", static_cast<int>(error));
  for (int i = 0; i < 256; ++i) {
    CHECK(transposed[i] == in[i % 16 * 16 + i / 16], "transposed[%d] = %g", i, transposed[i]);
    CHECK(filled[i] == 25.0f, "filled[%d] = %g", i, filled[i]);
  }
}

void test_tf32_rounding() {
  using nvcuda::wmma::__float_to_tf32;
  const float ulp = 1.0f / 1024;  // of tf32 at 1
  struct Case {
    float in, expected;
  };
  const Case cases[] = {
      {1.0f, 1.0f},
      {1.0f + ulp, 1.0f + ulp},
      {1.0f + ulp / 2, 1.0f + ulp},                     // a tie: away from zero
      {-(1.0f + ulp / 2), -(1.0f + ulp)},               // a tie: away from zero
      {1.0f + 3 * ulp / 2, 1.0f + 2 * ulp},             // a tie
      {1.0f + ulp / 2 - ulp / 8192, 1.0f},              // just below a tie
      {1.0f + ulp / 4, 1.0f},
      {2.0f - ulp / 4, 2.0f},                           // carries into the exponent
      {0.1f, 0.0999755859375f},                         // 0x3DCCCCCD -> 0x3DCCC000
      {0.0f, 0.0f},
      {std::numeric_limits<float>::denorm_min(), 0.0f},
      {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity()},
      {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()},
  };
  for (const Case& c : cases)
    CHECK(__float_to_tf32(c.in) == c.expected, "__float_to_tf32(%.9g) = %.9g, expected %.9g",
          c.in, __float_to_tf32(c.in), c.expected);
  CHECK(std::signbit(__float_to_tf32(-0.0f)), "-0 keeps its sign");
  CHECK(std::isnan(__float_to_tf32(std::numeric_limits<float>::quiet_NaN())), "NaN");
  // Rounded on load and on fill (checked on every element: independent of the layout). The
  // functions also run outside a kernel.
  alignas(32) static float tile[16 * 8];
  for (float& value : tile) value = 1.0f + ulp / 2;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile, 8);
  int unrounded = 0;
  for (int i = 0; i < a.num_elements; ++i) unrounded += a.x[i] != 1.0f + ulp;
  CHECK(unrounded == 0, "load_matrix_sync(tf32) left %d elements unrounded", unrounded);
  wmma::fill_fragment(a, 1.0f - ulp / 4);
  int unrounded_fill = 0;
  for (int i = 0; i < a.num_elements; ++i) unrounded_fill += a.x[i] != 1.0f;
  CHECK(unrounded_fill == 0, "fill_fragment(tf32) left %d elements unrounded", unrounded_fill);
}

void test_timing() {
  const int launches = 1000, barrier_count = 10;
  const unsigned threads = 256;
  int sink = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < launches; ++i)
    cuda_emulation::launch(barriers, dim3(1), dim3(threads), 0, nullptr, barrier_count, &sink);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Each launch switches once per thread per barrier, and once per thread at exit.
  const double switches = static_cast<double>(launches) * threads * (barrier_count + 1);
  std::printf("timing: %d launches x %u threads x %d barriers in %.3f s (%.1f ns per switch)\n",
              launches, threads, barrier_count, seconds, seconds * 1e9 / switches);
  CHECK(sink == launches, "sink %d", sink);
#ifdef CUDA_EMULATION_ASAN
  const double limit = 20.0;  // AddressSanitizer's bookkeeping at every switch
#else
  const double limit = 1.0;
#endif
  CHECK(seconds < limit, "too slow: %.3f s", seconds);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    const char* const mode = argv[1];
    const struct {
      const char* name;
      GridMisuse misuse;
    } grid_modes[] = {
        {"grid-barrier-missed", GridMisuse::kMissed},
        {"grid-barrier-extra", GridMisuse::kExtra},
        {"grid-barrier-mismatched", GridMisuse::kMismatched},
        {"grid-barrier-divergent", GridMisuse::kDivergent},
        {"grid-static-shared", GridMisuse::kStaticShared},
    };
    const char* const copy_modes[] = {"copy-misaligned", "copy-bad-size", "copy-overlap",
                                      "copy-destination-written", "copy-never-waited",
                                      "copy-source-changed", "copy-zfill"};
    const char* const sanitizer_modes[] = {"shared-out-of-bounds", "global-out-of-bounds",
                                           "misaligned-vector"};
    int copy_mode = -1, sanitizer_mode = -1;
    const GridMisuse* grid_misuse_mode = nullptr;
    for (const auto& m : grid_modes)
      if (std::strcmp(mode, m.name) == 0) grid_misuse_mode = &m.misuse;
    for (int i = 0; i < 7; ++i)
      if (std::strcmp(mode, copy_modes[i]) == 0) copy_mode = i;
    for (int i = 0; i < 3; ++i)
      if (std::strcmp(mode, sanitizer_modes[i]) == 0) sanitizer_mode = i;
    if (grid_misuse_mode != nullptr) {
      std::vector<int> sink(4, 0);
      cuda_emulation::launch_cooperative(grid_misuse, dim3(4), dim3(32), 0, nullptr,
                                         static_cast<int>(*grid_misuse_mode), sink.data());
    } else if (std::strcmp(mode, "grid-barrier-outside") == 0) {
      cuda_emulation::launch(grid_barrier_in_ordinary_launch, dim3(2), dim3(32), 0, nullptr);
    } else if (std::strcmp(mode, "dynamic-shared-out-of-bounds") == 0) {
      std::vector<int> sink(3, 0);
      cuda_emulation::launch_cooperative(past_dynamic_shared, dim3(3), dim3(32),
                                         32 * sizeof(int), nullptr, sink.data());
    } else if (std::strcmp(mode, "divergent") == 0) {
      std::vector<int> out(32, 0);
      cuda_emulation::launch(divergent, dim3(1), dim3(32), 0, nullptr, out.data());
    } else if (copy_mode >= 0) {
      alignas(16) float global[8] = {1, 2, 3, 4, 5, 6, 7, 8};
      cuda_emulation::launch(copy_misuse, dim3(1), dim3(1), 0, nullptr, global, copy_mode);
    } else if (sanitizer_mode >= 0) {
      // Exactly 32 floats on the heap, so that AddressSanitizer guards the end.
      std::unique_ptr<float[]> global(new float[32]());
      cuda_emulation::launch(sanitizer_misuse, dim3(1), dim3(32), 0, nullptr, global.get(),
                             sanitizer_mode);
    } else {
      struct Mode {
        const char* name;
        Misuse misuse;
        unsigned threads;
      };
      const Mode modes[] = {
          {"misaligned", Misuse::kMisaligned, 32},
          {"misaligned-store", Misuse::kMisalignedStore, 32},
          {"bad-ldm", Misuse::kBadLdm, 32},
          {"bad-ldm-float", Misuse::kBadLdmFloat, 32},
          {"partial-warp", Misuse::kPartialWarp, 48},
      };
      const Mode* found = nullptr;
      for (const Mode& m : modes)
        if (std::strcmp(mode, m.name) == 0) found = &m;
      if (found == nullptr) {
        std::printf("unknown mode %s\n", mode);
        return 2;
      }
      cuda_emulation::launch(wmma_misuse, dim3(1), dim3(found->threads), 0, nullptr,
                             static_cast<int>(found->misuse));
    }
    std::printf("%s kernel did not abort\n", mode);
    return 0;
  }
  test_reduction();
  test_uneven();
  test_order();
  test_invalid_configurations();
  test_launch_count();
  test_half_types();
  test_async_copies();
  test_tf32_rounding();
  test_wmma_layouts();
  test_wmma_gemm<__half, wmma::col_major, 16>("half, col_major b");
  test_wmma_gemm<__half, wmma::row_major, 16>("half, row_major b");
  test_wmma_gemm<__nv_bfloat16, wmma::col_major, 16>("bfloat16, col_major b");
  test_wmma_gemm<__nv_bfloat16, wmma::row_major, 16>("bfloat16, row_major b");
  test_wmma_gemm<wmma::precision::tf32, wmma::col_major, 8>("tf32, col_major b");
  test_wmma_gemm<wmma::precision::tf32, wmma::row_major, 8>("tf32, row_major b");
  test_cooperative_exchange();
  test_cooperative_order_and_shared_memory();
  test_cooperative_limits();
  test_timing();
  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
