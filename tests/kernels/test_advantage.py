"""group_advantages / brpo_advantages / gigpo_advantages against an independent oracle.

The oracle below is a naive per-group Python loop in float64 (math.fsum), written from DESIGN.md
section 3 without any of the library's code; hand-computed cases pin the oracle itself. Both the
library reference and the Triton kernel (under the interpreter on CPU) are held to it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from tests.helpers import assert_close_to_reference, poisoned_like
from wz_kernels import advantage as adv
from wz_kernels import brpo_advantages, gigpo_advantages, group_advantages

EPS = 1e-6
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

pytestmark = pytest.mark.interpreter


# ----------------------------------------------------------------------------- the oracle


def _groups(*keys: list) -> dict:
    members = defaultdict(list)
    for i, key in enumerate(zip(*keys)):
        members[key].append(i)
    return members


def _moments(values: list[float]):
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return n, mean, std


def oracle_group(rewards: list[float], ids: list[int], estimator: str, eps: float = EPS) -> list[float]:
    out = [math.nan] * len(rewards)
    for rows in _groups(ids).values():
        vals = [rewards[i] for i in rows]
        n, mean, std = _moments(vals)
        for i in rows:
            r = rewards[i]
            if estimator == "grpo":
                out[i] = (r - mean) / (std + eps) if n > 1 else (r - 0.0) / (1.0 + eps)
            elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
                out[i] = r - mean if n > 1 else r
            elif estimator == "rloo":
                out[i] = r - (math.fsum(vals) - r) / (n - 1) if n > 1 else 0.0
    if estimator == "reinforce_pp_baseline":
        b = len(out)
        mean_b = math.fsum(out) / b
        std_b = math.sqrt(math.fsum((x - mean_b) ** 2 for x in out) / (b - 1)) if b > 1 else 0.0
        out = [(x - mean_b) / (std_b + eps) for x in out]
    return out


def oracle_brpo(rewards: list[float], ids: list[int], threshold: float):
    out, kept = list(rewards), [True] * len(rewards)
    for rows in _groups(ids).values():
        if abs(sum(rewards[i] for i in rows)) / len(rows) > threshold:
            for i in rows:
                out[i], kept[i] = 0.0, False
    return out, kept


def oracle_gigpo(episode, ids, step, anchors, weight, mode, eps=EPS):
    by_std = mode == "mean_std_norm"
    a_ep, a_step = [math.nan] * len(episode), [math.nan] * len(episode)
    for rows in _groups(ids).values():
        n, mean, std = _moments([episode[i] for i in rows])
        for i in rows:
            if n == 1:
                a_ep[i] = episode[i] / (1.0 + eps) if by_std else episode[i]
            else:
                a_ep[i] = (episode[i] - mean) / (std + eps) if by_std else episode[i] - mean
    for rows in _groups(ids, anchors).values():
        n, mean, std = _moments([step[i] for i in rows])
        for i in rows:
            if n == 1:
                a_step[i] = 0.0
            else:
                a_step[i] = (step[i] - mean) / (std + eps) if by_std else step[i] - mean
    return [e + weight * s for e, s in zip(a_ep, a_step)]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- inputs


def random_ids(num_rows: int, num_groups: int, gen: torch.Generator) -> torch.Tensor:
    """Unsorted, non-contiguous, negative and huge int64 ids; unequal group sizes."""
    pool = torch.tensor([INT64_MIN, INT64_MAX, -1, 0, 7, 2**32, -(2**32), 2**40 + 3, -(2**62)])
    extra = torch.randint(-(2**62), 2**62, (max(num_groups - len(pool), 0),), generator=gen)
    pool = torch.cat([pool, extra])[torch.randperm(max(num_groups, len(pool)), generator=gen)][:num_groups]
    # skewed draw so sizes differ: a few large groups, several small, some singletons
    weights = torch.rand(num_groups, generator=gen) ** 3 + 0.02
    return pool[torch.multinomial(weights, num_rows, replacement=True, generator=gen)]


SHAPES = [(1, 1), (2, 1), (2, 2), (37, 5), (64, 1), (129, 40), (300, 300)]  # (B, groups drawn from)


def _rewards(num_rows: int, gen: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(num_rows, generator=gen) + offset).float()


def _run_triton(fn, *args, out_shape, **kwargs):
    """Call a private Triton launcher with a NaN-poisoned output buffer."""
    out = poisoned_like(torch.empty(out_shape, dtype=torch.float32))
    return fn(*args, **kwargs, out=out)


@pytest.fixture
def garbage_scratch(monkeypatch):
    """Fill the kernels' hash table and accumulators with garbage: the kernel must clear them."""
    real = adv._segment_scratch

    def dirty(num_rows, device):
        table, istats, sums, slot, slots = real(num_rows, device)
        table.fill_(12345)
        istats.fill_(-3)
        sums.fill_(2**61 + 5)
        slot.fill_(-7)
        return table, istats, sums, slot, slots

    monkeypatch.setattr(adv, "_segment_scratch", dirty)


