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


def test_adapter_objects_build_with_the_real_classes():
    """The adapter's own constructors and output parsing, run on real vLLM objects."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput

    from wz_engine.rollout.base import SamplingParams
    from wz_engine.rollout.vllm import VLLMSampler, _completion, engine_kwargs, load_vllm_api
    from wz_engine.rollout.vllm_config import VLLMConfig
    from wz_engine.rollout.vllm_judge import LoRAJudge

    cfg = VLLMConfig(judge_mode="lora", judge_lora_path="/a", max_num_batched_tokens=1024)
    # LLM.__init__ forwards every keyword to EngineArgs (constructing one resolves the model: not here)
    assert not set(engine_kwargs(cfg, "some/model", 3)) - _keywords(EngineArgs)

    sampler = VLLMSampler.__new__(VLLMSampler)  # no engine: only the pieces that build vLLM objects
    sampler.api, sampler.dp_rank, sampler.config = load_vllm_api(), 1, cfg
    sp = sampler._sampling_params(SamplingParams(max_new_tokens=5, n=2, seed=3, stop_token_ids=(7,),
                                                 return_logprobs=True), index=4)
    assert (sp.max_tokens, sp.n, sp.logprobs, list(sp.stop_token_ids)) == (5, 2, 0, [7])
    req = LoRAJudge(sampler).request
    assert (req.lora_name, req.lora_int_id, req.lora_path) == ("wz_judge_1", 1, "/a")

    positions = [{4: Logprob(-0.5, rank=1)}, {9: Logprob(-1.5, rank=3), 2: Logprob(-0.1, rank=1)}]
    flat = FlatLogprobs()
    flat.extend(positions)
    for logprobs in (positions, flat):
        out = CompletionOutput(index=0, text="x", token_ids=[4, 9], cumulative_logprob=None,
                               logprobs=logprobs, finish_reason="length")
        c = _completion(out, True, 5)
        assert c.logprobs == [-0.5, -1.5] and c.token_ids == [4, 9] and c.weight_version == 5
