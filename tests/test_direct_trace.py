"""Pass 1 without make_fx (capture/direct_trace.py): the graph must be make_fx's, node for node.

`tracing._trace` writes a program's first-pass graph with `DirectTracer` (a dispatch mode keeping a
dictionary from tensors to nodes) instead of make_fx's proxies. Every test here traces programs both
ways (``tracing._CHECK_DIRECT``: make_fx runs too, on fresh inputs, and `graph_differences` must be
empty): the built-in examples in their several parallel styles, and programs spelled the ways users
write them (in-place ops on views, ``torch.tensor`` constants, autograd Functions, ``.data`` swaps,
DTensor, functional collectives, module-built models). Where the direct tracer cannot reproduce
make_fx (a constant folded by ``.item()``), make_fx traces the program on fresh inputs and the
verdict is the same. The whole test suite can be run with ``GG_CHECK_DIRECT_TRACE=1`` to check every
program it captures.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture import tracing
from gg_notebook.capture.direct_trace import graph_differences, trace_directly
from gg_notebook.examples import EXAMPLES


@pytest.fixture
def checked(monkeypatch):
    """Every pass 1 in this process is traced both ways and compared (AssertionError if not alike)."""
    monkeypatch.setattr(tracing, "_CHECK_DIRECT", True)
    monkeypatch.setattr(tracing, "direct", True)
    stats = {"direct": 0, "refused": 0, "reasons": []}
    monkeypatch.setattr(tracing, "_DIRECT_STATS", stats)
    return stats


def _trace_all(problem: gg.Problem, ranks=None) -> None:
    tracing.trace_program(problem, None)
    for r in (range(problem.world_size) if ranks is None else ranks):
        tracing.forget_rank_caches()  # as capture="inprocess" does between ranks
        tracing.trace_program(problem, r)


# one example per parallel style (the check over every program runs with GG_CHECK_DIRECT_TRACE=1)
_EXAMPLES = ["mlp", "vocab_cross_entropy", "sp_layernorm_mlp", "gpt_fwd_bwd", "pipeline_1f1b", "zero_adam",
             "ring_attention_causal", "moe_dropless", "fsdp_clip", "mesh_tp_dp_device_mesh", "dtensor_tp_dp_train"]


@pytest.mark.parametrize("name", _EXAMPLES)
def test_examples_trace_as_make_fx_does(checked, name):
    ex = EXAMPLES[name]
    W = 4 if name.startswith("mesh") or name == "dtensor_tp_dp_train" else 2
    problem = ex.make(W)
    _trace_all(problem, ranks=[0, W - 1])
    assert checked["direct"] >= 3 and checked["refused"] == 0, checked["reasons"]


def test_gpt_sequence_parallel_forward_backward(checked):
    from gg_notebook.examples.gpt import make

    _trace_all(make(2, layers=2, backward=True, sequence_parallel=True))
    assert checked["refused"] == 0, checked["reasons"]


# ------------------------------------------------------------------------- user spellings


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seq_mlp(x, w1, w2):
    return F.relu(x @ w1.t()) @ w2.t()


def tp_inplace_views(x, w1, w2):
    """Column/row-parallel MLP written with in-place ops, views written through, and a factory."""
    h = x @ w1.t()
    h.relu_()
    out = torch.zeros(x.shape[0], w2.shape[0], dtype=x.dtype)
    out[:, :].add_(h @ w2.t())  # a write through a view of a factory result
    dist.all_reduce(out)
    return out


def tp_tensor_constants(x, w1, w2):
    """torch.tensor constants (lifted, make_fx writes lift_fresh_copy) and a scalar tensor."""
    scale = torch.tensor(1.0, dtype=x.dtype)
    h = F.relu(x @ w1.t()) * scale
    y = h @ w2.t()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y + torch.tensor([0.0], dtype=x.dtype)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        y = y.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        return g


def tp_autograd_function(x, w1, w2):
    return _Reduce.apply(F.relu(x @ w1.t()) @ w2.t())


def tp_functional_collective(x, w1, w2):
    import torch.distributed._functional_collectives as funcol

    y = F.relu(x @ w1.t()) @ w2.t()
    return funcol.all_reduce(y, "sum", dist.group.WORLD)


def tp_constant_item(x, w1, w2):
    """``.item()`` of a constant: make_fx folds it; the direct tracer hands the program to make_fx."""
    k = int(torch.tensor(1).item())
    y = F.relu(x @ w1.t()) @ w2.t() * k
    dist.all_reduce(y)
    return y


def _mlp_problem(fn):
    return gg.Problem(sequential=seq_mlp, distributed=fn,
                      inputs=[_rand(3, 8, seed=1), _rand(8, 8, seed=2), _rand(8, 8, seed=3)],
                      placements=[gg.Replicate(), gg.Shard(0), gg.Shard(1)], world_size=2,
                      expect=[gg.Replicate()])


@pytest.mark.parametrize("fn", [tp_inplace_views, tp_tensor_constants, tp_autograd_function,
                                tp_functional_collective], ids=lambda f: f.__name__)
def test_user_spellings_trace_as_make_fx_does(checked, fn):
    _trace_all(_mlp_problem(fn))
    assert checked["refused"] == 0, checked["reasons"]
    assert gg.verify(_mlp_problem(fn)).status == "proved"


def test_constant_item_folds_as_in_make_fx(checked):
    """make_fx's constant propagation: ``.item()`` of a known value runs for real, leaving no node."""
    _trace_all(_mlp_problem(tp_constant_item))
    assert checked["refused"] == 0, checked["reasons"]
    assert gg.verify(_mlp_problem(tp_constant_item)).status == "proved"


