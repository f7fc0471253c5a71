"""Graphs captured elsewhere (`gg.Problem.from_graphs`): printed GraphModule source as a cluster dump
gives it (device='cuda' literals, foreign communicator names, lifted tensor constants, a custom
operator), GraphModule objects, and the errors a user meets on a malformed dump. GraphGuard's own
published GPT graphs are verified when ../shared/graphguard is present."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor

import gg_notebook as gg
from gg_notebook.adapters.graphs import GraphImportError, from_graphs

# ----------------------------------------------------------------------------------- the dumps
# A two-layer MLP with a tanh-GELU written by a custom kernel (mylib::bias_gelu), the hidden dim
# split over two ranks (Megatron column- then row-parallel), dumped with gm.print_readable() on a
# GPU box: cuda device literals, the TP communicator named "7", a lifted scale constant.
SEQ = '''
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[4, 8]", primals_2: "f32[16, 8]", primals_3: "f32[16]", primals_4: "f32[8, 16]"):
        # File: /cluster/model.py:10 in forward, code: x = x.to("cuda")
        _to_copy: "f32[4, 8]" = torch.ops.aten._to_copy.default(primals_1, dtype = torch.float32, device = device(type='cuda', index=0))
        t: "f32[8, 16]" = torch.ops.aten.t.default(primals_2)
        # File: /cluster/model.py:11 in forward, code: h = self.fc1(x)
        mm: "f32[4, 16]" = torch.ops.aten.mm.default(_to_copy, t)
        bias_gelu = torch.ops.mylib.bias_gelu.default(mm, primals_3)
        _tensor_constant0 = self._tensor_constant0
        lift_fresh_copy: "f32[]" = torch.ops.aten.lift_fresh_copy.default(_tensor_constant0)
        mul: "f32[4, 16]" = torch.ops.aten.mul.Tensor(bias_gelu, lift_fresh_copy)
        t_1: "f32[16, 8]" = torch.ops.aten.t.default(primals_4)
        # File: /cluster/model.py:13 in forward, code: return self.fc2(h)
        mm_1: "f32[4, 8]" = torch.ops.aten.mm.default(mul, t_1)
        all_reduce: "f32[4, 8]" = torch.ops._c10d_functional.all_reduce.default(mm_1, 'sum', '3')
        wait_tensor: "f32[4, 8]" = torch.ops._c10d_functional.wait_tensor.default(all_reduce)
        sum_1: "f32[]" = torch.ops.aten.sum.default(wait_tensor)
        return [sum_1, mm, wait_tensor]
'''

RANK = '''
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[4, 8]", primals_2: "f32[8, 8]", primals_3: "f32[8]", primals_4: "f32[8, 8]"):
        _to_copy: "f32[4, 8]" = torch.ops.aten._to_copy.default(primals_1, dtype = torch.float32, device = device(type='cuda', index=0))
        t: "f32[8, 8]" = torch.ops.aten.t.default(primals_2)
        mm: "f32[4, 8]" = torch.ops.aten.mm.default(_to_copy, t)
        bias_gelu = torch.ops.mylib.bias_gelu.default(mm, primals_3)
        _tensor_constant0 = self._tensor_constant0
        lift_fresh_copy: "f32[]" = torch.ops.aten.lift_fresh_copy.default(_tensor_constant0)
        mul: "f32[4, 8]" = torch.ops.aten.mul.Tensor(bias_gelu, lift_fresh_copy)
        t_1: "f32[8, 8]" = torch.ops.aten.t.default(primals_4)
        mm_1: "f32[4, 8]" = torch.ops.aten.mm.default(mul, t_1)
        all_reduce: "f32[4, 8]" = torch.ops._c10d_functional.all_reduce.default(mm_1, 'sum', '7')
        wait_tensor: "f32[4, 8]" = torch.ops._c10d_functional.wait_tensor.default(all_reduce)
        sum_1: "f32[]" = torch.ops.aten.sum.default(wait_tensor)
        return [sum_1, mm, wait_tensor]
'''

RANK_NO_REDUCE = RANK.replace(
    "        all_reduce: \"f32[4, 8]\" = torch.ops._c10d_functional.all_reduce.default(mm_1, 'sum', '7')\n"
    "        wait_tensor: \"f32[4, 8]\" = torch.ops._c10d_functional.wait_tensor.default(all_reduce)\n",
    "        wait_tensor: \"f32[4, 8]\" = torch.ops.aten.clone.default(mm_1)  # BUG: the all-reduce is gone\n")


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """The custom kernel's definition (what the CUDA kernel computes)."""
    return torch.nn.functional.gelu(x + bias, approximate="tanh")


