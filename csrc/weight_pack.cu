// Multi-tensor copy + cast in one launch: pack many parameters into a flat weight-sync bucket
// (casting each to the engine dtype) or unpack a bucket into parameters. See weight_pack.h.
//
// Work split: every task is cut into chunks of `chunk_elems` elements; block b handles global
// chunk b. It finds its task by binary search over tasks[].first_chunk (a few thousand tasks at
// most: ~12 global loads per block, negligible against a chunk of 16K elements). Same-dtype
// chunks are raw byte copies, vectorised to 16-byte loads/stores when src, dst and the chunk
// start are 16-byte aligned (the packer aligns bucket offsets to 256 bytes); casts go through
// float, which is exact for every pair except float64 -> lower, where it is also what torch does
// (c10::Half / c10::BFloat16 are constructed from float).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "weight_pack.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t find_task(const wz_copy_task* tasks, int64_t n_tasks, int64_t chunk) {
  // Last task whose first_chunk <= chunk. Tasks with numel == 0 own no chunk; the search skips
  // them because the next task has the same first_chunk and lies to their right.
  int64_t lo = 0, hi = n_tasks - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) >> 1;
    if (tasks[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int32_t dtype) {
  switch (dtype) {
    case WZ_FLOAT32: return static_cast<const float*>(p)[i];
    case WZ_FLOAT16: return __half2float(static_cast<const __half*>(p)[i]);
    case WZ_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const double*>(p)[i]);  // WZ_FLOAT64
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, int32_t dtype, float v) {
  switch (dtype) {
    case WZ_FLOAT32: static_cast<float*>(p)[i] = v; break;
    case WZ_FLOAT16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case WZ_BFLOAT16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;  // WZ_FLOAT64
  }
}

__device__ __forceinline__ int dtype_size_dev(int32_t dtype) {
  switch (dtype) {
    case WZ_FLOAT32: case WZ_BYTES4: return 4;
    case WZ_FLOAT16: case WZ_BFLOAT16: case WZ_BYTES2: return 2;
    case WZ_FLOAT64: case WZ_BYTES8: return 8;
    default: return 1;
  }
}

__global__ void __launch_bounds__(kThreads)
multi_tensor_copy_kernel(const wz_copy_task* __restrict__ tasks, int64_t n_tasks, int64_t chunk_elems) {
  const int64_t chunk = blockIdx.x;
  const wz_copy_task task = tasks[find_task(tasks, n_tasks, chunk)];
  const int64_t start = (chunk - task.first_chunk) * chunk_elems;
  const int64_t stop = min(start + chunk_elems, task.numel);
  if (start >= stop) return;

  if (task.src_dtype == task.dst_dtype) {
    // Raw copy of the byte range [start * size, stop * size).
    const int64_t size = dtype_size_dev(task.src_dtype);
    const char* src = static_cast<const char*>(task.src) + start * size;
    char* dst = static_cast<char*>(task.dst) + start * size;
    const int64_t nbytes = (stop - start) * size;
    int64_t done = 0;
    if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
      const int64_t nvec = nbytes >> 4;
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(dst);
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) d4[i] = s4[i];
      done = nvec << 4;
    }
    for (int64_t i = done + threadIdx.x; i < nbytes; i += kThreads) dst[i] = src[i];
    return;
  }
  for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
    store_from_float(task.dst, i, task.dst_dtype, load_as_float(task.src, i, task.src_dtype));
  }
}

}  // namespace

extern "C" int wz_dtype_size(int32_t dtype) {
  switch (dtype) {
    case WZ_FLOAT32: case WZ_BYTES4: return 4;
    case WZ_FLOAT16: case WZ_BFLOAT16: case WZ_BYTES2: return 2;
    case WZ_FLOAT64: case WZ_BYTES8: return 8;
    case WZ_BYTES1: return 1;
    default: return 0;
  }
}

extern "C" int wz_multi_tensor_copy(const wz_copy_task* tasks, int64_t n_tasks, int64_t n_chunks,
                                    int64_t chunk_elems, void* stream) {
  // chunk_elems % 16 keeps every chunk start 16-byte aligned for 1-byte types and up.
  if (n_tasks < 0 || n_chunks < 0 || chunk_elems <= 0 || (chunk_elems % 16) != 0) return WZ_BAD_ARGUMENT;
  if (n_tasks == 0 || n_chunks == 0) return WZ_OK;
  if (n_chunks > 0x7fffffffLL) return WZ_BAD_ARGUMENT;  // gridDim.x limit
  multi_tensor_copy_kernel<<<static_cast<unsigned int>(n_chunks), kThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(tasks, n_tasks, chunk_elems);
  return cudaGetLastError() == cudaSuccess ? WZ_OK : WZ_LAUNCH_FAILED;
}
