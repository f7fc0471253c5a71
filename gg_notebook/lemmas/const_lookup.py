"""A lookup at constant ids is data movement of the table.

Position embeddings under sequence parallelism: the spec looks up ``embedding(arange(S), wpe)``;
ranks look up ``embedding(arange(start, end), wpe)``, ``wpe[pos]``, ``wpe[start:end]`` (no lookup at
all) or ``embedding(arange(S).chunk(W)[r].expand(B, -1), wpe)``. The ids are input-independent
values (relations/ground.py), so `ground.canonical_call` writes every such lookup as what it is:
the rows ``w[a:b]`` for ids ``arange(a, b)``, and a broadcast of the lookup of one row of ids along
the dims where the ids repeat. Rank terms are built in that form; ``embedding-constant-ids`` gives
the spec's lookup the same form as a relation (a slice / expand of the table's relation), so the
elementwise lemmas then meet the ranks' spelling. Bit-exact (a lookup copies rows).
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, LemmaCase, register
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def embedding_constant_ids(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if spec.target is not aten.embedding.default:
        return
    try:
        e = S.call(spec, list(args))
    except ShapeError:
        return
    if e.op != "call" and tuple(e.shape) == tuple(out_shape):
        yield e


def _cases(rng):
    from gg_notebook.engine.index import _const_term

    for k in range(3):
        v, h = C.dims(rng, 8, 14), C.dims(rng)
        w = C.randn(rng, v, h)
        a = int(torch.randint(0, 4, (1,), generator=rng))
        n = C.dims(rng, 2, 5)
        for ids, desc in (
            (torch.arange(a, a + n), "arange(a, a+n)"),
            (torch.arange(a, a + n).unsqueeze(0).expand(3, -1), "arange expanded over a batch"),
            (torch.arange(a, a + n).view(1, n), "arange with a leading 1"),
            (torch.tensor([a + 1, a, a + 2]), "a permutation (declines)"),
            (torch.arange(a, a + 2 * n, 2), "a strided arange (declines)"),
            (torch.tensor([[a, a + 1], [a + 1, a]]), "different rows (declines)"),
        ):
            spec, order = C.spec_of(lambda wt, i: torch.nn.functional.embedding(i, wt), w, ids)
            base = C.make_case(spec, [w], rng)
            S = base.store
            args = [base.args[0] if o == 0 else _const_term(S, ids.contiguous()) for o in order]
            yield LemmaCase(spec, tuple(args), base.values, S, desc)


register(Lemma(
    name="embedding-constant-ids",
    statement="embedding(arange(a, b), w) = w[a:b]; embedding(ids repeated along leading dims, w) = "
              "expand(embedding(one row of ids, w))",
    kinds=("embedding",),
    plans=embedding_constant_ids,
    cases=_cases,
    conditions=("the ids are an input-independent value inside the table's range", "2-D table"),
    bitwise_safe=True,
    priority=30,
    on=((aten.embedding.default, (), ("padding_idx", "scale_grad_by_freq", "sparse")),),
))
