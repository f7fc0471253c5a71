"""Trace the sequential program and every rank's program to value-semantics fx graphs.

Each rank r is traced under a fake process group (``init_process_group("fake")`` with rank r) on
fake tensors: no real memory is allocated and ``dist.get_rank()`` is a constant in rank r's graph, so
every rank is traced. The first pass (autograd included) is written by `direct_trace` (make_fx's graph
without its proxies) or, where that refuses, by make_fx; functionalization replays it where its writes
are not local (`_trace`).

`trace_program` traces one program; `capture.programs` runs it for every rank, each in its own
process (the semantics of a real job). `capture_problem` traces everything in *this* process and
returns the fx graphs: there a user module that keeps global state (a counter, a cache) leaks it
from one rank's trace into the next, which a real job never does.
"""

from __future__ import annotations

import operator
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from gg_notebook.capture.collectives import (
    IssuedCollective,
    MatchedCollective,
    clear_replay,
    collective_result,
    collective_shims,
    finish_collectives,
    issued_collectives,
    match_collectives,
    record_group_origins,
    replay_collective,
    rewrite_collectives,
)
from gg_notebook.capture.errors import CaptureError, program_name
from gg_notebook.capture.masked_select import has_unbacked, has_unbacked_val, lower_selections
from gg_notebook.capture.source import extra_node_meta, format_source, record_sources, user_frames_of_traceback
from gg_notebook.capture.data_assignment import UntraceableAssignment, follow_data_assignments
from gg_notebook.capture.direct_trace import trace_directly
from gg_notebook.problem import Layout, Problem, Replicate, local_input


@dataclass
class CapturedProgram:
    """The graphs of one `Problem`: ``ranks[r]`` is rank r's graph; collectives are matched."""

    sequential: fx.GraphModule
    ranks: list[fx.GraphModule]
    world_size: int
    collectives: list[MatchedCollective]
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Fake process group


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """A fake (no-communication) default process group for ``rank``; destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise CaptureError(
            "torch.distributed is already initialized in this process, but gg_notebook traces each rank "
            "under its own fake process group: call torch.distributed.destroy_process_group() first.",
            rank=rank,
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Inputs


def _fake_device(t: torch.Tensor) -> torch.device:
    """The device of ``t``'s fake stand-in: meta tensors become CPU."""
    return torch.device("cpu") if t.device.type == "meta" else t.device


def _fake_empty(mode: FakeTensorMode, shape, dtype: torch.dtype, device: torch.device,
                requires_grad: bool) -> torch.Tensor:
    with mode:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if requires_grad and (dtype.is_floating_point or dtype.is_complex):
        out.requires_grad_(True)
    return out


