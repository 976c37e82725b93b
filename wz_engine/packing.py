"""Token-budget packing: variable-length sequences -> dense [N] micro-batches, no padding.

Sequences are assigned to bins of at most `max_tokens` tokens by best-fit decreasing (each
sequence, longest first, goes to the fullest bin that still has room; this is never worse than
first-fit decreasing's bound of 11/9 OPT + 6/9 bins and in practice fills bins to >95% on RL length
mixes). Inside a bin the sequences are concatenated; `cu_seqlens` marks their boundaries and
`position_ids` restart at 0 for each one, which is what `wz_kernels.varlen_attention` and the
"wz_varlen" transformers attention (wz_engine.attention) consume.

Two entry points:
  - `pack_sequences(seqs, max_tokens)` -> list[PackedBatch]: generic packing + `unpack`.
  - `pack_rl_batch(prompts, responses, max_tokens)` -> list[PackedRLBatch]: prompt+response rollouts
    with next-token targets and a loss mask over response tokens only, ready for a policy update.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TokenSeq = Sequence[int] | torch.Tensor


# ----------------------------------------------------------------------------- bin planning


def plan_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Assign sequence indices to bins holding at most `max_tokens` tokens (best-fit decreasing).

    Returns the bins, each a list of indices into `lengths` (longest first inside a bin). Bins are
    ordered by creation, so the fullest come first. Deterministic: ties keep the input order.
    Raises ValueError for a non-positive budget, an empty sequence, or one longer than the budget.
    """
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    for i, length in enumerate(lengths):
        if length <= 0:
            raise ValueError(f"sequence {i} is empty (length {length}); packing needs at least one token")
        if length > max_tokens:
            raise ValueError(f"sequence {i} has length {length} > max_tokens={max_tokens}; "
                             "raise max_tokens or truncate it")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining room, bin index), sorted: the first entry with room >= length is the best fit.
    room: list[tuple[int, int]] = []
    for i in order:
        pos = bisect.bisect_left(room, (lengths[i], -1))
        if pos == len(room):
            bins.append([i])
            bisect.insort(room, (max_tokens - lengths[i], len(bins) - 1))
        else:
            left, b = room.pop(pos)
            bins[b].append(i)
            bisect.insort(room, (left - lengths[i], b))
    return bins


def _as_ids(seq: TokenSeq, name: str, index: int) -> torch.Tensor:
    ids = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"{name} {index} must be 1-D token ids, got shape {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"{name} {index} must hold integer token ids, got {ids.dtype}")
    return ids.long()


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu


def _position_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(length) for length in lengths])


# ----------------------------------------------------------------------------- generic packing


@dataclass(frozen=True)
class PackedBatch:
    """One bin of packed sequences (all tensors on CPU; move them with `.to(device)`)."""

    input_ids: torch.Tensor
    """[N] int64: the bin's sequences concatenated."""
    position_ids: torch.Tensor
    """[N] int64: position inside its own sequence (restarts at 0 at each boundary)."""
    cu_seqlens: torch.Tensor
    """[B+1] int32: sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1]."""
    max_seqlen: int
    """Length of the longest sequence in the bin."""
    sequence_index: torch.Tensor
    """[B] int64: index of each packed sequence in the caller's original list."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def lengths(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    @property
    def token_sequence_index(self) -> torch.Tensor:
        """[N] int64: original index of the sequence each token belongs to."""
        return self.sequence_index.repeat_interleave(self.cu_seqlens.diff().long())

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values [N, ...] -> one tensor per packed sequence (bin order)."""
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"values has {values.shape[0]} rows but the bin holds {self.num_tokens} tokens")
        return list(values.split(self.lengths))

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.sequence_index.to(device))


def pack_sequences(sequences: Sequence[TokenSeq], max_tokens: int) -> list[PackedBatch]:
    """Pack token sequences into bins of at most `max_tokens` tokens each (no padding).

    sequences: B token-id sequences (lists or 1-D tensors), all non-empty and <= max_tokens.
    Every sequence lands in exactly one bin, whole; `PackedBatch.sequence_index` maps back.
    """
    if len(sequences) == 0:
        raise ValueError("pack_sequences: got no sequences")
    ids = [_as_ids(s, "sequence", i) for i, s in enumerate(sequences)]
    lengths = [int(t.numel()) for t in ids]
    batches = []
    for members in plan_bins(lengths, max_tokens):
        member_lengths = [lengths[i] for i in members]
        batches.append(PackedBatch(
            input_ids=torch.cat([ids[i] for i in members]),
            position_ids=_position_ids(member_lengths),
            cu_seqlens=_cu_seqlens(member_lengths),
            max_seqlen=max(member_lengths),
            sequence_index=torch.tensor(members, dtype=torch.long),
        ))
    return batches


def unpack(batches: Sequence[PackedBatch], values: Sequence[torch.Tensor], *,
           responses_only: bool = False) -> list[torch.Tensor]:
    """Per-token outputs of each bin ([N_bin, ...] each) -> per-sequence tensors in the original order.

    responses_only (bins from `pack_rl_batch`): per-response [R_i, ...] tensors instead, the values at
    each sequence's scored positions (see PackedRLBatch.gather_responses).
    """
    if len(batches) != len(values):
        raise ValueError(f"got {len(values)} value tensors for {len(batches)} packed batches")
    total = sum(int(b.sequence_index.numel()) for b in batches)
    out: list[torch.Tensor | None] = [None] * total
    for batch, vals in zip(batches, values):
        if responses_only and not isinstance(batch, PackedRLBatch):
            raise ValueError("unpack: responses_only needs PackedRLBatch bins (from pack_rl_batch)")
        pieces = batch.gather_responses(vals) if responses_only else batch.split(vals)
        for i, piece in zip(batch.sequence_index.tolist(), pieces):
            if i >= total or out[i] is not None:
                raise ValueError(f"sequence {i} appears more than once or out of range in the packed batches")
            out[i] = piece
    return out  # type: ignore[return-value]


