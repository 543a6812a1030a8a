// CUDA kernels of the compressed-allreduce ops (ds_ext.ops), built by ds_ext/op_builder
// (CommCUDABuilder) as `ds_ext_comm_cuda`, bound in bindings.cpp. Same semantics as
// csrc/cpu/comm_kernels.cpp (see ds_ext/ops.py for the torch reference of each function):
// 1-D tensors, global int64 indices in increasing order, fp32 comparisons for fp16/bf16.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 256;            // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 16;              // a tile is kRounds * kThreads consecutive elements
constexpr int64_t kTile = int64_t(kRounds) * kThreads;

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

#define DS_EXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename T, bool EF>
__device__ __forceinline__ float load_y(const T* __restrict__ x, const float* __restrict__ e, int64_t i) {
  float v = static_cast<float>(x[i]);
  if (EF) v += e[i];
  return v;
}

// ------------------------------------------------------------------------------------------ 1.
// pass 1: hits per tile (one read of the range); tiles are independent.
template <typename T, bool EF>
__global__ void count_tiles(const T* __restrict__ x, const float* __restrict__ e, int64_t start, int64_t end,
                            float t, int32_t* __restrict__ counts) {
  const int64_t base = start + int64_t(blockIdx.x) * kTile;
  int total = 0;
  for (int r = 0; r < kRounds; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;
    bool hit = false;
    if (i < end) hit = fabsf(load_y<T, EF>(x, e, i)) >= t;  // NaN: false
    total += __syncthreads_count(hit);
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// pass 2: ordered compaction of each tile at its exclusive-scan offset (warp ballots, then warp
// totals in shared memory). The values are written in x's dtype (y cast back when EF).
template <typename T, bool EF>
__global__ void compact_tiles(const T* __restrict__ x, const float* __restrict__ e, int64_t start, int64_t end,
                              float t, const int64_t* __restrict__ offsets, int64_t* __restrict__ idx,
                              T* __restrict__ vals) {
  __shared__ int warp_tot[kWarps];
  const int64_t base = start + int64_t(blockIdx.x) * kTile;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t out = offsets[blockIdx.x];
  for (int r = 0; r < kRounds; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;
    float v = 0.f;
    bool hit = false;
    if (i < end) {
      v = load_y<T, EF>(x, e, i);
      hit = fabsf(v) >= t;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_tot[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_tot[w];
      before += (w < warp) ? c : 0;
      all += c;
    }
    if (hit) {
      const int64_t o = out + before + __popc(ballot & ((1u << lane) - 1u));
      idx[o] = i;
      vals[o] = EF ? static_cast<T>(v) : x[i];
    }
    out += all;
    __syncthreads();  // warp_tot is rewritten next round
  }
}

// ------------------------------------------------------------------------------------------ 2.
template <typename T>
__global__ void scatter_add_kernel(T* __restrict__ dense, int64_t n, const int64_t* __restrict__ idx,
                                   const T* __restrict__ vals, int64_t k, float* __restrict__ zero_in,
                                   int* __restrict__ bad) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = idx[j];
    if (i < 0) i += n;
    if (i < 0 || i >= n) {
      atomicExch(bad, 1);
      continue;
    }
    gpuAtomicAdd(dense + i, vals[j]);
    if (zero_in) zero_in[i] = 0.f;
  }
}

// ------------------------------------------------------------------------------------------ 3.
// fixed grid -> fixed partial sums -> deterministic scale for a given n
constexpr int kSumBlocks = 1024;
template <typename T>
__global__ void abs_sum_partials(const T* __restrict__ x, int64_t n, double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  double s = 0.0;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    s += fabsf(static_cast<float>(x[i]));
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void finish_scale(const double* __restrict__ partial, int parts, int64_t n, float* __restrict__ scale) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    double s = 0.0;
    for (int p = 0; p < parts; ++p) s += partial[p];
    *scale = n ? static_cast<float>(s / static_cast<double>(n)) : 0.f;
  }
}

