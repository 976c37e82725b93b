"""Flat weight-sync buckets: plan (manifest), pack, unpack.

A bucket is one 1-D uint8 buffer holding several parameters back to back, each cast to the dtype
the engine wants, each starting at a byte offset aligned to `alignment` (256 by default: every slot
can be viewed in place as its dtype, and 16-byte vector copies apply). The manifest records, per
parameter, (name, dtype, shape, offset) so the receiver can take zero-copy views.

Planning is greedy in the given order (the order is part of the contract: every rank walks the
parameters in the same order because the FSDP2 gathers are collectives). A parameter larger than
`bucket_bytes` gets a bucket of its own, sized to fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from wz_kernels.weight_pack import pack_tensors, unpack_tensors

DEFAULT_ALIGNMENT = 256


@dataclass(frozen=True)
class ParamSpec:
    name: str
    """Name the engine's `load_weights` expects (already mapped from the trainer's name)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    """dtype as stored in the bucket (the engine's dtype for floating parameters)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the bucket (a multiple of the alignment)."""
    nbytes: int


@dataclass
class Bucket:
    entries: list[ManifestEntry] = field(default_factory=list)
    nbytes: int = 0
    """Bytes the bucket buffer must have (end of the last slot)."""

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def plan_buckets(specs: Sequence[ParamSpec], bucket_bytes: int, alignment: int = DEFAULT_ALIGNMENT) -> list[Bucket]:
    """Split `specs` (in order) into buckets of at most `bucket_bytes` (one oversized bucket for a
    parameter that alone exceeds it). Deterministic: same specs -> same plan on every rank."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1")
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment={alignment}: must be a power of two")
    seen = set()
    buckets: list[Bucket] = []
    current = Bucket()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"specs: parameter name {spec.name!r} appears twice")
        seen.add(spec.name)
        nbytes = spec.nbytes
        offset = _align(current.nbytes, alignment)
        if current.entries and offset + nbytes > bucket_bytes:
            buckets.append(current)
            current, offset = Bucket(), 0
        current.entries.append(ManifestEntry(spec.name, spec.dtype, tuple(spec.shape), offset, nbytes))
        current.nbytes = offset + nbytes
    if current.entries:
        buckets.append(current)
    return buckets


def pack_bucket(bucket: Bucket, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None,
                *, impl: str = "auto") -> torch.Tensor:
    """Pack `tensors` (one per manifest entry, in order; cast to the entry's dtype) into `out`.

    out: [>= bucket.nbytes] uint8 on the tensors' device (allocated when None). Returns the
    [bucket.nbytes] prefix of `out` that holds the bucket.
    """
    if len(tensors) != len(bucket.entries):
        raise ValueError(f"tensors: {len(tensors)} given for a bucket of {len(bucket.entries)} entries")
    for t, e in zip(tensors, bucket.entries):
        if tuple(t.shape) != e.shape:
            raise ValueError(f"tensors: {e.name!r} has shape {tuple(t.shape)}, the manifest says {e.shape}")
    device = tensors[0].device if tensors else torch.device("cpu")
    if out is None:
        out = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    if out.numel() < bucket.nbytes:
        raise ValueError(f"out: {out.numel()} bytes, the bucket needs {bucket.nbytes}")
    buf = out[: bucket.nbytes]
    pack_tensors(tensors, buf, [e.offset for e in bucket.entries], [e.dtype for e in bucket.entries], impl=impl)
    return buf


def unpack_bucket(buffer: torch.Tensor, bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """(name, zero-copy view) for every entry of `bucket` in `buffer` ([>= nbytes] uint8)."""
    if buffer.numel() < bucket.nbytes:
        raise ValueError(f"buffer: {buffer.numel()} bytes, the bucket needs {bucket.nbytes}")
    views = unpack_tensors(buffer[: bucket.nbytes], [e.offset for e in bucket.entries],
                           [e.shape for e in bucket.entries], [e.dtype for e in bucket.entries])
    return [(e.name, v) for e, v in zip(bucket.entries, views)]
