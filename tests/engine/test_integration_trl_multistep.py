"""WZGRPOTrainer against the installed TRL over whole training runs with several optimizer steps per
generation: `steps_per_generation` > gradient_accumulation_steps and `num_iterations` > 1, where TRL keeps
the generated batch, computes old log-probs and the later steps are off-policy (the ratio moves, clipping
bites). Both trainers start from the same saved weights and seed; every optimizer step's gradients (taken
just before the optimizer step, gradient clipping off) and logged losses and clip fractions must agree."""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from transformers import TrainerCallback
from trl import GRPOTrainer

from tests.engine.test_integration_trl import make_trainer, model_dir  # noqa: F401 (fixture)
from wz_engine.integrations.trl import WZGRPOTrainer

PROMPTS = ["write a poem", "tell a story", "the cat sat", "numbers one two", "a small model", "once upon",
           "short poems", "there was"]


class GradientRecorder(TrainerCallback):
    """Copies every parameter's gradient at each optimizer step (before the step)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def train(cls, path, out_dir, **config):
    recorder = GradientRecorder()
    # SGD, not Adam: Adam's first steps move every weight by ~lr * sign(grad), so a gradient element that is
    # rounding noise in both runs (cancellation) would move the two models apart by 2 lr
    trainer = make_trainer(cls, path, out_dir, prompts=PROMPTS, callbacks=[recorder], max_grad_norm=0.0,
                           optim="sgd", learning_rate=0.5, **config)
    trainer.train()
    history = trainer.state.log_history
    keys = ("loss", "clip_ratio/region_mean", "cispo_clip_ratio", "vespo/phi_seq_mean", "entropy", "kl")
    logged = {k: [h[k] for h in history if k in h] for k in keys}
    return recorder.steps, logged


SCHEDULES = {  # 4 prompts x 2 generations per micro-batch, gradient_accumulation_steps = 2
    "steps_per_generation=4": {"steps_per_generation": 4, "num_iterations": 1, "max_steps": 3},
    "num_iterations=2": {"steps_per_generation": 2, "num_iterations": 2, "max_steps": 3},
}
OBJECTIVES = {
    "dapo-token": {"loss_type": "dapo", "epsilon": 0.02, "epsilon_high": 0.03},
    "grpo-sequence-beta": {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04,
                           "epsilon": 0.01, "epsilon_high": 0.01},
    "cispo-token": {"loss_type": "cispo", "epsilon_high": 1.01},
    "sapo-sequence-beta": {"loss_type": "sapo", "importance_sampling_level": "sequence", "beta": 0.04,
                           "use_bias_correction_kl": True, "sapo_temperature_pos": 2.0},
    "vespo-token": {"loss_type": "vespo", "vespo_lambda_pos": 1.5, "off_policy_mask_threshold": 0.001},
}


RUNS = [("steps_per_generation=4", "dapo-token"), ("steps_per_generation=4", "grpo-sequence-beta"),
        ("num_iterations=2", "grpo-sequence-beta"), ("num_iterations=2", "cispo-token"),
        ("num_iterations=2", "sapo-sequence-beta"), ("steps_per_generation=4", "vespo-token")]


@pytest.mark.parametrize("schedule,objective", RUNS, ids=[f"{s}-{o}" for s, o in RUNS])
def test_training_run_matches_trl_step_by_step(model_dir, tmp_path, schedule, objective):  # noqa: F811
    config = {**SCHEDULES[schedule], **OBJECTIVES[objective]}
    want_grads, want_logs = train(GRPOTrainer, model_dir, tmp_path / "stock", **config)
    got_grads, got_logs = train(WZGRPOTrainer, model_dir, tmp_path / "ours", **config)
    assert len(want_grads) == len(got_grads) == config["max_steps"]
    for step, (want, got) in enumerate(zip(want_grads, got_grads)):
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7,
                                       msg=lambda m, step=step, name=name: f"step {step}: {name}: {m}")
    assert len(want_logs["loss"]) == config["max_steps"]
    for key, want in want_logs.items():
        assert got_logs[key] == pytest.approx(want, rel=1e-4, abs=1e-7), key
    # the later steps really are off-policy: clipping (cispo: the cap) is active at some step, vespo's weight
    # leaves 1 (sapo logs nothing of its ratio; its gate's gradient differs from 1's off-policy)
    if config["loss_type"] == "vespo":
        assert max(abs(phi - 1) for phi in want_logs["vespo/phi_seq_mean"]) > 1e-4, want_logs
    elif config["loss_type"] != "sapo":
        clip_key = "cispo_clip_ratio" if config["loss_type"] == "cispo" else "clip_ratio/region_mean"
        assert max(want_logs[clip_key]) > 0
