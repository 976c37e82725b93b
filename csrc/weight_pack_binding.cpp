// torch binding of the multi-tensor copy + cast kernel (weight_pack.cu, C ABI in weight_pack.h).
// Built into wz_kernels._C by setup.py only where a CUDA build of torch exists.
//
// Registers the op `torch.ops.wz_kernels.multi_tensor_copy(Tensor[] srcs, Tensor(a!)[] dsts)`:
// dsts[i].view(-1)[:] = srcs[i].view(-1) cast to dsts[i].dtype, all in one launch on the current
// stream. The Python layer (kernels/weight_pack.py) checks arguments first; the checks here
// guard the ABI (contiguity, device, sizes, dtypes) with TORCH_CHECK.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstring>

#include <vector>

#include "weight_pack.h"

namespace {

constexpr int64_t kChunkElems = 16384;

int32_t wz_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return WZ_FLOAT32;
    case at::kHalf: return WZ_FLOAT16;
    case at::kBFloat16: return WZ_BFLOAT16;
    case at::kDouble: return WZ_FLOAT64;
    default: break;
  }
  switch (c10::elementSize(t)) {
    case 1: return WZ_BYTES1;
    case 2: return WZ_BYTES2;
    case 4: return WZ_BYTES4;
    case 8: return WZ_BYTES8;
    default: TORCH_CHECK(false, "multi_tensor_copy: unsupported dtype ", t);
  }
  return -1;
}

void multi_tensor_copy(at::TensorList srcs, at::TensorList dsts) {
  TORCH_CHECK(srcs.size() == dsts.size(), "multi_tensor_copy: ", srcs.size(), " srcs but ", dsts.size(), " dsts");
  if (srcs.empty()) return;
  const at::Device device = dsts[0].device();
  TORCH_CHECK(device.is_cuda(), "multi_tensor_copy: dsts must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);

  const int64_t n = static_cast<int64_t>(srcs.size());
  at::Tensor table = at::empty({n, 5}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* rows = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& s = srcs[i];
    const at::Tensor& d = dsts[i];
    TORCH_CHECK(s.device() == device && d.device() == device, "multi_tensor_copy: tensor ", i,
                " is not on ", device);
    TORCH_CHECK(s.is_contiguous() && d.is_contiguous(), "multi_tensor_copy: tensor ", i, " is not contiguous");
    TORCH_CHECK(s.numel() == d.numel(), "multi_tensor_copy: tensor ", i, " has ", s.numel(),
                " elements in src but ", d.numel(), " in dst");
    const int32_t sc = wz_code(s.scalar_type()), dc = wz_code(d.scalar_type());
    TORCH_CHECK(sc == dc || (sc <= WZ_FLOAT64 && dc <= WZ_FLOAT64), "multi_tensor_copy: tensor ", i,
                ": cannot cast ", s.scalar_type(), " to ", d.scalar_type());
    wz_copy_task task;
    task.src = s.data_ptr();
    task.dst = d.data_ptr();
    task.numel = s.numel();
    task.first_chunk = chunks;
    task.src_dtype = sc;
    task.dst_dtype = dc;
    static_assert(sizeof(wz_copy_task) == 5 * sizeof(int64_t), "wz_copy_task layout");
    std::memcpy(rows + 5 * i, &task, sizeof(task));
    chunks += (task.numel + kChunkElems - 1) / kChunkElems;
  }
  if (chunks == 0) return;
  // The pinned table stays alive until the copy has run: the caching host allocator records
  // the stream use of non_blocking copies.
  at::Tensor table_dev = table.to(device, /*non_blocking=*/true);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int status = wz_multi_tensor_copy(reinterpret_cast<const wz_copy_task*>(table_dev.data_ptr<int64_t>()), n,
                                          chunks, kChunkElems, stream);
  TORCH_CHECK(status == WZ_OK, "multi_tensor_copy: launch failed with status ", status, " (",
              cudaGetErrorString(cudaGetLastError()), ")");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wz_kernels, m) {
  m.def("multi_tensor_copy(Tensor[] srcs, Tensor(a!)[] dsts) -> ()");
}

TORCH_LIBRARY_IMPL(wz_kernels, CUDA, m) {
  m.impl("multi_tensor_copy", &multi_tensor_copy);
}

// The Python module `wz_kernels._C` itself: importing it runs the registrations above. If a second
// *_binding.cpp is added to csrc/, move this one PYBIND11_MODULE into a shared file (one per .so).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wz_kernels CUDA extension (ops are registered under torch.ops.wz_kernels)";
}
