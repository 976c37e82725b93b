"""The mutant catalogue: plausible single-point bugs, each a textual patch with the smallest test
selection that must catch it.

A patch is (file, old text, new text): the old text must occur exactly once in the file (else the
run reports "patch no longer applies: <file> <description>" and the catalogue needs a refresh).
Contexts are picked on lines about the maths, which move least when code around them is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    """Unique, kebab-case: area-what."""
    file: str
    """Path relative to the repository root."""
    old: str
    """Exact text, found exactly once in `file`."""
    new: str
    """Its replacement: the bug."""
    description: str
    """One line: the bug as a user would suffer it."""
    tests: tuple[str, ...]
    """The smallest pytest selection (paths or node ids, from the repository root) that catches it."""


BRPO = "wz_engine/rewards/brpo.py"
ADV = "kernels/advantage.py"
LOSS = "kernels/policy_loss.py"
LOGP = "kernels/logprob.py"
ATTN = "kernels/attention.py"
PACK = "wz_engine/packing.py"
UPDATE = "wz_engine/update.py"

T_BRPO = "tests/engine/test_brpo.py"
T_ADV = "tests/kernels/test_advantage.py"
T_LOSS = "tests/kernels/test_policy_loss.py"
T_VARIANTS = "tests/kernels/test_policy_loss_variants.py"
T_LOGP = "tests/kernels/test_logprob.py"
T_ATTN = "tests/kernels/test_attention.py"
T_PACK = "tests/engine/test_packing.py"
T_UPDATE = "tests/engine/test_update.py"
T_ROWS = "tests/engine/test_train_rows.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ BRPO reward assembly
    Mutant("brpo-ref-flag-without-group-offset", BRPO,
           "is_ref[p * G + ref] = True", "is_ref[ref] = True",
           "the reference flag is written without its group offset (every flag lands in group 0)",
           (T_BRPO,)),
    Mutant("brpo-invalid-only-if-all", BRPO,
           "            if bad:\n", "            if bad == total:\n",
           "a challenger scores 0 only if ALL its verdicts are invalid (not if ANY is)",
           (T_BRPO,)),
    Mutant("brpo-one-reference-for-all-prompts", BRPO,
           "refs = draw_references(prompt_uids, G, seed, step)",
           "refs = draw_references(prompt_uids[:1], G, seed, step) * len(prompt_uids)",
           "one reference index, drawn for the first prompt, is reused for every prompt",
           (T_BRPO,)),
    Mutant("brpo-reference-draw-ignores-step", BRPO,
           "np.random.default_rng([seed, step, int(uid)])", "np.random.default_rng([seed, int(uid)])",
           "the reference draw is not fresh per step (same reference every step)",
           (T_BRPO,)),
    Mutant("brpo-inconsistent-counts-as-tie", BRPO,
           'r = -1.0 if inconsistent == "lose" else 0.0', "r = 0.0",
           'mixed / position-biased verdicts score 0 even with inconsistent="lose"',
           (T_BRPO,)),
    Mutant("brpo-win-without-every-vote", BRPO,
           "elif wins == total:", "elif wins >= votes:",
           "winning half of the 2 x votes comparisons counts as a win",
           (T_BRPO,)),
    Mutant("brpo-challenger-always-shown-first", BRPO,
           "a, b = (group[i], group[ref]) if order == 0 else (group[ref], group[i])",
           "a, b = (group[i], group[ref])",
           "the swapped order is never judged (position bias goes uncorrected)",
           (T_BRPO,)),
    Mutant("brpo-judge-pairs-keyed-without-prompt", BRPO,
           "JudgementRecord(v, pair_id=(p, i), swapped=order == 1)",
           "JudgementRecord(v, pair_id=i, swapped=order == 1)",
           "judge order agreement merges the same challenger index across prompts",
           (T_BRPO,)),
    Mutant("brpo-skew-filter-direction", ADV,
           "dropped = total.abs() > torch.tensor(skew_threshold, dtype=torch.float32) * count",
           "dropped = total.abs() <= torch.tensor(skew_threshold, dtype=torch.float32) * count",
           "the skew filter drops the balanced groups and keeps the skewed ones (reference)",
           (f"{T_ADV}::test_brpo_hand",)),
    Mutant("brpo-skew-filter-boundary-kernel", ADV,
           "kept = tl.abs(total.to(tl.float32)) <= skew_threshold * count.to(tl.float32)",
           "kept = tl.abs(total.to(tl.float32)) < skew_threshold * count.to(tl.float32)",
           "the kernel drops a group sitting exactly on the skew threshold",
           (f"{T_ADV}::test_brpo_random", f"{T_ADV}::test_brpo_hand")),
    Mutant("brpo-reference-in-the-loss", "wz_engine/trainer.py",
           "in_loss = ~is_ref | a.keep_reference", "in_loss = torch.ones_like(is_ref)",
           "the BRPO reference rollout (A = 0) stays in the loss and dilutes every normaliser",
           (T_ROWS,)),
    Mutant("trainer-reference-keyed-by-batch-position", "wz_engine/algorithms/reward_source.py",
           "[p.uid for p in prompts], step=step", "list(range(len(prompts))), step=step",
           "the trainer draws references by the prompt's batch position, not its uid",
           (T_ROWS,)),
    Mutant("trainer-group-rows-misaligned", "wz_engine/trainer.py",
           "rows = slice(i * G, (i + 1) * G)", "rows = slice(i, i + G)",
           "the trainer hands group i the rows starting at i instead of i * G",
           (T_ROWS,)),
    Mutant("trainer-keep-reference-ignored", "wz_engine/trainer.py",
           "in_loss = ~is_ref | a.keep_reference", "in_loss = ~is_ref",
           "algorithm.keep_reference = true is ignored: the references never train",
           ("tests/engine/test_algorithms.py::test_reference_rows_stay_out_of_the_loss_unless_kept",)),
    # ------------------------------------------------------------------ group advantages
    Mutant("adv-rloo-singleton-keeps-reward", ADV,
           '"rloo": _Rule(divide_by_std=False, leave_one_out=True, singleton_keeps_reward=False)',
           '"rloo": _Rule(divide_by_std=False, leave_one_out=True, singleton_keeps_reward=True)',
           "RLOO passes a singleton group's reward through (biased; it has no 'others')",
           (f"{T_ADV}::test_hand_cases",)),
    Mutant("adv-singleton-rule-dropped-kernel", ADV,
           "        return tl.where(count == 1.0, alone, adv)\n", "        return adv\n",
           "the kernel forgets the groups-of-one rule (A = r - r = 0 for grpo singletons)",
           (f"{T_ADV}::test_group_advantages_random",)),
    Mutant("adv-biased-group-std", ADV,
           "scale = 1.0 / ((m2 / (count - 1).clamp_min(1)).sqrt() + eps)",
           "scale = 1.0 / ((m2 / count).sqrt() + eps)",
           "GRPO divides by the biased (population) std instead of the unbiased one",
           (f"{T_ADV}::test_hand_cases",)),
    Mutant("adv-rloo-normaliser-kernel", ADV,
           "adv = centred * count / tl.maximum(count - 1.0, 1.0)", "adv = centred",
           "the kernel's RLOO forgets the n / (n - 1) leave-one-out factor",
           (f"{T_ADV}::test_group_advantages_random",)),
    Mutant("adv-whitening-biased-std", ADV,
           "var = (adv * adv).sum() / max(adv.numel() - 1, 1)", "var = (adv * adv).sum() / adv.numel()",
           "REINFORCE++ batch whitening uses the biased std (reference)",
           (f"{T_ADV}::test_hand_cases", f"{T_ADV}::test_hand_rpp_std_is_what_we_think")),
    Mutant("gigpo-anchor-groups-cross-episode-groups", ADV,
           "_segment_index(group_ids, anchor_ids)", "_segment_index(anchor_ids)",
           "GiGPO groups equal anchor states across different episode groups (reference)",
           (f"{T_ADV}::test_gigpo_hand",)),
    Mutant("gigpo-anchor-groups-cross-episode-groups-kernel", ADV,
           "anchor_slot_ptr, B, T, LOG_T, True, VALIDATE, False, BLOCK)",
           "anchor_slot_ptr, B, T, LOG_T, False, VALIDATE, False, BLOCK)",
           "the GiGPO kernel hashes anchors by the episode group only (drops the anchor key)",
           (f"{T_ADV}::test_gigpo_random",)),
    # ------------------------------------------------------------------ policy loss
    Mutant("loss-clip-bounds-swapped", LOSS,
           "lo, hi = 1.0 - clip_low, 1.0 + clip_high",
           "lo, hi = 1.0 - clip_high, 1.0 + clip_low",
           "asymmetric clip bounds swapped (clip_high used below 1, clip_low above) in the reference",
           (f"{T_LOSS}::test_hand_computed_case",)),
    Mutant("loss-clip-bounds-swapped-kernel", LOSS,
           "triton.cdiv(n, block), 1.0 - clip_low, 1.0 + clip_high,",
           "triton.cdiv(n, block), 1.0 - clip_high, 1.0 + clip_low,",
           "asymmetric clip bounds swapped in the Triton kernel's launch",
           (f"{T_LOSS}::test_triton_matches_float64_reference",)),
    Mutant("loss-kl-sign-reversed", LOSS,
           "d = logp - torch.where(valid, ref_logprobs, zero)",
           "d = torch.where(valid, ref_logprobs, zero) - logp",
           "the KL log-ratio is taken as ref - logp (k1 sign flipped, k3 estimates the other direction)",
           (f"{T_LOSS}::test_hand_computed_case",)),
    Mutant("loss-k3-gradient-sign-kernel", LOSS,
           "(k3_raw >= -10.0), 1.0 - e, 0.0)", "(k3_raw >= -10.0), e - 1.0, 0.0)",
           "the kernel's k3 gradient has the wrong sign (the KL term pushes away from the reference)",
           (f"{T_LOSS}::test_triton_matches_float64_reference",)),
    Mutant("loss-dual-clip-on-positive-advantages", LOSS,
           "dual_active = (adv < 0) & (pg > dual_bound)\n            pg = torch.where(adv < 0,",
           "dual_active = (adv > 0) & (pg > dual_bound)\n            pg = torch.where(adv > 0,",
           "the dual clip is applied to positive advantages instead of negative ones",
           (f"{T_LOSS}::test_hand_computed_case",)),
    Mutant("loss-token-mean-ignores-global-tokens", LOSS,
           "mask.sum(dtype=dtype) if global_tokens is None else global_tokens", "mask.sum(dtype=dtype)",
           "token-mean normalises each micro-batch by its own token count (gradient accumulation wrong)",
           (f"{T_LOSS}::test_micro_batch_accumulation_identity",)),
    Mutant("loss-seq-count-includes-empty-slots", LOSS,
           "n_seqs = (per_seq > 0).sum().to(dtype)", "n_seqs = (per_seq >= 0).sum().to(dtype)",
           "the seq-mean normaliser counts token slots, not sequences with unmasked tokens",
           (f"{T_LOSS}::test_aggregation_matches_trl_formulas",)),
    # ------------------------------------------------------------------ policy-loss variants
    Mutant("loss-gspo-gradient-not-shared-out-kernel", LOSS,
           "grad += (per_seq[dense] * (mask != 0) / counts).float()",
           "grad += (per_seq[dense] * (mask != 0)).float()",
           "GSPO's sequence-ratio gradient reaches each token undivided by the sequence length (kernel path)",
           (f"{T_VARIANTS}::test_triton_matches_float64_reference",)),
    Mutant("loss-cispo-weight-not-detached", LOSS,
           "pg = -torch.clamp(ratio, lo, hi).detach() * adv * logp",
           "pg = -torch.clamp(ratio, lo, hi) * adv * logp",
           "CISPO's clipped importance weight is differentiated (the stop-gradient is lost) in the reference",
           (f"{T_VARIANTS}::test_matches_python_loop",)),
    Mutant("loss-delta-cap-keeps-gradient-kernel", LOSS,
           "tl.where(ratio <= delta, ratio, 0.0))", "ratio)",
           "two-sided clipping: a ratio above delta still passes its gradient (kernel)",
           (f"{T_VARIANTS}::test_triton_matches_float64_reference",)),
    Mutant("trl-cispo-gets-a-lower-bound", "wz_engine/integrations/trl_loss.py",
           "clip_low, clip_high = 1.0, self.epsilon_high - 1.0",
           "clip_low, clip_high = self.epsilon_low, self.epsilon_high - 1.0",
           "WZGRPOTrainer's cispo clips its weight from below too (TRL only caps it)",
           ("tests/engine/test_integration_trl.py::test_loss_and_grads_match_trl",)),
    Mutant("verl-clip-metrics-on-weighted-advantages", "wz_engine/integrations/verl.py",
           "old_log_prob, log_prob.detach(), advantages, response_mask,",
           "old_log_prob, log_prob.detach(), advantages if rollout_is_weights is None else advantages * "
           "rollout_is_weights, response_mask,",
           "verl's pg_clipfrac is computed on IS-weighted advantages (a zero weight never counts as clipped)",
           ("tests/engine/test_integration_verl.py",)),
    # ------------------------------------------------------------------ fused log-probs
    Mutant("logprob-temperature-dropped-in-backward-kernel", LOGP,
           "            dz = dz * inv_temp\n", "",
           "the Triton log-prob backward forgets the 1 / temperature factor",
           (f"{T_LOGP}::test_matches_float64_oracle",)),
    Mutant("logprob-temperature-dropped-in-backward", LOGP,
           "g_lp = torch.where(valid, g_logp.to(acc) * inv_temp, 0.0)",
           "g_lp = torch.where(valid, g_logp.to(acc), 0.0)",
           "the reference log-prob backward forgets the 1 / temperature factor",
           (f"{T_LOGP}::test_matches_float64_oracle",)),
    Mutant("logprob-temperature-dropped-in-fused-loss-backward", LOGP,
           "g = torch.where(valid, g_logp.to(probs.dtype) * inv_temp, 0.0)",
           "g = torch.where(valid, g_logp.to(probs.dtype), 0.0)",
           "the fused policy loss's backward forgets the 1 / temperature factor",
           (f"{T_LOGP}::test_fused_policy_loss_gradient_matches_float64_oracle_and_no_grad_path",
            f"{T_LOGP}::test_fused_policy_loss_equals_composed")),
    # ------------------------------------------------------------------ attention
    Mutant("attn-causal-mask-off-by-one", ATTN,
           "dtype=torch.bool, device=q.device).triu(1)", "dtype=torch.bool, device=q.device).triu(2)",
           "the reference's causal mask lets each token see the next one",
           (f"{T_ATTN}::test_reference_matches_torch_sdpa_per_sequence",)),
    Mutant("attn-causal-mask-off-by-one-kernel", ATTN,
           'keep = keep & (offs_m[:, None] >= offs_kn[None, :])\n'
           '                s = tl.where(keep, s, float("-inf"))\n'
           "            # Every valid row",
           'keep = keep & (offs_m[:, None] > offs_kn[None, :])\n'
           '                s = tl.where(keep, s, float("-inf"))\n'
           "            # Every valid row",
           "the forward kernel's causal mask hides each token from itself",
           (f"{T_ATTN}::test_triton_matches_float64_reference",)),
    Mutant("attn-softmax-scale-dropped-in-dk-kernel", ATTN,
           "        dk = dk * softmax_scale\n", "",
           "the backward kernel forgets the softmax scale in dK",
           (f"{T_ATTN}::test_triton_matches_float64_reference",)),
    Mutant("attn-custom-scale-ignored-in-backward", ATTN,
           "d_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale\n",
           "d_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, q.shape[-1] ** -0.5\n",
           "the backward uses the default 1/sqrt(D) scale even when a custom softmax_scale was given",
           (f"{T_ATTN}::test_gradients_match_float64_reference",)),
    # ------------------------------------------------------------------ packing
    Mutant("pack-loss-mask-lets-prompt-in", PACK,
           "mask[p - 1: p - 1 + r] = True", "mask[: p - 1 + r] = True",
           "the loss mask covers prompt tokens too",
           (T_PACK,)),
    Mutant("pack-loss-mask-off-by-one", PACK,
           "mask[p - 1: p - 1 + r] = True", "mask[p: p + r] = True",
           "the loss mask is shifted one token right (scores the token after each response token)",
           (T_PACK,)),
    Mutant("pack-position-ids-do-not-restart", PACK,
           "return torch.cat([torch.arange(length) for length in lengths])",
           "return torch.arange(sum(lengths))",
           "position ids run on across packed sequences instead of restarting at 0",
           (T_PACK,)),
    Mutant("pack-gather-responses-offset", PACK,
           "piece[self.prompt_lengths[b] - 1: self.prompt_lengths[b] - 1 + self.response_lengths[b]]",
           "piece[self.prompt_lengths[b]: self.prompt_lengths[b] + self.response_lengths[b]]",
           "per-response values are read one token late (off by one at the prompt/response boundary)",
           (T_PACK,)),
    # ------------------------------------------------------------------ update
    Mutant("update-global-seqs-count-rows-out-of-the-loss", UPDATE,
           "torch.unique(b.token_sequence_index[m]).numel()", "b.sequence_index.numel()",
           "the global sequence count includes rows left out of the loss (BRPO references)",
           (T_UPDATE,)),
    Mutant("update-grad-accum-tokens-per-micro-batch", UPDATE,
           '"global_tokens": ub.global_tokens, "global_seqs": ub.global_seqs}',
           '"global_tokens": None, "global_seqs": ub.global_seqs}',
           "token-mean is normalised per micro-batch, not by the step's global token count",
           (f"{T_UPDATE}::test_accumulated_micro_batch_gradients_equal_the_whole_batch_oracle",)),
    Mutant("update-grad-accum-seqs-per-micro-batch", UPDATE,
           '"global_tokens": ub.global_tokens, "global_seqs": ub.global_seqs}',
           '"global_tokens": ub.global_tokens, "global_seqs": None}',
           "seq-mean modes are normalised per micro-batch, not by the step's global sequence count",
           (f"{T_UPDATE}::test_accumulated_micro_batch_gradients_equal_the_whole_batch_oracle",)),
    Mutant("tis-ratio-inverted", "wz_engine/rollout/correction.py",
           "trainer_logp.detach().to(dtype) - engine_logp.detach().to(dtype)",
           "engine_logp.detach().to(dtype) - trainer_logp.detach().to(dtype)",
           "truncated IS weighs by pi_engine / pi_old instead of pi_old / pi_engine",
           ("tests/engine/test_vllm_correction.py",)),
    # ------------------------------------------------------------------ checkpoints
    Mutant("ckpt-numpy-rng-not-restored", "wz_engine/checkpoint.py",
           '    np.random.set_state(state["numpy"])\n', "",
           "a resumed run does not restore numpy's RNG state",
           ("tests/engine/test_checkpoint.py::test_checkpoint_restores_every_rng_state",)),
    Mutant("ckpt-torch-rng-not-restored", "wz_engine/checkpoint.py",
           '    torch.set_rng_state(state["torch"])\n', "",
           "a resumed run does not restore torch's CPU RNG state",
           ("tests/engine/test_checkpoint.py::test_checkpoint_restores_every_rng_state",)),
    # ------------------------------------------------------------------ weight sync
    Mutant("sync-bucket-size-forgets-alignment-padding", "wz_engine/sync/bucket.py",
           "current.nbytes = offset + nbytes", "current.nbytes += nbytes",
           "a bucket's size forgets the alignment padding: later slots overlap earlier ones",
           ("tests/engine/test_weight_sync.py",)),
    Mutant("sync-bucket-unaligned-offsets", "wz_engine/sync/bucket.py",
           "offset = _align(current.nbytes, alignment)", "offset = current.nbytes",
           "bucket slots start unaligned (views in place break for wider dtypes)",
           ("tests/engine/test_weight_sync.py",)),
    # ------------------------------------------------------------------ judge parser
    Mutant("parser-accepts-a-second-final-line", "wz_engine/judge/parser.py",
           '    if len(matches) > 1:\n        return ParsedVerdict(None, "multiple_verdicts")\n',
           "    matches = matches[-1:]  # the judge's last word counts\n",
           "the parser takes the last of several verdict lines instead of refusing to guess",
           ("tests/engine/test_judge_parser.py",)),
    Mutant("parser-accepts-out-of-range-scores", "wz_engine/judge/parser.py",
           "lo <= s <= hi for s in scores", "lo <= s for s in scores",
           "scores above the scale's maximum are accepted",
           ("tests/engine/test_judge_parser.py",)),
    # ------------------------------------------------------------------ DAPO
    Mutant("dapo-dynamic-sampling-drops-any-zero", "wz_engine/rewards/dapo.py",
           "if bool((advantages[rows] == 0).all()):", "if bool((advantages[rows] == 0).any()):",
           "dynamic sampling drops a group when ANY advantage is zero, not when all are",
           ("tests/engine/test_rewards.py",)),
    Mutant("dapo-overlong-penalty-uncapped", "wz_engine/rewards/dapo.py",
           ".clamp(min=0, max=buffer)", ".clamp(min=0)",
           "the overlong penalty keeps growing past -penalty beyond max_new_tokens",
           ("tests/engine/test_rewards.py",)),
]
