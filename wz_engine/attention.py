"""Packed-sequence attention for transformers models, through transformers' own registries.

    import wz_engine.attention                      # registers "wz_varlen" (impl="auto")
    register_wz_attention("wz_varlen_torch", impl="torch")   # torch's own FlashAttention varlen op
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="wz_varlen")
    out = model(**packed.model_inputs())            # packed: wz_engine.packing.PackedRLBatch

No monkey-patching: `AttentionInterface.register` adds the attention function and
`AttentionMaskInterface.register` adds a mask builder, so every model that dispatches through
`ALL_ATTENTION_FUNCTIONS` (Qwen2, Qwen3, Llama, Mistral, ...) picks them up.

How a packed row [1, N] reaches `wz_kernels.varlen_attention`:
  1. sequence boundaries come from the `cu_seq_lens_q` / `max_length_q` kwargs (transformers'
     FlashAttentionKwargs names; `PackedRLBatch.model_inputs()` passes them), or else from
     `position_ids` resets (a new sequence starts wherever position != previous + 1), or else each
     batch row is one sequence;
  2. the mask builder returns no mask at all for that case, so no N x N mask is ever built, and
     the boundaries above are the only thing that decides what attends to what. This is also why
     the path stays exact with use_cache=True: transformers stops detecting packing from
     position_ids once a cache is present and would otherwise build one causal mask across the
     whole packed row (the MACHINE_NOTES trap), but we never read that mask.
Anything that is not a full-length prefill (decoding with a KV cache, chunked prefill, a padding
mask with zeros, a custom 4D mask) goes to transformers' SDPA with the mask sdpa would have built,
so `generate` on a model loaded with "wz_varlen" stays correct.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from wz_kernels.attention import IMPLS, varlen_attention

WZ_VARLEN = "wz_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[N] or [1, N] position ids of a packed row -> (cu_seqlens [B+1] int32, max_seqlen).

    A sequence starts at token 0 and wherever the position is not the previous one plus 1
    (transformers' own packing convention). Needs one host sync; pass cu_seq_lens_q to avoid it.
    """
    pos = position_ids.reshape(-1)
    n = pos.numel()
    starts = torch.ones(n, dtype=torch.bool, device=pos.device)
    starts[1:] = pos[1:] != pos[:-1] + 1
    cu = torch.cat([starts.nonzero().reshape(-1), torch.tensor([n], device=pos.device)]).to(torch.int32)
    return cu, int(cu.diff().max()) if n else 0


def packed_causal_mask(cu_seqlens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cu_seqlens [B+1] -> additive mask [1, 1, N, N] (0 where token i may attend to j, -inf elsewhere):
    causal inside each sequence, nothing across. For backends without varlen support (eager, sdpa);
    it costs N x N memory, which is what "wz_varlen" avoids. A float mask works on both eager and sdpa."""
    n = int(cu_seqlens[-1])
    seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device),
                                  cu_seqlens.diff().long())
    idx = torch.arange(n, device=cu_seqlens.device)
    allowed = (seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :])
    mask = torch.zeros(n, n, dtype=dtype, device=cu_seqlens.device).masked_fill(~allowed, float("-inf"))
    return mask[None, None]


def _boundaries(batch: int, length: int, device, kwargs: dict) -> tuple[torch.Tensor, int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"{WZ_VARLEN}: cu_seq_lens_q needs one packed row [1, N], got batch {batch}")
        max_len = kwargs.get("max_length_q")
        cu = cu.to(device=device, dtype=torch.int32)
        return cu, int(max_len) if max_len is not None else int(cu.diff().max())
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and batch == 1:
        return cu_seqlens_from_position_ids(position_ids.to(device))
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length


def wz_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    *,
    impl: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    batch, _, length, head_dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        # Decoding / chunked prefill / padding / custom mask: the mask builder made sdpa's mask.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, softcap=softcap, **kwargs)
    if dropout:
        raise ValueError(f"{WZ_VARLEN}: attention dropout is not supported (got {dropout}); set attention_dropout=0")
    if softcap is not None:
        raise ValueError(f"{WZ_VARLEN}: attention logit softcapping is not supported")
    cu_seqlens, max_seqlen = _boundaries(batch, length, query.device, kwargs)
    if sliding_window is not None and sliding_window < max_seqlen:
        raise ValueError(f"{WZ_VARLEN}: sliding-window layers (window {sliding_window} < sequence length "
                         f"{max_seqlen}) are not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # [B, H, L, D] -> [B*L, H, D] (a view when B == 1: the kernel takes token/head strides)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scaling, impl=impl)
    return out.reshape(batch, length, query.shape[1], head_dim), None


def wz_varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder for "wz_varlen": none for a full-length prefill without padding (the varlen
    path, whatever the cache setting), sdpa's boolean mask for everything else."""
    full_prefill = (q_length == kv_length and isinstance(q_offset, int) and q_offset == 0
                    and isinstance(kv_offset, int) and kv_offset == 0)
    if full_prefill and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def register_wz_attention(name: str = WZ_VARLEN, impl: str = "auto") -> str:
    """Register the varlen attention under `name` with a fixed kernel `impl`; returns `name`.

    Idempotent. Register several names to pick a backend per model, e.g.
    `register_wz_attention("wz_varlen_triton", impl="triton")`.
    """
    if impl not in IMPLS:
        raise ValueError(f"register_wz_attention: impl={impl!r} is not one of {IMPLS}")

    @functools.wraps(wz_varlen_attention_forward)
    def attention(*args, **kwargs):
        return wz_varlen_attention_forward(*args, impl=impl, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, wz_varlen_mask)
    return name


register_wz_attention()
