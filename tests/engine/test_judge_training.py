"""Training the GenRM on preference pairs (judge.kind = "preference"): the reward rule by hand, the
"choice" verdict grammar, the trainer's judge prompts = the GenRM's own, rewards and metrics of a step
computed by hand, data formats and errors, config errors that name the fix."""

import json
import math
import re

import pytest
import torch

from wz_engine.algorithms import REWARD_SOURCES
from wz_engine.config import ConfigError, load_config
from wz_engine.data import DataError, Prompt
from wz_engine.judge.base import PairwiseRequest, Verdict
from wz_engine.judge.config import GenRMConfig
from wz_engine.judge.genrm import GenRM
from wz_engine.judge.parser import VerdictGrammar, final_line_instruction, parse_verdict
from wz_engine.judge.verifiable import load_preference_pairs, verdict_reward
from wz_engine.rollout.base import Completion

ROWS = [
    {"prompt": "p1", "chosen": "good one", "rejected": "bad one"},  # standard
    {"prompt": [{"role": "user", "content": "p2"}], "chosen": [{"role": "assistant", "content": "c2"}],
     "rejected": [{"role": "assistant", "content": "r2"}]},  # conversational
    {"chosen": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "c3"}],
     "rejected": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "r3"}]},  # implicit prompt
    {"prompt": "p4", "chosen": "c4", "rejected": "r4"},
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def preference_overrides(path, out, *extra):
    return [f'data.path="{path}"', f'train.output_dir="{out}"', 'judge.kind="preference"', 'algorithm.estimator="grpo"',
            'judge.genrm.template="tiny_pairwise"', 'judge.genrm.verdict_style="choice"', "judge.genrm.max_new_tokens=1",
            "rollout.max_new_tokens=1", ('model.tiny={vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, '
            'num_kv_heads=1, intermediate_size=64}'), "logging.progress_bar=false", "logging.tensorboard=false", *extra]


# -- the reward rule --------------------------------------------------------------------------
@pytest.mark.parametrize("scores,chosen_first,margin,penalty,expected", [
    ((7, 4), True, 1.0, 1.0, 1.0),     # chosen (A) ahead by 3
    ((7, 4), False, 1.0, 1.0, -1.0),   # chosen is B: the loser preferred
    ((4, 7), False, 3.0, 1.0, 1.0),    # exactly the margin counts
    ((4, 6), False, 3.0, 1.0, -1.0),   # right winner, gap below the margin
    ((5, 5), True, 0.5, 1.0, -1.0),    # a tie is never correct
    (None, True, 1.0, 2.5, -2.5),      # invalid: the format penalty
    (None, False, 1.0, 0.0, 0.0),
])
def test_verdict_reward_by_hand(scores, chosen_first, margin, penalty, expected):
    verdict = Verdict(*scores, True) if scores else Verdict(None, None, False, "gibberish")
    assert verdict_reward(verdict, chosen_first, margin, penalty) == expected


# -- the "choice" verdict grammar -----------------------------------------------------------
CHOICE = VerdictGrammar(style="choice", score_min=1, score_max=9)


@pytest.mark.parametrize("text,reason,scores", [
    ("A", "ok", (9.0, 1.0)), ("B", "ok", (1.0, 9.0)), (" b. \n", "ok", (1.0, 9.0)), ("**A**", "ok", (9.0, 1.0)),
    ("Thinking...\nB", "ok", (1.0, 9.0)), ("<think>A</think>\nB", "ok", (1.0, 9.0)),
    ("A\nB", "multiple_verdicts", None), ("B\nso there", "not_final", None), ("A is better", "malformed", None),
    ("C", "no_verdict", None), ("AB", "no_verdict", None), ("", "empty", None), ("Scores: A=9, B=1", "no_verdict", None),
])
def test_choice_grammar(text, reason, scores):
    parsed = parse_verdict(text, CHOICE)
    assert (parsed.reason, parsed.scores) == (reason, scores)


def test_choice_grammar_is_pairwise_only():
    assert parse_verdict(final_line_instruction(CHOICE), CHOICE).reason == "malformed"  # "A or B" is not a verdict
    with pytest.raises(ValueError, match="pairwise"):
        VerdictGrammar(n_scores=1, style="choice")
    with pytest.raises(ValueError, match='choice.*pointwise'):
        GenRMConfig(mode="pointwise", verdict_style="choice")