# ----------------------------------------------------------------------------- hand-computed cases

# group 10: [1, 2, 3] (mean 2, unbiased std 1); group -5: [5] alone; group 2**40: [4, 4] (std 0)
HAND_REWARDS = [1.0, 5.0, 2.0, 4.0, 3.0, 4.0]
HAND_IDS = [10, -5, 10, 2**40, 10, 2**40]
_RPP_X = [-1.0, 5.0, 0.0, 0.0, 1.0, 0.0]  # r - mean_g, the singleton keeps r; batch mean 5/6
_RPP_STD = math.sqrt(sum((x - 5 / 6) ** 2 for x in _RPP_X) / 5)  # = sqrt(822 / 180)
HAND_EXPECTED = {
    "grpo": [-1 / (1 + EPS), 5 / (1 + EPS), 0.0, 0.0, 1 / (1 + EPS), 0.0],
    "dr_grpo": [-1.0, 5.0, 0.0, 0.0, 1.0, 0.0],
    "rloo": [1 - 2.5, 0.0, 2 - 2.0, 0.0, 3 - 1.5, 0.0],
    "reinforce_pp_baseline": [(x - 5 / 6) / (_RPP_STD + EPS) for x in _RPP_X],
}


def test_hand_rpp_std_is_what_we_think():
    assert _RPP_STD == pytest.approx(math.sqrt(822 / 180), rel=1e-12)


@pytest.mark.parametrize("estimator", adv.ESTIMATORS)
def test_hand_cases(estimator):
    expected = _t(HAND_EXPECTED[estimator])
    rewards, ids = torch.tensor(HAND_REWARDS), torch.tensor(HAND_IDS)
    assert_close_to_reference(_t(oracle_group(HAND_REWARDS, HAND_IDS, estimator)), expected, atol=1e-12)
    ref = adv.group_advantages_reference(rewards, ids, estimator, upcast=True)
    assert_close_to_reference(ref, expected, atol=1e-12)
    out = _run_triton(adv._group_advantages_triton, rewards, ids, estimator, EPS, out_shape=(6,))
    assert_close_to_reference(out, expected, atol=1e-6, rtol=1e-6)


BRPO_HAND = [  # (rewards of one group, dropped?) with threshold 0.6
    ([1, 1, 1, 0], True),  # |3| / 4 = 0.75
    ([1, -1, -1, 0], False),  # 0.25
    ([1, 1, 1, 0, 0], False),  # exactly 0.6 is not > 0.6
    ([-1, -1, -1, -1, 0], True),  # 0.8, negative skew
    ([0], False),  # the reference alone
    ([1, 1, 1, -1, 0], False),  # 0.4
]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_brpo_hand(impl):
    rewards, ids, expected_adv, expected_kept = [], [], [], []
    for g, (values, dropped) in enumerate(BRPO_HAND):
        rewards += values
        ids += [1000 * g - 3] * len(values)
        expected_adv += [0.0] * len(values) if dropped else values
        expected_kept += [not dropped] * len(values)
    order = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(3))
    r = torch.tensor(rewards, dtype=torch.float32)[order]
    i = torch.tensor(ids)[order]
    out, kept = brpo_advantages(r, i, impl=impl)
    assert out.dtype == torch.float32 and kept.dtype == torch.bool and kept.shape == r.shape
    assert torch.equal(out, torch.tensor(expected_adv, dtype=torch.float32)[order])
    assert torch.equal(kept, torch.tensor(expected_kept)[order])
    assert oracle_brpo(r.tolist(), i.tolist(), 0.6) == (out.tolist(), kept.tolist())


