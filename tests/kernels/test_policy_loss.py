"""policy_loss: Triton kernel (interpreter on CPU) and the torch reference vs float64 autograd, a
per-token Python loop, hand-computed numbers, TRL's formulas, and the micro-batch identity."""

import math
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference, poisoned_like
from wz_kernels.policy_loss import (
    AGG_MODES,
    KL_ESTIMATORS,
    STAT_NAMES,
    _dense_segment_ids,
    _policy_loss_terms_triton,
    aggregation_weights,
    policy_loss,
    policy_loss_reference,
    token_loss_terms,
)

IMPLS = ["reference", "triton"]


def make_batch(n_tokens, n_seqs, *, seed, scale=0.4, p_masked=0.25, masked_seq=True):
    """Packed random batch: sequences with arbitrary (unsorted, non-contiguous) ids, some masked."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n_tokens, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n_tokens, generator=g, dtype=torch.float64) * scale
    ref = logp + torch.randn(n_tokens, generator=g, dtype=torch.float64) * scale
    id_values = torch.randperm(1000, generator=g)[:n_seqs] * 7 - 3000  # arbitrary ints, some negative
    seq = id_values[torch.randint(0, n_seqs, (n_tokens,), generator=g)]
    seq_adv = torch.randn(n_seqs, generator=g, dtype=torch.float64)
    adv = seq_adv[torch.searchsorted(id_values.sort().values, seq).clamp_max(n_seqs - 1)]
    mask = torch.rand(n_tokens, generator=g) > p_masked
    if masked_seq and n_seqs > 1:
        mask[seq == id_values[0]] = False  # one fully masked sequence
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, seq=seq)


def run(impl, b, dtype=torch.float32, **kw):
    """(loss, grad, metrics) of policy_loss with impl on batch b, inputs cast to dtype."""
    logp = b["logp"].to(dtype).clone().requires_grad_(True)
    cast = {k: b[k].to(dtype) for k in ("old", "ref", "adv")}
    kw.setdefault("ref_logprobs", cast["ref"])
    kw.setdefault("seq_ids", b["seq"])
    if impl == "ref64":
        loss, metrics = policy_loss_reference(logp, cast["old"], cast["adv"], b["mask"], upcast=True, **kw)
    else:
        loss, metrics = policy_loss(logp, cast["old"], cast["adv"], b["mask"], impl=impl, **kw)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def assert_triton_matches_float64(b, **cfg):
    """The Triton kernel's loss, gradient and every metric on batch b against the float64 reference."""
    loss, grad, metrics = run("triton", b, **cfg)
    loss64, grad64, metrics64 = run("ref64", b, dtype=torch.float64, **cfg)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5, name="loss")
    assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5, name="grad")
    assert metrics.keys() == metrics64.keys()
    for k in metrics:
        assert metrics[k].dim() == 0
        assert_close_to_reference(metrics[k], metrics64[k], atol=1e-6, rtol=1e-5, name=k)


def agg_kwargs(agg):
    return {"agg": agg, "loss_scale": 48.0 if agg == "seq-mean-token-sum-norm" else None}


# ----------------------------------------------------------------------------- independent formulas


