// CPU kernels of the compressed-allreduce ops (ds_ext.ops). Built by ds_ext/op_builder (CommCPUBuilder)
// as the extension `ds_ext_comm_cpu`; the Python face and the torch reference of every function are
// in ds_ext/ops.py. Conventions: 1-D tensors, global int64 indices, fp32 comparisons/arithmetic for
// fp16/bf16 input, values returned as exact copies in the input's dtype. Parallelism: at::parallel_for
// (OpenMP in the torch wheels) over fixed-size chunks, so results do not depend on the thread count.
// Errors (bad arguments, out-of-range indices) are TORCH_CHECKs: on the CPU they cost no device sync.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per parallel work item
constexpr int64_t kBlock = 64;       // elements tested at once before the exact per-element pass

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// fp32, fp16 and bf16 only: the Python side never passes another dtype (no double instantiations)
#define DS_EXT_DISPATCH(TYPE, NAME, ...)                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_cpu(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " is on ", t.device(), ", expected the CPU");
}

// ---------------------------------------------------------------------------------------------- 1.
// |x[i] (+ e[i])| >= t, i in [start, end): indices (global, increasing), values (x's dtype), count.
template <typename T, bool EF>
inline float load_y(const T* x, const float* e, int64_t i) {
  float v = static_cast<float>(x[i]);
  if (EF) v += e[i];
  return v;
}

template <typename T, bool EF>
void select_chunk(const T* x, const float* e, int64_t b, int64_t c_end, float t, std::vector<int64_t>& out) {
  int64_t i = b;
  for (; i + kBlock <= c_end; i += kBlock) {
    int hit = 0;
    for (int64_t j = 0; j < kBlock; ++j) hit |= (std::fabs(load_y<T, EF>(x, e, i + j)) >= t);
    if (!hit) continue;
    for (int64_t j = 0; j < kBlock; ++j)
      if (std::fabs(load_y<T, EF>(x, e, i + j)) >= t) out.push_back(i + j);
  }
  for (; i < c_end; ++i)
    if (std::fabs(load_y<T, EF>(x, e, i)) >= t) out.push_back(i);
}

template <typename T, bool EF>
int64_t count_chunk(const T* x, const float* e, int64_t b, int64_t c_end, float t) {
  int64_t c = 0;
  for (int64_t i = b; i < c_end; ++i) c += (std::fabs(load_y<T, EF>(x, e, i)) >= t);
  return c;
}

struct Range {
  at::Tensor x, e;
  bool ef = false;
  int64_t start = 0, end = 0, nchunks = 0;
};

Range check_range(const char* fn, at::Tensor x, const c10::optional<at::Tensor>& error, int64_t start, int64_t end) {
  TORCH_CHECK(x.dim() == 1 && x.device().is_cpu() && supported(x.scalar_type()), fn,
              ": x must be a 1-D CPU fp32/fp16/bf16 tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(0 <= start && start <= end && end <= n, fn, ": bad range [", start, ", ", end, ") for ", n, " elements");
  Range r;
  r.x = x.contiguous();
  r.ef = error.has_value() && error->defined();
  if (r.ef) {
    check_cpu(*error, fn, "error");
    r.e = error->contiguous();
    TORCH_CHECK(r.e.dim() == 1 && r.e.numel() == n && r.e.scalar_type() == at::kFloat, fn,
                ": error must be an fp32 vector as long as x");
  }
  r.start = start;
  r.end = end;
  r.nchunks = (end - start + kChunk - 1) / kChunk;
  return r;
}

// count < 0: unknown; count >= 0: the caller's count, checked (a host check, free on the CPU)
std::vector<at::Tensor> threshold_select(at::Tensor x, c10::optional<at::Tensor> error, double threshold,
                                         int64_t start, int64_t end, int64_t count) {
  Range r = check_range("threshold_select", x, error, start, end);
  const float t = static_cast<float>(threshold);
  std::vector<std::vector<int64_t>> hits(r.nchunks);
  at::Tensor idx, vals;
  DS_EXT_DISPATCH(r.x.scalar_type(), "threshold_select", [&] {
    const scalar_t* xp = r.x.data_ptr<scalar_t>();
    const float* ep = r.ef ? r.e.data_ptr<float>() : nullptr;
    at::parallel_for(0, r.nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = start + c * kChunk, ce = std::min(end, b + kChunk);
        if (r.ef) select_chunk<scalar_t, true>(xp, ep, b, ce, t, hits[c]);
        else select_chunk<scalar_t, false>(xp, ep, b, ce, t, hits[c]);
      }
    });
    std::vector<int64_t> off(r.nchunks + 1, 0);
    for (int64_t c = 0; c < r.nchunks; ++c) off[c + 1] = off[c] + static_cast<int64_t>(hits[c].size());
    TORCH_CHECK(count < 0 || count == off[r.nchunks], "threshold_select: count=", count, " but ", off[r.nchunks],
                " entries pass the threshold (count must come from threshold_count with the same arguments)");
    idx = at::empty({off[r.nchunks]}, r.x.options().dtype(at::kLong));
    vals = at::empty({off[r.nchunks]}, r.x.options());
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* vp = vals.data_ptr<scalar_t>();
    at::parallel_for(0, r.nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t o = off[c];
        for (int64_t i : hits[c]) {
          ip[o] = i;
          vp[o] = r.ef ? static_cast<scalar_t>(static_cast<float>(xp[i]) + ep[i]) : xp[i];
          ++o;
        }
      }
    });
  });
  return {idx, vals};
}

