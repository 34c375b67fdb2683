// unidd_fast._cuda: the only file of csrc/ that sees torch. It turns tensors into pointers
// for the torch-free launchers of unidd_cuda.h and enqueues them on the current stream.
// Buffers, layouts and batching plans come from kernels/cuda/ops.py; the checks here
// are a last line of defence against a wrong pointer, not user-facing validation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "unidd_cuda.h"

namespace {

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "unidd_fast._cuda.", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return UNIDD_F32;
    case at::kHalf: return UNIDD_F16;
    case at::kBFloat16: return UNIDD_BF16;
    default: TORCH_CHECK(false, "feature maps must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return UNIDD_F32;
}

UniddFeatureMap feature_map(const at::Tensor& x, int64_t n, int64_t d, int64_t hw, int64_t sn, int64_t sc,
                            int64_t sp) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor");
  TORCH_CHECK(x.size(0) == n && x.size(1) == d && x.size(2) * x.size(3) == hw, "layout does not match x's shape");
  return UniddFeatureMap{x.data_ptr(), dtype_code(x), int(n), int(d), int(hw), sn, sc, sp};
}

void stats_forward(const at::Tensor& x, int64_t n, int64_t d, int64_t hw, int64_t sn, int64_t sc, int64_t sp,
                   at::Tensor partial, at::Tensor psum, at::Tensor psi, at::Tensor mu, at::Tensor pooled) {
  const UniddFeatureMap f = feature_map(x, n, d, hw, sn, sc, sp);
  const c10::cuda::CUDAGuard guard(x.device());
  check_buffer(partial, "partial", at::kFloat, x);
  check_buffer(psum, "psum", at::kFloat, x);
  check_buffer(psi, "psi", at::kFloat, x);
  check_buffer(mu, "mu", at::kFloat, x);
  check_buffer(pooled, "pooled", at::kFloat, x);
  TORCH_CHECK(partial.numel() >= unidd_stats_workspace(f.n, f.d, f.hw) && psum.numel() >= n * d &&
                  psi.numel() >= d * d && mu.numel() >= d && pooled.numel() >= n * d,
              "stats_forward: a buffer is too small");
  check(unidd_stats_forward(f, partial.data_ptr<float>(), psum.data_ptr<float>(), psi.data_ptr<float>(),
                            mu.data_ptr<float>(), pooled.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "stats_forward");
}

void stats_backward(const at::Tensor& x, int64_t n, int64_t d, int64_t hw, int64_t sn, int64_t sc, int64_t sp,
                    const at::Tensor& mu, const at::Tensor& gpsi, const std::optional<at::Tensor>& gmu,
                    const std::optional<at::Tensor>& gpooled, at::Tensor dx) {
  const UniddFeatureMap f = feature_map(x, n, d, hw, sn, sc, sp);
  const c10::cuda::CUDAGuard guard(x.device());
  check_buffer(mu, "mu", at::kFloat, x);
  check_buffer(gpsi, "gpsi", at::kFloat, x);
  TORCH_CHECK(mu.numel() == d && gpsi.numel() == d * d, "stats_backward: mu / gpsi have the wrong size");
  if (gmu) {
    check_buffer(*gmu, "gmu", at::kFloat, x);
    TORCH_CHECK(gmu->numel() == d, "gmu must have d entries");
  }
  if (gpooled) {
    check_buffer(*gpooled, "gpooled", at::kFloat, x);
    TORCH_CHECK(gpooled->numel() == n * d, "gpooled must be (n, d)");
  }
  TORCH_CHECK(dx.is_cuda() && dx.sizes() == x.sizes() && dx.strides() == x.strides() &&
                  dx.scalar_type() == x.scalar_type(),
              "dx must have x's shape, strides and dtype");
  check(unidd_stats_backward(f, mu.data_ptr<float>(), gpsi.data_ptr<float>(), gmu ? gmu->data_ptr<float>() : nullptr,
                             gpooled ? gpooled->data_ptr<float>() : nullptr, dx.data_ptr(),
                             at::cuda::getCurrentCUDAStream()),
        "stats_backward");
}

void inverse(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& out,
             const std::vector<int64_t>& work_offsets, const std::vector<int64_t>& info_offsets, const at::Tensor& beta,
             at::Tensor work, at::Tensor info) {
  const size_t num = a.size();
  TORCH_CHECK(num >= 1 && num <= UNIDD_INV_MAX_GROUPS && out.size() == num && work_offsets.size() == num &&
                  info_offsets.size() == num,
              "inverse: 1 to ", int(UNIDD_INV_MAX_GROUPS), " groups with one output and offsets each");
  TORCH_CHECK(work.is_cuda(), "work must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(work.device());
  check_buffer(work, "work", at::kFloat, work);
  check_buffer(info, "info", at::kInt, work);
  check_buffer(beta, "beta", at::kFloat, work);
  TORCH_CHECK(beta.numel() == 1, "beta must be a scalar tensor");
  std::vector<UniddInvGroup> groups(num);
  for (size_t g = 0; g < num; ++g) {
    check_buffer(a[g], "a", at::kFloat, work);
    check_buffer(out[g], "out", at::kFloat, work);
    TORCH_CHECK(a[g].dim() == 3 && a[g].size(1) == a[g].size(2) && out[g].sizes() == a[g].sizes(),
                "inverse: groups are (k, d, d) stacks with outputs of the same shape");
    const int64_t k = a[g].size(0), d = a[g].size(1);
    const int64_t D = (d + UNIDD_INV_TILE - 1) / UNIDD_INV_TILE * UNIDD_INV_TILE;
    TORCH_CHECK(work_offsets[g] >= 0 && work_offsets[g] + 2 * k * D * D <= work.numel() && info_offsets[g] >= 0 &&
                    info_offsets[g] + k <= info.numel(),
                "inverse: group ", g, " does not fit in the work / info buffers");
    groups[g] = UniddInvGroup{a[g].data_ptr<float>(), out[g].data_ptr<float>(), work_offsets[g], int(k), int(d),
                              int(info_offsets[g])};
  }
  check(unidd_inverse(groups.data(), int(num), beta.data_ptr<float>(), work.data_ptr<float>(), info.data_ptr<int>(),
                      at::cuda::getCurrentCUDAStream()),
        "inverse");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unidd_fast CUDA kernels (csrc/); host logic in kernels/cuda/ops.py";
  m.attr("device_type") = "cuda";
  m.attr("INVERSE_TILE") = int(UNIDD_INV_TILE);
  m.attr("INVERSE_MAX_GROUPS") = int(UNIDD_INV_MAX_GROUPS);
  m.def("stats_chunks", [](int n, int d, int hw) { return unidd_stats_chunks(n, d, hw); },
        "row chunks of the statistics forward");
  m.def("stats_workspace", [](int n, int d, int hw) { return unidd_stats_workspace(n, d, hw); },
        "floats of the statistics forward's partial workspace");
  m.def("stats_forward", &stats_forward, "site statistics forward into caller-owned buffers");
  m.def("stats_backward", &stats_backward, "site statistics backward into dx");
  m.def("inverse", &inverse, "batched (A + beta I)^-1 of up to INVERSE_MAX_GROUPS groups");
}
