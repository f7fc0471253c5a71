"""Capture a program for the routing of its example inputs: tensor values read into Python.

A dropless mixture-of-experts layer sorts its tokens by expert and exchanges them with
``all_to_all_single(out, inp, output_split_sizes=counts.tolist(), ...)``: the split sizes are
tensor values, read into Python. Tracing on fake tensors cannot know them. When a program reads
tensor values with ``.tolist()``, `trace_program` asks this module to capture it *for the given
inputs*:

1. `recorded_reads` runs the program for real on the problem's example inputs (the sequential
   program in this process; a rank's program in one real gloo process per rank, forked by the
   shared launcher `gg_notebook.runners.gloo.fork_ranks`, since its reads depend on what the other
   ranks send) and records every value it reads, in order;
2. `replaying` traces it again, each read answered with the recorded value (a Python constant in
   the graph: the split sizes are those of this input);
3. `fold_routing_indices` replaces every index tensor that is computed from floating-point data
   (the sorting permutation of the tokens, ``argsort(expert_ids)``, its inverse, ``order // k``) by
   its value on the example inputs: the graph then moves rows by constant indices, which lowering
   turns into slices (`gg_notebook.ir.lower`).

The graph then stands for the program only on inputs that route like the example (the same values
read, the same permutations), so it carries ``gm.meta["gg_specialized"]``: the assumption, in plain
words, that `gg_notebook.engine.judge` reports (the verdict is at most "assumed", never "proved"),
and the concrete checks run on the example inputs only (`gg_notebook.concrete.simulate`).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from gg_notebook.capture.errors import CaptureError, program_name
from gg_notebook.capture.source import is_user_file
from gg_notebook.runners.gloo import RankTimeout, fork_ranks

# Only ``.tolist()`` (split sizes, counts per expert) is specialized: a single value read with
# ``.item()``, ``int(t)`` or ``if t > 0:`` keeps its refusal (tracing.py), which shows how to keep it
# a tensor; those are seldom routing and usually have a fixed-shape spelling.
_METHODS = ("tolist",)


def _user_site() -> str | None:
    for f in reversed(traceback.extract_stack()):
        if is_user_file(f.filename):
            line = (f.line or "").strip()
            return f"{os.path.relpath(f.filename) if not os.path.relpath(f.filename).startswith('..') else f.filename}" \
                   f":{f.lineno}" + (f" (`{line}`)" if line else "")
    return None


def _classes() -> list[type]:
    from torch._subclasses.fake_tensor import FakeTensor

    return [torch.Tensor, FakeTensor]  # FakeTensor has its own tolist (reading item by item)


@contextlib.contextmanager
def _patched(wrap: Callable[[str, Callable], Callable]) -> Iterator[None]:
    # torch.Tensor's methods live on its C base class: a Python attribute shadows them (and is
    # deleted afterwards); FakeTensor's own tolist is replaced and restored
    originals = [(cls, m, cls.__dict__.get(m)) for cls in _classes() for m in _METHODS
                 if cls is torch.Tensor or m in cls.__dict__]
    try:
        for cls, m, _ in originals:
            setattr(cls, m, wrap(m, getattr(cls, m)))
        yield
    finally:
        for cls, m, f in originals:
            if f is None:
                delattr(cls, m)
            else:
                setattr(cls, m, f)


@contextlib.contextmanager
def recording(reads: list) -> Iterator[None]:
    """Record ``(method, shape, value, site)`` for every tensor value read into Python."""
    depth = [0]

    def wrap(m, f):
        def read(self, *a, **k):
            if depth[0]:
                return f(self, *a, **k)
            depth[0] += 1
            try:
                v = f(self, *a, **k)
            finally:
                depth[0] -= 1
            reads.append((m, tuple(self.shape), v, _user_site()))
            return v
        return read

    with _patched(wrap):
        yield


@contextlib.contextmanager
def replaying(reads: list, rank: int | None) -> Iterator[list]:
    """Answer every value read with the next recorded one (the sites used are collected in the
    yielded list)."""
    pos = [0]
    used: list = []

    def wrap(m, f):
        def read(self, *a, **k):
            if pos[0] >= len(reads):
                raise CaptureError(
                    f"{program_name(rank)} reads a tensor value into Python ({m}) at {_user_site()} more often "
                    "while traced than when run on the example inputs: the reads cannot be matched.", rank=rank)
            rm, shape, v, site = reads[pos[0]]
            if rm != m or shape != tuple(self.shape):
                raise CaptureError(
                    f"{program_name(rank)} reads tensor values into Python in another order while traced "
                    f"({m} of shape {tuple(self.shape)} at {_user_site()}) than when run on the example inputs "
                    f"({rm} of shape {shape} at {site}).", rank=rank)
            pos[0] += 1
            used.append(site)
            return v
        return read

    with _patched(wrap):
        yield used




# --------------------------------------------------------------------------------------------------
# Real runs on the example inputs


def _concrete_inputs(problem, rank: int | None) -> list[torch.Tensor]:
    from gg_notebook.problem import Partial, local_input

    out = []
    for t, p in zip(problem.inputs, problem.placements):
        loc = t if rank is None else local_input(t, p, rank, problem.world_size)
        out.append(loc.detach().clone().requires_grad_(t.requires_grad))
    return out


def _check_concrete(problem, rank: int | None, why: str) -> None:
    from gg_notebook.problem import Partial

    bad = [n for n, t in zip(problem.input_names, problem.inputs) if t.device.type == "meta"]
    if bad:
        raise CaptureError(
            f"{program_name(rank)} {why}; gg_notebook captures such a program for the routing of concrete example "
            f"inputs, but input {bad[0]} is a meta tensor (shape only): pass tensors with values.", rank=rank)
    part = [n for n, p in zip(problem.input_names, problem.placements) if isinstance(p, Partial)]
    if part:
        raise CaptureError(
            f"{program_name(rank)} {why}; gg_notebook captures such a program only for the routing of the example "
            f"inputs, which a Partial() input ({part[0]}) does not fix (its split among the ranks is arbitrary).",
            rank=rank)


def _recorded_ranks(problem, session, timeout: float) -> dict:
    """Every rank's ``(reads, error)``, from one real gloo process per rank (`gg_notebook.runners.gloo`)."""

    def work(rank: int) -> list:
        reads: list = []
        with session(problem.distributed, rank, problem.world_size) as fn, recording(reads):
            fn(*_concrete_inputs(problem, rank))
        return reads

    try:
        return fork_ranks(problem.world_size, work, timeout, describe=lambda e: f"{type(e).__name__}: {e}")
    except RankTimeout as e:
        raise CaptureError(f"running rank {e.rank} on the example inputs timed out after {timeout:.0f} s",
                           rank=e.rank) from None


