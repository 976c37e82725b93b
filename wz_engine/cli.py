"""The `wz` command: train, demo, export, plot, and `judge eval` (GenRM evaluation)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

USAGE = """usage: wz COMMAND [ARGS]   (wz COMMAND --help for its options)

commands:
  train CONFIG [--set k=v ...] [--resume | --overwrite]
                                            train (same as python -m wz_engine.train; use torchrun for >1 GPU)
  demo [--judge] [--set k=v ...]            teach a tiny base model to follow the prompt with BRPO on CPU;
                                            report win, on-topic and truncation rates vs the base
                                            (--judge: train a tiny GenRM on preference pairs instead)
  demo --agent [--set k=v ...]              train a tiny agent with GiGPO (vs GRPO) on a gridworld, on CPU
  export RUN_DIR OUT_DIR [--force]          export the newest checkpoint that verifies as HF safetensors
  plot RUN_DIR [--out PNG]                  plot a run's metric curves to a PNG
  judge eval ...                            evaluate a pairwise judge on preference data
  config list | check CONFIG                every config field (default, docstring); validate a run file
"""

JUDGE_USAGE = """usage: wz judge SUBCOMMAND [ARGS]

subcommands:
  eval --data PAIRS.jsonl (--judge pkg.mod:fn | --model DIR) [...]
                     evaluate a pairwise judge on preference pairs (wz judge eval --help for all options)
"""

CONFIG_USAGE = """usage: wz config SUBCOMMAND [ARGS]

subcommands:
  list [--section SECTION]        every run-config field: key = default (type) and its docstring
                                  (also: wz config --list)
  check CONFIG [--set k=v ...]    load and validate a run file, and check the optional packages it needs
"""

HELP = ("-h", "--help")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except SystemExit as e:  # argparse: --help exits 0, a usage error 2
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def _usage(text: str, rest: list[str]) -> int:
    """Help asked for: the text on stdout, exit 0; a missing subcommand: on stderr, exit 2."""
    asked = bool(rest) and rest[0] in (*HELP, "help")
    print(text, file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in (*HELP, "help"):
        if argv[1:2] == ["judge"]:
            return _usage(JUDGE_USAGE, ["help"])
        if argv[1:2] == ["config"]:
            return _usage(CONFIG_USAGE, ["help"])
        return _usage(USAGE, argv)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from wz_engine.train import main as train_main

        return train_main(rest)
    if command == "demo":
        if "--agent" in rest:
            from wz_engine.demo.agent import main as agent_main

            return agent_main([a for a in rest if a != "--agent"])
        from wz_engine.demo.run import main as demo_main

        return demo_main(rest)
    if command == "export":
        return _export(rest)
    if command == "plot":
        p = argparse.ArgumentParser(prog="wz plot")
        p.add_argument("run_dir")
        p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
        args = p.parse_args(rest)
        from wz_engine.metrics import plot_run

        print(f"wz plot: wrote {plot_run(args.run_dir, args.out)}")
        return 0
    if command == "judge":
        if not rest or rest[0] != "eval":
            if rest and rest[0] not in (*HELP, "help"):
                print(f"wz judge: unknown subcommand {rest[0]!r}", file=sys.stderr)
            return _usage(JUDGE_USAGE, rest)
        from wz_engine.judge.eval import main as judge_eval_main

        return judge_eval_main(rest[1:])
    if command == "config":
        return _config(rest)
    import difflib

    close = difflib.get_close_matches(command, ["train", "demo", "export", "plot", "judge", "config"], n=1)
    print(f"wz: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""), file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def _config(rest: list[str]) -> int:
    """`wz config list` / `wz config --list` / `wz config check CONFIG [--set ...]`."""
    sub = rest[0] if rest else None
    if sub in ("list", "--list"):
        p = argparse.ArgumentParser(prog="wz config list", description="Every run-config field.")
        p.add_argument("--section", default=None, help='only keys under this section, e.g. "optim" or "judge.genrm"')
        args = p.parse_args(rest[1:])
        from wz_engine.config_doc import config_fields, format_fields

        fields = config_fields()
        if args.section:
            fields = [f for f in fields if f.key.startswith(args.section.rstrip(".") + ".")]
            if not fields:
                print(f"wz config list: no section {args.section!r}", file=sys.stderr)
                return 2
        print(format_fields(fields))
        return 0
    if sub == "check":
        p = argparse.ArgumentParser(prog="wz config check", description="Validate a run file.")
        p.add_argument("config", help="run file (TOML or YAML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        args = p.parse_args(rest[1:])
        from wz_engine.algorithms.reward_source import load_prompt_rows
        from wz_engine.config import ConfigError, load_config
        from wz_engine.data import DataError
        from wz_engine.optional_deps import check_optional_deps

        try:
            cfg = check_optional_deps(load_config(args.config, args.overrides))
            # local prompt files are read and checked line by line; a hub dataset is not downloaded here
            rows = None if cfg.data.path.startswith("hf:") else load_prompt_rows(cfg)
        except (ConfigError, DataError) as e:
            kind = "config" if isinstance(e, ConfigError) else "data"
            print(f"wz config check: {kind} error: {e}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok" + (f" ({len(rows)} prompts in {cfg.data.path})" if rows else ""))
        return 0
    if sub is not None and sub not in (*HELP, "help"):
        print(f"wz config: unknown subcommand {sub!r}", file=sys.stderr)
    return _usage(CONFIG_USAGE, rest)


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="wz export", description="Export a run's newest checkpoint that verifies "
                                "(its manifest) as HF safetensors + config + tokenizer.")
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="an empty or new folder")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint folder of the run (default: the newest that verifies)")
    p.add_argument("--force", action="store_true",
                   help="OUT_DIR is not empty: move its contents aside to OUT_DIR.old-<timestamp> (nothing is "
                        "deleted) and export anyway")
    args = p.parse_args(argv)
    from wz_engine.checkpoint import CheckpointError
    from wz_engine.export import export_run

    try:
        report = export_run(args.run_dir, args.out_dir, args.checkpoint, force=args.force)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"wz export: {e}", file=sys.stderr)
        return 2
    for s in report.skipped:
        print(f"wz export: skipped {s.path}: {s.reason}", file=sys.stderr)
    if report.moved_aside is not None:
        print(f"wz export: moved the earlier contents of {report.out_dir} to {report.moved_aside}")
    print(f"wz export: exported run {report.run_id} step {report.step} (checkpoint {report.checkpoint}) "
          f"to {report.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
