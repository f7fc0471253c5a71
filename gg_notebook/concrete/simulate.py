"""The rank simulator: run the captured sequential graph and every rank's graph on real tensors.

All ranks run in one process on the lowered IR (the same graphs the prover reads), in lockstep so
that every collective sees all its members' inputs and is computed exactly (sum/max/min/avg
all-reduce, all-gather, reduce-scatter, all-to-all, broadcast). Inputs are drawn at random
(seeded, dtype-aware; integer inputs in the range their use demands, e.g. token ids below the
embedding's vocabulary) and split by the problem's placements (Partial inputs: a random split).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import Partial

from gg_notebook.ir.graph import Graph, Node
from gg_notebook.problem import Problem, local_input
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import apply_op

MAX_ELEMENTS = 50_000_000  # refuse to materialize more than this per simulation


class SimulationError(RuntimeError):
    """The programs cannot be simulated (too large, or an op failed on real values)."""


class RankRaised(SimulationError):
    """A rank's own operator raised on the rank's actual values: the user's program fails there.

    Raised only when the operator is one the rank's program calls (an ATen or user operator in its
    graph, not a simulator construct) and it accepts the same arguments as fake tensors (shapes,
    dtypes and every other argument are fine: tracing ran it), so the error depends on the values
    alone (an index out of bounds, a failed ``torch._assert``, a singular matrix)."""

    def __init__(self, rank: int, node: Node, exc: BaseException):
        self.rank, self.node, self.exc = rank, node, exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        super().__init__(f"rank {rank}: {node.target} ({node.name}) at {node.source} raised on real values: "
                         f"{self.error}")

    def describe(self) -> str:
        code = f" (`{self.node.code.strip()}`)" if self.node.code else ""
        where = f" at {self.node.source}" if self.node.source else ""
        return f"rank {self.rank} raised {self.error} in {self.node.target}{where}{code}"


# Exceptions that say "these values are not accepted" (never a missing kernel or a wrong call).
_VALUE_ERRORS = (IndexError, RuntimeError, ValueError, ZeroDivisionError)


def _raised_by_operator(n: Node, vals: list, exc: BaseException) -> bool:
    """Did the rank's own operator ``n`` reject its actual values (see `RankRaised`)?"""
    if n.op != "call" or not isinstance(exc, _VALUE_ERRORS) or isinstance(exc, (NotImplementedError, SimulationError)):
        return False
    target = getattr(n.attrs, "target", None)
    if not isinstance(target, torch._ops.OpOverload) or target.namespace in ("gg_capture", "prims"):
        return False
    if "not implemented" in str(exc).lower():
        return False
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fakes = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in vals]
            out = n.attrs.call(fakes)
    except Exception:  # noqa: BLE001 - the call itself is wrong (shapes, dtypes): a simulator problem
        return False
    # the call as traced: same result shape and dtype as the rank's graph says
    return isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(n.shape) and out.dtype == n.dtype


@dataclass
class Simulation:
    seed: int
    inputs: list[torch.Tensor]  # global inputs
    seq: dict[str, torch.Tensor]  # sequential node name -> value
    ranks: list[dict[str, torch.Tensor]]  # per rank: node name -> value
    local_inputs: list[list[torch.Tensor]] = field(default_factory=list)

    def value(self, rank: int, node: str) -> torch.Tensor:
        return self.ranks[rank][node]


def integer_domains(seq: Graph, problem: Problem) -> dict[int, IdDomain]:
    """The values each integer input may take: its declared domain (``Problem.domains``), else what
    the operators reading it accept (token ids below an embedding's vocabulary; class targets of a
    loss plus its ``ignore_index``), else the range of the example tensor."""
    out: dict[int, IdDomain] = {}
    users = seq.users()
    declared = problem.id_domains()
    for n in seq.inputs:
        t = problem.inputs[n.attrs]
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            continue
        name = problem.input_names[n.attrs]
        if name in declared:
            out[n.attrs] = declared[name]
            continue
        dom = None
        for u in users.get(n.name, []):
            d = _accepted_by_use(u, n, users)
            if d is not None:
                dom = d if dom is None or len(dom.intersect(d)) == 0 else dom.intersect(d)
        if dom is None and t.device.type != "meta" and t.numel():
            dom = IdDomain.range(int(t.min()), int(t.max()) + 1)
        out[n.attrs] = dom if dom is not None else IdDomain.range(0, 2)
    return out


