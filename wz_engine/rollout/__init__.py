from wz_engine.rollout.base import Completion, Sampler, SamplingParams

__all__ = ["Completion", "Sampler", "SamplingParams"]
