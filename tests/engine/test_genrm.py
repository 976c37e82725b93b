"""GenRM with a scripted engine: exact verdicts, orders, votes, ties, invalid paths, modes, batching."""

import re

import pytest

from wz_engine.demo.tiny import build_tokenizer
from wz_engine.judge import (
    Comparison,
    GenRM,
    GenRMConfig,
    PairwiseJudge,
    PairwiseRequest,
    judge_metrics,
)
from wz_engine.judge.metrics import JudgementRecord
from wz_engine.judge.scripted import ScriptedSampler
from wz_engine.judge.templates import render_template, template_path

GOOD, BAD, REF = "A vivid, well-built story.", "meh story", "The gold answer."
QUALITY = {GOOD: 8, BAD: 3, REF: 10}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Scores: A=7, B=4. A vivid, well-built story. Response principles critique"] * 4, 400)


def shown(prompt: str) -> tuple[str, str]:
    """(response shown as A, response shown as B) in a rendered pairwise judge prompt."""
    a = re.search(r"\[Response A\]\n(.*?)\n", prompt).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n", prompt).group(1)
    return a, b


def content_judge(prompt, j):
    a, b = shown(prompt)
    return f"<think>hmm</think>\nPrinciples: ...\nScores: A={QUALITY[a]}, B={QUALITY[b]}"


def make(tokenizer, respond, **cfg):
    sampler = ScriptedSampler(tokenizer, respond)
    return GenRM(sampler, tokenizer, GenRMConfig(**cfg)), sampler


def test_is_a_pairwise_judge(tokenizer):
    genrm, _ = make(tokenizer, content_judge)
    assert isinstance(genrm, PairwiseJudge)


def test_good_wins_both_orders_in_one_generate_call(tokenizer):
    genrm, sampler = make(tokenizer, content_judge)
    [res] = genrm.compare([Comparison("Write a story.", GOOD, BAD)])
    assert res.outcome == "x"
    assert [j.order for j in res.judgements] == ["xy", "yx"]
    assert [(j.score_x, j.score_y, j.winner, j.valid, j.reason) for j in res.judgements] == [
        (8.0, 3.0, "x", True, "ok"),
        (8.0, 3.0, "x", True, "ok"),
    ]
    # raw verdicts are as the judge saw them: in the swapped order the good response is B
    assert (res.judgements[1].verdict.score_a, res.judgements[1].verdict.score_b) == (3.0, 8.0)
    assert "Scores: A=3, B=8" in res.judgements[1].raw
    assert len(sampler.calls) == 1 and sampler.calls[0][0] == 2


def test_position_judge_is_inconsistent(tokenizer):
    genrm, _ = make(tokenizer, lambda p, j: "Scores: A=7, B=3")
    [res] = genrm.compare([Comparison("q", GOOD, BAD)])
    assert [j.winner for j in res.judgements] == ["x", "y"]
    assert res.outcome == "inconsistent"


def test_invalid_in_one_order(tokenizer):
    def respond(prompt, j):
        a, _ = shown(prompt)
        return "Scores: A=9, B=1" if a == GOOD else "I cannot decide...\nScores: A="

    genrm, _ = make(tokenizer, respond)
    [res] = genrm.compare([Comparison("q", GOOD, BAD)])
    assert [(j.valid, j.reason) for j in res.judgements] == [(True, "ok"), (False, "malformed")]
    assert res.judgements[1].score_x is None and res.judgements[1].winner is None
    assert res.outcome == "invalid"


def test_ties_and_tie_policy(tokenizer):
    genrm, _ = make(tokenizer, lambda p, j: "Scores: A=5, B=5")
    [res] = genrm.compare([Comparison("q", GOOD, BAD)])
    assert res.outcome == "tie" and all(j.winner == "tie" for j in res.judgements)
    strict, _ = make(tokenizer, lambda p, j: "Scores: A=5, B=5", tie_policy="invalid")
    [res] = strict.compare([Comparison("q", GOOD, BAD)])
    assert res.outcome == "invalid" and {j.reason for j in res.judgements} == {"tie_not_allowed"}


def test_votes_batched_through_n(tokenizer):
    def respond(prompt, j):  # the third sample of every prompt flips to the bad response
        a, b = shown(prompt)
        sa, sb = QUALITY[a], QUALITY[b]
        return f"Scores: A={sb}, B={sa}" if j == 2 else f"Scores: A={sa}, B={sb}"

    genrm, sampler = make(tokenizer, respond, votes=3)
    results = genrm.compare([Comparison("q1", GOOD, BAD), Comparison("q2", BAD, GOOD)])
    assert len(sampler.calls) == 1
    n_prompts, params = sampler.calls[0]
    assert (n_prompts, params.n) == (4, 3)  # 2 comparisons x 2 orders, 3 samples each
    for res in results:
        assert [(j.order, j.vote) for j in res.judgements] == [(o, v) for o in ("xy", "yx") for v in range(3)]
        assert res.outcome == "inconsistent"
    unanimous, sampler = make(tokenizer, content_judge, votes=3)
    assert [r.outcome for r in unanimous.compare([Comparison("q1", GOOD, BAD), Comparison("q2", BAD, GOOD)])] == ["x", "y"]