def loop_policy_loss(b, *, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, agg, loss_scale=None,
                     use_ref=True):
    """Per-token Python loop written from DESIGN.md section 3 (math module, no torch ops)."""
    logp, old, ref, adv = (b[k].tolist() for k in ("logp", "old", "ref", "adv"))
    mask, seq = b["mask"].tolist(), b["seq"].tolist()
    n_per_seq = defaultdict(int)
    for i, m in enumerate(mask):
        if m:
            n_per_seq[seq[i]] += 1
    n_tokens, n_seqs = sum(mask), len(n_per_seq)
    loss, grad = 0.0, [0.0] * len(logp)
    for i in range(len(logp)):
        if not mask[i]:
            continue
        w = {"token-mean": 1 / n_tokens, "seq-mean-token-mean": 1 / (n_per_seq[seq[i]] * n_seqs),
             "seq-mean-token-sum": 1 / n_seqs, "seq-mean-token-sum-norm": 1 / (n_seqs * (loss_scale or 1))}[agg]
        a, log_ratio = adv[i], logp[i] - old[i]
        r = math.exp(min(max(log_ratio, -20.0), 20.0))
        unclipped, clipped = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
        if clipped > unclipped:
            lt, gt = clipped, 0.0
        else:
            lt, gt = unclipped, (-a * r if -20 <= log_ratio <= 20 else 0.0)
        if dual_clip is not None and a < 0 and lt > -a * dual_clip:
            lt, gt = -a * dual_clip, 0.0
        if use_ref:
            d = logp[i] - ref[i]
            if kl_estimator == "k1":
                kl, gk = d, 1.0
            elif kl_estimator == "k2":
                kl, gk = d * d / 2, d
            else:
                raw = math.exp(-d) + d - 1 if d > -700 else math.inf
                kl = min(raw, 10.0)
                gk = d if kl_estimator == "k3+" else (1 - math.exp(-d) if raw <= 10 else 0.0)
            lt, gt = lt + kl_coef * kl, gt + kl_coef * gk
        loss += w * lt
        grad[i] = w * gt
    return loss, torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_case(impl):
    """4 trained tokens, one per branch, plus a masked token holding NaN; numbers worked out by hand."""
    cl, ch, dual, kl_coef = 0.2, 0.28, 3.0, 0.1
    #                 clipped-high      clipped-low      dual-clipped   unclipped       masked
    log_ratio = [math.log(1.5), math.log(0.5), math.log(4.0), math.log(1.1), float("nan")]
    adv = torch.tensor([1.0, -2.0, -1.0, 0.5, float("nan")], dtype=torch.float64)
    d = [0.5, -0.5, 1.0, 0.0, float("nan")]
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.7, float("nan")], dtype=torch.float64)
    old = logp - torch.tensor(log_ratio, dtype=torch.float64)
    ref = logp - torch.tensor(d, dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False])
    # L_pg: -1*1.28 (clip high), max(2*0.5, 2*0.8)=1.6 (clip low), min(max(4, 1.28), 3)=3 (dual), -0.55
    pg = [-1.28, 1.6, 3.0, -0.55]
    d_pg = [0.0, 0.0, 0.0, -0.55]
    kl = {"k1": d[:4], "k2": [0.125, 0.125, 0.5, 0.0],
          "k3": [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, math.exp(-1.0), 0.0]}
    kl["k3+"] = kl["k3"]
    d_kl = {"k1": [1.0] * 4, "k2": d[:4], "k3": [1 - math.exp(-0.5), 1 - math.exp(0.5), 1 - math.exp(-1.0), 0.0],
            "k3+": d[:4]}
    for est in KL_ESTIMATORS:
        b = dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, seq=torch.zeros(5, dtype=torch.long))
        loss, grad, metrics = run(impl, b, clip_low=cl, clip_high=ch, dual_clip=dual, kl_coef=kl_coef,
                                  kl_estimator=est)
        want_loss = sum(p + kl_coef * k for p, k in zip(pg, kl[est])) / 4
        want_grad = [(g + kl_coef * gk) / 4 for g, gk in zip(d_pg, d_kl[est])] + [0.0]
        assert loss.item() == pytest.approx(want_loss, abs=1e-6), est
        assert torch.allclose(grad.double(), torch.tensor(want_grad, dtype=torch.float64), atol=1e-6), est
        assert metrics["clip_frac_low"].item() == pytest.approx(0.25)
        assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
        assert metrics["clip_frac_dual"].item() == pytest.approx(0.25)
        assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 4.0 + 1.1) / 4, abs=1e-6)
        assert metrics["kl_mean"].item() == pytest.approx(sum(kl[est]) / 4, abs=1e-6)
        assert metrics["tokens"].item() == 4
        assert metrics["loss"].item() == pytest.approx(want_loss, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_python_loop(impl, agg):
    b = make_batch(61, 5, seed=100 + AGG_MODES.index(agg), scale=0.6)  # hash(str) changes per process
    b["logp"][:3] = b["old"][:3] + torch.tensor([50.0, -50.0, 20.0], dtype=torch.float64)  # log-ratio clamp
    cfg = dict(clip_low=0.2, clip_high=0.28, dual_clip=2.0, kl_coef=0.05)
    for est in KL_ESTIMATORS:
        want_loss, want_grad = loop_policy_loss(b, kl_estimator=est, **cfg, **agg_kwargs(agg))
        loss, grad, _ = run(impl, b, kl_estimator=est, **cfg, **agg_kwargs(agg))
        assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-6), est
        assert_close_to_reference(grad, want_grad, atol=1e-6, rtol=1e-5, name=f"grad {est}")


