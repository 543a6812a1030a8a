// CUDA kernels of the compressed-allreduce ops (ds_ext.ops), built by ds_ext/op_builder
// (CommCUDABuilder) as `ds_ext_comm_cuda`, bound in bindings.cpp. Same semantics as
// csrc/cpu/comm_kernels.cpp (see ds_ext/ops.py for the torch reference of each function):
// 1-D tensors, global int64 indices in increasing order, fp32 comparisons for fp16/bf16.
//
// Host synchronisation: none, except threshold_select without a known count (the host sizes the
// output from the device count; pass the count from threshold_count to avoid it). Out-of-range indices
// (scatter_add_, pack_values) are device-side asserts (CUDA_KERNEL_ASSERT), reported at the next
// synchronisation as torch's own index kernels do, not a host read after every call.
// Every tensor argument must be on the device of the first one (TORCH_CHECK before any launch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kThreads = 256;            // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 16;              // a tile is kRounds * kThreads consecutive elements
constexpr int64_t kTile = int64_t(kRounds) * kThreads;
constexpr int64_t kSumBlocks = 1024;     // at most this many partial sums per segment (sign scale)

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// fp32, fp16 and bf16 only (no double instantiations: ds_ext.ops never passes one)
#define DS_EXT_DISPATCH(TYPE, NAME, ...)                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* fn, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(), ", expected ", ref.device(),
              " (the device of the first tensor argument)");
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

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
// totals in shared memory). The values are written in x's dtype (y cast back when EF). Only the
// first `cap` hits are written (cap: the output size, the count the caller gave).
template <typename T, bool EF>
__global__ void compact_tiles(const T* __restrict__ x, const float* __restrict__ e, int64_t start, int64_t end,
                              float t, const int64_t* __restrict__ offsets, int64_t cap, int64_t* __restrict__ idx,
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
      if (o < cap) {
        idx[o] = i;
        vals[o] = EF ? static_cast<T>(v) : x[i];
      }
    }
    out += all;
    __syncthreads();  // warp_tot is rewritten next round
  }
}

// ------------------------------------------------------------------------------------------ 2.
// dense and zero_in are not __restrict__: a caller may pass the same buffer
template <typename T>
__global__ void scatter_add_kernel(T* dense, int64_t n, const int64_t* __restrict__ idx, const T* __restrict__ vals,
                                   int64_t k, float* zero_in) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = idx[j];
    if (i < 0) i += n;
    CUDA_KERNEL_ASSERT(i >= 0 && i < n && "scatter_add_: index out of range");
    if (i < 0 || i >= n) continue;  // asserts compiled out: skip, never write out of bounds
    gpuAtomicAdd(dense + i, vals[j]);
    if (zero_in) zero_in[i] = 0.f;
  }
}

// ------------------------------------------------------------------------------------------ 3.
// Sign compression over segments of one flat vector (sign_pack is the case of one segment, so both
// agree bit for bit). The segment table, 4 rows of T + 1 int64 prefix values on the device:
//   row kElem: element offsets of the segments in x / out (segment t = [elem[t], elem[t+1]));
//   row kByte: byte offsets in packed (ceil(n_t / 8) bytes per segment, byte-aligned);
//   row kBlk:  first partial-sum block of each segment (nblocks(n_t) = min(1024, ceil(n_t / 256)));
//   row kWord: first 32-element word of each segment (ceil(n_t / 32) words: one warp ballot each).
// tab == nullptr: one segment [0, n1), rows computed on the fly (no table to copy).
// The partition of a segment into blocks depends on n_t only, and the partial sums are combined in
// block order, so the fp64 scale is deterministic.
enum Row { kElem = 0, kByte = 1, kBlk = 2, kWord = 3 };

struct Segs {
  const int64_t* tab;
  int64_t T;
  int64_t n1;
};

__host__ __device__ __forceinline__ int64_t sum_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return b < kSumBlocks ? b : kSumBlocks;
}

