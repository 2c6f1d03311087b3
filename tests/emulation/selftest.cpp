// Self-test of cuda_emulation.h. Returns 0 when every check passes; prints each failure otherwise.
// With the argument "divergent" it runs a kernel with a divergent barrier, which must abort.
#include "cuda_emulation.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
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
  CHECK(seconds < 1.0, "too slow: %.3f s", seconds);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "divergent") == 0) {
    std::vector<int> out(32, 0);
    cuda_emulation::launch(divergent, dim3(1), dim3(32), 0, nullptr, out.data());
    std::printf("divergent kernel did not abort\n");
    return 0;
  }
  test_reduction();
  test_uneven();
  test_order();
  test_invalid_configurations();
  test_launch_count();
  test_half_types();
  test_timing();
  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