# ----------------------------------------------------------------------------- Triton vs float64 reference


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("n_tokens", [1, 257])
def test_triton_matches_float64_reference(agg, n_tokens):
    b = make_batch(n_tokens, min(n_tokens, 9), seed=n_tokens, p_masked=0.0 if n_tokens == 1 else 0.25)
    for est, dual in (("k1", None), ("k2", 3.0), ("k3", None), ("k3+", 1.5)):
        cfg = dict(clip_low=0.1, clip_high=0.3, dual_clip=dual, kl_coef=0.2, kl_estimator=est, **agg_kwargs(agg))
        assert_triton_matches_float64(b, **cfg)


def test_bf16_inputs():
    """Low-precision inputs: the kernel upcasts after the load, the gradient comes back in bf16."""
    b = make_batch(200, 6, seed=3)
    b16 = {k: (v.to(torch.bfloat16).double() if v.is_floating_point() else v) for k, v in b.items()}
    cfg = dict(kl_coef=0.1, kl_estimator="k3", agg="seq-mean-token-mean")
    loss, grad, _ = run("triton", b16, dtype=torch.bfloat16, **cfg)
    loss64, grad64, _ = run("ref64", b16, dtype=torch.float64, **cfg)
    _, grad_torch, _ = run("reference", b16, dtype=torch.bfloat16, **cfg)
    assert grad.dtype == torch.bfloat16
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)
    assert_close_to_reference(grad, grad64, grad_torch, atol=1e-6)


def test_k3_plus_has_k3_value_and_k2_gradient():
    b = make_batch(40, 3, seed=5, scale=1.5)
    cfg = dict(kl_coef=1.0, clip_low=0.2, clip_high=0.2)
    zero_adv = dict(b, adv=torch.zeros_like(b["adv"]))  # isolate the KL term
    l3, _, _ = run("ref64", zero_adv, dtype=torch.float64, kl_estimator="k3", **cfg)
    l3p, g3p, _ = run("ref64", zero_adv, dtype=torch.float64, kl_estimator="k3+", **cfg)
    _, g2, _ = run("ref64", zero_adv, dtype=torch.float64, kl_estimator="k2", **cfg)
    assert l3p.item() == pytest.approx(l3.item(), rel=1e-12)
    assert torch.equal(g3p, g2)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_gives_zero_not_nan(impl):
    b = make_batch(37, 4, seed=7)
    b["mask"][:] = False
    b["logp"][::3] = float("nan")  # garbage under the mask must not leak
    for agg in AGG_MODES:
        loss, grad, metrics = run(impl, b, kl_coef=0.1, **agg_kwargs(agg))
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
        assert all(v.item() == 0.0 for v in metrics.values()), metrics


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_log_ratios_are_clamped(impl):
    b = make_batch(64, 4, seed=9, p_masked=0.0, masked_seq=False)
    b["logp"] = b["old"] + torch.tensor([50.0, -50.0] * 32, dtype=torch.float64)
    b["ref"] = b["logp"] + torch.tensor([50.0, -50.0, -100.0, 100.0] * 16, dtype=torch.float64)
    for est in KL_ESTIMATORS:
        cfg = dict(clip_low=0.2, clip_high=0.2, kl_coef=0.1, kl_estimator=est)
        loss, grad, metrics = run(impl, b, **cfg)
        loss64, grad64, _ = run("ref64", b, dtype=torch.float64, **cfg)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5, name="loss")
        assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5, name="grad")
        assert metrics["ratio_mean"].item() == pytest.approx((math.exp(20) + math.exp(-20)) / 2, rel=1e-5)


