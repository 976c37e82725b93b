"""policy_loss's soft variants: SAPO (sigmoid gate), VESPO (gamma weight of the summed sequence log-ratio),
the importance-weighted KL (TRL's use_bias_correction_kl) and the off-policy sequence mask: the torch
reference and the Triton kernel (interpreter) vs a per-token Python loop with hand-derived gradients,
vs float64 autograd on odd shapes, and hand-computed values."""

import math
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference, poisoned_like
from tests.kernels.test_policy_loss import assert_triton_matches_float64, make_batch, run
from wz_kernels.policy_loss import (
    _policy_loss_terms_triton,
    aggregation_weights,
    gamma_weights,
    off_policy_sequence_mask,
    policy_loss,
    vespo_log_weights,
)

IMPLS = ["reference", "triton"]
VARIANTS = [  # (loss_type, importance_sampling_level, kl_importance_weighted)
    ("sapo", "token", False),
    ("sapo", "sequence", True),
    ("sapo", "sequence_token", False),
    ("vespo", "token", False),
    ("ppo", "token", True),
    ("ppo", "sequence", True),
    ("cispo", "sequence", True),
]
VARIANT_IDS = [f"{t}-{lv}-iw{int(iw)}" for t, lv, iw in VARIANTS]
SAPO_T = (1.0, 1.3)
GAMMA = (1.5, 2.5, 2.0, 1.2)


def loop_soft_loss(b, *, loss_type, level, kl_weighted, kl_coef):
    """Per-token Python loop (math module) with hand-derived gradients; token-mean, k3 KL clamped at 10."""
    logp, old, ref, adv = (b[k].tolist() for k in ("logp", "old", "ref", "adv"))
    mask, seq = b["mask"].tolist(), b["seq"].tolist()
    members = defaultdict(list)
    for i, m in enumerate(mask):
        if m:
            members[seq[i]].append(i)
    seq_mean = {s: sum(logp[i] - old[i] for i in idx) / len(idx) for s, idx in members.items()}
    seq_sum = {s: sum(min(max(logp[i] - old[i], -20), 20) for i in idx) for s, idx in members.items()}
    n_tokens = max(sum(mask), 1)
    loss, grad, through_lw = 0.0, [0.0] * len(logp), defaultdict(float)
    for i in range(len(logp)):
        if not mask[i]:
            continue
        w, a = 1 / n_tokens, adv[i]
        log_w = logp[i] - old[i] if level == "token" else seq_mean[seq[i]]
        r = math.exp(min(max(log_w, -20.0), 20.0))
        dr = r if -20 <= log_w <= 20 else 0.0
        g_own = g_lw = 0.0
        if loss_type == "sapo":
            tau = SAPO_T[0] if a > 0 else SAPO_T[1]
            s = 1 / (1 + math.exp(-tau * (r - 1)))
            lt, g_lw = -s * 4 / tau * a, -4 * a * s * (1 - s) * dr
        elif loss_type == "vespo":
            big_w = min(max(seq_sum[seq[i]], math.log(1e-8)), 20.0)
            k, lam = (GAMMA[0], GAMMA[1]) if a >= 0 else (GAMMA[2], GAMMA[3])
            phi = math.exp(lam + k * big_w - lam * math.exp(big_w))
            lt, g_own = -phi * a * logp[i], -phi * a
            r = math.exp(big_w)
        elif loss_type == "cispo":
            weight = min(max(r, 0.8), 1.3)
            lt, g_own = -weight * a * logp[i], -weight * a
        else:
            clipped = min(max(r, 0.8), 1.3)
            if -a * clipped > -a * r:
                lt, g_lw = -a * clipped, (-a * dr if 0.8 <= r <= 1.3 else 0.0)
            else:
                lt, g_lw = -a * r, -a * dr
        d = logp[i] - ref[i]
        k3 = math.exp(-d) + d - 1
        kl, d_kl = min(k3, 10.0), (1 - math.exp(-d) if k3 <= 10.0 else 0.0)
        if kl_weighted:  # kl * ratio: ratio d_kl on the token, kl * d ratio through log_w
            g_lw += kl_coef * kl * dr
            kl, d_kl = kl * r, d_kl * r
        lt += kl_coef * kl
        g_own += kl_coef * d_kl
        loss += w * lt
        grad[i] += w * g_own
        if level == "sequence":
            through_lw[seq[i]] += w * g_lw
        else:
            grad[i] += w * g_lw
    for s, total in through_lw.items():
        for i in members[s]:
            grad[i] += total / len(members[s])
    return loss, torch.tensor(grad, dtype=torch.float64)


