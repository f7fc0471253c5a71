"""Soundness regressions (issue #7): one small user-written program per defect class.

For every class there is a wrong program, which must never be PROVED, and its correct twin, which must
never be REFUTED; several spellings where cheap. Each test first establishes ground truth with the real
runner (LocalTensorMode, gloo where LocalTensorMode cannot run the program) on random and adversarial
inputs, so the test itself shows that the wrong twin really is wrong and the correct one really is right.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture.errors import CaptureError
from fuzz import ground_truth

# ----------------------------------------------------------------------------------------- harness


def _problem(seq, dist_fn, inputs, placements, world_size=2, expect=None):
    return gg.Problem(sequential=seq, distributed=dist_fn, inputs=inputs, placements=placements,
                      world_size=world_size, expect=expect or [gg.Replicate()])


def _truth(make, int_domain="ids", gloo="fallback"):
    p = make()
    return ground_truth.check(make, ground_truth.input_draws(p, 6, seed=0, int_domain=int_domain), gloo=gloo)


def check_pair(make_wrong, make_right, int_domain="ids", gloo="fallback"):
    """Ground truth first (the wrong twin differs, the right one agrees), then the verdicts."""
    wrong_gt = _truth(make_wrong, int_domain, gloo)
    assert wrong_gt.verdict in ("differs", "crash"), f"test bug: the wrong twin is not wrong ({wrong_gt})"
    right_gt = _truth(make_right, int_domain, gloo)
    assert right_gt.verdict == "agrees", f"test bug: the correct twin is not correct ({right_gt})"
    try:
        wrong = gg.verify(make_wrong())
    except (CaptureError, gg.ProblemError) as exc:  # a clear error naming rank and line is fine too
        assert "rank" in str(exc) or "program" in str(exc), exc
        wrong = None
    right = gg.verify(make_right())
    problems = []
    if wrong is not None and wrong.status is gg.Status.PROVED:
        problems.append(f"FALSE PROOF of the wrong program ({wrong_gt.detail} on draw {wrong_gt.draw})")
    if right.status is gg.Status.REFUTED:
        problems.append(f"FALSE REFUTATION of the correct program: {right.counterexample}")
    assert not problems, "; ".join(problems)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------ 1. a cast or rounding pushed through a partial sum


def seq_bf16(x, w):
    return (x @ w).to(torch.bfloat16)


def tp_bf16_reduce_in_bf16(x, w):  # WRONG: every rank rounds its partial sum, then bf16 partials are summed
    y = (x @ w).to(torch.bfloat16)
    dist.all_reduce(y)
    return y


def tp_bf16_reduce_then_cast(x, w):
    y = x @ w
    dist.all_reduce(y)
    return y.to(torch.bfloat16)


def seq_round(x, w):
    return torch.round(x @ w)


def tp_round_partials(x, w):  # WRONG: round(a) + round(b) != round(a + b)
    y = (x @ w).round()
    dist.all_reduce(y)
    return y


def tp_round_total(x, w):
    y = x @ w
    dist.all_reduce(y)
    return torch.round(y)


def seq_floor(x, w):
    return torch.div(x @ w, 1, rounding_mode="floor")


def tp_floor_partials(x, w):  # WRONG
    y = torch.div(x @ w, 1, rounding_mode="floor")
    dist.all_reduce(y)
    return y


def tp_floor_total(x, w):
    y = x @ w
    dist.all_reduce(y)
    return torch.div(y, 1, rounding_mode="floor")


def _row_parallel(seq, fn):
    return lambda: _problem(seq, fn, [_randn(4, 8, seed=1) * 3, _randn(8, 4, seed=2)], [gg.Shard(1), gg.Shard(0)])


def test_cast_before_reduction_bf16():
    check_pair(_row_parallel(seq_bf16, tp_bf16_reduce_in_bf16), _row_parallel(seq_bf16, tp_bf16_reduce_then_cast))


def test_rounding_before_reduction_round():
    check_pair(_row_parallel(seq_round, tp_round_partials), _row_parallel(seq_round, tp_round_total))


def test_rounding_before_reduction_floor_div():
    check_pair(_row_parallel(seq_floor, tp_floor_partials), _row_parallel(seq_floor, tp_floor_total))


# -------------------------------------------------------------------- 2. a scalar added to a partial sum


def seq_plus_one(x, w):
    return x @ w + 1.0


def tp_plus_one_before(x, w):  # WRONG: the constant is summed world_size times
    y = x @ w + 1.0
    dist.all_reduce(y)
    return y


def tp_plus_one_after(x, w):
    y = x @ w
    dist.all_reduce(y)
    return y + 1.0


def seq_shift(x):
    return x.sum(dim=0) - 0.5


def tp_shift_before(x):  # WRONG (another spelling: torch.sub on the local partial)
    s = torch.sub(x.sum(dim=0), 0.5)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return s


def tp_shift_after(x):
    s = x.sum(dim=0)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return torch.sub(s, 0.5)


def test_scalar_added_to_partial_sum():
    check_pair(_row_parallel(seq_plus_one, tp_plus_one_before), _row_parallel(seq_plus_one, tp_plus_one_after))


def test_scalar_subtracted_from_partial_sum():
    make = lambda fn: lambda: _problem(seq_shift, fn, [_randn(8, 3, seed=3)], [gg.Shard(0)])  # noqa: E731
    check_pair(make(tp_shift_before), make(tp_shift_after))


# ---------------------------------------------------------------------- 3. int and float literals conflated


def seq_count(ids):
    return (ids * 3).sum() + 1


def tp_count_float_literal(ids):  # WRONG: 1.0 turns the int64 count into a float32 tensor
    s = (ids * 3).sum()
    dist.all_reduce(s)
    return s + 1.0


def tp_count_int_literal(ids):
    s = (ids * 3).sum()
    dist.all_reduce(s)
    return s + 1


def tp_count_float_scale(ids):  # WRONG: 3.0 makes every product float32 (and the sum float32)
    s = (ids * 3.0).sum()
    dist.all_reduce(s)
    return s + 1


def test_int_vs_float_literal_added():
    ids = torch.randint(-20, 20, (8,), generator=torch.Generator().manual_seed(0))
    make = lambda fn: lambda: _problem(seq_count, fn, [ids], [gg.Shard(0)])  # noqa: E731
    check_pair(make(tp_count_float_literal), make(tp_count_int_literal))


def test_int_vs_float_literal_scaled():
    ids = torch.randint(-20, 20, (8,), generator=torch.Generator().manual_seed(0))
    make = lambda fn: lambda: _problem(seq_count, fn, [ids], [gg.Shard(0)])  # noqa: E731
    check_pair(make(tp_count_float_scale), make(tp_count_int_literal))


# -------------------------------------------------------------------------- 4. cross-entropy ignore_index


def seq_ce_none(logits, target):
    return F.cross_entropy(logits, target, reduction="none")  # ignore_index=-100: ignored tokens cost 0


def _vocab_parallel_ce(logits, target):
    part = logits.shape[-1]
    start = dist.get_rank() * part
    row_max = torch.max(logits, dim=-1)[0]
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = logits - row_max.unsqueeze(dim=-1)
    foreign = (target < start) | (target >= start + part)
    local_target = target.clone() - start
    local_target[foreign] = 0
    rows = torch.arange(start=0, end=shifted.size(0))
    picked = shifted[rows, local_target].clone()
    picked[foreign] = 0.0
    dist.all_reduce(picked)
    sum_exp = torch.exp(shifted).sum(dim=-1)
    dist.all_reduce(sum_exp)
    return torch.log(sum_exp) - picked


def tp_ce_megatron(logits, target):  # WRONG on -100 targets: they get log(sum exp) instead of 0
    return _vocab_parallel_ce(logits, target)


def tp_ce_masked(logits, target):
    loss = _vocab_parallel_ce(logits, target)
    return torch.where(target == -100, torch.zeros_like(loss), loss)


def seq_ce_mean(logits, target):
    return F.cross_entropy(logits, target, reduction="mean")


def _gathered_logits(logits):
    local = logits.t().contiguous()
    full = torch.empty(local.shape[0] * dist.get_world_size(), local.shape[1], dtype=local.dtype)
    dist.all_gather_into_tensor(full, local)
    return full.t()


def tp_ce_gathered_wrong_ignore(logits, target):  # WRONG: ignores class 0 instead of the -100 padding
    return F.cross_entropy(_gathered_logits(logits), target, ignore_index=0, reduction="mean")


def tp_ce_gathered(logits, target):
    return F.cross_entropy(_gathered_logits(logits), target, reduction="mean")


def _ce_inputs():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 8, (6,), generator=g)
    target[1], target[2] = -100, 0
    return [logits, target]


def test_cross_entropy_ignore_index_vocab_parallel():
    make = lambda fn: lambda: _problem(seq_ce_none, fn, _ce_inputs(), [gg.Shard(1), gg.Replicate()])  # noqa: E731
    check_pair(make(tp_ce_megatron), make(tp_ce_masked), int_domain="targets")


def test_cross_entropy_ignore_index_attribute():
    make = lambda fn: lambda: _problem(seq_ce_mean, fn, _ce_inputs(), [gg.Shard(1), gg.Replicate()])  # noqa: E731
    check_pair(make(tp_ce_gathered_wrong_ignore), make(tp_ce_gathered), int_domain="targets")


# ------------------------------------------------------------ 5. embedding backward: scale_grad_by_freq, padding


def seq_emb_freq(ids, weight, dout):
    out = F.embedding(ids, weight, scale_grad_by_freq=True)
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def seq_emb_pad(ids, weight, dout):
    out = F.embedding(ids, weight, padding_idx=0)
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def _local_lookup(ids, weight, **kw):
    part = weight.shape[0]
    start = dist.get_rank() * part
    foreign = (ids < start) | (ids >= start + part)
    table = torch.cat([weight, torch.zeros(1, weight.shape[1], dtype=weight.dtype)])  # row `part`: all zeros
    return F.embedding((ids - start).masked_fill(foreign, part), table, **kw), start


def tp_emb_freq_dropped(ids, weight, dout):  # WRONG: the gradient is not scaled by token frequency
    out, _ = _local_lookup(ids, weight)
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def tp_emb_freq(ids, weight, dout):
    out, _ = _local_lookup(ids, weight, scale_grad_by_freq=True)
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def tp_emb_pad_dropped(ids, weight, dout):  # WRONG: the padding row receives a gradient
    out, _ = _local_lookup(ids, weight)
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def tp_emb_pad(ids, weight, dout):
    out, start = _local_lookup(ids, weight)
    grad = torch.autograd.grad((out * dout).sum(), weight)[0]
    keep = (torch.arange(weight.shape[0]) + start) != 0  # global row 0 is the padding row
    return grad * keep.unsqueeze(-1).to(grad.dtype)


def tp_emb_freq_megatron(ids, weight, dout):  # WRONG: foreign ids redirected to row 0 inflate its count
    part = weight.shape[0]
    start = dist.get_rank() * part
    mask = (ids < start) | (ids >= start + part)
    local = ids.clone() - start
    local[mask] = 0
    out = F.embedding(local, weight, scale_grad_by_freq=True)
    out[mask, :] = 0.0
    return torch.autograd.grad((out * dout).sum(), weight)[0]


def _emb_inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 8, (2, 6), generator=g)
    ids[0, :3] = 5
    ids[1, 0] = 0
    weight = torch.randn(8, 3, generator=g, dtype=torch.float64).requires_grad_()
    dout = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    return [ids, weight, dout]


def _emb(seq, fn):
    return lambda: _problem(seq, fn, _emb_inputs(), [gg.Replicate(), gg.Shard(0), gg.Replicate()],
                            expect=[gg.Shard(0)])


def test_embedding_backward_scale_grad_by_freq():
    check_pair(_emb(seq_emb_freq, tp_emb_freq_dropped), _emb(seq_emb_freq, tp_emb_freq))


def test_embedding_backward_scale_grad_by_freq_megatron_redirect():
    check_pair(_emb(seq_emb_freq, tp_emb_freq_megatron), _emb(seq_emb_freq, tp_emb_freq))


def test_embedding_backward_padding_idx():
    check_pair(_emb(seq_emb_pad, tp_emb_pad_dropped), _emb(seq_emb_pad, tp_emb_pad))


# ------------------------------------------------------------- 6. two process groups over the same ranks


def seq_mlp(x, w1, w2):
    return torch.tanh(x @ w1) @ w2


def tp_mlp_subgroups(x, w1, w2):  # WRONG at 4 ranks: each pair of ranks reduces only its own partial sums
    group, _ = dist.new_subgroups(2)
    y = torch.tanh(x @ w1) @ w2
    dist.all_reduce(y, group=group)
    return y


def tp_mlp_second_group(x, w1, w2):
    tp_group = dist.new_group(list(range(dist.get_world_size())))  # a second group over every rank
    y = torch.tanh(x @ w1) @ w2
    dist.all_reduce(y, group=tp_group)
    return y


def tp_mlp_second_group_kw(x, w1, w2):
    tp_group = dist.new_group(ranks=[r for r in range(dist.get_world_size())])
    y = torch.tanh(x @ w1) @ w2
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=tp_group)
    return y


def _mlp(fn):
    return lambda: _problem(seq_mlp, fn, [_randn(3, 4, seed=6), _randn(4, 8, seed=7), _randn(8, 4, seed=8)],
                            [gg.Replicate(), gg.Shard(1), gg.Shard(0)], world_size=4)


def test_process_group_subgroup_vs_world():
    check_pair(_mlp(tp_mlp_subgroups), _mlp(tp_mlp_second_group))


def test_process_group_second_group_keyword_spelling():
    check_pair(_mlp(tp_mlp_subgroups), _mlp(tp_mlp_second_group_kw))


# ------------------------------------------------------- 7. module-level state that differs per process

_CALLS = [0]  # how many times next_rank() ran in this process
_RANK = [None]  # this process's rank, once looked up


def next_rank():
    """WRONG idea: hand out ranks in call order. Every process calls it once, so every rank gets 0."""
    r = _CALLS[0] % dist.get_world_size()
    _CALLS[0] += 1
    return r


def cached_rank():
    if _RANK[0] is None:
        _RANK[0] = dist.get_rank()
    return _RANK[0]


def seq_lookup(ids, weight):
    return F.embedding(ids, weight)


def _vocab_embedding(ids, weight, rank):
    part = weight.shape[0]
    start = rank * part
    mask = (ids < start) | (ids >= start + part)
    local = ids.clone() - start
    local[mask] = 0
    out = F.embedding(local, weight)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def tp_lookup_counter(ids, weight):
    return _vocab_embedding(ids, weight, next_rank())


def tp_lookup_cached(ids, weight):
    return _vocab_embedding(ids, weight, cached_rank())


def _lookup(fn):
    def make():
        _CALLS[0], _RANK[0] = 0, None  # a fresh process: module state starts over
        g = torch.Generator().manual_seed(9)
        return _problem(seq_lookup, fn, [torch.randint(0, 8, (2, 5), generator=g),
                                         torch.randn(8, 3, generator=g, dtype=torch.float64)],
                        [gg.Replicate(), gg.Shard(0)])
    return make


def test_module_state_rank_counter_and_cached_rank():
    check_pair(_lookup(tp_lookup_counter), _lookup(tp_lookup_cached), gloo="sample")


# --------------------------------- 8. (found by the fuzzer) a collective's output buffer of the wrong shape


def seq_double(x):
    return x * 2


def tp_gather_bad_buffer(x):  # WRONG: the buffer is sized from the wrong dim; real all_gather raises
    y = x * 2
    full = torch.empty((y.shape[1] * dist.get_world_size(), *y.shape[1:]), dtype=y.dtype)
    dist.all_gather_into_tensor(full, y)
    return full


def tp_gather_buffer(x):
    y = x * 2
    full = torch.empty((y.shape[0] * dist.get_world_size(), *y.shape[1:]), dtype=y.dtype)
    dist.all_gather_into_tensor(full, y)
    return full


def test_all_gather_output_buffer_shape():
    make = lambda fn: lambda: _problem(seq_double, fn, [_randn(8, 3, seed=10)], [gg.Shard(0)])  # noqa: E731
    check_pair(make(tp_gather_bad_buffer), make(tp_gather_buffer))


# ------------------------- 9. a division by a signed zero (infinite values: no factor, no crash)


def seq_div_negzero(x):
    return x / torch.full_like(x, -0.0)


def tp_div_poszero(x):  # WRONG: x / +0.0 has the opposite infinities
    y = x / torch.full_like(x, 0.0)
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return torch.cat(out)


def tp_div_negzero(x):
    y = torch.div(x, torch.zeros_like(x).neg())
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return torch.cat(out)


def test_division_by_signed_zero():
    make = lambda fn: lambda: _problem(seq_div_negzero, fn, [_randn(6, 3, seed=11)], [gg.Shard(0)])  # noqa: E731
    check_pair(make(tp_div_poszero), make(tp_div_negzero))
    wrong = gg.verify(make(tp_div_poszero)())
    assert wrong.status is gg.Status.REFUTED and wrong.counterexample is not None
