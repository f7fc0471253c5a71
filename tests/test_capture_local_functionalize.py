"""capture.local_functionalize: in-place operators on fresh tensors rewritten without the replay.

Every rewritten graph must compute what the two-pass graph (make_fx, then the functionalizing
replay) computes, on real inputs, and what the eager program computes; mutations outside what the
rewrite handles (aliases other than reshapes, inputs, promoting dtypes) must leave the graph to the
replay, untouched."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

import gg_notebook as gg
from gg_notebook.capture import tracing as T
from gg_notebook.capture.collectives import collective_result
from gg_notebook.capture.local_functionalize import functionalize_locally
from gg_notebook.problem import Problem, Replicate, Shard


class _Run(fx.Interpreter):
    """Runs a captured graph on real tensors; a collective's result is a fixed function of its
    input (every element of the input matters), so both graphs must feed it the same values."""

    def run_node(self, n):
        if n.op == "call_function" and n.target is collective_result:
            (x,) = self.fetch_args_kwargs_from_env(n)[0]
            v = n.meta["val"]
            s = (x.to(torch.float64) * torch.arange(1, x.numel() + 1, dtype=torch.float64).reshape(x.shape)).sum()
            k = torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape)
            return (torch.cos(k + s) + 2).to(v.dtype)
        return super().run_node(n)


def _run(gm, args):
    with torch.no_grad():
        out = _Run(gm).run(*args)
    return out if isinstance(out, (tuple, list)) else (out,)


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x.shape == y.shape and x.dtype == y.dtype and bool(((x == y) | (x != x) & (y != y)).all())
        for x, y in zip(xs, ys))


def _traces(p, rank, monkeypatch):
    monkeypatch.setattr(T, "one_pass", True)
    a, ia = T.trace_program(p, rank)
    monkeypatch.setattr(T, "one_pass", False)
    b, ib = T.trace_program(p, rank)
    return a, ia, b, ib


def _inputs(n=6, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m, generator=g, dtype=torch.float64),
            torch.randn(n, m, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (n, m), generator=g).bool())


# ------------------------------------------------------------------ programs (several spellings)

def masked_assign(x, y, mask):
    t = x.clone()
    t[mask] = 0.0
    return t * y


def masked_fill_method(x, y, mask):
    t = (x + y).masked_fill_(mask, -1.5)
    return t.sum(-1), t


def sub_then_read_twice(x, y, mask):
    t = x * 2
    u = t + 1  # read before the write
    t.sub_(y)
    t.add_(y, alpha=0.5)
    return u, t


def write_through_reshape(x, y, mask):
    base = x.clone()
    flat = base.view(-1)  # a reshape of the base, written below
    before = flat * 3  # read before the write
    flat[torch.arange(0, flat.numel(), 2)] -= 1.0
    return before, base, flat + 0


def write_through_chain_of_reshapes(x, y, mask):
    base = torch.exp(x)
    v = base.view(x.shape[0], -1, 1).view(-1)
    v.mul_(2.0)
    base.add_(y)  # the base written again after its view
    return v.reshape(x.shape) - base, torch.sum(base, dim=1)


def copy_into_buffer(x, y, mask):
    out = torch.empty_like(x)
    out.copy_(y.t().t())
    out += x
    return out


def buffer_then_transpose_after(x, y, mask):
    buf = torch.zeros(x.shape[1], x.shape[0], dtype=x.dtype)
    buf.copy_(x.T)
    return buf.transpose(0, 1) * y  # a non-reshape alias made after the last write: fine


@pytest.mark.parametrize("fn", [masked_assign, masked_fill_method, sub_then_read_twice, write_through_reshape,
                                write_through_chain_of_reshapes, copy_into_buffer, buffer_then_transpose_after])
def test_rewritten_graph_computes_what_the_replay_and_eager_compute(fn, monkeypatch):
    x, y, mask = _inputs()
    p = Problem(sequential=fn, distributed=fn, inputs=(x, y, mask), placements=(Replicate(),) * 3, world_size=2)
    a, _, b, _ = _traces(p, None, monkeypatch)
    assert a.meta.get("gg_one_pass") and a.meta.get("gg_local_functionalized"), fn.__name__
    assert not b.meta.get("gg_one_pass")
    for n in a.graph.nodes:  # value semantics
        assert n.op != "call_function" or not getattr(n.target, "_schema", None) or not n.target._schema.is_mutable
    for seed in (0, 1):
        args = _inputs(seed=seed)
        eager = fn(*[t.clone() for t in args])
        eager = eager if isinstance(eager, tuple) else (eager,)
        assert _same(_run(a, args), _run(b, args))
        assert _same(_run(a, args), tuple(eager))


# ------------------------------------------------------------------ refused: left to the replay, untouched

def write_through_slice(x, y, mask):
    t = x.clone()
    t[:, 0] = 1.0  # a slice is not a reshape: the base's other elements stay
    return t


def write_through_transpose(x, y, mask):
    t = x.clone()
    t.T.mul_(2.0)
    return t


def write_input(x, y, mask):
    x.mul_(2.0)
    return x + y


def promoting_write(x, y, mask):
    t = x.to(torch.float32) * 1
    t.sub_(y)  # float32 -= float64: stays float32 in place, float64 out of place
    return t


def alias_alive_across_the_write(x, y, mask):
    t = x.clone()
    row = t[0]  # a select alias made before the write, read after it
    t.add_(1.0)
    return row * 1


@pytest.mark.parametrize("fn", [write_through_slice, write_through_transpose, write_input, promoting_write,
                                alias_alive_across_the_write])
def test_refused_mutations_are_replayed(fn, monkeypatch):
    x, y, mask = _inputs()
    p = Problem(sequential=fn, distributed=fn, inputs=(x, y, mask), placements=(Replicate(),) * 3, world_size=2)
    a, _, b, _ = _traces(p, None, monkeypatch)
    assert not a.meta.get("gg_local_functionalized") and not a.meta.get("gg_one_pass"), fn.__name__
    assert a.code == b.code  # the replay's graph, as before
    args = _inputs(seed=2)
    eager = fn(*[t.clone() for t in args])
    assert _same(_run(a, args), eager if isinstance(eager, tuple) else (eager,))


def test_refusal_leaves_the_graph_untouched():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        t = x.clone()
        t[:, 1] = 0.0
        return t + 1

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3, 4))
    before = gm.graph.python_code("self").src
    assert not functionalize_locally(gm)
    assert gm.graph.python_code("self").src == before


# ------------------------------------------------------------------ collectives into preallocated buffers

def sp_gather_reduce_scatter(x, w):
    W = dist.get_world_size()
    h = x @ w
    out = torch.empty(h.shape[0] * W, h.shape[1], dtype=h.dtype)
    dist.all_gather_into_tensor(out, h.contiguous())
    red = torch.empty(out.shape[0] // W, out.shape[1], dtype=h.dtype)
    dist.reduce_scatter_tensor(red, (out * 2).contiguous())
    s = red.sum(0)
    dist.all_reduce(s)
    flat = red.view(-1)
    dist.all_reduce(flat)  # through a reshape: the base reads the reduced values
    return red + s, out


def sp_sequential(x, w):
    h = x @ w
    return 2 * 2 * h, h  # per-rank results only matter for the graph comparison below


@pytest.mark.parametrize("rank", [0, 1])
def test_collectives_into_buffers_take_one_pass(rank, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    p = Problem(sequential=sp_sequential, distributed=sp_gather_reduce_scatter, inputs=(x, w),
                placements=(Shard(0), Replicate()), world_size=2)
    a, ia, b, ib = _traces(p, rank, monkeypatch)
    assert a.meta.get("gg_local_functionalized") and a.meta.get("gg_one_pass")
    key = [(c.info, c.inputs, c.outputs) for c in ia]
    assert key == [(c.info, c.inputs, c.outputs) for c in ib] and len(key) == 4
    args = [torch.randn(tuple(n.meta["val"].shape), generator=g, dtype=torch.float64)
            for n in a.graph.nodes if n.op == "placeholder"]
    assert _same(_run(a, args), _run(b, args))


def test_gpt_sequence_parallel_graph_takes_one_pass_and_matches_the_replay(monkeypatch):
    from gg_notebook.examples.gpt import make

    p = make(4, layers=2, backward=True, device="cpu", sequence_parallel=True,
             hidden=64, heads=4, vocab=256, seq=32, batch=1, ffn=128)
    for rank in (0, 3):
        monkeypatch.setattr(T, "one_pass", True)
        with T.recording_calls():
            a, ia = T.trace_program(p, rank)
        monkeypatch.setattr(T, "one_pass", False)
        with T.recording_calls():
            b, ib = T.trace_program(p, rank)
        assert a.meta.get("gg_one_pass") and a.meta.get("gg_local_functionalized")
        assert [(c.info, c.inputs, c.outputs) for c in ia] == [(c.info, c.inputs, c.outputs) for c in ib]
        g = torch.Generator().manual_seed(rank)
        args = []
        for n in a.graph.nodes:
            if n.op == "placeholder":
                v = n.meta["val"]
                args.append(torch.randn(tuple(v.shape), generator=g, dtype=v.dtype) if v.dtype.is_floating_point
                            else torch.randint(0, 256, tuple(v.shape), generator=g, dtype=v.dtype))
        assert _same(_run(a, args), _run(b, args))


def wrong_masked_assign(x, y, mask):
    t = x.clone()
    t[~mask] = 0.0  # the complement: a different program
    return t * y


def wrong_masked_fill(x, y, mask):
    t = (x + y).masked_fill_(mask, 1.5)  # another fill value
    return t.sum(-1), t


def wrong_sub(x, y, mask):
    t = x * 2
    u = t + 1
    t.add_(y, alpha=0.5)
    t.sub_(y)
    return u + t, t  # reads the written value where the specification reads the one before


def test_verdicts_with_rewritten_mutations():
    x, y, mask = _inputs()
    kw = dict(inputs=(x, y, mask), placements=(Shard(0), Shard(0), Shard(0)), world_size=2)
    for good, bad in [(masked_fill_method, wrong_masked_fill), (sub_then_read_twice, wrong_sub)]:
        assert gg.verify(Problem(sequential=good, distributed=good, **kw)).status is gg.Status.PROVED
        assert gg.verify(Problem(sequential=good, distributed=bad, **kw)).status is gg.Status.REFUTED
    r = gg.verify(Problem(sequential=masked_assign, distributed=wrong_masked_assign, **kw))
    assert r.status is gg.Status.REFUTED


@torch.library.custom_op("gg_test_local_functionalize::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def custom_op_and_write(x, y, mask):
    t = torch.ops.gg_test_local_functionalize.twice(x)
    t[mask] = 0.0  # a local write, but the graph has a node that is no aten operator: replayed as a whole
    return t + y


def test_graph_with_other_operators_is_replayed_untouched(monkeypatch):
    x, y, mask = _inputs()
    p = Problem(sequential=custom_op_and_write, distributed=custom_op_and_write, inputs=(x, y, mask),
                placements=(Replicate(),) * 3, world_size=2)
    a, _, b, _ = _traces(p, None, monkeypatch)
    assert not a.meta.get("gg_local_functionalized") and not a.meta.get("gg_one_pass")
    assert a.code == b.code
    args = _inputs(seed=3)
    assert _same(_run(a, args), (custom_op_and_write(*[t.clone() for t in args]),))
