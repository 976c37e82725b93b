"""wz_kernels: fused Triton kernels for RL post-training of LLMs.

Every op has four layers in one module: a plain-torch `reference` (the specification and the CPU
path), private Triton kernels, a torch.library registration, and the public function documented
here. `impl="auto"` picks the fastest backend for the tensors' device.

The ops are imported eagerly: `policy_loss` is both a module and the function it defines, and a
lazy export would be replaced by the submodule as soon as anything imported `wz_kernels.policy_loss`.
Every module guards its triton import, so this works where triton is absent. To run the Triton
kernels on CPU (the interpreter), set TRITON_INTERPRET=1 before importing wz_kernels.
"""

import sys

if __name__ != "wz_kernels":
    # This source folder imported as a top-level "kernels" (the repository root on sys.path: pytest, a
    # notebook in the checkout). transformers probes for Hugging Face's `kernels` package by importing that
    # name (`is_kernels_available`). Running the submodules again under that name would define every
    # torch.library op a second time, which destroys the registrations that wz_kernels' functions hold
    # (crashes inside the dispatcher later, or "vector::reserve"). So the name is an alias of wz_kernels.
    import importlib

    try:
        sys.modules[__name__] = importlib.import_module("wz_kernels")
    except ImportError:  # not installed: stay an empty module (no ops, no version: "not HF's kernels")
        pass
else:
    from .advantage import brpo_advantages, gigpo_advantages, group_advantages
    from .attention import varlen_attention
    from .logprob import fused_linear_logprobs, fused_linear_policy_loss
    from .policy_loss import policy_loss
    from .weight_pack import multi_tensor_copy, pack_tensors, unpack_into, unpack_tensors

    __version__ = "0.1.0"

__all__ = [
    "brpo_advantages",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "gigpo_advantages",
    "group_advantages",
    "multi_tensor_copy",
    "pack_tensors",
    "policy_loss",
    "unpack_into",
    "unpack_tensors",
    "varlen_attention",
]
