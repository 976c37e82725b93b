"""wz_kernels: fused Triton kernels for RL post-training of LLMs.

Every op has four layers in one module: a plain-torch `reference` (the specification and the CPU
path), private Triton kernels, a torch.library registration, and the public function documented
here. `impl="auto"` picks the fastest backend for the tensors' device.
"""

from importlib import import_module

__version__ = "0.1.0"

# Public name -> module that defines it. Imported lazily so `import wz_kernels` stays cheap and
# works where triton is absent.
_EXPORTS = {
    "group_advantages": "advantage",
    "brpo_advantages": "advantage",
    "gigpo_advantages": "advantage",
    "policy_loss": "policy_loss",
    "fused_linear_logprobs": "logprob",
    "fused_linear_policy_loss": "logprob",
    "varlen_attention": "attention",
    "multi_tensor_copy": "weight_pack",
    "pack_tensors": "weight_pack",
    "unpack_tensors": "weight_pack",
    "unpack_into": "weight_pack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"wz_kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'wz_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
