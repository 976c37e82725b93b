"""One training-side RL step (log-probs + policy loss + backward + AdamW step): wz's packed path vs the
TRL way, on the same rollouts.

`python -m bench train_step --device cpu` prints time, peak memory (peak RSS growth on CPU, peak CUDA
allocation on GPU) and model TFLOP/s per step; the `tokens` column is the real (unpadded prompt + response)
token count of the step, so tokens/s = tokens / ms * 1000 (the same count for both providers).
    wz        what the trainer does (wz_engine/trainer.py `Trainer.update`): `pack_for_update` into token-budget
              micro-batches, `accumulate_gradients` (FusedHeadCausalLM + fused_linear_policy_loss, on-policy
              old_logprobs=None, attention "wz_varlen"), `clip_and_norm`, AdamW step
    trl-way   the classic TRL GRPO recipe: left-padded prompts + right-padded completions [B, T], sdpa,
              `model(input_ids, attention_mask, logits_to_keep=C + 1).logits` (the full [B, C, V] logits),
              trl's `selective_log_softmax`, entropy under no_grad (`entropy_from_logits`), the "dapo"
              token-mean clipped loss with old = logp.detach(), backward, grad clip, AdamW step
On CPU the peak-RSS column is order-dependent: the second provider reuses heap the first one left mapped,
so wz (second) reads ~0; measured alone in a fresh process (malloc_trim first), the CPU case is trl-way
~1.2 GB vs wz ~0.25 GB. The GPU column (peak CUDA allocation) has no such bias.
(TRL 1.16's own GRPOTrainer, which now has a chunked fused LM head, is benchmarked in bench_trl_step.py.)
Both providers run one model per case (random init from a config, no download; the attention
implementation is switched with transformers' `set_attn_implementation`), the same optimizer and settings.
Shapes: CPU a tiny Qwen2 (H=256, 4 layers, V=32000); GPU Qwen2.5-0.5B- and 1.5B-shaped configs in bf16
with 32 / 16 rollouts, prompts 128-256 and responses 64-1024 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.checks import REL_TOL, Check, compare, run_check
from bench.harness import Case, optional_peer

LR = 1e-6
GRAD_CLIP = 1.0
CLIP_EPS = 0.2
TEMPERATURE = 1.0
PAD_ID = 0


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-family config (random weights)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True
    """Qwen2.5-0.5B / 1.5B tie the lm_head to the input embedding."""


@dataclass(frozen=True)
class RolloutMix:
    """The step's rollouts: lengths drawn uniformly (seeded) from the ranges."""

    rollouts: int
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    micro_batch_tokens: int = 4096
    """wz's token budget per micro-batch (train.micro_batch_tokens, the config default)."""


QWEN25_05B = ModelShape("0.5B", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
QWEN25_15B = ModelShape("1.5B", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936)
CPU_TINY = ModelShape("tiny", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=32000, tied=False)
CPU_QUICK = ModelShape("quick", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096, tied=False)


def shapes(device: str, size: str) -> list[tuple[ModelShape, RolloutMix, torch.dtype]]:
    if device.startswith("cuda"):
        if size == "quick":
            return [(QWEN25_05B, RolloutMix(8, (128, 256), (64, 256)), torch.bfloat16)]
        gpu = [(QWEN25_05B, RolloutMix(32, (128, 256), (64, 1024)), torch.bfloat16),
               (QWEN25_15B, RolloutMix(16, (128, 256), (64, 1024)), torch.bfloat16)]
        return gpu[:1] if size == "headline" else gpu
    if size == "quick":
        return [(CPU_QUICK, RolloutMix(3, (8, 24), (4, 40)), torch.float32)]
    return [(CPU_TINY, RolloutMix(6, (32, 96), (16, 256)), torch.float32)]


def build_model(shape: ModelShape, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Random-init Qwen2ForCausalLM built directly on `device` (no download), loaded with "wz_varlen"."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    import wz_engine.attention  # noqa: F401  (registers "wz_varlen" with transformers)

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=shape.tied, rope_theta=1e6, pad_token_id=PAD_ID, bos_token_id=None,
                         eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="wz_varlen")
    return model.train()


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: torch.Tensor  # [B] f32

    @property
    def tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids))

    @property
    def response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


def make_rollouts(mix: RolloutMix, vocab: int, seed: int = 0) -> Rollouts:
    gen = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        return torch.randint(1, vocab, (n,), generator=gen).tolist()

    prompts = [ids(*mix.prompt_len) for _ in range(mix.rollouts)]
    responses = [ids(*mix.response_len) for _ in range(mix.rollouts)]
    return Rollouts(prompts, responses, torch.randn(mix.rollouts, generator=gen))


