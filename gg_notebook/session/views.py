"""What a session shows a person: source names, variable names, operator calls, and the rank lines
that correspond to a specification operator. Plain data (used by the widget; usable without it).

* `pretty_source`: "cell [3], line 3" for code typed in a notebook cell (IPython compiles a cell to
  a temporary file such as ``/tmp/ipykernel_1234/2771013519.py``; its execution count is known to
  the running IPython), the "file.py:LINE" otherwise.
* `variable_names`: the source variable a tensor is assigned to (``scores`` for the last operator
  of the line ``scores = q @ k.transpose(-2, -1) / 8``), read from the captured line's text.
* `call_text`: an operator with its arguments (the divisor, the dim), e.g. ``div(bmm, 8.0)``.
* `corresponding_lines`: the specification operator's line and, per rank, the lines of the rank
  operators its relation uses (or, before it is related, the rank operators that consume the
  values its inputs are related to).
"""

from __future__ import annotations

import ast
import linecache
import os
import re
from dataclasses import dataclass, field

from gg_notebook.relations.expr import Slot, leaves, untyped

SPEC = "spec:"  # the prefix of specification (sequential) tensors in the views
_CELL_FILE = re.compile(r"(?:^|/)ipykernel_\d+/\d+\.py$")


def _cell_map() -> dict:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of ipywidgets
        return {}
    ip = get_ipython()
    comp = getattr(ip, "compile", None) if ip is not None else None
    return getattr(comp, "_filename_map", None) or {}


def pretty_source(src: str | None, frames=()) -> str | None:
    """``src`` ("path:LINE") as a person reads it: "cell [3], line 3" for a notebook cell."""
    if not src or ":" not in src:
        return src
    path, line = src.rsplit(":", 1)
    full = frames[-1][0] if frames else path
    cells = _cell_map()
    for p in (full, path, os.path.abspath(path)):
        if p in cells:
            return f"cell [{cells[p]}], line {line}"
    if _CELL_FILE.search(path) or _CELL_FILE.search(full or ""):
        return f"a notebook cell, line {line}"
    return src


_CELL_REF = re.compile(r"(?:[^\s:`'\"()]*/)?ipykernel_\d+/\d+\.py:\d+")


def pretty_text(text: str | None) -> str | None:
    """``text`` (an explanation, a reason) with every notebook-cell file:LINE in it as "cell [3], line 3"."""
    if not text or "ipykernel_" not in text:
        return text
    return _CELL_REF.sub(lambda m: pretty_source(m.group(0)) or m.group(0), text)


def source_path(node) -> str | None:
    """The file linecache knows ``node``'s line under (the innermost user frame's file)."""
    frames = getattr(node, "frames", ()) or ()
    if frames:
        return frames[-1][0]
    src = getattr(node, "source", None)
    return src.rsplit(":", 1)[0] if src and ":" in src else None


def source_line(node) -> int | None:
    src = getattr(node, "source", None)
    if not src or ":" not in src:
        return None
    try:
        return int(src.rsplit(":", 1)[1])
    except ValueError:
        return None


def context_lines(node, radius: int = 1) -> list[tuple[int, str, bool]]:
    """(lineno, text, is_the_line) around ``node``'s source line."""
    path, lineno = source_path(node), source_line(node)
    if path is None or lineno is None:
        return []
    out = []
    for k in range(max(1, lineno - radius), lineno + radius + 1):
        text = linecache.getline(path, k)
        if text:
            out.append((k, text.rstrip("\n"), k == lineno))
    if not any(cur for _, _, cur in out) and getattr(node, "code", None):
        out = [(lineno, node.code, True)]
    return out


def _assigned(code: str) -> str | None:
    """The variable(s) a source line assigns ("scores", "q, k"), or None."""
    text = code.split("#", 1)[0].strip()
    if not text:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1:
        return None
    st = tree.body[0]
    if isinstance(st, ast.Assign) and len(st.targets) == 1:
        t = st.targets[0]
    elif isinstance(st, (ast.AugAssign, ast.AnnAssign)):
        t = st.target
    elif isinstance(st, ast.Return):
        return "return value"
    else:
        return None
    try:
        return ast.unparse(t)
    except Exception:  # noqa: BLE001 - an exotic target
        return None


_NAMES: dict[int, tuple[object, dict[str, str]]] = {}