def test_gigpo_hand():
    # one group (id 3) of four steps: anchors 7, 7, 9, 9 with step returns 1, 3 | 2, 2; group 8 alone
    episode = [1.0, 1.0, 3.0, 3.0, 6.0]
    ids = [3, 3, 3, 3, 8]
    step = [1.0, 3.0, 2.0, 2.0, 4.0]
    anchors = [7, 7, 9, 9, 7]  # anchor 7 in group 8 is not anchor 7 in group 3: singleton there
    # episode: mean 2 -> [-1, -1, 1, 1], singleton 6 keeps 6; step: [-1, 1, 0, 0], singleton 0
    expected = [-1 - 0.5, -1 + 0.5, 1.0, 1.0, 6.0]
    assert oracle_gigpo(episode, ids, step, anchors, 0.5, "mean_norm") == pytest.approx(expected)
    args = (torch.tensor(episode), torch.tensor(ids), torch.tensor(step), torch.tensor(anchors))
    for impl in ("reference", "triton"):
        out = gigpo_advantages(*args, step_weight=0.5, mode="mean_norm", impl=impl)
        assert_close_to_reference(out, _t(expected), atol=1e-6)
    # mean_std_norm: episode std = sqrt(4/3); step std of (1, 3) = sqrt(2)
    s_ep, s_step = math.sqrt(4 / 3), math.sqrt(2)
    expected = [-1 / (s_ep + EPS) - 0.5 / (s_step + EPS), -1 / (s_ep + EPS) + 0.5 / (s_step + EPS),
                1 / (s_ep + EPS), 1 / (s_ep + EPS), 6 / (1 + EPS)]
    for impl in ("reference", "triton"):
        out = gigpo_advantages(*args, step_weight=0.5, mode="mean_std_norm", impl=impl)
        assert_close_to_reference(out, _t(expected), atol=1e-6)


# ----------------------------------------------------------------------------- random cases


@pytest.mark.parametrize("estimator", adv.ESTIMATORS)
@pytest.mark.parametrize("num_rows,num_groups", SHAPES)
def test_group_advantages_random(estimator, num_rows, num_groups, garbage_scratch):
    gen = torch.Generator().manual_seed(num_rows * 131 + num_groups)
    ids = random_ids(num_rows, num_groups, gen)
    rewards = _rewards(num_rows, gen)
    expected = _t(oracle_group(rewards.tolist(), ids.tolist(), estimator))
    ref64 = adv.group_advantages_reference(rewards, ids, estimator, upcast=True)
    assert_close_to_reference(ref64, expected, atol=1e-9, rtol=1e-9, name="reference")
    assert_close_to_reference(group_advantages(rewards, ids, estimator), expected, atol=1e-5, rtol=1e-5,
                              name="auto (reference float32)")
    out = _run_triton(adv._group_advantages_triton, rewards, ids, estimator, EPS, out_shape=(num_rows,))
    assert_close_to_reference(out, expected, atol=1e-5, rtol=1e-5, name="triton")


