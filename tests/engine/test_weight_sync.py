"""Weight sync: bucket plan + manifest, pack/unpack round trips, the syncer, FSDP2 gather order.

The FSDP2 test forks 2 CPU processes (gloo), the torchrun environment set by hand: forking skips
re-importing torch in each worker, which is most of the cost on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from wz_engine.sync import (
    ModuleWeightSource,
    ParamSpec,
    WeightSyncer,
    hf_param_name,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)


def _specs():
    return [
        ParamSpec("a", (3, 5), torch.bfloat16),  # 30 B
        ParamSpec("b", (7,), torch.float32),  # 28 B
        ParamSpec("big", (200,), torch.float32),  # 800 B > bucket
        ParamSpec("c", (), torch.float16),  # 2 B
        ParamSpec("d", (4,), torch.int64),  # 32 B
        ParamSpec("e", (0, 3), torch.float32),  # empty
    ]


def test_plan_alignment_order_and_oversized_param():
    buckets = plan_buckets(_specs(), bucket_bytes=300, alignment=64)
    assert [b.names for b in buckets] == [["a", "b"], ["big"], ["c", "d", "e"]]
    for b in buckets:
        for e in b.entries:
            assert e.offset % 64 == 0
        ends = [e.offset + e.nbytes for e in b.entries]
        assert b.nbytes == ends[-1]
        assert all(x.offset + x.nbytes <= y.offset for x, y in zip(b.entries, b.entries[1:]))
    assert buckets[1].nbytes == 800  # oversized: a bucket of its own, sized to fit
    assert buckets[0].entries[1].offset == 64 and buckets[2].entries[1].offset == 64


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([ParamSpec("a", (1,), torch.float32)] * 2, 100)
    with pytest.raises(ValueError, match="power of two"):
        plan_buckets(_specs(), 100, alignment=48)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(_specs(), 0)


def test_pack_unpack_round_trip_mixed_dtypes_exact():
    gen = torch.Generator().manual_seed(0)
    specs = _specs()
    # trainer-side tensors in fp32 (floats) to be cast to the spec dtype; ints as they are
    src = {s.name: (torch.randn(s.shape, generator=gen) * 10 if s.dtype.is_floating_point
                    else torch.randint(-9, 9, s.shape, generator=gen)) for s in specs}
    seen = {}
    for bucket in plan_buckets(specs, bucket_bytes=300):
        out = torch.full((bucket.nbytes + 32,), 0xCD, dtype=torch.uint8)  # poisoned
        buf = pack_bucket(bucket, [src[n] for n in bucket.names], out)
        for name, view in unpack_bucket(buf, bucket):
            spec = next(s for s in specs if s.name == name)
            assert view.dtype == spec.dtype and tuple(view.shape) == spec.shape
            assert torch.equal(view, src[name].to(spec.dtype))
            seen[name] = True
    assert set(seen) == {s.name for s in specs}


def test_pack_bucket_checks_shapes():
    bucket = plan_buckets([ParamSpec("a", (2, 2), torch.float32)], 1024)[0]
    with pytest.raises(ValueError, match="shape"):
        pack_bucket(bucket, [torch.zeros(4)])
    with pytest.raises(ValueError, match="entries"):
        pack_bucket(bucket, [])


def test_hf_param_name_strips_wrappers():
    assert hf_param_name("_orig_mod.module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"


class TinyLM(torch.nn.Module):
    """HF-like names (model.embed_tokens / model.layers.i.* / lm_head), tied head, one fp32 norm."""

    def __init__(self, vocab=37, hidden=24, layers=2):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, hidden)
        self.model.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(3 * hidden, hidden))
            for _ in range(layers))
        self.model.norm = torch.nn.LayerNorm(hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: listed once by named_parameters


def test_syncer_pushes_every_param_once_in_order_with_casts():
    torch.manual_seed(0)
    model = TinyLM()
    loads = []
    syncer = WeightSyncer(bucket_bytes=4096, device="cpu")
    source = ModuleWeightSource(model, torch.bfloat16)
    stats = syncer.sync(source, lambda pairs: loads.append([(n, t.clone()) for n, t in pairs]))
    names = [n for bucket in loads for n, _ in bucket]
    assert names == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied
    assert len(loads) == stats.buckets > 1
    params = dict(model.named_parameters())
    for bucket in loads:
        for n, t in bucket:
            assert t.dtype == torch.bfloat16 and torch.equal(t, params[n].detach().to(torch.bfloat16))
    assert stats.nbytes == sum(p.numel() * 2 for p in model.parameters())
    assert stats.tensors == len(names) and stats.seconds > 0
    # second sync reuses the cached plan and buffers
    plan = syncer._plan
    syncer.sync(source, lambda pairs: None)
    assert syncer._plan is plan


def test_pack_host_and_push_packed_round_trip():
    torch.manual_seed(1)
    model = TinyLM()
    syncer = WeightSyncer(bucket_bytes=2048, device="cpu")
    specs = ModuleWeightSource(model, torch.float16).specs()
    host = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed = syncer.pack_host(specs, host, pin=False)
    got = {}
    stats = syncer.push_packed(packed, lambda pairs: got.update({n: t.clone() for n, t in pairs}))
    assert set(got) == set(host) and stats.buckets == len(packed)
    for n, t in host.items():
        assert torch.equal(got[n], t.to(torch.float16))
    with pytest.raises(ValueError, match="missing"):
        syncer.pack_host(specs, {}, pin=False)


# ---------------------------------------------------------------------- FSDP2 on 2 CPU processes


def _fsdp_worker(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wz_engine.sync.gather import check_same_on_all_ranks

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same init on both ranks
    model = TinyLM(layers=3)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # change the weights after sharding so the synced values differ from the init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    result = {"rank": rank}
    for async_gather in (True, False):
        source = ModuleWeightSource(model, torch.bfloat16, async_gather=async_gather)
        loads = []
        stats = WeightSyncer(bucket_bytes=3000, device="cpu").sync(
            source, lambda pairs: loads.append([(n, t.clone()) for n, t in pairs]))
        names = [n for bucket in loads for n, _ in bucket]
        ok = all(torch.equal(t, (reference[n] + 1.0).to(torch.bfloat16)) for bucket in loads for n, t in bucket)
        result[f"async={async_gather}"] = {"names": names, "values_ok": ok, "buckets": stats.buckets,
                                           "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters())}
    try:
        check_same_on_all_ranks([ParamSpec(f"p{rank}", (1,), torch.float32)])
        result["mismatch_detected"] = False
    except ValueError:
        result["mismatch_detected"] = True
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_gather_order_two_cpu_processes(tmp_path):
    import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by the forked workers
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp_worker, args=(str(tmp_path), _free_port()), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = [n for n, _ in TinyLM(layers=3).named_parameters()]
    for res in results:
        assert res["mismatch_detected"]
        for mode in ("async=True", "async=False"):
            assert res[mode]["sharded"], "the model was not sharded: the test would prove nothing"
            assert res[mode]["names"] == expected
            assert res[mode]["values_ok"]
            assert res[mode]["buckets"] > 1