__device__ __forceinline__ int64_t seg_at(const Segs& s, int row, int64_t t) {
  if (s.tab) return s.tab[row * (s.T + 1) + t];
  if (t == 0) return 0;
  switch (row) {
    case kElem: return s.n1;
    case kByte: return (s.n1 + 7) / 8;
    case kBlk: return sum_blocks(s.n1);
    default: return (s.n1 + 31) / 32;
  }
}

// the segment holding position v of a row: the largest t < T with row[t] <= v (v < row[T]); empty
// segments (row[t] == row[t+1]) are skipped because the last of equal starts wins
__device__ __forceinline__ int64_t seg_find(const Segs& s, int row, int64_t v) {
  if (!s.tab) return 0;
  const int64_t* r = s.tab + row * (s.T + 1);
  int64_t lo = 0, hi = s.T - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (r[mid] <= v) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// one block = one (segment, block-of-segment) pair; grid = total blocks
template <typename T>
__global__ void seg_abs_sum_partials(const T* __restrict__ x, Segs s, double* __restrict__ partial) {
  __shared__ double sh[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t t = seg_find(s, kBlk, b);
  const int64_t e0 = seg_at(s, kElem, t), n = seg_at(s, kElem, t + 1) - e0;
  const int64_t b0 = seg_at(s, kBlk, t), nb = seg_at(s, kBlk, t + 1) - b0;
  double acc = 0.0;
  for (int64_t i = (b - b0) * kThreads + threadIdx.x; i < n; i += nb * kThreads)
    acc += fabsf(static_cast<float>(x[e0 + i]));
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[b] = sh[0];
}

// one thread per segment: its partial sums in block order -> mean |x| (0 for an empty segment)
__global__ void seg_finish_scales(const double* __restrict__ partial, Segs s, float* __restrict__ scales) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= s.T) return;
  const int64_t n = seg_at(s, kElem, t + 1) - seg_at(s, kElem, t);
  double acc = 0.0;
  for (int64_t b = seg_at(s, kBlk, t), e = seg_at(s, kBlk, t + 1); b < e; ++b) acc += partial[b];
  scales[t] = n ? static_cast<float>(acc / static_cast<double>(n)) : 0.f;
}

// one warp ballot = one word = 32 signs of one segment = 4 bytes (bit j of byte b <-> element 8b+j of the
// segment). x and residual are not __restrict__: residual may be x itself (each element is read, then
// written, by the same thread).
template <typename T>
__global__ void seg_sign_pack(const T* x, Segs s, const float* __restrict__ scales, uint8_t* __restrict__ packed,
                              float* residual, int64_t nthreads) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;  // a multiple of 32: whole warps per word
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < nthreads; g += stride) {
    const int64_t w = g >> 5;
    const int64_t t = seg_find(s, kWord, w);
    const int64_t e0 = seg_at(s, kElem, t), n = seg_at(s, kElem, t + 1) - e0;
    const int64_t wl = w - seg_at(s, kWord, t);  // word within the segment
    const int64_t i = wl * 32 + lane;
    bool pos = false;
    if (i < n) {
      const float v = static_cast<float>(x[e0 + i]);
      pos = v >= 0.f;
      if (residual) {
        const float sc = scales[t];
        residual[e0 + i] = v - (pos ? sc : -sc);
      }
    }
    const unsigned b = __ballot_sync(0xffffffffu, pos);
    if (lane < 4) {
      const int64_t byte = wl * 4 + lane;
      if (byte * 8 < n) packed[seg_at(s, kByte, t) + byte] = static_cast<uint8_t>((b >> (8 * lane)) & 0xffu);
    }
  }
}

// out[e] (+)= bit ? scale_t : -scale_t for e in [first, first + total) (the segments are contiguous)
template <typename T>
__global__ void seg_sign_unpack(const uint8_t* __restrict__ packed, Segs s, const float* __restrict__ scales,
                                T* __restrict__ out, int64_t first, int64_t total, bool accumulate) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < total; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = first + g;
    const int64_t t = seg_find(s, kElem, e);
    const int64_t i = e - seg_at(s, kElem, t);
    const float sc = scales[t];
    const float v = ((packed[seg_at(s, kByte, t) + (i >> 3)] >> (i & 7)) & 1) ? sc : -sc;
    out[e] = accumulate ? static_cast<T>(static_cast<float>(out[e]) + v) : static_cast<T>(v);
  }
}

