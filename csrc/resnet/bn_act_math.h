// The math of the fused BatchNorm (+ residual) (+ ReLU) kernels, shared by the CUDA kernels
// (bn_act_forward.cu, bn_act_backward.cu) and the host build (bn_act_host.cpp) that tests it on CPU.
//
// Tensors are NHWC (channels_last) viewed as M = N*H*W rows of C channels. A thread owns N_ consecutive
// channels (one 16-byte vector when C allows, else one channel) and walks rows; everything here works on
// one such pack of one row, or on one channel. Storage is fp32/fp16/bf16, arithmetic and statistics fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define OFA_HD __host__ __device__ __forceinline__
#else
#define OFA_HD inline
#endif

namespace ofa_resnet {

// ---- storage types -------------------------------------------------------------------------------------

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };  // codes shared with the host build's C API

struct Half { uint16_t bits; };      // bit layout of at::Half / __half
struct BFloat16 { uint16_t bits; };  // bit layout of at::BFloat16 / __nv_bfloat16

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }

// Host conversions, bit-exact with the hardware's round-to-nearest-even (the algorithms c10 uses on CPU).
inline float host_half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
}

inline uint16_t host_float_to_half(float f) {
  const uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  // Scaling up then down rounds the mantissa at the fp16 position in fp32 arithmetic (nearest-even).
  const float base = bits_float((bias >> 1) + 0x07800000u) + (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline uint16_t host_float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t u = float_bits(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

OFA_HD float to_float(float v) { return v; }

OFA_HD float to_float(Half v) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(v.bits));
#else
  return host_half_to_float(v.bits);
#endif
}

OFA_HD float to_float(BFloat16 v) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(__ushort_as_bfloat16(v.bits));
#else
  return bits_float(uint32_t(v.bits) << 16);
#endif
}

template <class T> OFA_HD T from_float(float v);

template <> OFA_HD float from_float<float>(float v) { return v; }

template <> OFA_HD Half from_float<Half>(float v) {
#ifdef __CUDA_ARCH__
  return Half{__half_as_ushort(__float2half_rn(v))};
#else
  return Half{host_float_to_half(v)};
#endif
}

template <> OFA_HD BFloat16 from_float<BFloat16>(float v) {
#ifdef __CUDA_ARCH__
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
  return BFloat16{host_float_to_bf16(v)};
#endif
}

// ---- packs: N_ consecutive channels of one row, moved as one aligned vector ----------------------------

constexpr int kVectorBytes = 16;

template <class T, int N_> struct alignas(sizeof(T) * N_) Pack { T v[N_]; };

template <class T, int N_> OFA_HD void load(const T* p, float (&out)[N_]) {
  const Pack<T, N_> pk = *reinterpret_cast<const Pack<T, N_>*>(p);
  for (int j = 0; j < N_; ++j) out[j] = to_float(pk.v[j]);
}

template <class T, int N_> OFA_HD void store(T* p, const float (&in)[N_]) {
  Pack<T, N_> pk;
  for (int j = 0; j < N_; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, N_>*>(p) = pk;
}

inline int dtype_size(DType t) { return t == DType::Float32 ? 4 : 2; }

// Channels per thread: a 16-byte vector when C is a multiple of it and every row pointer is 16-byte
// aligned, else 1 (the scalar path, e.g. C = 7 or a tensor view at an odd offset).
inline int pack_width(DType t, int C, const void* const* ptrs, int n_ptrs) {
  const int vec = kVectorBytes / dtype_size(t);
  if (C % vec != 0) return 1;
  for (int i = 0; i < n_ptrs; ++i)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % kVectorBytes != 0) return 1;
  return vec;
}

template <class T, int N_> struct TypeAndWidth { using type = T; static constexpr int width = N_; };

// Calls f(TypeAndWidth<T, N_>{}) for the storage type and pack width: the one dtype switch of the kernels.
template <class F> auto dispatch(DType t, int width, F&& f) {
  switch (t) {
    case DType::Float16: return width == 1 ? f(TypeAndWidth<Half, 1>{}) : f(TypeAndWidth<Half, 8>{});
    case DType::BFloat16: return width == 1 ? f(TypeAndWidth<BFloat16, 1>{}) : f(TypeAndWidth<BFloat16, 8>{});
    default: return width == 1 ? f(TypeAndWidth<float, 1>{}) : f(TypeAndWidth<float, 4>{});
  }
}

// ---- per-channel statistics ---------------------------------------------------------------------------

struct Welford { float mean, m2, n; };  // running mean, sum of squared deviations, count

// Chan et al.'s pairwise combine: the one reduction step for threads, blocks, row blocks and ranks.
OFA_HD Welford welford_combine(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean, wb = b.n / n;
  return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb, n};
}

