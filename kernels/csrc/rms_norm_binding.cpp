// Torch binding of the fused RMSNorm CUDA kernels (rms_norm_cuda.cu): checks and allocation
// live here; the kernels never see a torch header. Only CPU-side torch headers are used (the
// caller passes the current CUDA stream and has made x's device current, see cuda_ext.py), so
// this file also compiles against a CPU-only torch, which is how CI checks it.
#include <torch/extension.h>

#include "rms_norm.h"

namespace {

megapt::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return megapt::DType::kFloat32;
    case at::kHalf: return megapt::DType::kFloat16;
    case at::kBFloat16: return megapt::DType::kBFloat16;
    default: TORCH_CHECK(false, "megapt rms_norm (cuda): ", name, " has unsupported dtype ", t.scalar_type());
  }
  return megapt::DType::kFloat32;  // unreachable
}

void check_inputs(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "megapt rms_norm (cuda): x and weight must be CUDA tensors");
  TORCH_CHECK(x.device() == w.device(), "megapt rms_norm (cuda): x and weight are on different devices");
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0),
              "megapt rms_norm (cuda): weight shape ", w.sizes(), " does not match the last dim of x ", x.sizes());
  const bool same = x.scalar_type() == w.scalar_type();
  const bool fp32_w = w.scalar_type() == at::kFloat;
  TORCH_CHECK(same || fp32_w, "megapt rms_norm (cuda): weight dtype ", w.scalar_type(),
              " must equal x dtype ", x.scalar_type(), " or be float32");
}

// x (..., C), w (C,) -> {y (..., C), rstd (N,) fp32}
std::vector<at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& w_in, double eps,
                                int64_t stream) {
  check_inputs(x_in, w_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const cudaError_t err = megapt::rms_norm_forward(
      x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, cols,
      static_cast<float>(eps), to_dtype(x, "x"), to_dtype(w, "weight"),
      reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "megapt rms_norm (cuda) forward: ", cudaGetErrorString(err));
  return {y, rstd};
}

// dy, x (..., C), w (C,), rstd (N,) -> {dx (..., C), dw (C,)}
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                 const at::Tensor& w_in, const at::Tensor& rstd, int64_t stream) {
  check_inputs(x_in, w_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "megapt rms_norm (cuda) backward: dy must match x in shape and dtype");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat,
              "megapt rms_norm (cuda) backward: rstd must be fp32 with one value per row");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(w);
  const int partials = megapt::rms_norm_num_partials(rows, x.get_device());
  at::Tensor dw_partial = at::empty({partials, cols}, x.options().dtype(at::kFloat));
  const cudaError_t err = megapt::rms_norm_backward(
      dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
      dw.data_ptr(), dw_partial.data_ptr<float>(), partials, rows, cols, to_dtype(x, "x"),
      to_dtype(w, "weight"), reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "megapt rms_norm (cuda) backward: ", cudaGetErrorString(err));
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megapt fused RMSNorm (CUDA)";
  m.def("forward", &forward, "RMSNorm forward: (x, weight, eps, stream) -> [y, rstd]");
  m.def("backward", &backward, "RMSNorm backward: (dy, x, weight, rstd, stream) -> [dx, dweight]");
}