// the number of |x[i] (+ e[i])| >= t in [start, end) as a 0-d int64 tensor
at::Tensor threshold_count(at::Tensor x, c10::optional<at::Tensor> error, double threshold, int64_t start,
                           int64_t end) {
  Range r = check_range("threshold_count", x, error, start, end);
  const float t = static_cast<float>(threshold);
  std::vector<int64_t> part(r.nchunks, 0);
  DS_EXT_DISPATCH(r.x.scalar_type(), "threshold_count", [&] {
    const scalar_t* xp = r.x.data_ptr<scalar_t>();
    const float* ep = r.ef ? r.e.data_ptr<float>() : nullptr;
    at::parallel_for(0, r.nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = start + c * kChunk, ce = std::min(end, b + kChunk);
        part[c] = r.ef ? count_chunk<scalar_t, true>(xp, ep, b, ce, t) : count_chunk<scalar_t, false>(xp, ep, b, ce, t);
      }
    });
  });
  int64_t total = 0;
  for (int64_t c : part) total += c;
  return at::scalar_tensor(total, r.x.options().dtype(at::kLong));
}

// ---------------------------------------------------------------------------------------------- 2.
// dense[idx] += values (in order: repeated indices accumulate exactly as index_add_ does), and, fused
// in the same pass, zero_in[idx] = 0 (the error-feedback update) when zero_in is given.
at::Tensor scatter_add_(at::Tensor dense, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> zero_in) {
  TORCH_CHECK(dense.dim() == 1 && dense.is_contiguous() && dense.device().is_cpu() && supported(dense.scalar_type()),
              "scatter_add_: dense must be a contiguous 1-D CPU fp32/fp16/bf16 tensor");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && values.dim() == 1 && values.numel() == idx.numel(),
              "scatter_add_: indices (int64) and values must be 1-D and of equal length");
  check_cpu(idx, "scatter_add_", "indices");
  check_cpu(values, "scatter_add_", "values");
  const bool zero = zero_in.has_value() && zero_in->defined();
  if (zero) {
    check_cpu(*zero_in, "scatter_add_", "zero_in");
    TORCH_CHECK(zero_in->dim() == 1 && zero_in->is_contiguous() && zero_in->scalar_type() == at::kFloat &&
                    zero_in->numel() == dense.numel(),
                "scatter_add_: zero_in must be a contiguous fp32 vector as long as dense");
  }
  idx = idx.contiguous();
  values = values.to(dense.scalar_type()).contiguous();  // index_add_ converts the same way
  const int64_t n = dense.numel(), k = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* zp = zero ? zero_in->data_ptr<float>() : nullptr;
  DS_EXT_DISPATCH(dense.scalar_type(), "scatter_add_", [&] {
    scalar_t* dp = dense.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) {
      int64_t i = ip[j];
      if (i < 0) i += n;
      TORCH_CHECK(i >= 0 && i < n, "scatter_add_: index ", ip[j], " out of range for size ", n);
      dp[i] = static_cast<scalar_t>(static_cast<float>(dp[i]) + static_cast<float>(vp[j]));
      if (zero) zp[i] = 0.f;
    }
  });
  return dense;
}