def _fake_like(mode: FakeTensorMode, t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A fresh contiguous fake tensor with t's shape/dtype (meta tensors become CPU)."""
    return _fake_empty(mode, t.shape, t.dtype, _fake_device(t), requires_grad)


def _global_fakes(mode: FakeTensorMode, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [_fake_like(mode, t, t.requires_grad) for t in inputs]


def _local_fakes(problem: Problem, mode: FakeTensorMode, globals_: list[torch.Tensor] | None,
                 rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s local inputs: fresh contiguous fake tensors of the shapes `local_input` gives.

    A built-in placement (Replicate, Shard, Partial) only picks a shape: it is run on a plain meta
    tensor (no fake-tensor dispatch: a 405B-shaped program has thousands of inputs); a `Layout`'s
    function runs on the global input's fake stand-in (``globals_[i]``, made here if None), as does
    a built-in placement whose meta run raises (so that its error is reported as for a Layout)."""
    out = []
    for i, (p, orig) in enumerate(zip(problem.placements, problem.inputs)):
        if not isinstance(p, Layout):
            try:
                with torch.no_grad():
                    loc = local_input(torch.empty(tuple(orig.shape), dtype=orig.dtype, device="meta"), p, rank,
                                      problem.world_size)
            except Exception:  # noqa: BLE001 - reported from the fake run below
                pass
            else:
                out.append(_fake_empty(mode, loc.shape, loc.dtype, _fake_device(orig), orig.requires_grad))
                continue
        g = globals_[i] if globals_ is not None else _fake_like(mode, orig, orig.requires_grad)
        try:
            with mode, torch.no_grad():
                loc = local_input(g, p, rank, problem.world_size)
        except Exception as e:
            frames = user_frames_of_traceback(e.__traceback__)
            src = format_source(frames[-1]) if frames else None
            raise CaptureError(
                f"rank {rank}: deriving local input {i} ({problem.input_names[i]}) with placement {p!r} "
                f"raised {type(e).__name__}{f' at {src}' if src else ''}: {e}. Fix the placement or layout "
                f"function so that it works on a tensor of shape {tuple(orig.shape)}.",
                rank=rank, source=src,
            ) from e
        out.append(_fake_like(mode, loc, orig.requires_grad))
    return out


# --------------------------------------------------------------------------------------------------
# Tracing one program

_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)


def _is_data_dependent(e: BaseException) -> bool:
    return _data_dependent_kind(e) is not None


def _data_dependent_kind(e: BaseException) -> str | None:
    """"shape" for an operator whose output shape depends on tensor values (``x[mask]``,
    masked_select, nonzero, unique), "value" for any other read of tensor values into Python
    (``.item()``, ``if t > 0:``), None if ``e`` is not about data dependence."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DynamicOutputShapeException):
            return "shape"
        if isinstance(e, _DATA_DEPENDENT) or "data-dependent" in str(e) or "data dependent" in str(e):
            return "value"
        e = e.__cause__ or e.__context__
    return None


def _shape_message(prog: str, at: str, code: str, why: str) -> str:
    return (
        f"{prog}: an operator whose result's shape depends on tensor values cannot be traced{at}{code} "
        f"({why}): boolean-mask indexing `x[mask]`, torch.masked_select, nonzero and "
        "unique keep only the selected elements; gg_notebook accepts such a selection only where it is "
        "reduced at once (`x[mask].sum()`, `.mean()`, `.numel()`). Keep the shape fixed and weight by the mask "
        "instead: a masked mean `x[mask].mean()` is `(x * mask).sum() / mask.sum()` (or `torch.where(mask, x, 0)"
        ".sum() / mask.sum()`), a masked sum is `(x * mask).sum()`, and `x.masked_fill(~mask, 0)` zeroes the rest."
    )


def _selection_refused(n: fx.Node, rank: int | None) -> CaptureError:
    """The clear refusal for a data-dependent shape left after `masked_select.lower_selections`."""
    src = n.meta.get("gg_source")
    frames = n.meta.get("gg_frames") or []
    line = frames[-1][3] if frames and len(frames[-1]) > 3 else None
    at = f" at {src}" if src else ""
    code = f" (`{line}`)" if line else ""
    why = n.meta.get("gg_refused") or "its result is used other than through a reduction"
    what = getattr(n.target, "__name__", str(n.target))
    return CaptureError(_shape_message(program_name(rank), at, code, f"{what}: {why}"), rank=rank, source=src)


def _with_shape_env(args: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The same fake inputs in a mode whose shape environment allows data-dependent (unbacked) sizes
    (None if ``args`` already are)."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    old = detect_fake_mode(args)
    if old is not None and old.shape_env is not None:
        return None
    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [_fake_like(mode, a, a.requires_grad) for a in args]


def _error(e: BaseException, rank: int | None, shapes: list[tuple]) -> CaptureError:
    frames = user_frames_of_traceback(e.__traceback__)
    frame = frames[-1] if frames else None
    src = format_source(frame)
    prog = program_name(rank)
    at = f" at {src}" if src else ""
    code = f" (`{frame[3]}`)" if frame and frame[3] else ""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = _data_dependent_kind(e)
    if isinstance(e, UntraceableAssignment):
        msg = f"{prog}: {text}{at}{code}."
    elif kind == "shape":
        msg = _shape_message(prog, at, code, f"{type(e).__name__}: {text}")
    elif kind == "value" and "_local_scalar_dense" in f"{text} {e!r}":
        msg = (
            f"{prog}: control flow that depends on tensor values cannot be traced{at}{code} "
            f"({type(e).__name__}: {text}): branching on a tensor (`if t > 0:`) or reading its value into "
            "Python (`.item()`, `float(t)`, `int(t)`) needs a value that is not known while tracing (after a "
            "collective it even comes from other ranks). Compute both branches and select with torch.where(...), "
            "keep the value a tensor (`s / n` instead of `s / n.item()`), or base the decision on Python values "
            "(shapes, rank, configuration) instead of tensor contents."
        )
    elif kind is not None:
        msg = (
            f"{prog}: control flow that depends on tensor values cannot be traced{at}{code} "
            f"({type(e).__name__}: {text}). Compute both branches and select with torch.where(...), "
            "or base the decision on Python values (shapes, rank, configuration) instead of tensor contents."
        )
    else:
        what = "function" if rank is None else "per-rank function"
        msg = (
            f"{prog} raised {type(e).__name__}{at}{code}: {text}. Fix the {what} so that it runs on "
            f"inputs of shapes {shapes}" + ("" if rank is None else f" (rank {rank}'s local inputs)") + "."
        )
    return CaptureError(msg, rank=rank, source=src)


_KEPT_META = ("gg_source", "gg_frames", "gg_source_kind", "gg_backward", "gg_shim", "gg_collective", "stack_trace",
              "gg_call")


class _SourceKeepingInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        meta = {k: n.meta[k] for k in _KEPT_META if k in n.meta}
        meta.setdefault("gg_frames", [])
        meta.setdefault("gg_source", None)
        with extra_node_meta(**meta):
            if n.target is collective_result:
                (x,) = self.fetch_args_kwargs_from_env(n)[0]
                return replay_collective(n, x)
            return super().run_node(n)


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """torch logs the full traceback of an operator that fails on fake tensors before raising; the
    error reaches the user once, as a CaptureError naming the program and line, so mute the log."""
    import logging

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _positional(fn: Callable) -> Callable:
    """``fn`` called with exactly the given positional arguments: make_fx binds one placeholder per
    parameter of the function it traces, so a user function with optional parameters
    (``def rank_fn(x, w, *, bug=None)`` or ``def f(x, w, eps=1e-5)``) would not trace as is."""

    def call(*args):
        with follow_data_assignments():
            return fn(*args)

    return call


_record_calls = False  # set by `recording_calls`: pass 1 runs under a symmetry.OpRecorder


@contextmanager
def recording_calls() -> Iterator[None]:
    """Within: every rank trace records its operator calls (``gm.meta["gg_recording"]``) and tags
    every node with the call it came from (``meta["gg_call"]``), for `capture.symmetry`."""
    global _record_calls
    saved, _record_calls = _record_calls, True
    try:
        yield
    finally:
        _record_calls = saved


def _recorded(fn: Callable, rank: int | None):
    if not _record_calls or rank is None:
        return fn, None
    from gg_notebook.capture.symmetry import OpRecorder

    recorder = OpRecorder(rank, tag=True)

    def call(*args):
        recorder.inputs(args)  # inputs by position, as in `symmetry.record_rank`
        with recorder:
            out = fn(*args)
        recorder.returned(out)
        return out

    return call, recorder


one_pass = True  # skip the functionalizing replay of graphs without mutations (tests turn it off to compare)
direct = True  # pass 1 by `direct_trace` where it reproduces make_fx (tests turn it off to compare)
_DIRECT_STATS: dict = {"direct": 0, "refused": 0, "reasons": []}  # this process's pass 1s


_CHECK_DIRECT = os.environ.get("GG_CHECK_DIRECT_TRACE") == "1"


def _make_fx_signature(fn: Callable, args, rank: int | None) -> list:
    """("ok", the `direct_trace.graph_signature` of make_fx's pass 1 of ``fn(*args)``) or ("error",
    what it raised), traced in a child
    forked now: it starts from this process's state as the direct run does (a model's caches, the
    process groups, DTensor's sharding caches, values read into Python), and leaves it as it is.
    For the test suite's cross-check (``GG_CHECK_DIRECT_TRACE=1``)."""
    import pickle

    from gg_notebook.capture.direct_trace import graph_signature

    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rd)
            try:
                traced_fn, _ = _recorded(fn, rank)
                made = make_fx(traced_fn, tracing_mode="fake", record_stack_traces=False)(*args)
                data = pickle.dumps(("ok", graph_signature(made)))
            except BaseException as e:  # noqa: BLE001 - reported by the parent
                data = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
            with os.fdopen(wr, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)  # ("ok", signature) or ("error", what make_fx raised)


def _fresh_maker(args: Sequence[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
    """A function making new fake tensors with the metadata ``args`` have now (same fake mode,
    shapes, strides, dtypes, devices, requires_grad), for a second run of a program: the first may
    have changed its inputs (``p.data = ...``)."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(tuple(args))
    metas = [(tuple(a.shape), tuple(a.stride()), a.dtype, a.device, a.requires_grad) for a in args]

    def make() -> list[torch.Tensor]:
        out = []
        for shape, stride, dtype, device, requires_grad in metas:
            with mode:
                t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            if requires_grad:
                t.requires_grad_(True)
            out.append(t)
        return out

    return make


def _symbolic(args: Sequence[torch.Tensor]) -> bool:
    """Inputs of a fake mode with a shape environment (the retry for data-dependent sizes, where
    results have symbolic sizes): make_fx traces those."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(tuple(args))
    return mode is None or mode.shape_env is not None


def _mutation_free(gm: fx.GraphModule) -> bool:
    """No node of ``gm`` mutates or returns an alias it could write through: every operator is an
    aten OpOverload whose schema mutates nothing (views are fine: functionalization keeps them as
    they are), or a `collective_result`. Functionalizing such a graph changes nothing."""
    return all(_functional_node(n) for n in gm.graph.nodes)


def _functional_node(n: fx.Node) -> bool:
    if n.op in ("placeholder", "output", "get_attr"):
        return True
    if n.op != "call_function":
        return False
    t = n.target
    if t is collective_result or t is operator.getitem:
        return True
    schema = getattr(t, "_schema", None)
    if not isinstance(t, torch._ops.OpOverload) or schema is None or schema.is_mutable:
        return False
    return t.namespace in ("aten", "prims")


def _functionalized_locally(gm: fx.GraphModule) -> bool:
    """Rewrite the mutations of a pass-1 graph as functionalization would, where they are local
    (`capture.local_functionalize`); True if ``gm`` is now mutation free."""
    from gg_notebook.capture.local_functionalize import functionalize_locally

    for n in gm.graph.nodes:  # anything but an aten operator's mutation: replayed (graph untouched)
        if not _functional_node(n) and not (isinstance(n.target, torch._ops.OpOverload)
                                            and n.target.namespace == "aten" and n.target._schema.is_mutable):
            return False
    if not functionalize_locally(gm):
        return False
    gm.meta["gg_local_functionalized"] = True
    if not _mutation_free(gm):  # pragma: no cover - functionalize_locally rewrites every mutation or none
        raise AssertionError("capture.local_functionalize left a mutation in the graph")
    return True


def _trace(fn: Callable, args: list[torch.Tensor], rank: int | None,
           use_direct: bool | None = None) -> tuple[fx.GraphModule, list[IssuedCollective]]:
    """Trace ``fn(*args)`` to a value-semantics graph; return it and its collectives in program order.
    ``use_direct``: pass 1 by `direct_trace` (None: the module's ``direct``)."""
    if use_direct is None:
        use_direct = direct
    shapes = [tuple(a.shape) for a in args]
    fn = _positional(fn)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
            warnings.filterwarnings("ignore", message=r".*autograd kernel was not registered.*")
            with record_sources(), _quiet_fake_tensor_log():
                # Pass 1: plain make_fx, so autograd (torch.autograd.grad inside fn) records the
                # backward (torch.func.functionalize hides requires_grad from fn); or the same graph
                # written by `direct_trace` (no proxies: 2-3x cheaper), which hands to make_fx what it
                # does not reproduce. Collectives are decoded and rewritten here, while the process
                # group is alive.
                with collective_shims(), record_group_origins():
                    gm1 = None
                    # before any run (a run may change its inputs' metadata: ``p.data = ...``)
                    fresh = _fresh_maker(args) if use_direct and not _symbolic(args) else None
                    if fresh is not None:
                        # the test suite's cross-check: make_fx's graph (made first, in a fork)
                        expected = _make_fx_signature(fn, fresh(), rank) if _CHECK_DIRECT else None
                        # the same graph without make_fx's proxies (capture.direct_trace)
                        traced_fn, recorder = _recorded(fn, rank)
                        gm1, refused = trace_directly(traced_fn, fresh())  # ``args`` stay as they are
                        if gm1 is None:  # run it again from the start, by make_fx (`_trace_program`)
                            raise DirectRefused(refused)
                        _DIRECT_STATS["direct"] += 1
                    if gm1 is None:
                        traced_fn, recorder = _recorded(fn, rank)
                        gm1 = make_fx(traced_fn, tracing_mode="fake", record_stack_traces=False)(*args)
                    elif expected is not None:
                        from gg_notebook.capture.direct_trace import graph_signature, signature_differences

                        if expected[0] != "ok":
                            raise AssertionError(f"make_fx failed where direct_trace did not ({program_name(rank)}): "
                                                 f"{expected[1]}")
                        diffs = signature_differences(expected[1], graph_signature(gm1))
                        if diffs:
                            raise AssertionError(f"direct_trace differs from make_fx ({program_name(rank)}): "
                                                 + "; ".join(diffs))
                    rewrite_collectives(gm1, rank)
                # Pass 2: replay that graph under functionalization -> value semantics; every new
                # node inherits the user source of the node it comes from. A graph without any
                # mutation is already what functionalization returns: one pass (see `_mutation_free`);
                # so is one whose mutations are all writes to fresh tensors and their reshapes once
                # they are rewritten in place (`local_functionalize`: collectives into buffers, x[m] = 0).
                try:
                    if one_pass and (_mutation_free(gm1) or _functionalized_locally(gm1)):
                        gm = gm1
                        gm.meta["gg_one_pass"] = True
                    else:
                        replay = _SourceKeepingInterpreter(gm1)
                        with torch.no_grad():
                            gm = make_fx(torch.func.functionalize(replay.run), tracing_mode="fake",
                                         record_stack_traces=False)(*args)
                    results = issued_collectives(gm1.meta["gg_issued"], finish_collectives(gm), rank)
                    # placeholder vals carry the inputs' requires_grad (make_fx stores detached vals)
                    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
                    for p, a in zip(ph, args):
                        p.meta["val"] = a
                    if recorder is not None:
                        gm.meta["gg_recording"] = recorder.finish()
                    gm.meta["gg_pass1"] = "direct" if fresh is not None else "make_fx"
                finally:
                    clear_replay()
    except CaptureError:
        raise
    except Exception as e:
        # x[mask], masked_select, nonzero: trace again with data-dependent sizes, and keep the
        # selection only where it is reduced at once (masked_select.py); else the refusal below
        again = _with_shape_env(args) if _data_dependent_kind(e) == "shape" else None
        if again is None:
            raise _error(e, rank, shapes) from e
    else:
        again = None
    if again is not None:  # outside the handler: an error of the second trace is its own, not this one's
        return _trace(fn, again, rank, use_direct)
    if has_unbacked(gm):
        try:
            left = lower_selections(gm)
        except Exception as e:  # noqa: BLE001 - a rewrite that does not fit: the plain refusal
            left = next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("val") is not None)
            for n in gm.graph.nodes:
                if has_unbacked_val(n):
                    left = n
                    break
            left.meta["gg_refused"] = f"it could not be rewritten to fixed shapes ({type(e).__name__}: {e})"
        if left is not None:
            raise _selection_refused(left, rank)
    return gm, results


def _finish(gm: fx.GraphModule, names: Sequence[str], rank: int | None) -> None:
    """Placeholder metadata, input-mutation write-backs dropped, outputs flattened to a tuple."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    for i, p in enumerate(placeholders):
        p.meta["gg_input_index"] = i
        p.meta["gg_input_name"] = names[i] if i < len(names) else f"input{i}"
        name = p.meta["gg_input_name"]
        if name.isidentifier():
            try:  # cosmetic: name placeholders after the inputs (private fx API)
                p._rename(name)
                p.target = p.name
            except Exception:  # pragma: no cover
                pass
    # functionalize writes mutated inputs back with copy_ at the end; value semantics drops them.
    mutations = {}
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.copy_.default and n.args[0] in placeholders and not n.users:
            mutations[n.args[0].meta["gg_input_index"]] = n.args[1].name if isinstance(n.args[1], fx.Node) else None
            g.erase_node(n)
    gm.meta["gg_input_mutations"] = mutations
    out = next(n for n in g.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten(out.args[0])
    for k, leaf in enumerate(leaves):
        if not (isinstance(leaf, fx.Node) and isinstance(leaf.meta.get("val"), torch.Tensor)):
            raise CaptureError(
                f"{program_name(rank)} returns a {type(leaf).__name__ if not isinstance(leaf, fx.Node) else 'non-tensor'} "
                f"as output {k} (after flattening): return only tensors (tuples/lists/dicts of tensors are fine).",
                rank=rank,
            )
    out.args = (tuple(leaves),)
    for n in g.nodes:
        if n.op == "call_function" and "gg_source" not in n.meta:
            n.meta["gg_source"], n.meta["gg_frames"] = None, []
    g.lint()
    gm.recompile()


def _n_outputs(gm: fx.GraphModule) -> int:
    return len(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def forget_rank_caches() -> None:
    """Drop caches that would carry one rank's trace into the next in this process: DTensor's
    sharding propagation caches key on a DeviceMesh whose hash ignores the local rank."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    try:
        from torch.distributed.tensor import DTensor

        prop = DTensor._op_dispatcher.sharding_propagator
        prop.propagate_op_sharding.cache_clear()
        prop._propagate_tensor_meta_cached.cache_clear()
    except Exception:  # pragma: no cover - private API moved; per-process capture does not need it
        pass
    clear = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear is not None:  # the C++ side of the same cache
        try:
            clear()
        except Exception:  # pragma: no cover
            pass


# --------------------------------------------------------------------------------------------------
# Warm-up: the first trace in a process pays for lazy imports and first-use registrations (about a
# second). Paid once in the parent before forking, every child inherits it instead of paying it.


def _warm_up_program(x, w, ids, table, target):
    import torch.distributed._functional_collectives as fc
    import torch.nn.functional as F

    h = F.layer_norm(x + F.embedding(ids, table), (x.shape[-1],))
    a = torch.softmax((h @ w) @ (h @ w).transpose(-1, -2) / 2.0, dim=-1) @ h
    y = F.gelu(a.reshape(-1, a.shape[-1]) @ w).view(a.shape).permute(1, 0, 2).contiguous()
    if dist.is_initialized():
        dist.all_reduce(y)
        y = fc.all_reduce(y, "sum", dist.group.WORLD)
        y = torch.cat(list(fc.all_gather_single(y, 0, dist.group.WORLD).chunk(2)), dim=-1)[..., : y.shape[-1]]
    loss = F.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))
    (g,) = torch.autograd.grad(loss, [w])
    return loss, g


_warmed_up = False


def warm_up() -> float:
    """Trace a small built-in transformer-like program once in this process (nothing of the user's
    runs); return the seconds it took (0 after the first call)."""
    global _warmed_up
    if _warmed_up:
        return 0.0
    _warmed_up = True
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    p = Problem(
        sequential=_warm_up_program, distributed=_warm_up_program,
        inputs=(torch.randn(2, 3, 4, generator=g), torch.randn(4, 4, generator=g, requires_grad=True),
                torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 4, generator=g), torch.zeros(2, 3, dtype=torch.long)),
        placements=(Replicate(), Replicate(), Replicate(), Replicate(), Replicate()), world_size=2,
    )
    try:
        trace_program(p, None)
        trace_program(p, 0)
    except Exception:  # noqa: BLE001 - a warm-up only; the real capture reports real errors
        pass
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Public entry points


def _session(program: Callable, rank: int | None, world_size: int):
    """A program that must be set up in the capturing process before it is traced (a model built
    for real, outside the trace: `gg_notebook.adapters.modules`) has ``gg_session(rank, world_size)``,
    a context manager yielding the function to trace; any other program is traced as is."""
    from contextlib import nullcontext

    session = getattr(program, "gg_session", None)
    return session(rank, world_size) if session is not None else nullcontext(program)


def _drop_single_rank_collectives(gm: fx.GraphModule, issued: list[IssuedCollective]) -> list[IssuedCollective]:
    """In the sequential program (a model built for one rank: megatron at tp=1 still calls its
    reductions) a collective over a group of one rank is the identity: its result is its input."""
    from gg_notebook.capture.collectives import collective_result

    g = gm.graph
    changed = False
    for n in list(g.nodes):
        info = n.meta.get("gg_collective") if n.op == "call_function" and n.target is collective_result else None
        if info is None or len(tuple(info.group)) != 1:
            continue
        x = n.args[0]
        xv, v = x.meta.get("val"), n.meta.get("val")
        if not (isinstance(xv, torch.Tensor) and isinstance(v, torch.Tensor)) or xv.numel() != v.numel():
            continue
        if tuple(xv.shape) == tuple(v.shape):
            n.replace_all_uses_with(x)
        else:  # all_gather_into_tensor's stacked form [1, *x.shape], or the reverse for reduce_scatter
            with g.inserting_before(n):
                r = g.call_function(torch.ops.aten.view.default, (x, list(v.shape)))
            r.meta.update({k: n.meta[k] for k in ("val", "gg_source", "gg_frames") if k in n.meta})
            n.replace_all_uses_with(r)
        g.erase_node(n)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return [c for c in issued if len(tuple(c.info.group)) != 1]


def trace_program(problem: Problem, rank: int | None) -> tuple[fx.GraphModule, list[IssuedCollective]]:
    """Trace the sequential program (``rank=None``) or rank ``rank``'s program of ``problem``;
    return its finished graph and its collectives in program order.

    The graph modules are lazy (`torch.fx._lazy_graph_module`): nothing here runs them, and lowering
    only walks their graphs, so their Python code is generated only if someone runs one or reads its
    ``.code`` (measured: a 16-layer 405B-shaped forward+backward rank traces in 2.0 CPU s, 2.2 with
    the code generated)."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True):
        return _trace_program(problem, rank)


class DirectRefused(BaseException):
    """`direct_trace` did not reproduce make_fx on this program: it is traced again from the start
    (a BaseException, so that no handler on the way takes it for the program's own error)."""


def _trace_program(problem: Problem, rank: int | None) -> tuple[fx.GraphModule, list[IssuedCollective]]:
    """Pass 1 by `direct_trace`, or, where it refuses, the whole capture once more with make_fx:
    the process group, the program's session (a model built for real) and its inputs are made
    afresh, so nothing of the refused run's process groups or inputs reaches the second."""
    if not direct:
        return _trace_program_once(problem, rank, use_direct=False)
    try:
        return _trace_program_once(problem, rank, use_direct=True)
    except DirectRefused as e:
        _DIRECT_STATS["refused"] += 1
        _DIRECT_STATS["reasons"].append(str(e))
        gm, issued = _trace_program_once(problem, rank, use_direct=False)
        gm.meta["gg_pass1"] = f"make_fx ({e})"
        return gm, issued


def _trace_program_once(problem: Problem, rank: int | None,
                        use_direct: bool) -> tuple[fx.GraphModule, list[IssuedCollective]]:
    mode = FakeTensorMode()
    globals_ = _global_fakes(mode, problem.inputs) if rank is None else None  # a rank's: `_local_fakes`
    reads = None
    for attempt in (0, 1):
        try:
            with _specialized(problem, rank, reads) as used:
                if rank is None:
                    with _session(problem.sequential, None, problem.world_size) as fn:
                        gm, issued = _trace(fn, globals_, None, use_direct)
                    issued = _drop_single_rank_collectives(gm, issued)
                else:
                    args = _local_fakes(problem, mode, globals_, rank)
                    with fake_process_group(rank, problem.world_size):
                        with _session(problem.distributed, rank, problem.world_size) as fn:
                            gm, issued = _trace(fn, args, rank, use_direct)
            break
        except CaptureError as e:
            if attempt or not _reads_tensor_values(e):
                raise
            # tensor values read into Python (split sizes from .tolist()): capture for the example's routing
            from gg_notebook.capture.specialize import _check_concrete, recorded_reads

            _check_concrete(problem, rank, "reads tensor values into Python")
            reads = recorded_reads(problem, rank, _session)
    if reads is not None:
        from gg_notebook.capture.specialize import _concrete_inputs, assumption, fold_routing_indices

        folded = fold_routing_indices(gm, _concrete_inputs(problem, rank))
        gm.meta["gg_specialized"] = [assumption(rank, used, folded)]
    _finish(gm, list(problem.input_names), rank)
    return gm, issued


def _reads_tensor_values(e: CaptureError) -> bool:
    """Did tracing stop at tensor values read into Python with ``.tolist()`` (split sizes)?"""
    import traceback

    cause = e.__cause__
    if cause is None or _data_dependent_kind(cause) != "value" or "_local_scalar_dense" not in f"{cause} {cause!r}":
        return False
    return any(f.name == "tolist" for f in traceback.extract_tb(cause.__traceback__))


@contextmanager
def _specialized(problem: Problem, rank: int | None, reads: list | None) -> Iterator[list]:
    if reads is None:
        yield []
        return
    from gg_notebook.capture.specialize import replaying

    with replaying(reads, rank) as used:
        yield used


def check_output_counts(n_seq: int, counts: list[int]) -> None:
    """Every rank returns as many tensors as the sequential program; raise `CaptureError` if not."""
    W = len(counts)
    if len(set(counts)) > 1:
        a = 0
        b = next(r for r in range(W) if counts[r] != counts[0])
        raise CaptureError(
            f"rank {b} returns {counts[b]} outputs but rank {a} returns {counts[a]}: every rank must return "
            "the same number of tensors (one local piece per output of the sequential program).",
            rank=b,
        )
    if counts and counts[0] != n_seq:
        raise CaptureError(
            f"the ranks return {counts[0]} outputs but the sequential program returns {n_seq}: the distributed "
            "function must return one (local) tensor per output of the sequential function, in the same order.",
            rank=0,
        )


def capture_problem(problem: Problem) -> CapturedProgram:
    """Trace ``problem.sequential`` once and ``problem.distributed`` on every rank, all in this
    process (see the module docstring); match collectives."""
    W = problem.world_size
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    seq, _ = trace_program(problem, None)
    timings["sequential"] = time.perf_counter() - t0

    ranks: list[fx.GraphModule] = []
    per_rank: list[list[IssuedCollective]] = []
    t1 = time.perf_counter()
    for r in range(W):
        tr = time.perf_counter()
        forget_rank_caches()
        gm, issued = trace_program(problem, r)
        ranks.append(gm)
        per_rank.append(issued)
        timings[f"rank{r}"] = time.perf_counter() - tr
    timings["ranks"] = time.perf_counter() - t1

    check_output_counts(_n_outputs(seq), [_n_outputs(gm) for gm in ranks])
    t2 = time.perf_counter()
    matched = match_collectives(per_rank)
    timings["match"] = time.perf_counter() - t2
    return CapturedProgram(sequential=seq, ranks=ranks, world_size=W, collectives=matched, timings=timings)


def capture_layout(layout: Layout, global_tensor_like: torch.Tensor, rank: int, world_size: int) -> fx.GraphModule:
    """Trace ``layout.fn(g, rank, world_size)`` to a graph with one placeholder (g) and a 1-tuple output."""
    mode = FakeTensorMode()
    g = _fake_like(mode, global_tensor_like, False)

    def fn(x):
        return layout.fn(x, rank, world_size)

    name = layout.name or getattr(layout.fn, "__name__", "layout")
    try:
        gm, _ = _trace(fn, [g], rank)
    except CaptureError as e:
        raise CaptureError(f"layout {name} for {e}", rank=rank, source=e.source) from e
    _finish(gm, ["global"], rank)
    if _n_outputs(gm) != 1:
        raise CaptureError(f"layout {name} must return one tensor, got {_n_outputs(gm)}.", rank=rank)
    return gm
