"""The trainer running BRPO with the GenRM, chosen by config, for two steps on CPU.

Step 1 judges with the GenRM on the policy's own weights (`weight_sharing = "self"`): a random tiny
model writes gibberish, so every verdict is invalid and every reward is 0 (no signal, no crash).
Step 2 swaps in a GenRM on a scripted engine that prefers the longer response, so real +1/-1
rewards flow through the same trainer step and move the weights.
"""

from pathlib import Path

import torch

from wz_engine.config import load_config
from wz_engine.judge import GenRM
from wz_engine.judge.scripted import ScriptedSampler
from wz_engine.trainer import Trainer

TINY = Path(__file__).with_name("tiny_run.toml")


def test_brpo_with_genrm_two_steps(tmp_path):
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=2", 'judge.kind="genrm"',
                             "judge.genrm.max_new_tokens=4", "judge.genrm.temperature=1.0",
                             "rollout.prompts_per_step=2", "rollout.group_size=3",
                             "model.tiny.full_byte_alphabet=true",
                             "algorithm.skew_threshold=1.0"])  # the judge prompt must survive tokenization
    trainer = Trainer(cfg)
    assert isinstance(trainer.rewarder, GenRM) and trainer.rewarder.sampler.model is trainer.sampler.model  # the live policy module

    m1 = trainer.step()
    judge = trainer.rewarder
    # 2 prompts x 2 challengers x 2 orders, in one generate call
    assert judge.last_stats.requests == 8 and judge.last_stats.generate_calls == 1
    assert m1["judge/invalid_rate"] == 1.0

    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    def longer_wins(prompt, j):  # content-based, so both orders agree: +1 / -1 rewards
        a, rest = prompt.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)
        b = rest.split("\n\nWork in this order", 1)[0]
        score = lambda text: 5 + (len(text) > min(len(a), len(b))) - (len(text) < max(len(a), len(b)))  # noqa: E731
        return f"Principles...\nScores: A={score(a)}, B={score(b)}"

    trainer.rewarder = GenRM(ScriptedSampler(trainer.tokenizer, longer_wins), trainer.tokenizer, cfg.judge.genrm)
    m2 = trainer.step()
    assert m2["judge/invalid_rate"] == 0.0 and trainer.rewarder.last_stats.requests == 8
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
