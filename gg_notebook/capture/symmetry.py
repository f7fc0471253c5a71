"""Capture once where it is sound: trace one rank, specialize it to the ranks that run the same program.

Ranks of an SPMD program usually run the same code with a different rank number. Tracing every rank
with make_fx (two passes each, see `tracing._trace`) is most of gg.verify's time, so
`capture.programs` traces one *representative* rank fully and derives the graphs of the other ranks
from it, but only for ranks whose execution it has checked to be the same up to numbers:

1. **Record every rank** (`record_rank`, cheap): run the rank's function once on fake tensors under
   the rank's fake process group (the same shims as a trace), with `OpRecorder`, a dispatch mode that
   writes down every operator call reaching the dispatcher: the operator, its arguments (tensors as
   references: the function's positional inputs are registered as tensors 0..n-1 before it runs, every
   other tensor must be the result of an earlier call, or a real constant, written down by its bytes; a
   fake tensor that is neither makes the rank a fallback; process groups by name and ranks; floats by
   their bits, so -0.0 is not 0.0; every other Python value literally), the shapes, strides, dtypes and
   devices of its results, the innermost user source line, and which tensors the function returns.
   Device queries (``prim.device``: autograd's engine asks for every gradient's device, two thirds of
   all calls) are answered but not written down: the answer is the device of a tensor the recording
   already holds.
   No graph is built and nothing is functionalized: about 5-10x cheaper than a trace (0.12 s
   against ~1 s for a 4-layer GPT forward+backward rank).
2. **Compare** (`compare`): rank r is *symmetric* to the representative if its recording equals the
   representative's except for int / float arguments ("rank constants", e.g. ``ids - rank * V``,
   ``torch.arange(start=rank * n)``, ``x[rank * n:(rank + 1) * n]``) and for *rank-selected tensors*:
   an argument (or returned tensor) that is another result of the same multi-output call
   (``torch.chunk(x, W)[rank]``, ``split``, ``unbind``), or the result of another call of the same
   operator from the same user line (``[x[i * n:(i + 1) * n] for i in range(W)][rank]``), with the same
   shape, strides, dtype and requires_grad (`_selected`). Any other difference (another operator,
   another shape, local inputs of other shapes (a layout with uneven chunks), another data flow, a
   Python branch on the rank that changes the ops or the user line, a rank-dependent tensor constant or
   process group, a point-to-point transfer) makes rank r a *fallback*: it is traced on its own, as
   before.
3. **Trace the representative** with the same recorder inside make_fx's first pass: every graph node
   gets ``meta["gg_call"]``, the index of the recorded call it was created in (kept through the
   functionalizing replay). Where the representative was recorded plainly too (on an executor, in
   one process), the recording under make_fx must equal the plain one exactly (else every rank falls
   back); with forked children rank 0 is recorded only by its trace, and that recording is the one the
   others are compared with (a ``tensor.data`` assignment, which its trace follows, marks it failed).
4. **Specialize** (`Specializer`): for each symmetric rank, copy the representative's finished graph,
   put the rank's numbers at the recorded positions and read the rank's selected tensors. A differing
   number is substituted only in a call that left exactly one graph node of the same operator (or its
   functional form) with the recorded arguments, and no other node of that call holding the
   representative's number; anything else (an operator folded to a constant, decomposed, ...) makes
   the rank a fallback. Numbers of a *view* (slice, narrow, select, as_strided, split sizes) reach the
   graph only through the view's own node, except where functionalization replays the view's
   arguments: into the scatter of a write through the view and into the views it regenerates after a
   write to their storage. So a view's numbers are substituted when the graph took one pass
   (``gm.meta["gg_one_pass"]``: no replay, every node is a recorded call), or when no call after the
   view writes its storage (the recorder writes down, from the operators' schemas, which results alias
   which arguments and which arguments a call writes; c10d's unannotated in-place collectives count as
   writing every tensor argument); an in-place change of a view's metadata (``as_strided_``,
   ``transpose_``) never is. A rank-selected tensor is read by rewiring the argument of the one node of
   the reading call (checked to be the node of the representative's tensor) to the node of the rank's
   (a getitem of the same multi-output node, made if the representative's graph had none: dead code
   there; or, for a view from the same line that left no node, made from the representative's view
   node with the recorded arguments, ``x.tensor_split(W)[rank]``), when neither tensor's storage is
   written after it is made; the representative's node left unread is dropped (the rank's own trace
   eliminates it as dead code). The values (``meta["val"]``) of
   the views whose arguments changed are computed again on the graph's fake tensors (another block has
   another storage offset, which lowering reads), and so are the views reading them; a moved view read
   directly by a collective makes the rank a fallback.

Never derived (traced rank by rank instead): programs that call custom operators or have
``Problem.decompositions`` (lowering runs their Python definitions, which may read per-rank state the
recording cannot see, e.g. a module global holding the rank), and ranks that assign ``tensor.data``
(the swap reaches no dispatcher, so the recording would not see it).

What this relies on (stated, not checked): a rank's program, run under make_fx, issues the same
operator calls as when it runs under plain fake tensors, for every rank as it does for the
representative (checked for the representative where it is recorded plainly too). Where rank 0 is
recorded only by its trace, a program that calls other operators under tracing has its other ranks
traced (their plain recordings differ from rank 0's); one that only takes other *numbers* under
tracing gets, in its derived ranks, the numbers of its plain run (the run of the real job), in rank
0's graph those of its trace. Programs that test whether they are being traced *and* depend on the
rank there are not covered.
"""

from __future__ import annotations

import copy
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from gg_notebook.capture.source import extra_node_meta, is_user_file


_NAMES: dict = {}
_DEVICE_QUERY = torch.ops.prim.device.default
_P2P = {"c10d.send.default", "c10d.recv_.default", "c10d.recv_any_source_.default"}


_NESTED = (list, tuple, dict)


