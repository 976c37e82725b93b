"""Precision of the fused log-prob ops' d weight against float64, by accumulation dtype and chunk count.

`python -m bench.dweight_precision [--tokens N] [--hidden H] [--vocab V] [--logit-scale S]` (CPU, ~1 min).

The fused ops never hold [N, V]: d weight = sum over token chunks of dlogits_c^T @ hidden_c. Per chunk
the GEMM accumulates in float32; what differs is the accumulator kept *across* the k = N / C chunks:
  weight dtype (bf16, the default): one bf16 rounding per chunk (cuBLAS / MKL with beta = 1),
  float32 (opt-in): exact to one final rounding, at V x H x 4 bytes of extra memory.
Both are run here through `wz_kernels.logprob._accumulate_weight_grad` on bf16 tiles (on CPU the bf16
path is MKL's bf16 GEMM, the stand-in for cuBLAS: float32 accumulation, one rounding per call), next
to torch's own bf16 autograd of matmul + log_softmax (the 2x-torch rule's baseline). Loss: mean
log-prob of random targets; inputs as in bench/bench_logprob.py (`--logit-scale` multiplies W).
Errors are max |err| / max |dW64| and RMS(err) / RMS(dW64).
"""

from __future__ import annotations

import argparse

import torch

from wz_kernels.logprob import _accumulate_weight_grad


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = (got.double() - want).abs()
    return (err.max() / want.abs().max()).item(), (err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def measure(N: int, H: int, V: int, chunk_counts, logit_scale: float = 1.0, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).bfloat16()
    weight = (torch.randn(V, H, generator=g) * (logit_scale / H**0.5)).bfloat16()
    targets = torch.randint(0, V, (N,), generator=g)
    rows = torch.arange(N)

    def dlogits(logits):  # d(mean logp)/d logits
        d = -torch.softmax(logits, dim=-1)
        d[rows, targets] += 1
        return d / N

    dw64 = dlogits(hidden.double() @ weight.double().T).T @ hidden.double()
    w = weight.clone().requires_grad_(True)  # torch's own bf16 path
    (torch.log_softmax(hidden @ w.T, -1)[rows, targets].float().sum() / N).backward()
    torch_max, torch_rms = _errors(w.grad, dw64)
    # the fused ops' tile: bf16 logits from a float32-accumulating GEMM, d logits written back in bf16
    dl = dlogits((hidden.float() @ weight.float().T).bfloat16().double()).bfloat16()
    out = []
    for k in chunk_counts:
        C = -(-N // k)
        acc16 = torch.zeros(V, H, dtype=torch.bfloat16)
        acc32 = torch.zeros(V, H, dtype=torch.float32)
        for s in range(0, N, C):
            _accumulate_weight_grad(acc16, dl[s:s + C], hidden[s:s + C])
            _accumulate_weight_grad(acc32, dl[s:s + C].float(), hidden[s:s + C].float())
        (m16, r16), (m32, r32) = _errors(acc16, dw64), _errors(acc32.bfloat16(), dw64)
        out.append({"chunks": k, "bf16_max": m16, "bf16_rms": r16, "fp32_max": m32, "fp32_rms": r32,
                    "torch_max": torch_max, "torch_rms": torch_rms})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dweight_precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--logit-scale", type=float, default=1.0)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    a = p.parse_args(argv)
    print(f"N={a.tokens} H={a.hidden} V={a.vocab} logit scale {a.logit_scale}: d weight error vs float64 "
          "(max |err| / max |dW|, rms ratio)")
    print("| chunks k | bf16 accumulator max / rms | x torch max | float32 accumulator max / rms | torch bf16 |")
    print("|---|---|---|---|---|")
    for r in measure(a.tokens, a.hidden, a.vocab, a.chunks, a.logit_scale):
        print(f"| {r['chunks']} | {r['bf16_max']:.2e} / {r['bf16_rms']:.2e} | {r['bf16_max'] / r['torch_max']:.1f} "
              f"| {r['fp32_max']:.2e} / {r['fp32_rms']:.2e} | {r['torch_max']:.2e} / {r['torch_rms']:.2e} |")


if __name__ == "__main__":
    main()
