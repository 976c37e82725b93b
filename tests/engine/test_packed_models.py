"""The AReaL #1442 guard: per-token log-probs of a packed row equal those of each sequence run alone.

Tiny Qwen2 / Qwen3 / Llama models built from configs, in float64 so any cross-sequence leak shows
(a leak moves log-probs by ~0.1; float64 round-off is ~1e-15). Every backend we support is checked,
and `test_naive_packing_with_cache_is_wrong` shows the trap the guard exists for (so it can fail).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from wz_engine.attention import (
    WZ_VARLEN,
    cu_seqlens_from_position_ids,
    packed_causal_mask,
    register_wz_attention,
)
from wz_engine.packing import pack_rl_batch, pack_sequences, unpack

VOCAB = 97
LENGTHS = (7, 1, 12, 5)
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=64)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=1),  # head_dim 64, GQA 2
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=64),  # q/k norms
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),  # GQA 1
}


def _model(family, dtype=torch.float64, attn="sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attn, dtype=dtype).eval()


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family_model(request, seqs):
    """(model, per-sequence log-probs of each sequence run alone through sdpa): built once per family."""
    model = _model(request.param)
    return model, alone_logprobs(model, seqs)


def next_token_logprobs(logits, ids):
    """logits [L, V], ids [L] -> log p(ids[t+1] | ids[:t+1]) [L-1]."""
    return logits.log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]


def alone_logprobs(model, seqs):
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return [next_token_logprobs(model(input_ids=s[None], use_cache=False).logits[0], s) for s in seqs]


def packed_logprobs(model, seqs, attn, use_cache, how):
    (batch,) = pack_sequences(seqs, max_tokens=sum(LENGTHS))
    kwargs = dict(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=use_cache)
    if how == "mask4d":
        kwargs["attention_mask"] = packed_causal_mask(batch.cu_seqlens, model.dtype)
    elif how == "cu_seqlens":
        kwargs.update(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                      max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        logits = model(**kwargs).logits[0]
    per_seq = unpack([batch], [logits])
    return [next_token_logprobs(lg, s) for lg, s in zip(per_seq, seqs)]


BACKENDS = [  # (attention implementation, use_cache, how the packing is expressed, tolerance)
    (WZ_VARLEN, False, "position_ids", 1e-12),
    (WZ_VARLEN, True, "position_ids", 1e-12),  # the trap setting: still exact
    (WZ_VARLEN, True, "cu_seqlens", 1e-12),
    ("sdpa", False, "position_ids", 1e-12),  # transformers' own packed-mask detection
    ("sdpa", True, "mask4d", 1e-12),
    ("eager", False, "position_ids", 1e-6),  # eager takes its softmax in float32 even for float64 models
    ("eager", True, "mask4d", 1e-6),
]


@pytest.mark.parametrize("attn, use_cache, how, tol", BACKENDS, ids=lambda x: str(x))
def test_packed_logprobs_equal_alone(family_model, seqs, attn, use_cache, how, tol):
    model, ref = family_model
    got = packed_logprobs(model, seqs, attn, use_cache, how)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_naive_packing_with_cache_is_wrong(family_model, seqs, attn):
    """position_ids alone + use_cache=True: transformers builds one causal mask over the whole row."""
    model, ref = family_model
    got = packed_logprobs(model, seqs, attn, True, "position_ids")
    worst = max((a - b).abs().max().item() for a, b in zip(got, ref) if a.numel())
    assert worst > 1e-3  # later sequences attend to earlier ones


def test_packed_gradients_equal_alone(seqs):
    """The training path: d(sum of response log-probs)/d(weights) packed == summed over sequences alone."""
    model = _model("qwen2", attn=WZ_VARLEN)
    prompts = [s[:3] if len(s) > 3 else s[:1] for s in seqs]
    responses = [s[len(p):] for s, p in zip(seqs, prompts)]
    (batch,) = pack_rl_batch(prompts, responses, max_tokens=64)
    logits = model(**batch.model_inputs()).logits[0]
    logp = logits.log_softmax(-1).gather(-1, batch.targets[:, None])[:, 0]
    grads_packed = torch.autograd.grad(logp[batch.loss_mask].sum(), list(model.parameters()))
    total = sum(next_token_logprobs(model(input_ids=s[None], use_cache=False).logits[0], s)[len(p) - 1:].sum()
                for s, p in zip(seqs, prompts))
    grads_alone = torch.autograd.grad(total, list(model.parameters()))
    for a, b in zip(grads_packed, grads_alone):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.interpreter
def test_triton_kernel_inside_model_matches_reference(seqs):
    """The Triton kernel (interpreter) as the model's attention, forward and backward, float32."""
    name = register_wz_attention("wz_varlen_triton_test", impl="triton")
    model = _model("qwen2", dtype=torch.float32, attn=name)
    (batch,) = pack_sequences(seqs[:3], max_tokens=64)
    inputs = dict(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False)
    results = []
    for attn in (name, WZ_VARLEN):
        model.set_attn_implementation(attn)
        model.zero_grad()
        logits = model(**inputs).logits[0]
        logits.log_softmax(-1).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (lt, gt), (lr, gr) = results
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-5)
    for a, b in zip(gt, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_and_padding_fall_back_to_sdpa(seqs, tmp_path):
    """Decoding with a KV cache and left-padded batches take sdpa's exact path under "wz_varlen";
    from_pretrained accepts the name too."""
    _model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=WZ_VARLEN, dtype=torch.float64)
    assert model.config._attn_implementation == WZ_VARLEN
    prompts = [seqs[0], seqs[3]]  # lengths 7 and 5: left-pad the second
    ids = torch.stack([prompts[0], torch.cat([torch.zeros(2, dtype=torch.long), prompts[1]])])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        alone = model(input_ids=prompts[1][None]).logits
    torch.testing.assert_close(padded[1, 2:], alone[0], rtol=0, atol=1e-10)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref)


def test_no_mask_is_built_for_packed_prefill_even_with_a_cache(seqs):
    """transformers' mask creation for "wz_varlen" returns no mask (no N x N tensor) for a packed
    prefill, cache or not; decoding with a cache gets sdpa's mask path."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    config = CONFIGS["qwen2"]()
    config._attn_implementation = WZ_VARLEN
    embeds = torch.zeros(1, 25, 8)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    for cache in (None, DynamicCache(config=config)):
        assert create_causal_mask(config, embeds, None, cache, position_ids=pos) is None
    built = []
    model = _model("qwen2", attn=WZ_VARLEN)
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: built.append(kwargs.get("attention_mask")), with_kwargs=True)
    (batch,) = pack_sequences(seqs, max_tokens=64)
    with torch.no_grad():
        model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=True)
    hook.remove()
    assert built == [None]


def test_cu_seqlens_from_position_ids():
    cu, max_len = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6]]))
    assert cu.tolist() == [0, 3, 4, 6, 8] and cu.dtype == torch.int32 and max_len == 3


def test_unsupported_settings_are_errors(seqs):
    model = _model("qwen2", attn=WZ_VARLEN)
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=seqs[0][None], use_cache=False)
    with pytest.raises(ValueError, match="impl="):
        register_wz_attention("bad", impl="cuda")
