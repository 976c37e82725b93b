"""Where synced weights come from: the live (FSDP2-sharded) training module, in a fixed order.

Every rank calls `fetch` with the same names in the same order: for DTensor parameters the
all-gathers are collectives. `ModuleWeightSource.specs` checks once (per plan) that all ranks agree
on the order, so a mismatch is an error instead of a hang or silently swapped weights.

Gathering is asynchronous where torch allows it: `DTensor.redistribute(..., async_op=True)` returns
an AsyncCollectiveTensor that waits only when first read (during packing), so the gathers of
bucket i+1 are in flight while bucket i is loaded into the engine.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Callable, Protocol, Sequence

import torch
import torch.distributed as dist

from wz_engine.sync.bucket import ParamSpec

# Name components added by wrappers that HF checkpoints (what vLLM's `load_weights` expects) lack:
# torch.compile, activation checkpointing, FSDP1 anywhere; DDP's "module." only as the first one.
WRAPPER_COMPONENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def hf_param_name(name: str) -> str | None:
    """Trainer parameter name -> HF checkpoint name (the name vLLM's `load_weights` takes).

    Fused projections (qkv, gate_up) are vLLM's business: its `load_weights` maps the HF names onto
    its fused parameters, so only wrapper prefixes are removed here.
    """
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


class WeightSource(Protocol):
    def specs(self) -> list[ParamSpec]:
        """The parameters to push, in the fixed push order (names/dtypes as the engine wants)."""
        ...

    def fetch(self, names: Sequence[str]) -> list[torch.Tensor]:
        """Full tensors for `names` (a slice of specs() in order), possibly not yet materialised."""
        ...


def _is_dtensor(t) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported, and importing it costs
    # seconds: look it up only when it is already loaded.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class ModuleWeightSource:
    """The parameters of a (possibly FSDP2-sharded) module, gathered full on every rank."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype,
                 name_map: Callable[[str], str | None] = hf_param_name, *, async_gather: bool = True,
                 check_ranks_agree: bool = True):
        """dtype: bucket dtype of floating parameters (the engine's); others keep theirs.
        name_map: trainer name -> engine name, or None to leave the parameter out."""
        self.model = model
        self.dtype = dtype
        self.name_map = name_map
        self.async_gather = async_gather
        self.check_ranks_agree = check_ranks_agree
        self._params: dict[str, torch.nn.Parameter] = {}
        self._specs: list[ParamSpec] | None = None

    def specs(self) -> list[ParamSpec]:
        if self._specs is None:
            specs, params = [], {}
            # named_parameters: registration order, shared (tied) parameters listed once.
            for name, p in self.model.named_parameters():
                mapped = self.name_map(name)
                if mapped is None:
                    continue
                if mapped in params:
                    raise ValueError(f"name_map: {name!r} maps to {mapped!r}, already used by another parameter")
                dtype = self.dtype if p.dtype.is_floating_point else p.dtype
                specs.append(ParamSpec(mapped, tuple(p.shape), dtype))  # DTensor.shape is the global shape
                params[mapped] = p
            if self.check_ranks_agree:
                check_same_on_all_ranks(specs)
            self._specs, self._params = specs, params
        return self._specs

    def fetch(self, names: Sequence[str]) -> list[torch.Tensor]:
        self.specs()
        out = []
        for name in names:
            p = self._params[name].detach()
            if _is_dtensor(p):
                from torch.distributed.tensor import Replicate

                if self.async_gather:
                    full = p.redistribute(p.device_mesh, [Replicate()] * p.device_mesh.ndim, async_op=True)
                    out.append(full.to_local())
                else:
                    out.append(p.full_tensor())
            else:
                out.append(p)
        return out


def check_same_on_all_ranks(specs: Sequence[ParamSpec]) -> None:
    """Raise ValueError when ranks disagree on the push order (names, shapes, dtypes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(repr([(s.name, s.shape, str(s.dtype)) for s in specs]).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise ValueError(f"weight sync: ranks disagree on the parameter order/shapes (digests {digests})")
