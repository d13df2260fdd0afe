// Argument blocks of the SDE step kernels. Python fills them from checked torch tensors
// (python/flowsteer/ops/backends/cpu.py and cuda.py); every pointer is either null or points at `batch * numel`
// contiguous elements of `dtype`, except the per-sample float arrays of length `batch`.
#pragma once
#include <cstdint>

// The options of one SDE step, listed once: X(type, name, default, lo, hi). The argument structs
// below declare them as fields, and the bindings accept each as a keyword of the same name and
// check it against [lo, hi] (hi < lo: any value). Python's flowsteer.ops.options.SdeOptions has
// the same fields. A new option is a line here, a field there, and the kernels that use it.
#define FLOWSTEER_SDE_OPTIONS(X)                                                       \
  X(int, kind, 0, 0, 3)            /* StepKind: ode, flow, dance, cps (sde_math.h) */ \
  X(float, noise_level, 0.f, 0, 10) /* a: Flow-GRPO's noise_level, DanceGRPO's eta */ \
  X(float, sigma_max, 0.f, 0, 1)    /* Flow-GRPO's sigma~ at sigma == 1 */            \
  X(uint64_t, seed, 0, 0, -1)       /* Philox key of drawn noise */                   \
  X(uint64_t, offset, 0, 0, -1)     /* Philox counter words 2-3 */                    \
  X(int, lp_form, 0, 0, 1)          /* LogProbForm */                                 \
  X(int, kl_form, 0, 0, 2)          /* KlForm (0: no KL) */                           \
  X(bool, reduce_mean, true, 0, 1)  /* mean (else sum) over a sample's elements */    \
  X(bool, lp_guided, false, 0, 1)   /* log-prob under the guided mean */

#define FLOWSTEER_DECLARE_OPTION(type, name, init, lo, hi) type name = init;

namespace flowsteer {

// Elements of one sample that one CUDA block reduces in the forward. Python sizes the workspace
// from it (flowsteer._C.cuda_chunk): [batch, ceil(numel / kCudaChunk), 2] floats.
constexpr int64_t kCudaChunk = 2048;

struct SdeForwardArgs {
  // Inputs, all of `dtype`, [batch, numel]. noise, prev_sample, guidance and ref_v may be null.
  const void* v = nullptr;
  const void* x = nullptr;
  const void* noise = nullptr;        // sample mode only; null means Philox(seed, offset)
  const void* prev_sample = nullptr;  // non-null: evaluate mode
  const void* guidance = nullptr;     // reward gradient G
  const void* ref_v = nullptr;        // reference-policy velocity, for the KL term
  // Per-sample fp32 [batch].
  const float* sigma = nullptr;
  const float* sigma_next = nullptr;
  const float* guidance_coef = nullptr;  // c_b / norm_b, so that mean_g = mean + coef * G
  // Outputs. out_sample/out_mean are `dtype` [batch, numel]; the rest fp32 [batch]. Any may be null.
  void* out_sample = nullptr;
  void* out_mean = nullptr;
  float* out_log_prob = nullptr;
  float* out_std = nullptr;
  float* out_kl = nullptr;
  // GPU only: fp32 [batch, num_chunks, 2] partial sums for a deterministic two-stage reduction.
  float* workspace = nullptr;
  int64_t batch = 0;
  int64_t numel = 0;
  int dtype = 0;
  FLOWSTEER_SDE_OPTIONS(FLOWSTEER_DECLARE_OPTION)
};

struct SdeBackwardArgs {
  const void* v = nullptr;
  const void* x = nullptr;
  const void* sample = nullptr;  // the x' the log-prob was taken at (given or drawn)
  const void* guidance = nullptr;
  const void* ref_v = nullptr;
  const float* sigma = nullptr;
  const float* sigma_next = nullptr;
  const float* guidance_coef = nullptr;
  // Incoming gradients; any may be null. grad_mean and grad_sample are `dtype`, the others fp32 [batch].
  const float* grad_log_prob = nullptr;
  const float* grad_kl = nullptr;
  const void* grad_mean = nullptr;
  const void* grad_sample = nullptr;
  // Outgoing gradients, `dtype` [batch, numel]; any may be null.
  void* grad_v = nullptr;
  void* grad_x = nullptr;
  void* grad_ref_v = nullptr;
  int64_t batch = 0;
  int64_t numel = 0;
  int dtype = 0;
  FLOWSTEER_SDE_OPTIONS(FLOWSTEER_DECLARE_OPTION)
};

// Segmented per-group z-scores. The CPU code groups `group_ids` itself; the GPU code takes the
// segments ready-made: `order` lists sample indices group by group, group g at
// order[offsets[g] .. offsets[g + 1]).
struct GroupAdvantageArgs {
  const float* rewards = nullptr;     // [n, k]
  const int64_t* group_ids = nullptr; // [n], arbitrary integers (CPU)
  const int64_t* order = nullptr;     // [n] (GPU)
  const int64_t* offsets = nullptr;   // [num_groups + 1] (GPU)
  int64_t num_groups = 0;             // (GPU)
  const float* weights = nullptr;     // [k]
  const float* global_std = nullptr;  // [k], used when std_mode == 1
  float* out = nullptr;               // [n]
  int64_t n = 0;
  int64_t k = 0;
  int std_mode = 0;  // 0 per group, 1 global, 2 none
  float eps = 1e-4f;
  float clip = 5.0f;  // <= 0: no clip
};

// Pref-GRPO win rates: out[m, i] = mean over j != i of prefs[m, i, j] (NaN counts as 0.5).
struct WinRateArgs {
  const float* prefs = nullptr;  // [m, group_size, group_size]
  float* out = nullptr;          // [m, group_size]
  int64_t m = 0;
  int64_t group_size = 0;
};

// Pareto mask: out[i] = 1 where no sample of i's group dominates it. Segments as in
// GroupAdvantageArgs (the CPU builds them from group_ids; the GPU takes order and offsets).
struct ParetoArgs {
  const float* rewards = nullptr;      // [n, k]
  const int64_t* group_ids = nullptr;  // [n] (CPU)
  const int64_t* order = nullptr;      // [n] (GPU)
  const int64_t* offsets = nullptr;    // [num_groups + 1] (GPU)
  int64_t num_groups = 0;
  uint8_t* out = nullptr;              // [n]
  int64_t n = 0;
  int64_t k = 0;
};

}  // namespace flowsteer
