// CUDA kernels of the SDE step: the fused forward (sample or evaluate, log-prob, KL), its backward,
// and the raw Philox normal stream. Every formula comes from csrc/include/flowsteer/; the per-element
// operations are those of csrc/cpu/sde_step.cpp in the same order, so that with --fmad=false the
// samples and means are the CPU's bits. The log-prob and KL sums are reduced in a fixed order
// (per-thread, warp tree, block tree, then per-sample over chunks), never with atomics, so they
// are bitwise reproducible from run to run.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flowsteer/philox.h"
#include "flowsteer/cuda_launch.h"
#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

namespace flowsteer {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements of one chunk that each thread handles, kUnroll at a time: a pass issues all of its
// loads before any math, so a thread keeps kUnroll independent loads per input in flight.
constexpr int kPerThread = int(kCudaChunk / kThreads);
constexpr int kUnroll = 4;
static_assert(kPerThread % kUnroll == 0, "the passes must cover a chunk");
static_assert(kCudaChunk % kThreads == 0, "a chunk must split evenly over the threads of a block");
static_assert(kCudaChunk % 4 == 0, "a chunk must start on the same Philox lane as its sample");
// Philox blocks that overlap one chunk: kCudaChunk / 4, plus one when the sample does not start on
// a multiple of 4 (numel % 4 != 0).
constexpr int kNoiseGroups = int(kCudaChunk / 4) + 1;
// gridDim.y (and z) may not exceed this; larger batches loop inside the kernel.
constexpr int64_t kMaxGridY = 65535;
// gridDim.x may not exceed 2^31 - 1; grid-stride loops take the rest.
constexpr int64_t kMaxGridX = int64_t(1) << 30;

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block in a fixed tree; the result is valid in thread 0 only.
// Starts with a barrier-free warp step and contains one __syncthreads: all threads must call it.
__device__ __forceinline__ void block_sum2(float& a, float& b, float (*scratch)[kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    scratch[0][warp] = a;
    scratch[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? scratch[0][lane] : 0.0f);
    b = warp_sum(lane < kWarps ? scratch[1][lane] : 0.0f);
  }
}

// Grid (chunks, min(batch, 65535)): block (ch, b) handles elements [ch * kCudaChunk, ...) of sample
// b and writes its raw sums of (x' - mean_lp)^2 and (mean - ref_mean)^2 to the workspace.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) sde_forward_kernel(const SdeForwardArgs a, int64_t num_chunks) {
  using S = Storage<T>;
  __shared__ __align__(16) float s_noise[kNoiseGroups * 4];
  __shared__ float s_red[2][kWarps];

  const int64_t ch = blockIdx.x;
  const int64_t n0 = ch * kCudaChunk;
  const int len = int(a.numel - n0 < kCudaChunk ? a.numel - n0 : kCudaChunk);
  const bool sample_mode = a.prev_sample == nullptr;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
    const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
    const bool draw = sample_mode && c.std != 0.0f;
    const bool philox = draw && a.noise == nullptr;
    // Pointers at element n0 of sample b; t below is the element's index within the chunk.
    const int64_t start = b * a.numel + n0;
    const T* v = static_cast<const T*>(a.v) + start;
    const T* x = static_cast<const T*>(a.x) + start;
    const T* noise_in = (draw && a.noise) ? static_cast<const T*>(a.noise) + start : nullptr;
    const T* prev = sample_mode ? nullptr : static_cast<const T*>(a.prev_sample) + start;
    const T* guide = a.guidance ? static_cast<const T*>(a.guidance) + start : nullptr;
    const T* ref_v = a.ref_v ? static_cast<const T*>(a.ref_v) + start : nullptr;
    T* out_sample = a.out_sample ? static_cast<T*>(a.out_sample) + start : nullptr;
    T* out_mean = a.out_mean ? static_cast<T*>(a.out_mean) + start : nullptr;

