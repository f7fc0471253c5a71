"""Concrete execution: simulator vs real gloo ranks, refutation, numeric suggestions, hint checks,
certificates and the bitwise exactness mode."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.concrete.compare import close
from gg_notebook.concrete.simulate import simulate
from gg_notebook.verify import prepare

# The gloo side of the simulator cross-check runs in a fresh interpreter, never in this test process
# (forked gloo workers must not inherit pytest's state). One interpreter per module imports torch and
# gg_notebook once (~3 s, most of each check's time when every example started its own); for each
# example it forks a child, which starts from exactly that freshly imported state, builds the example,
# runs it on gloo ranks and exits: no example's run sees another's.
_GLOO_SERVER = r"""
import dataclasses, os, sys, traceback
import torch
from gg_notebook import examples as E
from gg_notebook.runners.gloo import run_gloo


def job(name, path):
    inputs = torch.load(path)
    original = E.get(name).make(world_size=E.get(name).world_sizes[0])
    inputs = [t.requires_grad_(o.requires_grad) if o.requires_grad else t for t, o in zip(inputs, original.inputs)]
    problem = dataclasses.replace(original, inputs=tuple(inputs))
    torch.save(run_gloo(problem), path + ".out")


for line in sys.stdin:
    name, path = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:  # one example, then exit
        code = 1
        try:
            err = os.open(path + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.dup2(err, 1)  # the server's stdout carries only the exit codes
            job(name, path)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class _GlooServer:
    """The module's gloo interpreter (`_GLOO_SERVER`), started on first use and again after a timeout."""

    def __init__(self, log):
        self.log, self.proc = log, None

    def run(self, name: str, path, timeout: float = 300.0) -> tuple[int, str]:
        """(exit code, stderr) of the gloo run of example ``name`` on the inputs saved at ``path``."""
        import select
        import subprocess
        import sys

        if self.proc is None or self.proc.poll() is not None:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-c", _GLOO_SERVER], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        self.proc.stdin.write(f"{name}\t{path}\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.stop(force=True)
            raise AssertionError(f"{name}: the gloo run took more than {timeout:.0f} s")
        line = self.proc.stdout.readline()
        err = path.parent / (path.name + ".stderr")
        stderr = err.read_text(errors="replace") if err.exists() else ""
        if not line:  # the server itself died
            self.stop()
            return -1, stderr + "\n" + self.log.read_text(errors="replace")
        return int(line), stderr

    def stop(self, force: bool = False):
        import os
        import signal

        if self.proc is None:
            return
        if not force and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a run still going: stop the server and what it forked
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


@pytest.fixture(scope="module")
def gloo_server(tmp_path_factory):
    server = _GlooServer(tmp_path_factory.mktemp("gloo_server") / "server.log")
    yield server
    server.stop()


@pytest.mark.parametrize("name", sorted(n for n in E.EXAMPLES if not n.startswith("gpt")) + ["gpt_block_fwd_bwd"])
def test_simulator_agrees_with_gloo_processes(name, tmp_path, gloo_server):
    """The one-process simulator against real gloo ranks (run in a fresh interpreter, so that the
    forked gloo workers never inherit this test process's state)."""
    problem = E.get(name).make(world_size=E.get(name).world_sizes[0])
    engine, _ = prepare(problem)
    sim = simulate(problem, engine.seq, engine.index.graphs, seed=5)
    path = tmp_path / "inputs.pt"
    torch.save([t.detach() for t in sim.inputs], path)
    returncode, stderr = gloo_server.run(name, path)
    assert returncode == 0, stderr[-2000:]
    real = torch.load(str(path) + ".out")
    for r, g in enumerate(engine.index.graphs):
        for k, out in enumerate(g.outputs):
            assert close(real[r][k].to(sim.ranks[r][out.name].dtype), sim.ranks[r][out.name]), (name, r, k)


# every seeded bug: refuted with a counterexample (inputs, a nonzero error) at its line, at every registered
# world size: tests/test_verify_examples.py


def test_correct_program_without_lemma_is_unknown_and_numbers_agree():
    def seq(x):
        return torch.special.erfcx(x)

    def dist(x):
        return torch.exp(x * x) * torch.erfc(x)

    r = gg.verify(gg.Problem(seq, dist, (torch.randn(4, 6, dtype=torch.float64),), (gg.Shard(1),), 2,
                             expect=(gg.Shard(1),)))
    assert r.status is gg.Status.UNKNOWN
    assert r.counterexample is None
    msgs = [f.message for f in r.findings if f.kind == "numbers-agree"]
    assert msgs and "looks correct" in msgs[0] and "special_erfcx" in msgs[0]


TRUE_RELATION_CASES = [
    ("mlp", "concat-contract"),
    ("sp_layernorm_mlp", "concat-contract"),
    ("sp_layernorm_mlp", "concat-commute"),
    ("gpt_block", "concat-contract"),
    ("vocab_embedding", "vocab-embedding"),
]


@pytest.mark.parametrize("name,lemma", TRUE_RELATION_CASES)
def test_true_relation_is_among_the_top_three_suggestions(name, lemma):
    problem = E.get(name).make(world_size=2)
    full = gg.ProofSession(problem)
    full.run()
    crippled = gg.ProofSession(problem)
    crippled.engine.disabled = {lemma}
    crippled.run()
    stuck = crippled.stuck
    assert stuck is not None, "disabling the lemma should make the proof stuck"
    truth = {r.text for r in full.relations[stuck.node] if r.status == "proved"}
    top3 = [s.text for s in crippled.suggestions()[:3]]
    assert truth & set(top3), (stuck.node, truth, top3)
    best = next(s for s in crippled.suggestions()[:3] if s.text in truth)
    assert "random inputs" in best.reason


def test_numerically_false_hint_is_refused_with_values():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    before = (s.progress, {k: list(v) for k, v in s.relations.items()}, list(s.actions))
    with pytest.raises(ValueError, match="numerically false.*seed 0"):
        s.hint(s.stuck.node, f"{s.stuck.node}@r0")
    assert (s.progress, {k: list(v) for k, v in s.relations.items()}, list(s.actions)) == before


@pytest.mark.parametrize("name", ["mlp", "gpt_block", "vocab_cross_entropy"])
def test_certificate_roundtrip_and_tampering(name):
    problem = E.get(name).make(world_size=2)
    r = gg.verify(problem)
    cert = r.certificate()
    check = gg.check_certificate(problem, cert)
    assert check.ok and check.checked_relations > 0 and check.checked_lemmas > 0, str(check)
    bad = copy.deepcopy(cert)
    changed = False
    for st in bad["steps"]:
        for rel in st["relations"]:
            t = rel["relation"]
            if "@r0" in t and "@r1" in t:
                rel["relation"] = t.replace("@r0", "@rX").replace("@r1", "@r0").replace("@rX", "@r1")
                changed = True
                break
        if changed:
            break
    assert changed
    check = gg.check_certificate(problem, bad)
    assert not check.ok and "false on fresh random input" in check.failure and check.node == st["node"]


def test_bitwise_mode():
    # a row-parallel matmul sums shard products: equal over the reals, not bit for bit
    r = gg.verify(E.get("mlp").make(world_size=2), exact="bitwise")
    assert r.status is not gg.Status.PROVED
    # a vocab-parallel lookup only moves data (and adds exact zeros): bitwise exact
    r = gg.verify(E.get("vocab_embedding").make(world_size=2), exact="bitwise")
    assert r.status is gg.Status.PROVED
    with pytest.raises(gg.ProblemError):
        gg.verify(E.get("mlp").make(world_size=2), exact="approximately")
