// cuda_emulation.h: a CPU emulation of the subset of CUDA used by the lstm_fused kernels, so that
// the .cu files compile as C++ (with -DLSTM_FUSED_EMULATE_CUDA -I tests/emulation) and run
// without a GPU.
//
// Model: a launch runs its blocks one after another on the calling OS thread; the threads of a
// block are cooperative fibers that switch only at __syncthreads() and when a thread returns.
// Kernels are launched with
//     cuda_emulation::launch(kernel, grid, block, shared_bytes, stream, args...);
// instead of kernel<<<grid, block, shared_bytes, stream>>>(args...). A cooperative launch
// (cudaLaunchCooperativeKernel) is
//     cuda_emulation::launch_cooperative(kernel, grid, block, shared_bytes, stream, args...);
// there every thread of every block is a fiber at once, and a grid barrier
// (cooperative_groups::this_grid().sync()) switches through all of them (see "Cooperative
// launches" at the end, with the emulated device and runtime queries that go with it).
//
// Limitations:
//  - Linux/glibc only (ucontext + setjmp); x86-64 with g++ or clang.
//  - Dynamic shared memory only in cooperative launches (elsewhere shared_bytes must be 0); no
//    warp intrinsics, no streams (a launch is synchronous; the stream argument is ignored). Of
//    the atomics only atomicAdd on integers (one OS thread runs every block, switching only at
//    barriers, so every atomic is trivially atomic).
//  - Asynchronous copies (__pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior, as
//    cuda_pipeline_primitives.h declares them) complete only when the issuing thread waits for
//    their group; until then the destination holds 0xFF bytes (NaN in every floating-point type),
//    so a read before the wait, by the issuing thread or, after a barrier, by any other, sees
//    poison instead of the data. Described at their definition below.
//  - Of the warp matrix functions (nvcuda::wmma, <mma.h>) only a subset, described at its
//    definition below; each thread computes the whole warp's operation by itself.
//  - Exceptions must not escape a kernel: one that does calls std::terminate.
//  - Each emulated thread has a fixed stack of CUDA_EMULATION_STACK_BYTES (default 256 KiB),
//    with a guard page below it: overflowing it is a SIGSEGV.
//  - A divergent barrier (some threads of a block returned while others wait at
//    __syncthreads()) aborts with a message; threads that wait at different __syncthreads() call
//    sites are not detected (they synchronise with each other as if at one barrier).
//  - Switching stacks with longjmp is incompatible with CET shadow stacks; build with
//    -fcf-protection=none where a toolchain turns shadow stacks on.
//  - Under AddressSanitizer (-fsanitize=address) the fiber switches are announced to it, and
//    __shared__ variables are plain statics, which it surrounds with redzones (it does not
//    instrument thread_local storage); launches from different OS threads then run one at a time.
#pragma once

// Included before the CUDA keyword macros below so that they cannot change these headers.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMULATION_ASAN 1
#endif
#endif
#ifdef CUDA_EMULATION_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#include <math.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
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
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif
#ifndef __shared__
#ifdef CUDA_EMULATION_ASAN
// AddressSanitizer puts redzones around statics but not around thread_local storage.
#define CUDA_EMULATION_SHARED_STORAGE static
#else
// All fibers of a block run on one OS thread, so a per-OS-thread static is per-block storage.
#define CUDA_EMULATION_SHARED_STORAGE static thread_local
#endif
#define CUDA_EMULATION_CONCAT_(a, b) a##b
#define CUDA_EMULATION_CONCAT(a, b) CUDA_EMULATION_CONCAT_(a, b)
// The blocks of a cooperative launch run on that one OS thread together, where such storage would
// be shared by all of them: a check before each declaration aborts there (see "Cooperative
// launches").
#define __shared__                                                          \
  [[maybe_unused]] const ::cuda_emulation::detail::StaticSharedCheck        \
      CUDA_EMULATION_CONCAT(cuda_emulation_static_shared_, __COUNTER__){}; \
  CUDA_EMULATION_SHARED_STORAGE
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
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
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

// An asynchronous copy issued by a thread and not yet waited for (see __pipeline_memcpy_async).
struct AsyncCopy {
  unsigned char* destination;
  const unsigned char* source;
  unsigned bytes;          // copied from source; the rest up to `size` is zero-filled
  unsigned size;           // 4, 8 or 16
  std::uint64_t group;     // the commit group it belongs to
  unsigned char data[16];  // the source as it was when the copy was issued
};

struct Fiber {
  jmp_buf context;     // where this fiber resumes
  dim3 thread_index;   // its threadIdx in the current launch
  void* mapping = nullptr;
  std::size_t mapping_bytes = 0;
  void* stack_bottom = nullptr;  // the usable stack, above the guard page
  std::size_t stack_bytes = 0;
  void* fake_stack = nullptr;    // AddressSanitizer's, saved across switches
  std::vector<AsyncCopy> async_copies;  // issued and not yet waited for
  std::uint64_t async_group = 0;        // the group that copies issued now join
};

// Hot per-OS-thread state; trivially constructed so accesses need no TLS init check.
struct Scheduler {
  Fiber** fibers = nullptr;  // the block's threads, linear index x + y*bx + z*bx*by
  unsigned count = 0;        // threads per block
  unsigned position = 0;     // how many threads have run in the current pass between barriers
  unsigned exited = 0;       // threads that returned during the current pass
  unsigned at_grid = 0;      // threads that reached a grid barrier during the current pass
  bool descending = false;   // pass order of the current block
  bool in_launch = false;
  bool cooperative = false;  // a cooperative launch: every block's threads are fibers at once
  Fiber* current = nullptr;  // the running fiber; null in the launching context
  Fiber* creating = nullptr;
  void (*body)(void*) = nullptr;
  void* payload = nullptr;
  jmp_buf launcher{};  // the launching context, resumed when a block is done
  jmp_buf creator{};   // the context that is starting a new fiber
  // The launching OS thread's stack, as AddressSanitizer reports it at the first switch.
  const void* launcher_stack_bottom = nullptr;
  std::size_t launcher_stack_bytes = 0;
  void* launcher_fake_stack = nullptr;
  bool leaving_launcher = false;  // the switch under way started in the launching context
};

