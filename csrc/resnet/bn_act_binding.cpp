// torch ops `torch.ops.ofa_resnet.*` over the bn_act kernels: input checks, workspaces from torch's
// allocator, the current stream. Built where torch has CUDA (setup.py via ofa_ds_build.py, or the JIT
// loader in ofa_ds/kernels/resnet/cuda_ext.py, which also holds the autograd Function).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "bn_act.cuh"

namespace ofa_resnet {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "ofa_resnet: ", name, " has dtype ", s,
                   "; supported: float32, float16, bfloat16");
  return s == at::kFloat ? DType::Float32 : s == at::kHalf ? DType::Float16 : DType::BFloat16;
}

// x: (N, C, H, W) channels_last on a CUDA device, C >= 1, not empty.
DType check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "ofa_resnet: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, "ofa_resnet: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1 && x.numel() > 0, "ofa_resnet: x must have C >= 1 channels and elements, got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "ofa_resnet: x must be channels_last contiguous ",
              "(x.contiguous(memory_format=torch.channels_last)), got strides ", x.strides());
  return dtype_of(x, "x");
}

// Another activation-shaped tensor (residual, y, dy, dx, dres): same shape, dtype, device and layout as x.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(), "ofa_resnet: ",
              name, " must match x (", x.scalar_type(), " ", x.sizes(), " on ", x.device(), "), got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "ofa_resnet: ", name,
              " must be channels_last contiguous, got strides ", t.strides());
}

// A per-channel vector (C,) on x's device as contiguous float32 (a copy only when it is not one already).
at::Tensor channel_vector(const at::Tensor& p, const char* name, const at::Tensor& x) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1) && p.device() == x.device(), "ofa_resnet: ", name,
              " must have shape (", x.size(1), ") on ", x.device(), ", got ", p.sizes(), " on ", p.device());
  dtype_of(p, name);
  return p.to(at::kFloat).contiguous();
}

// A float32 (C,) vector produced by the other ops (mean, invstd, count).
void check_float_vector(const at::Tensor& p, const char* name, const at::Tensor& x) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1) && p.device() == x.device() && p.scalar_type() == at::kFloat &&
                  p.is_contiguous(),
              "ofa_resnet: ", name, " must be a contiguous float32 (", x.size(1), ") tensor on ", x.device());
}

