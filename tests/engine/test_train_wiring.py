"""Integration wiring between the trainer and the parts built separately (vLLM sampler, GenRM config,
judge metrics, LoRA-judge export).

vLLM cannot run here: the trainer's vLLM calls are exercised against the STAND-IN engine of
tests/engine/test_vllm_sampler.py (the real `VLLMSampler` adapter over a fake `vllm.LLM` with the same
API surface), built with the tiny policy's own HF parameter names so that a sync from the wrong module
(the FusedHeadCausalLM wrapper's "model."-prefixed names) fails with a KeyError, as in vLLM.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import wz_engine.export as export_mod
import wz_engine.trainer as train_mod
from tests.engine.test_vllm_sampler import StandInLLM, StandInLoRARequest, StandInModel, StandInSamplingParams
from wz_engine.build import HF_CONFIG_DIR, TOKENIZER_DIR
from wz_engine.config import ConfigError, load_config
from wz_engine.judge.base import PairwiseRequest, Verdict
from wz_engine.modeling import FusedHeadCausalLM
from wz_engine.rewards.brpo import assemble_brpo_rewards
from wz_engine.rollout.vllm import VLLMApi, VLLMSampler
from wz_engine.update import apply_rollout_correction, pack_for_update

TINY = Path(__file__).with_name("tiny_run.toml")
GENRM = ['judge.kind="genrm"']
VLLM = ['rollout.sampler="vllm"']


# ---------------------------------------------------------------------- config: one votes setting


@pytest.mark.parametrize("overrides, votes", [([], 1), (["algorithm.votes=3"], 3), (["judge.genrm.votes=3"], 3),
                                              (["algorithm.votes=2", "judge.genrm.votes=2"], 2)])
def test_votes_is_one_setting(overrides, votes):
    cfg = load_config(None, GENRM + overrides)
    assert cfg.algorithm.votes == cfg.judge.genrm.votes == votes


def test_votes_that_disagree_are_a_config_error():
    with pytest.raises(ConfigError, match=r"algorithm.votes = 3 and judge.genrm.votes = 2"):
        load_config(None, GENRM + ["algorithm.votes=3", "judge.genrm.votes=2"])
    # a non-GenRM judge has no GenRM votes to agree with
    assert load_config(None, ["algorithm.votes=3", "judge.genrm.votes=2"]).algorithm.votes == 3


# ---------------------------------------------------------------------- config: vLLM judge mode


@pytest.mark.parametrize("sharing, path_keys, mode, vllm_path", [
    ("self", [], "self", {}),
    ("lora", ['judge.genrm.lora_path="/ad"'], "lora", {"judge_lora_path": "/ad"}),
    ("checkpoint", ['judge.genrm.checkpoint_path="/ck"'], "swap", {"judge_checkpoint": "/ck"}),
])
def test_vllm_judge_mode_is_derived_from_weight_sharing(sharing, path_keys, mode, vllm_path):
    cfg = load_config(None, GENRM + VLLM + [f'judge.genrm.weight_sharing="{sharing}"'] + path_keys)
    v = cfg.rollout.vllm
    assert v.judge_mode == mode
    assert {k: getattr(v, k) for k in ("judge_lora_path", "judge_checkpoint") if getattr(v, k)} == vllm_path
    # the same explicit settings, agreeing, are accepted
    agreeing = [f'rollout.vllm.judge_mode="{mode}"'] + [f'rollout.vllm.{k}="{p}"' for k, p in vllm_path.items()]
    assert load_config(None, GENRM + VLLM + [f'judge.genrm.weight_sharing="{sharing}"'] + path_keys
                       + agreeing).rollout.vllm == v
    # the hf sampler keeps the vLLM section as written
    assert load_config(None, GENRM + [f'judge.genrm.weight_sharing="{sharing}"'] + path_keys).rollout.vllm.judge_mode \
        == "self"


@pytest.mark.parametrize("overrides, names", [
    (['rollout.vllm.judge_mode="lora"', 'rollout.vllm.judge_lora_path="/ad"'],
     ("rollout.vllm.judge_mode = 'lora'", "judge.genrm.weight_sharing = 'self'")),
    (['judge.genrm.weight_sharing="checkpoint"', 'judge.genrm.checkpoint_path="/ck"',
      'rollout.vllm.judge_mode="lora"', 'rollout.vllm.judge_lora_path="/ad"'],
     ("rollout.vllm.judge_mode = 'lora'", "judge.genrm.weight_sharing = 'checkpoint'")),
    (['judge.genrm.weight_sharing="lora"', 'judge.genrm.lora_path="/ad"', 'rollout.vllm.judge_lora_path="/other"'],
     ("rollout.vllm.judge_lora_path = '/other'", "judge.genrm.lora_path = '/ad'")),
    (['judge.genrm.weight_sharing="lora"', 'judge.genrm.lora_path="/ad"', 'rollout.vllm.judge_checkpoint="/ck"'],
     ("rollout.vllm.judge_checkpoint = '/ck'", "judge.genrm.weight_sharing = 'lora'")),
    (['judge.genrm.weight_sharing="checkpoint"', 'judge.genrm.checkpoint_path="/ck"',
      "rollout.vllm.enable_sleep_mode=false"], ("judge.genrm.weight_sharing = 'checkpoint'", "enable_sleep_mode")),
])
def test_contradictory_judge_settings_name_both_keys(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, GENRM + VLLM + overrides)
    assert all(n in str(e.value) for n in names), str(e.value)


# ---------------------------------------------------------------------- BRPO judge metrics


class TableJudge:
    """Verdicts from a table keyed by (response shown first, response shown second)."""

    def __init__(self, table):
        self.table = table

    def judge(self, requests: list[PairwiseRequest]) -> list[Verdict]:
        return [self.table[(r.response_a, r.response_b)] for r in requests]


def test_brpo_logs_order_agreement_and_mean_scores():
    v = lambda a, b: Verdict(float(a), float(b), True, "")  # noqa: E731
    # uid 0 draws the reference index below; the table covers every (challenger, reference) order.
    from wz_engine.rewards.brpo import draw_references

    ref = draw_references([0], 3, seed=0, step=0)[0]
    group = ["x", "y", "z"]
    others = [r for j, r in enumerate(group) if j != ref]
    R = group[ref]
    table = {(others[0], R): v(8, 2), (R, others[0]): v(1, 9),   # agrees: challenger 0 wins both orders
             (others[1], R): v(6, 4), (R, others[1]): v(7, 3)}   # disagrees: the first shown wins each time
    out = assemble_brpo_rewards(TableJudge(table), ["p"], [group], [0], step=0, seed=0)
    s = out.stats
    assert s["judge/order_agreement"] == 0.5
    assert s["judge/mean_score_a"] == (8 + 1 + 6 + 7) / 4 and s["judge/mean_score_b"] == (2 + 9 + 4 + 3) / 4
    assert s["judge/position_bias"] == 0.75 and s["judge/invalid_rate"] == 0.0  # kept keys
    assert s["judge/a_win_rate"] == 0.75 and s["judge/tie_rate"] == 0.0
    # all invalid: same keys, undefined ones NaN (every rank logs the same keys)
    bad = Verdict(None, None, False, "")
    out2 = assemble_brpo_rewards(TableJudge({k: bad for k in table}), ["p"], [group], [0], step=0, seed=0)
    assert set(out2.stats) == set(s)
    assert math.isnan(out2.stats["judge/order_agreement"]) and out2.stats["judge/invalid_rate"] == 1.0


# ---------------------------------------------------------------------- TIS max ratio


def test_rollout_correction_logs_the_max_ratio():
    g = torch.Generator().manual_seed(3)
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10, 11], [12]]
    ub = pack_for_update(prompts, responses, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, dtype=torch.bool), 6, 0)
    assert len(ub.batches) >= 2  # the max is taken across micro-batches
    old = [torch.randn(b.input_ids.numel(), generator=g) for b in ub.batches]
    engine = [torch.randn(len(r), generator=g) for r in responses]
    # independent reference: each scored position t of sequence s is response token number
    # (scored positions of s before t) in the packing, so its ratio is exp(old[t] - engine[s][that])
    ratios = []
    for b, o, mask in zip(ub.batches, old, ub.masks):
        seqs = b.token_sequence_index
        for t in torch.nonzero(mask).flatten().tolist():
            s = int(seqs[t])
            k = int((mask[:t] & (seqs[:t] == s)).sum())
            ratios.append(math.exp(float(o[t]) - float(engine[s][k])))
    assert len(ratios) == sum(len(r) for r in responses)
    m = apply_rollout_correction([ub], [old], [engine], cap=2.0)
    assert m["tis/max_ratio"] == pytest.approx(max(ratios), rel=1e-5)
    assert m["tis/frac_capped"] == pytest.approx(sum(r > 2.0 for r in ratios) / len(ratios))


# ---------------------------------------------------------------------- the trainer on the stand-in vLLM


def _standin_api(shapes: dict[str, tuple]) -> VLLMApi:
    class PolicyShapedLLM(StandInLLM):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            self.model = StandInModel(shapes, getattr(torch, self.kwargs["dtype"]))

    return VLLMApi(PolicyShapedLLM, StandInSamplingParams, StandInLoRARequest)


def _vllm_trainer(tmp_path, monkeypatch, *overrides):
    def build_sampler(cfg, policy, tokenizer, info):  # the real adapter, a stand-in engine
        shapes = {n: tuple(p.shape) for n, p in policy.model.named_parameters()}
        policy.model.save_pretrained(str(tmp_path / "hf"))  # the engine's model dir (and a swap judge)
        return VLLMSampler(cfg.rollout.vllm, str(tmp_path / "hf"), api=_standin_api(shapes), device="cpu")

    monkeypatch.setattr(train_mod, "build_sampler", build_sampler)
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=2", "rollout.prompts_per_step=2",
                             "rollout.group_size=2", "rollout.seed_per_prompt=false", 'rollout.sampler="vllm"',
                             "rollout.vllm.bucket_size_mb=1", "algorithm.skew_threshold=1.0", *overrides])
    return train_mod.Trainer(cfg)


def test_trainer_step_on_the_vllm_sampler(tmp_path, monkeypatch):
    trainer = _vllm_trainer(tmp_path, monkeypatch)
    llm = trainer.sampler.llm
    m = trainer.step()
    # rollouts asked for the engine's log-probs (TIS on by default) and carried the synced version
    assert all(sp.logprobs == 0 for _, params, _ in llm.generate_requests for sp in params)
    # the HF module was synced (vLLM names): the engine holds the trainer's weights after the step
    hf = trainer.hf_model()
    assert hf is trainer.policy.model and not isinstance(hf, FusedHeadCausalLM)
    assert all(torch.equal(llm.model.weights[n], p.detach().to(torch.bfloat16)) for n, p in hf.named_parameters())
    assert trainer.sampler.weight_version == 1
    for key in ("tis/mean_abs_logp_diff", "tis/frac_capped", "tis/max_ratio", "sync/seconds", "sync/gbps",
                "sync/bytes"):
        assert key in m and math.isfinite(m[key]), key
    assert m["tis/max_ratio"] >= math.exp(-m["tis/mean_abs_logp_diff"]) and m["sync/bytes"] > 0

    # a stale engine (completions of another weight version) is a clear error, not a silent off-policy step
    generate = trainer.sampler.generate
    monkeypatch.setattr(trainer.sampler, "generate", lambda ids, params: [
        [dataclasses.replace(c, weight_version=c.weight_version - 1) for c in g] for g in generate(ids, params)])
    with pytest.raises(RuntimeError, match="weight sync was skipped"):
        trainer.step()


def test_trainer_without_correction_asks_for_no_logprobs(tmp_path, monkeypatch):
    trainer = _vllm_trainer(tmp_path, monkeypatch, "rollout.vllm.is_correction=false")
    m = trainer.step()
    assert all(sp.logprobs is None for _, params, _ in trainer.sampler.llm.generate_requests for sp in params)
    assert not any(k.startswith("tis/") for k in m) and "sync/seconds" in m


def test_rollout_correction_over_mini_batches_equals_one_batch(tmp_path, monkeypatch):
    """TIS weighs each mini-batch's rollouts by their own engine log-probs: the step's monitors are those of
    the whole batch, whatever the partition (the old log-probs all come from the pre-update weights)."""
    whole = _vllm_trainer(tmp_path / "whole", monkeypatch).step()
    split = _vllm_trainer(tmp_path / "split", monkeypatch, "algorithm.ppo_mini_batch_size=1").step()
    assert split["train/optimizer_step"] == 2
    assert split["tis/frac_capped"] == whole["tis/frac_capped"]
    for key in ("tis/mean_abs_logp_diff", "tis/max_ratio"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key


def test_swap_judge_between_sampling_rounds_resyncs_the_policy(tmp_path, monkeypatch):
    """GenRM on the same engine in "swap" mode (from judge.genrm.weight_sharing = "checkpoint") with
    DAPO dynamic sampling: the judge replaces the policy in the engine after round 1's rollouts, so
    round 2 must push the policy again before sampling (the stand-in judge's verdicts are unparseable:
    every reward is 0, every group is dropped, and a second round is drawn)."""
    trainer = _vllm_trainer(tmp_path, monkeypatch, 'judge.kind="genrm"', 'judge.genrm.weight_sharing="checkpoint"',
                            f'judge.genrm.checkpoint_path="{tmp_path / "hf"}"', "judge.genrm.max_new_tokens=4",
                            "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2")
    assert trainer.cfg.rollout.vllm.judge_mode == "swap"
    m = trainer.step()
    assert m["sampling_rounds"] == 2 and m["judge/invalid_rate"] == 1.0
    assert trainer.sampler._judge.swaps == 2
    assert trainer.sampler.sync_count == 3  # initial, before round 2, after the update
    assert trainer.sampler.weight_version == 1 and trainer.sampler.serving == "policy"


# ---------------------------------------------------------------------- export with a LoRA judge injected


@pytest.mark.parametrize("tied", [False, True])  # Qwen2.5 <= 3B ties lm_head to the input embedding
def test_export_with_a_lora_judge_writes_the_policy_only(tmp_path, tied):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from wz_engine import checkpoint as ckpt
    from wz_engine.demo.tiny import build_tokenizer
    from wz_engine.judge.sharing import attach_lora_judge

    tok = build_tokenizer(["a story about the sea"] * 4, 300)
    torch.manual_seed(1)
    policy = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          tie_word_embeddings=tied, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, bos_token_id=None))
    expected = {k: v.clone() for k, v in policy.state_dict().items()}
    adapter = peft.get_peft_model(copy.deepcopy(policy), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    attach_lora_judge(policy, str(tmp_path / "adapter"))
    assert any(".base_layer." in k for k in policy.state_dict()) and any("lora_" in k for k in policy.state_dict())

    def check(export_dir):
        model = AutoModelForCausalLM.from_pretrained(export_dir)
        loaded = model.state_dict()
        assert set(loaded) == set(expected)
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    # in-process export (export_at_end path)
    export_mod.export_model(policy, tok, tmp_path / "export")
    check(tmp_path / "export")

    # `wz export`: a checkpoint written with the adapter injected, loaded into a plain model
    run = tmp_path / "run"
    wrapped = FusedHeadCausalLM(policy)
    path = ckpt.save_checkpoint(run, 1, wrapped, torch.optim.AdamW(wrapped.parameters()), {"step": 1}, {}, 0,
                                run_id="lora-run")
    tok.save_pretrained(str(run / TOKENIZER_DIR))
    policy.config.save_pretrained(str(run / HF_CONFIG_DIR))
    export_mod.export_run(run, tmp_path / "export2", path)
    check(tmp_path / "export2")
