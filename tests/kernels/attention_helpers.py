"""Inputs and a forward+backward runner shared by the CPU and GPU attention tests."""

import pytest
import torch

from wz_kernels.attention import varlen_attention, varlen_attention_reference


def cu_seqlens(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_inputs(lengths, hq, hkv, d, dtype, seed=0):
    """q [N, hq, d], k/v [N, hkv, d], upstream grad dO [N, hq, d] (CPU, seeded), cu_seqlens [B+1]."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(n, hq, d, generator=g).to(dtype), cu_seqlens(lengths)


def fwd_bwd(q, k, v, do, cu, max_seqlen, causal, impl, **kw):
    """(out, dq, dk, dv) of `impl`; "reference64" / "reference_lowp" are the per-sequence reference
    in float64 / in the inputs' precision (torch's own error at that precision)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if impl == "reference64":
        out = varlen_attention_reference(q, k, v, cu, causal=causal, upcast=True, **kw)
        do = do.double()
    elif impl == "reference_lowp":
        out = varlen_attention_reference(q, k, v, cu, causal=causal, **kw)
    else:
        out = varlen_attention(q, k, v, cu, max_seqlen, causal=causal, impl=impl, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every buffer the op allocates starts as NaN, so an element a kernel forgets to write fails."""
    empty_like, empty = torch.empty_like, torch.empty
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
