"""The algorithm registries: names and module paths in the config, clear errors, a toy estimator and
a toy loss registered from outside the package training two CPU steps, and the TokenLoss path."""

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.engine.modeling_fsdp_worker import packed_batch, tiny_model
from wz_engine.algorithms import (
    ESTIMATORS,
    POLICY_LOSSES,
    REWARD_SOURCES,
    AdvantageInputs,
    RegistryError,
    TokenLoss,
)
from wz_engine.algorithms.estimator import Estimator
from wz_engine.config import AlgorithmConfig, ConfigError, load_config
from wz_engine.metrics import PhaseTimer
from wz_engine.modeling import FusedHeadCausalLM, PolicyLossBatch
from wz_engine.trainer import Trainer
from wz_kernels.policy_loss import policy_loss

TINY = Path(__file__).with_name("tiny_run.toml")
RULE = ['judge.kind="rule"', 'judge.callable="wz_engine.demo.judge:writing_reward"']

TOY = '''
"""A user's own estimator and loss, outside wz_engine."""
import torch

from wz_engine.algorithms import register_estimator, register_policy_loss

CALLS = []


@register_estimator("toy_rank")
def toy_estimator(inputs, cfg):
    """Centred rank of each reward inside its group, times algorithm.custom.scale."""
    out = torch.zeros_like(inputs.rewards)
    for g in inputs.group_ids.unique():
        rows = (inputs.group_ids == g).nonzero().flatten()
        ranks = inputs.rewards[rows].argsort(stable=True).argsort().float()
        out[rows] = (ranks - ranks.mean()) * cfg.custom["scale"]
    CALLS.append((inputs.rewards.clone(), inputs.group_ids.clone(), out.clone()))
    return out


@register_policy_loss("toy_reinforce", metrics=("toy_logp_mean",))
def toy_loss(logprobs, batch):
    """REINFORCE: sum of -A * logp over the loss tokens / the optimizer step's global token count."""
    m = batch.mask.float()
    loss = -(batch.advantages * logprobs * m).sum() / batch.options["global_tokens"]
    return loss, {"toy_logp_mean": (logprobs.detach() * m).sum() / m.sum().clamp_min(1)}
'''


@pytest.fixture(scope="module")
def toy_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_code")
    (root / "wz_toy_algorithms.py").write_text(textwrap.dedent(TOY))
    sys.path.insert(0, str(root))
    try:
        import wz_toy_algorithms

        yield wz_toy_algorithms
    finally:
        sys.path.remove(str(root))