def test_triton_writes_every_gradient_element():
    """Poisoned output; N spans several tiles per program (the persistent loop) and a ragged tail."""
    b = make_batch(256 * 9 + 13, 11, seed=11)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    weights = aggregation_weights(b["mask"], b["seq"], "seq-mean-token-mean")
    grad = poisoned_like(f32["logp"])
    loss, grad, stats = _policy_loss_terms_triton(f32["logp"], f32["old"], f32["adv"], b["mask"], weights,
                                                  f32["ref"], 0.2, 0.2, None, 0.1, "k3", grad=grad)
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, kl_coef=0.1, agg="seq-mean-token-mean")
    assert torch.isfinite(grad).all()
    assert_close_to_reference(grad, grad64, atol=1e-7, rtol=1e-5)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_matches_trl_formulas():
    """TRL's grpo / bnpo / dr_grpo reductions over a padded [B, L] batch, via packed tokens."""
    g = torch.Generator().manual_seed(13)
    B, L = 5, 7
    x = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[:, 0] = True
    seq = torch.arange(B).repeat_interleave(L) * 10 + 3
    w = {agg: aggregation_weights(mask.flatten(), seq, agg, dtype=torch.float64, **(
        {"loss_scale": L, "global_seqs": B} if agg.endswith("norm") else {})) for agg in AGG_MODES}
    trl_grpo = ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    trl_bnpo = (x * mask).sum() / mask.sum().clamp(min=1.0)
    trl_dr_grpo = (x * mask).sum() / (B * L)
    assert (w["seq-mean-token-mean"] * x.flatten()).sum().item() == pytest.approx(trl_grpo.item(), rel=1e-12)
    assert (w["token-mean"] * x.flatten()).sum().item() == pytest.approx(trl_bnpo.item(), rel=1e-12)
    assert (w["seq-mean-token-sum-norm"] * x.flatten()).sum().item() == pytest.approx(trl_dr_grpo.item(), rel=1e-12)
    want_sum = ((x * mask).sum(-1)).mean()
    assert (w["seq-mean-token-sum"] * x.flatten()).sum().item() == pytest.approx(want_sum.item(), rel=1e-12)
    # a fully masked sequence does not count in S (unless global_seqs says otherwise) and gets weight 0
    mask[2] = False
    w2 = aggregation_weights(mask.flatten(), seq, "seq-mean-token-sum")
    assert torch.allclose(w2, mask.flatten().float() / 4)


@pytest.mark.parametrize("ids", [[5], [3, 3, 3], [-7, 2, 2, 9, 9, 9, 40], [9, -7, 2, 9, 40, 2, 9]])
def test_dense_segment_ids_match_torch_unique(ids):
    ids = torch.tensor(ids)
    assert torch.equal(_dense_segment_ids(ids), torch.unique(ids, return_inverse=True)[1])


