"""One pick per row over a split last dim: ``x.gather(-1, t.unsqueeze(-1))`` with ``x`` split along
its last dim (logits over a split vocabulary, as a written-out cross-entropy picks the target's logit).

    gather(concat_k(x_k, -1), -1, idx) = view(sum_k masked_pick(x_k, idx, start_k), idx.shape)

``masked_pick`` (`gg_notebook.lemmas.cross_entropy`) is ``x_k[..., t - start_k]`` where ``t`` falls in
shard k and 0 elsewhere; its matcher finds the rank's pick however the rank spelled it (gather or
``x[arange, t]``, its out-of-shard rows zeroed by a mask). ``gather`` raises for an index outside
``[0, C)``, so the index domain is what the operator accepts (or a declared narrower one).
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.cross_entropy import masked_pick_spec
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec

aten = torch.ops.aten


def gather_over_split(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    if spec.target is not aten.gather.default or len(args) != 2:
        return
    if spec.arg("sparse_grad", False) is not False:
        return
    x, idx = args
    n = len(x.shape)
    if n == 0 or not isinstance(spec.arg("dim"), int) or spec.arg("dim") % n != n - 1:
        return
    if x.op != "cat" or x.attrs != n - 1 or idx.dtype not in (torch.int64, torch.int32):
        return
    lead = tuple(x.shape[:-1])
    if tuple(idx.shape) != lead + (1,):
        return  # one pick per row only (several picks per row are other sums)
    classes = x.shape[-1]
    accepted = IdDomain.range(0, classes)
    domain = accepted if ctx is None else ctx.domain_of(idx, accepted, "index of aten.gather")
    t = S.view(idx, lead)
    picks, off = [], 0
    for piece in x.args:
        picks.append(S.call(masked_pick_spec(off, classes, domain), [piece, t]))
        off += piece.shape[-1]
    yield S.view(S.accum("sum", picks), tuple(idx.shape))


def _cases(rng):
    for k in range(6):
        rows, v = C.dims(rng), C.dims(rng, 4, 12)
        dtype = (torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float64, torch.float64)[k]
        x = C.randn(rng, rows, v).to(dtype)
        if k == 2:
            x[0] = float("-inf")  # a row of -inf logits: picks stay exact
        if k == 4:
            x = x * 1e6
        t = torch.randint(0, v, (rows, 1), generator=rng)
        t[0, 0] = v - 1  # the last class: the boundary of the last shard
        if k == 5:  # a 3-D batch of rows, negative dim
            b = C.dims(rng)
            x3 = C.randn(rng, b, rows, v)
            t3 = torch.randint(0, v, (b, rows, 1), generator=rng)
            yield C.case(lambda a, i: torch.gather(a, -1, i), (x3, t3), rng, split={0: 2},
                         description="gather over a split last dim of a 3-D batch (dim=-1)")
            continue
        yield C.case(lambda a, i: a.gather(1, i), (x, t), rng, split={0: 1},
                     description=f"one pick per row over classes split in uneven shards ({dtype})")


register(Lemma(
    name="gather-over-split-classes",
    statement="gather(concat_k(x_k, -1), -1, idx) = view(sum_k masked_pick(x_k, idx, start_k), idx.shape)",
    kinds=("generic",),
    plans=gather_over_split,
    cases=_cases,
    conditions=("x concatenated along the gathered (last) dim", "one index per row (idx.shape[-1] == 1)",
                "indices in [0, C): gather raises outside (or a declared narrower domain)",
                "no sparse_grad"),
    bitwise_safe=False,
    priority=40,
    needs_context=True,
    on=((aten.gather.default, ("dim",), ("sparse_grad",)),),
))