    // Philox blocks j in [g0, g1] cover global elements [start, start + len); one call serves four
    // elements. s_noise[e - 4 * g0] is the normal of global element e, as in the CPU's tile buffer,
    // so element t of the chunk reads s_noise[lead + t] with lead = start - 4 * g0 in 0..3.
    const int64_t g0 = start >> 2;
    const int lead = int(start - 4 * g0);
    if (philox) {
      const int64_t g1 = (start + len - 1) >> 2;
      for (int64_t j = g0 + threadIdx.x; j <= g1; j += kThreads) {
        float z[4];
        philox_normal4(a.seed, a.offset, uint64_t(j), z);
        reinterpret_cast<float4*>(s_noise)[j - g0] = make_float4(z[0], z[1], z[2], z[3]);
      }
    }
    // Also orders this iteration's writes of s_noise after the previous iteration's reads.
    __syncthreads();

    float lp_acc = 0.0f, kl_acc = 0.0f;
#pragma unroll 1
    for (int pass = 0; pass < kPerThread; pass += kUnroll) {
      // All loads of a pass before any store: the outputs may not be assumed distinct from the
      // inputs, so the compiler would not hoist the next element's loads above this one's stores.
      float xr[kUnroll], vr[kUnroll], gr[kUnroll], pr[kUnroll], rr[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int t = int(threadIdx.x) + (pass + k) * kThreads;
        xr[k] = vr[k] = gr[k] = pr[k] = rr[k] = 0.0f;
        if (t < len) {
          xr[k] = S::load(x, t);
          vr[k] = S::load(v, t);
          if (guide) gr[k] = S::load(guide, t);
          if (ref_v) rr[k] = S::load(ref_v, t);
          if (prev) pr[k] = S::load(prev, t);
          else if (noise_in) pr[k] = S::load(noise_in, t);
          else if (philox) pr[k] = s_noise[lead + t];
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int t = int(threadIdx.x) + (pass + k) * kThreads;
        if (t < len) {
          const float mean = c.cx * xr[k] + c.cv * vr[k];
          const float mean_g = guide ? mean + cg * gr[k] : mean;
          float xp;
          if (sample_mode) {
            const float drawn = draw ? mean_g + c.std * pr[k] : mean_g;
            if (out_sample) S::store(out_sample, t, drawn);
            xp = S::round(drawn);  // the log-prob is of the sample as stored
          } else {
            xp = pr[k];
          }
          const float mean_lp = a.lp_guided ? mean_g : mean;
          if (out_mean) S::store(out_mean, t, mean_lp);
          const float d = xp - mean_lp;
          lp_acc += d * d;
          if (ref_v) {
            const float dm = mean - (c.cx * xr[k] + c.cv * rr[k]);
            kl_acc += dm * dm;
          }
        }
      }
    }

    block_sum2(lp_acc, kl_acc, s_red);
    if (threadIdx.x == 0) {
      float* ws = a.workspace + (b * num_chunks + ch) * 2;
      ws[0] = lp_acc;
      ws[1] = kl_acc;
    }
  }
}

// One warp per sample: sums the sample's chunk partials in double (fixed order: strided per lane,
// then a warp tree) and writes std, log_prob and kl exactly as the CPU's final loop.
__global__ void __launch_bounds__(32) sde_forward_finalize_kernel(const SdeForwardArgs a, int64_t num_chunks) {
  const int lane = threadIdx.x;
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    double lp = 0.0, kl = 0.0;
    const float* ws = a.workspace + b * num_chunks * 2;
    for (int64_t ch = lane; ch < num_chunks; ch += 32) {
      lp += double(ws[ch * 2 + 0]);
      kl += double(ws[ch * 2 + 1]);
    }
    lp = warp_sum(lp);
    kl = warp_sum(kl);
    if (lane == 0) {
      const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
      if (a.out_std) a.out_std[b] = c.std;
      if (a.out_log_prob) a.out_log_prob[b] = float(finalize_log_prob(a.lp_form, c.std, lp, a.numel, a.reduce_mean));
      if (a.out_kl) a.out_kl[b] = float(finalize_kl(a.kl_form, c, kl, a.numel, a.reduce_mean));
    }
  }
}