inline thread_local Scheduler t_scheduler;
inline thread_local dim3 t_thread_idx{0, 0, 0};
inline thread_local dim3 t_block_idx{0, 0, 0};
inline thread_local dim3 t_block_dim{1, 1, 1};
inline thread_local dim3 t_grid_dim{1, 1, 1};
// CUDA keeps the last error per host thread.
inline thread_local cudaError_t t_last_error = cudaSuccess;
inline thread_local std::uint64_t t_launch_count = 0;

// Constructed before every static __shared__ declaration is reached (see __shared__ above).
struct StaticSharedCheck {
  StaticSharedCheck() noexcept;
};

// Under AddressSanitizer __shared__ variables are process-wide statics: one launch at a time.
inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline const dim3& current_thread_index() noexcept { return t_thread_idx; }
inline const dim3& current_block_index() noexcept { return t_block_idx; }
inline const dim3& current_block_dim() noexcept { return t_block_dim; }
inline const dim3& current_grid_dim() noexcept { return t_grid_dim; }

[[noreturn]] inline void fatal(const char* message) noexcept {
  std::fprintf(stderr, "cuda_emulation: %s\n", message);
  std::fflush(stderr);
  std::abort();
}

// Stack switches announced to AddressSanitizer (no-ops without it): leaving the running context
// (a fiber, or null for the launching one) for `to`, and arriving in `self`.
inline void leave_for(Fiber* from, const Fiber* to) noexcept {
#ifdef CUDA_EMULATION_ASAN
  Scheduler& s = t_scheduler;
  s.leaving_launcher = from == nullptr;
  __sanitizer_start_switch_fiber(from ? &from->fake_stack : &s.launcher_fake_stack,
                                 to ? to->stack_bottom : s.launcher_stack_bottom,
                                 to ? to->stack_bytes : s.launcher_stack_bytes);
#else
  (void)from;
  (void)to;
#endif
}

inline void arrive_in(Fiber* self) noexcept {
#ifdef CUDA_EMULATION_ASAN
  Scheduler& s = t_scheduler;
  const void* bottom = nullptr;
  std::size_t bytes = 0;
  __sanitizer_finish_switch_fiber(self ? self->fake_stack : s.launcher_fake_stack, &bottom,
                                  &bytes);
  if (s.leaving_launcher) {
    s.launcher_stack_bottom = bottom;
    s.launcher_stack_bytes = bytes;
  }
#else
  (void)self;
#endif
}

[[noreturn]] inline void jump_to(Fiber* next) noexcept {
  Scheduler& s = t_scheduler;
  leave_for(s.current, next);
  s.current = next;
  t_thread_idx = next->thread_index;
  cuda_emulation_detail_longjmp(next->context, 1);
}

[[noreturn]] inline void jump_to_launcher() noexcept {
  Scheduler& s = t_scheduler;
  leave_for(s.current, nullptr);
  s.current = nullptr;
  cuda_emulation_detail_longjmp(s.launcher, 1);
}

// A thread must not end with asynchronous copies in flight: their data would never be read.
inline void check_no_copies_in_flight(const Fiber& fiber) noexcept {
  if (fiber.async_copies.empty()) return;
  std::fprintf(stderr,
               "cuda_emulation: thread (%u, %u, %u) of block (%u, %u, %u) returned with %zu "
               "asynchronous copies (__pipeline_memcpy_async) that it never waited for\n",
               fiber.thread_index.x, fiber.thread_index.y, fiber.thread_index.z, t_block_idx.x,
               t_block_idx.y, t_block_idx.z, fiber.async_copies.size());
  std::fflush(stderr);
  std::abort();
}

inline Fiber* fiber_at(const Scheduler& s, unsigned position) noexcept {
  return s.fibers[s.descending ? s.count - 1 - position : position];
}

// A cooperative launch's scheduler decides at the end of each pass (see "Cooperative launches").
inline Fiber* cooperative_pass_end() noexcept;