def soft_kwargs(loss_type, level, kl_weighted):
    return {"loss_type": loss_type, "importance_sampling_level": level, "kl_importance_weighted": kl_weighted,
            "sapo_temperatures": SAPO_T, "vespo_gamma": GAMMA, "clip_low": 0.2, "clip_high": 0.3}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_matches_python_loop(impl, variant):
    b = make_batch(83, 7, seed=sum(map(ord, str(variant))) % 997, scale=0.6)
    b["logp"][:2] = b["old"][:2] + torch.tensor([30.0, -30.0], dtype=torch.float64)  # the log_w clamps
    loss_type, level, kl_weighted = variant
    want_loss, want_grad = loop_soft_loss(b, loss_type=loss_type, level=level, kl_weighted=kl_weighted,
                                          kl_coef=0.05)
    loss, grad, _ = run(impl, b, kl_coef=0.05, **soft_kwargs(*variant))
    assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert_close_to_reference(grad, want_grad, atol=1e-6, rtol=1e-5, name="grad")


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (64, 1), (257, 9)],
                         ids=["N1", "single-token-seqs", "G1", "N257"])
def test_triton_matches_float64_reference(variant, shape):
    """N = 1, one-token sequences, one sequence, ragged multi-tile; masked tokens, a policy mask."""
    n_tokens, n_seqs = shape
    b = make_batch(n_tokens, n_seqs, seed=n_tokens + 3 * n_seqs, scale=0.5,
                   p_masked=0.0 if n_tokens == 1 else 0.25, masked_seq=n_seqs > 1)
    if n_seqs == n_tokens:
        b["seq"] = torch.arange(n_tokens) * 3 - 4
    policy_mask = (torch.arange(n_tokens) % 3 != 1).float()
    for agg in ("token-mean", "seq-mean-token-mean"):
        cfg = dict(soft_kwargs(*variant), kl_coef=0.1, agg=agg, policy_mask=policy_mask)
        assert_triton_matches_float64(b, **cfg)


@pytest.mark.parametrize("loss_type", ["sapo", "vespo"])
def test_triton_writes_every_gradient_element(loss_type):
    b = make_batch(256 * 5 + 17, 13, seed=43, scale=0.3)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    weights = aggregation_weights(b["mask"], b["seq"], "seq-mean-token-mean")
    grad = poisoned_like(f32["logp"])
    loss, grad, _ = _policy_loss_terms_triton(f32["logp"], f32["old"], f32["adv"], b["mask"], weights,
                                              f32["ref"], 0.2, 0.2, None, 0.1, "k3", grad=grad,
                                              loss_type=loss_type, seq_ids=b["seq"])
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, kl_coef=0.1, agg="seq-mean-token-mean",
                            loss_type=loss_type)
    assert torch.isfinite(grad).all()
    assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_sapo_and_vespo(impl):
    """One sequence of two tokens, log-ratios log 2 and 0; a third masked token carries NaN."""
    logp = torch.tensor([-1.0, -2.0, float("nan")], dtype=torch.float64)
    old = logp - torch.tensor([math.log(2.0), 0.0, 0.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, float("nan")], dtype=torch.float64)
    b = {"logp": logp, "old": old, "ref": logp, "adv": adv, "mask": torch.tensor([True, True, False]),
         "seq": torch.zeros(3, dtype=torch.long)}
    # SAPO, tau 1 (A > 0): token 0 gate sigmoid(1) * 4, token 1 (ratio 1) sigmoid(0) * 4 = 2
    s = 1 / (1 + math.exp(-1.0))
    loss, grad, metrics = run(impl, b, loss_type="sapo")
    assert loss.item() == pytest.approx(-(4 * s + 2) / 2, rel=1e-6)
    want = torch.tensor([-4 * s * (1 - s) * 2 / 2, -4 * 0.25 / 2, 0.0], dtype=torch.float64)
    assert torch.allclose(grad.double(), want, atol=1e-7)
    assert metrics["clip_frac_high"].item() == 0.0 and metrics["clip_frac_low"].item() == 0.0
    # VESPO, defaults (k 2, lambda 3 for A >= 0): W = log 2, phi = exp(3 + 2 log 2 - 6) = 4 e^-3 on both
    phi = 4 * math.exp(-3.0)
    loss, grad, metrics = run(impl, b, loss_type="vespo")
    assert loss.item() == pytest.approx(-phi * (-1.0 - 2.0) / 2, rel=1e-6)
    assert torch.allclose(grad.double(), torch.tensor([-phi / 2, -phi / 2, 0.0], dtype=torch.float64))
    assert metrics["ratio_mean"].item() == pytest.approx(2.0, rel=1e-6)  # exp(W)