# ------------------------------------------------------------------------------------------- wz
def wz_step(policy, optimizer, rollouts: Rollouts, micro_batch_tokens: int, device: str):
    """The trainer's training side: pack -> accumulate_gradients (on-policy) -> clip -> step."""
    from wz_engine.update import accumulate_gradients, clip_and_norm, pack_for_update

    in_loss = torch.ones(len(rollouts.prompt_ids), dtype=torch.bool)
    opts = {"clip_low": CLIP_EPS, "clip_high": CLIP_EPS, "agg": "token-mean"}  # ppo_clip's kernel options

    def step():
        policy.model.set_attn_implementation("wz_varlen")
        ub = pack_for_update(rollouts.prompt_ids, rollouts.response_ids, rollouts.advantages, in_loss,
                             micro_batch_tokens, PAD_ID)
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(policy, ub, None, None, device, TEMPERATURE, opts)
        clip_and_norm(policy, GRAD_CLIP)
        optimizer.step()

    return step


# ------------------------------------------------------------------------------------------ trl-way
def padded_batch(rollouts: Rollouts, device: str) -> dict[str, torch.Tensor]:
    """TRL's layout: prompts left-padded to P, completions right-padded to C."""
    p = max(len(x) for x in rollouts.prompt_ids)
    c = max(len(x) for x in rollouts.response_ids)
    b = len(rollouts.prompt_ids)
    prompt_ids = torch.full((b, p), PAD_ID, dtype=torch.long)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    completion_ids = torch.full((b, c), PAD_ID, dtype=torch.long)
    completion_mask = torch.zeros(b, c, dtype=torch.long)
    for i, (pr, re) in enumerate(zip(rollouts.prompt_ids, rollouts.response_ids)):
        prompt_ids[i, p - len(pr):] = torch.tensor(pr)
        prompt_mask[i, p - len(pr):] = 1
        completion_ids[i, :len(re)] = torch.tensor(re)
        completion_mask[i, :len(re)] = 1
    out = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),  # [B, P + C]
               "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
               "completion_ids": completion_ids, "completion_mask": completion_mask,  # [B, C]
               "advantages": rollouts.advantages}  # [B]
    return {k: v.to(device) for k, v in out.items()}


def trl_way_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits -> selective_log_softmax -> "dapo" token-mean clipped loss (old = logp.detach())."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    completion_ids, mask = batch["completion_ids"], batch["completion_mask"]
    c = completion_ids.shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=c + 1, use_cache=False).logits  # [B, C + 1, V]
    logits = logits[:, :-1, :] / TEMPERATURE  # [B, C, V]: position t predicts completion token t
    logps = selective_log_softmax(logits, completion_ids)  # [B, C]
    with torch.no_grad():
        entropy_from_logits(logits)  # TRL logs the entropy of every step
    ratio = torch.exp(logps - logps.detach())
    adv = batch["advantages"].unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    maskf = mask.to(per_token.dtype)
    return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)


def trl_way_step(model, optimizer, rollouts: Rollouts, device: str):
    batch = padded_batch(rollouts, device)

    def step():
        model.set_attn_implementation("sdpa")
        optimizer.zero_grad(set_to_none=True)
        trl_way_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


# ------------------------------------------------------------------------------------------- cases
def model_flops(shape: ModelShape, rollouts: Rollouts) -> float:
    """Useful (unpadded) forward + backward FLOPs of one step: 6 x matmul params x tokens, the lm_head on
    the response tokens, causal attention per sequence."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * shape.intermediate  # q, o, k, v, gate/up/down
    dense = 6 * shape.layers * per_layer * rollouts.tokens
    head = 6 * h * shape.vocab * rollouts.response_tokens
    lengths = [len(p) + len(r) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
    attention = 3 * shape.layers * 2 * h * sum(n * n for n in lengths)  # QK^T + PV, causal half, x3 for bwd
    return float(dense + head + attention)


def cases(device: str, size: str):
    """One case per model shape (built when its turn comes); trl-way is skipped where trl is missing."""
    for shape, mix, dtype in shapes(device, size):
        yield _case(shape, mix, dtype, device)


def _case(shape: ModelShape, mix: RolloutMix, dtype: torch.dtype, device: str) -> Case:
    from wz_engine.modeling import FusedHeadCausalLM

    model = build_model(shape, device, dtype)
    policy = FusedHeadCausalLM(model)
    # One AdamW (the trainer's defaults) for both providers: they share the model and its state.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    rollouts = make_rollouts(mix, shape.vocab)
    providers = {"trl-way": optional_peer("trl", "trl", trl_way_step(model, optimizer, rollouts, device)),
                 "wz": wz_step(policy, optimizer, rollouts, mix.micro_batch_tokens, device)}
    label = (f"{shape.name} B={mix.rollouts} P={mix.prompt_len[0]}-{mix.prompt_len[1]} "
             f"R={mix.response_len[0]}-{mix.response_len[1]}")
    padded = len(rollouts.prompt_ids) * (max(map(len, rollouts.prompt_ids))
                                         + max(map(len, rollouts.response_ids)))
    # bf16: two different kernel paths through a whole model's forward and backward round differently
    # (~1e-2 of the gradient's norm); a packing or masking bug gives errors of order 1
    check = Check(lambda: wz_loss_and_grad(policy, rollouts, mix.micro_batch_tokens, device),
                  lambda: reference_loss_and_grad(model, rollouts, device), dtype=dtype,
                  rel_tol=5e-2 if dtype == torch.bfloat16 else None)
    return Case(label, providers, check=check, ours="wz", flops=model_flops(shape, rollouts),
                extra={"tokens": rollouts.tokens, "response_tokens": rollouts.response_tokens,
                       "padded_tokens": padded})


# ------------------------------------------------------------------------------------------ check
def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def wz_loss_and_grad(policy, rollouts: Rollouts, micro_batch_tokens: int, device: str
                     ) -> dict[str, torch.Tensor]:
    """The wz step's loss and gradient (every parameter, flattened), without the optimizer step."""
    from wz_engine.update import accumulate_gradients, pack_for_update

    policy.model.set_attn_implementation("wz_varlen")
    ub = pack_for_update(rollouts.prompt_ids, rollouts.response_ids, rollouts.advantages,
                         torch.ones(len(rollouts.prompt_ids), dtype=torch.bool), micro_batch_tokens, PAD_ID)
    policy.model.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(policy, ub, None, None, device, TEMPERATURE,
                                   {"clip_low": CLIP_EPS, "clip_high": CLIP_EPS, "agg": "token-mean"})
    return {"loss": torch.as_tensor(metrics["loss"], dtype=torch.float64), "grad": _flat_grad(policy.model)}


