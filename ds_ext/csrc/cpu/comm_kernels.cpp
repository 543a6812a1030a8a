// CPU kernels of the compressed-allreduce ops (ds_ext.ops). Built by ds_ext/op_builder (CommCPUBuilder)
// as the extension `ds_ext_comm_cpu`; the Python face and the torch reference of every function are
// in ds_ext/ops.py. Conventions: 1-D tensors, global int64 indices, fp32 comparisons/arithmetic for
// fp16/bf16 input, values returned as exact copies in the input's dtype. Parallelism: at::parallel_for
// (OpenMP in the torch wheels) over fixed-size chunks, so results do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

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

#define DS_EXT_DISPATCH(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------- 1.
// indices (global, increasing), values (x's dtype) and count of |x[i] (+ e[i])| >= t, i in [start, end).
template <typename T, bool EF>
void select_chunk(const T* x, const float* e, int64_t b, int64_t c_end, float t, std::vector<int64_t>& out) {
  int64_t i = b;
  for (; i + kBlock <= c_end; i += kBlock) {
    int hit = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      float v = static_cast<float>(x[i + j]);
      if (EF) v += e[i + j];
      hit |= (std::fabs(v) >= t);
    }
    if (!hit) continue;
    for (int64_t j = 0; j < kBlock; ++j) {
      float v = static_cast<float>(x[i + j]);
      if (EF) v += e[i + j];
      if (std::fabs(v) >= t) out.push_back(i + j);
    }
  }
  for (; i < c_end; ++i) {
    float v = static_cast<float>(x[i]);
    if (EF) v += e[i];
    if (std::fabs(v) >= t) out.push_back(i);
  }
}

std::vector<at::Tensor> threshold_select(at::Tensor x, c10::optional<at::Tensor> error, double threshold,
                                         int64_t start, int64_t end) {
  TORCH_CHECK(x.dim() == 1 && x.device().is_cpu() && supported(x.scalar_type()),
              "threshold_select: x must be a 1-D CPU fp32/fp16/bf16 tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(0 <= start && start <= end && end <= n, "threshold_select: bad range");
  x = x.contiguous();
  at::Tensor e;
  const bool ef = error.has_value() && error->defined();
  if (ef) {
    e = error->contiguous();
    TORCH_CHECK(e.dim() == 1 && e.numel() == n && e.scalar_type() == at::kFloat && e.device().is_cpu(),
                "threshold_select: error must be a CPU fp32 vector as long as x");
  }
  const float t = static_cast<float>(threshold);
  const int64_t len = end - start;
  const int64_t nchunks = (len + kChunk - 1) / kChunk;
  std::vector<std::vector<int64_t>> hits(nchunks);
  at::Tensor idx, vals;
  DS_EXT_DISPATCH(x.scalar_type(), "threshold_select", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const float* ep = ef ? e.data_ptr<float>() : nullptr;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t b = start + c * kChunk, ce = std::min(end, b + kChunk);
        if (ef) select_chunk<scalar_t, true>(xp, ep, b, ce, t, hits[c]);
        else select_chunk<scalar_t, false>(xp, ep, b, ce, t, hits[c]);
      }
    });
    std::vector<int64_t> off(nchunks + 1, 0);
    for (int64_t c = 0; c < nchunks; ++c) off[c + 1] = off[c] + static_cast<int64_t>(hits[c].size());
    idx = at::empty({off[nchunks]}, x.options().dtype(at::kLong));
    vals = at::empty({off[nchunks]}, x.options());
    int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* vp = vals.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t o = off[c];
        for (int64_t i : hits[c]) {
          ip[o] = i;
          vp[o] = ef ? static_cast<scalar_t>(static_cast<float>(xp[i]) + ep[i]) : xp[i];
          ++o;
        }
      }
    });
  });
  return {idx, vals};
}

