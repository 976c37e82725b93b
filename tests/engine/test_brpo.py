"""BRPO reward assembly and advantages, checked against hand-computed cases (DESIGN.md section 5)."""

import pytest
import torch

from wz_engine.algorithms import ESTIMATORS, AdvantageInputs
from wz_engine.config import AlgorithmConfig
from wz_engine.judge.base import Verdict
from wz_engine.rewards.brpo import assemble_brpo_rewards, draw_references


class QualityJudge:
    """Prefers the response with the higher quality; records every request."""

    def __init__(self, quality, invalid=()):
        self.quality, self.invalid, self.requests = quality, set(invalid), []

    def judge(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            if {r.response_a, r.response_b} & self.invalid:
                out.append(Verdict(None, None, False, raw="garbage"))
            else:
                out.append(Verdict(self.quality[r.response_a], self.quality[r.response_b], True))
        return out


class FirstWinsJudge:
    def judge(self, requests):
        return [Verdict(1.0, 0.0, True) for _ in requests]


class ScriptedJudge:
    """Returns the winners in `script` ("a"/"b"/"tie") in call order."""

    def __init__(self, script):
        self.script = list(script)

    def judge(self, requests):
        assert len(requests) == len(self.script)
        return [Verdict(*{"a": (1, 0), "b": (0, 1), "tie": (1, 1)}[w], True) for w in self.script]


G = 4
GROUP = ["w", "x", "y", "z"]


def _ref(step=0, uid=0, seed=0):
    return draw_references([uid], G, seed, step)[0]


def test_reference_draw_is_seeded_fresh_per_step_and_uniform():
    assert draw_references([3, 9], G, seed=1, step=5) == draw_references([3, 9], G, seed=1, step=5)
    draws = [draw_references([u], G, seed=0, step=s)[0] for s in range(100) for u in range(20)]
    counts = torch.bincount(torch.tensor(draws), minlength=G).float() / len(draws)
    assert counts.min() > 0.2 and counts.max() < 0.3
    assert len({draw_references([0], G, 0, s)[0] for s in range(20)}) > 1  # fresh every step


def test_win_loss_against_the_reference_and_both_orders():
    quality = {"w": 1.0, "x": 4.0, "y": 2.0, "z": 3.0}
    judge = QualityJudge(quality)
    out = assemble_brpo_rewards(judge, ["q"], [GROUP], [0], step=0, seed=0)
    ref = _ref()
    expected = [0.0 if i == ref else (1.0 if quality[t] > quality[GROUP[ref]] else -1.0) for i, t in enumerate(GROUP)]
    assert out.rewards.tolist() == expected
    assert out.is_reference.tolist() == [i == ref for i in range(G)]
    # 3 challengers x 2 orders x 1 vote; each pair appears once with the challenger first, once second.
    assert len(judge.requests) == 6
    firsts = [r.response_a for r in judge.requests]
    seconds = [r.response_b for r in judge.requests]
    assert firsts.count(GROUP[ref]) == 3 and seconds.count(GROUP[ref]) == 3
    assert out.stats["judge/invalid_rate"] == 0.0


def test_position_biased_judge_is_inconsistent_lose_by_default_tie_as_option():
    lose = assemble_brpo_rewards(FirstWinsJudge(), ["q"], [GROUP], [0], step=0, seed=0)
    tie = assemble_brpo_rewards(FirstWinsJudge(), ["q"], [GROUP], [0], step=0, seed=0, inconsistent="tie")
    ref = _ref()
    assert lose.rewards.tolist() == [0.0 if i == ref else -1.0 for i in range(G)]
    assert tie.rewards.tolist() == [0.0] * G
    assert lose.stats["judge/position_bias"] == 1.0
    assert lose.stats["judge/inconsistent_rate"] == 1.0


def test_votes_win_only_by_winning_every_condition():
    # Two challengers (G=3 with ref), votes=2: per challenger 2 orders x 2 votes = 4 verdicts.
    group = ["a0", "a1", "a2"]
    ref = draw_references([7], 3, 0, 0)[0]
    challengers = [i for i in range(3) if i != ref]
    # challenger 1: wins all four (order 0 -> "a" wins, order 1 -> "b" wins); challenger 2: loses one vote.
    script = ["a", "a", "b", "b"] + ["a", "a", "b", "a"]
    out = assemble_brpo_rewards(ScriptedJudge(script), ["q"], [group], [7], step=0, seed=0, votes=2)
    r = out.rewards.tolist()
    assert r[challengers[0]] == 1.0 and r[challengers[1]] == -1.0 and r[ref] == 0.0
    # losing every condition is -1 even with inconsistent="tie"; a tie anywhere is not a win.
    script = ["b", "b", "a", "a"] + ["a", "tie", "b", "b"]
    out = assemble_brpo_rewards(ScriptedJudge(script), ["q"], [group], [7], step=0, seed=0, votes=2,
                                inconsistent="tie")
    assert out.rewards[challengers[0]] == -1.0 and out.rewards[challengers[1]] == 0.0


def test_invalid_verdicts_give_zero_and_are_counted():
    quality = {"w": 1.0, "x": 4.0, "y": 2.0, "z": 3.0}
    ref = _ref()
    bad = next(t for i, t in enumerate(GROUP) if i != ref)
    out = assemble_brpo_rewards(QualityJudge(quality, invalid=[bad]), ["q"], [GROUP], [0], step=0, seed=0)
    assert out.rewards[GROUP.index(bad)] == 0.0
    assert out.stats["judge/invalid_rate"] == pytest.approx(2 / 6)
    everything_bad = assemble_brpo_rewards(QualityJudge(quality, invalid=[GROUP[ref]]), ["q"], [GROUP], [0],
                                           step=0, seed=0)
    assert everything_bad.rewards.tolist() == [0.0] * G
    assert everything_bad.stats["judge/invalid_rate"] == 1.0


class BehaviourJudge:
    """Verdicts scripted by the challenger's behaviour. It is told each prompt's reference (drawn for
    that prompt's uid alone) and records every request that does not pair a challenger with it."""

    WIN_A, WIN_B, TIE, INVALID = Verdict(8.0, 2.0, True), Verdict(2.0, 8.0, True), Verdict(5.0, 5.0, True), \
        Verdict(None, None, False, raw="garbage")

    def __init__(self, reference_of_prompt: dict, behaviour: dict):
        self.reference_of_prompt, self.behaviour = reference_of_prompt, behaviour
        self.calls = dict.fromkeys(behaviour, 0)  # verdicts asked per response
        self.wrong_pairs = []

    def judge(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, r):
        ref = self.reference_of_prompt[r.prompt]
        if ref not in (r.response_a, r.response_b) or r.response_a == r.response_b:
            self.wrong_pairs.append((r.prompt, r.response_a, r.response_b))
            return self.INVALID
        challenger_first = r.response_a != ref
        challenger = r.response_a if challenger_first else r.response_b
        n = self.calls[challenger]  # this challenger's n-th verdict (2 orders x votes in all)
        self.calls[challenger] += 1
        challenger_wins = self.WIN_A if challenger_first else self.WIN_B
        reference_wins = self.WIN_B if challenger_first else self.WIN_A
        kind = self.behaviour[challenger]
        if kind == "invalid" or (kind, n) in (("win_one_invalid", 2), ("lose_one_invalid", 0)):
            return self.INVALID
        if kind in ("win", "win_one_invalid"):
            return challenger_wins
        if kind in ("lose", "lose_one_invalid"):
            return reference_wins
        if kind == "biased":  # the first shown wins: the challenger wins one order, loses the other
            return self.WIN_A
        assert kind == "split"  # wins the first vote of each order, ties the second: valid, not a win
        return challenger_wins if n % 2 == 0 else self.TIE


# Several prompts, G = 5, votes = 2. The uids are chosen so that the references differ between prompts
# and none is row 0 of its group (asserted below): a reference flag without its group offset, or one
# reference reused for every prompt, then shows.
SEED, STEP, G5, VOTES = 0, 3, 5, 2
UIDS = [11, 5, 7]
BEHAVIOURS = [["win", "lose", "win_one_invalid", "biased"],
              ["lose_one_invalid", "win", "biased", "lose"],
              ["invalid", "split", "win", "lose"]]
# Hand-computed rewards per behaviour: +1 only on winning all 4 comparisons, -1 on losing all 4, 0 if ANY
# verdict is invalid, mixed results -1 ("lose") or 0 ("tie").
REWARD = {"lose": {"win": 1.0, "lose": -1.0, "win_one_invalid": 0.0, "lose_one_invalid": 0.0, "invalid": 0.0,
                   "biased": -1.0, "split": -1.0},
          "tie": {"win": 1.0, "lose": -1.0, "win_one_invalid": 0.0, "lose_one_invalid": 0.0, "invalid": 0.0,
                  "biased": 0.0, "split": 0.0}}


def _multi_prompt_case(order):
    """prompts / groups / uids in the given prompt order, the judge, and per uid: (reference index,
    expected rewards [G5] for each `inconsistent` mode)."""
    refs = {uid: draw_references([uid], G5, SEED, STEP)[0] for uid in UIDS}  # one prompt at a time
    assert len(set(refs.values())) == len(UIDS) and 0 not in refs.values()
    groups, behaviour, expected = {}, {}, {}
    for uid, kinds in zip(UIDS, BEHAVIOURS):
        groups[uid] = [f"prompt {uid} response {j}" for j in range(G5)]
        challengers = [j for j in range(G5) if j != refs[uid]]
        behaviour.update({groups[uid][j]: kind for j, kind in zip(challengers, kinds)})
        behaviour[groups[uid][refs[uid]]] = "reference"
        expected[uid] = {mode: [0.0 if j == refs[uid] else table[behaviour[groups[uid][j]]]
                                for j in range(G5)] for mode, table in REWARD.items()}
    judge = BehaviourJudge({f"prompt {uid}": groups[uid][refs[uid]] for uid in UIDS}, behaviour)
    uids = [UIDS[i] for i in order]
    return [f"prompt {u}" for u in uids], [groups[u] for u in uids], uids, judge, refs, expected


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
@pytest.mark.parametrize("inconsistent", ["lose", "tie"])
def test_several_prompts_votes_mixed_invalid_and_references_keyed_by_uid(order, inconsistent):
    prompts, groups, uids, judge, refs, expected = _multi_prompt_case(order)
    out = assemble_brpo_rewards(judge, prompts, groups, uids, step=STEP, seed=SEED, votes=VOTES,
                                inconsistent=inconsistent)
    assert judge.wrong_pairs == []  # every request paired a challenger with ITS prompt's reference
    # each challenger judged 2 orders x votes times, the references never as challengers
    assert {r: n for r, n in judge.calls.items() if judge.behaviour[r] != "reference"} == \
        {r: 2 * VOTES for r, kind in judge.behaviour.items() if kind != "reference"}
    rewards, is_ref = out.rewards.view(len(uids), G5), out.is_reference.view(len(uids), G5)
    for p, uid in enumerate(uids):  # row p*G + j is prompt p, sample j, wherever the prompt sits
        assert rewards[p].tolist() == expected[uid][inconsistent], (uid, p)
        assert is_ref[p].tolist() == [j == refs[uid] for j in range(G5)], (uid, p)
    n_verdicts = len(UIDS) * (G5 - 1) * 2 * VOTES
    assert out.stats["judge/num_verdicts"] == n_verdicts
    assert out.stats["judge/invalid_rate"] == pytest.approx((1 + 1 + 4) / n_verdicts)  # one, one, all four
    n_inconsistent = sum(kind in ("biased", "split") for kinds in BEHAVIOURS for kind in kinds)
    assert out.stats["judge/inconsistent_rate"] == pytest.approx(n_inconsistent / (len(UIDS) * (G5 - 1)))
    # order agreement per (prompt, challenger) pair: the all-invalid challenger has no valid verdict;
    # "biased" and "split" (a win and a tie) disagree; the rest agree (their valid verdicts name one winner)
    assert out.stats["judge/order_agreement"] == pytest.approx((3 + 3 + 2) / (4 + 4 + 3))


def test_one_invalid_verdict_among_valid_wins_or_losses_gives_zero():
    """A single invalid verdict voids the challenger: a row that would otherwise win (or lose) scores 0."""
    prompts, groups, uids, judge, _, _ = _multi_prompt_case((0, 1, 2))
    out = assemble_brpo_rewards(judge, prompts, groups, uids, step=STEP, seed=SEED, votes=VOTES)
    by_kind = {judge.behaviour[r]: float(out.rewards[p * G5 + j])
               for p, g in enumerate(groups) for j, r in enumerate(g)}
    assert by_kind["win_one_invalid"] == 0.0 and by_kind["lose_one_invalid"] == 0.0
    assert by_kind["win"] == 1.0 and by_kind["lose"] == -1.0


def _advantages(estimator, rewards, group_ids, skew_threshold=0.6):
    cfg = AlgorithmConfig(estimator=estimator, skew_threshold=skew_threshold)
    n = len(rewards)
    return ESTIMATORS.get(estimator)(AdvantageInputs(rewards, group_ids, torch.zeros(n, dtype=torch.bool),
                                                     torch.ones(n, dtype=torch.long)), cfg)


def test_skew_filter():
    # group 0: three wins of four rows -> |3|/4 = 0.75 > 0.6: dropped. group 1: +1 -1 +1 -> 1/4: kept.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 0.0, 1.0])
    group_ids = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9])
    adv = _advantages("brpo", rewards, group_ids, skew_threshold=0.6)
    assert adv.values.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0]
    assert adv.kept.tolist() == [False] * 4 + [True] * 4


