// cuda_emulation.h: a CPU emulation of the subset of CUDA used by the lstm_fused kernels, so that
// the .cu files compile as C++ (with -DLSTM_FUSED_EMULATE_CUDA -I tests/emulation) and run
// without a GPU.
//
// Model: a launch runs its blocks one after another on the calling OS thread; the threads of a
// block are cooperative fibers that switch only at __syncthreads() and when a thread returns.
// Kernels are launched with
//     cuda_emulation::launch(kernel, grid, block, shared_bytes, stream, args...);
// instead of kernel<<<grid, block, shared_bytes, stream>>>(args...).
//
// Limitations:
//  - Linux/glibc only (ucontext + setjmp); x86-64 with g++ or clang.
//  - No dynamic shared memory (shared_bytes must be 0), no warp intrinsics, no atomics, no streams
//    (a launch is synchronous; the stream argument is ignored).
//  - Exceptions must not escape a kernel: one that does calls std::terminate.
//  - Each emulated thread has a fixed stack of CUDA_EMULATION_STACK_BYTES (default 256 KiB),
//    with a guard page below it: overflowing it is a SIGSEGV.
//  - A divergent barrier (some threads of a block returned while others wait at
//    __syncthreads()) aborts with a message; threads that wait at different __syncthreads() call
//    sites are not detected (they synchronise with each other as if at one barrier).
//  - Switching stacks with longjmp is incompatible with CET shadow stacks; build with
//    -fcf-protection=none where a toolchain turns shadow stacks on.
#pragma once

// Included before the CUDA keyword macros below so that they cannot change these headers.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <math.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA keywords ----------------------------------------------------------------------------
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif
#ifndef __shared__
// All fibers of a block run on one OS thread, so a per-OS-thread static is per-block storage.
#define __shared__ static thread_local
#endif

// ---- Runtime types ----------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

// ---- Half types -------------------------------------------------------------------------------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

// c10's float constructors round to nearest even, as the _rn intrinsics do.
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }

// ---- Fiber switching --------------------------------------------------------------------------
#if defined(__GLIBC__)
// Binds to glibc's plain _longjmp even under _FORTIFY_SOURCE, whose __longjmp_chk rejects jumps
// to another stack.
extern "C" void cuda_emulation_detail_longjmp(jmp_buf env, int value) noexcept
    __asm__("_longjmp") __attribute__((__noreturn__));
#else
#define cuda_emulation_detail_longjmp _longjmp
#endif

#ifndef CUDA_EMULATION_STACK_BYTES
#define CUDA_EMULATION_STACK_BYTES (256u * 1024u)
#endif

