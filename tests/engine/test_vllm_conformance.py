"""Conformance of the installed vllm with what the adapter calls (`VLLM_API`); skipped without vllm.

Imports only Python modules (no engine is built, no GPU needed). The stand-in engine of
test_vllm_sampler.py is held to the same table, so a vLLM API change shows up here, not at a step.
"""

import dataclasses
import inspect

import pytest

from wz_engine.rollout.vllm import VLLM_API

vllm = pytest.importorskip("vllm", reason="vllm not installed (the [vllm] extra)")


def _keywords(obj) -> set[str]:
    """Names a callable / dataclass / msgspec Struct accepts as keywords."""
    if getattr(obj, "__struct_fields__", None) is not None:  # msgspec.Struct (SamplingParams, LoRARequest)
        return set(obj.__struct_fields__)
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    params = inspect.signature(obj).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def test_installed_version_passes_the_config_check():
    from wz_engine.rollout.vllm_config import check_vllm_install

    assert check_vllm_install() == vllm.__version__


def test_llm_methods_and_keywords():
    from vllm import LLM

    for key, keywords in VLLM_API.items():
        owner, _, method = key.partition(".")
        if owner != "LLM":
            continue
        fn = getattr(LLM, method, None)
        assert fn is not None, f"vllm.LLM has no {method}"
        missing = set(keywords) - _keywords(fn)
        assert not missing, f"vllm.LLM.{method} lacks keyword(s) {missing}"


def test_engine_args_fields():
    from vllm.engine.arg_utils import EngineArgs

    missing = set(VLLM_API["EngineArgs"]) - _keywords(EngineArgs)
    assert not missing, f"vllm EngineArgs lacks {missing}"


def test_sampling_params_and_lora_request():
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    assert not set(VLLM_API["SamplingParams"]) - _keywords(SamplingParams)
    assert not set(VLLM_API["LoRARequest"]) - _keywords(LoRARequest)
    sp = SamplingParams(n=2, max_tokens=3, logprobs=0, seed=1, stop_token_ids=[5], top_k=0)
    assert (sp.n, sp.max_tokens, sp.logprobs) == (2, 3, 0)
    req = LoRARequest(lora_name="wz_judge_1", lora_int_id=1, lora_path="/a")
    assert req.lora_int_id == 1


def test_output_and_worker_surface():
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    assert {"token_ids", "text", "finish_reason", "logprobs"} <= _keywords(CompletionOutput)
    assert "outputs" in _keywords(RequestOutput)
    assert "logprob" in _keywords(Logprob)
    from vllm.v1.worker.worker_base import WorkerBase

    assert hasattr(WorkerBase, "apply_model")  # what LLM.apply_model runs on each worker
