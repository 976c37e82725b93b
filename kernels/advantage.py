"""Group-relative advantages: GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, BRPO and GiGPO.

Every estimator here is "a per-row formula over segment statistics": rows (sequences, or
environment steps for GiGPO) are grouped by arbitrary int64 ids, each group's count, mean and
unbiased std are computed, and each row's advantage is a function of its own value and its group's
statistics. One machinery serves them all; only the grouping keys and the per-row rule differ.

Estimators (DESIGN.md section 3; r = the row's reward, g = its group, n = |g|):

    grpo                   A = (r - mean_g) / (std_g + eps)          std unbiased
    dr_grpo                A = r - mean_g
    rloo                   A = r - mean of the others = n / (n - 1) * (r - mean_g)
    reinforce_pp_baseline  A = r - mean_g, then whitened over the whole batch:
                           (x - mean_B) / (std_B + eps), std_B unbiased (0 when B == 1)

Groups of one (no baseline can be estimated from the group itself):
    grpo, dr_grpo, reinforce_pp_baseline: baseline 0 and std 1 (DESIGN.md, verl's convention), so
        the reward passes through: A = r / (1 + eps) for grpo, A = r for the other two.
    rloo: A = 0. There are no "others" to form the leave-one-out baseline, and passing r through
        would make RLOO's estimate biased; such a row contributes no gradient.
    GiGPO: the episode part follows grpo's convention; singleton anchor groups give A_step = 0.

Numerics: a large common offset (rewards 1e4 + noise) must lose no precision, and an all-equal
group must give exactly r - mean = 0 (so A = 0, never rounding noise / eps). The references compute
in float64 with a two-pass variance (on CPU float64 costs nothing at these sizes). The kernel shifts
each value by its group's minimum and scales by a power of two 2^e_g > max_g - min_g (both exact), so
x = (r - min_g) / 2^e_g lies in [0, 1), and sums x and x^2 as 38-bit fixed-point integers (int64:
B < 2^24 rows keep the sums below 2^62); count, sums and centred values are then finished in float64.
Outputs are float32 (float64 from a reference with upcast=True) whatever the input float dtype.

The references (`*_reference`, vectorised torch: torch.unique + index_add_, no loop over groups)
are the specification and the CPU path. Every estimator there is a per-group affine map
A = (r - baseline_g) * scale_g, which keeps the per-row work to a few gathers.

Triton path (CUDA, or the interpreter on CPU): ONE launch of a single program that loops over the
batch in blocks. A single program can barrier with itself (it is one CTA), which is what makes one
launch possible without a grid-wide barrier:
    phase 0  clear an open-addressing hash table of T = next_pow2(2 B) slots (scratch, no memset
             launch) and the per-slot accumulators;
    phase 1  each row hashes its id(s), claims a slot with atomic CAS (the slot stores the row index
             of its first claimant, so any int64 id - no sentinel value - is allowed; linear probing),
             then atomically adds 1 to the slot's count and folds its value into the slot's min and
             max (as order-preserving int32) and, with validate, its invalid flag;
    phase 2  each row adds q(x) and q(x^2) to the slot's int64 sums;
    phase 3  each row reads its slot's statistics and writes its advantage (plus the two batch
             passes of reinforce_pp_baseline's whitening).
No host synchronisation and no data-dependent output shapes: the only host-side work is allocating
scratch of a size known from B. The data is tiny (B ~ 16k rows), so one CTA streaming it is cheaper
than the sort + sync that `torch.unique` needs. The Triton path takes B < 2**24 rows (a larger batch
is a ValueError). GPU timings: see bench/RESULTS.md.

Determinism (bit-identical resume on GPU): every accumulation is an integer atomic (count, min, max,
fixed-point sums), which is associative, so the bits of each row's advantage do not depend on the
order the atomics land in nor on which row claims a slot first (the only run-to-run variation of a
GPU here; the slot a group lands in may vary, its statistics may not). The earlier design added
float32 (v - first claimant's value) with atomics: both the order and the shift varied run to run.
reinforce_pp_baseline's batch whitening sums rows in a fixed per-lane order and a fixed tree: same
inputs, same bits. Why not a sort + segmented scan instead: it needs several launches (or a grid-wide
barrier) and a sort of B keys, where the fixed-point atomics keep the one-launch, no-sync design and
cost one more pass over the B rows (~B x 12 bytes, in L2).

Validation (`validate=True`, the default): on CPU tensors (and the reference) it raises ValueError
when a reward is not finite, or a BRPO reward is not -1, 0 or +1. On CUDA tensors the Triton kernel
does it instead, without a host sync: every row of a group holding such a reward gets a NaN advantage
(BRPO: and kept=False; reinforce_pp_baseline: the whole batch, through the whitening), so a bad reward
poisons the loss visibly rather than training on garbage. `validate=False` skips both. Shape, dtype
and device checks always run (they read only metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._backend import (
    check_choice,
    check_finite,
    check_tensor,
    next_power_of_2,
    resolve_impl,
    triton_available,
)

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
GIGPO_MODES = ("mean_norm", "mean_std_norm")


@dataclass(frozen=True)
class _Rule:
    """How one row's advantage follows from its value r and its group's (n, r - mean_g, std_g)."""

    divide_by_std: bool
    """Scale the centred value by 1 / (std_g + eps)."""
    leave_one_out: bool
    """Use the mean of the *other* rows as baseline: n / (n - 1) * (r - mean_g)."""
    singleton_keeps_reward: bool
    """A group of one uses baseline 0 and std 1 (A = r or r / (1 + eps)); otherwise its A is 0."""
    whiten_batch: bool = False
    """Afterwards whiten all rows together: (x - mean_B) / (std_B + eps)."""


_ESTIMATOR_RULES = {
    "grpo": _Rule(divide_by_std=True, leave_one_out=False, singleton_keeps_reward=True),
    "dr_grpo": _Rule(divide_by_std=False, leave_one_out=False, singleton_keeps_reward=True),
    "rloo": _Rule(divide_by_std=False, leave_one_out=True, singleton_keeps_reward=False),
    "reinforce_pp_baseline": _Rule(
        divide_by_std=False, leave_one_out=False, singleton_keeps_reward=True, whiten_batch=True
    ),
}


def _gigpo_rules(mode: str) -> tuple[_Rule, _Rule]:
    """(episode rule, step rule) for a GiGPO normalisation mode."""
    by_std = mode == "mean_std_norm"
    episode = _Rule(divide_by_std=by_std, leave_one_out=False, singleton_keeps_reward=True)
    step = _Rule(divide_by_std=by_std, leave_one_out=False, singleton_keeps_reward=False)
    return episode, step


# ----------------------------------------------------------------------------- reference


def _segment_index(*keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense segment index [B] (rows with equal key tuples share a segment) and segment sizes [G]."""
    num_rows = keys[0].numel()
    _, inverse, counts = torch.unique(keys[0], return_inverse=True, return_counts=True)
    for key in keys[1:]:
        _, inverse_k = torch.unique(key, return_inverse=True)
        # both inverses are < B, so this pairing is collision-free and fits in int64
        _, inverse, counts = torch.unique(inverse * num_rows + inverse_k, return_inverse=True,
                                          return_counts=True)
    return inverse, counts


