from wz_engine.judge.base import PairwiseJudge, PairwiseRequest, Verdict
from wz_engine.judge.config import GenRMConfig
from wz_engine.judge.genrm import Comparison, ComparisonResult, GenRM, Judgement
from wz_engine.judge.metrics import JudgementRecord, judge_metrics
from wz_engine.judge.parser import ParsedVerdict, VerdictGrammar, parse_verdict
from wz_engine.judge.programmatic import CallableJudge

__all__ = [
    "CallableJudge",
    "Comparison",
    "ComparisonResult",
    "GenRM",
    "GenRMConfig",
    "Judgement",
    "JudgementRecord",
    "PairwiseJudge",
    "PairwiseRequest",
    "ParsedVerdict",
    "Verdict",
    "VerdictGrammar",
    "judge_metrics",
    "parse_verdict",
]
