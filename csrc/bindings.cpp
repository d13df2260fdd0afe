// The pybind11 module flowsteer._C. It does not link libtorch: Python passes raw data pointers
// (as integers), sizes, dtype codes and the CUDA stream. Arguments come as keywords, are checked
// here once more, and a failed check raises ValueError instead of aborting.
#include <pybind11/pybind11.h>

#include <set>
#include <stdexcept>
#include <string>

#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

namespace py = pybind11;

namespace flowsteer {
namespace cpu {
void sde_forward(const SdeForwardArgs& a);
void sde_backward(const SdeBackwardArgs& a);
void group_advantages(const GroupAdvantageArgs& a);
void win_rate(const WinRateArgs& a);
void pareto_mask(const ParetoArgs& a);
void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset);
const char* isa();
}  // namespace cpu
#ifdef FLOWSTEER_WITH_CUDA
namespace cuda {
void sde_forward(const SdeForwardArgs& a, void* stream);
void sde_backward(const SdeBackwardArgs& a, void* stream);
void group_advantages(const GroupAdvantageArgs& a, void* stream);
void win_rate(const WinRateArgs& a, void* stream);
void pareto_mask(const ParetoArgs& a, void* stream);
void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int device_count();
}  // namespace cuda
#endif
}  // namespace flowsteer