@pytest.mark.parametrize("estimator", adv.ESTIMATORS)
def test_large_offset_and_equal_rewards(estimator):
    """Rewards 1e4 + noise (E[x^2] - E[x]^2 in float32 would be garbage) and all-equal groups."""
    gen = torch.Generator().manual_seed(11)
    ids = random_ids(150, 12, gen)
    rewards = _rewards(150, gen, offset=1e4)
    same = ids == ids[0]
    rewards[same] = 12345.678  # one group where std = 0: r - mean must be exactly 0, not noise / eps
    expected = _t(oracle_group(rewards.tolist(), ids.tolist(), estimator))
    for out in (group_advantages(rewards, ids, estimator, impl="reference"),
                group_advantages(rewards, ids, estimator, impl="triton")):
        assert_close_to_reference(out, expected, atol=1e-4, rtol=1e-5)
        if estimator != "reinforce_pp_baseline" and same.sum() > 1:
            assert torch.equal(out[same], torch.zeros(int(same.sum())))


def test_single_group_all_equal_and_dtypes():
    rewards = torch.full((33,), 0.1, dtype=torch.bfloat16)
    ids = torch.full((33,), -9, dtype=torch.int32)
    for impl in ("reference", "triton"):
        for estimator in ("grpo", "dr_grpo", "rloo"):
            out = group_advantages(rewards, ids, estimator, impl=impl)
            assert out.dtype == torch.float32 and torch.equal(out, torch.zeros(33))


