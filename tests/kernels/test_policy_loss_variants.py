"""policy_loss variants (GSPO, GSPO-token, CISPO, two-sided clipping, top-entropy masking): the torch
reference and the Triton kernel (interpreter) vs a per-token Python loop with hand-derived gradients and
vs float64 autograd, on odd shapes (N = 1, single-token sequences, masked tokens, one sequence), with
poisoned outputs."""

import math
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference, poisoned_like
from tests.kernels.test_policy_loss import assert_triton_matches_float64, make_batch, run
from wz_kernels.policy_loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    _policy_loss_terms_triton,
    aggregation_weights,
    high_entropy_mask,
    log_importance_weights,
    policy_loss,
    token_loss_terms,
)

IMPLS = ["reference", "triton"]
VARIANTS = [  # (loss_type, importance_sampling_level, delta, dual_clip)
    ("ppo", "sequence", None, None),
    ("ppo", "sequence", 1.5, None),
    ("ppo", "sequence_token", None, 2.0),
    ("ppo", "token", 1.1, None),  # delta < 1 + clip_high: not a dual clip
    ("ppo", "token", 1.5, 3.0),
    ("cispo", "token", None, None),
    ("cispo", "sequence", None, None),
    ("cispo", "sequence_token", None, None),
]
VARIANT_IDS = [f"{t}-{lv}-d{d}-c{c}" for t, lv, d, c in VARIANTS]


def loop_variant_loss(b, *, loss_type, level, delta, dual_clip, clip_low, clip_high, kl_coef,
                      policy_mask=None):
    """Per-token Python loop from the module docstring (math module), with the gradient derived by hand:
    the terms through log_w reach every token of the sequence at level "sequence", only the token itself
    otherwise. token-mean aggregation, k3 KL (clamped at 10)."""
    logp, old, ref, adv = (b[k].tolist() for k in ("logp", "old", "ref", "adv"))
    mask, seq = b["mask"].tolist(), b["seq"].tolist()
    pm = [1.0] * len(logp) if policy_mask is None else [float(x) for x in policy_mask.tolist()]
    members = defaultdict(list)
    for i, m in enumerate(mask):
        if m:
            members[seq[i]].append(i)
    seq_mean = {s: sum(logp[i] - old[i] for i in idx) / len(idx) for s, idx in members.items()}
    n_tokens = max(sum(mask), 1)
    lo, hi = 1 - clip_low, 1 + clip_high
    loss, grad, through_lw = 0.0, [0.0] * len(logp), defaultdict(float)
    for i in range(len(logp)):
        if not mask[i]:
            continue
        w, a = 1 / n_tokens, adv[i]
        log_w = logp[i] - old[i] if level == "token" else seq_mean[seq[i]]
        r = math.exp(min(max(log_w, -20.0), 20.0))
        dr = r if -20 <= log_w <= 20 else 0.0  # d ratio / d log_w
        if loss_type == "cispo":
            weight = min(max(r, lo), hi)
            lt, g_own, g_lw = -weight * a * logp[i], -weight * a, 0.0
        else:
            coef, d_coef = (r, dr) if delta is None or r <= delta else (delta, 0.0)
            clipped = min(max(r, lo), hi)
            d_clipped = dr if lo <= r <= hi else 0.0
            if -a * clipped > -a * coef:
                lt, g_lw = -a * clipped, -a * d_clipped
            else:
                lt, g_lw = -a * coef, -a * d_coef
            if dual_clip is not None and a < 0 and lt > -a * dual_clip:
                lt, g_lw = -a * dual_clip, 0.0
            g_own = 0.0
        lt, g_own, g_lw = lt * pm[i], g_own * pm[i], g_lw * pm[i]
        d = logp[i] - ref[i]
        k3 = math.exp(-d) + d - 1
        lt += kl_coef * min(k3, 10.0)
        g_own += kl_coef * (1 - math.exp(-d) if k3 <= 10.0 else 0.0)
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


