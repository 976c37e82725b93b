"""The CPU demo as shipped (`wz demo`'s config, fixed seed): what it learns and what it does not.

It beats the initial policy on held-out prompts and the judge's score rises; its evaluation reports the
on-topic and truncation rates of both policies; its logs are complete: JSONL every step, TensorBoard
events read back, the curves PNG.
It does NOT learn to follow the prompt (see the xfail below and README "Quick start").
"""

import json

import pytest

STEPS = 60  # demo_cpu.toml


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from wz_engine.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo")
    summary = run_demo([f'train.output_dir="{out}"', "logging.progress_bar=false"], eval_samples=1)
    return out, summary


def test_demo_beats_the_initial_policy(demo):
    out, s = demo
    assert s["steps"] == STEPS and s["comparisons"] == 64  # 32 held-out prompts x 1 sample x both orders
    assert s["invalid"] == 0
    assert s["win_rate"] >= 0.7, s
    t, i = s["trained"], s["initial"]
    # The random initial model almost never ends a response by itself, and its greedy text differs across
    # prompts. (Whether training then learns to stop depends on the seed: bench/RESULTS.md; not asserted.)
    assert i["truncation_rate"] >= 0.85 and 0 <= t["truncation_rate"] <= 1
    assert i["distinct_greedy"] >= 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The judge's absolute score goes up (the BRPO rewards themselves are only relative).
    mean = lambda rs: sum(r["judge/score_mean"] for r in rs) / len(rs)
    assert mean(rows[-10:]) > mean(rows[:10]) + 0.2
    for key in ("time/rollout", "time/judge", "time/logprob", "time/update", "tokens_per_s", "entropy",
                "grad_norm", "clip_frac_high", "response/length_mean", "response/truncation_rate",
                "judge/position_bias", "judge/invalid_rate", "brpo/skew_drop_rate", "adv/zero_rate"):
        assert key in rows[-1], key
    assert json.loads((out / "demo_eval.json").read_text()) == json.loads(json.dumps(s))


@pytest.mark.xfail(strict=True, reason="the tiny random model learns the judge's surface criteria (real "
                   "words, length) but not to read the prompt within the demo's budget; README 'Quick start'")
def test_demo_follows_the_prompt(demo):
    _, s = demo
    assert s["trained"]["on_topic_rate"] >= s["initial"]["on_topic_rate"] + 0.2, s
    assert s["trained"]["distinct_greedy"] >= 8, s


def test_tensorboard_events_and_curves(demo):
    out, s = demo
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))
    png = out / "curves.png"
    assert s["curves"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_untrained_policy_ties_with_itself(tmp_path):
    """Control for the evaluation: zero steps means the same weights and seeds, so every pair ties and
    both policies measure the same."""
    from wz_engine.demo.run import format_summary, run_demo

    s = run_demo([f'train.output_dir="{tmp_path}"', "train.steps=0", "logging.progress_bar=false",
                  "logging.tensorboard=false"], eval_samples=1)
    assert s["ties"] == s["comparisons"] == 64 and s["win_rate"] == 0.5
    assert s["trained"] == s["initial"]
    text = format_summary(s)
    assert "on-topic rate" in text and "truncated" in text and "win rate" in text
