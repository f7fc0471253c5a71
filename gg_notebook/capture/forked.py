"""Run a function on each of several items, each call in a fresh forked process; results by value.

A forked child starts as a copy of this process at the moment of the fork: the user's modules are
imported, their module-level state is what it was before any capture ran, and nothing one call does
(global counters, caches, process groups) is seen by another call or by this process. That is how a
distributed job runs its ranks, each in its own process.

Why not `multiprocessing.Pool(maxtasksperchild=1)` or `ProcessPoolExecutor`: a pool never returns
when a worker dies (segfault, ``os._exit``) and hangs, and `ProcessPoolExecutor` refuses
``max_tasks_per_child`` with the fork start method (and on a death breaks every pending call
without saying which one died). Here every call is one `multiprocessing.Process` with one pipe;
`multiprocessing.connection.wait` tells when a result arrives or a child died.

In the child: ``torch.set_num_threads(1)``; ``sys.stdout`` / ``sys.stderr`` (and logging handlers
writing to them) go to buffers that the parent prints after the call, so a child forked from a
Jupyter kernel never touches the kernel's I/O channels; the child ends with ``os._exit`` (no atexit
handlers of the parent run). Results and exceptions travel pickled by `gg_notebook.ir.serialize`;
an exception comes back with its type, message and attributes, its child-side traceback attached
as ``__cause__``.

A child that waits for its parent (`capture.programs`: the representative's trace waits for the
other ranks' recordings) calls `waiting` around the wait: while it waits it holds no worker slot,
so another call runs on its core.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from typing import Any, Callable, Sequence

from gg_notebook.frozen import frozen
from gg_notebook.ir import serialize


def fork_available() -> bool:
    """Whether this platform forks safely (Linux and other non-macOS POSIX systems)."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and sys.platform != "darwin"  # fork is unsafe with system frameworks on macOS
        and not multiprocessing.current_process().daemon  # daemonic processes cannot have children
    )


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a forked child (attached as its ``__cause__``)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class ResultNotSent(RuntimeError):
    """A child finished its call but its result could not be pickled back to the parent."""


class ChildDied(Exception):
    """The child running ``items[index]`` ended without sending a result; ``how`` says how it
    ended, e.g. "was killed by signal SIGSEGV"."""

    def __init__(self, index: int, how: str) -> None:
        super().__init__(f"call {index} {how}")
        self.index = index
        self.how = how


def run_forked(fn: Callable[[Any], Any], items: Sequence[Any], workers: int,
               then: Callable[[int, Any], Sequence[Any]] | None = None,
               on_failure: Callable[[int], None] | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, each call in its own forked child, at most ``workers`` at a time
    (a child inside `waiting` does not count).

    ``then(i, result)``, if given, is called here as each call's result arrives and returns items to
    append (run like the others; their results follow in the returned list): work that depends on
    earlier results starts as soon as they are in, while other children still run. A child may also
    hand over a value before it ends (`hand_over`): ``then(i, Interim(value))`` is called with it.

    If calls raise, the exception of the first failing item (in ``items`` order) is raised here, as
    the sequential loop would; `ChildDied` if a child ends without a result. ``on_failure(i)`` is
    called when item i is the first to fail so far (a child waiting for this process must then be
    released, or it would wait forever). Output the children print is printed here, in ``items`` order."""
    ctx = multiprocessing.get_context("fork")
    items = list(items)
    todo = list(range(len(items)))
    running: dict[multiprocessing.connection.Connection, tuple[int, multiprocessing.Process]] = {}
    idle: set[int] = set()  # children inside `waiting`
    outcomes: dict[int, tuple[str, Any, str, str]] = {}
    first_failure: int | None = None
    # a child's garbage collections then leave the parent's objects (and their pages) alone
    heap = contextlib.ExitStack()
    heap.enter_context(frozen())
    try:
        while todo or running:
            while (todo and len(running) - len(idle) < max(1, workers)
                   and (first_failure is None or todo[0] < first_failure)):
                i = todo.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, items[i], send), daemon=True,
                                   name=f"gg-capture-{i}")
                proc.start()
                send.close()  # the child's copy is the only writer: EOF here means it ended
                running[recv] = (i, proc)
            if first_failure is not None:  # nothing after the first failure can change the outcome
                todo = [i for i in todo if i < first_failure]
                for conn, (i, proc) in list(running.items()):
                    if i > first_failure:
                        _stop(proc)
                        conn.close()
                        del running[conn]
                if not running:
                    continue
            for conn in multiprocessing.connection.wait(list(running)):
                i, proc = running[conn]
                data = _read(conn)
                if data in (_IDLE, _BUSY):  # the child started or stopped waiting for this process
                    (idle.add if data == _IDLE else idle.discard)(i)
                    continue
                if data is not None and data.startswith(_INTERIM):  # a value handed over mid-way
                    if then is not None and first_failure is None:
                        new = list(then(i, Interim(serialize.loads(data[len(_INTERIM):]))))
                        todo.extend(range(len(items), len(items) + len(new)))
                        items.extend(new)
                    continue
                del running[conn]
                idle.discard(i)
                outcome = _receive(data, conn, proc)
                outcomes[i] = outcome
                if outcome[0] != "ok" and (first_failure is None or i < first_failure):
                    first_failure = i
                    if on_failure is not None:
                        on_failure(i)
                elif outcome[0] == "ok" and then is not None and first_failure is None:
                    new = list(then(i, outcome[1]))
                    todo.extend(range(len(items), len(items) + len(new)))
                    items.extend(new)
    finally:
        for conn, (_, proc) in running.items():
            _stop(proc)
            conn.close()
        heap.close()
    for i in sorted(outcomes):
        _forward_output(outcomes[i][2], outcomes[i][3])
    if first_failure is not None:
        kind, payload, _, _ = outcomes[first_failure]
        if kind == "died":
            raise ChildDied(first_failure, payload)
        raise rebuild_exception(payload)
    return [outcomes[i][1] for i in range(len(items))]


_IDLE, _BUSY = b"\x00gg-waiting", b"\x00gg-working"  # never the start of a pickle (b"\x80...")
_INTERIM = b"\x00gg-interim:"


class Interim:
    """A value a child handed over before its result (`hand_over`), as ``then`` receives it."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _read(conn) -> bytes | None:
    """The child's next message (a `waiting` status or its result), or None if it ended without one."""
    try:
        return conn.recv_bytes()
    except (EOFError, OSError):
        return None


def _receive(data: bytes | None, conn, proc) -> tuple[str, Any, str, str]:
    """("ok", value, stdout, stderr) | ("error", exception payload, ...) | ("died", how, "", "")."""
    conn.close()
    proc.join()
    if data is None:
        return "died", _how_it_ended(proc.exitcode), "", ""
    return serialize.loads(data)


def _how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} without sending its result"


