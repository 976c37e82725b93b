"""Subprocess probe for test_logprob.py's memory ceiling: `python logprob_memory_probe.py naive|fused`.

Prints one JSON line {"provider", "peak_rss_delta_mb"}: the peak-RSS growth of one forward+backward
at N=4096, H=256, V=32000 float32 in this fresh process (after a tiny warm-up that loads libraries
and registers the ops, so their one-time cost is not counted).
"""

import json
import sys

import torch

from bench.harness import peak_rss_delta_mb
from wz_kernels.logprob import fused_linear_logprobs

N, H, V = 4096, 256, 32000


def naive(hidden, weight, targets):  # logits + log_softmax + gather: materialises [N, V] several times
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None])[:, 0]


def main(provider: str) -> None:
    fn = {"naive": naive, "fused": fused_linear_logprobs}[provider]
    torch.manual_seed(0)
    small = [torch.randn(8, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)]
    fn(*small, torch.randint(0, 40, (8,))).sum().backward()  # warm-up, different shape

    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))

    def step():
        fn(hidden, weight, targets).sum().backward()

    mb = peak_rss_delta_mb(step)
    assert hidden.grad is not None and weight.grad is not None
    print(json.dumps({"provider": provider, "peak_rss_delta_mb": mb}))


if __name__ == "__main__":
    main(sys.argv[1])