def _flatten(x: Any, leaves: list, shape: list) -> None:
    """The leaves of nested lists / tuples / dicts ``x`` in order, and their nesting as tokens (the
    same walk for a dispatched call's (args, kwargs) and a graph node's, so positions agree). Runs
    for every recorded call: leaves are appended here rather than by a call per leaf."""
    if isinstance(x, (list, tuple)):
        shape.append(len(x))
        items = x
    elif isinstance(x, dict):
        shape.append(tuple(x))
        items = x.values()
    else:
        leaves.append(x)
        return
    for y in items:
        if isinstance(y, _NESTED):
            _flatten(y, leaves, shape)
        else:
            leaves.append(y)


def _flat_args(node: fx.Node) -> tuple[list, tuple]:
    leaves: list = []
    shape: list = []
    _flatten((node.args, node.kwargs), leaves, shape)
    return leaves, tuple(shape)


class NotRecordable(Exception):
    """The recorder met a value whose identity it cannot write down (the rank falls back)."""


@dataclass
class Recording:
    """One rank's operator calls, in order; ``calls[i] = (op, spec, structure, scalars, outputs, site)``."""

    rank: int
    calls: list[tuple] = field(default_factory=list)
    returns: tuple = ()
    inputs: tuple = ()  # the positional inputs' (shape, stride, dtype, device, requires_grad)
    seconds: float = 0.0
    error: str | None = None  # why this rank could not be recorded (it falls back)
    # storage: (output id, argument id) for every result that aliases an argument (views, in-place
    # and out= results), and (call, id) for every argument a call writes (schemas' alias annotations);
    # ``opaque``: calls whose schema could not be read (the analysis then knows nothing)
    aliases: list = field(default_factory=list, repr=False)
    writes: list = field(default_factory=list, repr=False)
    opaque: bool = False


_SCALARS = (int, float)
_LITERAL = (str, bytes, type(None), bool, complex, torch.dtype, torch.device, torch.layout,
            torch.memory_format)