// The fiber to run after the current one reaches a barrier or returns; null when the block is done
// (the grid, in a cooperative launch).
inline Fiber* advance(bool exited) noexcept {
  Scheduler& s = t_scheduler;
  s.exited += exited ? 1u : 0u;
  if (++s.position < s.count) return fiber_at(s, s.position);
  if (s.cooperative) return cooperative_pass_end();
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
  arrive_in(self);
  if (_setjmp(self->context) == 0) {
    leave_for(self, nullptr);
    cuda_emulation_detail_longjmp(s.creator, 1);
  }
  arrive_in(self);
  for (;;) {
    s.body(s.payload);
    check_no_copies_in_flight(*self);
    self->async_group = 0;
    Fiber* const next = advance(true);
    if (_setjmp(self->context) == 0) {
      if (next != nullptr) jump_to(next);
      jump_to_launcher();
    }
    arrive_in(self);
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
    fiber->stack_bottom = static_cast<char*>(mapping) + page;
    fiber->stack_bytes = stack_bytes;
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
    if (_setjmp(s.creator) == 0) {
      leave_for(nullptr, fiber.get());
      setcontext(&context);
    }
    arrive_in(nullptr);
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
  arrive_in(nullptr);
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
  if (next == nullptr) fatal("a barrier ended the launch");  // unreachable: waiting threads remain
  if (next == self) return;
  if (_setjmp(self->context) == 0) jump_to(next);
  arrive_in(self);
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
#ifdef CUDA_EMULATION_ASAN
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
#endif
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
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorNotSupported: return "operation not supported";
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

// ---- Vector types, atomics, fences, cache-hinted loads -----------------------------------------
// The 16- and 8-byte vector types with CUDA's alignment: an access through a misaligned pointer
// is undefined behaviour that -fsanitize=alignment reports, as the GPU faults on it.
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Blocks run one after another on one OS thread, so these are atomic as they stand.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
template <typename T>
inline T __ldcg(const T* address) {
  return *address;
}

// ---- Asynchronous copies to shared memory: CUDA's cuda_pipeline_primitives.h ----------------
// __pipeline_memcpy_async(dst, src, size, zfill) copies size - zfill bytes from src and zeros
// the last zfill, asynchronously; __pipeline_commit() closes the calling thread's current group
// of copies; __pipeline_wait_prior(n) waits until at most the n most recently committed groups
// of the calling thread are still in flight. The data is visible to the issuing thread after
// its wait, and to the other threads of the block after a __syncthreads() that follows it.
//
// Emulated faithfully enough that misuse shows: a copy completes only at the issuing thread's
// wait (never at a barrier, nor by another thread's wait); until then its destination holds
// 0xFF bytes, so reading it early gives NaN (or -1) instead of the data. Aborted with a message,
// as undefined behaviour on a GPU: a size other than 4, 8 or 16 bytes, zfill > size, a
// destination or source not aligned to the size, a second copy in flight to the same bytes, a
// destination written (or a source changed) while its copy is in flight, and a thread that
// returns with copies it never waited for. Called outside a kernel it aborts too.
namespace cuda_emulation {
namespace detail {

[[noreturn]] __attribute__((__format__(__printf__, 2, 3))) inline void fail_async(
    const char* function, const char* format, ...) noexcept {
  std::fprintf(stderr, "cuda_emulation: %s", function);
  if (t_scheduler.current != nullptr)
    std::fprintf(stderr, " in thread (%u, %u, %u) of block (%u, %u, %u)", t_thread_idx.x,
                 t_thread_idx.y, t_thread_idx.z, t_block_idx.x, t_block_idx.y, t_block_idx.z);
  std::fprintf(stderr, ": ");
  va_list arguments;
  va_start(arguments, format);
  std::vfprintf(stderr, format, arguments);
  va_end(arguments);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

constexpr unsigned char kInFlight = 0xff;  // what a destination holds until its copy completes

inline Fiber& issuing_fiber(const char* function) noexcept {
  Fiber* const self = t_scheduler.current;
  if (self == nullptr) fail_async(function, "called outside a kernel run by cuda_emulation::launch");
  return *self;
}

inline void complete(const AsyncCopy& copy) noexcept {
  for (unsigned i = 0; i < copy.size; ++i) {
    if (copy.destination[i] != kInFlight)
      fail_async("__pipeline_wait_prior",
                 "the destination %p of an asynchronous copy was written while the copy was in "
                 "flight", static_cast<void*>(copy.destination));
  }
  if (std::memcmp(copy.source, copy.data, copy.bytes) != 0)
    fail_async("__pipeline_wait_prior",
               "the source %p of an asynchronous copy changed while the copy was in flight",
               static_cast<const void*>(copy.source));
  std::memcpy(copy.destination, copy.data, copy.bytes);
  std::memset(copy.destination + copy.bytes, 0, copy.size - copy.bytes);
}

}  // namespace detail
}  // namespace cuda_emulation

inline void __pipeline_memcpy_async(void* __restrict__ dst_shared,
                                    const void* __restrict__ src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  namespace emulation = ::cuda_emulation::detail;
  emulation::Fiber& self = emulation::issuing_fiber("__pipeline_memcpy_async");
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    emulation::fail_async("__pipeline_memcpy_async", "size %zu is not 4, 8 or 16 bytes",
                          size_and_align);
  if (zfill > size_and_align)
    emulation::fail_async("__pipeline_memcpy_async", "zfill %zu exceeds the size %zu", zfill,
                          size_and_align);
  if (reinterpret_cast<std::uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<std::uintptr_t>(src_global) % size_and_align != 0)
    emulation::fail_async("__pipeline_memcpy_async",
                          "destination %p or source %p is not aligned to the copy size %zu",
                          dst_shared, src_global, size_and_align);
  auto* const destination = static_cast<unsigned char*>(dst_shared);
  for (const emulation::AsyncCopy& other : self.async_copies) {
    if (destination < other.destination + other.size &&
        other.destination < destination + size_and_align)
      emulation::fail_async("__pipeline_memcpy_async",
                            "a second asynchronous copy to %p while one to %p is in flight",
                            dst_shared, static_cast<void*>(other.destination));
  }
  emulation::AsyncCopy copy;
  copy.destination = destination;
  copy.source = static_cast<const unsigned char*>(src_global);
  copy.bytes = static_cast<unsigned>(size_and_align - zfill);
  copy.size = static_cast<unsigned>(size_and_align);
  copy.group = self.async_group;
  std::memcpy(copy.data, src_global, copy.bytes);  // a source out of bounds fails here
  std::memset(destination, emulation::kInFlight, size_and_align);
  self.async_copies.push_back(copy);
}

inline void __pipeline_commit() {
  ++::cuda_emulation::detail::issuing_fiber("__pipeline_commit").async_group;
}

inline void __pipeline_wait_prior(size_t prior) {
  namespace emulation = ::cuda_emulation::detail;
  emulation::Fiber& self = emulation::issuing_fiber("__pipeline_wait_prior");
  // Groups [0, async_group) are committed; the newest `prior` of them may stay in flight, and so
  // do copies not yet committed (group == async_group).
  const std::uint64_t complete_below = self.async_group > prior ? self.async_group - prior : 0;
  std::size_t kept = 0;
  for (const emulation::AsyncCopy& copy : self.async_copies) {
    if (copy.group < complete_below) {
      emulation::complete(copy);
    } else {
      self.async_copies[kept++] = copy;
    }
  }
  self.async_copies.resize(kept);
}

// ---- Warp matrix functions: nvcuda::wmma, as CUDA's <mma.h> declares them ----------------------
// Used as in CUDA (`namespace wmma = nvcuda::wmma;`), with no include beyond this header.
//
// Subset:
//  - fragment<matrix_a | matrix_b, 16, 16, 16, __half | __nv_bfloat16, row_major | col_major>,
//    fragment<matrix_a | matrix_b, 16, 16, 8, precision::tf32, row_major | col_major> (storage
//    float) and fragment<accumulator, 16, 16, 16 | 8, float>; other fragments do not compile.
//  - fill_fragment, load_matrix_sync, store_matrix_sync, mma_sync (no satf argument) and
//    __float_to_tf32.
//
// Storage: real fragments hold a share of the tile in each lane, in a layout CUDA leaves
// unspecified. Here every thread's fragment holds the WHOLE tile (matrix_a: m x k, matrix_b:
// k x n, accumulator: m x n, each row-major in x[]), and each thread computes the warp's
// operation by itself, with no communication. So num_elements and the meaning of x[i] do not
// mirror the hardware: code under test must only fill/load/store/mma fragments, or apply one
// function to every element (for (i < num_elements) x[i] = f(x[i]), e.g. a scale or
// __float_to_tf32), which is layout-independent on both.
//
// Arithmetic: mma_sync converts each a and b element to float and, for every d element, adds the
// products to c in float in k order, ascending. Products of __half, __nv_bfloat16 and tf32 values
// are exact in float (barring overflow and underflow), so results are exact when the sums are;
// otherwise tensor cores, whose addition order and rounding are unspecified, may differ in the
// last bits.
//
// tf32: CUDA requires tf32 operands to be rounded by the caller (__float_to_tf32, which rounds to
// nearest, ties away from zero, to 10 explicit mantissa bits); tensor cores ignore the low 13
// bits of values that were not. The emulator rounds (as __float_to_tf32 does) on load, on fill
// and again in mma_sync (a no-op on rounded values).
//
// Preconditions that CUDA documents are checked, with a message to stderr and std::abort(),
// since they are what makes code fail on hardware: load/store pointers 256-bit (32-byte) aligned;
// ldm a multiple of 8 for __half/__nv_bfloat16 elements and of 4 for float and tf32 elements
// (16 bytes); the layout_t argument one of the two values; and, inside a launch, the calling
// thread in a full warp of 32 (a wmma function is warp-collective, and the last warp of a block
// whose size is not a multiple of 32 is partial). That all 32 lanes of a warp call the same
// function with the same arguments (convergence) cannot be checked here: each thread runs alone
// between barriers, so a call made by only some lanes, or with lane-dependent pointers, runs
// without an error.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};  // stored as float
}  // namespace precision

// Rounds to tf32 (10 explicit mantissa bits) to nearest, ties away from zero, like
// cvt.rna.tf32.f32; infinities and NaN are returned unchanged. The result is a float.
inline float __float_to_tf32(float in) noexcept {
  std::uint32_t bits;
  std::memcpy(&bits, &in, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return in;
  // Adding half a unit of the 13 dropped bits to the magnitude rounds it (ties away from zero);
  // a carry into the exponent is correct, up to infinity.
  bits = (bits + 0x1000u) & ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace wmma
}  // namespace nvcuda

namespace cuda_emulation {
namespace detail {
namespace wmma {

namespace api = ::nvcuda::wmma;

template <typename T>
struct Element {
  using storage = T;
};
template <>
struct Element<api::precision::tf32> {
  using storage = float;
};

template <typename Use, int m, int n, int k>
struct Shape {
  static constexpr int rows = std::is_same<Use, api::matrix_b>::value ? k : m;
  static constexpr int columns = std::is_same<Use, api::matrix_a>::value ? k : n;
};

template <typename Use, int m, int n, int k, typename T, typename Layout>
constexpr bool supported() {
  constexpr bool operand_layout =
      std::is_same<Layout, api::row_major>::value || std::is_same<Layout, api::col_major>::value;
  constexpr bool k16 = m == 16 && n == 16 && k == 16, k8 = m == 16 && n == 16 && k == 8;
  if (std::is_same<Use, api::accumulator>::value)
    return std::is_same<T, float>::value && std::is_void<Layout>::value && (k16 || k8);
  if (std::is_same<Use, api::matrix_a>::value || std::is_same<Use, api::matrix_b>::value)
    return operand_layout &&
           ((k16 && (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value)) ||
            (k8 && std::is_same<T, api::precision::tf32>::value));
  return false;
}

// An operand element as mma_sync multiplies it.
inline float operand(__half value) noexcept { return static_cast<float>(value); }
inline float operand(__nv_bfloat16 value) noexcept { return static_cast<float>(value); }
inline float operand_tf32(float value) noexcept { return api::__float_to_tf32(value); }

[[noreturn]] __attribute__((__format__(__printf__, 2, 3))) inline void fail(const char* function,
                                                                           const char* format,
                                                                           ...) noexcept {
  std::fprintf(stderr, "cuda_emulation: nvcuda::wmma::%s", function);
  if (t_scheduler.current != nullptr)
    std::fprintf(stderr, " in thread (%u, %u, %u) of block (%u, %u, %u)", t_thread_idx.x,
                 t_thread_idx.y, t_thread_idx.z, t_block_idx.x, t_block_idx.y, t_block_idx.z);
  std::fprintf(stderr, ": ");
  va_list arguments;
  va_start(arguments, format);
  std::vfprintf(stderr, format, arguments);
  va_end(arguments);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// wmma functions are warp-collective: a thread of a partial (last) warp has no full warp to run
// them with. Convergence of the warp cannot be checked (see above).
inline void check_warp(const char* function) noexcept {
  if (t_scheduler.current == nullptr) return;  // called outside a launch
  const unsigned count = t_block_dim.x * t_block_dim.y * t_block_dim.z;
  const unsigned linear =
      t_thread_idx.x + t_thread_idx.y * t_block_dim.x + t_thread_idx.z * t_block_dim.x * t_block_dim.y;
  const unsigned first = linear / 32 * 32;
  if (first + 32 > count)
    fail(function,
         "called by thread %u of a %u-thread block, in the partial warp of threads %u..%u: wmma "
         "functions are warp-collective and need all 32 threads of a warp",
         linear, count, first, count - 1);
}

template <typename Storage>
inline void check_memory(const char* function, const void* pointer, unsigned ldm) noexcept {
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0)
    fail(function, "pointer %p is not 256-bit (32-byte) aligned, as CUDA requires", pointer);
  constexpr unsigned multiple = 16 / sizeof(Storage);
  if (ldm % multiple != 0)
    fail(function,
         "ldm %u is not a multiple of %u, as CUDA requires for %u-byte elements (16 bytes)", ldm,
         multiple, static_cast<unsigned>(sizeof(Storage)));
}

inline bool row_major(const char* function, api::layout_t layout) noexcept {
  if (layout != api::mem_row_major && layout != api::mem_col_major)
    fail(function, "layout %d is neither mem_row_major nor mem_col_major", static_cast<int>(layout));
  return layout == api::mem_row_major;
}

// x[r * columns + c] <-> p[r * ldm + c] (row-major memory) or p[r + c * ldm] (column-major).
template <int rows, int columns, typename T, typename Convert>
inline void load(T* x, const T* p, unsigned ldm, bool row_major_memory, Convert convert) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < columns; ++c)
      x[r * columns + c] = convert(row_major_memory ? p[static_cast<std::size_t>(r) * ldm + c]
                                                    : p[r + static_cast<std::size_t>(c) * ldm]);
}

template <typename T>
inline T identity(T value) noexcept {
  return value;
}

}  // namespace wmma
}  // namespace detail
}  // namespace cuda_emulation

namespace nvcuda {
namespace wmma {

// Warp-collective (see above); every thread holds the whole tile.
template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment {
  static_assert(::cuda_emulation::detail::wmma::supported<Use, m, n, k, T, Layout>(),
                "cuda_emulation supports wmma::fragment<matrix_a or matrix_b, 16, 16, 16, __half "
                "or __nv_bfloat16, row_major or col_major>, <matrix_a or matrix_b, 16, 16, 8, "
                "precision::tf32, row_major or col_major> and <accumulator, 16, 16, 16 or 8, "
                "float>");
  using Shape = ::cuda_emulation::detail::wmma::Shape<Use, m, n, k>;

 public:
  typedef T element_type;
  typedef typename ::cuda_emulation::detail::wmma::Element<T>::storage storage_element_type;
  // The whole tile, unlike CUDA's per-lane share: see above.
  enum { num_elements = Shape::rows * Shape::columns };
  enum { num_storage_elements = num_elements };
  storage_element_type x[num_storage_elements];
};

template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void fill_fragment(
    fragment<Use, m, n, k, T, Layout>& f,
    const typename fragment<Use, m, n, k, T, Layout>::storage_element_type& value) {
  namespace emulation = ::cuda_emulation::detail::wmma;
  emulation::check_warp("fill_fragment");
  typename fragment<Use, m, n, k, T, Layout>::storage_element_type v = value;
  if constexpr (std::is_same<T, precision::tf32>::value) v = __float_to_tf32(v);
  for (auto& element : f.x) element = v;
}

// matrix_a (m x k) and matrix_b (k x n): the memory layout is the fragment's Layout; element
// (r, c) at p[r * ldm + c] (row_major) or p[r + c * ldm] (col_major).
template <typename Use, int m, int n, int k, typename T, typename Layout>
inline std::enable_if_t<std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value>
load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f,
                 const typename fragment<Use, m, n, k, T, Layout>::storage_element_type* p,
                 unsigned ldm) {
  namespace emulation = ::cuda_emulation::detail::wmma;
  using Storage = typename fragment<Use, m, n, k, T, Layout>::storage_element_type;
  using Shape = emulation::Shape<Use, m, n, k>;
  emulation::check_warp("load_matrix_sync");
  emulation::check_memory<Storage>("load_matrix_sync", p, ldm);
  const bool row_major_memory = std::is_same<Layout, row_major>::value;
  if constexpr (std::is_same<T, precision::tf32>::value)
    emulation::load<Shape::rows, Shape::columns>(f.x, p, ldm, row_major_memory, &__float_to_tf32);
  else
    emulation::load<Shape::rows, Shape::columns>(f.x, p, ldm, row_major_memory,
                                                 &emulation::identity<Storage>);
}

// Accumulators (m x n): element (r, c) at p[r * ldm + c] (mem_row_major) or p[r + c * ldm].
template <int m, int n, int k, typename T>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& f,
                             const typename fragment<accumulator, m, n, k, T>::storage_element_type* p,
                             unsigned ldm, layout_t layout) {
  namespace emulation = ::cuda_emulation::detail::wmma;
  using Storage = typename fragment<accumulator, m, n, k, T>::storage_element_type;
  emulation::check_warp("load_matrix_sync");
  emulation::check_memory<Storage>("load_matrix_sync", p, ldm);
  const bool row_major_memory = emulation::row_major("load_matrix_sync", layout);
  emulation::load<m, n>(f.x, p, ldm, row_major_memory, &emulation::identity<Storage>);
}

template <int m, int n, int k, typename T>
inline void store_matrix_sync(typename fragment<accumulator, m, n, k, T>::storage_element_type* p,
                              const fragment<accumulator, m, n, k, T>& f, unsigned ldm,
                              layout_t layout) {
  namespace emulation = ::cuda_emulation::detail::wmma;
  using Storage = typename fragment<accumulator, m, n, k, T>::storage_element_type;
  emulation::check_warp("store_matrix_sync");
  emulation::check_memory<Storage>("store_matrix_sync", p, ldm);
  const bool row_major_memory = emulation::row_major("store_matrix_sync", layout);
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c)
      (row_major_memory ? p[static_cast<std::size_t>(r) * ldm + c]
                        : p[r + static_cast<std::size_t>(c) * ldm]) = f.x[r * n + c];
}

