"""The pairwise generative reward model (GenRM): templates -> sampler -> strict verdict parser.

The GenRM writes query-specific principles, critiques both responses against them and ends with a
fixed final line of scores (see `parser.py`). It runs on any `Sampler` (the `hf` sampler on the live
policy, a LoRA-scoped sampler, a separate checkpoint; vLLM later), so it needs no server.

Two entry points:
- `GenRM.judge(requests)` - the `PairwiseJudge` protocol the BRPO reward assembly calls: exactly one
  verdict per request, in order. The caller issues both orders and `votes` repeats as separate
  requests; identical requests are sampled independently (`n` completions of one prompt), and all
  requests of the call go through as few `generate` calls as there are distinct repeat counts
  (one, in the usual case), split further only by `config.batch_size`.
- `GenRM.compare(comparisons)` - the higher-level helper: for each (prompt, x, y) it issues both
  orders x `votes` in one batch and returns every judgement (raw text, both scores in x/y terms,
  winner, valid, reason) and an aggregate outcome.

Modes: "pairwise" (reference-free, BRPO), "reference" (both responses judged against
`PairwiseRequest.reference`), "pointwise" (each response scored alone; a pair becomes two scores, so
there is no position and `compare` skips the swapped order).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from wz_engine.judge.base import PairwiseRequest, Verdict
from wz_engine.judge.config import GenRMConfig
from wz_engine.judge.parser import ParsedVerdict, VerdictGrammar, final_line_instruction, parse_verdict
from wz_engine.judge.templates import render_template, to_chat_text
from wz_engine.rollout.base import Sampler, SamplingParams


@dataclass(frozen=True)
class Comparison:
    """One pair to compare in both orders: x is shown first in order "xy", second in "yx"."""

    prompt: str
    x: str
    y: str
    reference: str | None = None


@dataclass
class Judgement:
    """One judge sample, in the comparison's own x/y terms."""

    order: str
    """"xy" (x shown as A) or "yx" (x shown as B)."""
    vote: int
    """0-based repeat index within this order."""
    verdict: Verdict
    """The verdict as the judge saw it (score_a is the response shown first)."""
    reason: str
    """Parser reason: "ok" or why the output is invalid."""

    @property
    def swapped(self) -> bool:
        return self.order == "yx"

    @property
    def valid(self) -> bool:
        return self.verdict.valid

    @property
    def raw(self) -> str:
        return self.verdict.raw

    @property
    def score_x(self) -> float | None:
        return self.verdict.score_b if self.swapped else self.verdict.score_a

    @property
    def score_y(self) -> float | None:
        return self.verdict.score_a if self.swapped else self.verdict.score_b

    @property
    def winner(self) -> str | None:
        """"x", "y", "tie", or None when invalid."""
        w = self.verdict.winner
        if w in (None, "tie"):
            return w
        return {"a": "x", "b": "y"}[w] if not self.swapped else {"a": "y", "b": "x"}[w]


@dataclass
class ComparisonResult:
    comparison: Comparison
    judgements: list[Judgement] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """"invalid" if any judgement is invalid; "x" / "y" if that side wins every judgement;
        "tie" if every judgement is a tie; else "inconsistent" (the verdicts disagree)."""
        winners = {j.winner for j in self.judgements}
        if not self.judgements or None in winners:
            return "invalid"
        return winners.pop() if len(winners) == 1 else "inconsistent"


@dataclass
class JudgeCallStats:
    """What the last `judge`/`compare` call cost (for the trainer's per-phase logs)."""

    requests: int = 0
    prompts: int = 0
    generate_calls: int = 0
    skipped_too_long: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)