def test_many_singletons_collide_in_low_bits():
    """Ids equal in their low 32 bits: the hash must still separate them (probing works)."""
    ids = torch.arange(200, dtype=torch.int64) * 2**32 + 5
    ids[100:] = ids[:100]  # pairs
    rewards = _rewards(200, torch.Generator().manual_seed(5))
    expected = _t(oracle_group(rewards.tolist(), ids.tolist(), "grpo"))
    assert_close_to_reference(group_advantages(rewards, ids, impl="triton"), expected, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    for impl in ("reference", "triton"):
        assert group_advantages(torch.empty(0), torch.empty(0, dtype=torch.long), impl=impl).shape == (0,)
        out, kept = brpo_advantages(torch.empty(0), torch.empty(0, dtype=torch.long), impl=impl)
        assert out.shape == kept.shape == (0,)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("num_rows,num_groups", [(1, 1), (41, 6), (200, 50)])
def test_brpo_random(threshold, num_rows, num_groups, garbage_scratch):
    gen = torch.Generator().manual_seed(num_rows + num_groups)
    ids = random_ids(num_rows, num_groups, gen)
    # per-group bias so that some groups are skewed and some are not
    bias = torch.rand(num_rows, generator=gen)
    rewards = torch.where(torch.rand(num_rows, generator=gen) < bias, 1.0, -1.0)
    rewards[torch.rand(num_rows, generator=gen) < 0.2] = 0.0
    expected, expected_kept = oracle_brpo(rewards.tolist(), ids.tolist(), threshold)
    ref, ref_kept = adv.brpo_advantages_reference(rewards, ids, skew_threshold=threshold)
    assert ref.tolist() == expected and ref_kept.tolist() == expected_kept
    poisoned_kept = torch.full((num_rows,), 7, dtype=torch.int8)
    out, kept = adv._brpo_advantages_triton(rewards, ids, threshold, out=poisoned_like(rewards),
                                            kept=poisoned_kept)
    assert out.tolist() == expected and kept.tolist() == expected_kept


def test_brpo_integer_rewards():
    ids = torch.tensor([4, 4, 4, 9, 9])
    out, kept = brpo_advantages(torch.tensor([1, 1, 1, -1, 0]), ids, impl="triton")
    assert out.tolist() == [0.0, 0.0, 0.0, -1.0, 0.0] and kept.tolist() == [False] * 3 + [True] * 2


@pytest.mark.parametrize("mode", adv.GIGPO_MODES)
@pytest.mark.parametrize("num_rows,num_groups,num_anchors", [(1, 1, 1), (57, 4, 6), (160, 9, 30)])
def test_gigpo_random(mode, num_rows, num_groups, num_anchors, garbage_scratch):
    gen = torch.Generator().manual_seed(num_rows * 7 + num_anchors)
    ids = random_ids(num_rows, num_groups, gen)
    anchors = random_ids(num_rows, num_anchors, gen)  # same anchor id across groups: must not merge
    episode = _rewards(num_rows, gen, offset=3.0)
    step = _rewards(num_rows, gen)
    expected = _t(oracle_gigpo(episode.tolist(), ids.tolist(), step.tolist(), anchors.tolist(), 0.7, mode))
    ref64 = adv.gigpo_advantages_reference(episode, ids, step, anchors, step_weight=0.7, mode=mode,
                                           upcast=True)
    assert_close_to_reference(ref64, expected, atol=1e-9, rtol=1e-9, name="reference")
    out = _run_triton(adv._gigpo_advantages_triton, episode, ids, step, anchors, 0.7, mode, EPS,
                      out_shape=(num_rows,))
    assert_close_to_reference(out, expected, atol=1e-5, rtol=1e-5, name="triton")


# ----------------------------------------------------------------------------- torch.library / compile


def _all_triton_ops(rewards, ids, anchors, validate=False):
    """Every Triton launcher on one batch: {name: output} (BRPO's kept as a float tensor)."""
    outs = {est: adv._group_advantages_triton(rewards, ids, est, EPS, validate=validate)
            for est in adv.ESTIMATORS}
    brpo, kept = adv._brpo_advantages_triton(rewards.sign(), ids, 0.3, validate=validate)
    outs["brpo"], outs["brpo kept"] = brpo, kept.float()
    for mode in adv.GIGPO_MODES:
        outs[mode] = adv._gigpo_advantages_triton(rewards, ids, rewards.cos(), anchors, 0.7, mode, EPS,
                                                  validate=validate)
    return outs


@pytest.mark.parametrize("num_rows,num_groups", [(300, 40), (257, 257)])
def test_kernel_result_does_not_depend_on_row_order(num_rows, num_groups):
    """Bitwise determinism by construction: every per-group accumulation is an integer atomic, so the
    order the rows arrive in (which decides which row claims a hash slot and in which order sums land,
    the two sources of run-to-run variation on a GPU) changes no bit of any row's advantage. (The batch
    whitening of reinforce_pp_baseline sums rows in a fixed per-lane order: same inputs, same bits,
    but a permutation of the rows may move its last bit.)"""
    gen = torch.Generator().manual_seed(num_rows)
    ids = random_ids(num_rows, num_groups, gen)
    rewards = _rewards(num_rows, gen, offset=1e3)
    anchors = random_ids(num_rows, 5, gen)
    want = _all_triton_ops(rewards, ids, anchors)
    for seed in (1, 2):
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
        got = _all_triton_ops(rewards[perm], ids[perm], anchors[perm])
        for name in want:
            if name == "reinforce_pp_baseline":  # its batch whitening sums all rows in row order
                torch.testing.assert_close(got[name], want[name][perm], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got[name], want[name][perm]), name


def test_kernel_validation_marks_bad_groups_without_a_host_check():
    """validate=True on CUDA runs in the kernel (no sync): every row of a group holding a non-finite
    reward (BRPO: a reward other than -1/0/+1) gets NaN (BRPO: kept=False); other rows are untouched."""
    ids = torch.tensor([3, 3, 8, 8, 8, 5])
    anchors = torch.tensor([0, 1, 0, 0, 1, 0])
    rewards = torch.tensor([0.5, 1.0, 2.0, float("nan"), 1.5, -1.0])
    bad = ids == 8
    clean = torch.where(bad, 0.0, rewards)
    for est in adv.ESTIMATORS:
        got = adv._group_advantages_triton(rewards, ids, est, EPS, validate=True)
        if est == "reinforce_pp_baseline":  # the batch whitening mixes every row: all NaN
            assert torch.isnan(got).all()
            continue
        want = adv._group_advantages_triton(clean, ids, est, EPS)
        assert torch.isnan(got[bad]).all() and torch.equal(got[~bad], want[~bad]), est
    signs = torch.tensor([1.0, -1.0, 1.0, 0.5, 0.0, 1.0])  # 0.5 in group 8
    out, kept = adv._brpo_advantages_triton(signs, ids, 0.6, validate=True)
    want, want_kept = adv._brpo_advantages_triton(torch.where(bad, 0.0, signs), ids, 0.6)
    assert torch.isnan(out[bad]).all() and not kept[bad].any()
    assert torch.equal(out[~bad], want[~bad]) and torch.equal(kept[~bad], want_kept[~bad])
    step = torch.tensor([1.0, 2.0, 3.0, 4.0, float("inf"), 0.0])  # anchor group (8, 1)
    got = adv._gigpo_advantages_triton(clean, ids, step, anchors, 1.0, "mean_norm", EPS, validate=True)
    assert torch.isnan(got[4]) and torch.isfinite(got[torch.arange(6) != 4]).all()
    assert not adv._kernel_validates("triton", rewards)  # CPU tensors: the host check runs (and raises)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    ids = random_ids(20, 4, gen)
    rewards = _rewards(20, gen)
    for validate in (False, True):
        torch.library.opcheck(torch.ops.wz.group_advantages_fwd, (rewards, ids, "grpo", EPS, validate))
        torch.library.opcheck(torch.ops.wz.brpo_advantages_fwd, (rewards.sign(), ids, 0.6, validate))
        torch.library.opcheck(torch.ops.wz.gigpo_advantages_fwd,
                              (rewards, ids, rewards, ids % 3, 1.0, "mean_norm", EPS, validate))


def test_torch_compile_traces_the_kernel():
    gen = torch.Generator().manual_seed(1)
    ids = random_ids(40, 6, gen)
    rewards = _rewards(40, gen)

    def fn(r, g):
        return 2.0 * group_advantages(r, g, "rloo", impl="triton", validate=False)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    expected = _t(oracle_group(rewards.tolist(), ids.tolist(), "rloo"))
    assert_close_to_reference(compiled(rewards, ids), 2 * expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

R3, I3 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1])