def variant_kwargs(loss_type, level, delta, dual_clip):
    # cispo clips its weight to [1 - clip_low, 1 + clip_high]: the lower bound binds in the sequence variants
    # (clip_low 0.2), TRL's cap alone (clip_low 1) in the token one
    cispo_low = 1.0 if level == "token" else 0.2
    return {"loss_type": loss_type, "importance_sampling_level": level, "delta": delta,
            "dual_clip": dual_clip, "clip_low": 0.2 if loss_type == "ppo" else cispo_low,
            "clip_high": 0.28 if loss_type == "ppo" else 0.3}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_matches_python_loop(impl, variant):
    b = make_batch(83, 7, seed=sum(map(ord, str(variant))) % 997, scale=1.0)
    b["logp"][:2] = b["old"][:2] + torch.tensor([30.0, -30.0], dtype=torch.float64)  # the log_w clamp
    for s in b["seq"][b["mask"]].unique()[:2]:  # two sequences whose ratio clips (at sequence level too)
        sel = b["seq"] == s
        b["logp"][sel] += torch.sign(b["adv"][sel]) * 1.0
    cfg = variant_kwargs(*variant)
    pm = torch.rand(83, generator=torch.Generator().manual_seed(3)) > 0.3
    for policy_mask in (None, pm):
        loop_cfg = {k: v for k, v in cfg.items() if k != "importance_sampling_level"}
        want_loss, want_grad = loop_variant_loss(b, level=cfg["importance_sampling_level"], kl_coef=0.05,
                                                 policy_mask=policy_mask, **loop_cfg)
        loss, grad, metrics = run(impl, b, kl_coef=0.05, policy_mask=policy_mask, **cfg)
        assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
        assert_close_to_reference(grad, want_grad, atol=1e-6, rtol=1e-5, name="grad")
    clipped = metrics["clip_frac_high"].item() + metrics["clip_frac_low"].item()
    assert clipped > 0, "no clipping exercised"


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (64, 1), (257, 9)],
                         ids=["N1", "single-token-seqs", "G1", "N257"])
def test_triton_matches_float64_reference(variant, shape):
    """N = 1, sequences of one token each, one sequence (G = 1), ragged multi-tile; masked tokens."""
    n_tokens, n_seqs = shape
    b = make_batch(n_tokens, n_seqs, seed=n_tokens + n_seqs, scale=0.5,
                   p_masked=0.0 if n_tokens == 1 else 0.25, masked_seq=n_seqs > 1)
    if n_seqs == n_tokens:
        b["seq"] = torch.arange(n_tokens) * 3 - 4  # every sequence a single token
    policy_mask = (torch.arange(n_tokens) % 3 != 1).float()
    for agg in ("token-mean", "seq-mean-token-mean"):
        cfg = dict(variant_kwargs(*variant), kl_coef=0.1, kl_estimator="k3", agg=agg, policy_mask=policy_mask)
        assert_triton_matches_float64(b, **cfg)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_triton_writes_every_element_at_sequence_level(level):
    """Poisoned gradient buffer; several tiles per program; unsorted sequence ids spanning tiles."""
    b = make_batch(256 * 5 + 17, 13, seed=43, scale=0.5)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    weights = aggregation_weights(b["mask"], b["seq"], "seq-mean-token-mean")
    grad = poisoned_like(f32["logp"])
    cfg = {"importance_sampling_level": level, "seq_ids": b["seq"], "delta": 1.4}
    loss, grad, _ = _policy_loss_terms_triton(f32["logp"], f32["old"], f32["adv"], b["mask"], weights,
                                              f32["ref"], 0.2, 0.2, None, 0.1, "k3", grad=grad, **cfg)
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, kl_coef=0.1, agg="seq-mean-token-mean",
                            importance_sampling_level=level, delta=1.4)
    assert torch.isfinite(grad).all()
    assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_gspo_and_cispo(impl):
    """One sequence of two tokens, log-ratios log 2 and 0: S = log(2) / 2, ratio sqrt(2) ~ 1.414."""
    logp = torch.tensor([-1.0, -2.0, float("nan")], dtype=torch.float64)
    old = logp - torch.tensor([math.log(2.0), 0.0, 0.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, float("nan")], dtype=torch.float64)
    b = {"logp": logp, "old": old, "ref": logp, "adv": adv, "mask": torch.tensor([True, True, False]),
             "seq": torch.zeros(3, dtype=torch.long)}
    r = math.sqrt(2.0)
    # GSPO, clip_high 0.5: unclipped (1.414 < 1.5), loss = -r (token-mean of -A r), grad r/2 spread evenly
    loss, grad, _ = run(impl, b, importance_sampling_level="sequence", clip_high=0.5)
    assert loss.item() == pytest.approx(-r, rel=1e-6)
    # d loss / d S = sum_t w_t (-A r) = -r, d S / d logp = 1 / 2 for each of the two tokens
    assert torch.allclose(grad.double(), torch.tensor([-r / 2, -r / 2, 0.0], dtype=torch.float64))
    # clip_high 0.2: clipped high -> constant 1.2, no gradient, both tokens count as clipped
    loss, grad, metrics = run(impl, b, importance_sampling_level="sequence", clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2, rel=1e-6) and torch.equal(grad, torch.zeros_like(grad))
    assert metrics["clip_frac_high"].item() == 1.0
    # GSPO-token: the same value, each token its own gradient w_t (-A r) = -r / 2 (equal to GSPO's here:
    # one advantage per sequence, as the GSPO paper notes)
    loss, grad, _ = run(impl, b, importance_sampling_level="sequence_token", clip_high=0.5)
    assert loss.item() == pytest.approx(-r, rel=1e-6)
    assert torch.allclose(grad.double(), torch.tensor([-r / 2, -r / 2, 0.0], dtype=torch.float64))
    # CISPO, clip [0.8, 1.2] at token level: token 0 (ratio 2) capped -> -1.2 * logp, token 1 -> -1 * logp
    loss, grad, metrics = run(impl, b, loss_type="cispo", clip_high=0.2)
    assert loss.item() == pytest.approx((1.2 * -1.0 + 1.0 * -2.0) / -2, rel=1e-6)
    assert torch.allclose(grad.double(), torch.tensor([-1.2 / 2, -1.0 / 2, 0.0], dtype=torch.float64))
    assert metrics["clip_frac_high"].item() == 0.5 and metrics["clip_frac_low"].item() == 0.0


