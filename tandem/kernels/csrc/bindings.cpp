#include <torch/extension.h>

torch::Tensor gemm_bf16(torch::Tensor x, torch::Tensor w, int64_t N);
torch::Tensor gemm_f16(torch::Tensor x, torch::Tensor w, int64_t N);
torch::Tensor gemm_q8_0(torch::Tensor x, torch::Tensor q, torch::Tensor d, int64_t N);
torch::Tensor gemm_q8_0_panels(torch::Tensor x, torch::Tensor q, torch::Tensor d, torch::Tensor panels);
torch::Tensor gemm_bf16_panels(torch::Tensor x, torch::Tensor w, torch::Tensor panels);
torch::Tensor rows_q8_0(torch::Tensor q, torch::Tensor d, torch::Tensor rows, int64_t K);
torch::Tensor rows_bf16(torch::Tensor w, torch::Tensor rows, int64_t K);
torch::Tensor gemm_vnni(torch::Tensor x, std::string fmt, std::vector<torch::Tensor> parts, int64_t N);
torch::Tensor gemm_vnni_panels(torch::Tensor x, std::string fmt, std::vector<torch::Tensor> parts, int64_t P,
                               torch::Tensor panels);
std::vector<torch::Tensor> gemm_vnni_multi(torch::Tensor x, std::vector<std::string> fmts,
                                           std::vector<std::vector<torch::Tensor>> parts, std::vector<int64_t> Ns);
torch::Tensor rows_q8_0x8(torch::Tensor w, torch::Tensor d, torch::Tensor rows, int64_t K);
torch::Tensor attend_fast(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf, torch::Tensor slots,
                          torch::Tensor q_pos, int64_t window, double scale, double softcap,
                          std::optional<torch::Tensor> tree_base, std::optional<torch::Tensor> tree_pos,
                          std::optional<torch::Tensor> tree_mask);
torch::Tensor attend_quant(torch::Tensor q, torch::Tensor kd, torch::Tensor ks, int64_t kkind, torch::Tensor ksigns,
                           torch::Tensor vd, torch::Tensor vs, int64_t vkind, torch::Tensor vsigns, int64_t dv,
                           torch::Tensor slots, torch::Tensor q_pos, int64_t window, double scale, double softcap);
std::vector<torch::Tensor> kv_quantize(torch::Tensor x, int64_t bits, torch::Tensor signs);
void kv_store(torch::Tensor x, int64_t bits, torch::Tensor signs, torch::Tensor codes, torch::Tensor scales,
              torch::Tensor slots, torch::Tensor positions);

torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> w, double offset, double eps,
                       std::optional<torch::Tensor> residual);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, std::optional<torch::Tensor> w,
                                        double offset, double eps);
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up);
void norm_rope_(torch::Tensor x, std::optional<torch::Tensor> w, double offset, double eps, bool norm,
                torch::Tensor cos, torch::Tensor sin);
void kv_write(torch::Tensor buf, torch::Tensor x, torch::Tensor slots, torch::Tensor positions);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor write_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_buf, torch::Tensor v_buf,
                           torch::Tensor slots, torch::Tensor positions, int64_t window, double scale,
                           double softcap, std::optional<torch::Tensor> index,
                           std::optional<torch::Tensor> tree_base, std::optional<torch::Tensor> tree_pos,
                           std::optional<torch::Tensor> tree_mask);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // compute without the GIL: other Python threads (the server's event loop) keep running during a long kernel
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gemm_bf16", &gemm_bf16, nogil);
  m.def("gemm_f16", &gemm_f16, nogil);
  m.def("gemm_q8_0", &gemm_q8_0, nogil);
  m.def("gemm_q8_0_panels", &gemm_q8_0_panels, nogil);
  m.def("gemm_bf16_panels", &gemm_bf16_panels, nogil);
  m.def("rows_q8_0", &rows_q8_0, nogil);
  m.def("rows_bf16", &rows_bf16, nogil);
  m.def("gemm_vnni", &gemm_vnni, nogil);
  m.def("gemm_vnni_panels", &gemm_vnni_panels, nogil);
  m.def("gemm_vnni_multi", &gemm_vnni_multi, nogil);
  m.def("rows_q8_0x8", &rows_q8_0x8, nogil);
  m.def("attend_fast", &attend_fast, nogil, py::arg("q"), py::arg("k_buf"), py::arg("v_buf"), py::arg("slots"),
        py::arg("q_pos"), py::arg("window"), py::arg("scale"), py::arg("softcap"), py::arg("tree_base") = py::none(),
        py::arg("tree_pos") = py::none(), py::arg("tree_mask") = py::none());
  m.def("attend_quant", &attend_quant, nogil);
  m.def("kv_quantize", &kv_quantize, nogil);
  m.def("kv_store", &kv_store, nogil);
  m.def("rms_norm", &rms_norm, nogil);
  m.def("add_rms_norm", &add_rms_norm, nogil);
  m.def("silu_mul", &silu_mul, nogil);
  m.def("norm_rope_", &norm_rope_, nogil);
  m.def("kv_write", &kv_write, nogil);
  m.def("argmax_rows", &argmax_rows, nogil);
  m.def("write_attend", &write_attend, nogil, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_buf"),
        py::arg("v_buf"), py::arg("slots"), py::arg("positions"), py::arg("window"), py::arg("scale"),
        py::arg("softcap"), py::arg("index") = py::none(), py::arg("tree_base") = py::none(),
        py::arg("tree_pos") = py::none(), py::arg("tree_mask") = py::none());
}
