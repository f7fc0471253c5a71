"""Verdicts: check each sequential output's relations against what the user expects of the ranks'
outputs, and turn the engine's state into a `Result` (culprit, findings, relations)."""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.engine.clamped_count import assumptions as clamped_count_assumptions
from gg_notebook.engine.infer import Candidate, Engine
from gg_notebook.relations.expr import Expr, ShapeError, leaves
from gg_notebook.relations.movement import movement_of, retile, substitute
from gg_notebook.problem import Layout, OnRank
from gg_notebook.result import Culprit, Finding, OutputRelation, Result, Status


def _placement_str(p) -> str:
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    if isinstance(p, Replicate):
        return "Replicate()"
    if isinstance(p, Partial):
        return "Partial()"
    return repr(p)


def expected_relation(engine: Engine, k: int, placement) -> Expr | None:
    """The relation ``expect[k]`` demands, over the ranks' k-th outputs."""
    S, idx = engine.store, engine.index
    refs = [idx.ref(idx.dval_of(g.rank, g.outputs[k])) for g in idx.graphs]
    if isinstance(placement, Replicate):
        return refs[0] if all(r.id == refs[0].id for r in refs) else None
    if isinstance(placement, Shard):
        nd = len(refs[0].shape)
        if not -nd <= placement.dim < nd:
            raise ShapeError(f"the ranks' outputs have shape {refs[0].shape}: no dim {placement.dim}")
        return S.cat(refs, placement.dim % nd)
    if isinstance(placement, Partial):
        return S.accum("sum", refs)
    if isinstance(placement, OnRank):
        return refs[placement.rank]
    return None


def _replicate_ok(engine: Engine, k: int, cands: list[Candidate]) -> Candidate | None:
    idx = engine.index
    terms: dict = {}
    for c in cands:
        terms.setdefault(engine.to_term(c.expr).id, c)
    chosen = None
    mv = movement_of(idx)
    for g in idx.graphs:
        t = idx.dval_of(g.rank, g.outputs[k]).term
        c = terms.get(t.id)
        if c is None:  # the same data movement of the same values, spelled differently
            c = next((x for x in cands if not x.deferred and mv.equal(engine.to_term(x.expr), t)), None)
        if c is None:  # the same value by the scalar normal form, piece by piece (an all-gather of
            # each rank's ``ones_like(d) * d`` against the sequential ``d``); never bitwise
            c = next((x for x in cands if not x.deferred
                      and _same_value(engine, engine.to_term(x.expr), t, not engine.bitwise)), None)
        if c is None:
            return None
        chosen = chosen or c
    return chosen


def _layout_ok(engine: Engine, k: int, layout, cands: list[Candidate]) -> tuple[bool, Candidate | None, str]:
    """expect[k] is a gg.Layout: every rank's output must be ``layout.fn(seq output, rank, W)``
    (decided on the terms: the layout's clean term per rank, with the sequential output's relation
    substituted for the global tensor, against the rank's output, by index tensors)."""
    from gg_notebook.capture import capture_layout
    from gg_notebook.relations.layout import output_layout_terms

    S, idx = engine.store, engine.index
    seq_out = engine.seq.outputs[k]
    cache = engine.__dict__.setdefault("_output_layouts", {})
    if k not in cache:
        cache[k] = output_layout_terms(layout, tuple(seq_out.shape), seq_out.dtype, idx.world_size, k, S,
                                       capture_layout)
    atom, terms = cache[k]
    mv = movement_of(idx)
    outs = [idx.dval_of(g.rank, g.outputs[k]) for g in idx.graphs]
    for c in cands:
        if c.deferred:
            continue
        ct = engine.to_term(c.expr)
        try:
            wants = [substitute(S, t, {atom.id: ct}) for t in terms]
        except ShapeError:
            continue
        # by the scalar normal form too (the layout moves data only: each rank's part of the value,
        # e.g. a pipeline stage's gradient accumulated over micro-batches against their sum)
        if all(w.id == o.term.id or mv.equal(w, o.term) or _same_form(engine, w, o.term)
               for w, o in zip(wants, outs)):
            rebuilt = retile(idx, ct, sources=outs)
            return True, Candidate(rebuilt[0] if rebuilt else c.expr, c.chain, c.assumption), ""
    return False, None, f"every rank r's output to be {_placement_str(layout)}(output, r, {idx.world_size})"