def recorded_reads(problem, rank: int | None, session, timeout: float = 120.0) -> list:
    """The values ``rank``'s program (None: the sequential one) reads into Python on the example
    inputs, in program order: ``[(method, shape, value, site)]``."""
    if rank is None:
        reads: list = []
        with session(problem.sequential, None, problem.world_size) as fn, recording(reads):
            fn(*_concrete_inputs(problem, None))
        return reads
    got = _recorded_ranks(problem, session, timeout)
    for r in sorted(got):
        reads, err = got[r]
        if err is not None:
            raise CaptureError(
                f"rank {r}'s program failed when run for real on the example inputs (to learn the values it "
                f"reads into Python): {err}", rank=r)
    return got[rank][0]


# --------------------------------------------------------------------------------------------------
# Index tensors computed from floating-point data -> constants of the example inputs

aten = torch.ops.aten
# overload -> positions of its index arguments (an int: that argument; a (i,) tuple: a list argument)
_INDEXING = {
    aten.index.Tensor: ((1,),), aten.index_put.default: ((1,),), aten.index_select.default: (2,),
    aten.gather.default: (2,), aten.scatter.src: (2,), aten.scatter.value: (2,), aten.scatter_add.default: (2,),
    aten.index_add.default: (2,), aten.index_copy.default: (2,), aten.scatter_reduce.two: (2,),
}