def test_two_sided_clip_equals_dual_clip_above_one_plus_clip_high():
    """delta > 1 + clip_high is the dual clip (the old mapping of TRL's delta): same loss and gradient."""
    b = make_batch(120, 6, seed=47, scale=0.8)
    cfg = {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0, "ref_logprobs": None}
    loss_d, grad_d, _ = run("ref64", b, dtype=torch.float64, delta=1.7, **cfg)
    loss_c, grad_c, _ = run("ref64", b, dtype=torch.float64, dual_clip=1.7, **cfg)
    assert loss_d.item() == pytest.approx(loss_c.item(), rel=1e-12)
    assert torch.allclose(grad_d, grad_c, rtol=1e-12, atol=0)
    loss_small, _, _ = run("ref64", b, dtype=torch.float64, delta=1.1, **cfg)  # below: different
    assert loss_small.item() != pytest.approx(loss_c.item(), rel=1e-6)


def test_log_importance_weights_levels():
    b = make_batch(40, 4, seed=53)
    logp = b["logp"].clone().requires_grad_(True)
    seq_level = log_importance_weights(logp, b["old"], b["mask"], b["seq"], "sequence")
    for s in b["seq"].unique():
        sel = (b["seq"] == s) & b["mask"]
        if sel.any():
            want = (b["logp"][sel] - b["old"][sel]).mean()
            assert torch.allclose(seq_level[sel], want.expand(int(sel.sum())))
    assert torch.equal(seq_level[~b["mask"]], torch.zeros(int((~b["mask"]).sum()), dtype=torch.float64))
    tok = log_importance_weights(logp, b["old"], b["mask"], b["seq"], "sequence_token")
    assert torch.allclose(tok, seq_level)
    (g,) = torch.autograd.grad(tok.sum(), logp)
    assert torch.equal(g, b["mask"].double())  # each token its own gradient
    with pytest.raises(ValueError, match="seq_ids"):
        log_importance_weights(logp, b["old"], b["mask"], None, "sequence")
    assert IMPORTANCE_SAMPLING_LEVELS == ("token", "sequence", "sequence_token")


