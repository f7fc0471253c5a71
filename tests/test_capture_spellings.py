"""Capture and lowering of programs as people write them (issue #8, capture defects of the spelling suite).

Each test is a small distributed program written with plain ``torch.distributed`` calls, checked
end to end with `gg.verify`: collectives on tensors built from Python numbers, the stacked forms of
``all_gather_into_tensor`` / ``reduce_scatter_tensor``, the list forms of ``reduce_scatter`` /
``all_to_all`` / ``gather`` / ``scatter``, object collectives (refused with a clear message), a rank
that raises on its real inputs (refuted), boolean-mask indexing (a clear message), complex RoPE
(``view_as_complex`` / ``view_as_real``) and SDPA with ``dropout_p=0``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture import CaptureError

R, S0, S1, S2 = gg.Replicate(), gg.Shard(0), gg.Shard(1), gg.Shard(2)
HERE = "test_capture_spellings.py"


def rn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def verify(seq, dist_fn, inputs, placements, expect, world_size=2, **kw):
    kw.setdefault("capture", "inprocess")
    p = gg.Problem(sequential=seq, distributed=dist_fn, inputs=list(inputs), placements=list(placements),
                   world_size=world_size, expect=list(expect), domains=kw.pop("domains", None))
    return gg.verify(p, **kw)


def line_of(fn, text):
    lines, start = inspect.getsourcelines(fn)
    for i, l in enumerate(lines):
        if text in l:
            return f"{HERE}:{start + i}"
    raise AssertionError(text)


def proved(r):
    assert r.status is gg.Status.PROVED and r.proved, str(r)


def refuted(r):
    assert r.status is gg.Status.REFUTED, str(r)


# ------------------------------------------------------------------------------------------------
# 1. A collective on a tensor built from Python numbers (a token count), then a division by it


def feature_mean(x):
    return x.mean(0)


def feature_mean_sum_div(x):
    return x.sum(0) / x.shape[0]


def mean_count_tensor(x):
    s = x.sum(0)
    n = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    dist.all_reduce(s)
    dist.all_reduce(n)
    return s / n


def mean_count_new_tensor(x):
    n = x.new_tensor(x.shape[0])  # same dtype as x
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    s = torch.sum(x, dim=0)
    dist.all_reduce(s)
    return torch.div(s, n)


def mean_count_functional(x):
    s = fc.all_reduce(x.sum(0), "sum", dist.group.WORLD)
    n = fc.all_reduce(torch.tensor(float(x.shape[0]), dtype=x.dtype), "sum", dist.group.WORLD)
    return s / n


def mean_count_max(x):
    # every rank holds the same count: MAX of the counts is the local count; times the world size
    n = torch.tensor([float(x.shape[0])], dtype=x.dtype)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    s = x.sum(0)
    dist.all_reduce(s)
    return s / (n * dist.get_world_size())


def mean_count_not_reduced(x):
    s = x.sum(0)
    n = torch.tensor(float(x.shape[0]), dtype=x.dtype)  # BUG: the local count, never all-reduced
    dist.all_reduce(s)
    return s / n


def mean_count_rank_dependent(x):
    s = x.sum(0)
    n = torch.tensor(float(x.shape[0] + dist.get_rank()), dtype=x.dtype)  # BUG: rank 1 counts one more
    dist.all_reduce(s)
    dist.all_reduce(n)
    return s / n


def mean_count_item(x):
    s = x.sum(0)
    n = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    dist.all_reduce(s)
    dist.all_reduce(n)
    return s / n.item()


@pytest.mark.parametrize("seq", [feature_mean, feature_mean_sum_div])
@pytest.mark.parametrize("rank_fn", [mean_count_tensor, mean_count_new_tensor, mean_count_functional, mean_count_max])
def test_collective_on_a_constant_count_is_traced_and_proved(seq, rank_fn):
    proved(verify(seq, rank_fn, [rn(8, 5)], [S0], [R]))


@pytest.mark.parametrize("rank_fn", [mean_count_not_reduced, mean_count_rank_dependent])
def test_wrong_count_is_refuted(rank_fn):
    refuted(verify(feature_mean, rank_fn, [rn(8, 5)], [S0], [R]))


def test_item_of_a_collective_result_is_refused_not_burned_in():
    """The fake process group communicates nothing: `.item()` of an all-reduced constant must not
    become the local value baked into the graph (that would refute a correct program)."""
    with pytest.raises(CaptureError) as e:
        verify(feature_mean, mean_count_item, [rn(8, 5)], [S0], [R])
    msg = str(e.value)
    assert msg.startswith("rank 0: control flow that depends on tensor values cannot be traced")
    assert line_of(mean_count_item, "n.item()") in msg and "s / n" in msg


def test_all_reduce_of_non_integer_constants_is_not_folded():
    """0.1 + 0.2 is not exact in floating point: the folded constant would depend on the order of
    summation; the sum stays symbolic (and the program is still judged correctly)."""
    from gg_notebook.engine.index import _fold_ground
    from gg_notebook.ir.lower import _Full
    from gg_notebook.relations.expr import ExprStore, OpSpec

    S = ExprStore()

    def full(v):
        return S.const(OpSpec("const", f"full({v})", _Full.of((), v, torch.float64), ((), ())), (), torch.float64)

    assert _fold_ground(S, "sum", [full(0.1), full(0.2)]) is None
    assert _fold_ground(S, "sum", [full(4.0), full(4.0)]) is full(8.0)
    assert _fold_ground(S, "max", [full(0.1), full(0.2)]) is full(0.2)
    assert _fold_ground(S, "sum", [full(2.0 ** 53), full(1.0)]) is None  # not exact in float64
    assert _fold_ground(S, "sum", [full(4.0), S.atom("x", (), torch.float64)]) is None
    garbage = S.const(OpSpec("const", "empty", torch.ops.aten.empty.memory_format, (((),), ()), unique="r0:empty"),
                      (), torch.float64)
    assert _fold_ground(S, "sum", [garbage, garbage]) is None  # uninitialized memory has no value


# ------------------------------------------------------------------------------------------------
# 2. Stacked all_gather_into_tensor / reduce_scatter_tensor (both documented by torch)


def double(x):
    return x * 2


def gather_stacked_flatten(x):
    out = torch.empty(dist.get_world_size(), *x.shape, dtype=x.dtype)
    dist.all_gather_into_tensor(out, x * 2)
    return out.flatten(0, 1)


def gather_stacked_view(x):
    y = 2 * x
    out = y.new_empty((dist.get_world_size(),) + tuple(y.shape))
    dist.all_gather_into_tensor(out, y)
    return out.view(-1, y.shape[-1])


def gather_stacked_unbind_cat(x):
    y = x.mul(2)
    out = torch.empty((2, 4, 3), dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return torch.cat(out.unbind(0), dim=0)


def gather_stacked_transposed(x):
    out = torch.empty(dist.get_world_size(), *x.shape, dtype=x.dtype)
    dist.all_gather_into_tensor(out, x * 2)
    return out.transpose(0, 1).flatten(0, 1)  # BUG: interleaves the ranks' rows


def gather_wrong_shape(x):
    out = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    dist.all_gather_into_tensor(out, x * 2)  # neither a concatenation nor a stack of the inputs
    return out.view(-1, x.shape[1])


@pytest.mark.parametrize("rank_fn", [gather_stacked_flatten, gather_stacked_view, gather_stacked_unbind_cat])
def test_stacked_all_gather_into_tensor(rank_fn):
    proved(verify(double, rank_fn, [rn(8, 3)], [S0], [R]))


def test_stacked_all_gather_in_the_wrong_order_is_refuted():
    refuted(verify(double, gather_stacked_transposed, [rn(8, 3)], [S0], [R]))


def test_all_gather_into_a_wrong_shape_names_both_forms():
    with pytest.raises(CaptureError) as e:
        verify(double, gather_wrong_shape, [rn(8, 3)], [S0], [R])
    msg = str(e.value)
    assert "rank 0" in msg and line_of(gather_wrong_shape, "all_gather_into_tensor(out") in msg
    assert "(8, 3)" in msg and "(2, 4, 3)" in msg


def row_parallel(x, w):
    return x @ w


def row_parallel_rs_stacked(x, w):
    y = x @ w  # partial sums [8, 5]
    out = torch.empty(y.shape[0] // dist.get_world_size(), y.shape[1], dtype=y.dtype)
    dist.reduce_scatter_tensor(out, y.view(dist.get_world_size(), -1, y.shape[1]))
    return out


def row_parallel_rs_list(x, w):
    y = torch.matmul(x, w)
    out = torch.empty(4, 5, dtype=y.dtype)
    dist.reduce_scatter(out, list(y.chunk(dist.get_world_size(), dim=0)))
    return out


def row_parallel_rs_list_copies(x, w):
    y = x.matmul(w)
    out = torch.empty(4, 5, dtype=y.dtype)
    dist.reduce_scatter(out, [y[:4].clone(), y[4:].clone()])  # separate tensors: concatenated by the capture
    return out


def row_parallel_rs_list_reversed(x, w):
    y = torch.matmul(x, w)
    out = torch.empty(4, 5, dtype=y.dtype)
    dist.reduce_scatter(out, list(reversed(y.chunk(2, dim=0))))  # BUG: rank r gets the other rows
    return out


def row_parallel_rs_list_uneven(x, w):
    y = torch.matmul(x, w)
    out = torch.empty(4, 5, dtype=y.dtype)
    dist.reduce_scatter(out, list(y.split([3, 5], dim=0)))
    return out


_RP_IN = lambda: [rn(8, 6, seed=1), rn(6, 5, seed=2)]  # noqa: E731


@pytest.mark.parametrize("rank_fn", [row_parallel_rs_stacked, row_parallel_rs_list, row_parallel_rs_list_copies])
def test_reduce_scatter_stacked_and_list_forms(rank_fn):
    proved(verify(row_parallel, rank_fn, _RP_IN(), [S1, S0], [S0]))


def test_reduce_scatter_list_in_the_wrong_order_is_refuted():
    refuted(verify(row_parallel, row_parallel_rs_list_reversed, _RP_IN(), [S1, S0], [S0]))


def test_reduce_scatter_list_of_uneven_pieces_is_refused_clearly():
    with pytest.raises(CaptureError) as e:
        verify(row_parallel, row_parallel_rs_list_uneven, _RP_IN(), [S1, S0], [S0])
    msg = str(e.value)
    assert "dist.reduce_scatter(output, input_list)" in msg
    assert line_of(row_parallel_rs_list_uneven, "dist.reduce_scatter(") in msg and "(3, 5)" in msg


# ------------------------------------------------------------------------------------------------
# 3. all_to_all (list form), gather, scatter, object collectives


def transpose_shard(x):
    return x * 3


def all_to_all_list_rows_to_cols(x):
    # x: this rank's rows [4, 6] -> this rank's columns [8, 3]
    W = dist.get_world_size()
    ins = [c.contiguous() for c in (x * 3).chunk(W, dim=1)]
    outs = [torch.empty_like(ins[0]) for _ in range(W)]
    dist.all_to_all(outs, ins)
    return torch.cat(outs, dim=0)


def all_to_all_list_into_views(x):
    W = dist.get_world_size()
    out = torch.empty(x.shape[0] * W, x.shape[1] // W, dtype=x.dtype)
    dist.all_to_all(list(out.chunk(W, dim=0)), [c.contiguous() for c in torch.tensor_split(3 * x, W, dim=1)])
    return out


def all_to_all_list_flat_pieces(x):
    # entries of different shapes beyond dim 0 (flattened by the capture)
    W = dist.get_world_size()
    ins = [c.reshape(-1) for c in (x * 3).chunk(W, dim=1)]
    outs = [torch.empty(x.shape[0] * x.shape[1] // W, dtype=x.dtype) for _ in range(W)]
    dist.all_to_all(outs, ins)
    return torch.cat([o.view(x.shape[0], -1) for o in outs], dim=0)


def all_to_all_list_wrong_order(x):
    W = dist.get_world_size()
    ins = [c.contiguous() for c in (x * 3).chunk(W, dim=1)]
    outs = [torch.empty_like(ins[0]) for _ in range(W)]
    dist.all_to_all(outs, ins)
    return torch.cat(outs[::-1], dim=0)  # BUG: the pieces in reverse rank order


@pytest.mark.parametrize("rank_fn", [
    all_to_all_list_rows_to_cols, all_to_all_list_flat_pieces,
    pytest.param(all_to_all_list_into_views, marks=pytest.mark.xfail(strict=True, reason=(
        "writes into chunks of a preallocated buffer (slice_scatter over empty) are not normalized to a "
        "concatenation; all_gather(list(out.chunk(W)), x) has the same gap"))),
])
def test_all_to_all_list_form(rank_fn):
    proved(verify(transpose_shard, rank_fn, [rn(8, 6)], [S0], [S1]))


def test_all_to_all_list_in_the_wrong_order_is_refuted():
    refuted(verify(transpose_shard, all_to_all_list_wrong_order, [rn(8, 6)], [S0], [S1]))


def column_sum(x):
    return x.sum(0)


def gather_to_root_then_broadcast(x):
    y = x * 2
    if dist.get_rank() == 0:
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.gather(y, parts, dst=0)
        full = torch.cat(parts, dim=0)
    else:
        dist.gather(y, dst=0)
        full = torch.empty(y.shape[0] * dist.get_world_size(), y.shape[1], dtype=y.dtype)
    dist.broadcast(full, src=0)
    return full


def gather_to_root_forgets_broadcast(x):
    y = x * 2
    if dist.get_rank() == 0:
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.gather(y, parts, dst=0)
        return torch.cat(parts, dim=0)
    dist.gather(y, dst=0)
    return torch.cat([y, y], dim=0)  # BUG: the other ranks never receive the gathered tensor


def gather_sum_on_root(x):
    s = x.sum(0)
    if dist.get_rank() == 0:
        parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
        dist.gather(s, parts, dst=0)
        total = torch.stack(parts).sum(0)
    else:
        dist.gather(s, dst=0)
        total = torch.empty_like(s)
    dist.broadcast(total, src=0)
    return total


def test_gather_to_root():
    proved(verify(double, gather_to_root_then_broadcast, [rn(8, 3)], [S0], [R]))
    refuted(verify(double, gather_to_root_forgets_broadcast, [rn(8, 3)], [S0], [R]))


def test_gather_partial_sums_to_root():
    proved(verify(column_sum, gather_sum_on_root, [rn(8, 3)], [S0], [R]))


def scatter_from_root(x):
    out = torch.empty(x.shape[0] // dist.get_world_size(), x.shape[1], dtype=x.dtype)
    pieces = list(x.chunk(dist.get_world_size())) if dist.get_rank() == 0 else None
    dist.scatter(out, pieces, src=0)
    return out * 2


def scatter_from_root_reversed(x):
    out = torch.empty(4, 3, dtype=x.dtype)
    pieces = list(reversed(x.chunk(2))) if dist.get_rank() == 0 else None  # BUG: reversed
    dist.scatter(out, scatter_list=pieces, src=0)
    return out * 2


def test_scatter_from_root():
    proved(verify(double, scatter_from_root, [rn(8, 3)], [R], [S0]))
    refuted(verify(double, scatter_from_root_reversed, [rn(8, 3)], [R], [S0]))


def all_gather_object_count(x):
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, x.shape[0])
    return x.sum(0) / sum(counts)


def test_object_collectives_are_refused_clearly():
    with pytest.raises(CaptureError) as e:
        verify(feature_mean, all_gather_object_count, [rn(8, 3)], [S0], [R])
    msg = str(e.value)
    assert msg.startswith("rank 0 calls dist.all_gather_object")
    assert line_of(all_gather_object_count, "all_gather_object(") in msg
    assert "Exchange tensors instead" in msg
    assert e.value.rank == 0 and e.value.source.endswith(line_of(all_gather_object_count, "all_gather_object(").split(":")[1])


# ------------------------------------------------------------------------------------------------
# 4. A rank program that raises on valid inputs is refuted (the specification does not raise)


def embed(ids, table):
    return F.embedding(ids, table)


def vocab_parallel_embed(ids, table):
    """Megatron's VocabParallelEmbedding forward."""
    V = table.shape[0]
    start = dist.get_rank() * V
    mask = (ids < start) | (ids >= start + V)
    local = ids.clone() - start
    local[mask] = 0
    out = F.embedding(local, table)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def vocab_parallel_embed_no_offset(ids, table):
    V = table.shape[0]
    start = dist.get_rank() * V
    mask = (ids < start) | (ids >= start + V)
    local = ids.clone()  # BUG: the partition's start is not subtracted
    local[mask] = 0
    out = F.embedding(local, table)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def vocab_parallel_index_no_offset(ids, table):
    V = table.shape[0]
    start = dist.get_rank() * V
    mask = (ids < start) | (ids >= start + V)
    local = ids.masked_fill(mask, 0)  # BUG: the partition's start is not subtracted
    out = table[local].masked_fill(mask.unsqueeze(-1), 0.0)
    dist.all_reduce(out)
    return out


