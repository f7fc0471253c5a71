"""2-D meshes: TP x DP training steps whose process groups are spelled three ways (dist.new_group for
every row and column, dist.new_subgroups / new_subgroups_by_enumeration, a DeviceMesh built inside
the rank function), and TP x PP gradients with scatter-gather p2p between the stages, are proved at
world sizes 4 and 8; a DP x PP x TP training step on a 3-D mesh (new_group / a 3-D DeviceMesh) is proved at 8;
every seeded bug is *refuted* (a counterexample), its culprit at the marked line."""

from __future__ import annotations

import pytest

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.examples import mesh

SPELLINGS = ("new_group", "subgroups", "device_mesh")


# The registered examples (mesh_tp_dp in three spellings, mesh_dp_cp, mesh_tp_pp at W=4 and 8, mesh_dp_pp_tp at 8):
# every one proved and every bug refuted at its line in tests/test_verify_examples.py; here, other sizes and spellings.
def test_spellings_are_registered_at_4_and_8():
    for name in ("mesh_tp_dp", "mesh_tp_dp_subgroups", "mesh_tp_dp_device_mesh", "mesh_dp_cp", "mesh_tp_pp"):
        assert E.get(name).world_sizes == (4, 8) and E.get(name).runs_on == "gloo"
    assert {SPELLINGS[0], SPELLINGS[1], SPELLINGS[2]} == set(mesh.GROUPS)


def test_tp_dp_step_with_four_tp_ranks_is_proved():
    # W=8 as DP=2 x TP=4 (the registered example uses TP=2, DP=W/2)
    r = gg.verify(mesh.make_tp_dp(world_size=8, tp=4, groups="new_group"))
    assert r.status is gg.Status.PROVED, str(r)


def _culprit_line(problem, marker):
    return E.marker_line(problem.sequential, marker).rsplit(":", 1)[1]


@pytest.mark.parametrize("world_size,sizes", [(4, {"micro_batches": 1}),
                                               (4, {"batch": 6, "hidden": 6, "ffn": 4, "micro_batches": 3})])
def test_tp_pp_step_is_proved(world_size, sizes):
    # stage 1's input is the all-gather of its TP peers' slices of stage 0's TP all-reduce: the same
    # term as that all-reduce (relations/cat_sums.py); at W=8 each stage is TP over 4 ranks
    r = gg.verify(mesh.make_tp_pp(world_size=world_size, **sizes))
    assert r.status is gg.Status.PROVED, str(r)


def test_tp_pp_numbers():
    from gg_notebook.runners.compare import compare

    assert compare(mesh.make_tp_pp(world_size=4), backend="gloo")[0]
    for bug in sorted(mesh.TP_PP_BUGS):
        assert not compare(mesh.make_tp_pp(world_size=4, bug=bug), backend="gloo")[0], bug


# a DP replica of one sequence (local batch 1): the rank's matmul lowers to mm on views while the
# sequential one is a bmm (single_bmm.as_mm relates them)
def test_dp_cp_attention_one_sequence_per_replica_is_proved():
    r = gg.verify(mesh.make_dp_cp(world_size=4, batch=2))
    assert r.status is gg.Status.PROVED, str(r)


# ----------------------------------------------------------------- DP x PP x TP on a 3-D mesh (W=8)


def test_dp_pp_tp_is_registered_at_8():
    ex = E.get("mesh_dp_pp_tp")
    assert ex.world_sizes == (8,) and ex.runs_on == "gloo" and set(ex.bugs) == set(mesh.DP_PP_TP_BUGS)
    assert set(mesh.GROUPS_3D) == {"new_group", "device_mesh"}


# the new_group spelling at the registered sizes is proved in tests/test_verify_examples.py
@pytest.mark.parametrize("sizes", [{"groups": "device_mesh"}, {"batch": 12, "hidden": 6, "ffn": 4, "micro_batches": 3}])
def test_dp_pp_tp_step_is_proved(sizes):
    r = gg.verify(mesh.make_dp_pp_tp(world_size=8, **sizes))
    assert r.status is gg.Status.PROVED, str(r)


def test_dp_pp_tp_bug_is_refuted_at_its_line_in_the_device_mesh_spelling(bug="dp_grad_pp_group"):
    # the new_group spelling's bugs: tests/test_verify_examples.py (registered at W=8)
    problem = mesh.make_dp_pp_tp(world_size=8, bug=bug, groups="device_mesh")
    r = gg.verify(problem)
    assert r.status is gg.Status.REFUTED, str(r)
    assert r.counterexample is not None
    spec = mesh.DP_PP_TP_BUGS[bug]
    assert r.culprit.op.startswith(spec.culprit_op + "."), (r.culprit, spec)
    assert r.culprit.source.rsplit(":", 1)[1] == _culprit_line(problem, spec.culprit_marker)


def test_dp_pp_tp_numbers():
    # the 3-D groups of both spellings on real gloo processes: the correct step matches the single-device
    # step, every bug does not
    from gg_notebook.runners.compare import compare

    for groups in sorted(mesh.GROUPS_3D):
        assert compare(mesh.make_dp_pp_tp(groups=groups), backend="gloo")[0], groups
    for bug in sorted(mesh.DP_PP_TP_BUGS):
        assert not compare(mesh.make_dp_pp_tp(bug=bug), backend="gloo")[0], bug


def test_dp_pp_tp_rejects_sizes_it_cannot_split():
    with pytest.raises(ValueError, match="multiple of 4"):
        mesh.make_dp_pp_tp(world_size=6)
    with pytest.raises(ValueError, match="micro-batches"):
        mesh.make_dp_pp_tp(batch=6)


# W=16: TP 4 per stage (the stage-summed w1 gradient, an add of two select_backward cats of per-replica
# partial sums, related to the DP all-reduce through the scalar normal form)
def test_dp_pp_tp_with_four_tp_ranks_is_proved():
    r = gg.verify(mesh.make_dp_pp_tp(world_size=16))
    assert r.status is gg.Status.PROVED, str(r)
