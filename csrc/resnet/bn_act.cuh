// Launchers of the fused BatchNorm (+ residual) (+ ReLU) kernels: plain CUDA runtime API, no torch, so
// the .cu files compile with nvcc alone; bn_act_binding.cpp wraps them as torch ops.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "bn_act_math.h"

namespace ofa_resnet {

constexpr int kThreads = 256;     // per block: lanes over channel packs x rows
constexpr int kBlocksPerSm = 4;   // row blocks are sized to fill the GPU about this many times

struct LaunchShape { dim3 grid, block; };

// x: lanes over the C / width channel packs (up to a warp, for coalesced rows); y: rows, walked in a
// grid-stride loop by enough row blocks to fill the device.
inline LaunchShape launch_shape(int64_t M, int C, int width) {
  const int packs = C / width;
  int bx = 1;
  while (bx < packs && bx < 32) bx *= 2;
  const int by = kThreads / bx, gx = (packs + bx - 1) / bx;
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t row_blocks = (M + by - 1) / by, wanted = (int64_t(kBlocksPerSm) * sms + gx - 1) / gx;
  const int gy = int(std::max<int64_t>(1, std::min({row_blocks, wanted, int64_t(65535)})));
  return {dim3(unsigned(gx), unsigned(gy)), dim3(unsigned(bx), unsigned(by))};
}

// Row blocks of the partial reductions (the leading size of their workspace). Any value >= 1 is
// correct; this one matches the vectorised launch shape.
inline int reduction_parts(int64_t M, int C, DType t) {
  const int vec = kVectorBytes / dtype_size(t);
  return int(launch_shape(M, C, C % vec == 0 ? vec : 1).grid.y);
}

// Forward (bn_act_forward.cu): statistics in two steps so that `sync` can all-gather the per-rank
// (3, C) result of welford_combine before normalising.
cudaError_t welford_partials(DType t, const StatsArgs& a, cudaStream_t stream);
cudaError_t welford_combine(const float* partials, int parts, int C, float* stats, cudaStream_t stream);
cudaError_t bn_act_forward(DType t, const FwdArgs& a, cudaStream_t stream);

// Backward (bn_act_backward.cu): sums in two steps so that `sync` can all-reduce the (2, C) sums.
cudaError_t grad_sums_partials(DType t, const GradSumsArgs& a, cudaStream_t stream);
cudaError_t grad_sums_combine(const float* partials, int parts, int C, float* sums, cudaStream_t stream);
cudaError_t bn_act_backward(DType t, const BwdArgs& a, cudaStream_t stream);

}  // namespace ofa_resnet
