"""Weight sync throughput up to the engine hand-off: gather + cast + pack into flat buckets.

Models are stacks of transformer-shaped fp32 parameters (embedding, per layer q/k/v/o, gate/up/down,
two norms) pushed as bf16, the engine dtype. Providers (GB/s counts fp32 read + bf16 write):
  - `syncer`: WeightSyncer + ModuleWeightSource (the path the vllm sampler uses; `load` is a no-op,
    so this is the hand-off rate). Single process: the gather of an unsharded module is free.
  - `syncer_reference`: the same with one `copy_` per parameter instead of `_foreach_copy_`.
  - `per_param`: what per-parameter pushes do (TRL colocate: one `load_weights` call per tensor),
    here a cast copy per parameter and a Python call each.
  - `cat`: `torch.cat` of the cast parameters (one bucket, no manifest alignment).
On GPU the same cases run with `impl="auto"` (the one-launch CUDA kernel when `wz_kernels._C` is
built). FSDP2 all-gathers are not timed here (gloo on CPU says nothing about NCCL).

    python -m bench weight_sync --device cpu [--quick]
    pytest bench/bench_weight_sync.py --benchmark-enable
"""

from __future__ import annotations

import torch

from bench.checks import Check, compare, run_check
from bench.harness import Case
from wz_engine.sync import ModuleWeightSource, WeightSyncer, hf_param_name


def transformer_like(layers: int, hidden: int, vocab: int, device: str, seed: int = 0) -> torch.nn.Module:
    """Parameters with the shapes of a Llama-style decoder (no forward needed)."""
    torch.manual_seed(seed)
    inter = 3 * hidden
    root = torch.nn.Module()
    root.embed = torch.nn.Parameter(torch.randn(vocab, hidden, device=device))
    root.layers = torch.nn.ModuleList()
    for _ in range(layers):
        layer = torch.nn.Module()
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden // 4, hidden)), ("v", (hidden // 4, hidden)),
                            ("o", (hidden, hidden)), ("gate", (inter, hidden)), ("up", (inter, hidden)),
                            ("down", (hidden, inter)), ("ln1", (hidden,)), ("ln2", (hidden,))):
            setattr(layer, name, torch.nn.Parameter(torch.randn(*shape, device=device)))
        root.layers.append(layer)
    root.norm = torch.nn.Parameter(torch.randn(hidden, device=device))
    return root


def _shapes(quick: bool):
    if quick:
        return [(2, 128, 1000)]
    return [(2, 256, 4096), (4, 512, 8192), (8, 768, 16384)]


def _noop(pairs):
    return None


def per_param_push(model: torch.nn.Module, load=_noop) -> None:
    """What per-parameter pushes do (TRL colocate): one cast copy and one `load` call per tensor."""
    for name, p in model.named_parameters():
        load([(hf_param_name(name), p.detach().to(torch.bfloat16))])


def _providers(model: torch.nn.Module, device: str, bucket_bytes: int):
    params = [p for _, p in model.named_parameters()]
    syncer = WeightSyncer(bucket_bytes, device)
    syncer_ref = WeightSyncer(bucket_bytes, device, impl="reference")
    source = ModuleWeightSource(model, torch.bfloat16)

    def cat():
        torch.cat([p.detach().reshape(-1).to(torch.bfloat16) for p in params])

    return {
        "syncer": lambda: syncer.sync(source, _noop),
        "syncer_reference": lambda: syncer_ref.sync(source, _noop),
        "per_param": lambda: per_param_push(model),
        "cat": cat,
    }


def synced(model: torch.nn.Module, device: str, bucket_bytes: int) -> dict[str, torch.Tensor]:
    """What the engine's loader receives from one `syncer` sync: engine name -> a copy of its tensor."""
    received = {}
    WeightSyncer(bucket_bytes, device).sync(ModuleWeightSource(model, torch.bfloat16),
                                            lambda pairs: received.update((n, t.clone()) for n, t in pairs))
    return received


def expected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under its engine name, cast to bf16 (a cast is exact: the check wants equality)."""
    return {hf_param_name(n): p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}


def cases(device: str, size: str) -> list[Case]:
    out = []
    for layers, hidden, vocab in _shapes(size == "quick"):
        model = transformer_like(layers, hidden, vocab, device)
        numel = sum(p.numel() for p in model.parameters())
        bucket = 16 * 2**20 if size != "quick" else 2**20
        check = Check(lambda model=model, bucket=bucket: synced(model, device, bucket),
                      lambda model=model: expected(model), dtype=torch.bfloat16, rel_tol=0.0)
        out.append(Case(f"{numel / 1e6:.1f}M params, bucket {bucket >> 20} MiB", _providers(model, device, bucket),
                        check=check, ours="syncer", bytes_moved=numel * (4 + 2),
                        extra={"params_M": round(numel / 1e6, 2)}))
    return out


def test_weight_sync_syncer(benchmark):
    (case,) = cases("cpu", "quick")
    benchmark(case.providers["syncer"])
    assert run_check(case.check) == 0.0  # every parameter arrives, bit for bit, under its engine name


def test_weight_sync_per_param(benchmark):
    """The per-parameter peer hands the engine the same tensors (the table compares like with like)."""
    (case,) = cases("cpu", "quick")
    benchmark(case.providers["per_param"])
    model = transformer_like(*_shapes(True)[0], "cpu")
    received = {}
    per_param_push(model, lambda pairs: received.update(pairs))
    compare(received, expected(model), 0.0)