def _selectively_checkpointed(fn, *args):
    """Selective activation checkpointing asks whether make_fx traces (the direct tracer refuses)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    policy = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    return checkpoint(fn, *args, use_reentrant=False, context_fn=policy)


def zero3_then_checkpoint(x, w1, w2):
    """``p.data = gathered`` before a refused call: make_fx must get the inputs as they were."""
    for p in (w1, w2):
        parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.data)
        p.data = torch.cat(parts)
    return _selectively_checkpointed(seq_mlp, x, w1, w2)


def zero3_then_checkpoint_bug(x, w1, w2):  # BUG: w2 is never gathered (its shard is used twice)
    parts = [torch.empty_like(w1) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, w1.data)
    w1.data = torch.cat(parts)
    return _selectively_checkpointed(seq_mlp, x, w1, torch.cat([w2, w2]))


def _zero3(fn):
    return gg.Problem(sequential=seq_mlp, distributed=fn,
                      inputs=[_rand(3, 8, seed=1), _rand(8, 8, seed=2), _rand(8, 8, seed=3)],
                      placements=[gg.Replicate(), gg.Shard(0), gg.Shard(0)], world_size=2,
                      expect=[gg.Replicate()])


def test_refused_program_is_traced_on_fresh_inputs(checked):
    problem = _zero3(zero3_then_checkpoint)
    tracing.trace_program(problem, 0)
    tracing.trace_program(problem, 1)
    assert checked["refused"] == 2 and "checkpointing" in checked["reasons"][0], checked
    assert gg.verify(problem).status == "proved"
    assert gg.verify(_zero3(zero3_then_checkpoint_bug)).status != "proved"


def test_factory_results_are_not_detached():
    """A strong reference to a factory result makes autograd detach it when it returns (make_fx's
    tracker is weak): the graph must not get a detach make_fx does not have."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        x = torch.empty(4, 4)

    def f(x):
        return torch.ones(4, 4, dtype=torch.bool).triu(1) & (x > 0)

    gm, why = trace_directly(f, [x])
    assert why is None
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        torch.ops.aten.ones.default, torch.ops.aten.triu.default, torch.ops.aten.gt.Scalar,
        torch.ops.aten.bitwise_and.Tensor]


def test_graph_differences_sees_a_changed_argument():
    """The comparison itself: a graph with one argument changed is reported."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return (x * 2).sum(0)

    a = make_fx(f, tracing_mode="fake")(torch.ones(3, 4))
    b = make_fx(f, tracing_mode="fake")(torch.ones(3, 4))
    assert graph_differences(a, b) == []
    mul = next(n for n in b.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    mul.args = (mul.args[0], 3)
    assert graph_differences(a, b)


def mean_count_functional_item(x):
    """A functional all-reduce of a constant count, read with ``.item()``: the fake process group
    communicates nothing, so the local count must not be baked in (that would refute a correct
    program); the read is refused as data-dependent, as for the in-place ``dist.all_reduce``."""
    import torch.distributed._functional_collectives as funcol

    s = funcol.all_reduce(x.sum(0), "sum", dist.group.WORLD)
    n = funcol.all_reduce(torch.tensor(float(x.shape[0]), dtype=x.dtype), "sum", dist.group.WORLD)
    return s / n.item()


def test_item_of_a_functional_collective_of_a_constant_is_refused():
    from gg_notebook.capture.errors import CaptureError

    problem = gg.Problem(sequential=lambda x: x.mean(0), distributed=mean_count_functional_item,
                         inputs=[_rand(8, 5)], placements=[gg.Shard(0)], world_size=2, expect=[gg.Replicate()])
    with pytest.raises(CaptureError, match="control flow that depends on tensor values"):
        gg.verify(problem)
