// Host build of bn_act_math.h for the CPU tests (tests/test_resnet_kernels.py loads it with ctypes).
// Each function does a kernel's work with plain loops over the same per-pack functions, and the row
// reductions in the kernels' order: row block p, lane row t walks rows (p * block_rows + t) + k * parts *
// block_rows, then a tree over t, then the combine over row blocks. Returns the pack width used.
#include <vector>

#include "bn_act_math.h"

using namespace ofa_resnet;

namespace {

// Host twin of block_reduce_rows (block_reduce.cuh): the same tree over the lane rows.
template <class Acc, class Combine> Acc tree_reduce(std::vector<Acc> rows, Combine combine) {
  for (size_t half = rows.size() / 2; half > 0; half /= 2)
    for (size_t t = 0; t < half; ++t) rows[t] = combine(rows[t], rows[t + half]);
  return rows[0];
}

template <class Acc, class RowFn, class Combine>
Acc reduce_part(int64_t M, int part, int parts, int block_rows, RowFn row_fn, Combine combine) {
  std::vector<Acc> lanes(size_t(block_rows), Acc{});
  for (int t = 0; t < block_rows; ++t)
    for (int64_t r = int64_t(part) * block_rows + t; r < M; r += int64_t(parts) * block_rows)
      row_fn(lanes[size_t(t)], r);
  return tree_reduce(lanes, combine);
}

}  // namespace