namespace cuda_emulation {
namespace detail {

struct Fiber {
  jmp_buf context;     // where this fiber resumes
  dim3 thread_index;   // its threadIdx in the current launch
  void* mapping = nullptr;
  std::size_t mapping_bytes = 0;
};

// Hot per-OS-thread state; trivially constructed so accesses need no TLS init check.
struct Scheduler {
  Fiber** fibers = nullptr;  // the block's threads, linear index x + y*bx + z*bx*by
  unsigned count = 0;        // threads per block
  unsigned position = 0;     // how many threads have run in the current pass between barriers
  unsigned exited = 0;       // threads that returned during the current pass
  bool descending = false;   // pass order of the current block
  bool in_launch = false;
  Fiber* current = nullptr;  // the running fiber; null in the launching context
  Fiber* creating = nullptr;
  void (*body)(void*) = nullptr;
  void* payload = nullptr;
  jmp_buf launcher{};  // the launching context, resumed when a block is done
  jmp_buf creator{};   // the context that is starting a new fiber
};

inline thread_local Scheduler t_scheduler;
inline thread_local dim3 t_thread_idx{0, 0, 0};
inline thread_local dim3 t_block_idx{0, 0, 0};
inline thread_local dim3 t_block_dim{1, 1, 1};
inline thread_local dim3 t_grid_dim{1, 1, 1};
// CUDA keeps the last error per host thread.
inline thread_local cudaError_t t_last_error = cudaSuccess;
inline thread_local std::uint64_t t_launch_count = 0;

inline const dim3& current_thread_index() noexcept { return t_thread_idx; }
inline const dim3& current_block_index() noexcept { return t_block_idx; }
inline const dim3& current_block_dim() noexcept { return t_block_dim; }
inline const dim3& current_grid_dim() noexcept { return t_grid_dim; }

[[noreturn]] inline void fatal(const char* message) noexcept {
  std::fprintf(stderr, "cuda_emulation: %s\n", message);
  std::fflush(stderr);
  std::abort();
}

[[noreturn]] inline void jump_to(Fiber* next) noexcept {
  Scheduler& s = t_scheduler;
  s.current = next;
  t_thread_idx = next->thread_index;
  cuda_emulation_detail_longjmp(next->context, 1);
}

[[noreturn]] inline void jump_to_launcher() noexcept {
  Scheduler& s = t_scheduler;
  s.current = nullptr;
  cuda_emulation_detail_longjmp(s.launcher, 1);
}

inline Fiber* fiber_at(const Scheduler& s, unsigned position) noexcept {
  return s.fibers[s.descending ? s.count - 1 - position : position];
}

// The fiber to run after the current one reaches a barrier or returns; null when the block is done.
inline Fiber* advance(bool exited) noexcept {
  Scheduler& s = t_scheduler;
  s.exited += exited ? 1u : 0u;
  if (++s.position < s.count) return fiber_at(s, s.position);
  if (s.exited == s.count) return nullptr;
  if (s.exited != 0) {
    std::fprintf(stderr,
                 "cuda_emulation: divergent __syncthreads() in block (%u, %u, %u) of a (%u, %u, %u) "
                 "grid: %u of %u threads have returned while the others wait at a barrier "
                 "(undefined behaviour in CUDA)\n",
                 t_block_idx.x, t_block_idx.y, t_block_idx.z, t_grid_dim.x, t_grid_dim.y,
                 t_grid_dim.z, s.exited, s.count);
    std::fflush(stderr);
    std::abort();
  }
  s.position = 0;
  return fiber_at(s, 0);
}

// Entry of every fiber: runs one emulated thread per block, forever; started once per stack.
[[noreturn]] inline void fiber_main() noexcept {
  Scheduler& s = t_scheduler;
  Fiber* const self = s.creating;
  if (_setjmp(self->context) == 0) cuda_emulation_detail_longjmp(s.creator, 1);
  for (;;) {
    s.body(s.payload);
    Fiber* const next = advance(true);
    if (_setjmp(self->context) == 0) {
      if (next != nullptr) jump_to(next);
      jump_to_launcher();
    }
  }
}

// Owns the stacks of this OS thread's fibers; reused by every launch on it.
class FiberPool {
 public:
  FiberPool() = default;
  FiberPool(const FiberPool&) = delete;
  FiberPool& operator=(const FiberPool&) = delete;
  ~FiberPool() {
    for (Fiber* fiber : fibers_) {
      munmap(fiber->mapping, fiber->mapping_bytes);
      delete fiber;
    }
  }

  Fiber** reserve(unsigned count) {
    while (fibers_.size() < count) fibers_.push_back(create());
    return fibers_.data();
  }

 private:
  static Fiber* create() {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t stack_bytes = (CUDA_EMULATION_STACK_BYTES + page - 1) / page * page;
    auto fiber = std::make_unique<Fiber>();
    fiber->mapping_bytes = stack_bytes + page;
    void* mapping = mmap(nullptr, fiber->mapping_bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) fatal("cannot allocate a fiber stack");
    fiber->mapping = mapping;
    // A guard page turns a stack overflow into a SIGSEGV instead of silent corruption.
    if (mprotect(mapping, page, PROT_NONE) != 0) fatal("cannot protect a fiber stack");

    ucontext_t context;
    if (getcontext(&context) != 0) fatal("getcontext failed");
    context.uc_stack.ss_sp = static_cast<char*>(mapping) + page;
    context.uc_stack.ss_size = stack_bytes;
    context.uc_link = nullptr;
    makecontext(&context, &fiber_main, 0);
    Scheduler& s = t_scheduler;
    s.creating = fiber.get();
    // setcontext costs a signal-mask syscall, paid once per stack; fiber_main jumps back here.
    if (_setjmp(s.creator) == 0) setcontext(&context);
    s.creating = nullptr;
    return fiber.release();
  }

