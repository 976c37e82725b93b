"""torch.distributed from torchrun's environment, FSDP2 sharding, and small collective helpers.

The same code runs under `torchrun` (any world size, multi-node through torchrun's rendezvous) and
under plain `python` (world size 1, no process group). No home-made distribution layer: FSDP2
`fully_shard` per decoder layer and on the root, on a 1-D device mesh.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set), else world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (`model.model.layers` or similar)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__}")


def shard_model(root: torch.nn.Module, lm: torch.nn.Module, info: DistInfo, mixed_precision: str = "auto",
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer of `lm`, then `root` (the module whose forward the
    trainer calls). A no-op at world size 1. Gradients are summed (not averaged) across ranks because
    the loss is already normalised by global token / sequence counts."""
    if not info.enabled:
        return root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and info.device.type == "cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 else None
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(lm):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return root


def fsdp_modules(root: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_for_generation(root: torch.nn.Module):
    """Hold every FSDP2 shard of `root` gathered for a whole `generate` call.

    Ranks then decode with no collectives at all, so they can run different numbers of decode steps
    (different prompts stop at different lengths) without deadlocking. Costs the full unsharded
    weights in memory for the duration, which is what the `hf` sampler is for (small models).
    Collective on entry and exit (all ranks enter together); nested entries are no-ops, so the
    trainer holds it around the whole rollout + judge phase and a rank may then make any number of
    generate calls (e.g. a GenRM that skips over-long judge prompts).
    """
    modules = fsdp_modules(root)
    if not modules or getattr(root, "_wz_gathered", False):  # nothing sharded, or already gathered
        yield
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    root._wz_gathered = True
    try:
        yield
    finally:
        root._wz_gathered = False
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def all_reduce(value: torch.Tensor | float, op: str = "sum") -> torch.Tensor:
    """All-reduce a tensor or number across ranks (identity at world size 1); returns a new tensor."""
    t = torch.as_tensor(value, dtype=torch.float64).clone() if not torch.is_tensor(value) else value.clone()
    if dist.is_available() and dist.is_initialized():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        moved = t.to(backend_device)
        dist.all_reduce(moved, op=reduce_op)
        t = moved.to(t.device)
    return t


def all_gather_object(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
