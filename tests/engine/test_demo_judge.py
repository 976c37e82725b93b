"""The demo's judge and evaluation by hand: on topic is decisive and measurable (a fixed text that names
every topic does not pass), padding with punctuation does not pay, and the evaluation's rates are the
shares they claim to be."""

import pytest

from wz_engine.demo.evaluate import policy_stats, win_rate
from wz_engine.demo.judge import LEXICONS, TOPICS, is_on_topic, topic_counts, writing_judge, writing_score
from wz_engine.judge.programmatic import CallableJudge
from wz_engine.rollout.base import Completion

SEA = "Write a short poem about the sea."
FOREST = "Describe the forest in a few words."


def test_topic_counts_by_hand():
    assert topic_counts(SEA, ["the", "wave", "wave", "tide", "tree", "salt"]) == (4, 3, 1)
    assert topic_counts("Write about nothing.", ["wave", "tree"]) == (0, 0, 2)  # no topic: every lexicon word is off


def test_lexicons_are_disjoint():
    """Every topic word belongs to one topic, so "on topic" never depends on which topic a word is counted for."""
    words = [w for lexicon in LEXICONS.values() for w in lexicon]
    assert len(words) == len(set(words))


@pytest.mark.parametrize("response, points", [
    ("the blue wave on the shore", 6 * 1 * 1),  # 2 distinct sea words, nothing else
    ("the blue wave", 6 * 1 * 1),
    ("the wave", 6 * 0.5 * 1),  # one distinct sea word: half the recall
    ("the blue wave by the tree", 6 * 1 * (2 - 1) / 3),  # purity (2 - 1) / 3
    ("the wave and the tree", 0.0),  # as many other-topic words as sea words: no topic points
    ("the soft old", 0.0),
])
def test_topic_points_by_hand(response, points):
    """writing_score minus the surface points (real words, length, variety computed by hand) = topic points."""
    words = response.split()
    surface = 2 * 1 + (1 if 4 <= len(words) <= 10 else len(words) / 4) + len(set(words)) / len(words)
    assert writing_score(SEA, response) - surface == pytest.approx(points)


@pytest.mark.parametrize("response, on_topic", [
    ("the blue wave on the shore", True),
    ("the wave and the tree", False),  # as many off-topic words as on-topic ones
    ("the soft old light", False),  # light is a city word
    ("the old and the slow", False),  # no topic word at all
    ("sea", True),
])
def test_is_on_topic(response, on_topic):
    assert is_on_topic(SEA, response) is on_topic


def test_on_topic_decides_and_the_same_answer_everywhere_does_not_pay():
    every_topic = " ".join(ws[0] for ws in TOPICS.values())  # one word of each topic, the same for any prompt
    sea_text, forest_text = "the blue wave on the shore", "the green tree in the shade"
    for prompt, right, wrong in ((SEA, sea_text, forest_text), (FOREST, forest_text, sea_text)):
        s_right, s_wrong = writing_judge(prompt, right, wrong)
        assert s_right > s_wrong + 4  # the same surface quality: the topic alone decides, by far
        assert writing_score(prompt, right) > writing_score(prompt, every_topic) + 4
        assert not is_on_topic(prompt, every_topic)


def test_verdicts_are_whole_points():
    """Like a generative judge's "Scores: A=7, B=4": rounded half up, so a small surface difference ties."""
    a, b = "the blue wave on the shore", "the blue wave on the shore shore"  # one repeated word
    assert writing_score(SEA, a) != writing_score(SEA, b)
    sa, sb = writing_judge(SEA, a, b)
    assert (sa, sb) == (10, 10) and all(isinstance(x, int) for x in (sa, sb))
    assert writing_score(SEA, "the wave") == 6.5 and writing_judge(SEA, "the wave", "") == (7, 0)  # half up


def test_punctuation_padding_and_gibberish_cost():
    clean = writing_score(SEA, "the wave. the tide")
    assert writing_score(SEA, "the wave.... the tide") < clean
    assert writing_score(SEA, "the wave #~ the tide") < clean
    assert writing_score(SEA, "") == 0.0
    assert 0 <= writing_score(SEA, "zq") < writing_score(SEA, "the old") <= 10


def test_length_prefers_four_to_ten_words():
    words = sorted(LEXICONS["sea"])
    scores = {n: writing_score(SEA, " ".join((words * 5)[:n])) for n in (2, 4, 7, 10, 16)}
    assert scores[2] < scores[4] and scores[16] < scores[10]


def _c(text, reason="stop", n_tokens=3):
    return Completion(list(range(n_tokens)), text, reason)


class _Prompt:
    def __init__(self, text):
        self.text = text


def test_policy_stats_by_hand():
    prompts = [_Prompt(SEA), _Prompt(FOREST)]
    sampled = [[_c("the wave", "stop", 3), _c("the tree", "length", 5)],
               [_c("green moss", "length", 5), _c("the moss and the tree", "stop", 7)]]
    greedy = [[_c("the wave", n_tokens=2)], [_c("the wave", n_tokens=2)]]
    s = policy_stats(prompts, sampled, greedy, is_on_topic)
    assert s.on_topic_rate == 3 / 4 and s.truncation_rate == 2 / 4 and s.length_mean == 5.0
    assert s.distinct_greedy == 1  # the same tokens for both prompts


def test_win_rate_counts_both_orders():
    judge = CallableJudge.from_path("wz_engine.demo.judge:writing_judge")
    prompts = [_Prompt(SEA), _Prompt(FOREST)]
    trained = [[_c("the blue wave on the shore")], [_c("the same")]]
    initial = [[_c("the old tree")], [_c("the same")]]
    w = win_rate(prompts, trained, initial, judge)
    assert (w.wins, w.ties, w.losses, w.comparisons) == (2, 2, 0, 4) and w.win_rate == 0.75