@pytest.mark.parametrize("call,match", [
    (lambda: group_advantages(R3, torch.tensor([0, 1])), "group_ids"),
    (lambda: group_advantages(R3, I3.float()), "group_ids.*integer"),
    (lambda: group_advantages(R3.long(), I3), "rewards.*floating"),
    (lambda: group_advantages(R3[None], I3[None]), "rewards.*1-D"),
    (lambda: group_advantages(R3, I3, "ppo"), "estimator"),
    (lambda: group_advantages(torch.tensor([1.0, float("nan"), 0.0]), I3), "rewards.*non-finite"),
    (lambda: group_advantages(torch.tensor([1.0, float("inf"), 0.0]), I3), "rewards.*non-finite"),
    (lambda: group_advantages(R3, I3, eps=-1.0), "eps"),
    (lambda: group_advantages(R3, I3.to("meta")), "group_ids.*meta"),
    (lambda: group_advantages(R3.tolist(), I3), "rewards.*torch.Tensor"),
    (lambda: group_advantages(R3, I3, impl="fast"), "impl"),
    (lambda: brpo_advantages(torch.tensor([1.0, 0.5, -1.0]), I3), "pairwise_rewards.*-1, 0 or \\+1"),
    (lambda: brpo_advantages(torch.tensor([1.0, 2.0, -1.0]), I3), "pairwise_rewards"),
    (lambda: brpo_advantages(torch.tensor([1.0, float("nan"), -1.0]), I3), "pairwise_rewards"),
    (lambda: brpo_advantages(R3.sign(), I3[:2]), "group_ids"),
    (lambda: brpo_advantages(R3.sign(), I3, skew_threshold=float("nan")), "skew_threshold"),
    (lambda: brpo_advantages(torch.tensor([True, False, True]), I3), "pairwise_rewards"),
    (lambda: gigpo_advantages(R3, I3, R3[:2], I3), "step_returns"),
    (lambda: gigpo_advantages(R3, I3, R3, I3.float()), "anchor_ids.*integer"),
    (lambda: gigpo_advantages(R3, I3, R3, I3, mode="std"), "mode"),
    (lambda: gigpo_advantages(R3, I3, torch.tensor([0.0, float("nan"), 1.0]), I3), "step_returns"),
    (lambda: gigpo_advantages(torch.tensor([0.0, float("inf"), 1.0]), I3, R3, I3), "episode_returns"),
    (lambda: gigpo_advantages(R3, I3, R3, I3, step_weight=float("inf")), "step_weight"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- GPU (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows,num_groups", [(1, 1), (4099, 300), (16384, 1024), (20000, 20000)])
def test_triton_on_cuda_matches_reference(num_rows, num_groups):
    """The compiled kernel (block 4096, 16 warps: paths the interpreter runs never take) vs float64."""
    gen = torch.Generator().manual_seed(num_rows)
    ids = random_ids(num_rows, num_groups, gen)
    rewards = _rewards(num_rows, gen, offset=100.0)
    anchors = random_ids(num_rows, 7, gen)
    for estimator in adv.ESTIMATORS:
        expected = adv.group_advantages_reference(rewards, ids, estimator, upcast=True)
        out = group_advantages(rewards.cuda(), ids.cuda(), estimator, validate=False)
        assert_close_to_reference(out.cpu(), expected, atol=1e-4, rtol=1e-4, name=estimator)
    signs = rewards.sub(100.0).sign()
    expected, expected_kept = adv.brpo_advantages_reference(signs, ids)
    out, kept = brpo_advantages(signs.cuda(), ids.cuda(), validate=False)
    assert torch.equal(out.cpu(), expected) and torch.equal(kept.cpu(), expected_kept)
    for mode in adv.GIGPO_MODES:
        expected = adv.gigpo_advantages_reference(rewards, ids, rewards.sin(), anchors, mode=mode,
                                                  upcast=True)
        out = gigpo_advantages(rewards.cuda(), ids.cuda(), rewards.sin().cuda(), anchors.cuda(), mode=mode,
                               validate=False)
        assert_close_to_reference(out.cpu(), expected, atol=1e-4, rtol=1e-4, name=mode)


def test_triton_row_limit(monkeypatch):
    monkeypatch.setattr(adv, "_MAX_TRITON_ROWS", 3)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        group_advantages(R3, I3, impl="triton")
    assert group_advantages(R3, I3, impl="reference").shape == (3,)


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows,num_groups", [(16384, 1024), (20000, 20000), (4099, 3)])
def test_cuda_kernels_are_bitwise_repeatable_and_sync_free(num_rows, num_groups):
    """Same inputs, same bits, run after run (bit-identical resume on GPU), with validate=True (the
    default: checked in the kernel) and not one host sync (set_sync_debug_mode raises on one); a bad
    reward there marks its group NaN instead of raising."""
    gen = torch.Generator().manual_seed(num_rows + num_groups)
    ids = random_ids(num_rows, num_groups, gen).cuda()
    rewards = _rewards(num_rows, gen, offset=1e3).cuda()
    anchors = random_ids(num_rows, 7, gen).cuda()

    def all_ops():
        outs = {est: group_advantages(rewards, ids, est) for est in adv.ESTIMATORS}
        outs["brpo"], outs["brpo kept"] = brpo_advantages(rewards.sub(1e3).sign(), ids)
        for mode in adv.GIGPO_MODES:
            outs[mode] = gigpo_advantages(rewards, ids, rewards.cos(), anchors, mode=mode)
        return outs

    all_ops()  # compile outside the sync check
    runs = []
    for _ in range(3):
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs.append(all_ops())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for name in runs[0]:
        assert torch.isfinite(runs[0][name].float()).all(), name
        for other in runs[1:]:
            assert torch.equal(runs[0][name], other[name]), name
    bad = rewards.clone()
    bad[0] = float("nan")
    out = group_advantages(bad, ids, "grpo")
    same_group = ids == ids[0]
    assert torch.isnan(out[same_group]).all() and torch.equal(out[~same_group], runs[0]["grpo"][~same_group])