def _same_form(engine: Engine, a: Expr, b: Expr) -> bool:
    """``a == b`` over the reals by the scalar normal form (a rank's gradient accumulated over
    micro-batches has a deep history); never bitwise."""
    if engine.bitwise or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    forms = engine.index.forms
    ka, kb = forms.key(a), forms.key(b)
    return ka is not None and kb is not None and ka == kb


def check_output(engine: Engine, k: int, placement) -> tuple[bool, Candidate | None, str]:
    """(ok, the candidate that satisfies it, detail)."""
    seq_out = engine.seq.outputs[k]
    cands = engine.relations.get(seq_out.name, [])
    if not cands:
        return False, None, "no relation was found for this output"
    if isinstance(placement, Layout):
        return _layout_ok(engine, k, placement, cands)
    if isinstance(placement, Replicate):
        c = _replicate_ok(engine, k, cands)
        if c is not None:
            return True, c, ""
        return False, None, "expected every rank's output to equal it"
    try:
        target = expected_relation(engine, k, placement)
    except ShapeError:  # e.g. the ranks' k-th outputs differ in shape: they cannot form that relation
        shapes = [tuple(g.outputs[k].shape) for g in engine.index.graphs]
        return False, None, (f"ranks' outputs that combine as {_placement_str(placement)}, but the ranks "
                             f"return shapes {shapes}")
    if target is None:
        return False, None, "cannot express the expected relation"
    tt = engine.to_term(target)
    # by the scalar normal form too, but not for a partial sum: W replicas of v/W "sum" to v, which
    # is true and never what a Partial placement means (a factor must not pass silently)
    by_form = not engine.bitwise and not isinstance(placement, Partial)
    for c in cands:
        ct = engine.to_term(c.expr)
        if _same_value(engine, tt, ct, by_form):
            return True, Candidate(target, c.chain, c.assumption), ""
    return False, None, f"expected {engine.show(target)}"


def _same_value(engine: Engine, a: Expr, b: Expr, by_form: bool) -> bool:
    """Equal terms: the same term, the same data movement, the same scalar normal form, or two
    concatenations along one dim whose pieces (at the same offsets) are pairwise equal (a stage's
    gradient accumulated as ``g + dw1 + dw2`` against the sum of its micro-batches' products)."""
    if a.id == b.id or movement_of(engine.index).equal(a, b) or (by_form and engine.index.forms.ratio(a, b) == 1):
        return True
    if a.op == "cat" and b.op == "cat" and a.attrs == b.attrs and len(a.args) == len(b.args) \
            and all(tuple(x.shape) == tuple(y.shape) for x, y in zip(a.args, b.args)):
        return all(_same_value(engine, x, y, by_form) for x, y in zip(a.args, b.args))
    for x, y in ((a, b), (b, a)):  # a concatenation against one value: each piece its slice of it
        # (a reduce-scatter's chunks against the sum of the ranks' partial gradients)
        if x.op == "cat" and y.op != "cat" and tuple(x.shape) == tuple(y.shape):
            d, off, ok = x.attrs, 0, True
            for piece in x.args:
                n = piece.shape[d]
                if not _same_value(engine, piece, engine.store.slice(y, d, off, off + n), by_form):
                    ok = False
                    break
                off += n
            if ok:
                return True
    return False


_SCALERS = {"aten.mul.Tensor": 1, "aten.mul.Scalar": 1, "aten.div.Tensor": -1, "aten.div.Scalar": -1}


def _factor(term: Expr, base: Expr) -> float | None:
    """If ``term`` is ``base`` times a number (mul/div by a scalar, or an averaging collective), it."""
    if term.op == "scale" and term.args[0].id == base.id:
        return float(term.attrs)
    if term.op == "call" and term.attrs.name in _SCALERS and len(term.args) == 1 and term.args[0].id == base.id:
        c = term.attrs.arg("other", None)
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0:
            c = float(c)
            return c if _SCALERS[term.attrs.name] == 1 else 1.0 / c
    return None


