// The order in which an LSTM layer visits its time steps, written once for every device's glue.
//
// The forward pass processes step n = 0 .. T-1 at time t (T-1-n with reverse) from the state of
// time t_prev; inference keeps only two cell-state buffers, used in turn. The backward pass walks
// the same times the other way round, passing dL/dh and dL/dc between two buffers in turn.
// Torch-free and header-only, so that host code of any build (C++, nvcc) can include it.
#pragma once

#include <cstdint>

namespace lstm_fused {

struct ForwardStepOrder {
  int64_t t;          // the time step processed
  int64_t t_prev;     // the time step whose state it starts from (meaningless when first)
  bool first;         // starts from the initial state h0, c0
  int64_t slot;       // the cell-state buffer written: t when training, else n % 2
  int64_t slot_prev;  // the cell-state buffer read (meaningless when first)
};

// Forward step n of T.
inline ForwardStepOrder forward_step_order(int64_t n, int64_t T, bool reverse, bool training) {
  const int64_t t = reverse ? T - 1 - n : n;
  const int64_t t_prev = reverse ? t + 1 : t - 1;
  return {t, t_prev, n == 0, training ? t : n % 2, training ? t_prev : (n + 1) % 2};
}

// The time step whose outputs h_n and c_n are: the last one processed.
inline int64_t last_step_time(int64_t T, bool reverse) { return reverse ? 0 : T - 1; }

struct BackwardStepOrder {
  int64_t t;          // the time step processed
  int64_t t_prev;     // the time step whose state t started from
  int64_t t_next;     // the time step that started from t's state (meaningless when last)
  bool from_initial;  // t started from the initial state h0, c0
  bool last;          // t is the last step of the forward pass: no step started from it
  int64_t in;         // the buffer holding dL/dh_t and dL/dc_t: n % 2
  int64_t out;        // the buffer receiving dL/dh_{t_prev} and dL/dc_{t_prev}: 1 - in
};

// Backward step n of T: the forward steps in reverse order.
inline BackwardStepOrder backward_step_order(int64_t n, int64_t T, bool reverse) {
  const int64_t t = reverse ? n : T - 1 - n;
  const int64_t t_prev = reverse ? t + 1 : t - 1;
  const int64_t t_next = reverse ? t - 1 : t + 1;
  const bool from_initial = reverse ? t_prev >= T : t_prev < 0;
  return {t, t_prev, t_next, from_initial, n == 0, n % 2, 1 - n % 2};
}

// The time step processed first by the forward pass (the one that started from h0, c0).
inline int64_t first_step_time(int64_t T, bool reverse) { return reverse ? T - 1 : 0; }

}  // namespace lstm_fused
