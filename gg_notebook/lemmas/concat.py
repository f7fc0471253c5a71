"""Operators versus concatenation: the lemmas behind tensor, sequence and data parallelism.

* ``concat-commute``: if an operand is ``concat(x_0..x_n, dim=d)`` and position i along d only
  influences position i along output dim k (elementwise ops, matmul rows/columns, softmax rows,
  layer-norm rows, embedding lookups...), the op applies piecewise; every other operand is sliced
  at the same offsets along its dim that maps to k, or used whole if it has none (broadcast).
* ``concat-contract``: if the concatenated dim is reduced (matmul's contracted dim, a sum/amax/amin
  over it, the tokens of an embedding or layer-norm weight gradient), the op becomes the
  sum/max/min over the pieces of the op applied piecewise; operands sharing that reduced dim are
  sliced at the same offsets. This is "a row-parallel matmul is the sum of the shard products".
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.dims import dim_roles
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def cat_bounds(cat_expr) -> list[tuple[int, int]]:
    """[(start, end)] of each piece of a concatenation along its dim."""
    d = cat_expr.attrs
    out, off = [], 0
    for a in cat_expr.args:
        out.append((off, off + a.shape[d]))
        off += a.shape[d]
    return out


def _split_plans(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, want: str, roles_fn=dim_roles):
    shapes = [a.shape for a in args]
    roles = roles_fn(spec, shapes, out_shape)
    if roles is None:
        return
    # every concatenated operand proposes its piece boundaries; for one role, the coarsest first
    # (operands split finer are regrouped: a rank may hold the q|k|v pieces of its shard as one)
    proposals = []
    for i, a in enumerate(args):
        if a.op != "cat":
            continue
        d = a.attrs
        role = roles[i][d]
        if role is None or (want == "out") != (role[0] == "out") or role[0] == "bcast":
            continue
        proposals.append((role, len(a.args), i, tuple(cat_bounds(a))))
    roles_order = list(dict.fromkeys(p[0] for p in sorted(proposals, key=lambda p: p[2])))
    seen = set()
    for role, _, i, bounds in sorted(proposals, key=lambda p: (roles_order.index(p[0]), p[1], p[2])):
        if (role, bounds) in seen:
            continue
        seen.add((role, bounds))
        pieces = []
        # the dim of each operand that has this role (None: used whole), the same for every piece
        dims = [next((t for t, r in enumerate(roles[j]) if r is not None and r[0] != "bcast" and r[1:] == role[1:]
                      and r[0] == role[0]), None) for j in range(len(args))]
        try:
            for lo, hi in bounds:
                new_args = [S.slice(b, dj, lo, hi) if dj is not None else b for b, dj in zip(args, dims)]
                pieces.append(_call(S, spec, new_args))
            if role[0] == "out":
                yield S.cat(pieces, role[1])
            else:
                yield S.accum(role[0], pieces)
        except ShapeError:
            continue


def _call(S: ExprStore, spec: OpSpec, args: list):
    """``spec`` on ``args``; a piece that is a batch-1 ``bmm`` is written as the ``mm`` the lowering
    gives a rank's batch-1 bmm (`single_bmm.as_mm`: one local expert, one group of tokens, one head
    per rank), so the piece can be found."""
    from gg_notebook.lemmas.single_bmm import as_mm

    t = as_mm(S, spec, args)
    return t if t is not None else S.call(spec, args)


def concat_commute(S, spec, args, out_shape):
    yield from _split_plans(S, spec, args, out_shape, "out")


def concat_contract(S, spec, args, out_shape):
    yield from _split_plans(S, spec, args, out_shape, "reduce")


def slice_hoist(S, spec, args, out_shape):
    """op(.., y[a:b along d], ..) = op(.., y, ..)[a:b along k] when d maps position-wise to k and no
    other operand has a dim mapping to k (they are broadcast or independent of it)."""
    shapes = [a.shape for a in args]
    roles = dim_roles(spec, shapes, out_shape)
    if roles is None:
        return
    for i, a in enumerate(args):
        if a.op != "slice":
            continue
        d, lo, hi = a.attrs
        role = roles[i][d]
        if role is None or role[0] != "out":
            continue
        k = role[1]
        if any(j != i and any(r == role for r in roles[j]) for j in range(len(args))):
            continue
        try:
            whole = S.call(spec, args[:i] + (a.args[0],) + args[i + 1:])
            yield S.slice(whole, k, lo, hi)
        except ShapeError:
            continue


def _hoist_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n, k = C.dims(rng), C.dims(rng, 4, 9), C.dims(rng)
        lo = int(torch.randint(0, n // 2, (1,), generator=rng))
        hi = int(torch.randint(lo + 2, n + 1, (1,), generator=rng))
        for fn, shapes, i, d, desc in (
            (lambda a, w: a @ w, ((m, k), (k, n)), 1, 1, "mm, column slice of the weight"),
            (lambda a, w: a @ w, ((n, k), (k, m)), 0, 0, "mm, row slice of the input"),
            (lambda x, b: x + b, ((m, n), (m, 1)), 0, 1, "add broadcast, column slice"),
            (lambda x: torch.nn.functional.gelu(x), ((m, n),), 0, 1, "gelu of a slice"),
            (lambda x: torch.cumsum(x, 0), ((m, n),), 0, 1, "cumsum of a column slice"),
        ):
            tensors = tuple(r(*s) for s in shapes)
            spec, order = C.spec_of(fn, *tensors)
            case = C.make_case(spec, [tensors[o] for o in order], rng)
            slot = order.index(i)
            args = list(case.args)
            args[slot] = case.store.slice(args[slot], d, lo, hi)
            # the op's own spec is shape-agnostic; evaluate on the sliced operand
            yield type(case)(spec, tuple(args), case.values, case.store, desc)


# ---------------------------------------------------------------------------- random cases
def _commute_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    F = torch.nn.functional
    for _ in range(3):
        m, n, k, b = C.dims(rng), C.dims(rng), C.dims(rng), C.dims(rng)
        x, y, bias = r(m, n), r(m, n), r(n)
        mask = r(m, n) > 0
        yield C.case(lambda x, y: x + y, (x, bias), rng, split={0: 0}, description="add bias, rows split")
        yield C.case(lambda x, y: x + y, (x, bias), rng, split={0: 1, 1: 0}, description="add bias, cols split")
        yield C.case(lambda x, y: x * y, (x, y), rng, split={0: 1, 1: 1}, description="mul, both split")
        yield C.case(lambda x, y: x * y, (x, y), rng, split={0: 0}, description="mul, one split")
        yield C.case(lambda x: F.gelu(x), (x,), rng, split={0: 1}, description="gelu")
        yield C.case(lambda mk, x: x.masked_fill(mk, 0.0), (mask, x), rng, split={0: 0, 1: 0}, description="masked_fill")
        yield C.case(lambda c, x, y: torch.where(c, x, y), (mask, x, y), rng, split={0: 1, 1: 1, 2: 1}, description="where")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 0}, description="mm rows")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={1: 1}, description="mm cols")
        yield C.case(torch.bmm, (r(b, m, k), r(b, k, n)), rng, split={0: 0, 1: 0}, description="bmm batch")
        yield C.case(torch.bmm, (r(3, m, k), r(3, k, n)), rng, split={0: 0, 1: 0}, pieces=3,
                     description="bmm batch, pieces of one matrix each (written as mm)")
        yield C.case(lambda x: x.sum(1), (x,), rng, split={0: 0}, description="sum over unsplit dim")
        yield C.case(lambda x: torch.softmax(x, -1), (x,), rng, split={0: 0}, description="softmax rows")
        yield C.case(lambda x, w, bb: F.layer_norm(x, (n,), w, bb), (r(b, m, n), r(n), r(n)), rng, split={0: 1},
                     description="layer_norm rows")
        emb, ids = r(k + 3, n), torch.randint(0, k + 3, (b, m), generator=rng)
        yield C.case(lambda w, i: F.embedding(i, w), (emb, ids), rng, split={1: 1}, description="embedding, ids split")
        yield C.case(lambda w, i: F.embedding(i, w), (emb, ids), rng, split={0: 1}, description="embedding, hidden split")
        yield _ln_bwd_case(rng, r, b, m, n, 0, "layer_norm_backward dx, rows split")
        # row-wise operators (kind "rowwise"): split along a dim other than their own
        x3 = r(b, m, n + 2)
        for out in (0, 1):
            yield C.case(lambda x, o=out: torch.topk(x, 2, dim=-1)[o], (x3,), rng, split={0: 0},
                         description=f"topk output {out}, batch split")
            yield C.case(lambda x, o=out: torch.topk(x, 2, dim=1, largest=False)[o], (x3,), rng, split={0: 2},
                         description="topk smallest along dim 1, last dim split")
            yield C.case(lambda x, o=out: torch.sort(x, dim=-1, descending=True)[o], (x3,), rng, split={0: 1},
                         description=f"sort output {out}, rows split")
        yield C.case(lambda x: torch.cumsum(x, dim=1), (x3,), rng, split={0: 0}, description="cumsum, batch split")
        yield C.case(lambda x: torch.cumsum(x, 2, dtype=torch.float32), (x3,), rng, split={0: 1},
                     description="cumsum with dtype, rows split")


def _ln_bwd_case(rng, r, b, m, n, out, description):
    g, x, w, bb = r(b, m, n), r(b, m, n), r(n), r(n)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, (n,), w, bb, 1e-5)

    def ln_bwd(g, x, mean, rstd, w, bb):
        return torch.ops.aten.native_layer_norm_backward(g, x, (n,), mean, rstd, w, bb, [True, True, True])[out]

    return C.case(ln_bwd, (g, x, mean, rstd, w, bb), rng, split={0: 1, 1: 1, 2: 1, 3: 1}, description=description)


def _contract_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n, k, b = C.dims(rng), C.dims(rng), C.dims(rng, 3, 8), C.dims(rng)
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 1, 1: 0}, description="mm contracted")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 1}, description="mm contracted, one side")
        yield C.case(torch.bmm, (r(b, m, k), r(b, k, n)), rng, split={0: 2, 1: 1}, description="bmm contracted")
        x = r(m, k)
        yield C.case(lambda x: x.sum(-1), (x,), rng, split={0: 1}, description="sum over split dim")
        yield C.case(lambda x: x.amax(-1, keepdim=True), (x,), rng, split={0: 1}, description="amax over split dim")
        yield C.case(lambda x: x.amin(0), (x,), rng, split={0: 0}, description="amin over split dim")
        ids = torch.randint(0, n, (b, m), generator=rng)
        g = r(b, m, k)
        yield C.case(lambda g, i: torch.ops.aten.embedding_dense_backward(g, i, n, -1, False), (g, ids), rng,
                     split={0: 1, 1: 1}, description="embedding backward, tokens split")
        for out in (1, 2):
            yield _ln_bwd_case(rng, r, b, m, k, out, f"layer_norm_backward d{'w' if out == 1 else 'b'}, tokens split")


register(Lemma(
    name="concat-commute",
    statement="op(.., concat(x_i, d), ..) = concat(op(.., x_i, ..), k)  when dim d maps position-wise to output dim k",
    kinds=("ew", "matmul", "reduce", "softmax", "softmax_backward", "layer_norm", "layer_norm_backward",
           "embedding", "embedding_backward", "rowwise"),
    plans=concat_commute,
    cases=_commute_cases,
    conditions=("the concatenated dim maps position-wise to an output dim",
                "co-operands are sliced at the same offsets along their matching dim"),
    bitwise_safe=True,
    priority=20,
))

register(Lemma(
    name="concat-contract",
    statement="op(.., concat(x_i, d), ..) = sum_i op(.., x_i, ..)  when op reduces d with sum (max/min likewise)",
    kinds=("matmul", "reduce", "layer_norm_backward", "embedding_backward"),
    plans=concat_contract,
    cases=_contract_cases,
    conditions=("the concatenated dim is reduced by an associative combiner (sum, max, min)",
                "operands sharing the reduced dim are sliced at the same offsets"),
    bitwise_safe=False,
    priority=30,
))

register(Lemma(
    name="slice-hoist",
    statement="op(.., y[a:b along d], ..) = op(.., y, ..)[a:b along k]  when d maps position-wise to output dim k",
    kinds=("ew", "matmul", "reduce", "softmax", "layer_norm", "embedding", "rowwise"),
    plans=slice_hoist,
    cases=_hoist_cases,
    conditions=("the sliced dim maps position-wise to output dim k",
                "no other operand has a dim mapping to k"),
    bitwise_safe=True,
    priority=35,
))
