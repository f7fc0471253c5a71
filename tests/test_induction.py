"""Proof by induction over repeated layers (engine/induction.py, engine/repeats.py).

Every test compares with the walk (``induction=False``): the verdict, and for a wrong program the
operator it is localized at, must be the walk's. The programs are written as users write stacked
tensor-parallel blocks: a Python loop over layers, torch.distributed collectives, their own names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.engine.repeats import MIN_REPEATS, Region, Segment, match_segments, periodic_regions

LAYERS = 6


def _randn(g, *shape, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


# ------------------------------------------------------------------------------------ the programs


def seq_stack(x, *ws, act="gelu"):
    for i in range(0, len(ws), 4):
        w1, b1, w2, ln = ws[i:i + 4]
        h = F.layer_norm(x, (x.shape[-1],), weight=ln)
        h = F.gelu(h @ w1 + b1, approximate="tanh" if act == "tanh" else "none")
        x = x + h @ w2
    return x


def tp_stack(x, *ws, bug_layer=None, bug="drop_reduce", spelled_layer=None):
    """Megatron column -> row parallel blocks: w1 (and b1) split by columns, w2 by rows."""
    for k, i in enumerate(range(0, len(ws), 4)):
        w1, b1, w2, ln = ws[i:i + 4]
        h = F.layer_norm(x, (x.shape[-1],), weight=ln)
        act = "tanh" if (k == bug_layer and bug == "tanh") else "none"
        h = F.gelu(h @ w1 + b1, approximate=act)
        y = h @ w2  # this rank's partial sum
        if k == spelled_layer:
            # the same reduction spelled another way: gather every rank's partial sum, add them up
            parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, y)
            y = torch.stack(parts).sum(0)
        elif not (k == bug_layer and bug == "drop_reduce"):
            dist.all_reduce(y)
        if k == bug_layer and bug == "scale":
            y = y * 1.5
        x = x + y
    return x


def tp_stack_sp(x, *ws):
    """Sequence parallel: the residual stream stays split by rows between blocks."""
    W, r = dist.get_world_size(), dist.get_rank()
    x = x.chunk(W, 0)[r].contiguous()
    for i in range(0, len(ws), 4):
        w1, b1, w2, ln = ws[i:i + 4]
        h = F.layer_norm(x, (x.shape[-1],), weight=ln)
        full = torch.empty((W * h.shape[0],) + tuple(h.shape[1:]), dtype=h.dtype)
        dist.all_gather_into_tensor(full, h.contiguous())
        h = F.gelu(full @ w1 + b1)
        y = h @ w2
        out = torch.empty_like(x)
        dist.reduce_scatter_tensor(out, y.contiguous())
        x = x + out
    full = torch.empty((W * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype)
    dist.all_gather_into_tensor(full, x.contiguous())
    return full


def make_stack(dist_fn, *, layers=LAYERS, world_size=2, dtype=torch.float64, seq_act="gelu", rows=8, hidden=8,
               ffn=16, placed=None, **kw):
    import functools

    g = torch.Generator().manual_seed(0)
    x = _randn(g, rows, hidden, dtype=dtype)
    ws, placements = [], [gg.Replicate()]
    for _ in range(layers):
        ws += [_randn(g, hidden, ffn, dtype=dtype, scale=hidden ** -0.5), _randn(g, ffn, dtype=dtype, scale=0.1),
               _randn(g, ffn, hidden, dtype=dtype, scale=ffn ** -0.5), 1.0 + _randn(g, hidden, dtype=dtype, scale=0.1)]
        placements += [gg.Shard(1), gg.Shard(0), gg.Shard(0), gg.Replicate()]
    for k, p in (placed or {}).items():
        placements[k] = p
    return gg.Problem(sequential=functools.partial(seq_stack, act=seq_act),
                      distributed=functools.partial(dist_fn, **kw) if kw else dist_fn,
                      inputs=[x, *ws], placements=placements, world_size=world_size, expect=[gg.Replicate()])


def both(problem_factory):
    """(with induction, walked) results of the same problem."""
    return (gg.verify(problem_factory(), capture="inprocess"),
            gg.verify(problem_factory(), capture="inprocess", induction=False))


def _where(r):
    return None if r.culprit is None else (r.culprit.node, r.culprit.op)


# ------------------------------------------------------------------------------------ correct programs


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dist_fn", [tp_stack, tp_stack_sp], ids=["all_reduce", "sequence_parallel"])
def test_correct_stacks_are_proved_with_most_layers_carried(dist_fn, world_size):
    ind, walk = both(lambda: make_stack(dist_fn, world_size=world_size))
    assert walk.status is gg.Status.PROVED
    assert ind.status is gg.Status.PROVED, ind
    s = ind.stats["induction"]
    assert s["carried"] >= LAYERS - 2, s
    carried = [st for st in ind.steps if st.detail.startswith("by induction")]
    assert carried and all(st.status in ("related", "deferred") for st in carried)
    # the carried relations were re-checked numerically with the others (translation validation)
    assert ind.stats["validated_instances"] > 0


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp_sp"])
def test_gpt_layers_are_carried(backward, sp):
    from gg_notebook.examples.gpt import make

    ind, walk = both(lambda: make(world_size=2, layers=5, backward=backward, sequence_parallel=sp))
    assert ind.status is walk.status is gg.Status.PROVED
    s = ind.stats["induction"]
    assert s["carried"] >= (2 if backward else 1) * (5 - 2), s
    assert [(o.name, o.ok) for o in ind.relations] == [(o.name, o.ok) for o in walk.relations]
    assert all(o.ok for o in ind.relations)


def test_a_layer_spelled_differently_is_walked_and_proved():
    ind, walk = both(lambda: make_stack(tp_stack, spelled_layer=3))
    assert walk.status is ind.status is gg.Status.PROVED
    s = ind.stats["induction"]
    assert any("differs" in why for why in s["walked_because"]), s


def test_a_session_steps_without_induction_and_agrees():
    p = make_stack(tp_stack)
    sess = gg.ProofSession(p)
    sess.run()
    assert sess.result().status is gg.Status.PROVED
    assert not any(st.detail.startswith("by induction") for st in sess.engine.steps)


# ------------------------------------------------------------------------------------ wrong programs


@pytest.mark.parametrize("bug", ["drop_reduce", "scale", "tanh"])
@pytest.mark.parametrize("bug_layer", [0, 3, LAYERS - 1])
def test_a_wrong_layer_is_never_proved_and_is_localized_as_the_walk_does(bug, bug_layer):
    ind, walk = both(lambda: make_stack(tp_stack, bug_layer=bug_layer, bug=bug))
    assert walk.status is not gg.Status.PROVED
    assert ind.status is walk.status, (ind, walk)
    assert _where(ind) == _where(walk)
    assert ind.stats["induction"]["in_verdict"] is False  # (walked again: the walk's verdict)


@pytest.mark.parametrize("greedy", [True, False])
def test_the_verdict_rests_on_carried_layers_only_when_proved(greedy):
    right = gg.verify(make_stack(tp_stack), capture="inprocess", greedy=greedy)
    wrong = gg.verify(make_stack(tp_stack, bug_layer=3), capture="inprocess", greedy=greedy)
    assert right.status is gg.Status.PROVED and right.stats["induction"]["in_verdict"]
    assert wrong.status is not gg.Status.PROVED and not wrong.stats["induction"]["in_verdict"]
    walked = gg.verify(make_stack(tp_stack, bug_layer=3), capture="inprocess", greedy=greedy, induction=False)
    assert _where(wrong) == _where(walked) and wrong.status is walked.status


def _reversed_rows(t, rank, world_size):
    return t.chunk(world_size, 0)[world_size - 1 - rank]


def _reversed_cols(t, rank, world_size):
    return t.chunk(world_size, 1)[world_size - 1 - rank]


@pytest.mark.parametrize("consistent", [True, False], ids=["all_reversed", "w2_not_reversed"])
def test_a_layer_whose_weights_are_placed_otherwise_is_walked(consistent):
    """Layer 3's shards sit on the ranks in reverse order: the same operators on every rank, but its
    inputs relate to the sequential weights otherwise (the hypotheses do not carry over). Reversing
    w1, b1 and w2 together is still correct; leaving w2 as it was is not."""

    def factory():
        k = 1 + 4 * 3  # layer 3's w1, b1, w2
        placed = {k: gg.Layout(_reversed_cols), k + 1: gg.Layout(_reversed_rows)}
        if consistent:
            placed[k + 2] = gg.Layout(_reversed_rows)
        return make_stack(tp_stack, world_size=4, placed=placed)

    ind, walk = both(factory)
    if consistent:
        assert walk.status is ind.status is gg.Status.PROVED
        assert any("not related as the template" in why for why in ind.stats["induction"]["walked_because"]), \
            ind.stats["induction"]
    else:
        assert walk.status is not gg.Status.PROVED
        assert ind.status is walk.status and _where(ind) == _where(walk)


def test_a_sequential_program_whose_middle_layer_differs_is_not_proved():
    """The sequential program itself differs in one layer (tanh gelu in layer 3): its segment is not
    the template's, the walk decides it."""

    def seq_mixed(x, *ws):
        for k, i in enumerate(range(0, len(ws), 4)):
            w1, b1, w2, ln = ws[i:i + 4]
            h = F.layer_norm(x, (x.shape[-1],), weight=ln)
            h = F.gelu(h @ w1 + b1, approximate="tanh" if k == 3 else "none")
            x = x + h @ w2
        return x

    def factory():
        p = make_stack(tp_stack)
        p.sequential = seq_mixed
        return p

    ind, walk = both(factory)
    assert walk.status is not gg.Status.PROVED
    assert ind.status is walk.status and _where(ind) == _where(walk)


