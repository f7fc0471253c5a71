"""The GPT example with Megatron sequence parallelism (``examples.gpt.make(sequence_parallel=True)``).

TP + SP: activations split along the sequence between the tensor-parallel regions, LayerNorms on the
local block, all-gather into the column-parallel linears (reduce-scatter in backward), reduce-scatter
out of the row-parallel ones (all-gather in backward), the final LayerNorm's output gathered before the
LM head. Proved at small real shapes (TP 2 and 4, forward and forward+backward) and on meta tensors;
realistic SP bugs refuted at their line. Shapes are tiny: capture dominates the time.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.examples import gpt as G
from gg_notebook.examples import gpt_block as B
from gg_notebook.runners.compare import compare
from gg_notebook.examples._tp import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from gg_notebook.examples.vocab_embedding import vocab_parallel_embedding

SMALL = dict(hidden=8, heads=4, vocab=16, seq=8, ffn=16)


def _proved(problem):
    r = gg.verify(problem)
    assert r.status is gg.Status.PROVED and not r.assumptions, str(r)
    assert all(rel.ok for rel in r.relations)
    return r


@pytest.mark.parametrize("world_size,backward,layers", [(2, False, 2), (4, True, 1)],
                         ids=["tp2-fwd-2layers", "tp4-fwd_bwd-1layer"])
def test_gpt_sequence_parallel_proved(world_size, backward, layers):
    # batch 1 (a frontier micro-batch: the [batch, seq, hidden] blocks are then plain views)
    problem = G.make(world_size, backward=backward, layers=layers, batch=1, sequence_parallel=True, **SMALL)
    assert problem.name == ("gpt_sp_fwd_bwd" if backward else "gpt_sp")
    r = _proved(problem)
    assert r.stats["capture"]["traced"] == 1  # capture once: the SP rank programs differ in numbers only


def test_gpt_sequence_parallel_partial_layernorm_grads_proved():
    # the finalize all-reduce left out: the LayerNorm / row-parallel-bias gradients are declared Partial()
    problem = G.make(2, backward=True, batch=2, sequence_parallel=True, reduce_sp_grads=False, **SMALL)
    names = problem.input_names[2:]
    grads = dict(zip(names, problem.expect[1:]))
    assert isinstance(grads["layers.0.ln1_w"], gg.Partial) and isinstance(grads["lnf_b"], gg.Partial)
    assert isinstance(grads["layers.0.b2"], gg.Partial) and isinstance(grads["wpe"], gg.Replicate)
    assert isinstance(grads["layers.0.w1"], gg.Shard)
    _proved(problem)


def test_gpt_block_sequence_parallel_forward_proved():
    _proved(B.make(2, sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16))


def test_sequence_parallel_variants_compute_the_sequential_values():
    # numerically (simulated ranks, float64): the SP programs are right (what the engine must prove)
    for problem in (G.make(2, backward=True, batch=1, sequence_parallel=True, sp_embedding="reduce_scatter", **SMALL),
                    B.make_fwd_bwd(2, sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16)):
        ok, msg = compare(problem)
        assert ok, msg


def test_sequence_parallel_gpt_on_meta_tensors_proved():
    # a moderately large shape on meta tensors (nothing allocated): TP 8, batch 1 (a frontier micro-batch);
    # over validate's element budget, so the proof stands without the full-size re-check
    r = _proved(G.make(8, backward=True, layers=1, hidden=1024, heads=16, ffn=4096, vocab=8192, seq=512, batch=1,
                       device="meta", sequence_parallel=True))
    assert r.stats["capture"]["traced"] == 1


# --------------------------------------------------------------------------------------------- bugs
def _refuted_at(problem, spec):
    r = gg.verify(problem)
    assert r.status is gg.Status.REFUTED, str(r)
    assert r.counterexample is not None and r.counterexample.max_error > 0
    assert r.culprit is not None and r.culprit.op.startswith(spec.culprit_op + "."), (r.culprit, spec)
    want = E.marker_line(problem.sequential, spec.culprit_marker)
    got_file, got_line = r.culprit.source.rsplit(":", 1)
    want_file, want_line = want.rsplit(":", 1)
    assert got_line == want_line and want_file.endswith(got_file.split("/")[-1]), (r.culprit.source, want)
    return r


def test_reduce_scatter_as_allreduce_and_wrong_block_refuted():
    # rank r keeps block r-1 of the all-reduced attention output (rank 0: Python's index -1)
    _refuted_at(B.make(2, bug="allreduce_wrong_chunk", sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16),
                B.SP_FWD_BUGS["allreduce_wrong_chunk"])


@pytest.mark.parametrize("bug,world_size", [("split_grad_of_gather", 2), ("unreduced_layernorm_grads", 2)])
def test_sequence_parallel_backward_bug_refuted(bug, world_size):
    r = _refuted_at(G.make(world_size, bug=bug, backward=True, sequence_parallel=True, **SMALL),
                    G.SP_FWD_BWD_BUGS[bug])
    if bug == "unreduced_layernorm_grads":
        assert "all-reduce missing" in r.culprit.detail  # the ranks hold partial sums of a replicated gradient


def test_unknown_sequence_parallel_bug_is_rejected():
    with pytest.raises(ValueError, match="allreduce_wrong_chunk"):
        G.make(2, bug="missing_allreduce", sequence_parallel=True)
    with pytest.raises(ValueError, match="multiple of world_size"):
        G.make(4, sequence_parallel=True, seq=6)


# ------------------------------------------------------------------------- products with ones
def test_gpt_block_sequence_parallel_forward_backward():
    # the gradient of (out * dout).sum() is ones * dout, all-gathered on the ranks (the backward of the
    # reduce-scatter) where the sequential w2 gradient's mm reads dout's blocks: x * ones is data movement
    # (relations/movement.py, tests/test_unit_products.py); verify's greedy pass and the exhaustive search
    # (a ProofSession's steps) both prove it
    _proved(B.make_fwd_bwd(2, sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16))
    r = gg.verify(B.make_fwd_bwd(2, sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16), greedy=False)
    assert r.status is gg.Status.PROVED, str(r)


@pytest.mark.parametrize("bug", sorted(B.SP_FWD_BWD_BUGS))
def test_gpt_block_sequence_parallel_forward_backward_bug_refuted(bug):
    r = gg.verify(B.make_fwd_bwd(2, bug, sequence_parallel=True, seq=4, hidden=8, heads=2, ffn=16))
    assert r.status is gg.Status.REFUTED, str(r)


def _gathered(d):
    return gather_from_sequence_parallel_region(d, 0)


_ONES_SPELLINGS = {
    "ones_like_times": lambda d: torch.ones_like(d) * d,
    "times_ones": lambda d: d * torch.ones(d.shape, dtype=d.dtype),
    "mul_full": lambda d: torch.mul(torch.full_like(d, 1.0), d),
}


@pytest.mark.parametrize("spelling", sorted(_ONES_SPELLINGS))
def test_all_gather_of_a_product_with_ones(spelling):
    # the gpt_block SP backward's shape: each rank all-gathers `ones * d` (the gradient of a sum), the
    # sequential value is `ones * d`; the judge compares the ranks' output with the relation found by
    # the scalar normal form, block by block
    f = _ONES_SPELLINGS[spelling]

    def seq(d):
        return f(d) + 0

    def ranks(d):
        return _gathered(f(d)) + 0

    d = torch.randn(8, 2, 4, dtype=torch.float64)
    _proved(gg.Problem(seq, ranks, [d], [gg.Shard(0)], 2, expect=[gg.Replicate()]))


@pytest.mark.parametrize("bug", ["twice", "plus_one", "own_block_only"])
def test_all_gather_of_a_product_with_ones_bug_not_proved(bug):
    # the same, wrong: a factor of 2 on the ranks, ones added instead of multiplied, each rank's own block
    # repeated instead of gathered; never proved (refuted where numbers show it)
    def seq(d):
        return torch.ones_like(d) * d + 0

    def ranks(d):
        if bug == "twice":
            y = _gathered(2 * torch.ones_like(d) * d)
        elif bug == "plus_one":
            y = _gathered(torch.ones_like(d) + d)
        else:
            y = torch.cat([torch.ones_like(d) * d] * dist.get_world_size(), 0)
        return y + 0

    d = torch.randn(8, 2, 4, dtype=torch.float64)
    r = gg.verify(gg.Problem(seq, ranks, [d], [gg.Shard(0)], 2, expect=[gg.Replicate()]))
    assert r.status is gg.Status.REFUTED, str(r)


def _emb_seq(ids, wte, wpe):
    x = F.embedding(ids, wte) + wpe
    return torch.autograd.grad(x.pow(2).sum(), [wte, wpe])


def _emb_sp(ids, wte, wpe):
    x = vocab_parallel_embedding(ids, wte, sequence_parallel=True) + scatter_to_sequence_parallel_region(wpe, 0)
    return torch.autograd.grad(x.pow(2).sum(), [wte, wpe])


def _emb_problem(batch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (batch, 8), generator=g)
    wte = torch.randn(16, 4, dtype=torch.float64, generator=g).requires_grad_()
    wpe = torch.randn(8, 4, dtype=torch.float64, generator=g).requires_grad_()
    return gg.Problem(_emb_seq, _emb_sp, [ids, wte, wpe], [gg.Replicate(), gg.Shard(0), gg.Replicate()], 2,
                      expect=[gg.Shard(0), gg.Replicate()])


def test_reduce_scatter_embedding_positions_gradient_proved_at_batch_two():
    _proved(_emb_problem(2))


def test_reduce_scatter_embedding_positions_gradient_at_batch_one():
    # the positional-embedding gradient at batch 1: each rank all-gathers its block sum; the relation
    # found is the all-gathered embedding gradient, equal to the ranks' output by the scalar normal form
    _proved(_emb_problem(1))


def _row_parallel_reduce_scatter_chunk_cat(x, w, b):
    # megatron-core's spelling off the first dim: the blocks moved to dim 0 with chunk + cat
    y = x @ w
    y = torch.cat(y.chunk(2, dim=1), dim=0)
    out = torch.empty(y.shape[0] // 2, *y.shape[1:], dtype=y.dtype)
    dist.reduce_scatter_tensor(out, y)
    return out + b


def _row_parallel(x, w, b):
    return x @ w + b


def _chunk_cat_problem(batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, 6, dtype=torch.float64, generator=g)
    w = torch.randn(6, 4, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    return gg.Problem(_row_parallel, _row_parallel_reduce_scatter_chunk_cat, [x, w, b],
                      [gg.Shard(2), gg.Shard(0), gg.Replicate()], 2, expect=[gg.Shard(1)])


def test_reduce_scatter_along_the_sequence_by_chunk_and_cat_proved_at_batch_two():
    _proved(_chunk_cat_problem(2))


def test_reduce_scatter_along_the_sequence_by_chunk_and_cat_at_batch_one():
    # at batch 1 the store reads y.chunk(W, 1) as row slices of the 2-D product viewed back: the
    # reduce-scatter's chunks are recognized by data movement (engine/index.py `_chunks_by_movement`)
    _proved(_chunk_cat_problem(1))


def _rs_split_cat(x, w, b):
    y = torch.matmul(x, w)
    y = torch.cat(torch.split(y, y.shape[1] // dist.get_world_size(), dim=1))
    out = y.new_empty((y.shape[0] // dist.get_world_size(),) + tuple(y.shape[1:]))
    dist.reduce_scatter_tensor(out, y, op=dist.ReduceOp.SUM)
    return out + b


def _rs_unbind_stack(x, w, b):
    y = F.linear(x, w.t())
    W = dist.get_world_size()
    y = y.view(y.shape[0], W, y.shape[1] // W, y.shape[2]).transpose(0, 1).reshape(-1, y.shape[1] // W, y.shape[2])
    out = torch.empty(y.shape[0] // W, *y.shape[1:], dtype=y.dtype)
    dist.reduce_scatter_tensor(out, y.contiguous())
    return b + out


def _rs_wrong_chunk_order(x, w, b):
    y = x @ w
    y = torch.cat(y.chunk(2, dim=1)[::-1], dim=0)  # bug: the chunks reversed
    out = torch.empty(y.shape[0] // 2, *y.shape[1:], dtype=y.dtype)
    dist.reduce_scatter_tensor(out, y)
    return out + b


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spelling", [_rs_split_cat, _rs_unbind_stack], ids=["split_cat", "view_transpose"])
def test_reduce_scatter_along_the_sequence_other_spellings(spelling, batch):
    p = _chunk_cat_problem(batch)
    p.distributed = spelling
    _proved(p)


@pytest.mark.parametrize("batch", [1, 2])
def test_reduce_scatter_along_the_sequence_wrong_chunk_order_refuted(batch):
    p = _chunk_cat_problem(batch)
    p.distributed = _rs_wrong_chunk_order
    r = gg.verify(p)
    assert r.status is gg.Status.REFUTED, str(r)
