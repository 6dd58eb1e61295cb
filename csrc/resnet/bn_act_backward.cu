// Backward of BatchNorm (+ residual) (+ ReLU), NHWC: per-row-block sums of dz and dz * (x - mean), their
// combine (per rank; `sync` all-reduces the (2, C) result), then one pass writing dx and the residual's gradient dz.
#include "block_reduce.cuh"
#include "bn_act.cuh"

namespace ofa_resnet {

template <class T, int N_>
__global__ void __launch_bounds__(kThreads) grad_sums_partials_kernel(GradSumsArgs a) {
  const int c0 = int(blockIdx.x * blockDim.x + threadIdx.x) * N_;
  const bool active = c0 < a.C;  // no early return: every thread joins the block reduction
  GradSums<N_> s = {};
  if (active) {
    float mean[N_];
    for (int j = 0; j < N_; ++j) mean[j] = a.mean[c0 + j];
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < a.M; r += int64_t(gridDim.y) * blockDim.y)
      grad_sums_row<T, N_>(a, r * a.C + c0, mean, s);
  }
  s = block_reduce_rows(s, [](const GradSums<N_>& p, const GradSums<N_>& q) { return grad_sums_combine(p, q); });
  if (!active || threadIdx.y != 0) return;
  float* out = a.partials + int64_t(blockIdx.y) * 2 * a.C;
  for (int j = 0; j < N_; ++j) {
    out[c0 + j] = s.dz[j];
    out[a.C + c0 + j] = s.dzx[j];
  }
}

__global__ void grad_sums_combine_kernel(const float* partials, int parts, int C, float* sums) {
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= C) return;
  float dz = 0.f, dzx = 0.f;
  for (int p = 0; p < parts; ++p) {
    dz += partials[int64_t(p) * 2 * C + c];
    dzx += partials[int64_t(p) * 2 * C + C + c];
  }
  sums[c] = dz;
  sums[C + c] = dzx;
}

template <class T, int N_>
__global__ void __launch_bounds__(kThreads) bn_act_backward_kernel(BwdArgs a) {
  const int c0 = int(blockIdx.x * blockDim.x + threadIdx.x) * N_;
  if (c0 >= a.C) return;
  float mean[N_];
  BwdCoeffs k[N_];
  backward_coeffs<N_>(a, c0, mean, k);
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < a.M; r += int64_t(gridDim.y) * blockDim.y)
    backward_row<T, N_>(a, r * a.C + c0, mean, k);
}

cudaError_t grad_sums_partials(DType t, const GradSumsArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.dy, a.x, a.y};
  return dispatch(t, pack_width(t, a.C, ptrs, 3), [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    LaunchShape s = launch_shape(a.M, a.C, N_);
    s.grid.y = unsigned(a.parts);  // the workspace's row blocks
    grad_sums_partials_kernel<T, N_><<<s.grid, s.block, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t grad_sums_combine(const float* partials, int parts, int C, float* sums, cudaStream_t stream) {
  grad_sums_combine_kernel<<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(partials, parts, C, sums);
  return cudaGetLastError();
}

cudaError_t bn_act_backward(DType t, const BwdArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.dy, a.x, a.y, a.dx, a.dres};
  return dispatch(t, pack_width(t, a.C, ptrs, 5), [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    const LaunchShape s = launch_shape(a.M, a.C, N_);
    bn_act_backward_kernel<T, N_><<<s.grid, s.block, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace ofa_resnet