def pad_sequences(pieces: Sequence[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence [L_i, ...] tensors -> (padded [B, max L, ...], mask [B, max L] bool), right-padded."""
    padded = torch.nn.utils.rnn.pad_sequence(list(pieces), batch_first=True, padding_value=pad_value)
    lengths = torch.tensor([p.shape[0] for p in pieces])
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask


def packing_efficiency(batches: Sequence[PackedBatch], max_tokens: int) -> float:
    """Useful tokens / token slots (bins x max_tokens): 1.0 means no slot was left empty."""
    return sum(b.num_tokens for b in batches) / (len(batches) * max_tokens) if batches else 0.0


# ----------------------------------------------------------------------------- RL micro-batches


@dataclass(frozen=True, kw_only=True)
class PackedRLBatch(PackedBatch):
    """A packed bin of prompt+response rollouts with next-token targets (one policy-update micro-batch).

    Token t of a sequence predicts token t+1 of the same sequence. The loss covers exactly the
    positions whose *target* is a response token, so for a prompt of P tokens and a response of R
    tokens the scored positions are P-1 .. P+R-2 (R of them); the last token of each sequence has
    no target (target 0, mask False). Log-probs of the model at scored positions, in order, are the
    log-probs of the response tokens.
    """

    targets: torch.Tensor
    """[N] int64: next token within the same sequence; 0 where there is none (masked)."""
    loss_mask: torch.Tensor
    """[N] bool: True where the target is a response token."""
    prompt_lengths: torch.Tensor
    """[B] int64: prompt length of each packed sequence (bin order)."""

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff().long() - self.prompt_lengths

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers causal LM using attn_implementation="wz_varlen"
        (or flash_attention_2): one packed row [1, N] plus the varlen boundaries."""
        cu = self.cu_seqlens.to(self.input_ids.device)
        return dict(input_ids=self.input_ids[None], position_ids=self.position_ids[None],
                    cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_seqlen,
                    max_length_k=self.max_seqlen, use_cache=False)

    def gather_responses(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values [N, ...] at scored positions -> one [R_b, ...] tensor per sequence (bin order)."""
        return [piece[self.prompt_lengths[b] - 1: self.prompt_lengths[b] - 1 + self.response_lengths[b]]
                for b, piece in enumerate(self.split(values))]

    def scatter_responses(self, responses: Sequence[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Per-response values (e.g. sampler log-probs), indexed by ORIGINAL sequence index, -> [N] on the
        scored positions of this bin, `fill` elsewhere."""
        out = torch.full((self.num_tokens,), fill, dtype=responses[0].dtype, device=responses[0].device)
        picked = [responses[i].reshape(-1) for i in self.sequence_index.tolist()]
        for i, (r, want) in enumerate(zip(picked, self.response_lengths.tolist())):
            if r.numel() != want:
                raise ValueError(f"response values for sequence {int(self.sequence_index[i])} have {r.numel()} "
                                 f"entries, expected {want}")
        out[self.loss_mask.to(out.device)] = torch.cat(picked) if picked else out[:0]
        return out

    def per_token(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Per-sequence values [B_total] indexed by ORIGINAL sequence index (e.g. advantages) -> [N]."""
        return per_sequence[self.token_sequence_index.to(per_sequence.device)]

    def to(self, device) -> PackedRLBatch:
        moved = super().to(device)
        return PackedRLBatch(**vars(moved), targets=self.targets.to(device), loss_mask=self.loss_mask.to(device),
                             prompt_lengths=self.prompt_lengths.to(device))


def pack_rl_batch(prompts: Sequence[TokenSeq], responses: Sequence[TokenSeq], max_tokens: int) -> list[PackedRLBatch]:
    """Pack prompt+response rollouts into micro-batches of at most `max_tokens` tokens.

    prompts[i] (non-empty) and responses[i] (may be empty: it then contributes no loss) are token ids.
    Returns bins with input_ids, position_ids, cu_seqlens, max_seqlen, targets, loss_mask and
    sequence_index (see PackedRLBatch).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    prompt_ids = [_as_ids(p, "prompt", i) for i, p in enumerate(prompts)]
    for i, p in enumerate(prompt_ids):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: the first response token needs a preceding token to be scored")
    response_ids = [_as_ids(r, "response", i) for i, r in enumerate(responses)]
    generic = pack_sequences([torch.cat([p, r]) for p, r in zip(prompt_ids, response_ids)], max_tokens)
    out = []
    for batch in generic:
        members = batch.sequence_index.tolist()
        targets, masks = [], []
        for i in members:
            p, r = prompt_ids[i].numel(), response_ids[i].numel()
            seq = torch.cat([prompt_ids[i], response_ids[i]])
            targets.append(torch.cat([seq[1:], seq.new_zeros(1)]))
            mask = torch.zeros(p + r, dtype=torch.bool)
            mask[p - 1: p - 1 + r] = True
            masks.append(mask)
        out.append(PackedRLBatch(**vars(batch), targets=torch.cat(targets), loss_mask=torch.cat(masks),
                                 prompt_lengths=torch.tensor([prompt_ids[i].numel() for i in members])))
    return out

