"""Pointwise rewards (rule by import path, scalar reward model) and the DAPO helpers, by hand."""

import pytest
import torch

from wz_engine.rewards.dapo import informative_groups, overlong_penalty
from wz_engine.rewards.rules import RuleReward


def test_rule_reward_by_import_path():
    r = RuleReward("wz_engine.demo.judge:writing_reward")
    good, bad = r.score(["Write about the sea."] * 2, ["the blue wave and the salt shore with a boat", "zq"],
                        [None, None])
    assert 0 <= bad < good <= 1
    with pytest.raises(ValueError, match="no attribute"):
        RuleReward("wz_engine.demo.judge:nope")


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([0, 10, 12, 14, 16, 20])
    # max_new_tokens 16, buffer 4: free up to 12, then -penalty * (len - 12) / 4, capped at -penalty.
    got = overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0, -1.0]))
    assert overlong_penalty(lengths, 16, 0, 1.0).abs().sum() == 0


def test_informative_groups():
    adv = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0])
    gid = torch.tensor([3, 3, 3, 8, 8, 8, 5, 5])
    assert informative_groups(adv, gid).tolist() == [False] * 3 + [True] * 3 + [False] * 2


def test_scalar_reward_model_scores_with_its_chat_template(tmp_path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from wz_engine.demo.tiny import build_tokenizer
    from wz_engine.rewards.scalar_rm import ScalarRewardModel

    tok = build_tokenizer(["a story about the sea and the river"] * 4, vocab_size=300)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(cfg).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    rm = ScalarRewardModel(str(tmp_path), batch_size=2)
    prompts, responses = ["the sea", "a river", "story"], ["a long story about the sea", "river", "sea sea"]
    scores = rm.score(prompts, responses)
    for p, r, s in zip(prompts, responses, scores):  # one at a time, no padding: the same score
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected = rm.model(**ids).logits[0, 0].item()
        assert s == pytest.approx(expected, abs=1e-5)
