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

import importlib.util
import tempfile
from dataclasses import dataclass

import torch

from bench.checks import REL_TOL, Check, compare
from bench.harness import Case, Skipped


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


def shapes(device: str, size: str) -> list[StepShape]:
    if size == "quick":
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


def missing_packages() -> list[str]:
    """What this benchmark needs beyond the project: TRL's trainer and the datasets it takes."""
    return [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]


def loss_and_grad(trainer, inputs) -> dict[str, torch.Tensor]:
    """One compute_loss + backward: the loss and every parameter's gradient, flattened."""
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    return {"loss": loss.detach(), "grad": grad}


def cases(device: str, size: str):
    """Per shape, the three configurations; where trl or datasets is missing, rows that say so."""
    missing = missing_packages()
    if missing:
        skipped = Skipped(" and ".join(missing) + " not installed")
        for shape in shapes(device, size):
            for name in CASE_CONFIGS:
                yield Case(f"{name} {shape.label}", {"trl": skipped, "wz": skipped}, ours="wz")
        return
    from trl import GRPOTrainer

    from wz_engine.integrations.trl import WZGRPOTrainer

    for shape in shapes(device, size):
        model_dir = tempfile.mkdtemp(prefix="bench_trl_model_")
        _save_model(shape, model_dir)
        for name, (config, off_policy, with_ref) in CASE_CONFIGS.items():
            inputs = make_inputs(shape, device, off_policy=off_policy, with_ref=with_ref)
            trainers = {provider: make_trainer(cls, model_dir, shape, device, **config)
                        for provider, cls in (("trl", GRPOTrainer), ("wz", WZGRPOTrainer))}
            # WZGRPOTrainer's contract: TRL's loss and gradients, through the fused kernels (same weights)
            check = Check(lambda t=trainers["wz"], i=inputs: loss_and_grad(t, i),
                          lambda t=trainers["trl"], i=inputs: loss_and_grad(t, i), dtype=shape.dtype,
                          rel_tol=5e-2 if shape.dtype == torch.bfloat16 else None)
            tokens = int(inputs["completion_mask"].sum())
            yield Case(f"{name} {shape.label}", {p: step_fn(t, inputs) for p, t in trainers.items()},
                       check=check, ours="wz", extra={"tokens": tokens})


# ------------------------------------------------------------------------------- pytest-benchmark
def _quick_trainers(config: str):
    """(trainers by provider, inputs) of the quick CPU shape in one configuration."""
    import pytest

    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from trl import GRPOTrainer

    from wz_engine.integrations.trl import WZGRPOTrainer

    (shape,) = shapes("cpu", "quick")
    model_dir = tempfile.mkdtemp(prefix="bench_trl_model_")
    _save_model(shape, model_dir)
    overrides, off_policy, with_ref = CASE_CONFIGS[config]
    trainers = {p: make_trainer(cls, model_dir, shape, "cpu", **overrides)
                for p, cls in (("trl", GRPOTrainer), ("wz", WZGRPOTrainer))}
    return trainers, make_inputs(shape, "cpu", off_policy=off_policy, with_ref=with_ref)


def dapo_loss_reference(model, inputs, clip: float = 0.2) -> torch.Tensor:
    """The off-policy "dapo" loss from its definition, in plain torch (independent of TRL and wz):
    full logits, log_softmax, clipped ratio against the old log-probs, sum over completion tokens /
    num_items_in_batch."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)  # [B, P + T]
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    p = inputs["prompt_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, p - 1:-1]  # [B, T, V]
    logits = logits.float()
    logp = torch.log_softmax(logits, -1).gather(2, inputs["completion_ids"][..., None])[..., 0]  # [B, T]
    ratio = torch.exp(logp - inputs["old_per_token_logps"])
    adv = inputs["advantages"][:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    return (per_token * inputs["completion_mask"]).sum() / inputs["num_items_in_batch"]


def test_trl_step_trl(benchmark):
    """TRL's step (the peer) computes the off-policy dapo loss of its definition on the benchmark's batch."""
    trainers, inputs = _quick_trainers("off-policy")
    benchmark(step_fn(trainers["trl"], inputs))
    trl = trainers["trl"]
    with torch.no_grad():
        torch.testing.assert_close(trl.compute_loss(trl.model, inputs),
                                   dapo_loss_reference(trl.model, inputs), rtol=1e-5, atol=1e-7)


def test_trl_step_wz(benchmark):
    """WZGRPOTrainer's loss and gradients equal TRL's on the benchmark's batch (off-policy: fused loss)."""
    trainers, inputs = _quick_trainers("off-policy")
    benchmark(step_fn(trainers["wz"], inputs))
    compare(loss_and_grad(trainers["wz"], inputs), loss_and_grad(trainers["trl"], inputs),
            REL_TOL[torch.float32])