PLACEMENTS = {"primals_1": gg.Replicate(), "primals_2": gg.Shard(0), "primals_3": gg.Shard(0),
              "primals_4": gg.Shard(1)}
CONSTANTS = {"_tensor_constant0": 0.5}


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text("import torch\nfrom torch import device\n" + textwrap.dedent(text))
    return str(p)


def _problem(tmp_path, rank_text=RANK, **kw):
    seq = _write(tmp_path, "fw.r0.seq.py", SEQ)
    ranks = [_write(tmp_path, f"fw.r{r}.py", rank_text) for r in range(2)]
    args = dict(outputs=["sum_1"], expect=[gg.Replicate()], constants=CONSTANTS,
                definitions={"mylib::bias_gelu": bias_gelu})
    args.update(kw)
    return from_graphs(seq, ranks, PLACEMENTS, **args)


def test_printed_dumps_are_proved(tmp_path):
    r = gg.verify(_problem(tmp_path))
    assert r.status is gg.Status.PROVED, str(r)


def test_every_output_by_name(tmp_path):
    """The hidden activation is column-parallel, the output replicated after the all-reduce."""
    p = _problem(tmp_path, outputs=["sum_1", "mm", "wait_tensor"],
                 expect=[gg.Replicate(), gg.Shard(1), gg.Replicate()])
    r = gg.verify(p)
    assert r.status is gg.Status.PROVED, str(r)


def test_a_dropped_all_reduce_is_refuted_at_the_graph_line(tmp_path):
    r = gg.verify(_problem(tmp_path, rank_text=RANK_NO_REDUCE))
    assert r.status is gg.Status.REFUTED, str(r)
    assert r.culprit is not None and "fw.r0.seq.py" in (r.culprit.source or ""), str(r)


def test_source_text_instead_of_files():
    p = from_graphs(SEQ, [RANK, RANK], PLACEMENTS, outputs=["sum_1"], expect=[gg.Replicate()],
                    constants=CONSTANTS, definitions={"mylib::bias_gelu": bias_gelu})
    r = gg.verify(p)
    assert r.status is gg.Status.PROVED, str(r)