# ------------------------------------------------------------------------------------ repeats


def test_periodic_regions_find_the_layers_between_other_code():
    rng = np.random.default_rng(0)
    head, layer, tail = rng.integers(100, 200, 7), rng.integers(0, 50, 11), rng.integers(200, 300, 5)
    ids = np.concatenate([head, np.tile(layer, 5), tail])
    regions = periodic_regions(ids)
    assert any(r.period == 11 and r.repeats >= 5 for r in regions), regions
    # too few repeats is not a region
    assert not periodic_regions(np.concatenate([head, np.tile(layer, MIN_REPEATS - 1), tail]))


def test_segments_match_only_when_wired_alike():
    from gg_notebook.verify import prepare
    from gg_notebook.engine.repeats import signature_ids

    engine, _ = prepare(make_stack(tp_stack), capture="inprocess")
    seq = engine.seq
    ids = signature_ids(seq)
    regions = periodic_regions(ids)
    assert regions, "the layers repeat"
    r = regions[0]
    a = Segment.of(seq, r.start, r.start + r.period)
    b = Segment.of(seq, r.start + r.period, r.start + 2 * r.period)
    assert match_segments(a, b, ids)
    # shifted by one node: other operators at the same offsets
    c = Segment.of(seq, r.start + 1, r.start + 1 + r.period)
    assert not match_segments(a, c, ids) or r.period == 1
    assert isinstance(r, Region)


def test_progress_counts_the_carried_layers():
    calls = []
    r = gg.verify(make_stack(tp_stack, layers=8), capture="inprocess",
                  progress=lambda stage, done, total, detail: calls.append((stage, done, total)))
    assert r.status is gg.Status.PROVED and r.stats["induction"]["carried"] >= 6
    inf = [(d, t) for s, d, t in calls if s == "inference"]
    assert inf and inf[-1][0] == inf[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(inf, inf[1:]))
    assert len(inf) >= 20  # reported along the way, not only at the end


def test_a_rank_program_with_two_odd_layers_is_proved_as_walked():
    """Layers 2 and 5 of 9 sum their partials another way (correct). The ranks' programs then repeat
    in runs of two or three layers only; whatever induction makes of that, the verdict is the walk's."""

    def tp_two_spelled(x, *ws):
        out = x
        for k, i in enumerate(range(0, len(ws), 4)):
            out = tp_stack(out, *ws[i:i + 4], spelled_layer=0 if k in (2, 5) else None)
        return out

    ind, walk = both(lambda: make_stack(tp_two_spelled, layers=9))
    assert ind.status is walk.status is gg.Status.PROVED