extern "C" {

int ofa_welford_stats(int dtype, const void* x, int64_t M, int C, int parts, int block_rows, float* stats) {
  const DType t = DType(dtype);
  std::vector<float> partials(size_t(parts) * 3 * size_t(C));
  const void* ptrs[] = {x};
  const int width = pack_width(t, C, ptrs, 1);
  dispatch(t, width, [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    for (int c0 = 0; c0 < C; c0 += N_)
      for (int p = 0; p < parts; ++p) {
        const WelfordPack<N_> w = reduce_part<WelfordPack<N_>>(
            M, p, parts, block_rows,
            [&](WelfordPack<N_>& acc, int64_t r) { welford_row<T, N_>(acc, static_cast<const T*>(x) + r * C + c0); },
            [](const WelfordPack<N_>& a, const WelfordPack<N_>& b) { return welford_combine(a, b); });
        float* out = partials.data() + size_t(p) * 3 * size_t(C);
        for (int j = 0; j < N_; ++j) {
          out[c0 + j] = w.mean[j];
          out[C + c0 + j] = w.m2[j];
          out[2 * C + c0 + j] = w.n;
        }
      }
    return 0;
  });
  for (int c = 0; c < C; ++c) {
    const Welford w = welford_combine_parts(partials.data(), parts, C, c);
    stats[c] = w.mean;
    stats[C + c] = w.m2;
    stats[2 * C + c] = w.n;
  }
  return width;
}

// partials (parts, 3, C) -> stats (3, C): the `sync` combine of per-rank statistics.
int ofa_welford_combine(const float* partials, int parts, int C, float* stats) {
  for (int c = 0; c < C; ++c) {
    const Welford w = welford_combine_parts(partials, parts, C, c);
    stats[c] = w.mean;
    stats[C + c] = w.m2;
    stats[2 * C + c] = w.n;
  }
  return 1;
}

int ofa_bn_act_forward(int dtype, const void* x, const void* residual, void* y, int64_t M, int C, const float* stats,
                       const float* weight, const float* bias, float* running_mean, float* running_var,
                       float* save_mean, float* save_invstd, float momentum, float eps, int training, int relu) {
  const FwdArgs a{x, residual, y, M, C, stats, weight, bias, running_mean, running_var, save_mean, save_invstd,
                  momentum, eps, training != 0, relu != 0};
  const DType t = DType(dtype);
  const void* ptrs[] = {x, residual, y};
  const int width = pack_width(t, C, ptrs, 3);
  dispatch(t, width, [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    for (int c0 = 0; c0 < C; c0 += N_) {
      float mean[N_], scale[N_], shift[N_];
      forward_coeffs<N_>(a, c0, true, mean, scale, shift);
      for (int64_t r = 0; r < M; ++r) forward_row<T, N_>(a, r * C + c0, mean, scale, shift);
    }
    return 0;
  });
  return width;
}

int ofa_grad_sums(int dtype, const void* dy, const void* x, const void* y, const float* mean, int64_t M, int C,
                  int parts, int block_rows, int relu, float* sums) {
  const GradSumsArgs a{dy, x, y, mean, M, C, parts, nullptr, relu != 0};
  const DType t = DType(dtype);
  std::vector<float> partials(size_t(parts) * 2 * size_t(C));
  const void* ptrs[] = {dy, x, y};
  const int width = pack_width(t, C, ptrs, 3);
  dispatch(t, width, [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    for (int c0 = 0; c0 < C; c0 += N_) {
      float m[N_];
      for (int j = 0; j < N_; ++j) m[j] = mean[c0 + j];
      for (int p = 0; p < parts; ++p) {
        const GradSums<N_> s = reduce_part<GradSums<N_>>(
            M, p, parts, block_rows, [&](GradSums<N_>& acc, int64_t r) { grad_sums_row<T, N_>(a, r * C + c0, m, acc); },
            [](const GradSums<N_>& u, const GradSums<N_>& v) { return grad_sums_combine(u, v); });
        for (int j = 0; j < N_; ++j) {
          partials[size_t(p) * 2 * size_t(C) + size_t(c0 + j)] = s.dz[j];
          partials[size_t(p) * 2 * size_t(C) + size_t(C + c0 + j)] = s.dzx[j];
        }
      }
    }
    return 0;
  });
  for (int c = 0; c < C; ++c) {
    float dz = 0.f, dzx = 0.f;
    for (int p = 0; p < parts; ++p) {
      dz += partials[size_t(p) * 2 * size_t(C) + size_t(c)];
      dzx += partials[size_t(p) * 2 * size_t(C) + size_t(C + c)];
    }
    sums[c] = dz;
    sums[C + c] = dzx;
  }
  return width;
}

int ofa_bn_act_backward(int dtype, const void* dy, const void* x, const void* y, void* dx, void* dres,
                        const float* mean, const float* invstd, const float* weight, const float* sums,
                        const float* count, int64_t M, int C, int training, int relu) {
  const BwdArgs a{dy, x, y, dx, dres, mean, invstd, weight, sums, count, M, C, training != 0, relu != 0};
  const DType t = DType(dtype);
  const void* ptrs[] = {dy, x, y, dx, dres};
  const int width = pack_width(t, C, ptrs, 5);
  dispatch(t, width, [&](auto tw) {
    using T = typename decltype(tw)::type;
    constexpr int N_ = decltype(tw)::width;
    for (int c0 = 0; c0 < C; c0 += N_) {
      float m[N_];
      BwdCoeffs k[N_];
      backward_coeffs<N_>(a, c0, m, k);
      for (int64_t r = 0; r < M; ++r) backward_row<T, N_>(a, r * C + c0, m, k);
    }
    return 0;
  });
  return width;
}

// float -> storage dtype and back, the conversions every kernel load and store goes through.
int ofa_from_float(int dtype, const float* in, void* out, int64_t n) {
  dispatch(DType(dtype), 1, [&](auto tw) {
    using T = typename decltype(tw)::type;
    for (int64_t i = 0; i < n; ++i) static_cast<T*>(out)[i] = from_float<T>(in[i]);
    return 0;
  });
  return 1;
}

int ofa_to_float(int dtype, const void* in, float* out, int64_t n) {
  dispatch(DType(dtype), 1, [&](auto tw) {
    using T = typename decltype(tw)::type;
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(static_cast<const T*>(in)[i]);
    return 0;
  });
  return 1;
}

}  // extern "C"