@pytest.mark.parametrize("agg", [a for a in AGG_MODES if a != "seq-mean-token-mean"])
@pytest.mark.parametrize("impl", IMPLS)
def test_scale_weights_equal_per_token_weights(agg, impl):
    """per_token=False gives the 0-d c with w = mask * c; token_loss_terms takes either form."""
    b = make_batch(97, 5, seed=29)
    kw = dict(loss_scale=agg_kwargs(agg)["loss_scale"])
    w = aggregation_weights(b["mask"], b["seq"], agg, **kw)
    c = aggregation_weights(b["mask"], b["seq"], agg, per_token=False, **kw)
    assert c.dim() == 0 and torch.allclose(b["mask"].float() * c, w)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    outs = [token_loss_terms(f32["logp"], f32["old"], f32["adv"], b["mask"], weights, ref_logprobs=f32["ref"],
                             clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.1, kl_estimator="k2", impl=impl)
            for weights in (w, c)]
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-6) and torch.allclose(outs[0][1], outs[1][1], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_accumulation_identity(impl, agg):
    """Three micro-batches split by sequence: summed losses and gradients == the one-big-batch ones."""
    b = make_batch(150, 9, seed=17)
    big_loss, big_grad, _ = run(impl, b, kl_coef=0.1, **agg_kwargs(agg))
    seq_values = b["seq"].unique()
    global_tokens = b["mask"].sum().item()
    global_seqs = b["seq"][b["mask"]].unique().numel()
    total_loss, total_grad = 0.0, torch.zeros_like(big_grad)
    order = torch.randperm(len(seq_values), generator=torch.Generator().manual_seed(18))
    for part in torch.tensor_split(seq_values[order], 3):
        sel = torch.isin(b["seq"], part)
        micro = {k: v[sel] for k, v in b.items()}
        loss, grad, _ = run(impl, micro, kl_coef=0.1, global_tokens=global_tokens, global_seqs=global_seqs,
                            **agg_kwargs(agg))
        total_loss += loss.item()
        total_grad[sel] = grad
    assert total_loss == pytest.approx(big_loss.item(), rel=1e-5, abs=1e-7)
    assert_close_to_reference(total_grad, big_grad, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_loss_terms_stats_are_additive_over_chunks(impl):
    b = make_batch(300, 7, seed=19)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    weights = aggregation_weights(b["mask"], b["seq"], "token-mean")
    cfg = dict(ref_logprobs=f32["ref"], clip_low=0.2, clip_high=0.28, dual_clip=2.0, kl_coef=0.1,
               kl_estimator="k3", impl=impl)
    full_loss, full_grad, full_stats = token_loss_terms(f32["logp"], f32["old"], f32["adv"], b["mask"], weights,
                                                        **cfg)
    summed = dict.fromkeys(STAT_NAMES, 0.0)
    grads = []
    for sl in (slice(0, 100), slice(100, 101), slice(101, 300)):
        c = {k: v[sl] for k, v in f32.items()}
        loss, grad, stats = token_loss_terms(c["logp"], c["old"], c["adv"], b["mask"][sl], weights[sl],
                                             **dict(cfg, ref_logprobs=c["ref"]))
        grads.append(grad)
        for k in STAT_NAMES:
            summed[k] += stats[k].item()
    assert set(full_stats) == set(STAT_NAMES) and full_grad.dtype == torch.float32
    assert torch.allclose(torch.cat(grads), full_grad, atol=1e-8)
    for k in STAT_NAMES:
        assert summed[k] == pytest.approx(full_stats[k].item(), rel=1e-5, abs=1e-5), k
    assert full_loss.item() == pytest.approx(full_stats["loss"].item(), rel=1e-6)
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, clip_low=0.2, clip_high=0.28, dual_clip=2.0,
                            kl_coef=0.1)
    assert_close_to_reference(full_grad, grad64, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _good():
    n = 6
    return dict(logprobs=torch.zeros(n), old_logprobs=torch.zeros(n), advantages=torch.zeros(n),
                mask=torch.ones(n, dtype=torch.bool), ref_logprobs=torch.zeros(n),
                seq_ids=torch.zeros(n, dtype=torch.long))


BAD_INPUTS = [
    (dict(old_logprobs=torch.zeros(5)), "old_logprobs"),
    (dict(logprobs=torch.zeros(6, dtype=torch.long)), "logprobs"),
    (dict(logprobs=torch.zeros(2, 3)), "logprobs"),
    (dict(advantages=torch.zeros(6, dtype=torch.int32)), "advantages"),
    (dict(ref_logprobs=torch.zeros(6, device="meta")), "ref_logprobs"),
    (dict(mask=torch.ones(7)), "mask"),
    (dict(seq_ids=torch.zeros(6), agg="seq-mean-token-mean"), "seq_ids"),
    (dict(seq_ids=None, agg="seq-mean-token-sum"), "seq_ids"),
    (dict(agg="token-sum"), "agg"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(agg="seq-mean-token-sum-norm"), "loss_scale"),
    (dict(loss_scale=0.0, agg="seq-mean-token-sum-norm"), "loss_scale"),
    (dict(loss_scale=4.0), "loss_scale"),
    (dict(clip_low=-0.1), "clip_low"),
    (dict(clip_high=float("nan")), "clip_high"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(kl_coef=-1.0), "kl_coef"),
    (dict(kl_coef=0.1, ref_logprobs=None), "ref_logprobs"),
    (dict(global_tokens=0), "global_tokens"),
    (dict(global_seqs=torch.ones(2), agg="seq-mean-token-sum"), "global_seqs"),
    (dict(advantages=torch.zeros(6, dtype=torch.complex64)), "advantages"),
]


def test_token_loss_terms_checks_weights():
    kw = _good()
    args = [kw.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    cfg = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_estimator="k3")
    for bad in (None, torch.ones(5), torch.ones(6, dtype=torch.long)):
        with pytest.raises(ValueError, match="weights"):
            token_loss_terms(*args, bad, **cfg)


@pytest.mark.parametrize("impl", ["reference", "triton", "auto"])
@pytest.mark.parametrize("bad,name", BAD_INPUTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_argument(impl, bad, name):
    kw = dict(_good(), **bad)
    args = [kw.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=name):
        policy_loss(*args, impl=impl, **kw)


def test_policy_loss_reference_validates_too():
    kw = _good()
    args = [kw.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss_reference(*args, dual_clip=0.5, **kw)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    """Dynamo traces the whole call without a graph break (the reference, or the custom op + fake)."""
    torch._dynamo.reset()
    b = make_batch(50, 4, seed=23)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b.items()}
    agg = "seq-mean-token-mean" if impl == "reference" else "token-mean"

    def step(logp):
        loss, metrics = policy_loss(logp, f32["old"], f32["adv"], b["mask"], ref_logprobs=f32["ref"],
                                    seq_ids=b["seq"], kl_coef=0.1, agg=agg, impl=impl)
        return loss, metrics["clip_frac_high"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    logp = f32["logp"].clone().requires_grad_(True)
    loss, _ = compiled(logp)
    loss.backward()
    loss64, grad64, _ = run("ref64", b, dtype=torch.float64, kl_coef=0.1, agg=agg)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5)
    assert_close_to_reference(logp.grad, grad64, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_float_mask_and_strided_inputs(impl):
    """N = 0; a 0/1 float (and int) mask == the bool mask; strided (non-contiguous) inputs."""
    empty = torch.zeros(0)
    loss, metrics = policy_loss(empty.clone().requires_grad_(True), empty, empty, empty.bool(), impl=impl)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())

    b = make_batch(2 * 71, 6, seed=31)
    want_loss, want_grad, want_metrics = run(impl, b, kl_coef=0.1, agg="seq-mean-token-mean")
    for mask in (b["mask"].double(), b["mask"].long()):
        loss, grad, metrics = run(impl, dict(b, mask=mask), kl_coef=0.1, agg="seq-mean-token-mean")
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
        assert all(torch.equal(metrics[k], want_metrics[k]) for k in metrics)

    wide = {k: torch.stack([v, torch.full_like(v, 7)], 1) for k, v in b.items()}  # [N, 2]
    strided = {k: v[:, 0] for k, v in wide.items()}
    assert not strided["logp"].is_contiguous()
    loss, grad, _ = run(impl, strided, kl_coef=0.1, agg="seq-mean-token-mean")
    assert torch.allclose(loss, want_loss) and torch.allclose(grad, want_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("agg", AGG_MODES)
def test_cuda_kernel_matches_float64_reference(agg):
    """On a GPU: the compiled Triton kernel at a size spanning many programs, vs float64 on the CPU."""
    b = make_batch(3 * 2**16 + 5, 200, seed=37)
    cuda = {k: v.cuda() for k, v in b.items()}
    for est, dual in (("k3", None), ("k3+", 3.0), ("k2", None)):
        cfg = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual, kl_coef=0.1, kl_estimator=est, **agg_kwargs(agg))
        loss, grad, metrics = run("auto", cuda, **cfg)
        loss64, grad64, metrics64 = run("ref64", b, dtype=torch.float64, **cfg)
        assert_close_to_reference(loss.cpu(), loss64, atol=1e-6, rtol=1e-4, name="loss")
        assert_close_to_reference(grad.cpu(), grad64, atol=1e-9, rtol=1e-4, name="grad")
        for k in metrics:
            assert_close_to_reference(metrics[k].cpu(), metrics64[k], atol=1e-6, rtol=1e-4, name=k)


@pytest.mark.gpu
def test_cuda_multi_tile_loop_matches_float64_and_is_bitwise_repeatable():
    """N = 2^22 + 77 tokens: every program of the persistent grid walks several tiles (the loop the
    sizes above never leave after one step); float64 reference on the GPU; two runs give the same
    bits; no host sync in the launch (torch.cuda.set_sync_debug_mode raises on one)."""
    from wz_kernels.policy_loss import _launch_config

    n = 2**22 + 77
    block, programs, _ = _launch_config(n, torch.device("cuda"))
    assert -(-n // block) >= 4 * programs, "the grid must loop: more tiles than programs"
    b = {k: v.cuda() for k, v in make_batch(n, 4096, seed=41).items()}
    cfg = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.1, "kl_estimator": "k3",
           "agg": "seq-mean-token-mean"}
    loss64, grad64, metrics64 = run("ref64", b, dtype=torch.float64, **cfg)
    results = []
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            results.append(run("auto", b, **cfg))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    (loss, grad, metrics), (loss2, grad2, metrics2) = results
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-4, name="loss")
    assert_close_to_reference(grad, grad64, atol=1e-12, rtol=1e-4, name="grad")
    for k in metrics:
        assert_close_to_reference(metrics[k], metrics64[k], atol=1e-6, rtol=1e-4, name=k)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert all(torch.equal(metrics[k], metrics2[k]) for k in metrics)