def scale_mismatch(engine: Engine, k: int, placement) -> tuple[float, str] | None:
    """Do the ranks hold the k-th output up to a scale factor? (factor, relation without it)."""
    seq_out = engine.seq.outputs[k]
    try:
        target = expected_relation(engine, k, placement)
    except Exception:  # noqa: BLE001
        return None
    if target is None:
        return None
    tt = engine.to_term(target)
    for c in engine.relations.get(seq_out.name, []):
        ct = engine.to_term(c.expr)
        if not engine.bitwise:  # the scalar normal form: target == r * candidate over the reals
            r = engine.index.forms.ratio(tt, ct)
            if r is not None and r != 1:
                return float(r), engine.show(c.expr)
        f = _factor(tt, ct)
        if f is not None:
            return f, engine.show(c.expr)
        f = _factor(ct, tt)
        if f is not None:
            return 1.0 / f, engine.show(c.expr)
    return None


class Rebuilt:
    """The placement reported when the ranks' outputs rebuild the output by another clean relation."""

    def __repr__(self) -> str:
        return "a clean rebuild (pieces of every rank's output, reshaped/transposed)"


def any_clean_output_relation(engine: Engine, k: int):
    """Without ``expect``: try replica, shards along each dim, partial sum, in that order; then any
    clean rebuild of the output from the ranks' outputs, each of which must hold only elements of
    it (a round-robin row layout, a head-permuted concatenation, a shard of a view...)."""
    shape = engine.seq.outputs[k].shape
    for p in [Replicate()] + [Shard(d) for d in range(len(shape))] + [Partial()]:
        try:
            ok, c, _ = check_output(engine, k, p)
        except Exception:  # noqa: BLE001 - shapes that cannot be concatenated, etc.
            continue
        if ok:
            return p, c
    idx = engine.index
    outs = [idx.dval_of(g.rank, g.outputs[k]) for g in idx.graphs]
    for c in engine.relations.get(engine.seq.outputs[k].name, []):
        if c.deferred:
            continue
        rebuilt = retile(idx, engine.to_term(c.expr), sources=outs, strict=True)
        if rebuilt:
            return Rebuilt(), Candidate(rebuilt[0], c.chain, c.assumption)
    return None, None


def random_assumptions(graphs) -> list[str]:
    """One assumption per dropout site that ``random="identity"`` replaced by the identity."""
    sites: dict[str, list[str]] = {}
    for g in graphs:
        for r in getattr(g, "random_ops", ()):
            if r.identity:
                where = r.source or f"{r.op} ({r.node})"
                who = "sequential" if r.rank is None else f"rank {r.rank}"
                if who not in sites.setdefault(where, []):
                    sites[where].append(who)
    return [f"random='identity': dropout at {where} treated as identity ({', '.join(who)})"
            for where, who in sites.items()]