def _embed_in():
    return [torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(3)), rn(12, 4, seed=4)]


def test_vocab_parallel_embedding_is_proved():
    proved(verify(embed, vocab_parallel_embed, _embed_in(), [R, S0], [R]))


@pytest.mark.parametrize("rank_fn,line", [(vocab_parallel_embed_no_offset, "out = F.embedding(local, table)"),
                                          (vocab_parallel_index_no_offset, "out = table[local]")])
def test_rank_that_raises_on_valid_inputs_is_refuted(rank_fn, line):
    r = verify(embed, rank_fn, _embed_in(), [R, S0], [R])
    refuted(r)
    ce = r.counterexample
    assert ce is not None and ce.raised
    assert ce.raised.startswith("rank 1 raised IndexError")
    assert line_of(rank_fn, line) in ce.raised
    assert "sequential program runs" in str(ce)
    assert any(f.kind == "rank-raised" for f in r.findings)


def test_simulator_failures_do_not_refute():
    """Only the rank's own operator rejecting its values refutes: a call our simulator builds wrongly
    (shapes that never traced), a missing kernel, or a non-ATen target stays 'not simulated'."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from gg_notebook.concrete.simulate import _raised_by_operator
    from gg_notebook.ir.lower import lower

    table, ids = rn(6, 4), torch.tensor([[0, 5]])
    g = lower(make_fx(lambda t, i: t[i])(table, ids))
    node = next(n for n in g.nodes if n.op == "call")
    bad_ids = torch.tensor([[0, 9]])
    try:
        node.attrs.call([table, bad_ids])
    except IndexError as exc:
        assert _raised_by_operator(node, [table, bad_ids], exc)
    else:  # pragma: no cover
        raise AssertionError("indexing out of bounds did not raise")
    # the same error, but the arguments do not even have the traced shapes: our problem, not the user's
    wrong = rn(6, 4, 2)
    assert not _raised_by_operator(node, [wrong, bad_ids], IndexError("index 9 is out of bounds"))
    assert not _raised_by_operator(node, [table, bad_ids], NotImplementedError("no kernel"))
    assert not _raised_by_operator(node, [table, bad_ids], TypeError("bad call"))


# ------------------------------------------------------------------------------------------------
# 5. Boolean-mask indexing: a data-dependent shape, accepted where it is reduced at once
#    (capture/masked_select.py), refused with the masked-mean rewrite where its shape matters


def masked_mean_spec(loss, mask):
    # where, not loss * mask: x[mask] never reads the unselected elements (an inf there stays out)
    return torch.where(mask, loss, 0.0).sum() / mask.sum()


def masked_mean_bool_index(loss, mask):
    return loss[mask].mean()


def masked_mean_masked_select(loss, mask):
    return torch.masked_select(loss, mask).sum() / mask.sum()


def masked_mean_selected_returned(loss, mask):
    kept = loss[mask]
    return kept.sum() / kept.numel(), kept


def masked_mean_spec_two(loss, mask):
    return torch.where(mask, loss, 0.0).sum() / mask.sum(), loss


@pytest.mark.parametrize("rank_fn", [masked_mean_bool_index, masked_mean_masked_select])
def test_boolean_mask_indexing_reduced_at_once_is_proved(rank_fn):
    r = verify(masked_mean_spec, rank_fn, [rn(8), torch.rand(8) > 0.5], [R, R], [R])
    proved(r)


def test_boolean_mask_selection_used_by_shape_gets_the_masked_mean_rewrite():
    with pytest.raises(CaptureError) as e:
        verify(masked_mean_spec_two, masked_mean_selected_returned, [rn(8), torch.rand(8) > 0.5], [R, R], [R, R])
    msg = str(e.value)
    assert msg.startswith("rank 0: an operator whose result's shape depends on tensor values cannot be traced")
    assert "(x * mask).sum() / mask.sum()" in msg
    assert line_of(masked_mean_selected_returned, "loss[mask]") in msg


def test_boolean_mask_indexing_in_the_spec():
    r = verify(masked_mean_bool_index, masked_mean_spec, [rn(8), torch.rand(8) > 0.5], [R, R], [R])
    proved(r)
    with pytest.raises(CaptureError) as e:
        verify(masked_mean_selected_returned, masked_mean_spec_two, [rn(8), torch.rand(8) > 0.5], [R, R], [R, R])
    assert str(e.value).startswith("the sequential program: an operator whose result's shape depends")
    assert line_of(masked_mean_selected_returned, "loss[mask]") in str(e.value)


# ------------------------------------------------------------------------------------------------
# 6. Complex RoPE (Llama's apply_rotary_emb), heads or sequence sharded


def _freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    t = torch.arange(end, dtype=torch.float64)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def _reshape_for_broadcast(freqs_cis, x):
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def rope_llama(xq):
    """[batch, seq, heads, head_dim] -> same, rotated (Llama's apply_rotary_emb for one tensor)."""
    freqs_cis = _freqs_cis(xq.shape[-1], xq.shape[1])
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2)) if xq.dtype == torch.float32 \
        else torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
    freqs_cis = _reshape_for_broadcast(freqs_cis, xq_)
    return torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)