def _accepted_by_use(u: Node, n: Node, users, depth: int = 0) -> IdDomain | None:
    if u.op == "view" and depth < 3:
        for w in users.get(u.name, []):
            b = _accepted_by_use(w, u, users, depth + 1)
            if b is not None:
                return b
        return None
    if u.op != "call":
        return None
    kind = u.attrs.kind
    if kind == "embedding" and len(u.inputs) >= 2 and u.inputs[1] is n:
        return IdDomain.range(0, u.inputs[0].shape[0])
    if kind in ("nll_loss", "nll_loss_backward"):
        t_slot = u.attrs.slot_of("target")
        if t_slot is not None and t_slot < len(u.inputs) and u.inputs[t_slot] is n:
            x = u.inputs[u.attrs.slot_of("self")]
            classes = x.shape[-1] if len(x.shape) > 1 else (x.shape[0] if x.shape else 1)
            dom = IdDomain.range(0, classes)
            ii = u.attrs.arg("ignore_index", None)
            return dom.union(IdDomain.of_values([ii])) if isinstance(ii, int) else dom
    return None


def random_inputs(problem: Problem, seq: Graph, seed: int, adversarial: bool = False) -> list[torch.Tensor]:
    """Seeded random global inputs. Integer inputs are drawn from their domains with sentinels and
    boundaries over-represented. ``adversarial`` also puts zeros, negatives, exact ties and values
    that round differently in bfloat16/half into floating-point inputs."""
    g = torch.Generator().manual_seed(seed)
    domains = integer_domains(seq, problem)
    total = sum(math.prod(t.shape) for t in problem.inputs)
    if total > MAX_ELEMENTS:
        raise SimulationError(f"the inputs have {total} elements; simulation is limited to {MAX_ELEMENTS}")
    out = []
    for i, t in enumerate(problem.inputs):
        if t.dtype.is_floating_point:
            v = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if adversarial:
                v = _adversarial(v, g)
            v = v.to(t.dtype)
        elif t.dtype == torch.bool:
            v = torch.rand(t.shape, generator=g) > 0.5
        else:
            v = domains.get(i, IdDomain.range(0, 2)).sample(t.shape, g, dtype=t.dtype)
        out.append(v)
    return out