// Grid (chunks, min(batch, 65535)), elementwise: backward_chunk of csrc/cpu/sde_step.cpp.
template <typename T>
__global__ void __launch_bounds__(kThreads) sde_backward_kernel(const SdeBackwardArgs a) {
  using S = Storage<T>;
  const int64_t n0 = int64_t(blockIdx.x) * kCudaChunk;
  const int len = int(a.numel - n0 < kCudaChunk ? a.numel - n0 : kCudaChunk);

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
    const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
    const float inv_n = reduce_weight(a.reduce_mean, a.numel);
    const float w_lp = a.grad_log_prob ? logprob_grad_weight(a.lp_form, c.std, a.grad_log_prob[b], inv_n) : 0.0f;
    const float w_kl = a.grad_kl ? kl_grad_weight(a.kl_form, c, a.grad_kl[b], inv_n) : 0.0f;
    // Pointers at element n0 of sample b; t below is the element's index within the chunk.
    const int64_t start = b * a.numel + n0;
    const T* v = static_cast<const T*>(a.v) + start;
    const T* x = static_cast<const T*>(a.x) + start;
    const T* xp = a.grad_log_prob ? static_cast<const T*>(a.sample) + start : nullptr;
    const T* guide = (a.guidance && a.lp_guided) ? static_cast<const T*>(a.guidance) + start : nullptr;
    const T* ref_v = a.grad_kl ? static_cast<const T*>(a.ref_v) + start : nullptr;
    const T* g_mean = a.grad_mean ? static_cast<const T*>(a.grad_mean) + start : nullptr;
    const T* g_sample = a.grad_sample ? static_cast<const T*>(a.grad_sample) + start : nullptr;
    T* grad_v = a.grad_v ? static_cast<T*>(a.grad_v) + start : nullptr;
    T* grad_x = a.grad_x ? static_cast<T*>(a.grad_x) + start : nullptr;
    T* grad_ref_v = a.grad_ref_v ? static_cast<T*>(a.grad_ref_v) + start : nullptr;

#pragma unroll 1
    for (int pass = 0; pass < kPerThread; pass += kUnroll) {
      // All loads of a pass before any store (see sde_forward_kernel).
      float xr[kUnroll], vr[kUnroll], gmr[kUnroll], gsr[kUnroll], pr[kUnroll], gdr[kUnroll], rr[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int t = int(threadIdx.x) + (pass + k) * kThreads;
        xr[k] = vr[k] = gmr[k] = gsr[k] = pr[k] = gdr[k] = rr[k] = 0.0f;
        if (t < len) {
          xr[k] = S::load(x, t);
          vr[k] = S::load(v, t);
          if (g_mean) gmr[k] = S::load(g_mean, t);
          if (g_sample) gsr[k] = S::load(g_sample, t);
          if (xp) {
            pr[k] = S::load(xp, t);
            if (guide) gdr[k] = S::load(guide, t);
          }
          if (ref_v) rr[k] = S::load(ref_v, t);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int t = int(threadIdx.x) + (pass + k) * kThreads;
        if (t < len) {
          const float xf = xr[k];
          const float mean = c.cx * xf + c.cv * vr[k];
          // Gradient with respect to the mean; the guidance shift is a constant.
          float grad_of_mean = 0.0f;
          if (g_mean) grad_of_mean += gmr[k];
          if (g_sample) grad_of_mean += gsr[k];
          if (xp) {
            const float mean_lp = guide ? mean + cg * gdr[k] : mean;
            grad_of_mean += w_lp * (pr[k] - mean_lp);
          }
          // d kl / d mean. The reference mean shares cx * x, so the KL adds nothing to grad_x.
          float grad_of_kl = 0.0f;
          if (ref_v) grad_of_kl = w_kl * (mean - (c.cx * xf + c.cv * rr[k]));
          if (grad_v) S::store(grad_v, t, c.cv * (grad_of_mean + grad_of_kl));
          if (grad_x) S::store(grad_x, t, c.cx * grad_of_mean);
          if (grad_ref_v) S::store(grad_ref_v, t, -c.cv * grad_of_kl);
        }
      }
    }
  }
}

