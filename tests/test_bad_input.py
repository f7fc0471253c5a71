"""Bad input through `gg.verify`: a clear message naming the input, rank, operator and line, never a crash.

Errors in the user's problem raise `ProblemError` (malformed `Problem`) or `CaptureError` (a program
that cannot be traced, or ranks that do not line up); operators the engine cannot relate give
``unknown`` with a culprit; gg_notebook's own failures raise `VerificationError`. After every error
a valid problem still verifies in the same process. (tests/test_capture.py covers capture_problem
itself; these go through the public entry point.)
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.capture import CaptureError
from gg_notebook.problem import ProblemError
from gg_notebook.result import VerificationError

HERE = "test_bad_input.py"


def line_of(fn, text):
    """'test_bad_input.py:N' of the first line of fn containing text."""
    lines, start = inspect.getsourcelines(fn)
    for i, line in enumerate(lines):
        if text in line:
            return f"{HERE}:{start + i}"
    raise AssertionError(text)


# ------------------------------------------------------------------------------------ a valid problem


def seq_mm(x, w):
    return x @ w


def dist_mm(x, w):
    y = x @ w
    dist.all_reduce(y)
    return y


def mm_problem(distributed=dist_mm, placements=(gg.Shard(1), gg.Shard(0)), inputs=None, expect=(gg.Replicate(),),
               sequential=seq_mm, world_size=2):
    inputs = (torch.randn(2, 4), torch.randn(4, 6)) if inputs is None else inputs
    return gg.Problem(sequential, distributed, inputs, placements, world_size, expect=expect)


def assert_still_works():
    """After an error: no process group left behind and a valid problem still verifies."""
    assert not dist.is_initialized()
    result = gg.verify(mm_problem())
    assert result.status is gg.Status.PROVED, str(result)


def problem_error(problem) -> str:
    with pytest.raises(ProblemError) as ei:
        gg.verify(problem)
    assert_still_works()
    return str(ei.value)


# ------------------------------------------------------------------------------------ inputs and placements


def test_wrong_number_of_placements():
    msg = problem_error(mm_problem(placements=(gg.Shard(1),)))
    assert "2 inputs but 1 placements" in msg
    assert "one placement per input" in msg and "x, w" in msg


def test_wrong_number_of_inputs():
    msg = problem_error(mm_problem(inputs=(torch.randn(2, 4),)))
    assert "1 inputs but 2 placements" in msg and "one placement per input" in msg
    # as many inputs as placements, but not as many as the functions take
    p = mm_problem(inputs=(torch.randn(2, 4),), placements=(gg.Shard(1),))
    msg = problem_error(p)
    assert "sequential function seq_mm(x, w) takes 2 positional arguments but 1 inputs were given" in msg
    assert "one input tensor" in msg


def test_shard_dim_out_of_range():
    msg = problem_error(mm_problem(placements=(gg.Shard(1), gg.Shard(2))))
    assert "input 1 (w)" in msg and "shape (4, 6)" in msg and "Shard(2)" in msg
    assert "shard dim must be in [0, 1]" in msg
    msg = problem_error(mm_problem(inputs=(torch.randn(2, 4), torch.tensor(3.0)), sequential=lambda x, w: x * w,
                                   distributed=lambda x, w: x * w, placements=(gg.Shard(1), gg.Shard(0)), expect=None))
    assert "input 1 (w) is a 0-dim tensor" in msg and "Replicate()" in msg


def test_shard_dim_not_divisible_by_world_size():
    p = mm_problem(inputs=(torch.randn(2, 3), torch.randn(3, 6)))
    msg = problem_error(p)
    assert "input 0 (x) has size 3 along dim 1" in msg and "not divisible by world_size=2" in msg
    assert "pad the input or pick another shard dim" in msg


# ------------------------------------------------------------------------------------ programs that fail to trace


def dist_mm_fails_on_rank1(x, w):
    y = x @ w
    if dist.get_rank() == 1:
        y = y.view(5, -1)  # rank 1's bug
    dist.all_reduce(y)
    return y


def test_rank_raises_names_rank_and_line():
    with pytest.raises(CaptureError) as ei:
        gg.verify(mm_problem(distributed=dist_mm_fails_on_rank1))
    e, where = ei.value, line_of(dist_mm_fails_on_rank1, "view(5")
    assert e.rank == 1 and e.source.endswith(where)
    msg = str(e)
    assert msg.startswith(f"rank 1 raised RuntimeError at") and where in msg and "y.view(5, -1)" in msg
    assert "Fix the per-rank function" in msg and "rank 1's local inputs" in msg
    assert_still_works()


def seq_branch_on_values(x, w):
    y = x @ w
    if y.max().item() > 0:
        y = y * 2
    return y


def test_data_dependent_control_flow_in_the_sequential_program():
    with pytest.raises(CaptureError) as ei:
        gg.verify(mm_problem(sequential=seq_branch_on_values))
    e, where = ei.value, line_of(seq_branch_on_values, ".item()")
    assert e.rank is None
    msg = str(e)
    assert msg.startswith("the sequential program: control flow that depends on tensor values cannot be traced")
    assert where in msg and "torch.where" in msg
    assert_still_works()


# ------------------------------------------------------------------------------------ layouts


def flipped_columns(g, rank, world_size):
    piece = torch.chunk(g, world_size, 1)[rank]
    return torch.flip(piece, [1])  # computes: not a clean layout


def first_columns_only(g, rank, world_size):
    return g[:, :2]  # every rank holds the same half: the other half is on no rank


def test_unclean_layout():
    msg = problem_error(mm_problem(placements=(gg.Layout(flipped_columns), gg.Shard(0))))
    assert "input 0 (x)" in msg and "aten.flip.default" in msg and "rank 0" in msg
    assert line_of(flipped_columns, "torch.flip") in msg
    assert "a Layout may only index, slice, cat, split, reshape or transpose" in msg
    msg = problem_error(mm_problem(placements=(gg.Layout(first_columns_only), gg.Shard(0))))
    assert "input 0 (x)" in msg and "do not cover the global tensor" in msg and "element (0, 2)" in msg
    assert "must give every element of the global tensor to some rank" in msg


# ------------------------------------------------------------------------------------ ranks that disagree


def dist_mm_extra_output_on_rank0(x, w):
    y = dist_mm(x, w)
    if dist.get_rank() == 0:
        return y, y.sum()
    return y


def test_output_counts_differ_across_ranks():
    with pytest.raises(CaptureError) as ei:
        gg.verify(mm_problem(distributed=dist_mm_extra_output_on_rank0))
    assert ei.value.rank == 1
    msg = str(ei.value)
    assert "rank 1 returns 1 outputs but rank 0 returns 2" in msg
    assert "every rank must return the same number of tensors" in msg
    assert_still_works()


def dist_mm_reduce_ops_differ(x, w):
    y = x @ w
    if dist.get_rank() == 0:
        dist.all_reduce(y)
    else:
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def test_collectives_do_not_line_up():
    with pytest.raises(CaptureError) as ei:
        gg.verify(mm_problem(distributed=dist_mm_reduce_ops_differ))
    e = ei.value
    sum_line = line_of(dist_mm_reduce_ops_differ, "dist.all_reduce(y)")
    max_line = line_of(dist_mm_reduce_ops_differ, "ReduceOp.MAX")
    assert e.rank == 1 and e.source.endswith(max_line)
    msg = str(e)
    assert f"rank 1 calls all_reduce(max) at" in msg and max_line in msg
    assert "where rank 0 calls all_reduce(sum) at" in msg and sum_line in msg
    assert "collective #0 on the default group (ranks 0, 1)" in msg and "must line up" in msg
    assert_still_works()


# ------------------------------------------------------------------------------------ unknown, never a crash


def seq_erfcx(x):
    return torch.special.erfcx(x)


def dist_erfcx_by_hand(x):
    return torch.exp(x * x) * torch.erfc(x)  # the same function, spelled differently


def seq_cumsum(x):
    return torch.cumsum(x, 1)


def seq_sort(x):
    return torch.sort(x, dim=1).values


@pytest.mark.parametrize("seq,distributed,op,marker,status", [
    # correct, spelled differently: the numbers agree, so the verdict stays unknown (a lemma is missing)
    (seq_erfcx, dist_erfcx_by_hand, "aten.special_erfcx.default", "torch.special.erfcx", gg.Status.UNKNOWN),
    # along the sharded dim, per-rank cumsums / sorts are wrong: refuted by concrete execution
    (seq_cumsum, seq_cumsum, "aten.cumsum.default", "torch.cumsum", gg.Status.REFUTED),
    (seq_sort, seq_sort, "aten.sort.default", "torch.sort", gg.Status.REFUTED),
])
def test_operator_without_lemmas_is_never_a_crash(seq, distributed, op, marker, status):
    problem = gg.Problem(seq, distributed, (torch.randn(2, 4),), (gg.Shard(1),), 2, expect=(gg.Shard(1),))
    static = gg.verify(problem, concrete=False)
    assert static.status is gg.Status.UNKNOWN, str(static)
    assert f"unknown: stuck at {op}" in static.headline()
    assert "no lemma" in static.culprit.detail
    result = gg.verify(problem)
    assert result.status is status, str(result)
    c = result.culprit
    assert c is not None and c.op == op
    assert c.source.endswith(line_of(seq, marker))
    assert not result.relations[0].ok
    if status is gg.Status.UNKNOWN:
        assert any(f.kind == "numbers-agree" and "lemma is missing" in f.message for f in result.findings)
    else:
        assert result.counterexample is not None and result.counterexample.max_error > 0
    assert_still_works()


def seq_double(x):
    return x * 2


def test_expected_shard_on_a_replicated_output_is_refuted_not_a_crash():
    result = gg.verify(gg.Problem(seq_double, seq_double, (torch.randn(2, 4),), (gg.Replicate(),), 2,
                                  expect=(gg.Shard(0),)))
    # the ranks' outputs cannot be concatenated into the sequential output: a concrete counterexample
    assert result.status is gg.Status.REFUTED, str(result)
    assert "has shape (2, 4)" in str(result.counterexample) and "(4, 4)" in str(result.counterexample)
    c = result.culprit
    assert c.op == "aten.mul.Tensor" and c.source.endswith(line_of(seq_double, "x * 2"))
    rel = result.relations[0]
    assert not rel.ok and rel.expected == "Shard(0)"
    assert "expect[0] = Shard(0) needs concat(" in rel.detail and "expect[0] = Shard(0)" in c.detail
    assert_still_works()


def dist_double_rows_by_rank(x):
    return (x * 2)[: 1 + dist.get_rank()]  # rank r returns r + 1 rows


@pytest.mark.parametrize("expect", [gg.Shard(1), gg.Partial()])
def test_rank_output_shapes_that_cannot_combine_are_refuted_not_a_crash(expect):
    result = gg.verify(gg.Problem(seq_double, dist_double_rows_by_rank, (torch.randn(2, 4),), (gg.Replicate(),), 2,
                                  expect=(expect,)))
    assert result.status is gg.Status.REFUTED, str(result)
    c = result.culprit
    assert c.op == "aten.mul.Tensor" and c.source.endswith(line_of(seq_double, "x * 2"))
    detail = result.relations[0].detail
    assert "the ranks return shapes [(1, 4), (2, 4)]" in detail and str(expect).split("(")[0] in detail
    assert_still_works()


# ------------------------------------------------------------------------------------ malformed expect


def seq_two_outputs(x):
    return x * 2, (x * 2).sum()


def test_expect_count_must_match_outputs():
    def problem(expect):
        return gg.Problem(seq_two_outputs, seq_two_outputs, (torch.randn(2, 4),), (gg.Replicate(),), 2, expect=expect)

    msg = problem_error(problem((gg.Replicate(),) * 3))
    assert "expect has 3 placements but the sequential program returns 2 outputs" in msg
    assert "(2, 4)" in msg and "one placement per output" in msg and "expect=None" in msg
    msg = problem_error(problem((gg.Replicate(),)))
    assert "expect has 1 placements but the sequential program returns 2 outputs" in msg


def test_expect_shard_dim_out_of_range():
    def problem(expect):
        return gg.Problem(seq_two_outputs, seq_two_outputs, (torch.randn(2, 4),), (gg.Replicate(),), 2, expect=expect)

    msg = problem_error(problem((gg.Shard(2), gg.Replicate())))
    assert "expect[0] is Shard(2) but output 0" in msg and "has shape (2, 4)" in msg
    assert line_of(seq_two_outputs, "return x * 2") in msg and "shard dim must be in [0, 1]" in msg
    msg = problem_error(problem((gg.Replicate(), gg.Shard(0))))
    assert "expect[1] is Shard(0) but output 1" in msg and "0-dim tensor" in msg and "Partial()" in msg


# ------------------------------------------------------------------------------------ gg_notebook's own failures


def test_internal_failure_names_stage_op_and_line(monkeypatch):
    from gg_notebook.engine.infer import Engine

    real = Engine.infer

    def broken(self, n):
        if n.target == "aten.mm.default":
            raise KeyError("boom")
        return real(self, n)

    monkeypatch.setattr(Engine, "infer", broken)
    with pytest.raises(VerificationError) as ei:
        gg.verify(mm_problem())
    e = ei.value
    assert isinstance(e, ValueError) and e.stage == "inferring" and e.op == "aten.mm.default"
    assert e.source.endswith(line_of(seq_mm, "x @ w"))
    msg = str(e)
    assert msg.startswith("gg_notebook failed while inferring the sequential program at aten.mm.default (mm)")
    assert line_of(seq_mm, "x @ w") in msg and "KeyError" in msg and "boom" in msg
    assert "gg_notebook limitation" in msg and "report" in msg
    monkeypatch.undo()
    assert_still_works()


def test_lowering_failure_names_rank(monkeypatch):
    import importlib

    from gg_notebook.ir.lower import LoweringError

    V = importlib.import_module("gg_notebook.verify")  # the module (gg_notebook.verify is also the function)

    real = V.lower

    def broken(gm, rank, *policy):
        if rank == 1:
            raise LoweringError("could not lower aten.foo (foo) at model.py:3: nope")
        return real(gm, rank, *policy)

    monkeypatch.setattr(V, "lower", broken)
    with pytest.raises(VerificationError) as ei:
        gg.verify(mm_problem())
    e = ei.value
    assert e.stage == "lowering" and e.rank == 1
    msg = str(e)
    assert msg.startswith("gg_notebook failed while lowering rank 1's program: LoweringError: could not lower aten.foo")
    assert "gg_notebook limitation" in msg
    monkeypatch.undo()
    assert_still_works()


# ------------------------------------------------------------------ collectives with wrong buffers (fuzz finds)
def _rs_problem(rows_of_output):
    import torch.distributed as dist

    def seq(x, w):
        return torch.relu(x) @ w

    def dist_fn(x, w):
        y = torch.relu(x) @ w
        out = torch.empty(rows_of_output(y, dist.get_world_size()), y.shape[1], dtype=y.dtype)
        dist.reduce_scatter_tensor(out, y.contiguous())
        return out

    g = torch.Generator().manual_seed(0)
    return gg.Problem(seq, dist_fn, [torch.randn(8, 8, generator=g, dtype=torch.float64),
                                     torch.randn(8, 3, generator=g, dtype=torch.float64)],
                      [gg.Shard(1), gg.Shard(0)], 4, expect=[gg.Shard(0)])


def test_reduce_scatter_into_an_empty_buffer_is_a_clear_error():
    # 3 // 4 == 0 rows (found by the soundness fuzzer: the engine used to loop on the empty pieces;
    # gloo aborts with "outputShape[0] * worldSize == inputShape[0]")
    with pytest.raises(CaptureError, match=r"output of shape \(0, 3\).*shape \(2, 3\)"):
        gg.verify(_rs_problem(lambda y, w: y.shape[1] // w))


def test_tiling_ignores_empty_pieces():
    from gg_notebook.engine.index import DIndex
    from gg_notebook.relations.expr import ExprStore

    S = ExprStore()
    idx = DIndex.__new__(DIndex)
    x = S.atom("x", (8, 3), torch.float64)
    idx.slices_of = {x.id: [(0, 0, 0, object()), (0, 0, 0, object())]}  # two empty slices at row 0
    assert idx.tiling(x) == []  # terminates: nothing to tile


def test_reduce_scatter_into_a_wrong_sized_buffer_names_rank_and_line():
    with pytest.raises(CaptureError, match=r"rank \d calls reduce_scatter_tensor.*test_bad_input.py:\d+.*output of shape \(3, 3\).*input of shape \(8, 3\).*shape \(2, 3\)"):
        gg.verify(_rs_problem(lambda y, w: 3))


def test_list_all_gather_with_more_outputs_than_ranks_names_the_group():
    import torch.distributed as dist

    def seq(x):
        return x * 2

    def dist_fn(x):
        group = dist.new_group([dist.get_rank()])  # a group of one rank
        outs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(outs, x * 2, group=group)
        return outs[0]

    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises((CaptureError, gg.ProblemError), match=r"rank|group"):
        gg.verify(gg.Problem(seq, dist_fn, [x], [gg.Replicate()], 2, expect=[gg.Replicate()]))


@pytest.mark.parametrize("capture", ["inprocess", "processes"])
def test_a_failing_operator_is_reported_once_not_as_a_torch_log_traceback(capture, capfd):
    import logging

    def seq(x):
        return x + 1

    def rank_fn(x):
        return x + torch.ones(7)  # does not broadcast

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    keep = Keep()
    logger.addHandler(keep)
    try:
        with pytest.raises(CaptureError, match=r"rank 0 raised RuntimeError at .*test_bad_input.py:\d+.*broadcast"):
            gg.verify(gg.Problem(seq, rank_fn, [torch.randn(3)], [gg.Replicate()], 2, expect=[gg.Replicate()]),
                      capture=capture)
    finally:
        logger.removeHandler(keep)
    err = capfd.readouterr().err
    assert not records, [r.getMessage() for r in records]
    assert "failed while attempting to run meta" not in err, err[-2000:]


def _gather_wrong_list(x):
    y = x * 2
    lst = [torch.empty(3, dtype=x.dtype) for _ in range(2)] if dist.get_rank() == 0 else None
    dist.gather(y, lst, dst=0)
    return y


def _scatter_wrong_list(x):
    out = torch.empty_like(x)
    lst = [x, x[:1]] if dist.get_rank() == 0 else None
    dist.scatter(out, lst, src=0)
    return out * 2


@pytest.mark.parametrize("fn,words", [
    (_gather_wrong_list, ("dist.gather(tensor, gather_list, dst)", "gather_list holds 2 tensors of shapes [(3,), (3,)]",
                          "on the destination pass 2 tensors")),
    (_scatter_wrong_list, ("dist.scatter(tensor, scatter_list, src)", "scatter_list holds 2 tensors of shapes [(2,), (1,)]",
                           "on the source pass 2 tensors")),
])
def test_gather_and_scatter_lists_of_the_wrong_shape(fn, words):
    p = gg.Problem(sequential=lambda x: x * 2, distributed=fn, inputs=[torch.randn(4)], placements=[gg.Shard(0)],
                   world_size=2, expect=[gg.Shard(0)])
    with pytest.raises(CaptureError) as e:
        gg.verify(p)
    msg = str(e.value)
    assert "rank 0" in msg and "test_bad_input.py" in msg and all(w in msg for w in words), msg
