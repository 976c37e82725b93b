"""The pairwise judge: interface, GenRM, parser, metrics, evaluation.

Names are imported lazily so that light entry points (`python -m wz_engine.judge.eval` with a
programmatic judge, the parser) do not pay for importing torch/transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PairwiseJudge": "base",
    "PairwiseRequest": "base",
    "Verdict": "base",
    "GenRMConfig": "config",
    "Comparison": "genrm",
    "ComparisonResult": "genrm",
    "GenRM": "genrm",
    "Judgement": "genrm",
    "JudgementRecord": "metrics",
    "judge_metrics": "metrics",
    "ParsedVerdict": "parser",
    "VerdictGrammar": "parser",
    "parse_verdict": "parser",
    "CallableJudge": "programmatic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wz_engine.judge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"wz_engine.judge.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
