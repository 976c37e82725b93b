"""Run config: TOML/YAML files, --set overrides, and error messages that name the key."""

import pytest

from wz_engine.config import ConfigError, RunConfig, load_config, parse_override
from wz_engine.demo.run import DEMO_CONFIG


def test_defaults_and_demo_config_load():
    assert isinstance(load_config(), RunConfig)
    cfg = load_config(DEMO_CONFIG)
    assert cfg.algorithm.estimator == "brpo" and cfg.judge.kind == "callable"


def test_example_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("configs").glob("*.toml")):
        load_config(path)


def test_overrides_parse_toml_values(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[optim]\nlr = 1e-5\n[train]\noutput_dir = "x"\n')
    cfg = load_config(f, ["optim.lr=2e-6", "rollout.group_size=8", "optim.betas=[0.9, 0.95]",
                          "train.output_dir=runs/a", "algorithm.dual_clip=3", "judge.genrm.votes=3"])
    assert cfg.optim.lr == 2e-6 and cfg.rollout.group_size == 8
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.output_dir == "runs/a"  # not TOML: taken as a bare string
    assert cfg.algorithm.dual_clip == 3.0 and isinstance(cfg.algorithm.dual_clip, float)
    assert cfg.judge.genrm.votes == 3
    assert parse_override("a.b=true") == ("a.b", True)


def test_yaml(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("rollout:\n  group_size: 6\n")
    assert load_config(f).rollout.group_size == 6


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-6", "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ("algoritm.votes=2", "algoritm: unknown key; did you mean 'algorithm'?"),
    ("judge.genrm.vots=2", "judge.genrm.vots: unknown key; did you mean 'judge.genrm.votes'?"),
    ('algorithm.estimator="grp"', "algorithm.estimator: 'grp' is not one of"),
    ('rollout.group_size="many"', "rollout.group_size: expected an integer"),
    ("logging.wandb=1", "logging.wandb: expected true/false"),
    ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
    ('judge.kind="rule"', "judge.kind: estimator 'brpo' needs a pairwise judge"),
    ("algorithm.skew_threshold=1.5", "algorithm.skew_threshold"),
    ("optim.lr=0", "optim.lr: must be > 0"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr=1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