def _segment_advantages(values: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, rule: _Rule,
                        eps: float) -> torch.Tensor:
    """Every estimator is an affine map per group: A = (r - baseline_g) * scale_g (then, for
    reinforce_pp_baseline, the batch whitening).

    values [B] float64, inverse [B] int64 in [0, G), counts [G] int64 -> A [B] float64.
    Per-row work is a few gathers and one subtract-multiply; everything else is per group.
    """
    num_segments = counts.numel()
    count = counts.to(values.dtype)  # [G]
    # index_select, not x[inverse]: advanced indexing is much slower on CPU
    mean = values.new_zeros(num_segments).index_add_(0, inverse, values) / count  # [G]
    if rule.divide_by_std:  # unbiased std from the centred values (two passes, no cancellation)
        centred = values - mean.index_select(0, inverse)
        m2 = values.new_zeros(num_segments).index_add_(0, inverse, centred * centred)
        scale = 1.0 / ((m2 / (count - 1).clamp_min(1)).sqrt() + eps)
    elif rule.leave_one_out:  # r - (sum - r) / (n - 1) = n / (n - 1) * (r - mean)
        scale = count / (count - 1).clamp_min(1)
    else:
        scale = torch.ones_like(count)
    alone = count == 1
    if rule.singleton_keeps_reward:  # baseline 0, std 1
        baseline = torch.where(alone, 0.0, mean)
        scale = torch.where(alone, 1.0 / (1.0 + eps) if rule.divide_by_std else 1.0, scale)
    else:
        baseline = mean
        scale = torch.where(alone, 0.0, scale)
    adv = (values - baseline.index_select(0, inverse)) * scale.index_select(0, inverse)
    if rule.whiten_batch:
        adv = adv - adv.mean()
        var = (adv * adv).sum() / max(adv.numel() - 1, 1)
        adv = adv / (var.sqrt() + eps)
    return adv


def _output_dtype(upcast: bool) -> torch.dtype:
    return torch.float64 if upcast else torch.float32


