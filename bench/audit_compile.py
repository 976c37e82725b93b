"""Compile the project's Triton kernels for sm_90 on a machine without a GPU, and read their resources.

`sm90_compile_session()` installs, for the duration of a `with` block:
  - a Triton driver whose target is `GPUTarget("cuda", 90, 32)` (the H100/H200 architecture),
  - a hook on `JITFunction.run` that turns every launch into a compile-only warmup (tensors become
    `triton.runtime.jit.MockTensor`s of the same dtype, so no data pointer is ever read) and records
    the compiled kernel with its constexprs,
  - torch's FakeTensorMode, so the launch wrappers allocate "cuda" tensors of production shape that
    have no storage at all (a 16384 x 151936 tile costs nothing),
  - `torch.cuda.get_device_properties` answering for an H200, for wrappers that size grids by SM count.

Everything a launch wrapper decides (grid, block sizes, warps, stages, constexpr flags, which kernels
it launches) is therefore exactly what it decides on a real GPU. `ptxas_resources` then runs Triton's
own bundled ptxas with Triton's flags on the PTX and parses registers, spills and stack.

Only this module knows Triton internals (JITFunction.run, MockTensor, DriverBase): written against
Triton 3.6, the GPU machine's version (bench/audit.py refuses any other).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
import tempfile
import types
from dataclasses import dataclass, field

import torch

SM90_CAPABILITY = 90


@dataclass
class CompiledLaunch:
    """One launch seen by the hook: the kernel it compiled and the options production chose."""

    case: str
    """Label of the audit case that made the launch."""
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    shared_bytes: int
    """Dynamic shared memory per block (what the launch requests)."""
    ptx: str = field(repr=False)
    key: str = ""
    """Triton's hash of the compiled binary: identical launches share it."""


@dataclass(frozen=True)
class PtxasResources:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int


_H200_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H200 (audit stand-in)", major=9, minor=0, multi_processor_count=132,
    total_memory=141 * 2**30, warp_size=32, max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
    shared_memory_per_block_optin=232448, L2_cache_size=60 * 2**20,
)


def _constexprs(fn, args, kwargs) -> dict:
    """The constexpr parameters of a launch, by name (positional or keyword)."""
    bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                            if k in fn.arg_names})
    return {p.name: bound.arguments[p.name] for p in fn.params if p.is_constexpr and p.name in bound.arguments}


@contextlib.contextmanager
def sm90_compile_session():
    """Yield (records, set_case): launches inside the block compile for sm_90 and are recorded."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction, MockTensor

    class _Sm90Driver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", SM90_CAPABILITY, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    records: list[CompiledLaunch] = []
    current = {"case": ""}
    original_run = JITFunction.run

    def compile_only_run(self, *args, grid, warmup, **kwargs):
        constexprs = _constexprs(self, args, kwargs)
        args = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        meta = kernel.metadata
        records.append(CompiledLaunch(current["case"], self.fn.__name__, constexprs, meta.num_warps,
                                      meta.num_stages, meta.shared, kernel.asm["ptx"], kernel.hash))
        return kernel

    def fake_getitem(self, index):
        # torch's Python indexing opens a CUDA device guard, which a CPU build of torch cannot do;
        # basic indexing through the dispatcher gives the same view.
        if not isinstance(index, tuple):
            index = (index,)
        out, dim = self, 0
        for i in index:
            if isinstance(i, int):
                out = torch.ops.aten.select.int(out, dim, i)
            elif isinstance(i, slice):
                out = torch.ops.aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
                dim += 1
            else:
                raise NotImplementedError(f"audit: fake tensors support int/slice indexing, got {i!r}")
        return out

    saved_properties, saved_driver = torch.cuda.get_device_properties, driver._active
    driver.set_active(_Sm90Driver())
    JITFunction.run = compile_only_run
    FakeTensor.__getitem__ = fake_getitem
    torch.cuda.get_device_properties = lambda device=None: _H200_PROPERTIES
    try:
        with FakeTensorMode():
            yield records, lambda label: current.__setitem__("case", label)
    finally:
        torch.cuda.get_device_properties = saved_properties
        del FakeTensor.__getitem__
        JITFunction.run = original_run
        driver._active = saved_driver  # reset_active() would probe for a real GPU driver


_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> PtxasResources:
    """Registers, spills and stack of the (single) entry function in a `ptxas -v` log."""
    spill, regs = _SPILL.search(log), _REGS.search(log)
    if spill is None or regs is None:
        raise ValueError(f"unrecognised ptxas -v output:\n{log}")
    stack, stores, loads = (int(x) for x in spill.groups())
    return PtxasResources(int(regs.group(1)), stores, loads, stack)


def ptxas_resources(ptx: str) -> PtxasResources:
    """Assemble `ptx` for sm_90a with Triton's bundled ptxas and Triton's flags (-lineinfo, fmad on)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(SM90_CAPABILITY).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(SM90_CAPABILITY)}", src,
             "-o", src + ".o"], capture_output=True, text=True, check=True)
    return parse_ptxas_log(run.stdout + run.stderr)
