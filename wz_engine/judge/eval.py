"""`wz judge eval`: measure a pairwise judge on a preference file.

    wz judge eval --data pairs.jsonl --judge pkg.module:function      # programmatic judge
    wz judge eval --data pairs.jsonl --model ./judge-model [--votes 2]  # GenRM on a local HF model
    python -m wz_engine.judge.eval ...                                  # same, without the CLI

Input: JSONL, one preference pair per line. Accepted shapes (TRL's dataset formats):
- standard:            {"prompt": str, "chosen": str, "rejected": str}
- conversational:      {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- implicit prompt:     {"chosen": [messages], "rejected": [messages]} - the prompt is the longest
                       common prefix of the two conversations (as TRL's `extract_prompt`);
                       UltraFeedback-style rows (prompt str + full conversations) work the same way.
Messages are {"role", "content"}. A multi-turn prompt becomes a "Role: content" transcript. An
optional "reference" string feeds reference mode.

Every pair is judged with the chosen response first and (unless --no-both-orders) second, `votes`
times each. Output: accuracy (chosen strictly preferred, per judgement; invalid and ties count as
wrong), accuracy by order, pair accuracy (chosen wins every judgement of the pair), position bias,
order agreement, invalid rate, tie rate, mean scores, comparisons (judgements) per second, and the
invalid verdicts counted by reason (no verdict line, malformed or out-of-range score, ...) with one
truncated example each. A table on the terminal; JSON with --json (stdout) or --output FILE. For a
GenRM on a local model, a warning when judge prompts plus --max-new-tokens exceed the model's context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wz_engine.judge.base import PairwiseJudge, PairwiseRequest, Verdict
from wz_engine.judge.config import VERDICT_STYLES
from wz_engine.judge.diagnostics import (
    context_length,
    context_overflow,
    format_invalid_reasons,
    invalid_reasons,
)
from wz_engine.judge.metrics import JudgementRecord, content_winner, judge_metrics

PROMPT_KEYS = ("prompt", "question", "instruction", "query")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    reference: str | None = None


# -- data ------------------------------------------------------------------------------------
def load_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Read a preference JSONL file (see the module docstring for the accepted shapes)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: {str(path)!r} is not a file")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data: line {line_no} is not valid JSON: {e}") from e
            pairs.append(normalize_row(row, where=f"line {line_no}"))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"--data: {str(path)!r} holds no preference pairs")
    return pairs


def normalize_row(row: dict, where: str = "row") -> PreferencePair:
    """One JSON row -> PreferencePair (prompt, chosen, rejected as plain text)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"{where}: missing {key!r} (has {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = next((row[k] for k in PROMPT_KEYS if k in row), None)
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        k = _common_prefix(chosen, rejected)
        if k == len(chosen) or k == len(rejected):
            raise ValueError(f"{where}: chosen and rejected conversations do not diverge")
        if prompt is None:
            if k == 0:
                raise ValueError(f"{where}: no 'prompt' and the conversations share no prompt turns")
            prompt = chosen[:k]
        chosen, rejected = _join_contents(chosen[k:]), _join_contents(rejected[k:])
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            raise ValueError(f"{where}: text chosen/rejected need a 'prompt' field")
    else:
        raise ValueError(f"{where}: chosen and rejected must both be strings or both message lists")
    if isinstance(prompt, list):
        prompt = _transcript(_messages(prompt, where, "prompt"))
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string or a message list")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ValueError(f"{where}: reference must be a string")
    return PreferencePair(prompt, chosen, rejected, reference)


