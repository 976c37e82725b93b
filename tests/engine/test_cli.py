"""`wz` dispatch: usage, unknown commands, `judge eval` handed to wz_engine.judge.eval."""

import pytest

from wz_engine.cli import main


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["expotr"]) == 2
    assert "did you mean 'export'" in capsys.readouterr().err
    assert main(["judge"]) == 2


def test_judge_eval_is_dispatched(monkeypatch):
    import wz_engine.judge.eval as judge_eval

    seen = {}
    monkeypatch.setattr(judge_eval, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["judge", "eval", "--pairs", "x.jsonl"]) == 0
    assert seen["argv"] == ["--pairs", "x.jsonl"]


def test_train_help_exits_zero():
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0


def test_config_error_is_a_message_not_a_traceback(capsys):
    from wz_engine.demo.run import DEMO_CONFIG

    assert main(["train", str(DEMO_CONFIG), "--set", "optim.lrr=1"]) == 2
    assert "config error: optim.lrr: unknown key; did you mean 'optim.lr'?" in capsys.readouterr().err
