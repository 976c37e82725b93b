"""The trainer: `Trainer.step()` is one training step as a straight line (DESIGN.md section 4),

    prompts -> rollout -> judge / rewards -> advantages -> packing -> old/ref log-probs -> update
            -> weight sync -> log, checkpoint

and `Trainer.fit()` the loop around it (logging, checkpoints, signals). The entry point is `train.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from wz_engine import checkpoint as ckpt
from wz_engine import distributed as wzdist
from wz_engine.build import HF_CONFIG_DIR, TOKENIZER_DIR, build_reward_source, build_sampler, build_tokenizer_and_model
from wz_engine.config import RunConfig
from wz_engine.data import PromptStream, load_rows, render_prompts, split_holdout
from wz_engine.export import export_model
from wz_engine.metrics import MetricsLogger, PhaseTimer, reward_monitors
from wz_engine.modeling import FusedHeadCausalLM
from wz_engine.rewards.advantages import compute_advantages, loss_rows
from wz_engine.rewards.dapo import informative_groups, overlong_penalty
from wz_engine.rollout.base import SamplingParams
from wz_engine.update import (LossOptions, accumulate_gradients, apply_rollout_correction, clip_and_norm,
                              lr_lambda, model_inputs, pack_for_update, packed_logprobs)

log = logging.getLogger("wz_engine")


def _seed_for(*keys: int) -> int:
    return int(np.random.default_rng([int(k) for k in keys]).integers(0, 2**62))


@dataclasses.dataclass
class Rollouts:
    """This rank's groups for one step, with their rewards and advantages (rows prompt-major)."""

    prompts: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    """groups[p][j]: Completion j of prompt p."""
    rows: dict = dataclasses.field(default_factory=lambda: {k: [] for k in _ROW_KEYS})
    """Per-row tensors [G] per group: rewards, is_ref, adv, in_loss, skew (kept by the skew filter)."""
    judge_stats: dict = dataclasses.field(default_factory=dict)
    rounds: int = 0

    def add(self, prompt, group, *row_values) -> None:
        self.prompts.append(prompt)
        self.groups.append(group)
        for key, value in zip(_ROW_KEYS, row_values):
            self.rows[key].append(value)

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat(self.rows[key]) if self.rows[key] else torch.zeros(0)

    def prompt_ids(self) -> list[list[int]]:
        return [list(p.token_ids) for p, g in zip(self.prompts, self.groups) for _ in g]

    def response_ids(self) -> list[list[int]]:
        return [list(c.token_ids) for g in self.groups for c in g]


_ROW_KEYS = ("rewards", "is_ref", "adv", "in_loss", "skew")