def rope_heads_index_none(xq):
    freqs_cis = _freqs_cis(xq.shape[-1], xq.shape[1])
    xq_ = torch.view_as_complex(xq.reshape(xq.shape[0], xq.shape[1], xq.shape[2], -1, 2))
    return torch.view_as_real(xq_ * freqs_cis[None, :, None, :]).flatten(3)


def rope_heads_unsqueeze_reshape(xq):
    freqs_cis = _freqs_cis(xq.shape[-1], xq.shape[1]).unsqueeze(0).unsqueeze(2)
    xq_ = torch.view_as_complex(xq.unflatten(-1, (-1, 2)))
    out = torch.view_as_real(xq_ * freqs_cis)
    return out.reshape(xq.shape)


def rope_seq_table_rows(xq):
    s = xq.shape[1]
    start = dist.get_rank() * s
    freqs_cis = _freqs_cis(xq.shape[-1], s * dist.get_world_size())[start:start + s]
    xq_ = torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
    return torch.view_as_real(xq_ * freqs_cis[None, :, None, :]).flatten(3)


def rope_seq_no_offset(xq):
    s = xq.shape[1]
    freqs_cis = _freqs_cis(xq.shape[-1], s)  # BUG: every rank rotates with positions 0..s-1
    xq_ = torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
    return torch.view_as_real(xq_ * freqs_cis[None, :, None, :]).flatten(3)