def test_high_entropy_mask_matches_trl_definition():
    """TRL's get_high_entropy_mask on one process: entropies * mask >= quantile(entropies[mask], 1 - q)."""
    g = torch.Generator().manual_seed(59)
    entropy = torch.rand(50, generator=g) * 3
    mask = torch.rand(50, generator=g) > 0.3
    for q in (0.0, 0.2, 0.5, 1.0):
        threshold = torch.quantile(entropy[mask], 1 - q)
        want = (entropy * mask.float() >= threshold) & mask
        assert torch.equal(high_entropy_mask(entropy, mask, q), want), q
    assert int(high_entropy_mask(entropy, mask, 0.0).sum()) == 1  # only the highest-entropy token
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask)
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.2).any()
    with pytest.raises(ValueError, match="top_quantile"):
        high_entropy_mask(entropy, mask, 1.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_level_stats_are_additive_over_whole_sequence_chunks(impl):
    """token_loss_terms at sequence level over chunks of whole sequences == one call (what a caller
    accumulating micro-batches relies on)."""
    b = make_batch(90, 6, seed=61, scale=0.5)
    order = torch.argsort(b["seq"], stable=True)
    b = {k: v[order] for k, v in b.items()}
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    weights = aggregation_weights(b["mask"], b["seq"], "token-mean")
    cfg = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "kl_coef": 0.1, "kl_estimator": "k3",
               "importance_sampling_level": "sequence", "impl": impl}
    full = token_loss_terms(f32["logp"], f32["old"], f32["adv"], b["mask"], weights, ref_logprobs=f32["ref"],
                            seq_ids=b["seq"], **cfg)
    cut = int(torch.nonzero(b["seq"] != b["seq"][0])[0])  # the first sequence boundary
    parts = [token_loss_terms(f32["logp"][sl], f32["old"][sl], f32["adv"][sl], b["mask"][sl], weights[sl],
                              ref_logprobs=f32["ref"][sl], seq_ids=b["seq"][sl], **cfg)
             for sl in (slice(0, cut), slice(cut, 90))]
    assert torch.allclose(torch.cat([p[1] for p in parts]), full[1], atol=1e-8)
    assert sum(p[0].item() for p in parts) == pytest.approx(full[0].item(), rel=1e-5)


BAD_VARIANTS = [
    ({"loss_type": "grpo"}, "loss_type"),
    ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
    ({"importance_sampling_level": "sequence", "seq_ids": None}, "seq_ids"),
    ({"delta": 0.0}, "delta"),
    ({"delta": float("inf")}, "delta"),
    ({"loss_type": "cispo", "delta": 2.0}, "delta"),
    ({"loss_type": "cispo", "dual_clip": 2.0}, "dual_clip"),
    ({"loss_type": "cispo", "clip_high": -1.0}, "clip_high"),
    ({"clip_high": -0.5}, "clip_high"),
    ({"policy_mask": torch.ones(5)}, "policy_mask"),
    ({"policy_mask": torch.ones(6, dtype=torch.complex64)}, "policy_mask"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad,name", BAD_VARIANTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_VARIANTS)])
def test_bad_variant_raises_value_error_naming_argument(impl, bad, name):
    n = 6
    kw = {"seq_ids": torch.zeros(n, dtype=torch.long), **bad}
    with pytest.raises(ValueError, match=name):
        policy_loss(torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.ones(n, dtype=torch.bool),
                    impl=impl, **kw)


def test_cispo_accepts_a_cap_below_one():
    """TRL's cispo caps at epsilon_high itself, which may be < 1 (its default 0.2): clip_high = -0.8, and no
    lower bound: clip_low = 1."""
    b = make_batch(30, 6, seed=67)
    cfg = {"loss_type": "cispo", "clip_low": 1.0, "clip_high": -0.8, "kl_coef": 0.0, "ref_logprobs": None}
    loss, grad, metrics = run("triton", b, **cfg)
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, **cfg)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)
    assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5)
    assert metrics["clip_frac_high"].item() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_cuda_kernel_variants_match_float64_reference(variant):
    """On a GPU: every variant at a size spanning many programs (sequences scattered over the batch, a
    policy mask), vs float64 on the CPU; the segment sums run with CUDA atomics there."""
    n = 3 * 2**16 + 5
    b = make_batch(n, 200, seed=71, scale=0.5)
    policy_mask = (torch.arange(n) % 3 != 1).float()
    cfg = dict(variant_kwargs(*variant), kl_coef=0.1, kl_estimator="k3", agg="seq-mean-token-mean")
    cuda = {k: v.cuda() for k, v in b.items()}
    loss, grad, metrics = run("auto", cuda, policy_mask=policy_mask.cuda(), **cfg)
    loss64, grad64, metrics64 = run("ref64", b, dtype=torch.float64, policy_mask=policy_mask, **cfg)
    assert_close_to_reference(loss.cpu(), loss64, atol=1e-6, rtol=1e-4, name="loss")
    assert_close_to_reference(grad.cpu(), grad64, atol=1e-9, rtol=1e-4, name="grad")
    for k in metrics:
        assert_close_to_reference(metrics[k].cpu(), metrics64[k], atol=1e-6, rtol=1e-4, name=k)