@pytest.mark.parametrize("impl", IMPLS)
def test_vespo_clamps_each_token_before_the_sum(impl):
    """Log-ratios 25, -12, -12.5 in one sequence: W = (20 - 12 - 12.5) = -4.5 (TRL clamps each token first;
    the raw sum, 0.5, would weigh the sequence ~160x more). A = 1: phi = exp(3 + 2 W - 3 e^W)."""
    logp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    old = logp - torch.tensor([25.0, -12.0, -12.5], dtype=torch.float64)
    b = {"logp": logp, "old": old, "ref": logp, "adv": torch.ones(3, dtype=torch.float64),
         "mask": torch.ones(3, dtype=torch.bool), "seq": torch.zeros(3, dtype=torch.long)}
    phi = math.exp(3 + 2 * -4.5 - 3 * math.exp(-4.5))
    loss, grad, _ = run(impl, b, loss_type="vespo", kl_coef=0.0, ref_logprobs=None)
    assert loss.item() == pytest.approx(-phi * (-1.0 - 2.0 - 3.0) / 3, rel=1e-5)
    assert torch.allclose(grad.double(), torch.full((3,), -phi / 3, dtype=torch.float64), rtol=1e-5)


def test_gamma_weight_is_one_at_ratio_one_and_zero_when_not_finite():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    log_w = torch.tensor([0.0, 0.0, 20.0, math.log(1e-8)], dtype=torch.float64)
    phi = gamma_weights(log_w, adv)
    assert phi[:2].tolist() == [1.0, 1.0]
    assert phi[2].item() == 0.0 and 0.0 <= phi[3].item() < 1e-20
    big_k = gamma_weights(torch.tensor([20.0]), torch.tensor([1.0]), (1e3, 1e-6, 1.0, 1.0))
    assert big_k.item() == 0.0  # exp overflows to inf: 0, as TRL's nan_to_num


def test_vespo_log_weights_sum_clamped_tokens():
    b = make_batch(40, 4, seed=5, scale=3.0)
    b["logp"][3] = b["old"][3] + 25.0  # clamped per token at 20 first
    got = vespo_log_weights(b["logp"], b["old"], b["mask"], b["seq"])
    for s in b["seq"].unique():
        sel = (b["seq"] == s) & b["mask"]
        if sel.any():
            total = (b["logp"][sel] - b["old"][sel]).clamp(-20, 20).sum().clamp(math.log(1e-8), 20)
            assert torch.allclose(got[sel], total.expand(int(sel.sum())))
    assert not got[~b["mask"]].any()