def group_advantages_reference(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", *, eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """Vectorised-torch specification of `group_advantages` (torch.unique + index_add_, no loop
    over groups). rewards [B], group_ids [B] -> [B] in float32 (float64 with upcast=True).

    Computed in float64 whatever `upcast` says: at these sizes it costs nothing on CPU, and it makes
    an all-equal group of float32 rewards give exactly r - mean = 0 (n * r is exact in float64)."""
    values = rewards.to(torch.float64)
    if values.numel() == 0:
        return values.to(_output_dtype(upcast))
    inverse, counts = _segment_index(group_ids)
    adv = _segment_advantages(values, inverse, counts, _ESTIMATOR_RULES[estimator], eps)
    return adv.to(_output_dtype(upcast))


def brpo_advantages_reference(
    pairwise_rewards: torch.Tensor, group_ids: torch.Tensor, *, skew_threshold: float = 0.6,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised-torch specification of `brpo_advantages`: ([B] advantages, [B] bool kept)."""
    values = pairwise_rewards.to(_output_dtype(upcast))
    if values.numel() == 0:
        return values.clone(), torch.ones_like(values, dtype=torch.bool)
    inverse, counts = _segment_index(group_ids)
    # Sums of +-1/0 and counts are exact integers in float32, and the test below is done in float32
    # by both implementations, so the kernel and the reference agree exactly at the boundary.
    count = counts.to(torch.float32)
    total = count.new_zeros(counts.numel()).index_add_(0, inverse, values.float())
    dropped = total.abs() > torch.tensor(skew_threshold, dtype=torch.float32) * count  # [num_segments]
    kept = ~dropped.index_select(0, inverse)
    return torch.where(kept, values, torch.zeros_like(values)), kept


def gigpo_advantages_reference(
    episode_returns: torch.Tensor, group_ids: torch.Tensor, step_returns: torch.Tensor,
    anchor_ids: torch.Tensor, *, step_weight: float = 1.0, mode: str = "mean_norm", eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """Vectorised-torch specification of `gigpo_advantages`: [B] rows (environment steps) -> [B]."""
    episode = episode_returns.to(torch.float64)  # float64 throughout, as in group_advantages_reference
    step = step_returns.to(torch.float64)
    if episode.numel() == 0:
        return episode.to(_output_dtype(upcast))
    episode_rule, step_rule = _gigpo_rules(mode)
    a_episode = _segment_advantages(episode, *_segment_index(group_ids), episode_rule, eps)
    a_step = _segment_advantages(step, *_segment_index(group_ids, anchor_ids), step_rule, eps)
    return (a_episode + step_weight * a_step).to(_output_dtype(upcast))


# ----------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _hash_slot(key, key2, LOG_T, HAS_KEY2: tl.constexpr):
        """Home slot in [0, 2**LOG_T) of int64 key(s): xor-fold to 32 bits, Fibonacci hashing."""
        h = key.to(tl.uint32) ^ ((key >> 32).to(tl.uint32) * 0x85EBCA6B)
        if HAS_KEY2:
            h = h * 0xC2B2AE35 ^ key2.to(tl.uint32) ^ ((key2 >> 32).to(tl.uint32) * 0x27D4EB2F)
        return ((h * 0x9E3779B1) >> (32 - LOG_T)).to(tl.int32)

    @triton.jit
    def _ordered_key(value):
        """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
        bits = value.to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _from_ordered_key(key):
        return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _invalid(value, BRPO_VALUES: tl.constexpr):
        """1 for a value the estimator rejects: non-finite, or (BRPO) anything but -1, 0, +1."""
        if BRPO_VALUES:
            bad = (value != 0.0) & (value != 1.0) & (value != -1.0)
        else:
            bad = ~(tl.abs(value) < float("inf"))  # NaN compares false: it is caught too
        return bad.to(tl.int32)

    @triton.jit
    def _build_segments(
        values_ptr, key_ptr, key2_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T, LOG_T,
        HAS_KEY2: tl.constexpr, VALIDATE: tl.constexpr, BRPO_VALUES: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Phases 0-2: group rows by key into the hash table and accumulate exact per-slot sums.

        table  [T] int32: 0 = empty, else 1 + the row index of the slot's first claimant (used only
               to compare keys: which row claims a slot first varies run to run, nothing else does).
        istats [4, T] int32: count, min and max of the values as order-preserving ints, invalid flag.
        sums   [2, T] int64: sum of q(x) and q(x^2), x = (v - min_g) / 2^e_g in [0, 1), where
               2^e_g > max_g - min_g (a power of two: exact), q(y) = round(y * 2^38).
        slot   [B] int32: each row's slot.
        Every accumulation is an integer atomic (count, min, max, fixed-point sums), so the result
        does not depend on the order the atomics land in: same inputs, same bits.
        """
        offs = tl.arange(0, BLOCK)
        for start in range(0, T, BLOCK):
            idx = start + offs
            clear = idx < T
            tl.store(table_ptr + idx, 0, mask=clear)
            tl.store(istats_ptr + idx, 0, mask=clear)
            tl.store(istats_ptr + T + idx, 0x7FFFFFFF, mask=clear)
            tl.store(istats_ptr + 2 * T + idx, -0x7FFFFFFF - 1, mask=clear)
            tl.store(istats_ptr + 3 * T + idx, 0, mask=clear)
            tl.store(sums_ptr + idx, tl.zeros([BLOCK], tl.int64), mask=clear)
            tl.store(sums_ptr + T + idx, tl.zeros([BLOCK], tl.int64), mask=clear)
        tl.debug_barrier()  # the table is clear for every thread of this (only) program
        for start in range(0, B, BLOCK):
            rows = start + offs
            in_batch = rows < B
            key = tl.load(key_ptr + rows, mask=in_batch, other=0)
            key2 = key
            if HAS_KEY2:
                key2 = tl.load(key2_ptr + rows, mask=in_batch, other=0)
            pos = tl.where(in_batch, _hash_slot(key, key2, LOG_T, HAS_KEY2), 0)
            todo = in_batch
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                # finished lanes compare against -1, which never matches, so they write nothing
                prev = tl.atomic_cas(table_ptr + pos, tl.where(todo, 0, -1), rows + 1)
                claimed = prev == 0
                taken = todo & (prev > 0)
                same = taken & (tl.load(key_ptr + prev - 1, mask=taken, other=0) == key)
                if HAS_KEY2:
                    same = same & (tl.load(key2_ptr + prev - 1, mask=taken, other=0) == key2)
                todo = todo & ~(claimed | same)
                pos = tl.where(todo, (pos + 1) & (T - 1), pos)  # linear probing
            value = tl.load(values_ptr + rows, mask=in_batch, other=0.0).to(tl.float32)
            ordered = _ordered_key(value)
            tl.atomic_add(istats_ptr + pos, 1, mask=in_batch)
            tl.atomic_min(istats_ptr + T + pos, ordered, mask=in_batch)
            tl.atomic_max(istats_ptr + 2 * T + pos, ordered, mask=in_batch)
            if VALIDATE:
                tl.atomic_max(istats_ptr + 3 * T + pos, _invalid(value, BRPO_VALUES), mask=in_batch)
            tl.store(slot_ptr + rows, pos, mask=in_batch)
        tl.debug_barrier()  # min / max of every group are final
        for start in range(0, B, BLOCK):
            rows = start + offs
            in_batch = rows < B
            value = tl.load(values_ptr + rows, mask=in_batch, other=0.0).to(tl.float32)
            pos = tl.load(slot_ptr + rows, mask=in_batch, other=0)
            low, inv_scale = _group_frame(istats_ptr, pos, in_batch, T)
            x = ((value - low) * inv_scale).to(tl.float64)  # exact power-of-two scaling, in [0, 1)
            q1 = tl.floor(x * 274877906944.0 + 0.5).to(tl.int64)  # 2^38
            q2 = tl.floor(x * x * 274877906944.0 + 0.5).to(tl.int64)  # x * x exact in float64
            tl.atomic_add(sums_ptr + pos, q1, mask=in_batch)
            tl.atomic_add(sums_ptr + T + pos, q2, mask=in_batch)
        tl.debug_barrier()  # every atomic has landed before any row reads its statistics

    @triton.jit
    def _group_frame(istats_ptr, pos, in_batch, T):
        """(min_g as float32, 2^-e_g) of each row's group, with 2^e_g > max_g - min_g."""
        # .cg: read the accumulators from L2, where the atomics landed, not from a stale L1 line
        low = _from_ordered_key(tl.load(istats_ptr + T + pos, mask=in_batch, other=0, cache_modifier=".cg"))
        high = _from_ordered_key(tl.load(istats_ptr + 2 * T + pos, mask=in_batch, other=0,
                                         cache_modifier=".cg"))
        # range < 2^(b - 126) for its biased exponent b; 2^-(b - 126) has biased exponent 253 - b
        # (b <= 252: groups spanning less than 2^126; b = 0 covers a zero or denormal range)
        biased = tl.minimum((high - low).to(tl.int32, bitcast=True) >> 23, 252)
        inv_scale = ((253 - biased) << 23).to(tl.float32, bitcast=True)
        return low, inv_scale

    @triton.jit
    def _segment_row_stats(values_ptr, istats_ptr, sums_ptr, slot_ptr, rows, in_batch, T):
        """Phase 3 inputs for a block of rows: value, n, r - mean_g and unbiased std_g (float64), the
        group's exact sum of r (float64) and its invalid flag."""
        value = tl.load(values_ptr + rows, mask=in_batch, other=0.0).to(tl.float32)
        slot = tl.load(slot_ptr + rows, mask=in_batch, other=0)
        count = tl.load(istats_ptr + slot, mask=in_batch, other=1, cache_modifier=".cg").to(tl.float64)
        invalid = tl.load(istats_ptr + 3 * T + slot, mask=in_batch, other=0, cache_modifier=".cg")
        low, inv_scale = _group_frame(istats_ptr, slot, in_batch, T)
        scale = 1.0 / inv_scale.to(tl.float64)
        unit = 3.637978807091713e-12  # 2^-38
        s1 = tl.load(sums_ptr + slot, mask=in_batch, other=0, cache_modifier=".cg").to(tl.float64) * unit
        s2 = tl.load(sums_ptr + T + slot, mask=in_batch, other=0, cache_modifier=".cg").to(tl.float64) * unit
        mean_x = s1 / count
        var_x = tl.maximum(s2 - s1 * mean_x, 0.0) / tl.maximum(count - 1.0, 1.0)
        low64 = low.to(tl.float64)
        centred = (value.to(tl.float64) - low64) - mean_x * scale
        total = s1 * scale + count * low64
        return value, count, centred, tl.sqrt(var_x) * scale, total, invalid

    @triton.jit
    def _apply_rule_block(
        value, count, centred, std, eps,
        DIVIDE_BY_STD: tl.constexpr, LEAVE_ONE_OUT: tl.constexpr, SINGLETON_KEEPS_REWARD: tl.constexpr,
    ):
        """Kernel twin of `_segment_advantages` for a block of rows, without the batch whitening."""
        if LEAVE_ONE_OUT:
            adv = centred * count / tl.maximum(count - 1.0, 1.0)
        elif DIVIDE_BY_STD:
            adv = centred / (std + eps)
        else:
            adv = centred
        value = value.to(tl.float64)
        if SINGLETON_KEEPS_REWARD:
            if DIVIDE_BY_STD:
                alone = value / (1.0 + eps)
            else:
                alone = value
        else:
            alone = tl.zeros_like(value)
        return tl.where(count == 1.0, alone, adv)

    @triton.jit
    def _group_advantages_fwd_kernel(
        values_ptr, key_ptr, out_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T, LOG_T, eps, BATCH_DOF,
        DIVIDE_BY_STD: tl.constexpr, LEAVE_ONE_OUT: tl.constexpr, SINGLETON_KEEPS_REWARD: tl.constexpr,
        WHITEN_BATCH: tl.constexpr, VALIDATE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        _build_segments(values_ptr, key_ptr, key_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T, LOG_T,
                        False, VALIDATE, False, BLOCK)
        offs = tl.arange(0, BLOCK)
        batch_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, B, BLOCK):
            rows = start + offs
            in_batch = rows < B
            value, count, centred, std, _, invalid = _segment_row_stats(
                values_ptr, istats_ptr, sums_ptr, slot_ptr, rows, in_batch, T)
            adv = _apply_rule_block(value, count, centred, std, eps,
                                    DIVIDE_BY_STD, LEAVE_ONE_OUT, SINGLETON_KEEPS_REWARD).to(tl.float32)
            if VALIDATE:  # a group holding a non-finite reward: NaN for all its rows (no host sync)
                adv = tl.where(invalid != 0, float("nan"), adv)
            tl.store(out_ptr + rows, adv, mask=in_batch)
            batch_sum += tl.where(in_batch, adv, 0.0)  # per-lane, fixed order: deterministic
        if WHITEN_BATCH:  # two more passes over out (B floats): mean, then centred variance
            tl.debug_barrier()
            batch_mean = tl.sum(batch_sum, axis=0) / B
            batch_m2 = tl.zeros([BLOCK], tl.float32)
            for start in range(0, B, BLOCK):
                rows = start + offs
                in_batch = rows < B
                x = tl.load(out_ptr + rows, mask=in_batch, other=0.0) - batch_mean
                batch_m2 += tl.where(in_batch, x * x, 0.0)
            batch_std = tl.sqrt(tl.sum(batch_m2, axis=0) / BATCH_DOF)
            for start in range(0, B, BLOCK):
                rows = start + offs
                in_batch = rows < B
                x = tl.load(out_ptr + rows, mask=in_batch, other=0.0) - batch_mean
                tl.store(out_ptr + rows, x / (batch_std + eps), mask=in_batch)

    @triton.jit
    def _brpo_advantages_fwd_kernel(
        values_ptr, key_ptr, out_ptr, kept_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T, LOG_T,
        skew_threshold, VALIDATE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        _build_segments(values_ptr, key_ptr, key_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T, LOG_T,
                        False, VALIDATE, True, BLOCK)
        offs = tl.arange(0, BLOCK)
        for start in range(0, B, BLOCK):
            rows = start + offs
            in_batch = rows < B
            value, count, _, _, total, invalid = _segment_row_stats(
                values_ptr, istats_ptr, sums_ptr, slot_ptr, rows, in_batch, T)
            # sums of -1/0/+1 are exact; the test runs in float32, as in the reference
            kept = tl.abs(total.to(tl.float32)) <= skew_threshold * count.to(tl.float32)
            adv = tl.where(kept, value, 0.0)
            if VALIDATE:  # a group holding a reward other than -1/0/+1: NaN and not kept (no host sync)
                kept = kept & (invalid == 0)
                adv = tl.where(invalid != 0, float("nan"), adv)
            tl.store(out_ptr + rows, adv, mask=in_batch)
            tl.store(kept_ptr + rows, kept.to(tl.int8), mask=in_batch)

    @triton.jit
    def _gigpo_advantages_fwd_kernel(
        episode_ptr, group_ptr, step_ptr, anchor_ptr, out_ptr,
        table_ptr, istats_ptr, sums_ptr, slot_ptr, anchor_table_ptr, anchor_istats_ptr, anchor_sums_ptr,
        anchor_slot_ptr, B, T, LOG_T, step_weight, eps,
        DIVIDE_BY_STD: tl.constexpr, VALIDATE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # the same segmented machinery twice: groups by group id, anchors by (group id, anchor id)
        _build_segments(episode_ptr, group_ptr, group_ptr, table_ptr, istats_ptr, sums_ptr, slot_ptr, B, T,
                        LOG_T, False, VALIDATE, False, BLOCK)
        _build_segments(step_ptr, group_ptr, anchor_ptr, anchor_table_ptr, anchor_istats_ptr, anchor_sums_ptr,
                        anchor_slot_ptr, B, T, LOG_T, True, VALIDATE, False, BLOCK)
        offs = tl.arange(0, BLOCK)
        for start in range(0, B, BLOCK):
            rows = start + offs
            in_batch = rows < B
            value, count, centred, std, _, bad_episode = _segment_row_stats(
                episode_ptr, istats_ptr, sums_ptr, slot_ptr, rows, in_batch, T)
            a_episode = _apply_rule_block(value, count, centred, std, eps, DIVIDE_BY_STD, False, True)
            value, count, centred, std, _, bad_step = _segment_row_stats(
                step_ptr, anchor_istats_ptr, anchor_sums_ptr, anchor_slot_ptr, rows, in_batch, T)
            a_step = _apply_rule_block(value, count, centred, std, eps, DIVIDE_BY_STD, False, False)
            adv = (a_episode + step_weight * a_step).to(tl.float32)
            if VALIDATE:
                adv = tl.where((bad_episode | bad_step) != 0, float("nan"), adv)
            tl.store(out_ptr + rows, adv, mask=in_batch)


@dataclass(frozen=True)
class _LaunchConfig:
    """Launch geometry of the single-program kernels."""

    block: int
    """Rows per loop step (and hash-table slots cleared per step)."""
    num_warps: int


def _launch_config(num_rows: int, device: torch.device) -> _LaunchConfig:
    if device.type != "cuda":  # the interpreter pays per loop step, not per element
        return _LaunchConfig(block=max(64, min(1024, next_power_of_2(num_rows))), num_warps=1)
    # One CTA streams the batch: wide blocks mean fewer dependent CAS/gather round trips per row, but
    # the float64 statistics cost registers per row a thread owns. Offline sm_90 compiles (Triton 3.6,
    # B = 16384, validate on and off, every estimator): 4096 rows x 16 warps (8 per thread) spills
    # 32-120 B at the 128-register cap (grpo, gigpo); 2048 x 16 spills 16 B (brpo) at 64-116
    # registers; 1024 x 16 (2 rows per thread): 56-64 registers, no spills. Two rows per thread at
    # every size, up to 16 warps.
    block = max(64, min(1024, next_power_of_2(num_rows)))
    return _LaunchConfig(block=block, num_warps=block // 64)


def _segment_scratch(num_rows: int, device: torch.device):
    """Uninitialised scratch (the kernel clears it): table [T] int32, istats [4, T] int32, sums [2, T]
    int64, slot [B] int32, and T."""
    slots = max(2, next_power_of_2(2 * num_rows))  # load factor <= 1/2 keeps probe chains short
    table = torch.empty(slots, dtype=torch.int32, device=device)
    istats = torch.empty(4, slots, dtype=torch.int32, device=device)
    sums = torch.empty(2, slots, dtype=torch.int64, device=device)
    slot = torch.empty(num_rows, dtype=torch.int32, device=device)
    return table, istats, sums, slot, slots


def _ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int64).contiguous()


def _group_advantages_triton(rewards, group_ids, estimator: str, eps: float, out=None,
                             validate: bool = False) -> torch.Tensor:
    if out is None:  # tests pass a poisoned buffer here
        out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)  # [B]
    if rewards.numel() == 0:
        return out
    rule = _ESTIMATOR_RULES[estimator]
    table, istats, sums, slot, slots = _segment_scratch(rewards.numel(), rewards.device)
    cfg = _launch_config(rewards.numel(), rewards.device)
    _group_advantages_fwd_kernel[(1,)](
        rewards.contiguous(), _ids(group_ids), out, table, istats, sums, slot, rewards.numel(), slots,
        slots.bit_length() - 1, float(eps), max(rewards.numel() - 1, 1),
        DIVIDE_BY_STD=rule.divide_by_std, LEAVE_ONE_OUT=rule.leave_one_out,
        SINGLETON_KEEPS_REWARD=rule.singleton_keeps_reward, WHITEN_BATCH=rule.whiten_batch,
        VALIDATE=validate, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return out


def _brpo_advantages_triton(pairwise_rewards, group_ids, skew_threshold: float, out=None, kept=None,
                            validate: bool = False):
    num_rows = pairwise_rewards.numel()
    if out is None:
        out = torch.empty(pairwise_rewards.shape, dtype=torch.float32, device=pairwise_rewards.device)
    if kept is None:
        kept = torch.empty(pairwise_rewards.shape, dtype=torch.int8, device=pairwise_rewards.device)
    if num_rows:
        table, istats, sums, slot, slots = _segment_scratch(num_rows, pairwise_rewards.device)
        cfg = _launch_config(num_rows, pairwise_rewards.device)
        _brpo_advantages_fwd_kernel[(1,)](
            pairwise_rewards.to(torch.float32).contiguous(), _ids(group_ids), out, kept, table, istats, sums,
            slot, num_rows, slots, slots.bit_length() - 1, float(skew_threshold),
            VALIDATE=validate, BLOCK=cfg.block, num_warps=cfg.num_warps,
        )
    return out, kept.view(torch.bool)


def _gigpo_advantages_triton(episode_returns, group_ids, step_returns, anchor_ids, step_weight: float,
                             mode: str, eps: float, out=None, validate: bool = False) -> torch.Tensor:
    num_rows = episode_returns.numel()
    if out is None:
        out = torch.empty(episode_returns.shape, dtype=torch.float32, device=episode_returns.device)
    if num_rows == 0:
        return out
    table, istats, sums, slot, slots = _segment_scratch(num_rows, episode_returns.device)
    anchor_table, anchor_istats, anchor_sums, anchor_slot, _ = _segment_scratch(num_rows, episode_returns.device)
    cfg = _launch_config(num_rows, episode_returns.device)
    _gigpo_advantages_fwd_kernel[(1,)](
        episode_returns.contiguous(), _ids(group_ids), step_returns.contiguous(), _ids(anchor_ids), out,
        table, istats, sums, slot, anchor_table, anchor_istats, anchor_sums, anchor_slot, num_rows, slots,
        slots.bit_length() - 1, float(step_weight), float(eps), DIVIDE_BY_STD=mode == "mean_std_norm",
        VALIDATE=validate, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return out


# ----------------------------------------------------------------------------- torch.library ops
# Opaque custom ops so torch.compile traces through calls to the kernels (fake = shape/dtype only).
# No autograd: advantages are treated as constants by every policy-gradient loss.


@torch.library.custom_op("wz::group_advantages_fwd", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str,
                         eps: float, validate: bool) -> torch.Tensor:
    return _group_advantages_triton(rewards, group_ids, estimator, eps, validate=validate)


@_group_advantages_op.register_fake
def _(rewards, group_ids, estimator, eps, validate):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


@torch.library.custom_op("wz::brpo_advantages_fwd", mutates_args=())
def _brpo_advantages_op(pairwise_rewards: torch.Tensor, group_ids: torch.Tensor,
                        skew_threshold: float, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _brpo_advantages_triton(pairwise_rewards, group_ids, skew_threshold, validate=validate)


@_brpo_advantages_op.register_fake
def _(pairwise_rewards, group_ids, skew_threshold, validate):
    shape = pairwise_rewards.shape
    return (pairwise_rewards.new_empty(shape, dtype=torch.float32),
            pairwise_rewards.new_empty(shape, dtype=torch.bool))


@torch.library.custom_op("wz::gigpo_advantages_fwd", mutates_args=())
def _gigpo_advantages_op(episode_returns: torch.Tensor, group_ids: torch.Tensor, step_returns: torch.Tensor,
                         anchor_ids: torch.Tensor, step_weight: float, mode: str, eps: float,
                         validate: bool) -> torch.Tensor:
    return _gigpo_advantages_triton(episode_returns, group_ids, step_returns, anchor_ids, step_weight, mode,
                                    eps, validate=validate)


@_gigpo_advantages_op.register_fake
def _(episode_returns, group_ids, step_returns, anchor_ids, step_weight, mode, eps, validate):
    return episode_returns.new_empty(episode_returns.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------- public API


def _check_rows(op: str, name: str, values, *, like: torch.Tensor | None, floating: bool | None,
                integer: bool | None) -> None:
    """values must be a 1-D tensor (of like's shape and device when given)."""
    check_tensor(op, name, values, ndim=1, floating=floating, integer=integer,
                 shape=None if like is None else tuple(like.shape),
                 device=None if like is None else like.device)


_MAX_TRITON_ROWS = 2**24  # float32 counts stay exact below this


def _resolve(op: str, impl: str, first: torch.Tensor) -> str:
    backend = resolve_impl(impl, first.device, op=op)
    if backend == "triton" and first.numel() >= _MAX_TRITON_ROWS:
        raise ValueError(f"{op}: the Triton path takes fewer than 2**24 rows, got {first.numel()}; "
                         "use impl='reference'")
    return backend


def _kernel_validates(backend: str, values: torch.Tensor) -> bool:
    """True where `validate` is done inside the kernel (the Triton path on CUDA tensors): a host-side
    check there would cost a device sync. Elsewhere (CPU tensors, the reference) it runs on the host."""
    return backend == "triton" and values.is_cuda


def _check_finite(op: str, name: str, values: torch.Tensor) -> None:
    """check_finite with a cheap first pass: a float64 sum is finite iff every element is (a float32
    batch cannot overflow it); only a non-finite sum pays for the element-wise check and message."""
    if values.numel() and not math.isfinite(float(values.sum(dtype=torch.float64))):
        check_finite(op, name, values)


def _check_scalar(op: str, name: str, value, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", *, eps: float = 1e-6,
    impl: str = "auto", validate: bool = True,
) -> torch.Tensor:
    """Group-relative advantages of scalar rewards.

    Args:
        rewards: [B] floating, one scalar reward per sequence.
        group_ids: [B] integer, the group (prompt) of each row: arbitrary int64 values, unsorted,
            non-contiguous, groups of unequal sizes.
        estimator: "grpo", "dr_grpo", "rloo" or "reinforce_pp_baseline" (module docstring gives the
            formulas and the rule for groups of one).
        eps: added to the std in the denominators.
        impl: "auto" (Triton on CUDA, reference on CPU), "reference" or "triton".
        validate: check that rewards are finite (CPU: ValueError; CUDA: in the kernel, no sync, NaN for
            every row of a bad group; see the module docstring).
    Returns:
        advantages [B] float32.
    """
    op = "group_advantages"
    _check_rows(op, "rewards", rewards, like=None, floating=True, integer=None)
    _check_rows(op, "group_ids", group_ids, like=rewards, floating=None, integer=True)
    check_choice(op, "estimator", estimator, ESTIMATORS)
    _check_scalar(op, "eps", eps, minimum=0.0)
    backend = _resolve(op, impl, rewards)
    if validate and not _kernel_validates(backend, rewards):
        _check_finite(op, "rewards", rewards)
    if backend == "reference":
        return group_advantages_reference(rewards, group_ids, estimator, eps=eps)
    return torch.ops.wz.group_advantages_fwd(rewards, group_ids, estimator, float(eps),
                                             _kernel_validates(backend, rewards) and validate)


def brpo_advantages(
    pairwise_rewards: torch.Tensor, group_ids: torch.Tensor, *, skew_threshold: float = 0.6,
    impl: str = "auto", validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BRPO advantages: A = r with no normalisation, and the skew filter.

    Args:
        pairwise_rewards: [B] float or integer, each rollout's verdict against its group's
            bootstrapped reference: +1 win, -1 loss, 0 for the reference itself or no signal.
        group_ids: [B] integer, arbitrary int64 group ids (as in `group_advantages`).
        skew_threshold: a group is dropped when |sum r| > skew_threshold * group_size (its reference
            was an outlier); its rows get A = 0. The comparison is done in float32.
        impl: "auto", "reference" or "triton".
        validate: check that every reward is -1, 0 or +1 (CPU: ValueError; CUDA: in the kernel, no sync,
            NaN and kept=False for every row of a bad group).
    Returns:
        advantages [B] float32, and kept [B] bool: True where the row's group passed the filter.
        Per row because that is what a trainer masks with; the dropped groups are
        `group_ids[~kept].unique()`, the drop rate over rows is `1 - kept.float().mean()`.
    """
    op = "brpo_advantages"
    _check_rows(op, "pairwise_rewards", pairwise_rewards, like=None, floating=None, integer=None)
    if pairwise_rewards.dtype == torch.bool or pairwise_rewards.is_complex():
        raise ValueError(f"{op}: pairwise_rewards must be a real float or integer tensor, "
                         f"got {pairwise_rewards.dtype}")
    _check_rows(op, "group_ids", group_ids, like=pairwise_rewards, floating=None, integer=True)
    _check_scalar(op, "skew_threshold", skew_threshold, minimum=0.0)
    backend = _resolve(op, impl, pairwise_rewards)
    if validate and pairwise_rewards.numel() and not _kernel_validates(backend, pairwise_rewards):
        allowed = (pairwise_rewards == 0) | (pairwise_rewards == 1) | (pairwise_rewards == -1)
        if not bool(allowed.all()):
            bad = pairwise_rewards[~allowed][:4].tolist()
            raise ValueError(f"{op}: pairwise_rewards must hold only -1, 0 or +1; found {bad}")
    if backend == "reference":
        adv, kept = brpo_advantages_reference(pairwise_rewards, group_ids, skew_threshold=skew_threshold)
        return adv, kept
    return torch.ops.wz.brpo_advantages_fwd(pairwise_rewards, group_ids, float(skew_threshold),
                                            _kernel_validates(backend, pairwise_rewards) and validate)


def gigpo_advantages(
    episode_returns: torch.Tensor, group_ids: torch.Tensor, step_returns: torch.Tensor,
    anchor_ids: torch.Tensor, *, step_weight: float = 1.0, mode: str = "mean_norm", eps: float = 1e-6,
    impl: str = "auto", validate: bool = True,
) -> torch.Tensor:
    """GiGPO advantages, one row per environment step: A = A_episode + step_weight * A_step.

    Args:
        episode_returns: [B] floating, the return of the trajectory the step belongs to.
        group_ids: [B] integer, the trajectory group (same prompt / task) of each step.
        step_returns: [B] floating, the (discounted) return from this step on.
        anchor_ids: [B] integer, the anchor state (e.g. a hash of the observation). Anchor groups
            are rows with the same anchor id inside the same group id.
        step_weight: w, the weight of the step-level term.
        mode: "mean_norm" (x - mean) or "mean_std_norm" ((x - mean) / (std + eps), std unbiased),
            used at both levels.
        impl: "auto", "reference" or "triton".
        validate: check that both returns are finite (CPU: ValueError; CUDA: in the kernel, no sync,
            NaN for the rows of a bad group).
    Returns:
        advantages [B] float32. A_episode follows grpo's convention for a group of one (baseline 0,
        std 1); a singleton anchor group gives A_step = 0.
    """
    op = "gigpo_advantages"
    _check_rows(op, "episode_returns", episode_returns, like=None, floating=True, integer=None)
    _check_rows(op, "group_ids", group_ids, like=episode_returns, floating=None, integer=True)
    _check_rows(op, "step_returns", step_returns, like=episode_returns, floating=True, integer=None)
    _check_rows(op, "anchor_ids", anchor_ids, like=episode_returns, floating=None, integer=True)
    check_choice(op, "mode", mode, GIGPO_MODES)
    _check_scalar(op, "step_weight", step_weight)
    _check_scalar(op, "eps", eps, minimum=0.0)
    backend = _resolve(op, impl, episode_returns)
    if validate and not _kernel_validates(backend, episode_returns):
        _check_finite(op, "episode_returns", episode_returns)
        _check_finite(op, "step_returns", step_returns)
    if backend == "reference":
        return gigpo_advantages_reference(episode_returns, group_ids, step_returns, anchor_ids,
                                          step_weight=step_weight, mode=mode, eps=eps).float()
    return torch.ops.wz.gigpo_advantages_fwd(episode_returns, group_ids, step_returns, anchor_ids,
                                             float(step_weight), mode, float(eps),
                                             _kernel_validates(backend, episode_returns) and validate)
