// Training/eval forward of BatchNorm (+ residual) (+ ReLU), NHWC: Welford statistics per row block,
// their combine (per rank; `sync` all-gathers and combines again), then one normalise-add-ReLU pass.
#include "block_reduce.cuh"
#include "bn_act.cuh"

namespace ofa_resnet {

template <class T, int N_>
__global__ void __launch_bounds__(kThreads) welford_partials_kernel(StatsArgs a) {
  const int c0 = int(blockIdx.x * blockDim.x + threadIdx.x) * N_;
  const bool active = c0 < a.C;  // no early return: every thread joins the block reduction
  WelfordPack<N_> w = {};
  if (active)
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < a.M; r += int64_t(gridDim.y) * blockDim.y)
      welford_row<T, N_>(w, static_cast<const T*>(a.x) + r * a.C + c0);
  w = block_reduce_rows(w, [](const WelfordPack<N_>& p, const WelfordPack<N_>& q) { return welford_combine(p, q); });
  if (!active || threadIdx.y != 0) return;
  float* out = a.partials + int64_t(blockIdx.y) * 3 * a.C;
  for (int j = 0; j < N_; ++j) {
    out[c0 + j] = w.mean[j];
    out[a.C + c0 + j] = w.m2[j];
    out[2 * a.C + c0 + j] = w.n;
  }
}

__global__ void welford_combine_kernel(const float* partials, int parts, int C, float* stats) {
  const int c = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= C) return;
  const Welford w = welford_combine_parts(partials, parts, C, c);
  stats[c] = w.mean;
  stats[C + c] = w.m2;
  stats[2 * C + c] = w.n;
}

template <class T, int N_>
__global__ void __launch_bounds__(kThreads) bn_act_forward_kernel(FwdArgs a) {
  const int c0 = int(blockIdx.x * blockDim.x + threadIdx.x) * N_;
  if (c0 >= a.C) return;
  float mean[N_], scale[N_], bias[N_];
  forward_coeffs<N_>(a, c0, blockIdx.y == 0 && threadIdx.y == 0, mean, scale, bias);
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < a.M; r += int64_t(gridDim.y) * blockDim.y)
    forward_row<T, N_>(a, r * a.C + c0, mean, scale, bias);
}

cudaError_t welford_partials(DType t, const StatsArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.x};
  return dispatch(t, pack_width(t, a.C, ptrs, 1), [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    LaunchShape s = launch_shape(a.M, a.C, N_);
    s.grid.y = unsigned(a.parts);  // the workspace's row blocks
    welford_partials_kernel<T, N_><<<s.grid, s.block, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t welford_combine(const float* partials, int parts, int C, float* stats, cudaStream_t stream) {
  welford_combine_kernel<<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(partials, parts, C, stats);
  return cudaGetLastError();
}

cudaError_t bn_act_forward(DType t, const FwdArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.x, a.residual, a.y};
  return dispatch(t, pack_width(t, a.C, ptrs, 3), [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    const LaunchShape s = launch_shape(a.M, a.C, N_);
    bn_act_forward_kernel<T, N_><<<s.grid, s.block, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace ofa_resnet