def _messages(value: list, where: str, key: str) -> list[dict]:
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: {key} must be a list of {{'role': str, 'content': str}} messages")
    return value


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _join_contents(messages: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def _transcript(messages: list[dict]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


# -- evaluation ------------------------------------------------------------------------------
def evaluate(
    judge: PairwiseJudge,
    pairs: Sequence[PreferencePair],
    votes: int = 1,
    both_orders: bool = True,
    batch_pairs: int | None = None,
) -> tuple[dict[str, float], list[JudgementRecord]]:
    """Judge every pair (chosen first, then swapped) x votes; return (metrics, records)."""
    if votes < 1:
        raise ValueError(f"votes must be >= 1, got {votes}")
    batch_pairs = batch_pairs or len(pairs)
    records: list[JudgementRecord] = []
    start = time.perf_counter()
    for lo in range(0, len(pairs), batch_pairs):
        requests, slots = build_requests(pairs, range(lo, min(lo + batch_pairs, len(pairs))), votes, both_orders)
        verdicts = judge_with_reasons(judge, requests)
        if len(verdicts) != len(requests):
            raise ValueError(f"judge: returned {len(verdicts)} verdicts for {len(requests)} requests")
        records += [JudgementRecord(v, p, s, reason) for (v, reason), (p, s) in zip(verdicts, slots)]
    seconds = time.perf_counter() - start
    return preference_metrics(records, len(pairs), seconds), records


def build_requests(pairs: Sequence[PreferencePair], indices: Sequence[int], votes: int = 1,
                   both_orders: bool = True) -> tuple[list[PairwiseRequest], list[tuple[int, bool]]]:
    """(requests, (pair index, swapped) per request): chosen first, then swapped, `votes` times each."""
    requests, slots = [], []
    for p in indices:
        pair = pairs[p]
        for swapped in (False, True) if both_orders else (False,):
            a, b = (pair.rejected, pair.chosen) if swapped else (pair.chosen, pair.rejected)
            requests += [PairwiseRequest(pair.prompt, a, b, pair.reference)] * votes
            slots += [(p, swapped)] * votes
    return requests, slots


def judge_with_reasons(judge: PairwiseJudge, requests: Sequence[PairwiseRequest]) -> list[tuple[Verdict, str]]:
    """(verdict, "ok" or why invalid) per request; "" as the reason when the judge gives none."""
    if hasattr(judge, "judge_with_reasons"):
        return judge.judge_with_reasons(requests)
    return [(v, "ok" if v.valid else "") for v in judge.judge(requests)]


def context_warning(judge: PairwiseJudge, pairs: Sequence[PreferencePair], both_orders: bool = True) -> str | None:
    """For a GenRM on a local model: a warning when judge prompts + max_new_tokens exceed its context."""
    from wz_engine.judge.genrm import GenRM

    if not isinstance(judge, GenRM):
        return None
    context = context_length(getattr(judge.sampler, "model", None), judge.tokenizer)
    if context is None:
        return None
    requests, _ = build_requests(pairs, range(len(pairs)), 1, both_orders)
    tokens = [len(judge.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in judge.prompt_texts(requests)]
    overflow = context_overflow(tokens, judge.config.max_new_tokens, context)
    return overflow.message() if overflow else None


def preference_metrics(records: Sequence[JudgementRecord], n_pairs: int, seconds: float) -> dict[str, float]:
    """Accuracy family (chosen = the pair's first item) + judge_metrics, unprefixed."""
    correct = [content_winner(r) == "first" for r in records]
    out: dict[str, float] = {"pairs": float(n_pairs), "judgements": float(len(records))}
    out["accuracy"] = sum(correct) / len(records) if records else float("nan")
    for name, swapped in (("accuracy_chosen_first", False), ("accuracy_chosen_second", True)):
        sel = [c for c, r in zip(correct, records) if r.swapped == swapped]
        if sel:
            out[name] = sum(sel) / len(sel)
    by_pair: dict[object, bool] = {}
    for c, r in zip(correct, records):
        by_pair[r.pair_id] = by_pair.get(r.pair_id, True) and c
    out["pair_accuracy"] = sum(by_pair.values()) / len(by_pair) if by_pair else float("nan")
    valid = [(c, r) for c, r in zip(correct, records) if r.verdict.valid]
    if valid:
        out["accuracy_valid"] = sum(c for c, _ in valid) / len(valid)
        chosen = [r.verdict.score_b if r.swapped else r.verdict.score_a for _, r in valid]
        rejected = [r.verdict.score_a if r.swapped else r.verdict.score_b for _, r in valid]
        out["mean_score_chosen"] = sum(chosen) / len(chosen)
        out["mean_score_rejected"] = sum(rejected) / len(rejected)
    out.update(judge_metrics(records, judge_seconds=seconds, prefix=""))
    if "judgements_per_s" in out:
        out["comparisons_per_s"] = out.pop("judgements_per_s")
    out.pop("n", None)
    return out


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    for k, v in metrics.items():
        text = f"{int(v)}" if k in ("pairs", "judgements") else f"{v:.4f}"
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


# -- CLI -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wz judge eval", description="Evaluate a pairwise judge on preference pairs.")
    p.add_argument("--data", required=True, help="preference JSONL (prompt/chosen/rejected or chat variants)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--judge", help="programmatic judge 'pkg.module:function' -> (score_a, score_b)")
    src.add_argument("--model", help="local HF model directory to run the GenRM on")
    p.add_argument("--mode", default="pairwise", choices=("pairwise", "reference", "pointwise"))
    p.add_argument("--template", default="", help="bundled template name or a file path")
    p.add_argument("--verdict-style", default="scores", choices=VERDICT_STYLES)
    p.add_argument("--votes", type=int, default=1)
    p.add_argument("--no-both-orders", dest="both_orders", action="store_false")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=None, help="pairs per judge call (default: all)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--output", help="write the metrics as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def build_judge(args) -> PairwiseJudge:
    if args.judge:
        from wz_engine.judge.programmatic import CallableJudge

        return CallableJudge.from_path(args.judge)
    import torch

    from wz_engine.judge.config import GenRMConfig
    from wz_engine.judge.genrm import GenRM
    from wz_engine.judge.sharing import load_judge_checkpoint
    from wz_engine.rollout.hf import HFSampler

    config = GenRMConfig(
        mode=args.mode,
        template=args.template,
        verdict_style=args.verdict_style,
        votes=args.votes,
        both_orders=args.both_orders,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: {args.model!r} is not a local directory")
    model, tokenizer = load_judge_checkpoint(args.model)  # ValueError when the dir has no tokenizer
    model.to(device)
    return GenRM(HFSampler(model, tokenizer, seed=args.seed), tokenizer, config)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = load_pairs(args.data, args.limit)
        judge = build_judge(args)
        warning = context_warning(judge, pairs, args.both_orders)
        if warning:
            print(f"wz judge eval: {warning}", file=sys.stderr)
        metrics, records = evaluate(judge, pairs, votes=args.votes, both_orders=args.both_orders,
                                    batch_pairs=args.batch_size)
    except ValueError as e:
        print(f"wz judge eval: error: {e}", file=sys.stderr)
        return 2
    reasons = invalid_reasons(records)
    report = {**metrics, "invalid_reasons": reasons}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(metrics))
        if reasons:
            print("\n" + format_invalid_reasons(reasons, len(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
