"""What `gg.verify` returns: a verdict, the relations that justify it, and where a proof got stuck.

The result is plain data (no references into torch graphs), so it prints, renders in a notebook,
serializes to JSON for the CLI and survives the session that produced it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class VerificationError(ValueError):
    """gg_notebook itself failed on a well-formed problem (a limitation or bug, not the user's mistake).

    ``stage`` is the pipeline stage ("lowering", "indexing", "inference", "judging"); ``rank`` is None
    for the sequential program; ``op``/``node``/``source`` name the operator being processed and its
    "file.py:LINE" in the user's code when known.
    """

    def __init__(self, message: str, *, stage: str, rank: int | None = None, op: str | None = None,
                 node: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.stage, self.rank, self.op, self.node, self.source = stage, rank, op, node, source


class Status(str, Enum):
    """The verdict. ``refuted`` needs a concrete counterexample (concrete-execution engine).

    ``assumed``: every output is related as expected, but only under assumptions (a user's hint or
    accepted suggestion the engine could not derive, ``random="identity"``); it is not a proof, and
    `Result.proved` is False."""

    PROVED = "proved"
    ASSUMED = "assumed"
    REFUTED = "refuted"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


@dataclass
class OutputRelation:
    """How sequential output ``index`` is rebuilt from the ranks' tensors."""

    index: int
    name: str  # sequential output node name
    relation: str | None  # pretty-printed clean expression, None if none was found
    expected: str | None  # the expected placement, e.g. "Replicate()", or None if any clean one goes
    ok: bool
    detail: str = ""
    alternatives: list[str] = field(default_factory=list)
    label: str | None = None  # what the output is to the user, e.g. "grad of up.weight" (from_modules)

    def __str__(self) -> str:
        rel = self.relation if self.relation is not None else "<no relation>"
        what = f"{self.label} ({self.name})" if self.label else self.name
        return f"out[{self.index}] {what} = {rel}"


@dataclass
class Culprit:
    """The first sequential operator the engine could not relate to the distributed program."""

    op: str  # ATen op, e.g. "aten.add.Tensor"
    node: str  # sequential graph node name
    source: str | None  # "path/to/user_file.py:LINE" in the user's code
    detail: str
    code: str | None = None  # the source line's text
    input_relations: dict[str, list[str]] = field(default_factory=dict)
    nearby: list[str] = field(default_factory=list)  # distributed operators near the culprit

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.op} ({self.node}){where}: {self.detail}"


@dataclass
class Finding:
    """Something the user should know even when the verdict is 'proved' (e.g. a scale factor)."""

    kind: str
    message: str
    source: str | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}" + (f" ({self.source})" if self.source else "")


@dataclass
class Counterexample:
    """Concrete evidence that the distributed program is wrong."""

    seed: int
    output: int  # which sequential output disagrees
    expected_relation: str  # how the ranks' outputs were combined
    max_error: float
    relative_error: float
    sequential: list[float]  # the first few values of the sequential output
    rebuilt: list[float]  # the same positions rebuilt from the ranks
    worst_index: tuple  # where the error is largest
    inputs: dict[str, str]  # input name -> how it was drawn
    shapes: tuple = ()  # (sequential shape, rebuilt shape)
    tensors: list = field(default_factory=list, repr=False)  # the global inputs themselves (not in JSON)
    raised: str = ""  # a rank's program raised on these inputs (which rank, what, where)

    def __str__(self) -> str:
        if self.raised:
            return (f"seed {self.seed}: {self.raised}, while the sequential program runs on the same inputs "
                    f"({', '.join(f'{k} {v}' for k, v in self.inputs.items())})")
        if self.shapes and self.shapes[0] != self.shapes[1]:
            return (f"seed {self.seed}: output {self.output} has shape {self.shapes[0]} but "
                    f"{self.expected_relation} has shape {self.shapes[1]}")
        return (f"seed {self.seed}: output {self.output} differs from {self.expected_relation} by up to "
                f"{self.max_error:.3g} (relative {self.relative_error:.3g}) at index {self.worst_index}; "
                f"sequential {self.sequential} vs rebuilt {self.rebuilt}")


