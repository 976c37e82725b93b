"""The registered fused policy losses (ppo_clip with delta / top-entropy masking / the off-policy sequence
mask / the importance-weighted KL, gspo, gspo_token, luspo, cispo, sapo, vespo): the options each builds from the config, run through FusedHeadCausalLM on a packed batch, against
a float64 copy of the model (logits -> log_softmax) and the float64 policy-loss reference called with the
semantics each loss is documented to have (written out here, not taken from the entry); and each one
training end to end with several updates per rollout batch."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.engine.modeling_fsdp_worker import packed_batch, tiny_model
from wz_engine.algorithm_config import SAPOConfig, VESPOConfig
from wz_engine.algorithms import POLICY_LOSSES, TokenLoss
from wz_engine.config import AlgorithmConfig, ConfigError, load_config
from wz_engine.modeling import FusedHeadCausalLM, PolicyLossBatch
from wz_engine.trainer import Trainer
from wz_kernels.policy_loss import high_entropy_mask, off_policy_sequence_mask, policy_loss_reference

TINY = Path(__file__).with_name("tiny_run.toml")
# a loss of the log-probs only (never sees entropies): must refuse top_entropy_quantile
TOKEN_LOSS = TokenLoss("test_token_loss", fn=lambda logprobs, batch: (-(logprobs * batch.mask).sum(), {}))
T = 0.9
MAX_NEW_TOKENS = 8

CASES = [  # (loss, config, the documented semantics as policy_loss arguments, top-entropy quantile)
    ("ppo_clip", {"delta": 1.1, "clip_high": 0.28, "top_entropy_quantile": 0.5, "kl_coef": 0.05},
     {"delta": 1.1, "clip_high": 0.28, "kl_coef": 0.05}, 0.5),
    ("gspo", {"agg": "seq-mean-token-mean", "clip_low": 0.05, "clip_high": 0.08},
     {"importance_sampling_level": "sequence", "agg": "seq-mean-token-mean", "clip_low": 0.05,
      "clip_high": 0.08}, 1.0),
    ("gspo_token",
     {"clip_low": 0.05, "clip_high": 0.05, "dual_clip": 1.5, "kl_coef": 0.1, "kl_estimator": "k2"},
     {"importance_sampling_level": "sequence_token", "clip_low": 0.05, "clip_high": 0.05, "dual_clip": 1.5,
      "kl_coef": 0.1, "kl_estimator": "k2"}, 1.0),
    ("luspo", {"delta": 1.3, "top_entropy_quantile": 0.3},
     {"importance_sampling_level": "sequence", "agg": "seq-mean-token-sum", "delta": 1.3}, 0.3),
    ("cispo", {"clip_high": 0.1, "kl_coef": 0.05, "agg": "seq-mean-token-sum-norm"},
     {"loss_type": "cispo", "clip_high": 0.1, "kl_coef": 0.05, "agg": "seq-mean-token-sum-norm",
      "loss_scale": float(MAX_NEW_TOKENS)}, 1.0),
    ("sapo", {"sapo": SAPOConfig(0.8, 1.3), "kl_coef": 0.05, "kl_importance_weighted": True,
              "agg": "seq-mean-token-mean"},
     {"loss_type": "sapo", "sapo_temperatures": (0.8, 1.3), "kl_coef": 0.05, "kl_importance_weighted": True,
      "agg": "seq-mean-token-mean"}, 1.0),
    ("vespo", {"vespo": VESPOConfig(1.5, 2.0, 2.5, 1.0), "kl_coef": 0.05, "top_entropy_quantile": 0.6},
     {"loss_type": "vespo", "vespo_gamma": (1.5, 2.0, 2.5, 1.0), "kl_coef": 0.05}, 0.6),
    ("ppo_clip", {"off_policy_mask_threshold": -0.55, "kl_coef": 0.1, "kl_importance_weighted": True},
     {"kl_coef": 0.1, "kl_importance_weighted": True}, 1.0),
]
OPSM_THRESHOLD = -0.55  # this batch: of the two A < 0 sequences (mean KL -0.547, -0.555) one is dropped


def batch_inputs(ids, pos, targets, logp_init):
    g = torch.Generator().manual_seed(11)
    n = targets.numel()
    mask = (targets != -100) & (torch.rand(n, generator=g) > 0.15)
    seq_ids = torch.cumsum((pos[0] == 0).long(), 0)
    seq_adv = torch.randn(int(seq_ids.max()) + 1, generator=g)
    shift = 0.3 * torch.randn(int(seq_ids.max()) + 1, generator=g)  # per sequence: GSPO ratios move too
    old = (logp_init + 0.3 * torch.randn(n, generator=g) + shift[seq_ids]).float()
    ref = (logp_init + 0.4 * torch.randn(n, generator=g)).float()
    return mask, seq_ids, seq_adv[seq_ids], old, ref


def float64_logprobs(model64, ids, pos, targets):
    logits = model64(input_ids=ids, position_ids=pos, use_cache=False).logits[0] / T
    logp_all = torch.log_softmax(logits, -1)
    valid = targets != -100
    logp = torch.where(valid, logp_all.gather(1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, entropy


@pytest.mark.parametrize("name,config,semantics,top_q", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_registered_loss_matches_float64(name, config, semantics, top_q):
    ids, pos, targets, _, _ = packed_batch(lengths=(6, 1, 9, 5, 7))
    model = tiny_model(tied=False)
    model64 = tiny_model(tied=False).double()
    logp64, entropy64 = float64_logprobs(model64, ids, pos, targets)
    mask, seq_ids, adv, old, ref = batch_inputs(ids, pos, targets, logp64.detach())
    global_tokens, global_seqs = float(mask.sum()), float(seq_ids[mask].unique().numel())

    entry = POLICY_LOSSES.get(name)
    options = {**entry.options(AlgorithmConfig(policy_loss=name, **config), MAX_NEW_TOKENS),
               "global_tokens": global_tokens, "global_seqs": global_seqs}
    batch = PolicyLossBatch(old, adv, mask, ref, seq_ids, options, entry)
    lm = FusedHeadCausalLM(model, chunk_size=7)
    loss, metrics = lm(ids, pos, targets, temperature=T, policy_loss=batch)
    loss.backward()

    policy_mask = high_entropy_mask(entropy64.detach(), mask, top_q) if top_q < 1 else None
    if "off_policy_mask_threshold" in config:  # the sequences with A < 0 and mean(old - logp) > threshold
        policy_mask = off_policy_sequence_mask(adv, logp64, old, mask, seq_ids, OPSM_THRESHOLD)
        assert 0 < int(policy_mask[mask].sum()) < int(mask.sum())
    want, want_metrics = policy_loss_reference(
        logp64, old.double(), adv.double(), mask, ref_logprobs=ref.double(), seq_ids=seq_ids,
        global_tokens=global_tokens, global_seqs=global_seqs, policy_mask=policy_mask, upcast=True,
        **semantics)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for key in entry.metrics:
        assert metrics[key].item() == pytest.approx(want_metrics[key].item(), rel=1e-5, abs=1e-6), key
    params64 = dict(model64.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), params64[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
    assert metrics["ratio_mean"].item() != pytest.approx(1.0)  # off-policy: the ratio matters


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "luspo", "cispo", "sapo", "vespo"])
def test_trains_with_several_updates_per_rollout(tmp_path, name):
    """Two optimizer steps per rollout batch (the old-logprob pass runs, the ratio moves): finite losses,
    the loss's metrics logged, and the second update's ratio off 1."""
    extra = ["algorithm.clip_low=0.001", "algorithm.clip_high=0.001"] if name != "cispo" else [
        "algorithm.clip_high=0.001"]
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=1",
                             f'algorithm.policy_loss="{name}"', 'judge.kind="rule"',
                             'judge.callable="wz_engine.demo.judge:writing_reward"',
                             'algorithm.estimator="grpo"', "algorithm.ppo_epochs=2", *extra])
    Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    for key in POLICY_LOSSES.get(name).metrics:
        assert key in rows[-1], key
    if name in ("sapo", "vespo"):  # nothing clips: the second update's ratio is off 1
        assert rows[-1]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)
    else:
        assert rows[-1]["clip_frac_high"] > 0 or rows[-1].get("clip_frac_low", 0) > 0


@pytest.mark.parametrize("overrides,message", [
    (['algorithm.policy_loss="cispo"', "algorithm.delta=2.0"], "algorithm.delta: bounds the clipped PPO"),
    (['algorithm.policy_loss="cispo"', "algorithm.dual_clip=2.0"],
     "algorithm.dual_clip: bounds the clipped PPO"),
    (['algorithm.policy_loss="luspo"', 'algorithm.agg="seq-mean-token-mean"'],
     "aggregates with 'seq-mean-token-sum'"),
    (["algorithm.delta=0"], "algorithm.delta: must be > 0"),
    (['algorithm.policy_loss="sapo"', "algorithm.sapo.temperature_neg=0"],
     "algorithm.sapo.temperature_neg: must be a finite number > 0"),
    (['algorithm.policy_loss="sapo"', "algorithm.delta=2.0"], "algorithm.delta: bounds the clipped PPO"),
    (['algorithm.policy_loss="vespo"', "algorithm.vespo.lambda_pos=-1"],
     "algorithm.vespo.lambda_pos: must be a finite number > 0"),
    (['algorithm.policy_loss="vespo"', "algorithm.vespo.k_neg=nan"], "algorithm.vespo.k_neg: must be a finite"),
    (['algorithm.policy_loss="vespo"', "algorithm.kl_importance_weighted=true"],
     "algorithm.kl_importance_weighted: not defined for policy_loss 'vespo'"),
    (['algorithm.policy_loss="vespo"', 'rollout.sampler="vllm"'], "rollout.vllm.is_correction: policy_loss"),
    (["algorithm.off_policy_mask_threshold=inf"], "algorithm.off_policy_mask_threshold: must be None or a finite"),
    (['algorithm.policy_loss="tests.engine.test_policy_losses:TOKEN_LOSS"',
      "algorithm.off_policy_mask_threshold=0.5"], "algorithm.off_policy_mask_threshold: policy loss"),
    (['algorithm.policy_loss="tests.engine.test_policy_losses:TOKEN_LOSS"',
      "algorithm.kl_importance_weighted=true"], "algorithm.kl_importance_weighted: policy loss"),
    (["algorithm.top_entropy_quantile=1.5"], "algorithm.top_entropy_quantile: must be in [0, 1]"),
    (['algorithm.policy_loss="tests.engine.test_policy_losses:TOKEN_LOSS"',
      "algorithm.top_entropy_quantile=0.2"],
     "policy loss 'tests.engine.test_policy_losses:TOKEN_LOSS' does not apply"),
    (['algorithm.policy_loss="wz_engine.algorithms.losses.ppo_clip:PPO_CLIP"',
      "algorithm.top_entropy_quantile=0.2"], None),
])
def test_loss_config_errors(overrides, message):
    if message is None:  # a module path to a fused built-in takes the mask too
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
