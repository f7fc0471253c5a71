"""Run an example's distributed program on all ranks with real values and compare with the sequential one.

The default runner simulates the ``world_size`` ranks in this process with
``torch.distributed._local_tensor.LocalTensorMode`` on a ``"fake"`` process group: every tensor holds
one value per rank and c10d collectives are computed across them. ``dist.get_rank()`` is patched, for
the duration of the run, to return the per-rank symbolic int LocalTensorMode uses for device meshes,
so rank arithmetic (vocabulary offsets, ...) is evaluated per rank. ``backend="gloo"`` runs real
processes instead (forked, one per rank, gloo on 127.0.0.1).

This is a numeric check of the examples, independent of any verifier.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.utils import _pytree as pytree

from gg_notebook.problem import Layout, Problem


def local_inputs(problem: Problem, rank: int, partial_seed: int = 1234) -> tuple:
    """Rank ``rank``'s inputs; ``Partial()`` inputs are split randomly (seeded) instead of rank 0 holding all."""
    out = []
    for i, (t, p) in enumerate(zip(problem.inputs, problem.placements)):
        if isinstance(p, Partial):
            out.append(_random_partial_split(t, problem.world_size, partial_seed + i)[rank])
        else:
            out.append(_local(problem, t, p, rank))
    return tuple(out)


def _local(problem: Problem, t, p, rank):
    from gg_notebook.problem import local_input

    loc = local_input(t.detach(), p, rank, problem.world_size).clone()
    return loc.requires_grad_(t.requires_grad)


def _random_partial_split(t: torch.Tensor, world_size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(t.shape, generator=g, dtype=t.dtype) for _ in range(world_size - 1)]
    last = t.detach() - sum(parts, torch.zeros_like(t))
    return parts + [last]


def _flat_outputs(out: Any) -> list:
    leaves, _ = pytree.tree_flatten(out)
    return leaves


# ---------------------------------------------------------------------------------------- runners


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _patched_get_rank():
    from torch.distributed._local_tensor import LocalIntNode, enabled_local_tensor_mode

    original = dist.get_rank

    def get_rank(group=None):
        lm = enabled_local_tensor_mode()
        if lm is None:
            return original(group)
        return torch.SymInt(LocalIntNode({r: r for r in lm.ranks}))

    dist.get_rank = get_rank
    try:
        yield
    finally:
        dist.get_rank = original


