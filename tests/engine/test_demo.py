"""The CPU demo as shipped (`wz demo`'s config, fixed seed): what it learns.

The initial policy is the pretrained base (it writes, but not about the prompt's topic); BRPO teaches it
to follow the prompt: on held-out prompts it beats the base, its on-topic rate rises far above the base's
and its greedy text differs across prompts; the judge's score rises; its logs are complete: JSONL every
step, TensorBoard events read back, the curves PNG. Other seeds: bench/RESULTS.md.
"""

import contextlib
import io
import json
from collections import Counter

import pytest

STEPS = 60  # demo_cpu.toml


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`wz demo` as a user runs it (its defaults; no progress bar), through its command-line entry."""
    from wz_engine.demo.run import main

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--set", f'train.output_dir="{out}"', "--set", "logging.progress_bar=false"]) == 0
    summary = json.loads((out / "demo_eval.json").read_text())
    return out, summary, printed.getvalue()


def test_demo_beats_the_initial_policy(demo):
    out, s, printed = demo
    assert s["steps"] == STEPS and s["comparisons"] == 192  # 24 held-out prompts x 4 samples x both orders
    assert s["invalid"] == 0
    assert s["win_rate"] >= 0.7, s
    t, i = s["trained"], s["initial"]
    # The base already writes short sentences and ends them (the judge wants 4-10 words).
    assert i["truncation_rate"] <= 0.1 and t["truncation_rate"] <= 0.1, s
    assert s["base"]["path"] == str(out) + "-base" and s["base"]["loss_last"] < s["base"]["loss_first"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The judge's absolute score goes up (the BRPO rewards themselves are only relative).
    mean = lambda rs: sum(r["judge/score_mean"] for r in rs) / len(rs)
    assert mean(rows[-10:]) > mean(rows[:10]) + 0.2
    for key in ("time/rollout", "time/judge", "time/logprob", "time/update", "tokens_per_s", "entropy",
                "grad_norm", "clip_frac_high", "response/length_mean", "response/truncation_rate",
                "judge/position_bias", "judge/invalid_rate", "brpo/skew_drop_rate", "adv/zero_rate"):
        assert key in rows[-1], key
    assert f"win rate        {s['win_rate']:.3f}" in printed and f"curves: {out / 'curves.png'}" in printed


def test_demo_follows_the_prompt(demo):
    """The trained policy's output depends on the prompt, measured on held-out samples without the judge's
    reward: a response is on topic for at most one topic (`is_on_topic` needs more of that topic's words than
    of all others together), and the held-out prompts cover the 6 topics equally, so a policy whose output
    does not depend on the prompt has an expected on-topic rate of at most 1/6, whatever it writes. The base
    is such a policy (pretrained on answers about a topic drawn regardless of the prompt); the trained one is
    far above 1/6 (seeds 0-4: bench/RESULTS.md)."""
    from wz_engine.demo.judge import TOPICS, topic_of
    from wz_engine.demo.prompts import HOLDOUT, load_demo_prompts

    held_out = [r["prompt"] for r in load_demo_prompts()[-HOLDOUT:]]
    assert Counter(topic_of(p) for p in held_out) == {t: HOLDOUT // len(TOPICS) for t in TOPICS}
    _, s, printed = demo
    t, i = s["trained"], s["initial"]
    assert i["on_topic_rate"] <= 0.35, s  # the base: ~1/6 (96 samples: sd 0.04)
    assert t["on_topic_rate"] >= 0.6 and t["on_topic_rate"] >= i["on_topic_rate"] + 0.3, s
    assert t["distinct_greedy"] >= 6, s  # greedy text: not one text for all 24 prompts
    assert f"on-topic rate   {i['on_topic_rate']:.3f} -> {t['on_topic_rate']:.3f}" in printed


def test_tensorboard_events_and_curves(demo):
    out, s, _ = demo
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))
    png = out / "curves.png"
    assert s["curves"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_untrained_policy_ties_with_itself(tmp_path):
    """Control for the evaluation: zero steps means the same weights and seeds, so every pair ties and
    both policies measure the same (a briefly pretrained base is enough for that)."""
    from wz_engine.demo.pretrain import PretrainConfig
    from wz_engine.demo.run import format_summary, run_demo

    s = run_demo([f'train.output_dir="{tmp_path / "run"}"', "train.steps=0", "logging.progress_bar=false",
                  "logging.tensorboard=false"], eval_samples=1, pretrain=PretrainConfig(steps=5, batch_size=16))
    assert s["ties"] == s["comparisons"] == 48 and s["win_rate"] == 0.5
    assert s["trained"] == s["initial"]
    text = format_summary(s)
    assert "on-topic rate" in text and "truncated" in text and "win rate" in text and "base model" in text
