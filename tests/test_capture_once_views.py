"""Capture once for rank splits written as views and rank-selected outputs (issue 12).

The field writes its rank split as a view: megatron-core's ``split_tensor_along_last_dim(x, W)[rank]
.contiguous()``, ``x[rank * n:(rank + 1) * n].contiguous()``, ``x.narrow(0, rank * n, n)``,
``torch.chunk(x, W)[rank]``, ``x.unbind(0)[rank]``, ``x.view(W, n, ...)[rank]``. Capture once derives
such ranks from the representative (`symmetry.Specializer`): a view's rank numbers are substituted
where functionalization left the view as recorded, and a rank-selected output of a multi-output call
is read through another getitem. Every spelling here is derived AND traced rank by rank, and the two
graphs must be the same node for node (operators, arguments, values' shapes, strides and storage
offsets, source lines); adversarial programs (a view whose size depends on the rank, a selected output
used differently, writes through the view, uneven chunks) must fall back, and wrong programs must
still be refuted.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

import gg_notebook as gg
from gg_notebook.capture import symmetry
from gg_notebook.capture import tracing as T
from gg_notebook.problem import Problem, Replicate, Shard

W = 4


# ------------------------------------------------------------------ graph comparison


def _key(x, names):
    if isinstance(x, fx.Node):
        return ("node", names[x])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_key(y, names) for y in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _key(v, names)) for k, v in x.items()))
    if isinstance(x, float):
        return ("float", repr(x))
    return (type(x).__name__, x)


def _val(v):
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype)
    if isinstance(v, (list, tuple)):
        return tuple(_val(x) for x in v)
    return None


def canonical(gm: fx.GraphModule) -> list:
    """The graph with nodes named by position: operators, arguments, values' layouts, sources."""
    names = {}
    out = []
    for i, n in enumerate(gm.graph.nodes):
        names[n] = i
        target = n.target if n.op != "placeholder" else None
        out.append((n.op, str(target), _key(n.args, names), _key(n.kwargs, names), _val(n.meta.get("val")),
                    n.meta.get("gg_source"), n.meta.get("gg_collective")))
    return out


def derive_and_trace(p: Problem, expect_derived=True):
    """Derive every rank of ``p`` from rank 0 and trace it on its own; the graphs must agree. Returns
    {rank: the reason it was not derived} for the ranks that fell back."""
    recs = [symmetry.record_rank(p, r) for r in range(p.world_size)]
    with T.recording_calls():
        gm0, _ = T.trace_program(p, 0)
    spec = symmetry.Specializer(gm0, recs[0], gm0.meta["gg_recording"])
    assert spec.reason is None, spec.reason
    fell = {}
    for r in range(1, p.world_size):
        d = symmetry.compare(recs[0], recs[r])
        g = spec.graph_for(d) if isinstance(d, symmetry.Diff) else d
        if isinstance(g, str):
            fell[r] = g
            continue
        full, _ = T.trace_program(p, r)
        assert canonical(g) == canonical(full), (r, g.graph, full.graph)
    if expect_derived:
        assert not fell, fell
    return fell