namespace {

using namespace flowsteer;

// Reads keyword arguments, rejecting unknown ones so that a typo in Python fails loudly.
class Kw {
 public:
  Kw(const py::kwargs& kw, const char* op, std::set<std::string> allowed) : kw_(kw), op_(op) {
    for (auto item : kw_) {
      const std::string key = py::str(item.first);
      if (!allowed.count(key)) throw std::invalid_argument(std::string(op_) + ": unknown argument '" + key + "'");
    }
  }
  template <typename T>
  T get(const char* key, T fallback) const {
    if (!kw_.contains(key) || kw_[key].is_none()) return fallback;
    return kw_[key].cast<T>();
  }
  template <typename T>
  T required(const char* key) const {
    if (!kw_.contains(key) || kw_[key].is_none()) throw std::invalid_argument(std::string(op_) + ": '" + key + "' is required");
    return kw_[key].cast<T>();
  }
  template <typename P>
  P* ptr(const char* key, bool needed = false) const {
    const auto address = get<uintptr_t>(key, 0);
    if (needed && address == 0) throw std::invalid_argument(std::string(op_) + ": '" + key + "' must be a non-null pointer");
    return reinterpret_cast<P*>(address);
  }
 private:
  const py::kwargs& kw_;
  const char* op_;
};

void check_sizes(const char* op, int64_t batch, int64_t numel, int dtype) {
  const std::string name(op);
  if (batch < 0 || numel < 0) throw std::invalid_argument(name + ": batch and numel must be >= 0");
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument(name + ": dtype code must be 0, 1 or 2 (got " + std::to_string(dtype) + ")");
}

void check_range(const char* op, const char* key, double value, double lo, double hi) {
  if (hi < lo || (value >= lo && value <= hi)) return;
  throw std::invalid_argument(std::string(op) + ": '" + key + "' must be in [" + std::to_string(lo) + ", " +
                              std::to_string(hi) + "] (got " + std::to_string(value) + ")");
}

// The step's keywords: the argument names of the op plus every FLOWSTEER_SDE_OPTIONS name.
std::set<std::string> with_options(std::set<std::string> names) {
#define FLOWSTEER_OPTION_NAME(type, name, init, lo, hi) names.insert(#name);
  FLOWSTEER_SDE_OPTIONS(FLOWSTEER_OPTION_NAME)
#undef FLOWSTEER_OPTION_NAME
  return names;
}

// Every FLOWSTEER_SDE_OPTIONS field of `a` from its keyword (its default when absent), checked.
template <typename Args>
void read_options(const Kw& k, const char* op, Args& a) {
#define FLOWSTEER_READ_OPTION(type, name, init, lo, hi) \
  a.name = k.get<type>(#name, init);                   \
  check_range(op, #name, double(a.name), double(lo), double(hi));
  FLOWSTEER_SDE_OPTIONS(FLOWSTEER_READ_OPTION)
#undef FLOWSTEER_READ_OPTION
}

SdeForwardArgs forward_args(const py::kwargs& kw) {
  Kw k(kw, "sde_forward",
       with_options({"v", "x", "noise", "prev_sample", "guidance", "ref_v", "sigma", "sigma_next", "guidance_coef",
                     "out_sample", "out_mean", "out_log_prob", "out_std", "out_kl", "workspace", "batch", "numel",
                     "dtype", "stream"}));
  SdeForwardArgs a;
  a.v = k.ptr<const void>("v", true);
  a.x = k.ptr<const void>("x", true);
  a.noise = k.ptr<const void>("noise");
  a.prev_sample = k.ptr<const void>("prev_sample");
  a.guidance = k.ptr<const void>("guidance");
  a.ref_v = k.ptr<const void>("ref_v");
  a.sigma = k.ptr<const float>("sigma", true);
  a.sigma_next = k.ptr<const float>("sigma_next", true);
  a.guidance_coef = k.ptr<const float>("guidance_coef", a.guidance != nullptr);
  a.out_sample = k.ptr<void>("out_sample", a.prev_sample == nullptr);
  a.out_mean = k.ptr<void>("out_mean");
  a.out_log_prob = k.ptr<float>("out_log_prob");
  a.out_std = k.ptr<float>("out_std");
  a.out_kl = k.ptr<float>("out_kl", a.ref_v != nullptr);
  a.workspace = k.ptr<float>("workspace");
  a.batch = k.required<int64_t>("batch");
  a.numel = k.required<int64_t>("numel");
  a.dtype = k.required<int>("dtype");
  read_options(k, "sde_forward", a);
  check_sizes("sde_forward", a.batch, a.numel, a.dtype);
  if (a.ref_v && a.kl_form == kKlNone) throw std::invalid_argument("sde_forward: ref_v given with kl_form 0");
  return a;
}

SdeBackwardArgs backward_args(const py::kwargs& kw) {
  Kw k(kw, "sde_backward",
       with_options({"v", "x", "sample", "guidance", "ref_v", "sigma", "sigma_next", "guidance_coef", "grad_log_prob",
                     "grad_kl", "grad_mean", "grad_sample", "grad_v", "grad_x", "grad_ref_v", "batch", "numel", "dtype",
                     "stream"}));
  SdeBackwardArgs a;
  a.v = k.ptr<const void>("v", true);
  a.x = k.ptr<const void>("x", true);
  a.grad_log_prob = k.ptr<const float>("grad_log_prob");
  a.grad_kl = k.ptr<const float>("grad_kl");
  a.sample = k.ptr<const void>("sample", a.grad_log_prob != nullptr);
  a.guidance = k.ptr<const void>("guidance");
  a.ref_v = k.ptr<const void>("ref_v", a.grad_kl != nullptr);
  a.sigma = k.ptr<const float>("sigma", true);
  a.sigma_next = k.ptr<const float>("sigma_next", true);
  a.guidance_coef = k.ptr<const float>("guidance_coef", a.guidance != nullptr);
  a.grad_mean = k.ptr<const void>("grad_mean");
  a.grad_sample = k.ptr<const void>("grad_sample");
  a.grad_v = k.ptr<void>("grad_v");
  a.grad_x = k.ptr<void>("grad_x");
  a.grad_ref_v = k.ptr<void>("grad_ref_v");
  a.batch = k.required<int64_t>("batch");
  a.numel = k.required<int64_t>("numel");
  a.dtype = k.required<int>("dtype");
  read_options(k, "sde_backward", a);
  check_sizes("sde_backward", a.batch, a.numel, a.dtype);
  if (a.grad_kl && a.kl_form == kKlNone) throw std::invalid_argument("sde_backward: grad_kl given with kl_form 0");
  return a;
}

GroupAdvantageArgs advantage_args(const py::kwargs& kw) {
  Kw k(kw, "group_advantages",
       {"rewards", "group_ids", "order", "offsets", "num_groups", "weights", "global_std", "out", "n", "k",
        "std_mode", "eps", "clip", "stream"});
  GroupAdvantageArgs a;
  a.rewards = k.ptr<const float>("rewards", true);
  a.group_ids = k.ptr<const int64_t>("group_ids");
  a.order = k.ptr<const int64_t>("order");
  a.offsets = k.ptr<const int64_t>("offsets");
  a.num_groups = k.get<int64_t>("num_groups", 0);
  a.weights = k.ptr<const float>("weights", true);
  a.out = k.ptr<float>("out", true);
  a.n = k.required<int64_t>("n");
  a.k = k.required<int64_t>("k");
  a.std_mode = k.get<int>("std_mode", 0);
  a.global_std = k.ptr<const float>("global_std", a.std_mode == 1);
  a.eps = k.get<float>("eps", 1e-4f);
  a.clip = k.get<float>("clip", 5.0f);
  if (a.n < 0 || a.k < 1) throw std::invalid_argument("group_advantages: need n >= 0 and k >= 1");
  if (a.std_mode < 0 || a.std_mode > 2) throw std::invalid_argument("group_advantages: std_mode must be 0, 1 or 2");
  return a;
}

WinRateArgs win_rate_args(const py::kwargs& kw) {
  Kw k(kw, "win_rate", {"prefs", "out", "m", "group_size", "stream"});
  WinRateArgs a;
  a.prefs = k.ptr<const float>("prefs", true);
  a.out = k.ptr<float>("out", true);
  a.m = k.required<int64_t>("m");
  a.group_size = k.required<int64_t>("group_size");
  if (a.m < 0 || a.group_size < 2) throw std::invalid_argument("win_rate: need m >= 0 and group_size >= 2");
  return a;
}

ParetoArgs pareto_args(const py::kwargs& kw) {
  Kw k(kw, "pareto_mask", {"rewards", "group_ids", "order", "offsets", "num_groups", "out", "n", "k", "stream"});
  ParetoArgs a;
  a.rewards = k.ptr<const float>("rewards", true);
  a.group_ids = k.ptr<const int64_t>("group_ids");
  a.order = k.ptr<const int64_t>("order");
  a.offsets = k.ptr<const int64_t>("offsets");
  a.num_groups = k.get<int64_t>("num_groups", 0);
  a.out = k.ptr<uint8_t>("out", true);
  a.n = k.required<int64_t>("n");
  a.k = k.required<int64_t>("k");
  if (a.n < 0 || a.k < 1) throw std::invalid_argument("pareto_mask: need n >= 0 and k >= 1");
  return a;
}

void* stream_of(const py::kwargs& kw) {
  if (!kw.contains("stream") || kw["stream"].is_none()) return nullptr;
  return reinterpret_cast<void*>(kw["stream"].cast<uintptr_t>());
}

[[noreturn]] void no_cuda() {
  throw std::runtime_error("flowsteer._C was built without CUDA kernels (no nvcc was found at build time); "
                           "rebuild with nvcc on PATH, or use flowsteer.set_backend('triton')");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flowsteer compiled core: fused SDE step, log-prob, KL and group advantages (CPU and CUDA)";
  // The binding interface's version: flowsteer/ops/backends/__init__.py refuses an _C whose tag
  // differs (a stale build left behind by an upgrade). Bump it with every change to the functions'
  // arguments.
  m.attr("abi_version") = 3;
  m.attr("cuda_chunk") = kCudaChunk;
  m.attr("cpu_isa") = cpu::isa();

  m.def("sde_forward_cpu", [](py::kwargs kw) {
    const SdeForwardArgs a = forward_args(kw);
    py::gil_scoped_release release;
    cpu::sde_forward(a);
  });
  m.def("sde_backward_cpu", [](py::kwargs kw) {
    const SdeBackwardArgs a = backward_args(kw);
    py::gil_scoped_release release;
    cpu::sde_backward(a);
  });
  m.def("group_advantages_cpu", [](py::kwargs kw) {
    const GroupAdvantageArgs a = advantage_args(kw);
    if (!a.group_ids) throw std::invalid_argument("group_advantages: 'group_ids' is required on the CPU");
    py::gil_scoped_release release;
    cpu::group_advantages(a);
  });
  m.def("win_rate_cpu", [](py::kwargs kw) {
    const WinRateArgs a = win_rate_args(kw);
    py::gil_scoped_release release;
    cpu::win_rate(a);
  });
  m.def("pareto_mask_cpu", [](py::kwargs kw) {
    const ParetoArgs a = pareto_args(kw);
    if (!a.group_ids) throw std::invalid_argument("pareto_mask: 'group_ids' is required on the CPU");
    py::gil_scoped_release release;
    cpu::pareto_mask(a);
  });
  m.def(
      "philox_normal_cpu",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t offset) {
        if (!out && n > 0) throw std::invalid_argument("philox_normal: 'out' must be a non-null pointer");
        py::gil_scoped_release release;
        cpu::philox_normal(reinterpret_cast<float*>(out), n, seed, offset);
      },
      py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("offset"));

#ifdef FLOWSTEER_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = FLOWSTEER_CUDA_ARCHS_STR;
  m.def("cuda_device_count", &cuda::device_count);
  m.def("sde_forward_cuda", [](py::kwargs kw) {
    const SdeForwardArgs a = forward_args(kw);
    if (!a.workspace) throw std::invalid_argument("sde_forward: 'workspace' is required on CUDA");
    cuda::sde_forward(a, stream_of(kw));
  });
  m.def("sde_backward_cuda", [](py::kwargs kw) {
    const SdeBackwardArgs a = backward_args(kw);
    cuda::sde_backward(a, stream_of(kw));
  });
  m.def("group_advantages_cuda", [](py::kwargs kw) {
    const GroupAdvantageArgs a = advantage_args(kw);
    if (!a.order || !a.offsets) throw std::invalid_argument("group_advantages: 'order' and 'offsets' are required on CUDA");
    cuda::group_advantages(a, stream_of(kw));
  });
  m.def("win_rate_cuda", [](py::kwargs kw) { cuda::win_rate(win_rate_args(kw), stream_of(kw)); });
  m.def("pareto_mask_cuda", [](py::kwargs kw) {
    const ParetoArgs a = pareto_args(kw);
    if (!a.order || !a.offsets) throw std::invalid_argument("pareto_mask: 'order' and 'offsets' are required on CUDA");
    cuda::pareto_mask(a, stream_of(kw));
  });
  m.def(
      "philox_normal_cuda",
      [](uintptr_t out, int64_t n, uint64_t seed, uint64_t offset, uintptr_t stream) {
        cuda::philox_normal(reinterpret_cast<float*>(out), n, seed, offset, reinterpret_cast<void*>(stream));
      },
      py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("offset"), py::arg("stream") = 0);
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
  m.def("cuda_device_count", []() { return 0; });
  m.def("sde_forward_cuda", [](py::kwargs) { no_cuda(); });
  m.def("sde_backward_cuda", [](py::kwargs) { no_cuda(); });
  m.def("group_advantages_cuda", [](py::kwargs) { no_cuda(); });
  m.def("win_rate_cuda", [](py::kwargs) { no_cuda(); });
  m.def("pareto_mask_cuda", [](py::kwargs) { no_cuda(); });
  m.def("philox_normal_cuda", [](py::args, py::kwargs) { no_cuda(); });
#endif
}