// d = a * b + c; d may be c.
template <int m, int n, int k, typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, m, n, k, float>& d,
                     const fragment<matrix_a, m, n, k, T, LayoutA>& a,
                     const fragment<matrix_b, m, n, k, T, LayoutB>& b,
                     const fragment<accumulator, m, n, k, float>& c) {
  namespace emulation = ::cuda_emulation::detail::wmma;
  emulation::check_warp("mma_sync");
  float a_values[m * k], b_values[k * n];
  for (int i = 0; i < m * k; ++i) {
    if constexpr (std::is_same<T, precision::tf32>::value)
      a_values[i] = emulation::operand_tf32(a.x[i]);
    else
      a_values[i] = emulation::operand(a.x[i]);
  }
  for (int i = 0; i < k * n; ++i) {
    if constexpr (std::is_same<T, precision::tf32>::value)
      b_values[i] = emulation::operand_tf32(b.x[i]);
    else
      b_values[i] = emulation::operand(b.x[i]);
  }
  for (int r = 0; r < m; ++r) {
    float row[n];
    for (int col = 0; col < n; ++col) row[col] = c.x[r * n + col];
    for (int i = 0; i < k; ++i) {
      const float a_value = a_values[r * k + i];
      for (int col = 0; col < n; ++col) {
        // Separate statements, so that the product is not contracted into an fma.
        const float product = a_value * b_values[i * n + col];
        row[col] += product;
      }
    }
    for (int col = 0; col < n; ++col) d.x[r * n + col] = row[col];
  }
}

}  // namespace wmma
}  // namespace nvcuda