# -- data -------------------------------------------------------------------------------------
def test_pairs_load_in_every_accepted_shape(pairs_file):
    pairs = load_preference_pairs(str(pairs_file))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("p1", "good one", "bad one"), ("p2", "c2", "r2"), ("p3", "c3", "r3"), ("p4", "c4", "r4")]


def test_bad_pair_rows_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}:2: missing 'rejected'"):
        load_preference_pairs(str(f))
    f.write_text("")
    with pytest.raises(DataError, match="no prompts|no preference pairs"):
        load_preference_pairs(str(f))


def test_hf_dataset_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    rows = [ROWS[0], {"prompt": "p", "chosen": "c", "rejected": None}]  # one shape per dataset (arrow columns)
    datasets.Dataset.from_list(rows).to_json(str(d / "train.jsonl"))
    with pytest.raises(DataError, match=rf"dataset '{re.escape(str(d))}' split 'train' row 1: chosen and rejected must"):
        load_preference_pairs(f"hf:{d}")
    datasets.Dataset.from_list(ROWS[1:3]).to_json(str(d / "train.jsonl"))
    assert [(p.prompt, p.chosen) for p in load_preference_pairs(f"hf:{d}")] == [("p2", "c2"), ("p3", "c3")]


# -- the trainer's prompts are the GenRM's judge prompts ---------------------------------------
def test_trainer_prompts_are_the_genrm_prompts_in_both_orders(pairs_file, tmp_path):
    from wz_engine.trainer import Trainer

    cfg = load_config(None, preference_overrides(pairs_file, tmp_path / "run", "judge.preference.holdout=1",
                                                 'judge.genrm.system_prompt="Judge."', "train.steps=0"))
    trainer = Trainer(cfg)
    genrm = GenRM(None, trainer.tokenizer, cfg.judge.genrm)
    train = load_preference_pairs(str(pairs_file))[:3]
    assert [p.uid for p in trainer.train_prompts] == list(range(6)) and not trainer.holdout_prompts
    for prompt in trainer.train_prompts:
        pair = train[prompt.uid // 2]
        chosen_first = prompt.uid % 2 == 0
        a, b = (pair.chosen, pair.rejected) if chosen_first else (pair.rejected, pair.chosen)
        assert prompt.reference == ("A" if chosen_first else "B")
        text = genrm.prompt_texts([PairwiseRequest(pair.prompt, a, b)])[0]
        assert text.startswith("<|im_start|>system\nJudge.<|im_end|>") and f"A: {a}\nB: {b}\n" in text
        assert list(prompt.token_ids) == trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(trainer.rewarder.heldout) == 1 and trainer.rewarder.heldout[0].prompt == "p4"


# -- rewards and metrics of one step, by hand --------------------------------------------------
def test_rewards_and_metrics_by_hand(pairs_file, tmp_path):
    cfg = load_config(None, preference_overrides(pairs_file, tmp_path, "judge.preference.format_penalty=2.0"))
    source = REWARD_SOURCES.get("preference")
    built = source.build(type("Ctx", (), {"cfg": cfg, "lm": None, "tokenizer": None, "sampler": None})())
    prompts = [Prompt(0, "p0 chosen as A", (1,), "A"), Prompt(1, "p0 chosen as B", (1,), "B"),
               Prompt(2, "p1 chosen as A", (1,), "A")]
    texts = [["A", "B", "x", "A"],   # right, wrong, invalid, right
             ["B", "B", "A", "B"],   # right, right, wrong, right
             ["B", "B", "B", "B"]]   # wrong x 4
    groups = [[Completion([1], t, "length") for t in g] for g in texts]
    out = source.group_rewards(built, prompts, groups, step=1, cfg=cfg)
    expected = [1, -1, -2, 1, 1, 1, -1, 1, -1, -1, -1, -1]
    assert out.rewards.dtype == torch.float32 and out.rewards.tolist() == expected
    assert not out.is_reference.any()
    s = out.stats
    # 11 valid of 12; correct: 2 + 3 + 0 = 5 (of all 12 judgements); A wins 2 + 1 + 0 = 3 of 11 decisive
    assert s["judge/invalid_rate"] == pytest.approx(1 / 12)
    assert s["judge/accuracy"] == pytest.approx(5 / 12)
    assert s["judge/accuracy_chosen_first"] == pytest.approx(2 / 8)
    assert s["judge/accuracy_chosen_second"] == pytest.approx(3 / 4)
    assert s["judge/position_bias"] == pytest.approx(3 / 11)
    assert s["judge/tie_rate"] == 0.0
    # pair 0 has both orders: its valid verdicts name chosen, rejected, chosen | chosen x 3, rejected -> disagree;
    # pair 1 has one order only and does not count
    assert s["judge/order_agreement"] == 0.0
    assert not any(k.startswith("heldout/") for k in s)  # eval_every = 0


def test_metrics_keep_every_key_when_undefined(pairs_file, tmp_path):
    """Ranks average the judge stats key by key, so every step logs the same keys (NaN if undefined)."""
    cfg = load_config(None, preference_overrides(pairs_file, tmp_path))
    source = REWARD_SOURCES.get("preference")
    built = source.build(type("Ctx", (), {"cfg": cfg, "lm": None, "tokenizer": None, "sampler": None})())
    out = source.group_rewards(built, [Prompt(0, "p", (1,), "A")], [[Completion([1], "?", "length")] * 2], 0, cfg)
    assert out.rewards.tolist() == [-1.0, -1.0]
    assert out.stats["judge/invalid_rate"] == 1.0 and math.isnan(out.stats["judge/position_bias"])
    assert set(out.stats) == {f"judge/{k}" for k in ("accuracy", "invalid_rate", "position_bias", "order_agreement",
                                                     "tie_rate", "accuracy_chosen_first", "accuracy_chosen_second")}


# -- config errors name the fix ---------------------------------------------------------------
@pytest.mark.parametrize("extra,match", [
    (['algorithm.estimator="brpo"'], (r"estimator 'brpo' needs a pairwise judge .* got 'preference', whose rewards "
                                     r"are pointwise: keep it and set algorithm.estimator to one of \[.*'grpo'")),
    (['data.path="demo"'], "data.path: .* preference pairs"),
    (["data.holdout=2"], "judge.preference.holdout"),
    (['data.system_prompt="x"'], "judge.genrm.system_prompt"),
    (['judge.genrm.weight_sharing="checkpoint"', 'judge.genrm.checkpoint_path="/x"'], "policy itself"),
    (['judge.genrm.mode="pointwise"', 'judge.genrm.verdict_style="scores"'], "judge.genrm.mode"),
    (["judge.preference.eval_every=5"], "held-out split"),
    (["judge.preference.margin=0"], "judge.preference: margin must be > 0"),
    (["judge.preference.format_penalty=-1"], "format_penalty must be >= 0"),
    (["judge.preference.holdout=1", 'judge.preference.eval_data="x.jsonl"'], "set one of them"),
    (["judge.preference.marign=1"], "did you mean 'judge.preference.margin'"),
])
def test_config_errors(pairs_file, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, preference_overrides(pairs_file, tmp_path, *extra))


def test_wz_config_check_counts_the_judge_prompts(pairs_file, tmp_path, capsys):
    from wz_engine.cli import main

    run = tmp_path / "run.toml"
    run.write_text("")
    args = ["config", "check", str(run)] + [x for o in preference_overrides(pairs_file, tmp_path) for x in ("--set", o)]
    assert main(args) == 0
    assert "(8 prompts in" in capsys.readouterr().out  # 4 pairs x 2 orders


def test_reference_mode_needs_a_reference_in_every_pair(pairs_file, tmp_path):
    from wz_engine.algorithms.reward_source import load_prompt_rows

    cfg = load_config(None, preference_overrides(pairs_file, tmp_path, 'judge.genrm.mode="reference"',
                                                 'judge.genrm.template="reference_pairwise"'))
    with pytest.raises(DataError, match="preference pair 0: request.reference: required in reference mode"):
        load_prompt_rows(cfg)
    f = tmp_path / "with_refs.jsonl"
    f.write_text("".join(json.dumps({**r, "reference": f"gold {i}"}) + "\n" for i, r in enumerate(ROWS)))
    rows = load_prompt_rows(load_config(None, preference_overrides(f, tmp_path, 'judge.genrm.mode="reference"',
                                                                   'judge.genrm.template="reference_pairwise"')))
    assert len(rows) == 8 and "gold 3" in rows[7]["prompt"] and [r["reference"] for r in rows[:2]] == ["A", "B"]


def test_holdout_leaving_nothing_is_a_data_error(pairs_file, tmp_path):
    from wz_engine.algorithms.reward_source import load_prompt_rows

    cfg = load_config(None, preference_overrides(pairs_file, tmp_path, "judge.preference.holdout=4"))
    with pytest.raises(DataError, match="holdout = 4 leaves no training pairs"):
        load_prompt_rows(cfg)