template <int N_> struct WelfordPack { float mean[N_], m2[N_], n; };  // the rows a thread has seen

template <class T, int N_> OFA_HD void welford_row(WelfordPack<N_>& w, const T* x) {
  float v[N_];
  load<T, N_>(x, v);
  w.n += 1.f;
  const float inv_n = 1.f / w.n;  // one division per row, shared by the pack
  for (int j = 0; j < N_; ++j) {
    const float d = v[j] - w.mean[j];
    w.mean[j] += d * inv_n;
    w.m2[j] += d * (v[j] - w.mean[j]);
  }
}

template <int N_> OFA_HD WelfordPack<N_> welford_combine(const WelfordPack<N_>& a, const WelfordPack<N_>& b) {
  WelfordPack<N_> r;
  for (int j = 0; j < N_; ++j) {
    const Welford c = welford_combine(Welford{a.mean[j], a.m2[j], a.n}, Welford{b.mean[j], b.m2[j], b.n});
    r.mean[j] = c.mean;
    r.m2[j] = c.m2;
  }
  r.n = a.n + b.n;
  return r;
}

// stats (3, C): mean, m2, count. partials (parts, 3, C) -> stats, combined in row-block order.
OFA_HD Welford welford_combine_parts(const float* partials, int parts, int C, int c) {
  Welford acc{0.f, 0.f, 0.f};
  for (int p = 0; p < parts; ++p) {
    const float* s = partials + int64_t(p) * 3 * C;
    acc = welford_combine(acc, Welford{s[c], s[C + c], s[2 * C + c]});
  }
  return acc;
}

template <int N_> struct GradSums { float dz[N_], dzx[N_]; };  // sum(dz), sum(dz * (x - mean))

template <int N_> OFA_HD GradSums<N_> grad_sums_combine(const GradSums<N_>& a, const GradSums<N_>& b) {
  GradSums<N_> r;
  for (int j = 0; j < N_; ++j) {
    r.dz[j] = a.dz[j] + b.dz[j];
    r.dzx[j] = a.dzx[j] + b.dzx[j];
  }
  return r;
}

// ---- per-element math ---------------------------------------------------------------------------------

OFA_HD float inv_std(float var, float eps) {
#ifdef __CUDA_ARCH__
  return rsqrtf(var + eps);
#else
  return 1.f / std::sqrt(var + eps);
#endif
}

// z = BN(x) + res; y = relu(z). NaN passes the ReLU as in torch.
OFA_HD float bn_act(float x, float res, float mean, float scale, float bias, bool relu) {
  const float z = (x - mean) * scale + bias + res;
  return relu && z < 0.f ? 0.f : z;
}

// dL/dz from dL/dy, masked by the saved output as torch's ReLU backward (threshold_backward) does.
OFA_HD float relu_grad(float dy, float y, bool relu) { return relu && y <= 0.f ? 0.f : dy; }

// dx = w * invstd * (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean))) in training; eval
// normalises with constants, so there k2 = k3 = 0.
struct BwdCoeffs { float k1, k2, k3; };

OFA_HD BwdCoeffs bn_backward_coeffs(float sum_dz, float sum_dzx, float count, float invstd, float weight) {
  return {weight * invstd, sum_dz / count, sum_dzx / count * invstd * invstd};
}

OFA_HD float bn_backward_dx(float dz, float x, float mean, BwdCoeffs k) {
  return (dz - k.k2 - (x - mean) * k.k3) * k.k1;
}

// torch's update: momentum * batch + (1 - momentum) * running, with the unbiased batch variance.
OFA_HD void running_update(float& running_mean, float& running_var, float mean, float var, float count,
                           float momentum) {
  running_mean = momentum * mean + (1.f - momentum) * running_mean;
  running_var = momentum * var * count / (count - 1.f) + (1.f - momentum) * running_var;
}

// ---- the work of one thread: one channel pack, one row at a time ---------------------------------------

struct StatsArgs {  // x -> per-row-block Welford partials (parts, 3, C)
  const void* x;
  int64_t M;
  int C, parts;
  float* partials;
};

struct FwdArgs {  // y = relu(BN(x) + residual); training also writes save_* and updates running_*
  const void* x;
  const void* residual;  // nullable
  void* y;
  int64_t M;
  int C;
  const float* stats;  // (3, C) mean, m2, count (training)
  const float *weight, *bias;
  float *running_mean, *running_var;  // read in eval, updated in training (nullable in training)
  float *save_mean, *save_invstd;
  float momentum, eps;
  bool training, relu;
};

