"""FusedHeadCausalLM: same log-probabilities and gradients as the model's own logits path, tied and
untied embeddings, policy-loss mode, and FSDP2 (2-process torchrun on CPU) == unsharded."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.modeling_fsdp_worker import packed_batch, run, tiny_model
from wz_engine.modeling import FusedHeadCausalLM, PolicyLossBatch, next_token_targets
from wz_kernels.policy_loss import policy_loss


def test_next_token_targets_respects_sequence_boundaries():
    ids = torch.tensor([[10, 11, 12, 20, 30, 31]])
    pos = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert next_token_targets(ids, pos).tolist() == [11, 12, -100, -100, 31, -100]


def logits_path_logprobs(model, ids, pos, targets, temperature):
    """Oracle: each sequence run alone through the full model (lm_head included), float64 log_softmax."""
    starts = (pos[0] == 0).nonzero()[:, 0].tolist() + [ids.shape[1]]
    logp, ent = [], []
    for s, e in zip(starts[:-1], starts[1:]):
        logits = model(input_ids=ids[:, s:e], use_cache=False).logits[0].double() / temperature
        lsm = torch.log_softmax(logits, dim=-1)
        t = targets[s:e]
        valid = t != -100
        logp.append(torch.where(valid, lsm.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0))
        ent.append(torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0))
    return torch.cat(logp), torch.cat(ent)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_head_matches_logits_path_float64(tied):
    model = tiny_model(tied, dtype=torch.float64)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids, pos, targets, g_logp, g_ent = packed_batch()
    wrapper = FusedHeadCausalLM(model, chunk_size=6)
    logp, ent = run(wrapper, (ids, pos, targets, g_logp.double(), g_ent.double()))
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    lp64, ent64 = logits_path_logprobs(model, ids, pos, targets, 0.9)
    (lp64 * g_logp.double() + ent64 * g_ent.double()).sum().backward()
    torch.testing.assert_close(logp.double(), lp64.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ent64.detach(), atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        # float32 outputs (the op's contract) round the upstream grads: ~1e-7 relative
        torch.testing.assert_close(fused_grads[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)
    assert fused_grads["model.embed_tokens.weight"].abs().sum() > 0


def test_policy_loss_mode_equals_composed():
    model = tiny_model(tied=True)
    ids, pos, targets, _, _ = packed_batch()
    N = ids.shape[1]
    g = torch.Generator().manual_seed(3)
    batch = PolicyLossBatch(
        old_logprobs=-4.6 + 0.3 * torch.randn(N, generator=g), advantages=torch.randn(N, generator=g),
        mask=targets != -100, seq_ids=torch.cumsum((pos[0] == 0).long(), 0),
        options=dict(agg="seq-mean-token-mean", clip_high=0.28),
    )
    wrapper = FusedHeadCausalLM(model, chunk_size=5)
    loss, metrics = wrapper(ids, pos, targets, policy_loss=batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logp = wrapper(ids, pos, targets)
    loss2, metrics2 = policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask,
                                  seq_ids=batch.seq_ids, **batch.options)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for k in metrics2:
        torch.testing.assert_close(metrics[k], metrics2[k], msg=k)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_bad_inputs():
    with pytest.raises(ValueError, match="transformers"):
        FusedHeadCausalLM(torch.nn.Linear(2, 2))
    wrapper = FusedHeadCausalLM(tiny_model(tied=True))
    ids, pos, targets, _, _ = packed_batch()
    with pytest.raises(ValueError, match="one packed row"):
        wrapper(ids[0], pos[0], targets)
    with pytest.raises(ValueError, match="position_ids"):
        wrapper(ids, pos[:, :-1], targets)


def test_fsdp2_two_ranks_equal_unsharded(tmp_path):
    out = tmp_path / "fsdp.pt"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests/engine/modeling_fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(out)
    for tied in (True, False):
        wrapper = FusedHeadCausalLM(tiny_model(tied), chunk_size=7)
        logp, ent = run(wrapper, packed_batch())
        torch.testing.assert_close(sharded[tied]["logp"], logp)
        torch.testing.assert_close(sharded[tied]["entropy"], ent)
        grads = dict(wrapper.named_parameters())
        assert set(sharded[tied]["grads"]) == set(grads)
        for n, p in grads.items():
            torch.testing.assert_close(sharded[tied]["grads"][n], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=f"tied={tied} {n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_gpu_packed_fused_head_equals_per_sequence(dtype, tol):
    """The packed training path on CUDA: "wz_varlen" attention (the Triton kernel) + FusedHeadCausalLM
    (fused log-probs, Triton epilogues) on one packed row gives each sequence's log-probs as when that
    sequence runs alone; the backward runs and is finite. The leak this guards against (sdpa with a
    cache on the same packed row) moves them by far more than `tol` on the same model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wz_engine.attention import WZ_VARLEN

    cfg = Qwen2Config(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to("cuda", dtype).eval()
    lengths = (37, 1, 200, 64, 5)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (sum(lengths),), generator=g).cuda()[None]
    pos = torch.cat([torch.arange(n) for n in lengths]).cuda()[None]
    targets = next_token_targets(ids, pos)
    wrapper = FusedHeadCausalLM(model)

    def logprobs(attn, s, e, **kw):
        model.set_attn_implementation(attn)
        return wrapper(ids[:, s:e], pos[:, s:e], targets[s:e], **kw)

    bounds = torch.tensor((0,) + lengths).cumsum(0).tolist()
    packed = logprobs(WZ_VARLEN, 0, bounds[-1])
    alone = torch.cat([logprobs(WZ_VARLEN, s, e) for s, e in itertools.pairwise(bounds)])
    torch.testing.assert_close(packed.detach(), alone.detach(), atol=tol, rtol=0)
    packed.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        leaky = logprobs("sdpa", 0, bounds[-1], use_cache=True)
    assert (leaky - alone).abs().max() > 2 * tol, "the leak would not show at this tolerance"