class GenRM:
    """A generative pairwise judge on a sampler; implements `PairwiseJudge`.

    Args:
        sampler: the generation engine (e.g. `HFSampler` on the policy or on a judge checkpoint).
        tokenizer: renders the chat template and counts prompt tokens (the judge model's tokenizer).
        config: templates, mode, sampling, score range and tie policy.
    """

    def __init__(self, sampler: Sampler, tokenizer, config: GenRMConfig | None = None):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.config = config or GenRMConfig()
        self.config.validate()
        pointwise = self.config.mode == "pointwise"
        self.grammar = VerdictGrammar(
            n_scores=1 if pointwise else 2,
            style=self.config.verdict_style,
            score_min=self.config.score_min,
            score_max=self.config.score_max,
            allow_ties=self.config.tie_policy == "tie" or pointwise,
        )
        self.last_stats = JudgeCallStats()

    # -- rendering ----------------------------------------------------------------------------
    def render_message(self, request: PairwiseRequest) -> str:
        """The judge's user message for a pairwise/reference request (pointwise: see render_pointwise)."""
        mode = self.config.mode
        if mode == "pointwise":
            raise ValueError("render_message: pointwise mode renders one response; use render_pointwise")
        if mode == "reference" and request.reference is None:
            raise ValueError("request.reference: required in reference mode (the gold answer)")
        return render_template(
            self.config.template_name,
            query=request.prompt,
            response_a=request.response_a,
            response_b=request.response_b,
            reference=request.reference,
            final_line=final_line_instruction(self.grammar),
        )

    def render_pointwise(self, prompt: str, response: str, reference: str | None = None) -> str:
        return render_template(
            self.config.template_name,
            query=prompt,
            response=response,
            reference=reference,
            final_line=final_line_instruction(self.grammar),
        )

    def _chat(self, message: str) -> str:
        return to_chat_text(self.tokenizer, message, self.config.system_prompt, **self.config.chat_template_kwargs)

    # -- PairwiseJudge -------------------------------------------------------------------------
    def judge(self, requests: Sequence[PairwiseRequest]) -> list[Verdict]:
        """One verdict per request, in order; never raises on model output."""
        return [v for v, _ in self.judge_with_reasons(requests)]

    def judge_with_reasons(self, requests: Sequence[PairwiseRequest]) -> list[tuple[Verdict, str]]:
        """Like `judge`, with the parser's reason ("ok" or why invalid) for each verdict."""
        start = time.perf_counter()
        self.last_stats = stats = JudgeCallStats(requests=len(requests))
        raws = self._sample(self.prompt_texts(requests), stats)
        if self.config.mode == "pointwise":
            out = self._pointwise_verdicts(raws)
        else:
            out = [self._to_verdict(raw) for raw in raws]
        stats.reasons.update(reason for _, reason in out)
        stats.seconds = time.perf_counter() - start
        return out

    def prompt_texts(self, requests: Sequence[PairwiseRequest]) -> list[str]:
        """The chat-rendered judge prompts `judge` generates from: one per request (pointwise: two, the
        response shown as A then B)."""
        if self.config.mode != "pointwise":
            return [self._chat(self.render_message(r)) for r in requests]
        return [self._chat(self.render_pointwise(r.prompt, response, r.reference))
                for r in requests for response in (r.response_a, r.response_b)]

    def _pointwise_verdicts(self, raws: list[str | None]) -> list[tuple[Verdict, str]]:
        out = []
        for raw_a, raw_b in zip(raws[0::2], raws[1::2]):
            pa, pb = self._parse(raw_a), self._parse(raw_b)
            raw = f"[A]\n{raw_a or ''}\n[B]\n{raw_b or ''}"
            if not (pa.valid and pb.valid):
                reason = pa.reason if not pa.valid else pb.reason
                out.append((Verdict(None, None, False, raw), reason))
            elif pa.scores[0] == pb.scores[0] and self.config.tie_policy == "invalid":
                out.append((Verdict(None, None, False, raw), "tie_not_allowed"))
            else:
                out.append((Verdict(pa.scores[0], pb.scores[0], True, raw), "ok"))
        return out

    def _parse(self, raw: str | None) -> ParsedVerdict:
        if raw is None:
            return ParsedVerdict(None, "prompt_too_long")
        return parse_verdict(raw, self.grammar)

    def _to_verdict(self, raw: str | None) -> tuple[Verdict, str]:
        parsed = self._parse(raw)
        if not parsed.valid:
            return Verdict(None, None, False, raw or ""), parsed.reason
        score_a, score_b = parsed.scores
        return Verdict(score_a, score_b, True, raw), "ok"

    # -- the higher-level helper ---------------------------------------------------------------
    def compare(self, comparisons: Sequence[Comparison]) -> list[ComparisonResult]:
        """Judge each comparison in both orders (config.both_orders) x config.votes, in one batch."""
        orders = ("xy", "yx") if self.config.both_orders and self.config.mode != "pointwise" else ("xy",)
        requests, slots = [], []
        for k, c in enumerate(comparisons):
            for order in orders:
                a, b = (c.x, c.y) if order == "xy" else (c.y, c.x)
                for vote in range(self.config.votes):
                    requests.append(PairwiseRequest(c.prompt, a, b, c.reference))
                    slots.append((k, order, vote))
        results = [ComparisonResult(c) for c in comparisons]
        for (k, order, vote), (verdict, reason) in zip(slots, self.judge_with_reasons(requests)):
            results[k].judgements.append(Judgement(order, vote, verdict, reason))
        return results

    # -- sampling ------------------------------------------------------------------------------
    def sampling_params(self, n: int) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, n=n, seed=c.seed)

    def _sample(self, texts: list[str], stats: JudgeCallStats) -> list[str | None]:
        """One completion text per entry (None: prompt too long). Duplicated prompts get independent
        samples through `n` (greedy: one sample, shared); one generate call per distinct duplicate
        count (and batch_size chunk)."""
        out: list[str | None] = [None] * len(texts)
        positions: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            positions.setdefault(t, []).append(i)
        by_count: dict[int, list[tuple[list[int], list[int]]]] = {}  # n -> [(prompt ids, positions)]
        for text, where in positions.items():
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.config.max_prompt_tokens is not None and len(ids) > self.config.max_prompt_tokens:
                stats.skipped_too_long += len(where)
                continue
            # greedy decoding repeats itself: sample a duplicated prompt once and share the answer
            count = 1 if self.config.temperature == 0 else len(where)
            by_count.setdefault(count, []).append((ids, where))
        chunk = self.config.batch_size or max(1, len(texts))
        for n, items in sorted(by_count.items()):
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                groups = self.sampler.generate([ids for ids, _ in part], self.sampling_params(n))
                stats.generate_calls += 1
                stats.prompts += len(part)
                for (_, where), group in zip(part, groups):
                    for k, i in enumerate(where):
                        out[i] = group[k % len(group)].text
        return out
