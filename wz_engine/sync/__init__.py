"""Trainer -> engine weight sync: flat buckets with a manifest, FSDP2 gathers in a fixed order."""

from wz_engine.sync.bucket import Bucket, ManifestEntry, ParamSpec, pack_bucket, plan_buckets, unpack_bucket
from wz_engine.sync.gather import ModuleWeightSource, WeightSource, hf_param_name
from wz_engine.sync.syncer import SyncStats, WeightSyncer

__all__ = [
    "Bucket", "ManifestEntry", "ModuleWeightSource", "ParamSpec", "SyncStats", "WeightSource", "WeightSyncer",
    "hf_param_name", "pack_bucket", "plan_buckets", "unpack_bucket",
]