  std::vector<Fiber*> fibers_;
};

inline FiberPool& fiber_pool() {
  static thread_local FiberPool pool;
  return pool;
}

// Runs one block to completion; kept apart so that no caller local is live across _setjmp.
__attribute__((__noinline__)) inline void run_block(bool descending) {
  Scheduler& s = t_scheduler;
  s.descending = descending;
  s.position = 0;
  s.exited = 0;
  if (_setjmp(s.launcher) == 0) jump_to(fiber_at(s, 0));
}

inline void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* payload) {
  Scheduler& s = t_scheduler;
  if (s.in_launch) fatal("a kernel launch inside a kernel is not supported");
  const unsigned count = block.x * block.y * block.z;
  Fiber** fibers = fiber_pool().reserve(count);
  for (unsigned i = 0; i < count; ++i)
    fibers[i]->thread_index = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
  s.fibers = fibers;
  s.count = count;
  s.body = body;
  s.payload = payload;
  s.in_launch = true;
  t_grid_dim = grid;
  t_block_dim = block;
  std::uint64_t linear = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        t_block_idx = dim3(x, y, z);
        // Odd blocks run their threads in reverse, to expose code that assumes an order.
        run_block((linear & 1u) != 0);
      }
  s.in_launch = false;
  s.body = nullptr;
  s.payload = nullptr;
  t_thread_idx = dim3(0, 0, 0);
  t_block_idx = dim3(0, 0, 0);
}

// Switches to the next thread of the block; returns when every thread has reached the barrier.
__attribute__((__noinline__)) inline void barrier() {
  Scheduler& s = t_scheduler;
  Fiber* const self = s.current;
  if (self == nullptr) fatal("__syncthreads() called outside a kernel run by cuda_emulation::launch");
  Fiber* const next = advance(false);
  if (next != self && _setjmp(self->context) == 0) jump_to(next);
}

inline cudaError_t validate(dim3 grid, dim3 block, std::size_t shared_bytes) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  if (block.x == 0 || block.y == 0 || block.z == 0) return cudaErrorInvalidConfiguration;
  if (block.x > 1024 || block.y > 1024 || block.z > 64) return cudaErrorInvalidConfiguration;
  if (std::uint64_t{block.x} * block.y * block.z > 1024) return cudaErrorInvalidConfiguration;
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  // Dynamic shared memory has no emulation.
  if (shared_bytes != 0) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

}  // namespace detail

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "cuda_emulation::launch: wrong number of kernel arguments");
  (void)stream;  // launches are synchronous
  const cudaError_t error = detail::validate(grid, block, shared_bytes);
  if (error != cudaSuccess) {
    detail::t_last_error = error;
    return error;
  }
  // Converted once, as a real launch copies its arguments; each thread gets its own copy.
  struct Payload {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Payload payload{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  detail::run_grid(
      grid, block,
      [](void* p) {
        Payload& launched = *static_cast<Payload*>(p);
        std::apply(launched.kernel, launched.params);
      },
      &payload);
  ++detail::t_launch_count;
  return cudaSuccess;
}

inline std::uint64_t launch_count() { return detail::t_launch_count; }
inline void reset_launch_count() { detail::t_launch_count = 0; }

}  // namespace cuda_emulation

// ---- CUDA built-ins ---------------------------------------------------------------------------
#define threadIdx (::cuda_emulation::detail::current_thread_index())
#define blockIdx (::cuda_emulation::detail::current_block_index())
#define blockDim (::cuda_emulation::detail::current_block_dim())
#define gridDim (::cuda_emulation::detail::current_grid_dim())

inline void __syncthreads() {
  // Keeps the compiler from moving shared-memory accesses across the barrier.
  __asm__ __volatile__("" ::: "memory");
  ::cuda_emulation::detail::barrier();
  __asm__ __volatile__("" ::: "memory");
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

// Returns and clears the last error, like CUDA.
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ::cuda_emulation::detail::t_last_error;
  ::cuda_emulation::detail::t_last_error = cudaSuccess;
  return error;
}

inline cudaError_t cudaPeekAtLastError() { return ::cuda_emulation::detail::t_last_error; }
