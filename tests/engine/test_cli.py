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


@pytest.mark.parametrize("argv, lists", [
    (["--help"], ["train CONFIG", "demo", "export", "plot", "judge eval", "config list"]),
    (["-h"], ["train CONFIG", "judge eval"]),
    (["help"], ["train CONFIG"]),
    (["judge", "--help"], ["eval --data"]),
    (["help", "judge"], ["eval --data"]),
    (["config", "--help"], ["list [--section", "check CONFIG"]),
    (["train", "--help"], ["--set KEY=VALUE", "--resume", "wz config list"]),
    (["judge", "eval", "--help"], ["--data", "--judge", "--model", "--max-new-tokens"]),
    (["export", "--help"], ["run_dir", "out_dir"]),
])
def test_help_exits_zero_and_lists_what_there_is(argv, lists, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in lists:
        assert text in out, (argv, text)


def test_missing_or_unknown_subcommand_is_usage_on_stderr(capsys):
    assert main(["judge"]) == 2 and "eval --data" in capsys.readouterr().err
    assert main(["judge", "evla"]) == 2 and "unknown subcommand 'evla'" in capsys.readouterr().err
    assert main(["config"]) == 2 and "list [--section" in capsys.readouterr().err
    assert main(["train"]) == 2 and "required: config" in capsys.readouterr().err


def test_config_list_prints_every_field_with_default_and_docstring(capsys):
    import dataclasses

    from wz_engine.config import RunConfig, TrainConfig

    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert main(["config", "list"]) == 0 and capsys.readouterr().out == out

    def leaves(obj, prefix=""):  # the defaults, walked on a default-constructed RunConfig
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    keys = dict(leaves(RunConfig()))
    lines = [line for line in out.splitlines() if line and not line.startswith((" ", "["))]
    assert [line.split(" = ")[0] for line in lines] != [] and len(lines) == len(keys)
    assert {line.split(" = ")[0] for line in lines} == set(keys)
    assert f"train.steps = {TrainConfig().steps}  (int)\n    Rollout steps (each: one rollout batch," in out
    assert 'optim.schedule = "constant"  ("constant" | "cosine" | "linear")' in out
    assert "data.system_prompt = unset  (str | None)" in out
    assert "judge.genrm.weight_sharing = \"self\"" in out and "rollout.vllm.gpu_memory_utilization = 0.4" in out
    # a docstring that spans several source lines comes out whole (rewrapped, words intact)
    assert ("algorithm.recompute_old_logprobs = false (bool) Run the separate old-logprob pass even on-policy. "
            "With one optimizer step per rollout batch the trainer skips that pass by default (old = the current "
            "log-probs: ratio 1, no clipping, one vocabulary pass fewer).") in " ".join(out.split())


def test_every_config_field_has_a_docstring():
    from wz_engine.config_doc import config_fields

    undocumented = [f.key for f in config_fields() if not f.doc]
    assert not undocumented, f"config fields without a docstring: {undocumented}"


def test_config_list_section(capsys):
    assert main(["config", "list", "--section", "optim"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[optim]\noptim.lr = 1e-06  (float)") and "\ntrain." not in out
    assert main(["config", "list", "--section", "nope"]) == 2


def test_config_check(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the example configs name their data relative to the repository root
    assert main(["config", "check", str(root / "configs" / "qwen2.5-0.5b_brpo_genrm_hf.toml")]) == 0
    assert "ok (233 prompts in data/writing_prompts.jsonl)" in capsys.readouterr().out
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": 1}\n')
    tiny = Path(__file__).with_name("tiny_run.toml")
    assert main(["config", "check", str(tiny), "--set", f'data.path="{bad}"']) == 2
    assert f"data error: {bad}:2: 'prompt' must be a string" in capsys.readouterr().err


def test_config_error_is_a_message_not_a_traceback(capsys):
    from wz_engine.demo.run import DEMO_CONFIG

    assert main(["train", str(DEMO_CONFIG), "--set", "optim.lrr=1"]) == 2
    assert "config error: optim.lrr: unknown key; did you mean 'optim.lr'?" in capsys.readouterr().err
