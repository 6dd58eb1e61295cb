// The in-block step of the row reductions (Welford statistics, gradient sums).
#pragma once

#include "bn_act.cuh"

namespace ofa_resnet {

// Combines each thread's accumulator over threadIdx.y (the rows a block walked) by a tree in shared
// memory; the result is complete in the threads with threadIdx.y == 0. blockDim.y is a power of two.
template <class Acc, class Combine>
__device__ Acc block_reduce_rows(Acc acc, Combine combine) {
  __shared__ Acc slots[kThreads];
  const unsigned lane = threadIdx.x, lanes = blockDim.x;
  slots[threadIdx.y * lanes + lane] = acc;
  for (unsigned half = blockDim.y / 2; half > 0; half /= 2) {
    __syncthreads();
    if (threadIdx.y < half) {
      acc = combine(acc, slots[(threadIdx.y + half) * lanes + lane]);
      slots[threadIdx.y * lanes + lane] = acc;
    }
  }
  return acc;
}

}  // namespace ofa_resnet