struct GradSumsArgs {  // dy, x, y -> per-row-block partials (parts, 2, C) of sum(dz), sum(dz * (x - mean))
  const void *dy, *x, *y;  // y (the saved output) only with relu
  const float* mean;
  int64_t M;
  int C, parts;
  float* partials;
  bool relu;
};

struct BwdArgs {  // dx, and dres = dz for the residual
  const void *dy, *x, *y;  // y only with relu
  void *dx, *dres;         // dres nullable
  const float *mean, *invstd, *weight;
  const float* sums;   // (2, C) sum(dz), sum(dz * (x - mean)); training only
  const float* count;  // (C,) rows behind the statistics (the count row of welford_stats); training only
  int64_t M;
  int C;
  bool training, relu;
};

// Per-channel setup of the forward pass; `owner` is the one thread per channel that writes save_* and
// the running statistics.
template <int N_>
OFA_HD void forward_coeffs(const FwdArgs& a, int c0, bool owner, float (&mean)[N_], float (&scale)[N_],
                           float (&bias)[N_]) {
  for (int j = 0; j < N_; ++j) {
    const int c = c0 + j;
    float m, var;
    if (a.training) {
      m = a.stats[c];
      var = a.stats[a.C + c] / a.stats[2 * a.C + c];
    } else {
      m = a.running_mean[c];
      var = a.running_var[c];
    }
    const float invstd = inv_std(var, a.eps);
    mean[j] = m;
    scale[j] = a.weight[c] * invstd;
    bias[j] = a.bias[c];
    if (owner) {
      a.save_mean[c] = m;
      a.save_invstd[c] = invstd;
      if (a.training && a.running_mean != nullptr)
        running_update(a.running_mean[c], a.running_var[c], m, var, a.stats[2 * a.C + c], a.momentum);
    }
  }
}

template <class T, int N_>
OFA_HD void forward_row(const FwdArgs& a, int64_t offset, const float (&mean)[N_], const float (&scale)[N_],
                        const float (&bias)[N_]) {
  float x[N_], res[N_] = {}, y[N_];
  load<T, N_>(static_cast<const T*>(a.x) + offset, x);
  if (a.residual != nullptr) load<T, N_>(static_cast<const T*>(a.residual) + offset, res);
  for (int j = 0; j < N_; ++j) y[j] = bn_act(x[j], res[j], mean[j], scale[j], bias[j], a.relu);
  store<T, N_>(static_cast<T*>(a.y) + offset, y);
}

template <class T, int N_>
OFA_HD void load_dz(const void* dy, const void* y, bool relu, int64_t offset, float (&dz)[N_]) {
  load<T, N_>(static_cast<const T*>(dy) + offset, dz);
  if (!relu) return;
  float yv[N_];
  load<T, N_>(static_cast<const T*>(y) + offset, yv);
  for (int j = 0; j < N_; ++j) dz[j] = relu_grad(dz[j], yv[j], true);
}

template <class T, int N_>
OFA_HD void grad_sums_row(const GradSumsArgs& a, int64_t offset, const float (&mean)[N_], GradSums<N_>& s) {
  float dz[N_], x[N_];
  load_dz<T, N_>(a.dy, a.y, a.relu, offset, dz);
  load<T, N_>(static_cast<const T*>(a.x) + offset, x);
  for (int j = 0; j < N_; ++j) {
    s.dz[j] += dz[j];
    s.dzx[j] += dz[j] * (x[j] - mean[j]);
  }
}

// Per-channel setup of the backward pass.
template <int N_> OFA_HD void backward_coeffs(const BwdArgs& a, int c0, float (&mean)[N_], BwdCoeffs (&k)[N_]) {
  for (int j = 0; j < N_; ++j) {
    const int c = c0 + j;
    mean[j] = a.mean[c];
    k[j] = a.training ? bn_backward_coeffs(a.sums[c], a.sums[a.C + c], a.count[c], a.invstd[c], a.weight[c])
                      : BwdCoeffs{a.weight[c] * a.invstd[c], 0.f, 0.f};
  }
}

template <class T, int N_>
OFA_HD void backward_row(const BwdArgs& a, int64_t offset, const float (&mean)[N_], const BwdCoeffs (&k)[N_]) {
  float dz[N_], x[N_], dx[N_];
  load_dz<T, N_>(a.dy, a.y, a.relu, offset, dz);
  load<T, N_>(static_cast<const T*>(a.x) + offset, x);
  if (a.dres != nullptr) store<T, N_>(static_cast<T*>(a.dres) + offset, dz);
  for (int j = 0; j < N_; ++j) dx[j] = bn_backward_dx(dz[j], x[j], mean[j], k[j]);
  store<T, N_>(static_cast<T*>(a.dx) + offset, dx);
}

}  // namespace ofa_resnet