def test_graph_modules_traced_here():
    """GraphModule objects (make_fx here, functional collectives on a foreign group name)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def seq(x, w1, w2):
        return torch.relu(x @ w1.t()) @ w2.t()

    def rank(x, w1, w2):
        y = torch.relu(x @ w1.t()) @ w2.t()
        return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(y, "sum", "tp"))

    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    seq_gm = make_fx(seq)(x, w1, w2)
    # tracing a rank needs no process group: the functional op's fake kernel only needs shapes
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import torch.distributed as dist

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        rank_gm = make_fx(lambda a, b, c: rank(a, b, c), tracing_mode="fake")(x, w1[:8], w2[:, :8])
    finally:
        dist.destroy_process_group()
    p = from_graphs(seq_gm, [rank_gm, rank_gm], [gg.Replicate(), gg.Shard(0), gg.Shard(1)],
                    expect=[gg.Replicate()])
    r = gg.verify(p)
    assert r.status is gg.Status.PROVED, str(r)


# ----------------------------------------------------------------------------------- bad input
def test_missing_constants_are_named(tmp_path):
    with pytest.raises(GraphImportError, match=r"self\._tensor_constant0.*constants=\{'_tensor_constant0'"):
        _problem(tmp_path, constants=None)


def test_a_rank_input_with_the_wrong_local_shape_names_rank_input_and_shapes(tmp_path):
    bad = dict(PLACEMENTS, primals_2=gg.Shard(1))  # the dump is split on dim 0
    seq = _write(tmp_path, "s.py", SEQ)
    ranks = [_write(tmp_path, f"r{r}.py", RANK) for r in range(2)]
    with pytest.raises(GraphImportError, match=r"rank 0's graph \(r0.py\): input primals_2 is float32\[8, 8\].*"
                                               r"S\(1\).*float32\[16, 4\]"):
        from_graphs(seq, ranks, bad, constants=CONSTANTS, definitions={"mylib::bias_gelu": bias_gelu})


def test_placements_must_cover_every_input(tmp_path):
    with pytest.raises(GraphImportError, match="no placement for primals_4"):
        from_graphs(SEQ, [RANK, RANK], {k: v for k, v in PLACEMENTS.items() if k != "primals_4"},
                    constants=CONSTANTS, definitions={"mylib::bias_gelu": bias_gelu})


def test_two_communicators_need_a_mapping():
    two = RANK.replace("(mm_1, 'sum', '7')", "(mm_1, 'sum', '9')").replace(
        "sum_1: \"f32[]\" = torch.ops.aten.sum.default(wait_tensor)",
        "ar2 = torch.ops._c10d_functional.all_reduce.default(wait_tensor, 'sum', '7')\n"
        "        sum_1: \"f32[]\" = torch.ops.aten.sum.default(ar2)")
    with pytest.raises(GraphImportError, match=r"2 communicators \('7', '9'\).*groups="):
        from_graphs(SEQ, [two, two], PLACEMENTS, constants=CONSTANTS, definitions={"mylib::bias_gelu": bias_gelu})


def test_an_unknown_output_name_lists_the_returned_ones():
    with pytest.raises(GraphImportError, match=r"'loss'.*returns sum_1, mm, wait_tensor"):
        from_graphs(SEQ, [RANK, RANK], PLACEMENTS, outputs=["loss"], constants=CONSTANTS,
                    definitions={"mylib::bias_gelu": bias_gelu})


def test_a_collective_over_two_ranks_in_the_single_device_graph_is_an_error():
    seq = SEQ.replace("_c10d_functional.all_reduce.default(mm_1, 'sum', '3')",
                      "_c10d_functional.all_gather_into_tensor.default(mm_1, 2, '3')").replace(
        'all_reduce: "f32[4, 8]"', 'all_reduce: "f32[8, 8]"')
    p = from_graphs(seq, [RANK, RANK], PLACEMENTS, outputs=["sum_1"], constants=CONSTANTS,
                    definitions={"mylib::bias_gelu": bias_gelu})
    with pytest.raises(Exception, match="group of 2 ranks.*single-device graph"):
        gg.verify(p)


def test_an_unparsable_dump_names_the_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("class GraphModule(torch.nn.Module):\n    def forward(self, x:\n")
    with pytest.raises(GraphImportError, match=r"broken.py:\d+"):
        from_graphs(str(path), [str(path)], [gg.Replicate()])


# ----------------------------------------------------------------------------------- GraphGuard
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import graphguard_gpt as G  # noqa: E402

needs_graphguard = pytest.mark.skipif(not G.available(2, 1), reason="GraphGuard's graphs are not on this machine")


@needs_graphguard
def test_graphguard_gpt_tp2_one_layer():
    r = gg.verify(G.problem(2, 1))
    # proved but for dropout, which GraphGuard also takes as the identity: the only assumptions
    assert r.status is gg.Status.ASSUMED, str(r)
    assert r.assumptions and all("dropout" in str(a) for a in r.assumptions), r.assumptions


@needs_graphguard
def test_graphguard_gpt_without_the_embedding_all_reduce_is_not_proved(tmp_path):
    """Rank graphs that skip the vocab-parallel embedding's all-reduce: never proved, and the
    proof stops at the sequential operator that first needs the reduced value."""
    import re

    srcs = []
    for r in range(2):
        text = (G.ROOT / "paral2_layer1" / f"fw.g0.r{r}.py").read_text()
        text, n = re.subn(r"torch\.ops\._c10d_functional\.all_reduce\.default\((slice_scatter), 'sum', '12'\)",
                          r"torch.ops.aten.clone.default(\1)", text, count=1)
        assert n == 1
        path = tmp_path / f"fw.g0.r{r}.py"
        path.write_text(text)
        srcs.append(path)
    r = gg.verify(G.problem(2, 1, ranks=srcs))
    assert r.status not in (gg.Status.PROVED, gg.Status.ASSUMED), str(r)
    assert r.culprit is not None and "paral1_layer1/fw.g0.r0.py" in (r.culprit.source or ""), str(r)
