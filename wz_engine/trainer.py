"""The trainer: `Trainer.step()` is one training step as a straight line (DESIGN.md section 4),

    prompts -> rollout -> judge / rewards -> advantages -> packing -> old/ref log-probs -> update
            -> weight sync -> log, checkpoint

and `Trainer.fit()` the loop around it (logging, checkpoints, signals). The entry point is `train.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from wz_engine import chaos, rundir
from wz_engine import checkpoint as ckpt
from wz_engine import distributed as wzdist
from wz_engine.algorithms import ESTIMATORS, POLICY_LOSSES, REWARD_SOURCES, AdvantageInputs
from wz_engine.algorithms.reward_source import load_prompt_rows
from wz_engine.build import (HF_CONFIG_DIR, TOKENIZER_DIR, build_collector, build_reward_source, build_sampler,
                             build_tokenizer_and_model)
from wz_engine.config import RunConfig
from wz_engine.data import PromptStream, render_prompts, split_holdout
from wz_engine.export import export_live_policy
from wz_engine.metrics import MetricsLogger, PhaseTimer, progress_postfix, step_metrics
from wz_engine.modeling import FusedHeadCausalLM
from wz_engine.monitors import ZeroSignalWatch, rollout_monitors
from wz_engine.rewards.dapo import informative_groups, overlong_penalty
from wz_engine.rollout.base import SamplingParams
from wz_engine.rollout.batch import Rollouts
from wz_engine.schedule import combine_updates, mini_batch_rows, num_mini_batches
from wz_engine.update import (accumulate_gradients, apply_rollout_correction, clip_and_norm, lr_lambda,
                              pack_for_update, packed_logprobs, warm_up_roots)

log = logging.getLogger("wz_engine")


_MINI_BATCH_SALT = 0x6D62  # keeps the mini-batch shuffle's seeds apart from the per-prompt sampling seeds


def _seed_for(*keys: int) -> int:
    return int(np.random.default_rng([int(k) for k in keys]).integers(0, 2**62))


class Trainer:
    """Holds the run's state; `step()` is the straight line above, `fit()` the loop around it."""

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False):
        """`resume`: continue the run in `train.output_dir`; `overwrite`: move the run there aside and start
        a new one. Without either, a directory that holds a run is refused (rundir.py)."""
        self.cfg = cfg
        self.info = wzdist.init_distributed(cfg.distributed.backend)
        self.out = Path(cfg.train.output_dir)
        self.run = rundir.claim(self.out, resume, overwrite, self.info.is_main)
        self.device = self.info.device
        P, W = cfg.rollout.prompts_per_step, self.info.world_size
        if P % W:
            raise ValueError(f"rollout.prompts_per_step: {P} is not divisible by the world size {W}")
        self.mini_batches = num_mini_batches(P, cfg.algorithm.ppo_mini_batch_size)
        self.updates_per_rollout = cfg.algorithm.ppo_epochs * self.mini_batches
        self.estimator = ESTIMATORS.get(cfg.algorithm.estimator)
        self.loss_fn = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        self.reward_source = REWARD_SOURCES.get(cfg.judge.kind)
        if self.device.type == "cpu" and cfg.train.cpu_threads > 0:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        random.seed(cfg.train.seed)  # every RNG a checkpoint restores starts from the seed

        rows = load_prompt_rows(cfg)  # data.path's, or the reward source's own (judge prompts of preference pairs)
        tokenizer, lm = build_tokenizer_and_model(cfg, self.out, [str(r[cfg.data.prompt_field]) for r in rows])
        self.tokenizer = tokenizer
        prompts, self.filtered = render_prompts(rows, tokenizer, cfg.data)
        self.train_prompts, self.holdout_prompts = split_holdout(prompts, cfg.data.holdout)
        self.stream = PromptStream(self.train_prompts, cfg.train.seed, cfg.data.shuffle)

        if self.info.is_main:
            rundir.save_dir_once(self.out / TOKENIZER_DIR, lambda d: tokenizer.save_pretrained(str(d)))
            rundir.save_dir_once(self.out / HF_CONFIG_DIR, lambda d: lm.config.save_pretrained(str(d)))
            rundir.write_json_atomic(self.out / "config.json", cfg.to_dict())

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
        chaos.arm_optimizer(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(oc.warmup_steps, cfg.train.steps * self.updates_per_rollout, oc.schedule,
                                      oc.min_lr_ratio))
        self.sampler = build_sampler(cfg, self.policy, tokenizer, self.info)
        self.rewarder = build_reward_source(cfg, lm, tokenizer, self.device,
                                            lambda: wzdist.gathered_for_generation(self.policy), self.sampler)
        self.collector = build_collector(self)  # the collect phase: prompts (self.collect) or env episodes
        self.step_idx = 0  # completed rollout steps
        self.optimizer_step = 0  # optimizer steps taken (or skipped as non-finite)
        self.zero_signal = ZeroSignalWatch.from_config(cfg.train)
        self.last_updates: list = []  # the last rollout step's optimizer steps: (metrics, grad norm, lr, taken)
        self.checkpointed_step = -1  # the step of the newest checkpoint of this process's state
        self.nonfinite_in_a_row = 0
        self.stop_requested = False
        self.last_sample: dict | None = None
        # Escape hatch from the on-policy fast path (`_on_policy`): run the separate old-logprob pass
        # anyway. Read from the config when it has the field, settable on the trainer.
        self.recompute_old_logprobs = cfg.algorithm.recompute_old_logprobs

        if resume:
            path = ckpt.resume_point(self.out, self.run.run_id, cfg.checkpoint.keep)  # newest that verifies
            if path is not None:
                state = ckpt.load_checkpoint(path, self.policy, self.optimizer, self.info.rank)
                self.step_idx = state["step"]
                self.optimizer_step = state.get("optimizer_step", self.step_idx)
                self.stream.load_state_dict(state["data"])
                self.scheduler.load_state_dict(state["scheduler"])
                self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
                if hasattr(self.sampler, "load_state_dict") and "sampler" in state:
                    self.sampler.load_state_dict(state["sampler"])
                self.collector.load_state_dict(state.get("collector", {}))
                self.zero_signal.load_state_dict(state.get("zero_signal", {}))
                self.checkpointed_step = self.step_idx
            if self.info.is_main:
                rundir.trim_logs(self.out, self.step_idx)
                log.info("resumed run %s from %s (step %d)", self.run.run_id, path, self.step_idx)
            chaos.point("resumed")
        self.logger = MetricsLogger(self.out, self.info.is_main, cfg.logging.tensorboard, cfg.logging.wandb,
                                    cfg.logging.wandb_project, cfg.to_dict(), resume=resume,
                                    resume_step=self.step_idx)

    def _warm_up_fsdp(self) -> None:
        """Run one tiny forward through each FSDP root so it initialises as the root before the sampler
        calls its submodules directly."""
        if self.info.enabled:
            warm_up_roots([self.policy, self.ref], self.tokenizer.pad_token_id, self.device)

    # -- phases ---------------------------------------------------------------------------------
    def _use_tis(self) -> bool:
        return self.cfg.rollout.sampler == "vllm" and bool(getattr(self.cfg.rollout.vllm, "is_correction", False))

    def _on_policy(self) -> bool:
        """Whether the update can take each token's own detached log-prob as the old one and skip the
        separate old-logprob pass (one pass over the vocabulary less per micro-batch).

        With exactly one optimizer step per rollout batch the old log-probs (recomputed from the current
        weights) equal the update's own: ratio 1, clip inactive. Kept: with several optimizer steps
        (epochs x mini-batches: from the second on the weights have moved), with vLLM's truncated-IS
        correction (it weighs the trainer's old log-probs against the engine's before the update), and
        when `recompute_old_logprobs` asks for it. Anything new that reads old log-probs outside the
        loss must be added here."""
        return self.updates_per_rollout == 1 and not self._use_tis() and not self.recompute_old_logprobs

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
        """-> rewards [B], is_reference [B] bool, judge stats (from the reward source `judge.kind`)."""
        out = self.reward_source.group_rewards(self.rewarder, prompts, groups, self.step_idx, self.cfg)
        return out.rewards, out.is_reference, out.stats

    def advantages(self, prompts, groups, rewards, is_ref):
        """-> advantages [B], rows in the loss [B] bool, kept-by-the-estimator [B] bool. The rewards are
        checked here on the host (the estimator's kernels then run without a device sync)."""
        a = self.cfg.algorithm
        group_ids = torch.tensor([p.uid for p, g in zip(prompts, groups) for _ in g], dtype=torch.long)
        if len(group_ids) == 0:
            z = torch.zeros(0)
            return z, z.bool(), z.bool()
        lengths = torch.tensor([len(c.token_ids) for g in groups for c in g])
        adv = self.estimator(AdvantageInputs(rewards, group_ids, is_ref, lengths), a)
        values = adv.values
        if a.overlong_buffer > 0:
            values = values + overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, a.overlong_buffer,
                                               a.overlong_penalty) * adv.kept
        # a group's reference rollout stays out of the loss unless keep_reference (then with A = 0)
        in_loss = ~is_ref | a.keep_reference
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
        """One optimizer step on one mini-batch: accumulate gradients over its micro-batches, clip, and
        step (skipped when non-finite). -> (loss metrics, grad norm, learning rate used, step taken)."""
        options = self.loss_fn.options(self.cfg.algorithm, self.cfg.rollout.max_new_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(self.policy, ub, old_lps, ref_lps, self.device, temperature, options,
                                       self.loss_fn)
        grad_norm = clip_and_norm(self.policy, self.cfg.optim.grad_clip)
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        self.optimizer_step += 1
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            log.warning("step %d (optimizer step %d): non-finite loss (%s) or grad norm (%s): skipped (%d in a row)",
                        self.step_idx + 1, self.optimizer_step, metrics["loss"], grad_norm, self.nonfinite_in_a_row)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # the schedule follows optimizer steps, skipped ones included
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return metrics, grad_norm, lr, finite

    def optimize(self, ubs, olds, refs, temperature: float) -> dict:
        """`algorithm.ppo_epochs` passes over the mini-batches, one optimizer step each (wz_engine.schedule)."""
        self.last_updates = [self.update(ub, old, ref, temperature)
                             for _ in range(self.cfg.algorithm.ppo_epochs) for ub, old, ref in zip(ubs, olds, refs)]
        return combine_updates(self.last_updates)

    def step(self) -> dict:
        """One rollout step: the straight line of DESIGN.md section 4 (ppo_epochs x mini-batches updates)."""
        cfg = self.cfg
        timer = PhaseTimer()
        t0 = time.perf_counter()
        # hf sampler under FSDP2: gather the shards once for rollout + judge (collective-free inside).
        gather = wzdist.gathered_for_generation(self.policy) if cfg.rollout.sampler == "hf" \
            else contextlib.nullcontext()
        with gather:
            got = self.collector.collect(timer)
        self.sampler.sleep()  # vLLM: free the engine's memory for training (no-op for hf)
        with timer("pack"):
            P_local = cfg.rollout.prompts_per_step // self.info.world_size
            parts = mini_batch_rows(len(got.groups), got.group_rows(), self.mini_batches,
                                    _seed_for(_MINI_BATCH_SALT, cfg.train.seed, self.step_idx),
                                    self.info.rank * P_local, cfg.rollout.prompts_per_step)
            prompts, responses, adv, in_loss = got.prompt_ids(), got.response_ids(), got.cat("adv"), got.cat("in_loss")
            ubs = [pack_for_update([prompts[i] for i in rows.tolist()], [responses[i] for i in rows.tolist()],
                                   adv[rows], in_loss.bool()[rows], cfg.train.micro_batch_tokens,
                                   self.tokenizer.pad_token_id) for rows in parts]
        temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.policy.train()
        with timer("logprob"):
            # on-policy: old log-probs (and the logged entropy) come out of the update's own pass
            olds, ents = [None] * len(ubs), None
            if not self._on_policy():
                passes = [packed_logprobs(self.policy, ub, self.device, temperature, return_entropy=True) for ub in ubs]
                olds, ents = [lp for lp, _ in passes], [e for _, e in passes]
            refs = [packed_logprobs(self.ref, ub, self.device, temperature)[0] if self.ref is not None else None
                    for ub in ubs]
        tis = {}
        if self._use_tis():
            engine = got.engine_logprobs()
            tis = apply_rollout_correction(ubs, olds, [[engine[i] for i in rows.tolist()] for rows in parts],
                                           cfg.rollout.vllm.is_correction_cap)
        with timer("update"):
            update = self.optimize(ubs, olds, refs, temperature)
        self.sync_weights(self.step_idx + 1, timer)
        self.step_idx += 1
        if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise RuntimeError(f"aborting: {self.nonfinite_in_a_row} consecutive steps had a non-finite loss or "
                               f"gradient (train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps}); "
                               "lower optim.lr or check the rewards")
        self.last_sample = got.sample() or self.last_sample
        out = step_metrics(update, ubs, ents, got.cat("rewards"), got.cat("skew"), got.groups, got.judge_stats,
                           cfg.rollout.group_size, time.perf_counter() - t0)
        out.update({"sampling_rounds": got.rounds, "data/filtered_prompts": self.filtered,
                    "data/epoch": self.stream.epoch, "train/rollout_step": self.step_idx,
                    "train/optimizer_step": self.optimizer_step, **got.metrics, **timer.pop()})
        out.update(rollout_monitors(got.groups, got.cat("adv"), got.cat("is_ref").bool()))
        last_sync = getattr(self.sampler, "last_sync", None)  # vLLM: seconds, GB/s, bytes of the push
        return {**out, **tis, **(last_sync.as_log() if last_sync is not None else {})}

    # -- loop -----------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step_idx, "data": self.stream.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "optimizer_step": self.optimizer_step}
        if hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        state["collector"] = self.collector.state_dict()  # env runs: every env instance's own state (RNG)
        state["zero_signal"] = self.zero_signal.state_dict()
        path = ckpt.save_checkpoint(self.out, self.step_idx, self.policy, self.optimizer, state, self.cfg.to_dict(),
                                    self.info.rank, keep=self.cfg.checkpoint.keep, run_id=self.run.run_id)
        self.checkpointed_step = self.step_idx
        return path

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
        try:
            while self.step_idx < cfg.train.steps:
                last = self.step()
                self.logger.log(self.step_idx, last)
                self.zero_signal.observe(self.step_idx, last)  # warns, or raises ZeroSignalError when configured
                every = cfg.logging.samples_every
                if every and self.step_idx % every == 0 and self.last_sample:
                    self.logger.log_sample(self.step_idx, self.last_sample)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(progress_postfix(last))
                stop = bool(wzdist.all_reduce(float(self.stop_requested), op="max") > 0)
                if (cfg.checkpoint.every and self.step_idx % cfg.checkpoint.every == 0) or stop:
                    self.save()
                if stop:
                    log.warning("stopped by signal after step %d (checkpoint written)", self.step_idx)
                    break
            if self.checkpointed_step != self.step_idx:  # not when resumed at the end: it is on disk
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
        return export_live_policy(self.policy, self.tokenizer, out_dir, self.info.is_main)