// ---------------------------------------------------------------------------------------------- 2.
// dense[idx] += values (in order: repeated indices accumulate exactly as index_add_ does), and, fused
// in the same pass, zero_in[idx] = 0 (the error-feedback update) when zero_in is given.
at::Tensor scatter_add_(at::Tensor dense, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> zero_in) {
  TORCH_CHECK(dense.dim() == 1 && dense.is_contiguous() && dense.device().is_cpu() && supported(dense.scalar_type()),
              "scatter_add_: dense must be a contiguous 1-D CPU fp32/fp16/bf16 tensor");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && values.dim() == 1 && values.numel() == idx.numel(),
              "scatter_add_: indices (int64) and values must be 1-D and of equal length");
  const bool zero = zero_in.has_value() && zero_in->defined();
  if (zero)
    TORCH_CHECK(zero_in->dim() == 1 && zero_in->is_contiguous() && zero_in->scalar_type() == at::kFloat &&
                    zero_in->numel() == dense.numel(),
                "scatter_add_: zero_in must be a contiguous fp32 vector as long as dense");
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
// signs of x packed 8 per byte (bit j of byte b <-> element 8b + j; 1 means x >= 0), scale = mean |x|
// (accumulated in double over fixed chunks, combined in order). When residual is given it receives
// x - scale * sign(x) in fp32 (may alias x: element-wise, read before write).
std::vector<at::Tensor> sign_pack(at::Tensor x, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 1 && x.device().is_cpu() && supported(x.scalar_type()),
              "sign_pack: x must be a 1-D CPU fp32/fp16/bf16 tensor");
  const bool res = residual.has_value() && residual->defined();
  if (res)
    TORCH_CHECK(residual->dim() == 1 && residual->is_contiguous() && residual->scalar_type() == at::kFloat &&
                    residual->numel() == x.numel(),
                "sign_pack: residual must be a contiguous fp32 vector as long as x");
  x = x.contiguous();
  const int64_t n = x.numel(), nbytes = (n + 7) / 8;
  at::Tensor packed = at::empty({nbytes}, x.options().dtype(at::kByte));
  float scale = 0.f;
  DS_EXT_DISPATCH(x.scalar_type(), "sign_pack", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    std::vector<double> part(nchunks, 0.0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double s = 0.0;
        for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i) s += std::fabs(static_cast<float>(xp[i]));
        part[c] = s;
      }
    });
    double total = 0.0;
    for (double s : part) total += s;
    scale = n ? static_cast<float>(total / static_cast<double>(n)) : 0.f;
    uint8_t* pp = packed.data_ptr<uint8_t>();
    float* rp = res ? residual->data_ptr<float>() : nullptr;
    const float sc = scale;
    const int64_t full = n / 8;  // bytes with 8 elements; the last partial byte below
    auto pack = [&](auto with_res) {
      at::parallel_for(0, full, kChunk / 8, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* q = xp + 8 * b;
          uint8_t byte = 0;
          for (int j = 0; j < 8; ++j) {
            const float v = static_cast<float>(q[j]);
            const bool pos = v >= 0.f;
            byte |= static_cast<uint8_t>(pos) << j;
            if (decltype(with_res)::value) rp[8 * b + j] = v - (pos ? sc : -sc);
          }
          pp[b] = byte;
        }
      });
    };
    if (res) pack(std::true_type{});
    else pack(std::false_type{});
    if (full < nbytes) {
      uint8_t byte = 0;
      for (int64_t i = 8 * full; i < n; ++i) {
        const float v = static_cast<float>(xp[i]);
        const bool pos = v >= 0.f;
        byte |= static_cast<uint8_t>(pos) << (i - 8 * full);
        if (res) rp[i] = v - (pos ? sc : -sc);
      }
      pp[full] = byte;
    }
  });
  return {packed, at::full({}, scale, x.options().dtype(at::kFloat))};
}

// out[i] (+)= bit ? scale : -scale, for i < out.numel().
at::Tensor sign_unpack(at::Tensor packed, double scale_d, at::Tensor out, bool accumulate) {
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.device().is_cpu(),
              "sign_unpack: packed must be a 1-D CPU uint8 tensor");
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && supported(out.scalar_type()),
              "sign_unpack: out must be a contiguous 1-D fp32/fp16/bf16 tensor");
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() * 8 >= n, "sign_unpack: ", packed.numel(), " bytes hold fewer than ", n, " signs");
  packed = packed.contiguous();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float sc = static_cast<float>(scale_d);
  DS_EXT_DISPATCH(out.scalar_type(), "sign_unpack", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    auto unpack = [&](auto acc) {
      at::parallel_for(0, (n + 7) / 8, kChunk / 8, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const uint8_t byte = pp[b];
          const int64_t i0 = 8 * b, m = std::min<int64_t>(8, n - i0);
          scalar_t* q = op + i0;
          for (int64_t j = 0; j < m; ++j) {
            const float s = ((byte >> j) & 1) ? sc : -sc;
            q[j] = decltype(acc)::value ? static_cast<scalar_t>(static_cast<float>(q[j]) + s) : static_cast<scalar_t>(s);
          }
        }
      });
    };
    if (accumulate) unpack(std::true_type{});
    else unpack(std::false_type{});
  });
  return out;
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
  m.def("threshold_select", &threshold_select, "fused (x [+ e]) threshold select and compact over [start, end)",
        py::arg("x"), py::arg("error"), py::arg("threshold"), py::arg("start"), py::arg("end"));
  m.def("scatter_add_", &scatter_add_, "dense[idx] += values; zero_in[idx] = 0 in the same pass",
        py::arg("dense"), py::arg("indices"), py::arg("values"), py::arg("zero_in"));
  m.def("sign_pack", &sign_pack, "signs to bits + mean |x| scale (+ fp32 residual)", py::arg("x"), py::arg("residual"));
  m.def("sign_unpack", &sign_unpack, "bits to +-scale (or accumulate)", py::arg("packed"), py::arg("scale"),
        py::arg("out"), py::arg("accumulate"));
  m.def("pack_values", &pack_values, "(gather and) convert values to fp16/bf16/fp32", py::arg("values"),
        py::arg("indices"), py::arg("dtype"));
  m.def("torch_version", &torch_version, "torch major*100+minor this module was compiled against");
  m.attr("device") = "cpu";
}
