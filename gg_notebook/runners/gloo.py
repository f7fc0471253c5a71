"""Run a function on every rank in real processes: one forked process per rank, on a gloo process group.

`fork_ranks` is the one launcher of rank processes (`run_gloo` below runs a Problem's distributed
program with it; `gg_notebook.capture.specialize` records the values a rank's program reads with it):

- one child per rank with plain ``os.fork``, not multiprocessing: the caller may itself be a
  daemonic child (a capture in a forked worker), which multiprocessing does not let have children;
  forked, so the function and its closures need no pickling;
- rendezvous through a ``torch.distributed.FileStore`` in a fresh temporary directory made for the
  run and removed when every rank process is gone (after success, a failure or a timeout). No port
  is chosen: runs at the same time (two test processes, pytest-xdist workers) cannot meet in each
  other's rendezvous, as they could when a port was picked by binding port 0 and released before
  rank 0's TCP store bound it again;
- every rank process ends on its own: killed when its parent dies (so a killed caller leaves no
  rank waiting in a rendezvous, holding its pipes open) and ``timeout`` + 5 s after it started
  (`die_with_parent`); the parent waits at most ``timeout`` seconds for all ranks, then kills the
  ones still running and raises `RankTimeout` naming the lowest of them;
- each rank sends back ``(value, None)`` or ``(None, error)`` (the error as ``describe(exception)``)
  pickled through its own pipe; a rank that dies without sending says ``"the process died"``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from gg_notebook.problem import Problem
from gg_notebook.runners.inputs import local_inputs
from gg_notebook.runners.outputs import flat_outputs


class RankTimeout(TimeoutError):
    """Rank ``rank`` (the lowest still running) had not finished after ``timeout`` seconds."""

    def __init__(self, rank: int, timeout: float):
        super().__init__(f"rank {rank} timed out after {timeout:.0f} s")
        self.rank = rank
        self.timeout = timeout


def die_with_parent(parent: int, timeout: float) -> None:
    """Make this forked process end on its own: killed when its parent dies (a caller that is itself
    a killed child must not leave orphans waiting in a rendezvous, holding its pipes open), and
    after ``timeout`` seconds whatever it is doing."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not an inherited handler that raises and waits
    signal.alarm(max(1, int(timeout) + 5))


def _rank(work: Callable[[int], Any], rank: int, world_size: int, store_path: str, timeout: float,
          describe: Callable[[BaseException], str]) -> tuple:
    """In rank ``rank``'s process: join the gloo group through the file store, run ``work(rank)``."""
    try:
        torch.set_num_threads(1)
        if dist.is_initialized():  # inherited from the caller (a fake group of a capture)
            dist.destroy_process_group()
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        # every rank has joined the mesh before any can leave it: a rank whose work has no collective
        # would otherwise destroy its group while a peer is still connecting ("Connection closed by peer")
        dist.barrier()
        value = work(rank)
        if dist.is_initialized():
            dist.destroy_process_group()
        return value, None
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        return None, describe(e)


def fork_ranks(world_size: int, work: Callable[[int], Any], timeout: float = 120.0, *,
               describe: Callable[[BaseException], str] = repr,
               stop_at_first_error: bool = False) -> dict[int, tuple[Any, str | None]]:
    """``{rank: (work(rank), None) or (None, error)}`` from one forked gloo process per rank, in the
    order the ranks finished. With ``stop_at_first_error`` it returns as soon as a rank reports an
    error (the ranks still running are killed); otherwise it waits for every rank. Raises
    `RankTimeout` if not done within ``timeout`` seconds."""
    tmp = tempfile.mkdtemp(prefix="gg_gloo_")
    store_path = os.path.join(tmp, "store")
    parent = os.getpid()
    kids: list[tuple[int, int, int]] = []  # (rank, pid, read end of its pipe)
    got: dict[int, tuple[Any, str | None]] = {}
    try:
        for r in range(world_size):
            rd, wr = os.pipe()
            pid = os.fork()
            if pid == 0:  # the rank process
                code = 0
                try:
                    os.close(rd)
                    die_with_parent(parent, timeout)
                    out = _rank(work, r, world_size, store_path, timeout, describe)
                    try:
                        data = pickle.dumps(out)
                    except Exception as e:  # noqa: BLE001
                        data = pickle.dumps((None, f"its result cannot be sent back: {e}"))
                    with os.fdopen(wr, "wb") as f:
                        f.write(data)
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            os.close(wr)
            kids.append((r, pid, rd))
        pending = {rd: r for r, _, rd in kids}
        chunks: dict[int, list[bytes]] = {r: [] for r, _, _ in kids}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            ready = select.select(list(pending), [], [], left)[0] if left > 0 else []
            if not ready:
                raise RankTimeout(min(pending.values()), timeout)
            for rd in ready:
                r = pending[rd]
                b = os.read(rd, 1 << 20)
                if b:
                    chunks[r].append(b)
                    continue
                del pending[rd]
                got[r] = _received(chunks.pop(r))
                if stop_at_first_error and got[r][1] is not None:
                    return got
        return got
    finally:
        for r, pid, rd in kids:
            os.close(rd)
            try:
                if r not in got:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _received(chunks: list[bytes]) -> tuple[Any, str | None]:
    if not chunks:
        return None, "the process died"
    try:
        return pickle.loads(b"".join(chunks))
    except Exception as e:  # noqa: BLE001
        return None, f"its result cannot be read back: {e}"


def run_gloo(problem: Problem, timeout: float = 120.0) -> list[list[torch.Tensor]]:
    """Per-rank outputs (``outs[rank][k]``) of ``problem.distributed`` run by real gloo processes
    (`fork_ranks`); raises ``RuntimeError("rank r failed: ...")`` for the first rank that fails."""

    def work(rank: int) -> list:
        out = problem.distributed(*local_inputs(problem, rank))
        return [_Packed.of(l) if isinstance(l, torch.Tensor) else l for l in flat_outputs(out)]

    got = fork_ranks(problem.world_size, work, timeout, describe=repr, stop_at_first_error=True)
    for rank, (_, err) in got.items():
        if err is not None:
            raise RuntimeError(f"rank {rank} failed: {err}")
    return [[l.tensor() if isinstance(l, _Packed) else l for l in got[r][0]] for r in range(problem.world_size)]


class _Packed:
    """A tensor sent back from a rank process as its raw bytes (a numpy uint8 array pickles by value,
    whatever the tensor's subclass, storage or dtype: bfloat16 and float8 have no numpy dtype)."""

    def __init__(self, data, dtype: torch.dtype, shape: tuple) -> None:
        self.data, self.dtype, self.shape = data, dtype, shape

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Packed":
        t = t.detach().cpu().contiguous()
        return cls(t.reshape(-1).view(torch.uint8).numpy().copy(), t.dtype, tuple(t.shape))

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)