// One thread per Philox block j: out[4j .. 4j+3] (those below n).
__global__ void __launch_bounds__(kThreads) philox_normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                                                 bool aligned16) {
  const int64_t blocks = (n + 3) / 4;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += stride) {
    float z[4];
    philox_normal4(seed, offset, uint64_t(j), z);
    if (aligned16 && 4 * j + 3 < n) {
      reinterpret_cast<float4*>(out)[j] = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      for (int l = 0; l < 4 && 4 * j + l < n; ++l) out[4 * j + l] = z[l];
    }
  }
}

int64_t chunks_of(int64_t numel, const char* op) {
  const int64_t chunks = (numel + kCudaChunk - 1) / kCudaChunk;
  if (chunks > INT_MAX)
    throw std::invalid_argument(std::string(op) + ": numel is too large for one launch (got " + std::to_string(numel) + ")");
  return chunks;
}

template <typename T>
void launch_forward(const SdeForwardArgs& a, cudaStream_t stream) {
  const int64_t num_chunks = chunks_of(a.numel, "sde_forward");
  if (num_chunks > 0) {
    if (!a.workspace) throw std::invalid_argument("sde_forward: 'workspace' is required on CUDA");
    const dim3 grid(unsigned(num_chunks), unsigned(std::min(a.batch, kMaxGridY)));
    sde_forward_kernel<T><<<grid, kThreads, 0, stream>>>(a, num_chunks);
    check_launch("sde_forward");
  }
  // With numel == 0 there are no partials: the sums are 0 and the outputs follow the CPU's formulas.
  sde_forward_finalize_kernel<<<unsigned(std::min(a.batch, kMaxGridX)), 32, 0, stream>>>(a, num_chunks);
  check_launch("sde_forward_finalize");
}

template <typename T>
void launch_backward(const SdeBackwardArgs& a, cudaStream_t stream) {
  const int64_t num_chunks = chunks_of(a.numel, "sde_backward");
  const dim3 grid(unsigned(num_chunks), unsigned(std::min(a.batch, kMaxGridY)));
  sde_backward_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_launch("sde_backward");
}

}  // namespace

void sde_forward(const SdeForwardArgs& a, void* stream) {
  if (a.batch <= 0) return;
  switch (a.dtype) {
    case kFloat32: return launch_forward<float>(a, as_stream(stream));
    case kBFloat16: return launch_forward<bf16_t>(a, as_stream(stream));
    default: return launch_forward<fp16_t>(a, as_stream(stream));
  }
}

void sde_backward(const SdeBackwardArgs& a, void* stream) {
  if (a.batch <= 0 || a.numel <= 0) return;
  switch (a.dtype) {
    case kFloat32: return launch_backward<float>(a, as_stream(stream));
    case kBFloat16: return launch_backward<bf16_t>(a, as_stream(stream));
    default: return launch_backward<fp16_t>(a, as_stream(stream));
  }
}

void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  if (n <= 0) return;
  if (!out) throw std::invalid_argument("philox_normal: 'out' must be a non-null pointer");
  const int64_t blocks = (n + 3) / 4;
  const int64_t grid = std::min((blocks + kThreads - 1) / kThreads, kMaxGridX);
  const bool aligned16 = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  philox_normal_kernel<<<unsigned(grid), kThreads, 0, as_stream(stream)>>>(out, n, seed, offset, aligned16);
  check_launch("philox_normal");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it, so that the next launch check does not report a missing driver
    return 0;
  }
  return count;
}

}  // namespace cuda
}  // namespace flowsteer