// ---- Cooperative launches ---------------------------------------------------------------------
// cuda_emulation::launch_cooperative(kernel, grid, block, shared_bytes, stream, args...) stands for
// cudaLaunchCooperativeKernel. Every thread of every block is a fiber at once; the blocks take
// turns between grid barriers. A block runs (its threads switching at __syncthreads() as in an
// ordinary launch) until all of its threads wait at cooperative_groups::this_grid().sync() or have
// returned; then the next block runs. When every block that has not returned waits, the barrier
// opens. Blocks run in ascending order between one pair of grid barriers and in descending order
// between the next, so that code which reads in one phase what another block writes in the same
// phase sees the write in one phase and not in the next.
//
// Checked, each with a message and std::abort(): a grid barrier that some blocks wait at and
// others have returned without reaching (a deadlock on a GPU), threads of one block waiting at a
// grid barrier and at __syncthreads() at once, and threads that return while others of their
// block wait at a grid barrier. Grid barriers that are reached the same number of times from
// different call sites are not told apart.
//
// Shared memory: each block gets its own dynamic shared memory (dynamic_shared_memory(), for
// `extern __shared__`), an allocation of exactly the launch's size (AddressSanitizer guards its
// end), filled with 0xFF bytes (a NaN in every floating-point type) before the kernel starts, so
// that reading what was never written shows. Static __shared__ variables would be one for all
// the blocks (they are per OS thread, or process-wide under AddressSanitizer): reaching the
// declaration of one in a cooperative launch of more than one block aborts with a message.
//
// Under AddressSanitizer every switch between the grid's fibers is announced to it, as in
// ordinary launches, and cooperative launches take the same one-launch-at-a-time lock.
//
// The emulated device (device_model()) answers cudaDeviceGetAttribute,
// cudaOccupancyMaxActiveBlocksPerMultiprocessor, cudaFuncSetAttribute, cudaStreamIsCapturing and
// the version queries, and the cooperative launch checks its limits as CUDA does: more blocks than
// fit on the device at once is cudaErrorCooperativeLaunchTooLarge; dynamic shared memory above
// 48 KiB needs cudaFuncAttributeMaxDynamicSharedMemorySize first. Tests change the model to
// emulate smaller devices, a device without cooperative launches, a limit on co-resident blocks
// below what occupancy promises (as an MPS client's limit on multiprocessors gives), or a stream
// being captured into a CUDA graph.

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