// one warp ballot = 32 signs = 4 bytes (bit j of byte b <-> element 8b+j, little-endian order)
template <typename T>
__global__ void sign_pack_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ scale,
                                 uint8_t* __restrict__ packed, float* __restrict__ residual) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nround = (n + 31) / 32 * 32;
  const float sc = *scale;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nround; i += stride) {
    float v = 0.f;
    bool pos = false;
    if (i < n) {
      v = static_cast<float>(x[i]);
      pos = v >= 0.f;
      if (residual) residual[i] = v - (pos ? sc : -sc);
    }
    const unsigned b = __ballot_sync(0xffffffffu, pos);
    if (lane < 4) {
      const int64_t byte = (i - lane) / 8 + lane;
      if (byte * 8 < n) packed[byte] = static_cast<uint8_t>((b >> (8 * lane)) & 0xffu);
    }
  }
}

template <typename T>
__global__ void sign_unpack_kernel(const uint8_t* __restrict__ packed, float sc, T* __restrict__ out, int64_t n,
                                   bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float s = ((packed[i >> 3] >> (i & 7)) & 1) ? sc : -sc;
    out[i] = accumulate ? static_cast<T>(static_cast<float>(out[i]) + s) : static_cast<T>(s);
  }
}

// ------------------------------------------------------------------------------------------ 4.
template <typename I, typename O>
__global__ void pack_kernel(const I* __restrict__ v, int64_t n, const int64_t* __restrict__ idx, int64_t k,
                            O* __restrict__ out, int* __restrict__ bad) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = j;
    if (idx) {
      i = idx[j];
      if (i < 0) i += n;
      if (i < 0 || i >= n) {
        atomicExch(bad, 1);
        continue;
      }
    }
    out[j] = static_cast<O>(static_cast<float>(v[i]));
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

void check_bad(const at::Tensor& bad, const char* what) {
  TORCH_CHECK(bad.item<int>() == 0, what, ": index out of range");
}

}  // namespace

