from wz_engine.judge.base import PairwiseJudge, PairwiseRequest, Verdict

__all__ = ["PairwiseJudge", "PairwiseRequest", "Verdict"]