def _index_args(n: fx.Node) -> list[fx.Node]:
    out = []
    for pos in _INDEXING.get(n.target, ()):
        if isinstance(pos, tuple):
            lst = n.args[pos[0]] if len(n.args) > pos[0] else ()
            out += [a for a in (lst or ()) if isinstance(a, fx.Node)]
        elif len(n.args) > pos and isinstance(n.args[pos], fx.Node):
            out.append(n.args[pos])
    return out


def _is_collective(n: fx.Node) -> bool:
    return bool(n.meta.get("gg_collective")) or "collective" in getattr(n.target, "__name__", "")


def fold_routing_indices(gm: fx.GraphModule, args: list[torch.Tensor]) -> list[str]:
    """Replace the index tensors computed from floating-point inputs by their values on ``args``
    (the concrete inputs of the program); returns the source sites of the folded ones."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    float_ph = {p for p, a in zip(placeholders, args) if a.dtype.is_floating_point or a.dtype.is_complex}
    # which nodes depend on floating-point data, and on a collective
    data: set = set()
    comm: set = set()
    for n in g.nodes:
        ins = n.all_input_nodes
        if n in float_ph or any(i in data for i in ins):
            data.add(n)
        if (n.op == "call_function" and _is_collective(n)) or any(i in comm for i in ins):
            comm.add(n)
    targets = []
    for n in g.nodes:
        if n.op == "call_function" and n.target in _INDEXING:
            for a in _index_args(n):
                v = a.meta.get("val")
                if a in data and a not in comm and a not in targets and isinstance(v, torch.Tensor) \
                        and not v.dtype.is_floating_point:
                    targets.append(a)
    if not targets:
        return []
    needed: set = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    env: dict = {}
    by_ph = dict(zip(placeholders, args))
    for n in g.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            env[n] = by_ph[n].detach()
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target)
        elif n.op == "call_function":
            a, k = fx.node.map_arg((n.args, n.kwargs), lambda x: env[x])
            with torch.no_grad():
                env[n] = n.target(*a, **k)
    sites = []
    for i, t in enumerate(targets):
        name = f"_gg_routing_{i}"
        gm.register_buffer(name, env[t].detach().clone())
        with g.inserting_before(t):
            c = g.get_attr(name)
        c.meta.update({k: t.meta[k] for k in ("val", "gg_source", "gg_frames") if k in t.meta})
        t.replace_all_uses_with(c)
        # the get_attr must come before every user: it was inserted before t, which precedes them
        src = t.meta.get("gg_source")
        frames = t.meta.get("gg_frames") or []
        code = frames[-1][3] if frames and len(frames[-1]) > 3 and frames[-1][3] else None
        sites.append(f"{src}" + (f" (`{code}`)" if code else "") if src else t.name)
    g.lint()
    gm.recompile()
    return sites


def assumption(rank: int | None, reads: list, folded: list[str]) -> str:
    """The plain-words assumption a specialized capture stands under (``reads``: the sites of the
    values replayed, one per read)."""
    what = []
    sites = list(dict.fromkeys(s for s in reads if s))
    if reads:
        what.append(f"{len(reads)} value read(s) into Python" + (f" at {', '.join(sites)}" if sites else ""))
    if folded:
        what.append(f"the index tensor(s) at {', '.join(dict.fromkeys(folded))}")
    return (f"captured for the routing of the given inputs: {program_name(rank)} was traced with "
            f"{' and '.join(what)} fixed to their values on the example inputs; the verdict holds only for "
            "inputs that route the same way")


__all__: list[Any] = ["recorded_reads", "recording", "replaying", "fold_routing_indices", "assumption"]