def run_local_tensor(problem: Problem) -> list[list[torch.Tensor]]:
    """Per-rank outputs (``outs[rank][k]``) via LocalTensorMode."""
    from torch.distributed._local_tensor import LocalTensor, LocalTensorMode

    W = problem.world_size
    per_rank = [local_inputs(problem, r) for r in range(W)]
    with _fake_process_group(W), _patched_get_rank(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with LocalTensorMode(W):
            args = []
            for i in range(len(problem.inputs)):
                locs = {r: per_rank[r][i].detach() for r in range(W)}
                lt = LocalTensor(locs)
                if problem.inputs[i].requires_grad:
                    lt.requires_grad_()
                args.append(lt)
            out = problem.distributed(*args)
        leaves = _flat_outputs(out)
        result = [[] for _ in range(W)]
        for leaf in leaves:
            for r in range(W):
                if isinstance(leaf, LocalTensor):
                    result[r].append(leaf._local_tensors[r].detach())
                elif isinstance(leaf, torch.Tensor):
                    result[r].append(leaf.detach())
                else:
                    result[r].append(leaf)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(problem, rank, port, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=problem.world_size)
        out = problem.distributed(*local_inputs(problem, rank))
        # numpy arrays pickle by value: torch tensors would travel as shared-memory handles that die
        # with this process before the parent has opened them
        leaves = [(l.detach().cpu().numpy().copy(), l.dtype) if isinstance(l, torch.Tensor) else l
                  for l in _flat_outputs(out)]
        queue.put((rank, leaves, None))
        dist.destroy_process_group()
    except BaseException as e:  # pragma: no cover - reported to the parent
        queue.put((rank, None, repr(e)))


def run_gloo(problem: Problem, timeout: float = 120.0) -> list[list[torch.Tensor]]:
    """Per-rank outputs from real gloo processes (forked, so closures need no pickling)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(problem, r, port, queue)) for r in range(problem.world_size)]
    for p in procs:
        p.start()
    results: dict[int, list] = {}
    try:
        for _ in procs:
            rank, leaves, err = queue.get(timeout=timeout)
            if err is not None:
                raise RuntimeError(f"rank {rank} failed: {err}")
            results[rank] = [torch.from_numpy(l[0]).to(l[1]) if isinstance(l, tuple) and len(l) == 2
                             and hasattr(l[0], "dtype") else l for l in leaves]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(problem.world_size)]


def run_distributed(problem: Problem, backend: str = "auto") -> list[list[torch.Tensor]]:
    """Per-rank outputs; ``backend`` is ``"local"``, ``"gloo"`` or ``"auto"`` (local, gloo on failure)."""
    if backend == "local":
        return run_local_tensor(problem)
    if backend == "gloo":
        return run_gloo(problem)
    try:
        return run_local_tensor(problem)
    except Exception:
        return run_gloo(problem)


def run_sequential(problem: Problem) -> list[torch.Tensor]:
    args = [t.detach().clone().requires_grad_(t.requires_grad) for t in problem.inputs]
    return [l.detach() if isinstance(l, torch.Tensor) else l for l in _flat_outputs(problem.sequential(*args))]


def combine(per_rank: Sequence[torch.Tensor], placement) -> torch.Tensor | None:
    """The global tensor the ranks' outputs stand for under ``placement`` (None if they disagree on Replicate)."""
    if isinstance(placement, Shard):
        return torch.cat(list(per_rank), dim=placement.dim)
    if isinstance(placement, Partial):
        return sum(per_rank[1:], per_rank[0].clone())
    if isinstance(placement, Replicate):
        return per_rank[0]
    from gg_notebook.problem import OnRank

    if isinstance(placement, OnRank):
        return per_rank[placement.rank]
    raise ValueError(f"unsupported expect placement {placement!r}")


def compare(problem: Problem, backend: str = "auto", rtol: float = 1e-6) -> tuple[bool, str]:
    """Whether the distributed program's combined outputs match the sequential outputs."""
    seq = run_sequential(problem)
    ranks = run_distributed(problem, backend)
    expect = problem.expect or (Replicate(),) * len(seq)
    if any(len(r) != len(seq) for r in ranks):
        return False, f"ranks return {[len(r) for r in ranks]} outputs, sequential {len(seq)}"
    for k, (s, e) in enumerate(zip(seq, expect)):
        outs = [r[k] for r in ranks]
        if isinstance(e, Replicate):
            for r, o in enumerate(outs):
                msg = _mismatch(o, s, rtol)
                if msg:
                    return False, f"output {k} on rank {r}: {msg}"
            continue
        if isinstance(e, Layout):  # every rank's output is its piece of the sequential output
            for r, o in enumerate(outs):
                msg = _mismatch(o, e.fn(s, r, problem.world_size), rtol)
                if msg:
                    return False, f"output {k} on rank {r} (per {e!r}): {msg}"
            continue
        try:
            full = combine(outs, e)
        except RuntimeError as err:
            return False, f"output {k}: cannot combine per {e}: {err}"
        msg = _mismatch(full, s, rtol)
        if msg:
            return False, f"output {k} combined per {e}: {msg}"
    return True, "match"


def _mismatch(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype.is_floating_point or want.dtype.is_floating_point:
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
        err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        return None if err <= rtol * scale else f"max abs error {err:.3g} (scale {scale:.3g})"
    return None if torch.equal(got, want) else "integer values differ"