// host side of a segment table: validated offsets, totals, and the table on the device (one pinned,
// non-blocking copy: no host synchronisation)
struct SegPlan {
  Segs s{nullptr, 0, 0};
  at::Tensor tab;
  int64_t first = 0, last = 0, nbytes = 0, nblocks = 0, nwords = 0;
};

SegPlan plan_one(int64_t n) {
  SegPlan p;
  p.s = Segs{nullptr, 1, n};
  p.last = n;
  p.nbytes = (n + 7) / 8;
  p.nblocks = sum_blocks(n);
  p.nwords = (n + 31) / 32;
  return p;
}

SegPlan plan_segments(const std::vector<int64_t>& off, int64_t numel, const at::Device& dev, const char* fn) {
  TORCH_CHECK(!off.empty(), fn, ": offsets needs at least one entry");
  const int64_t T = static_cast<int64_t>(off.size()) - 1;
  TORCH_CHECK(off[0] >= 0 && off[T] <= numel, fn, ": offsets span [", off[0], ", ", off[T], "), the vector has ",
              numel, " elements");
  SegPlan p;
  at::Tensor host = at::empty({4 * (T + 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t* elem = h + kElem * (T + 1);
  int64_t* byte = h + kByte * (T + 1);
  int64_t* blk = h + kBlk * (T + 1);
  int64_t* word = h + kWord * (T + 1);
  elem[0] = off[0];
  byte[0] = blk[0] = word[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = off[t + 1] - off[t];
    TORCH_CHECK(n >= 0, fn, ": offsets must not decrease (", off[t], " then ", off[t + 1], ")");
    elem[t + 1] = off[t + 1];
    byte[t + 1] = byte[t] + (n + 7) / 8;
    blk[t + 1] = blk[t] + sum_blocks(n);
    word[t + 1] = word[t] + (n + 31) / 32;
  }
  p.first = off[0];
  p.last = off[T];
  p.nbytes = byte[T];
  p.nblocks = blk[T];
  p.nwords = word[T];
  p.tab = host.to(dev, /*non_blocking=*/true);
  p.s = Segs{p.tab.data_ptr<int64_t>(), T, 0};
  return p;
}

template <typename scalar_t>
void launch_pack(const scalar_t* xp, const SegPlan& p, uint8_t* pp, float* rp, float* sp, cudaStream_t stream,
                 const at::TensorOptions& opts) {
  if (p.s.T == 0) return;
  at::Tensor partial = at::empty({std::max<int64_t>(1, p.nblocks)}, opts.dtype(at::kDouble));
  if (p.nblocks > 0) {
    seg_abs_sum_partials<scalar_t><<<static_cast<unsigned>(p.nblocks), kThreads, 0, stream>>>(xp, p.s, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  seg_finish_scales<<<static_cast<unsigned>((p.s.T + kThreads - 1) / kThreads), kThreads, 0, stream>>>(partial.data_ptr<double>(), p.s, sp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.nwords > 0) {
    seg_sign_pack<scalar_t><<<grid_for(32 * p.nwords), kThreads, 0, stream>>>(xp, p.s, sp, pp, rp, 32 * p.nwords);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_unpack(const uint8_t* pp, const SegPlan& p, const float* sp, scalar_t* op, bool accumulate,
                   cudaStream_t stream) {
  const int64_t total = p.last - p.first;
  if (total <= 0) return;
  seg_sign_unpack<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(pp, p.s, sp, op, p.first, total, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ 4.
template <typename I, typename O>
__global__ void pack_kernel(const I* __restrict__ v, int64_t n, const int64_t* __restrict__ idx, int64_t k,
                            O* __restrict__ out) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < k; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = j;
    if (idx) {
      i = idx[j];
      if (i < 0) i += n;
      CUDA_KERNEL_ASSERT(i >= 0 && i < n && "pack_values: index out of range");
      if (i < 0 || i >= n) continue;
    }
    out[j] = static_cast<O>(static_cast<float>(v[i]));
  }
}

struct Range {
  at::Tensor x, e;
  bool ef = false;
  int64_t tiles = 0;
};

Range check_range(const char* fn, const at::Tensor& x, const c10::optional<at::Tensor>& error, int64_t start,
                  int64_t end) {
  TORCH_CHECK(x.dim() == 1 && x.is_cuda() && supported(x.scalar_type()), fn,
              ": x must be a 1-D CUDA fp32/fp16/bf16 tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(0 <= start && start <= end && end <= n, fn, ": bad range [", start, ", ", end, ") for ", n, " elements");
  Range r;
  r.ef = error.has_value() && error->defined();
  if (r.ef) {
    check_device(*error, x, fn, "error");
    TORCH_CHECK(error->dim() == 1 && error->numel() == n && error->scalar_type() == at::kFloat, fn,
                ": error must be an fp32 vector as long as x");
    r.e = error->contiguous();
  }
  r.x = x.contiguous();
  r.tiles = (end - start + kTile - 1) / kTile;
  return r;
}

// per-tile hit counts of [start, end) (int32 [tiles])
at::Tensor tile_counts(const Range& r, int64_t start, int64_t end, float t, cudaStream_t stream) {
  at::Tensor counts = at::empty({r.tiles}, r.x.options().dtype(at::kInt));
  DS_EXT_DISPATCH(r.x.scalar_type(), "threshold_count_cuda", [&] {
    const scalar_t* xp = r.x.data_ptr<scalar_t>();
    const float* ep = r.ef ? r.e.data_ptr<float>() : nullptr;
    if (r.ef) count_tiles<scalar_t, true><<<static_cast<unsigned>(r.tiles), kThreads, 0, stream>>>(xp, ep, start, end, t, counts.data_ptr<int32_t>());
    else count_tiles<scalar_t, false><<<static_cast<unsigned>(r.tiles), kThreads, 0, stream>>>(xp, ep, start, end, t, counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return counts;
}

}  // namespace

// count < 0: unknown, read from the device (the one host synchronisation of this module); count >= 0:
// the exact count (threshold_count), the output is sized from it and nothing is read back
std::vector<at::Tensor> threshold_select_cuda(at::Tensor x, c10::optional<at::Tensor> error, double threshold,
                                              int64_t start, int64_t end, int64_t count) {
  const c10::cuda::CUDAGuard guard(x.device());
  Range r = check_range("threshold_select", x, error, start, end);
  const float t = static_cast<float>(threshold);
  if (r.tiles == 0 || count == 0)
    return {at::empty({0}, r.x.options().dtype(at::kLong)), at::empty({0}, r.x.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor counts = tile_counts(r, start, end, t, stream);
  at::Tensor incl = counts.cumsum(0, at::kLong);
  const int64_t total = count >= 0 ? count : incl[-1].item<int64_t>();
  at::Tensor offsets = incl - counts;
  at::Tensor idx = at::empty({total}, r.x.options().dtype(at::kLong));
  at::Tensor vals = at::empty({total}, r.x.options());
  if (total == 0) return {idx, vals};
  DS_EXT_DISPATCH(r.x.scalar_type(), "threshold_select_cuda", [&] {
    const scalar_t* xp = r.x.data_ptr<scalar_t>();
    const float* ep = r.ef ? r.e.data_ptr<float>() : nullptr;
    if (r.ef) compact_tiles<scalar_t, true><<<static_cast<unsigned>(r.tiles), kThreads, 0, stream>>>(xp, ep, start, end, t,
        offsets.data_ptr<int64_t>(), total, idx.data_ptr<int64_t>(), vals.data_ptr<scalar_t>());
    else compact_tiles<scalar_t, false><<<static_cast<unsigned>(r.tiles), kThreads, 0, stream>>>(xp, ep, start, end, t,
        offsets.data_ptr<int64_t>(), total, idx.data_ptr<int64_t>(), vals.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {idx, vals};
}

at::Tensor threshold_count_cuda(at::Tensor x, c10::optional<at::Tensor> error, double threshold, int64_t start,
                                int64_t end) {
  const c10::cuda::CUDAGuard guard(x.device());
  Range r = check_range("threshold_count", x, error, start, end);
  if (r.tiles == 0) return at::zeros({}, r.x.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  return tile_counts(r, start, end, static_cast<float>(threshold), stream).sum(at::kLong);
}

at::Tensor scatter_add_cuda(at::Tensor dense, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> zero_in) {
  TORCH_CHECK(dense.dim() == 1 && dense.is_cuda() && dense.is_contiguous() && supported(dense.scalar_type()),
              "scatter_add_: dense must be a contiguous 1-D CUDA fp32/fp16/bf16 tensor");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && values.dim() == 1 && values.numel() == idx.numel(),
              "scatter_add_: indices (int64) and values must be 1-D and of equal length");
  check_device(idx, dense, "scatter_add_", "indices");
  check_device(values, dense, "scatter_add_", "values");
  const bool zero = zero_in.has_value() && zero_in->defined();
  if (zero) {
    check_device(*zero_in, dense, "scatter_add_", "zero_in");
    TORCH_CHECK(zero_in->dim() == 1 && zero_in->is_contiguous() && zero_in->scalar_type() == at::kFloat &&
                    zero_in->numel() == dense.numel(),
                "scatter_add_: zero_in must be a contiguous fp32 vector as long as dense");
  }
  const c10::cuda::CUDAGuard guard(dense.device());
  idx = idx.contiguous();
  values = values.to(dense.scalar_type()).contiguous();
  const int64_t k = idx.numel();
  if (k == 0) return dense;
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(dense.scalar_type(), "scatter_add_cuda", [&] {
    scatter_add_kernel<scalar_t><<<grid_for(k), kThreads, 0, stream>>>(
        dense.data_ptr<scalar_t>(), dense.numel(), idx.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), k,
        zero ? zero_in->data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dense;
}

namespace {
void check_residual(const char* fn, const at::Tensor& residual, const at::Tensor& x) {
  check_device(residual, x, fn, "residual");
  TORCH_CHECK(residual.dim() == 1 && residual.is_contiguous() && residual.scalar_type() == at::kFloat &&
                  residual.numel() == x.numel(),
              fn, ": residual must be a contiguous fp32 vector as long as x");
}

std::vector<at::Tensor> pack_with_plan(const at::Tensor& x_in, const SegPlan& p, c10::optional<at::Tensor> residual,
                                       at::IntArrayRef scales_shape) {
  const at::Tensor x = x_in.contiguous();
  const bool res = residual.has_value() && residual->defined();
  at::Tensor packed = at::empty({p.nbytes}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(scales_shape, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(x.scalar_type(), "sign_pack_cuda", [&] {
    launch_pack<scalar_t>(x.data_ptr<scalar_t>(), p, packed.data_ptr<uint8_t>(), res ? residual->data_ptr<float>() : nullptr,
                          scales.data_ptr<float>(), stream, x.options());
  });
  return {packed, scales};
}

void check_unpack(const char* fn, const at::Tensor& packed, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 1 && out.is_cuda() && out.is_contiguous() && supported(out.scalar_type()), fn,
              ": out must be a contiguous 1-D CUDA fp32/fp16/bf16 tensor");
  check_device(packed, out, fn, "packed");
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte, fn, ": packed must be a 1-D uint8 tensor");
}
}  // namespace

std::vector<at::Tensor> sign_pack_cuda(at::Tensor x, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1 && x.is_cuda() && supported(x.scalar_type()),
              "sign_pack: x must be a 1-D CUDA fp32/fp16/bf16 tensor");
  if (residual.has_value() && residual->defined()) check_residual("sign_pack", *residual, x);
  const c10::cuda::CUDAGuard guard(x.device());
  return pack_with_plan(x, plan_one(x.numel()), residual, {});
}

std::vector<at::Tensor> sign_pack_segments_cuda(at::Tensor x, std::vector<int64_t> offsets,
                                                c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1 && x.is_cuda() && supported(x.scalar_type()),
              "sign_pack_segments: x must be a 1-D CUDA fp32/fp16/bf16 tensor");
  if (residual.has_value() && residual->defined()) check_residual("sign_pack_segments", *residual, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const SegPlan p = plan_segments(offsets, x.numel(), x.device(), "sign_pack_segments");
  return pack_with_plan(x, p, residual, {p.s.T});
}

// scale: a 1-element fp32 tensor on out's device, read by the kernel (no host read); else scale_value
at::Tensor sign_unpack_cuda(at::Tensor packed, c10::optional<at::Tensor> scale, double scale_value, at::Tensor out,
                            bool accumulate) {
  check_unpack("sign_unpack", packed, out);
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() * 8 >= n, "sign_unpack: ", packed.numel(), " bytes hold fewer than ", n, " signs");
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor s;
  if (scale.has_value() && scale->defined()) {
    check_device(*scale, out, "sign_unpack", "scale");
    TORCH_CHECK(scale->numel() == 1, "sign_unpack: scale must hold one value");
    s = scale->to(at::kFloat).reshape({1}).contiguous();
  } else {
    s = at::full({1}, static_cast<float>(scale_value), out.options().dtype(at::kFloat));
  }
  packed = packed.contiguous();
  const SegPlan p = plan_one(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(out.scalar_type(), "sign_unpack_cuda", [&] {
    launch_unpack<scalar_t>(packed.data_ptr<uint8_t>(), p, s.data_ptr<float>(), out.data_ptr<scalar_t>(), accumulate,
                            stream);
  });
  return out;
}

at::Tensor sign_unpack_segments_cuda(at::Tensor packed, at::Tensor scales, std::vector<int64_t> offsets, at::Tensor out,
                                     bool accumulate) {
  check_unpack("sign_unpack_segments", packed, out);
  check_device(scales, out, "sign_unpack_segments", "scales");
  const c10::cuda::CUDAGuard guard(out.device());
  const SegPlan p = plan_segments(offsets, out.numel(), out.device(), "sign_unpack_segments");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == p.s.T, "sign_unpack_segments: scales must hold ",
              p.s.T, " fp32 values (one per segment)");
  TORCH_CHECK(packed.numel() >= p.nbytes, "sign_unpack_segments: ", packed.numel(), " bytes, the segments need ",
              p.nbytes);
  packed = packed.contiguous();
  scales = scales.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(out.scalar_type(), "sign_unpack_segments_cuda", [&] {
    launch_unpack<scalar_t>(packed.data_ptr<uint8_t>(), p, scales.data_ptr<float>(), out.data_ptr<scalar_t>(),
                            accumulate, stream);
  });
  return out;
}

at::Tensor pack_values_cuda(at::Tensor values, c10::optional<at::Tensor> indices, at::ScalarType dtype) {
  TORCH_CHECK(values.dim() == 1 && values.is_cuda() && supported(values.scalar_type()) && supported(dtype),
              "pack_values: values must be 1-D CUDA fp32/fp16/bf16, dtype fp32/fp16/bf16");
  const bool gather = indices.has_value() && indices->defined();
  if (gather) {
    check_device(*indices, values, "pack_values", "indices");
    TORCH_CHECK(indices->dim() == 1 && indices->scalar_type() == at::kLong, "pack_values: indices must be 1-D int64");
  }
  const c10::cuda::CUDAGuard guard(values.device());
  values = values.contiguous();
  at::Tensor idx = gather ? indices->contiguous() : at::Tensor();
  const int64_t n = values.numel(), k = gather ? idx.numel() : n;
  at::Tensor out = at::empty({k}, values.options().dtype(dtype));
  if (k == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  DS_EXT_DISPATCH(values.scalar_type(), "pack_values_in", [&] {
    using in_t = scalar_t;
    DS_EXT_DISPATCH(dtype, "pack_values_out", [&] {
      pack_kernel<in_t, scalar_t><<<grid_for(k), kThreads, 0, stream>>>(
          values.data_ptr<in_t>(), n, gather ? idx.data_ptr<int64_t>() : nullptr, k, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}