def test_one_order_only(tokenizer):
    genrm, sampler = make(tokenizer, content_judge, both_orders=False, votes=2)
    [res] = genrm.compare([Comparison("q", BAD, GOOD)])
    assert [(j.order, j.winner) for j in res.judgements] == [("xy", "y"), ("xy", "y")]
    assert sampler.calls[0][0] == 1 and sampler.calls[0][1].n == 2


def test_judge_protocol_one_verdict_per_request_and_call_count(tokenizer):
    seen = []

    def respond(prompt, j):
        seen.append(j)
        return content_judge(prompt, j)

    genrm, sampler = make(tokenizer, respond, batch_size=2, temperature=0.3, max_new_tokens=77, seed=5)
    ab, ba, other = PairwiseRequest("q", GOOD, BAD), PairwiseRequest("q", BAD, GOOD), PairwiseRequest("r", GOOD, BAD)
    verdicts = genrm.judge([ab, ba, ab, ba, other])
    assert [(v.score_a, v.score_b, v.winner) for v in verdicts] == [
        (8, 3, "a"), (3, 8, "b"), (8, 3, "a"), (3, 8, "b"), (8, 3, "a")
    ]
    # duplicates get independent samples (n=2 on one prompt), the singleton goes in its own call
    assert sorted((k, p.n) for k, p in sampler.calls) == [(1, 1), (2, 2)]
    assert sorted(seen) == [0, 0, 0, 1, 1]
    params = sampler.calls[0][1]
    assert (params.temperature, params.max_new_tokens, params.seed) == (0.3, 77, 5)
    assert genrm.last_stats.generate_calls == 2 and genrm.last_stats.reasons == {"ok": 5}
    many = genrm.judge([PairwiseRequest(f"q{i}", GOOD, BAD) for i in range(5)])  # batch_size=2 -> 3 calls
    assert len(many) == 5 and genrm.last_stats.generate_calls == 3
    assert genrm.judge([]) == []


def test_prompt_too_long_is_invalid_without_generating(tokenizer):
    genrm, sampler = make(tokenizer, content_judge, max_prompt_tokens=10)
    [v] = genrm.judge([PairwiseRequest("q", GOOD, BAD)])
    assert not v.valid and v.score_a is None and sampler.calls == []
    assert genrm.last_stats.reasons == {"prompt_too_long": 1} and genrm.last_stats.skipped_too_long == 1


def test_chat_rendering(tokenizer):
    genrm, _ = make(tokenizer, content_judge, system_prompt="Be fair.")
    text = genrm._chat(genrm.render_message(PairwiseRequest("Write a poem.", GOOD, BAD)))
    assert text.startswith("<|im_start|>system\nBe fair.<|im_end|>\n<|im_start|>user\nYou are an expert judge")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "[Request]\nWrite a poem.\n" in text and f"[Response A]\n{GOOD}\n" in text
    assert "Scores: A=<score of Response A>, B=<score of Response B>" in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # the real tokenizer round-trips the rendered prompt


def test_templates_render_and_fail_loudly(tmp_path):
    for name in ("writing_pairwise", "reference_pairwise"):
        out = render_template(name, query="Q", response_a="RA", response_b="RB", reference="GOLD", final_line="FINAL")
        assert "RA" in out and "RB" in out and out.rstrip().endswith("FINAL")
        assert ("GOLD" in out) == (name == "reference_pairwise")
    assert "[Reference answer]" not in render_template("pointwise", query="Q", response="R", reference=None, final_line="F")
    with pytest.raises(ValueError, match="neither a file nor a bundled template"):
        template_path("no_such_template")
    custom = tmp_path / "mine.jinja"
    custom.write_text("Q={{ query }} A={{ response_a }} B={{ response_b }}\n{{ final_line }}")
    assert render_template(str(custom), query="q", response_a="a", response_b="b", final_line="f") == "Q=q A=a B=b\nf\n"
    import jinja2

    with pytest.raises(jinja2.UndefinedError):  # a template naming an unknown variable fails at once
        render_template(str(custom), query="q", response_a="a", final_line="f")


def test_boxed_style(tokenizer):
    def respond(prompt, j):
        a, b = shown(prompt)
        assert "\\boxed{<score of Response A>, <score of Response B>}" in prompt
        return f"Final answer: $\\boxed{{{QUALITY[a]}, {QUALITY[b]}}}$"

    genrm, _ = make(tokenizer, respond, verdict_style="boxed")
    assert genrm.compare([Comparison("q", GOOD, BAD)])[0].outcome == "x"