def reference_loss_and_grad(model, rollouts: Rollouts, device: str) -> dict[str, torch.Tensor]:
    """Independent of wz's packing, attention and fused head: each rollout alone through the HF model
    (sdpa), full float32 logits, log_softmax, the on-policy clipped loss, token-mean over every response
    token of the step (each rollout's share differentiated on its own, so memory stays one sequence's, and
    the shares' gradients summed in float32)."""
    model.set_attn_implementation("sdpa")
    params = list(model.parameters())
    grad = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)  # [all params]
    total = float(rollouts.response_tokens)
    loss = torch.zeros((), dtype=torch.float64)
    advantages = rollouts.advantages.tolist()
    for prompt, response, adv in zip(rollouts.prompt_ids, rollouts.response_ids, advantages):
        ids = torch.tensor(prompt + response, device=device)[None]  # [1, P + R]
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]  # [R, V]
        logits = logits.float() / TEMPERATURE
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(response, device=device)[:, None])[:, 0]
        ratio = torch.exp(logp - logp.detach())
        share = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv).sum() / total
        grad += torch.cat([g.reshape(-1) for g in torch.autograd.grad(share, params)]).float()
        loss += share.detach().double().cpu()
    return {"loss": loss, "grad": grad}


def tokens_per_second(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(case, provider) -> real tokens per second, from `run_cases` rows."""
    return {(r["case"], r["provider"]): r["tokens"] / (r["ms"] * 1e-3) for r in rows if r.get("ms")}


# ------------------------------------------------------------------------------- pytest-benchmark
def test_train_step_wz(benchmark):
    """wz's step runs, and its loss and gradient equal the unpacked per-rollout reference's."""
    case = next(iter(cases("cpu", "quick")))
    benchmark.extra_info.update(case.extra)
    assert run_check(case.check) <= case.check.tolerance
    benchmark(case.providers["wz"])


def test_train_step_trl_way(benchmark):
    """The trl-way peer's loss and gradient equal the same reference (the table compares like with like)."""
    import pytest

    pytest.importorskip("trl")
    model = build_model(CPU_QUICK, "cpu", torch.float32)
    # equal prompt lengths: left padding does not shift trl-way's position ids
    rollouts = make_rollouts(RolloutMix(3, (12, 12), (4, 40)), CPU_QUICK.vocab)
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    loss = trl_way_loss(model, padded_batch(rollouts, "cpu"))
    loss.backward()
    compare({"loss": loss.detach(), "grad": _flat_grad(model)},
            reference_loss_and_grad(model, rollouts, "cpu"), REL_TOL[torch.float32])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    benchmark(trl_way_step(model, optimizer, rollouts, "cpu"))


def test_train_step_providers_agree():
    """Both providers compute the same loss and gradient (equal prompt lengths, so left padding does not
    shift trl-way's position ids; a small token budget, so wz accumulates over several micro-batches)."""
    import pytest

    pytest.importorskip("trl")
    from wz_engine.modeling import FusedHeadCausalLM
    from wz_engine.update import accumulate_gradients, pack_for_update

    model = build_model(CPU_QUICK, "cpu", torch.float32)
    rollouts = make_rollouts(RolloutMix(3, (12, 12), (4, 40)), CPU_QUICK.vocab)
    ub = pack_for_update(rollouts.prompt_ids, rollouts.response_ids, rollouts.advantages,
                         torch.ones(3, dtype=torch.bool), 64, PAD_ID)
    assert len(ub.batches) > 1
    metrics = accumulate_gradients(FusedHeadCausalLM(model), ub, None, None, "cpu", TEMPERATURE,
                                   {"clip_low": CLIP_EPS, "clip_high": CLIP_EPS, "agg": "token-mean"})
    wz_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation("sdpa")
    loss = trl_way_loss(model, padded_batch(rollouts, "cpu"))
    loss.backward()
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, p), g in zip(model.named_parameters(), wz_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
