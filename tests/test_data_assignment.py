"""``tensor.data = other`` inside a rank program: the graph follows the new value (capture/data_assignment.py).

Hand-written ZeRO-3 / FSDP code frees and re-gathers parameters by assigning ``.data``; modules built
inside a rank function get their shards the same way. make_fx alone would keep the old value (a wrong
program proved); these tests pin that the assignment is followed, refused only where it cannot be.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture.errors import CaptureError


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ ZeRO-3 style: gather, use, free


def mlp(x, w1, w2):
    return F.relu(x @ w1.t()) @ w2.t()


def _gather_into(p: torch.Tensor) -> None:
    """p holds this rank's rows; afterwards p.data is the full parameter (ZeRO-3 style)."""
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, p.data)
    p.data = torch.cat(parts)


def zero3_mlp(x, w1, w2):
    shards = [w1.data, w2.data]
    for p in (w1, w2):
        _gather_into(p)
    y = mlp(x, w1, w2)
    w1.data, w2.data = shards  # free the gathered copies again
    return y


def zero3_mlp_setattr(x, w1, w2):
    full = []
    for p in (w1, w2):
        parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p)
        full.append(torch.cat(parts, dim=0))
    setattr(w1, "data", full[0])
    setattr(w2, "data", full[1])
    return torch.relu(torch.matmul(x, w1.T)).matmul(w2.T)


def zero3_mlp_shared_buffer(x, w1, w2):  # BUG: one gather buffer for both weights: w1 ends up as w2
    buf = torch.empty(w1.shape[0] * dist.get_world_size(), w1.shape[1], dtype=w1.dtype)
    for p in (w1, w2):
        dist.all_gather(list(buf.chunk(dist.get_world_size())), p.data)
        p.data = buf
    return mlp(x, w1, w2)


def zero3_mlp_own_buffers(x, w1, w2):
    for p in (w1, w2):
        buf = torch.empty(p.shape[0] * dist.get_world_size(), p.shape[1], dtype=p.dtype)
        dist.all_gather(list(buf.chunk(dist.get_world_size())), p.data)
        p.data = buf
    return mlp(x, w1, w2)


def _zero3(fn, world_size=2):
    return gg.Problem(sequential=mlp, distributed=fn,
                      inputs=[_randn(3, 8, seed=1), _randn(8, 8, seed=2), _randn(8, 8, seed=3)],
                      placements=[gg.Replicate(), gg.Shard(0), gg.Shard(0)], world_size=world_size,
                      expect=[gg.Replicate()])


@pytest.mark.parametrize("fn", [zero3_mlp, zero3_mlp_setattr, zero3_mlp_own_buffers])
@pytest.mark.parametrize("world_size", [2])
def test_zero3_parameter_gather_through_data_is_proved(fn, world_size):
    assert gg.verify(_zero3(fn, world_size)).status is gg.Status.PROVED


def test_zero3_shared_gather_buffer_is_refuted():
    r = gg.verify(_zero3(zero3_mlp_shared_buffer))
    assert r.status is gg.Status.REFUTED and r.counterexample is not None


# ------------------------------------------------- a module built inside the rank, its weight assigned


def linear_spec(x, w):
    return x @ w.t()


def column_parallel_module(x, w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)  # random init, then replaced
    lin.weight.data = w
    y = lin(x)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, -1)


def column_parallel_module_unassigned(x, w):  # BUG: the shard is never put into the module
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    y = lin(x)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, -1)


def _column(fn):
    return gg.Problem(sequential=linear_spec, distributed=fn, inputs=[_randn(3, 4, seed=4), _randn(6, 4, seed=5)],
                      placements=[gg.Replicate(), gg.Shard(0)], world_size=2, expect=[gg.Replicate()])


def test_module_weight_assigned_through_data_is_proved():
    # the module's random initialization is dead once its weight is replaced
    assert gg.verify(_column(column_parallel_module)).status is gg.Status.PROVED


def test_module_weight_left_random_is_refused():
    with pytest.raises(gg.RandomOpError, match="random operator"):
        gg.verify(_column(column_parallel_module_unassigned))


# ------------------------------------------------------------- a swap on one rank only (review finding)


def double(x, y):
    return x * 2


def swapped_on_rank_1(x, y):  # BUG: rank 1 computes 2 * y
    a = x.clone()
    if dist.get_rank() == 1:
        a.data = y.clone()
    return a * 2


def swapped_on_rank_1_inplace(x, y):  # BUG: the same, then updated in place
    a = x.clone()
    if dist.get_rank() == 1:
        a.data = y
    a.mul_(2)
    return a


@pytest.mark.parametrize("fn", [swapped_on_rank_1, swapped_on_rank_1_inplace])
def test_data_swapped_on_one_rank_is_refuted(fn):
    p = gg.Problem(sequential=double, distributed=fn, inputs=[_randn(4, seed=6), _randn(4, seed=7)],
                   placements=[gg.Replicate(), gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    r = gg.verify(p)
    assert r.status is gg.Status.REFUTED and r.counterexample is not None


# ---------------------------------------------------------------- a value the trace does not know

_ONES = torch.ones(4, dtype=torch.float64)


def data_from_module_constant(x, y):
    a = x.clone()
    a.data = _ONES
    return a * 2


def test_data_from_outside_the_trace_is_a_clear_error():
    p = gg.Problem(sequential=double, distributed=data_from_module_constant,
                   inputs=[_randn(4, seed=6), _randn(4, seed=7)],
                   placements=[gg.Replicate(), gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    with pytest.raises(CaptureError) as e:
        gg.verify(p)
    msg = str(e.value)
    assert "rank 0" in msg and "a.data = _ONES" in msg and "test_data_assignment.py" in msg


# ------------------------------------------------------------------- dead random values are harmless


def double_with_unused_noise(x, y):
    noise = torch.rand_like(x)  # never used
    del noise
    out = x * 2
    return out


def test_unused_random_value_is_not_refused():
    p = gg.Problem(sequential=double, distributed=double_with_unused_noise,
                   inputs=[_randn(4, seed=6), _randn(4, seed=7)],
                   placements=[gg.Replicate(), gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    assert gg.verify(p).status is gg.Status.PROVED


def double_with_used_noise(x, y):  # BUG: the noise reaches the output
    return x * 2 + 0 * torch.rand_like(x) + torch.rand_like(x)


def test_used_random_value_is_still_refused():
    p = gg.Problem(sequential=double, distributed=double_with_used_noise,
                   inputs=[_randn(4, seed=6), _randn(4, seed=7)],
                   placements=[gg.Replicate(), gg.Replicate()], world_size=2, expect=[gg.Replicate()])
    with pytest.raises(gg.RandomOpError):
        gg.verify(p)
