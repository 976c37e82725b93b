"""`wz judge eval`: data formats, metrics computed by hand, the CLI, and a GenRM on a model directory."""

import json
import math
import re
import subprocess
import sys

import pytest

from wz_engine.judge.eval import PreferencePair, evaluate, load_pairs, main, normalize_row
from wz_engine.judge.programmatic import CallableJudge, load_callable

JUDGE_PATH = "tests.engine.test_judge_eval:biased_judge"


def biased_judge(prompt, a, b):
    """Scores each response by its `q=<n>` tag, +3 for being shown first; the prompt 'broken' -> NaN."""
    if prompt == "broken":
        return float("nan"), 1.0
    q = lambda s: int(re.search(r"q=(\d+)", s).group(1))  # noqa: E731
    return q(a) + 3, q(b)


ROWS = [
    {"prompt": "p1", "chosen": "q=8", "rejected": "q=2"},  # standard
    {"prompt": [{"role": "user", "content": "p2"}], "chosen": [{"role": "assistant", "content": "q=5"}],
     "rejected": [{"role": "assistant", "content": "q=4"}]},  # conversational
    {"chosen": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "q=3"}],
     "rejected": [{"role": "user", "content": "p3"}, {"role": "assistant", "content": "q=3 too"}]},  # implicit prompt
    {"prompt": "broken", "chosen": [{"role": "user", "content": "broken"}, {"role": "assistant", "content": "q=9"}],
     "rejected": [{"role": "user", "content": "broken"}, {"role": "assistant", "content": "q=1"}]},  # UltraFeedback
    {"question": "p5", "chosen": "q=1", "rejected": "q=6"},  # alias key
]

# By hand, per pair (chosen first | chosen second), as (A score, B score):
#   p1: (11, 2) chosen | (5, 8) chosen      -> both right, orders agree
#   p2: (8, 4) chosen  | (7, 5) rejected    -> disagree
#   p3: (6, 3) chosen  | (6, 3) rejected    -> disagree
#   p4: invalid        | invalid
#   p5: (4, 6) rejected| (9, 1) rejected    -> both wrong, orders agree
# valid winners by position: A A A A A B B A -> 6 A, 2 B of 8 valid
EXPECTED = {
    "pairs": 5, "judgements": 10,
    "accuracy": 4 / 10, "accuracy_chosen_first": 3 / 5, "accuracy_chosen_second": 1 / 5,
    "pair_accuracy": 1 / 5, "accuracy_valid": 4 / 8,
    "mean_score_chosen": (11 + 8 + 8 + 5 + 6 + 3 + 4 + 1) / 8, "mean_score_rejected": (2 + 5 + 4 + 7 + 3 + 6 + 6 + 9) / 8,
    "invalid_rate": 2 / 10, "a_win_rate": 6 / 8, "b_win_rate": 2 / 8, "tie_rate": 0.0,
    "position_bias": 6 / (6 + 2), "order_agreement": 2 / 4,
    "mean_score_a": (11 + 5 + 8 + 7 + 6 + 6 + 4 + 9) / 8, "mean_score_b": (2 + 8 + 4 + 5 + 3 + 3 + 6 + 1) / 8,
}


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    return path


def _check(metrics):
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["comparisons_per_s"] > 0 and metrics["time_s"] >= 0


def test_formats_normalize(pairs_file):
    pairs = load_pairs(pairs_file)
    assert pairs == load_pairs_from(ROWS) and len(load_pairs(pairs_file, limit=3)) == 3
    assert pairs[0] == PreferencePair("p1", "q=8", "q=2")
    assert pairs[1] == PreferencePair("p2", "q=5", "q=4")
    assert pairs[2] == PreferencePair("p3", "q=3", "q=3 too")
    assert pairs[3] == PreferencePair("broken", "q=9", "q=1")
    assert pairs[4].prompt == "p5"
    multi = normalize_row({"chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                      {"role": "assistant", "content": "good"}],
                           "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                        {"role": "assistant", "content": "bad"}], "reference": "gold"})
    assert multi == PreferencePair("System: S\n\nUser: U", "good", "bad", "gold")


def load_pairs_from(rows):
    return [normalize_row(r) for r in rows]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "need a 'prompt'"),
        ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "must both be strings"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
         "share no prompt"),
        ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": []}, "messages"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "x"}]},
         "do not diverge"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_rows_are_value_errors(row, match):
    with pytest.raises(ValueError, match=match):
        normalize_row(row)


