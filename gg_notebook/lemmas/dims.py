"""What each dimension of each operand means to an operator: the facts the generic lemmas use.

For every tensor argument and every one of its dims, `dim_roles` says one of:

* ``("out", k)``: position i along this dim only influences position i along output dim k
  (elementwise ops, batch dims of matmul, rows of softmax, ...): a concatenation along it commutes;
* ``("sum", label)`` / ``("max", label)`` / ``("min", label)``: the op reduces over this dim with
  that associative combiner; operands sharing ``label`` are reduced together (the contracted dim of
  a matmul): a concatenation along it becomes a sum/max/min over the pieces;
* ``("bcast",)``: a broadcast size-1 dim;
* ``None``: entangled (softmax's own dim, layer norm's normalized dims, a vocabulary being indexed):
  no generic lemma applies.

Linearity (which operators commute with a sum of partials) lives in `gg_notebook.ops.linearity`,
keyed by OpOverload; `linear_args` is re-exported here for the lemmas.
"""

from __future__ import annotations

from typing import Sequence

from gg_notebook.ops.linearity import linear_args  # noqa: F401  (re-exported)
from gg_notebook.relations.expr import OpSpec, Slot

Role = tuple | None


def slot_positions(spec: OpSpec) -> list[tuple]:
    """For each Slot (tensor argument) its position: ("arg", i) or ("kw", name) or ("arg", i, j)."""
    args, kwargs = spec.template
    pos: dict[int, tuple] = {}

    def visit(t, where):
        if isinstance(t, Slot):
            pos[t.i] = where
        elif isinstance(t, tuple):
            for j, x in enumerate(t):
                visit(x, where + (j,))

    for i, a in enumerate(args):
        visit(a, ("arg", i))
    for k, v in kwargs:
        visit(v, ("kw", k))
    return [pos[i] for i in range(len(pos))]


def dim_roles(spec: OpSpec, shapes: Sequence[tuple], out_shape: tuple) -> list[list[Role]] | None:
    """Roles of every dim of every tensor argument, or None if the op is opaque."""
    kind = spec.kind
    if kind == "ew":
        n = len(out_shape)
        roles = []
        for s in shapes:
            r = []
            for j, size in enumerate(s):
                k = j + n - len(s)
                if size == out_shape[k]:
                    r.append(("out", k))
                elif size == 1:
                    r.append(("bcast",))
                else:
                    return None
            roles.append(r)
        return roles
    if kind == "matmul":
        lhs, out = spec.param("einsum").split("->")
        ins = lhs.split(",")
        roles = []
        for labels in ins:
            roles.append([("out", out.index(c)) if c in out else ("sum", c) for c in labels])
        return roles
    if kind == "reduce":
        fn = spec.param("fn")
        dims = spec.param("dims")
        keep = spec.param("keepdim")
        combiner = {"sum": "sum", "amax": "max", "amin": "min"}.get(fn)
        r = []
        for j in range(len(shapes[0])):
            if j in dims:
                r.append((combiner, f"r{j}") if combiner else None)
            else:
                r.append(("out", j if keep else j - sum(1 for d in dims if d < j)))
        return [r] + [[None] * len(s) for s in shapes[1:]]
    if kind == "rowwise":  # top-k, sort, cumsum along ``dim``: every other dim maps position-wise
        d = spec.param("dim")
        return [[None if j == d else ("out", j) for j in range(len(s))] if i == 0 else [None] * len(s)
                for i, s in enumerate(shapes)]
    if kind in ("softmax", "softmax_backward"):
        d = spec.param("dim")
        return [[None if j == d else ("out", j) for j in range(len(s))] for s in shapes]
    if kind == "layer_norm":
        n_norm = spec.param("n")
        pos = slot_positions(spec)
        roles = []
        for p, s in zip(pos, shapes):
            if p[:2] == ("arg", 0):
                lead = len(s) - n_norm
                roles.append([("out", j) if j < lead else None for j in range(len(s))])
            else:
                roles.append([None] * len(s))
        return roles
    if kind == "layer_norm_backward":
        n_norm = spec.param("n")
        out = spec.out or 0
        pos = slot_positions(spec)
        roles = []
        for p, s in zip(pos, shapes):
            i = p[1] if p[0] == "arg" else None
            if i in (0, 1, 3, 4):  # grad_out, input, mean, rstd
                lead = len(s) - n_norm
                if out == 0:
                    roles.append([("out", j) if j < lead else None for j in range(len(s))])
                else:
                    roles.append(
                        [("sum", f"t{j}") if j < lead else (("out", j - lead) if i in (0, 1) else None)
                         for j in range(len(s))]
                    )
            elif i in (5, 6) and out != 0:  # weight, bias vs. their own gradients
                roles.append([("out", j) for j in range(len(s))] if out == 1 and i == 5 else [None] * len(s))
            else:
                roles.append([None] * len(s))
        return roles
    if kind == "embedding":
        pos = slot_positions(spec)
        roles = []
        for p, s in zip(pos, shapes):
            if p[:2] == ("arg", 0):  # weight [V, H]: rows are indexed (entangled), columns map out
                roles.append([None, ("out", len(out_shape) - 1)])
            else:  # indices: position-wise
                roles.append([("out", j) for j in range(len(s))])
        return roles
    if kind == "embedding_backward":
        # scale_grad_by_freq divides each row by how often its id occurs among *all* tokens: the
        # tokens are entangled then (a sum over token shards would count per shard)
        by_freq = bool(spec.arg("scale_grad_by_freq", True))
        tok = (lambda j: None) if by_freq else (lambda j: ("sum", f"t{j}"))
        pos = slot_positions(spec)
        roles = []
        for p, s in zip(pos, shapes):
            if p[:2] == ("arg", 0):  # grad [..., H]
                roles.append([tok(j) for j in range(len(s) - 1)] + [("out", 1)])
            else:  # indices [...]
                roles.append([tok(j) for j in range(len(s))])
        return roles
    return None