// ---------------------------------------------------------------------------------------------- 3.
// Sign compression of segments of one flat vector: segment t is x[off[t], off[t+1]); its signs are packed
// 8 per byte from its own byte boundary (bit j of byte b <-> element off[t] + 8b + j; 1 means x >= 0;
// unused high bits 0), its scale is mean |segment| accumulated in double over fixed chunks of the
// segment, combined in order (0 for an empty segment). sign_pack of one tensor is the case of one
// segment [0, n), so the two agree bit for bit. residual (may alias x: element-wise, read before write)
// receives x - scale_t * sign(x) in fp32.
struct SegLayout {
  int64_t T = 0;
  std::vector<int64_t> off, bytes, chunks, bchunks;  // prefix arrays of T + 1
};

constexpr int64_t kByteChunk = kChunk / 8;  // packed bytes per parallel work item

SegLayout seg_layout(const std::vector<int64_t>& off, int64_t numel, const char* fn) {
  TORCH_CHECK(!off.empty(), fn, ": offsets needs at least one entry");
  SegLayout L;
  L.T = static_cast<int64_t>(off.size()) - 1;
  L.off = off;
  TORCH_CHECK(off[0] >= 0 && off[L.T] <= numel, fn, ": offsets span [", off[0], ", ", off[L.T], "), the vector has ",
              numel, " elements");
  L.bytes.assign(L.T + 1, 0);
  L.chunks.assign(L.T + 1, 0);
  L.bchunks.assign(L.T + 1, 0);
  for (int64_t t = 0; t < L.T; ++t) {
    const int64_t n = off[t + 1] - off[t];
    TORCH_CHECK(n >= 0, fn, ": offsets must not decrease (", off[t], " then ", off[t + 1], ")");
    const int64_t nb = (n + 7) / 8;
    L.bytes[t + 1] = L.bytes[t] + nb;
    L.chunks[t + 1] = L.chunks[t] + (n + kChunk - 1) / kChunk;
    L.bchunks[t + 1] = L.bchunks[t] + (nb + kByteChunk - 1) / kByteChunk;
  }
  return L;
}

// the segment of work item c in a prefix array (largest t with pre[t] <= c; pre[T] > c)
inline int64_t seg_of(const std::vector<int64_t>& pre, int64_t c) {
  return static_cast<int64_t>(std::upper_bound(pre.begin(), pre.end(), c) - pre.begin()) - 1;
}

// packed-byte work item c: its segment t, the segment's element count n, and its bytes [b0, b1)
struct ByteChunk {
  int64_t t, n, b0, b1;
};

inline ByteChunk byte_chunk(const SegLayout& L, int64_t c) {
  const int64_t t = seg_of(L.bchunks, c);
  const int64_t nb = L.bytes[t + 1] - L.bytes[t];
  const int64_t b0 = (c - L.bchunks[t]) * kByteChunk;
  return {t, L.off[t + 1] - L.off[t], b0, std::min(nb, b0 + kByteChunk)};
}

template <typename scalar_t>
void pack_segments(const scalar_t* xp, const SegLayout& L, uint8_t* pp, float* rp, float* sp) {
  std::vector<double> part(L.chunks[L.T], 0.0);
  at::parallel_for(0, L.chunks[L.T], 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t = seg_of(L.chunks, c);
      const int64_t b = L.off[t] + (c - L.chunks[t]) * kChunk, e = std::min(L.off[t + 1], b + kChunk);
      double s = 0.0;
      for (int64_t i = b; i < e; ++i) s += std::fabs(static_cast<float>(xp[i]));
      part[c] = s;
    }
  });
  for (int64_t t = 0; t < L.T; ++t) {
    double total = 0.0;
    for (int64_t c = L.chunks[t]; c < L.chunks[t + 1]; ++c) total += part[c];
    const int64_t n = L.off[t + 1] - L.off[t];
    sp[t] = n ? static_cast<float>(total / static_cast<double>(n)) : 0.f;
  }
  auto pack = [&](auto with_res) {
    at::parallel_for(0, L.bchunks[L.T], 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto [t, n, b0, b1] = byte_chunk(L, c);
        const scalar_t* xs = xp + L.off[t];
        float* rs = decltype(with_res)::value ? rp + L.off[t] : nullptr;
        uint8_t* ps = pp + L.bytes[t];
        const float sc = sp[t];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m = std::min<int64_t>(8, n - 8 * b);
          uint8_t byte = 0;
          for (int64_t j = 0; j < m; ++j) {
            const float v = static_cast<float>(xs[8 * b + j]);
            const bool pos = v >= 0.f;
            byte |= static_cast<uint8_t>(static_cast<uint8_t>(pos) << j);
            if (decltype(with_res)::value) rs[8 * b + j] = v - (pos ? sc : -sc);
          }
          ps[b] = byte;
        }
      }
    });
  };
  if (rp) pack(std::true_type{});
  else pack(std::false_type{});
}