def _response_logprobs(lm, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor(prompt + response, device=next(lm.parameters()).device)[None]
    logits = lm(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0]


def test_toy_estimator_and_loss_from_outside_train_two_steps(tmp_path, toy_module, monkeypatch):
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=2", *RULE,
                             'algorithm.estimator="wz_toy_algorithms:toy_estimator"',
                             'algorithm.policy_loss="wz_toy_algorithms:toy_loss"', "algorithm.custom.scale=0.5"])
    trainer = Trainer(cfg)
    assert trainer.estimator is ESTIMATORS.get("toy_rank") and trainer.loss_fn is POLICY_LOSSES.get("toy_reinforce")
    initial = copy.deepcopy(trainer.policy.model)
    collected = []
    real_collect = trainer.collect
    monkeypatch.setattr(trainer, "collect", lambda timer: collected.append(real_collect(timer)) or collected[-1])
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(toy_module.CALLS) == 2

    # the estimator's advantages are what the step trained on: centred group ranks x 0.5
    for (rewards, group_ids, adv), got in zip(toy_module.CALLS, collected):
        assert torch.equal(got.cat("adv"), adv)
        for g in group_ids.unique():
            rows_g = group_ids == g
            want = (rewards[rows_g].argsort(stable=True).argsort().float() - 1.5) * 0.5
            assert torch.equal(adv[rows_g], want)

    # step 1's loss and metric against plain torch on the initial weights (one optimizer step, on-policy)
    got = collected[0]
    adv = got.cat("adv")
    with torch.no_grad():
        lps = [_response_logprobs(initial, p, r) for p, r in zip(got.prompt_ids(), got.response_ids())]
    tokens = sum(len(lp) for lp in lps)
    want_loss = -sum(float(a) * float(lp.sum()) for a, lp in zip(adv, lps)) / tokens
    # (the centred ranks' terms partly cancel: the loss is small, but far above float32 rounding)
    assert abs(want_loss) > 1e-5 and rows[0]["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    assert rows[0]["toy_logp_mean"] == pytest.approx(float(torch.cat(lps).mean()), rel=1e-5)
    assert all(r["toy_logp_mean"] < 0 for r in rows) and "clip_frac_low" not in rows[0]
    changed = [not torch.equal(a, b) for a, b in zip(initial.parameters(), trainer.policy.model.parameters())]
    assert all(changed)


def test_token_loss_gets_the_fused_pass_logprobs():
    """A TokenLoss computing PPO-clip with the unfused `policy_loss` equals the fused ppo_clip kernel:
    loss, metrics and gradients, off-policy and on the on-policy fast path (with entropy)."""
    ids, pos, targets, _, _ = packed_batch()
    N = ids.shape[1]
    g = torch.Generator().manual_seed(5)
    options = {"agg": "seq-mean-token-mean", "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.1, "kl_estimator": "k3"}
    unfused = TokenLoss("unfused_ppo", ("clip_frac_high", "kl_mean"), None, lambda lp, b: policy_loss(
        lp, lp.detach() if b.old_logprobs is None else b.old_logprobs, b.advantages, b.mask,
        ref_logprobs=b.ref_logprobs, seq_ids=b.seq_ids, **b.options))
    for old in (-4.6 + 0.3 * torch.randn(N, generator=g), None):
        results = []
        for loss_fn in (None, unfused):
            model = tiny_model(tied=True)
            batch = PolicyLossBatch(old, torch.randn(N, generator=torch.Generator().manual_seed(6)),
                                    targets != -100, -4.6 + 0.2 * torch.randn(N, generator=torch.Generator().manual_seed(7)),
                                    torch.cumsum((pos[0] == 0).long(), 0), options, loss_fn)
            loss, metrics, entropy = FusedHeadCausalLM(model, chunk_size=5)(ids, pos, targets, policy_loss=batch,
                                                                            return_entropy=True)
            loss.backward()
            results.append((loss, metrics, entropy, {n: p.grad for n, p in model.named_parameters()}))
        (loss_a, m_a, ent_a, grads_a), (loss_b, m_b, ent_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ent_a, ent_b)
        for k in unfused.metrics:
            torch.testing.assert_close(m_a[k], m_b[k], msg=k)
        for n in grads_a:
            torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5, msg=n)


def test_reference_rows_stay_out_of_the_loss_unless_kept(tmp_path):
    trainer = Trainer(load_config(TINY, [f'train.output_dir="{tmp_path}"']))
    got = trainer.collect(PhaseTimer())
    is_ref = got.cat("is_ref").bool()
    assert int(is_ref.sum()) == len(got.groups)  # BRPO: one reference per group
    assert torch.equal(got.cat("in_loss").bool(), ~is_ref) and (got.cat("adv")[is_ref] == 0).all()
    trainer.cfg.algorithm.keep_reference = True
    _, in_loss, _ = trainer.advantages(got.prompts, got.groups, got.cat("rewards"), is_ref)
    assert in_loss.all()


@pytest.mark.parametrize("override, message", [
    ('algorithm.estimator="grp"', "algorithm.estimator: 'grp' is not one of ['brpo', "),
    ('algorithm.estimator="grp"', "did you mean 'grpo'?"),
    ('algorithm.policy_loss="ppo_clp"',
     "algorithm.policy_loss: 'ppo_clp' is not one of ['cispo', 'gspo', 'gspo_token', 'luspo', 'ppo_clip'"),
    ('algorithm.policy_loss="ppo_clp"', "did you mean 'ppo_clip'?"),
    ('judge.kind="genrn"', "did you mean 'genrm'?"),
    ('algorithm.estimator="no_such_pkg.mod:fn"', "algorithm.estimator: cannot import module 'no_such_pkg.mod'"),
    ('algorithm.policy_loss="wz_engine.demo.judge:nope"', "module 'wz_engine.demo.judge' has no attribute 'nope'"),
    ('algorithm.policy_loss="wz_engine.demo.judge:writing_reward"', "is not a PolicyLoss"),
    ('judge.kind="wz_engine.demo.judge:writing_judge"', "is not a RewardSource"),
    ('judge.kind="scalar_rm"', "judge.kind: estimator 'brpo' needs a pairwise judge (one of ['callable', 'genrm'])"),
    ('algorithm.estimator="rloo"', ("algorithm.estimator: a pairwise judge ('callable') pairs with a pairwise "
                                    "estimator (one of ['brpo']), got 'rloo'")),
    ('judge.callable="nocolon"', "judge.callable: expected an import path"),
])
def test_config_names_are_checked_against_the_registries(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_scalar_rm_needs_its_path_and_a_plain_function_is_a_pointwise_estimator():
    with pytest.raises(ConfigError, match="judge.scalar_rm_path: is required"):
        load_config(None, ['judge.kind="scalar_rm"', 'algorithm.estimator="grpo"'])
    cfg = load_config(None, [*RULE, 'algorithm.estimator="wz_engine.demo.judge:writing_reward"'])
    entry = ESTIMATORS.get(cfg.algorithm.estimator)
    assert isinstance(entry, Estimator) and not entry.pairwise


def test_registration_clashes_and_names():
    assert {"brpo", "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"} <= set(ESTIMATORS.names())
    assert "ppo_clip" in POLICY_LOSSES and {"callable", "genrm", "rule", "scalar_rm"} <= set(REWARD_SOURCES.names())
    with pytest.raises(RegistryError, match="estimator 'grpo' is already registered"):
        ESTIMATORS.register("grpo", Estimator("grpo", lambda inputs, cfg: inputs.rewards))
    with pytest.raises(RegistryError, match="hold no ':'"):
        ESTIMATORS.register("a:b", Estimator("a:b", lambda inputs, cfg: inputs.rewards))


@pytest.mark.parametrize("name, kernel", [("grpo", "group_advantages"), ("brpo", "brpo_advantages")])
def test_estimators_call_the_kernels_without_validation(monkeypatch, name, kernel):
    """The rewards are checked once on the host (Estimator.check_rewards): the kernel call must not
    validate again (on CUDA tensors that check is a device-to-host sync)."""
    import wz_kernels.advantage as adv_mod

    real, seen = getattr(adv_mod, kernel), []
    monkeypatch.setattr(adv_mod, kernel, lambda *a, **k: seen.append(k) or real(*a, **k))
    rewards = torch.tensor([1.0, -1.0, 0.0, 1.0])
    ESTIMATORS.get(name)(AdvantageInputs(rewards, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.bool),
                                         torch.ones(4, dtype=torch.long)), AlgorithmConfig())
    assert len(seen) == 1 and seen[0]["validate"] is False