std::vector<at::Tensor> threshold_select_cuda(at::Tensor x, c10::optional<at::Tensor> error, double threshold,
                                              int64_t start, int64_t end) {
  TORCH_CHECK(x.dim() == 1 && x.is_cuda() && supported(x.scalar_type()),
              "threshold_select: x must be a 1-D CUDA fp32/fp16/bf16 tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(0 <= start && start <= end && end <= n, "threshold_select: bad range");
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  const bool ef = error.has_value() && error->defined();
  at::Tensor e;
  if (ef) {
    e = error->contiguous();
    TORCH_CHECK(e.is_cuda() && e.numel() == n && e.scalar_type() == at::kFloat,
                "threshold_select: error must be a CUDA fp32 vector as long as x");
  }
  const float t = static_cast<float>(threshold);
  const int64_t tiles = (end - start + kTile - 1) / kTile;
  if (tiles == 0) return {at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, x.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::empty({tiles}, x.options().dtype(at::kInt));
  at::Tensor idx, vals;
  DS_EXT_DISPATCH(x.scalar_type(), "threshold_select_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const float* ep = ef ? e.data_ptr<float>() : nullptr;
    if (ef) count_tiles<scalar_t, true><<<tiles, kThreads, 0, stream>>>(xp, ep, start, end, t, counts.data_ptr<int32_t>());
    else count_tiles<scalar_t, false><<<tiles, kThreads, 0, stream>>>(xp, ep, start, end, t, counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor incl = counts.cumsum(0, at::kLong);
    const int64_t total = incl[-1].item<int64_t>();  // the host needs the count (sizes the outputs)
    at::Tensor offsets = incl - counts;
    idx = at::empty({total}, x.options().dtype(at::kLong));
    vals = at::empty({total}, x.options());
    if (total == 0) return;
    if (ef) compact_tiles<scalar_t, true><<<tiles, kThreads, 0, stream>>>(xp, ep, start, end, t,
        offsets.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), vals.data_ptr<scalar_t>());
    else compact_tiles<scalar_t, false><<<tiles, kThreads, 0, stream>>>(xp, ep, start, end, t,
        offsets.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), vals.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {idx, vals};
}

at::Tensor scatter_add_cuda(at::Tensor dense, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> zero_in) {
  TORCH_CHECK(dense.dim() == 1 && dense.is_cuda() && dense.is_contiguous() && supported(dense.scalar_type()),
              "scatter_add_: dense must be a contiguous 1-D CUDA fp32/fp16/bf16 tensor");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && values.numel() == idx.numel(),
              "scatter_add_: indices (int64) and values must be 1-D and of equal length");
  const bool zero = zero_in.has_value() && zero_in->defined();
  if (zero)
    TORCH_CHECK(zero_in->is_cuda() && zero_in->is_contiguous() && zero_in->scalar_type() == at::kFloat &&
                    zero_in->numel() == dense.numel(), "scatter_add_: zero_in must be a contiguous CUDA fp32 vector");
  const c10::cuda::CUDAGuard guard(dense.device());
  idx = idx.contiguous();
  values = values.to(dense.scalar_type()).contiguous();
  const int64_t k = idx.numel();
  if (k == 0) return dense;
  at::Tensor bad = at::zeros({1}, dense.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(dense.scalar_type(), "scatter_add_cuda", [&] {
    scatter_add_kernel<scalar_t><<<grid_for(k), kThreads, 0, stream>>>(
        dense.data_ptr<scalar_t>(), dense.numel(), idx.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), k,
        zero ? zero_in->data_ptr<float>() : nullptr, bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_bad(bad, "scatter_add_");
  return dense;
}

std::vector<at::Tensor> sign_pack_cuda(at::Tensor x, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1 && x.is_cuda() && supported(x.scalar_type()), "sign_pack: x must be 1-D CUDA fp32/fp16/bf16");
  const bool res = residual.has_value() && residual->defined();
  if (res)
    TORCH_CHECK(residual->is_cuda() && residual->is_contiguous() && residual->scalar_type() == at::kFloat &&
                    residual->numel() == x.numel(), "sign_pack: residual must be a contiguous CUDA fp32 vector");
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({}, x.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({kSumBlocks}, x.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(x.scalar_type(), "sign_pack_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    abs_sum_partials<scalar_t><<<kSumBlocks, kThreads, 0, stream>>>(xp, n, partial.data_ptr<double>());
    finish_scale<<<1, 1, 0, stream>>>(partial.data_ptr<double>(), kSumBlocks, n, scale.data_ptr<float>());
    if (n) {
      const int64_t nround = (n + 31) / 32 * 32;
      sign_pack_kernel<scalar_t><<<grid_for(nround), kThreads, 0, stream>>>(
          xp, n, scale.data_ptr<float>(), packed.data_ptr<uint8_t>(), res ? residual->data_ptr<float>() : nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, scale};
}

at::Tensor sign_unpack_cuda(at::Tensor packed, double scale, at::Tensor out, bool accumulate) {
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte && out.is_cuda() && out.is_contiguous() &&
                  supported(out.scalar_type()) && packed.numel() * 8 >= out.numel(),
              "sign_unpack: bad arguments");
  const c10::cuda::CUDAGuard guard(out.device());
  packed = packed.contiguous();
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(out.scalar_type(), "sign_unpack_cuda", [&] {
    sign_unpack_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        packed.data_ptr<uint8_t>(), static_cast<float>(scale), out.data_ptr<scalar_t>(), n, accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor pack_values_cuda(at::Tensor values, c10::optional<at::Tensor> indices, at::ScalarType dtype) {
  TORCH_CHECK(values.dim() == 1 && values.is_cuda() && supported(values.scalar_type()) && supported(dtype),
              "pack_values: values must be 1-D CUDA fp32/fp16/bf16, dtype fp32/fp16/bf16");
  const c10::cuda::CUDAGuard guard(values.device());
  values = values.contiguous();
  const bool gather = indices.has_value() && indices->defined();
  at::Tensor idx;
  if (gather) {
    idx = indices->contiguous();
    TORCH_CHECK(idx.is_cuda() && idx.scalar_type() == at::kLong, "pack_values: indices must be CUDA int64");
  }
  const int64_t n = values.numel(), k = gather ? idx.numel() : n;
  at::Tensor out = at::empty({k}, values.options().dtype(dtype));
  if (k == 0) return out;
  at::Tensor bad = at::zeros({1}, values.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(values.scalar_type(), "pack_values_in", [&] {
    using in_t = scalar_t;
    DS_EXT_DISPATCH(dtype, "pack_values_out", [&] {
      pack_kernel<in_t, scalar_t><<<grid_for(k), kThreads, 0, stream>>>(
          values.data_ptr<in_t>(), n, gather ? idx.data_ptr<int64_t>() : nullptr, k, out.data_ptr<scalar_t>(),
          bad.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (gather) check_bad(bad, "pack_values");
  return out;
}