def test_off_policy_sequence_mask_drops_negative_far_sequences():
    """TRL's rule per sequence: keep if A >= 0 or mean(sampling - current) <= threshold."""
    b = make_batch(60, 6, seed=9, scale=0.8)
    sampling = b["old"].clone()
    sampling[~b["mask"]] = float("nan")  # masked tokens' garbage is ignored
    keep = off_policy_sequence_mask(b["adv"], b["logp"], sampling, b["mask"], b["seq"], 0.05)
    dropped = 0
    for s in b["seq"].unique():
        sel = b["seq"] == s
        valid = sel & b["mask"]
        mean_kl = (sampling[valid] - b["logp"][valid]).sum() / max(int(valid.sum()), 1)
        want = bool(b["adv"][sel][0] >= 0) or bool(mean_kl <= 0.05)
        assert keep[sel].all() if want else not keep[sel].any()
        dropped += not want
    assert dropped > 0 and dropped < 6


SOFT_BAD = [
    ({"loss_type": "sapo", "sapo_temperatures": (0.0, 1.0)}, "sapo_temperatures"),
    ({"loss_type": "sapo", "sapo_temperatures": (1.0,)}, "sapo_temperatures"),
    ({"loss_type": "vespo", "vespo_gamma": (2.0, 0.0, 3.0, 2.0)}, "vespo_gamma"),
    ({"loss_type": "vespo", "vespo_gamma": (2.0, float("nan"), 3.0, 2.0)}, "vespo_gamma"),
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
    ({"loss_type": "vespo", "seq_ids": None}, "seq_ids"),
    ({"loss_type": "vespo", "kl_importance_weighted": True}, "kl_importance_weighted"),
    ({"loss_type": "sapo", "delta": 2.0}, "delta"),
    ({"loss_type": "vespo", "dual_clip": 2.0}, "dual_clip"),
    ({"kl_importance_weighted": 1}, "kl_importance_weighted"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad,name", SOFT_BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(SOFT_BAD)])
def test_bad_soft_option_raises_value_error_naming_argument(impl, bad, name):
    n = 6
    kw = {"seq_ids": torch.zeros(n, dtype=torch.long), **bad}
    with pytest.raises(ValueError, match=name):
        policy_loss(torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.ones(n, dtype=torch.bool),
                    impl=impl, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_cuda_kernel_soft_variants_match_float64_reference(variant):
    n = 3 * 2**16 + 5
    b = make_batch(n, 200, seed=71, scale=0.05)
    cfg = dict(soft_kwargs(*variant), kl_coef=0.1, agg="seq-mean-token-mean")
    loss, grad, metrics = run("auto", {k: v.cuda() for k, v in b.items()}, **cfg)
    loss64, grad64, metrics64 = run("ref64", b, dtype=torch.float64, **cfg)
    assert_close_to_reference(loss.cpu(), loss64, atol=1e-6, rtol=1e-4, name="loss")
    assert_close_to_reference(grad.cpu(), grad64, atol=1e-9, rtol=1e-4, name="grad")
    for k in metrics:
        assert_close_to_reference(metrics[k].cpu(), metrics64[k], atol=1e-6, rtol=1e-4, name=k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["sapo", "vespo"])
def test_torch_compile_fullgraph(impl, loss_type):
    """Dynamo traces the soft variants (custom op + fake with the new list / bool arguments) without a break."""
    torch._dynamo.reset()
    b = make_batch(50, 4, seed=29)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    cfg = {"loss_type": loss_type, "sapo_temperatures": SAPO_T, "vespo_gamma": GAMMA, "kl_coef": 0.1,
           "kl_importance_weighted": loss_type == "sapo"}

    def step(logp):
        loss, metrics = policy_loss(logp, f32["old"], f32["adv"], b["mask"], ref_logprobs=f32["ref"],
                                    seq_ids=b["seq"], impl=impl, **cfg)
        return loss, metrics["ratio_mean"]

    logp = f32["logp"].clone().requires_grad_(True)
    loss, _ = torch.compile(step, backend="aot_eager", fullgraph=True)(logp)
    loss.backward()
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, **cfg)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)
    assert_close_to_reference(logp.grad, grad64, atol=1e-7, rtol=1e-5)