def test_reference_mode(tokenizer):
    def respond(prompt, j):  # closeness to the gold reference shown in the prompt
        ref = re.search(r"\[Reference answer\]\n(.*?)\n", prompt).group(1)
        a, b = shown(prompt)
        return f"Scores: A={10 if a == ref else 2}, B={10 if b == ref else 2}"

    genrm, _ = make(tokenizer, respond, mode="reference")
    [res] = genrm.compare([Comparison("q", BAD, GOOD, reference=GOOD)])
    assert res.outcome == "y"
    with pytest.raises(ValueError, match="reference"):
        genrm.judge([PairwiseRequest("q", GOOD, BAD)])


def test_pointwise_mode(tokenizer):
    def respond(prompt, j):
        assert "[Response A]" not in prompt and "Score: <score>" in prompt
        response = re.search(r"\[Response\]\n(.*?)\n", prompt).group(1)
        return f"Critique...\nScore: {QUALITY[response]}" if response != "broken" else "Score: eleven"

    genrm, sampler = make(tokenizer, respond, mode="pointwise", votes=2)
    verdicts = genrm.judge([PairwiseRequest("q", GOOD, BAD), PairwiseRequest("q", BAD, "broken")])
    assert [(v.score_a, v.score_b, v.valid) for v in verdicts] == [(8, 3, True), (None, None, False)]
    assert "[A]" in verdicts[0].raw and "Score: 3" in verdicts[0].raw
    [res] = genrm.compare([Comparison("q", BAD, GOOD)])
    # pointwise has no position: one order, votes samples, one generate call with n=votes
    assert [(j.order, j.score_x, j.score_y) for j in res.judgements] == [("xy", 3, 8), ("xy", 3, 8)]
    assert res.outcome == "y" and sampler.calls[-1][1].n == 2


def test_metrics_from_compare(tokenizer):
    genrm, _ = make(tokenizer, lambda p, j: "Scores: A=7, B=3" if GOOD in p.split("[Response B]")[0] else "x")
    results = genrm.compare([Comparison("q", GOOD, BAD), Comparison("r", BAD, GOOD)])
    records = [JudgementRecord(j.verdict, k, j.swapped) for k, r in enumerate(results) for j in r.judgements]
    m = judge_metrics(records, judge_seconds=2.0)
    # 4 judgements: GOOD shown first in 2 of them (valid, A wins), the other 2 invalid
    assert m["judge/invalid_rate"] == 0.5 and m["judge/position_bias"] == 1.0 and m["judge/a_win_rate"] == 1.0
    assert m["judge/mean_score_a"] == 7 and m["judge/mean_score_b"] == 3 and m["judge/judgements_per_s"] == 2.0
    assert "judge/order_agreement" not in m  # no pair has valid judgements in both orders


def test_config_validation():
    with pytest.raises(ValueError, match="votes"):
        GenRMConfig(votes=0)
    with pytest.raises(ValueError, match="lora_path"):
        GenRMConfig(weight_sharing="lora")
    with pytest.raises(ValueError, match="checkpoint_path"):
        GenRMConfig(weight_sharing="checkpoint")
    with pytest.raises(ValueError, match="score_min"):
        GenRMConfig(score_min=10, score_max=0)
    with pytest.raises(ValueError, match="tie_policy"):
        GenRMConfig(tie_policy="coin")
    assert GenRMConfig(mode="pointwise").template_name == "pointwise"


def test_judge_metrics_by_hand():
    from wz_engine.judge import Verdict

    V = lambda a, b: Verdict(a, b, True)  # noqa: E731
    bad = Verdict(None, None, False, "garbage")
    records = [
        JudgementRecord(V(7, 3), 0, False), JudgementRecord(V(3, 7), 0, True),  # agree (first item wins)
        JudgementRecord(V(5, 5), 1, False), JudgementRecord(V(5, 5), 1, True),  # agree (tie)
        JudgementRecord(V(6, 2), 2, False), JudgementRecord(V(9, 1), 2, True),  # disagree (A always wins)
        JudgementRecord(V(4, 1), 3, False), JudgementRecord(bad, 3, True),      # one order invalid: not counted
    ]
    m = judge_metrics(records, prefix="")
    assert m["n"] == 8 and m["invalid_rate"] == 1 / 8
    assert m["a_win_rate"] == 4 / 7 and m["b_win_rate"] == 1 / 7 and m["tie_rate"] == 2 / 7
    assert m["position_bias"] == 4 / 5 and m["order_agreement"] == 2 / 3
    assert m["mean_score_a"] == (7 + 3 + 5 + 5 + 6 + 9 + 4) / 7 and m["mean_score_b"] == (3 + 7 + 5 + 5 + 2 + 1 + 1) / 7
    assert judge_metrics([], prefix="") == {"n": 0.0}
    assert judge_metrics([bad]) == {"judge/n": 1.0, "judge/invalid_rate": 1.0}


def test_greedy_duplicates_are_sampled_once(tokenizer):
    genrm, sampler = make(tokenizer, content_judge, temperature=0.0, votes=3)
    [res] = genrm.compare([Comparison("q", GOOD, BAD)])
    assert res.outcome == "x" and len(res.judgements) == 6
    assert [(k, p.n, p.temperature) for k, p in sampler.calls] == [(2, 1, 0.0)]
