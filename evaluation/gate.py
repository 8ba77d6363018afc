"""Publish gates: `ndcg@5>=baseline-0.005`, `recall@5>=0.3`, `mrr@5>baseline*1.02`; and evaluation records.

A gate compares one metric of the candidate with a number or with the baseline's value
(optionally shifted or scaled). A passing evaluation leaves a record beside the
snapshots (`ROOT/_evaluations/<snapshot_id>.json`) that `publish --require-evaluation`
checks; snapshot directories themselves stay immutable.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import asdict, dataclass

from encoder import storage
from indexing.publish import evaluation_record, record_uri

__all__ = [
    "Gate",
    "GateResult",
    "check",
    "parse_gate",
    "read_record",
    "results_as_dicts",
    "write_record",
    "GateFailed",
    "raise_if_failed",
]

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_PATTERN = re.compile(
    r"^\s*(?P<metric>ndcg|recall|mrr|hit_rate)@(?P<k>\d+)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?:(?P<number>-?[0-9.]+)|baseline\s*(?:(?P<sign>[-+*])\s*(?P<amount>[0-9.]+))?)\s*$"
)


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str  # e.g. ndcg@5
    op: str
    number: float | None  # absolute threshold, or None for baseline-relative
    sign: str | None
    amount: float

    def threshold(self, baseline: float | None) -> float:
        if self.number is not None:
            return self.number
        if baseline is None:
            raise ValueError(f"gate {self.text!r} compares with the baseline, but no --baseline was evaluated")
        return {"-": baseline - self.amount, "+": baseline + self.amount, "*": baseline * self.amount}.get(
            self.sign or "", baseline
        )


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    value: float
    threshold: float
    passed: bool

    def reason(self) -> str:
        verdict = "passes" if self.passed else "FAILS"
        return f"{self.gate}: {self.metric} = {self.value:.6f}, threshold {self.threshold:.6f} → {verdict}"


def parse_gate(text: str, k: int) -> Gate:
    """Parse a gate expression.

    Raises:
        ValueError: not a gate, or its @k differs from the evaluation's k.
    """
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(
            f"cannot read gate {text!r}; write e.g. 'ndcg@5>=baseline-0.005', 'recall@5>=0.3' or 'mrr@5>baseline*1.02'"
        )
    if int(match["k"]) != k:
        raise ValueError(f"gate {text!r} is about @{match['k']}, but the evaluation uses k={k}")
    number = float(match["number"]) if match["number"] is not None else None
    return Gate(text, f"{match['metric']}@{k}", match["op"], number, match["sign"], float(match["amount"] or 0))


def check(gate: Gate, candidate: float, baseline: float | None) -> GateResult:
    threshold = gate.threshold(baseline)
    return GateResult(gate.text, gate.metric, candidate, threshold, bool(_OPS[gate.op](candidate, threshold)))


def write_record(root: str, snapshot_id: str, record: dict) -> None:
    storage.write_bytes(record_uri(root, snapshot_id), json.dumps(record, indent=2).encode())


read_record = evaluation_record  # the one reader of a record: `publish` checks it with the same


def results_as_dicts(results: list[GateResult]) -> list[dict]:
    return [asdict(r) for r in results]


class GateFailed(RuntimeError):
    """The candidate did not pass its evaluation gate(s); nothing should be published."""


def raise_if_failed(doc: dict) -> None:
    """Raise GateFailed naming every failing gate of an evaluation document (`run_evaluation`'s)."""
    failed = [g for g in doc.get("gates", []) if not g["passed"]]
    if failed:
        reasons = "; ".join(
            f"{g['gate']} ({g['metric']} = {g['value']:.4f}, needs {g['threshold']:.4f})" for g in failed
        )
        report = f"; report: {doc['report']}" if doc.get("report") else ""
        raise GateFailed(f"gate failed: {reasons}{report}")