def _adversarial(v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Zeros, sign flips, exact ties and values just off a bfloat16/half grid point, mixed in."""
    if v.numel() < 2:
        return v
    flat = v.reshape(-1).clone()
    u = torch.rand(flat.shape, generator=g, dtype=torch.float64)
    off_grid = 1.0 + torch.randint(1, 8, flat.shape, generator=g).double() * 2.0 ** -12  # not bf16/half exact
    flat = torch.where(u < 0.08, torch.zeros_like(flat), flat)
    flat = torch.where((u >= 0.08) & (u < 0.16), -flat.abs(), flat)
    flat = torch.where((u >= 0.16) & (u < 0.26), off_grid * torch.sign(flat + 0.5), flat)
    tie = flat[torch.randint(0, flat.numel(), flat.shape, generator=g)]
    flat = torch.where((u >= 0.26) & (u < 0.32), tie, flat)
    return flat.reshape(v.shape)


def split_locals(problem: Problem, inputs: list[torch.Tensor], seed: int) -> list[list[torch.Tensor]]:
    W = problem.world_size
    g = torch.Generator().manual_seed(seed + 7919)
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(W)]
    for t, p in zip(inputs, problem.placements):
        if isinstance(p, Partial):
            parts = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for _ in range(W - 1)]
            parts.append(t - sum(parts) if parts else t)
            for r in range(W):
                per_rank[r].append(parts[r])
        else:
            for r in range(W):
                per_rank[r].append(local_input(t, p, r, W).contiguous().clone())
    return per_rank


def _eval_node(n: Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
    if n.op not in ("const", "call", "view", "permute", "slice", "cat", "expand"):
        raise SimulationError(f"cannot evaluate {n.op} ({n.name})")
    return apply_op(n.op, n.attrs, [env[i.name] for i in n.inputs])


def run_graph(g: Graph, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    env: dict[str, torch.Tensor] = {}
    for n in g.nodes:
        if n.op == "input":
            env[n.name] = inputs[n.attrs]
        else:
            env[n.name] = _eval_node(n, env)
    return env


def run_ranks(graphs: list[Graph], locals_: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """All ranks in lockstep; a collective completes once every member of its communicator (process
    group, matched by name and ranks as in the engine's index) has issued it and produced its input."""
    W = len(graphs)
    envs: list[dict[str, torch.Tensor]] = [{} for _ in range(W)]
    coll: dict[tuple, dict[int, Node]] = {}
    for g in graphs:
        for n in g.nodes:
            if n.op == "collective":
                coll.setdefault(n.attrs.key, {}).setdefault(g.rank, n)
    cursors = [0] * W
    while any(cursors[r] < len(graphs[r].nodes) for r in range(W)):
        progressed = False
        for r, g in enumerate(graphs):
            env = envs[r]
            while cursors[r] < len(g.nodes):
                n = g.nodes[cursors[r]]
                if n.op == "input":
                    env[n.name] = locals_[r][n.attrs]
                elif n.op == "collective":
                    v = _collective(n, r, coll, envs, cursors)
                    if v is None:
                        break
                    env[n.name] = v
                else:
                    try:
                        env[n.name] = _eval_node(n, env)
                    except SimulationError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        if _raised_by_operator(n, [env[i.name] for i in n.inputs], exc):
                            raise RankRaised(r, n, exc) from exc
                        raise SimulationError(f"rank {r}: {n.target} ({n.name}) at {n.source} failed on real "
                                              f"values: {type(exc).__name__}: {exc}") from exc
                cursors[r] += 1
                progressed = True
        if not progressed:
            waiting = "; ".join(_waiting_at(r, graphs[r].nodes[cursors[r]])
                                for r in range(W) if cursors[r] < len(graphs[r].nodes))
            raise SimulationError(f"the ranks' collectives do not line up (deadlock in simulation: {waiting})")
    return envs


def _waiting_at(rank: int, n: Node) -> str:
    where = f" on {n.attrs.where()}" if n.op == "collective" else ""
    return f"rank {rank} waits in {n.target} at {n.source}{where}"


def _collective(n: Node, rank: int, coll, envs, cursors) -> torch.Tensor | None:
    info = n.attrs
    group = tuple(info.group)
    members = coll[info.key]
    if info.kind == "send":  # the sent value; the peer's recv reads it from this rank's env
        return envs[rank].get(n.inputs[0].name)
    if info.kind == "recv":
        src = group[0]
        mn = members.get(src)
        if mn is None:
            raise SimulationError(f"rank {src} never sends transfer #{info.index} that rank {rank} receives at "
                                  f"{n.source} ({info.where()})")
        if cursors[src] < mn.index or mn.inputs[0].name not in envs[src]:
            return None
        v = envs[src][mn.inputs[0].name]
        if tuple(v.shape) != tuple(n.shape) or v.dtype != n.dtype:
            raise SimulationError(f"rank {rank}: recv at {n.source} got {tuple(v.shape)} {v.dtype} from rank {src}, "
                                  f"its buffer is {tuple(n.shape)} {n.dtype}")
        return v.clone()
    ins = []
    for m in group:
        mn = members.get(m)
        if mn is None:
            raise SimulationError(f"rank {m} never issues collective #{info.index} on {info.where()} "
                                  f"that rank {rank} issues at {n.source}")
        if cursors[m] < mn.index:
            return None  # rank m has not issued this collective yet
        key = mn.inputs[0].name
        if key not in envs[m]:
            return None
        ins.append(envs[m][key])
    kind, fn = info.kind, info.reduce_op
    v = _collective_value(n, rank, group, members, ins)
    if tuple(v.shape) != tuple(n.shape):
        raise SimulationError(f"rank {rank}: {info.describe()} at {n.source} produced shape {tuple(v.shape)}, "
                              f"its output has shape {tuple(n.shape)}")
    return v


def _collective_value(n: Node, rank: int, group, members, ins) -> torch.Tensor:
    from gg_notebook.engine.index import _is_stacked_gather, _is_stacked_scatter

    info = n.attrs
    kind, fn = info.kind, info.reduce_op
    if kind in ("all_reduce", "reduce_scatter_tensor"):
        total = _reduce(fn, ins)
        if kind == "all_reduce":
            return total
        pos = group.index(rank)
        if _is_stacked_scatter(n):
            return total[pos]
        size = n.shape[0]
        return total.narrow(0, pos * size, size)
    if kind == "all_gather":
        return ins[info.out_index]
    if kind == "all_gather_into_tensor":
        return torch.stack(ins, 0) if _is_stacked_gather(n) else torch.cat(ins, 0)
    if kind == "broadcast":
        return ins[group.index(info.src)] if info.src in group else ins[0]
    if kind == "all_to_all_single":
        pos = group.index(rank)
        pieces = []
        for j, m in enumerate(group):
            x = ins[j]
            splits = members[m].attrs.input_split_sizes or [x.shape[0] // len(group)] * len(group)
            off = sum(splits[:pos])
            pieces.append(x.narrow(0, off, splits[pos]))
        return torch.cat(pieces, 0)
    raise SimulationError(f"cannot simulate collective {kind}")


def _reduce(fn, xs):
    out = xs[0].clone()
    for x in xs[1:]:
        if fn in ("sum", "avg"):
            out = out + x
        elif fn == "max":
            out = torch.maximum(out, x)
        elif fn == "min":
            out = torch.minimum(out, x)
        elif fn == "product":
            out = out * x
        else:
            raise SimulationError(f"unknown reduction {fn}")
    if fn == "avg":
        out = out / len(xs)
    return out


@contextlib.contextmanager
def few_threads(elements: int):
    """Small tensors run fastest on one thread: intra-op threads only add synchronization (on a busy
    machine, tens of milliseconds per tiny matmul)."""
    before = torch.get_num_threads()
    if elements < SMALL_ELEMENTS and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


SMALL_ELEMENTS = 1_000_000


def simulate(problem: Problem, seq: Graph, graphs: list[Graph], seed: int = 0, adversarial: bool = False) -> Simulation:
    """Run everything on seeded random inputs (see `random_inputs`)."""
    with few_threads(sum(math.prod(t.shape) for t in problem.inputs)):
        return _simulate(problem, seq, graphs, seed, adversarial)


def _simulate(problem: Problem, seq: Graph, graphs: list[Graph], seed: int, adversarial: bool) -> Simulation:
    if any(getattr(g, "specialized", None) for g in (seq, *graphs)):
        # graphs captured for the routing of the example inputs (capture.specialize) stand for the
        # programs on those inputs only: every simulation runs on them
        inputs = [t.detach().clone() for t in problem.inputs]
    else:
        inputs = random_inputs(problem, seq, seed, adversarial)
    locals_ = split_locals(problem, inputs, seed)
    try:
        seq_env = run_graph(seq, inputs)
    except SimulationError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SimulationError(f"the sequential program failed on random inputs: {type(exc).__name__}: {exc}") from exc
    try:
        ranks = run_ranks(graphs, locals_)
    except RankRaised as exc:
        exc.seed, exc.inputs, exc.local_inputs = seed, inputs, locals_
        raise
    return Simulation(seed, inputs, seq_env, ranks, locals_)
