// Fused RMSNorm CUDA launchers: plain C++ interface, no torch headers.
//
// rms_norm_cuda.cu implements them (compiled by nvcc on its own, so a kernel build break is
// caught without torch); rms_norm_binding.cpp is the torch extension that calls them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace megapt {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y (rows, cols) = round_xt(x * rsqrt(mean(x^2) + eps)) * w (HF Llama casting), statistics in
// fp32; rstd (rows,) fp32.
// x, y are row-major contiguous; x and y share dtype xt, w (cols,) has dtype wt.
cudaError_t rms_norm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                             int64_t cols, float eps, DType xt, DType wt, cudaStream_t stream);

// dx (rows, cols) in xt; dw (cols,) in wt. dw_partial is fp32 scratch of num_partials * cols
// elements: each block sums its rows there, a second kernel adds the partials (no atomics).
cudaError_t rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd,
                              void* dx, void* dw, float* dw_partial, int num_partials,
                              int64_t rows, int64_t cols, DType xt, DType wt,
                              cudaStream_t stream);

// How many fp32 partial rows rms_norm_backward wants for this device (2 per SM, <= rows).
int rms_norm_num_partials(int64_t rows, int device);

}  // namespace megapt
