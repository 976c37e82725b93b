"""The curves and the progress bar tell the truth: panels that show learning and the hacking monitors
first, constant panels left out (and named), gaps in a metric stay gaps, and the bar shows a level that
moves when the policy improves (not BRPO's relative rewards)."""

import json
import math

import pytest

from wz_engine.metrics import PANELS, curve, plot_run, progress_postfix, select_panels


def _nan_positions(values):
    return [i for i, v in enumerate(values) if math.isnan(v)]


def test_curve_keeps_gaps():
    rows = [{"step": 1, "x": 0.5}, {"step": 2, "x": None}, {"step": 3, "x": float("inf")}, {"step": 4},
            {"step": 5, "x": 1}, {"step": 8, "x": 2.0}]
    steps, values = curve(rows, "x")
    # null, non-finite and missing values are NaN; the skipped steps 6-7 get a NaN so no line bridges them
    assert steps == [1, 2, 3, 4, 5, 6, 8]
    assert _nan_positions(values) == [1, 2, 3, 5]
    assert values[0] == 0.5 and values[4] == 1.0 and values[6] == 2.0


def _brpo_rows(n=6):
    rows = []
    for s in range(1, n + 1):
        rows.append({"step": s, "judge/score_mean": 2.0 + 0.3 * s, "reward/mean": (-1) ** s * 0.1,
                     "response/length_mean": 16.0 - s, "response/length_max": 16.0,
                     "response/truncation_rate": 1.0 - 0.1 * s,
                     "reward/length_corr": None if s % 2 else 0.1 * s,
                     "judge/position_bias": 0.5, "judge/invalid_rate": 0.0, "brpo/skew_drop_rate": 0.25 * (s % 3),
                     "adv/zero_rate": 0.25 * (s % 3), "loss": 0.01 * s, "entropy": 5.0 - 0.1 * s,
                     "grad_norm": 0.2 + 0.01 * s, "kl_mean": 0.0, "tokens_per_s": 1000.0 + s})
    return rows


def test_panel_selection_and_order():
    drawn, constant = select_panels(_brpo_rows())
    titles = [p.title for p, _ in drawn]
    order = [p.title for p in PANELS]
    assert titles == [t for t in order if t in titles]  # PANELS order kept
    assert titles[0].startswith("judge score")  # learning first
    assert "mean reward" not in titles  # BRPO: the judge score says it (rewards are relative)
    assert titles[1:5] == ["response length (tokens) vs max_new_tokens", "truncated at max_new_tokens (share)",
                           "corr(reward, length)", "no signal (share)"]
    assert not any(t.startswith(("position bias", "KL")) for t in titles)  # constant: out
    assert constant == ["judge/position_bias = 0.5", "kl_mean = 0"]
    lines = dict(drawn)
    length_panel = next(ls for p, ls in drawn if p.cap == "rollout.max_new_tokens")
    assert [k for k, _, _ in length_panel] == ["response/length_mean", "response/length_max"]  # flat max kept
    corr = next(ls for p, ls in lines.items() if p.title == "corr(reward, length)")[0]
    assert _nan_positions(corr[2]) == [0, 2, 4]  # the null rows stay gaps

    pointwise = [{k: v for k, v in r.items() if not k.startswith("judge/")} for r in _brpo_rows()]
    assert next(p.title for p, _ in select_panels(pointwise)[0]) == "mean reward"


def test_plot_run_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _brpo_rows()))
    (tmp_path / "config.json").write_text(json.dumps({"rollout": {"max_new_tokens": 16}}))
    png = plot_run(tmp_path)
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "kl_mean": 0.0}) + "\n")
    with pytest.raises(ValueError, match="no changing metrics"):
        plot_run(tmp_path)


def test_progress_bar_shows_a_level_that_moves():
    brpo = progress_postfix({"judge/score_mean": 4.25, "reward/mean": 0.0, "response/length_mean": 9.5,
                             "response/truncation_rate": 0.25, "tokens_per_s": 3000.4})
    assert brpo == {"score": "4.25", "len": "9.5", "trunc": "0.25", "tok_s": "3000"}
    rule = progress_postfix({"judge/score_mean": float("nan"), "reward/mean": 0.61, "tokens_per_s": 10.0})
    assert rule == {"reward": "0.610", "tok_s": "10"}