namespace cuda_emulation {

// What the emulated device reports. The defaults are an H100's or H200's limits on a small GPU of
// eight multiprocessors (emulated grids stay small).
struct DeviceModel {
  int multiprocessors = 8;
  int shared_bytes_per_block_optin = 227 * 1024;
  int shared_bytes_per_multiprocessor = 228 * 1024;
  int shared_bytes_reserved_per_block = 1024;  // the runtime's own share of each block's memory
  int max_threads_per_multiprocessor = 2048;
  int max_blocks_per_multiprocessor = 32;
  int compute_capability_major = 9;
  bool cooperative_launch = true;
  int coresident_block_limit = 0;  // > 0: cooperative launches of more blocks fail
  bool capturing = false;          // cudaStreamIsCapturing reports an active capture
  int runtime_version = 13000;     // cudaRuntimeGetVersion, as 1000 * major + 10 * minor
  int driver_version = 13000;      // cudaDriverGetVersion
};

inline DeviceModel& device_model() {
  static DeviceModel model;
  return model;
}

namespace detail {

constexpr std::size_t kStaticSharedLimit = 48 * 1024;  // dynamic shared memory without opt-in

struct FunctionAttributes {
  const void* function;
  int max_dynamic_shared_bytes;
};

inline std::vector<FunctionAttributes>& function_attributes() {
  static std::vector<FunctionAttributes> attributes;
  return attributes;
}

inline std::size_t max_dynamic_shared_bytes(const void* function) {
  for (const FunctionAttributes& a : function_attributes())
    if (a.function == function) return static_cast<std::size_t>(a.max_dynamic_shared_bytes);
  return kStaticSharedLimit;
}

inline int occupancy(const void* function, int block_threads, std::size_t shared_bytes) {
  const DeviceModel& m = device_model();
  if (block_threads <= 0 || block_threads > 1024) return 0;
  if (shared_bytes > max_dynamic_shared_bytes(function)) return 0;
  int blocks = m.max_blocks_per_multiprocessor;
  blocks = std::min(blocks, m.max_threads_per_multiprocessor / block_threads);
  const std::size_t per_block = shared_bytes + static_cast<std::size_t>(m.shared_bytes_reserved_per_block);
  blocks = std::min<long long>(blocks, static_cast<long long>(m.shared_bytes_per_multiprocessor / per_block));
  return blocks;
}

// The grid of a cooperative launch. The running block's pass state is the Scheduler's.
struct Grid {
  Fiber** fibers = nullptr;  // block b's threads are fibers[b * threads, (b + 1) * threads)
  unsigned blocks = 0;
  unsigned threads = 0;      // per block
  dim3 shape{1, 1, 1};
  std::vector<unsigned char> state;  // per block: kRunnable, kWaiting, kReturned
  unsigned turn = 0;         // how many blocks have had their turn in the current phase
  unsigned current = 0;      // the running block
  unsigned waiting = 0;      // blocks waiting at the grid barrier
  unsigned returned = 0;     // blocks whose threads have all returned
  unsigned phase = 0;        // grid barriers opened so far
  std::vector<unsigned char*> shared;  // per block: its dynamic shared memory, or empty
};
enum : unsigned char { kRunnable = 0, kWaiting = 1, kReturned = 2 };
constexpr std::align_val_t kSharedAlignment{128};

inline thread_local Grid t_grid;
inline thread_local unsigned char* t_dynamic_shared = nullptr;

inline StaticSharedCheck::StaticSharedCheck() noexcept {
  const Scheduler& s = t_scheduler;
  if (!s.cooperative || t_grid.blocks <= 1) return;
  std::fprintf(stderr,
               "cuda_emulation: a static __shared__ variable in block (%u, %u, %u) of a "
               "cooperative launch of %u blocks: the emulator would give every block the same "
               "one; use dynamic shared memory (cuda_emulation::dynamic_shared_memory(), "
               "extern __shared__ in CUDA)\n",
               t_block_idx.x, t_block_idx.y, t_block_idx.z, t_grid.blocks);
  std::fflush(stderr);
  std::abort();
}

inline dim3 block_index_of(const Grid& g, unsigned b) {
  return dim3(b % g.shape.x, b / g.shape.x % g.shape.y, b / (g.shape.x * g.shape.y));
}

// Makes block b the running one, at the start of a pass; returns its first fiber.
inline Fiber* enter_block(unsigned b) noexcept {
  Scheduler& s = t_scheduler;
  Grid& g = t_grid;
  g.current = b;
  s.fibers = g.fibers + static_cast<std::size_t>(b) * g.threads;
  s.count = g.threads;
  s.position = 0;
  s.exited = 0;
  s.at_grid = 0;
  // Alternate blocks run their threads in reverse, as in ordinary launches.
  s.descending = ((b ^ g.phase) & 1u) != 0;
  t_block_idx = block_index_of(g, b);
  t_dynamic_shared = g.shared.empty() ? nullptr : g.shared[b];
  return fiber_at(s, 0);
}

[[noreturn]] __attribute__((__format__(__printf__, 1, 2))) inline void grid_fatal(
    const char* format, ...) noexcept {
  std::fprintf(stderr, "cuda_emulation: ");
  va_list arguments;
  va_start(arguments, format);
  std::vfprintf(stderr, format, arguments);
  va_end(arguments);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// The next block to run: the next runnable one of this phase, else (every block that has not
// returned waits) the first of the next phase; null when every block has returned.
inline Fiber* next_block() noexcept {
  Grid& g = t_grid;
  while (++g.turn < g.blocks) {
    const unsigned b = (g.phase & 1u) ? g.blocks - 1 - g.turn : g.turn;
    if (g.state[b] == kRunnable) return enter_block(b);
  }
  if (g.waiting == 0) return nullptr;
  if (g.returned != 0) {
    unsigned first_returned = 0;
    while (g.state[first_returned] != kReturned) ++first_returned;
    const dim3 r = block_index_of(g, first_returned);
    grid_fatal("deadlock at a grid barrier (cooperative_groups grid sync) in a (%u, %u, %u) grid: "
               "%u of %u blocks wait at grid barrier %u, which the other %u (the first: block "
               "(%u, %u, %u)) returned without reaching; a barrier missed by some blocks hangs the "
               "GPU", g.shape.x, g.shape.y, g.shape.z, g.waiting, g.blocks, g.phase + 1,
               g.returned, r.x, r.y, r.z);
  }
  ++g.phase;
  g.waiting = 0;
  for (unsigned char& st : g.state) st = kRunnable;
  g.turn = 0;
  return enter_block((g.phase & 1u) ? g.blocks - 1 : 0);
}

inline Fiber* cooperative_pass_end() noexcept {
  Scheduler& s = t_scheduler;
  Grid& g = t_grid;
  const unsigned at_block_barrier = s.count - s.exited - s.at_grid;
  if (at_block_barrier == s.count) {  // a __syncthreads(): the block's next pass
    s.position = 0;
    return fiber_at(s, 0);
  }
  if (s.exited == s.count) {
    g.state[g.current] = kReturned;
    ++g.returned;
    return next_block();
  }
  if (s.at_grid == s.count) {
    g.state[g.current] = kWaiting;
    ++g.waiting;
    return next_block();
  }
  grid_fatal("mismatched barriers in block (%u, %u, %u) of a (%u, %u, %u) cooperative grid: of "
             "its %u threads, %u wait at a grid barrier, %u at __syncthreads() and %u have "
             "returned (undefined behaviour in CUDA; a hang on a GPU)",
             t_block_idx.x, t_block_idx.y, t_block_idx.z, g.shape.x, g.shape.y, g.shape.z,
             s.count, s.at_grid, at_block_barrier, s.exited);
}

// Waits at the grid barrier: switches to the next fiber of the grid, returns when the barrier
// opens.
__attribute__((__noinline__)) inline void grid_barrier() {
  Scheduler& s = t_scheduler;
  Fiber* const self = s.current;
  if (self == nullptr || !s.cooperative)
    fatal("a grid barrier (cooperative_groups::this_grid().sync()) outside a kernel launched "
          "with cuda_emulation::launch_cooperative (cudaLaunchCooperativeKernel)");
  ++s.at_grid;
  Fiber* const next = advance(false);
  if (next == nullptr) fatal("a grid barrier ended the launch");  // unreachable: self waits
  if (next == self) return;
  if (_setjmp(self->context) == 0) jump_to(next);
  arrive_in(self);
}

__attribute__((__noinline__)) inline void run_cooperative_grid(dim3 grid, dim3 block,
                                                                std::size_t shared_bytes,
                                                                void (*body)(void*), void* payload) {
  Scheduler& s = t_scheduler;
  if (s.in_launch) fatal("a kernel launch inside a kernel is not supported");
  Grid& g = t_grid;
  g.threads = block.x * block.y * block.z;
  g.blocks = grid.x * grid.y * grid.z;
  g.shape = grid;
  const std::size_t total = static_cast<std::size_t>(g.blocks) * g.threads;
  g.fibers = fiber_pool().reserve(static_cast<unsigned>(total));
  for (std::size_t i = 0; i < total; ++i) {
    const unsigned t = static_cast<unsigned>(i % g.threads);
    g.fibers[i]->thread_index = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
  }
  g.state.assign(g.blocks, kRunnable);
  g.turn = g.waiting = g.returned = g.phase = 0;
  g.shared.assign(shared_bytes == 0 ? 0 : g.blocks, nullptr);
  for (unsigned char*& memory : g.shared) {
    memory = static_cast<unsigned char*>(::operator new(shared_bytes, kSharedAlignment));
    std::memset(memory, 0xFF, shared_bytes);
  }
  s.body = body;
  s.payload = payload;
  s.in_launch = true;
  s.cooperative = true;
  t_grid_dim = grid;
  t_block_dim = block;
  Fiber* const first = enter_block(0);
  if (_setjmp(s.launcher) == 0) jump_to(first);
  arrive_in(nullptr);
  s.cooperative = false;
  s.in_launch = false;
  s.body = nullptr;
  s.payload = nullptr;
  s.at_grid = 0;
  t_dynamic_shared = nullptr;
  for (unsigned char* memory : g.shared) ::operator delete(memory, kSharedAlignment);
  g.shared.clear();
  t_thread_idx = dim3(0, 0, 0);
  t_block_idx = dim3(0, 0, 0);
}

}  // namespace detail

// The running block's dynamic shared memory (what `extern __shared__` declares in CUDA), 128-byte
// aligned; null outside a cooperative launch or with none requested.
inline unsigned char* dynamic_shared_memory() noexcept { return detail::t_dynamic_shared; }

// cudaLaunchCooperativeKernel(kernel, grid, block, args, shared_bytes, stream).
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block,
                               std::size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "cuda_emulation::launch_cooperative: wrong number of kernel arguments");
  (void)stream;  // launches are synchronous
  const DeviceModel& m = device_model();
  const void* function = reinterpret_cast<const void*>(kernel);
  cudaError_t error = detail::validate(grid, block, 0);
  if (error == cudaSuccess && !m.cooperative_launch) error = cudaErrorNotSupported;
  if (error == cudaSuccess && shared_bytes > detail::max_dynamic_shared_bytes(function))
    error = cudaErrorInvalidValue;
  if (error == cudaSuccess) {
    const std::uint64_t blocks = std::uint64_t{grid.x} * grid.y * grid.z;
    const int per_multiprocessor =
        detail::occupancy(function, static_cast<int>(block.x * block.y * block.z), shared_bytes);
    if (blocks > static_cast<std::uint64_t>(per_multiprocessor) * m.multiprocessors ||
        (m.coresident_block_limit > 0 && blocks > static_cast<std::uint64_t>(m.coresident_block_limit)))
      error = cudaErrorCooperativeLaunchTooLarge;
  }
  if (error != cudaSuccess) {
    detail::t_last_error = error;
    return error;
  }
  struct Payload {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Payload payload{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
#ifdef CUDA_EMULATION_ASAN
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
#endif
  detail::run_cooperative_grid(
      grid, block, shared_bytes,
      [](void* p) {
        Payload& launched = *static_cast<Payload*>(p);
        std::apply(launched.kernel, launched.params);
      },
      &payload);
  ++detail::t_launch_count;
  return cudaSuccess;
}

}  // namespace cuda_emulation

namespace cooperative_groups {

// this_grid() of a cooperative launch; sync() is the grid barrier.
class grid_group {
 public:
  void sync() const {
    __asm__ __volatile__("" ::: "memory");
    ::cuda_emulation::detail::grid_barrier();
    __asm__ __volatile__("" ::: "memory");
  }
  bool is_valid() const { return ::cuda_emulation::detail::t_scheduler.cooperative; }
  unsigned long long num_threads() const {
    return static_cast<unsigned long long>(::cuda_emulation::detail::t_grid.blocks) *
           ::cuda_emulation::detail::t_grid.threads;
  }
};

inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups

// ---- Runtime queries of the emulated device ---------------------------------------------------
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  const ::cuda_emulation::DeviceModel& m = ::cuda_emulation::device_model();
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = m.multiprocessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = m.compute_capability_major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = m.shared_bytes_per_multiprocessor;
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = m.cooperative_launch ? 1 : 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = m.shared_bytes_per_block_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*function)(Params...), cudaFuncAttribute attribute,
                                 int value) {
  const ::cuda_emulation::DeviceModel& m = ::cuda_emulation::device_model();
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > m.shared_bytes_per_block_optin) {
    ::cuda_emulation::detail::t_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  const void* key = reinterpret_cast<const void*>(function);
  for (auto& a : ::cuda_emulation::detail::function_attributes()) {
    if (a.function == key) {
      a.max_dynamic_shared_bytes = value;
      return cudaSuccess;
    }
  }
  ::cuda_emulation::detail::function_attributes().push_back({key, value});
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks,
                                                          void (*function)(Params...),
                                                          int block_threads,
                                                          std::size_t shared_bytes) {
  *blocks = ::cuda_emulation::detail::occupancy(reinterpret_cast<const void*>(function),
                                                block_threads, shared_bytes);
  return cudaSuccess;
}

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = ::cuda_emulation::device_model().capturing ? cudaStreamCaptureStatusActive
                                                         : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = ::cuda_emulation::device_model().runtime_version;
  return cudaSuccess;
}

inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = ::cuda_emulation::device_model().driver_version;
  return cudaSuccess;
}