class Trainer:
    """Holds the run's state; `step()` is the straight line above, `fit()` the loop around it."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.info = wzdist.init_distributed(cfg.distributed.backend)
        self.out = Path(cfg.train.output_dir)
        self.device = self.info.device
        P, W = cfg.rollout.prompts_per_step, self.info.world_size
        if P % W:
            raise ValueError(f"rollout.prompts_per_step: {P} is not divisible by the world size {W}")
        if self.device.type == "cpu" and cfg.train.cpu_threads > 0:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)

        rows = load_rows(cfg.data)
        tokenizer, lm = build_tokenizer_and_model(cfg, self.out, [str(r[cfg.data.prompt_field]) for r in rows])
        self.tokenizer = tokenizer
        prompts, self.filtered = render_prompts(rows, tokenizer, cfg.data)
        self.train_prompts, self.holdout_prompts = split_holdout(prompts, cfg.data.holdout)
        self.stream = PromptStream(self.train_prompts, cfg.train.seed, cfg.data.shuffle)

        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(str(self.out / TOKENIZER_DIR))
            lm.config.save_pretrained(str(self.out / HF_CONFIG_DIR))
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

        ref_lm = copy.deepcopy(lm).requires_grad_(False) if cfg.algorithm.kl_coef > 0 else None
        if cfg.model.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.to(self.device)
        self.policy = wzdist.shard_model(FusedHeadCausalLM(lm), lm, self.info, cfg.distributed.mixed_precision,
                                         cfg.distributed.reshard_after_forward)
        self.ref = None
        if ref_lm is not None:
            ref_lm.to(self.device)
            self.ref = wzdist.shard_model(FusedHeadCausalLM(ref_lm), ref_lm, self.info, cfg.distributed.mixed_precision)
            self.ref.eval()
        self._warm_up_fsdp()

        oc = cfg.optim
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=oc.lr,
                                           betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(oc.warmup_steps, cfg.train.steps, oc.schedule, oc.min_lr_ratio))
        self.sampler = build_sampler(cfg, self.policy, tokenizer, self.info)
        self.rewarder = build_reward_source(cfg, lm, tokenizer, self.device,
                                            lambda: wzdist.gathered_for_generation(self.policy), self.sampler)
        self.step_idx = 0  # completed steps
        self.nonfinite_in_a_row = 0
        self.stop_requested = False
        self.last_sample: dict | None = None
        # Escape hatch from the on-policy fast path (`_on_policy`): run the separate old-logprob pass
        # anyway. Read from the config when it has the field, settable on the trainer.
        self.recompute_old_logprobs = cfg.algorithm.recompute_old_logprobs

        if resume:
            path = ckpt.latest_checkpoint(self.out)
            if path is None:
                raise ValueError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
            state = ckpt.load_checkpoint(path, self.policy, self.optimizer, self.info.rank)
            self.step_idx = state["step"]
            self.stream.load_state_dict(state["data"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
            if hasattr(self.sampler, "load_state_dict") and "sampler" in state:
                self.sampler.load_state_dict(state["sampler"])
            if self.info.is_main:
                _truncate_metrics(self.out, self.step_idx)
                log.info("resumed from %s (step %d)", path, self.step_idx)
        self.logger = MetricsLogger(self.out, self.info.is_main, cfg.logging.tensorboard, cfg.logging.wandb,
                                    cfg.logging.wandb_project, cfg.to_dict(), resume=resume)

    def _warm_up_fsdp(self) -> None:
        """Run one tiny forward through each FSDP root so it initialises as the root before the sampler
        calls its submodules directly."""
        if not self.info.enabled:
            return
        from wz_engine.packing import pack_rl_batch

        dummy = pack_rl_batch([[self.tokenizer.pad_token_id]], [[]], 8)[0].to(self.device)
        with torch.no_grad():
            for m in (self.policy, self.ref):
                if m is not None:
                    m(**model_inputs(dummy, m.config))

    # -- phases ---------------------------------------------------------------------------------
    def _use_tis(self) -> bool:
        return self.cfg.rollout.sampler == "vllm" and bool(getattr(self.cfg.rollout.vllm, "is_correction", False))

    def _on_policy(self) -> bool:
        """Whether the update can take each token's own detached log-prob as the old one and skip the
        separate old-logprob pass (one pass over the vocabulary less per micro-batch).

        The trainer takes exactly one optimizer step per rollout batch and the old log-probs are always
        recomputed from the current weights, so they equal the update's own: ratio 1, clip inactive.
        Kept: with vLLM's truncated-IS correction (it weighs the trainer's old log-probs against the
        engine's before the update), and when `recompute_old_logprobs` asks for it. Anything new that
        reads old log-probs outside the loss must be added here."""
        return not self._use_tis() and not self.recompute_old_logprobs

    def _sampling_params(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, n=r.group_size, return_logprobs=self._use_tis())

    def hf_model(self) -> torch.nn.Module:
        """The HF causal LM inside the FusedHeadCausalLM wrapper (FSDP2-sharded or not): what the
        sampler syncs from, since vLLM's `load_weights` takes HF parameter names (no "model." prefix)."""
        return self.policy.model

    def sync_weights(self, version: int, timer: PhaseTimer | None = None) -> None:
        """Push the policy into the sampler tagged `version` (collective with vLLM under FSDP2)."""
        with timer("sync") if timer is not None else contextlib.nullcontext():
            self.sampler.update_weights(self.hf_model(), version)

    def rollout(self, prompts) -> list[list]:
        """Completions [P_local][G]. With `rollout.seed_per_prompt` every prompt is sampled alone with a
        seed from (seed, step, uid): the samples then do not depend on the world size or batching.
        vLLM: the completions must carry the trainer's weight version (a stale engine is an error)."""
        params = self._sampling_params()
        if not self.cfg.rollout.seed_per_prompt:
            groups = self.sampler.generate([p.token_ids for p in prompts], params)
        else:
            groups = [self.sampler.generate([p.token_ids], dataclasses.replace(
                params, seed=_seed_for(self.cfg.train.seed, self.step_idx, p.uid)))[0] for p in prompts]
        if self.cfg.rollout.sampler == "vllm" and self.cfg.rollout.vllm.check_weight_version:
            from wz_engine.rollout.vllm import assert_weight_version

            assert_weight_version(groups, self.step_idx)
        return groups

    def rewards(self, prompts, groups) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> rewards [B], is_reference [B] bool, judge stats."""
        cfg = self.cfg
        texts = [[c.text for c in g] for g in groups]
        if cfg.judge.kind in ("callable", "genrm"):
            from wz_engine.rewards.brpo import assemble_brpo_rewards

            out = assemble_brpo_rewards(self.rewarder, [p.text for p in prompts], texts, [p.uid for p in prompts],
                                        step=self.step_idx, seed=cfg.train.seed, votes=cfg.algorithm.votes,
                                        inconsistent=cfg.algorithm.inconsistent,
                                        references=[p.reference for p in prompts])
            return out.rewards, out.is_reference, out.stats
        flat_prompts = [p.text for p, g in zip(prompts, texts) for _ in g]
        flat_refs = [p.reference for p, g in zip(prompts, texts) for _ in g]
        scores = self.rewarder.score(flat_prompts, [t for g in texts for t in g], flat_refs)
        r = torch.tensor(scores, dtype=torch.float32)
        return r, torch.zeros_like(r, dtype=torch.bool), {}

    def advantages(self, prompts, groups, rewards, is_ref):
        """-> advantages [B], rows in the loss [B] bool, kept-by-skew-filter [B] bool."""
        a = self.cfg.algorithm
        group_ids = torch.tensor([p.uid for p, g in zip(prompts, groups) for _ in g], dtype=torch.long)
        if len(group_ids) == 0:
            z = torch.zeros(0)
            return z, z.bool(), z.bool()
        adv = compute_advantages(a.estimator, rewards, group_ids, a.skew_threshold)
        values = adv.values
        if a.overlong_buffer > 0:
            lengths = torch.tensor([len(c.token_ids) for g in groups for c in g])
            values = values + overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, a.overlong_buffer,
                                               a.overlong_penalty) * adv.kept
        in_loss = loss_rows(a.estimator, is_ref, a.keep_reference)
        values = torch.where(is_ref, torch.zeros_like(values), values)
        return values, in_loss, adv.kept

    # -- one step -------------------------------------------------------------------------------
    def collect(self, timer: PhaseTimer) -> Rollouts:
        """Rollout -> rewards -> advantages for this rank's share of the global batch. With DAPO dynamic
        sampling, groups without signal are dropped and more prompts drawn (all ranks draw together)
        until every rank has its share or `algorithm.max_sampling_rounds` is reached."""
        cfg, info = self.cfg, self.info
        P_local, G = cfg.rollout.prompts_per_step // info.world_size, cfg.rollout.group_size
        got = Rollouts()
        while True:
            got.rounds += 1
            batch = self.stream.next_batch(cfg.rollout.prompts_per_step)
            local = batch[info.rank * P_local:(info.rank + 1) * P_local]
            if self.sampler.weight_version != self.step_idx:
                # first step / resumed, or a swapped-in vLLM judge replaced the policy between rounds
                self.sync_weights(self.step_idx, timer)
            with timer("rollout"):
                groups = self.rollout(local)
            with timer("judge"):
                rewards, is_ref, stats = self.rewards(local, groups)
            got.judge_stats = stats or got.judge_stats
            with timer("advantage"):
                adv, in_loss, skew_kept = self.advantages(local, groups, rewards, is_ref)
            keep = torch.ones(len(adv), dtype=torch.bool)
            if cfg.algorithm.dynamic_sampling and len(adv):
                keep = informative_groups(adv, torch.tensor([p.uid for p in local for _ in range(G)]))
            for i, (p, g) in enumerate(zip(local, groups)):
                if bool(keep[i * G]) and len(got.prompts) < P_local:
                    rows = slice(i * G, (i + 1) * G)
                    got.add(p, g, rewards[rows], is_ref[rows], adv[rows], in_loss[rows], skew_kept[rows])
            if not cfg.algorithm.dynamic_sampling:
                break
            short = float(wzdist.all_reduce(float(P_local - len(got.prompts)), op="max"))
            if short <= 0 or got.rounds >= cfg.algorithm.max_sampling_rounds:
                break
        return got

    def update(self, ub, old_lps, ref_lps, temperature: float) -> tuple[dict, float, float, bool]:
        """Accumulate gradients over the micro-batches, clip, and step (skipped when non-finite).
        -> (loss metrics, grad norm, learning rate used, whether the step was taken)."""
        a = self.cfg.algorithm
        loss_scale = (a.loss_scale or float(self.cfg.rollout.max_new_tokens)) \
            if a.agg == "seq-mean-token-sum-norm" else None
        opts = LossOptions(a.clip_low, a.clip_high, a.dual_clip, a.kl_coef, a.kl_estimator, a.agg, loss_scale)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(self.policy, ub, old_lps, ref_lps, self.device, temperature, opts)
        grad_norm = clip_and_norm(self.policy, self.cfg.optim.grad_clip)
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss (%s) or grad norm (%s): skipped (%d in a row)",
                        self.step_idx + 1, metrics["loss"], grad_norm, self.nonfinite_in_a_row)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # the schedule follows steps, skipped ones included
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return metrics, grad_norm, lr, finite

    def step(self) -> dict:
        """One training step: the straight line of DESIGN.md section 4."""
        cfg = self.cfg
        timer = PhaseTimer()
        t0 = time.perf_counter()
        # hf sampler under FSDP2: gather the shards once for rollout + judge (collective-free inside).
        gather = wzdist.gathered_for_generation(self.policy) if cfg.rollout.sampler == "hf" \
            else contextlib.nullcontext()
        with gather:
            got = self.collect(timer)
        self.sampler.sleep()  # vLLM: free the engine's memory for training (no-op for hf)
        with timer("pack"):
            ub = pack_for_update(got.prompt_ids(), got.response_ids(), got.cat("adv"), got.cat("in_loss").bool(),
                                 cfg.train.micro_batch_tokens, self.tokenizer.pad_token_id)
        temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.policy.train()
        with timer("logprob"):
            # on-policy: old log-probs (and the logged entropy) come out of the update's own pass
            old_lps, ents = (None, None) if self._on_policy() else packed_logprobs(
                self.policy, ub, self.device, temperature, return_entropy=True)
            ref_lps = packed_logprobs(self.ref, ub, self.device, temperature)[0] if self.ref is not None else None
        tis = {}
        if self._use_tis():
            engine = [torch.tensor(c.logprobs, dtype=torch.float32) for g in got.groups for c in g]
            tis = apply_rollout_correction(ub, old_lps, engine, cfg.rollout.vllm.is_correction_cap)
        with timer("update"):
            metrics, grad_norm, lr, finite = self.update(ub, old_lps, ref_lps, temperature)
        self.sync_weights(self.step_idx + 1, timer)
        self.step_idx += 1
        if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise RuntimeError(f"aborting: {self.nonfinite_in_a_row} consecutive steps had a non-finite loss or "
                               f"gradient (train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps}); "
                               "lower optim.lr or check the rewards")
        if got.groups:
            self.last_sample = {"prompt": got.prompts[0].text, "response": got.groups[0][0].text,
                                "reward": float(got.cat("rewards")[0]), "advantage": float(got.cat("adv")[0])}
        cat = {k: got.cat(k) for k in ("rewards", "skew")}
        out = self._step_metrics(metrics, grad_norm, lr, finite, timer, t0, ub, ents, cat, got.groups,
                                 got.judge_stats, got.rounds)
        last_sync = getattr(self.sampler, "last_sync", None)  # vLLM: seconds, GB/s, bytes of the push
        return {**out, **tis, **(last_sync.as_log() if last_sync is not None else {})}

    def _step_metrics(self, metrics, grad_norm, lr, finite, timer, t0, ub, ents, cat, groups, judge_stats, rounds):
        lengths = torch.tensor([len(c.token_ids) for g in groups for c in g], dtype=torch.float64)
        masks = ub.masks
        ent_sum = 0.0 if ents is None else sum(float((e * m).sum()) for e, m in zip(ents, masks))
        tokens = sum(b.num_tokens for b in ub.batches)
        n_groups = len(groups)
        dropped = float((~cat["skew"].bool()).sum()) / max(self.cfg.rollout.group_size, 1) if len(cat["skew"]) else 0
        # Gather what needs all ranks (sums), then per-rank monitors from rank 0's shard + sums.
        sums = wzdist.all_reduce(torch.tensor([ent_sum, float(tokens), float(n_groups), dropped,
                                               float(lengths.sum()), float(len(lengths)),
                                               float(lengths.max()) if len(lengths) else 0.0],
                                              dtype=torch.float64))
        max_len = float(wzdist.all_reduce(float(lengths.max()) if len(lengths) else 0.0, op="max"))
        all_rewards = torch.cat([torch.as_tensor(x) for x in wzdist.all_gather_object(cat["rewards"].tolist())])
        all_lengths = torch.cat([torch.as_tensor(x, dtype=torch.float64)
                                 for x in wzdist.all_gather_object(lengths.tolist())])
        wall = time.perf_counter() - t0
        out = {**metrics, "grad_norm": grad_norm, "lr": lr, "skipped": not finite,
               # on-policy there is no old pass: the update's pass measured it (global token mean)
               "entropy": metrics["entropy"] if ents is None else float(sums[0]) / ub.global_tokens,
               "tokens": float(sums[1]), "tokens_per_s": float(sums[1]) / wall, "time/step": wall,
               "brpo/skew_drop_rate": float(sums[3]) / max(float(sums[2]), 1.0), "sampling_rounds": rounds,
               "data/filtered_prompts": self.filtered, "data/epoch": self.stream.epoch}
        if len(all_rewards):
            out.update(reward_monitors(all_rewards, all_lengths))
        out["response/length_max"] = max_len
        # Judge monitors: averaged across ranks (each rank judged its own groups).
        for k, v in judge_stats.items():
            vals = [x for x in wzdist.all_gather_object(v) if x is not None and not math.isnan(x)]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        out.update(timer.pop())
        out["time/step"] = wall
        return out

    # -- loop -----------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step_idx, "data": self.stream.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "nonfinite_in_a_row": self.nonfinite_in_a_row}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        return ckpt.save_checkpoint(self.out, self.step_idx, self.policy, self.optimizer, state, self.cfg.to_dict(),
                                    self.info.rank, keep=self.cfg.checkpoint.keep)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self.stop_requested = True
            log.warning("received signal %d: finishing this step, then checkpoint and exit", signum)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return previous

    def fit(self) -> dict:
        cfg = self.cfg
        previous = self._install_signal_handlers()
        bar = None
        if cfg.logging.progress_bar and self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step_idx, desc="train", dynamic_ncols=True)
        last: dict = {}
        saved_at = -1
        try:
            while self.step_idx < cfg.train.steps:
                last = self.step()
                self.logger.log(self.step_idx, last)
                every = cfg.logging.samples_every
                if every and self.step_idx % every == 0 and self.last_sample:
                    self.logger.log_sample(self.step_idx, self.last_sample)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{last.get('reward/mean', float('nan')):.3f}",
                                    len=f"{last.get('response/length_mean', 0):.1f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                stop = bool(wzdist.all_reduce(float(self.stop_requested), op="max") > 0)
                if (cfg.checkpoint.every and self.step_idx % cfg.checkpoint.every == 0) or stop:
                    self.save()
                    saved_at = self.step_idx
                if stop:
                    log.warning("stopped by signal after step %d (checkpoint written)", self.step_idx)
                    break
            if saved_at != self.step_idx:
                self.save()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.logger.close()
        if self.cfg.checkpoint.export_at_end:
            self.export(self.out / "export")
        return last

    def export(self, out_dir: str | Path) -> Path:
        """HF export of the current policy (collective: full weights gathered to rank 0 on CPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            prefix = "model."
            state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            export_model(self.policy.model, self.tokenizer, out_dir, state_dict=state)
        wzdist.barrier()
        return Path(out_dir)


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint a run resumes from (they will be logged again)."""
    path = out / "metrics.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