def _stop(proc) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join()


def _forward_output(out: str, err: str) -> None:
    if out:
        sys.stdout.write(out)
    if err:
        sys.stderr.write(err)


# ----------------------------------------------------------------------------------- child side


_to_parent = None  # in a child: its connection to the parent (for `waiting`)


@contextlib.contextmanager
def waiting():
    """Within: this child waits for its parent (for data the parent sends when other calls finish),
    and holds no worker slot meanwhile. Outside a `run_forked` child: nothing."""
    conn = _to_parent
    if conn is not None:
        conn.send_bytes(_IDLE)
    try:
        yield
    finally:
        if conn is not None:
            conn.send_bytes(_BUSY)


def hand_over(value: Any) -> bool:
    """In a `run_forked` child: send ``value`` to the parent now (its ``then`` receives it as an
    `Interim`) and go on. False (nothing sent) outside such a child."""
    conn = _to_parent
    if conn is None:
        return False
    conn.send_bytes(_INTERIM + serialize.dumps(value))
    return True


def _child(fn, item, conn) -> None:
    global _to_parent
    _to_parent = conn
    gc.disable()  # short-lived: collecting would touch (and copy) every page shared with the parent
    out, err = io.StringIO(), io.StringIO()
    _detach_from_parent_io(out, err)
    try:
        import torch

        torch.set_num_threads(1)
        outcome = ("ok", fn(item))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        outcome = ("error", exception_payload(e))
    try:
        data = serialize.dumps(outcome + (out.getvalue(), err.getvalue()))
    except BaseException as e:  # noqa: BLE001
        problem = ResultNotSent(f"the result could not be sent back to the parent process: {type(e).__name__}: {e}")
        problem.item = item
        data = serialize.dumps(("error", exception_payload(problem), out.getvalue(), err.getvalue()))
    try:
        conn.send_bytes(data)
        conn.close()
    finally:
        os._exit(0)


def _detach_from_parent_io(out: io.StringIO, err: io.StringIO) -> None:
    """Point this child's Python-level output at ``out`` / ``err``, including logging handlers."""
    old = {id(sys.stdout): out, id(sys.stderr): err}
    sys.stdout, sys.stderr = out, err
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and id(h.stream) in old:
                h.stream = old[id(h.stream)]


# ----------------------------------------------------------------------------------- exceptions


def exception_payload(e: BaseException) -> dict:
    """Plain data for ``e``: its class (by name), args and attributes, and its formatted traceback."""

    def portable(v):
        try:
            serialize.dumps(v)
            return v
        except Exception:  # noqa: BLE001
            return repr(v)

    return {
        "module": type(e).__module__,
        "qualname": type(e).__qualname__,
        "args": tuple(portable(a) for a in e.args),
        "attrs": {k: portable(v) for k, v in vars(e).items()} if hasattr(e, "__dict__") else {},
        "text": str(e),
        "traceback": "".join(traceback.format_exception(e)),
    }


def rebuild_exception(p: dict) -> BaseException:
    """The exception ``exception_payload`` described, of its original class when that class can be
    found here (else a RuntimeError naming it), with the child's traceback as ``__cause__``."""
    cls = None
    try:
        obj = importlib.import_module(p["module"])
        for part in p["qualname"].split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            cls = obj
    except Exception:  # noqa: BLE001 - e.g. a class defined inside a function
        cls = None
    if cls is None:
        exc: BaseException = RuntimeError(f"{p['qualname']}: {p['text']}")
    else:
        exc = cls.__new__(cls)
        exc.args = p["args"]
        try:
            exc.__dict__.update(p["attrs"])
        except AttributeError:  # pragma: no cover - no instance dict
            pass
    exc.__cause__ = RemoteTraceback("\n" + p["traceback"].rstrip())
    return exc
