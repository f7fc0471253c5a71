"""Custom input layouts: traced rank terms and the clean relation rebuilding the global tensor."""

from __future__ import annotations

import pytest
import torch

import gg_notebook as gg
from gg_notebook.capture import capture_layout
from gg_notebook.examples.attention_fused_qkv import qkv_column_shard
from gg_notebook.problem import Layout, Problem, ProblemError
from gg_notebook.relations.expr import ExprStore, evaluate, is_clean, pretty
from gg_notebook.relations.layout import MAX_NUMEL, layout_terms_and_relation


def _problem(fn, g, W, name="w"):
    return Problem(sequential=lambda a: a, distributed=lambda a: a, inputs=(g,), placements=(Layout(fn),),
                   world_size=W, input_names=(name,))


def rebuild(fn, shape, W, device="cpu"):
    """Trace ``fn``, build the relation over fresh refs, check it numerically; returns (relation, refs, store)."""
    g = torch.randn(tuple(shape), dtype=torch.float64, device=device)
    p = _problem(fn, g, W)
    store = ExprStore()
    atom = store.atom("w", tuple(g.shape), g.dtype)
    terms, builder = layout_terms_and_relation(p, 0, store, atom, capture_layout)
    assert len(terms) == W
    if device == "cpu":
        for r, t in enumerate(terms):
            assert tuple(t.shape) == tuple(fn(g, r, W).shape)
            assert torch.equal(evaluate(t, lambda e: g), fn(g, r, W))
    refs = [store.ref(1000 + r, t.shape, t.dtype) for r, t in enumerate(terms)]
    rel = builder(refs)
    assert is_clean(rel)
    if device == "cpu":
        locs = [fn(g, r, W) for r in range(W)]
        got = evaluate(rel, lambda e: locs[e.attrs[0] - 1000])
        assert torch.equal(got, g)
    return rel, refs, store


def show(rel):
    return pretty(rel, lambda e: f"L{e.attrs[0] - 1000}")


def test_shard_equivalent_layout_is_concat_of_refs():
    rel, refs, store = rebuild(lambda g, r, W: torch.chunk(g, W, 1)[r], (4, 8), 2)
    assert rel is store.cat(refs, 1)


@pytest.mark.parametrize("W", [2, 4])
def test_fused_qkv_columns(W):
    H = 16
    rel, refs, _ = rebuild(qkv_column_shard, (H, 3 * H), W)
    assert rel.op == "cat" and rel.attrs == 1 and len(rel.args) == 3 * W
    s = show(rel)
    h = H // W
    assert s.startswith(f"concat(L0[:, 0:{h}], L1[:, 0:{h}]")


def test_transposed_layout():
    rel, _, _ = rebuild(lambda g, r, W: torch.chunk(g, W, 0)[r].t(), (8, 6), 2)
    assert show(rel) == "concat(L0.permute(1, 0), L1.permute(1, 0), dim=0)"


def test_flattened_layout_is_viewed_back():
    rel, _, _ = rebuild(lambda g, r, W: torch.chunk(g, W, 1)[r].reshape(-1), (3, 8), 2)
    assert show(rel) == "concat(L0.view(3, 4), L1.view(3, 4), dim=1)"


def test_replicated_layout_gives_rank0():
    rel, refs, _ = rebuild(lambda g, r, W: g, (4, 6), 3)
    assert rel is refs[0]


def test_block_layout_and_partial_replication():
    rel, _, _ = rebuild(lambda g, r, W: g.chunk(2, 0)[r // 2].chunk(2, 1)[r % 2], (4, 6), 4)
    assert show(rel) == "concat(concat(L0, L1, dim=1), concat(L2, L3, dim=1), dim=0)"
    rel, refs, store = rebuild(lambda g, r, W: g.chunk(2, 0)[r % 2], (4, 6), 4)
    assert rel is store.cat(refs[:2], 0)


def test_interleaved_heads_and_3d_permute():
    def interleaved(g, r, W, heads=4):
        D = g.shape[0] // heads
        q, k, v = g.chunk(3, 1)
        hs = [torch.cat([t[:, h * D:(h + 1) * D] for t in (q, k, v)], 1) for h in range(heads)]
        return torch.cat(hs[r * heads // W:(r + 1) * heads // W], 1)

    rebuild(interleaved, (8, 24), 2)
    rebuild(lambda g, r, W: g.chunk(W, 2)[r].permute(2, 0, 1), (2, 3, 8), 2)
    rebuild(lambda g, r, W: g.chunk(W, 1)[r].reshape(2, 3, -1).transpose(0, 1), (6, 8), 2)


def test_meta_input():
    rel, refs, store = rebuild(lambda g, r, W: torch.chunk(g, W, 0)[r], (8, 4), 2, device="meta")
    assert rel is store.cat(refs, 0)


def test_computing_layout_is_refused_with_op_and_line():
    def doubled(g, r, W):
        return torch.chunk(g, W, 1)[r] * 2  # the offending line

    with pytest.raises(ProblemError) as ei:
        rebuild(doubled, (4, 8), 2)
    msg = str(ei.value)
    assert "input 0 (w)" in msg and "aten.mul.Tensor" in msg and "rank 0" in msg
    assert "test_layout.py:" in msg and "may only" in msg


def test_layout_dropping_data_is_refused():
    with pytest.raises(ProblemError, match=r"do not cover the global tensor.*\(3, 0\)"):
        rebuild(lambda g, r, W: g[:2] if r == 0 else g[2:3], (4, 6), 2)


def test_layout_without_clean_rebuild_is_refused():
    with pytest.raises(ProblemError, match="no clean rebuild"):
        rebuild(lambda g, r, W: g.reshape(-1)[:5] if r == 0 else g.reshape(-1)[5:], (3, 4), 2)


def test_failing_layout_names_rank_and_exception():
    def boom(g, r, W):
        if r == 1:
            raise RuntimeError("nope")
        return g

    with pytest.raises(ProblemError, match=r"input 0 \(w\).*rank 1.*nope"):
        rebuild(boom, (3, 4), 2)


def test_too_large_input_is_refused_unless_symbolic():
    n = MAX_NUMEL // 1024 + 1
    with pytest.raises(ProblemError, match="limited to"):
        rebuild(lambda g, r, W: torch.chunk(g, W, 0)[r].t(), (1024, n), 2, device="meta")
    # replicated and contiguous-chunk layouts are read off the terms, at any size
    rel, refs, store = rebuild(lambda g, r, W: torch.chunk(g, W, 1)[r], (1024, n), 2, device="meta")
    assert rel is store.cat(refs, 1)
    rel, refs, _ = rebuild(lambda g, r, W: g, (1024, n), 2, device="meta")
    assert rel is refs[0]


def test_attention_fused_qkv_end_to_end_no_longer_unsupported():
    import gg_notebook.examples as examples

    res = gg.verify(examples.get("attention_fused_qkv").make(world_size=2))
    assert "not supported yet" not in str(res)