def variable_names(graph) -> dict[str, str]:
    """Node name -> the source variable it is (the last operator of an assignment line), or
    "in <var>" for the other operators of that line. Inputs keep their names."""
    hit = _NAMES.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    out: dict[str, str] = {}
    nodes = [n for n in graph.nodes if n.op not in ("input", "const")]
    for k, n in enumerate(nodes):
        if not n.code or not n.source:
            continue
        var = _assigned(n.code)
        if var is None:
            continue
        last = k + 1 >= len(nodes) or nodes[k + 1].source != n.source
        out[n.name] = var if last else f"in {var}"
    if len(_NAMES) > 64:
        _NAMES.clear()
    _NAMES[id(graph)] = (graph, out)
    return out


def display_name(node, names: dict[str, str] | None = None) -> str:
    """``spec:add_1`` or ``add_1@r0``, with the source variable: ``scores (spec:div)``."""
    base = f"{SPEC}{node.name}" if node.rank is None else f"{node.name}@r{node.rank}"
    var = (names or {}).get(node.name)
    return f"{var} ({base})" if var and not var.startswith("in ") and var != node.name else base


def _fmt(v, inputs, names) -> str:
    v = untyped(v)
    if isinstance(v, Slot):
        if v.i < len(inputs):
            return inputs[v.i].name
        return f"t{v.i}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_fmt(x, inputs, names) for x in v)
        return f"[{inner}]"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)


def call_text(node) -> str:
    """The operator with its arguments, e.g. ``div(bmm, 8)``, ``sum(x, [-1], keepdim=True)``."""
    spec = node.attrs
    ins = list(node.inputs)
    if node.op == "call" and hasattr(spec, "template"):
        args, kwargs = spec.template
        parts = [_fmt(a, ins, None) for a in args] + [f"{k}={_fmt(v, ins, None)}" for k, v in kwargs]
        return f"{spec.short}({', '.join(parts)})"
    if node.op in ("input", "const"):
        return node.op
    short = (node.target or node.op).replace("aten.", "").rsplit(".", 1)[0] if node.target else node.op
    parts = [i.name for i in ins]
    if node.attrs not in (None, (), ""):
        parts.append(str(node.attrs))
    return f"{short}({', '.join(parts)})"


_USERS: dict[int, tuple[object, dict]] = {}


def _users(graph) -> dict:
    hit = _USERS.get(id(graph))
    if hit is None or hit[0] is not graph:
        if len(_USERS) > 256:
            _USERS.clear()
        hit = _USERS[id(graph)] = (graph, graph.users())
    return hit[1]


@dataclass
class RankLine:
    """A rank operator that corresponds to a specification operator."""

    rank: int
    node: str
    role: str  # "holds" (its value is in the relation) | "uses" (consumes a related value)
    call: str
    source: str | None  # pretty_source
    lines: list = field(default_factory=list)  # context_lines
    variable: str | None = None


def corresponding(session, node, limit: int = 6) -> list[RankLine]:
    """The rank operators that correspond to sequential ``node``: those whose values its relation
    uses ("holds"); for a node without a relation yet (next or stuck), the rank operators that
    consume the values its inputs are related to ("uses": what the ranks do in its place)."""
    eng = session.engine
    idx = eng.index
    out: list[RankLine] = []
    seen: set[tuple[int, str]] = set()

    def add(rank, rn, role):
        key = (rank, rn.name)
        if key in seen or rn.op == "input" and role == "uses":
            return
        seen.add(key)
        out.append(RankLine(rank, rn.name, role, call_text(rn), pretty_source(rn.source, rn.frames),
                            context_lines(rn, 1), variable_names(idx.graphs[rank]).get(rn.name)))

    def dvals_of(exprs):
        for e in exprs:
            for leaf in leaves(e):
                if leaf.op == "ref":
                    yield idx.dvals[leaf.attrs[0]]

    cands = [c for c in eng.relations.get(node.name, []) if not c.deferred]
    if cands:
        for d in dvals_of([cands[0].expr]):
            ranks = set()
            for rank, rn in d.locations:  # one location per rank (equal values may sit elsewhere too)
                if rank not in ranks:
                    ranks.add(rank)
                    add(rank, rn, "holds")
    else:
        users = {g.rank: _users(g) for g in idx.graphs}
        for i in node.inputs:
            ic = [c for c in eng.relations.get(i.name, []) if not c.deferred][:1]
            for d in dvals_of([c.expr for c in ic]):
                for rank, rn in d.locations:
                    for u in users[rank].get(rn.name, []):
                        add(rank, u, "uses")
    out.sort(key=lambda x: (x.rank, eng.index.graphs[x.rank].by_name[x.node].index))
    per_rank: dict[int, int] = {}
    kept = []
    for x in out:
        per_rank[x.rank] = per_rank.get(x.rank, 0) + 1
        if per_rank[x.rank] <= limit:
            kept.append(x)
    return kept