void check_residual(const char* fn, const c10::optional<at::Tensor>& residual, const at::Tensor& x) {
  check_cpu(*residual, fn, "residual");
  TORCH_CHECK(residual->dim() == 1 && residual->is_contiguous() && residual->scalar_type() == at::kFloat &&
                  residual->numel() == x.numel(),
              fn, ": residual must be a contiguous fp32 vector as long as x");
}

std::vector<at::Tensor> sign_pack_segments(at::Tensor x, std::vector<int64_t> offsets,
                                           c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1 && x.device().is_cpu() && supported(x.scalar_type()),
              "sign_pack_segments: x must be a 1-D CPU fp32/fp16/bf16 tensor");
  const bool res = residual.has_value() && residual->defined();
  if (res) check_residual("sign_pack_segments", residual, x);
  x = x.contiguous();
  const SegLayout L = seg_layout(offsets, x.numel(), "sign_pack_segments");
  at::Tensor packed = at::empty({L.bytes[L.T]}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({L.T}, x.options().dtype(at::kFloat));
  DS_EXT_DISPATCH(x.scalar_type(), "sign_pack_segments", [&] {
    pack_segments<scalar_t>(x.data_ptr<scalar_t>(), L, packed.data_ptr<uint8_t>(),
                            res ? residual->data_ptr<float>() : nullptr, scales.data_ptr<float>());
  });
  return {packed, scales};
}

std::vector<at::Tensor> sign_pack(at::Tensor x, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1, "sign_pack: x must be 1-D");
  auto r = sign_pack_segments(x, {0, x.numel()}, residual);
  return {r[0], r[1].reshape({})};
}

// out[off[t] + i] (+)= bit ? scale_t : -scale_t for the elements of every segment
template <typename scalar_t>
void unpack_segments(const uint8_t* pp, const SegLayout& L, const float* sp, scalar_t* op, bool accumulate) {
  auto unpack = [&](auto acc) {
    at::parallel_for(0, L.bchunks[L.T], 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto [t, n, b0, b1] = byte_chunk(L, c);
        const uint8_t* ps = pp + L.bytes[t];
        scalar_t* os = op + L.off[t];
        const float sc = sp[t];
        for (int64_t b = b0; b < b1; ++b) {
          const uint8_t byte = ps[b];
          const int64_t m = std::min<int64_t>(8, n - 8 * b);
          scalar_t* q = os + 8 * b;
          for (int64_t j = 0; j < m; ++j) {
            const float s = ((byte >> j) & 1) ? sc : -sc;
            q[j] = decltype(acc)::value ? static_cast<scalar_t>(static_cast<float>(q[j]) + s) : static_cast<scalar_t>(s);
          }
        }
      }
    });
  };
  if (accumulate) unpack(std::true_type{});
  else unpack(std::false_type{});
}

void check_unpack(const char* fn, const at::Tensor& packed, const at::Tensor& out) {
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte, fn, ": packed must be a 1-D uint8 tensor");
  check_cpu(packed, fn, "packed");
  check_cpu(out, fn, "out");
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && supported(out.scalar_type()), fn,
              ": out must be a contiguous 1-D fp32/fp16/bf16 tensor");
}

at::Tensor sign_unpack_segments(at::Tensor packed, at::Tensor scales, std::vector<int64_t> offsets, at::Tensor out,
                                bool accumulate) {
  check_unpack("sign_unpack_segments", packed, out);
  const SegLayout L = seg_layout(offsets, out.numel(), "sign_unpack_segments");
  check_cpu(scales, "sign_unpack_segments", "scales");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == L.T, "sign_unpack_segments: scales must hold ",
              L.T, " fp32 values (one per segment)");
  TORCH_CHECK(packed.numel() >= L.bytes[L.T], "sign_unpack_segments: ", packed.numel(), " bytes, the segments need ",
              L.bytes[L.T]);
  packed = packed.contiguous();
  scales = scales.contiguous();
  DS_EXT_DISPATCH(out.scalar_type(), "sign_unpack_segments", [&] {
    unpack_segments<scalar_t>(packed.data_ptr<uint8_t>(), L, scales.data_ptr<float>(), out.data_ptr<scalar_t>(),
                              accumulate);
  });
  return out;
}