def judge(engine: Engine, problem, stats: dict) -> Result:
    relations: list[OutputRelation] = []
    findings: list[Finding] = []
    culprit = None
    # the user's own unproven relations (hints, accepted guesses); what the engine derived from them
    # is marked as depending on an assumption but not counted again
    typed = getattr(engine, "typed_relations", {})  # a session's hints, as the user typed them
    assumptions = sorted({
        f"{n}: {typed.get((n, c.expr.id)) or engine.show(c.expr)}"
        for n, cs in engine.user_relations.items() for c in cs
        if c.assumption and any(x.expr.id == c.expr.id for x in engine.relations.get(n, []))
    })
    assumptions += random_assumptions([engine.seq] + list(engine.index.graphs))
    assumptions += clamped_count_assumptions(engine)  # num / clamp(c, min=1) read as num / c (c >= 1)
    # programs captured for the routing of the example inputs (capture.specialize)
    assumptions += [a for g in [engine.seq] + list(engine.index.graphs) for a in getattr(g, "specialized", ())]
    dependent = sum(1 for n, cs in engine.relations.items()
                    if n not in engine.user_relations and cs and all(c.assumption for c in cs if not c.deferred))
    if engine.stuck_at is not None:
        st = engine.stuck_at
        node = engine.seq.by_name[st.node]
        culprit = Culprit(
            op=st.op, node=st.node, source=st.source, detail=st.detail, code=st.code,
            input_relations=st.inputs, nearby=engine.nearby(node),
        )
    expect = problem.expect
    n_out = len(engine.seq.outputs)
    for k in range(n_out):
        out = engine.seq.outputs[k]
        placement = expect[k] if expect is not None and k < len(expect) else None
        cands = engine.relations.get(out.name, [])
        alts = [engine.show(c.expr) for c in cands]
        if engine.stuck_at is not None and out.name not in engine.relations:
            relations.append(OutputRelation(k, out.name, None, _placement_str(placement) if placement else None,
                                            False, "not reached: the proof is stuck earlier", alts))
            continue
        if placement is not None:
            ok, c, detail = check_output(engine, k, placement)
            rel = engine.show(c.expr) if c is not None else (alts[0] if alts else None)
            if not ok and alts:
                detail = f"found {alts[0]}, but expect[{k}] = {_placement_str(placement)} needs {detail.removeprefix('expected ')}"
                if isinstance(placement, Replicate) and cands[0].expr.op == "accum" and cands[0].expr.attrs == "sum":
                    detail += " - the ranks hold partial sums: is an all-reduce missing at the end?"
                scaled = scale_mismatch(engine, k, placement)
                if scaled is not None:
                    detail = (f"the ranks' outputs are {scaled[0]:g} x the sequential output "
                              f"({scaled[1]}): a missing or extra scale factor")
                    findings.append(Finding("scale-factor", f"output {k}: {detail}", out.source))
            relations.append(OutputRelation(k, out.name, rel, _placement_str(placement), ok, detail, alts))
        else:
            p, c = any_clean_output_relation(engine, k)
            if p is not None:
                relations.append(OutputRelation(k, out.name, engine.show(c.expr), None, True,
                                                f"ranks hold it as {_placement_str(p)}", alts))
            else:
                detail = "related only to intermediate tensors, not to the ranks' outputs" if cands else "no relation"
                shape = out.shape
                for p in [Replicate()] + [Shard(d) for d in range(len(shape))] + [Partial()]:
                    scaled = scale_mismatch(engine, k, p)
                    if scaled is not None:
                        detail = (f"the ranks hold {scaled[0]:g} x the sequential output as {_placement_str(p)} "
                                  f"({scaled[1]}): a scale factor is never accepted silently")
                        findings.append(Finding("scale-factor", f"output {k}: {detail}", out.source))
                        break
                relations.append(OutputRelation(k, out.name, alts[0] if alts else None, None, False, detail, alts))
    labels = getattr(problem, "meta", {}).get("output_labels")
    if labels is not None:
        names = labels(n_out)
        for rel in relations:
            if rel.index < len(names):
                rel.label = names[rel.index]
    if culprit is None:
        bad = [r for r in relations if not r.ok]
        if bad:
            out = engine.seq.outputs[bad[0].index]
            culprit = Culprit(
                op=out.target, node=out.name, source=out.source, code=out.code,
                detail=f"output {bad[0].index}: {bad[0].detail}",
                input_relations={i.name: [engine.show(c.expr) for c in engine.relations.get(i.name, [])] for i in out.inputs},
                nearby=engine.nearby(out),
            )
    status = Status.UNKNOWN
    if culprit is None and all(r.ok for r in relations):
        # a proof that needed assumptions is not a proof: at most "assumed"
        status = Status.ASSUMED if assumptions else Status.PROVED
    if assumptions and dependent:
        findings.append(Finding("assumption", f"{dependent} derived relation(s) depend on the assumptions"))
    return Result(
        status=status, problem_name=problem.name, relations=relations, culprit=culprit,
        findings=findings, assumptions=assumptions, stats=stats, steps=engine.steps,
    )
