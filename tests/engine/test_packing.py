"""Packing: every token lands exactly once, bins stay within budget, round trips are exact."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wz_engine.packing import (
    pack_rl_batch,
    pack_sequences,
    packing_efficiency,
    pad_sequences,
    plan_bins,
    unpack,
)


def rl_length_mix(n: int, seed: int = 0, lo: int = 64, hi: int = 4096) -> list[int]:
    """Log-normal response lengths clipped to [lo, hi] (median ~600 tokens, long tail), as in RL rollouts."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=6.4, sigma=0.9, size=n), lo, hi).astype(int).tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(50, 120))
def test_plan_bins_properties(lengths, max_tokens):
    bins = plan_bins(lengths, max_tokens)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # no sequence lost or duplicated
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= max_tokens
    # Any-fit property: a bin is opened only when the item fits nowhere, so no two bins could be merged.
    for a in range(len(loads)):
        for b in range(a + 1, len(loads)):
            assert loads[a] + loads[b] > max_tokens


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=30), min_size=1, max_size=20))
def test_pack_unpack_round_trip(seqs):
    batches = pack_sequences(seqs, max_tokens=40)
    assert sum(b.num_tokens for b in batches) == sum(map(len, seqs))
    for b in batches:
        assert b.num_tokens <= 40
        assert b.cu_seqlens.dtype == torch.int32 and int(b.cu_seqlens[-1]) == b.num_tokens
        assert b.max_seqlen == max(b.lengths)
        for piece_pos, piece_ids, i in zip(b.split(b.position_ids), b.split(b.input_ids), b.sequence_index.tolist()):
            assert piece_pos.tolist() == list(range(len(seqs[i])))
            assert piece_ids.tolist() == seqs[i]
        assert b.token_sequence_index.tolist() == [i for i in b.sequence_index.tolist() for _ in seqs[i]]
    back = unpack(batches, [b.input_ids * 2 for b in batches])  # a per-token "model output"
    assert [t.tolist() for t in back] == [[2 * x for x in s] for s in seqs]
    padded, mask = pad_sequences(back, pad_value=-1)
    assert padded.shape == (len(seqs), max(map(len, seqs)))
    assert mask.sum().item() == sum(map(len, seqs)) and (padded[~mask] == -1).all()


def test_rl_batch_hand_computed():
    prompts = [[1, 2, 3], [7]]
    responses = [[4, 5], [8, 9, 10]]
    (batch,) = pack_rl_batch(prompts, responses, max_tokens=16)
    # Longest first: sequence 0 ([1, 2, 3, 4, 5]) then sequence 1 ([7, 8, 9, 10]).
    assert batch.sequence_index.tolist() == [0, 1]
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch.cu_seqlens.tolist() == [0, 5, 9] and batch.max_seqlen == 5
    assert batch.targets.tolist() == [2, 3, 4, 5, 0, 8, 9, 10, 0]
    assert batch.loss_mask.tolist() == [False, False, True, True, False, True, True, True, False]
    assert [t.tolist() for t in batch.gather_responses(batch.targets)] == [[4, 5], [8, 9, 10]]
    assert [t.tolist() for t in unpack([batch], [batch.targets], responses_only=True)] == responses
    sampler_logp = [torch.tensor([-0.5, -0.25]), torch.tensor([-1.0, -2.0, -3.0])]
    assert batch.scatter_responses(sampler_logp).tolist() == [0, 0, -0.5, -0.25, 0, -1.0, -2.0, -3.0, 0]
    assert batch.per_token(torch.tensor([10.0, 20.0])).tolist() == [10.0] * 5 + [20.0] * 4
    inputs = batch.model_inputs()
    assert inputs["input_ids"].shape == (1, 9) and inputs["cu_seq_lens_q"].tolist() == [0, 5, 9]
    assert batch.to("cpu").loss_mask.tolist() == batch.loss_mask.tolist()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=15))
def test_rl_batch_targets_and_mask(shape):
    g = torch.Generator().manual_seed(len(shape))
    prompts = [torch.randint(1, 100, (p,), generator=g) for p, _ in shape]
    responses = [torch.randint(1, 100, (r,), generator=g) for _, r in shape]
    batches = pack_rl_batch(prompts, responses, max_tokens=20)
    assert sum(int(b.loss_mask.sum()) for b in batches) == sum(r for _, r in shape)
    back = unpack(batches, [b.targets for b in batches], responses_only=True)
    assert all(torch.equal(a, b) for a, b in zip(back, responses))
    for b in batches:
        last = b.cu_seqlens[1:].long() - 1
        assert not b.loss_mask[last].any()  # the last token of a sequence never has a target


def test_rl_length_mix_efficiency():
    """The issue's target: >= 95% useful tokens per bin on an RL length mix (log-normal 64..4096)."""
    for max_tokens in (16384, 32768, 65536):
        lengths = rl_length_mix(1024, seed=max_tokens)
        batches = pack_sequences([[0] * n for n in lengths], max_tokens)
        eff = packing_efficiency(batches, max_tokens)
        padded_eff = sum(lengths) / (len(lengths) * max(lengths))
        print(f"max_tokens={max_tokens}: {len(batches)} bins, packed {eff:.4f} vs padded {padded_eff:.3f}")
        assert eff >= 0.95


@pytest.mark.parametrize(
    "seqs, max_tokens, match",
    [
        ([[1, 2], [1, 2, 3, 4, 5]], 4, "sequence 1 has length 5 > max_tokens=4"),
        ([[1], []], 4, "sequence 1 is empty"),
        ([], 4, "no sequences"),
        ([[1]], 0, "max_tokens must be a positive int"),
        ([[[1, 2]]], 4, "must be 1-D"),
        ([torch.tensor([0.5])], 4, "integer token ids"),
    ],
)
def test_bad_inputs(seqs, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        pack_sequences(seqs, max_tokens)


def test_bad_rl_inputs():
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        pack_rl_batch([[]], [[1]], 8)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_rl_batch([[1], [2]], [[1]], 8)
    (batch,) = pack_rl_batch([[1]], [[2, 3]], 8)
    with pytest.raises(ValueError, match="expected 2"):
        batch.scatter_responses([torch.zeros(3)])


@pytest.mark.parametrize("responses_only", [False, True])
def test_unpack_refuses_bins_that_do_not_cover_each_sequence_once(responses_only):
    batches = pack_rl_batch([[1], [2, 3], [4]], [[5], [6], [7, 8]], max_tokens=3)
    assert len(batches) == 3
    values = [b.targets for b in batches]
    with pytest.raises(ValueError, match="appears more than once or out of range"):
        unpack([batches[0], batches[0], batches[1]], values, responses_only=responses_only)
    with pytest.raises(ValueError, match="2 value tensors for 3 packed batches"):
        unpack(batches, values[:2], responses_only=responses_only)
    third = next(b for b in batches if b.sequence_index.tolist() == [2])
    with pytest.raises(ValueError, match="out of range"):  # one bin holding sequence 2 of 1
        unpack([third], [third.targets], responses_only=responses_only)
    if responses_only:
        with pytest.raises(ValueError, match="responses_only needs PackedRLBatch"):
            unpack(pack_sequences([[1, 2]], 4), [torch.zeros(2)], responses_only=True)
