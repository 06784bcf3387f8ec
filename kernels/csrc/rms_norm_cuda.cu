// Fused RMSNorm forward/backward kernels (see rms_norm.h). Header-light on purpose: only the
// CUDA runtime and fp16/bf16 headers, so `nvcc -c` checks the kernels without torch.
#include "rms_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace megapt {
namespace {

constexpr int kMaxThreads = 1024;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the block; every thread gets the result. `shared` holds >= 32 floats.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = lane < n_warps ? shared[lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One block per row.
template <typename T, typename W>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                    T* __restrict__ y, float* __restrict__ rstd, int64_t cols,
                                    float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = to_float(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, shared);
  const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float x_hat = to_float(from_float<T>(to_float(xr[j]) * r));  // rounded like HF Llama
    yr[j] = from_float<T>(x_hat * to_float(w[j]));
  }
}

// Block b handles rows b, b + gridDim.x, ...; thread t owns columns t, t + blockDim.x, ...
// of the block's fp32 dW partial row, so the read-modify-write there needs no atomics.
template <typename T, typename W>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const W* __restrict__ w, const float* __restrict__ rstd,
                                    T* __restrict__ dx, float* __restrict__ dw_partial,
                                    int64_t rows, int64_t cols) {
  __shared__ float shared[32];
  float* part = dw_partial + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) part[j] = 0.f;
  const float inv_cols = 1.f / static_cast<float>(cols);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    const T* dyr = dy + row * cols;
    T* dxr = dx + row * cols;
    const float r = rstd[row];
    float dot = 0.f;  // sum_j dy_j * w_j * x_hat_j
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      dot += to_float(dyr[j]) * to_float(w[j]) * to_float(xr[j]) * r;
    }
    dot = block_sum(dot, shared) * inv_cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float x_hat = to_float(xr[j]) * r;
      const float g = to_float(dyr[j]);
      dxr[j] = from_float<T>(r * (g * to_float(w[j]) - x_hat * dot));
      part[j] += g * to_float(from_float<T>(x_hat));  // the rounded x_hat the forward used
    }
  }
}

// dw[j] = sum_p dw_partial[p, j]: one thread per column, fixed order (deterministic).
template <typename W>
__global__ void rms_norm_dw_reduce_kernel(const float* __restrict__ dw_partial, W* __restrict__ dw,
                                          int num_partials, int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float acc = 0.f;
  for (int p = 0; p < num_partials; ++p) acc += dw_partial[static_cast<int64_t>(p) * cols + j];
  dw[j] = from_float<W>(acc);
}

int threads_for(int64_t cols) {
  int t = 32;
  while (t < kMaxThreads && t < cols) t <<= 1;
  return t < 128 ? 128 : t;
}

template <typename T, typename W>
cudaError_t forward_impl(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                         int64_t cols, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_fwd_kernel<T, W><<<static_cast<unsigned>(rows), threads_for(cols), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(w), static_cast<T*>(y), rstd, cols, eps);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t backward_impl(const void* dy, const void* x, const void* w, const float* rstd,
                          void* dx, void* dw, float* dw_partial, int num_partials, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
  if (rows > 0) {
    rms_norm_bwd_kernel<T, W><<<num_partials, threads_for(cols), 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(w), rstd,
        static_cast<T*>(dx), dw_partial, rows, cols);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  } else {
    num_partials = 0;  // dw = 0
  }
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((cols + threads - 1) / threads);
  rms_norm_dw_reduce_kernel<W><<<blocks, threads, 0, stream>>>(dw_partial, static_cast<W*>(dw),
                                                               num_partials, cols);
  return cudaGetLastError();
}

}  // namespace

// Dispatch on (x dtype, weight dtype): same dtype, or fp32 weights with half activations.
#define MEGAPT_RMS_DISPATCH(XT, WT, FN, ...)                                              \
  do {                                                                                    \
    if (XT == DType::kFloat32 && WT == DType::kFloat32) return FN<float, float>(__VA_ARGS__); \
    if (XT == DType::kFloat16 && WT == DType::kFloat16) return FN<__half, __half>(__VA_ARGS__); \
    if (XT == DType::kBFloat16 && WT == DType::kBFloat16)                                  \
      return FN<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__);                                \
    if (XT == DType::kFloat16 && WT == DType::kFloat32) return FN<__half, float>(__VA_ARGS__); \
    if (XT == DType::kBFloat16 && WT == DType::kFloat32)                                   \
      return FN<__nv_bfloat16, float>(__VA_ARGS__);                                        \
    return cudaErrorInvalidValue;                                                          \
  } while (0)

cudaError_t rms_norm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                             int64_t cols, float eps, DType xt, DType wt, cudaStream_t stream) {
  MEGAPT_RMS_DISPATCH(xt, wt, forward_impl, x, w, y, rstd, rows, cols, eps, stream);
}

cudaError_t rms_norm_backward(const void* dy, const void* x, const void* w, const float* rstd,
                              void* dx, void* dw, float* dw_partial, int num_partials,
                              int64_t rows, int64_t cols, DType xt, DType wt,
                              cudaStream_t stream) {
  MEGAPT_RMS_DISPATCH(xt, wt, backward_impl, dy, x, w, rstd, dx, dw, dw_partial, num_partials,
                      rows, cols, stream);
}

int rms_norm_num_partials(int64_t rows, int device) {
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
  int64_t n = 2 * static_cast<int64_t>(sms);
  if (rows < n) n = rows;
  return n < 1 ? 1 : static_cast<int>(n);
}

}  // namespace megapt