// out[i] (+)= bit ? scale : -scale, for i < out.numel(); scale: the 0-d / 1-element tensor when given, else
// scale_value
at::Tensor sign_unpack(at::Tensor packed, c10::optional<at::Tensor> scale, double scale_value, at::Tensor out,
                       bool accumulate) {
  check_unpack("sign_unpack", packed, out);
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() * 8 >= n, "sign_unpack: ", packed.numel(), " bytes hold fewer than ", n, " signs");
  at::Tensor s;
  if (scale.has_value() && scale->defined()) {
    check_cpu(*scale, "sign_unpack", "scale");
    TORCH_CHECK(scale->numel() == 1, "sign_unpack: scale must hold one value");
    s = scale->to(at::kFloat).reshape({1}).contiguous();
  } else {
    s = at::full({1}, static_cast<float>(scale_value), out.options().dtype(at::kFloat));
  }
  return sign_unpack_segments(packed, s, {0, n}, out, accumulate);
}

// ---------------------------------------------------------------------------------------------- 4.
// values (optionally gathered: values[indices]) converted to `dtype` (round to nearest even, as .to()).
at::Tensor pack_values(at::Tensor values, c10::optional<at::Tensor> indices, at::ScalarType dtype) {
  TORCH_CHECK(values.dim() == 1 && values.device().is_cpu() && supported(values.scalar_type()) && supported(dtype),
              "pack_values: values must be a 1-D CPU fp32/fp16/bf16 tensor, dtype fp32/fp16/bf16");
  values = values.contiguous();
  const bool gather = indices.has_value() && indices->defined();
  at::Tensor idx;
  if (gather) {
    check_cpu(*indices, "pack_values", "indices");
    idx = indices->contiguous();
    TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "pack_values: indices must be 1-D int64");
  }
  const int64_t n = values.numel(), k = gather ? idx.numel() : n;
  at::Tensor out = at::empty({k}, values.options().dtype(dtype));
  const int64_t* ip = gather ? idx.data_ptr<int64_t>() : nullptr;
  if (gather)
    for (int64_t j = 0; j < k; ++j)
      TORCH_CHECK(ip[j] >= -n && ip[j] < n, "pack_values: index ", ip[j], " out of range for size ", n);
  DS_EXT_DISPATCH(values.scalar_type(), "pack_values_in", [&] {
    using in_t = scalar_t;
    const in_t* vp = values.data_ptr<in_t>();
    DS_EXT_DISPATCH(dtype, "pack_values_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, k, kChunk, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          int64_t i = gather ? (ip[j] < 0 ? ip[j] + n : ip[j]) : j;
          op[j] = static_cast<scalar_t>(static_cast<float>(vp[i]));
        }
      });
    });
  });
  return out;
}

int64_t torch_version() { return TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ext compressed-allreduce kernels (CPU)";
  m.def("threshold_select", &threshold_select,
        "fused (x [+ e]) threshold select and compact over [start, end); count >= 0: the known hit count",
        py::arg("x"), py::arg("error"), py::arg("threshold"), py::arg("start"), py::arg("end"), py::arg("count") = -1);
  m.def("threshold_count", &threshold_count, "number of |x [+ e]| >= threshold over [start, end), 0-d int64",
        py::arg("x"), py::arg("error"), py::arg("threshold"), py::arg("start"), py::arg("end"));
  m.def("scatter_add_", &scatter_add_, "dense[idx] += values; zero_in[idx] = 0 in the same pass",
        py::arg("dense"), py::arg("indices"), py::arg("values"), py::arg("zero_in"));
  m.def("sign_pack", &sign_pack, "signs to bits + mean |x| scale (+ fp32 residual)", py::arg("x"), py::arg("residual"));
  m.def("sign_pack_segments", &sign_pack_segments, "sign_pack of every segment x[off[t]:off[t+1]], one call",
        py::arg("x"), py::arg("offsets"), py::arg("residual"));
  m.def("sign_unpack", &sign_unpack, "bits to +-scale (or accumulate); scale a tensor or a value",
        py::arg("packed"), py::arg("scale"), py::arg("scale_value"), py::arg("out"), py::arg("accumulate"));
  m.def("sign_unpack_segments", &sign_unpack_segments, "sign_unpack of every segment, scales one per segment",
        py::arg("packed"), py::arg("scales"), py::arg("offsets"), py::arg("out"), py::arg("accumulate"));
  m.def("pack_values", &pack_values, "(gather and) convert values to fp16/bf16/fp32", py::arg("values"),
        py::arg("indices"), py::arg("dtype"));
  m.def("torch_version", &torch_version, "torch major*100+minor this module was compiled against");
  m.attr("device") = "cpu";
}