def test_metrics_by_hand():
    metrics, records = evaluate(CallableJudge(biased_judge), load_pairs_from(ROWS))
    _check(metrics)
    assert [(r.pair_id, r.swapped) for r in records[:4]] == [(0, False), (0, True), (1, False), (1, True)]


def test_votes_and_batches_do_not_change_rates():
    metrics, records = evaluate(CallableJudge(biased_judge), load_pairs_from(ROWS), votes=3, batch_pairs=2)
    assert metrics["judgements"] == 30
    for key in ("accuracy", "position_bias", "order_agreement", "invalid_rate", "pair_accuracy"):
        assert metrics[key] == pytest.approx(EXPECTED[key]), key
    one_order, _ = evaluate(CallableJudge(biased_judge), load_pairs_from(ROWS), both_orders=False)
    assert one_order["accuracy"] == pytest.approx(3 / 5) and "order_agreement" not in one_order
    assert "accuracy_chosen_second" not in one_order


def test_cli_json_and_table(pairs_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["--data", str(pairs_file), "--judge", JUDGE_PATH, "--output", str(out)]) == 0
    _check(json.loads(out.read_text()))
    table = capsys.readouterr().out
    assert re.search(r"position_bias\s+0\.7500", table) and re.search(r"pairs\s+5\n", table)
    assert main(["--data", str(pairs_file), "--judge", JUDGE_PATH, "--json", "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 2


def test_cli_errors(pairs_file, tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--judge", JUDGE_PATH]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["--data", str(pairs_file), "--judge", "tests.engine.test_judge_eval:nope"]) == 2
    assert "no attribute" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    assert main(["--data", str(bad), "--judge", JUDGE_PATH]) == 2
    assert "line 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pkg.module:function"):
        load_callable("no_colon")


def test_callable_judge_invalid_returns():
    judge = CallableJudge(lambda p, a, b: {"x": (1, 2, 3), "y": "12", "z": (math.inf, 1), "w": (2, 2)}[p])
    verdicts = judge.judge([_req(p) for p in "xyzw"])
    assert [v.valid for v in verdicts] == [False, False, False, True] and verdicts[3].winner == "tie"


def _req(prompt):
    from wz_engine.judge import PairwiseRequest

    return PairwiseRequest(prompt, "a", "b")


def test_python_dash_m(pairs_file):
    proc = subprocess.run(
        [sys.executable, "-m", "wz_engine.judge.eval", "--data", str(pairs_file), "--judge", JUDGE_PATH, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["position_bias"] == pytest.approx(0.75)


def test_genrm_on_a_model_directory(pairs_file, tmp_path, capsys):
    from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer

    tok = build_tokenizer(["q=1 q=2 p1 p2 Scores: A=1, B=2"] * 4, 300)
    model = build_tiny_qwen2(len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    argv = ["--data", str(pairs_file), "--model", str(tmp_path / "judge"), "--max-new-tokens", "4", "--limit", "2",
            "--json", "--device", "cpu"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["judgements"] == 4 and metrics["invalid_rate"] == 1.0 and metrics["accuracy"] == 0.0
    # every invalid verdict has a parser reason (4 random tokens: no verdict line at the end)
    from wz_engine.judge.base import INVALID_REASONS

    reasons = metrics["invalid_reasons"]
    assert sum(r["count"] for r in reasons.values()) == 4 and set(reasons) <= set(INVALID_REASONS)


# ---------------------------------------------------------------------- invalid verdicts explained

SCRIPT = {  # pair prompt -> the judge's whole output, and the parser reason it must give
    "p-valid": ("Principles: vivid.\nScores: A=7, B=3", "ok"),
    "p-cut": ("Principles: vivid images, precise verbs. Critique of A: " + "very " * 60, "no_verdict"),
    "p-bad-score": ("Looks fine.\nScores: A=7, B=seven", "malformed"),
    "p-range": ("Both are great.\nScores: A=11, B=3", "out_of_range"),
    "p-not-last": ("Scores: A=6, B=2\nThat is my verdict.", "not_final"),
}


def _scripted_genrm():
    from wz_engine.demo.tiny import build_tokenizer
    from wz_engine.judge.config import GenRMConfig
    from wz_engine.judge.genrm import GenRM
    from wz_engine.judge.scripted import ScriptedSampler

    tok = build_tokenizer(["Scores: A=7, B=3 " + " ".join(SCRIPT)] * 4, 300)

    def respond(prompt_text, _):
        return next(out for key, (out, _) in SCRIPT.items() if key in prompt_text)

    return GenRM(ScriptedSampler(tok, respond), tok, GenRMConfig(temperature=0.0)), tok


def test_invalid_verdicts_counted_by_the_parser_reason_with_an_example():
    from wz_engine.judge.diagnostics import EXAMPLE_CHARS, format_invalid_reasons, invalid_reasons

    judge, _ = _scripted_genrm()
    pairs = [PreferencePair(key, "the chosen text", "the rejected text") for key in SCRIPT]
    metrics, records = evaluate(judge, pairs)
    assert [r.reason for r in records] == [reason for _, reason in SCRIPT.values() for _ in range(2)]
    summary = invalid_reasons(records)
    assert {k: s["count"] for k, s in summary.items()} == {"no_verdict": 2, "malformed": 2, "out_of_range": 2,
                                                           "not_final": 2}
    assert metrics["invalid_rate"] == pytest.approx(8 / 10)
    # short outputs whole (newlines shown as \n), a long one cut to its last EXAMPLE_CHARS characters
    assert summary["malformed"]["example"] == "Looks fine.\\nScores: A=7, B=seven"
    cut = SCRIPT["p-cut"][0]
    assert summary["no_verdict"]["example"] == "..." + cut[-EXAMPLE_CHARS:] and len(cut) > EXAMPLE_CHARS
    assert "missing or unparsable score" in summary["malformed"]["meaning"]
    text = format_invalid_reasons(summary, len(records))
    assert text.splitlines()[0] == "invalid verdicts: 8 of 10, by reason"
    assert re.search(r"out_of_range\s+2\s+a score outside", text)


def test_cli_prints_reasons_for_a_callable_judge(pairs_file, capsys):
    assert main(["--data", str(pairs_file), "--judge", JUDGE_PATH]) == 0
    out = capsys.readouterr().out
    assert "invalid verdicts: 2 of 10, by reason" in out
    assert re.search(r"non_finite_score\s+2\s+the judge function returned a NaN", out)
    assert "e.g. '(nan, 1.0)'" in out
    assert main(["--data", str(pairs_file), "--judge", JUDGE_PATH, "--json"]) == 0
    reasons = json.loads(capsys.readouterr().out)["invalid_reasons"]
    assert reasons == {"non_finite_score": {"count": 2, "meaning": reasons["non_finite_score"]["meaning"],
                                            "example": "(nan, 1.0)"}}


def test_context_overflow_by_hand():
    from wz_engine.judge.diagnostics import context_length, context_overflow

    assert context_overflow([10, 40], max_new_tokens=20, context=64) is None  # 40 + 20 = 60 fits
    over = context_overflow([10, 50, 70, 44], max_new_tokens=20, context=64)
    assert (over.prompts, over.over, over.prompt_over, over.longest) == (4, 2, 1, 70)
    msg = over.message()
    assert "2 of 4 judge prompts plus --max-new-tokens 20 exceed the model's context of 64 tokens" in msg
    assert "longest prompt: 70 tokens" in msg and "1 prompts exceed it on their own" in msg

    class Cfg:
        max_position_embeddings = 128

    class Model:
        config = Cfg()

    class Tok:
        model_max_length = 1_000_000_000_000_000_000_000  # transformers' "no limit" placeholder

    assert context_length(Model(), Tok()) == 128
    assert context_length(object(), Tok()) is None
    Tok.model_max_length = 256
    assert context_length(object(), Tok()) == 256


def test_genrm_model_context_warning(pairs_file, tmp_path, capsys):
    from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer

    tok = build_tokenizer(["q=1 q=2 p1 p2 Scores: A=1, B=2"] * 4, 300)
    for context, warned in ((48, True), (100_000, False)):
        model = build_tiny_qwen2(len(tok), hidden_size=32, intermediate_size=64, num_layers=1,
                                 max_position_embeddings=context, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        model.save_pretrained(tmp_path / f"judge{context}")
        tok.save_pretrained(tmp_path / f"judge{context}")
        argv = ["--data", str(pairs_file), "--model", str(tmp_path / f"judge{context}"), "--max-new-tokens", "2",
                "--limit", "2", "--json", "--device", "cpu"]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert ("warning: 4 of 4 judge prompts plus --max-new-tokens 2 exceed the model's context of 48 tokens"
                in err) == warned, err