def rope_heads_conjugate(xq):
    freqs_cis = _freqs_cis(xq.shape[-1], xq.shape[1]).conj()  # BUG: rotates the other way
    xq_ = torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
    return torch.view_as_real(xq_ * freqs_cis[None, :, None, :]).flatten(3)


def _rope_in(dtype=torch.float64):
    return [rn(2, 8, 4, 8, seed=5, dtype=dtype)]


@pytest.mark.parametrize("rank_fn", [rope_llama, rope_heads_index_none, rope_heads_unsqueeze_reshape])
@pytest.mark.parametrize("exact", ["real", "bitwise"])
def test_complex_rope_heads_sharded(rank_fn, exact):
    proved(verify(rope_llama, rank_fn, _rope_in(), [S2], [S2], exact=exact))


def test_complex_rope_float32_heads_sharded():
    proved(verify(rope_llama, rope_llama, _rope_in(torch.float32), [S2], [S2]))


def test_complex_rope_sequence_sharded_table_rows():
    proved(verify(rope_llama, rope_seq_table_rows, _rope_in(), [S1], [S1]))
    proved(verify(rope_llama, rope_seq_table_rows, _rope_in(), [S1], [S1], exact="bitwise"))


@pytest.mark.parametrize("rank_fn,placement", [(rope_seq_no_offset, S1), (rope_heads_conjugate, S2)])
def test_complex_rope_bugs_are_refuted(rank_fn, placement):
    refuted(verify(rope_llama, rank_fn, _rope_in(), [placement], [placement]))


# ------------------------------------------------------------------------------------------------
# 7. SDPA with dropout_p=0 is deterministic


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)


def sdpa_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def _qkv():
    return [rn(2, 4, 8, 6, seed=s) for s in (6, 7, 8)]


def test_sdpa_without_dropout_is_not_random():
    from gg_notebook.ir.lower import _is_random

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert not _is_random(op, (None, None, None))  # dropout_p defaults to 0.0
    assert not _is_random(op, (None, None, None, 0.0, True))
    assert _is_random(op, (None, None, None, 0.1))
    assert _is_random(op, (None, None, None), {"dropout_p": 0.5})
    assert _is_random(torch.ops.aten.bernoulli.p, (None, 0.5))

    proved(verify(sdpa_causal, sdpa_causal, _qkv(), [S1, S1, S1], [S1]))
    # bitwise (no decomposition): a verdict, not a RandomOpError
    r = verify(sdpa_causal, sdpa_causal, _qkv(), [S1, S1, S1], [S1], exact="bitwise")
    assert r.status in (gg.Status.PROVED, gg.Status.UNKNOWN), str(r)
    with pytest.raises(gg.RandomOpError):
        verify(sdpa_dropout, sdpa_dropout, _qkv(), [S1, S1, S1], [S1])
