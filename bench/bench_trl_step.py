"""One TRL GRPO training step (compute_loss + backward) with TRL's own loss vs WZGRPOTrainer.

`python -m bench trl_step --device cpu` prints time and peak memory (peak RSS growth on CPU, peak CUDA
allocation on GPU) for the same batch through:
    trl   trl.GRPOTrainer (1.16): chunked fused LM head -> per-token log-probs [B, T] -> loss in torch
    wz    wz_engine.integrations.trl.WZGRPOTrainer: backbone -> hidden [N, H] -> wz fused kernels
Cases: on-policy (TRL's default: old log-probs = the current ones), off-policy (old log-probs given, as with
num_iterations > 1: the single-pass fused_linear_policy_loss), and beta > 0 (KL against reference log-probs).
The batch is synthetic (random prompt/completion ids, ragged masks), so no generation is timed.
Model: a random Qwen2 built from a config (CPU: H=256, 2 layers, V=32000; GPU: H=2048, 4 layers, V=151936 bf16).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from bench.harness import Case


@dataclass(frozen=True)
class StepShape:
    """Model and batch of one benchmark case."""

    vocab: int
    hidden: int
    layers: int
    batch: int  # completions per micro-batch (B)
    prompt_len: int
    completion_len: int  # T = max_completion_length
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"B={self.batch} T={self.completion_len} H={self.hidden} V={self.vocab}"


def shapes(device: str, quick: bool) -> list[StepShape]:
    if quick:
        return [StepShape(vocab=4096, hidden=64, layers=1, batch=4, prompt_len=8, completion_len=32)]
    if device.startswith("cuda"):
        return [StepShape(vocab=151936, hidden=2048, layers=4, batch=16, prompt_len=128, completion_len=1024,
                          dtype=torch.bfloat16)]
    return [StepShape(vocab=32000, hidden=256, layers=2, batch=8, prompt_len=32, completion_len=256)]


def _save_model(shape: StepShape, path: str) -> None:
    from wz_engine.demo.tiny import build_tiny_qwen2

    model = build_tiny_qwen2(shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=4,
                             num_kv_heads=2, intermediate_size=2 * shape.hidden,
                             max_position_embeddings=shape.prompt_len + shape.completion_len + 8,
                             eos_token_id=1, pad_token_id=0)
    model.to(shape.dtype).save_pretrained(path)
    from wz_engine.demo.tiny import build_tokenizer

    build_tokenizer(["a small corpus for a benchmark tokenizer"] * 4, vocab_size=300).save_pretrained(path)


def make_trainer(cls, model_dir: str, shape: StepShape, device: str, **config):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=not device.startswith("cuda"),
                      per_device_train_batch_size=shape.batch, num_generations=2,
                      max_completion_length=shape.completion_len, report_to=[], save_strategy="no",
                      bf16=shape.dtype == torch.bfloat16, **config)
    trainer = cls(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["x"] * 4}),
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def make_inputs(shape: StepShape, device: str, *, off_policy: bool, with_ref: bool, seed: int = 0) -> dict:
    """A micro-batch as TRL's `_generate_and_score_completions` returns it (ragged completion lengths)."""
    gen = torch.Generator().manual_seed(seed)
    b, p, t = shape.batch, shape.prompt_len, shape.completion_len
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    completion_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    inputs = {
        "prompt_ids": torch.randint(2, shape.vocab, (b, p), generator=gen),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(2, shape.vocab, (b, t), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
    }
    if off_policy:
        inputs["old_per_token_logps"] = -10.0 + 0.1 * torch.randn(b, t, generator=gen)
    if with_ref:
        inputs["ref_per_token_logps"] = -10.0 + 0.1 * torch.randn(b, t, generator=gen)
    return {k: v.to(device) for k, v in inputs.items()}


def step_fn(trainer, inputs):
    def step():
        trainer.model.zero_grad(set_to_none=False)  # keep the .grad buffers: measure the step, not their first alloc
        trainer.compute_loss(trainer.model, inputs).backward()
    return step


CASE_CONFIGS = {  # name -> (GRPOConfig overrides, off_policy, with_ref)
    "on-policy": ({"loss_type": "dapo", "beta": 0.0}, False, False),
    "off-policy": ({"loss_type": "dapo", "beta": 0.0}, True, False),
    "beta=0.04": ({"loss_type": "grpo", "beta": 0.04}, False, True),
}


def cases(device: str, quick: bool) -> list[Case]:
    from trl import GRPOTrainer

    from wz_engine.integrations.trl import WZGRPOTrainer

    out = []
    for shape in shapes(device, quick):
        model_dir = tempfile.mkdtemp(prefix="bench_trl_model_")
        _save_model(shape, model_dir)
        for name, (config, off_policy, with_ref) in CASE_CONFIGS.items():
            inputs = make_inputs(shape, device, off_policy=off_policy, with_ref=with_ref)
            providers = {}
            for provider, cls in (("trl", GRPOTrainer), ("wz", WZGRPOTrainer)):
                fn = step_fn(make_trainer(cls, model_dir, shape, device, **config), inputs)
                fn()  # allocate the gradient buffers before anything is measured
                providers[provider] = fn
            tokens = int(inputs["completion_mask"].sum())
            out.append(Case(f"{name} {shape.label}", providers, extra={"tokens": tokens}))
    return out


# ------------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, provider: str):
    import pytest

    pytest.importorskip("trl")
    case = cases("cpu", quick=True)[1]  # off-policy: the single-pass fused loss
    benchmark(case.providers[provider])


def test_trl_step_trl(benchmark):
    _bench(benchmark, "trl")


def test_trl_step_wz(benchmark):
    _bench(benchmark, "wz")