void check_stats(const at::Tensor& s, const char* name, int64_t rows, const at::Tensor& x) {
  TORCH_CHECK(s.dim() == 2 && s.size(0) == rows && s.size(1) == x.size(1) && s.device() == x.device() &&
                  s.scalar_type() == at::kFloat && s.is_contiguous(),
              "ofa_resnet: ", name, " must be a contiguous float32 (", rows, ", ", x.size(1), ") tensor on ",
              x.device(), ", got ", s.scalar_type(), " ", s.sizes());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ofa_resnet: ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

// x -> (3, C) float32: mean, m2 (sum of squared deviations), count of this rank's batch.
at::Tensor welford_stats_op(const at::Tensor& x) {
  const DType t = check_x(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = int(x.size(1));
  const int64_t M = x.numel() / C;
  const int parts = reduction_parts(M, C, t);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor partials = at::empty({parts, 3, C}, opts), stats = at::empty({3, C}, opts);
  check_launch(welford_partials(t, StatsArgs{x.data_ptr(), M, C, parts, partials.data_ptr<float>()}, current_stream()),
               "welford_partials");
  check_launch(welford_combine(partials.data_ptr<float>(), parts, C, stats.data_ptr<float>(), current_stream()),
               "welford_combine");
  return stats;
}

// (R, 3, C) per-rank statistics (all-gathered for `sync`) -> (3, C).
at::Tensor welford_combine_op(const at::Tensor& partials) {
  TORCH_CHECK(partials.is_cuda() && partials.dim() == 3 && partials.size(1) == 3 &&
                  partials.scalar_type() == at::kFloat && partials.is_contiguous(),
              "ofa_resnet: partials must be a contiguous float32 CUDA tensor (ranks, 3, C), got ",
              partials.scalar_type(), " ", partials.sizes(), " on ", partials.device());
  const c10::cuda::CUDAGuard guard(partials.device());
  const int parts = int(partials.size(0)), C = int(partials.size(2));
  at::Tensor stats = at::empty({3, C}, partials.options());
  check_launch(welford_combine(partials.data_ptr<float>(), parts, C, stats.data_ptr<float>(), current_stream()),
               "welford_combine");
  return stats;
}

// y = relu?(BN(x) + residual?). training: normalise with `stats` (3, C), update the running statistics
// if given; eval: normalise with the running statistics. Returns y and the mean and invstd it used.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_op(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& stats,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps, bool relu) {
  const DType t = check_x(x);
  if (residual) check_like_x(*residual, "residual", x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "ofa_resnet: pass both running_mean and running_var or neither");
  TORCH_CHECK(training || running_mean, "ofa_resnet: eval mode needs running_mean and running_var");
  TORCH_CHECK(!training || stats, "ofa_resnet: training mode needs the batch statistics (welford_stats)");
  if (stats) check_stats(*stats, "stats", 3, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = int(x.size(1));
  const at::Tensor w = channel_vector(weight, "weight", x), b = channel_vector(bias, "bias", x);
  // The kernel reads and updates float32 running statistics; other dtypes go through a float32 copy.
  std::optional<at::Tensor> rm, rv;
  if (running_mean) {
    rm = channel_vector(*running_mean, "running_mean", x);
    rv = channel_vector(*running_var, "running_var", x);
  }
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor save_mean = at::empty({C}, w.options()), save_invstd = at::empty({C}, w.options());
  const FwdArgs a{x.data_ptr(), ptr_or_null(residual), y.data_ptr(), x.numel() / C, C,
                  stats ? stats->data_ptr<float>() : nullptr, w.data_ptr<float>(), b.data_ptr<float>(),
                  rm ? rm->data_ptr<float>() : nullptr, rv ? rv->data_ptr<float>() : nullptr,
                  save_mean.data_ptr<float>(), save_invstd.data_ptr<float>(), float(momentum), float(eps),
                  training, relu};
  check_launch(bn_act_forward(t, a, current_stream()), "bn_act_forward");
  if (training && rm) {
    if (!rm->is_same(*running_mean)) running_mean->copy_(*rm);
    if (!rv->is_same(*running_var)) running_var->copy_(*rv);
  }
  return {y, save_mean, save_invstd};
}

// (2, C) float32: sum(dz), sum(dz * (x - mean)) with dz = dy masked by relu(y).
at::Tensor grad_sums_op(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& y,
                        const at::Tensor& mean, bool relu) {
  const DType t = check_x(x);
  check_like_x(dy, "dy", x);
  TORCH_CHECK(!relu || y, "ofa_resnet: relu backward needs the forward output y");
  if (y) check_like_x(*y, "y", x);
  check_float_vector(mean, "mean", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = int(x.size(1));
  const int64_t M = x.numel() / C;
  const int parts = reduction_parts(M, C, t);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor partials = at::empty({parts, 2, C}, opts), sums = at::empty({2, C}, opts);
  const GradSumsArgs a{dy.data_ptr(), x.data_ptr(), relu ? y->data_ptr() : nullptr, mean.data_ptr<float>(),
                       M, C, parts, partials.data_ptr<float>(), relu};
  check_launch(grad_sums_partials(t, a, current_stream()), "grad_sums_partials");
  check_launch(grad_sums_combine(partials.data_ptr<float>(), parts, C, sums.data_ptr<float>(), current_stream()),
               "grad_sums_combine");
  return sums;
}

// Writes dx and dres (= dz, the residual's gradient). Training needs `sums`, the (2, C) grad_sums
// (all-reduced for `sync`), and `count`, the (C,) count row of the statistics they are over.
void bn_act_backward_op(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& y,
                        const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                        const std::optional<at::Tensor>& sums, const std::optional<at::Tensor>& count, bool training,
                        bool relu, const at::Tensor& dx, const std::optional<at::Tensor>& dres) {
  const DType t = check_x(x);
  check_like_x(dy, "dy", x);
  check_like_x(dx, "dx", x);
  if (dres) check_like_x(*dres, "dres", x);
  TORCH_CHECK(!relu || y, "ofa_resnet: relu backward needs the forward output y");
  if (y) check_like_x(*y, "y", x);
  check_float_vector(mean, "mean", x);
  check_float_vector(invstd, "invstd", x);
  TORCH_CHECK(!training || (sums && count), "ofa_resnet: training backward needs grad_sums and the count row");
  if (sums) check_stats(*sums, "sums", 2, x);
  if (count) check_float_vector(*count, "count", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = int(x.size(1));
  const at::Tensor w = channel_vector(weight, "weight", x);
  const BwdArgs a{dy.data_ptr(), x.data_ptr(), relu ? y->data_ptr() : nullptr, dx.data_ptr(),
                  dres ? dres->data_ptr() : nullptr, mean.data_ptr<float>(), invstd.data_ptr<float>(),
                  w.data_ptr<float>(), sums ? sums->data_ptr<float>() : nullptr,
                  count ? count->data_ptr<float>() : nullptr, x.numel() / C, C, training, relu};
  check_launch(bn_act_backward(t, a, current_stream()), "bn_act_backward");
}

}  // namespace
}  // namespace ofa_resnet

TORCH_LIBRARY(ofa_resnet, m) {
  m.def("welford_stats(Tensor x) -> Tensor");
  m.def("welford_combine(Tensor partials) -> Tensor");
  m.def("bn_act_forward(Tensor x, Tensor? residual, Tensor? stats, Tensor weight, Tensor bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("grad_sums(Tensor dy, Tensor x, Tensor? y, Tensor mean, bool relu) -> Tensor");
  m.def("bn_act_backward(Tensor dy, Tensor x, Tensor? y, Tensor mean, Tensor invstd, Tensor weight, Tensor? sums, "
        "Tensor? count, bool training, bool relu, Tensor(a!) dx, Tensor(b!)? dres) -> ()");
}

TORCH_LIBRARY_IMPL(ofa_resnet, CUDA, m) {
  m.impl("welford_stats", &ofa_resnet::welford_stats_op);
  m.impl("welford_combine", &ofa_resnet::welford_combine_op);
  m.impl("bn_act_forward", &ofa_resnet::bn_act_forward_op);
  m.impl("grad_sums", &ofa_resnet::grad_sums_op);
  m.impl("bn_act_backward", &ofa_resnet::bn_act_backward_op);
}