def test_rewards_are_checked_on_the_host_before_the_kernel():
    g = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"estimator 'brpo': pairwise rewards must be -1, 0 or \+1; found \[0.5\]"):
        _advantages("brpo", torch.tensor([1.0, 0.5, -1.0, 0.0]), g)
    with pytest.raises(ValueError, match=r"estimator 'grpo': rewards must be finite; rows \[1\]"):
        _advantages("grpo", torch.tensor([1.0, float("nan"), 0.0, 2.0]), g)


def test_grpo_estimator_through_the_kernel():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    adv = _advantages("grpo", r, g).values
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    assert adv[3:].abs().max() < 1e-6


def test_callable_judge_by_import_path():
    from wz_engine.judge.programmatic import CallableJudge

    judge = CallableJudge.from_path("wz_engine.demo.judge:writing_judge")
    prompt = "Write a short poem about the sea."
    good, bad = "the blue wave and the salt shore with a boat", "zq zq zq"
    group = [good, bad, good + " tide", bad + " x"]
    out = assemble_brpo_rewards(judge, [prompt], [group], [3], step=2, seed=0)
    ref = draw_references([3], 4, 0, 2)[0]
    assert out.rewards[ref] == 0
    assert out.stats["judge/invalid_rate"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="votes"):
        assemble_brpo_rewards(FirstWinsJudge(), ["q"], [GROUP], [0], step=0, seed=0, votes=0)
    with pytest.raises(ValueError, match="responses"):
        assemble_brpo_rewards(FirstWinsJudge(), ["q"], [["only"]], [0], step=0, seed=0)
