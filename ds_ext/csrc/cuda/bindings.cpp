// Python bindings of the CUDA kernels (comm_kernels.cu); same names and arguments as the CPU op.
#include <torch/extension.h>
#include <torch/version.h>

#include <vector>

std::vector<at::Tensor> threshold_select_cuda(at::Tensor x, c10::optional<at::Tensor> error, double threshold,
                                              int64_t start, int64_t end, int64_t count);
at::Tensor threshold_count_cuda(at::Tensor x, c10::optional<at::Tensor> error, double threshold, int64_t start,
                                int64_t end);
at::Tensor scatter_add_cuda(at::Tensor dense, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> zero_in);
std::vector<at::Tensor> sign_pack_cuda(at::Tensor x, c10::optional<at::Tensor> residual);
std::vector<at::Tensor> sign_pack_segments_cuda(at::Tensor x, std::vector<int64_t> offsets,
                                                c10::optional<at::Tensor> residual);
at::Tensor sign_unpack_cuda(at::Tensor packed, c10::optional<at::Tensor> scale, double scale_value, at::Tensor out,
                            bool accumulate);
at::Tensor sign_unpack_segments_cuda(at::Tensor packed, at::Tensor scales, std::vector<int64_t> offsets, at::Tensor out,
                                     bool accumulate);
at::Tensor pack_values_cuda(at::Tensor values, c10::optional<at::Tensor> indices, at::ScalarType dtype);

static int64_t torch_version() { return TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ds_ext compressed-allreduce kernels (CUDA)";
  m.def("threshold_select", &threshold_select_cuda, py::arg("x"), py::arg("error"), py::arg("threshold"),
        py::arg("start"), py::arg("end"), py::arg("count") = -1);
  m.def("threshold_count", &threshold_count_cuda, py::arg("x"), py::arg("error"), py::arg("threshold"),
        py::arg("start"), py::arg("end"));
  m.def("scatter_add_", &scatter_add_cuda, py::arg("dense"), py::arg("indices"), py::arg("values"),
        py::arg("zero_in"));
  m.def("sign_pack", &sign_pack_cuda, py::arg("x"), py::arg("residual"));
  m.def("sign_pack_segments", &sign_pack_segments_cuda, py::arg("x"), py::arg("offsets"), py::arg("residual"));
  m.def("sign_unpack", &sign_unpack_cuda, py::arg("packed"), py::arg("scale"), py::arg("scale_value"), py::arg("out"),
        py::arg("accumulate"));
  m.def("sign_unpack_segments", &sign_unpack_segments_cuda, py::arg("packed"), py::arg("scales"), py::arg("offsets"),
        py::arg("out"), py::arg("accumulate"));
  m.def("pack_values", &pack_values_cuda, py::arg("values"), py::arg("indices"), py::arg("dtype"));
  m.def("torch_version", &torch_version);
  m.attr("device") = "cuda";
}