@dataclass
class Result:
    status: Status
    problem_name: str
    relations: list[OutputRelation]
    culprit: Culprit | None = None
    findings: list[Finding] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    steps: list[Any] = field(default_factory=list)  # engine Step records (for sessions/replay)
    counterexample: Counterexample | None = None
    # the integer-input domains the proof relied on ("target ∈ [0, 64) (declared in Problem.domains)")
    domain_assumptions: list[str] = field(default_factory=list)

    @property
    def proved(self) -> bool:
        """True only for a proof without assumptions (never for ``Status.ASSUMED``)."""
        return self.status is Status.PROVED and not self.assumptions

    def headline(self) -> str:
        if self.status is Status.PROVED and not self.assumptions:
            return "proved"
        if self.status in (Status.PROVED, Status.ASSUMED):
            n = len(self.assumptions)
            return f"assumed: holds only under {n} assumption{'s' if n != 1 else ''} (not a proof)"
        if self.status is Status.REFUTED:
            if self.culprit is not None:
                where = f", {self.culprit.source}" if self.culprit.source else ""
                return f"refuted: first wrong value at {self.culprit.op} ({self.culprit.node}{where})"
            return "refuted"
        if self.culprit is not None:
            where = f", {self.culprit.source}" if self.culprit.source else ""
            return f"unknown: stuck at {self.culprit.op} ({self.culprit.node}{where})"
        return "unknown"

    def __str__(self) -> str:
        lines = [f"gg_notebook verdict for {self.problem_name}: {self.headline()}"]
        for rel in self.relations:
            mark = "ok " if rel.ok else "!! "
            lines.append(f"  {mark}{rel}")
            if rel.expected:
                lines.append(f"       expected: {rel.expected}")
            if rel.detail:
                lines.append(f"       {rel.detail}")
        if self.culprit is not None:
            c = self.culprit
            lines.append(f"  culprit: {c.op} ({c.node})" + (f" at {c.source}" if c.source else ""))
            if c.code:
                lines.append(f"      {c.code.strip()}")
            lines.append(f"    {c.detail}")
            for name, rels in c.input_relations.items():
                shown = "; ".join(rels[:3]) if rels else "<none>"
                lines.append(f"    input {name} = {shown}")
            if c.nearby:
                lines.append("    distributed operators nearby:")
                lines.extend(f"      {n}" for n in c.nearby[:8])
        if self.counterexample is not None:
            lines.append(f"  counterexample: {self.counterexample}")
        for f in self.findings:
            lines.append(f"  finding: {f}")
        for a in self.assumptions:
            lines.append(f"  assumption: {a}")
        for d in self.domain_assumptions:
            lines.append(f"  domain: {d}")
        if self.stats:
            timing = ", ".join(
                f"{k} {v:.2f}s" for k, v in self.stats.items() if k.endswith("_s") and isinstance(v, float)
            )
            if timing:
                lines.append(f"  time: {timing}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = {"proved": "#1a7f37", "assumed": "#bc4c00", "refuted": "#cf222e",
                  "unknown": "#9a6700"}[self.status.value]
        rows = "".join(
            f"<tr><td>{'&#10003;' if r.ok else '&#10007;'}</td><td><code>{html.escape(r.name)}</code></td>"
            f"<td><code>{html.escape(r.relation or '<no relation>')}</code></td>"
            f"<td>{html.escape(r.expected or 'any clean relation')}</td></tr>"
            for r in self.relations
        )
        parts = [
            f"<div class='gg-result'><div style='font-weight:bold;color:{colour}'>"
            f"{html.escape(self.problem_name)}: {html.escape(self.headline())}</div>",
            f"<table><tr><th></th><th>output</th><th>relation</th><th>expected</th></tr>{rows}</table>",
        ]
        if self.culprit is not None:
            c = self.culprit
            parts.append(
                f"<div><b>culprit</b> <code>{html.escape(c.op)}</code> ({html.escape(c.node)})"
                f"{' at <code>' + html.escape(c.source) + '</code>' if c.source else ''}<br>"
                f"{'<pre>' + html.escape(c.code.strip()) + '</pre>' if c.code else ''}"
                f"{html.escape(c.detail)}</div>"
            )
        if self.counterexample is not None:
            parts.append(f"<div><b>counterexample</b> {html.escape(str(self.counterexample))}</div>")
        for f in self.findings:
            parts.append(f"<div>finding: {html.escape(str(f))}</div>")
        for a in self.assumptions:
            parts.append(f"<div>assumption: {html.escape(a)}</div>")
        parts.append("</div>")
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "headline": self.headline(),
            "problem": self.problem_name,
            "relations": [r.__dict__ for r in self.relations],
            "culprit": None if self.culprit is None else self.culprit.__dict__,
            "findings": [f.__dict__ for f in self.findings],
            "assumptions": list(self.assumptions),
            "domain_assumptions": list(self.domain_assumptions),
            "counterexample": None if self.counterexample is None else {
                k: v for k, v in self.counterexample.__dict__.items() if k != "tensors"},
            "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float, str))},
        }

    def certificate(self) -> dict:
        """JSON-ready certificate: every relation, its lemma chain, the assumptions (see
        `gg.check_certificate`, which re-checks it without the inference engine)."""
        from gg_notebook.concrete.certificate import make_certificate

        return make_certificate(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