def _digest(t: torch.Tensor) -> tuple:
    """A real (not fake) tensor by value: it is a constant burned into the graph. Compared by its
    bytes (not by ``tolist()``, where -0.0 == 0.0 and NaN != NaN)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if t.device.type == "meta":
        return ("meta",)
    with unset_fake_temporarily(), torch._C._DisableTorchDispatch():
        d = t.detach().contiguous().cpu().reshape(-1)
        data = d.view(torch.uint8).numpy().tobytes() if d.numel() else b""
        if len(data) > 512:
            import hashlib

            data = hashlib.sha1(data).hexdigest()
        return (str(d.dtype), tuple(t.shape), data)


_PLANS: dict = {}


def _alias_plan(func) -> tuple | None:
    """``(written arguments, aliasing returns)`` of an operator's schema, () when it has neither,
    None when its schema cannot be read. Arguments as (position, name); returns as (return index,
    argument) pairs: result ``j`` shares storage with that argument."""
    plan = _PLANS.get(func, False)
    if plan is not False:
        return plan
    try:
        schema = func._schema
        writes, sets = [], {}
        for i, a in enumerate(schema.arguments):
            ai = a.alias_info
            if ai is None:
                continue
            if ai.is_write:
                writes.append((i, a.name))
            for t in ai.before_set:
                sets.setdefault(t, (i, a.name))
        outs = []
        for j, r in enumerate(schema.returns):
            if r.alias_info is not None:
                outs += [(j, sets[t]) for t in r.alias_info.before_set if t in sets]
        if schema.name == "aten::_unsafe_view":  # shares its argument's storage; the schema says fresh
            outs.append((0, (0, schema.arguments[0].name)))
        if schema.name == "aten::set_" and len(schema.arguments) > 1 and schema.arguments[1].name == "source":
            outs.append((0, (1, "source")))  # self then shares source's storage (not annotated)
        if getattr(func, "namespace", None) == "c10d":
            # c10d's in-place collectives (allreduce_, broadcast_, ...) do not annotate the tensors
            # they write: every tensor argument counts as written
            writes = [(i, a.name) for i, a in enumerate(schema.arguments)]
        plan = (tuple(writes), tuple(outs)) if writes or outs else ()
    except Exception:  # noqa: BLE001 - not an operator with a schema
        plan = None
    _PLANS[func] = plan
    return plan


def _arg_value(args, kwargs, pos_name):
    i, name = pos_name
    return args[i] if i < len(args) else kwargs.get(name)


def _user_site(stop=None) -> tuple:
    """The innermost user frame of the current operator call, looking no further out than ``stop``
    (the frame that entered the recorder: what lies beyond it is the caller of gg.verify, or make_fx's
    generated wrapper under a trace, and is the same for every call, never the rank program's line);
    () if none (e.g. a backward operator reached from ``torch.autograd.grad`` in gg_notebook's code)."""
    f = sys._getframe(2)
    while f is not None and f is not stop:
        if is_user_file(f.f_code.co_filename):
            return (f.f_code.co_filename, f.f_lineno)
        f = f.f_back
    return ()


class OpRecorder(TorchDispatchMode):
    """Records every operator call (see the module docstring). With ``tag=True`` (inside make_fx)
    every graph node created during call i gets ``meta["gg_call"] = i``."""

    def __init__(self, rank: int, tag: bool = False) -> None:
        super().__init__()
        self.rec = Recording(rank)
        self.tag = tag
        self.ids: dict[int, int] = {}
        self.keep: list = []  # tensors seen: their ids must not be reused
        self.broken: str | None = None
        self._entry = None  # the frame that runs the rank's function (set by `inputs`): sites stop there
        self.memo = None  # a `FakeDispatchMemo` of the fake mode below (record_rank), or None

    # tensors ------------------------------------------------------------------------------------
    def inputs(self, args: Any) -> None:
        """Register the function's positional inputs as tensors 0..n-1, before it runs: an input is
        then written down by its position, never by its shape or the order of first use (two
        same-shaped inputs used in swapped roles on two ranks must not record alike)."""
        self._entry = sys._getframe(1)
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or self._known(a) is not None:
                self.broken = self.broken or f"input {i} (not a distinct tensor)"
                return
            self._register(a)
        # a layout may give ranks local inputs of other shapes (uneven chunks): the derived graph's
        # placeholders are the representative's, so they must agree
        self.rec.inputs = tuple(_meta(a) for a in args)

    def _known(self, t: torch.Tensor) -> int | None:
        return self.ids.get(id(t))

    def _register(self, t: torch.Tensor) -> int:
        k = len(self.keep)
        self.ids[id(t)] = k
        self.keep.append(t)
        return k

    def _unseen(self, x: torch.Tensor) -> tuple:
        """A tensor that is no input and that no recorded call returned. A real tensor is a constant,
        written down by value; a fake one (made without the dispatcher) cannot be identified."""
        if isinstance(x, FakeTensor):
            raise NotRecordable(f"a tensor of shape {tuple(x.shape)} that is neither an input nor the result of "
                                "a recorded call")
        return ("new", self._register(x), _meta(x), ("value", _digest(x)))

    def _leaf(self, x: Any, structure: list, scalars: list) -> None:
        if isinstance(x, torch.Tensor):
            k = self._known(x)
            if k is not None:
                structure.append(("t", k))
                return
            structure.append(self._unseen(x))
        elif isinstance(x, complex):
            structure.append(("lit", "complex", _bits(x.real), _bits(x.imag)))
        elif isinstance(x, bool) or isinstance(x, _LITERAL):
            structure.append(("lit", x))
        elif isinstance(x, _SCALARS):
            structure.append(("num", type(x).__name__))
            scalars.append(x)
        elif isinstance(x, torch.ScriptObject):
            structure.append(("obj", _script_object(x)))
        elif isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotRecordable("a symbolic size")
        else:
            pg = _process_group(x)
            if pg is None:
                raise NotRecordable(f"an argument of type {type(x).__name__}")
            structure.append(("obj", pg))

    # dispatch -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in types:
            if t is not FakeTensor and t is not torch.Tensor:
                return NotImplemented  # a tensor subclass (DTensor): record the calls it makes instead
        if func is _DEVICE_QUERY:
            # a device query (most calls: autograd's engine asks for every gradient's device) answers
            # with the device of a recorded tensor, which the recording holds (`_out_meta`): it adds
            # nothing to write down, and it leaves no graph node. Below this mode there is only the
            # fake mode (and make_fx's proxy mode, which passes the query on): answered as they do
            if len(args) == 1 and type(args[0]) is FakeTensor and not kwargs:
                return args[0].device
            return func(*args, **kwargs)
        if self.broken is not None:
            return func(*args, **kwargs)
        i = len(self.rec.calls)
        if self.tag:
            with extra_node_meta(gg_call=i):
                out = func(*args, **kwargs)
        elif self.memo is not None:
            out = self.memo(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        flat: list = []
        shape: list = []
        _flatten((args, kwargs), flat, shape)
        if type(out) is FakeTensor:
            outs = [out]
        else:
            outs = []
            _flatten(out, outs, [])
            if outs and not any(type(o) is FakeTensor for o in outs) \
                    and not any(type(a) is FakeTensor for a in flat):
                return out  # real tensors only (a DeviceMesh built outside the trace): not in any graph
        structure: list = []
        scalars: list = []
        try:
            for x in flat:
                self._leaf(x, structure, scalars)
            out_meta = []
            for o in outs:
                if isinstance(o, torch.Tensor):
                    k = self.ids.get(id(o))
                    if k is None:
                        k = self._register(o)
                    out_meta.append((k, *_out_meta(o)))
                else:
                    self._leaf(o, out_meta, [])  # a Python number a kernel returned: a literal
        except NotRecordable as e:
            self.broken = f"{func}: {e}"
            return out
        except Exception as e:  # noqa: BLE001 - bookkeeping failed: this rank falls back
            self.broken = f"{func}: {type(e).__name__}: {e}"
            return out
        plan = _PLANS.get(func, False)
        if plan is False:
            plan = _alias_plan(func)
        if plan:
            self._storage(i, plan, args, kwargs, out)
        elif plan is None:
            self.rec.opaque = True
        name = _NAMES.get(func)
        if name is None:
            name = _NAMES[func] = str(func)
        self.rec.calls.append((name, tuple(shape), tuple(structure), tuple(scalars), tuple(out_meta),
                               _user_site(self._entry)))
        return out

    def _storage(self, call: int, plan: tuple, args, kwargs, out) -> None:
        """Write down which arguments call ``call`` writes and which results alias which argument."""
        def ids(x) -> list[int]:
            xs = x if isinstance(x, (list, tuple)) else [x]
            return [k for k in (self._known(t) for t in xs if isinstance(t, torch.Tensor)) if k is not None]

        writes, outs = plan
        for a in writes:
            self.rec.writes += [(call, k) for k in ids(_arg_value(args, kwargs, a))]
        if outs:
            results = out if isinstance(out, (list, tuple)) else [out]
            single = len(results) == 1 or not isinstance(out, tuple)
            for j, a in outs:
                res = ids(out) if single else ids(results[j]) if j < len(results) else []
                for src in ids(_arg_value(args, kwargs, a)):
                    self.rec.aliases += [(k, src) for k in res]

    def returned(self, out: Any) -> None:
        """Write down which tensors the function returned."""
        res = []
        try:
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    k = self._known(o)
                    res.append(("t", k) if k is not None else self._unseen(o))
                elif isinstance(o, float):
                    res.append(("lit", "float", _bits(o)))
                elif isinstance(o, complex):
                    res.append(("lit", "complex", _bits(o.real), _bits(o.imag)))
                else:
                    res.append(("lit", type(o).__name__, repr(o)))
        except NotRecordable as e:
            if self.broken is None:
                self.broken = f"the returned value: {e}"
        self.rec.returns = tuple(res)

    def finish(self) -> Recording:
        if self.broken is not None and self.rec.error is None:
            self.rec.error = f"the recorder could not write down {self.broken}"
        self.keep = []
        self.ids = {}
        self._entry = None
        return self.rec


def _script_object(x) -> tuple:
    try:
        qual = x._type().qualified_name()
    except Exception:  # noqa: BLE001
        raise NotRecordable("an opaque script object") from None
    if qual.endswith("ProcessGroup"):
        pg = torch.distributed.ProcessGroup.unbox(x)
        return _process_group(pg)
    if qual.endswith("ReduceOp"):
        return ("redop", int(x.op()))
    if qual.endswith("c10d.Work"):
        return ("work",)  # the handle a collective returns
    raise NotRecordable(f"a script object {qual}")


def _process_group(x) -> tuple | None:
    import torch.distributed as dist

    if isinstance(x, dist.ProcessGroup):
        return ("pg", x.group_name, tuple(dist.get_process_group_ranks(x)))
    return None


def _meta(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), tuple(x.stride()) if x.layout == torch.strided else (), x.dtype, x.device,
            x.requires_grad)


def _out_meta(o: torch.Tensor) -> tuple:
    """A result's shape, strides, dtype, requires_grad and device (the answer of every later device
    query about it: those are not written down, see `OpRecorder.__torch_dispatch__`)."""
    return (tuple(o.shape), tuple(o.stride()) if o.layout == torch.strided else (), o.dtype, o.requires_grad,
            o.device)


def _bits(x: float) -> bytes:
    """A float by its bits: 0.0 and -0.0 differ, NaN equals the same NaN."""
    return struct.pack("<d", x)


# ----------------------------------------------------------------------------------- recording a rank


def record_rank(problem, rank: int) -> Recording:
    """Run rank ``rank``'s function once on fake tensors with an `OpRecorder` (see module docstring).
    Never raises: a rank that cannot be recorded comes back with ``error`` set (it falls back)."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from gg_notebook.capture import tracing as T
    from gg_notebook.capture.collectives import collective_shims, record_group_origins
    from gg_notebook.capture.data_assignment import refuse_data_assignments
    from gg_notebook.capture.fake_memo import FakeDispatchMemo

    t0 = time.perf_counter()
    rec = OpRecorder(rank)
    try:
        mode = FakeTensorMode()
        rec.memo = FakeDispatchMemo(mode)
        args = T._local_fakes(problem, mode, None, rank)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            with T.fake_process_group(rank, problem.world_size), T._quiet_fake_tensor_log():
                with T._session(problem.distributed, rank, problem.world_size) as fn:
                    fn = T._positional(fn)
                    rec.inputs(args)
                    with refuse_data_assignments(), collective_shims(), record_group_origins(), mode, rec:
                        out = fn(*args)
                    rec.returned(out)
        out_rec = rec.finish()
    except BaseException as e:  # noqa: BLE001 - the full trace of this rank reports real errors
        if isinstance(e, KeyboardInterrupt):
            raise
        out_rec = rec.finish()
        out_rec.error = f"recording raised {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out_rec.seconds = time.perf_counter() - t0
    return out_rec


# ----------------------------------------------------------------------------------- comparing


@dataclass
class Diff:
    """How rank ``rank``'s recording differs from the representative's: {call: {scalar slot: value}}."""

    rank: int
    values: dict[int, dict[int, float | int]] = field(default_factory=dict)
    # rank-selected outputs: {call: {argument slot: (the representative's tensor, this rank's)}}, and
    # the same for the returned tensors {position: (...)} (see `_selected`)
    refs: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)
    returns: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.values.values())


def _same_number(a, b) -> bool:
    """The same Python number: the same type and, for floats, the same bits (0.0 is not -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return _bits(a) == _bits(b)
    return a == b


def _same_call(a: tuple, b: tuple) -> bool:
    """Two recorded calls are the same, numbers compared by `_same_number` (== would let -0.0 be 0.0)."""
    return (a[:3] == b[:3] and a[4:] == b[4:] and len(a[3]) == len(b[3])
            and all(_same_number(x, y) for x, y in zip(a[3], b[3])))


def compare(rep: Recording, other: Recording) -> Diff | str:
    """A `Diff` if ``other`` runs the same program as ``rep`` up to numbers, else the reason why not."""
    if rep.error:
        return f"rank {rep.rank} (the representative) could not be recorded: {rep.error}"
    if other.error:
        return other.error
    p2p = p2p_reason(rep)
    if p2p is not None:
        return p2p
    user = user_code_reason(rep) or user_code_reason(other)
    if user is not None:
        return user
    if rep.inputs != other.inputs:
        k = next((i for i, (a, b) in enumerate(zip(rep.inputs, other.inputs)) if a != b), None)
        return (f"its local input {k} has another shape, stride or dtype than rank {rep.rank}'s"
                if k is not None else "it has another number of inputs")
    if len(rep.calls) != len(other.calls):
        return f"issues {len(other.calls)} operator calls, rank {rep.rank} {len(rep.calls)}"
    diff = Diff(other.rank)
    if rep.returns != other.returns:
        if len(rep.returns) != len(other.returns):
            return "returns other tensors"
        for q, (x, y) in enumerate(zip(rep.returns, other.returns)):
            if x != y:
                if not _selected(rep, x, y, len(rep.calls)):
                    return "returns other tensors"
                diff.returns[q] = (x[1], y[1])
    for i, (a, b) in enumerate(zip(rep.calls, other.calls)):
        if a[4:] != b[4:] or len(a[3]) != len(b[3]):
            return _describe(i, a, b)
        if a[:3] != b[:3]:
            if a[:2] != b[:2] or len(a[2]) != len(b[2]):
                return _describe(i, a, b)
            refs = {}
            for s, (x, y) in enumerate(zip(a[2], b[2])):
                if x != y:
                    if not _selected(rep, x, y, i):
                        return _describe(i, a, b)
                    refs[s] = (x[1], y[1])
            diff.refs[i] = refs
        values = {k: y for k, (x, y) in enumerate(zip(a[3], b[3])) if not _same_number(x, y)}
        if values:
            diff.values[i] = values
    return diff


def _producers(rec: Recording) -> dict[int, tuple[int, int, tuple]]:
    """{tensor id: (the call that returned it, its position among the call's results, its metadata)}."""
    got = getattr(rec, "_producers_cache", None)
    if got is None:
        got = {}
        seen = len(rec.inputs) - 1  # ids are handed out in increasing order: a new result has a larger one
        for c, call in enumerate(rec.calls):
            for leaf in call[2]:
                if leaf[0] == "new":
                    seen = max(seen, leaf[1])
            for p, o in enumerate(call[4]):
                if o and isinstance(o[0], int) and o[0] > seen:
                    got[o[0]] = (c, p, o[1:])
            for o in call[4]:
                if o and isinstance(o[0], int):
                    seen = max(seen, o[0])
        rec._producers_cache = got
    return got


def _selected(rep: Recording, x: tuple, y: tuple, before: int) -> bool:
    """Do two recorded arguments differ only in which output of the same rank-indexed selection they
    are: tensors ``x`` (the representative's) and ``y`` of the same metadata, results of one multi-output
    call (``split(...)[rank]``, ``chunk``, ``unbind``), or of two calls of the same operator from the
    same user line (``[x[i * n:(i + 1) * n] for i in ...][rank]``), both made before call ``before``?
    The ids of the two recordings agree (same calls, same results), so the derived graph reads the
    node of ``y`` where the representative's reads ``x`` (`Specializer`)."""
    if x[0] != "t" or y[0] != "t":
        return False
    prod = _producers(rep)
    px, py = prod.get(x[1]), prod.get(y[1])
    if px is None or py is None or px[0] >= before or py[0] >= before or px[2] != py[2]:
        return False
    if px[0] == py[0]:
        return px[1] != py[1]
    a, b = rep.calls[px[0]], rep.calls[py[0]]
    return a[0] == b[0] and bool(a[5]) and a[5] == b[5] and len(a[4]) == len(b[4]) == 1


# operator namespaces whose kernels are PyTorch's own (no user Python runs when they are lowered)
_BUILTIN_NAMESPACES = frozenset({"aten", "prim", "prims", "c10d", "_c10d_functional", "c10d_functional",
                                 "_c10d_functional_autograd", "_dtensor", "profiler", "higher_order",
                                 "rngprims", "debugprims"})


def user_code_reason(rec: Recording, problem=None) -> str | None:
    """Why no rank can be derived from ``rec``'s because lowering would run user code (else None).

    A derived rank is lowered in its representative's process, and lowering runs the definitions of
    custom operators and of ``Problem.decompositions``: Python that may read per-rank state (a module
    global holding the rank) that the recording cannot see. Such ranks are traced and lowered alone."""
    if problem is not None and getattr(problem, "decompositions", None):
        return "the problem has decompositions (user Python that lowering runs per rank)"
    op = next((c[0] for c in rec.calls if c[0].split(".", 1)[0] not in _BUILTIN_NAMESPACES), None)
    if op is None:
        return None
    return f"it calls the custom operator {op}, whose Python definition runs when the rank is lowered"


def p2p_reason(rec: Recording) -> str | None:
    """Why no rank can be derived from ``rec``'s because it transfers point to point (else None)."""
    p2p = next((c[0] for c in rec.calls if c[0] in _P2P), None)
    if p2p is None:
        return None
    return f"it sends or receives point to point ({p2p}): the peer is relative to the rank"


def _describe(i: int, a: tuple, b: tuple) -> str:
    from gg_notebook.capture.source import format_source

    site = format_source((b[5][0], b[5][1], "", "")) if b[5] else None
    at = f" at {site}" if site else ""
    if a[0] != b[0]:
        return f"operator call {i}{at} is {b[0]}, not {a[0]} as on the representative"
    if a[4] != b[4]:
        return f"operator call {i} ({b[0]}){at} has results of other shapes"
    if a[5] != b[5]:
        return f"operator call {i} ({b[0]}) comes from another line{at}"
    return f"operator call {i} ({b[0]}){at} has other non-numeric arguments or data flow"


# ----------------------------------------------------------------------------------- specializing


def _functional_name(op: str) -> str:
    """"aten.add_.Tensor" -> "aten.add.Tensor" (the functional form functionalization uses)."""
    parts = op.split(".")
    if len(parts) >= 2 and parts[1].endswith("_") and not parts[1].startswith("_"):
        parts[1] = parts[1][:-1]
    return ".".join(parts)


def _rebuild(x: Any, leaves: Iterator) -> Any:
    """``x`` with its leaves (in `_flatten` order) taken from ``leaves``."""
    if isinstance(x, (list, tuple)):
        return type(x)(_rebuild(y, leaves) for y in x) if isinstance(x, tuple) else [_rebuild(y, leaves) for y in x]
    if isinstance(x, dict):
        return {k: _rebuild(v, leaves) for k, v in x.items()}
    return next(leaves)


class Specializer:
    """Derives symmetric ranks' finished fx graphs from the representative's (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, rep: Recording, traced: Recording) -> None:
        self.gm = gm
        self.rep = rep
        self.reason: str | None = None
        if traced.error:
            self.reason = f"the representative's trace could not be recorded: {traced.error}"
        elif (len(traced.calls) != len(rep.calls) or traced.returns != rep.returns or traced.inputs != rep.inputs
              or not all(_same_call(a, b) for a, b in zip(traced.calls, rep.calls))):
            where = next((i for i, (a, b) in enumerate(zip(traced.calls, rep.calls)) if not _same_call(a, b)),
                         min(len(traced.calls), len(rep.calls)))
            self.reason = (f"rank {rep.rank} issued other operator calls under make_fx than when run plainly "
                           f"(first difference at call {where})")
        for k in ("gg_specialized", "gg_selections"):
            if gm.meta.get(k):
                self.reason = f"rank {rep.rank}'s graph was captured for its example inputs ({k})"
        self.one_pass = bool(gm.meta.get("gg_one_pass"))
        self._storage = None
        self.by_call: dict[int, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            c = n.meta.get("gg_call")
            if c is not None and n.op == "call_function" and n.target is not _getitem:
                self.by_call.setdefault(c, []).append(n)

    # storage ------------------------------------------------------------------------------------
    def _last_write(self, k: int) -> int | None:
        """The last call that writes tensor ``k``'s storage (through ``k`` or any tensor sharing it, by
        the schemas' alias annotations), -1 if none, None if the recording cannot tell."""
        if self.rep.opaque:
            return None
        if self._storage is None:
            parent: dict[int, int] = {}

            def find(a: int) -> int:
                while parent.get(a, a) != a:
                    parent[a] = parent.get(parent[a], parent[a])
                    a = parent[a]
                return a

            for o, i in self.rep.aliases:
                ro, ri = find(o), find(i)
                if ro != ri:
                    parent[ro] = ri
            last: dict[int, int] = {}
            for c, t in self.rep.writes:
                r = find(t)
                last[r] = max(last.get(r, -1), c)
            self._storage = (find, last)
        find, last = self._storage
        return last.get(find(k), -1)

    def _unwritten_after(self, ids, call: int) -> bool:
        for k in ids:
            w = self._last_write(k)
            if w is None or w > call:
                return False
        return True

    # nodes --------------------------------------------------------------------------------------
    def _node(self, call: int) -> tuple[fx.Node, list, list[int]] | str:
        """The one graph node call ``call`` left of its operator (or its functional form), its flat
        arguments, and where the recorded numbers sit in them; checked against the recording."""
        op, _spec, structure, scalars = self.rep.calls[call][:4]
        want = {op, _functional_name(op)}
        nodes = [n for n in self.by_call.get(call, []) if str(n.target) in want]
        if len(nodes) != 1:
            return f"call {call} ({op}) did not leave exactly one {op} node in the graph"
        node = nodes[0]
        flat, shape = _flat_args(node)
        if len(flat) != len(structure) or shape != _spec:
            return f"call {call} ({op}) was traced with other arguments"
        slots = []
        for p, (x, s) in enumerate(zip(flat, structure)):
            if s[0] == "num":
                if not (isinstance(x, _SCALARS) and not isinstance(x, bool)):
                    return f"call {call} ({op}) was traced with other arguments"
                slots.append(p)
            elif s[0] in ("t", "new") and not isinstance(x, fx.Node):
                return f"call {call} ({op}) was traced with other arguments"
        if len(slots) != len(scalars) or not all(_same_number(flat[p], v) for p, v in zip(slots, scalars)):
            return f"call {call} ({op}) holds other numbers in the graph than were recorded"
        return node, flat, slots

    def _site(self, call: int) -> tuple[fx.Node, list[int]] | str:
        """The graph node holding call ``call``'s numbers and where they sit in its flat arguments.

        A view's numbers are substituted like any other call's where functionalization left the view
        as it was recorded: in a one-pass graph (no functionalizing replay, every node is a recorded
        call), and in a two-pass graph when nothing writes the view's storage after the view is made
        (functionalization replays a view's arguments only into the scatters of a write through it and
        the views it regenerates after a write to its storage). An in-place change of a view's
        metadata (``as_strided_``, ``transpose_``) never is."""
        op = self.rep.calls[call][0]
        overload = _lookup(op)
        if overload is None:
            return f"a rank constant is an argument of {op}, an operator not found"
        if _is_view(op, overload):
            if torch.Tag.inplace_view in overload.tags or _functional_name(op) != op:
                return f"a rank constant is an argument of the in-place view {op}"
            if not self.one_pass:
                outs = [o[0] for o in self.rep.calls[call][4] if o and isinstance(o[0], int)]
                if not self._unwritten_after(outs, call):
                    return (f"a rank constant is an argument of the view {op} (call {call}), whose storage is "
                            "written later: functionalization replays its arguments into other calls")
        got = self._node(call)
        if isinstance(got, str):
            return got
        if _is_view(op, overload):
            why = self._regenerated(call, got[0], got[2])
            if why is not None:
                return why
        return got[0], got[2]

    def _regenerated(self, call: int, node: fx.Node, slots: list[int]) -> str | None:
        """A guard that does not rely on the alias analysis: another node of the view's operator, made
        under a call of another operator (or under none), holding the representative's numbers at the
        same places -- a view functionalization regenerated after a write the recorder did not see as
        one (its numbers would stay rank 0's) -- makes the rank a fallback."""
        scalars = self.rep.calls[call][3]
        want = {str(node.target)}
        for n in self.gm.graph.nodes:
            if n is node or n.op != "call_function" or str(n.target) not in want:
                continue
            c = n.meta.get("gg_call")
            if c is not None and self.rep.calls[c][0] in (self.rep.calls[call][0],
                                                          _functional_name(self.rep.calls[call][0])):
                continue  # a recorded call of the same view operator: its own numbers, checked on its own
            flat, _ = _flat_args(n)
            if len(flat) > max(slots, default=-1) and all(_same_number(flat[p], v) for p, v in zip(slots, scalars)):
                return (f"a rank constant is an argument of the view {self.rep.calls[call][0]} (call {call}), and "
                        f"the graph holds the same view made under {'no call' if c is None else f'call {c}'} "
                        "(functionalization replayed it)")
        return None

    def _tensor_node(self, k: int) -> fx.Node | tuple[fx.Node, int] | str:
        """The graph node of recorded tensor ``k`` (the result of a call): the call's node, or its
        ``getitem`` for one result of a multi-output call ((node, position) when the representative's
        graph holds no such getitem, dead code there)."""
        prod = _producers(self.rep).get(k)
        if prod is None:
            return f"tensor {k} is no call's result"
        c, p, _ = prod
        got = self._node(c)
        if isinstance(got, str):
            return got
        node = got[0]
        val = node.meta.get("val")
        n_out = len(self.rep.calls[c][4])
        if isinstance(val, (list, tuple)):
            if len(val) != n_out:
                return f"call {c} ({self.rep.calls[c][0]}) has another number of results in the graph"
            items = [u for u in node.users if u.target is _getitem and u.args[1:] == (p,)]
            if len(items) > 1:
                return f"call {c} ({self.rep.calls[c][0]}) has its result {p} read by several getitems"
            return items[0] if items else (node, p)
        if n_out != 1 or p != 0:
            return f"call {c} ({self.rep.calls[c][0]}) has another number of results in the graph"
        return node

    def _sibling(self, call: int, like: fx.Node) -> tuple | str:
        """How to make the node of view call ``call``, which left none in the representative's graph
        (its result was dead code there), from ``like``, the node of a call of the same operator from
        the same line (`_selected`): ("make", call, like, its flat arguments), the recorded tensors
        read from their nodes and the recorded numbers, every other argument as in ``like``."""
        op, spec, structure, scalars = self.rep.calls[call][:4]
        overload = _lookup(op)
        if overload is None or not _is_view(op, overload) or torch.Tag.inplace_view in overload.tags \
                or _functional_name(op) != op:
            return f"call {call} ({op}) left no node in the representative's graph"
        like_call = like.meta.get("gg_call")
        if like_call is None or self.rep.calls[like_call][1] != spec:
            return f"call {call} ({op}) left no node in the representative's graph"
        flat, shape = _flat_args(like)
        other = self.rep.calls[like_call][2]
        if len(flat) != len(structure) or shape != spec or len(other) != len(structure):
            return f"call {call} ({op}) left no node in the representative's graph"
        inputs = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        args, numbers = [], iter(scalars)
        for x, leaf, mine in zip(flat, structure, other):
            if leaf[0] == "t":
                k = leaf[1]
                node = inputs[k] if k < len(self.rep.inputs) and len(inputs) == len(self.rep.inputs) \
                    else self._tensor_node(k)
                # never written since it was made (an input: never): the node is its value at ``call``
                made = _producers(self.rep).get(k, (-1,))[0]
                if not isinstance(node, fx.Node) or not self._unwritten_after([k], made):
                    return f"call {call} ({op}) reads a tensor the representative's graph does not hold"
                args.append(node)
            elif leaf[0] == "num" and mine == leaf:
                args.append(next(numbers))
            elif leaf == mine and leaf[0] in ("lit",):
                args.append(x)
            else:
                return f"call {call} ({op}) has other arguments than call {like_call}"
        return ("make", call, like, args)

    def _rewiring(self, slot_of: str, at: int, ka: int, kb: int, flat: list) -> tuple | str:
        src = self._tensor_node(ka)
        if isinstance(src, str):
            return src
        if not isinstance(src, fx.Node) or flat[at] is not src:
            return f"{slot_of} does not read the recorded tensor in the representative's graph"
        cb = _producers(self.rep)[kb][0]
        if cb != _producers(self.rep)[ka][0] and not self.by_call.get(cb):
            dst = self._sibling(cb, src)  # dead code in the representative's graph: made from src's node
        else:
            dst = self._tensor_node(kb)
        if isinstance(dst, str):
            return dst
        for k in (ka, kb):
            if not self._unwritten_after([k], _producers(self.rep)[k][0]):
                return f"{slot_of} reads a rank-selected tensor that is written later"
        return src, dst

    def graph_for(self, diff: Diff) -> fx.GraphModule | str:
        """A copy of the representative's graph with ``diff``'s numbers and rank-selected tensors, or
        why it cannot be made."""
        if self.reason:
            return self.reason
        plan = []
        for call, values in diff.values.items():
            site = self._site(call)
            if isinstance(site, str):
                return site
            node, slots = site
            scalars = self.rep.calls[call][3]
            for other in self.by_call.get(call, []):
                if other is not node and any(_same_number(x, scalars[k]) for x in _flat_args(other)[0]
                                             for k in values):
                    return (f"call {call} ({self.rep.calls[call][0]}) left its number in another graph node too "
                            f"({other.target})")
            plan.append((node, {slots[k]: v for k, v in values.items()}))
        rewire = []  # (node, flat slot, the node it reads now, the node or (multi-output node, position) to read)
        for call, refs in diff.refs.items():
            if not self.by_call.get(call) and not any(o and isinstance(o[0], int) for o in self.rep.calls[call][4]):
                continue  # a query that left no node and returned no tensor: nothing to read
            got = self._node(call)
            if isinstance(got, str):
                return got
            node, flat, _ = got
            for at, (ka, kb) in refs.items():
                r = self._rewiring(f"call {call} ({self.rep.calls[call][0]})", at, ka, kb, flat)
                if isinstance(r, str):
                    return r
                rewire.append((node, at, *r))
        if diff.returns:
            out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
            flat = _flat_args(out)[0]
            if len(flat) != len(self.rep.returns):
                return "the representative's graph returns another number of tensors than were recorded"
            for q, (ka, kb) in diff.returns.items():
                r = self._rewiring(f"returned tensor {q}", q, ka, kb, flat)
                if isinstance(r, str):
                    return r
                rewire.append((out, q, *r))
        return _copy_with(self.gm, plan, rewire)


_getitem = __import__("operator").getitem


def _is_view(name: str, overload) -> bool:
    """Is the call a view, or an in-place change of its argument's view metadata (``as_strided_``,
    ``transpose_``, ``squeeze_``, ``t_``, ``set_``, ...)? Functionalization may replay such a call's
    arguments into the nodes of later calls (scatters, regenerated views), where a substituted number
    would not reach: see `Specializer._site` for when a view's rank constant is substituted."""
    if overload.is_view or torch.Tag.inplace_view in overload.tags:
        return True
    functional = _lookup(_functional_name(name))
    if functional is not None and functional.is_view:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in overload._schema.returns)


def _lookup(name: str):
    """The OpOverload named ``name`` ("aten.add.Tensor"), or None."""
    parts = name.split(".")
    try:
        obj = getattr(torch.ops, parts[0])
        obj = getattr(obj, parts[1])
        return getattr(obj, parts[2] if len(parts) > 2 else "default")
    except (AttributeError, IndexError):
        return None


class _Refused(Exception):
    pass


def _copy_with(gm: fx.GraphModule, plan: list[tuple[fx.Node, dict[int, Any]]], rewire: list = ()) \
        -> fx.GraphModule | str:
    """A copy of ``gm`` with ``plan``'s numbers and ``rewire``'s rank-selected tensors (see
    `Specializer.graph_for`): the values (``meta["val"]``) of the views that changed are computed
    again (a view of another offset: its storage offset differs), the getitems no longer read dropped."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    # graph_copy keeps node names; outputs were copied as the output node
    new_out = next(n for n in reversed(g.nodes) if n.op == "output")
    changed: list[fx.Node] = []
    for node, subs in plan:
        new = env[node]
        flat, _ = _flat_args(new)
        for p, v in subs.items():
            flat[p] = v
        it = iter(flat)
        new.args, new.kwargs = _rebuild(new.args, it), _rebuild(new.kwargs, it)
        changed.append(new)
    if rewire:
        made: dict = {}
        dropped = []
        for node, at, src, dst in rewire:
            new = new_out if node.op == "output" else env[node]
            if isinstance(dst, tuple) and dst[0] == "make":
                key = ("make", dst[1])
                if key not in made:
                    made[key] = _made_node(g, dst[1], env[dst[2]], [env[a] if isinstance(a, fx.Node) else a
                                                                     for a in dst[3]])
                    changed.append(made[key])
                dst = made[key]
            elif isinstance(dst, tuple):
                dst = made.get(dst) or _getitem_node(g, env[dst[0]], dst[1], env[src], made, dst)
            else:
                dst = env[dst]
            flat, _ = _flat_args(new)
            flat[at] = dst
            it = iter(flat)
            new.args, new.kwargs = _rebuild(new.args, it), _rebuild(new.kwargs, it)
            changed.append(new)
            dropped.append(env[src])
        erased: set = set()
        for n in dropped:  # what the rank's own trace would not hold (its dead code is eliminated)
            while n is not None and n not in erased and not n.users and n.op == "call_function" and (
                    n.target is _getitem or (isinstance(n.target, torch._ops.OpOverload) and not n.is_impure())):
                ins = n.all_input_nodes
                g.erase_node(n)
                erased.add(n)
                n = ins[0] if len(ins) == 1 else None
    if changed:
        try:
            _refresh_values(g, changed)
        except _Refused as e:
            return str(e)
    # no code generation: the copy is only walked (lowering reads its graph, meta and constants); a
    # lazy module generates its Python code if anyone runs it or reads ``.code``
    copy_gm = _LazyGraphModule(gm, g)
    copy_gm.meta = copy.copy(gm.meta)
    return copy_gm


def _getitem_node(g: fx.Graph, parent: fx.Node, p: int, like: fx.Node, made: dict, key) -> fx.Node:
    """A new ``parent[p]`` after ``parent`` and its getitems of smaller positions (where a trace puts it),
    with ``like``'s metadata (a getitem of the same parent) and its own value."""
    after = parent
    for u in parent.users:
        if u.target is _getitem and isinstance(u.args[1], int) and u.args[1] < p:
            after = u if _before(after, u) else after
    with g.inserting_after(after):
        n = g.call_function(_getitem, (parent, p))
    n.meta = dict(like.meta)
    n.meta["val"] = parent.meta["val"][p]
    made[key] = n
    return n


def _made_node(g: fx.Graph, call: int, like: fx.Node, flat: list) -> fx.Node:
    """The node of ``call`` (see `Specializer._sibling`): ``like``'s operator on ``flat``, where a trace
    puts it (before the first node of a later call); its value is computed by `_refresh_values`."""
    need = {a for a in flat if isinstance(a, fx.Node)}
    at = None
    for n in g.nodes:
        if not need and (n.op == "output" or (n.meta.get("gg_call") is not None and n.meta["gg_call"] > call)):
            at = n
            break
        need.discard(n)
    it = iter(flat)
    args, kwargs = _rebuild(like.args, it), _rebuild(like.kwargs, it)
    with g.inserting_before(at):
        n = g.call_function(like.target, args, kwargs)
    n.meta = dict(like.meta)
    n.meta["gg_call"] = call
    return n


def _before(a: fx.Node, b: fx.Node) -> bool:
    n = a.next
    while n is not a and n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _aliases_input(target) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _same_layout(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def _refresh_values(g: fx.Graph, changed: list[fx.Node]) -> None:
    """Compute again the value of every view (and getitem) among ``changed`` and, when its storage
    offset moved, of the views reading it, on the graph's fake tensors. Any other operator's result is
    a fresh tensor whose shape and strides the recording showed to be the rank's; a moved view read by
    an operator that is not an aten one (a collective) is refused."""
    from torch._guards import detect_fake_mode

    pending = set(changed)
    for n in g.nodes:
        if n not in pending:
            continue
        if n.op == "output" or (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                                and not _aliases_input(n.target)):
            continue
        old = n.meta.get("val")
        if n.op == "call_function" and n.target is _getitem:
            parent, idx = n.args
            pv = parent.meta.get("val")
            if not isinstance(pv, (list, tuple)) or not isinstance(idx, int):
                raise _Refused(f"the value of {n.name} cannot be computed again")
            new = pv[idx]
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
            mode = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
            if mode is None:
                raise _Refused(f"the value of {n.name} cannot be computed again (no fake tensors)")
            with mode, torch.no_grad():
                new = n.target(*args, **kwargs)
        else:
            raise _Refused(f"a rank-selected view reaches {n.target} directly (its recorded inputs would be "
                           "the representative's)")
        if isinstance(old, torch.Tensor):
            if not _same_layout(old, new):
                raise _Refused(f"the derived value of {n.name} has another shape than recorded")
            moved = old.storage_offset() != new.storage_offset()
        else:
            if not isinstance(old, (list, tuple)) or not isinstance(new, (list, tuple)) or len(old) != len(new) \
                    or not all(_same_layout(a, b) for a, b in zip(old, new)):
                raise _Refused(f"the derived value of {n.name} has another shape than recorded")
            moved = any(a.storage_offset() != b.storage_offset() for a, b in zip(old, new))
        if moved:
            n.meta["val"] = new
            pending.update(n.users)
