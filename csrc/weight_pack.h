// C ABI of the multi-tensor copy + cast kernel (csrc/weight_pack.cu).
//
// Plain C so that the kernel compiles with nvcc alone (no torch headers: CI compile-checks it with
// `nvcc -c -std=c++17 -arch=sm_90a`) and the torch binding (weight_pack_binding.cpp) is a thin
// caller. Used by the weight sync to pack many parameters (mixed dtypes, cast to the engine's
// dtype) into one flat bucket, and to unpack a bucket, in ONE kernel launch.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes (same numbering in kernels/weight_pack.py)
enum wz_dtype {
  WZ_FLOAT32 = 0,
  WZ_FLOAT16 = 1,
  WZ_BFLOAT16 = 2,
  WZ_FLOAT64 = 3,
  WZ_BYTES1 = 4,  // any 1-byte type (uint8/int8/bool): raw copy only
  WZ_BYTES2 = 5,  // any other 2-byte type (int16): raw copy only
  WZ_BYTES4 = 6,  // any other 4-byte type (int32): raw copy only
  WZ_BYTES8 = 7,  // any other 8-byte type (int64): raw copy only
};

// One copy: dst[i] = cast(src[i]) for i < numel. 40 bytes, laid out as 5 int64 words
// (the binding fills an int64 tensor of shape [n_tasks, 5]).
typedef struct wz_copy_task {
  const void* src;
  void* dst;
  int64_t numel;        // elements (not bytes)
  int64_t first_chunk;  // exclusive prefix sum of ceil(numel / chunk_elems) over earlier tasks
  int32_t src_dtype;    // wz_dtype
  int32_t dst_dtype;    // wz_dtype; must equal src_dtype unless both are floating (codes 0-3)
} wz_copy_task;

enum wz_status {
  WZ_OK = 0,
  WZ_BAD_ARGUMENT = 1,    // n_tasks < 0, n_chunks < 0, chunk_elems <= 0 or not a multiple of 16
  WZ_LAUNCH_FAILED = 2,   // cudaGetLastError() after the launch was not cudaSuccess
};

// Element size in bytes of a wz_dtype code, 0 for an unknown code.
int wz_dtype_size(int32_t dtype);

// Launch the copy of all tasks on `stream` (a cudaStream_t; NULL = the legacy default stream).
// `tasks` must be in device memory (or host memory mapped into it); `n_chunks` is the total
// number of chunks, i.e. tasks[n-1].first_chunk + ceil(tasks[n-1].numel / chunk_elems).
// Asynchronous like any kernel launch. Returns a wz_status.
int wz_multi_tensor_copy(const wz_copy_task* tasks, int64_t n_tasks, int64_t n_chunks, int64_t chunk_elems,
                         void* stream);

#ifdef __cplusplus
}
#endif
